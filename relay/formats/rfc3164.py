"""RFC 3164 (BSD syslog) parser for what rsyslog and friends really send.

Two timestamp shapes: the traditional ``Mmm dd hh:mm:ss`` (no year, no zone;
read in the configured zone, year inferred from the receive time) and the
RFC 3339 stamp of rsyslog's ``RSYSLOG_ForwardFormat``. The hostname is
optional: a word that looks like a tag (``name:`` or ``name[pid]``) is taken
as the tag, as syslog-ng's ``syslogformat`` does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, tzinfo

from relay.formats import rfc5424

MONTHS = {
    name: k + 1
    for k, name in enumerate(
        (
            b"Jan",
            b"Feb",
            b"Mar",
            b"Apr",
            b"May",
            b"Jun",
            b"Jul",
            b"Aug",
            b"Sep",
            b"Oct",
            b"Nov",
            b"Dec",
        )
    )
}

# How far ahead of the receive time a traditional (year-less) stamp may be.
FUTURE_SLACK = 7 * 86400.0

# TAG, optional [PID], optional ':' — bounded so garbage cannot make it scan far.
_TAG = re.compile(rb"([^:\[\] ]{1,128})(?:\[([^\]\[ ]{0,128})\])?(:)?")
_TIME = re.compile(rb"([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.[0-9]{1,9})?")


class ParseError(ValueError):
    """The message does not follow RFC 3164 at ``offset`` in ``field``."""

    def __init__(self, field: str, offset: int, reason: str) -> None:
        super().__init__(f"{field} at offset {offset}: {reason}")
        self.field = field
        self.offset = offset
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Message3164:
    pri: int
    facility: int
    severity: int
    timestamp: str | None  # raw text as sent
    epoch: float | None
    hostname: str | None
    tag: str | None
    procid: str | None
    content: bytes  # after "TAG: " (one SP after the colon is dropped)


def parse(msg: bytes, tz: tzinfo, now: float) -> Message3164:
    try:
        pri, i = rfc5424.parse_pri(msg)
    except rfc5424.ParseError as e:
        raise ParseError(e.field, e.offset, e.reason) from None
    timestamp: str | None = None
    epoch: float | None = None
    end = _traditional_end(msg, i)
    if end is None and _looks_rfc3339(msg, i):
        try:
            epoch, end = rfc5424.parse_rfc3339(msg, i, len(msg), strict=False)
        except rfc5424.ParseError as e:
            raise ParseError(e.field, e.offset, e.reason) from None
    elif end is not None:
        epoch = traditional_epoch(msg[i:end], tz, now, i)
    if end is not None:
        timestamp = msg[i:end].decode("ascii")
    hostname, tag, procid, i = _names(msg, i, end)
    return Message3164(
        pri=pri,
        facility=pri >> 3,
        severity=pri & 7,
        timestamp=timestamp,
        epoch=epoch,
        hostname=hostname,
        tag=tag,
        procid=procid,
        content=msg[i:],
    )


def names(msg: bytes) -> tuple[str | None, str | None]:
    """(HOSTNAME, TAG) as ``parse`` reads them, without computing the timestamp.

    Raises ParseError where ``parse`` would for the timestamp's shape (not for
    its values: a day or hour out of range is not noticed here).
    """
    try:
        _, i = rfc5424.parse_pri(msg)
    except rfc5424.ParseError as e:
        raise ParseError(e.field, e.offset, e.reason) from None
    end = _traditional_end(msg, i)
    if end is None and _looks_rfc3339(msg, i):
        try:
            _, end = rfc5424.parse_rfc3339(msg, i, len(msg), strict=False)
        except rfc5424.ParseError as e:
            raise ParseError(e.field, e.offset, e.reason) from None
    hostname, tag, _, _ = _names(msg, i, end)
    return hostname, tag


def _names(msg: bytes, i: int, end: int | None) -> tuple[str | None, str | None, str | None, int]:
    """(HOSTNAME, TAG, PID, where the content starts) after a timestamp ending at ``end``."""
    hostname: str | None = None
    if end is not None:
        i = end
        if i < len(msg):
            if msg[i] != 0x20:
                raise ParseError("timestamp", i, "expected SP after the timestamp")
            i += 1
        # HOSTNAME unless the next word is already the tag.
        sp = msg.find(b" ", i)
        word = msg[i:] if sp < 0 else msg[i:sp]
        if word and not word.endswith(b":") and b"[" not in word:
            hostname = word.decode("ascii", "replace")
            i = len(msg) if sp < 0 else sp + 1
    tag: str | None = None
    procid: str | None = None
    m = _TAG.match(msg, i)
    if m is not None:
        stop = m.end()
        after = msg[stop : stop + 1]
        if m.group(3) or after in (b" ", b""):
            tag = m.group(1).decode("ascii", "replace")
            if m.group(2) is not None:
                procid = m.group(2).decode("ascii", "replace")
            i = stop + 1 if after == b" " else stop
    return hostname, tag, procid, i


def _looks_rfc3339(msg: bytes, i: int) -> bool:
    return msg[i : i + 4].isdigit() and msg[i + 4 : i + 5] == b"-"


def _traditional_end(msg: bytes, i: int) -> int | None:
    """End offset of ``Mmm dd hh:mm:ss`` at i, None if no month name is there."""
    if msg[i : i + 3] not in MONTHS or msg[i + 3 : i + 4] != b" ":
        return None
    d = msg[i + 4 : i + 7]
    # Day: " 6", "06", or a lax "6".
    if len(d) == 3 and d[2] == 0x20 and (d[0] == 0x20 or d[0:2].isdigit()) and d[1:2].isdigit():
        t = i + 7
    elif len(d) >= 2 and d[0:1].isdigit() and d[1] == 0x20:
        t = i + 6
    else:
        raise ParseError("timestamp", i + 4, f"bad day {d!r}")
    m = _TIME.match(msg, t)
    if m is None:
        raise ParseError("timestamp", t, "expected hh:mm:ss")
    return m.end()


def traditional_epoch(stamp: bytes, tz: tzinfo, now: float, offset: int = 0) -> float:
    """Epoch of a ``Mmm dd hh:mm:ss[.frac]`` stamp read in ``tz``.

    The year is the latest (of now's year and its neighbours) that does not
    put the stamp more than ``FUTURE_SLACK`` ahead of ``now``: a December
    stamp received early in January is last year's, a stamp a little ahead of
    the clock (skew, a wrong zone) stays in the future, and an old stamp
    replayed from a sender's queue is placed in the past year it came from.
    """
    month = MONTHS[stamp[:3]]
    day_end = stamp.index(b" ", 5) if stamp[4] != 0x20 else 6
    day = int(stamp[4:day_end])
    hh = int(stamp[day_end + 1 : day_end + 3])
    mm = int(stamp[day_end + 4 : day_end + 6])
    ss = int(stamp[day_end + 7 : day_end + 9])
    frac = stamp[day_end + 9 :]
    if hh > 23 or mm > 59 or ss > 60:
        raise ParseError("timestamp", offset, f"time {hh:02d}:{mm:02d}:{ss:02d} out of range")
    if not 1 <= day <= 31:
        raise ParseError("timestamp", offset + 4, f"day {day} out of range")
    year = datetime.fromtimestamp(now, tz).year
    best: float | None = None
    for y in range(year + 1, year - 5, -1):
        if day > rfc5424.days_in_month(y, month):
            continue  # Feb 29: only a leap year will do
        t = datetime(y, month, day, hh, mm, min(ss, 59), tzinfo=tz).timestamp()
        if t <= now + FUTURE_SLACK:
            best = t
            break
    if best is None:
        raise ParseError("timestamp", offset + 4, f"day {day} does not exist in month {month}")
    return best + (float(frac) if frac else 0.0)
