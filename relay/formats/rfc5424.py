"""RFC 5424 message parser and serializer.

A cursor walks the bytes once, field by field, as go-syslog's rfc5424 machine
does; each failure raises ``ParseError`` naming the field and the byte offset.
``parse_partial`` keeps the fields read before the failure (go-syslog's
best-effort mode) for ``syslog-archive cat --json``. The timestamp reader is
shared with the RFC 3164 parser, which sees RFC 3339 stamps from rsyslog's
``RSYSLOG_ForwardFormat``.
"""

from __future__ import annotations

from dataclasses import dataclass

NILVALUE = b"-"
BOM = b"\xef\xbb\xbf"
MAX_PRI = 191

# Field length limits from the ABNF in RFC 5424 section 6.
MAX_HOSTNAME = 255
MAX_APP_NAME = 48
MAX_PROCID = 128
MAX_MSGID = 32
MAX_SD_NAME = 32


class ParseError(ValueError):
    """The message does not follow the grammar at ``offset`` in ``field``."""

    def __init__(self, field: str, offset: int, reason: str) -> None:
        super().__init__(f"{field} at offset {offset}: {reason}")
        self.field = field
        self.offset = offset
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SDElement:
    id: str
    params: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Message5424:
    pri: int
    facility: int
    severity: int
    version: int
    timestamp: str | None  # raw text as sent; None for NILVALUE
    epoch: float | None
    hostname: str | None
    app_name: str | None
    procid: str | None
    msgid: str | None
    structured_data: tuple[SDElement, ...]
    msg: bytes  # without the BOM
    bom: bool


def parse(msg: bytes) -> Message5424:
    fields, error = parse_partial(msg)
    if error is not None:
        raise error
    return Message5424(**fields)  # type: ignore[arg-type]


def parse_partial(msg: bytes) -> tuple[dict[str, object], ParseError | None]:
    """Fields in order up to the first error, and that error (or None)."""
    out: dict[str, object] = {}
    try:
        _parse_into(msg, out)
    except ParseError as e:
        return out, e
    return out, None


def parse_pri(msg: bytes) -> tuple[int, int]:
    """``<PRIVAL>`` at the start of ``msg``: (value, offset after '>')."""
    if not msg.startswith(b"<"):
        raise ParseError("pri", 0, "message does not start with '<'")
    end = msg.find(b">", 1, 5)
    if end < 0:
        raise ParseError("pri", 0, "no '>' within 3 digits after '<'")
    digits = msg[1:end]
    if not digits or not digits.isdigit():
        raise ParseError("pri", 1, f"PRI {_show(digits)} is not 1 to 3 digits")
    value = int(digits)
    if value > MAX_PRI:
        raise ParseError("pri", 1, f"PRI {value} is above {MAX_PRI}")
    return value, end + 1


def _parse_into(msg: bytes, out: dict[str, object]) -> None:
    pri, i = parse_pri(msg)
    out["pri"] = pri
    out["facility"] = pri >> 3
    out["severity"] = pri & 7

    end = _token_end(msg, i, "version")
    digits = msg[i:end]
    if not (1 <= len(digits) <= 3 and digits.isdigit() and digits[0] != 0x30):
        raise ParseError("version", i, f"VERSION {_show(digits)} is not 1 to 3 digits")
    out["version"] = int(digits)
    i = end + 1

    end = _token_end(msg, i, "timestamp")
    if msg[i:end] == NILVALUE:
        out["timestamp"] = None
        out["epoch"] = None
    else:
        epoch, stop = parse_rfc3339(msg, i, end, strict=True)
        if stop != end:
            raise ParseError("timestamp", stop, "unexpected characters after the time offset")
        out["timestamp"] = msg[i:end].decode("ascii")
        out["epoch"] = epoch
    i = end + 1

    for name, limit in (
        ("hostname", MAX_HOSTNAME),
        ("app_name", MAX_APP_NAME),
        ("procid", MAX_PROCID),
        ("msgid", MAX_MSGID),
    ):
        end = _token_end(msg, i, name)
        out[name] = _header_field(msg, i, end, name, limit)
        i = end + 1

    if i >= len(msg):
        raise ParseError("structured_data", i, "missing (use '-' for none)")
    if msg[i] == 0x2D:  # '-'
        sd: tuple[SDElement, ...] = ()
        i += 1
    elif msg[i] == 0x5B:  # '['
        sd, i = _parse_sd(msg, i)
    else:
        raise ParseError("structured_data", i, "must be '-' or start with '['")
    out["structured_data"] = sd

    if i == len(msg):
        body = b""
    elif msg[i] == 0x20:
        body = msg[i + 1 :]
    else:
        raise ParseError("structured_data", i, "expected SP before MSG")
    bom = body.startswith(BOM)
    out["msg"] = body[3:] if bom else body
    out["bom"] = bom


