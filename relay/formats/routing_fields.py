"""Routing fields of one message: timestamp and hostname, nothing more.

The full reader behind the hot path's cache (relay.framing.hour_runs asks it once per new
frame start) and the readers of staging (HOST). It only slices: the PRI is
looked up in a set, the timestamp's date-to-minute part is converted once and
cached, and the seconds are added. Anything unusual falls back to the full parsers; any
input at all gives an answer and never an exception, because the relay keeps
every message, parsed or not.
"""

from __future__ import annotations

from datetime import UTC, tzinfo

from relay.formats import rfc3164, rfc5424

# Every PRI text "<0>".."<191>" the parsers accept, with leading zeros.
_PRI = frozenset(
    b"%0*d" % (width, v) for width in (1, 2, 3) for v in range(192) if len(b"%d" % v) <= width
)
_CACHE_MAX = 4096
# "YYYY-MM-DDTHH:MM" + offset -> epoch of that minute (None: not a valid time).
_minutes_3339: dict[bytes, float | None] = {}
# ("Mmm dd hh:mm", tz, hour of now) -> epoch of that minute in tz (None: invalid).
_minutes_3164: dict[tuple[bytes, tzinfo, int], float | None] = {}

Result = tuple[float | None, bytes | None, bool]
_MALFORMED: Result = (None, None, True)


def message_host(msg: bytes) -> bytes | None:
    """HOSTNAME of an RFC 5424 or RFC 3164 message (None: none or unparseable).

    Readers of format 2 staging use it: the relay stores no host per message.
    """
    header = rfc5424.header_fields(msg, 2)
    if header is not None:
        sp, hsp = header[1]
        if hsp > sp + 1:
            host = msg[sp + 1 : hsp]
            return None if host == b"-" or len(host) > rfc5424.MAX_HOSTNAME else host
    # The hostname does not depend on the zone or the year: any will do.
    return routing_fields(msg, UTC, 0.0)[1]


def routing_fields(msg: bytes, tz: tzinfo, now: float) -> Result:
    """(timestamp epoch or None, hostname or None, malformed) of an RFC 5424/3164 message.

    ``malformed`` means the header is not recognisably RFC 5424 or RFC 3164
    (no PRI, no timestamp, or a timestamp that does not parse).
    """
    gt = rfc5424.pri_end(msg)
    if gt < 0 or msg[1:gt] not in _PRI:
        return _MALFORMED
    ts = rfc5424.version_1_at(msg, gt)
    if ts >= 0:
        return _fields_5424(msg, ts)
    return _fields_3164(msg, gt + 1, tz, now)


def _fields_5424(msg: bytes, i: int) -> Result:
    sp, hsp = rfc5424.field_ends(msg, i, 2)
    if sp < 0:
        return _MALFORMED
    stamp = msg[i:sp]
    host: bytes | None = msg[sp + 1 : hsp] if hsp > sp + 1 else None
    malformed = host is None or len(host) > rfc5424.MAX_HOSTNAME
    if host == b"-" or malformed:
        host = None
    if stamp == b"-":
        return None, host, malformed
    epoch = _rfc3339(stamp)
    return epoch, host, malformed or epoch is None


def _rfc3339(stamp: bytes) -> float | None:
    """Epoch of an RFC 3339 stamp (RFC 5424 profile), None if invalid."""
    if stamp[-1:] == b"Z":
        zone = b"Z"
    else:
        zone = stamp[-6:]
    end = len(stamp) - len(zone)
    key = stamp[:16] + zone
    try:
        base = _minutes_3339[key]
    except KeyError:
        text = stamp[:16] + b":00" + zone
        try:
            base = rfc5424.parse_rfc3339(text, 0, len(text), strict=True)[0]
        except rfc5424.ParseError:
            base = None
        if len(_minutes_3339) >= _CACHE_MAX:
            _minutes_3339.clear()
        _minutes_3339[key] = base
    if base is None or stamp[16:17] != b":":
        return None
    sec = stamp[17:19]
    frac = stamp[19:end]
    if not sec.isdigit() or sec > b"60":
        return None
    if frac:
        if len(frac) > 7 or frac[:1] != b"." or not frac[1:].isdigit():
            return None
        return base + min(int(sec), 59) + float(frac)
    return base + min(int(sec), 59)


def _fields_3164(msg: bytes, i: int, tz: tzinfo, now: float) -> Result:
    stamp = msg[i : i + 15]
    if (
        len(stamp) == 15
        and stamp[3:4] == b" "
        and stamp[6:7] == b" "
        and stamp[9:10] == b":"
        and stamp[12:13] == b":"
        and msg[i + 15 : i + 16] in (b" ", b"")
        and stamp[:3] in rfc3164.MONTHS
    ):
        epoch = _traditional(stamp, tz, now)
        if epoch is not None:
            return epoch, _host_3164(msg, i + 16), False
    elif stamp[4:5] == b"-" and stamp[:4].isdigit():
        sp = msg.find(b" ", i)
        end = len(msg) if sp < 0 else sp
        epoch = _rfc3339(msg[i:end])
        if epoch is not None:
            return epoch, _host_3164(msg, end + 1), False
    # Unusual shapes (lax day, fractions, bad values): the full parser decides.
    try:
        m = rfc3164.parse(msg, tz, now)
    except rfc3164.ParseError:
        return _MALFORMED
    host = m.hostname.encode("ascii", "replace") if m.hostname is not None else None
    return m.epoch, host, m.epoch is None


def _traditional(stamp: bytes, tz: tzinfo, now: float) -> float | None:
    sec = stamp[13:15]
    if not (sec.isdigit() and stamp[7:9].isdigit() and stamp[10:12].isdigit()) or sec > b"60":
        return None
    if not (stamp[4:6].isdigit() or (stamp[4:5] == b" " and stamp[5:6].isdigit())):
        return None
    key = (stamp[:12], tz, int(now // 3600))
    try:
        base = _minutes_3164[key]
    except KeyError:
        head = stamp[:12]
        hour = now // 3600 * 3600
        try:
            # The year is the full parser's choice at ``now``. One answer serves every
            # second of the minute all hour long only if the minute's last second read
            # at the hour's start and its first read at the hour's end agree on it.
            base = rfc3164.traditional_epoch(head + b":59", tz, hour) - 59
            if base != rfc3164.traditional_epoch(head + b":00", tz, hour + 3599.999):
                return rfc3164.traditional_epoch(stamp, tz, now)  # within an hour of the slack
        except rfc3164.ParseError:
            base = None
        if len(_minutes_3164) >= _CACHE_MAX:
            _minutes_3164.clear()
        _minutes_3164[key] = base
    if base is None:
        return None
    return base + min(int(sec), 59)


def _host_3164(msg: bytes, i: int) -> bytes | None:
    """HOSTNAME after the timestamp, unless that word is already the tag."""
    sp = msg.find(b" ", i)
    word = msg[i:] if sp < 0 else msg[i:sp]
    if not word or word.endswith(b":") or b"[" in word:
        return None
    return word
