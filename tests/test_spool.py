"""Spool: FIFO, read/ack/rewind, segments, when_full, recovery from torn and corrupt files."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from relay.disk import spool as spool_mod
from relay.disk.spool import (
    ACK_FILE,
    ACK_SLOT_SIZE,
    RECORD_HEADER_SIZE,
    SEGMENT_HEADER_SIZE,
    Spool,
    SpoolFull,
    SpoolRecord,
    SpoolWriteError,
    decode_ack,
    encode_records,
    segment_header,
)

MiB = 1024**2


def payload(i: int, size: int = 0) -> bytes:
    return b"<13>1 - host app - - - message %06d " % i + b"x" * size


def make(d: Path, max_bytes: int = 64 * MiB, **kw: object) -> Spool:
    s = Spool(d, max_bytes, **kw)  # type: ignore[arg-type]
    s.open()
    return s


def read_all(s: Spool, max_records: int = 1000, max_bytes: int = MiB) -> list[SpoolRecord]:
    out: list[SpoolRecord] = []
    for _ in range(100_000):
        got = s.read(max_records, max_bytes)
        if not got:
            return out
        out.extend(got)
    raise AssertionError("read() never ran dry")


def seg_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.seg"))


def fill(s: Spool, n: int, start: int = 0, batch: int = 10, size: int = 0) -> None:
    for i in range(start, start + n, batch):
        s.append([payload(j, size) for j in range(i, min(i + batch, start + n))], 1000.0 + i)


# --- FIFO, seqs, read/ack/rewind


def test_fifo_order_and_payloads_byte_exact(tmp_path: Path) -> None:
    s = make(tmp_path / "sp")
    odd = [b"", b"\x00\n\xff" * 50, b"\xd3SP\x01" * 10]  # empty, binary, record magic inside
    s.append(odd, 5.0)
    fill(s, 95, start=3)
    got = read_all(s, max_records=7)
    assert [r.seq for r in got] == list(range(1, 99))
    assert [r.payload for r in got] == odd + [payload(i) for i in range(3, 98)]
    assert got[0].time == 5.0
    s.close()


def test_seq_monotonic_across_reopen_even_when_all_acked_and_ack_file_lost(tmp_path: Path) -> None:
    d = tmp_path / "sp"
    s = make(d, segment_size=1024)
    fill(s, 50)
    s.ack(read_all(s)[-1].seq)
    s.close()
    assert s.last_seq == 50
    seen = 50
    for _ in range(3):
        s = make(d, segment_size=1024)
        # Without the ack file, acked records still on disk come again (never lost).
        assert all(r.seq <= seen for r in read_all(s))
        first = s.last_seq + 1
        assert first == seen + 1
        fill(s, 5)
        got = s.read(100, MiB)
        assert [r.seq for r in got] == list(range(first, first + 5))
        s.ack(got[-1].seq)
        s.close()
        seen = got[-1].seq
        (d / ACK_FILE).unlink()


def test_read_limits_and_at_least_one_record(tmp_path: Path) -> None:
    s = make(tmp_path / "sp")
    s.append([b"a" * 100, b"b" * 100, b"c" * 5000, b"d"], 1.0)
    assert [r.payload[:1] for r in s.read(10, 150)] == [b"a"]  # b would exceed 150
    assert [r.payload[:1] for r in s.read(10, 10)] == [b"b"]  # always at least one
    assert [r.payload[:1] for r in s.read(1, MiB)] == [b"c"]
    assert [r.payload for r in s.read(10, MiB)] == [b"d"]
    assert s.read(10, MiB) == []
    s.close()


def test_read_ack_rewind_replays_only_in_flight(tmp_path: Path) -> None:
    s = make(tmp_path / "sp")
    fill(s, 20)
    assert [r.seq for r in s.read(5, MiB)] == [1, 2, 3, 4, 5]
    assert [r.seq for r in s.read(5, MiB)] == [6, 7, 8, 9, 10]
    s.ack(3)
    assert s.depth_records == 17
    s.rewind()
    assert [r.seq for r in s.read(4, MiB)] == [4, 5, 6, 7]
    s.ack(7)
    s.rewind()  # nothing in flight: no change
    assert [r.seq for r in s.read(100, MiB)] == list(range(8, 21))
    s.rewind()
    assert [r.seq for r in s.read(100, MiB)] == list(range(8, 21))
    s.close()


def test_ack_is_clamped_to_what_was_handed_out(tmp_path: Path) -> None:
    s = make(tmp_path / "sp")
    fill(s, 10)
    s.read(4, MiB)
    s.ack(1000)
    assert s.acked_seq == 4
    assert [r.seq for r in s.read(100, MiB)] == list(range(5, 11))
    s.ack(2)  # going back is ignored
    assert s.acked_seq == 4
    s.close()


def test_unacked_records_come_back_after_reopen(tmp_path: Path) -> None:
    d = tmp_path / "sp"
    s = make(d)
    fill(s, 30)
    s.read(10, MiB)
    s.ack(10)
    s.read(10, MiB)  # in flight, never acked
    s.close()
    s = make(d)
    assert s.depth_records == 20
    assert [r.seq for r in read_all(s)] == list(range(11, 31))
    s.close()


def test_recovery_report_counts_only_unacked_records(tmp_path: Path) -> None:
    """The restart log says "N records to deliver": N must not count acked records."""
    d = tmp_path / "sp"
    s = make(d)
    fill(s, 60)
    s.read(40, MiB)
    s.ack(40)
    s.close()  # a clean stop persists the acked position
    s = Spool(d, 64 * MiB)
    report = s.open()
    assert (report.records, report.segments) == (20, 1)
    assert report.records == s.depth_records
    assert [r.seq for r in read_all(s)] == list(range(41, 61))
    fill(s, 5)
    assert len(read_all(s)) == 5
    s.ack(65)
    s.close()
    s = Spool(d, 64 * MiB)
    report = s.open()
    assert (report.records, report.segments) == (0, 0)
    s.close()


def test_close_twice_and_read_after_close_touch_no_descriptor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A number closed twice may already belong to another file or socket."""
    s = make(tmp_path / "sp")
    fill(s, 5)
    s.read(2, MiB)  # the reader holds a descriptor too
    closed: list[int] = []
    opened: list[object] = []
    real_close, real_open = os.close, os.open
    monkeypatch.setattr(os, "close", lambda fd: (closed.append(fd), real_close(fd))[1])
    monkeypatch.setattr(os, "open", lambda *a, **kw: (opened.append(a[0]), real_open(*a, **kw))[1])
    s.close()
    s.close()
    s._close_fds()
    assert s.read(10, MiB) == []
    assert len(closed) == len(set(closed)) >= 3  # head, acked, reader: once each
    assert opened == []


