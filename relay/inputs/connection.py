"""What every listener's connections share, whatever their protocol (syslog over TCP or
TLS, RELP, the relay link): admission per source host, the deadline for a frame to
complete, limits applied on reload, the end of a connection, and the set of inputs that
the writer and the disk guard pause and resume together."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING
from typing import Protocol as TypingProtocol

from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.inputs import tls_server
from relay.inputs.addresses import source_host
from relay.ops.log_rate_limit import RateLimiter

if TYPE_CHECKING:
    from twisted.internet import udp
    from twisted.internet.interfaces import (
        IDelayedCall,
        IReactorTime,
        ITCPTransport,
        ITransport,
    )

    from relay.config import LimitsConfig
    from relay.inputs.tcp_udp import SyslogDatagramProtocol
    from relay.interfaces import Producer

log = Logger(namespace="relay.input")


def suppressed_note(suppressed: int) -> str:
    return f" ({suppressed} similar messages suppressed)" if suppressed else ""


def release(
    timers: list[IDelayedCall], transport: ITransport, reason: Failure, tls_port: bool
) -> None:
    """A listener connection ended: cancel its deadlines (``timers``) and, on a TLS
    port, let relay.inputs.tls_server log a refusal that never reached an alert."""
    for call in timers:
        if call.active():
            call.cancel()
    timers.clear()
    if tls_port:
        # Non-TLS bytes on a TLS port fail inside OpenSSL without an alert:
        # only here can that refusal be logged and counted.
        tls_server.connection_lost(transport, reason)


class Sources:
    """Open connections per source address of one listener
    (``[limits] max_connections_per_source``: one host may not take every slot)."""

    def __init__(self) -> None:
        self.open: dict[str, int] = {}

    def admit(self, host: str, limit: int) -> bool:
        n = self.open.get(host, 0)
        if limit and n >= limit:
            return False
        self.open[host] = n + 1
        return True

    def release(self, host: str) -> None:
        n = self.open.get(host, 0) - 1
        if n > 0:
            self.open[host] = n
        else:
            self.open.pop(host, None)


class FrameDeadline:
    """Ends a connection whose frame, once started, does not complete within ``timeout``
    (``[limits] frame_timeout``: a sender trickling bytes must not hold a slot forever).

    The protocol tells ``seen(start)`` the partial frame's stream offset after a chunk,
    only when it differs from ``at``: per chunk that costs a comparison, plus a clock read
    when a new frame is left partial. One timer per connection runs while a frame is
    partial. Time spent with the input paused by the relay does not count.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        timeout: float,
        paused: Callable[[], bool],
        expire: Callable[[], None],
    ) -> None:
        self.at = -1  # stream offset of the frame received in part; -1: none
        self.timeout = timeout
        self._reactor = reactor
        self._paused = paused
        self._expire = expire
        self._since = 0.0
        self._call: IDelayedCall | None = None

    def seen(self, start: int) -> None:
        self.at = start
        if start < 0:
            return  # a running timer finds no frame and stops
        self._since = self._reactor.seconds()
        if self._call is None:
            self._call = self._reactor.callLater(self.timeout, self._check)

    def _check(self) -> None:
        self._call = None
        if self.at < 0:
            return
        now = self._reactor.seconds()
        if self._paused():
            self._since = now  # we are not reading: not the sender's delay
        left = self._since + self.timeout - now
        if left > 0:
            self._call = self._reactor.callLater(left, self._check)
            return
        self._expire()

    def cancel(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


class Counting(TypingProtocol):
    def inc(self, name: str, n: int = 1, **labels: str) -> None: ...


class LimitedListener(TypingProtocol):
    """What the connection limits of a stream, RELP or relay-link listener read."""

    name: str

    @property
    def metrics(self) -> Counting: ...

    limiter: RateLimiter
    sources: Sources
    oversize: str
    max_connections: int
    idle_timeout: float
    frame_timeout: float
    max_connections_per_source: int


def admit_source(f: LimitedListener, transport: ITCPTransport, sender: bytes) -> str | None:
    """The connection's source host if ``[limits] max_connections_per_source`` admits
    it; otherwise count, log (rate-limited), abort the connection and return None."""
    source = source_host(transport.getPeer())
    if f.sources.admit(source, f.max_connections_per_source):
        return source
    f.metrics.inc("connections_refused_total", listener=f.name, reason="max_connections_per_source")
    ok, suppressed = f.limiter.allow("max_connections_per_source")
    if ok:
        log.warn(
            "{listener}: refusing {peer}: max_connections_per_source ({n}) reached{more}",
            listener=f.name,
            peer=sender.decode(),
            n=f.max_connections_per_source,
            more=suppressed_note(suppressed),
        )
    transport.abortConnection()
    return None


def take_limits(factory: LimitedListener, limits: LimitsConfig) -> None:
    """The [limits] a stream or RELP listener's factory keeps beside its message size."""
    factory.oversize = limits.oversize
    factory.max_connections = limits.max_connections
    factory.idle_timeout = limits.idle_timeout
    factory.frame_timeout = limits.frame_timeout
    factory.max_connections_per_source = limits.max_connections_per_source


def frame_expired(f: LimitedListener, transport: ITCPTransport, sender: bytes) -> None:
    """A frame outlived ``[limits] frame_timeout``: count, log (rate-limited), abort."""
    f.metrics.inc("frame_timeouts_total", listener=f.name)
    ok, suppressed = f.limiter.allow("frame_timeout")
    if ok:
        log.warn(
            "{listener}: {peer}: a frame started {t:g}s ago is still incomplete; closing{more}",
            listener=f.name,
            peer=sender.decode(),
            t=f.frame_timeout,
            more=suppressed_note(suppressed),
        )
    transport.abortConnection()


class Inputs:
    """Every open input; the writer and the disk guard pause and resume them all at once.

    Each pauses for its own reason and the inputs resume when no reason is left.
    For the writer (its queue is full) UDP ports stop reading and the kernel
    buffers, then drops; for the disk guard (the state directory's filesystem is
    at its floor) they go on reading and drop each datagram, counted.
    """

    WRITER = "writer"
    DISK = "disk"

    def __init__(self) -> None:
        self.producers: set[Producer] = set()
        self.udp_ports: list[udp.Port] = []
        self.reasons: set[str] = set()

    @property
    def paused(self) -> bool:
        return bool(self.reasons)

    def add(self, producer: Producer) -> None:
        self.producers.add(producer)
        if self.reasons:
            producer.pauseProducing()

    def remove(self, producer: Producer) -> None:
        self.producers.discard(producer)

    def pause(self, reason: str = WRITER) -> None:
        was = set(self.reasons)
        self.reasons.add(reason)
        self._apply(was)

    def resume(self, reason: str = WRITER) -> None:
        was = set(self.reasons)
        self.reasons.discard(reason)
        self._apply(was)

    def _apply(self, was: set[str]) -> None:
        now = self.reasons
        if now and not was:
            for p in list(self.producers):
                p.pauseProducing()
        elif was and not now:
            for p in list(self.producers):
                p.resumeProducing()
        stop_udp, stopped_udp = bool(now - {self.DISK}), bool(was - {self.DISK})
        for port in self.udp_ports:
            protocol: SyslogDatagramProtocol = port.protocol
            protocol.discarding = self.DISK in now
            if stop_udp and not stopped_udp:
                port.stopReading()
            elif stopped_udp and not stop_udp:
                port.startReading()
