"""The fused fast path: frame a received chunk and group its messages into runs of one hour.

Sans-IO. The relay's cost is per message in the interpreter, so this loop does
only what routing needs, by slicing: the first bytes of a frame (octet count,
``<PRI>``, timestamp down to the hour) are looked up in a cache that gives the
frame's length and its hour, and one ``startswith`` checks that the
timestamp ends with the same zone at the same place. The first frame with a
new start goes through the full reader (relay.classify), which decides its
hour and flags and whether later ones may be answered from the cache. Later
frames are not re-validated beyond that: a stamp whose minutes or seconds are
invalid but whose start and end look like a known one is routed like it (the
bytes are kept either way; ``syslog-archive cat --json`` parses fully). The
result is runs: consecutive messages with the same hour and flags, referenced
as offsets into the chunk, never copied.

A run is ``(start, end, count, hf, framing)``: ``data[start:end]`` holds
``count`` frames exactly as received (FRAMING_OCTET or FRAMING_LF, as in
staging format 2) and ``hf`` is the ``(hour, flags)`` they share.
"""

from __future__ import annotations

from datetime import tzinfo
from typing import Any

from relay.classify import routing_fields
from relay.record import FRAMING_LF, FRAMING_OCTET

HourFlags = tuple[int, bytes]
Run = tuple[int, int, int, HourFlags, bytes]

MAX_LENGTH_DIGITS = 10
# Cache keys are the first bytes of a message (LF framing) or of a frame, octet
# count included (octet counting): at least "<PRI>1 YYYY-MM-DDTHH" (RFC 5424)
# or "<PRI>Mmm dd hh:mm" (RFC 3164; minutes, because the configured zone may be
# off by half an hour) must fit, and whatever follows only makes the key more
# specific. One slice and one dict lookup answer a message; no search.
LINE_KEY = 21
FRAME_KEY = 25
_CACHE_MAX = 65536
_HOUR = 3600
# Line entry: (check, offset, hf). A frame entry adds the frame's length in
# front: (length, check, offset, hf). The message is answered from the cache
# when the bytes at ``offset`` are ``check``: the RFC 5424 time zone and the
# space ending the timestamp (b"" for RFC 3164: nothing to check).
LineEntry = tuple[bytes, int, "HourFlags"]
FrameEntry = tuple[int, bytes, int, "HourFlags"]


