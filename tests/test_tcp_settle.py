"""Plain TCP/TLS outputs settle by what the peer's TCP acknowledged (relay.forward.tcp_settle)."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from relay.disk.spool import Spool
from relay.formats import octet
from relay.formats.staging_block import FRAMING_OCTET, RecordError, split_payload
from relay.forward import outputs
from relay.forward.outputs import SETTLE_POLL, TcpForwardFactory, _Source, render_lf, render_octet
from relay.forward.spool_window import ACK_FLUSH_DELAY
from relay.forward.tcp_settle import ClockProbe, KernelProbe, SettleWindow, _stack, widen
from relay.ops.metrics import Metrics
from tests.test_feeder import SyncPool, SyncReactor

# --- SettleWindow (sans-IO)


def test_nothing_settles_before_a_measurement_places_it() -> None:
    w: SettleWindow[str] = SettleWindow()
    w.sent("a", 10)
    assert w.pending_bytes == 10
    assert w.observe(acked=0, end=10) == []  # "a" placed at 10
    w.sent("b", 5)
    # An acknowledgement past 10 settles "a"; "b" was written after the measurement.
    assert w.observe(acked=12, end=15) == ["a"]
    assert w.observe(acked=14, end=15) == []
    assert w.observe(acked=15, end=15) == ["b"]
    assert len(w) == 0 and w.pending_bytes == 0


def test_a_batch_is_placed_at_the_end_of_everything_written_before_the_measurement() -> None:
    """Placing late can only settle late: ``end`` covers every byte written so far."""
    w: SettleWindow[int] = SettleWindow()
    for i in range(3):
        w.sent(i, 100)
    assert w.observe(acked=150, end=300) == []  # 0 ended at 100, but was placed at 300
    assert w.observe(acked=300, end=300) == [0, 1, 2]


def test_drain_gives_back_everything_unsettled_in_order() -> None:
    w: SettleWindow[int] = SettleWindow()
    w.sent(1, 1)
    w.observe(0, 1)
    w.sent(2, 1)
    assert w.drain() == [1, 2]
    assert len(w) == 0 and w.pending_bytes == 0


def test_clock_probe_positions_are_seconds() -> None:
    now = [100.0]
    probe = ClockProbe(lambda: now[0], 1.0)
    w: SettleWindow[str] = SettleWindow()
    w.sent("a", 1)
    assert w.observe(*probe()) == []
    now[0] = 100.9
    assert w.observe(*probe()) == []
    now[0] = 101.0
    assert w.observe(*probe()) == ["a"]


# --- counting a record's messages (the forward path does not split them)


@given(st.lists(st.binary(max_size=40), max_size=20))
def test_octet_count_agrees_with_split_on_frames(msgs: list[bytes]) -> None:
    payload = octet.encode_many(msgs)
    assert octet.count(payload) == len(split_payload(payload, FRAMING_OCTET)) == len(msgs)


@given(st.binary(max_size=60))
def test_octet_count_agrees_with_split_on_anything(payload: bytes) -> None:
    try:
        expected: int | None = len(split_payload(payload, FRAMING_OCTET))
    except RecordError:
        expected = None
    try:
        got: int | None = octet.count(payload)
    except octet.OctetError:
        got = None
    assert got == expected


# --- the output, with a fake probe and a clock


class FakeProbe:
    """Stream positions as the test sets them; None = the kernel cannot tell now."""

    kind = "fake"

    def __init__(self) -> None:
        self.acked = 0.0
        self.end = 0.0
        self.unknown = False
        self.calls = 0

    def __call__(self) -> tuple[float, float] | None:
        self.calls += 1
        return None if self.unknown else (self.acked, self.end)


BATCHES = [[b"a1", b"a2", b"a3"], [b"b1", b"b2"], [b"c1"]]


def output(
    tmp_path: Path, framing: str = "octet-counting"
) -> tuple[Spool, Any, StringTransport, FakeProbe, SyncReactor, Metrics]:
    spool = Spool(tmp_path / "spool", 1024**2)
    spool.open()
    for batch in BATCHES:
        spool.append([octet.encode_many(batch)], 1.0)
    spool.sync()
    reactor = SyncReactor()
    metrics = Metrics()
    render = render_octet if framing == "octet-counting" else render_lf
    feeder = outputs.SpoolFeeder(spool, reactor, SyncPool(), metrics, "out", render)  # type: ignore[arg-type]
    feeder.notify()
    probe = FakeProbe()
    factory = TcpForwardFactory(
        "out", _Source(feeder), metrics, reactor, 128, framing, probe=lambda t: probe
    )
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return spool, proto, transport, probe, reactor, metrics


def test_records_go_whole_in_wire_form_and_settle_once_acknowledged(tmp_path: Path) -> None:
    spool, proto, transport, probe, reactor, metrics = output(tmp_path)
    wire = transport.value()
    assert wire == b"".join(octet.encode_many(b) for b in BATCHES)
    assert metrics.counters[("messages_forwarded_total", (("output", "out"),))] == 6
    feeder = proto.factory.source.feeder
    assert feeder.in_flight == 6
    probe.end = 1000 + len(wire)  # everything reached the kernel, none acknowledged
    probe.acked = 1000
    reactor.advance(SETTLE_POLL)
    assert feeder.delivered == 0
    probe.acked = 1000 + len(wire) - 1  # one byte short
    reactor.advance(SETTLE_POLL)
    assert feeder.delivered == 0
    probe.acked = 1000 + len(wire)
    reactor.advance(SETTLE_POLL)
    assert feeder.delivered == 6 and feeder.in_flight == 0
    reactor.advance(ACK_FLUSH_DELAY)
    assert spool.read(10, 1 << 20) == []  # acknowledged in the spool
    assert not reactor.getDelayedCalls()  # nothing unsettled: no polling
    proto.connectionLost(None)


def test_unknown_positions_settle_nothing_and_keep_polling(tmp_path: Path) -> None:
    _, proto, _transport, probe, reactor, _ = output(tmp_path)
    probe.unknown = True
    probe.acked = probe.end = 10**9
    for _ in range(5):
        reactor.advance(SETTLE_POLL)
    assert proto.factory.source.feeder.delivered == 0
    assert probe.calls == 5  # one measurement per poll, none per message
    probe.unknown = False
    reactor.advance(SETTLE_POLL)
    assert proto.factory.source.feeder.delivered == 6
    proto.connectionLost(None)


def test_a_dead_connection_gives_unsettled_records_back(tmp_path: Path) -> None:
    _, proto, transport, _probe, reactor, metrics = output(tmp_path)
    feeder = proto.factory.source.feeder
    proto.connectionLost(None)
    assert feeder.in_flight == 0 and feeder.delivered == 0
    assert metrics.counters[("forward_replayed_total", (("output", "out"),))] == 6
    assert not reactor.getDelayedCalls()
    # The next connection sends them again, first and whole.
    proto2 = proto.factory.buildProtocol(None)
    t2 = StringTransport()
    proto2.makeConnection(t2)
    assert t2.value() == transport.value()
    proto2.connectionLost(None)


def test_the_unsettled_bound_holds_the_pump(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1024**2)
    spool.open()
    for i in range(4):
        spool.append([octet.encode_many([b"x" * 100 + bytes([48 + i])])], 1.0)
    spool.sync()
    reactor, metrics = SyncReactor(), Metrics()
    feeder = outputs.SpoolFeeder(spool, reactor, SyncPool(), metrics, "out", render_octet)  # type: ignore[arg-type]
    feeder.notify()
    probe = FakeProbe()
    factory = TcpForwardFactory(
        "out",
        _Source(feeder),
        metrics,
        reactor,
        1,  # one record per write
        "octet-counting",
        probe=lambda t: probe,
        max_unsettled=150,
    )
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    reactor.advance(0)
    reactor.advance(0)
    assert transport.value().count(b"x" * 100) == 2  # 2 x 105 bytes >= 150: held
    probe.acked = probe.end = 10**6
    reactor.advance(SETTLE_POLL)  # the first two settle, the pump runs again
    reactor.advance(0)
    assert transport.value().count(b"x" * 100) == 4
    proto.connectionLost(None)


def test_lf_framing_joins_a_record_with_newlines(tmp_path: Path) -> None:
    _, proto, transport, _, _, _ = output(tmp_path, framing="lf")
    assert transport.value() == b"a1\na2\na3\nb1\nb2\nc1\n"
    proto.connectionLost(None)


def test_a_record_of_another_shape_goes_as_one_message() -> None:
    assert render_octet(b"plain") == (b"5 plain", 1)
    assert render_lf(b"plain") == (b"plain\n", 1)


def test_without_a_socket_the_output_falls_back_to_wall_time(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", 1024**2)
    spool.open()
    spool.append([octet.encode_many([b"m"])], 1.0)
    spool.sync()
    reactor, metrics = SyncReactor(), Metrics()
    feeder = outputs.SpoolFeeder(spool, reactor, SyncPool(), metrics, "out", render_octet)  # type: ignore[arg-type]
    feeder.notify()
    factory = TcpForwardFactory(
        "out", _Source(feeder), metrics, reactor, 128, "octet-counting", settle=1.0
    )
    proto = factory.buildProtocol(None)
    proto.makeConnection(StringTransport())
    assert isinstance(proto._probe, ClockProbe)
    steps = round(1.0 / SETTLE_POLL)
    for _ in range(steps - 1):  # placed by the first poll, settled 1 s later
        reactor.advance(SETTLE_POLL)
    assert feeder.delivered == 0
    for _ in range(3):
        reactor.advance(SETTLE_POLL)
    assert feeder.delivered == 1
    proto.connectionLost(None)


# --- KernelProbe on real sockets

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIOCOUTQ, TCP_INFO")


class FakeTcpTransport:
    """What KernelProbe reads of Twisted's TCP transport: its socket and write buffer."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self.dataBuffer = b""
        self.offset = 0
        self._tempDataLen = 0
        self.SEND_LIMIT = 128 * 1024
        self.bufferSize = 64 * 1024


