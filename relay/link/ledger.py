"""What a receiving relay has committed, per sending relay and sender epoch.

Deduplication rests on two numbers per (relay id, epoch) key:

* ``accepted`` (memory, reactor thread): the highest record seq handed to the
  durable writer. A record at or below it is never handed over again; a batch
  ending at or below it is acknowledged once ``committed`` reaches its seq.
* ``committed``: the highest record seq whose data is in staging and every
  spool. ``CommitLog`` keeps it on disk, written by the durable writer thread
  right after the data (``written``, page cache) and again after the data's
  fsync (``sync``, stable storage). After a process crash (kill -9) the page
  cache survived, so the written position holds; after a reboot only the synced
  one does (the data written since may be gone). The boot id in the file tells
  which case it is: a resent batch is then either known (acknowledged, not
  written) or written again, never both and never neither.

File ``STATE_DIR/link/committed``: fixed 92-byte entries (``docs/relay-link.md``),
appended; rewritten compactly at open and when it grows past 4 MiB.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

from relay.fileio import fsync_dir

Key = tuple[str, int]  # sending relay id, its epoch

_ENTRY = struct.Struct("!4sBB2xQQ64s")  # magic, kind, id length, epoch, seq, id
ENTRY_SIZE = _ENTRY.size + 4  # + CRC-32
_MAGIC = b"SRLC"
_BOOT = ord("B")
_WRITTEN = ord("W")
_SYNCED = ord("S")
_COMPACT_AT = 4 * 1024 * 1024
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str:
    """This boot's id (Linux); "" elsewhere, which makes every start count as a reboot."""
    try:
        return Path(_BOOT_ID).read_text().strip()
    except OSError:
        return ""


def _entry(kind: int, key: Key, seq: int) -> bytes:
    rid = key[0].encode()[:64]
    body = _ENTRY.pack(_MAGIC, kind, len(rid), key[1], seq, rid)
    return body + struct.pack("!I", zlib.crc32(body) & 0xFFFFFFFF)


def _parse(data: bytes) -> tuple[list[tuple[int, Key, int]], int]:
    """Valid entries and the length they cover (a torn or damaged tail is cut there)."""
    out: list[tuple[int, Key, int]] = []
    i = 0
    while i + ENTRY_SIZE <= len(data):
        body = data[i : i + _ENTRY.size]
        (crc,) = struct.unpack_from("!I", data, i + _ENTRY.size)
        if zlib.crc32(body) & 0xFFFFFFFF != crc:
            break
        magic, kind, n, epoch, seq, rid = _ENTRY.unpack(body)
        if magic != _MAGIC:
            break
        out.append((kind, (rid[:n].decode("utf-8", "replace"), epoch), seq))
        i += ENTRY_SIZE
    return out, i


