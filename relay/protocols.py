"""Thin Twisted protocols: bytes in, frames to the router, errors counted.

Behaviour lives in the Framer (relay.framing) and the Router; these classes
only connect them to transports, enforce connection limits and timeouts, and
let the writer pause and resume every input (backpressure).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast
from typing import Protocol as TypingProtocol

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from relay.framing import Frame, Framer, FramingError
from relay.metrics import Metrics
from relay.ratelog import RateLimiter
from relay.reports import ListenerSnapshot
from relay.router import Router
from relay.tcp_settle import socket_transport
from relay.udpdrops import socket_drops

if TYPE_CHECKING:
    from twisted.internet import udp
    from twisted.internet.interfaces import (
        IAddress,
        IDelayedCall,
        IReactorTime,
        ITCPTransport,
        ITransport,
    )

    from relay.config import LimitsConfig
    from relay.interfaces import IStreamTransport, Producer

log = Logger(namespace="relay.input")
READ_SIZE = 1024 * 1024  # bytes asked of one recv(2) on a stream connection


def host_port(addr: IAddress) -> tuple[str, int] | None:
    """An IP address's (host, port); None for any other kind (UNIX sockets, test doubles)."""
    if isinstance(addr, (IPv4Address, IPv6Address)):
        return addr.host, addr.port
    return None


def format_sender(transport_name: str, addr: IAddress | tuple[str, int]) -> bytes:
    hp = addr if isinstance(addr, tuple) else host_port(addr)  # a datagram's sender: a tuple
    host, port = hp if hp is not None else (None, None)
    if host is None:
        return f"{transport_name}://unknown:0".encode()
    if ":" in str(host):
        return f"{transport_name}://[{host}]:{port}".encode()
    return f"{transport_name}://{host}:{port}".encode()


def release(
    timers: list[IDelayedCall], transport: ITransport, reason: Failure, tls_port: bool
) -> None:
    """A listener connection ended: cancel its deadlines (``timers``) and, on a TLS
    port, let relay.tls log a refusal that never reached an alert."""
    for call in timers:
        if call.active():
            call.cancel()
    timers.clear()
    if tls_port:
        from relay import tls

        # Non-TLS bytes on a TLS port fail inside OpenSSL without an alert:
        # only here can that refusal be logged and counted.
        tls.connection_lost(transport, reason)


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


def source_host(addr: IAddress) -> str:
    hp = host_port(addr)
    return hp[0] if hp is not None else "unknown"


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
            more=_more(suppressed),
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
            more=_more(suppressed),
        )
    transport.abortConnection()


def _more(suppressed: int) -> str:
    return f" ({suppressed} similar messages suppressed)" if suppressed else ""


def _global_reactor() -> IReactorTime:
    from twisted.internet import reactor

    return cast("IReactorTime", reactor)


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