def test_depth_and_oldest_time(tmp_path: Path) -> None:
    s = make(tmp_path / "sp")
    assert (s.depth_records, s.depth_bytes, s.oldest_time) == (0, 0, None)
    s.append([b"a" * 10], 100.0)
    s.append([b"b" * 10], 200.0)
    assert s.depth_records == 2
    assert s.depth_bytes == 2 * (RECORD_HEADER_SIZE + 10)
    assert s.oldest_time == 100.0
    s.read(1, MiB)
    s.ack(1)
    assert s.oldest_time == 200.0
    s.read(1, MiB)
    s.ack(2)
    assert (s.depth_records, s.oldest_time) == (0, None)
    s.append([b"c"], 300.0)
    assert s.oldest_time == 300.0
    s.close()


def test_concurrent_writer_and_reader_threads(tmp_path: Path) -> None:
    s = make(tmp_path / "sp", segment_size=16 * 1024)
    n = 20_000
    got: list[int] = []
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(0, n, 50):
                s.append([payload(j) for j in range(i, i + 50)], float(i))
                if i % 500 == 0:
                    s.sync()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def reader() -> None:
        try:
            deadline = time.monotonic() + 30
            while len(got) < n and time.monotonic() < deadline:
                recs = s.read(64, 64 * 1024)
                got.extend(r.seq for r in recs)
                if recs:
                    s.ack(recs[-1].seq)
                else:
                    time.sleep(0.0005)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert got == list(range(1, n + 1))
    assert s.depth_records == 0
    assert s.segments == 1
    s.close()


