"""RFC 6587 framer: vectors, bad input from issue 2, chunking invariance, fuzzing."""

from __future__ import annotations

from datetime import UTC

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.formats import octet
from relay.framing.hour_runs import HourIndex
from relay.framing.rfc6587 import Frame, Framer, FramingError, messages

SLACK = 11  # count digits + SP that may be held beyond max_size
INDEX = HourIndex(UTC, 3600.0)


def feed(f: Framer, data: bytes) -> tuple[list[Frame], list[FramingError]]:
    """The frames ``data`` completes, every one a Frame, and the framing reports."""
    items, errors = f.feed_runs(data, INDEX)
    return [m if isinstance(m, Frame) else Frame(m) for m in messages(data, items)], errors


def run(
    stream: bytes, chunks: list[int] | None = None, **kw: object
) -> tuple[list[Frame], list[FramingError]]:
    """Feed ``stream`` (whole, or split at the given sizes), then close."""
    kw.setdefault("max_size", 65536)
    f = Framer(**kw)  # type: ignore[arg-type]
    frames: list[Frame] = []
    errors: list[FramingError] = []
    pos = 0
    for size in chunks or [len(stream)]:
        fr, er = feed(f, stream[pos : pos + size])
        frames += fr
        errors += er
        pos += size
        assert f.buffered <= f._max + SLACK
    fr, er = feed(f, stream[pos:])
    frames += fr
    errors += er
    fr, er = f.close()
    return frames + fr, errors + er


def kinds(errors: list[FramingError]) -> list[tuple[str, bool, int]]:
    return [(e.kind, e.fatal, e.offset) for e in errors]


def msgs(frames: list[Frame]) -> list[bytes]:
    return [f.msg for f in frames]


@pytest.mark.parametrize(
    "mode,stream,expected",
    [
        ("octet-counting", b"5 hello6 world!", [b"hello", b"world!"]),
        ("octet-counting", b"3 a\nb", [b"a\nb"]),  # LF inside a counted frame is data
        ("lf", b"hello\nworld\n", [b"hello", b"world"]),
        ("lf", b"5 hello\n", [b"5 hello"]),  # no count detection in lf mode
        ("lf", b"cr kept\r\n", [b"cr kept\r"]),
        ("auto", b"5 hello<13>line\n3 abc", [b"hello", b"<13>line", b"abc"]),
        ("auto", b"<13>a\n<13>b\n", [b"<13>a", b"<13>b"]),
        ("auto", b"2 \x00\x01<1>nul\x00inside\n", [b"\x00\x01", b"<1>nul\x00inside"]),
        ("auto", b"4 \xff\xfe\xc3(<1>\xff\n", [b"\xff\xfe\xc3(", b"<1>\xff"]),
        ("octet-counting", b"007 leading", [b"leading"]),
    ],
)
def test_vectors(mode: str, stream: bytes, expected: list[bytes]) -> None:
    frames, errors = run(stream, mode=mode)
    assert msgs(frames) == expected
    assert errors == []
    assert not any(f.truncated or f.cut for f in frames)


def test_twenty_digit_length_is_fatal_and_not_buffered() -> None:
    stream = b"9" * 20 + b" " + b"x" * 100
    f = Framer("auto", 65536)
    frames: list[Frame] = []
    errors: list[FramingError] = []
    for k in range(len(stream)):
        fr, er = feed(f, stream[k : k + 1])
        frames += fr
        errors += er
        assert f.buffered <= 10
    assert kinds(errors) == [("length_too_long", True, 0)]
    # What was read up to the error is kept (the connection closes after it).
    assert frames == [Frame(b"9" * 11, malformed=True)]
    # One feed: the detail names the digit count.
    frames, errors = feed(Framer("auto", 65536), b"1 a" + stream)
    assert kinds(errors) == [("length_too_long", True, 3)]
    assert "20 digits (max 10)" in errors[0].detail
    assert frames == [Frame(b"a"), Frame(stream, malformed=True)]


def test_dead_after_fatal() -> None:
    f = Framer("octet-counting", 65536)
    frames, errors = feed(f, b"3 abc12x4 data")
    assert frames == [Frame(b"abc"), Frame(b"12x4 data", malformed=True)]
    assert kinds(errors) == [("bad_length", True, 5)]
    assert f.dead
    assert feed(f, b"3 abc") == ([], [])
    assert f.close() == ([], [])
    assert f.buffered == 0


