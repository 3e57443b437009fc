"""routing_fields: the per-message hot path agrees with the full parsers and never raises."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.formats import rfc3164, rfc5424
from relay.formats import routing_fields as classify
from relay.formats.routing_fields import routing_fields
from tests.test_rfc5424 import EX1, EX2, EX3, EX4, messages

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC).timestamp()
BERLIN = ZoneInfo("Europe/Berlin")


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[misc]


@pytest.mark.parametrize(
    "msg,epoch,host,malformed",
    [
        (EX1, utc(2003, 10, 11, 22, 14, 15) + 0.003, b"mymachine.example.com", False),
        (EX2, utc(2003, 8, 24, 12, 14, 15) + 0.000003, b"192.0.2.1", False),
        (EX3, utc(2003, 10, 11, 22, 14, 15) + 0.003, b"mymachine.example.com", False),
        (EX4, utc(2003, 10, 11, 22, 14, 15) + 0.003, b"mymachine.example.com", False),
        (b"<13>1 - host app - - - m", None, b"host", False),
        (b"<13>1 2026-11-26T01:02:03Z - app - - - m", utc(2026, 11, 26, 1, 2, 3), None, False),
        (b"<13>1 2016-12-31T23:59:60Z h a - - -", utc(2016, 12, 31, 23, 59, 59), b"h", False),
        # Broken timestamp: flagged, the hostname is still read.
        (b"<13>1 2026-02-30T01:02:03Z h a - - -", None, b"h", True),
        (b"<13>1 2026-11-26T01:02:03.1234567Z h a - - -", None, b"h", True),
        (b"<13>1 2026-11-26T01:02:03 h a - - -", None, b"h", True),
        (b"<13>1 2026-11-26T01:02:61Z h a - - -", None, b"h", True),
        (b"<13>1 2026-11-26T01:02:03Z", None, None, True),
        (b"<13>1 - " + b"h" * 256 + b" a - - -", None, None, True),
        # RSYSLOG_TraditionalForwardFormat and RSYSLOG_ForwardFormat.
        (b"<86>Nov  6 01:02:03 web01 sshd[42]: hi", utc(2026, 11, 6, 1, 2, 3), b"web01", False),
        (b"<86>Nov 16 01:02:03 web01 sshd[42]: hi", utc(2026, 11, 16, 1, 2, 3), b"web01", False),
        (
            b"<13>2026-11-26T01:02:03.123456+01:00 web01 app: hello",
            utc(2026, 11, 26, 0, 2, 3) + 0.123456,
            b"web01",
            False,
        ),
        (b"<13>Nov  6 01:02:03 sshd[42]: no host", utc(2026, 11, 6, 1, 2, 3), None, False),
        (b"<13>Nov  6 01:02:03 kernel: no host", utc(2026, 11, 6, 1, 2, 3), None, False),
        (b"<13>Nov  6 01:02:03", utc(2026, 11, 6, 1, 2, 3), None, False),
        # Lax shapes go through the full parser.
        (b"<13>Nov 6 01:02:03 host t: m", utc(2026, 11, 6, 1, 2, 3), b"host", False),
        (b"<13>Nov  6 01:02:03.5 host t: m", utc(2026, 11, 6, 1, 2, 3) + 0.5, b"host", False),
        # Neither format: keep going, flagged.
        (b"", None, None, True),
        (b"hello world", None, None, True),
        (b"<192>1 - h a - - -", None, None, True),
        (b"<13>no timestamp here", None, None, True),
        (b"<13>Nov 31 01:02:03 host t: m", None, None, True),
        (b"<13>Nov  6 25:02:03 host t: m", None, None, True),
        (b"<13>\x00\xff\xfe", None, None, True),
    ],
)
def test_vectors(msg: bytes, epoch: float | None, host: bytes | None, malformed: bool) -> None:
    got = routing_fields(msg, UTC, NOW)
    if epoch is None:
        assert got[0] is None
    else:
        assert got[0] == pytest.approx(epoch, abs=1e-6)
    assert got[1:] == (host, malformed)


def test_traditional_stamp_uses_zone_and_year_inference() -> None:
    jan = utc(2027, 1, 1, 0, 5)
    got = routing_fields(b"<13>Dec 31 23:59:00 h t: m", BERLIN, jan)
    assert got == (utc(2026, 12, 31, 22, 59), b"h", False)
    got = routing_fields(b"<13>Jul  1 12:00:00 h t: m", BERLIN, NOW)
    assert got == (utc(2026, 7, 1, 10), b"h", False)


def test_minute_cache_adds_seconds_and_survives_clearing() -> None:
    base = b"<13>1 2026-11-26T01:02:%02dZ h a - - -"
    for sec in (0, 59, 7, 0):
        assert routing_fields(base % sec, UTC, NOW)[0] == utc(2026, 11, 26, 1, 2, sec)
    for k in range(classify._CACHE_MAX + 10):
        stamp = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=k)
        wire = b"<13>1 " + stamp.strftime("%Y-%m-%dT%H:%M:13Z").encode() + b" h a - - -"
        assert routing_fields(wire, UTC, NOW)[0] == stamp.timestamp() + 13
    assert len(classify._minutes_3339) <= classify._CACHE_MAX


@settings(max_examples=300, deadline=None)
@given(messages())
def test_agrees_with_rfc5424_parser(m: rfc5424.Message5424) -> None:
    wire = rfc5424.serialize(m)
    epoch, host, malformed = routing_fields(wire, UTC, NOW)
    assert not malformed
    assert host == (None if m.hostname is None else m.hostname.encode())
    if m.epoch is None:
        assert epoch is None
    else:
        assert epoch == pytest.approx(m.epoch, abs=2e-6)


@settings(max_examples=300, deadline=None)
@given(
    st.datetimes(datetime(2025, 1, 1), datetime(2027, 12, 31)),
    st.sampled_from([UTC, BERLIN, timezone(timedelta(hours=-9, minutes=-30))]),
    st.integers(-400 * 86400, 10 * 86400),
    st.booleans(),
)
def test_agrees_with_rfc3164_parser(dt: datetime, tz: timezone, ahead: int, host: bool) -> None:
    now = dt.replace(tzinfo=UTC).timestamp() - ahead
    stamp = dt.strftime("%b ") + f"{dt.day:2d}" + dt.strftime(" %H:%M:%S")
    wire = b"<30>" + stamp.encode() + (b" host1" if host else b"") + b" app[1]: text"
    try:
        full = rfc3164.parse(wire, tz, now)
    except rfc3164.ParseError:
        assert routing_fields(wire, tz, now) == (None, None, True)
        return
    assert routing_fields(wire, tz, now) == (full.epoch, b"host1" if host else None, False)


def test_a_traditional_stamp_at_the_future_slack_gets_the_full_parsers_year() -> None:
    # The year flips where the stamp is FUTURE_SLACK ahead of the receive time: a
    # cached minute must not carry one side's year to the other within the hour.
    wire = b"<30>Apr  1 00:00:01 app[1]: text"
    at = datetime(2025, 4, 1, 0, 0, 1, tzinfo=BERLIN).timestamp()
    for now in (at - rfc3164.FUTURE_SLACK + d for d in (-1800.0, -0.5, 0.0, 0.5, 30.0, 1800.0)):
        full = rfc3164.parse(wire, BERLIN, now).epoch
        assert routing_fields(wire, BERLIN, now)[0] == full
    assert rfc3164.parse(wire, BERLIN, at - rfc3164.FUTURE_SLACK - 0.5).epoch != at  # 2024


PREFIXES = [b"", b"<13>", b"<13>1 ", b"<13>1 2026-11-26T01:02:", b"<13>Nov  6 ", b"<13>2026-11-"]


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(PREFIXES), st.binary(max_size=80))
def test_never_raises(prefix: bytes, data: bytes) -> None:
    epoch, host, malformed = routing_fields(prefix + data, BERLIN, NOW)
    assert epoch is None or isinstance(epoch, float)
    assert host is None or isinstance(host, bytes)
    assert isinstance(malformed, bool)
