"""RFC 3164 parser: RFC examples, rsyslog's forward formats, year inference, errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.formats.rfc3164 import Message3164, ParseError, parse

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC).timestamp()


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[misc]


@pytest.mark.parametrize(
    "wire,expected",
    [
        # RFC 3164 section 5.4, examples 1 and 2.
        (
            b"<34>Oct 11 22:14:15 mymachine su: 'su root' failed for lonvick on /dev/pts/8",
            Message3164(
                34,
                4,
                2,
                "Oct 11 22:14:15",
                utc(2026, 10, 11, 22, 14, 15),
                "mymachine",
                "su",
                None,
                b"'su root' failed for lonvick on /dev/pts/8",
            ),
        ),
        (
            b"<13>Feb  5 17:32:18 10.0.0.99 Use the BFG!",
            Message3164(
                13,
                1,
                5,
                "Feb  5 17:32:18",
                utc(2026, 2, 5, 17, 32, 18),
                "10.0.0.99",
                "Use",
                None,
                b"the BFG!",
            ),
        ),
        # RSYSLOG_TraditionalForwardFormat: day space-padded, tag with pid.
        (
            b"<86>Nov  6 01:02:03 web01 sshd[4242]: Accepted publickey for root",
            Message3164(
                86,
                10,
                6,
                "Nov  6 01:02:03",
                utc(2026, 11, 6, 1, 2, 3),
                "web01",
                "sshd",
                "4242",
                b"Accepted publickey for root",
            ),
        ),
        # RSYSLOG_ForwardFormat: RFC 3339 stamp with microseconds and offset.
        (
            b"<13>2026-11-26T01:02:03.123456+01:00 web01 app: hello",
            Message3164(
                13,
                1,
                5,
                "2026-11-26T01:02:03.123456+01:00",
                utc(2026, 11, 26, 0, 2, 3) + 0.123456,
                "web01",
                "app",
                None,
                b"hello",
            ),
        ),
        # No hostname: the first word is already the tag.
        (
            b"<13>Nov 16 01:02:03 cron[77]: job done",
            Message3164(
                13,
                1,
                5,
                "Nov 16 01:02:03",
                utc(2026, 11, 16, 1, 2, 3),
                None,
                "cron",
                "77",
                b"job done",
            ),
        ),
        (
            b"<13>Nov 16 01:02:03 kernel: oops",
            Message3164(
                13,
                1,
                5,
                "Nov 16 01:02:03",
                utc(2026, 11, 16, 1, 2, 3),
                None,
                "kernel",
                None,
                b"oops",
            ),
        ),
        # Lax shapes seen in the wild: one-digit day, fractional seconds, nothing after host.
        (
            b"<13>Nov 6 01:02:03.250 host tag: x",
            Message3164(
                13,
                1,
                5,
                "Nov 6 01:02:03.250",
                utc(2026, 11, 6, 1, 2, 3) + 0.25,
                "host",
                "tag",
                None,
                b"x",
            ),
        ),
        (
            b"<13>Nov  6 01:02:03 host",
            Message3164(
                13, 1, 5, "Nov  6 01:02:03", utc(2026, 11, 6, 1, 2, 3), "host", None, None, b""
            ),
        ),
        # No timestamp at all: RFC 3164 4.3.3 says the rest is content; a tag may still lead.
        (
            b"<13>myapp: no stamp",
            Message3164(13, 1, 5, None, None, None, "myapp", None, b"no stamp"),
        ),
        (b"<0>", Message3164(0, 0, 0, None, None, None, None, None, b"")),
        # Content bytes are untouched: NUL, invalid UTF-8, extra spaces, CR.
        (
            b"<13>Nov  6 01:02:03 h t:  \x00\xff x\r",
            Message3164(
                13,
                1,
                5,
                "Nov  6 01:02:03",
                utc(2026, 11, 6, 1, 2, 3),
                "h",
                "t",
                None,
                b" \x00\xff x\r",
            ),
        ),
    ],
)
def test_vectors(wire: bytes, expected: Message3164) -> None:
    assert parse(wire, UTC, NOW) == expected


def test_rfc_example_with_year_and_zone_after_the_stamp() -> None:
    # RFC 3164 5.4 example 3: extra fields after the stamp are read as host and tag.
    wire = b"<165>Aug 24 05:34:00 CST 1987 mymachine myproc[10]: %% It's time to make the do-nuts."
    m = parse(wire, UTC, NOW)
    assert (m.timestamp, m.hostname, m.tag) == ("Aug 24 05:34:00", "CST", "1987")
    assert m.content.endswith(b"do-nuts.")


@pytest.mark.parametrize(
    "stamp,now,expected",
    [
        # A December stamp received in January belongs to the previous year.
        (b"Dec 31 23:59:00", utc(2027, 1, 1, 0, 5), utc(2026, 12, 31, 23, 59)),
        # A stamp a little ahead of the receiver's clock stays in the (next) year.
        (b"Jan  1 00:00:05", utc(2026, 12, 31, 23, 59, 50), utc(2027, 1, 1, 0, 0, 5)),
        (b"Jun 15 12:00:00", utc(2026, 6, 15, 12, 0, 30), utc(2026, 6, 15, 12)),
        (b"Jun 16 12:00:00", utc(2026, 6, 15, 12), utc(2026, 6, 16, 12)),
        # A few days ahead is skew; further ahead is last year's message replayed late.
        (b"Dec  1 00:00:00", utc(2026, 11, 26), utc(2026, 12, 1)),
        (b"Dec 10 00:00:00", utc(2026, 11, 26), utc(2025, 12, 10)),
        (b"Mar  1 00:00:00", utc(2026, 11, 26), utc(2026, 3, 1)),
        # Feb 29 exists only in the latest leap year.
        (b"Feb 29 12:00:00", utc(2025, 3, 1), utc(2024, 2, 29, 12)),
        (b"Feb 29 12:00:00", utc(2027, 3, 1), utc(2024, 2, 29, 12)),
    ],
)
def test_year_inference(stamp: bytes, now: float, expected: float) -> None:
    assert parse(b"<13>" + stamp + b" h t: m", UTC, now).epoch == expected


@pytest.mark.parametrize(
    "tz,expected",
    [
        (UTC, utc(2026, 7, 1, 12)),
        (timezone(timedelta(hours=-5)), utc(2026, 7, 1, 17)),
        (ZoneInfo("Europe/Berlin"), utc(2026, 7, 1, 10)),  # CEST in July
    ],
)
def test_traditional_stamp_read_in_configured_zone(tz: tzinfo, expected: float) -> None:
    assert parse(b"<13>Jul  1 12:00:00 h t: m", tz, NOW).epoch == expected


def test_winter_time_in_zone() -> None:
    assert parse(b"<13>Jan 10 12:00:00 h t: m", ZoneInfo("Europe/Berlin"), NOW).epoch == utc(
        2026, 1, 10, 11
    )


@pytest.mark.parametrize(
    "wire,field,offset",
    [
        (b"", "pri", 0),
        (b"no pri at all", "pri", 0),
        (b"<999>Nov  6 01:02:03 h t: m", "pri", 1),
        (b"<13 Nov  6 01:02:03 h t: m", "pri", 0),
        (b"<13>Nov xx 01:02:03 h t: m", "timestamp", 8),
        (b"<13>Nov  6 1:02:03 h t: m", "timestamp", 11),
        (b"<13>Nov  6 25:02:03 h t: m", "timestamp", 4),
        (b"<13>Nov 31 01:02:03 h t: m", "timestamp", 8),
        (b"<13>Feb 30 01:02:03 h t: m", "timestamp", 8),
        (b"<13>Nov  6 01:02:03:h t: m", "timestamp", 19),
        (b"<13>2026-13-01T00:00:00Z h t: m", "timestamp", 9),
        (b"<13>2026-11-26 00:00:00 h t: m", "timestamp", 14),
    ],
)
def test_errors(wire: bytes, field: str, offset: int) -> None:
    with pytest.raises(ParseError) as info:
        parse(wire, UTC, NOW)
    assert (info.value.field, info.value.offset) == (field, offset)
    assert isinstance(info.value, ValueError)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120), st.sampled_from([b"<13>", b"<13>Nov  6 ", b"<13>2026-11-26T", b""]))
def test_random_bytes_raise_only_parse_error(data: bytes, prefix: bytes) -> None:
    try:
        m = parse(prefix + data, ZoneInfo("Europe/Berlin"), NOW)
    except ParseError:
        return
    assert (prefix + data).endswith(m.content)
