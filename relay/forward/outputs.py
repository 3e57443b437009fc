"""Forward outputs: spool -> peers, over RELP (acknowledged) or plain TCP/TLS.

Shape (see magic-wormhole's dilation "outbound" design note): the spool holds
every record until it is acknowledged; a record is the forwarded messages of
one received chunk, octet-counted (relay.disk.durable_writer). A ``SpoolFeeder`` prefetches
a bounded window of records (in the output's own thread: file reads never run
in the reactor), splits them into messages, hands those to connections,
remembers what each connection has in flight, gives lost in-flight messages
back first on reconnect, and tells the spool the highest sequence number up to
which every message of every record was acknowledged.

``ForwardOutput`` owns the peers: ``failover`` sends through the first healthy
peer in the configured order and fails back to a better one every
``failback_interval``; ``balance`` keeps a connection to every healthy peer and
lets each pull from the same feeder. A peer that refuses, drops the connection
or (RELP) answers nothing within ``ack_timeout`` is retried with jittered
exponential backoff.

Plain TCP/TLS has no acknowledgements. A record sent that way counts as
delivered once the peer's TCP acknowledged its last byte (relay.forward.tcp_settle: the
kernel's count, polled every ``SETTLE_POLL``; where the kernel cannot tell, once
the connection stayed up ``settle`` seconds after it was written); if the
connection dies sooner, everything unsettled is sent again (duplicates at the
peer are possible, loss of what was acknowledged by TCP but not yet read by a
crashing peer too: use RELP or the relay link where that matters).
"""

from __future__ import annotations

import heapq
import random
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from relay.config import ForwardConfig
from relay.formats import octet
from relay.formats.staging_block import FRAMING_OCTET, RecordError, split_payload
from relay.forward.spool_window import SpoolWindow
from relay.forward.tcp_settle import Measure, SettleWindow, probe_for, widen
from relay.link.wire import open_envelope, open_record
from relay.ops.metrics import Metrics
from relay.ops.snapshots import OutputSnapshot, PeerSnapshot
from relay.relp.protocols import RelpClientFactory

if TYPE_CHECKING:
    from twisted.internet.interfaces import (
        IDelayedCall,
        IOpenSSLClientConnectionCreator,
        IPushProducer,
        IReactorTime,
        IStreamClientEndpoint,
        ITCPTransport,
    )

    from relay.disk.spool import Spool, SpoolRecord
    from relay.interfaces import ClientFactory, IRelayReactor, IStreamTransport


log = Logger(namespace="relay.forward")

PREFETCH_RECORDS = 4096
PREFETCH_BYTES = 4 * 1024 * 1024
# Plain TCP/TLS outputs: a record counts as delivered once the peer's TCP
# acknowledged it, measured every SETTLE_POLL seconds while anything is unsettled
# (two system calls per poll). Where the kernel cannot tell, once the connection
# stayed up TCP_SETTLE seconds after it was written. At most TCP_MAX_UNSETTLED
# bytes of messages wait for that: a bound on memory. The socket's send buffer
# (tcp_wmem, 4 MiB by default) and Twisted's 64 KiB hold far less, so it bounds
# the rate only in the wall-time fallback (32 MiB per TCP_SETTLE).
SETTLE_POLL = 0.01
TCP_SETTLE = 1.0
TCP_MAX_UNSETTLED = 32 * 1024 * 1024
TCP_WRITE_BYTES = 1024 * 1024  # at most this much per write and per send (one reactor turn)


class _Message:
    """One message of a spool record (or, rendered, all of them: ``count`` messages).

    ``seq`` is the feeder's own, ``rseq`` the record's.
    """

    __slots__ = ("count", "payload", "rseq", "sent", "seq")

    def __init__(self, seq: int, rseq: int, payload: bytes, count: int = 1) -> None:
        self.seq = seq
        self.rseq = rseq
        self.payload = payload
        self.count = count
        self.sent = 0.0  # when last handed to a connection (reactor time)


# A spool record's payload -> (the bytes to send, how many messages they hold).
Render = Callable[[bytes], "tuple[bytes, int]"]


