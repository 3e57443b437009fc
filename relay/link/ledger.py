"""What a receiving relay has committed, per sending relay and sender epoch.

Deduplication rests on two numbers per (relay id, epoch) key:

* ``accepted`` (memory, reactor thread): the highest record seq handed to the
  durable writer. A record at or below it is never handed over again; a batch
  ending at or below it is acknowledged once ``committed`` reaches its seq.
* ``committed``: the highest record seq whose data is in staging and every
  spool. ``CommitLog`` keeps it on disk, written by the durable writer thread.

The writer makes a batch of link chunks atomic with a small undo journal in the
same file: an intent (``I``: where staging and every spool end before the batch)
before the data, then the batch's written positions (``W``) and a commit mark
(``C``) in one append after it. A process killed anywhere in between leaves an
open intent; ``roll_back`` cuts staging and spools back to where the intent says
(spools hide records of an open intent from their readers, so nothing of it was
forwarded) and marks it aborted (``A``), and the sender's resend writes it once.

After the data's fsync the writer appends ``S`` (synced) entries and fsyncs them.
After a process crash the page cache survived, so the written positions hold;
after a reboot only the synced ones do. The boot id in the file tells which.

File ``STATE_DIR/link/committed``: 92-byte entries, an intent's followed by its
body (``docs/relay-link.md``); appended, rewritten compactly at open and when it
grows past 4 MiB.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from relay.disk.fileio import fsync_dir

Key = tuple[str, int]  # sending relay id, its epoch
Commit = tuple[Key, int]  # a batch: its sender and seq

_ENTRY = struct.Struct("!4sBB2xQQ64s")  # magic, kind, id length, epoch, seq, id
ENTRY_SIZE = _ENTRY.size + 4  # + CRC-32
_MAGIC = b"SRLC"
_BOOT = ord("B")
_WRITTEN = ord("W")
_SYNCED = ord("S")
_INTENT = ord("I")  # a journaled batch begins; its body (JSON) follows the fixed part
_COMMIT = ord("C")  # the open intent's data is complete (its W entries precede this)
_ABORT = ord("A")  # the open intent was rolled back
_MAX_BODY = 1024 * 1024
_COMPACT_AT = 4 * 1024 * 1024
_BOOT_ID = "/proc/sys/kernel/random/boot_id"

Entry = tuple[int, Key, int, bytes]  # kind, key, seq, body (intents only)


@dataclass(frozen=True)
class Mark:
    """Where one file ended before a journaled batch, to cut it back to on roll back.

    ``kind`` "staging": a staging part (removed if ``created`` by this batch);
    "spool": a spool's head segment (segments created after it are removed too)."""

    kind: str
    path: str
    size: int
    created: bool = False


def boot_id() -> str:
    """This boot's id (Linux); "" elsewhere, which makes every start count as a reboot."""
    try:
        return Path(_BOOT_ID).read_text().strip()
    except OSError:
        return ""


def _entry(kind: int, key: Key, seq: int, body: bytes = b"") -> bytes:
    rid = key[0].encode()[:64]
    head = _ENTRY.pack(_MAGIC, kind, len(rid), key[1], len(body) if body else seq, rid)
    data = head + body
    return data + struct.pack("!I", zlib.crc32(data) & 0xFFFFFFFF)


def _intent(marks: Sequence[Mark]) -> bytes:
    body = json.dumps([[m.kind, m.path, m.size, m.created] for m in marks]).encode()
    return _entry(_INTENT, ("", 0), 0, body or b"[]")


def _marks(body: bytes) -> list[Mark]:
    return [Mark(str(k), str(p), int(n), bool(c)) for k, p, n, c in json.loads(body)]


def _parse(data: bytes) -> tuple[list[Entry], int]:
    """Valid entries and the length they cover (a torn or damaged tail is cut there)."""
    out: list[Entry] = []
    i = 0
    while i + ENTRY_SIZE <= len(data):
        magic, kind, n, epoch, seq, rid = _ENTRY.unpack_from(data, i)
        if magic != _MAGIC:
            break
        body_len = seq if kind == _INTENT else 0
        end = i + _ENTRY.size + body_len
        if body_len > _MAX_BODY or end + 4 > len(data):
            break
        (crc,) = struct.unpack_from("!I", data, end)
        if zlib.crc32(data[i:end]) & 0xFFFFFFFF != crc:
            break
        body = data[i + _ENTRY.size : end]
        out.append((kind, (rid[:n].decode("utf-8", "replace"), epoch), seq, body))
        i = end + 4
    return out, i


