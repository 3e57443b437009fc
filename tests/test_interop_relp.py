"""RELP against Debian's rsyslog 8.2302 + rsyslog-relp (librelp 1.11), real processes on 127.0.0.1.

(a) rsyslogd omrelp -> RelpServerProtocol: every message arrives once, byte-exact (checked
    against an omfile copy rendered with the forward's template), and rsyslog gets every
    answer: the only session ends with rsyslog's ``close`` after all acks, no reconnect.
(b) RelpClientProtocol -> rsyslogd imrelp: every message arrives once, in order.
(c) the same as (a) inside TLS (omrelp tls="on", tls.authMode name and certvalid, with
    both of librelp's TLS libraries), the relay presenting the test PKI's server
    certificate and requiring rsyslog's client certificate.

The Twisted side runs on a private reactor in a thread (as tests/test_tls.py does).
"""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.threads import blockingCallFromThread
from twisted.protocols.tls import TLSMemoryBIOFactory

from relay.config import TLSConfig
from relay.framing.rfc6587 import Frame
from relay.inputs.tls_server import ServerTLS
from relay.ops.metrics import Metrics
from relay.relp.protocols import RelpClientFactory, RelpServerFactory
from tests.support.certs import PKI, pki  # noqa: F401  (fixture)
from tests.support.relp_rsyslog import ImrelpInput, OmrelpForward, RelpRsyslog

WAIT = 30.0
_TLS_FACTORY_ARGS = inspect.signature(TLSMemoryBIOFactory.__init__).parameters


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
        time.sleep(0.02)


class Recorder:
    """deliver(): records each batch and fires a little later, like a group commit."""

    def __init__(self, reactor: SelectReactor) -> None:
        self.reactor = reactor
        self.messages: list[bytes | Frame] = []
        self.batches = 0
        self.senders: set[bytes] = set()

    def __call__(self, messages: list[bytes | Frame], sender: bytes) -> Deferred[None]:
        self.messages.extend(messages)
        self.batches += 1
        self.senders.add(sender)
        d: Deferred[None] = Deferred()
        self.reactor.callLater(0.002, d.callback, None)
        return d


class Server:
    def __init__(self, reactor: SelectReactor, tls: ServerTLS | None = None, **kw: Any) -> None:
        self.reactor = reactor
        self.metrics = Metrics()
        self.recorder = Recorder(reactor)
        kw.setdefault("max_data", 128 * 1024)
        self.factory = RelpServerFactory(
            "relp_in", self.recorder, self.metrics, reactor, idle_timeout=60, **kw
        )
        wrapped: Any = self.factory
        if tls is not None:
            kw = {"clock": reactor} if "clock" in _TLS_FACTORY_ARGS else {}
            wrapped = TLSMemoryBIOFactory(tls, False, self.factory, **kw)
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        self.port = blockingCallFromThread(reactor, endpoint.listen, wrapped)

    @property
    def portnum(self) -> int:
        return int(self.port.getHost().port)

    def metric(self, name: str, **labels: str) -> int:
        return int(blockingCallFromThread(self.reactor, lambda: self.metrics.get(name, **labels)))

    def stop(self) -> None:
        blockingCallFromThread(self.reactor, self.port.stopListening)


def _messages(n: int, tag: str) -> list[bytes]:
    return [b"<13>Jan  2 03:04:05 host %s: relp message %05d" % (tag.encode(), i) for i in range(n)]