def _token_end(msg: bytes, i: int, field: str) -> int:
    end = msg.find(b" ", i)
    if end < 0:
        raise ParseError(field, min(i, len(msg)), "message ends before this field's SP")
    if end == i:
        raise ParseError(field, i, "empty field (extra SP?)")
    return end


def _header_field(msg: bytes, i: int, end: int, field: str, limit: int) -> str | None:
    raw = msg[i:end]
    if raw == NILVALUE:
        return None
    if end - i > limit:
        raise ParseError(field, i, f"{end - i} characters (max {limit})")
    if not _printusascii(raw):
        raise ParseError(field, i, "not printable US-ASCII")
    return raw.decode("ascii")


def _printusascii(raw: bytes) -> bool:
    # PRINTUSASCII is %d33-126; isascii + isprintable on str rules out controls and SP.
    return raw.isascii() and " " not in (s := raw.decode("ascii")) and s.isprintable()


def _sd_name(msg: bytes, i: int, stops: bytes, field: str) -> tuple[str, int]:
    j = i
    n = len(msg)
    limit = min(n, i + MAX_SD_NAME + 1)  # never scan garbage past the longest name
    while j < limit and msg[j] not in stops:
        j += 1
    raw = msg[i:j]
    if not raw:
        raise ParseError(field, i, "empty SD-NAME")
    if len(raw) > MAX_SD_NAME:
        raise ParseError(field, i, f"SD-NAME of {len(raw)} characters (max {MAX_SD_NAME})")
    if not _printusascii(raw) or b"=" in raw or b"]" in raw or b'"' in raw:
        raise ParseError(field, i, f"SD-NAME {_show(raw)} has a forbidden character")
    if j >= n:
        raise ParseError("structured_data", j, "message ends inside an SD-ELEMENT")
    return raw.decode("ascii"), j


def _parse_sd(msg: bytes, i: int) -> tuple[tuple[SDElement, ...], int]:
    elements: list[SDElement] = []
    n = len(msg)
    while i < n and msg[i] == 0x5B:  # '['
        sd_id, i = _sd_name(msg, i + 1, b' ]="', "sd_id")
        params: list[tuple[str, str]] = []
        while msg[i] == 0x20:
            name, i = _sd_name(msg, i + 1, b' ]="', "sd_param")
            if msg[i] != 0x3D or i + 1 >= n or msg[i + 1] != 0x22:
                raise ParseError("sd_param", i, "expected '=\"' after PARAM-NAME")
            value, i = _param_value(msg, i + 2)
            params.append((name, value))
            if i >= n:
                raise ParseError("structured_data", i, "message ends inside an SD-ELEMENT")
        if msg[i] != 0x5D:  # ']'
            raise ParseError("structured_data", i, "expected SP or ']'")
        elements.append(SDElement(sd_id, tuple(params)))
        i += 1
    return tuple(elements), i


