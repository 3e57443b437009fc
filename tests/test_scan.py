"""relay.framing.hour_runs: the fused framing + hour fast path agrees with the full reader."""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.formats import octet, staging_block
from relay.framing import hour_runs
from relay.framing.rfc6587 import Frame, Framer
from relay.tools import fleet

NOW = 1_800_003_600.0 + 1234.5  # inside an hour, well away from its edges
HOUR = int(NOW // 3600)


def stamp_5424(epoch: float, zone: str, digits: int) -> bytes:
    tz = UTC if zone == "Z" else timezone(timedelta(minutes=_minutes(zone)))
    dt = datetime.fromtimestamp(epoch, tz)
    base = dt.strftime("%Y-%m-%dT%H:%M:%S")
    frac = f".{dt.microsecond:06d}"[: digits + 1] if digits else ""
    return (base + frac + ("Z" if zone == "Z" else zone)).encode()


def _minutes(zone: str) -> int:
    sign = -1 if zone[0] == "-" else 1
    return sign * (int(zone[1:3]) * 60 + int(zone[4:6]))


def stamp_3164(epoch: float) -> bytes:
    t = time.gmtime(epoch)
    months = b"Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec".split()
    month = months[t.tm_mon - 1]
    return b"%s %2d %02d:%02d:%02d" % (month, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec)


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["5424", "5424", "3164", "nil", "garbage", "short"]))
    pri = draw(st.sampled_from([0, 13, 34, 134, 191]))
    # Mostly this hour; sometimes the hour before or after, or far away (flag R).
    offset = draw(st.sampled_from([0, 0, 0, -2000, 2500, -86400 * 3, 200, -59]))
    body = draw(st.binary(min_size=0, max_size=40).filter(lambda b: b"\n" not in b))
    if kind == "5424":
        zone = draw(st.sampled_from(["Z", "+00:00", "+01:00", "-08:00", "+05:30"]))
        digits = draw(st.sampled_from([0, 3, 6]))
        stamp = stamp_5424(NOW + offset, zone, digits)
        return b"<%d>1 %b host%d app - - - " % (pri, stamp, pri % 7) + body
    if kind == "3164":
        return b"<%d>%b host tag: " % (pri, stamp_3164(NOW + offset)) + body
    if kind == "nil":
        return b"<%d>1 - host app - - - " % pri + body
    if kind == "short":
        return b"<%d>1 2026" % pri
    return b"x" + body


def expected(msgs: list[bytes]) -> list[tuple[bytes, tuple[int, bytes]]]:
    index = hour_runs.HourIndex(UTC, 3600.0)
    index.at(NOW)
    return [(m, index.classify(m)) for m in msgs]


def scanned(framer: Framer, chunks: list[bytes]) -> list[tuple[bytes, tuple[int, bytes]]]:
    index = hour_runs.HourIndex(UTC, 3600.0)
    index.at(NOW)
    out: list[tuple[bytes, tuple[int, bytes]]] = []
    for chunk in chunks:
        items, errors = framer.feed_runs(chunk, index)
        assert not errors
        for item in items:
            if isinstance(item, Frame):
                out.append((item.msg, index.classify(item.msg)))
            else:
                start, end, count, hf, framing = item
                msgs = staging_block.split_payload(chunk[start:end], framing)
                assert len(msgs) == count
                out.extend((m, hf) for m in msgs)
    return out


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@settings(max_examples=300, deadline=None)
@given(st.lists(messages(), min_size=1, max_size=30), st.lists(st.integers(0, 10**6), max_size=6))
def test_octet_runs_agree_with_the_full_reader(msgs: list[bytes], cuts: list[int]) -> None:
    msgs = [m for m in msgs if m]
    data = octet.encode_many(msgs)
    # Twice: the second pass is answered from the cache the first one filled.
    for _ in range(2):
        assert scanned(Framer("octet-counting", 4096), cut(data, cuts)) == expected(msgs)


