"""RFC 5424 parser: section 6.5 examples, grammar errors, limits, round trips."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.formats.rfc5424 import (
    Message5424,
    ParseError,
    SDElement,
    days_from_civil,
    field_ends,
    header_fields,
    parse,
    parse_partial,
    serialize,
)

BOM = b"\xef\xbb\xbf"

# RFC 5424 section 6.5, examples 1 to 4 (the "BOM" of the RFC text is the UTF-8 BOM).
EX1 = (
    b"<34>1 2003-10-11T22:14:15.003Z mymachine.example.com su - ID47 - "
    + BOM
    + b"'su root' failed for lonvick on /dev/pts/8"
)
EX2 = (
    b"<165>1 2003-08-24T05:14:15.000003-07:00 192.0.2.1 myproc 8710 - - "
    b"%% It's time to make the do-nuts."
)
EX3 = (
    b"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 "
    b'[exampleSDID@32473 iut="3" eventSource="Application" eventID="1011"] '
    + BOM
    + b"An application event log entry..."
)
EX4 = (
    b"<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 "
    b'[exampleSDID@32473 iut="3" eventSource="Application" eventID="1011"]'
    b'[examplePriority@32473 class="high"]'
)
EXAMPLE_SD = SDElement(
    "exampleSDID@32473", (("iut", "3"), ("eventSource", "Application"), ("eventID", "1011"))
)


def epoch(*args: int, tz: timezone = UTC) -> float:
    return datetime(*args, tzinfo=tz).timestamp()  # type: ignore[misc]


def test_example_1() -> None:
    m = parse(EX1)
    assert m == Message5424(
        pri=34,
        facility=4,
        severity=2,
        version=1,
        timestamp="2003-10-11T22:14:15.003Z",
        epoch=m.epoch,
        hostname="mymachine.example.com",
        app_name="su",
        procid=None,
        msgid="ID47",
        structured_data=(),
        msg=b"'su root' failed for lonvick on /dev/pts/8",
        bom=True,
    )
    assert m.epoch == pytest.approx(epoch(2003, 10, 11, 22, 14, 15, 3000), abs=1e-6)


def test_example_2() -> None:
    m = parse(EX2)
    assert (m.pri, m.facility, m.severity) == (165, 20, 5)
    assert m.hostname == "192.0.2.1"
    assert (m.app_name, m.procid, m.msgid) == ("myproc", "8710", None)
    assert m.structured_data == ()
    assert m.msg == b"%% It's time to make the do-nuts." and not m.bom
    tz = timezone(timedelta(hours=-7))
    assert m.epoch == pytest.approx(epoch(2003, 8, 24, 5, 14, 15, 3, tz=tz), abs=1e-6)


def test_example_3() -> None:
    m = parse(EX3)
    assert m.structured_data == (EXAMPLE_SD,)
    assert m.msg == b"An application event log entry..." and m.bom
    assert (m.app_name, m.procid, m.msgid) == ("evntslog", None, "ID47")


def test_example_4() -> None:
    m = parse(EX4)
    assert m.structured_data == (
        EXAMPLE_SD,
        SDElement("examplePriority@32473", (("class", "high"),)),
    )
    assert m.msg == b"" and not m.bom


@pytest.mark.parametrize("wire", [EX1, EX2, EX3, EX4])
def test_examples_serialize_back(wire: bytes) -> None:
    assert serialize(parse(wire)) == wire


@pytest.mark.parametrize(
    "stamp,expected",
    [
        ("1985-04-12T23:20:50.52Z", epoch(1985, 4, 12, 23, 20, 50, 520000)),
        ("1985-04-12T19:20:50.52-04:00", epoch(1985, 4, 12, 23, 20, 50, 520000)),
        ("2003-10-11T22:14:15.003Z", epoch(2003, 10, 11, 22, 14, 15, 3000)),
        ("2003-08-24T05:14:15.000003-07:00", epoch(2003, 8, 24, 12, 14, 15, 3)),
        ("2026-11-26T01:02:03+05:30", epoch(2026, 11, 25, 19, 32, 3)),
        ("2016-12-31T23:59:60Z", epoch(2016, 12, 31, 23, 59, 59)),  # leap second read as :59
        ("2024-02-29T00:00:00Z", epoch(2024, 2, 29)),
        ("2000-02-29T12:00:00.1Z", epoch(2000, 2, 29, 12, 0, 0, 100000)),
    ],
)
def test_timestamps(stamp: str, expected: float) -> None:
    m = parse(b"<13>1 " + stamp.encode() + b" h a p m - x")
    assert m.timestamp == stamp
    assert m.epoch == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "wire,field,offset",
    [
        (b"", "pri", 0),
        (b"13>1 - - - - - -", "pri", 0),
        (b"<1234>1 - - - - - -", "pri", 0),
        (b"<192>1 - - - - - -", "pri", 1),
        (b"<ab>1 - - - - - -", "pri", 1),
        (b"<13>0 - - - - - -", "version", 4),
        (b"<13>1- - - - - -", "version", 4),
        (b"<13>1  - - - - -", "timestamp", 6),
        (b"<13>1 2003-13-11T22:14:15Z h a p m -", "timestamp", 11),
        (b"<13>1 2003-02-29T22:14:15Z h a p m -", "timestamp", 14),
        (b"<13>1 2003-10-11t22:14:15Z h a p m -", "timestamp", 16),
        (b"<13>1 2003-10-11T24:14:15Z h a p m -", "timestamp", 17),
        (b"<13>1 2003-10-11T22:14:15.1234567Z h a p m -", "timestamp", 25),
        (b"<13>1 2003-10-11T22:14:15 h a p m -", "timestamp", 25),
        (b"<13>1 2003-10-11T22:14:15z h a p m -", "timestamp", 25),
        (b"<13>1 2003-10-11T22:14:15+0100 h a p m -", "timestamp", 28),
        (b"<13>1 2003-10-11T22:14:15ZZ h a p m -", "timestamp", 26),
        (b"<13>1 - " + b"h" * 256 + b" a p m -", "hostname", 8),
        (b"<13>1 - host\x01 a p m -", "hostname", 8),
        (b"<13>1 - h " + b"a" * 49 + b" p m -", "app_name", 10),
        (b"<13>1 - h a " + b"p" * 129 + b" m -", "procid", 12),
        (b"<13>1 - h a p " + b"m" * 33 + b" -", "msgid", 14),
        (b"<13>1 - h a p m", "msgid", 14),
        (b"<13>1 - h a p m ", "structured_data", 16),
        (b"<13>1 - h a p m x", "structured_data", 16),
        (b"<13>1 - h a p m -x", "structured_data", 17),
        (b"<13>1 - h a p m [" + b"i" * 33 + b"]", "sd_id", 17),
        (b"<13>1 - h a p m []", "sd_id", 17),
        (b"<13>1 - h a p m [id", "structured_data", 19),
        (b"<13>1 - h a p m [id a=b]", "sd_param", 21),
        (b'<13>1 - h a p m [id a="b]', "sd_param", 23),
        (b'<13>1 - h a p m [id a="b"', "structured_data", 25),
        (b'<13>1 - h a p m [id a="b"x]', "structured_data", 25),
        (b'<13>1 - h a p m [id a="b"]x', "structured_data", 26),
    ],
)
def test_errors_name_field_and_offset(wire: bytes, field: str, offset: int) -> None:
    with pytest.raises(ParseError) as info:
        parse(wire)
    assert (info.value.field, info.value.offset) == (field, offset)
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(f"{field} at offset {offset}: ")


def test_field_limits_are_inclusive() -> None:
    wire = b"<13>1 - %b %b %b %b [%b]" % (b"h" * 255, b"a" * 48, b"p" * 128, b"m" * 32, b"i" * 32)
    m = parse(wire)
    assert m.hostname is not None and len(m.hostname) == 255
    assert m.app_name is not None and len(m.app_name) == 48
    assert m.procid is not None and len(m.procid) == 128
    assert m.msgid is not None and len(m.msgid) == 32
    assert m.structured_data == (SDElement("i" * 32),)


def test_sd_escapes() -> None:
    m = parse(b'<13>1 - h a p m [id@1 a="q\\"b\\\\s\\]e" b="lone\\x" c="" d="\xc3\xa9"] body')
    assert m.structured_data[0].params == (
        ("a", 'q"b\\s]e'),
        ("b", "lone\\x"),  # a backslash before another character stays
        ("c", ""),
        ("d", "\u00e9"),
    )
    assert m.msg == b"body"


def test_msg_bytes_untouched() -> None:
    m = parse(b"<13>1 - - - - - - \x00\xff\xfe trailing spaces  \r")
    assert m.msg == b"\x00\xff\xfe trailing spaces  \r"
    assert m.hostname is None and m.timestamp is None and m.epoch is None


def test_parse_partial_keeps_fields_before_the_error() -> None:
    fields, error = parse_partial(b"<13>1 2003-10-11T22:14:15Z host app - - [bad")
    assert error is not None and error.field == "structured_data"
    assert fields["hostname"] == "host" and fields["app_name"] == "app"
    assert "structured_data" not in fields


def _message(**fields: object) -> Message5424:
    base: dict[str, object] = dict(
        pri=14,
        facility=1,
        severity=6,
        version=1,
        timestamp=None,
        epoch=None,
        hostname=None,
        app_name=None,
        procid=None,
        msgid=None,
        structured_data=(),
        msg=b"",
        bom=False,
    )
    return Message5424(**{**base, **fields})  # type: ignore[arg-type]


def test_serialize_escapes_param_values_and_refuses_bad_fields() -> None:
    wire = serialize(
        _message(
            timestamp="2026-11-26T01:02:03Z",
            hostname="h",
            app_name="app",
            structured_data=(SDElement("x@1", (("k", 'v"]\\'),)),),
            msg=b"hi",
        )
    )
    assert wire == b'<14>1 2026-11-26T01:02:03Z h app - - [x@1 k="v\\"\\]\\\\"] hi'
    with pytest.raises(ValueError):
        serialize(_message(hostname="has space"))


def test_days_from_civil_matches_datetime() -> None:
    for y, m, d in [(1970, 1, 1), (1969, 12, 31), (2000, 2, 29), (2100, 3, 1), (1, 1, 1)]:
        expected = (datetime(y, m, d, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)).days
        assert days_from_civil(y, m, d) == expected


# -- Hypothesis round trip ---------------------------------------------------------

PRINTUSASCII = "".join(chr(c) for c in range(33, 127))
SD_NAME_CHARS = "".join(c for c in PRINTUSASCII if c not in '= ]"')


def ascii_field(limit: int) -> st.SearchStrategy[str | None]:
    return st.none() | st.text(PRINTUSASCII, min_size=1, max_size=limit).filter(lambda s: s != "-")


sd_names = st.text(SD_NAME_CHARS, min_size=1, max_size=32)
sd_elements = st.builds(
    SDElement,
    sd_names,
    st.lists(
        st.tuples(sd_names, st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)),
        max_size=4,
    ).map(tuple),
)


@st.composite
def timestamps(draw: st.DrawFn) -> tuple[str, float] | None:
    if draw(st.booleans()):
        return None
    dt = draw(st.datetimes(datetime(1000, 1, 1), datetime(9998, 12, 31)))
    digits = draw(st.integers(0, 6))
    frac = f"{dt.microsecond:06d}"[:digits]
    minutes = draw(st.integers(-23 * 60 - 59, 23 * 60 + 59))
    if minutes == 0 and draw(st.booleans()):
        zone = "Z"
    else:
        sign = "-" if minutes < 0 else "+"
        zone = f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    text = dt.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + zone
    base = dt.replace(microsecond=0, tzinfo=timezone(timedelta(minutes=minutes)))
    return text, base.timestamp() + (int(frac) / 10 ** len(frac) if frac else 0.0)


@st.composite
def messages(draw: st.DrawFn) -> Message5424:
    pri = draw(st.integers(0, 191))
    stamp = draw(timestamps())
    bom = draw(st.booleans())
    body = draw(st.binary(max_size=50))
    if not bom and body.startswith(BOM):
        body = body[3:]
    return Message5424(
        pri=pri,
        facility=pri >> 3,
        severity=pri & 7,
        version=1,
        timestamp=None if stamp is None else stamp[0],
        epoch=None if stamp is None else stamp[1],
        hostname=draw(ascii_field(255)),
        app_name=draw(ascii_field(48)),
        procid=draw(ascii_field(128)),
        msgid=draw(ascii_field(32)),
        structured_data=tuple(draw(st.lists(sd_elements, max_size=3))),
        msg=body,
        bom=bom,
    )


@settings(max_examples=300, deadline=None)
@given(messages())
def test_round_trip(m: Message5424) -> None:
    wire = serialize(m)
    back = parse(wire)
    if m.epoch is None:
        assert back.epoch is None
    else:
        assert back.epoch == pytest.approx(m.epoch, abs=2e-6)
    assert back == Message5424(**{**_asdict(m), "epoch": back.epoch})
    assert serialize(back) == wire


@settings(max_examples=300, deadline=None)
@given(messages())
def test_header_slicer_finds_the_fields_the_parser_reads(m: Message5424) -> None:
    wire = serialize(m)
    header = header_fields(wire, 5)
    assert header is not None
    start, ends = header
    starts = [start] + [sp + 1 for sp in ends[:-1]]
    got = [wire[a:b].decode("ascii") for a, b in zip(starts, ends, strict=True)]
    fields = [m.timestamp, m.hostname, m.app_name, m.procid, m.msgid]
    assert got == [f if f is not None else "-" for f in fields]


@pytest.mark.parametrize(
    ("msg", "expected"),
    [
        (b"<13>1 2026-01-01T00:00:00Z host app - - - x", (6, [26, 31, 35, 37, 39])),
        (b"<13>1 - host", (6, [7, -1])),
        (b"<13>1 -  app", (6, [7, 8])),
        (b"<13>2 - host app", None),
        (b"13>1 - host app", None),
        (b"<1234>1 - host app", None),
    ],
)
def test_header_fields(msg: bytes, expected: tuple[int, list[int]] | None) -> None:
    count = 5 if expected is None else len(expected[1])
    assert header_fields(msg, count) == expected
    if expected is not None:
        assert field_ends(msg, expected[0], count) == expected[1]


def _asdict(m: Message5424) -> dict[str, object]:
    return {name: getattr(m, name) for name in Message5424.__slots__}


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_parse_error(data: bytes) -> None:
    try:
        parse(b"<13>1 " + data)
    except ParseError:
        pass
    try:
        parse(data)
    except ParseError:
        pass
