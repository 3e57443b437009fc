"""relay.link.protocol without sockets: both ends pumped by twisted.test.iosim, time by Clock."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.test import iosim

from relay.formats import octet
from relay.formats.staging_block import FRAMING_OCTET, split_payload
from relay.framing.rfc6587 import Framer
from relay.link import wire
from relay.link.ledger import Ledger
from relay.link.output import LatencyStats
from relay.link.protocol import LinkClientFactory, LinkServerFactory, build_batch
from relay.ops.metrics import Metrics
from relay.router import Framed, Router


class FakeFeeder:
    """The RecordFeeder's interface over a list of records (one owner, one path)."""

    def __init__(self, n: int) -> None:
        self.todo: deque[tuple[int, bytes]] = deque(
            (i, octet.encode(b"<14>1 - h a - - - msg %d" % i)) for i in range(1, n + 1)
        )
        self.outstanding: deque[tuple[int, bytes]] = deque()
        self.acked_upto = 0
        self.skip = 0
        self.owner: object | None = None

    def take(self, owner: object, max_bytes: int) -> Any:
        if self.owner not in (None, owner):
            return None
        while self.todo and self.todo[0][0] <= self.skip:
            self.todo.popleft()
        if not self.todo:
            return None
        self.owner = owner
        out = [self.todo.popleft() for _ in range(min(2, len(self.todo)))]
        self.outstanding.extend(out)
        return out, (b"edge",), None

    def committed(self, upto: int) -> None:
        self.skip = max(self.skip, upto)
        self.acked_upto = max(self.acked_upto, upto)

    def acked(self, upto: int) -> None:
        while self.outstanding and self.outstanding[0][0] <= upto:
            self.outstanding.popleft()
        self.acked_upto = max(self.acked_upto, upto)

    def lost(self, owner: object) -> None:
        if owner is self.owner:
            self.owner = None
            self.todo.extendleft(reversed(self.outstanding))
            self.outstanding.clear()


class Core:
    """The receiving side: a ledger and a deliver() whose durability the test releases."""

    def __init__(self, clock: Clock) -> None:
        self.ledger = Ledger()
        self.stored: list[bytes] = []
        self.pending: list[tuple[Any, Callable[[], None]]] = []
        self.written: list[tuple[Any, int]] = []
        self.metrics = Metrics()
        self.factory = LinkServerFactory(
            "link",
            "core",
            self.deliver,
            self.ledger,
            self.metrics,
            clock,
            window=4,  # type: ignore[arg-type]
        )

    def deliver(
        self,
        msgs: bytes | list[bytes],
        sender: bytes,
        on_durable: Callable[[], None],
        commit: Any,
        path: Sequence[bytes],
    ) -> None:
        if isinstance(msgs, bytes):
            msgs = split_payload(msgs, FRAMING_OCTET)
        self.stored.extend(msgs)
        self.pending.append((commit, on_durable))

    def commit(self) -> None:
        pending, self.pending = self.pending, []
        for commit, durable in pending:
            self.written.append(commit)
            durable()


def client_factory(feeder: FakeFeeder, clock: Clock, epoch: int = 7) -> LinkClientFactory:
    def build(
        recs: Sequence[tuple[int, bytes]],
        path: Sequence[bytes],
        codec: str,
        level: int,
        messages: int | None = None,
    ) -> Any:
        return defer.succeed(build_batch(recs, path, codec, level, messages))

    return LinkClientFactory(
        "core",
        feeder,
        Metrics(),
        clock,
        "edge",
        epoch,
        build,
        ("zstd", "none"),
        1,
        8,
        1 << 20,
        1 << 24,
        30.0,
        LatencyStats(),
    )


def connect(core: Core, cf: LinkClientFactory, clock: Clock) -> tuple[Any, Any, iosim.IOPump]:
    server = core.factory.buildProtocol(None)
    client = cf.buildProtocol(None)
    st, ct = iosim.FakeTransport(server, True), iosim.FakeTransport(client, False)
    pump = iosim.connect(server, st, client, ct, greet=False)
    pump.flush()
    return server, client, pump


