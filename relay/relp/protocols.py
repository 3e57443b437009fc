"""Thin Twisted protocols over relay.relp.session: a RELP input (server) and a RELP output (client).

Server: every message received during one reactor turn goes to ONE
``deliver(messages, sender)`` call (group commit); the "200 OK" answers are written only
when the returned Deferred fires, i.e. when the messages are durable, and always in TXNR
order. A delivery that fails is never acknowledged: the connection is aborted and the
client (omrelp) sends the messages again on its next session; a negative answer would
make librelp drop them. Bytes received but not yet acknowledged are bounded per
connection (``max_unacked``): past it the transport stops reading until deliveries catch
up. Answers are bounded too: the protocol is the transport's streaming producer, so a
client that never reads its answers stops being read once the transport holds more
unsent bytes than its buffer size (Twisted's 64 KiB), until they drain. Reading resumes
only when no reason to pause holds (unacked bytes, unsent answers, full storage).

Client: keeps up to ``window`` messages in flight from a ``RelpSource`` and reports, in
order, which are acknowledged. A peer that answers nothing for ``ack_timeout`` seconds
while messages are in flight is abandoned (abort), and on any loss of the connection the
messages still in flight are handed back through ``on_lost`` so the caller can rewind.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast
from typing import Protocol as TypingProtocol

from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from relay import __version__
from relay.formats.staging_block import FRAMING_OCTET, split_payload
from relay.framing.rfc6587 import Frame
from relay.inputs.addresses import host_port
from relay.inputs.connection import (
    FrameDeadline,
    Sources,
    admit_source,
    frame_expired,
    release,
    take_limits,
)
from relay.ops.log_rate_limit import RateLimiter
from relay.ops.snapshots import ListenerSnapshot
from relay.relp.session import (
    Acked,
    ClientSession,
    Close,
    Closed,
    Messages,
    Nacked,
    Open,
    Opened,
    Rejected,
    RelpError,
    ServerClose,
    ServerSession,
    SyslogRun,
)

__all__ = [
    "RelpClientFactory",
    "RelpClientProtocol",
    "RelpServerFactory",
    "RelpServerProtocol",
    "RelpSource",
]

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer, IReactorTime

    from relay.config import LimitsConfig
    from relay.inputs.connection import Inputs
    from relay.interfaces import IStreamTransport

log = Logger(namespace="relay.relp")

Deliver = Callable[[list[bytes | Frame], bytes], "Deferred[None]"]
# (messages octet-counted as received, sender) -> fires once durable: SyslogRuns' way in
DeliverFrames = Callable[[bytes, bytes], "Deferred[None]"]
Item = bytes | Frame | SyslogRun  # a message, or a run of them


class _Metrics(TypingProtocol):
    def inc(self, name: str, n: int = 1, **labels: str) -> None: ...


def _sender(addr: IAddress, scheme: str) -> bytes:
    host, port = host_port(addr) or ("unknown", 0)
    if ":" in str(host):
        return f"{scheme}://[{host}]:{port}".encode()
    return f"{scheme}://{host}:{port}".encode()


def _no_delay(transport: object) -> None:
    """Answers are small and a full window waits for them: Nagle would hold each burst of
    answers until the peer's delayed ACK (up to 200 ms on Linux) and stall the window."""
    # TCP, and TLS over it, have it; a test's StringTransport does not.
    set_no_delay = getattr(transport, "setTcpNoDelay", None)
    if set_no_delay is not None:
        set_no_delay(True)


# --- server ---------------------------------------------------------------------------------


class _Pause:
    """One reason to stop reading a connection, as an ``IPushProducer`` for whoever
    decides it: the transport (unsent answers), ``relay.inputs.connection.Inputs`` (storage)."""

    def __init__(self, proto: RelpServerProtocol, reason: str) -> None:
        self.proto = proto
        self.reason = reason

    def pauseProducing(self) -> None:
        self.proto.hold(self.reason)

    def resumeProducing(self) -> None:
        self.proto.unhold(self.reason)

    def stopProducing(self) -> None:
        pass


