"""Thin Twisted protocols: bytes in, frames to the router, errors counted.

Behaviour lives in the Framer (relay.framing.rfc6587) and the Router; these classes
only connect them to transports, enforce connection limits and timeouts, and
let the writer pause and resume every input (backpressure).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from relay.forward.tcp_settle import socket_transport
from relay.framing.rfc6587 import Frame, Framer, FramingError
from relay.inputs.addresses import format_sender
from relay.inputs.connection import (
    FrameDeadline,
    Inputs,
    Sources,
    admit_source,
    frame_expired,
    release,
    suppressed_note,
    take_limits,
)
from relay.inputs.udp_drops import socket_drops
from relay.ops.log_rate_limit import RateLimiter
from relay.ops.metrics import Metrics
from relay.ops.snapshots import ListenerSnapshot
from relay.router import Router

if TYPE_CHECKING:
    from twisted.internet import udp
    from twisted.internet.interfaces import (
        IDelayedCall,
        IReactorTime,
    )

    from relay.config import LimitsConfig
    from relay.interfaces import IStreamTransport

log = Logger(namespace="relay.input")
READ_SIZE = 1024 * 1024  # bytes asked of one recv(2) on a stream connection


def _global_reactor() -> IReactorTime:
    from twisted.internet import reactor

    return cast("IReactorTime", reactor)


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
                    more=suppressed_note(suppressed),
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
        # TLS: one call per socket read, all its records together (relay.inputs.tls_gather).
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
                more=suppressed_note(suppressed),
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
                more=suppressed_note(suppressed),
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