def _param_value(msg: bytes, i: int) -> tuple[str, int]:
    """PARAM-VALUE starting after the opening quote; returns (value, offset after quote)."""
    start = i
    parts: list[bytes] = []
    while True:
        q = msg.find(b'"', i)
        if q < 0:
            raise ParseError("sd_param", start, "PARAM-VALUE has no closing quote")
        b = msg.find(b"\\", i, q)
        if b < 0:
            parts.append(msg[i:q])
            break
        parts.append(msg[i:b])
        nxt = msg[b + 1 : b + 2]
        if nxt in (b'"', b"\\", b"]"):
            parts.append(nxt)
            i = b + 2
        else:
            # RFC 5424 6.3.3: a backslash before any other character is kept as is.
            parts.append(b"\\")
            i = b + 1
    return b"".join(parts).decode("utf-8", "replace"), q + 1


# -- the header, sliced -----------------------------------------------------------
# For the readers that want a field or two and must answer for any bytes (routing,
# selectors, hosts for the archive, the loop guard): offsets only, nothing validated
# beyond the shape. The PRI is the first ">" at index 1 to 4 after a "<"; RFC 5424 when
# VERSION "1" and its SP follow; then each header field ends at the next SP.

# The same shape as a regular expression, for readers that match many messages at C
# speed (archive/chunk.py, relay/formats/loop_guard.py): everything up to TIMESTAMP.
HEAD_PATTERN = rb"<[^>]{0,3}>1 "


def pri_end(msg: bytes) -> int:
    """Offset of the ">" that closes the PRI, or -1 (no "<" first, no ">" by index 4)."""
    gt = msg.find(b">", 1, 5)
    return gt if gt > 0 and msg[:1] == b"<" else -1


def version_1_at(msg: bytes, gt: int) -> int:
    """Offset of TIMESTAMP when VERSION "1" and its SP follow the ">" at ``gt``; else -1."""
    return gt + 3 if msg[gt + 1 : gt + 3] == b"1 " else -1


def field_ends(msg: bytes, start: int, count: int) -> list[int]:
    """Offsets of the SP after each of ``count`` header fields, the first at ``start``
    (TIMESTAMP, HOSTNAME, APP-NAME, PROCID, MSGID in turn); -1 for the first field
    without one and for every field after it. Fields may be empty."""
    ends = []
    find = msg.find
    at = start
    for _ in range(count):
        if at >= 0:
            at = find(b" ", at)
        ends.append(at)
        if at >= 0:
            at += 1
    return ends


def header_fields(msg: bytes, count: int) -> tuple[int, list[int]] | None:
    """(offset of TIMESTAMP, ``field_ends`` of ``count`` fields) when ``msg`` starts like an
    RFC 5424 header, else None."""
    gt = pri_end(msg)
    ts = version_1_at(msg, gt) if gt > 0 else -1
    return None if ts < 0 else (ts, field_ends(msg, ts, count))


# -- timestamps -----------------------------------------------------------------