def test_batches_flow_within_the_window_and_are_acked_after_commit() -> None:
    clock = Clock()
    core, feeder = Core(clock), FakeFeeder(20)
    cf = client_factory(feeder, clock)
    _, client, pump = connect(core, cf, clock)
    pump.flush()
    # The receiver's window (4 batches of 2) caps what is in flight until commits come.
    assert len(core.stored) == 8 and client.batches_in_flight == 4
    assert feeder.acked_upto == 0
    while core.pending:
        core.commit()
        pump.flush()
    assert len(core.stored) == 20 and feeder.acked_upto == 20
    assert [m for m in core.stored] == [
        r for r in (b"<14>1 - h a - - - msg %d" % i for i in range(1, 21))
    ]
    assert cf.stats.count == 10  # one latency sample per batch


def test_reconnect_before_the_commit_resends_but_writes_once() -> None:
    clock = Clock()
    core, feeder = Core(clock), FakeFeeder(6)
    cf = client_factory(feeder, clock)
    _, client, pump = connect(core, cf, clock)
    pump.flush()
    assert len(core.stored) == 6  # three batches written, none durable yet
    client.transport.loseConnection()
    pump.flush()
    assert feeder.owner is None and len(feeder.todo) == 6  # everything in flight comes back
    # A new connection: the WELCOME says 0 committed; the batches come again, are seen as
    # duplicates (accepted, being written) and acknowledged once the first copy is durable.
    cf2 = client_factory(feeder, clock)
    _, client2, pump2 = connect(core, cf2, clock)
    pump2.flush()
    assert len(core.stored) == 6
    assert core.metrics.get("link_duplicates_suppressed_total") == 6
    assert feeder.acked_upto == 0
    core.commit()
    pump2.flush()
    assert feeder.acked_upto == 6
    # A third connection learns from the WELCOME that all is committed: nothing is sent.
    client2.transport.loseConnection()
    pump2.flush()
    feeder.todo.extend([(3, b"1 x")])
    cf3 = client_factory(feeder, clock)
    connect(core, cf3, clock)
    assert len(core.stored) == 6 and not feeder.todo


def test_a_silent_receiver_is_abandoned_and_records_come_back() -> None:
    clock = Clock()
    core, feeder = Core(clock), FakeFeeder(4)
    cf = client_factory(feeder, clock)
    _, client, pump = connect(core, cf, clock)
    pump.flush()
    assert client.batches_in_flight == 2
    clock.advance(31)  # no ack: the core never commits
    pump.flush()
    assert feeder.owner is None and len(feeder.todo) == 4
    assert cf.metrics.get("link_ack_timeouts_total") == 1


def test_a_second_epoch_is_a_new_stream() -> None:
    clock = Clock()
    core = Core(clock)
    for epoch in (1, 2):
        feeder = FakeFeeder(2)
        _, _, pump = connect(core, client_factory(feeder, clock, epoch), clock)
        pump.flush()
        core.commit()
        pump.flush()
        assert feeder.acked_upto == 2
    assert len(core.stored) == 4  # same seqs, new epoch: written again (a reset spool)


# --- the edge's router with link outputs only: forwarded bytes as received


class ChunkSink:
    def __init__(self) -> None:
        self.forward: list[Any] = []

    def submit_chunk(self, hours: Any, forward: Any, now: float, *a: Any, **k: Any) -> None:
        self.forward.append(forward)


def test_link_only_edge_forwards_chunks_byte_exact_without_taking_them_apart() -> None:
    from datetime import UTC

    from relay.disk.durable_writer import _Chunk, _record
    from relay.formats.staging_block import OctetFrames
    from relay.framing.rfc6587 import Framer
    from relay.router import Router

    msgs = [
        b"<13>1 2027-01-15T08:10:00.000000Z web1 app - - - one",
        b"<13>Jan 15 08:10:00 web2 tag: legacy",
    ]
    sink = ChunkSink()
    r = Router(sink, Metrics(), UTC, 3600.0, lambda: 1_800_000_600.0, "edge", forwarding=True)
    r.mark_inband = False
    data = octet.encode_many(msgs)
    r.receive(Framer("auto", 65536), data, b"t", "in")
    (fwd,) = sink.forward
    assert isinstance(fwd, OctetFrames) and fwd.data == data and len(fwd) == 2
    chunk = _Chunk({}, fwd, 0.0, 0, None, b"t", None, (b"core0",))
    assert _record(chunk) == wire.counted((b"core0",), 2, data)
    # A frame that spans two reads is framed on its own, the rest passed as received.
    sink.forward.clear()
    framer = Framer("auto", 65536)
    r.receive(framer, data[:10], b"t", "in")
    r.receive(framer, data[10:] + data, b"t", "in")
    assert b"".join(f.data for f in sink.forward if f) == data + data
    # LF-framed input is re-framed message by message (still unmarked).
    sink.forward.clear()
    r.receive(Framer("lf", 65536), b"\n".join(msgs) + b"\n", b"t", "in")
    assert list(sink.forward[0]) == msgs