@settings(max_examples=300, deadline=None)
@given(st.lists(messages(), min_size=1, max_size=30), st.lists(st.integers(0, 10**6), max_size=6))
def test_line_runs_agree_with_the_full_reader(msgs: list[bytes], cuts: list[int]) -> None:
    msgs = [m for m in msgs if m and m[:1] not in b"0123456789"]
    data = b"".join(m + b"\n" for m in msgs)
    for _ in range(2):
        assert scanned(Framer("auto", 4096), cut(data, cuts)) == expected(msgs)


def framed(framer: Framer, chunks: list[bytes], framing_only: bool) -> list[list[bytes]]:
    """The messages of each item the framer gives (a run's, or a Frame's), chunk by chunk."""
    index = hour_runs.HourIndex(UTC, 3600.0)
    index.framing_only = framing_only
    index.at(NOW)
    out: list[list[bytes]] = []
    for chunk in chunks:
        items, errors = framer.feed_runs(chunk, index)
        assert not errors
        for item in items:
            if isinstance(item, Frame):
                out.append([item.msg])
            else:
                start, end, count, hf, framing = item
                if framing_only:
                    assert hf == (int(NOW // 3600), b"-")
                out.append(staging_block.split_payload(chunk[start:end], framing))
                assert len(out[-1]) == count
    return out


@settings(max_examples=300, deadline=None)
@given(
    st.lists(messages(), min_size=1, max_size=30),
    st.lists(st.integers(0, 10**6), max_size=6),
    st.sampled_from(["octet-counting", "auto"]),
)
def test_framing_only_frames_exactly_as_the_scan(
    msgs: list[bytes], cuts: list[int], mode: str
) -> None:
    """No staging and no selector (an edge that only forwards): the same frames, in
    runs of the receive hour without flags."""
    msgs = [m for m in msgs if m and m[:1] not in b"0123456789"]
    data = (
        octet.encode_many(msgs) if mode == "octet-counting" else b"".join(m + b"\n" for m in msgs)
    )
    chunks = cut(data, cuts)
    full = framed(Framer(mode, 4096), chunks, False)
    fast = framed(Framer(mode, 4096), chunks, True)
    assert [m for ms in fast for m in ms] == [m for ms in full for m in ms] == msgs
    assert len(fast) <= len(full)  # one run per chunk (and Frames that spanned reads)


def test_a_run_is_one_hour_and_one_flag_set() -> None:
    a = b"<13>1 %b h app - - - a" % stamp_5424(NOW, "Z", 6)
    b = b"<13>1 %b h app - - - b" % stamp_5424(NOW + 3600, "Z", 6)  # next hour
    c = b"<13>1 %b h app - - - c" % stamp_5424(NOW - 86400 * 2, "Z", 6)  # too old: R
    data = octet.encode_many([a, a, b, b, b, c, a])
    index = hour_runs.HourIndex(UTC, 3600.0)
    index.at(NOW)
    out: list[hour_runs.Run] = []
    assert hour_runs.octet_runs(data, 0, 4096, index, out) == len(data)
    assert [(count, hf) for _, _, count, hf, _ in out] == [
        (2, (HOUR, b"-")),
        (3, (HOUR + 1, b"-")),
        (1, (HOUR, b"R")),
        (1, (HOUR, b"-")),
    ]
    # Runs tile the chunk: no byte copied, none skipped.
    assert out[0][0] == 0 and out[-1][1] == len(data)
    assert all(out[k][1] == out[k + 1][0] for k in range(len(out) - 1))


def test_cache_is_per_receive_hour() -> None:
    """The same prefix answers differently once the receive hour moves on (R flag)."""
    msg = b"<13>1 %b h app - - - x" % stamp_5424(NOW, "+00:00", 6)
    data = octet.encode_many([msg, msg])
    index = hour_runs.HourIndex(UTC, 1800.0)
    index.at(NOW)
    out: list[hour_runs.Run] = []
    hour_runs.octet_runs(data, 0, 4096, index, out)
    assert out[0][3] == (HOUR, b"-")
    index.at(NOW + 3 * 3600)
    out.clear()
    hour_runs.octet_runs(data, 0, 4096, index, out)
    assert out[0][3] == (HOUR + 3, b"R")


def test_octet_runs_stop_before_what_the_state_machine_must_see() -> None:
    msg = b"<13>1 %b h app - - - x" % stamp_5424(NOW, "Z", 6)
    index = hour_runs.HourIndex(UTC, 3600.0)
    index.at(NOW)
    frame = b"%d %b" % (len(msg), msg)
    for tail in (b"", b"12", b"999 partial", b"x garbage", b"0 ", b"5000 " + b"y" * 10):
        data = frame * 3 + tail
        out: list[hour_runs.Run] = []
        assert hour_runs.octet_runs(data, 0, 4096, index, out) == 3 * len(frame)
        assert [r[2] for r in out] == [3]


def test_frame_starts_of_every_count_width() -> None:
    # counts of 1 to 5 digits: the start table keys the first 5 bytes when the
    # count's space is among them; a 5-digit count is read each time
    index = hour_runs.HourIndex(UTC, 3600.0)
    index.at(NOW)
    head = b"<13>1 %b h app - - - " % stamp_5424(NOW, "Z", 6)
    msgs = [b"x", b"<1", head[:9], head + b"y" * 60, head + b"y" * 900, head + b"y" * 12000]
    data = octet.encode_many(msgs) * 2
    for _ in range(2):
        out: list[hour_runs.Run] = []
        assert hour_runs.octet_runs(data, 0, 65536, index, out) == len(data)
        got = [m for start, end, _, _, framing in out for m in staging_block.split_payload(
            data[start:end], framing)]  # fmt: skip
        assert got == msgs * 2
    assert {len(k) for k in index.starts(65536)} == {hour_runs.START_KEY}
    assert not any(k.startswith(b"%d " % len(msgs[-1])) for k in index.starts(65536))
    assert hour_runs.octet_runs(data, 0, 4096, index, []) == len(octet.encode_many(msgs[:5]))


@settings(max_examples=200, deadline=None)
@given(st.lists(messages(), min_size=1, max_size=30))
def test_message_lookup_agrees_with_the_full_reader(msgs: list[bytes]) -> None:
    """RELP, UDP and the per-message path: unframed messages, same cache rules."""
    index = hour_runs.HourIndex(UTC, 3600.0)
    index.at(NOW)
    for _ in range(2):
        assert [(m, index.message(m)) for m in msgs] == expected(msgs)


# -- driven by the load generator's fleet and adversarial traffic ----------------------------


@pytest.mark.parametrize("framing", ["octet-counting", "lf"])
@pytest.mark.parametrize("profile", [p for p in fleet.PROFILES if p != "uniform"])
def test_fast_path_agrees_with_the_full_reader_on_every_profile(profile: str, framing: str) -> None:
    msgs = fleet.generate(profile, 7, 1, range(4000), start=NOW - 2, step=1e-3)
    if framing == "lf":
        data = b"".join(m + b"\n" for m in msgs)
    else:
        data = octet.encode_many(msgs)
    cuts = list(range(0, len(data), 4093))
    mode = "auto" if framing == "lf" else framing
    for _ in range(2):
        assert scanned(Framer(mode, 65536), cut(data, cuts)) == expected(msgs)


# Stamps near the UTC hour boundaries (where the minutes of a +05:30 or -03:30
# sender decide the hour), in every zone in use, any fraction, leap seconds.
EDGES = [-3601, -3600, -3599, -1801, -1800, -61, -60, -2, -1, 0, 1, 59, 60, 1799, 1800, 3599, 3600]


@st.composite
def edge_messages(draw: st.DrawFn) -> bytes:
    zone = draw(st.sampled_from(fleet.ALL_ZONES))
    text = "Z" if zone == 0 and draw(st.booleans()) else fleet.zone_text(zone).decode()
    epoch = HOUR * 3600 + draw(st.sampled_from(EDGES)) + draw(st.sampled_from([0.0, 0.25, 0.999]))
    digits = draw(st.sampled_from([0, 1, 3, 6]))
    stamp = stamp_5424(epoch, text, digits)
    if stamp[17:19] == b"59" and draw(st.booleans()):
        stamp = stamp[:17] + b"60" + stamp[19:]  # a leap second
    pri = draw(st.sampled_from([0, 13, 34, 134, 191]))
    return b"<%d>1 %b host app - - - x" % (pri, stamp)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(edge_messages(), min_size=1, max_size=40), st.lists(st.integers(0, 10**5), max_size=4)
)
def test_hour_edges_in_every_zone_agree_with_the_full_reader(
    msgs: list[bytes], cuts: list[int]
) -> None:
    data = octet.encode_many(msgs)
    for _ in range(2):
        assert scanned(Framer("octet-counting", 4096), cut(data, cuts)) == expected(msgs)
    index = hour_runs.HourIndex(UTC, 3600.0)
    index.at(NOW)
    for _ in range(2):
        assert [(m, index.message(m)) for m in msgs] == expected(msgs)


@pytest.mark.parametrize("zone", ["+05:30", "+05:45", "+08:45", "+12:45", "-03:30", "-09:30"])
def test_a_half_hour_zone_is_answered_from_the_cache_on_both_sides_of_its_minute(
    zone: str,
) -> None:
    """+05:45: local :44 and :45 are different UTC hours; both cached after one each."""
    early = b"<134>1 %b h a - - - x" % stamp_5424(HOUR * 3600 - 60, zone, 6)
    late = b"<134>1 %b h a - - - x" % stamp_5424(HOUR * 3600 + 60, zone, 6)
    assert early[: hour_runs.HEAD_KEY] == late[: hour_runs.HEAD_KEY]
    index = hour_runs.HourIndex(UTC, 3600.0)
    index.at(NOW)
    calls: list[bytes] = []
    classify = index.classify
    index.classify = lambda m: calls.append(m) or classify(m)  # type: ignore[method-assign]
    answers = [index.message(m) for m in (early, late, early, late, late, early)]
    before, after = (HOUR - 1, b"-"), (HOUR, b"-")
    assert answers == [before, after, before, after, after, before]
    assert calls == [early, late]


@pytest.mark.parametrize("zone", [b"+05:45", b"+08:45", b"-09:30", b"+05:30", b"-03:30"])
def test_a_zone_of_45_minutes_changes_hour_at_45(zone: bytes) -> None:
    """The cached answer for every minute of a local hour equals the full reader's."""
    index = hour_runs.HourIndex(UTC, 86400.0)
    index.at(NOW)
    for mm in range(60):
        msg = b"<191>1 2027-01-15T14:%02d:00%b host app - - - x" % (mm, zone)
        assert index.message(msg) == index.classify(msg), (zone, mm)


def test_a_frame_that_ends_inside_its_zone_is_read_exactly() -> None:
    """The octet scan compares the zone with a slice that may run past a frame: a frame
    cut inside its zone, followed by a frame whose count spells the rest of the zone,
    is still read by the full reader (short frames never take the sliced compare)."""
    whole = b"<13>1 %b h app - - - x" % stamp_5424(NOW, "+05:30", 0)
    cut_at = whole.index(b"+05:30") + 4  # "...+05:" then "30 " from the next frame's count
    short = whole[:cut_at]
    nxt = b"<13>1 - h app - - - " + b"y" * 10
    assert len(nxt) == 30 and len(short) < hour_runs.SHORT
    msgs = [whole, whole, short, nxt, whole]
    data = octet.encode_many(msgs)
    assert b"+05:30 " in data[data.index(short) :]
    for _ in range(2):
        assert scanned(Framer("octet-counting", 4096), [data]) == expected(msgs)


def test_a_key_with_an_lf_is_not_cached() -> None:
    """A line shorter than the key is sliced with its LF and the next line: no key
    learnt from an octet frame may hold an LF."""
    odd = b"<13>%b \nhost tag: x" % stamp_3164(NOW)
    index = hour_runs.HourIndex(UTC, 3600.0)
    index.at(NOW)
    index.message(odd)
    assert not any(b"\n" in k for k in index.heads)
    line = odd.split(b"\n")[0]
    out: list[hour_runs.Run] = []
    data = line + b"\n" + b"host tag: x\n"
    assert hour_runs.line_runs(data, 0, 4096, index, False, out) == len(data)
    assert out[0][2:4] == (1, index.classify(line))