@pytest.mark.parametrize("policy", ["block", "drop-oldest"])
def test_concurrent_threads_at_the_size_limit(tmp_path: Path, policy: str) -> None:
    # The writer overruns a small spool while the reader delivers: under block every
    # record arrives once in order; under drop-oldest whole segments vanish under the reader.
    s = make(tmp_path / "sp", max_bytes=60_000, when_full=policy, segment_size=4096)
    n = 6000
    got: list[SpoolRecord] = []
    errors: list[BaseException] = []
    dropped = [0]  # records drop-oldest removed, from each append's result
    writer_done = threading.Event()

    def writer() -> None:
        try:
            deadline = time.monotonic() + 30
            i = 0
            while i < n and time.monotonic() < deadline:
                try:
                    res = s.append([payload(j, 50) for j in range(i, i + 20)], float(i))
                    dropped[0] += res.dropped_old
                except SpoolFull:
                    time.sleep(0.001)
                    continue
                i += 20
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            writer_done.set()

    def reader() -> None:
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                recs = s.read(30, 64 * 1024)
                got.extend(recs)
                if recs:
                    s.ack(recs[-1].seq)
                elif writer_done.is_set():
                    return
                else:
                    time.sleep(0.0005)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    seqs = [r.seq for r in got]
    assert seqs == sorted(set(seqs))
    assert all(r.payload == payload(r.seq - 1, 50) for r in got)
    if policy == "block":
        assert seqs == list(range(1, n + 1))
    else:
        assert seqs[-1] == n
        assert len(seqs) + dropped[0] >= n
    s.close()


# --- segments


def test_segments_roll_and_are_deleted_once_acked(tmp_path: Path) -> None:
    d = tmp_path / "sp"
    s = make(d, segment_size=4096)
    fill(s, 400, size=40)
    assert len(seg_files(d)) == s.segments > 5
    assert s.disk_bytes == sum(p.stat().st_size for p in seg_files(d))
    got = s.read(150, MiB)
    s.ack(got[-1].seq)
    remaining = seg_files(d)
    assert 1 < len(remaining) < 6 + 400 * 90 // 4096
    first_left = int(remaining[0].name[:20])
    assert first_left <= 151  # the segment holding seq 151 stays
    s.ack(got[-1].seq)
    rest = read_all(s)
    assert [r.seq for r in rest] == list(range(151, 401))
    s.ack(400)
    assert len(seg_files(d)) == 1  # the head stays
    s.close()


# --- when_full


