"""RFC 6587 octet counting on whole frames: ``LEN SP MSG`` back to back.

The one encoder and splitter of the format, for every writer and reader of complete
frames (staging blocks, spool records, forwarders, the relay link, tests). The stream
state machine that finds frames in received bytes is relay.framing.rfc6587 (and
relay.framing.hour_runs, its fused runs); relay.formats.loop_guard.mark_octet rewrites
counts in place on the forward path. Pure functions over bytes; no relay imports.
"""

from __future__ import annotations

from collections.abc import Sequence

# A count's SP comes within this many bytes of its start (11 digits at most): anything
# longer is damage, not a frame.
_COUNT_FIELD = 12


class OctetError(ValueError):
    """Bytes that are not whole octet-counted frames; ``reason`` says what is wrong."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode(msg: bytes) -> bytes:
    """One frame."""
    return b"%d %b" % (len(msg), msg)


_PREFIXES: dict[int, bytes] = {}  # length -> b"LEN " (messages come in a few thousand sizes)


def encode_many(msgs: Sequence[bytes]) -> bytes:
    """Frames of ``msgs``, back to back.

    Joins count prefixes and the messages themselves, so each message is copied once
    (formatting ``b"%d %b"`` per message copies it twice).
    """
    parts: list[bytes] = []
    append = parts.append
    prefixes = _PREFIXES
    for m in msgs:
        n = len(m)
        prefix = prefixes.get(n)
        if prefix is None:
            prefix = b"%d " % n
            if len(prefixes) < 65536:
                prefixes[n] = prefix
        append(prefix)
        append(m)
    return b"".join(parts)


def split(payload: bytes) -> list[bytes]:
    """The messages of ``payload``; OctetError when it is not whole frames."""
    msgs: list[bytes] = []
    append = msgs.append
    find = payload.find
    i = 0
    n = len(payload)
    while i < n:
        sp = find(b" ", i, i + _COUNT_FIELD)
        digits = payload[i:sp]
        if sp <= i or not digits.isdigit():
            raise OctetError("bad octet count inside a block")
        end = sp + 1 + int(digits)
        if end > n:
            raise OctetError("octet-counted frame runs past the block")
        append(payload[sp + 1 : end])
        i = end
    return msgs


_SIZES: dict[bytes, int] = {}  # octet counts seen (digits -> value): one lookup per frame


def count(payload: bytes) -> int:
    """How many frames ``payload`` holds, checked as ``split`` checks them (the same
    OctetError), without copying the messages out."""
    find = payload.find
    size_of = _SIZES.get
    i = frames = 0
    n = len(payload)
    while i < n:
        sp = find(b" ", i, i + _COUNT_FIELD)
        if sp <= i:
            raise OctetError("bad octet count inside a block")
        size = size_of(payload[i:sp])
        if size is None:
            digits = payload[i:sp]
            if not digits.isdigit():
                raise OctetError("bad octet count inside a block")
            size = int(digits)
            if len(_SIZES) >= 65536:
                _SIZES.clear()
            _SIZES[digits] = size
        i = sp + 1 + size
        if i > n:
            raise OctetError("octet-counted frame runs past the block")
        frames += 1
    return frames