def _omrelp_to_relay(
    tmp_path: Path, server: Server, fwd: OmrelpForward, n: int, certs: PKI | None = None
) -> None:
    rs = RelpRsyslog(tmp_path / "rsyslog", forwards=[fwd], pki=certs)
    rs.start()
    try:
        rs.send(fwd.name, _messages(n, fwd.name))
        sent = rs.wait_lines(rs.copy_path(fwd.name), n)
        wait_for(
            lambda: server.metric("relp_acks_total") >= n,
            f"{n} acks ({len(server.recorder.messages)} delivered)\n{rs.diagnostics()}",
        )
        code = rs.stop()
    finally:
        rs.stop()
    delivered = list(server.recorder.messages)
    assert len(sent) == n
    assert delivered == sent  # exactly once, byte for byte, in order
    assert server.recorder.batches < n  # chunks were group-committed
    assert server.metric("relp_acks_total") == n
    # rsyslog saw every answer: one session, no reconnect or resend, ended by its own close
    # (librelp sends close only when its window has drained, i.e. all rsp were read)
    assert server.metric("connections_opened_total") == 1
    assert server.metric("relp_sessions_closed_total") == 1
    assert server.metric("relp_protocol_errors_total") == 0
    assert code == 0, rs.diagnostics()
    log = rs.diagnostics()
    assert "omrelp" not in log and "librelp" not in log, log


def test_omrelp_to_relay(reactor: SelectReactor, tmp_path: Path) -> None:
    server = Server(reactor)
    try:
        _omrelp_to_relay(tmp_path, server, OmrelpForward("plain", server.portnum), 500)
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("auth_mode", "tls_lib"),
    [("name", "gnutls"), ("certvalid", "gnutls"), ("name", "openssl")],
)
def test_omrelp_tls_to_relay(
    reactor: SelectReactor,
    tmp_path: Path,
    pki: PKI,  # noqa: F811
    auth_mode: str,
    tls_lib: str,
) -> None:
    tls = ServerTLS(
        TLSConfig(
            certificate=str(pki.server.cert),
            key=str(pki.server.key),
            ca=str(pki.ca),
            verify_clients=True,
        )
    )
    server = Server(reactor, tls)
    try:
        fwd = OmrelpForward("tls", server.portnum, tls=True, auth_mode=auth_mode, tls_lib=tls_lib)
        _omrelp_to_relay(tmp_path, server, fwd, 200, certs=pki)
    finally:
        server.stop()


@pytest.mark.parametrize("policy", ["truncate", "reject"])
def test_omrelp_oversize_messages_do_not_stall_the_session(
    reactor: SelectReactor, tmp_path: Path, policy: str
) -> None:
    """Issue 11, item 5: messages above max_message_size among normal ones, from real
    omrelp: every message answered, the ones behind the big ones delivered.

    truncate: one session, each message once, the big ones cut and flagged. reject: the
    relay answers 500 and keeps the session, but librelp takes a 500 as a failed session:
    omrelp suspends, reconnects and resends what was unanswered (duplicates), and the
    rejected messages are never stored."""
    n, limit = 200, 1024
    server = Server(reactor, max_data=limit, oversize=policy)
    fwd = OmrelpForward("big", server.portnum)
    messages = [
        m + (b" " + b"B" * 3000 if i % 50 == 7 else b"")
        for i, m in enumerate(_messages(n, fwd.name))
    ]
    big = sum(1 for m in messages if len(m) > 3000)
    rs = RelpRsyslog(tmp_path / "rsyslog", forwards=[fwd])
    rs.start()
    try:
        rs.send(fwd.name, messages)
        sent = rs.wait_lines(rs.copy_path(fwd.name), n)
        small = [m for m in sent if len(m) <= limit]

        def all_delivered() -> bool:
            got = blockingCallFromThread(reactor, lambda: list(server.recorder.messages))
            return set(small) <= {m for m in got if isinstance(m, bytes)}

        wait_for(all_delivered, f"every message\n{rs.diagnostics()}")
        wait_for(
            lambda: server.metric("relp_acks_total") >= len(server.recorder.messages),
            f"every answer\n{rs.diagnostics()}",
        )
        code = rs.stop()
    finally:
        rs.stop()
    assert code == 0, rs.diagnostics()
    delivered = list(server.recorder.messages)
    assert server.metric("relp_protocol_errors_total") == 0
    if policy == "truncate":
        assert delivered == [
            Frame(m[:limit], truncated=True) if len(m) > limit else m for m in sent
        ]
        assert server.metric("framing_errors_total") == big
        assert server.metric("relp_acks_total") == n
        assert server.metric("connections_opened_total") == 1  # the session was never lost
        assert server.metric("relp_sessions_closed_total") == 1
    else:
        assert all(isinstance(m, bytes) for m in delivered)
        assert set(delivered) == set(small)  # each small one (some twice), no big one
        assert server.metric("framing_errors_total", kind="oversize_rejected") >= big
        assert server.metric("relp_acks_total") == len(delivered)


