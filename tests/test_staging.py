"""StagingStore: hour files, parts, close, recovery after a torn write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relay import record
from relay.staging import StagingStore, hour_index, hour_name, parse_file_name

H = hour_index("2026-11-26T01")
T0 = H * 3600 + 10.0  # ten seconds into the hour


def rec(msg: bytes, recv: float = T0) -> bytes:
    """One staging block holding ``msg``."""
    block = (record.FRAMING_OCTET, b"-", 1, record.octet_frames([msg]))
    return record.encode_blocks(record.format_recv(recv), b"tcp://127.0.0.1:1", [block])


def read_msgs(path: Path) -> list[bytes]:
    data = path.read_bytes()
    header_end = data.index(b"\n") + 1
    return [r.msg for _, r in record.iter_records(data, header_end)]


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
    header = record.parse_file_header(by_hour[H].read_bytes().split(b"\n", 1)[0])
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
    v1 = record.encode(record.format_recv(T0), b"tcp://127.0.0.1:1", b"host", b"-", b"old")
    old.write_bytes(record.HEADER_PREFIX_1 + b"relay=r hour=x part=y\n" + v1)
    s2 = StagingStore(tmp_path, "r", grace=300)
    report = s2.recover(T0 + 1)
    assert report.closed == [old.name]
    assert read_msgs(s2.closed_dir / old.name) == [b"old"]
    s2.append(H, rec(b"new"), T0 + 2)
    (new,) = s2.open_dir.glob("*.stg")
    assert new.read_bytes().startswith(record.HEADER_PREFIX)
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