class FramingCore(Core):
    """A core that frames batches with a real Router first (as relay.link.service does)."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        router = Router(ChunkSink(), self.metrics, UTC, 3600.0, clock.seconds, relay_id="core")
        self.factory.frame = lambda data: router.frame(Framer("octet-counting", 65536), data)
        self.framed = 0  # batches delivered as framed on the counting walk

    def deliver(
        self,
        msgs: bytes | list[bytes] | Framed,
        sender: bytes,
        on_durable: Callable[[], None],
        commit: Any,
        path: Sequence[bytes],
    ) -> None:
        if isinstance(msgs, Framed):
            self.framed += 1
            msgs = msgs.data
        super().deliver(msgs, sender, on_durable, commit, path)


def test_a_batch_whose_message_count_is_wrong_is_refused() -> None:
    for make in (Core, FramingCore):
        clock = Clock()
        core = make(clock)
        server = core.factory.buildProtocol(None)
        transport = iosim.FakeTransport(server, True)
        server.makeConnection(transport)
        server.dataReceived(wire.encode_hello(wire.Hello(1, 1, 5, "edge", ("none",))))
        recs = [(1, octet.encode(b"<14>1 - h a - - - one"))]
        raw = wire.encode_records(recs)
        header = wire.BatchHeader(1, 1, 2, len(raw), wire.checksum(raw), wire.CODEC_NONE, (b"e",))
        server.dataReceived(wire.encode_batch(header, raw))  # one message, the header says 2
        assert core.metrics.get("link_refused_total", listener="link", reason="protocol") == 1
        assert core.stored == []


def test_a_batch_is_framed_once_counted_and_delivered() -> None:
    clock = Clock()
    core = FramingCore(clock)
    server = core.factory.buildProtocol(None)
    server.makeConnection(iosim.FakeTransport(server, True))
    server.dataReceived(wire.encode_hello(wire.Hello(1, 1, 5, "edge", ("none",))))
    msgs = [b"<14>1 - h a - - - one", b"<14>1 - h a - - - two", b"<14>1 - h a - - - three"]
    recs = [(1, b"".join(map(octet.encode, msgs[:2]))), (2, octet.encode(msgs[2]))]
    raw = wire.encode_records(recs)
    header = wire.BatchHeader(2, 2, 3, len(raw), wire.checksum(raw), wire.CODEC_NONE, (b"e",))
    server.dataReceived(wire.encode_batch(header, raw))
    assert core.stored == msgs
    assert core.framed == 1
    assert core.metrics.get("link_refused_total", listener="link", reason="protocol") == 0


def test_a_framed_resend_stores_only_its_fresh_records() -> None:
    # A batch framed whole whose first record the ledger already has (a resend after a
    # reconnect): only the fresh records are stored, and nothing is refused.
    clock = Clock()
    core = FramingCore(clock)
    server = core.factory.buildProtocol(None)
    server.makeConnection(iosim.FakeTransport(server, True))
    server.dataReceived(wire.encode_hello(wire.Hello(1, 1, 5, "edge", ("none",))))
    one, two, three = (b"<14>1 - h a - - - %b" % w for w in (b"one", b"two", b"three"))

    def batch(recs: list[tuple[int, bytes]], count: int) -> bytes:
        raw = wire.encode_records(recs)
        h = wire.BatchHeader(recs[-1][0], len(recs), count, len(raw), wire.checksum(raw), 0, ())
        return wire.encode_batch(h, raw)

    enc = octet.encode
    server.dataReceived(batch([(1, enc(one)), (2, enc(two))], 2))
    core.commit()
    server.dataReceived(batch([(2, enc(two)), (3, enc(three))], 2))
    core.commit()
    assert core.stored == [one, two, three]
    assert core.framed == 1  # the first batch; the resend went record by record
    assert core.metrics.get("link_duplicates_suppressed_total", listener="link") == 1
    assert core.metrics.get("link_refused_total", listener="link", reason="protocol") == 0
