"""RELP input against hostile clients over real loopback sockets (issue 11).

The relay's side runs on a private reactor in a thread (as tests/test_interop_relp.py
does); the client is a plain socket that misbehaves on purpose.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.threads import blockingCallFromThread

from relay.framing import Frame
from relay.metrics import Metrics
from relay.relp_protocol import RelpServerFactory

WAIT = 60.0
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


def test_client_that_never_reads_its_answers_is_no_longer_read(reactor: SelectReactor) -> None:
    """Issue 11, item 1: the relay stops reading a client whose answers pile up unsent,
    and resumes, losing nothing, once the client reads them."""
    metrics = Metrics()
    conns: list[Any] = []
    delivered: list[int] = []

    def deliver(messages: list[bytes | Frame], sender: bytes) -> Deferred[None]:
        delivered.append(len(messages))
        return succeed(None)

    def small_send_buffer(proto: Any) -> None:
        # Without kernel autotuning the kernel takes a few KiB of answers, not megabytes:
        # Twisted's own buffer is what fills, quickly.
        proto.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        conns.append(proto)

    factory = RelpServerFactory("relp_in", deliver, metrics, reactor, on_connect=small_send_buffer)
    endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
    port = blockingCallFromThread(reactor, endpoint.listen, factory)
    client = socket.socket()
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(("127.0.0.1", port.getHost().port))
        client.sendall(OPEN)
        wait_for(lambda: bool(conns), "the connection")
        proto = conns[0]

        def paused() -> bool:
            return bool(blockingCallFromThread(reactor, lambda: "answers" in proto.holds))

        client.setblocking(False)
        txnr, pending = 2, b""
        for _ in range(100_000):  # bounded: the relay pauses after a few thousand
            if not pending:
                pending = syslog_frames(txnr, 100)
                txnr += 100
            try:
                pending = pending[client.send(pending) :]
            except BlockingIOError:
                if paused():
                    break
                time.sleep(0.01)
        assert paused()
        assert metrics.get("relp_answer_backpressure_pauses_total") >= 1
        # What the relay took in stays bounded: it is no longer reading this client.
        sent_whole = txnr - 2 - (pending.count(b"\n") if pending else 0)
        assert metrics.get("relp_messages_received_total") < sent_whole
        # The client reads its answers: the relay resumes and answers everything sent.
        client.setblocking(True)
        client.settimeout(WAIT)
        if pending:
            threading.Thread(target=client.sendall, args=(pending,), daemon=True).start()
        answers = b""
        want = txnr - 2
        while answers.count(b" rsp 6 200 OK\n") < want:
            chunk = client.recv(65536)
            assert chunk, "the relay closed the session"
            answers += chunk
        assert answers.count(b" rsp 6 200 OK\n") == want
        assert sum(delivered) == want
        assert not blockingCallFromThread(reactor, lambda: proto.paused)
    finally:
        client.close()
        blockingCallFromThread(reactor, port.stopListening)


def test_slowloris_over_loopback(reactor: SelectReactor) -> None:
    """Issue 11, item 6: connections beyond the per-source limit are refused, and one
    trickling a frame is closed once the frame deadline passes; a client sending whole
    commands keeps its session."""
    metrics = Metrics()

    def deliver(messages: list[bytes | Frame], sender: bytes) -> Deferred[None]:
        return succeed(None)

    factory = RelpServerFactory(
        "relp_in", deliver, metrics, reactor, frame_timeout=0.5, max_connections_per_source=2
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
        while not metrics.get("frame_timeouts_total"):  # bounded by the relay's deadline
            good.sendall(syslog_frames(txnr, 1))
            assert good.recv(4096) == b"%d rsp 6 200 OK\n" % txnr
            txnr += 1
            assert txnr < 100_000
        assert closed_by_peer(slow)
        good.sendall(syslog_frames(txnr, 1))
        assert good.recv(4096) == b"%d rsp 6 200 OK\n" % txnr
        assert metrics.get("connections_refused_total", reason="max_connections_per_source") == 1
        assert metrics.get("frame_timeouts_total") == 1
    finally:
        for s in socks:
            s.close()
        blockingCallFromThread(reactor, port.stopListening)
