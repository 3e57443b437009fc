"""UDP datagrams dropped by the kernel are counted and exported (issue 11, item 7)."""

from __future__ import annotations

import socket
from pathlib import Path

from twisted.internet.task import Clock

from relay.inputs.tcp_udp import SyslogDatagramProtocol
from relay.inputs.udp_drops import drops_by_inode, socket_drops
from relay.ops.snapshots import BoundListener
from tests.test_observe import (
    T0,
    FakeListener,
    FakePort,
    FakeRelay,
    _scrape,
    make_config,
    started,
)

PROC_SAMPLE = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
 1234: 0100007F:1E61 00000000:0000 07 00000000:00000000 00:00000000 00000000   100        0 4242 2 0000000000000000 17
 1235: 00000000:0202 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 99 2 0000000000000000 0
 garbage
"""  # noqa: E501


def test_drops_column_by_inode() -> None:
    assert drops_by_inode(PROC_SAMPLE) == {4242: 17, 99: 0}


class UdpPort:
    """What a UDP listener reads of its listening port: its socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()


def overflowed_socket() -> tuple[socket.socket, int]:
    """A bound socket nobody reads, sent more than its smallest buffer holds."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum
    rx.bind(("127.0.0.1", 0))
    n = 200
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        for _ in range(n):
            tx.sendto(b"<13>Jan  2 03:04:05 host app: " + b"x" * 1000, rx.getsockname())
    return rx, n


def test_kernel_drops_of_a_real_socket() -> None:
    rx, n = overflowed_socket()
    with rx:
        drops = socket_drops(rx.fileno())
        assert drops is not None and 0 < drops < n
        queued = 0
        rx.setblocking(False)
        for _ in range(n):
            try:
                rx.recv(2048)
            except BlockingIOError:
                break
            queued += 1
        assert queued + drops == n  # every datagram either queued or counted as dropped


def test_socket_drops_unknown_socket(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        assert socket_drops(s.fileno()) is None  # not a UDP socket
        assert socket_drops(s.fileno(), proc_net=tmp_path) is None  # no procfs


def test_metric_per_udp_listener(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(T0)
    relay = FakeRelay(make_config(tmp_path), clock)
    obs = started(relay)
    rx, _ = overflowed_socket()
    with rx:
        lc_tcp, lc_udp = relay.config.listen
        udp = SyslogDatagramProtocol(lc_udp.name, None, relay.metrics, 1024, "truncate")  # type: ignore[arg-type]
        udp.transport = UdpPort(rx)  # the listener reports its own socket's drops
        relay.listeners.ports = [
            BoundListener(lc_tcp, FakePort(5514), FakeListener(0)),
            BoundListener(lc_udp, FakePort(5514), udp),
        ]
        got = _scrape(obs)
        drops = socket_drops(rx.fileno())
    relay.stopService()
    assert drops
    assert got["syslog_relay_udp_receive_drops_total"] == {(("listener", "udp:5514"),): drops}
