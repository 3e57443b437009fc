"""The two ends of a relay link as sans-IO state machines (``docs/relay-link.md``).

``SenderSession`` (the forwarding relay) and ``ReceiverSession`` (the
listening relay) take bytes, return events and produce the bytes to send;
neither touches a socket, a clock or a file. They enforce the protocol's
rules: negotiation first, batches in strictly increasing sequence, at most
``window`` unacknowledged batches, acknowledgements cumulative and never
beyond what was sent. A violation raises ``WireError`` with the refusal code
to send; the caller closes the connection.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from relay.formats import loop_guard
from relay.link import wire
from relay.link.wire import (
    Ack,
    Batch,
    BatchHeader,
    Hello,
    Refuse,
    Welcome,
    WireError,
)

__all__ = [
    "Acked",
    "BatchReceived",
    "Opened",
    "ReceiverSession",
    "Refused",
    "SenderSession",
    "WelcomeReceived",
]


@dataclass(frozen=True)
class WelcomeReceived:
    """The receiver accepted the session; it has committed every record up to ``committed``."""

    welcome: Welcome


@dataclass(frozen=True)
class Acked:
    """Every batch up to ``seq`` is durable at the receiver; ``batches`` is how many that freed."""

    seq: int
    batches: int


@dataclass(frozen=True)
class Refused:
    """The peer refused and will close: ``code`` (``wire.REFUSAL_NAMES``) and its reason."""

    code: int
    reason: str


@dataclass(frozen=True)
class Opened:
    """A sender said hello and was welcomed."""

    hello: Hello
    codec: str
    committed: int


@dataclass(frozen=True)
class BatchReceived:
    header: BatchHeader
    records: list[tuple[int, bytes]]


def choose_codec(offered: Sequence[str], accepted: Sequence[str]) -> str | None:
    """The first codec of the sender's preference the receiver accepts."""
    for codec in offered:
        if codec in accepted:
            return codec
    return None


class SenderSession:
    """The forwarding end: says hello, sends batches within the window, reads acks."""

    def __init__(
        self,
        relay_id: str,
        epoch: int,
        codecs: Sequence[str],
        window: int,
        max_raw: int,
    ) -> None:
        self.relay_id = relay_id
        self.epoch = epoch
        self.codecs = tuple(codecs)
        self.window = window
        self.max_raw = max_raw
        self.state = "new"  # new -> hello -> open -> closed
        self.welcome: Welcome | None = None
        self._decoder = wire.FrameDecoder(wire.MAX_CONTROL)
        self._in_flight: deque[int] = deque()  # seqs of batches sent, not acknowledged
        self.last_sent = 0
        self.last_acked = 0

    def hello(self) -> bytes:
        assert self.state == "new"
        self.state = "hello"
        return wire.encode_hello(
            Hello(wire.MIN_VERSION, wire.VERSION, self.epoch, self.relay_id, self.codecs)
        )

    @property
    def codec(self) -> str:
        assert self.welcome is not None
        return self.welcome.codec

    @property
    def effective_window(self) -> int:
        peer = self.welcome.window if self.welcome is not None else 1
        return max(1, min(self.window, peer))

    @property
    def batch_limit(self) -> int:
        """Largest raw body this session may send (own and the peer's limit)."""
        peer = self.welcome.max_raw if self.welcome is not None else self.max_raw
        return min(self.max_raw, peer)

    @property
    def wire_limit(self) -> int:
        """Largest BATCH frame body the peer accepts."""
        assert self.welcome is not None
        return self.welcome.max_batch

    def can_send(self) -> bool:
        return self.state == "open" and len(self._in_flight) < self.effective_window

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def sent(self, seq: int) -> None:
        """A batch whose last record is ``seq`` was written to the transport."""
        if self.state != "open":
            raise RuntimeError("batch sent outside an open session")
        if seq <= self.last_sent:
            raise RuntimeError(f"batch seq {seq} not above {self.last_sent}")
        self._in_flight.append(seq)
        self.last_sent = seq

    def start_after(self, seq: int) -> None:
        """Batches up to ``seq`` need not be sent (the receiver committed them)."""
        self.last_sent = max(self.last_sent, seq)

    def feed(self, data: bytes) -> list[WelcomeReceived | Acked | Refused]:
        events: list[WelcomeReceived | Acked | Refused] = []
        for frame in self._decoder.feed(data):
            if isinstance(frame, Refuse):
                self.state = "closed"
                events.append(Refused(frame.code, frame.reason))
                return events
            if self.state == "hello":
                if not isinstance(frame, Welcome):
                    raise WireError(wire.R_PROTOCOL, "expected WELCOME")
                if not wire.MIN_VERSION <= frame.version <= wire.VERSION:
                    raise WireError(wire.R_VERSION, f"peer chose version {frame.version}")
                if frame.codec not in self.codecs:
                    raise WireError(wire.R_CODEC, f"peer chose codec {frame.codec!r}")
                if frame.window < 1 or frame.max_raw < 1 or frame.max_batch < 1:
                    raise WireError(wire.R_PROTOCOL, "peer announced a zero limit")
                self.welcome = frame
                self.state = "open"
                self.last_sent = frame.committed
                self.last_acked = frame.committed
                events.append(WelcomeReceived(frame))
            elif self.state == "open" and isinstance(frame, Ack):
                if frame.seq < self.last_acked or frame.seq > self.last_sent:
                    raise WireError(
                        wire.R_SEQUENCE,
                        f"ack {frame.seq} outside {self.last_acked}..{self.last_sent}",
                    )
                freed = 0
                while self._in_flight and self._in_flight[0] <= frame.seq:
                    self._in_flight.popleft()
                    freed += 1
                self.last_acked = frame.seq
                events.append(Acked(frame.seq, freed))
            else:
                raise WireError(wire.R_PROTOCOL, f"unexpected {type(frame).__name__}")
        return events