class SyslogStreamProtocol(Protocol, TimeoutMixin):
    factory: SyslogStreamFactory
    transport: IStreamTransport

    def __init__(self) -> None:
        self._framer: Framer | None = None
        self._sender = b""
        self._accepted = False
        self._timers: list[IDelayedCall] = []
        self._source = ""
        self._deadline: FrameDeadline | None = None

    def on_lost(self, delayed_call: IDelayedCall) -> None:
        """Cancel ``delayed_call`` (e.g. a TLS handshake deadline) when the connection ends."""
        self._timers.append(delayed_call)

    def connectionMade(self) -> None:
        f = self.factory
        self._sender = format_sender(f.transport_name, self.transport.getPeer())
        # Read up to READ_SIZE per recv (Twisted reads 64 KiB): a busy sender's chunks
        # get larger, so the reactor, the router and the writer queue run less often
        # per message (fleet bench, 1 M messages: 2.6-3.4 -> 1.6-1.9 us CPU per message
        # from 64 to 256 KiB), and each read frees enough of the receive buffer that a
        # fast sender is not stopped by zero-window advertisements (256 KiB to 1 MiB:
        # about 450 -> under 20 per 2 M messages, 10-20% more messages per second).
        tcp = socket_transport(self.transport)  # under TLS, the one below it
        if tcp is not None:
            tcp.bufferSize = READ_SIZE
        if f.open_connections >= f.max_connections:
            f.metrics.inc("connections_refused_total", listener=f.name, reason="max_connections")
            ok, suppressed = f.limiter.allow("max_connections")
            if ok:
                log.warn(
                    "{listener}: refusing {peer}: max_connections ({n}) reached{more}",
                    listener=f.name,
                    peer=self._sender.decode(),
                    n=f.max_connections,
                    more=_more(suppressed),
                )
            self.transport.abortConnection()
            return
        source = admit_source(f, self.transport, self._sender)
        if source is None:
            return
        self._source = source
        self._accepted = True
        f.open_connections += 1
        f.metrics.inc("connections_opened_total", listener=f.name)
        self._framer = Framer(f.framing, f.max_size, f.oversize)
        f.inputs.add(self.transport)
        if f.idle_timeout:
            self.setTimeout(f.idle_timeout)
        if f.frame_timeout:
            self._deadline = FrameDeadline(
                f.reactor if f.reactor is not None else _global_reactor(),
                f.frame_timeout,
                lambda: f.inputs.paused,
                self._frame_expired,
            )
        if f.on_connect is not None:
            f.on_connect(self)

    def dataReceived(self, data: bytes) -> None:
        framer = self._framer
        if framer is None:
            return
        # TLS: one call per socket read, all its records together (relay.tlsgather).
        self.resetTimeout()
        f = self.factory
        self._report(f.router.receive(framer, data, self._sender, f.name))
        deadline = self._deadline
        if deadline is not None and framer.frame_start != deadline.at:
            deadline.seen(framer.frame_start)

    def _frame_expired(self) -> None:
        frame_expired(self.factory, self.transport, self._sender)

    def _deliver(self, frames: Sequence[bytes | Frame], errors: list[FramingError]) -> None:
        f = self.factory
        if frames:
            f.router.accept(frames, self._sender, f.name)
        self._report(errors)

    def _report(self, errors: list[FramingError]) -> None:
        if not errors:
            return
        f = self.factory
        fatal = False
        for err in errors:
            f.metrics.inc("framing_errors_total", listener=f.name, kind=err.kind)
            fatal = fatal or err.fatal
            ok, suppressed = f.limiter.allow(err.kind)
            if not ok:
                continue
            level = log.warn if err.fatal or err.kind.startswith("oversize") else log.debug
            level(
                "{listener}: {peer}: {kind} at byte {offset}: {detail}{closing}{more}",
                listener=f.name,
                peer=self._sender.decode(),
                kind=err.kind,
                offset=err.offset,
                detail=err.detail,
                closing="; closing the connection" if err.fatal else "",
                more=_more(suppressed),
            )
        if fatal:
            self.transport.loseConnection()
            self._framer = None

    def timeoutConnection(self) -> None:
        f = self.factory
        f.metrics.inc("connections_timed_out_total", listener=f.name)
        ok, suppressed = f.limiter.allow("idle")
        if ok:
            log.info(
                "{listener}: {peer}: idle for {t:g}s, closing{more}",
                listener=f.name,
                peer=self._sender.decode(),
                t=f.idle_timeout,
                more=_more(suppressed),
            )
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self.setTimeout(None)
        release(self._timers, self.transport, reason, self.factory.transport_name == "tls")
        if self._deadline is not None:
            self._deadline.cancel()
        if not self._accepted:
            return
        f = self.factory
        f.open_connections -= 1
        f.sources.release(self._source)
        f.inputs.remove(self.transport)
        if self._framer is not None:
            frames, errors = self._framer.close()
            self._framer = None
            self._deliver(frames, errors)


