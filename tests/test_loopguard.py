from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.formats import loop_guard, rfc5424
from relay.formats.loop_guard import Verdict, inspect, mark, safe_id

BASE = b"<34>1 2026-11-26T01:02:03Z host app 12 ID1"


@pytest.mark.parametrize(
    ("msg", "expected"),
    [
        (BASE + b" - hello", BASE + b' [relay@32473 via="a"] hello'),
        (BASE + b" -", BASE + b' [relay@32473 via="a"]'),
        (
            BASE + b' [x@1 k="v"] hi',
            BASE + b' [relay@32473 via="a"][x@1 k="v"] hi',
        ),
        (
            BASE + b' [relay@32473 via="b"][x@1 k="v"] hi',
            BASE + b' [relay@32473 via="b,a"][x@1 k="v"] hi',
        ),
        (b"<13>Nov 26 01:02:03 host app: 3164 is not marked", None),
        (b"garbage", None),
    ],
)
def test_mark(msg: bytes, expected: bytes | None) -> None:
    out = mark(msg, b"a")
    assert out == (msg if expected is None else expected)
    if expected is not None:
        parsed = rfc5424.parse(out)  # still valid RFC 5424
        assert parsed.structured_data[0].id == "relay@32473"


def test_three_relay_cycle_is_stopped() -> None:
    msg = BASE + b" - circulating"
    seen = []
    for hop in range(10):
        relay = [b"a", b"b", b"c"][hop % 3]
        verdict, _ = inspect(msg, relay, max_hops=16)
        seen.append(verdict)
        if verdict is not Verdict.FORWARD:
            break
        msg = mark(msg, relay)
    assert seen == [Verdict.FORWARD] * 3 + [Verdict.LOOP]


def test_max_hops() -> None:
    msg = BASE + b" - x"
    for i in range(3):
        msg = mark(msg, b"r%d" % i)
    assert inspect(msg, b"new", max_hops=3)[0] is Verdict.TOO_MANY_HOPS
    assert inspect(msg, b"new", max_hops=4)[0] is Verdict.FORWARD


def test_safe_id() -> None:
    assert safe_id('we"ird],id\\') == b"we_ird__id_"


@given(st.binary(max_size=300))
def test_never_crashes(data: bytes) -> None:
    inspect(data, b"a", 4)
    out = mark(data, b"a")
    assert out == data or len(out) > len(data)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.lists(
            st.sampled_from([b"a", b"ab", b"b", b"edge", b"edge1", b"x.y", b"c-d"]), max_size=6
        ),
        min_size=1,
        max_size=5,
    ),
    st.sampled_from([b"a", b"b", b"edge", b"dge", b"x.y", b"zz"]),
    st.integers(1, 6),
)
def test_may_loop_never_misses_what_inspect_would_drop(
    vias: list[list[bytes]], me: bytes, max_hops: int
) -> None:
    msgs = []
    for via in vias:
        msg = b"<13>1 2026-11-26T03:00:00Z h app - - - body"
        for name in via:
            msg = loop_guard.mark(msg, name)
        msgs.append(msg)
    chunk = b"".join(b"%d %b" % (len(m), m) for m in msgs)
    dropped = any(
        loop_guard.inspect(m, me, max_hops)[0]
        in (loop_guard.Verdict.LOOP, loop_guard.Verdict.TOO_MANY_HOPS)
        for m in msgs
    )
    if dropped:
        assert loop_guard.may_loop(chunk, me, max_hops)
    if not any(vias):
        assert not loop_guard.may_loop(chunk, me, max_hops)


def _sd_start_by_fields(msg: bytes) -> int:
    """The reference: one find per header field (the implementation before the regex)."""
    if not msg.startswith(b"<"):
        return -1
    gt = msg.find(b">", 1, 5)
    if gt < 0 or msg[gt + 1 : gt + 3] != b"1 ":
        return -1
    i = gt + 3
    for _ in range(5):
        sp = msg.find(b" ", i)
        if sp < 0 or sp == i:
            return -1
        i = sp + 1
    return i if i < len(msg) and msg[i] in b"[-" else -1


def _sd_start_by_slicer(msg: bytes) -> int:
    """The same through the shared header slicer (relay.formats.rfc5424.header_fields)."""
    header = rfc5424.header_fields(msg, 5)
    if header is None:
        return -1
    i, ends = header
    for sp in ends:
        if sp < 0 or sp == i:
            return -1
        i = sp + 1
    return i if i < len(msg) and msg[i] in b"[-" else -1


_HEADERISH = st.lists(
    st.sampled_from([b"<", b">", b"1", b" ", b"[", b"-", b"x", b"13", b"\n", b"\xff", b'"]']),
    max_size=24,
).map(b"".join)


@given(st.one_of(st.binary(max_size=40), _HEADERISH))
def test_sd_start_matches_the_field_by_field_reading(msg: bytes) -> None:
    assert loop_guard._sd_start(msg) == _sd_start_by_fields(msg) == _sd_start_by_slicer(msg)
    if loop_guard._sd_start(msg) < 0:
        assert loop_guard.mark(msg, b"me") is msg


_PIECES = st.sampled_from([b"@", b"a@b ", b"relay", b"@32473", loop_guard.SD_ID, b"x" * 700, b" "])


@settings(max_examples=400)
@given(st.lists(_PIECES, max_size=60))
def test_has_sd_id_is_find(pieces: list[bytes]) -> None:
    # checked '@' by '@' up to a budget, then by find: the same answer either way
    data = b"".join(pieces)
    assert loop_guard.has_sd_id(data) == (loop_guard.SD_ID in data)


def test_has_sd_id_after_many_ats() -> None:
    data = b"@" * 5000 + loop_guard.SD_ID
    assert loop_guard.has_sd_id(data)
    assert not loop_guard.has_sd_id(data[:-1])


_MESSAGES = st.one_of(
    st.sampled_from(
        [
            BASE + b" - hello",
            BASE + b" -",
            BASE + b' [x@1 k="v"] hi',
            BASE + b' [relay@32473 via="b"][x@1 k="v"] hi',
            BASE + b' [relay@32473 via=""] empty via',
            BASE + b' [relay@32473 via="b" unterminated',
            b"<13>Nov 26 01:02:03 host app: 3164 is not marked",
            b"garbage",
            b"",
            b"<1>1 a b c d e [",
        ]
    ),
    st.binary(max_size=60),
    st.lists(_HEADERISH, max_size=3).map(b"".join),
)


@given(st.lists(_MESSAGES, max_size=20), st.binary(max_size=5), st.binary(max_size=5))
def test_mark_octet_is_mark_of_each_frame(msgs: list[bytes], before: bytes, after: bytes) -> None:
    """The one-pass marking of a run equals mark() of each message, framed again."""
    frames = b"".join(b"%d %b" % (len(m), m) for m in msgs)
    data = before + frames + after  # the run sits inside a larger chunk
    out: list[bytes] = []
    unguarded = loop_guard.mark_octet(data, len(before), len(before) + len(frames), b"a", out)
    marked = [mark(m, b"a") for m in msgs]
    assert b"".join(out) == b"".join(b"%d %b" % (len(m), m) for m in marked)
    assert unguarded == sum(1 for m, f in zip(msgs, marked, strict=True) if m is f)
    # As the router calls it: told whether the chunk can hold an element at all.
    again: list[bytes] = []
    relayed = loop_guard.has_sd_id(data)
    loop_guard.mark_octet(data, len(before), len(before) + len(frames), b"a", again, relayed)
    assert again == out
