"""Plain TCP/TLS outputs: which sent records has the peer's TCP acknowledged?

TCP and TLS carry no application acknowledgements, so a forward output counts a
record as delivered ("settled") once the peer's TCP stack has acknowledged every
byte up to the record's end. Positions are offsets in the byte stream the socket
carries (for TLS: ciphertext, handshake included), in the kernel's own count:

* ``end`` = bytes the peer acknowledged + bytes still in the socket's send queue
  (``SIOCOUTQ``: written, not yet acknowledged) + bytes still in user space below
  the output (Twisted's write buffer, the TLS layer's buffers). It is the stream
  offset just past the last byte written so far.
* ``acked`` = ``tcpi_bytes_acked`` from ``TCP_INFO`` (Linux 4.1 and later).

``SettleWindow`` (sans-IO) keeps the batches written, in order. A batch gets its
position at the first measurement after it was written: that ``end`` can only be
past the batch's last byte, so a batch never settles early; it settles late by at
most one poll. Reading ``SIOCOUTQ`` before ``TCP_INFO`` keeps that true while
acknowledgements arrive between the two calls (``end`` can only come out larger).

When the kernel cannot tell (not Linux, no ``tcpi_bytes_acked``, a transport whose
buffers cannot be read), ``ClockProbe`` falls back to wall time: positions are
seconds, and a batch settles once the connection stayed up ``settle`` seconds
after it was written. Either way a connection that dies gives its unsettled
batches back to be sent again (duplicates possible, never a loss of anything the
peer's TCP did not acknowledge).

Measuring costs two system calls per poll, never one per message or per write.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import sys
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar, cast

from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOProtocol

if TYPE_CHECKING:
    from twisted.internet import tcp
    from twisted.internet.interfaces import ITransport

T = TypeVar("T")

# Linux: ioctl(SIOCOUTQ) = bytes in the send queue not yet acknowledged by the
# peer (termios.TIOCOUTQ has the same value, 0x5411).
SIOCOUTQ = 0x5411
# struct tcp_info: __u64 tcpi_bytes_acked sits at offset 120 (Linux 4.1+).
_BYTES_ACKED = struct.Struct("=Q")
_BYTES_ACKED_AT = 120
_TCP_INFO_LEN = _BYTES_ACKED_AT + _BYTES_ACKED.size
_OUTQ = struct.Struct("=i")


class Measure(Protocol):
    """(acknowledged, end) stream positions now; None when they cannot be told now."""

    kind: str  # how it settles, for the log

    def __call__(self) -> tuple[float, float] | None: ...


class SettleWindow(Generic[T]):
    """Batches written to one connection, settled by stream position (sans-IO)."""

    def __init__(self) -> None:
        self._unplaced: list[tuple[T, int]] = []  # written since the last measurement
        self._placed: deque[tuple[float, T, int]] = deque()  # (end, batch, size), in order
        self.pending_bytes = 0

    def sent(self, batch: T, size: int) -> None:
        self._unplaced.append((batch, size))
        self.pending_bytes += size

    def observe(self, acked: float, end: float) -> list[T]:
        """A measurement: place what was written before it, return what is now settled."""
        if self._unplaced:
            for batch, size in self._unplaced:
                self._placed.append((end, batch, size))
            self._unplaced = []
        out: list[T] = []
        placed = self._placed
        while placed and placed[0][0] <= acked:
            _, batch, size = placed.popleft()
            self.pending_bytes -= size
            out.append(batch)
        return out

    def drain(self) -> list[T]:
        """Everything unsettled, in write order (the connection is gone)."""
        out = [b for _, b, _ in self._placed] + [b for b, _ in self._unplaced]
        self._placed.clear()
        self._unplaced = []
        self.pending_bytes = 0
        return out

    def __len__(self) -> int:
        return len(self._placed) + len(self._unplaced)


class ClockProbe:
    """Fallback: positions are seconds; acknowledged = older than ``settle``."""

    kind = "time"

    def __init__(self, seconds: Callable[[], float], settle: float) -> None:
        self.seconds = seconds
        self.settle = settle

    def __call__(self) -> tuple[float, float]:
        now = self.seconds()
        return now - self.settle, now


class KernelProbe:
    """Linux: what the peer's TCP acknowledged, read from the socket under ``transport``."""

    kind = "tcp"

    def __init__(
        self, layers: list[TLSMemoryBIOProtocol], tcp: tcp.Connection, sock: socket.socket
    ) -> None:
        self._layers = layers  # TLS layers above the TCP transport, top first
        self._tcp = tcp
        self._sock = sock

    @classmethod
    def for_transport(cls, transport: ITransport) -> KernelProbe | None:
        """A probe for this transport, or None when the kernel or the transport cannot tell."""
        if not sys.platform.startswith("linux"):
            return None
        layers, tcp = _stack(transport)
        tls_layers = [t for t in layers if isinstance(t, TLSMemoryBIOProtocol)]
        if tcp is None or len(tls_layers) != len(layers):
            return None  # an unknown wrapper: its buffers cannot be read
        if _user_bytes(tcp) is None:
            return None
        sock = tcp.socket
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
        except OSError:
            return None
        if len(info) < _TCP_INFO_LEN:
            return None  # kernel older than 4.1: no tcpi_bytes_acked
        return cls(tls_layers, tcp, sock)

    def __call__(self) -> tuple[float, float] | None:
        for layer in self._layers:
            if layer._appSendBuffer:  # TLS handshake pending: not encrypted yet
                return None
            # Twisted >= 22.8 coalesces writes; 22.4 (Debian 12) has no _aggregator.
            agg = getattr(layer, "_aggregator", None)
            if agg is not None and agg._buffer:
                return None
            # pyOpenSSL's send BIO: Twisted reads it after every TLS record it makes
            # (at most 16 KiB of plaintext each, read 32 KiB at a time): empty here.
        user = _user_bytes(self._tcp)
        if user is None:
            return None
        try:
            # SIOCOUTQ first: acknowledgements arriving between the two calls can only
            # make ``end`` larger (later settling), never smaller.
            outq = _OUTQ.unpack(fcntl.ioctl(self._sock.fileno(), SIOCOUTQ, b"\0" * _OUTQ.size))[0]
            info = self._sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
        except OSError:
            return None  # closed under us: connectionLost follows
        acked = _BYTES_ACKED.unpack_from(info, _BYTES_ACKED_AT)[0]
        return float(acked), float(acked + outq + user)