class CommitLog:
    """The durable half of the ledger. ``open`` in any thread before the writer starts;
    ``written`` and ``sync`` in the durable writer thread only."""

    def __init__(self, directory: Path, boot: Callable[[], str] = boot_id) -> None:
        self.directory = directory
        self.path = directory / "committed"
        self._boot = boot
        self._fd = -1
        self._written: dict[Key, int] = {}
        self._synced: dict[Key, int] = {}
        self._size = 0
        self._lock = threading.Lock()  # guards the two dicts for snapshot()
        self.problems: list[str] = []
        self.write_errors = 0  # ``written`` entries that could not be appended

    def open(self) -> dict[Key, int]:
        """Recover the committed positions; returns them (the ledger starts from these)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        entries, good = _parse(data)
        if good < len(data):
            self.problems.append(f"{self.path}: {len(data) - good} bytes of torn tail ignored")
        boot = self._boot()
        same_boot = False
        written: dict[Key, int] = {}
        synced: dict[Key, int] = {}
        for kind, key, seq in entries:
            if kind == _BOOT:
                same_boot = bool(boot) and key[0] == boot
            elif kind == _SYNCED:
                synced[key] = max(synced.get(key, 0), seq)
            elif kind == _WRITTEN:
                written[key] = max(written.get(key, 0), seq)
        state = dict(synced)
        if same_boot:
            # A process crash: the page cache (data and these entries) survived.
            for key, seq in written.items():
                state[key] = max(state.get(key, 0), seq)
            if any(written.get(k, 0) > synced.get(k, 0) for k in written):
                os.sync()  # make the data those entries describe durable before relying on it
        self._written = dict(state)
        self._synced = dict(state)
        self._rewrite()
        return dict(state)

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        data = _entry(_BOOT, (self._boot(), 0), 0) + b"".join(
            _entry(_SYNCED, key, seq) for key, seq in sorted(self._synced.items())
        )
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        fsync_dir(self.directory)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._size = len(data)

    def written(self, key: Key, seq: int) -> None:
        """The data of every record up to ``seq`` from ``key`` was just written (not synced).

        Never raises: without this entry a crash before the next ``sync`` only makes the
        batch come again and be written twice (disk full: the writer is retrying anyway).
        """
        with self._lock:
            if seq <= self._written.get(key, 0):
                return
            self._written[key] = seq
        try:
            self._append(_entry(_WRITTEN, key, seq))
        except OSError:
            self.write_errors += 1

    def sync(self) -> None:
        """Called after the data's fsync: what was written is now durable; say so durably.

        Raises OSError (disk full, I/O error): the writer then holds every ack back and
        calls again at its next commit."""
        with self._lock:
            due = [(k, s) for k, s in self._written.items() if s > self._synced.get(k, 0)]
        if not due:
            return
        self._append(b"".join(_entry(_SYNCED, k, s) for k, s in due))
        os.fdatasync(self._fd)
        with self._lock:
            for key, seq in due:
                self._synced[key] = seq
        if self._size > _COMPACT_AT:
            self._rewrite()

    def _append(self, data: bytes) -> None:
        """Whole entries or nothing: a failed append is cut back (no torn entry mid-file)."""
        try:
            n = os.write(self._fd, data)
            if n != len(data):
                raise OSError(f"short write to {self.path}")
        except OSError:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                pass  # a torn tail is cut at the next open
            raise
        self._size += len(data)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"senders": len(self._synced), "bytes": self._size}


class _Sender:
    __slots__ = ("accepted", "committed", "waiters")

    def __init__(self, committed: int) -> None:
        self.accepted = committed
        self.committed = committed
        self.waiters: list[tuple[int, Callable[[], None]]] = []


class Ledger:
    """The in-memory half, in the reactor thread: admission of records and ack timing."""

    def __init__(self, recovered: dict[Key, int] | None = None) -> None:
        self._senders: dict[Key, _Sender] = {k: _Sender(v) for k, v in (recovered or {}).items()}
        self.duplicates_total = 0  # records received again and not written

    def _get(self, key: Key) -> _Sender:
        s = self._senders.get(key)
        if s is None:
            s = self._senders[key] = _Sender(0)
        return s

    def committed(self, key: Key) -> int:
        return self._get(key).committed

    def admit(self, key: Key, records: Sequence[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        """The records of a batch that must be written (those above ``accepted``)."""
        s = self._get(key)
        fresh = [r for r in records if r[0] > s.accepted]
        self.duplicates_total += len(records) - len(fresh)
        if fresh:
            s.accepted = fresh[-1][0]
        return fresh

    def when_committed(self, key: Key, seq: int, callback: Callable[[], None]) -> None:
        """Run ``callback`` once every record up to ``seq`` is durable (now if it is)."""
        s = self._get(key)
        if s.committed >= seq:
            callback()
        else:
            s.waiters.append((seq, callback))

    def durable(self, key: Key, seq: int) -> None:
        """The writer made everything up to ``seq`` from ``key`` durable."""
        s = self._get(key)
        if seq <= s.committed:
            return
        s.committed = seq
        ready = [cb for want, cb in s.waiters if want <= seq]
        s.waiters = [(want, cb) for want, cb in s.waiters if want > seq]
        for cb in ready:
            cb()

    def forget_waiter(self, key: Key, callback: Callable[[], None]) -> None:
        s = self._senders.get(key)
        if s is not None:
            s.waiters = [(w, cb) for w, cb in s.waiters if cb is not callback]

    @property
    def senders(self) -> int:
        return len(self._senders)
