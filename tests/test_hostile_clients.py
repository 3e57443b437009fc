"""Listeners against hostile clients over real loopback sockets (issue 11).

The relay's side runs on a private reactor in a thread (as tests/test_interop_relp.py
does) or is a relay process; the client is a plain socket that misbehaves on purpose.
"""

from __future__ import annotations

import inspect
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.threads import blockingCallFromThread
from twisted.protocols.tls import TLSMemoryBIOFactory

from relay.config import TLSConfig
from relay.framing.rfc6587 import Frame
from relay.inputs.tls_server import ServerTLS
from relay.ops.metrics import Metrics
from relay.relp.protocols import RelpServerFactory
from tests.support.certs import PKI, pki  # noqa: F401  (fixture)
from tests.support.relayproc import Listener, RelayProcess, read_staging

WAIT = 60.0
_TLS_FACTORY_ARGS = inspect.signature(TLSMemoryBIOFactory.__init__).parameters
_OFFERS = b"relp_version=0\ncommands=syslog\nrelp_software=t"
OPEN = b"1 open %d %s\n" % (len(_OFFERS), _OFFERS)


def syslog_frames(first: int, n: int) -> bytes:
    out = []
    for t in range(first, first + n):
        msg = b"<13>Jan  2 03:04:05 host app: m %010d" % t
        out.append(b"%d syslog %d %s\n" % (t, len(msg), msg))
    return b"".join(out)


@pytest.fixture(scope="module")
def reactor() -> Iterator[SelectReactor]:
    r = SelectReactor()
    t = threading.Thread(target=r.run, kwargs={"installSignalHandlers": False}, daemon=True)
    t.start()
    yield r
    r.callFromThread(r.stop)
    t.join(WAIT)


def wait_for(cond: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def closed_by_peer(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:  # aborted: the relay sent a RST
        return True


def metric(reactor: SelectReactor, metrics: Metrics, name: str, **labels: str) -> int:
    """Read a counter in the reactor thread, which is the one that writes them."""
    return int(blockingCallFromThread(reactor, lambda: metrics.get(name, **labels)))


class Relay:
    """A RELP listener on loopback whose connections have a small kernel send buffer:
    without autotuning the kernel takes a few KiB of answers, not megabytes, so
    Twisted's own buffer is what fills, quickly."""

    def __init__(self, reactor: SelectReactor, tls: Any = None) -> None:
        self.reactor = reactor
        self.metrics = Metrics()
        self.conns: list[Any] = []
        self.delivered: list[int] = []
        self.factory = RelpServerFactory(
            "relp_in",
            self.deliver,
            self.metrics,
            reactor,
            max_data=128 * 1024,
            on_connect=self.on_connect,
        )
        wrapped: Any = self.factory
        if tls is not None:
            kw = {"clock": reactor} if "clock" in _TLS_FACTORY_ARGS else {}
            wrapped = TLSMemoryBIOFactory(tls, False, self.factory, **kw)
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        self.port = blockingCallFromThread(reactor, endpoint.listen, wrapped)

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port.getHost().port)

    def deliver(self, messages: list[bytes | Frame], sender: bytes) -> Deferred[None]:
        self.delivered.append(len(messages))
        return succeed(None)

    def on_connect(self, proto: Any) -> None:
        proto.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.conns.append(proto)

    def paused(self) -> bool:
        proto = self.conns[0]
        return bool(blockingCallFromThread(self.reactor, lambda: "answers" in proto.holds))

    def metric(self, name: str, **labels: str) -> int:
        return metric(self.reactor, self.metrics, name, **labels)

    def stop(self) -> None:
        blockingCallFromThread(self.reactor, self.port.stopListening)


def client_socket(relay: Relay) -> socket.socket:
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(relay.address)
    client.sendall(OPEN)
    wait_for(lambda: bool(relay.conns), "the connection")
    return client


def fill_until_paused(relay: Relay, client: socket.socket) -> tuple[int, bytes]:
    """Send syslog commands, reading nothing, until the relay stops reading.
    Returns the next TXNR and what could not be sent yet."""
    client.setblocking(False)
    txnr, pending = 2, b""
    for _ in range(100_000):  # bounded: the relay pauses after a few thousand
        if not pending:
            pending = syslog_frames(txnr, 100)
            txnr += 100
        try:
            pending = pending[client.send(pending) :]
        except BlockingIOError:
            if relay.paused():
                break
            time.sleep(0.01)
    client.setblocking(True)
    client.settimeout(WAIT)
    return txnr, pending


def read_to_eof(s: socket.socket, timeout: float = 20.0) -> bytes:
    s.settimeout(timeout)
    got = b""
    while True:
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError):
            return got
        if not chunk:
            return got
        got += chunk