def _stack(transport: object) -> tuple[list[ProtocolWrapper], tcp.Connection | None]:
    """(the protocol wrappers under ``transport``, top first; the socket's transport or None).

    A wrapper (TLS) forwards unknown attributes to the transport below it, so
    ``hasattr(tls, "socket")`` is true: walk by type, not by attribute.
    """
    layers: list[ProtocolWrapper] = []
    t: object = transport
    while isinstance(t, ProtocolWrapper):
        layers.append(t)
        t = t.transport
    return layers, (cast("tcp.Connection", t) if t is not None and "socket" in vars(t) else None)


def socket_transport(transport: object) -> tcp.Connection | None:
    """The Twisted transport that owns the socket under ``transport`` (below any TLS)."""
    return _stack(transport)[1]


def widen(transport: object, send_limit: int) -> None:
    """Let the socket's transport send up to ``send_limit`` bytes per reactor turn.

    Twisted sends at most ``SEND_LIMIT`` (128 KiB) per turn and pauses the producer
    above ``bufferSize`` (64 KiB), resuming it only once its buffer is empty: while
    the reactor also serves busy inputs (turns of tens of milliseconds) that caps an
    output at a few MB/s. Both are public attributes of ``FileDescriptor``.
    """
    t = socket_transport(transport)
    if t is not None:
        t.SEND_LIMIT = max(t.SEND_LIMIT, send_limit)
        t.bufferSize = max(t.bufferSize, 2 * send_limit)


def _user_bytes(tcp: object) -> int | None:
    """Bytes written to a Twisted TCP transport and not yet handed to the kernel."""
    try:
        # FileDescriptor's write buffer; anything else is not a transport we can read.
        return len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen  # type: ignore[attr-defined,no-any-return]
    except (AttributeError, TypeError):
        return None


def probe_for(transport: ITransport, seconds: Callable[[], float], settle: float) -> Measure:
    """The kernel's count when it can tell, else wall time."""
    return KernelProbe.for_transport(transport) or ClockProbe(seconds, settle)