@pytest.mark.parametrize(
    "mode,stream,offset",
    [
        ("octet-counting", b"abc", 0),  # octet mode insists on a count
        ("octet-counting", b" 5 hello", 0),  # count missing before SP
        ("auto", b"2 ok12\n", 4),  # LF where SP belongs
        ("auto", b"12a4 x", 0),
        ("auto", b"2026-11-26 not a count\n", 0),  # rsyslog would say the same
    ],
)
def test_bad_length_is_fatal(mode: str, stream: bytes, offset: int) -> None:
    frames, errors = run(stream, mode=mode)
    assert kinds(errors) == [("bad_length", True, offset)]
    # The rest of the read is kept, byte-exact, flagged (issue 11).
    assert [f for f in frames if f.malformed] == [Frame(stream[offset:], malformed=True)]


def test_bytes_kept_after_a_fatal_error_come_in_pieces_of_max_size() -> None:
    stream = b"2 ok" + b"1x" + b"y" * 40
    frames, errors = run(stream, mode="auto", max_size=16)
    assert kinds(errors) == [("bad_length", True, 4)]
    assert frames[0] == Frame(b"ok")
    kept = frames[1:]
    assert all(f.malformed and not f.truncated and len(f.msg) <= 16 for f in kept)
    assert b"".join(f.msg for f in kept) == stream[4:]


def test_zero_length_and_empty_lines_are_skipped() -> None:
    frames, errors = run(b"0 3 abc\n\nx\n", mode="auto")
    assert msgs(frames) == [b"abc", b"x"]
    assert kinds(errors) == [("empty", False, 0), ("empty", False, 7), ("empty", False, 8)]


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_oversize_octet_truncate_keeps_sync(size: int) -> None:
    stream = b"20 " + b"a" * 20 + b"2 ok"
    chunks = [size] * (len(stream) // size + 1)
    frames, errors = run(stream, chunks, mode="auto", max_size=8)
    assert frames == [Frame(b"a" * 8, truncated=True), Frame(b"ok")]
    assert kinds(errors) == [("oversize_truncated", False, 0)]


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_oversize_octet_reject_keeps_sync(size: int) -> None:
    stream = b"20 " + b"a" * 20 + b"2 ok"
    chunks = [size] * (len(stream) // size + 1)
    frames, errors = run(stream, chunks, mode="octet-counting", max_size=8, oversize="reject")
    assert frames == [Frame(b"ok")]
    assert kinds(errors) == [("oversize_rejected", False, 0)]


@pytest.mark.parametrize("oversize", ["truncate", "reject"])
def test_oversize_line(oversize: str) -> None:
    frames, errors = run(
        b"short\n" + b"L" * 30 + b"\nafter\n", mode="lf", max_size=8, oversize=oversize
    )
    head = [Frame(b"L" * 8, truncated=True)] if oversize == "truncate" else []
    assert frames == [Frame(b"short"), *head, Frame(b"after")]
    kind = "oversize_truncated" if oversize == "truncate" else "oversize_rejected"
    assert kinds(errors) == [(kind, False, 6)]


def test_one_mib_line_without_lf_in_many_feeds() -> None:
    max_size = 65536
    f = Framer("auto", max_size=max_size)
    frames: list[Frame] = []
    errors: list[FramingError] = []
    piece = b"<13>" + b"z" * 4092
    for _ in range(256):  # 1 MiB, no LF
        fr, er = feed(f, piece)
        frames += fr
        errors += er
        assert f.buffered <= max_size
    fr, er = feed(f, b"tail\n<13>next\n")
    frames += fr
    errors += er
    assert [len(x.msg) for x in frames] == [max_size, 8]
    assert frames[0].truncated and frames[0].msg.startswith(b"<13>zzz")
    assert frames[1] == Frame(b"<13>next")
    assert kinds(errors) == [("oversize_truncated", False, 0)]


def test_cut_octet_frame_on_close() -> None:
    f = Framer("auto", 65536)
    assert feed(f, b"3 abc10 part") == ([Frame(b"abc")], [])
    frames, errors = f.close()
    assert frames == [Frame(b"part", cut=True)]
    assert kinds(errors) == [("cut", False, 5)]
    assert feed(f, b"more") == ([], [])


@pytest.mark.parametrize(
    "stream,frames,n_errors",
    [
        (b"<13>no newline", [Frame(b"<13>no newline", cut=True)], 1),
        (b"12", [], 1),  # closed inside the count
        (b"5 ", [], 1),  # count read, no body yet
        (b"a\n", [Frame(b"a")], 0),
        (b"", [], 0),
    ],
)
def test_close_reports_cut(stream: bytes, frames: list[Frame], n_errors: int) -> None:
    got, errors = run(stream, mode="auto")
    assert got == frames
    assert [e.kind for e in errors] == ["cut"] * n_errors


STREAM = (
    b"5 hello<13>line one\r\n"
    + b"0 "
    + b"\n"
    + b"12 <13>\x00\xffbinary"
    + b"40 "
    + b"x" * 40
    + b"<14>"
    + b"y" * 30
    + b"\n3 end"
)


@pytest.mark.parametrize("oversize", ["truncate", "reject"])
def test_every_split_point_gives_the_same_result(oversize: str) -> None:
    whole = run(STREAM, mode="auto", max_size=16, oversize=oversize)
    assert len(whole[0]) >= 4
    for k in range(len(STREAM) + 1):
        frames, errors = run(STREAM, [k], mode="auto", max_size=16, oversize=oversize)
        assert frames == whole[0], k
        assert kinds(errors) == kinds(whole[1]), k
    bytewise = run(STREAM, [1] * len(STREAM), mode="auto", max_size=16, oversize=oversize)
    assert bytewise[0] == whole[0]


def test_encode_octet_counted() -> None:
    assert octet.encode(b"abc") == b"3 abc"


@given(st.lists(st.binary(max_size=300), max_size=20))
def test_octet_encoders_and_splitter_agree(msgs: list[bytes]) -> None:
    payload = octet.encode_many(msgs)
    assert payload == b"".join(map(octet.encode, msgs))
    assert octet.split(payload) == msgs
    assert octet.count(payload) == len(msgs)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"x abc", "bad octet count"),
        (b"123456789012 a", "bad octet count"),
        (b"4 abc", "runs past"),
    ],
)
def test_octet_split_and_count_name_the_damage(payload: bytes, reason: str) -> None:
    for read in (octet.split, octet.count):
        with pytest.raises(octet.OctetError, match=reason):
            read(payload)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        Framer("bogus", 65536)
    with pytest.raises(ValueError):
        Framer("auto", 65536, oversize="drop")


