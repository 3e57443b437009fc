"""Types the relay's parts pass each other where Twisted's own do not say enough.

Checked by mypy with mypy-zope, which makes Twisted's zope interfaces usable as types;
at run time nothing here is asked (no ``providedBy``, no ``isinstance``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorCore,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
    IReactorUDP,
    ITCPTransport,
)
from twisted.python.failure import Failure

# What an @inlineCallbacks generator yields: Twisted's inlineCallbacks takes generators
# of Deferreds of any result, and Deferred is invariant in its result.
Waited = Deferred[Any]


class IRelayReactor(IReactorCore, IReactorTime, IReactorTCP, IReactorUDP, IReactorThreads):
    """The reactor relay.service wires the relay with: Twisted's reactors provide each
    of these interfaces. Parts that need less take the one interface they use."""


class IStreamTransport(ITCPTransport, IConsumer, IPushProducer):
    """A stream connection's transport (TCP, or TLS over it): the relay writes to it,
    registers producers with it and pauses it. Twisted's TCP and TLS transports provide
    each of these interfaces."""


class Producer(Protocol):
    """What relay.inputs.connection.Inputs pauses and resumes: a stream transport, or one of a
    RELP connection's reasons to stop reading."""

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...


class ClientFactory(Protocol):
    """An output's client factory (RELP, plain TCP/TLS, relay link) as the output's
    peers see it: the live connection, a wake-up when records arrive, and who to tell
    when the connection ends."""

    @property
    def current(self) -> ClientConnection | None: ...

    on_connection_lost: Callable[[Failure], None] | None

    def wake(self) -> None: ...


class ClientConnection(Protocol):
    """An output's live connection."""

    def close(self) -> None:
        """End it: RELP and the relay link close politely once what is in flight is
        answered; plain TCP/TLS simply closes."""


class ServerFactory(Protocol):
    """A stream listener's factory, for a reload that closes its listener."""

    def close_connections(self) -> None:
        """End every connection it accepted."""


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class HandshakeTimed(Protocol):
    """A TLS listener's connection, whose handshake relay.service gives a deadline."""

    @property
    def factory(self) -> _Named: ...

    @property
    def transport(self) -> ITCPTransport: ...

    def on_lost(self, delayed_call: IDelayedCall) -> None:
        """Cancel ``delayed_call`` when the connection ends."""