class SpoolFeeder(SpoolWindow[_Message]):
    """Reactor-side window over one spool. Spool calls run in ``pool`` (one thread).

    Without ``render`` it hands out one message at a time (RELP numbers each).
    With it, one unit per record, already in wire form: plain TCP/TLS outputs
    write records whole and pay nothing per message here.
    """

    prefetch_records = PREFETCH_RECORDS
    prefetch_bytes = PREFETCH_BYTES

    def __init__(
        self,
        spool: Spool,
        reactor: IRelayReactor,
        pool: ThreadPool,
        metrics: Metrics,
        name: str,
        render: Render | None = None,
    ):
        super().__init__(spool, reactor, pool, metrics, name)
        self.render = render
        self._next = 1  # feeder sequence number of the next message read
        self._retry: deque[_Message] = deque()  # lost in flight: sent again first, in order
        self._outstanding: dict[int, _Message] = {}  # seq -> record, handed out, not acked
        self._heap: list[int] = []  # seqs of outstanding (lazy deletion)
        self.delivered = 0  # messages acknowledged (forward_delivered_total)
        self.outstanding_bytes = 0  # handed to connections, not yet acknowledged
        self._ack_latency = metrics.histogram("forward_ack_latency_seconds", output=name)

    # --- records in

    def _take_in(self, records: Sequence[SpoolRecord]) -> None:
        render = self.render
        for rec in records:
            if render is not None:
                wire, count = render(rec.payload)
                self._buffer.append(_Message(self._next, rec.seq, wire, count))
                self._next += 1
                self._buffer_bytes += len(wire)
                continue
            try:
                # A relay-link path envelope is for link outputs; these send the messages.
                msgs = split_payload(open_envelope(rec.payload)[1], FRAMING_OCTET)
            except RecordError:
                # The spool's CRC held, so this is not damage: a record of another
                # shape (a spool written before batches). Send it as one message.
                msgs = [rec.payload]
            for msg in msgs:
                self._buffer.append(_Message(self._next, rec.seq, msg))
                self._next += 1
                self._buffer_bytes += len(msg)

    # --- records out

    def take(self, n: int, max_bytes: int = PREFETCH_BYTES) -> list[_Message]:
        out: list[_Message] = []
        size = 0
        now = self.reactor.seconds()
        while len(out) < n and size < max_bytes:
            if self._retry:
                rec = self._retry.popleft()
            elif self._buffer:
                rec = self._buffer.popleft()
                self._buffer_bytes -= len(rec.payload)
            else:
                break
            rec.sent = now
            out.append(rec)
            size += len(rec.payload)
            self._outstanding[rec.seq] = rec
            self.outstanding_bytes += len(rec.payload)
            heapq.heappush(self._heap, rec.seq)
        self._refill()
        return out

    def acked(self, seqs: Sequence[int]) -> None:
        # One latency per acknowledgement, of its first message, not one per message.
        first = self._outstanding.get(seqs[0]) if seqs else None
        if first is not None:
            self._ack_latency.observe(self.reactor.seconds() - first.sent)
        count = 0
        for seq in seqs:
            rec = self._outstanding.pop(seq, None)
            if rec is not None:
                self.outstanding_bytes -= len(rec.payload)
                count += rec.count
        self.delivered += count
        self._advance()

    def lost(self, seqs: Sequence[int]) -> None:
        """In-flight records of a dead connection: send them again, first, in order."""
        recs = [self._outstanding.pop(s) for s in seqs if s in self._outstanding]
        self.outstanding_bytes -= sum(len(r.payload) for r in recs)
        if recs:
            self.metrics.inc("forward_replayed_total", sum(r.count for r in recs), output=self.name)
            recs.sort(key=lambda r: r.seq)
            self._retry.extendleft(reversed(recs))
            self._wake()

    def _advance(self) -> None:
        heap = self._heap
        while heap and heap[0] not in self._outstanding:
            heapq.heappop(heap)
        # The spool is acked by record: up to the one before the record of the
        # oldest message still unacknowledged (in flight, to retry or unsent).
        lowest = [self._outstanding[heap[0]].rseq] if heap else []
        if self._retry:
            lowest.append(min(r.rseq for r in self._retry))
        if self._buffer:
            lowest.append(self._buffer[0].rseq)
        self._ack(min(lowest) - 1 if lowest else self._read_upto)

    @property
    def in_flight(self) -> int:
        """Messages handed to connections and not yet acknowledged."""
        return sum(r.count for r in self._outstanding.values())


class _Source:
    """RelpSource for one connection: tokens are spool sequence numbers."""

    def __init__(self, feeder: SpoolFeeder) -> None:
        self.feeder = feeder

    def next_batch(self, max_records: int) -> list[tuple[object, bytes]]:
        return [(r.seq, r.payload) for r in self.feeder.take(max_records)]

    def on_ack(self, tokens: list[object]) -> None:
        self.feeder.acked([int(t) for t in tokens])  # type: ignore[call-overload]

    def on_lost(self, tokens: list[object]) -> None:
        self.feeder.lost([int(t) for t in tokens])  # type: ignore[call-overload]