class RelpServerProtocol(Protocol, TimeoutMixin):
    factory: RelpServerFactory
    transport: IStreamTransport

    def __init__(self) -> None:
        self.session: ServerSession | None = None
        self.sender = b""
        self._unacked_bytes = 0
        self._paused = False
        self._holds: set[str] = set()  # reasons the transport is not read: see hold()
        self._storage = _Pause(self, "storage")
        self._accepted = False
        self._timers: list[IDelayedCall] = []
        self._deliveries = 0  # deliver() calls not yet answered
        self._batch: list[tuple[int, Item]] = []  # received, not yet delivered
        self._batch_bytes = 0
        self._commit_call: IDelayedCall | None = None  # the pending group commit
        self._source = ""
        self._deadline: FrameDeadline | None = None
        self._producing = False  # the answers' producer is registered with the transport

    # TimeoutMixin calls the global reactor; this protocol uses the injected one.
    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        return self.factory.reactor.callLater(period, func)

    def connectionMade(self) -> None:
        f = self.factory
        self.sender = _sender(self.transport.getPeer(), f.scheme)
        if f.max_connections and len(f.connections) >= f.max_connections:
            f.metrics.inc("connections_refused_total", listener=f.name, reason="max_connections")
            log.warn(
                "{listener}: refusing {peer}: max_connections ({n}) reached",
                listener=f.name,
                peer=self.sender.decode(),
                n=f.max_connections,
            )
            self.transport.abortConnection()
            return
        source = admit_source(f, self.transport, self.sender)
        if source is None:
            return
        self._source = source
        self._accepted = True
        f.connections.add(self)
        f.metrics.inc("connections_opened_total", listener=f.name)
        self.session = ServerSession(
            f.max_data, version=__version__, oversize=f.oversize, runs=True
        )
        if f.frame_timeout:
            self._deadline = FrameDeadline(
                f.reactor, f.frame_timeout, lambda: self.paused, self._frame_expired
            )
        _no_delay(self.transport)
        # The transport pauses this producer when unsent answers pass its buffer size.
        self.transport.registerProducer(cast("IPushProducer", _Pause(self, "answers")), True)
        self._producing = True
        if f.inputs is not None:
            f.inputs.add(self._storage)
        if f.idle_timeout:
            self.setTimeout(f.idle_timeout)
        if f.on_connect is not None:
            f.on_connect(self)  # e.g. the TLS handshake deadline of a relp+tls listener

    def on_lost(self, delayed_call: IDelayedCall) -> None:
        """Cancel ``delayed_call`` when the connection ends."""
        self._timers.append(delayed_call)

    def dataReceived(self, data: bytes) -> None:
        session = self.session
        if session is None:
            return
        self.resetTimeout()
        f = self.factory
        try:
            events = session.feed(data)
        except RelpError as e:
            f.metrics.inc("relp_protocol_errors_total", listener=f.name)
            log.warn(
                "{listener}: {peer}: RELP error: {reason} at byte {offset}; closing",
                listener=f.name,
                peer=self.sender.decode(),
                reason=e.reason,
                offset=e.offset,
            )
            self._write(session.data_to_send())
            self.session = None
            self.transport.abortConnection()
            return
        batch: list[tuple[int, Item]] = []
        for event in events:
            if type(event) is SyslogRun:
                batch.append((event.first, event))
            elif isinstance(event, Messages):
                if event.truncated:
                    cut = dict(event.truncated)
                    for txnr, size in event.truncated:
                        self._oversize("oversize_truncated", txnr, size)
                    batch.extend(
                        (t, Frame(m, truncated=True) if t in cut else m) for t, m in event.messages
                    )
                else:
                    batch.extend(event.messages)
            elif isinstance(event, Rejected):
                self._oversize("oversize_rejected", event.txnr, event.size)
            elif isinstance(event, Open):
                log.debug(
                    "{listener}: {peer}: RELP session open ({software})",
                    listener=f.name,
                    peer=self.sender.decode(),
                    software=",".join(event.offers.get("relp_software", [])),
                )
            elif isinstance(event, Close):
                f.metrics.inc("relp_sessions_closed_total", listener=f.name)
        if batch:
            self._deliver(batch)
        self._flush()
        deadline = self._deadline
        if deadline is not None and session.frame_start != deadline.at:
            deadline.seen(session.frame_start)

    def _frame_expired(self) -> None:
        self.session = None  # what it sent and was not answered, it sends again
        frame_expired(self.factory, self.transport, self.sender)

    def _oversize(self, kind: str, txnr: int, size: int) -> None:
        """Count (as the stream listeners do) and log, rate-limited, one oversize message."""
        f = self.factory
        f.metrics.inc("framing_errors_total", listener=f.name, kind=kind)
        ok, suppressed = f.limiter.allow(kind)
        if ok:
            log.warn(
                "{listener}: {peer}: {kind}: message {txnr} of {size} bytes exceeds "
                "max_message_size ({limit}){more}",
                listener=f.name,
                peer=self.sender.decode(),
                kind=kind,
                txnr=txnr,
                size=size,
                limit=f.max_data,
                more=f" ({suppressed} similar messages suppressed)" if suppressed else "",
            )

    def _deliver(self, batch: list[tuple[int, Item]]) -> None:
        """Queue messages for the next group commit (one per reactor turn).

        Over TLS each record reaches dataReceived on its own (librelp writes one frame per
        record), so committing per chunk would mean one commit per message; collecting
        until the reactor turn ends merges everything decrypted from one socket read.
        """
        f = self.factory
        size = count = 0
        for _, m in batch:
            if type(m) is SyslogRun:
                size += len(m.frames)  # framing included: a bound, not a statistic
                count += m.commands
            else:
                size += len(m) if type(m) is bytes else len(m.msg)  # type: ignore[union-attr]
                count += 1
        f.metrics.inc("relp_messages_received_total", count, listener=f.name)
        self._unacked_bytes += size
        self._batch.extend(batch)
        self._batch_bytes += size
        if not self._paused and self._unacked_bytes > f.max_unacked:
            self._paused = True
            f.metrics.inc("relp_backpressure_pauses_total", listener=f.name)
            self.hold("unacked")
        if self._commit_call is None:
            self._commit_call = f.reactor.callLater(0, self._commit)

    def _commit(self) -> None:
        self._commit_call = None
        batch, size = self._batch, self._batch_bytes
        self._batch, self._batch_bytes = [], 0
        if not batch or self.session is None:
            return
        self._deliveries += 1
        f = self.factory
        count = 0
        if f.deliver_frames is not None and all(type(m) is SyslogRun for _, m in batch):
            # The fast path's runs only: one chunk of octet-counted frames, staged and
            # spooled as a stream listener's.
            runs: list[SyslogRun] = [m for _, m in batch]  # type: ignore[misc]
            count = sum(r.commands for r in runs)
            d = f.deliver_frames(b"".join([r.frames for r in runs]), self.sender)
        else:
            msgs: list[bytes | Frame] = []
            for _, m in batch:
                if type(m) is SyslogRun:
                    msgs += split_payload(m.frames, FRAMING_OCTET)  # type: ignore[union-attr]
                else:
                    msgs.append(m)  # type: ignore[arg-type]
            count = len(msgs)
            d = f.deliver(msgs, self.sender)
        d.addCallbacks(
            self._delivered,
            self._delivery_failed,
            callbackArgs=([t for t, _ in batch], size, count),
            errbackArgs=(size,),
        )

    def _delivered(self, _: object, txnrs: list[int], size: int, count: int) -> None:
        self._settle(size)
        if self.session is None:
            return  # connection gone: the client will send these again
        self.factory.metrics.inc("relp_acks_total", count, listener=self.factory.name)
        self._write(self.session.ack(txnrs))
        self._flush()

    def _delivery_failed(self, failure: Failure, size: int) -> None:
        self._settle(size)
        f = self.factory
        f.metrics.inc("relp_deliver_failures_total", listener=f.name)
        log.failure(
            "{listener}: {peer}: could not store received messages; closing without "
            "acknowledging them",
            failure,
            listener=f.name,
            peer=self.sender.decode(),
        )
        if self.session is not None:
            self.session = None
            self.transport.abortConnection()

    def _settle(self, size: int) -> None:
        self._unacked_bytes -= size
        self._deliveries -= 1
        if self._paused and self._unacked_bytes <= self.factory.max_unacked // 2:
            self._paused = False
            self.unhold("unacked")

    def hold(self, reason: str) -> None:
        """Stop reading the connection until ``unhold(reason)``; reasons stack."""
        if reason in self._holds:
            return
        if reason == "answers":
            f = self.factory
            f.metrics.inc("relp_answer_backpressure_pauses_total", listener=f.name)
        if not self._holds:
            self.transport.pauseProducing()
        self._holds.add(reason)

    def unhold(self, reason: str) -> None:
        if reason not in self._holds:
            return
        self._holds.discard(reason)
        if not self._holds and self.session is not None:
            self.transport.resumeProducing()

    @property
    def paused(self) -> bool:
        """Reading is stopped (``holds`` says why)."""
        return bool(self._holds)

    @property
    def holds(self) -> frozenset[str]:
        return frozenset(self._holds)

    def _write(self, data: bytes) -> None:
        if data:
            self.transport.write(data)

    def _flush(self) -> None:
        session = self.session
        if session is None:
            return
        self._write(session.data_to_send())
        if session.finished:
            self.session = None
            self.hang_up()

    def server_close(self) -> None:
        """Hang up with the ``serverclose`` hint (shutdown); unacked messages are resent."""
        if self.session is not None:
            self.session = None
            self._write(ServerSession.server_close())
            self.hang_up()

    def hang_up(self) -> None:
        """Close once what was written is sent. The answers' producer goes first: a
        transport waits for a registered producer before it closes (over TLS, forever)."""
        if self._producing:
            self._producing = False
            self.transport.unregisterProducer()
        self.transport.loseConnection()

    def timeoutConnection(self) -> None:
        f = self.factory
        if self._deliveries or self._batch:
            self.setTimeout(f.idle_timeout)  # we are the slow side, not the client
            return
        f.metrics.inc("connections_timed_out_total", listener=f.name)
        unread = "answers" in self._holds
        log.info(
            "{listener}: {peer}: idle for {t:g}s{unread}, closing",
            listener=f.name,
            peer=self.sender.decode(),
            t=f.idle_timeout,
            unread=" without reading its answers" if unread else "",
        )
        if unread:
            # A polite close would wait, for ever, until it reads them.
            self.session = None
            self.transport.abortConnection()
            return
        self.server_close()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self.setTimeout(None)
        release(self._timers, self.transport, reason, self.factory.scheme == "relp+tls")
        if self._deadline is not None:
            self._deadline.cancel()
        self.session = None
        if self._commit_call is not None:
            # never stored, never acknowledged: the client sends them again
            self._commit_call.cancel()
            self._commit_call = None
            self._batch, self._batch_bytes = [], 0
        if not self._accepted:
            return
        f = self.factory
        f.connections.discard(self)
        f.sources.release(self._source)
        if f.inputs is not None:
            f.inputs.remove(self._storage)