def test_client_that_never_reads_its_answers_is_no_longer_read(reactor: SelectReactor) -> None:
    """Issue 11, item 1: the relay stops reading a client whose answers pile up unsent,
    and resumes, losing nothing, once the client reads them."""
    relay = Relay(reactor)
    client = client_socket(relay)
    try:
        txnr, pending = fill_until_paused(relay, client)
        assert relay.paused()
        assert relay.metric("relp_answer_backpressure_pauses_total") >= 1
        # What the relay took in stays bounded: it is no longer reading this client.
        sent_whole = txnr - 2 - pending.count(b"\n")
        assert relay.metric("relp_messages_received_total") < sent_whole
        # The client reads its answers: the relay resumes and answers everything sent.
        if pending:
            threading.Thread(target=client.sendall, args=(pending,), daemon=True).start()
        answers = b""
        want = txnr - 2
        while answers.count(b" rsp 6 200 OK\n") < want:
            chunk = client.recv(65536)
            assert chunk, "the relay closed the session"
            answers += chunk
        assert answers.count(b" rsp 6 200 OK\n") == want
        assert sum(relay.delivered) == want
        proto = relay.conns[0]
        assert not blockingCallFromThread(reactor, lambda: proto.paused)
    finally:
        client.close()
        relay.stop()


def test_relay_hang_up_while_answers_wait(reactor: SelectReactor) -> None:
    """A hang-up (shutdown, idle timeout, removed listener) with the answers' producer
    paused: once the client reads the answers the connection ends, it is not resumed."""
    relay = Relay(reactor)
    client = client_socket(relay)
    try:
        fill_until_paused(relay, client)
        blockingCallFromThread(reactor, relay.factory.close_all)
        got = read_to_eof(client)  # times out (fails) if the relay never closes
        # Unread commands in the relay's socket make the kernel end with a RST, which may
        # discard the last answers: the point is that the connection ends.
        assert got.startswith(b"1 rsp ")
        connections = relay.factory.connections
        wait_for(lambda: not blockingCallFromThread(reactor, lambda: len(connections)), "close")
    finally:
        client.close()
        relay.stop()


def test_relay_hang_up_over_tls(reactor: SelectReactor, pki: PKI) -> None:  # noqa: F811
    """Over TLS a transport with a producer registered waits for it before it closes."""
    tls = ServerTLS(TLSConfig(certificate=str(pki.server.cert), key=str(pki.server.key)))
    relay = Relay(reactor, tls)
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    raw = socket.create_connection(relay.address, timeout=WAIT)
    with ctx.wrap_socket(raw, server_hostname="relay.test") as client:
        client.sendall(OPEN + syslog_frames(2, 3))
        got = b""
        while got.count(b" rsp 6 200 OK\n") < 3:
            got += client.recv(65536)
        blockingCallFromThread(reactor, relay.factory.close_all)
        assert read_to_eof(client) == b"0 serverclose 0\n"
    relay.stop()


