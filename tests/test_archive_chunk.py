"""Pure parts of the archiver: chunks, manifests, keys, time ranges, record streams."""

from __future__ import annotations

import hashlib
import io
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archive import manifest as mf
from archive.chunk import ChunkError, compress_staging
from archive.reader import (
    TimeSpecError,
    hours_between,
    iter_records,
    parse_time,
)
from relay.formats import staging_block
from tests.test_archive_helpers import HOUR, HOUR_EPOCH, Msg, mixed_traffic, write_staging

PART = "20261126T010203000000Z"


def _frames(data: bytes) -> list[bytes]:
    """Split a chunk into its zstd frames (each must decompress on its own)."""
    out = []
    pos = 0
    while pos < len(data):
        size = zstandard.frame_header_size(data[pos:]) and _frame_len(data[pos:])
        out.append(data[pos : pos + size])
        pos += size
    return out


def _frame_len(data: bytes) -> int:
    # Decompress one frame with a fresh object and count what it consumed.
    obj = zstandard.ZstdDecompressor().decompressobj()
    obj.decompress(data)
    return len(data) - len(obj.unused_data)


def test_chunk_is_staging_file_as_independent_frames(tmp_path: Path) -> None:
    msgs = mixed_traffic(3000)
    src = write_staging(tmp_path, "r1", HOUR, PART, msgs)
    dst = tmp_path / "c.zst"
    info = compress_staging(src, dst, level=3, frame_size=64 * 1024)
    raw = src.read_bytes()
    comp = dst.read_bytes()
    assert (
        zstandard.ZstdDecompressor().stream_reader(io.BytesIO(comp), read_across_frames=True).read()
        == raw
    )
    frames = _frames(comp)
    assert len(frames) == info.frames > 1
    # Every frame but the last holds exactly frame_size raw bytes, alone.
    for fr in frames[:-1]:
        assert len(zstandard.ZstdDecompressor().decompress(fr)) == 64 * 1024
    assert info.raw_sha256 == hashlib.sha256(raw).hexdigest()
    assert info.compressed_sha256 == hashlib.sha256(comp).hexdigest()
    assert (info.raw_size, info.compressed_size) == (len(raw), len(comp))
    assert info.count == len(msgs)
    assert (info.relay, info.hour, info.part) == ("r1", HOUR, PART)
    assert info.first_recv == staging_block.format_recv(msgs[0].recv).decode()
    assert info.last_recv == staging_block.format_recv(msgs[-1].recv).decode()
    assert set(info.hosts) == {m.host.decode() for m in msgs}
    assert info.damaged_at is None


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(st.tuples(st.binary(max_size=300), st.binary(min_size=0, max_size=20)), max_size=60),
    st.sampled_from([64 * 1024, 100_000]),
)
def test_records_round_trip_any_bytes(
    tmp_path: Path, items: list[tuple[bytes, bytes]], frame_size: int
) -> None:
    msgs = [
        Msg(HOUR_EPOCH + i, b"udp://[::1]:514", host, body) for i, (body, host) in enumerate(items)
    ]
    src = write_staging(tmp_path, "r1", HOUR, PART, msgs)
    dst = tmp_path / "c.zst"
    info = compress_staging(src, dst, level=1, frame_size=frame_size)
    assert info.count == len(msgs)
    data = dst.read_bytes()
    dec = zstandard.ZstdDecompressor()
    raw = dec.stream_reader(io.BytesIO(data), read_across_frames=True).read()
    # Feed the decoder in odd-sized blocks: records cross block boundaries.
    got = list(iter_records(raw[i : i + 97] for i in range(0, len(raw), 97)))
    assert [r.msg for r in got] == [m.msg for m in msgs]
    assert [r.host for r in got] == [staging_block.sanitize_host(m.host) for m in msgs]


def test_damaged_staging_is_archived_whole_and_flagged(tmp_path: Path) -> None:
    src = write_staging(tmp_path, "r1", HOUR, PART, mixed_traffic(50))
    good = src.stat().st_size
    with open(src, "ab") as f:
        f.write(b"2026-11-26T01:00:00.000000Z x y - 5 abcdeX")  # check byte is not LF
    info = compress_staging(src, tmp_path / "c.zst", level=3, frame_size=64 * 1024)
    assert info.count == 50
    assert info.damaged_at == good
    assert info.damage is not None
    assert info.raw_size == src.stat().st_size  # nothing dropped


