"""The archiver loop: closed staging files -> uploads, oldest first, forever.

A plain loop in its own process (no reactor: zstd and boto3 block, and that
is fine here). Failures are retried with jittered exponential backoff capped
at ``retry_max_backoff``; staging keeps the data meanwhile, and a warning
reports the backlog. SIGTERM/SIGINT set a flag: the current upload finishes
(every S3 call is bounded by timeouts and attempts) and the loop exits; an
upload cut short by kill -9 is simply redone, see uploader.py.
"""

from __future__ import annotations

import fcntl
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from twisted.logger import Logger

from archive.chunk import ChunkError
from archive.manifest import ManifestError
from archive.observe import ArchiveStats
from archive.store import AccessDenied, ClockSkew, NoSuchBucket, ObjectStore, StoreError
from archive.uploader import ConflictError, Uploader
from relay.config import Config
from relay.disk.staging import closed_dir, file_hour, file_names, rejected_dir

log = Logger(namespace="syslog-archive")

# Errors that no retry fixes: reported once per file, the file moved aside.
_PERMANENT = (ConflictError, ChunkError, ManifestError)
# Errors that need an operator but may be fixed while we wait (a bucket
# created, a key rotated): retried at the maximum backoff, logged as errors.
_CONFIG = (AccessDenied, NoSuchBucket, ClockSkew)


@dataclass(frozen=True)
class Backlog:
    files: int
    bytes: int
    oldest: str | None


def closed_files(staging_dir: Path) -> list[Path]:
    """Closed staging files, oldest first (names sort by hour, then part)."""
    closed = closed_dir(staging_dir)
    try:
        return [closed / name for name in file_names(closed)]
    except FileNotFoundError:
        return []


def backlog(files: list[Path]) -> Backlog:
    total = 0
    for p in files:
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass
    oldest = file_hour(files[0].name) if files else None
    return Backlog(len(files), total, oldest)


class Backoff:
    """Jittered exponential backoff: base * 2^n, capped, times U(0.5, 1)."""

    def __init__(self, cap: float, base: float = 1.0, rng: random.Random | None = None) -> None:
        self.cap = cap
        self.base = min(base, cap)
        self.failures = 0
        self.rng = rng or random.Random()

    def next_delay(self) -> float:
        raw = min(self.cap, self.base * 2**self.failures)
        self.failures += 1
        return float(raw * self.rng.uniform(0.5, 1.0))

    def reset(self) -> None:
        self.failures = 0


class Archiver:
    def __init__(
        self,
        cfg: Config,
        store: ObjectStore,
        *,
        stop: threading.Event | None = None,
        uploader: Uploader | None = None,
        stats: ArchiveStats | None = None,
        reload: threading.Event | None = None,
        reloader: Callable[[], tuple[Config, ObjectStore, Uploader] | None] | None = None,
    ) -> None:
        self.reload = reload or threading.Event()
        self.reloader = reloader
        self.cfg = cfg
        self.store = store
        self.stop = stop or threading.Event()
        self.uploader = uploader or Uploader(cfg, store)
        self.backoff = Backoff(cfg.archive.retry_max_backoff)
        self.rejected_dir = rejected_dir(cfg.staging_dir)
        self.uploaded = 0
        self.failures = 0
        self.stats = stats if stats is not None else ArchiveStats()  # /metrics, /status

    def run_once(self) -> bool:
        """Upload every closed file once, oldest first; False at the first failure."""
        for path in closed_files(self.cfg.staging_dir):
            if self.stop.is_set():
                return True
            if not self._upload_one(path):
                return False
        return True

    def _upload_one(self, path: Path) -> bool:
        started = time.monotonic()
        try:
            r = self.uploader.upload(path)
        except FileNotFoundError:
            return True  # removed under us (an operator); nothing to do
        except _PERMANENT as exc:
            self.rejected_dir.mkdir(parents=True, exist_ok=True)
            os.replace(path, self.rejected_dir / path.name)
            self.stats.rejected_file(f"{path.name}: {exc}")
            log.error(
                "cannot archive {file}: {reason}; moved to {dest}",
                file=str(path),
                reason=str(exc),
                dest=str(self.rejected_dir),
            )
            return True
        except _CONFIG as exc:
            self.failures += 1
            self.backoff.failures = 64  # straight to the cap: an operator must act
            self.stats.failed(f"{path.name}: {exc}", "storage_refused")
            log.error("archive storage refused {file}: {reason}", file=path.name, reason=str(exc))
            return False
        except (StoreError, OSError) as exc:
            self.failures += 1
            self.stats.failed(f"{path.name}: {exc}")
            b = backlog(closed_files(self.cfg.staging_dir))
            log.warn(
                "upload of {file} failed ({reason}); will retry; backlog {files} files, "
                "{nbytes} bytes, oldest hour {oldest}",
                file=path.name,
                reason=str(exc),
                files=b.files,
                nbytes=b.bytes,
                oldest=b.oldest,
            )
            return False
        self.uploaded += 1
        m = r.manifest
        self.stats.uploaded(
            r.key,
            m.raw_size,
            m.compressed_size,
            m.count,
            r.reused_chunk,
            seconds=time.monotonic() - started,
        )
        log.info(
            "archived {file} as {key} ({count} messages, {raw} -> {comp} bytes)",
            file=path.name,
            key=r.key,
            count=r.manifest.count,
            raw=r.manifest.raw_size,
            comp=r.manifest.compressed_size,
        )
        return True

    def run(self) -> int:
        """Loop until stopped; returns the exit status."""
        log.info("syslog-archive started for relay {relay}", relay=self.cfg.relay.id)
        while not self.stop.is_set():
            if self.reload.is_set():
                self.reload.clear()
                self._reload()
            if self.run_once():
                self.backoff.reset()
                delay = self.cfg.archive.poll_interval
            else:
                delay = self.backoff.next_delay()
                self.stats.retrying()
                log.info("retrying in {delay:.1f}s", delay=delay)
            deadline = time.monotonic() + delay
            while not self.stop.is_set() and not self.reload.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.stop.wait(min(left, 0.5))
        log.info("syslog-archive stopping")
        return 0

    def _reload(self) -> None:
        """SIGHUP: new S3 settings (endpoint, credentials, bucket options) between uploads."""
        if self.reloader is None:
            return
        got = self.reloader()  # logs why and returns None when the new config is refused
        if got is None:
            return
        self.cfg, self.store, self.uploader = got
        self.backoff.reset()
        log.info("configuration reloaded")


class LockError(Exception):
    """Another archiver runs on this state directory."""


def acquire_lock(state_dir: Path) -> int:
    """One archiver per state directory: two would race on the chain head."""
    d = state_dir / "archive"
    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LockError(f"another syslog-archive holds {d / 'lock'}") from None
    return fd


def install_signal_handlers(
    stop: threading.Event, reload: threading.Event | None = None
) -> Callable[[], None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("signal {sig}: finishing the current upload", sig=signal.Signals(signum).name)
        stop.set()

    def hup(signum: int, frame: FrameType | None) -> None:
        if reload is not None:
            reload.set()  # applied between uploads, never in the middle of one

    old_term = signal.signal(signal.SIGTERM, handler)
    old_int = signal.signal(signal.SIGINT, handler)
    old_hup = signal.signal(signal.SIGHUP, hup)

    def restore() -> None:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGHUP, old_hup)

    return restore