class TcpForwardProtocol(Protocol):
    """Plain TCP/TLS output: frames as configured, settled by what the peer's TCP acknowledged."""

    factory: TcpForwardFactory
    transport: IStreamTransport

    def __init__(self) -> None:
        self._paused = False
        self._window: SettleWindow[list[int]] = SettleWindow()
        self._probe: Measure | None = None
        self._poll_call: IDelayedCall | None = None
        self._pending_pump: IDelayedCall | None = None

    def connectionMade(self) -> None:
        f = self.factory
        f.current = self
        self._probe = f.probe(self.transport)
        widen(self.transport, TCP_WRITE_BYTES)
        log.debug("{output}: settling by {kind}", output=f.name, kind=self._probe.kind)
        self.transport.registerProducer(cast("IPushProducer", self), True)
        self.pump()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self.pump()

    def stopProducing(self) -> None:
        self._paused = True

    def wake(self) -> None:
        self.pump()

    def close(self) -> None:
        """Nothing in flight to wait for: plain TCP/TLS has no answers."""
        self.transport.loseConnection()

    def pump(self) -> None:
        f = self.factory
        if self._paused or f.current is not self:
            return
        if f.source.feeder.outstanding_bytes >= f.max_unsettled:
            self._schedule_poll()  # _poll() pumps again once older records settled
            return
        recs = f.source.feeder.take(f.window, TCP_WRITE_BYTES)
        if not recs:
            return
        if f.source.feeder.render is None:  # one message per unit: frame each
            frame = octet.encode if f.framing == "octet-counting" else _lf
            data = b"".join(frame(r.payload) for r in recs)
        else:  # whole records, in wire form already
            data = b"".join(r.payload for r in recs)
        self.transport.write(data)
        f.metrics.inc("messages_forwarded_total", sum(r.count for r in recs), output=f.name)
        self._window.sent([r.seq for r in recs], len(data))
        self._schedule_poll()
        if self._pending_pump is None:
            self._pending_pump = f.reactor.callLater(0, self._again)

    def _again(self) -> None:
        self._pending_pump = None
        self.pump()

    def _schedule_poll(self) -> None:
        if self._poll_call is None and len(self._window):
            self._poll_call = self.factory.reactor.callLater(SETTLE_POLL, self._poll)

    def _poll(self) -> None:
        self._poll_call = None
        assert self._probe is not None
        measured = self._probe()
        if measured is not None:
            settled = self._window.observe(*measured)
            if settled:
                self.factory.source.on_ack([seq for batch in settled for seq in batch])
        self._schedule_poll()
        self.pump()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        # A dying connection takes nothing more, whether or not the transport called
        # stopProducing first: on_lost below wakes the feeder's listeners, this one too.
        self._paused = True
        f = self.factory
        for call in (self._poll_call, self._pending_pump):
            if call is not None and call.active():
                call.cancel()
        self._poll_call = self._pending_pump = None
        lost: list[object] = [seq for batch in self._window.drain() for seq in batch]
        f.source.on_lost(lost)
        if f.current is self:
            f.current = None
        if f.on_connection_lost is not None:
            f.on_connection_lost(reason)


def _lf(payload: bytes) -> bytes:
    return payload + b"\n"


def render_octet(payload: bytes) -> tuple[bytes, int]:
    """A spool record as RFC 6587 octet-counted frames: its own bytes, with the count
    the writer recorded (or, in a record written without it, validated and counted)."""
    _, frames, count = open_record(payload)
    if count is not None:
        return frames, count
    try:
        return frames, octet.count(frames)
    except octet.OctetError:
        # The spool's CRC held, so this is not damage: a record of another
        # shape (a spool written before batches). Send it as one message.
        return octet.encode(payload), 1


def render_lf(payload: bytes) -> tuple[bytes, int]:
    """A spool record as LF-terminated messages."""
    frames = open_envelope(payload)[1]
    try:
        msgs = split_payload(frames, FRAMING_OCTET)
    except RecordError:
        return payload + b"\n", 1
    return b"\n".join(msgs) + b"\n", len(msgs)