class RelpServerFactory(Factory):
    protocol = RelpServerProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        name: str,
        deliver: Deliver,
        metrics: _Metrics,
        reactor: IReactorTime,
        max_data: int,
        idle_timeout: float = 0,
        max_unacked: int = 4 * 1024 * 1024,
        max_connections: int = 0,
        inputs: Inputs | None = None,
        scheme: str = "relp",
        on_connect: Callable[[RelpServerProtocol], None] | None = None,
        frame_timeout: float = 0,
        max_connections_per_source: int = 0,
        oversize: str = "truncate",
        deliver_frames: DeliverFrames | None = None,
    ) -> None:
        self.name = name
        self.deliver = deliver
        # SyslogRuns go in through this (the stream listeners' path) when it is given;
        # otherwise they are taken apart into messages for ``deliver``.
        self.deliver_frames = deliver_frames
        self.metrics = metrics
        self.reactor = reactor
        self.max_data = max_data
        self.oversize = oversize  # [limits] oversize: truncate (flag T) or reject (500)
        self.idle_timeout = idle_timeout
        self.max_unacked = max_unacked
        self.max_connections = max_connections
        self.inputs = (
            inputs  # relay.inputs.connection.Inputs: pauses every input when storage is full
        )
        self.scheme = scheme
        self.on_connect = on_connect
        self.connections: set[RelpServerProtocol] = set()
        self.limiter = RateLimiter(reactor.seconds)
        self.frame_timeout = frame_timeout  # [limits] frame_timeout; 0: none
        self.max_connections_per_source = max_connections_per_source  # 0: no limit
        self.sources = Sources()

    def apply_limits(self, limits: LimitsConfig) -> None:
        """New [limits] from a reload: new sessions and connections follow them."""
        self.max_data = limits.max_message_size
        take_limits(self, limits)

    def snapshot(self) -> ListenerSnapshot:
        return ListenerSnapshot(len(self.connections))

    def close_connections(self) -> None:
        # hang_up unregisters the answers' producer first, or TLS never closes
        for conn in list(self.connections):
            conn.hang_up()

    def close_all(self) -> None:
        for conn in list(self.connections):
            conn.server_close()