def _chunked(data: bytes, cuts: list[int]) -> list[int]:
    return [c % (len(data) + 1) for c in cuts]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=80), max_size=20),
    st.lists(st.integers(1, 64), min_size=1, max_size=40),
)
def test_octet_round_trip(messages: list[bytes], sizes: list[int]) -> None:
    stream = b"".join(octet.encode(m) for m in messages)
    frames, errors = run(stream, sizes, mode="octet-counting", max_size=80)
    assert msgs(frames) == messages
    assert errors == []
    frames, errors = run(stream, sizes, mode="auto", max_size=80)
    assert msgs(frames) == messages


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(min_size=1, max_size=80).filter(lambda b: b"\n" not in b), max_size=20),
    st.lists(st.integers(1, 64), min_size=1, max_size=40),
)
def test_lf_round_trip(messages: list[bytes], sizes: list[int]) -> None:
    stream = b"".join(m + b"\n" for m in messages)
    frames, errors = run(stream, sizes, mode="lf", max_size=80)
    assert msgs(frames) == messages
    assert errors == []


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=400),
    st.lists(st.integers(1, 50), min_size=1, max_size=30),
    st.sampled_from(["auto", "octet-counting", "lf"]),
    st.sampled_from(["truncate", "reject"]),
)
def test_random_bytes_any_chunking_same_result(
    data: bytes, sizes: list[int], mode: str, oversize: str
) -> None:
    # Never raises, stays bounded (checked in run), and chunking never changes the outcome.
    whole = run(data, mode=mode, max_size=16, oversize=oversize)
    split = run(data, sizes, mode=mode, max_size=16, oversize=oversize)
    assert [f for f in split[0] if not f.malformed] == [f for f in whole[0] if not f.malformed]
    assert kinds(split[1]) == kinds(whole[1])
    # After a fatal error the rest of the read is kept: of a shorter read, less.
    kept = [b"".join(f.msg for f in r[0] if f.malformed) for r in (whole, split)]
    assert kept[0].startswith(kept[1])
    fatal = [e for e in whole[1] if e.fatal]
    assert kept[0] == (data[fatal[0].offset :] if fatal else b"")
    for f in whole[0]:
        assert 0 < len(f.msg) <= 16