def test_not_a_staging_file(tmp_path: Path) -> None:
    p = tmp_path / "x.stg"
    p.write_bytes(b"hello\nworld\n")
    with pytest.raises(ChunkError):
        compress_staging(p, tmp_path / "c.zst", level=3, frame_size=64 * 1024)


def test_memory_is_bounded_by_frame_not_file(tmp_path: Path) -> None:
    # ~12 MB of staging; with 64 KiB frames the peak must stay far below it.
    msgs = [Msg(HOUR_EPOCH, b"udp://h:1", b"h", b"x" * 4000 + b"%d" % i) for i in range(3000)]
    src = write_staging(tmp_path, "r1", HOUR, PART, msgs)
    assert src.stat().st_size > 10_000_000
    tracemalloc.start()
    try:
        compress_staging(src, tmp_path / "c.zst", level=1, frame_size=64 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 6_000_000


@pytest.mark.parametrize(
    ("prefix", "hour", "relay", "part", "expected"),
    [
        ("syslog", "2026-11-26T01", "r1", PART, f"syslog/date=2026-11-26/hour=01/r1-{PART}"),
        ("/a/b/", "2026-01-02T23", "relay-x", PART, f"a/b/date=2026-01-02/hour=23/relay-x-{PART}"),
        ("", "2026-01-02T00", "r", PART, f"date=2026-01-02/hour=00/r-{PART}"),
    ],
)
def test_keys(prefix: str, hour: str, relay: str, part: str, expected: str) -> None:
    assert mf.chunk_key(prefix, relay, hour, part) == expected + ".log.zst"
    assert mf.manifest_key(prefix, relay, hour, part) == expected + ".manifest.json"
    assert mf.manifest_key_for_chunk(expected + ".log.zst") == expected + ".manifest.json"


@pytest.mark.parametrize("bad", ["2026-11-26", "2026-11-26T1", "x", "2026-11-26Tab"])
def test_bad_hour_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        mf.hour_prefix("p", bad)


def test_manifest_round_trip_and_chain(tmp_path: Path) -> None:
    src = write_staging(tmp_path, "r1", HOUR, PART, mixed_traffic(10))
    info = compress_staging(src, tmp_path / "c.zst", level=3, frame_size=64 * 1024)
    now = datetime(2026, 11, 26, 2, 5, tzinfo=UTC)
    first = mf.build(info, "k1", None, "chainA", now)
    assert (first.seq, first.chain_id, first.prev_manifest_sha256) == (1, "chainA", None)
    data = first.to_bytes()
    assert mf.parse(data) == first
    link = mf.ChainLink("chainA", 1, "m1", mf.sha256_hex(data))
    second = mf.build(info, "k2", link, "ignored", now)
    assert (second.seq, second.chain_id) == (2, "chainA")
    assert second.prev_manifest_sha256 == hashlib.sha256(data).hexdigest()
    assert second.prev_manifest_key == "m1"


@pytest.mark.parametrize("data", [b"nope", b"[]", b'{"format": 2}', b'{"format": 1, "relay": "x"}'])
def test_manifest_parse_errors(data: bytes) -> None:
    with pytest.raises(mf.ManifestError):
        mf.parse(data)


NOW = datetime(2026, 11, 26, 3, 17, 5, tzinfo=UTC)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("2026-11-26T01", datetime(2026, 11, 26, 1, tzinfo=UTC)),
        ("2026-11-26T01:30", datetime(2026, 11, 26, 1, 30, tzinfo=UTC)),
        ("2026-11-26T01:30:15Z", datetime(2026, 11, 26, 1, 30, 15, tzinfo=UTC)),
        ("2026-11-26T03:30:00+02:00", datetime(2026, 11, 26, 1, 30, tzinfo=UTC)),
        ("now", NOW),
        ("-2h", NOW - timedelta(hours=2)),
        ("-90m", NOW - timedelta(minutes=90)),
    ],
)
def test_parse_time(spec: str, expected: datetime) -> None:
    assert parse_time(spec, NOW) == expected


@pytest.mark.parametrize("spec", ["yesterday", "-2x", "2026-13-01T00", ""])
def test_parse_time_rejects(spec: str) -> None:
    with pytest.raises(TimeSpecError):
        parse_time(spec, NOW)


def test_hours_between_inclusive() -> None:
    a = datetime(2026, 11, 26, 1, 30, tzinfo=UTC)
    assert hours_between(a, a) == ["2026-11-26T01"]
    assert hours_between(a, datetime(2026, 11, 26, 3, tzinfo=UTC)) == [
        "2026-11-26T01",
        "2026-11-26T02",
        "2026-11-26T03",
    ]