# --- client ---------------------------------------------------------------------------------


class RelpSource(TypingProtocol):
    """What the client sends from (relay.forward.outputs's _Source, over an output's spool)."""

    def next_batch(self, max_records: int) -> Sequence[tuple[object, bytes]]: ...

    def on_ack(self, tokens: list[object]) -> None: ...

    def on_lost(self, tokens: list[object]) -> None: ...


class RelpClientProtocol(Protocol):
    """Sends from ``factory.source`` with up to ``window`` messages in flight.

    A negative answer ("500 ...") is passed to ``source.on_nack(token, reason)`` when the
    source has it; otherwise the connection is aborted and the message is reported with
    the rest of the in-flight ones through ``on_lost``, so it is sent again later.
    ``on_lost`` is called once per connection that got as far as ``connectionMade``,
    with the tokens in flight in send order (possibly none).
    """

    factory: RelpClientFactory
    transport: IStreamTransport

    def __init__(self) -> None:
        self.session: ClientSession | None = None
        self._timer: IDelayedCall | None = None
        self._closing = False
        self._reported = False
        self.peer = ""

    def connectionMade(self) -> None:
        f = self.factory
        peer = self.transport.getPeer()
        host, port = host_port(peer) or ("?", 0)
        self.peer = f"{host}:{port}"
        self.session = ClientSession(f.window, version=__version__)
        _no_delay(self.transport)
        f.current = self
        f.metrics.inc("relp_client_connections_total", output=f.name)
        self.transport.write(self.session.open())
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        session = self.session
        if session is None:
            return
        f = self.factory
        try:
            events = session.feed(data)
        except RelpError as e:
            f.metrics.inc("relp_protocol_errors_total", output=f.name)
            log.warn(
                "{output}: {peer}: RELP error: {reason}; closing",
                output=f.name,
                peer=self.peer,
                reason=e.reason,
            )
            self._abort()
            return
        progress = False
        for i, event in enumerate(events):
            if isinstance(event, Acked):
                progress = True
                f.metrics.inc("messages_forwarded_total", len(event.tokens), output=f.name)
                f.source.on_ack(event.tokens)
            elif isinstance(event, Opened):
                progress = True
                log.info("{output}: RELP session open to {peer}", output=f.name, peer=self.peer)
            elif isinstance(event, Nacked):
                progress = True
                f.metrics.inc("relp_nacks_total", output=f.name)
                log.warn(
                    "{output}: {peer} refused a message: {reason}",
                    output=f.name,
                    peer=self.peer,
                    reason=event.reason,
                )
                # on_nack is optional (RelpSource): without it, resend.
                on_nack = getattr(f.source, "on_nack", None)
                if on_nack is None:
                    # Resend it, and to keep the caller's ack position meaningful, also
                    # everything answered after it (duplicates rather than a gap).
                    later = [event.token]
                    for ev in events[i + 1 :]:
                        if isinstance(ev, Acked):
                            later += ev.tokens
                        elif isinstance(ev, Nacked):
                            later.append(ev.token)
                    self._abort(first=later)
                    return
                on_nack(event.token, event.reason)
            elif isinstance(event, ServerClose):
                log.info("{output}: {peer} closes the session", output=f.name, peer=self.peer)
                self._abort()
                return
            elif isinstance(event, Closed):
                self.transport.loseConnection()
                self._disarm()
                return
        if self.session is None:
            return
        if progress:
            self._disarm()
        self.pump()

    def wake(self) -> None:
        """New data in the source: send what the window allows."""
        self.pump()

    def pump(self) -> None:
        session = self.session
        if session is None or self._closing:
            self._maybe_close()
            return
        room = session.room
        if room <= 0:
            self._arm()
            return
        out: list[bytes] = []
        while room > 0:
            batch = self.factory.source.next_batch(room)
            if not batch:
                break
            for token, msg in batch:
                out.append(session.send(msg, token))
            room = session.room
        if out:
            self.factory.metrics.inc("relp_messages_sent_total", len(out), output=self.factory.name)
            self.transport.write(b"".join(out))
        self._arm()

    def close(self) -> None:
        """Finish the session politely: stop taking messages, close once all are answered."""
        self._closing = True
        self._maybe_close()

    def _maybe_close(self) -> None:
        session = self.session
        if session is None or not self._closing or session.state != "open":
            return
        if not session.in_flight:
            self.transport.write(session.close())
            self._arm()

    def _arm(self) -> None:
        """Expect an answer within ack_timeout while anything awaits one."""
        session = self.session
        waiting = session is not None and (
            session.in_flight or session.state in ("opening", "closing")
        )
        if not waiting:
            self._disarm()
        elif self._timer is None:
            self._timer = self.factory.reactor.callLater(self.factory.ack_timeout, self._silent)

    def _disarm(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _silent(self) -> None:
        self._timer = None
        f = self.factory
        f.metrics.inc("relp_ack_timeouts_total", output=f.name)
        n = len(self.session.in_flight) if self.session is not None else 0
        log.warn(
            "{output}: {peer} answered nothing for {t:g}s with {n} messages in flight; "
            "abandoning it",
            output=f.name,
            peer=self.peer,
            t=f.ack_timeout,
            n=n,
        )
        self._abort()

    def _abort(self, first: list[object] | None = None) -> None:
        self._report(first)
        self._disarm()
        self.transport.abortConnection()

    def _report(self, first: list[object] | None = None) -> None:
        """Hand back what awaits an answer; ``first``: answered tokens to resend too."""
        if self._reported or self.session is None:
            return
        self._reported = True
        tokens = [*(first or []), *self.session.in_flight]
        self.session = None
        if tokens:
            self.factory.metrics.inc(
                "relp_in_flight_lost_total", len(tokens), output=self.factory.name
            )
        self.factory.source.on_lost(tokens)

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self._disarm()
        self._report()
        if self.factory.current is self:
            self.factory.current = None
        if self.factory.on_connection_lost is not None:
            self.factory.on_connection_lost(reason)


class RelpClientFactory(Factory):
    """Builds RelpClientProtocols for one output; ``wake()`` reaches the live one."""

    protocol = RelpClientProtocol  # type: ignore[assignment]
    noisy = False

    def __init__(
        self,
        name: str,
        source: RelpSource,
        metrics: _Metrics,
        reactor: IReactorTime,
        window: int,
        ack_timeout: float,
    ) -> None:
        self.name = name
        self.source = source
        self.metrics = metrics
        self.reactor = reactor
        self.window = window
        self.ack_timeout = ack_timeout
        self.current: RelpClientProtocol | None = None
        # Told after the in-flight messages were handed back (the forwarder's peer bookkeeping).
        self.on_connection_lost: Callable[[Failure], None] | None = None

    def wake(self) -> None:
        if self.current is not None:
            self.current.wake()