def _pair(rcvbuf: int | None = None) -> tuple[socket.socket, socket.socket, socket.socket]:
    lst = socket.socket()
    if rcvbuf:
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    client = socket.create_connection(lst.getsockname())
    server, _ = lst.accept()
    return lst, client, server


@linux
def test_kernel_probe_counts_the_peers_acknowledgements() -> None:
    lst, client, server = _pair(rcvbuf=16 * 1024)
    try:
        tcp = FakeTcpTransport(client)
        probe = KernelProbe.for_transport(tcp)
        assert probe is not None
        acked0, end0 = probe()  # type: ignore[misc]
        assert acked0 == end0
        client.setblocking(False)
        sent = 0
        try:
            while sent < 8 * 1024 * 1024:  # until the peer's window and our queue are full
                sent += client.send(b"x" * 65536)
        except BlockingIOError:
            pass
        time.sleep(0.2)
        tcp._tempDataLen = 1234  # bytes still in Twisted's buffer count as written
        acked, end = probe()  # type: ignore[misc]
        assert end == end0 + sent + 1234
        assert acked0 < acked < end0 + sent  # the peer holds some, the rest is queued
        got = 0
        server.settimeout(5)
        while got < sent:
            got += len(server.recv(1 << 20))
        deadline = time.monotonic() + 5
        while probe()[0] < end0 + sent and time.monotonic() < deadline:  # type: ignore[index]
            time.sleep(0.01)
        assert probe()[0] == end0 + sent  # type: ignore[index]
    finally:
        for s in (client, server, lst):
            s.close()


@linux
def test_kernel_probe_looks_under_wrappers_by_type() -> None:
    """A protocol wrapper forwards attribute lookups to its transport: ``hasattr(tls,
    "socket")`` holds, yet the socket's transport is the one below it."""
    lst, client, server = _pair()
    try:
        tcp = FakeTcpTransport(client)
        wrapper = ProtocolWrapper(WrappingFactory(Factory.forProtocol(Protocol)), Protocol())
        wrapper.makeConnection(tcp)  # type: ignore[arg-type]
        assert hasattr(wrapper, "socket")
        layers, bottom = _stack(wrapper)
        assert layers == [wrapper] and bottom is tcp
        # Not a TLS layer: its buffers are unknown, so no kernel probe.
        assert KernelProbe.for_transport(wrapper) is None
        widen(wrapper, 1 << 20)
        assert tcp.SEND_LIMIT == 1 << 20 and tcp.bufferSize == 2 << 20
        assert "SEND_LIMIT" not in vars(wrapper)
    finally:
        for s in (client, server, lst):
            s.close()


def test_no_socket_no_kernel_probe() -> None:
    assert KernelProbe.for_transport(StringTransport()) is None
