"""Thin Twisted protocols of the relay link over relay.link.session.

Receiver (``link+tls`` listener): each checked batch goes to the router as one
chunk; the ledger decides which records are new. New records are staged and
spooled by the durable writer, which journals them with their ledger position
(``CommitLog.begin``/``commit``) and fsyncs that after them (``CommitLog.sync``);
the cumulative ACK is written once the ledger says the batch is durable.
Duplicates are acknowledged without being written. Any refusal is counted by
reason, logged with the peer, answered with a REFUSE frame and the connection
is closed.

Sender (``link+tls`` forward output): batches of spool records are built
(record framing, checksum, zstd) in a small thread pool, sent in sequence
order within the negotiated window, and acknowledged cumulatively. A peer that
acknowledges nothing for ``ack_timeout`` while batches are in flight is
abandoned; whatever was in flight goes back to the feeder, first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.formats import octet
from relay.formats.staging_block import FRAMING_OCTET, RecordError, split_payload
from relay.inputs.addresses import host_port
from relay.inputs.connection import release
from relay.link import wire
from relay.link.ledger import Commit, Key, Ledger
from relay.link.session import (
    Acked,
    BatchReceived,
    Opened,
    ReceiverSession,
    Refused,
    SenderSession,
    WelcomeReceived,
)
from relay.link.wire import WireError
from relay.ops.log_rate_limit import RateLimiter
from relay.ops.metrics import Metrics
from relay.ops.snapshots import ListenerSnapshot
from relay.router import Framed

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime

    from relay.config import LimitsConfig
    from relay.inputs.connection import Inputs
    from relay.interfaces import IRelayReactor, IStreamTransport
    from relay.link.output import LatencyStats, RecordFeeder

log = Logger(namespace="relay.link")

# Ack latency histogram buckets (seconds), exported as link_ack_latency_seconds.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _peer(transport: IStreamTransport) -> str:
    addr = transport.getPeer()
    host, port = host_port(addr) or ("unknown", 0)
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _no_delay(transport: object) -> None:
    # TCP, and TLS over it, have it; a test's StringTransport does not.
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)


def _messages(payload: bytes) -> list[bytes]:
    try:
        return split_payload(payload, FRAMING_OCTET)
    except RecordError:
        return [payload]  # a record of another shape: one message, as the RELP feeder does


# --- receiver ---------------------------------------------------------------------------


class LinkServerProtocol(Protocol):
    factory: LinkServerFactory
    transport: IStreamTransport

    def __init__(self) -> None:
        self.session: ReceiverSession | None = None
        self.peer = "?"
        self.key: Key | None = None
        self._timers: list[IDelayedCall] = []
        self._accepted = False

    def connectionMade(self) -> None:
        f = self.factory
        self.peer = _peer(self.transport)
        if f.max_connections and len(f.connections) >= f.max_connections:
            f.metrics.inc("connections_refused_total", listener=f.name, reason="max_connections")
            log.warn(
                "{listener}: refusing {peer}: max_connections ({n}) reached",
                listener=f.name,
                peer=self.peer,
                n=f.max_connections,
            )
            self.transport.abortConnection()
            return
        self._accepted = True
        f.connections.add(self)
        f.metrics.inc("connections_opened_total", listener=f.name)
        self.session = f.new_session()
        _no_delay(self.transport)
        if f.inputs is not None:
            f.inputs.add(self.transport)
        if f.on_connect is not None:
            f.on_connect(self)
        if f.hello_timeout:
            self._timers.append(f.reactor.callLater(f.hello_timeout, self._no_hello))

    def _no_hello(self) -> None:
        if self.session is not None and self.session.state == "new":
            self.refuse(WireError(wire.R_PROTOCOL, "no HELLO in time"))

    def on_lost(self, delayed_call: IDelayedCall) -> None:
        self._timers.append(delayed_call)

    def dataReceived(self, data: bytes) -> None:
        session = self.session
        if session is None:
            return
        try:
            events = session.feed(data)
            for event in events:
                if isinstance(event, Opened):
                    self._opened(event)
                elif isinstance(event, BatchReceived):
                    self._batch(event)
        except WireError as err:
            self.refuse(err)

    def refuse(self, err: WireError) -> None:
        f = self.factory
        session = self.session
        if session is None:
            return
        f.metrics.inc("link_refused_total", listener=f.name, reason=err.kind)
        ok, suppressed = f.limiter.allow(err.kind)
        if ok:
            log.warn(
                "{listener}: refusing relay link peer {peer} ({sender}): {kind}: {reason}"
                "{more}; closing",
                listener=f.name,
                peer=self.peer,
                sender=self.key[0] if self.key else "before hello",
                kind=err.kind,
                reason=err.reason,
                more=f" ({suppressed} similar suppressed)" if suppressed else "",
            )
        self.transport.write(session.refuse(err))
        self.session = None
        self.transport.loseConnection()

    def _opened(self, ev: Opened) -> None:
        assert self.session is not None
        f = self.factory
        self.key = (ev.hello.relay_id, ev.hello.epoch)
        committed = f.ledger.committed(self.key)
        self.transport.write(self.session.welcome(committed))
        f.metrics.inc("link_sessions_total", listener=f.name)
        log.info(
            "{listener}: relay link from {sender} ({peer}), epoch {epoch:x}, codec {codec}, "
            "committed up to {seq}",
            listener=f.name,
            sender=ev.hello.relay_id,
            peer=self.peer,
            epoch=ev.hello.epoch,
            codec=ev.codec,
            seq=committed,
        )

    def _batch(self, ev: BatchReceived) -> None:
        assert self.session is not None and self.key is not None
        f = self.factory
        h = ev.header
        key = self.key
        f.metrics.inc("link_batches_received_total", listener=f.name)
        f.metrics.inc("link_bytes_received_raw_total", h.raw_length, listener=f.name)
        why = self.session.looped(h)
        framed = None
        if why is None and f.frame is not None:
            # The normal case: the records framed together, hours decided, on the one walk
            # that also counts their messages (a count per record was a second walk).
            framed = f.frame(b"".join(p for _, p in ev.records))
            if framed.errors or framed.messages != h.messages:
                framed = None  # counted record by record below, as the protocol defines
        counts: list[int] = []
        if framed is None:
            counts = self._counts(ev)
        fresh = f.ledger.admit(key, ev.records)
        if framed is not None and len(fresh) != len(ev.records):
            # Framed whole, but the ledger had some records already (a resend after a
            # reconnect): the fresh ones go the record-by-record way. Their count was
            # checked on the framing walk; nothing may be refused after admit.
            framed = None
            counts = [octet_count(p) for _, p in ev.records]
        dup = len(ev.records) - len(fresh)
        if dup:
            f.metrics.inc("link_duplicates_suppressed_total", dup, listener=f.name)
            if not fresh:
                f.metrics.inc("link_duplicate_batches_total", listener=f.name)
        if fresh:
            seq = h.seq
            data: bytes | list[bytes] | Framed
            if framed is not None:
                data = framed
            elif why is not None:
                looped = sum(c or 1 for c in counts[len(counts) - len(fresh) :])
                f.metrics.inc("messages_looped_total", looped, listener=f.name)
                ok, suppressed = f.limiter.allow("loop")
                if ok:
                    log.warn(
                        "{listener}: dropping batch {seq} from {sender}: {why} (path {path}){more}",
                        listener=f.name,
                        seq=h.seq,
                        sender=key[0],
                        why=why,
                        path=",".join(p.decode("ascii", "replace") for p in h.path),
                        more=f" ({suppressed} similar suppressed)" if suppressed else "",
                    )
                data = []
            elif all(counts[len(counts) - len(fresh) :]):
                # Octet-counted records (the normal case): one chunk for the router's fast path.
                data = b"".join(p for _, p in fresh)
            else:
                data = [m for _, p in fresh for m in _messages(p)]
            f.deliver(
                data,
                self.peer.encode(),
                lambda: f.ledger.durable(key, seq),
                (key, seq),
                h.path,
            )
        f.ledger.when_committed(key, h.seq, lambda: self._ack(h.seq))

    def _counts(self, ev: BatchReceived) -> list[int]:
        """Each record's octet-counted messages (0: not octet-counted, one message);
        checked before the ledger admits anything: a refused batch is not "seen"."""
        counts = [octet_count(p) for _, p in ev.records]
        total = sum(c or 1 for c in counts)
        if total != ev.header.messages:
            raise WireError(
                wire.R_PROTOCOL,
                f"batch {ev.header.seq} holds {total} messages, header {ev.header.messages}",
            )
        return counts

    def _ack(self, seq: int) -> None:
        session = self.session
        if session is None or not self.connected:
            return  # the sender resends; the ledger knows it is committed
        data = session.ack(seq)
        if data:
            self.transport.write(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self.session = None
        release(self._timers, self.transport, reason, True)
        f = self.factory
        f.connections.discard(self)
        if f.inputs is not None and self._accepted:
            f.inputs.remove(self.transport)


# (octet-counted chunk, framed by the factory's ``frame`` or not, or the messages one
# by one; sender; on_durable; the batch for the writer's journal; path)
Deliver = Callable[
    [bytes | list[bytes] | Framed, bytes, Callable[[], None], Commit, Sequence[bytes]], None
]


class LinkServerFactory(Factory):
    protocol = LinkServerProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        name: str,
        relay_id: str,
        deliver: Deliver,
        ledger: Ledger,
        metrics: Metrics,
        reactor: IReactorTime,
        codecs: Sequence[str] = ("zstd", "none"),
        window: int = 16,
        max_batch: int = 17 * 1024 * 1024,
        max_raw: int = 17 * 1024 * 1024,
        max_hops: int = 16,
        max_connections: int = 0,
        inputs: Inputs | None = None,
        on_connect: Callable[[LinkServerProtocol], None] | None = None,
        hello_timeout: float = 0.0,
        frame: Callable[[bytes], Framed] | None = None,
    ) -> None:
        self.name = name
        self.frame = frame  # Router.frame for octet-counted records; None: counted one by one
        self.hello_timeout = hello_timeout
        self.relay_id = relay_id
        self.deliver = deliver
        self.ledger = ledger
        self.metrics = metrics
        self.reactor = reactor
        self.codecs = tuple(codecs)
        self.window = window
        self.max_batch = max_batch
        self.max_raw = max_raw
        self.max_hops = max_hops
        self.max_connections = max_connections
        self.inputs = inputs
        self.on_connect = on_connect
        self.connections: set[LinkServerProtocol] = set()
        self.limiter = RateLimiter(reactor.seconds)

    def apply_limits(self, limits: LimitsConfig) -> None:
        """New [limits] from a reload (the link's own bounds are in [link])."""
        self.max_connections = limits.max_connections

    def snapshot(self) -> ListenerSnapshot:
        return ListenerSnapshot(len(self.connections))

    def close_connections(self) -> None:
        for conn in list(self.connections):
            conn.transport.loseConnection()

    def new_session(self) -> ReceiverSession:
        return ReceiverSession(
            self.relay_id, self.codecs, self.window, self.max_batch, self.max_raw, self.max_hops
        )


# --- sender -----------------------------------------------------------------------------


class BuiltBatch:
    """A batch ready for the wire (built off the reactor thread by ``build_batch``)."""

    __slots__ = ("frame", "messages", "raw", "records", "seq", "wire")

    def __init__(
        self, seq: int, records: int, messages: int, raw: int, wire_len: int, frame: bytes
    ):
        self.seq = seq
        self.records = records
        self.messages = messages
        self.raw = raw
        self.wire = wire_len
        self.frame = frame


def octet_count(payload: bytes) -> int:
    """Messages in an octet-counted record payload; 0 when it is not one (or empty)."""
    try:
        return octet.count(payload)
    except octet.OctetError:
        return 0


def count_messages(payload: bytes) -> int:
    """Messages a record stands for: its octet-counted frames, or 1 (sent as one message)."""
    return octet_count(payload) or 1


def build_batch(
    records: Sequence[tuple[int, bytes]],
    path: Sequence[bytes],
    codec: str,
    level: int,
    messages: int | None = None,
) -> BuiltBatch:
    """Frame, checksum and (zstd) compress one batch; runs in the compression pool.
    ``messages``: the records' message count when the spool kept it (else counted here)."""
    raw = wire.encode_records(records)
    if messages is None:
        messages = sum(count_messages(p) for _, p in records)
    body = raw
    codec_id = wire.CODEC_NONE
    if codec == "zstd":
        packed = wire.compress(raw, level)
        if len(packed) < len(raw):
            body, codec_id = packed, wire.CODEC_ZSTD
    header = wire.BatchHeader(
        records[-1][0], len(records), messages, len(raw), wire.checksum(raw), codec_id, tuple(path)
    )
    return BuiltBatch(
        header.seq, len(records), messages, len(raw), len(body), wire.encode_batch(header, body)
    )


class LinkClientProtocol(Protocol):
    factory: LinkClientFactory
    transport: IStreamTransport

    def __init__(self) -> None:
        self.session: SenderSession | None = None
        self._building: deque[Deferred[BuiltBatch]] = deque()
        self._built: dict[int, BuiltBatch] = {}
        self._order: deque[int] = deque()  # seqs being built, in order
        self._sent_at: deque[tuple[int, float, int]] = deque()  # seq, when, messages
        self._timer: IDelayedCall | None = None
        self._closing = False
        self._paused = False
        self.peer = "?"

    def connectionMade(self) -> None:
        f = self.factory
        self.peer = _peer(self.transport)
        f.current = self
        _no_delay(self.transport)
        self.session = SenderSession(f.relay_id, f.epoch, f.codecs, f.window, f.max_raw)
        self.transport.registerProducer(cast("IPushProducer", self), True)
        self.transport.write(self.session.hello())
        self._arm()

    # IPushProducer: the transport's buffer is full, stop building batches.
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self.pump()

    def stopProducing(self) -> None:
        self._paused = True

    def _arm(self) -> None:
        f = self.factory
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = f.reactor.callLater(f.ack_timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        s = self.session
        if s is None:
            return
        if s.state != "open" or s.in_flight:
            f = self.factory
            f.metrics.inc("link_ack_timeouts_total", output=f.name)
            log.warn(
                "{output}: {peer} answered nothing for {t}s; abandoning the connection",
                output=f.name,
                peer=self.peer,
                t=f.ack_timeout,
            )
            self.transport.abortConnection()
        else:
            self._arm()

    def dataReceived(self, data: bytes) -> None:
        s = self.session
        if s is None:
            return
        f = self.factory
        try:
            events = s.feed(data)
        except WireError as err:
            f.metrics.inc("link_refused_total", output=f.name, reason=err.kind)
            log.warn(
                "{output}: {peer} broke the relay link protocol: {kind}: {reason}; closing",
                output=f.name,
                peer=self.peer,
                kind=err.kind,
                reason=err.reason,
            )
            self.transport.write(wire.encode_refuse(err.code, err.reason))
            self._drop()
            return
        for ev in events:
            if isinstance(ev, WelcomeReceived):
                w = ev.welcome
                log.info(
                    "{output}: relay link to {peer} ({rid}) open: version {v}, codec {codec}, "
                    "window {window}, peer has committed up to {seq}",
                    output=f.name,
                    peer=self.peer,
                    rid=w.relay_id,
                    v=w.version,
                    codec=w.codec,
                    window=s.effective_window,
                    seq=w.committed,
                )
                f.feeder.committed(w.committed)
                self._arm()
            elif isinstance(ev, Acked):
                self._acked(ev)
            elif isinstance(ev, Refused):
                f.metrics.inc(
                    "link_refused_by_peer_total",
                    output=f.name,
                    reason=wire.REFUSAL_NAMES.get(ev.code, "protocol"),
                )
                log.error(
                    "{output}: {peer} refused the relay link: {kind}: {reason}",
                    output=f.name,
                    peer=self.peer,
                    kind=wire.REFUSAL_NAMES.get(ev.code, "protocol"),
                    reason=ev.reason,
                )
                self._drop()
                return
        self.pump()

    def _drop(self) -> None:
        self.session = None
        self.transport.loseConnection()

    def _acked(self, ev: Acked) -> None:
        f = self.factory
        now = f.reactor.seconds()
        delivered = 0
        while self._sent_at and self._sent_at[0][0] <= ev.seq:
            _, t, n = self._sent_at.popleft()
            f.observe_latency(now - t)
            delivered += n
        if delivered:
            f.metrics.inc("messages_forwarded_total", delivered, output=f.name)
        f.feeder.acked(ev.seq)
        self._arm()
        if self._closing and self.session is not None and not self.session.in_flight:
            self.transport.loseConnection()

    def close(self) -> None:
        """Stop sending; close once what is in flight is acknowledged (failback)."""
        self._closing = True
        if self.session is None or (not self.session.in_flight and not self._order):
            self.transport.loseConnection()

    def wake(self) -> None:
        self.pump()

    @property
    def batches_in_flight(self) -> int:
        return self.session.in_flight if self.session is not None else 0

    def pump(self) -> None:
        s = self.session
        f = self.factory
        if s is None or s.state != "open" or self._closing or self._paused:
            return
        while s.in_flight + len(self._order) < s.effective_window:
            limit = min(f.batch_bytes, s.batch_limit, s.wire_limit)
            got = f.feeder.take(self, limit)
            if got is None:
                return
            records, path, messages = got
            seq = records[-1][0]
            self._order.append(seq)
            d = f.build(records, path, s.codec, f.level, messages)
            d.addCallbacks(self._built_one, self._build_failed)

    def _built_one(self, built: BuiltBatch) -> None:
        self._built[built.seq] = built
        s = self.session
        f = self.factory
        while self._order and self._order[0] in self._built:
            b = self._built.pop(self._order.popleft())
            if s is None or s.state != "open":
                continue  # connection gone: the feeder already took these back
            s.sent(b.seq)
            self.transport.write(b.frame)
            self._sent_at.append((b.seq, f.reactor.seconds(), b.messages))
            f.count_sent(b)
        self.pump()

    def _build_failed(self, failure: Failure) -> None:
        log.failure("{output}: building a batch failed", failure, output=self.factory.name)
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        f = self.factory
        if self.session is not None and self.session.state == "hello":
            # Closed without a WELCOME or a REFUSE: whatever listens there is no relay link.
            f.metrics.inc("link_refused_total", output=f.name, reason="no-welcome")
            log.warn(
                "{output}: {peer} closed the connection without answering the relay link "
                "hello (not a link+tls listener?)",
                output=f.name,
                peer=self.peer,
            )
        self.session = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._order.clear()
        self._built.clear()
        f.feeder.lost(self)
        if f.current is self:
            f.current = None
        if f.on_connection_lost is not None:
            f.on_connection_lost(reason)


class LinkClientFactory(Factory):
    protocol = LinkClientProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        name: str,
        feeder: RecordFeeder,
        metrics: Metrics,
        reactor: IRelayReactor,
        relay_id: str,
        epoch: int,
        build: Callable[..., Deferred[BuiltBatch]],
        codecs: Sequence[str],
        level: int,
        window: int,
        batch_bytes: int,
        max_raw: int,
        ack_timeout: float,
        stats: LatencyStats,
    ) -> None:
        self.name = name
        self.feeder = feeder
        self.metrics = metrics
        self.reactor = reactor
        self.relay_id = relay_id
        self.epoch = epoch
        self.build = build
        self.codecs = tuple(codecs)
        self.level = level
        self.window = window
        self.batch_bytes = batch_bytes
        self.max_raw = max_raw
        self.ack_timeout = ack_timeout
        self.stats = stats
        self.current: LinkClientProtocol | None = None
        self.on_connection_lost: Callable[[Failure], None] | None = None

    def wake(self) -> None:
        if self.current is not None:
            self.current.wake()

    def count_sent(self, b: BuiltBatch) -> None:
        m = self.metrics
        m.inc("link_batches_sent_total", output=self.name)
        m.inc("link_bytes_raw_total", b.raw, output=self.name)
        m.inc("link_bytes_wire_total", b.wire, output=self.name)

    def observe_latency(self, seconds: float) -> None:
        self.stats.observe(seconds)
