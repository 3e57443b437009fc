"""RELP with real rsyslogd 8.2302 (rsyslog-relp) and real relay processes, loopback only."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.support.certs import PKI, pki, server_tls  # noqa: F401  (fixture)
from tests.support.relayproc import Listener, RelayProcess
from tests.support.relp_rsyslog import ImrelpInput, OmrelpForward, RelpRsyslog
from tests.support.rsyslog import free_port
from tests.support.traffic import seq_counts, wait_seq_counts

pytestmark = pytest.mark.integration
WAIT = 60.0


def lines(tag: str, start: int, n: int) -> list[bytes]:
    return [
        f"<14>Nov 26 01:02:03 feeder app: {tag} seq={i:06d}".encode()
        for i in range(start, start + n)
    ]


@pytest.mark.parametrize("ack", ["fsync", "write"])
def test_kill_9_edge_under_omrelp_load_loses_nothing(tmp_path: Path, ack: str) -> None:
    """Whether the edge answers omrelp after fsync or after the write: a kill -9 loses
    nothing it acknowledged (written data is in the page cache, which outlives it)."""
    core_port, edge_port = free_port(), free_port()
    core = RelayProcess(tmp_path / "core", [Listener("relp", port=core_port)], relay_id="core")
    edge = RelayProcess(
        tmp_path / "edge",
        [Listener("relp", port=edge_port, ack=ack)],
        forward=[
            {
                "name": "core",
                "peers": [f"127.0.0.1:{core_port}"],
                "transport": "relp",
                "reconnect_min": "0.1s",
                "reconnect_max": "0.5s",
                "max_spool": "256MiB",
            }
        ],
        staging={"fsync_interval": "200ms"},
        relay_id="edge",
    )
    rs = RelpRsyslog(tmp_path / "rsyslog", forwards=[OmrelpForward("edge", edge_port)])
    core.start()
    edge.start()
    rs.start()
    tag = uuid.uuid4().hex
    total = 6000
    feeder_done = threading.Event()

    def feed() -> None:
        for start in range(0, total, 300):
            rs.send("edge", lines(tag, start, 300))
            time.sleep(0.05)
        feeder_done.set()

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    # Kill the edge in the middle of the load, then bring it back.
    deadline = time.monotonic() + WAIT
    while len(seq_counts(edge, tag)) < 1500 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert edge.proc is not None
    os.kill(edge.proc.pid, signal.SIGKILL)
    edge.proc.wait(10)
    time.sleep(0.5)
    edge.start()
    t.join(60)
    assert feeder_done.is_set()
    # Every message rsyslog accepted (its omfile copy) reaches the core.
    sent = rs.wait_lines(rs.copy_path("edge"), total, timeout=WAIT)
    assert len(sent) == total
    got = wait_seq_counts(core, tag, total, WAIT)
    missing = sorted(set(range(total)) - set(got))
    assert not missing, (
        f"{len(missing)} missing (first {missing[:5]})\n{edge.log()}\n{rs.diagnostics()}"
    )
    assert "spool core" in edge.log_path.read_text()
    rs.stop()
    edge.stop()
    core.stop()


def test_relay_forwards_to_rsyslog_imrelp_byte_exact(tmp_path: Path) -> None:
    imrelp = ImrelpInput("in")
    rs = RelpRsyslog(tmp_path / "rsyslog", inputs=[imrelp])
    rs.start()
    edge_in = Listener("tcp")
    edge = RelayProcess(
        tmp_path / "edge",
        [edge_in],
        forward=[
            {
                "name": "rsyslog",
                "peers": [f"127.0.0.1:{imrelp.port}"],
                "transport": "relp",
                "window": 32,
            }
        ],
        relay={"loop_guard": False},
        relay_id="edge",
    )
    edge.start()
    tag = uuid.uuid4().hex
    msgs = [
        f'<14>1 2026-11-26T01:02:03.{i:06d}Z h app - - [x@1 k="v"] {tag} seq={i:06d} ü'.encode()
        for i in range(500)
    ]
    import socket

    from relay.formats import octet

    with socket.create_connection(("127.0.0.1", edge_in.port), timeout=10) as s:
        s.sendall(b"".join(octet.encode(m) for m in msgs))
    got = rs.wait_lines(rs.received_path("in"), 500, timeout=WAIT)
    assert got == msgs  # exactly once, in order, byte-exact
    edge.stop()
    rs.stop()


def test_omrelp_tls_into_relay(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    port = free_port()
    relay = RelayProcess(
        tmp_path / "relay",
        [Listener("relp+tls", port=port)],
        tls=server_tls(pki, ["good.clients.test"]),
    )
    relay.start()
    rs = RelpRsyslog(tmp_path / "rsyslog", forwards=[OmrelpForward("r", port, tls=True)], pki=pki)
    rs.start()
    tag = uuid.uuid4().hex
    rs.send("r", lines(tag, 0, 300))
    sent = rs.wait_lines(rs.copy_path("r"), 300, timeout=WAIT)
    got = wait_seq_counts(relay, tag, 300, WAIT)
    assert set(got) == set(range(300)) and set(got.values()) == {1}
    staged = {r.msg for r in relay.records() if tag.encode() in r.msg}
    assert staged == set(sent)  # byte-exact as omrelp sent them
    assert all(r.sender.startswith(b"relp+tls://127.0.0.1:") for r in relay.records())
    rs.stop()
    relay.stop()


def test_relp_tls_port_bounds_silent_and_plain_clients(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    import socket

    port = free_port()
    relay = RelayProcess(
        tmp_path / "relay",
        [Listener("relp+tls", port=port)],
        tls={**server_tls(pki), "handshake_timeout": "1s"},
    )
    relay.start()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as silent:
        silent.settimeout(10)
        try:  # closed (or reset) by the relay after the handshake deadline
            assert silent.recv(1) == b""
        except ConnectionResetError:
            pass
    with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
        plain.sendall(b"1 open 85 relp_version=0\n")
        plain.shutdown(socket.SHUT_WR)
        plain.settimeout(10)
        try:
            while plain.recv(4096):
                pass
        except ConnectionResetError:
            pass
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        log = relay.log_path.read_text()
        if "not completed within" in log and "not a TLS handshake" in log:
            break
        time.sleep(0.1)
    assert "not completed within" in log and "not a TLS handshake" in log, log[-3000:]
    assert relay.alive()
    relay.stop()
