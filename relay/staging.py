"""Hourly staging files on disk (format 2, docs/staging-and-archive-format.md).

Synchronous and single-threaded by design: the writer thread owns one
StagingStore and is the only caller, so no locking is needed here and the
unit tests drive it directly with explicit ``now`` values (no clock inside).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from twisted.logger import Logger

from relay import record
from relay.fileio import fsync_dir, write_all, writev_all

log = Logger(namespace="relay.staging")

SUFFIX = ".stg"


class StagingWriteError(OSError):
    """An append failed (disk full, I/O error); the file was cut back to its last record."""


def hour_name(hour: int) -> str:
    """``YYYY-MM-DDTHH`` for an hour index (epoch seconds // 3600)."""
    return datetime.fromtimestamp(hour * 3600, UTC).strftime("%Y-%m-%dT%H")


def hour_index(name: str) -> int:
    return int(datetime.strptime(name, "%Y-%m-%dT%H").replace(tzinfo=UTC).timestamp()) // 3600


def part_name(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y%m%dT%H%M%S%fZ")


def file_name(hour: int, part: str) -> str:
    return f"{hour_name(hour)}--{part}{SUFFIX}"


def parse_file_name(name: str) -> tuple[int, str] | None:
    if not name.endswith(SUFFIX) or "--" not in name:
        return None
    hour_s, _, part = name[: -len(SUFFIX)].partition("--")
    try:
        return hour_index(hour_s), part
    except ValueError:
        return None


@dataclass
class _Part:
    hour: int
    name: str
    path: Path
    fd: int
    size: int
    close_at: float
    last_write: float
    dirty: bool = False


@dataclass
class RecoveryReport:
    files: int = 0
    records_bytes: int = 0
    torn_bytes: int = 0
    closed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class StagingStore:
    """Open parts per hour; append, fsync, close (rename into ``closed/``)."""

    def __init__(self, root: Path, relay_id: str, grace: float, max_open_parts: int = 256) -> None:
        self.root = root
        self.open_dir = root / "open"
        self.closed_dir = root / "closed"
        self.relay_id = relay_id
        self.grace = grace
        self.max_open_parts = max_open_parts
        self._parts: dict[int, _Part] = {}
        self._last_part_epoch = 0.0
        self.bytes_written = 0
        self.files_closed = 0

    # --- lifecycle

    def recover(self, now: float) -> RecoveryReport:
        """Check files left in ``open/`` by a previous run; cut torn tails.

        A file whose hour is still open is appended to again; any other is
        closed at once so the archiver gets it. Never raises on bad content:
        an unreadable file is moved aside to ``corrupt/`` and reported.
        """
        report = RecoveryReport()
        for d in (self.open_dir, self.closed_dir):
            d.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.open_dir.glob("*" + SUFFIX)):
            parsed = parse_file_name(path.name)
            if parsed is None:
                report.problems.append(f"{path.name}: unexpected file name, left alone")
                continue
            hour, part = parsed
            report.files += 1
            data = path.read_bytes()
            valid, reason = record.valid_prefix(data)
            if valid == 0:
                self._quarantine(path, reason or "empty", report)
                continue
            if valid < len(data):
                report.torn_bytes += len(data) - valid
                report.problems.append(
                    f"{path.name}: cut {len(data) - valid} bytes at offset {valid} ({reason})"
                )
                with open(path, "r+b") as f:
                    f.truncate(valid)
                    os.fsync(f.fileno())
            report.records_bytes += valid
            self._last_part_epoch = max(self._last_part_epoch, _part_epoch(part))
            close_at = (hour + 1) * 3600 + self.grace
            current = self._parts.get(hour)
            # A format 1 file (an earlier build's) is closed, never appended to.
            current_format = data.startswith(record.HEADER_PREFIX)
            if current_format and close_at > now and (current is None or current.name < path.name):
                if current is not None:
                    self._close(current)
                    report.closed.append(current.name)
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                self._parts[hour] = _Part(hour, path.name, path, fd, valid, close_at, now)
            else:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                self._close(_Part(hour, path.name, path, fd, valid, close_at, now))
                report.closed.append(path.name)
        return report

    def _quarantine(self, path: Path, reason: str, report: RecoveryReport) -> None:
        corrupt = self.root / "corrupt"
        corrupt.mkdir(exist_ok=True)
        os.replace(path, corrupt / path.name)
        report.problems.append(f"{path.name}: moved to corrupt/ ({reason})")

    def close_all(self) -> None:
        """Fsync and close descriptors; files stay in ``open/`` for the next run."""
        for part in list(self._parts.values()):
            if part.dirty:
                os.fsync(part.fd)
            os.close(part.fd)
        self._parts.clear()

    # --- writing

    def append(self, hour: int, data: bytes | list[bytes | memoryview], now: float) -> None:
        """Append whole blocks for ``hour`` with a single write (writev for a list of
        buffers); raises StagingWriteError."""
        part = self._parts.get(hour)
        if part is None:
            part = self._create(hour, now)
        try:
            if isinstance(data, bytes):
                write_all(part.fd, data)
                size = len(data)
            else:
                size = writev_all(part.fd, data)
        except OSError as exc:
            # Leave no torn record behind: cut the file back to its last good size.
            try:
                os.ftruncate(part.fd, part.size)
            except OSError:
                pass
            raise StagingWriteError(exc.errno or errno.EIO, f"{part.name}: {exc.strerror}") from exc
        part.size += size
        part.dirty = True
        part.last_write = now
        self.bytes_written += size

    def _create(self, hour: int, now: float) -> _Part:
        if len(self._parts) >= self.max_open_parts:
            oldest = min(self._parts.values(), key=lambda p: p.last_write)
            self._close(oldest)
        epoch = max(now, self._last_part_epoch + 1e-6)
        self._last_part_epoch = epoch
        name = file_name(hour, part_name(epoch))
        path = self.open_dir / name
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        header = record.file_header(self.relay_id, hour_name(hour), part_name(epoch))
        try:
            write_all(fd, header)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            raise StagingWriteError(exc.errno or errno.EIO, f"{name}: {exc.strerror}") from exc
        # A part for an hour already past its close time is a late part: it
        # gets its own grace period so late stragglers are grouped, not one file each.
        close_at = max((hour + 1) * 3600 + self.grace, now + self.grace)
        part = _Part(hour, name, path, fd, len(header), close_at, now, dirty=True)
        self._parts[hour] = part
        fsync_dir(self.open_dir)
        return part

    def sync(self) -> int:
        """Fsync every file written since the last sync; returns how many."""
        n = 0
        for part in self._parts.values():
            if part.dirty:
                os.fsync(part.fd)
                part.dirty = False
                n += 1
        return n

    def roll(self, now: float) -> list[str]:
        """Close every part whose time has come; returns the names closed."""
        due = [p for p in self._parts.values() if p.close_at <= now]
        for part in due:
            self._close(part)
        return [p.name for p in due]

    def _close(self, part: _Part) -> None:
        if part.dirty:
            os.fsync(part.fd)
        os.close(part.fd)
        if self._parts.get(part.hour) is part:
            del self._parts[part.hour]
        os.replace(part.path, self.closed_dir / part.name)
        fsync_dir(self.closed_dir)
        fsync_dir(self.open_dir)
        self.files_closed += 1
        log.info("closed staging {name} ({size} bytes)", name=part.name, size=part.size)

    # --- introspection

    @property
    def open_parts(self) -> list[str]:
        return sorted(p.name for p in self._parts.values())

    def next_deadline(self) -> float | None:
        return min((p.close_at for p in self._parts.values()), default=None)


def _part_epoch(part: str) -> float:
    try:
        return datetime.strptime(part, "%Y%m%dT%H%M%S%fZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return 0.0


# --- retention (``[staging] keep``): staging files nobody will archive


@dataclass
class Pruned:
    files: list[tuple[str, int]] = field(default_factory=list)  # (name, bytes)

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.files)


def prune(
    directories: Sequence[Path], now: float, keep_for: float | None, keep_size: int | None
) -> Pruned:
    """Delete the oldest staging files in ``directories`` (``closed/`` with the archive
    off, ``archived/``) beyond ``keep_for`` seconds after their hour ended or beyond
    ``keep_size`` bytes in all; oldest hour first. Files that vanish meanwhile (the
    archiver, an operator) are skipped; anything else raises OSError.
    """
    out = Pruned()
    if keep_for is None and keep_size is None:
        return out
    files: list[tuple[int, str, Path, int]] = []
    for directory in directories:
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue
        for entry in entries:
            parsed = parse_file_name(entry.name)
            if parsed is None:
                continue
            try:
                size = entry.stat().st_size
            except FileNotFoundError:
                continue
            files.append((parsed[0], entry.name, Path(entry.path), size))
    files.sort()
    total = sum(f[3] for f in files)
    touched: set[Path] = set()
    for hour, name, path, size in files:
        too_old = keep_for is not None and (hour + 1) * 3600 + keep_for <= now
        too_big = keep_size is not None and total > keep_size
        if not (too_old or too_big):
            break  # oldest first: everything after is younger and fits
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        total -= size
        touched.add(path.parent)
        out.files.append((name, size))
    for directory in touched:
        fsync_dir(directory)
    return out
