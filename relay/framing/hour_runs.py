"""The fused fast path: frame a received chunk and group its messages into runs of one hour.

Sans-IO. The relay's cost is per message in the interpreter, so this loop does
only what routing needs, by slicing. A frame's octet count is read through a
small table of the counts seen (one dict lookup, no int()). The first
``HEAD_KEY`` bytes of a message (``<PRI>1 YYYY-MM-DDTHH``: PRI, version and
the sender's local date and hour; ``<PRI>Mmm dd hh:mm:ss`` for RFC 3164) are
looked up in a cache of *variants*: the forms in which senders wrote that
start. A variant holds the time zone and the space that end the stamp and
where they stand (so fractions of any length and every zone are told apart
by one compare), and the hour and flags its messages get. For a zone
that is not a whole hour (+05:30, +05:45, -03:30, ...) the sender's minutes
decide the UTC hour, so such a variant also holds where the minutes are, the
minute at which the UTC hour changes, and the answer for each side.

Nothing in the key depends on the message's size, its seconds or fraction,
so the cache stays small and warm on a fleet's traffic: one entry per PRI
and sender hour, a few variants each. The first message of each variant goes
through the full reader (relay.formats.routing_fields), which decides its hour and flags
and whether later ones may be answered from the cache. Later messages are
not re-validated beyond the key and the zone: a stamp whose minutes or
seconds are invalid but whose start and end look like a known one is routed
like it (the bytes are kept either way; ``syslog-archive cat --json`` parses
fully). The result is runs: consecutive messages with the same hour and
flags, referenced as offsets into the chunk, never copied.

Per message the octet loop makes two slices and two lookups (the count, the
key) and one compare per variant tried, and nothing else: no bound checks (a
frame is read before it is known to be whole and taken back if it was not; a
miss raises on None), no call. This is what the relay's throughput is made of.

A run is ``(start, end, count, hf, framing)``: ``data[start:end]`` holds
``count`` frames exactly as received (FRAMING_OCTET or FRAMING_LF, as in
staging format 2) and ``hf`` is the ``(hour, flags)`` they share.
"""

from __future__ import annotations

from datetime import tzinfo
from typing import Any

from relay.formats import rfc5424
from relay.formats.routing_fields import routing_fields
from relay.formats.staging_block import FRAMING_LF, FRAMING_OCTET

HourFlags = tuple[int, bytes]
Run = tuple[int, int, int, HourFlags, bytes]

MAX_LENGTH_DIGITS = 10
# At least "<PRI>1 YYYY-MM-DDTHH" (RFC 5424) or "<PRI>Mmm dd hh:mm" (RFC 3164;
# minutes, because the configured zone may be off by half an hour) must fit;
# whatever follows only makes the key more specific.
HEAD_KEY = 21
# An octet count of up to four digits and its space, or a shorter one and the
# first bytes of the message ("250 <", "1234 ", "99 <1"): ~10,000 keys at most.
START_KEY = 5
_CACHE_MAX = 65536
_VARIANTS_MAX = 8
_HOUR = 3600
# A variant: (check, at, to, hf, next, split). A message that starts with the key
# is answered when its bytes ``at:to`` are ``check`` (the zone and the space ending
# the stamp; b"" for RFC 3164), else by ``next`` (the key's next variant, None after
# the last). ``split`` is None, or (minute offset, cut, hf_late) for a zone that is
# not a whole hour: there, two minute digits below ``cut`` get ``hf`` and from
# ``cut`` on ``hf_late``. An answer not learnt yet is None. A chain, not a list: the
# scan unpacks the next variant in one step where a loop over a list costs more, and
# one of the first two answers nearly every message (the forms in which a zone's
# senders write one hour are few).
Split = tuple[int, bytes, "HourFlags | None"]
Variant = tuple[bytes, int, int, "HourFlags | None", "Variant | None", "Split | None"]
# The octet scan compares ``check`` with a slice that may run past a short frame's
# end, so only frames of at least SHORT bytes take it (the start table holds no
# shorter count), and no check ends past SHORT: a valid stamp ends by byte 41.
SHORT = 48