@pytest.mark.parametrize("policy", ["block", "drop-newest", "drop-oldest"])
def test_when_full_policies_bound_disk_use(tmp_path: Path, policy: str) -> None:
    d = tmp_path / "sp"
    max_bytes = 40_000
    s = make(d, max_bytes=max_bytes, when_full=policy, segment_size=4096)
    accepted = dropped_new = dropped_old = full = 0
    for i in range(0, 2000, 10):
        try:
            res = s.append([payload(j, 60) for j in range(i, i + 10)], float(i))
        except SpoolFull:
            full += 1
            continue
        accepted += res.accepted
        dropped_new += res.dropped_new
        dropped_old += res.dropped_old
        on_disk = sum(p.stat().st_size for p in seg_files(d))
        assert on_disk == s.disk_bytes <= max_bytes
    got = read_all(s)
    seqs = [r.seq for r in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    if policy == "block":
        assert full > 0
        assert dropped_new == dropped_old == 0
        assert got[0].payload == payload(0, 60)  # the oldest are kept
        assert len(got) == accepted
    elif policy == "drop-newest":
        assert full == 0 and dropped_old == 0
        assert dropped_new == 2000 - accepted > 0
        assert [r.payload for r in got] == [payload(i, 60) for i in range(accepted)]
    else:
        assert full == 0 and dropped_new == 0
        assert dropped_old > 0
        assert len(got) == accepted - dropped_old
        assert got[-1].payload == payload(1999, 60)  # the newest are kept
        assert [r.payload for r in got] == [payload(i, 60) for i in range(2000 - len(got), 2000)]
    # Delivering frees room: new records are accepted again.
    s.ack(seqs[-1])
    res = s.append([payload(5000, 60)], 9.0)
    assert res.accepted == 1
    assert [r.payload for r in read_all(s)] == [payload(5000, 60)]
    s.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    policy=st.sampled_from(["block", "drop-newest", "drop-oldest"]),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("append"), st.integers(1, 30), st.integers(0, 300)),
            st.tuples(st.just("read"), st.integers(1, 40), st.integers(1, 4000)),
            st.tuples(st.just("ack"), st.integers(0, 40), st.just(0)),
            st.tuples(st.just("rewind"), st.just(0), st.just(0)),
        ),
        max_size=60,
    ),
)
def test_when_full_random_operations_keep_the_bound_and_the_order(
    policy: str, ops: list[tuple[str, int, int]]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        s = make(Path(tmp) / "sp", max_bytes=12_000, when_full=policy, segment_size=1500)
        sent: dict[int, bytes] = {}
        handed: list[int] = []
        counter = 0
        for op, a, b in ops:
            if op == "append":
                batch = [b"%d-" % (counter + i) + b"y" * b for i in range(a)]
                counter += a
                before = s.last_seq
                try:
                    res = s.append(batch, 1.0)
                except SpoolFull:
                    assert policy == "block"
                    continue
                assert res.accepted + res.dropped_new == len(batch)  # a batch alone always fits
                kept = batch[: res.accepted]
                for k, p in enumerate(kept):
                    sent[before + 1 + k] = p
            elif op == "read":
                for r in s.read(a, b):
                    assert sent[r.seq] == r.payload
                    assert not handed or r.seq > handed[-1]
                    handed.append(r.seq)
            elif op == "ack" and handed:
                s.ack(handed[min(a, len(handed) - 1)])
            elif op == "rewind":
                s.rewind()
                handed = [q for q in handed if q <= s.acked_seq]
            assert s.disk_bytes <= 12_000
            assert s.disk_bytes == sum(p.stat().st_size for p in seg_files(Path(tmp) / "sp"))
        if policy != "drop-oldest":
            # Nothing is lost without drop-oldest: all accepted and unacked records remain.
            s.rewind()
            rest = [r.seq for r in read_all(s)]
            assert rest == [q for q in sorted(sent) if q > s.acked_seq]
        s.close()


def test_block_frees_room_when_a_fully_acked_head_fills_the_limit(tmp_path: Path) -> None:
    # Segment larger than the limit: the acked head must be rolled away, not block forever.
    s = make(tmp_path / "sp", max_bytes=10_000, when_full="block", segment_size=MiB)
    for round_ in range(20):
        s.append([b"r%d" % round_ + b"x" * 600] * 4, 1.0)
        s.ack(read_all(s)[-1].seq)
    assert s.disk_bytes <= 10_000
    s.close()


def test_block_rejects_a_batch_that_can_never_fit(tmp_path: Path) -> None:
    s = make(tmp_path / "sp", max_bytes=4096, when_full="block")
    with pytest.raises(ValueError):
        s.append([b"x" * 5000], 1.0)
    s.close()


def test_drop_oldest_moves_the_reader_past_dropped_records(tmp_path: Path) -> None:
    s = make(tmp_path / "sp", max_bytes=20_000, when_full="drop-oldest", segment_size=2048)
    fill(s, 20, size=60)
    first = s.read(5, MiB)  # in flight, then dropped under the reader
    fill(s, 400, start=20, size=60)
    s.ack(first[-1].seq)  # acks of dropped records are harmless
    s.rewind()
    got = read_all(s)
    assert got[-1].payload == payload(419, 60)
    assert [r.seq for r in got] == list(range(got[0].seq, 421))
    assert got[0].seq > 6
    s.close()


def test_write_error_leaves_no_torn_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "sp"
    s = make(d)
    fill(s, 10)
    real = spool_mod.write_all

    def half_then_enospc(fd: int, data: bytes) -> None:
        os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_mod, "write_all", half_then_enospc)
    with pytest.raises(SpoolWriteError):
        s.append([payload(99)] * 5, 2.0)
    monkeypatch.setattr(spool_mod, "write_all", real)
    s.append([payload(10)], 3.0)
    s.close()
    s = make(d)
    assert [r.payload for r in read_all(s)] == [payload(i) for i in range(11)]
    s.close()


# --- recovery


def _closed_spool(d: Path, n: int = 5, size: int = 20) -> list[int]:
    """A closed spool with ``n`` records in one segment; returns each record's offset."""
    s = make(d)
    s.append([payload(i, size) for i in range(n)], 7.0)
    s.close()
    rec = RECORD_HEADER_SIZE + len(payload(0, size))
    return [SEGMENT_HEADER_SIZE + i * rec for i in range(n)]


