"""Durable spool for store-and-forward (format 1, docs/spool-format.md).

Shape and why:

- Append-only segment files named by the first sequence number they may hold.
  A segment is never modified after the writer moved on, so the reader can
  ``pread`` it without coordination, and deleting a delivered segment is one
  ``unlink``. Only an index of segments is kept in memory, never one of records:
  memory stays bounded whatever the backlog.
- Every record carries magic, length, seq, time and a CRC32 over header and
  payload, so recovery can tell a torn tail (cut) from a corrupt record in the
  middle (skipped by scanning for the next header whose CRC holds).
- The delivered position is a checksummed fixed-size slot in a tiny ``acked``
  file, written alternately into two slots: a torn slot write leaves the older
  one readable, and any loss of it only means re-delivery (duplicates), never
  loss, because segments are the truth and the acked position only trims them.
- Two threads at most: a writer (append/sync) and a reader (read/ack/rewind).
  One lock guards the bookkeeping; write(2), pread(2) and fsync run outside it.
  Write descriptors belong to the writer, the read descriptor to the reader, so
  neither ever closes a descriptor the other may be using.
"""

from __future__ import annotations

import errno
import os
import re
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from twisted.logger import Logger

from relay.disk.fileio import fsync_dir, truncate_synced, write_all
from relay.ops.snapshots import SpoolSnapshot

log = Logger(namespace="relay.spool")

SEGMENT_MAGIC = b"SRSPOOL\x01"
_SEG_HEADER = struct.Struct("<8sQ")  # magic, base seq
SEGMENT_HEADER_SIZE = _SEG_HEADER.size
SEGMENT_SUFFIX = ".seg"
_SEGMENT_NAME = re.compile(r"^(\d{20})\.seg$")

RECORD_MAGIC = b"\xd3SP\x01"
_REC = struct.Struct("<4sIQd")  # magic, payload length, seq, time; then CRC32
_CRC = struct.Struct("<I")
RECORD_HEADER_SIZE = _REC.size + _CRC.size
MAX_PAYLOAD = 16 * 1024**2

ACK_FILE = "acked"
ACK_MAGIC = b"SRSPACK\x01"
_ACK = struct.Struct("<8sQQ")  # magic, generation, acked seq; then CRC32
ACK_SLOT_SIZE = 512  # one slot per sector: a torn write spoils at most one
CORRUPT_DIR = "corrupt"
LINK_EPOCH_FILE = "link-epoch"  # relay.link.output: the sender epoch of this spool
LANE_DIR = "lane2"  # relay.link.lanes: a link output's second lane, a spool of its own

WHEN_FULL = ("block", "drop-oldest", "drop-newest")

_SCAN_CHUNK = 1024**2
_MIN_SEGMENT = 64 * 1024


class SpoolFull(Exception):
    """The batch does not fit under ``when_full="block"``: pause the inputs and retry."""


class SpoolWriteError(OSError):
    """A write or fsync failed (disk full, I/O error); a failed write is cut back."""


@dataclass(frozen=True)
class SpoolRecord:
    seq: int
    time: float
    payload: bytes


@dataclass
class SpoolRecovery:
    segments: int = 0  # segments holding records not yet acknowledged
    records: int = 0  # records not yet acknowledged (what is left to deliver)
    torn_bytes: int = 0
    corrupt_records: int = 0
    problems: list[str] = field(default_factory=list)


@dataclass
class AppendResult:
    accepted: int
    dropped_new: int
    dropped_old: int


# --- pure encoding


def segment_name(base: int) -> str:
    return f"{base:020d}{SEGMENT_SUFFIX}"


def segment_header(base: int) -> bytes:
    return _SEG_HEADER.pack(SEGMENT_MAGIC, base)


def cut_back(path: Path, size: int, created: bool = False) -> str:
    """Undo appends made after ``hold`` returned (``path``, ``size``), before the spool is
    opened (relay.link.ledger.roll_back); returns what was done ("" for nothing)."""
    done = []
    for later in sorted(path.parent.glob("*" + SEGMENT_SUFFIX)):
        if _SEGMENT_NAME.match(later.name) and later.name > path.name:
            later.unlink()
            done.append(f"removed {later}")
    cut = truncate_synced(path, size)
    if cut:
        done.append(cut)
    if done:
        fsync_dir(path.parent)
    return "; ".join(done)


def encode_records(first_seq: int, when: float, payloads: Sequence[bytes]) -> bytes:
    """Records for ``payloads`` numbered from ``first_seq``, all stamped ``when``."""
    parts: list[bytes] = []
    pack, pack_crc, crc32 = _REC.pack, _CRC.pack, zlib.crc32
    seq = first_seq
    for payload in payloads:
        head = pack(RECORD_MAGIC, len(payload), seq, when)
        parts.append(head)
        parts.append(pack_crc(crc32(payload, crc32(head))))
        parts.append(payload)
        seq += 1
    return b"".join(parts)