def _replay(entries: Sequence[Entry]) -> tuple[dict[Key, int], dict[Key, int], str, Entry | None]:
    """(written, synced, the boot id that wrote the file, open intent) from its entries.

    W entries that follow an intent count only once its C follows: they were appended
    with it in one write, and without C the intent's data is being rolled back."""
    written: dict[Key, int] = {}
    synced: dict[Key, int] = {}
    boot_key = ""
    held: list[tuple[Key, int]] = []
    intent: Entry | None = None
    for entry in entries:
        kind, key, seq, _ = entry
        if kind == _BOOT:
            boot_key = key[0]
        elif kind == _SYNCED:
            synced[key] = max(synced.get(key, 0), seq)
        elif kind == _WRITTEN:
            if intent is None:
                written[key] = max(written.get(key, 0), seq)
            else:
                held.append((key, seq))
        elif kind == _INTENT:
            intent, held = entry, []
        elif kind == _COMMIT:
            for k, s in held:
                written[k] = max(written.get(k, 0), s)
            intent, held = None, []
        elif kind == _ABORT:
            intent, held = None, []
    return written, synced, boot_key, intent


def roll_back(directory: Path) -> list[str]:
    """Undo a journaled batch cut short by a crash (see the module note); returns what
    was done, for the log. Run before staging and spools are recovered; idempotent."""
    path = directory / "committed"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    entries, _ = _parse(data)
    intent = _replay(entries)[3]
    if intent is None:
        return []
    from relay.disk.spool import cut_back as cut_spool
    from relay.disk.staging import cut_back as cut_staging

    done: list[str] = []
    for mark in _marks(intent[3]):
        cut = cut_spool if mark.kind == "spool" else cut_staging
        what = cut(Path(mark.path), mark.size, mark.created)
        if what:
            done.append(what)
    # Cut to the valid entries first: an abort mark behind a torn tail would not be read.
    _, good = _parse(data)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, good)
        os.lseek(fd, good, os.SEEK_SET)
        os.write(fd, _entry(_ABORT, ("", 0), 0))
        os.fsync(fd)
    finally:
        os.close(fd)
    return done or ["an unfinished batch had written nothing"]


class CommitLog:
    """The durable half of the ledger. ``open`` in any thread before the writer starts;
    ``begin``, ``commit`` and ``sync`` in the durable writer thread only."""

    def __init__(self, directory: Path, boot: Callable[[], str] = boot_id) -> None:
        self.directory = directory
        self.path = directory / "committed"
        self._boot = boot
        self._fd = -1
        self._written: dict[Key, int] = {}
        self._synced: dict[Key, int] = {}
        self._size = 0
        self._open_intent = b""  # kept by a compaction that runs while a batch is open
        self._lock = threading.Lock()  # guards the two dicts for snapshot()
        self.problems: list[str] = []
        self.rolled_back: list[str] = []
        self.write_errors = 0  # appends that failed (disk full, I/O error)

    def open(self) -> dict[Key, int]:
        """Recover the committed positions; returns them (the ledger starts from these)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rolled_back = roll_back(self.directory)
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            data = b""
        entries, good = _parse(data)
        if good < len(data):
            self.problems.append(f"{self.path}: {len(data) - good} bytes of torn tail ignored")
        written, synced, file_boot, _ = _replay(entries)
        boot = self._boot()
        state = dict(synced)
        if boot and file_boot == boot:
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
        data = (
            _entry(_BOOT, (self._boot(), 0), 0)
            + b"".join(_entry(_SYNCED, key, seq) for key, seq in sorted(self._synced.items()))
            + self._open_intent
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

    def begin(self, marks: Sequence[Mark]) -> None:
        """A journaled batch is about to be written where ``marks`` say its files end.

        Not fsynced: a process crash keeps the page cache, and after a power loss the
        batch's data, unsynced too, is resent. Raises OSError (the writer retries)."""
        entry = _intent(marks)
        self._append(entry)
        self._open_intent = entry

    def commit(self, done: Sequence[tuple[Key, int]]) -> None:
        """The open batch is written: its positions and the commit mark, in one append.

        Raises OSError: the batch is then neither acknowledged nor counted as written
        (the writer retries; a crash meanwhile rolls it back)."""
        due: dict[Key, int] = {}
        with self._lock:
            for key, seq in done:
                if seq > max(self._written.get(key, 0), due.get(key, 0)):
                    due[key] = seq
        self._append(
            b"".join(_entry(_WRITTEN, k, s) for k, s in due.items()) + _entry(_COMMIT, ("", 0), 0)
        )
        self._open_intent = b""
        with self._lock:
            self._written.update(due)

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
            self.write_errors += 1
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

    @property
    def senders(self) -> int:
        return len(self._senders)
