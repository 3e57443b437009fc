"""``cat --grep``'s fast path against the per-line path, on real plain chunks.

The fast path searches a block's lines as one text (a literal with
``bytes.find``, or the expression in MULTILINE mode) and applies the time and
field filters only to the lines it hits; the per-line path (``run_text`` without
a LineSearch) applies every filter to every message. Both must print exactly
the messages that ``Filter.wanted`` selects one by one, for chunks holding
escaped blocks (LF and CR inside messages), blocks flagged R (receive time
stands for the message's), messages whose own time lies outside the chunk's
hour, and data frames handed out in pieces of any size.
"""

from __future__ import annotations

import functools
import io
import random
import re
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from archive import plain
from archive.chunk import compress_staging
from archive.query import Filter, line_search, required_literal, run_text
from archive.reader import plain_runs
from relay.formats import octet, staging_block
from relay.formats.staging_block import parse_recv
from tests.test_archive_helpers import HOUR, HOUR_EPOCH, mixed_traffic


@dataclass(frozen=True)
class _Block:
    recv: bytes
    flags: bytes
    msgs: list[bytes]


@functools.cache
def _chunk() -> tuple[bytes, tuple[_Block, ...]]:
    """A plain chunk of the hour HOUR and the blocks it was made from."""
    rng = random.Random(13)
    # Own times from half an hour before the chunk's hour to half an hour after it.
    msgs = mixed_traffic(1500, seed=5, start=HOUR_EPOCH - 1800, span=7200)
    blocks: list[_Block] = []
    staged = [staging_block.file_header("r1", HOUR, "20261126T010000000000Z")]
    i = 0
    while i < len(msgs):
        n = rng.randrange(1, 60)
        group = msgs[i : i + n]
        bodies = [m.msg for m in group]
        if rng.random() < 0.1:  # CRLF senders, and a bare CR
            bodies = [
                b + b"\r" if k % 3 else b.replace(b" ", b"\r", 1) for k, b in enumerate(bodies)
            ]
        recv = staging_block.format_recv(HOUR_EPOCH + 3599.0 * i / len(msgs))
        flags = b"R" if rng.random() < 0.2 else b"-"
        if rng.random() < 0.5 and not any(b"\n" in b for b in bodies):
            payload = b"".join(b + b"\n" for b in bodies)
            framing = staging_block.FRAMING_LF
        else:
            payload = octet.encode_many(bodies)
            framing = staging_block.FRAMING_OCTET
        staged.append(
            staging_block.block_header(
                recv, b"tcp://10.0.0.1:514", framing, flags, len(bodies), payload
            )
        )
        staged += [payload, b"\n"]
        blocks.append(_Block(recv, flags, bodies))
        i += n
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "s.stg", Path(d) / "c.zst"
        src.write_bytes(b"".join(staged))
        info = compress_staging(src, dst, level=3, frame_size=16384)
        assert info.damaged_at is None and info.frames > 3
        return dst.read_bytes(), tuple(blocks)


def _epoch(s: str) -> float:
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()


_GREPS = [
    None,
    rb"sshd",  # a literal: bytes.find
    rb"web0[13] ",
    rb"status=500$",
    rb"user=1\d\d ",
    rb"items/\d+ status=404",
    rb"second line",  # only in escaped blocks (messages with LF)
    rb"inside\r?$",
    rb"\r",
    rb"^<1[0-9]",
    rb"\A<2",
    rb"not utf-8\Z",
    rb"nginx|cron",
    rb"(?i)POSTFIX",
    rb"event 1",
    rb"db-1\.example\.net\ postfix",
    rb"ab*c",
]