def test_slowloris_over_loopback(reactor: SelectReactor) -> None:
    """Issue 11, item 6: connections beyond the per-source limit are refused, and one
    trickling a frame is closed once the frame deadline passes; a client sending whole
    commands keeps its session."""
    metrics = Metrics()

    def deliver(messages: list[bytes | Frame], sender: bytes) -> Deferred[None]:
        return succeed(None)

    factory = RelpServerFactory(
        "relp_in",
        deliver,
        metrics,
        reactor,
        max_data=128 * 1024,
        frame_timeout=0.5,
        max_connections_per_source=2,
    )
    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port = blockingCallFromThread(reactor, endpoint.listen, factory)
    addr = ("127.0.0.1", port.getHost().port)
    socks = [socket.create_connection(addr, timeout=WAIT) for _ in range(2)]
    try:
        good, slow = socks
        wait_for(
            lambda: blockingCallFromThread(reactor, lambda: len(factory.connections)) == 2,
            "two sessions",
        )
        try:  # a third connection from 127.0.0.1 is refused (the RST may beat connect())
            socks.append(socket.create_connection(addr, timeout=WAIT))
            assert closed_by_peer(socks[-1])
        except ConnectionResetError:
            pass
        for s in (good, slow):
            s.sendall(OPEN)
            assert s.recv(4096).startswith(b"1 rsp ")
        slow.sendall(b"2 sys")  # ... and nothing more
        txnr = 2
        while not metric(reactor, metrics, "frame_timeouts_total"):  # the relay's deadline
            good.sendall(syslog_frames(txnr, 1))
            assert good.recv(4096) == b"%d rsp 6 200 OK\n" % txnr
            txnr += 1
            assert txnr < 100_000
        assert closed_by_peer(slow)
        good.sendall(syslog_frames(txnr, 1))
        assert good.recv(4096) == b"%d rsp 6 200 OK\n" % txnr
        refused = metric(reactor, metrics, "connections_refused_total")
        assert refused == 1  # reason max_connections_per_source
        assert metric(reactor, metrics, "frame_timeouts_total") == 1
    finally:
        for s in socks:
            s.close()
        blockingCallFromThread(reactor, port.stopListening)


def test_oversize_relp_message_is_staged_truncated_by_a_relay_process(tmp_path: Path) -> None:
    """Issue 11, item 5, end to end: the relay stages the big message cut to
    max_message_size and flagged T, the one before and after it too, and answers all."""
    lc = Listener("relp")
    relay = RelayProcess(tmp_path, [lc], limits={"max_message_size": 480})
    relay.start()
    try:
        big = b"<13>Jan  2 03:04:05 host app: big " + b"B" * 1000
        wire = OPEN + b"".join(
            b"%d syslog %d %s\n" % (t, len(m), m)
            for t, m in [(2, b"<13>Jan  2 03:04:05 host app: before"), (3, big)]
        )
        wire += b"4 syslog 35 <13>Jan  2 03:04:05 host app: after\n"
        with socket.create_connection(("127.0.0.1", lc.port), timeout=WAIT) as s:
            s.sendall(wire)
            got = b""
            while got.count(b" rsp 6 200 OK\n") < 3:
                chunk = s.recv(4096)
                assert chunk, got
                got += chunk
    finally:
        relay.stop()
    records = {r.msg[:36]: r for r in read_staging(relay.state_dir)}
    assert len(records) == 3
    cut = records[big[:36]]
    assert cut.msg == big[:480] and b"T" in cut.flags


def test_slow_and_crowding_tcp_senders_against_a_relay_process(tmp_path: Path) -> None:
    """Issue 11, item 6, end to end on a TCP listener: a third connection from one
    address is refused, a trickled frame is cut at frame_timeout and kept flagged C,
    and the next connection works."""
    lc = Listener("tcp", framing="lf")
    limits = {"frame_timeout": "1s", "max_connections_per_source": 2}
    relay = RelayProcess(tmp_path, [lc], limits=limits)
    relay.start()
    addr = ("127.0.0.1", lc.port)
    socks = [socket.create_connection(addr, timeout=WAIT) for _ in range(2)]
    try:
        slow, idle = socks
        try:  # the RST of the refusal may beat connect()
            socks.append(socket.create_connection(addr, timeout=WAIT))
            assert closed_by_peer(socks[-1])
        except ConnectionResetError:
            pass
        for b in b"<13>Jan  2 03:04:05 host app: trickle":
            try:
                slow.sendall(bytes([b]))
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.3)  # 1 s lets 3 or 4 bytes in: the frame cannot complete
        assert closed_by_peer(slow)
        idle.close()
        wait_for(lambda: "frame started 1s ago" in relay.log(), "the relay's log line")
        with socket.create_connection(addr, timeout=WAIT) as s:
            s.sendall(b"<13>Jan  2 03:04:05 host app: whole\n")
        got = relay.wait_records(lambda r: r.msg.endswith(b"whole"), 1, timeout=WAIT)
        assert len(got) == 1
    finally:
        for s in socks:
            s.close()
        relay.stop()
    line = b"<13>Jan  2 03:04:05 host app: trickle"
    (cut,) = [r for r in read_staging(relay.state_dir) if b"C" in r.flags]
    assert cut.msg and line.startswith(cut.msg) and cut.msg != line  # what arrived, kept