def encode_ack(generation: int, acked: int) -> bytes:
    body = _ACK.pack(ACK_MAGIC, generation, acked)
    return body + _CRC.pack(zlib.crc32(body))


def decode_ack(slot: bytes) -> tuple[int, int] | None:
    """(generation, acked) of a valid slot, else None."""
    n = _ACK.size
    if len(slot) < n + _CRC.size:
        return None
    if zlib.crc32(slot[:n]) != _CRC.unpack_from(slot, n)[0]:
        return None
    magic, generation, acked = _ACK.unpack_from(slot)
    if magic != ACK_MAGIC:
        return None
    return generation, acked


# --- bounded reading of a segment (recovery and the corrupt-data path)


class _BlockReader:
    """Random access to ``[0, end)`` of a file through one buffer of bounded size."""

    def __init__(self, fd: int, end: int, chunk: int = _SCAN_CHUNK) -> None:
        self.fd = fd
        self.end = end
        self.chunk = chunk
        self.buf = b""
        self.start = 0

    def view(self, off: int, n: int) -> memoryview | None:
        if off < 0 or off + n > self.end:
            return None
        if off < self.start or off + n > self.start + len(self.buf):
            self.buf = os.pread(self.fd, min(max(n, self.chunk), self.end - off), off)
            self.start = off
            if len(self.buf) < n:
                return None
        i = off - self.start
        return memoryview(self.buf)[i : i + n]


def _record_at(r: _BlockReader, off: int) -> tuple[int, float, int] | None:
    """(seq, time, total length) when a whole valid record starts at ``off``."""
    head = r.view(off, RECORD_HEADER_SIZE)
    if head is None:
        return None
    magic, length, seq, when = _REC.unpack_from(head)
    if magic != RECORD_MAGIC or length > MAX_PAYLOAD:
        return None
    whole = r.view(off, RECORD_HEADER_SIZE + length)
    if whole is None:
        return None
    crc = zlib.crc32(whole[RECORD_HEADER_SIZE:], zlib.crc32(whole[: _REC.size]))
    if crc != _CRC.unpack_from(whole, _REC.size)[0]:
        return None
    return seq, when, RECORD_HEADER_SIZE + length


def _resync(r: _BlockReader, start: int, after_seq: int) -> tuple[int, int] | None:
    """First valid record at or after ``start`` with a seq above ``after_seq``: (offset, seq)."""
    pos = start
    while pos < r.end:
        if r.view(pos, min(RECORD_HEADER_SIZE, r.end - pos)) is None:
            return None
        i = r.buf.find(RECORD_MAGIC, pos - r.start)
        if i < 0:
            # Keep the last bytes: a magic may straddle the buffer end.
            pos = max(pos + 1, r.start + len(r.buf) - len(RECORD_MAGIC) + 1)
            continue
        cand = r.start + i
        rec = _record_at(r, cand)
        if rec is not None and rec[0] > after_seq:
            return cand, rec[0]
        pos = cand + 1
    return None


@dataclass
class _Scan:
    records: int = 0
    first_seq: int = 0
    last_seq: int = 0
    first_time: float | None = None
    valid_end: int = SEGMENT_HEADER_SIZE
    torn: int = 0
    corrupt: int = 0
    bad: dict[int, int] = field(default_factory=dict)
    cursor: int | None = None  # offset of the first record above ``acked``
    cursor_time: float | None = None
    unacked: int = 0  # records above ``acked``


def _scan_segment(fd: int, size: int, after_seq: int, acked: int) -> _Scan:
    """Walk a segment with a bounded buffer, checking every CRC."""
    r = _BlockReader(fd, size)
    s = _Scan()
    prev = after_seq
    pos = SEGMENT_HEADER_SIZE
    while pos < size:
        rec = _record_at(r, pos)
        if rec is not None and rec[0] > prev:
            seq, when, n = rec
            if s.records == 0:
                s.first_seq, s.first_time = seq, when
            s.records += 1
            s.last_seq = prev = seq
            if seq > acked:
                s.unacked += 1
                if s.cursor is None:
                    s.cursor, s.cursor_time = pos, when
            pos += n
            continue
        if rec is not None:
            # A valid record out of order (files copied around): skip it whole.
            s.bad[pos] = pos + rec[2]
            s.corrupt += 1
            pos += rec[2]
            continue
        nxt = _resync(r, pos + 1, prev)
        if nxt is None:
            s.torn = size - pos
            break
        s.bad[pos] = nxt[0]
        s.corrupt += max(1, nxt[1] - prev - 1)
        pos = nxt[0]
    s.valid_end = pos if s.torn else size
    return s