class TcpForwardFactory(Factory):
    protocol = TcpForwardProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        name: str,
        source: _Source,
        metrics: Metrics,
        reactor: IReactorTime,
        window: int,
        framing: str,
        settle: float = TCP_SETTLE,
        probe: Callable[[ITCPTransport], Measure] | None = None,
        max_unsettled: int = TCP_MAX_UNSETTLED,
    ) -> None:
        self.name = name
        self.source = source
        self.metrics = metrics
        self.reactor = reactor
        self.window = window
        self.framing = framing
        self.settle = settle
        # transport -> measurement of (acknowledged, end) stream positions.
        self.probe = probe or (lambda transport: probe_for(transport, reactor.seconds, settle))
        self.max_unsettled = max_unsettled
        self.current: TcpForwardProtocol | None = None
        self.on_connection_lost: Callable[[Failure], None] | None = None

    def wake(self) -> None:
        if self.current is not None:
            self.current.wake()


class Peer:
    """One configured peer: its connection attempts, backoff and current connection."""

    def __init__(self, output: ForwardOutput, index: int, host: str, port: int) -> None:
        self.output = output
        self.index = index
        self.host = host
        self.port = port
        self.failures = 0
        self.retry_at = 0.0
        self.connecting = False
        self.attempt: defer.Deferred[object] | None = None  # the connection attempt in progress
        self.factory: ClientFactory | None = None  # of the live connection

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def connected(self) -> bool:
        return self.factory is not None and self.factory.current is not None

    def available(self, now: float) -> bool:
        return not self.connecting and not self.connected and now >= self.retry_at

    def snapshot(self) -> PeerSnapshot:
        return PeerSnapshot(
            self.label, self.connected, self.connecting, self.failures, self.retry_at
        )


