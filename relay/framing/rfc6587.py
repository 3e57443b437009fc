"""RFC 6587 stream framing: octet counting and LF (non-transparent) framing.

Sans-IO: ``Framer.feed_runs(bytes, index)`` returns complete frames (runs of whole
ordinary frames, and the odd Frame) and error reports; it never touches a socket. The
shape follows syslog-ng's framed server and h11's receive buffer: every byte is looked
at once per chunk with ``bytes.find`` and slices, and nothing is buffered past
``max_size`` plus an 11-byte length prefix. An oversize frame is cut at ``max_size``
(or rejected) and the excess is discarded as it arrives, so a hostile sender cannot
grow memory. After a fatal error (no valid octet count) the rest of that read is handed over as
``malformed`` frames, byte-exact, never dropped unseen; the caller closes.

"auto" decides per frame, as rsyslog's imtcp does: a frame that starts with a
digit is octet-counted, anything else is a line ending at LF.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.formats.staging_block import split_payload
from relay.framing import hour_runs

MODES = ("auto", "octet-counting", "lf")
OVERSIZE = ("truncate", "reject")
MAX_LENGTH_DIGITS = hour_runs.MAX_LENGTH_DIGITS

_DIGITS = b"0123456789"

# Parser states.
_START = 0  # at a frame boundary (possibly inside an octet count prefix)
_BODY = 1  # octet-counted body: collecting self._need bytes
_SKIP = 2  # discarding self._skip bytes of an oversize octet-counted frame
_LINE = 3  # LF-framed line: collecting until LF
_LINE_SKIP = 4  # discarding an oversize line until LF
_DEAD = 5


@dataclass(slots=True)
class Frame:
    msg: bytes  # message bytes without framing (no count prefix, no trailing LF)
    truncated: bool = False
    cut: bool = False  # connection closed mid-frame; these are the bytes that arrived
    malformed: bool = False  # bytes after a fatal framing error, kept as received


@dataclass(frozen=True, slots=True)
class FramingError:
    """A report, not raised. ``kind`` doubles as the counter name."""

    kind: str  # bad_length, length_too_long, oversize_truncated, oversize_rejected, empty, cut
    fatal: bool  # stream cannot be resynchronised; the caller closes the connection
    offset: int  # byte offset of the frame in the connection's stream
    detail: str


class Framer:
    def __init__(self, mode: str, max_size: int, oversize: str = "truncate") -> None:
        if mode not in MODES:
            raise ValueError(f"framing mode must be one of {MODES}, not {mode!r}")
        if oversize not in OVERSIZE:
            raise ValueError(f"oversize must be one of {OVERSIZE}, not {oversize!r}")
        if max_size < 1:
            raise ValueError("max_size must be positive")
        self._mode = mode
        self._max = max_size
        self._truncate = oversize == "truncate"
        self._state = _START
        self._buf = bytearray()  # partial frame body, line, or count digits
        self._pos = 0  # stream offset of the next byte fed
        self._start = 0  # stream offset of the current frame
        self._need = 0  # _BODY: total body bytes to collect
        self._skip = 0  # _SKIP: bytes left to discard; _BODY: excess to discard after
        self._trunc = False  # current frame is being truncated

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def dead(self) -> bool:
        return self._state == _DEAD

    @property
    def frame_start(self) -> int:
        """Stream offset of the frame received in part, or -1 at a frame boundary."""
        state = self._state
        if (state == _START and not self._buf) or state == _DEAD:
            return -1
        return self._start

    def feed_runs(
        self, data: bytes, index: hour_runs.HourIndex
    ) -> tuple[list[hour_runs.Run | Frame], list[FramingError]]:
        """The hot path: runs of whole ordinary frames (relay.framing.hour_runs) and the odd Frame.

        A run refers to ``data`` by offsets; frames that needed buffering,
        truncation or were cut are Frame objects. Items are in stream order.
        """
        items: list[hour_runs.Run | Frame] = []
        errors: list[FramingError] = []
        if self._state == _DEAD or not data:
            return items, errors
        n = len(data)
        i = 0
        base = self._pos
        maxsize = self._max
        buf = self._buf
        frames = items
        while i < n:
            state = self._state
            if state == _START:
                if not buf:
                    self._start = base + i
                c = data[i]
                if (
                    buf
                    or self._mode == "octet-counting"
                    or (self._mode == "auto" and 48 <= c <= 57)
                ):
                    if not buf:
                        i = hour_runs.octet_runs(data, i, maxsize, index, items)
                        if i == n or (self._mode == "auto" and not 48 <= data[i] <= 57):
                            continue
                        self._start = base + i
                    i = self._count(data, i, frames, errors)
                    continue
                auto = self._mode == "auto"
                i = hour_runs.line_runs(data, i, maxsize, index, auto, items)
                if i == n or (auto and 48 <= data[i] <= 57):
                    continue
                self._start = base + i
                j = data.find(b"\n", i)
                if j < 0:
                    self._state = _LINE
                    continue
                length = j - i
                if length == 0:
                    errors.append(FramingError("empty", False, base + i, "empty line"))
                else:
                    self._oversize_line(data[i : i + maxsize], length, frames, errors)
                i = j + 1
            elif state == _BODY:
                want = self._need - len(buf)
                if n - i < want:
                    buf += data[i:]
                    i = n
                    break
                if buf:
                    buf += data[i : i + want]
                    msg = bytes(buf)
                    buf.clear()
                else:
                    msg = data[i : i + want]
                i += want
                frames.append(Frame(msg, truncated=self._trunc))
                if self._skip:
                    self._state = _SKIP
                else:
                    self._state = _START
                    self._trunc = False
            elif state == _SKIP:
                take = min(self._skip, n - i)
                self._skip -= take
                i += take
                if not self._skip:
                    self._state = _START
                    self._trunc = False
            elif state == _LINE:
                j = data.find(b"\n", i)
                end = n if j < 0 else j
                length = len(buf) + end - i
                if length > maxsize:
                    head = bytes(buf) + data[i : i + maxsize - len(buf)]
                    buf.clear()
                    self._oversize_line(head, None if j < 0 else length, frames, errors)
                    if j < 0:
                        self._state = _LINE_SKIP
                        i = n
                    else:
                        self._state = _START
                        i = j + 1
                elif j < 0:
                    buf += data[i:]
                    i = n
                else:
                    if length == 0:
                        errors.append(FramingError("empty", False, self._start, "empty line"))
                    else:
                        buf += data[i:j]
                        frames.append(Frame(bytes(buf)))
                        buf.clear()
                    self._state = _START
                    i = j + 1
            elif state == _LINE_SKIP:
                j = data.find(b"\n", i)
                if j < 0:
                    i = n
                else:
                    i = j + 1
                    self._state = _START
            else:  # _DEAD, reached after a fatal error in this chunk
                break
        self._pos = base + n
        return items, errors

    def close(self) -> tuple[list[Frame], list[FramingError]]:
        """End of stream: hand over a partial frame (cut=True) and report it."""
        frames: list[Frame] = []
        errors: list[FramingError] = []
        state = self._state
        if state == _DEAD:
            return frames, errors
        buf = self._buf
        if state == _START and buf:
            detail = f"connection closed inside the octet count ({len(buf)} digits)"
            errors.append(FramingError("cut", False, self._start, detail))
        elif state == _BODY:
            got = len(buf)
            if got:
                frames.append(Frame(bytes(buf), truncated=self._trunc, cut=True))
            detail = f"connection closed after {got} of {self._need + self._skip} octets"
            errors.append(FramingError("cut", False, self._start, detail))
        elif state == _SKIP:
            detail = f"connection closed with {self._skip} octets of an oversize frame missing"
            errors.append(FramingError("cut", False, self._start, detail))
        elif state == _LINE and buf:
            frames.append(Frame(bytes(buf), cut=True))
            detail = f"connection closed before LF ({len(buf)} octets in the last line)"
            errors.append(FramingError("cut", False, self._start, detail))
        elif state == _LINE_SKIP:
            detail = "connection closed before LF ending an oversize line"
            errors.append(FramingError("cut", False, self._start, detail))
        self._die()
        return frames, errors

    # -- helpers -------------------------------------------------------------

    def _die(self) -> None:
        self._state = _DEAD
        self._buf = bytearray()

    def _count(
        self, data: bytes, i: int, frames: list[hour_runs.Run | Frame], errors: list[FramingError]
    ) -> int:
        """Read an octet count (``LEN SP``), possibly continuing digits buffered earlier."""
        buf = self._buf
        room = MAX_LENGTH_DIGITS + 1 - len(buf)  # digits still allowed plus the SP
        window = data[i : i + room]
        sp = window.find(b" ")
        digits = window if sp < 0 else window[:sp]
        if digits and not digits.isdigit():
            bad = next(k for k, c in enumerate(digits) if c not in _DIGITS)
            return self._fatal(
                data,
                i,
                frames,
                errors,
                "bad_length",
                f"octet count contains {bytes(digits[bad : bad + 1])!r} before the space",
            )
        if sp < 0:
            if len(buf) + len(window) > MAX_LENGTH_DIGITS:
                run = len(buf) + _digit_run(data, i, 64)
                more = "or more " if run >= len(buf) + 64 else ""
                return self._fatal(
                    data,
                    i,
                    frames,
                    errors,
                    "length_too_long",
                    f"octet count has {run} {more}digits (max {MAX_LENGTH_DIGITS})",
                )
            buf += window
            return i + len(window)
        if not buf and not digits:
            return self._fatal(
                data, i, frames, errors, "bad_length", "octet count missing before the space"
            )
        text = bytes(buf) + digits
        buf.clear()
        length = int(text)
        i += sp + 1
        if length == 0:
            errors.append(FramingError("empty", False, self._start, "octet count is 0"))
            return i
        maxsize = self._max
        if length <= maxsize:
            self._need, self._skip, self._trunc = length, 0, False
            self._state = _BODY
        elif self._truncate:
            self._need, self._skip, self._trunc = maxsize, length - maxsize, True
            self._state = _BODY
            detail = f"frame of {length} octets truncated to {maxsize}"
            errors.append(FramingError("oversize_truncated", False, self._start, detail))
        else:
            self._skip, self._trunc = length, False
            self._state = _SKIP
            detail = f"frame of {length} octets rejected (max {maxsize})"
            errors.append(FramingError("oversize_rejected", False, self._start, detail))
        return i

    def _oversize_line(
        self,
        head: bytes,
        length: int | None,
        frames: list[hour_runs.Run | Frame],
        errors: list[FramingError],
    ) -> None:
        size = f"of {length} octets" if length is not None else f"longer than {self._max} octets"
        if self._truncate:
            frames.append(Frame(head, truncated=True))
            detail = f"line {size} truncated to {self._max}"
            errors.append(FramingError("oversize_truncated", False, self._start, detail))
        else:
            detail = f"line {size} rejected (max {self._max})"
            errors.append(FramingError("oversize_rejected", False, self._start, detail))

    def _fatal(
        self,
        data: bytes,
        i: int,
        frames: list[hour_runs.Run | Frame],
        errors: list[FramingError],
        kind: str,
        detail: str,
    ) -> int:
        """The stream cannot be resynchronised: keep the rest of this read (from the bad
        frame's first byte) as malformed frames of at most ``max_size`` bytes, byte-exact,
        and die; the caller closes the connection. Returns ``len(data)``."""
        rest = bytes(self._buf) + data[i:]
        step = self._max
        frames.extend(Frame(rest[k : k + step], malformed=True) for k in range(0, len(rest), step))
        detail += f"; the rest of this read ({len(rest)} bytes) is kept, flagged M"
        errors.append(FramingError(kind, True, self._start, detail))
        self._die()
        return len(data)


def messages(data: bytes, items: list[hour_runs.Run | Frame]) -> list[bytes | Frame]:
    """The messages of ``feed_runs`` items one by one (runs split, odd frames as they are)."""
    out: list[bytes | Frame] = []
    for item in items:
        if isinstance(item, Frame):
            out.append(item)
        else:
            start, end, _, _, framing = item
            out.extend(split_payload(data[start:end], framing))
    return out


def _digit_run(data: bytes, i: int, limit: int) -> int:
    """Number of ASCII digits at data[i:], looking at most ``limit`` bytes."""
    window = data[i : i + limit]
    stripped = window.lstrip(_DIGITS)
    return len(window) - len(stripped)