class HourIndex:
    """Hour and flags of messages, by header prefix; valid for one receive hour.

    The caches are emptied when the receive hour changes, because the R flag
    (too far from the receive time) and the year of an RFC 3164 stamp depend
    on it.
    """

    def __init__(self, tz: tzinfo, max_skew: float) -> None:
        self.lines: dict[bytes, LineEntry] = {}
        self._frames: dict[int, dict[bytes, FrameEntry]] = {}  # by max frame size
        self._interned: dict[HourFlags, HourFlags] = {}
        self.configure(tz, max_skew)
        self.now = 0.0
        self.now_hour = 0

    def configure(self, tz: tzinfo, max_skew: float) -> None:
        self._tz = tz
        self._skew_hours = max_skew / _HOUR
        self._clear()

    def _clear(self) -> None:
        self.lines.clear()
        self._frames.clear()
        self._interned.clear()

    def at(self, now: float) -> None:
        """Set the receive time of the chunk about to be scanned."""
        self.now = now
        hour = int(now // _HOUR)
        if hour != self.now_hour:
            self.now_hour = hour
            self._clear()

    def frames(self, maxsize: int) -> dict[bytes, FrameEntry]:
        """The frame cache for one maximum message size (entries were checked against it)."""
        table = self._frames.get(maxsize)
        if table is None:
            table = self._frames[maxsize] = {}
        return table

    def hf(self, hour: int, flags: bytes) -> HourFlags:
        """The shared (hour, flags) object: runs compare them by identity."""
        key = (hour, flags)
        got = self._interned.get(key)
        if got is None:
            got = self._interned[key] = key
        return got

    def classify(self, msg: bytes) -> HourFlags:
        """Hour and flags of one message by the full reader (relay.classify)."""
        ts, _, malformed = routing_fields(msg, self._tz, self.now)
        hour = None if ts is None else int(ts // _HOUR)
        flags = b""
        if hour is None or abs(hour - self.now_hour) > self._skew_hours:
            hour = self.now_hour
            flags = b"R"
        if malformed:
            flags += b"M"
        return self.hf(hour, flags or b"-")

    def line(self, msg: bytes) -> HourFlags:
        """``classify``, remembering the answer for lines that start the same way."""
        hf = self.classify(msg)
        pattern = _pattern(msg, hf)
        if pattern is not None and pattern[0] <= LINE_KEY < len(msg):
            _put(self.lines, msg[:LINE_KEY], (pattern[1], pattern[2], hf))
        return hf

    def message(self, msg: bytes) -> HourFlags:
        """Hour and flags of one unframed message (RELP, UDP, the per-message path)."""
        e = self.lines.get(msg[:LINE_KEY])
        if e is not None and e[1] < len(msg) and msg.startswith(e[0], e[1]):
            return e[2]
        return self.line(msg)

    def frame(self, frame: bytes, skip: int, maxsize: int) -> HourFlags:
        """``classify`` of ``frame[skip:]``, remembered for frames that start the same way."""
        hf = self.classify(frame[skip:])
        pattern = _pattern(frame[skip:], hf)
        if pattern is not None and skip + pattern[0] <= FRAME_KEY < len(frame):
            entry = (len(frame), pattern[1], skip + pattern[2], hf)
            _put(self.frames(maxsize), frame[:FRAME_KEY], entry)
        return hf


def _put(cache: dict[bytes, Any], key: bytes, entry: Any) -> None:
    if len(cache) >= _CACHE_MAX:
        cache.clear()
    cache[key] = entry


def _pattern(msg: bytes, hf: HourFlags) -> tuple[int, bytes, int] | None:
    """(bytes the key must cover, check, offset) under which later messages that
    start like ``msg`` share its answer; None when they may not."""
    if b"M" in hf[1]:
        return None
    gt = msg.find(b">", 1, 5)
    if gt < 0 or msg[:1] != b"<":
        return None
    if msg[gt + 1 : gt + 3] == b"1 ":
        if not msg[gt + 3 : gt + 4].isdigit():
            return None  # a NILVALUE stamp: nothing to slice
        se = msg.find(b" ", gt + 3)
        stamp = msg[gt + 3 : se]
        zone = b"Z" if stamp[-1:] == b"Z" else stamp[-6:]
        # An offset like +05:30 moves the hour boundary inside the hour: no cache.
        if se < 0 or stamp[16:17] != b":" or not (zone == b"Z" or zone[-2:] == b"00"):
            return None
        return gt + 16, zone + b" ", se - len(zone)
    if msg[gt + 13 : gt + 14] == b":" and msg[gt + 16 : gt + 17] == b" ":
        return gt + 13, b"", 0  # the traditional "Mmm dd hh:mm:ss " shape
    return None


def octet_runs(data: bytes, i: int, maxsize: int, index: HourIndex, out: list[Any]) -> int:
    """Runs of whole octet-counted frames from ``data[i]``; returns where it stopped.

    Stops before the first frame that is partial, oversize, empty or not a
    well-formed count (anything not starting with a digit included): the
    caller's state machine takes it from there.
    """
    n = len(data)
    startswith = data.startswith
    cache = index.frames(maxsize)
    get = cache.get
    start = i
    cur: HourFlags | None = None
    count = 0
    while i < n:
        e = get(data[i : i + FRAME_KEY])
        if e is not None:
            length, check, off, hf = e
            end = i + length
            if end > n:
                break
            if not startswith(check, i + off):
                # Same start, other timestamp length or zone: ask the full reader.
                skip = data.find(b" ", i, i + MAX_LENGTH_DIGITS + 1) + 1 - i
                hf = index.frame(data[i:end], skip, maxsize)
        else:
            sp = data.find(b" ", i, i + MAX_LENGTH_DIGITS + 1)
            if sp <= i:
                break
            digits = data[i:sp]
            if not digits.isdigit():
                break
            size = int(digits)
            end = sp + 1 + size
            if end > n or size > maxsize or size == 0:
                break
            hf = index.frame(data[i:end], sp + 1 - i, maxsize)
        # Run bookkeeping, inlined here and in line_runs: a call per message costs more.
        if hf is not cur:
            if count:
                out.append((start, i, count, cur, FRAMING_OCTET))
            start = i
            cur = hf
            count = 0
        count += 1
        i = end
    if count:
        out.append((start, i, count, cur, FRAMING_OCTET))
    return i


def line_runs(
    data: bytes, i: int, maxsize: int, index: HourIndex, auto: bool, out: list[Any]
) -> int:
    """Runs of whole LF-terminated lines from ``data[i]``; returns where it stopped.

    Stops at a partial, empty or oversize line, and (``auto``) before a line
    that starts with a digit, which auto framing reads as an octet count.
    """
    n = len(data)
    find = data.find
    startswith = data.startswith
    get = index.lines.get
    start = i
    cur: HourFlags | None = None
    count = 0
    while True:
        j = find(b"\n", i)
        if j <= i or j - i > maxsize:
            break
        e = get(data[i : i + LINE_KEY])
        if e is not None and i + e[1] < j and startswith(e[0], i + e[1]):
            hf = e[2]
        else:
            hf = index.line(data[i:j])
        if hf is not cur:
            if count:
                out.append((start, i, count, cur, FRAMING_LF))
            start = i
            cur = hf
            count = 0
        count += 1
        i = j + 1
        if i == n or (auto and 48 <= data[i] <= 57):
            break
    if count:
        out.append((start, i, count, cur, FRAMING_LF))
    return i
