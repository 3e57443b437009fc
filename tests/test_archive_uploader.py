"""Uploader and daemon against the in-memory store: idempotence under crashes and faults."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from archive import manifest as mf
from archive.daemon import Archiver, Backoff, LockError, acquire_lock, backlog, closed_files
from archive.store import MemoryStore, Unavailable
from archive.uploader import META_RAW_SHA, ConflictError, Uploader
from archive.verify import verify_range
from relay.config import Config
from tests.test_archive_helpers import (
    HOUR,
    HOUR_EPOCH,
    mixed_traffic,
    part_at,
    write_config,
    write_staging,
)

STEPS = ["compressed", "chunk-stored", "manifest-stored", "chain-saved", "staging-removed"]


class Crash(BaseException):
    """Simulated process death (BaseException: nothing may swallow it)."""


def _cfg(tmp_path: Path, extra: str = "") -> Config:
    return write_config(tmp_path / "c.toml", tmp_path / "state", extra=extra)


def _objects(store: MemoryStore, suffix: str) -> list[str]:
    return sorted(k for k in store.objects if k.endswith(suffix))


@pytest.mark.parametrize("step", STEPS)
def test_crash_at_any_step_then_retry_gives_exactly_one_copy(tmp_path: Path, step: str) -> None:
    cfg = _cfg(tmp_path)
    store = MemoryStore()
    files = [
        write_staging(
            cfg.relay.state_dir, "relay1", HOUR, part_at(HOUR_EPOCH + i), mixed_traffic(200, seed=i)
        )
        for i in range(3)
    ]

    def crash(s: str) -> None:
        if s == step:
            raise Crash(s)

    with pytest.raises(Crash):
        Uploader(cfg, store, hook=crash).upload(files[0])
    # "Restart": a new uploader, every file from the start.
    up = Uploader(cfg, store)
    for f in files:
        if f.exists():
            up.upload(f)
    assert not any(f.exists() for f in files)
    assert len(_objects(store, ".log.zst")) == 3
    assert len(_objects(store, ".manifest.json")) == 3
    _r = verify_range(store, "syslog", [HOUR])
    problems, n = _r.problems, _r.chunks
    assert (problems, n) == ([], 3)
    seqs = sorted(mf.parse(store.objects[k][0]).seq for k in _objects(store, ".manifest.json"))
    assert seqs == [1, 2, 3]


def test_retry_reuses_existing_chunk_without_rewriting(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    store = MemoryStore()
    f = write_staging(cfg.relay.state_dir, "relay1", HOUR, part_at(HOUR_EPOCH), mixed_traffic(50))
    copy = f.read_bytes()

    def crash(s: str) -> None:
        if s == "chunk-stored":
            raise Crash(s)

    with pytest.raises(Crash):
        Uploader(cfg, store, hook=crash).upload(f)
    puts_before = [c for c in store.calls if c[0] == "put"]
    r = Uploader(cfg, store).upload(f)
    assert r.reused_chunk
    puts = [c for c in store.calls if c[0] == "put"][len(puts_before) :]
    # only the manifest (and the published chain head) were written, not the chunk again
    assert [k for _, k in puts] == [r.manifest_key, "syslog/_chain/relay1.json"]
    assert not f.exists()
    del copy


def test_conflicting_object_is_never_overwritten(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    store = MemoryStore()
    f = write_staging(cfg.relay.state_dir, "relay1", HOUR, part_at(HOUR_EPOCH), mixed_traffic(20))
    key = mf.chunk_key("syslog", "relay1", HOUR, part_at(HOUR_EPOCH))
    store.objects[key] = (b"other", {META_RAW_SHA: "0" * 64})
    with pytest.raises(ConflictError):
        Uploader(cfg, store).upload(f)
    assert store.objects[key][0] == b"other"
    assert f.exists()


def test_keep_uploaded_moves_to_archived(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "keep_uploaded = true\n")
    store = MemoryStore()
    f = write_staging(cfg.relay.state_dir, "relay1", HOUR, part_at(HOUR_EPOCH), mixed_traffic(20))
    data = f.read_bytes()
    Uploader(cfg, store).upload(f)
    kept = cfg.staging_dir / "archived" / f.name
    assert not f.exists() and kept.read_bytes() == data


def test_chain_head_persisted_after_manifest(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    store = MemoryStore()
    f = write_staging(cfg.relay.state_dir, "relay1", HOUR, part_at(HOUR_EPOCH), mixed_traffic(5))
    seen: list[object] = []
    chain = cfg.relay.state_dir / "archive" / "chain.json"

    def look(step: str) -> None:
        if step == "manifest-stored":
            seen.append(chain.exists())

    r = Uploader(cfg, store, hook=look).upload(f)
    assert seen == [False]
    head = json.loads(chain.read_text())
    assert head["key"] == r.manifest_key
    assert head["sha256"] == mf.sha256_hex(store.objects[r.manifest_key][0])


def test_daemon_retries_with_backoff_and_loses_nothing(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    store = MemoryStore()
    files = [
        write_staging(
            cfg.relay.state_dir,
            "relay1",
            f"2026-11-26T0{h}",
            part_at(HOUR_EPOCH + h * 3600),
            mixed_traffic(30, seed=h),
        )
        for h in range(1, 4)
    ]
    assert closed_files(cfg.staging_dir) == sorted(files)
    b = backlog(closed_files(cfg.staging_dir))
    assert (b.files, b.oldest) == (3, "2026-11-26T01")
    assert b.bytes == sum(f.stat().st_size for f in files)
    store.fail_next = 7
    arch = Archiver(cfg, store)
    arch.backoff = Backoff(0.05, base=0.01)
    for _ in range(40):
        if arch.run_once():
            break
    assert arch.failures >= 1
    assert not any(f.exists() for f in files)
    assert len(_objects(store, ".log.zst")) == 3
    _r = verify_range(store, "syslog", [f"2026-11-26T0{h}" for h in range(1, 4)])
    problems, _ = _r.problems, _r.chunks
    assert problems == []


def test_daemon_moves_unarchivable_file_aside(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    bad = cfg.staging_dir / "closed" / f"{HOUR}--x.stg"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not staging\n")
    assert Archiver(cfg, MemoryStore()).run_once()
    assert (cfg.staging_dir / "rejected" / bad.name).read_bytes() == b"not staging\n"


def test_daemon_stops_on_event(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    stop = threading.Event()
    arch = Archiver(cfg, MemoryStore(), stop=stop)
    t = threading.Thread(target=arch.run)
    t.start()
    stop.set()
    t.join(10)
    assert not t.is_alive()


def test_backoff_is_capped_and_jittered() -> None:
    b = Backoff(cap=8.0, base=1.0)
    delays = [b.next_delay() for _ in range(10)]
    assert all(0 < d <= 8.0 for d in delays)
    assert delays[-1] >= 4.0  # at the cap, jitter keeps it in [cap/2, cap]
    b.reset()
    assert b.next_delay() <= 1.0


def test_one_archiver_per_state_dir(tmp_path: Path) -> None:
    fd = acquire_lock(tmp_path)
    try:
        with pytest.raises(LockError):
            acquire_lock(tmp_path)
    finally:
        import os

        os.close(fd)


def test_memory_store_injected_failures() -> None:
    s = MemoryStore()
    s.fail_next = 1
    with pytest.raises(Unavailable):
        s.head("x")
    assert s.head("x") is None