@settings(max_examples=80, deadline=None)
@given(
    # Often the whole hour (its messages' own times not checked), often a cut of it.
    start=st.one_of(st.sampled_from([-1800, 0]), st.integers(-2400, 4000)),
    length=st.one_of(st.sampled_from([3600, 7200]), st.integers(0, 7200)),
    grep=st.sampled_from(_GREPS),
    # Mostly no field filter: the fast path alone then decides on time.
    host=st.sampled_from([None, None, None, None, b"web03", b"db-1.example.net"]),
    app=st.sampled_from([None, None, None, None, b"sshd", b"postfix/smtp"]),
    facility=st.sampled_from([None, None, None, None, 0, 4, 23]),
    severity=st.sampled_from([None, None, None, None, 0, 3, 7]),
    piece=st.sampled_from([512, 4096, plain.PIECE]),
)
def test_fast_grep_path_prints_what_the_per_line_path_prints(
    start: int,
    length: int,
    grep: bytes | None,
    host: bytes | None,
    app: bytes | None,
    facility: int | None,
    severity: int | None,
    piece: int,
) -> None:
    chunk, blocks = _chunk()
    flt = Filter(
        start=HOUR_EPOCH + start,
        end=HOUR_EPOCH + start + length,
        tz=UTC,
        host=host,
        app=app,
        facility=facility,
        severity=severity,
        grep=re.compile(grep) if grep is not None else None,
    )
    inside = flt.hour_inside(HOUR)
    want = b"".join(
        m + b"\n"
        for b in blocks
        for m in b.msgs
        if flt.wanted(m, b.flags, parse_recv(b.recv), not inside)
    )
    search = line_search(flt.grep) if flt.grep is not None else None
    # As cat reads: blocks merged where neither time nor a field filter looks at them.
    lines_only = inside and not flt.by_fields
    fast = b"".join(
        run_text(run, flt, inside, search)
        for run in plain_runs(plain.read_segments(io.BytesIO(chunk), piece=piece), lines_only)
    )
    per_line = b"".join(
        run_text(run, flt, inside, None)
        for run in plain_runs(plain.read_segments(io.BytesIO(chunk)))
    )
    assert per_line == want
    assert fast == want


def test_the_whole_hour_prints_messages_whose_own_time_is_outside_it() -> None:
    # The chunk's hour lies wholly inside the range: its messages are printed whatever
    # their own time (as before the fast path); a range cut inside the hour checks it.
    chunk, blocks = _chunk()
    grep = re.compile(rb"sshd")
    whole = Filter(
        start=_epoch("2026-11-26T01:00:00"), end=_epoch("2026-11-26T02:00:00"), tz=UTC, grep=grep
    )
    cut = Filter(
        start=_epoch("2026-11-26T01:00:00"), end=_epoch("2026-11-26T01:59:59"), tz=UTC, grep=grep
    )
    search = line_search(grep)
    out = {}
    for name, flt in (("whole", whole), ("cut", cut)):
        inside = flt.hour_inside(HOUR)
        runs = plain_runs(plain.read_segments(io.BytesIO(chunk), piece=4096))
        out[name] = b"".join(run_text(run, flt, inside, search) for run in runs)
    every = [m for b in blocks for m in b.msgs if b"sshd" in m]
    assert out["whole"] == b"".join(m + b"\n" for m in every)
    assert 0 < out["cut"].count(b"\n") < len(every)


def test_required_literal() -> None:
    cases = {
        rb"host42\.dc1\.example\.net sshd": b"host42.dc1.example.net sshd",
        rb"sshd": b"sshd",
        rb"sshd?": b"ssh",
        rb"ssh*": None,  # "ss": too short
        rb"sshd{2}": b"ssh",
        rb"abc\d": b"abc",
        rb"abc\ def": b"abc def",
        rb"abc.def": b"abc",
        rb"^abc": None,
        rb"(abc)": None,
        rb"abc|def": None,
        rb"(?i)abcd": None,
        rb"ab": None,
        rb"abc\nd": b"abc",
    }
    for pattern, literal in cases.items():
        assert required_literal(re.compile(pattern)) == literal, pattern
    assert required_literal(re.compile(rb"abcd", re.IGNORECASE)) is None