class SyslogStreamFactory(Factory):
    protocol = SyslogStreamProtocol  # type: ignore[assignment]
    noisy = False  # we log listening ourselves, with the config's names

    def __init__(
        self,
        name: str,
        transport_name: str,
        router: Router,
        metrics: Metrics,
        inputs: Inputs,
        framing: str,
        max_size: int,
        oversize: str,
        max_connections: int,
        idle_timeout: float,
        on_connect: Callable[[SyslogStreamProtocol], None] | None = None,
        limiter: RateLimiter | None = None,
        frame_timeout: float = 0,
        max_connections_per_source: int = 0,
        reactor: IReactorTime | None = None,  # None: the global reactor
    ) -> None:
        self.name = name
        self.transport_name = transport_name
        self.router = router
        self.metrics = metrics
        self.inputs = inputs
        self.framing = framing
        self.max_size = max_size
        self.oversize = oversize
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.on_connect = on_connect
        self.open_connections = 0
        self.limiter = limiter if limiter is not None else RateLimiter(time.monotonic)
        self.frame_timeout = frame_timeout  # [limits] frame_timeout; 0: none
        self.max_connections_per_source = max_connections_per_source  # 0: no limit
        self.sources = Sources()
        self.reactor = reactor

    def apply_limits(self, limits: LimitsConfig) -> None:
        """New [limits] from a reload: new frames and connections follow them."""
        self.max_size = limits.max_message_size
        take_limits(self, limits)

    def snapshot(self) -> ListenerSnapshot:
        return ListenerSnapshot(self.open_connections)

    def close_connections(self) -> None:
        """Established connections stay open: the sender (or idle_timeout) ends them."""


class SyslogDatagramProtocol(DatagramProtocol):
    """RFC 5426: one message per datagram, kept as received.

    Twisted reads up to 256 KiB of datagrams per reactor turn; they are
    collected per sender and handed to the router once at the end of the
    turn, so a UDP burst is staged in batches like a TCP chunk.
    """

    noisy = False
    transport: udp.Port | None  # the listening port, while it listens

    def __init__(
        self,
        name: str,
        router: Router,
        metrics: Metrics,
        max_size: int,
        oversize: str,
        reactor: IReactorTime | None = None,
    ) -> None:
        self.name = name
        self.router = router
        self.metrics = metrics
        self.max_size = max_size
        self.oversize = oversize
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = cast("IReactorTime", default_reactor)
        self._reactor = reactor
        self._batch: dict[tuple[str, int], list[Frame]] = {}
        self._flush_call: IDelayedCall | None = None
        # Set by Inputs while the disk guard holds the inputs: drop, counted.
        self.discarding = False

    def apply_limits(self, limits: LimitsConfig) -> None:
        """New [limits] from a reload: the next datagram follows them."""
        self.max_size = limits.max_message_size
        self.oversize = limits.oversize

    def close_connections(self) -> None:
        """Datagrams have no connections."""

    def snapshot(self) -> ListenerSnapshot:
        port = self.transport  # the listening port, while it listens
        drops = socket_drops(port.fileno()) if port is not None else None
        return ListenerSnapshot(None, drops)

    def _flush(self) -> None:
        self._flush_call = None
        batch, self._batch = self._batch, {}
        for addr, frames in batch.items():
            self.router.accept(frames, format_sender("udp", addr), self.name)

    def stopProtocol(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush()

    def datagramReceived(self, datagram: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        if self.discarding:
            self.metrics.inc("udp_dropped_total", listener=self.name, reason="disk_floor")
            return
        if not datagram:
            self.metrics.inc("framing_errors_total", listener=self.name, kind="empty")
            return
        frame = Frame(datagram)
        if len(datagram) > self.max_size:
            if self.oversize == "reject":
                self.metrics.inc(
                    "framing_errors_total", listener=self.name, kind="oversize_rejected"
                )
                log.warn(
                    "{listener}: rejected {n}-byte datagram from {peer}",
                    listener=self.name,
                    n=len(datagram),
                    peer=addr[0],
                )
                return
            self.metrics.inc("framing_errors_total", listener=self.name, kind="oversize_truncated")
            frame = Frame(datagram[: self.max_size], truncated=True)
        frames = self._batch.get(addr)
        if frames is None:
            self._batch[addr] = [frame]
        else:
            frames.append(frame)
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self._flush)