class HourIndex:
    """Hour and flags of messages, by header prefix; valid for one receive hour.

    The caches are emptied when the receive hour changes, because the R flag
    (too far from the receive time) and the year of an RFC 3164 stamp depend
    on it.
    """

    def __init__(self, tz: tzinfo, max_skew: float) -> None:
        # True when nothing needs the hour or flags (no staging, no selector: an edge
        # that only forwards): the scan then only frames, one run per chunk.
        self.framing_only = False
        self.heads: dict[bytes, Variant] = {}
        self._lengths: dict[int, dict[bytes, int]] = {}  # by max frame size
        self._starts: dict[int, dict[bytes, tuple[int, int]]] = {}  # by max frame size
        self._interned: dict[HourFlags, HourFlags] = {}
        self.configure(tz, max_skew)
        self.now = 0.0
        self.now_hour = 0

    def configure(self, tz: tzinfo, max_skew: float) -> None:
        self._tz = tz
        self._skew_hours = max_skew / _HOUR
        self._clear()

    def _clear(self) -> None:
        self.heads.clear()
        self._interned.clear()

    def at(self, now: float) -> None:
        """Set the receive time of the chunk about to be scanned."""
        self.now = now
        hour = int(now // _HOUR)
        if hour != self.now_hour:
            self.now_hour = hour
            self._clear()

    def lengths(self, maxsize: int) -> dict[bytes, int]:
        """Octet counts seen (their digits -> value), each from 1 to ``maxsize``."""
        table = self._lengths.get(maxsize)
        if table is None:
            table = self._lengths[maxsize] = {}
        return table

    def length(self, digits: bytes, maxsize: int) -> int | None:
        """The value of an octet count not in ``lengths`` yet (None: not an ordinary one)."""
        if not digits.isdigit() or digits[:1] == b"0":
            return None  # leading zeros and 0 itself: the state machine reports them
        value = int(digits)
        if value > maxsize:
            return None
        table = self.lengths(maxsize)
        if len(table) >= _CACHE_MAX:
            table.clear()
        table[digits] = value
        return value

    def starts(self, maxsize: int) -> dict[bytes, tuple[int, int]]:
        """Frame starts seen: the first ``START_KEY`` bytes of an octet-counted frame
        whose count ends within them -> (payload offset, frame length).

        One slice and one lookup per frame instead of a find, a slice and a lookup:
        with bodies of every size, the count alone takes a sixth of the scan.
        """
        table = self._starts.get(maxsize)
        if table is None:
            table = self._starts[maxsize] = {}
        return table

    def start(self, data: bytes, i: int, maxsize: int) -> tuple[int, int] | None:
        """(payload offset, frame length) of the octet-counted frame at ``data[i]``,
        learnt into ``starts`` if the count fits START_KEY and the frame is not
        SHORT; None when no ordinary count starts there."""
        sp = data.find(b" ", i, i + MAX_LENGTH_DIGITS + 1)
        if sp <= i:
            return None
        size = self.lengths(maxsize).get(data[i:sp]) or self.length(data[i:sp], maxsize)
        if size is None:
            return None
        got = (sp + 1 - i, sp + 1 - i + size)
        if sp < i + START_KEY and i + START_KEY <= len(data) and size >= SHORT:
            table = self.starts(maxsize)
            if len(table) >= _CACHE_MAX:
                table.clear()
            table[data[i : i + START_KEY]] = got
        return got

    def hf(self, hour: int, flags: bytes) -> HourFlags:
        """The shared (hour, flags) object: runs compare them by identity."""
        key = (hour, flags)
        got = self._interned.get(key)
        if got is None:
            got = self._interned[key] = key
        return got

    def classify(self, msg: bytes) -> HourFlags:
        """Hour and flags of one message by the full reader (relay.formats.routing_fields)."""
        ts, _, malformed = routing_fields(msg, self._tz, self.now)
        hour = None if ts is None else int(ts // _HOUR)
        flags = b""
        if hour is None or abs(hour - self.now_hour) > self._skew_hours:
            hour = self.now_hour
            flags = b"R"
        if malformed:
            flags += b"M"
        return self.hf(hour, flags or b"-")

    def learn(self, msg: bytes) -> HourFlags:
        """``classify``, remembering the answer for messages that start and end their
        stamp the same way."""
        hf = self.classify(msg)
        pattern = _pattern(msg, hf)
        key = msg[:HEAD_KEY]
        # No key holds an LF: a line shorter than the key, sliced with the LF and the
        # next line, never matches one.
        if pattern is None or len(msg) <= HEAD_KEY or b"\n" in key:
            return hf
        check, at, moff, cut = pattern
        if at + len(check) > SHORT:
            return hf
        late = moff and msg[moff : moff + 2] >= cut
        heads = self.heads
        known = _unchain(heads.get(key))
        for k, (c, o, early, split) in enumerate(known):
            if c == check and o == at and (split[0] if split else 0) == moff:
                if split is None:
                    known[k] = (check, at, hf, None)
                elif late:
                    known[k] = (check, at, early, (moff, cut, hf))
                else:
                    known[k] = (check, at, hf, split)
                break
        else:
            if len(heads) >= _CACHE_MAX:
                heads.clear()
                known = []
            if not moff:
                variant: _Flat = (check, at, hf, None)
            else:
                variant = (check, at, None if late else hf, (moff, cut, hf if late else None))
            known = [*known[: _VARIANTS_MAX - 1], variant]
        heads[key] = _chain(known)
        return hf

    def message(self, msg: bytes) -> HourFlags:
        """Hour and flags of one unframed message (RELP, UDP, the per-message path)."""
        v = self.heads.get(msg[:HEAD_KEY])
        while v is not None:
            check, at, to, hf, v, split = v
            if msg[at:to] == check:
                if split is not None:
                    moff, cut, late = split
                    if msg[moff : moff + 2] >= cut:
                        hf = late
                if hf is not None:
                    return hf
                break
        return self.learn(msg)


# A variant without its link and end: what ``learn`` edits.
_Flat = tuple[bytes, int, "HourFlags | None", "Split | None"]


def _unchain(v: Variant | None) -> list[_Flat]:
    out: list[_Flat] = []
    while v is not None:
        check, at, _, hf, v, split = v
        out.append((check, at, hf, split))
    return out


def _chain(variants: list[_Flat]) -> Variant:
    v: Variant | None = None
    for check, at, hf, split in reversed(variants):
        v = (check, at, at + len(check), hf, v, split)
    assert v is not None
    return v


def _pattern(msg: bytes, hf: HourFlags) -> tuple[bytes, int, int, bytes] | None:
    """(check, offset, minute offset, cut) under which later messages that start
    like ``msg`` share its answer (see Variant); None when they may not."""
    if b"M" in hf[1]:
        return None
    gt = rfc5424.pri_end(msg)
    if gt < 0:
        return None
    ts = rfc5424.version_1_at(msg, gt)
    if ts >= 0:
        if not msg[ts : ts + 1].isdigit() or ts + 13 > HEAD_KEY:
            return None  # a NILVALUE stamp: nothing to slice
        (se,) = rfc5424.field_ends(msg, ts, 1)
        stamp = msg[ts:se]
        if se < 0 or stamp[16:17] != b":":
            return None
        zone = b"Z" if stamp[-1:] == b"Z" else stamp[-6:]
        if zone == b"Z" or zone[-2:] == b"00":
            return zone + b" ", se - len(zone), 0, b""
        if zone[3:4] != b":" or not (zone[1:3] + zone[4:6]).isdigit():
            return None
        # The UTC hour changes where the local minutes reach the offset's minutes
        # modulo 60: +05:30 at :30, +05:45 at :45, -03:30 at :30, -03:15 at :45.
        minutes = int(zone[1:3]) * 60 + int(zone[4:6])
        cut = b"%02d" % ((minutes if zone[:1] == b"+" else -minutes) % 60)
        return zone + b" ", se - len(zone), ts + 14, cut
    if msg[gt + 13 : gt + 14] == b":" and msg[gt + 16 : gt + 17] == b" " and gt + 13 <= HEAD_KEY:
        return b"", 0, 0, b""  # the traditional "Mmm dd hh:mm:ss " shape
    return None


def octet_runs(data: bytes, i: int, maxsize: int, index: HourIndex, out: list[Any]) -> int:
    """Runs of whole octet-counted frames from ``data[i]``; returns where it stopped.

    Stops before the first frame that is partial, oversize, empty or not a
    well-formed count (anything not starting with a digit included): the
    caller's state machine takes it from there.
    """
    if index.framing_only:
        return _octet_frames(data, i, maxsize, index, out)
    # Every operation here is paid per message: locals only, and no bound check that
    # a miss can do instead. A frame is read before it is known to be whole; the last
    # one read, if partial, is taken back after the loop.
    n = len(data)
    start_of = index.starts(maxsize).get
    get = index.heads.get
    learn = index.learn
    sk = START_KEY
    hk = HEAD_KEY
    start = i
    cur: HourFlags | None = None
    count = 0
    m = p = 0
    hf: HourFlags | None
    while True:
        try:
            p, q = start_of(data[i : i + sk])  # type: ignore[misc]
        except TypeError:  # None: a new, long or short count, or no ordinary frame
            got = index.start(data, i, maxsize)
            if got is None:
                break
            p, q = got
            m = i + p
            i += q
            if i > n:
                i = m - p
                break
            hf = index.message(data[m:i])  # bounded by the frame, whatever its size
        else:
            m = i + p
            i += q
            try:
                check, at, to, hf, nxt, split = get(data[m : m + hk])  # type: ignore[misc]
                while data[m + at : m + to] != check:
                    check, at, to, hf, nxt, split = nxt  # type: ignore[misc]
            except TypeError:  # None: no variant fits
                if i > n:
                    i = m - p
                    break
                hf = learn(data[m:i])
            else:
                if split is not None:
                    moff, cut, late = split
                    if data[m + moff : m + moff + 2] >= cut:
                        hf = late
                    if hf is None:
                        if i > n:
                            i = m - p
                            break
                        hf = learn(data[m:i])
        # Run bookkeeping, inlined here and in line_runs: a call per message costs more.
        if hf is not cur:
            if count:
                out.append((start, m - p, count, cur, FRAMING_OCTET))
            start = m - p
            cur = hf
            count = 0
        count += 1
    if i > n:  # the last frame counted is partial
        i = m - p
        count -= 1
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
    if index.framing_only:
        return _line_frames(data, i, maxsize, index, auto, out)
    find = data.find
    get = index.heads.get
    learn = index.learn
    hk = HEAD_KEY
    room = maxsize + 1  # a line and its LF
    start = i
    cur: HourFlags | None = None
    count = 0
    hf: HourFlags | None
    while True:
        j = find(b"\n", i, i + room)
        if j <= i:  # partial, oversize or empty
            break
        try:
            check, at, to, hf, nxt, split = get(data[i : i + hk])  # type: ignore[misc]
            # A check never holds an LF: one that runs past the line fails.
            while data[i + at : i + to] != check:
                check, at, to, hf, nxt, split = nxt  # type: ignore[misc]
        except TypeError:  # None: no variant fits (no key starts with a digit)
            if auto and 48 <= data[i] <= 57:
                break
            hf = learn(data[i:j])
        else:
            if split is not None:
                moff, cut, late = split
                if data[i + moff : i + moff + 2] >= cut:
                    hf = late
                if hf is None:
                    hf = learn(data[i:j])
        if hf is not cur:
            if count:
                out.append((start, i, count, cur, FRAMING_LF))
            start = i
            cur = hf
            count = 0
        count += 1
        i = j + 1
    if count:
        out.append((start, i, count, cur, FRAMING_LF))
    return i


def _octet_frames(data: bytes, i: int, maxsize: int, index: HourIndex, out: list[Any]) -> int:
    """``octet_runs`` when only framing is needed: one run, the receive hour, no flags."""
    n = len(data)
    start_of = index.starts(maxsize).get
    start = i
    count = 0
    while i < n:
        fs = start_of(data[i : i + START_KEY]) or index.start(data, i, maxsize)
        if fs is None:
            break
        end = i + fs[1]
        if end > n:
            break
        count += 1
        i = end
    if count:
        out.append((start, i, count, index.hf(index.now_hour, b"-"), FRAMING_OCTET))
    return i


def _line_frames(
    data: bytes, i: int, maxsize: int, index: HourIndex, auto: bool, out: list[Any]
) -> int:
    """``line_runs`` when only framing is needed: one run, the receive hour, no flags."""
    n = len(data)
    find = data.find
    start = i
    count = 0
    while True:
        j = find(b"\n", i)
        if j <= i or j - i > maxsize:
            break
        count += 1
        i = j + 1
        if i == n or (auto and 48 <= data[i] <= 57):
            break
    if count:
        out.append((start, i, count, index.hf(index.now_hour, b"-"), FRAMING_LF))
    return i
