"""StagingStore: hour files, parts, close, recovery after a torn write."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.disk.staging import StagingStore, hour_index, hour_name, parse_file_name
from relay.formats import octet, staging_block

H = hour_index("2026-11-26T01")
T0 = H * 3600 + 10.0  # ten seconds into the hour


def rec(msg: bytes, recv: float = T0) -> bytes:
    """One staging block holding ``msg``."""
    block = (staging_block.FRAMING_OCTET, b"-", 1, octet.encode_many([msg]))
    return staging_block.encode_blocks(
        staging_block.format_recv(recv), b"tcp://127.0.0.1:1", [block]
    )


def read_msgs(path: Path) -> list[bytes]:
    data = path.read_bytes()
    header_end = data.index(b"\n") + 1
    return [r.msg for _, r in staging_block.iter_records(data, header_end)]


def all_files(store: StagingStore) -> list[Path]:
    return sorted(store.open_dir.glob("*.stg")) + sorted(store.closed_dir.glob("*.stg"))


@pytest.fixture
def store(tmp_path: Path) -> StagingStore:
    s = StagingStore(tmp_path / "staging", "relay-a", grace=300)
    s.recover(T0)
    return s


def test_append_groups_by_hour_and_keeps_bytes(store: StagingStore) -> None:
    store.append(H, rec(b"<13>1 a\nwith LF") + rec(b"b\x00nul"), T0)
    store.append(H + 1, rec(b"next hour"), T0)
    store.append(H, rec(b"c"), T0 + 1)
    store.sync()
    files = all_files(store)
    assert len(files) == 2
    by_hour = {parse_file_name(f.name)[0]: f for f in files}  # type: ignore[index]
    assert read_msgs(by_hour[H]) == [b"<13>1 a\nwith LF", b"b\x00nul", b"c"]
    assert read_msgs(by_hour[H + 1]) == [b"next hour"]
    header = staging_block.parse_file_header(by_hour[H].read_bytes().split(b"\n", 1)[0])
    assert header["relay"] == "relay-a" and header["hour"] == hour_name(H)


def test_roll_closes_after_hour_plus_grace(store: StagingStore) -> None:
    store.append(H, rec(b"x"), T0)
    assert store.roll((H + 1) * 3600 + 299) == []
    closed = store.roll((H + 1) * 3600 + 300)
    assert len(closed) == 1
    assert (store.closed_dir / closed[0]).exists()
    assert list(store.open_dir.iterdir()) == []


def test_late_message_gets_new_part(store: StagingStore) -> None:
    store.append(H, rec(b"on time"), T0)
    late_now = (H + 1) * 3600 + 400
    store.roll(late_now)
    store.append(H, rec(b"late"), late_now)
    assert len(store.open_parts) == 1
    # the late part has its own grace period
    assert store.roll(late_now + 299) == []
    assert len(store.roll(late_now + 300)) == 1
    files = sorted(store.closed_dir.glob("*.stg"))
    assert len(files) == 2
    assert [read_msgs(f) for f in files] == [[b"on time"], [b"late"]]
    assert len({f.name for f in files}) == 2


def test_many_open_hours(store: StagingStore) -> None:
    for i in range(30):
        store.append(H - i, rec(b"m%d" % i), T0)
    assert len(store.open_parts) == 30
    store.sync()
    assert sum(len(read_msgs(f)) for f in all_files(store)) == 30


def test_open_parts_are_bounded(tmp_path: Path) -> None:
    s = StagingStore(tmp_path, "r", grace=300, max_open_parts=4)
    s.recover(T0)
    for i in range(10):
        s.append(H - i, rec(b"m"), T0 + i)
    assert len(s.open_parts) == 4
    assert len(list(s.closed_dir.glob("*.stg"))) == 6


def test_recovery_cuts_torn_tail_and_continues(tmp_path: Path) -> None:
    s = StagingStore(tmp_path, "r", grace=300)
    s.recover(T0)
    s.append(H, rec(b"one") + rec(b"two"), T0)
    s.sync()
    path = next(s.open_dir.glob("*.stg"))
    good_size = path.stat().st_size
    # Simulate a power loss in the middle of a write: half a record at the end.
    with open(path, "ab") as f:
        f.write(rec(b"three-torn")[:20])
    s2 = StagingStore(tmp_path, "r", grace=300)
    report = s2.recover(T0 + 5)
    assert report.torn_bytes == 20
    assert path.stat().st_size == good_size
    s2.append(H, rec(b"four"), T0 + 6)
    s2.sync()
    assert read_msgs(path) == [b"one", b"two", b"four"]


def test_recovery_closes_past_hours(tmp_path: Path) -> None:
    s = StagingStore(tmp_path, "r", grace=300)
    s.recover(T0)
    s.append(H, rec(b"one"), T0)
    s.close_all()
    s2 = StagingStore(tmp_path, "r", grace=300)
    report = s2.recover((H + 2) * 3600)
    assert len(report.closed) == 1
    assert read_msgs(next(s2.closed_dir.glob("*.stg"))) == [b"one"]


def test_recovery_closes_a_format_1_file_and_writes_format_2_to_a_new_part(
    tmp_path: Path,
) -> None:
    s = StagingStore(tmp_path, "r", grace=300)
    s.recover(T0)
    old = s.open_dir / f"{hour_name(H)}--20261126T010000000000Z.stg"
    v1 = staging_block.encode(
        staging_block.format_recv(T0), b"tcp://127.0.0.1:1", b"host", b"-", b"old"
    )
    old.write_bytes(staging_block.HEADER_PREFIX_1 + b"relay=r hour=x part=y\n" + v1)
    s2 = StagingStore(tmp_path, "r", grace=300)
    report = s2.recover(T0 + 1)
    assert report.closed == [old.name]
    assert read_msgs(s2.closed_dir / old.name) == [b"old"]
    s2.append(H, rec(b"new"), T0 + 2)
    (new,) = s2.open_dir.glob("*.stg")
    assert new.read_bytes().startswith(staging_block.HEADER_PREFIX)
    assert read_msgs(new) == [b"new"]


def test_recovery_quarantines_garbage(tmp_path: Path) -> None:
    s = StagingStore(tmp_path, "r", grace=300)
    s.recover(T0)
    bad = s.open_dir / f"{hour_name(H)}--20261126T010000000000Z.stg"
    bad.write_bytes(b"\x00garbage")
    s2 = StagingStore(tmp_path, "r", grace=300)
    report = s2.recover(T0)
    assert not bad.exists()
    assert (tmp_path / "corrupt" / bad.name).exists()
    assert any("corrupt" in p for p in report.problems)


def test_failed_write_leaves_no_torn_record(store: StagingStore, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    store.append(H, rec(b"ok"), T0)
    real_write = os.write
    calls = {"n": 0}

    def short_then_fail(fd: int, data: object) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data)[:5])  # type: ignore[call-overload]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", short_then_fail)
    with pytest.raises(OSError, match="No space"):
        store.append(H, rec(b"lost-to-enospc"), T0)
    monkeypatch.setattr(os, "write", real_write)
    store.append(H, rec(b"after"), T0)
    store.sync()
    assert read_msgs(next(store.open_dir.glob("*.stg"))) == [b"ok", b"after"]


def test_writev_append_of_many_buffers_survives_partial_writes(
    store: StagingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Buffers go out with writev; a short write (allowed for regular files) is resumed."""
    real = os.writev

    def short(fd: int, buffers: list[memoryview]) -> int:
        first = buffers[0]
        return real(fd, [first[: max(1, len(first) // 2)]])  # at most half a buffer

    monkeypatch.setattr(os, "writev", short)
    blocks = [rec(b"m%04d" % i) for i in range(1500)]  # more buffers than IOV_MAX
    store.append(H, [memoryview(b) for b in blocks], T0)
    monkeypatch.setattr(os, "writev", real)
    store.append(H, [memoryview(b) for b in blocks], T0)  # whole writes, in IOV_MAX slices
    store.sync()
    (path,) = all_files(store)
    assert read_msgs(path) == [b"m%04d" % i for i in range(1500)] * 2


# --- recovery from damage in the middle of a file (issue 11.4)


def block_of(msgs: list[bytes]) -> bytes:
    block = (staging_block.FRAMING_OCTET, b"-", len(msgs), octet.encode_many(msgs))
    return staging_block.encode_blocks(staging_block.format_recv(T0), b"tcp://127.0.0.1:1", [block])


def hour_file(
    root: Path, blocks: int = 200, per_block: int = 100
) -> tuple[Path, list[list[bytes]], list[int]]:
    """An open staging file of ``blocks`` blocks; returns it, their messages and offsets."""
    s = StagingStore(root, "r", grace=300)
    s.recover(T0)
    batches = [
        [
            b"<13>1 2026-11-26T01:00:10.000Z host%d app - - - block %d message %d of the hour"
            % (b % 7, b, i)
            for i in range(per_block)
        ]
        for b in range(blocks)
    ]
    for msgs in batches:
        s.append(H, block_of(msgs), T0)
    s.close_all()
    (path,) = s.open_dir.glob("*.stg")
    pos = path.read_bytes().index(b"\n") + 1
    offsets = []
    for msgs in batches:
        offsets.append(pos)
        pos += len(block_of(msgs))
    assert pos == path.stat().st_size
    return path, batches, offsets


def block_msgs(path: Path) -> list[bytes]:
    """The messages of every block (CRC checked), whatever COUNT says."""
    data = path.read_bytes()
    pos, out = data.index(b"\n") + 1, []
    while pos < len(data):
        header, payload, pos = staging_block.decode_block(data, pos)
        assert header is not None
        out += staging_block.split_payload(payload, header[2])
    return out


def flip(path: Path, offset: int, bit: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ bit]))


def header_field(path: Path, offset: int, index: int) -> int:
    """Offset of the last byte of field ``index`` (0: RECV) of the block header at ``offset``."""
    with open(path, "rb") as f:
        f.seek(offset)
        line = f.read(512).split(b"\n", 1)[0]
    fields = line[1:].split(b" ")
    return offset + 1 + sum(len(x) + 1 for x in fields[:index]) + len(fields[index]) - 1


@pytest.mark.parametrize("where", ["payload", "mark", "length", "check byte"])
def test_one_flipped_bit_in_block_6_costs_only_block_6(tmp_path: Path, where: str) -> None:
    path, batches, offsets = hour_file(tmp_path)
    assert sum(map(len, batches)) == 20_000
    b6, b7 = offsets[6], offsets[7]
    at = {
        "payload": b6 + (b7 - b6) // 2,
        "mark": b6,
        "length": header_field(path, b6, 5),
        "check byte": b7 - 1,
    }[where]
    flip(path, at)
    damaged = path.read_bytes()[b6:b7]

    s2 = StagingStore(tmp_path, "r", grace=300)
    report = s2.recover(T0 + 5)
    assert (report.corrupt_regions, report.corrupt_bytes, report.torn_bytes) == (1, b7 - b6, 0)
    assert any(f"at offset {b6}" in p for p in report.problems), report.problems
    expected = [m for i, msgs in enumerate(batches) if i != 6 for m in msgs]
    assert read_msgs(path) == expected
    # The damaged block's bytes are kept, not deleted.
    assert (tmp_path / "corrupt" / f"{path.name}.at-{b6}").read_bytes() == damaged
    # The file is still the hour's open part: appending goes on after the kept blocks.
    s2.append(H, rec(b"after restart"), T0 + 6)
    s2.sync()
    assert read_msgs(path) == [*expected, b"after restart"]


def test_torn_tail_is_cut_and_middle_damage_set_aside_together(tmp_path: Path) -> None:
    path, batches, offsets = hour_file(tmp_path, blocks=20, per_block=10)
    flip(path, offsets[6] + 200)
    torn = block_of([b"never finished"])[:-7]
    with open(path, "ab") as f:
        f.write(torn)
    report = StagingStore(tmp_path, "r", grace=300).recover(T0 + 5)
    assert report.torn_bytes == len(torn)
    assert report.corrupt_regions == 1
    assert read_msgs(path) == [m for i, msgs in enumerate(batches) if i != 6 for m in msgs]
    assert [p.name for p in (tmp_path / "corrupt").iterdir()] == [f"{path.name}.at-{offsets[6]}"]


def test_a_damaged_last_block_is_set_aside_not_cut_as_torn(tmp_path: Path) -> None:
    path, batches, offsets = hour_file(tmp_path, blocks=5, per_block=10)
    flip(path, path.stat().st_size - 30)
    last = path.read_bytes()[offsets[4] :]
    report = StagingStore(tmp_path, "r", grace=300).recover(T0 + 5)
    assert (report.torn_bytes, report.corrupt_regions) == (0, 1)
    assert read_msgs(path) == [m for msgs in batches[:4] for m in msgs]
    assert (tmp_path / "corrupt" / f"{path.name}.at-{offsets[4]}").read_bytes() == last


def test_a_damaged_header_line_keeps_the_blocks_under_a_new_one(tmp_path: Path) -> None:
    path, batches, offsets = hour_file(tmp_path, blocks=5, per_block=10)
    original = path.read_bytes()[: offsets[0]]
    flip(path, original.index(b"hour=") + 6)  # a hour in the header no longer its own
    report = StagingStore(tmp_path, "r", grace=300).recover(T0 + 5)
    assert report.corrupt_regions == 1
    assert path.read_bytes()[: offsets[0]] == original
    assert read_msgs(path) == [m for msgs in batches for m in msgs]


def test_recovery_reads_in_bounded_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tracemalloc

    from relay.disk import staging

    path, _, offsets = hour_file(tmp_path)
    flip(path, offsets[6] + 300)
    size = path.stat().st_size
    piece = 64 * 1024
    assert size > 20 * piece
    monkeypatch.setattr(staging, "_READ", piece)
    reads: list[int] = []
    real_pread = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        reads.append(n)
        return real_pread(fd, n, offset)

    def read_whole(*_: object) -> bytes:
        raise AssertionError("recovery must not read a whole file")

    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(Path, "read_bytes", read_whole)
    tracemalloc.start()
    try:
        report = StagingStore(tmp_path, "r", grace=300).recover(T0 + 5)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    monkeypatch.undo()
    assert report.corrupt_regions == 1
    assert reads and max(reads) <= piece
    assert peak < size / 4, (peak, size)
    assert len(read_msgs(path)) == 20_000 - 100


def test_the_archiver_reads_a_recovered_file_whole(tmp_path: Path) -> None:
    from archive.chunk import compress_staging

    path, _, offsets = hour_file(tmp_path / "staging")
    flip(path, offsets[6] + 300)
    before = compress_staging(path, tmp_path / "before.zst", level=1, frame_size=64 * 1024)
    assert before.damaged_at == offsets[6]  # unrecovered: the archiver stops counting there
    s2 = StagingStore(tmp_path / "staging", "r", grace=300)
    s2.recover((H + 2) * 3600)  # the hour is over: checked, then closed for the archiver
    (closed,) = s2.closed_dir.glob("*.stg")
    info = compress_staging(closed, tmp_path / "after.zst", level=1, frame_size=64 * 1024)
    assert (info.count, info.damaged_at, info.damage) == (19_900, None, None)
    assert info.hosts == tuple(f"host{i}" for i in range(7))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    where=st.integers(0, 10**9),
    garbage=st.binary(min_size=1, max_size=300),
    mode=st.sampled_from(["overwrite", "insert", "cut"]),
)
def test_any_damage_costs_only_the_blocks_it_touches(
    tmp_path_factory: pytest.TempPathFactory, where: int, garbage: bytes, mode: str
) -> None:
    root = tmp_path_factory.mktemp("damage")
    path, batches, offsets = hour_file(root, blocks=12, per_block=5)
    data = path.read_bytes()
    at = offsets[0] + where % (len(data) - offsets[0])
    if mode == "overwrite":
        damaged = data[:at] + garbage + data[at + len(garbage) :]
    elif mode == "insert":
        damaged = data[:at] + garbage + data[at:]
    else:
        damaged = data[:at]
    path.write_bytes(damaged)
    StagingStore(root, "r", grace=300).recover(T0 + 5)  # never raises
    ends = [*offsets[1:], len(data)]
    if mode == "overwrite":
        untouched = [b <= at or a >= at + len(garbage) for a, b in zip(offsets, ends, strict=True)]
    elif mode == "insert":
        untouched = [b <= at or a >= at for a, b in zip(offsets, ends, strict=True)]
    else:
        untouched = [b <= at for b in ends]
    # Whole blocks survive, in order: every untouched one, and a touched one only if it
    # is still valid (its payload is under a CRC; RECV, SENDER, FLAGS and, in an octet-
    # counted block, COUNT are not checked at recovery).
    got = block_msgs(path)
    kept = sorted({int(m.split(b"block ")[1].split(b" ")[0]) for m in got})
    assert got == [m for i in kept for m in batches[i]]
    assert {i for i, ok in enumerate(untouched) if ok} <= set(kept)


def test_no_room_to_repair_closes_the_file_unrepaired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from relay.disk import staging

    path, _, offsets = hour_file(tmp_path, blocks=5, per_block=10)
    flip(path, offsets[2] + 100)
    before = path.read_bytes()

    def full(*_: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(staging, "_copy_ranges", full)
    s2 = StagingStore(tmp_path, "r", grace=300)
    report = s2.recover(T0 + 5)
    # Nothing lost: the file goes to the archiver as it is (its manifest names the damage).
    assert report.closed == [path.name] and report.corrupt_regions == 0
    assert any("closing it unrepaired" in p for p in report.problems)
    assert (s2.closed_dir / path.name).read_bytes() == before
    assert not list(s2.open_dir.iterdir())


def test_a_count_that_does_not_match_an_lf_block_is_set_aside(tmp_path: Path) -> None:
    s = StagingStore(tmp_path, "r", grace=300)
    s.recover(T0)
    lines = [b"<13>1 - h app - - - line %d" % i for i in range(5)]
    block = (staging_block.FRAMING_LF, b"-", 5, b"".join(m + b"\n" for m in lines))
    recv = staging_block.format_recv(T0)
    for _ in range(3):
        s.append(H, staging_block.encode_blocks(recv, b"tcp://127.0.0.1:1", [block]), T0)
    s.close_all()
    (path,) = s.open_dir.glob("*.stg")
    data = path.read_bytes()
    second = data.index(b"\n@", data.index(b"\n@") + 1) + 1
    flip(path, header_field(path, second, 4))  # COUNT 5 -> 4
    report = StagingStore(tmp_path, "r", grace=300).recover(T0 + 5)
    assert report.corrupt_regions == 1
    assert read_msgs(path) == lines * 2


def test_block_header_parses_what_block_header_writes() -> None:
    payload = b"3 abc3 def"
    line = staging_block.block_header(b"2026-01-01T00:00:00Z", b"tcp://h:1", b"o", b"-", 2, payload)
    header, length, crc = staging_block.parse_block_header(line[1:-1])
    assert header == (b"2026-01-01T00:00:00Z", b"tcp://h:1", b"o", b"-", 2)
    assert (length, crc) == (len(payload), zlib.crc32(payload))


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"t s o - 1 5", "seven fields"),
        (b"t s o - x 5 00000000", "count or length"),
        (b"t s o - 1 1234567890123 00000000", "count or length"),
    ],
)
def test_block_header_damage_names_the_field(line: bytes, reason: str) -> None:
    with pytest.raises(staging_block.RecordError, match=reason) as exc:
        staging_block.parse_block_header(line, 7)
    assert exc.value.offset == 7


@pytest.mark.parametrize("crc", [b"0000000", b"0000000g", b"-0000001", b"000000000"])
def test_block_header_crc_field_that_is_not_eight_hex_digits(crc: bytes) -> None:
    assert staging_block.parse_block_header(b"t s o - 1 5 " + crc)[2] is None