class ReceiverSession:
    """The listening end: negotiates, checks each batch, sends cumulative acks.

    ``committed(relay_id, epoch)`` answers the WELCOME's committed seq (the
    ledger). Deduplication itself is the ledger's: this object only guarantees
    that what it hands on is well formed, in order and within the limits.
    """

    def __init__(
        self,
        relay_id: str,
        codecs: Sequence[str],
        window: int,
        max_batch: int,
        max_raw: int,
        max_hops: int,
    ) -> None:
        self.relay_id = relay_id
        self.codecs = tuple(codecs)
        self.window = window
        self.max_batch = max_batch
        self.max_raw = max_raw
        self.max_hops = max_hops
        self.state = "new"  # new -> open -> closed
        self.hello: Hello | None = None
        self.codec = "none"
        # A BATCH frame: the body plus its header, path included (255 names of 255 bytes).
        self._decoder = wire.FrameDecoder(max_batch + wire.MAX_BATCH_HEADER)
        self._unacked: deque[int] = deque()
        self.last_received = 0
        self.last_acked = 0

    def feed(self, data: bytes, committed: int = 0) -> list[Opened | BatchReceived]:
        """Frames in; a HELLO is answered by ``welcome()``/``refuse()`` of the caller."""
        events: list[Opened | BatchReceived] = []
        for frame in self._decoder.feed(data):
            if self.state == "new":
                if not isinstance(frame, Hello):
                    raise WireError(wire.R_PROTOCOL, "expected HELLO")
                events.append(self._open(frame))
            elif self.state == "open" and isinstance(frame, Batch):
                events.append(self._batch(frame))
            else:
                raise WireError(wire.R_PROTOCOL, f"unexpected {type(frame).__name__}")
        return events

    def _open(self, hello: Hello) -> Opened:
        if hello.min_version > wire.VERSION or hello.max_version < wire.MIN_VERSION:
            raise WireError(
                wire.R_VERSION,
                f"peer speaks versions {hello.min_version}..{hello.max_version}, "
                f"this relay {wire.MIN_VERSION}..{wire.VERSION}",
            )
        codec = choose_codec(hello.codecs, self.codecs)
        if codec is None:
            raise WireError(
                wire.R_CODEC,
                f"peer offers compression {', '.join(hello.codecs) or 'nothing'}, "
                f"this relay accepts {', '.join(self.codecs)}",
            )
        if not hello.relay_id or len(hello.relay_id.encode()) > wire.MAX_ID:
            raise WireError(wire.R_IDENTITY, "empty or overlong relay id")
        if hello.relay_id == self.relay_id:
            raise WireError(wire.R_IDENTITY, f"peer has this relay's own id {hello.relay_id!r}")
        self.hello = hello
        self.codec = codec
        return Opened(hello, codec, 0)

    def welcome(self, committed: int) -> bytes:
        """The WELCOME for the HELLO just received; ``committed`` comes from the ledger."""
        self.state = "open"
        self.last_received = self.last_acked = committed
        return wire.encode_welcome(
            Welcome(
                wire.VERSION,
                committed,
                self.max_batch,
                self.max_raw,
                self.window,
                self.codec,
                self.relay_id,
            )
        )

    def _batch(self, batch: Batch) -> BatchReceived:
        h = batch.header
        if len(batch.body) > self.max_batch:
            raise WireError(
                wire.R_TOO_LARGE, f"batch of {len(batch.body)} bytes, limit {self.max_batch}"
            )
        if h.codec == wire.CODEC_ZSTD and self.codec != "zstd":
            raise WireError(wire.R_CODEC, "zstd batch on a session without compression")
        if h.seq <= self.last_received:
            raise WireError(wire.R_SEQUENCE, f"batch {h.seq} after {self.last_received}")
        if len(self._unacked) >= self.window:
            raise WireError(wire.R_PROTOCOL, f"more than {self.window} batches unacknowledged")
        raw = wire.decode_body(batch, self.max_raw)
        records = wire.decode_records(raw, h)
        self.last_received = h.seq
        self._unacked.append(h.seq)
        return BatchReceived(h, records)

    def ack(self, seq: int) -> bytes:
        """Acknowledge every batch up to ``seq`` (durable); b"" when that says nothing new."""
        if seq <= self.last_acked:
            return b""
        while self._unacked and self._unacked[0] <= seq:
            self._unacked.popleft()
        self.last_acked = seq
        return wire.encode_ack(seq)

    def refuse(self, err: WireError) -> bytes:
        """The REFUSE for ``err`` (after the preamble when nothing was sent yet)."""
        first = self.state == "new"
        self.state = "closed"
        return (wire.PREAMBLE if first else b"") + wire.encode_refuse(err.code, err.reason)

    def looped(self, header: BatchHeader) -> str | None:
        """Why a batch must not be stored here (loop guard), or None."""
        if loop_guard.safe_id(self.relay_id) in header.path:
            return "it already passed through this relay (forwarding loop)"
        if len(header.path) >= self.max_hops:
            return "too many relay hops"
        return None
