"""A reactor for forward outputs without sockets: a Clock, fake connections, inline threads.

``PeerReactor`` is Twisted's ``MemoryReactorClock`` (``connectTCP`` records the
attempt, nothing connects by itself) plus what ``HostnameEndpoint`` and the
spool feeder need of a reactor: a name resolver that answers at once (Twisted
22.4's ``MemoryReactor`` has none, and the threaded fallback would escape the
Clock) and ``callFromThread`` run inline (the feeder's spool calls go through
``SyncPool``). The test decides each attempt's fate: ``accept`` hands the
output a ``PeerTransport`` (a ``StringTransport`` that delivers
``connectionLost`` a reactor turn after ``loseConnection``, as a real one does),
``refuse`` fails it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import (
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IReactorPluggableNameResolver,
)
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

# HostnameEndpoint starts one attempt per resolved address every this many
# seconds and reports a failure only once it has run out of addresses.
ATTEMPT_DELAY: float = HostnameEndpoint._DEFAULT_ATTEMPT_DELAY


def assert_no_pending_calls(clock: Clock) -> None:
    """Teardown check: whatever the test stopped left nothing scheduled behind it."""
    pending = clock.getDelayedCalls()
    assert not pending, "delayed calls left pending: " + "; ".join(map(repr, pending))


class SyncPool:
    """ThreadPool stand-in: runs the call at once; start/stop as a service's pool."""

    def __init__(self) -> None:
        self.started = False
        self.stopped = False

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def callInThreadWithCallback(
        self, on_result: Callable[[bool, Any], None], f: Callable[..., Any], *a: Any, **kw: Any
    ) -> None:
        on_result(True, f(*a, **kw))


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class _LiteralResolver:
    """Every name is its own IPv4 address (tests use 192.0.2.x)."""

    def resolveHostName(
        self,
        resolutionReceiver: Any,  # IResolutionReceiver
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> Any:
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        resolutionReceiver.addressResolved(IPv4Address("TCP", hostName, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


class PeerTransport(StringTransport):
    """The output's end of an accepted connection."""

    def __init__(self, reactor: Clock, protocol: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.protocol = protocol
        self.lost = False

    def loseConnection(self) -> None:
        if not self.disconnecting:
            super().loseConnection()
            self.reactor.callLater(0, self.drop, Failure(ConnectionDone()))

    def abortConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            self.reactor.callLater(0, self.drop, Failure(ConnectionAborted()))

    def drop(self, reason: Failure | None = None) -> None:
        """The connection is gone (the peer closed or reset it, or it timed out)."""
        if self.lost:
            return
        self.lost = True
        self.disconnecting = True
        if self.producer is not None:  # as Twisted's FileDescriptor.connectionLost does
            self.producer.stopProducing()
            self.producer = None
        self.protocol.connectionLost(reason or Failure(ConnectionLost()))


@dataclass
class Attempt:
    """One ``connectTCP`` by the output; the test accepts or refuses it."""

    reactor: PeerReactor
    at: float
    host: str
    port: int
    factory: Any
    connector: Any
    transport: PeerTransport | None = None
    refused: bool = False

    def accept(self) -> PeerTransport:
        proto = self.factory.buildProtocol(IPv4Address("TCP", self.host, self.port))
        self.transport = PeerTransport(self.reactor, proto)
        proto.makeConnection(self.transport)
        return self.transport

    def refuse(self) -> None:
        # HostnameEndpoint reports the failure once its address list is spent.
        wait = self.at + ATTEMPT_DELAY - self.reactor.seconds()
        if wait > 0:
            self.reactor.advance(wait)
        self.refused = True
        self.factory.clientConnectionFailed(self.connector, Failure(ConnectionRefusedError()))

    @property
    def pending(self) -> bool:
        return self.transport is None and not self.refused and not self.connector.stoppedConnecting


@implementer(IReactorPluggableNameResolver)
class PeerReactor(MemoryReactorClock):
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        super().__init__()
        self.nameResolver: Any = _LiteralResolver()
        self.attempts: list[Attempt] = []
        # An epoch-like start, as reactor.seconds() is: "now - 0" is never small.
        self.advance(start)

    def installNameResolver(self, resolver: Any) -> Any:
        old, self.nameResolver = self.nameResolver, resolver
        return old

    def callFromThread(self, f: Callable[..., Any], *a: Any, **kw: Any) -> None:
        f(*a, **kw)

    def connectTCP(
        self, host: str, port: int, factory: Any, timeout: float = 30, bindAddress: Any = None
    ) -> Any:
        connector = super().connectTCP(host, port, factory, timeout, bindAddress)
        self.attempts.append(Attempt(self, self.seconds(), host, port, factory, connector))
        return connector

    def to(self, host: str) -> list[Attempt]:
        return [a for a in self.attempts if a.host == host]

    def elapse(self, seconds: float, step: float = 0.01) -> None:
        """Advance ``seconds`` in steps, so that chained short timers (polls) all run."""
        end = self.seconds() + seconds
        while self.seconds() + step < end:
            self.advance(step)
        self.advance(max(0.0, end - self.seconds()))