class ForwardOutput(Service):
    """One ``[[forward]]`` output: its spool feeder and its peers."""

    def __init__(
        self,
        cfg: ForwardConfig,
        spool: Spool,
        reactor: IRelayReactor,
        metrics: Metrics,
        tls_options: Callable[[str], IOpenSSLClientConnectionCreator] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.output = cfg.name
        self.name = f"forward-{cfg.name}"
        self.reactor = reactor
        self.metrics = metrics
        self.pool = ThreadPool(minthreads=1, maxthreads=1, name=f"spool-{cfg.name}")
        render: Render | None = None
        if not cfg.acknowledged:  # tcp / tls: whole records, no per-message work
            render = render_octet if cfg.framing == "octet-counting" else render_lf
        self.feeder = SpoolFeeder(spool, reactor, self.pool, metrics, cfg.name, render)
        self.feeder.listeners.append(self._wake_all)
        self.peers = [Peer(self, i, h, p) for i, (h, p) in enumerate(cfg.peers)]
        self._tls_options = tls_options
        self._rng = rng or random.Random()
        self._tick: IDelayedCall | None = None
        self._last_failback = 0.0
        self._stopping = False

    # --- lifecycle

    def startService(self) -> None:
        super().startService()
        self.pool.start()
        self.feeder.notify()
        self._schedule(0)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        self._stopping = True
        if self._tick is not None and self._tick.active():
            self._tick.cancel()
        for peer in self.peers:
            if peer.attempt is not None:
                peer.attempt.cancel()  # else it could connect after the stop and stay open
            if peer.factory is not None and peer.factory.current is not None:
                peer.factory.current.transport.loseConnection()  # type: ignore[attr-defined]
        d: defer.Deferred[None] = defer.Deferred()

        def stop_pool() -> None:
            self.pool.stop()  # joins the thread: an ack in progress completes first
            d.callback(None)

        self.reactor.callLater(0.1, stop_pool)
        return d

    def _schedule(self, delay: float) -> None:
        if self._stopping:
            return
        if self._tick is not None and self._tick.active():
            if self._tick.getTime() <= self.reactor.seconds() + delay:
                return
            self._tick.cancel()
        self._tick = self.reactor.callLater(delay, self._evaluate)

    # --- peer selection

    def _evaluate(self) -> None:
        self._tick = None
        now = self.reactor.seconds()
        interval = self.cfg.failback_interval
        best: Peer | None = None
        if self.cfg.mode == "balance":
            for peer in self.peers:
                if peer.available(now):
                    self._connect(peer)
        else:
            active = [p for p in self.peers if p.connected or p.connecting]
            best = min(active, key=lambda p: p.index) if active else None
            if best is None:
                for peer in self.peers:
                    if peer.available(now):
                        self._connect(peer)
                        break
            elif now - self._last_failback >= interval:
                # Fail back: try the better peers again even while a worse one works;
                # one still backing off is tried once it may be (the interval stays
                # passed), not a whole interval later.
                for peer in self.peers[: best.index]:
                    if peer.available(now):
                        self._last_failback = now
                        self._connect(peer)
                        break
        if best is None:
            due = [p.retry_at for p in self.peers if not (p.connected or p.connecting)]
        else:
            # Working on ``best``: only better peers matter, at the next fail back (not
            # every 50 ms while one waits for it).
            due = [
                max(p.retry_at, self._last_failback + interval)
                for p in self.peers[: best.index]
                if not (p.connected or p.connecting)
            ]
        next_in = min([max(0.05, t - now) for t in due], default=interval)
        self._schedule(min(next_in, interval))

    def _endpoint(self, peer: Peer) -> IStreamClientEndpoint:
        ep: IStreamClientEndpoint = HostnameEndpoint(
            self.reactor, peer.host, peer.port, timeout=max(1, int(self.cfg.ack_timeout))
        )
        if self.cfg.uses_tls:
            assert self._tls_options is not None
            ep = wrapClientTLS(self._tls_options(peer.host), ep)
        return ep

    def _connect(self, peer: Peer) -> None:
        peer.connecting = True
        source = _Source(self.feeder)
        factory: RelpClientFactory | TcpForwardFactory
        if self.cfg.acknowledged:
            factory = RelpClientFactory(
                self.output,
                source,
                self.metrics,
                self.reactor,
                window=self.cfg.window,
                ack_timeout=self.cfg.ack_timeout,
            )
        else:
            factory = TcpForwardFactory(
                self.output, source, self.metrics, self.reactor, self.cfg.window, self.cfg.framing
            )
        factory.on_connection_lost = lambda reason: self._disconnected(peer, reason)
        d = peer.attempt = cast("defer.Deferred[object]", self._endpoint(peer).connect(factory))
        d.addCallbacks(self._connected, self._failed, (peer, factory), {}, (peer,), {})

    def _connected(self, proto: object, peer: Peer, factory: ClientFactory) -> None:
        peer.connecting = False
        peer.attempt = None
        peer.factory = factory
        peer.failures = 0
        self.metrics.inc("forward_connects_total", output=self.output, peer=peer.label)
        log.info(
            "{output}: connected to {peer} ({transport})",
            output=self.output,
            peer=peer.label,
            transport=self.cfg.transport,
        )
        if self.cfg.mode == "failover":
            # A better peer is up: let the worse ones finish what they have in flight.
            for other in self.peers:
                if other.index > peer.index and other.connected:
                    log.info(
                        "{output}: failing back from {old} to {new}",
                        output=self.output,
                        old=other.label,
                        new=peer.label,
                    )
                    self.metrics.inc("forward_failbacks_total", output=self.output)
                    self._retire(other)
        self._wake_all()

    def _retire(self, peer: Peer) -> None:
        proto = peer.factory.current if peer.factory is not None else None
        if proto is None:
            return
        proto.close()  # RELP: polite close once everything in flight is answered

    def _failed(self, failure: Failure, peer: Peer) -> None:
        peer.connecting = False
        peer.attempt = None
        self._backoff(peer, failure.getErrorMessage())

    def _disconnected(self, peer: Peer, reason: Failure) -> None:
        was_clean = peer.failures == 0 and reason is not None and bool(reason.check(ConnectionDone))
        peer.factory = None
        if self._stopping:
            return
        if self.cfg.mode == "failover" and not was_clean:
            self.metrics.inc("forward_failovers_total", output=self.output, peer=peer.label)
        self._backoff(peer, reason.getErrorMessage() if reason is not None else "closed")

    def _backoff(self, peer: Peer, why: str) -> None:
        if self._stopping:
            return
        peer.failures += 1
        base = min(self.cfg.reconnect_max, self.cfg.reconnect_min * 2 ** (peer.failures - 1))
        delay = base * (0.5 + self._rng.random() / 2)  # jitter: no thundering herd
        peer.retry_at = self.reactor.seconds() + delay
        self.metrics.inc("forward_retries_total", output=self.output, peer=peer.label)
        log.warn(
            "{output}: peer {peer} unavailable ({why}); retry in {delay:.1f}s",
            output=self.output,
            peer=peer.label,
            why=why,
            delay=delay,
        )
        self._schedule(0.01)

    def _wake_all(self) -> None:
        for peer in self.peers:
            if peer.factory is not None:
                peer.factory.wake()

    # --- introspection

    @property
    def healthy_peers(self) -> list[str]:
        return [p.label for p in self.peers if p.connected]

    def snapshot(self) -> OutputSnapshot:
        return OutputSnapshot(
            self.cfg.transport,
            self.cfg.mode,
            self.feeder.in_flight,
            self.feeder.delivered,
            len(self.healthy_peers),
            tuple(p.snapshot() for p in self.peers),
        )