def days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm)."""
    y -= m <= 2
    era = y // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def days_in_month(y: int, m: int) -> int:
    if m == 2:
        return 29 if (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)) else 28
    return 30 if m in (4, 6, 9, 11) else 31


def _num(msg: bytes, i: int, width: int, field: str) -> int:
    raw = msg[i : i + width]
    if len(raw) != width or not raw.isdigit():
        raise ParseError(field, i, f"expected {width} digits, got {_show(raw)}")
    return int(raw)


def _expect(msg: bytes, i: int, char: bytes, what: str) -> None:
    if msg[i : i + 1] != char:
        raise ParseError("timestamp", i, f"expected {char.decode()!r} {what}")


def parse_rfc3339(msg: bytes, i: int, end: int, strict: bool) -> tuple[float, int]:
    """RFC 3339 date-time at msg[i:end]: (epoch, offset after it).

    ``strict`` applies RFC 5424's limits (upper-case T and Z, at most 6
    fractional digits); RFC 3164 senders get the plain RFC 3339 reading.
    A leap second 60 is read as 59.
    """
    f = "timestamp"
    year = _num(msg, i, 4, f)
    _expect(msg, i + 4, b"-", "after the year")
    month = _num(msg, i + 5, 2, f)
    _expect(msg, i + 7, b"-", "after the month")
    day = _num(msg, i + 8, 2, f)
    t = msg[i + 10 : i + 11]
    if t != b"T" and (strict or t != b"t"):
        raise ParseError(f, i + 10, "expected 'T' between date and time")
    hour = _num(msg, i + 11, 2, f)
    _expect(msg, i + 13, b":", "after the hour")
    minute = _num(msg, i + 14, 2, f)
    _expect(msg, i + 16, b":", "after the minute")
    second = _num(msg, i + 17, 2, f)
    if not 1 <= month <= 12:
        raise ParseError(f, i + 5, f"month {month} out of range")
    if not 1 <= day <= days_in_month(year, month):
        raise ParseError(f, i + 8, f"day {day} does not exist in {year:04d}-{month:02d}")
    if hour > 23 or minute > 59 or second > 60:
        raise ParseError(f, i + 11, f"time {hour:02d}:{minute:02d}:{second:02d} out of range")
    second = min(second, 59)
    j = i + 19
    frac = 0.0
    if msg[j : j + 1] == b".":
        k = j + 1
        while k < end and 0x30 <= msg[k] <= 0x39:
            k += 1
        ndig = k - j - 1
        if ndig == 0 or (strict and ndig > 6):
            raise ParseError(f, j, f"fraction of {ndig} digits (want 1 to 6)")
        frac = int(msg[j + 1 : k]) / 10**ndig
        j = k
    z = msg[j : j + 1]
    if z == b"Z" or (not strict and z == b"z"):
        offset = 0
        j += 1
    elif z in (b"+", b"-"):
        oh = _num(msg, j + 1, 2, f)
        _expect(msg, j + 3, b":", "in the time offset")
        om = _num(msg, j + 4, 2, f)
        if oh > 23 or om > 59:
            raise ParseError(f, j, f"time offset {oh:02d}:{om:02d} out of range")
        offset = (oh * 3600 + om * 60) * (1 if z == b"+" else -1)
        j += 6
    else:
        raise ParseError(f, j, "expected 'Z' or a +hh:mm/-hh:mm offset")
    if j > end:
        raise ParseError(f, end, "timestamp runs past its field")
    days = days_from_civil(year, month, day)
    epoch = days * 86400 + hour * 3600 + minute * 60 + second - offset
    return epoch + frac, j


# -- serialization ----------------------------------------------------------------


def _escape(value: str) -> bytes:
    raw = value.encode("utf-8")
    return raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b"]", b"\\]")


def _field(value: str | None, name: str, limit: int) -> bytes:
    if value is None:
        return NILVALUE
    raw = value.encode("ascii")
    if not raw or len(raw) > limit or not _printusascii(raw):
        raise ValueError(f"{name} {value!r} is not 1 to {limit} printable US-ASCII characters")
    return raw


def serialize(m: Message5424) -> bytes:
    """Wire form of ``m`` (no framing). ``timestamp`` is written as given."""
    if not 0 <= m.pri <= MAX_PRI:
        raise ValueError(f"PRI {m.pri} out of range")
    parts = [
        b"<%d>%d" % (m.pri, m.version),
        NILVALUE if m.timestamp is None else m.timestamp.encode("ascii"),
        _field(m.hostname, "hostname", MAX_HOSTNAME),
        _field(m.app_name, "app_name", MAX_APP_NAME),
        _field(m.procid, "procid", MAX_PROCID),
        _field(m.msgid, "msgid", MAX_MSGID),
    ]
    if m.structured_data:
        sd = []
        for el in m.structured_data:
            sd.append(b"[" + _field(el.id, "SD-ID", MAX_SD_NAME))
            for name, value in el.params:
                sd.append(b' %b="%b"' % (_field(name, "PARAM-NAME", MAX_SD_NAME), _escape(value)))
            sd.append(b"]")
        parts.append(b"".join(sd))
    else:
        parts.append(NILVALUE)
    head = b" ".join(parts)
    if m.bom:
        return head + b" " + BOM + m.msg
    return head + b" " + m.msg if m.msg else head


def _show(raw: bytes) -> str:
    return repr(raw[:40])[1:]