# --- the spool


@dataclass(eq=False)
class _Segment:
    base: int
    path: Path
    size: int  # bytes of whole records written (the reader never reads past it)
    records: int = 0
    first_seq: int = 0
    last_seq: int = 0
    first_time: float | None = None
    bad: dict[int, int] = field(default_factory=dict)  # corrupt region start -> next record
    alive: bool = True


@dataclass
class _InFlight:
    seg: _Segment
    start: int  # offset of the first record handed out by that read
    first_time: float
    last_seq: int


class Spool:
    """A durable FIFO with an unacknowledged backlog; see the module docstring."""

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        when_full: str = "block",
        segment_size: int = 64 * 1024**2,
        *,
        ack_persist_records: int = 10_000,
        ack_persist_interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        shared: Callable[[], int] | None = None,
    ) -> None:
        if when_full not in WHEN_FULL:
            raise ValueError(f"when_full must be one of {', '.join(WHEN_FULL)}: {when_full!r}")
        if max_bytes < 4 * (SEGMENT_HEADER_SIZE + RECORD_HEADER_SIZE):
            raise ValueError(f"max_bytes too small: {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.when_full = when_full
        self.segment_size = segment_size
        # Acked bytes of the oldest segment still count against max_bytes until
        # the whole segment is delivered: keep segments small next to the limit.
        self._seg_limit = min(segment_size, max(max_bytes // 8, min(_MIN_SEGMENT, max_bytes // 4)))
        self._ack_persist_records = ack_persist_records
        self._ack_persist_interval = ack_persist_interval
        self._clock = clock
        # Bytes of the other spools sharing max_bytes (relay.link.lanes); writer thread.
        self._shared = shared

        self._lock = threading.Lock()
        self._ack_io_lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._disk_bytes = 0
        self._gen = 0  # bumped when the read cursor is moved under the reader's feet

        # writer side
        self._head_fd: int | None = None
        self._head_dirty = False
        self._dir_dirty = False
        self._unsynced: list[int] = []  # descriptors of rolled segments awaiting fsync
        self._next_seq = 1
        self._synced_seq = 0
        # (segment base, size): records appended after it are hidden from the reader
        # until release() (a journaled batch, relay.link.ledger: it may be rolled back).
        self._hold: tuple[int, int] | None = None

        # reader side
        self._acked = 0
        self._max_read_seq = 0
        self._read_seq = 0  # records up to here are not handed out again before rewind()
        self._cur: _Segment | None = None
        self._cur_off = SEGMENT_HEADER_SIZE
        self._cursor_time: float | None = None
        self._last_read_time: float | None = None
        self._inflight: deque[_InFlight] = deque()
        self._rfd: int | None = None
        self._rfd_seg: _Segment | None = None

        # acked file
        self._ack_fd: int | None = None
        self._ack_gen = 0
        self._persisted_ack = 0
        self._last_persist = clock()

        # counters since open, read through snapshot() (drops and full spools are counted
        # by the writer, from each append's result or SpoolFull)
        self.corrupt_total = 0
        self.segments_deleted_total = 0

    # --- lifecycle

    def open(self) -> SpoolRecovery:
        """Create the directory or recover it. Bad content is counted and moved aside."""
        report = SpoolRecovery()
        self.directory.mkdir(parents=True, exist_ok=True)
        acked, ack_ok = self._read_ack_file(report)
        found: list[tuple[int, Path]] = []
        for entry in sorted(os.scandir(self.directory), key=lambda e: e.name):
            m = _SEGMENT_NAME.match(entry.name)
            if m is not None:
                if entry.is_file(follow_symlinks=False):
                    found.append((int(m.group(1)), Path(entry.path)))
                else:
                    self._quarantine(Path(entry.path), "not a regular file", report)
            elif entry.name not in (ACK_FILE, CORRUPT_DIR, LINK_EPOCH_FILE, LANE_DIR):
                report.problems.append(f"{entry.name}: unexpected file, left alone")
        next_seq = max(1, acked + 1)
        last_seq = 0
        keep: list[_Segment] = []
        for i, (base, path) in enumerate(found):
            next_seq = max(next_seq, base)
            later_base = found[i + 1][0] if i + 1 < len(found) else None
            if later_base is not None and later_base - 1 <= acked and later_base > base:
                # Every seq it can hold is below the next segment's base and acked.
                self._unlink(path)
                continue
            seg = self._recover_segment(base, path, last_seq, acked, report)
            if seg is None:
                continue
            if seg.records:
                last_seq = seg.last_seq
                next_seq = max(next_seq, last_seq + 1)
            if seg.records == 0 or seg.last_seq <= acked:
                self._unlink(path)
                continue
            report.segments += 1
            keep.append(seg)
        self._next_seq = next_seq
        self._synced_seq = next_seq - 1
        self._acked = self._read_seq = self._max_read_seq = self._persisted_ack = acked
        self._segments = keep
        self._disk_bytes = sum(s.size for s in keep)
        self._ack_fd = os.open(
            self.directory / ACK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640
        )
        if not ack_ok:
            self._write_ack_slot(acked)
        head, self._head_fd = self._create_segment(next_seq)
        self._segments.append(head)
        self._disk_bytes += head.size
        if self._cur is None:
            self._cur, self._cur_off = head, SEGMENT_HEADER_SIZE
        fsync_dir(self.directory)
        self._dir_dirty = False
        if report.problems:
            for problem in report.problems:
                log.warn("spool {dir}: {problem}", dir=str(self.directory), problem=problem)
        return report

    def _recover_segment(
        self, base: int, path: Path, after_seq: int, acked: int, report: SpoolRecovery
    ) -> _Segment | None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            self._quarantine(path, f"cannot open: {exc.strerror}", report)
            return None
        try:
            size = os.fstat(fd).st_size
            if size <= SEGMENT_HEADER_SIZE:
                # Created but never written to (or torn while writing its header).
                return _Segment(base, path, SEGMENT_HEADER_SIZE)
            header = os.pread(fd, SEGMENT_HEADER_SIZE, 0)
            if header != segment_header(base):
                report.problems.append(f"{path.name}: bad segment header, scanning for records")
            scan = _scan_segment(fd, size, after_seq, acked)
            if scan.records == 0:
                self._quarantine(path, "no valid record", report)
                report.corrupt_records += scan.corrupt
                return None
            if scan.torn:
                report.torn_bytes += scan.torn
                report.problems.append(
                    f"{path.name}: cut {scan.torn} bytes at offset {scan.valid_end} (torn tail)"
                )
                os.ftruncate(fd, scan.valid_end)
                os.fsync(fd)
            if scan.corrupt:
                report.corrupt_records += scan.corrupt
                report.problems.append(
                    f"{path.name}: skipped {scan.corrupt} corrupt records in "
                    f"{len(scan.bad)} regions"
                )
        except OSError as exc:
            self._quarantine(path, f"cannot read: {exc.strerror}", report)
            return None
        finally:
            os.close(fd)
        self.corrupt_total += scan.corrupt
        report.records += scan.unacked
        seg = _Segment(
            base,
            path,
            scan.valid_end,
            records=scan.records,
            first_seq=scan.first_seq,
            last_seq=scan.last_seq,
            first_time=scan.first_time,
            bad=scan.bad,
        )
        if self._cur is None and scan.cursor is not None:
            self._cur, self._cur_off, self._cursor_time = seg, scan.cursor, scan.cursor_time
        return seg

    def _quarantine(self, path: Path, reason: str, report: SpoolRecovery) -> None:
        corrupt = self.directory / CORRUPT_DIR
        corrupt.mkdir(exist_ok=True)
        target = corrupt / path.name
        n = 0
        while target.exists():
            n += 1
            target = corrupt / f"{path.name}.{n}"
        os.replace(path, target)
        report.problems.append(f"{path.name}: moved to {CORRUPT_DIR}/{target.name} ({reason})")

    def _read_ack_file(self, report: SpoolRecovery) -> tuple[int, bool]:
        """(acked, file was fine). A bad file means nothing acked past the last good slot."""
        path = self.directory / ACK_FILE
        if not path.exists() and not path.is_symlink():
            return 0, False
        if not path.is_file():
            self._quarantine(path, "not a regular file", report)
            return 0, False
        try:
            data = path.read_bytes()[: 2 * ACK_SLOT_SIZE]
        except OSError as exc:
            self._quarantine(path, f"cannot read: {exc.strerror}", report)
            return 0, False
        slots = [decode_ack(data[i * ACK_SLOT_SIZE : (i + 1) * ACK_SLOT_SIZE]) for i in (0, 1)]
        good = [s for s in slots if s is not None]
        if not good:
            report.problems.append(f"{ACK_FILE}: no valid slot, re-delivering every record")
            return 0, False
        generation, acked = max(good)
        self._ack_gen = generation
        torn = [
            i
            for i in (0, 1)
            if slots[i] is None and data[i * ACK_SLOT_SIZE : (i + 1) * ACK_SLOT_SIZE].strip(b"\0")
        ]
        if torn:
            report.problems.append(f"{ACK_FILE}: one slot unreadable, using the other")
        return acked, True

    def close(self) -> None:
        """Fsync data and the acked position, close every descriptor. Idempotent."""
        if self._ack_fd is None:
            return
        self.sync()
        self.persist_ack()
        self._close_fds()

    def _close_fds(self) -> None:
        """Close without syncing (close() syncs first; tests call this to imitate a crash).

        Each descriptor is taken out under the lock before it is closed, so a second
        close (another thread, a second caller) finds nothing: a number is never
        closed twice, which could close a file or socket that reused it.
        """
        with self._ack_io_lock, self._lock:  # not while an acked slot is being written
            fds = [*self._unsynced, self._head_fd, self._ack_fd, self._rfd]
            self._unsynced = []
            self._head_fd = self._ack_fd = self._rfd = None
            self._rfd_seg = None
        for fd in fds:
            if fd is not None:
                os.close(fd)

    # --- writer thread

    def append(self, payloads: Sequence[bytes], now: float) -> AppendResult:
        """Append a batch with one write(2), applying ``when_full``. Not yet fsynced."""
        if not payloads:
            return AppendResult(0, 0, 0)
        sizes = [RECORD_HEADER_SIZE + len(p) for p in payloads]
        if max(sizes) > RECORD_HEADER_SIZE + MAX_PAYLOAD:
            raise ValueError(f"record payload larger than {MAX_PAYLOAD} bytes")
        total = sum(sizes)
        first, end = 0, len(payloads)
        dropped_new = dropped_old = 0
        if total > self._room():
            self._reclaim()
        if total > self._room():
            capacity = self.max_bytes - 2 * SEGMENT_HEADER_SIZE
            if self.when_full == "block":
                if total > capacity:
                    raise ValueError(f"batch of {total} bytes can never fit in {self.max_bytes}")
                raise SpoolFull(f"spool full: {self._disk_bytes} of {self.max_bytes} bytes")
            if self.when_full == "drop-newest":
                room, used = self._room(), 0
                end = 0
                while end < len(sizes) and used + sizes[end] <= room:
                    used += sizes[end]
                    end += 1
                dropped_new = len(payloads) - end
            else:
                dropped_old = self._drop_oldest(total)
                room, used = self._room(), total
                while first < len(sizes) and used > room:
                    used -= sizes[first]
                    first += 1
                dropped_old += first
        if first >= end:
            return AppendResult(0, dropped_new, dropped_old)
        batch = payloads[first:end] if (first, end) != (0, len(payloads)) else payloads
        nbytes = sum(sizes[first:end])
        head = self._segments[-1]
        if head.records and head.size + nbytes > self._seg_limit:
            self._roll()
            head = self._segments[-1]
        seq0 = self._next_seq
        data = encode_records(seq0, now, batch)
        fd = self._head_fd
        assert fd is not None, "spool not open"
        try:
            write_all(fd, data)
        except OSError as exc:
            try:
                os.ftruncate(fd, head.size)
            except OSError:
                pass
            raise SpoolWriteError(
                exc.errno or errno.EIO, f"{head.path.name}: {exc.strerror}"
            ) from exc
        n = len(batch)
        with self._lock:
            if self._max_read_seq >= self._next_seq - 1 and self._read_seq == self._next_seq - 1:
                # The reader has everything: the first new record is the next it gets.
                self._cursor_time = now
            head.size += len(data)
            if head.records == 0:
                head.first_seq, head.first_time = seq0, now
            head.records += n
            head.last_seq = seq0 + n - 1
            self._next_seq = seq0 + n
            self._disk_bytes += len(data)
            self._head_dirty = True
        return AppendResult(n, dropped_new, dropped_old)

    def hold(self) -> list[tuple[Path, int]]:
        """Hide what is appended from now on from the reader until ``release``; returns
        where the spool ends now (its head segment and size), for a roll back. A list,
        one per directory of segments: a laned spool (relay.link.lanes) has two."""
        with self._lock:
            head = self._segments[-1]
            self._hold = (head.base, head.size)
        return [(head.path, head.size)]

    def release(self) -> None:
        with self._lock:
            self._hold = None

    def _room(self) -> int:
        # Reserve a segment header in case the batch needs a new segment.
        others = self._shared() if self._shared is not None else 0
        with self._lock:
            return self.max_bytes - self._disk_bytes - others - SEGMENT_HEADER_SIZE

    def shed(self, need: int) -> int:
        """Writer thread: delete this spool's oldest whole segments, delivered or not,
        until ``need`` bytes fit under ``max_bytes`` (shared with the other lane) or
        nothing is left; returns the unacked records lost (``drop-oldest`` of a lane)."""
        return self._drop_oldest(need)

    def _reclaim(self) -> None:
        """Roll a head whose records are all delivered, so its bytes can be freed."""
        head = self._segments[-1]
        with self._lock:
            done = head.records > 0 and head.last_seq <= self._acked
        if done:
            self._roll()

    def _drop_oldest(self, need: int) -> int:
        """Delete the oldest segments until ``need`` bytes fit; returns unacked records lost."""
        lost = 0
        while need > self._room():
            with self._lock:
                only_head = len(self._segments) == 1
                head_empty = self._segments[-1].records == 0
            if only_head:
                if head_empty:
                    break
                self._roll()  # the old head becomes droppable (or is deleted if delivered)
                continue
            with self._lock:
                if len(self._segments) == 1:
                    continue  # the reader deleted it meanwhile
                victim = self._segments[0]
                acked = self._acked
                if victim.records and victim.last_seq > acked:
                    lost += min(victim.records, victim.last_seq - max(acked, victim.first_seq - 1))
                self._forget(victim)
            self._unlink(victim.path)
        if lost:
            log.warn(
                "spool {dir} full: dropped {n} oldest records", dir=str(self.directory), n=lost
            )
        return lost

    def _roll(self) -> None:
        seg, fd = self._create_segment(self._next_seq, sync=False)
        with self._lock:
            old_fd, self._head_fd = self._head_fd, fd
            if old_fd is not None:
                self._unsynced.append(old_fd)
            self._segments.append(seg)
            self._disk_bytes += seg.size
            self._head_dirty = True
            self._dir_dirty = True
            doomed = self._fully_acked()
        for s in doomed:
            self._unlink(s.path)

    def _create_segment(self, base: int, sync: bool = True) -> tuple[_Segment, int]:
        path = self.directory / segment_name(base)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            write_all(fd, segment_header(base))
            if sync:
                os.fdatasync(fd)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            raise SpoolWriteError(exc.errno or errno.EIO, f"{path.name}: {exc.strerror}") from exc
        return _Segment(base, path, SEGMENT_HEADER_SIZE), fd

    def sync(self) -> None:
        """Fsync everything appended so far (group commit), and the acked position if due."""
        with self._lock:
            fds, self._unsynced = self._unsynced, []
            head_fd = self._head_fd if self._head_dirty else None
            self._head_dirty = False
            dir_dirty, self._dir_dirty = self._dir_dirty, False
            target = self._next_seq - 1
        try:
            for fd in fds:
                os.fdatasync(fd)
            if head_fd is not None:
                os.fdatasync(head_fd)
            if dir_dirty:
                fsync_dir(self.directory)
        except OSError as exc:
            with self._lock:
                self._unsynced = fds + self._unsynced
                self._head_dirty = self._head_dirty or head_fd is not None
                self._dir_dirty = self._dir_dirty or dir_dirty
            raise SpoolWriteError(exc.errno or errno.EIO, f"fsync: {exc.strerror}") from exc
        for fd in fds:
            os.close(fd)
        with self._lock:
            self._synced_seq = max(self._synced_seq, target)
            due = (
                self._acked > self._persisted_ack
                and self._clock() - self._last_persist >= self._ack_persist_interval
            )
        if due:
            self.persist_ack()

    # --- reader thread

    def read(self, max_records: int, max_bytes: int) -> list[SpoolRecord]:
        """The next records not yet handed out (at least one if any, even above max_bytes)."""
        out: list[SpoolRecord] = []
        budget = max_bytes
        # Each pass makes progress (records, a segment change, a skipped region).
        for _ in range(64 + 4 * len(self._segments)):
            if len(out) >= max_records:
                break
            with self._lock:
                seg = self._cur
                if seg is None or not seg.alive:
                    seg = self._segments[0] if self._segments else None
                    self._move_cursor(seg)
                if seg is None:
                    break
                off, end = self._cur_off, seg.size
                if self._hold is not None:
                    base, size = self._hold
                    if seg.base > base or (seg.base == base and off >= size):
                        break  # the rest may yet be rolled back
                    if seg.base == base:
                        end = min(end, size)
                if off >= end:
                    idx = self._segments.index(seg)
                    if idx + 1 >= len(self._segments):
                        break
                    self._move_cursor(self._segments[idx + 1])
                    continue
                skip = max(self._read_seq, self._acked)
                gen = self._gen
                bad = dict(seg.bad)
            fd = self._reader_fd(seg)
            if fd is None:
                continue
            got, new_off, found_bad, corrupt, next_time, full = _parse(
                fd, off, end, bad, skip, max_records - len(out), budget, not out
            )
            with self._lock:
                if gen != self._gen or not seg.alive:
                    continue  # cursor moved (segment dropped): read again from its new place
                self._cur_off = new_off
                seg.bad.update(found_bad)
                self.corrupt_total += corrupt
                if got:
                    self._read_seq = got[-1].seq
                    self._max_read_seq = max(self._max_read_seq, self._read_seq)
                    self._inflight.append(_InFlight(seg, off, got[0].time, got[-1].seq))
                    self._last_read_time = got[-1].time
                    self._cursor_time = next_time
            out.extend(got)
            budget -= sum(len(r.payload) for r in got)
            if full:
                break
        return out

    def _reader_fd(self, seg: _Segment) -> int | None:
        with self._lock:  # taken out under the lock, like _close_fds: closed once
            if self._rfd_seg is seg and self._rfd is not None:
                return self._rfd
            if self._ack_fd is None:
                return None  # closed: a late read must not open a descriptor nobody closes
            old, self._rfd, self._rfd_seg = self._rfd, None, None
        if old is not None:
            os.close(old)
        try:
            fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None  # deleted meanwhile; the next pass sees it gone
        with self._lock:
            self._rfd, self._rfd_seg = fd, seg
        return fd

    def _move_cursor(self, seg: _Segment | None) -> None:
        """Under the lock: cursor to the start of ``seg``."""
        self._cur, self._cur_off = seg, SEGMENT_HEADER_SIZE
        self._cursor_time = seg.first_time if seg is not None else None
        self._gen += 1

    def ack(self, upto_seq: int) -> None:
        """Everything up to ``upto_seq`` (at most what read() handed out) is delivered."""
        with self._lock:
            upto = min(upto_seq, self._max_read_seq)
            if upto <= self._acked:
                return
            self._acked = upto
            while self._inflight and self._inflight[0].last_seq <= upto:
                self._inflight.popleft()
            doomed = self._fully_acked()
            due = upto - self._persisted_ack >= self._ack_persist_records or (
                self._clock() - self._last_persist >= self._ack_persist_interval
            )
        for seg in doomed:
            self._unlink(seg.path)
        if due:
            self.persist_ack()

    def _fully_acked(self) -> list[_Segment]:
        """Under the lock: take delivered segments (never the head) out of the index."""
        doomed: list[_Segment] = []
        while len(self._segments) > 1 and self._segments[0].last_seq <= self._acked:
            doomed.append(self._segments[0])
            self._forget(self._segments[0])
        return doomed

    def _forget(self, seg: _Segment) -> None:
        """Under the lock: remove ``seg`` from the index; the caller unlinks it."""
        self._segments.remove(seg)
        seg.alive = False
        self._disk_bytes -= seg.size
        self.segments_deleted_total += 1
        while self._inflight and not self._inflight[0].seg.alive:
            self._inflight.popleft()
        if self._cur is seg:
            self._move_cursor(self._segments[0] if self._segments else None)

    def rewind(self) -> None:
        """Hand out again everything not acked (a connection died with records in flight)."""
        with self._lock:
            self._read_seq = self._acked
            if self._inflight:
                first = self._inflight[0]
                self._cur, self._cur_off = first.seg, first.start
                self._cursor_time = first.first_time
                self._inflight.clear()
            self._gen += 1

    def persist_ack(self) -> None:
        """Write the acked position now (ack() and sync() do it when due)."""
        with self._ack_io_lock:
            with self._lock:
                value = self._acked
                if value <= self._persisted_ack or self._ack_fd is None:
                    return
            self._write_ack_slot(value)

    def _write_ack_slot(self, value: int) -> None:
        fd = self._ack_fd
        assert fd is not None
        gen = self._ack_gen + 1
        try:
            os.pwrite(fd, encode_ack(gen, value), (gen % 2) * ACK_SLOT_SIZE)
            os.fdatasync(fd)
        except OSError as exc:
            raise SpoolWriteError(exc.errno or errno.EIO, f"{ACK_FILE}: {exc.strerror}") from exc
        self._ack_gen = gen
        with self._lock:
            self._persisted_ack = max(self._persisted_ack, value)
            self._last_persist = self._clock()

    def _unlink(self, path: Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("spool: cannot delete {path}: {error}", path=str(path), error=exc.strerror)

    # --- introspection

    def _depth(self) -> tuple[int, int]:
        acked, n, b = self._acked, 0, 0
        for s in self._segments:
            if s.records == 0 or s.last_seq <= acked:
                continue
            data = s.size - SEGMENT_HEADER_SIZE
            if s.first_seq > acked:
                n, b = n + s.records, b + data
            else:
                # Seqs are dense inside a segment unless records were corrupt.
                u = min(s.records, s.last_seq - acked)
                n, b = n + u, b + data * u // s.records
        return n, b

    @property
    def depth_records(self) -> int:
        """Records not yet acked."""
        with self._lock:
            return self._depth()[0]

    @property
    def depth_bytes(self) -> int:
        """On-disk bytes of the records not yet acked (prorated inside the oldest segment)."""
        with self._lock:
            return self._depth()[1]

    @property
    def oldest_time(self) -> float | None:
        """Time of the oldest unacked record, exact to within one read() batch."""
        with self._lock:
            if self._depth()[0] == 0:
                return None
            if self._inflight:
                return self._inflight[0].first_time
            if self._cursor_time is not None:
                return self._cursor_time
            return self._last_read_time

    def snapshot(self) -> SpoolSnapshot:
        """Depth and the counters since the spool was opened, for the metrics endpoint."""
        records, depth, oldest, disk = (
            self.depth_records,
            self.depth_bytes,
            self.oldest_time,
            self.disk_bytes,
        )
        with self._lock:
            return SpoolSnapshot(
                records, depth, oldest, disk, self.corrupt_total, self.segments_deleted_total
            )

    @property
    def disk_bytes(self) -> int:
        """Bytes of every segment file, the quantity bounded by ``max_bytes``."""
        with self._lock:
            return self._disk_bytes

    @property
    def segments(self) -> int:
        with self._lock:
            return len(self._segments)

    @property
    def last_seq(self) -> int:
        """Seq of the last record appended (0 if none ever)."""
        with self._lock:
            return self._next_seq - 1

    @property
    def synced_seq(self) -> int:
        """Every record up to this seq is on stable storage."""
        with self._lock:
            return self._synced_seq

    @property
    def acked_seq(self) -> int:
        with self._lock:
            return self._acked

    @property
    def persisted_ack_seq(self) -> int:
        """The acked position as the acked file holds it (what a crash would fall back to)."""
        with self._lock:
            return self._persisted_ack


def _parse(
    fd: int,
    off: int,
    end: int,
    bad: dict[int, int],
    skip: int,
    max_records: int,
    max_bytes: int,
    at_least_one: bool,
) -> tuple[list[SpoolRecord], int, dict[int, int], int, float | None, bool]:
    """Records of one segment from ``off`` up to ``end`` (bounded buffer; CRC checked).

    Returns (records, next offset, new corrupt regions, corrupt records lost,
    time of the next record when its header was seen, whether a limit was hit).
    """
    out: list[SpoolRecord] = []
    found_bad: dict[int, int] = {}
    corrupt = 0
    chunk = min(4 * 1024**2, max(64 * 1024, max_bytes + RECORD_HEADER_SIZE * max_records))
    unpack, unpack_crc, crc32 = _REC.unpack_from, _CRC.unpack_from, zlib.crc32
    hsize, rsize = RECORD_HEADER_SIZE, _REC.size
    used = 0
    last_seq = skip
    next_time: float | None = None
    full = False
    while off < end and not full:
        buf = os.pread(fd, min(end - off, chunk), off)
        n = len(buf)
        i = 0
        jump: int | None = None
        while True:
            if i + hsize > n:
                if i == 0:
                    jump = -1  # committed bytes that cannot hold a header: corrupt
                break
            magic, length, seq, when = unpack(buf, i)
            if len(out) >= max_records:
                next_time = when if magic == RECORD_MAGIC else None
                full = True
                break
            j = i + hsize + length
            valid = magic == RECORD_MAGIC and length <= MAX_PAYLOAD and off + j <= end
            if valid and j > n:
                if i > 0:
                    break  # continue with a fresh buffer at this record
                buf = os.pread(fd, j, off)  # one record larger than the chunk
                n = len(buf)
                valid = n >= j
            if valid:
                payload = buf[i + hsize : j]
                valid = crc32(payload, crc32(buf[i : i + rsize])) == unpack_crc(buf, i + rsize)[0]
            if not valid:
                jump = -1
                break
            if seq <= last_seq:
                i = j  # handed out before a rewind, or acked
                continue
            if (out or not at_least_one) and used + length > max_bytes:
                next_time = when
                full = True
                break
            out.append(SpoolRecord(seq, when, payload))
            used += length
            last_seq = seq
            i = j
        if jump is None:
            off += i
            continue
        pos = off + i
        nxt = bad.get(pos)
        if nxt is None:
            hit = _resync(_BlockReader(fd, end), pos + 1, last_seq)
            nxt = end if hit is None else hit[0]
            found_bad[pos] = nxt
            corrupt += 1 if hit is None else max(1, hit[1] - last_seq - 1)
        off = nxt
    return out, off, found_bad, corrupt, next_time, full
