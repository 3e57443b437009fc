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

from relay.disk.fileio import fsync_dir, truncate_synced, write_all, writev_all
from relay.formats import staging_block

log = Logger(namespace="relay.staging")

SUFFIX = ".stg"
_PART_FORMAT = "%Y%m%dT%H%M%S%fZ"


# --- the layout under [staging] dir: open/ holds the parts being written, renamed into
# closed/ when their hour is over; the archiver uploads closed/ and deletes each file or
# moves it to archived/ (keep_uploaded), or to rejected/ when it cannot be archived;
# recovery sets damage aside in corrupt/. A file is named HOUR--PART.stg.


def open_dir(root: Path) -> Path:
    return root / "open"


def closed_dir(root: Path) -> Path:
    return root / "closed"


def archived_dir(root: Path) -> Path:
    return root / "archived"


def rejected_dir(root: Path) -> Path:
    return root / "rejected"


def corrupt_dir(root: Path) -> Path:
    return root / "corrupt"


def file_names(directory: Path) -> list[str]:
    """Names of the staging files in ``directory``, sorted (by hour, then part);
    OSError as ``Path.iterdir`` raises it."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(SUFFIX))


class StagingWriteError(OSError):
    """An append failed (disk full, I/O error); the file was cut back to its last record."""


def hour_name(hour: int) -> str:
    """``YYYY-MM-DDTHH`` for an hour index (epoch seconds // 3600)."""
    return datetime.fromtimestamp(hour * 3600, UTC).strftime("%Y-%m-%dT%H")


def hour_index(name: str) -> int:
    return int(datetime.strptime(name, "%Y-%m-%dT%H").replace(tzinfo=UTC).timestamp()) // 3600


def part_name(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime(_PART_FORMAT)


def part_epoch(part: str) -> float | None:
    """When a part was created, from its name; None when the name is not one."""
    try:
        return datetime.strptime(part, _PART_FORMAT).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def file_name(hour: int, part: str) -> str:
    return f"{hour_name(hour)}--{part}{SUFFIX}"


def split_file_name(name: str) -> tuple[str, str] | None:
    """(hour, part) as a staging file's name writes them, unchecked; None when ``name``
    is not HOUR--PART.stg."""
    if not name.endswith(SUFFIX) or "--" not in name:
        return None
    hour_s, _, part = name[: -len(SUFFIX)].partition("--")
    return hour_s, part


def file_hour(name: str) -> str:
    """The hour a staging file's name starts with (the whole name when it has no "--")."""
    return name.split("--")[0]


def parse_file_name(name: str) -> tuple[int, str] | None:
    split = split_file_name(name)
    if split is None:
        return None
    try:
        return hour_index(split[0]), split[1]
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
    corrupt_bytes: int = 0  # damaged blocks set aside in corrupt/
    corrupt_regions: int = 0
    closed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class StagingStore:
    """Open parts per hour; append, fsync, close (rename into ``closed/``)."""

    def __init__(self, root: Path, relay_id: str, grace: float, max_open_parts: int = 256) -> None:
        self.root = root
        self.open_dir = open_dir(root)
        self.closed_dir = closed_dir(root)
        self.relay_id = relay_id
        self.grace = grace
        self.max_open_parts = max_open_parts
        self._parts: dict[int, _Part] = {}
        self._last_part_epoch = 0.0
        self.bytes_written = 0
        self.files_closed = 0

    # --- lifecycle

    def recover(self, now: float) -> RecoveryReport:
        """Check files left in ``open/`` by a previous run, block by block.

        A torn tail is cut; a damaged block anywhere else is set aside in
        ``corrupt/`` and the valid blocks after it are kept (see _scan_file).
        A file whose hour is still open is appended to again; any other is
        closed at once so the archiver gets it. Never raises on bad content:
        a file with nothing valid is moved aside to ``corrupt/`` and reported.
        """
        report = RecoveryReport()
        for d in (self.open_dir, self.closed_dir):
            d.mkdir(parents=True, exist_ok=True)
        for path in self.open_dir.glob("*" + SUFFIX + _REPAIR):
            path.unlink()  # a repair cut short: the original is still in place
        for path in sorted(self.open_dir.glob("*" + SUFFIX)):
            parsed = parse_file_name(path.name)
            if parsed is None:
                report.problems.append(f"{path.name}: unexpected file name, left alone")
                continue
            hour, part = parsed
            report.files += 1
            checked = self._check_file(path, hour, part, report)
            if checked is None:
                continue
            size, current_format, appendable = checked
            report.records_bytes += size
            self._last_part_epoch = max(self._last_part_epoch, part_epoch(part) or 0.0)
            close_at = (hour + 1) * 3600 + self.grace
            current = self._parts.get(hour)
            # A format 1 file (an earlier build's) is closed, never appended to.
            if (
                current_format
                and appendable
                and close_at > now
                and (current is None or current.name < path.name)
            ):
                if current is not None:
                    self._close(current)
                    report.closed.append(current.name)
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                self._parts[hour] = _Part(hour, path.name, path, fd, size, close_at, now)
            else:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                self._close(_Part(hour, path.name, path, fd, size, close_at, now))
                report.closed.append(path.name)
        return report

    def _check_file(
        self, path: Path, hour: int, part: str, report: RecoveryReport
    ) -> tuple[int, bool, bool] | None:
        """Check every block of ``path``, reading it in bounded pieces: a torn tail is cut,
        damaged blocks are set aside in ``corrupt/`` and the valid blocks after them kept.
        Returns (size, format 2, appendable), or None when the file was moved aside."""
        try:
            with open(path, "rb", buffering=0) as f:
                scan = _scan_file(f.fileno(), os.fstat(f.fileno()).st_size, hour_name(hour), part)
        except OSError as exc:  # EIO from a bad sector: keep the file, out of the way
            self._quarantine(path, f"cannot read: {exc.strerror}", report)
            return None
        if scan.keep is None:
            self._quarantine(path, scan.reason or "empty", report)
            return None
        if not scan.damaged and scan.tail is None:
            return scan.size, scan.format == 2, True
        try:
            size = self._repair(path, hour, part, scan, report)
        except OSError as exc:
            # No room for the repair (a full disk): the file is closed as it is, so
            # nothing is lost; the archiver keeps its bytes and records the damage.
            report.problems.append(
                f"{path.name}: could not set damaged bytes aside ({exc.strerror}); "
                "closing it unrepaired"
            )
            return scan.size, scan.format == 2, False
        return size, scan.format == 2, True

    def _repair(self, path: Path, hour: int, part: str, scan: _Scan, report: RecoveryReport) -> int:
        """Apply ``scan``: damaged regions to ``corrupt/`` (first, durably), then the file
        cut back (a tail only) or rewritten without them. Returns the new size."""
        assert scan.keep is not None
        aside = list(scan.damaged)
        if scan.tail is not None and not scan.torn:
            aside.append((scan.tail, scan.size, scan.tail_reason))
        problems: list[str] = []
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if aside:
                corrupt = corrupt_dir(self.root)
                corrupt.mkdir(exist_ok=True)
                for start, end, reason in aside:
                    target = corrupt / f"{path.name}.at-{start}"
                    _copy_ranges(fd, [(start, end)], target, b"")
                    problems.append(
                        f"{path.name}: set aside {end - start} damaged bytes at offset {start} "
                        f"({reason}) in corrupt/{target.name}"
                    )
                fsync_dir(corrupt)
            end = scan.size if scan.tail is None else scan.tail
            if scan.tail is not None and scan.torn:
                problems.append(
                    f"{path.name}: cut {scan.size - scan.tail} bytes at offset {scan.tail} "
                    f"({scan.tail_reason})"
                )
            if not scan.damaged:
                os.truncate(path, end)
                with open(path, "rb+") as f:
                    os.fsync(f.fileno())
                size = end
            else:
                size = self._rewrite(fd, path, hour, part, scan, end)
        finally:
            os.close(fd)
        # Counted once it is done: a repair that failed half way repaired nothing.
        report.problems += problems
        report.corrupt_regions += len(aside)
        report.corrupt_bytes += sum(end - start for start, end, _ in aside)
        if scan.tail is not None and scan.torn:
            report.torn_bytes += scan.size - scan.tail
        return size

    def _rewrite(self, fd: int, path: Path, hour: int, part: str, scan: _Scan, end: int) -> int:
        """Replace ``path`` by a copy without its damaged regions (and a new header line
        when that was damaged); returns the new size."""
        header = b""
        if scan.keep == 0:
            header = staging_block.file_header(self.relay_id, hour_name(hour), part)
        ranges: list[tuple[int, int]] = []
        pos = 0  # the header line is kept, or the first damaged region starts at 0
        for start, stop, _ in scan.damaged:
            if start > pos:
                ranges.append((pos, start))
            pos = stop
        if end > pos:
            ranges.append((pos, end))
        tmp = path.with_name(path.name + _REPAIR)
        try:
            size = _copy_ranges(fd, ranges, tmp, header)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        fsync_dir(self.open_dir)
        return size

    def _quarantine(self, path: Path, reason: str, report: RecoveryReport) -> None:
        corrupt = corrupt_dir(self.root)
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

    def position(self, hours: Sequence[int], now: float) -> list[tuple[Path, int, bool]]:
        """Where each hour's part ends before a journaled append (relay.link.ledger):
        (path, size, created now). Parts are created here, so the appends that follow
        go to the files named; a part closed to make room is looked up again."""
        seen: dict[int, tuple[Path, int, bool]] = {}
        for _ in range(3):
            for hour in hours:
                part = self._parts.get(hour)
                if part is None:
                    part = self._create(hour, now)
                    seen[hour] = (part.path, part.size, True)
                elif hour not in seen or seen[hour][0] != part.path:
                    seen[hour] = (part.path, part.size, False)
            parts = self._parts
            if all(h in parts and parts[h].path == seen[h][0] for h in hours):
                break
        return list(seen.values())

    def _create(self, hour: int, now: float) -> _Part:
        if len(self._parts) >= self.max_open_parts:
            oldest = min(self._parts.values(), key=lambda p: p.last_write)
            self._close(oldest)
        epoch = max(now, self._last_part_epoch + 1e-6)
        self._last_part_epoch = epoch
        name = file_name(hour, part_name(epoch))
        path = self.open_dir / name
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        header = staging_block.file_header(self.relay_id, hour_name(hour), part_name(epoch))
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


def cut_back(path: Path, size: int, created: bool = False) -> str:
    """Undo a journaled batch's appends to a part (relay.link.ledger.roll_back), before
    ``recover``: cut to ``size``, or remove the part if the batch ``created`` it.
    Returns what was done ("" for nothing)."""
    if not created:
        return truncate_synced(path, size)
    try:
        path.unlink()
    except FileNotFoundError:
        return ""
    fsync_dir(path.parent)
    return f"removed {path}"


# --- recovery: reading a staging file in bounded pieces

_READ = 1024 * 1024  # one pread; memory holds at most one block plus one read
_REPAIR = ".repair"  # a file being rewritten without its damaged blocks
_TORN = "incomplete last record"


@dataclass
class _Scan:
    size: int
    format: int = 2
    keep: int | None = None  # where kept bytes start (0: header damaged); None: nothing valid
    reason: str | None = None  # why nothing is valid
    damaged: list[tuple[int, int, str]] = field(default_factory=list)  # [start, end), reason
    tail: int | None = None  # where an invalid tail starts
    torn: bool = False  # the tail is an incomplete block (cut) rather than damage (set aside)
    tail_reason: str = ""


class _Window:
    """Random access to a file through one buffer of at most max(read, a block) bytes."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size
        self.buf = b""
        self.start = 0

    def get(self, off: int, n: int) -> memoryview:
        """Bytes [off, off + n) (fewer at the end of the file)."""
        n = min(n, self.size - off)
        if off < self.start or off + n > self.start + len(self.buf):
            self.buf = os.pread(self.fd, min(max(n, _READ), self.size - off), off)
            self.start = off
        i = off - self.start
        return memoryview(self.buf)[i : i + n]

    def find(self, sub: bytes, off: int) -> int:
        """Offset of the first ``sub`` at or after ``off``, or -1."""
        while off < self.size:
            self.get(off, _READ)
            i = self.buf.find(sub, off - self.start)
            if i >= 0:
                return self.start + i
            end = self.start + len(self.buf)
            if end >= self.size:
                return -1
            off = end - len(sub) + 1
        return -1


def _block_at(w: _Window, pos: int) -> tuple[int | None, str, int | None]:
    """(next offset, "", None) for a valid block at ``pos``; (None, reason, end) for a
    damaged one, ``end`` being where its own length says it ends when that is known;
    (None, _TORN, None) for one the file ends inside."""
    try:
        total = staging_block.block_length(w.get(pos, staging_block.MAX_RECORD_HEADER))
    except staging_block.RecordError as exc:
        return None, exc.reason, None
    if total is None or pos + total > w.size:
        return None, _TORN, None
    if w.get(pos + total - 1, 1)[0] != 0x0A:  # the check byte, before reading a whole block
        return None, "block not terminated by LF after its length", pos + total
    try:
        staging_block.check_block(w.get(pos, total))
    except staging_block.RecordError as exc:
        return None, exc.reason, pos + total
    return pos + total, "", None


def _resync(w: _Window, pos: int, hint: int | None) -> int | None:
    """The first valid block after damage at ``pos``: where the damaged block's own
    length ends if a valid block starts there, else the first "@" that starts one (not
    only after an LF: bytes may have been lost or inserted anywhere)."""
    if hint is not None and hint < w.size and _block_at(w, hint)[0] is not None:
        return hint
    at = pos + 1
    while True:
        i = w.find(b"@", at)
        if i < 0:
            return None
        if _block_at(w, i)[0] is not None:
            return i
        at = i + 1


def _record_at(w: _Window, pos: int) -> tuple[int | None, str]:
    """Format 1: (next offset, "") for a whole record at ``pos``, (None, reason) otherwise."""
    n = 64 * 1024
    while True:
        try:
            rec, nxt = staging_block.decode(w.get(pos, n))
        except staging_block.RecordError as exc:
            return None, exc.reason
        if rec is not None:
            return pos + nxt, ""
        if pos + n >= w.size:
            return None, _TORN
        if n >= staging_block.MAX_BLOCK:
            return None, "record longer than the largest possible"
        n = min(n * 4, staging_block.MAX_BLOCK)


def _scan_file(fd: int, size: int, hour: str, part: str) -> _Scan:
    """Walk a staging file block by block (bounded memory) and say what to keep."""
    w = _Window(fd, size)
    scan = _Scan(size)
    head = bytes(w.get(0, staging_block.MAX_RECORD_HEADER))
    nl = head.find(b"\n")
    pos = 0
    try:
        if nl < 0:
            raise staging_block.RecordError(0, "incomplete header line")
        fields = staging_block.parse_file_header(head[:nl])
        scan.format = int(fields["format"])
        # The header has no checksum: a flipped bit in HOUR would file the chunk under
        # another hour. The relay names its format 2 files after their header.
        if scan.format == 2 and (fields.get("hour") != hour or fields.get("part") != part):
            raise staging_block.RecordError(0, "header line does not match the file name")
        pos = scan.keep = nl + 1
    except staging_block.RecordError as exc:
        # A damaged header line: if format 2 blocks follow, keep them under a new one.
        scan.reason = exc.reason
        first = _resync(w, 0, None)
        if first is None:
            return scan
        scan.keep = 0
        scan.damaged.append((0, first, exc.reason))
        pos = first
    while pos < size:
        if scan.format == 1:
            nxt, reason = _record_at(w, pos)
            hint = None
        else:
            nxt, reason, hint = _block_at(w, pos)
        if nxt is not None:
            pos = nxt
            continue
        # Format 1 has no block marks to resynchronise on: the rest is the tail.
        after = _resync(w, pos, hint) if scan.format == 2 else None
        if after is None:
            scan.tail, scan.torn, scan.tail_reason = pos, reason == _TORN, reason
            break
        scan.damaged.append((pos, after, reason))
        pos = after
    return scan


def _copy_ranges(fd: int, ranges: list[tuple[int, int]], target: Path, first: bytes) -> int:
    """Write ``first`` then the bytes of ``ranges`` of ``fd`` to ``target`` (created or
    replaced), in bounded pieces, and fsync it. Returns its size."""
    out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        write_all(out, first)
        size = len(first)
        for start, end in ranges:
            pos = start
            while pos < end:
                piece = os.pread(fd, min(_READ, end - pos), pos)
                if not piece:
                    raise OSError(errno.EIO, f"{target.name}: short read")
                write_all(out, piece)
                pos += len(piece)
            size += end - start
        os.fsync(out)
    finally:
        os.close(out)
    return size


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