def _data_segment(d: Path) -> Path:
    return next(p for p in seg_files(d) if p.stat().st_size > SEGMENT_HEADER_SIZE)


@pytest.mark.parametrize("cut", [1, 10, RECORD_HEADER_SIZE, RECORD_HEADER_SIZE + 5])
def test_torn_tail_is_cut(tmp_path: Path, cut: int) -> None:
    d = tmp_path / "sp"
    offsets = _closed_spool(d)
    seg = _data_segment(d)
    keep = offsets[-1] + cut  # ``cut`` bytes of the last record reached the disk
    os.truncate(seg, keep)
    s = Spool(d, 64 * MiB)
    report = s.open()
    assert report.torn_bytes == keep - offsets[-1]
    assert report.corrupt_records == 0
    assert seg.stat().st_size == offsets[-1]
    assert [r.payload for r in read_all(s)] == [payload(i, 20) for i in range(4)]
    s.append([b"after"], 8.0)
    # Seq 5 never existed whole (its write did not complete), so it is given again.
    assert read_all(s)[0].seq == 5
    s.close()


def test_garbage_appended_after_last_record_is_cut(tmp_path: Path) -> None:
    d = tmp_path / "sp"
    _closed_spool(d)
    seg = _data_segment(d)
    with open(seg, "ab") as f:
        f.write(b"\x00" * 4096)  # a zero-filled tail, as after a power loss
    s = Spool(d, 64 * MiB)
    assert s.open().torn_bytes == 4096
    assert len(read_all(s)) == 5
    s.close()


def test_corruption_at_every_byte_of_a_middle_record(tmp_path: Path) -> None:
    template = tmp_path / "template"
    offsets = _closed_spool(template)
    rec_size = offsets[1] - offsets[0]
    for i in range(rec_size):
        d = tmp_path / f"c{i}"
        shutil.copytree(template, d)
        seg = _data_segment(d)
        data = bytearray(seg.read_bytes())
        data[offsets[2] + i] ^= 0x5A
        seg.write_bytes(bytes(data))
        s = Spool(d, 64 * MiB)
        report = s.open()
        assert (report.corrupt_records, report.torn_bytes) == (1, 0), i
        assert [r.seq for r in read_all(s)] == [1, 2, 4, 5], i
        assert s.depth_records in (4, 5)  # seqs are not dense around a hole
        s.close()
        shutil.rmtree(d)


def test_corruption_found_while_reading_is_skipped_and_counted(tmp_path: Path) -> None:
    d = tmp_path / "sp"
    s = make(d)
    s.append([payload(i, 20) for i in range(6)], 7.0)
    rec_size = RECORD_HEADER_SIZE + len(payload(0, 20))
    head = seg_files(d)[-1]
    with open(head, "r+b") as f:
        f.seek(SEGMENT_HEADER_SIZE + 3 * rec_size + 30)
        f.write(b"!")
    assert [r.seq for r in read_all(s)] == [1, 2, 3, 5, 6]
    assert s.corrupt_total == 1
    s.rewind()
    assert [r.seq for r in read_all(s)] == [1, 2, 3, 5, 6]
    assert s.corrupt_total == 1  # the known bad region is not counted twice
    s.close()


def test_garbage_files_are_set_aside_or_left_alone(tmp_path: Path) -> None:
    d = tmp_path / "sp"
    _closed_spool(d)
    (d / "README").write_text("hello")
    (d / f"{9:020d}.seg").write_bytes(os.urandom(3000))
    (d / f"{10:020d}.seg").mkdir()
    (d / f"{11:020d}.seg").write_bytes(b"")
    s = Spool(d, 64 * MiB)
    report = s.open()
    problems = "\n".join(report.problems)
    assert "README: unexpected file, left alone" in problems
    assert "moved to corrupt/" in problems
    assert (d / "README").exists()
    assert sorted(p.name for p in (d / "corrupt").iterdir()) == [f"{9:020d}.seg", f"{10:020d}.seg"]
    assert [r.payload for r in read_all(s)] == [payload(i, 20) for i in range(5)]
    s.append([b"new"], 1.0)
    assert read_all(s)[0].seq == 11  # never below a segment name seen
    s.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage=st.binary(max_size=400), where=st.integers(0, 10_000))