class ListSource:
    """A RelpSource over a list; called on the reactor thread only."""

    def __init__(self, messages: list[bytes]) -> None:
        self.messages = messages
        self.next = 0
        self.acked: list[object] = []
        self.lost: list[list[object]] = []

    def next_batch(self, max_records: int) -> list[tuple[object, bytes]]:
        start, self.next = self.next, min(len(self.messages), self.next + max_records)
        return [(i, self.messages[i]) for i in range(start, self.next)]

    def on_ack(self, tokens: list[object]) -> None:
        self.acked.extend(tokens)

    def on_lost(self, tokens: list[object]) -> None:
        self.lost.append(tokens)
        if tokens:
            first = tokens[0]
            assert isinstance(first, int)
            self.next = first


def test_relay_client_to_imrelp(reactor: SelectReactor, tmp_path: Path) -> None:
    n = 500
    messages = [
        b"<14>1 2024-05-06T07:08:09.123456Z host app 42 ID%d - relp client %05d" % (i % 7, i)
        for i in range(n)
    ]
    inp = ImrelpInput("in")
    rs = RelpRsyslog(tmp_path / "rsyslog", inputs=[inp])
    rs.start()
    try:
        source = ListSource(messages)
        metrics = Metrics()
        factory = RelpClientFactory("fwd", source, metrics, reactor, window=16, ack_timeout=20)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", inp.port)
        proto = blockingCallFromThread(
            reactor, lambda: connectProtocol(endpoint, factory.buildProtocol(None))
        )
        wait_for(lambda: len(source.acked) == n, f"{n} acks from imrelp\n{rs.diagnostics()}")
        got = rs.wait_lines(rs.received_path("in"), n)
        reactor.callFromThread(proto.close)
        wait_for(lambda: source.lost, "the session to close")
    finally:
        rs.stop()
    assert got == messages  # exactly once, in order, byte for byte
    assert source.acked == list(range(n))
    assert source.lost == [[]]  # closed politely with nothing in flight
    assert metrics.get("relp_ack_timeouts_total") == 0
    assert metrics.get("relp_protocol_errors_total") == 0


def test_omrelp_tls_refuses_a_relay_with_the_wrong_name(
    reactor: SelectReactor,
    tmp_path: Path,
    pki: PKI,  # noqa: F811
) -> None:
    """Proof that (c) really authenticates: a permitted peer the relay is not gets nothing."""
    tls = ServerTLS(
        TLSConfig(
            certificate=str(pki.server.cert),
            key=str(pki.server.key),
            ca=str(pki.ca),
            verify_clients=True,
        )
    )
    server = Server(reactor, tls)
    fwd = OmrelpForward("tls", server.portnum, tls=True, permitted_peer="other.test")
    rs = RelpRsyslog(tmp_path / "rsyslog", forwards=[fwd], pki=pki)
    rs.start()
    try:
        rs.send(fwd.name, _messages(5, fwd.name))
        wait_for(
            lambda: "could not connect to remote server" in rs.diagnostics(),
            f"rsyslog to refuse the relay\n{rs.diagnostics()}",
        )
    finally:
        rs.kill()
        server.stop()
    assert server.recorder.messages == []
    assert server.metric("relp_acks_total") == 0