def test_random_bytes_never_break_recovery(garbage: bytes, where: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "sp"
        offsets = _closed_spool(d, n=8)
        seg = _data_segment(d)
        data = seg.read_bytes()
        pos = SEGMENT_HEADER_SIZE + where % (len(data) - SEGMENT_HEADER_SIZE)
        seg.write_bytes(data[:pos] + garbage + data[pos + len(garbage) :])
        s = Spool(d, 64 * MiB)
        s.open()
        got = read_all(s)
        seqs = [r.seq for r in got]
        assert seqs == sorted(set(seqs))
        for r in got:  # whatever survives is intact
            assert r.payload == payload(r.seq - 1, 20)
        first_hit = max((i for i, o in enumerate(offsets) if o <= pos), default=0)
        assert set(range(1, first_hit + 1)) <= set(seqs)  # nothing before the damage is lost
        s.close()


def test_missing_ack_file_redelivers_everything(tmp_path: Path) -> None:
    d = tmp_path / "sp"
    s = make(d)
    fill(s, 10)
    s.read(6, MiB)
    s.ack(6)
    s.close()
    (d / ACK_FILE).unlink()
    s = make(d)
    assert [r.seq for r in read_all(s)] == list(range(1, 11))
    s.close()


def test_corrupt_ack_file_redelivers_and_is_reported(tmp_path: Path) -> None:
    d = tmp_path / "sp"
    s = make(d)
    fill(s, 10)
    s.read(6, MiB)
    s.ack(6)
    s.close()
    (d / ACK_FILE).write_bytes(os.urandom(2 * ACK_SLOT_SIZE))
    s = Spool(d, 64 * MiB)
    report = s.open()
    assert any(ACK_FILE in p for p in report.problems)
    assert [r.seq for r in read_all(s)] == list(range(1, 11))
    s.ack(10)
    s.close()
    s = make(d)  # the ack file was rewritten
    assert s.acked_seq == 10
    s.close()


def test_torn_ack_slot_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    d = tmp_path / "sp"
    s = make(d, ack_persist_records=1)
    fill(s, 10)
    s.read(3, MiB)
    s.ack(3)
    s.read(4, MiB)
    s.ack(7)
    s.close()
    data = (d / ACK_FILE).read_bytes()
    slots = [decode_ack(data[i * ACK_SLOT_SIZE : (i + 1) * ACK_SLOT_SIZE]) for i in (0, 1)]
    assert sorted(a for _, a in filter(None, slots)) == [3, 7]
    newest = max((0, 1), key=lambda i: slots[i] or (0, 0))
    with open(d / ACK_FILE, "r+b") as f:
        f.seek(newest * ACK_SLOT_SIZE + 12)
        f.write(b"\xff" * 10)  # a torn write of the newest slot
    s = make(d)
    assert s.acked_seq == 3
    assert [r.seq for r in read_all(s)] == list(range(4, 11))
    s.close()


def test_ack_persistence_is_batched_and_bounds_duplicates(tmp_path: Path) -> None:
    d = tmp_path / "sp"
    now = [0.0]
    s = make(d, ack_persist_records=5, ack_persist_interval=10.0, clock=lambda: now[0])
    fill(s, 20)
    for r in s.read(20, MiB):
        s.ack(r.seq)
        assert r.seq - s.persisted_ack_seq < 5
    assert s.persisted_ack_seq == 20
    fill(s, 3, start=20)
    for r in s.read(2, MiB):
        s.ack(r.seq)
    assert s.persisted_ack_seq == 20  # not due yet
    now[0] = 11.0
    s.sync()  # due by time
    assert s.persisted_ack_seq == 22
    s.read(1, MiB)
    s.ack(23)
    s._close_fds()  # crash: seq 23 was acked but not persisted
    s = make(d)
    assert [r.seq for r in read_all(s)] == [23]
    s.close()


def test_encoding_is_the_documented_layout() -> None:
    rec = encode_records(7, 1.5, [b"hi"])
    assert rec[:4] == b"\xd3SP\x01"
    assert int.from_bytes(rec[4:8], "little") == 2
    assert int.from_bytes(rec[8:16], "little") == 7
    assert len(rec) == RECORD_HEADER_SIZE + 2 and rec.endswith(b"hi")
    assert segment_header(3) == b"SRSPOOL\x01" + (3).to_bytes(8, "little")


# --- model-based


class SpoolMachine(RuleBasedStateMachine):
    """Random operations against a list model, including crashes (descriptors dropped)."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp())
        self.counter = 0
        # Records not known to be gone: everything above the persisted ack.
        self.model: list[tuple[int, bytes]] = []
        self.acked = 0
        self.read_seq = 0
        self.max_read = 0
        self.spool = self._new()

    def _new(self) -> Spool:
        s = Spool(
            self.tmp / "sp",
            64 * MiB,
            segment_size=600,
            ack_persist_records=7,
            ack_persist_interval=1e9,
            clock=lambda: 0.0,
        )
        s.open()
        return s

    def _unread(self) -> list[tuple[int, bytes]]:
        return [r for r in self.model if r[0] > self.read_seq]

    @rule(n=st.integers(0, 12), size=st.integers(0, 120))
    def append(self, n: int, size: int) -> None:
        before = self.spool.last_seq
        payloads = [b"p%d-" % (self.counter + i) + b"z" * size for i in range(n)]
        self.counter += n
        res = self.spool.append(payloads, float(self.counter))
        assert (res.accepted, res.dropped_new, res.dropped_old) == (n, 0, 0)
        assert self.spool.last_seq == before + n
        self.model.extend(zip(range(before + 1, before + n + 1), payloads, strict=True))

    @rule()
    def sync(self) -> None:
        self.spool.sync()
        assert self.spool.synced_seq == self.spool.last_seq

    @rule(max_records=st.integers(1, 15), max_bytes=st.integers(1, 1500))
    def read(self, max_records: int, max_bytes: int) -> None:
        got = [(r.seq, r.payload) for r in self.spool.read(max_records, max_bytes)]
        unread = self._unread()
        assert got == unread[: len(got)]
        assert bool(got) == bool(unread)
        assert len(got) <= max_records
        if 0 < len(got) < min(max_records, len(unread)):
            size = sum(len(p) for _, p in got)
            assert size + len(unread[len(got)][1]) > max_bytes
        if got:
            self.read_seq = got[-1][0]
            self.max_read = max(self.max_read, self.read_seq)

    @precondition(lambda self: self.max_read > self.acked)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        upto = data.draw(st.integers(self.acked + 1, self.max_read))
        self.spool.ack(upto)
        self.acked = upto
        self.read_seq = max(self.read_seq, upto)  # acked records are not handed out
        assert self.spool.acked_seq == upto
        assert self.acked - self.spool.persisted_ack_seq < 7
        floor = self.spool.persisted_ack_seq
        self.model = [r for r in self.model if r[0] > floor]

    @rule()
    def rewind(self) -> None:
        self.spool.rewind()
        self.read_seq = self.acked

    @rule()
    def reopen(self) -> None:
        self.spool.close()
        self.spool = self._new()
        assert self.spool.acked_seq == self.acked
        self.read_seq = self.max_read = self.acked
        self.model = [r for r in self.model if r[0] > self.acked]

    @rule()
    def crash(self) -> None:
        persisted = self.spool.persisted_ack_seq
        self.spool._close_fds()
        self.spool = self._new()
        assert self.spool.acked_seq == persisted
        got = [(r.seq, r.payload) for r in read_all(self.spool, max_records=50)]
        # Everything unacked is there; of the acked-but-unpersisted, a suffix may return.
        tail = [r for r in self.model if r[0] > self.acked]
        if got:
            assert got == [r for r in self.model if r[0] >= got[0][0]]
        assert got[len(got) - len(tail) :] == tail
        self.spool.rewind()
        self.model = got
        self.acked = self.read_seq = persisted
        self.max_read = got[-1][0] if got else persisted

    @invariant()
    def depth_matches_model(self) -> None:
        assert self.spool.depth_records == len([r for r in self.model if r[0] > self.acked])

    def teardown(self) -> None:
        self.spool.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


SpoolMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=40, deadline=None, suppress_health_check=list(HealthCheck)
)
test_spool_state_machine = SpoolMachine.TestCase


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    before = threading.active_count()
    yield
    assert threading.active_count() <= before
