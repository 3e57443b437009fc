"""The durable writer: one thread owns staging and the forward spools; the reactor only enqueues.

Why a thread: write(2) can stall for seconds when the disk falls behind (dirty
page throttling) and fsync always can; neither may stall the reactor. The
queue is bounded in bytes: above ``max_pending`` the writer asks the inputs to
pause (TCP/TLS clients are then held back by TCP flow control) and resumes
them below half of it, so memory stays bounded whatever the load.

Each queued chunk is one received chunk: its staging blocks grouped by hour
and its messages for the forward spools (one spool record per chunk). Small
chunks waiting in the queue when the thread gets to them (slow senders with a
few messages per read) are written together, up to one read's worth: one
writev per hour file and one append per spool. Block headers, CRCs included, are made here, off the
reactor thread (zlib releases the GIL for large payloads). Chunks are written
in submission order, so the messages of one connection stay in order in
every output.

Group commit: a chunk may carry an ``on_durable`` callback (RELP input acks
with it). The thread fsyncs staging and spools once the queue is momentarily
empty (or every ``_COMMIT_EVERY`` chunks under load) and then runs every
callback collected so far, in the reactor thread.

Lifecycle: the thread ends only on ``stop()``. Should it end any other way (an
unexpected exception), ``failure`` says why, the log says so at critical level
and ``on_failure`` runs in the reactor (the service makes /health fail and exits
non-zero so that systemd restarts the relay): nothing queued would ever be
written, and inputs paused on it would never resume. ``stop(timeout)`` bounds
shutdown: a write that still fails (a full disk) once the timeout has passed is
given up, logged with what it held, and counted in ``unwritten``.
"""

from __future__ import annotations

import errno
import functools
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from relay.disk.staging import StagingStore, StagingWriteError
from relay.formats import octet
from relay.formats.staging_block import Block, OctetFrames, block_parts, format_recv
from relay.link.ledger import Commit, CommitLog, Mark
from relay.link.wire import counted as counted_record
from relay.ops.metrics import Metrics
from relay.ops.snapshots import WriterSnapshot

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall

    from relay.interfaces import IRelayReactor

_T = TypeVar("_T")

log = Logger(namespace="relay.writer")

_RETRY_DELAY = 1.0
_FULL_RETRY_DELAY = 0.05
_COMMIT_EVERY = 64
# Small queued chunks (slow senders, a few messages per read) are written together
# up to about one full read's worth. Not more: every write(2) lets the reactor
# thread have the GIL, and long stretches of Python here (one header per chunk)
# cost ingest more than the saved syscalls (measured: 0.8x at 256 chunks / 8 MiB).
_COALESCE_CHUNKS = 64
_COALESCE_BYTES = 64 * 1024
# After stop(timeout) has given up on the writes still failing, the thread is
# waited for this much longer (a write stuck in the kernel) before stop() fires anyway.
_STOP_GRACE = 5.0


class SpoolLike(Protocol):
    def append(self, payloads: Sequence[bytes], now: float) -> object: ...  # AppendResult
    def hold(self) -> list[tuple[Path, int]]: ...
    def release(self) -> None: ...
    def sync(self) -> None: ...
    def close(self) -> None: ...


@dataclass
class _Chunk:
    hours: Mapping[int, list[Block]]
    forward: Sequence[bytes] | OctetFrames
    now: float
    size: int
    on_durable: Callable[[], None] | None
    sender: bytes
    on_written: Callable[[], None] | None = None
    path: Sequence[bytes] = ()
    # Relay link input: (sender key, batch seq), journaled (relay.link.ledger).
    commit: Commit | None = None
    # Messages of the outputs that have a selector, by name (the others get ``forward``).
    selected: Mapping[str, Sequence[bytes]] | None = None


@dataclass
class _Flush:
    done: Callable[[], None]


@dataclass
class _Stop:
    pass


@dataclass
class _SetSpools:
    spools: dict[str, SpoolLike]
    notifiers: dict[str, Callable[[], None]]
    done: Deferred[None]


_Item = _Chunk | _Flush | _Stop | _SetSpools


class DurableWriter:
    """Asynchronous front of staging and spools; methods are called from the reactor thread."""

    def __init__(
        self,
        store: StagingStore,
        reactor: IRelayReactor,
        metrics: Metrics,
        fsync_interval: float,
        max_pending: int,
        on_pause: Callable[[], None],
        on_resume: Callable[[], None],
        clock: Callable[[], float] = time.time,
        spools: Mapping[str, SpoolLike] | None = None,
        spool_full: tuple[type[BaseException], ...] = (),
        on_spooled: Mapping[str, Callable[[], None]] | None = None,
        stage: bool = True,
    ) -> None:
        self.store = store
        self._stage = stage  # False: [staging] enabled = false, the spools only
        self.spools = dict(spools or {})
        self._spool_full = spool_full
        # ValueError: a batch larger than the whole spool (relay.disk.spool.Spool.append).
        self._append_errors: tuple[type[BaseException], ...] = (*spool_full, ValueError)
        self._on_spooled = dict(on_spooled or {})
        self._reactor = reactor
        self._metrics = metrics
        self._fsync_seconds = metrics.histogram("fsync_duration_seconds")
        self._fsync_interval = fsync_interval
        self._max_pending = max_pending
        self._on_pause = on_pause
        self._on_resume = on_resume
        self._clock = clock
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._pending = 0  # bytes queued, guarded by _lock
        self._lock = threading.Lock()
        self._paused = False  # inputs paused; guarded by _lock (set here, cleared by the thread)
        self._notifying: set[str] = set()  # spools whose feeder wake-up is queued
        self._thread: threading.Thread | None = None
        self._stop_waiters: list[Deferred[None]] = []
        self._set_waiters: list[Deferred[None]] = []  # set_spools() not yet done by the thread
        self._finished = False  # the thread has ended (or is given up on): stop() is at once
        self._waiting: list[Callable[[], None]] = []  # writer thread only
        self._give_up_at: float | None = None  # monotonic; failing writes are given up after it
        self._stop_timer: IDelayedCall | None = None
        # Synced after staging and spools, before the callbacks run (relay.link.ledger).
        self._syncers: list[Callable[[], None]] = []
        # Relay link input: chunks with a ``commit`` are written as one journaled batch.
        self.journal: CommitLog | None = None
        self._journaled: list[_Chunk] = []  # written, awaiting the commit mark
        self.last_error: str | None = None
        # Output name -> why its spool cannot be written (replaced, never mutated: the
        # reactor reads it while the thread writes).
        self.spool_errors: dict[str, str] = {}
        self.failure: str | None = None  # why the thread ended unexpectedly (or did not stop)
        self.on_failure: Callable[[str], None] | None = None
        self.unwritten = 0  # received chunks given up at shutdown
        self._given_up: dict[str, int] = {}  # target -> chunks given up (writer thread)

    # --- reactor side

    def start(self) -> None:
        report = self.store.recover(self._clock())
        for problem in report.problems:
            log.warn("staging recovery: {problem}", problem=problem)
        if report.torn_bytes:
            self._metrics.inc("staging_recovery_torn_bytes_total", report.torn_bytes)
        if report.corrupt_regions:
            self._metrics.inc("staging_recovery_corrupt_bytes_total", report.corrupt_bytes)
            self._metrics.inc("staging_recovery_corrupt_regions_total", report.corrupt_regions)
        log.info(
            "staging recovered {files} open files, closed {closed}",
            files=report.files,
            closed=len(report.closed),
        )
        self._thread = threading.Thread(target=self._main, name="durable-writer", daemon=True)
        self._thread.start()

    def submit_chunk(
        self,
        hours: Mapping[int, list[Block]],
        forward: Sequence[bytes] | OctetFrames,
        now: float,
        on_durable: Callable[[], None] | None = None,
        sender: bytes = b"-",
        on_written: Callable[[], None] | None = None,
        path: Sequence[bytes] = (),
        selected: Mapping[str, Sequence[bytes]] | None = None,
        commit: Commit | None = None,
    ) -> None:
        """Queue one received chunk; ``on_durable`` runs once it is fsynced everywhere.

        ``on_written`` runs in the writer thread as soon as the chunk is written (RELP
        with ``ack = "write"``); a ``path`` is kept in the spool records
        (``relay.link.wire.counted``). ``selected``: the messages of each output with a
        selector (relay.selection); every other spool gets ``forward``. ``commit``: a
        relay link batch, written atomically with its ledger position (``journal``).
        """
        size = sum(len(b[3]) for blocks in hours.values() for b in blocks)
        if selected:
            size += sum(_size(selected.get(n, forward)) for n in self.spools)
        elif self.spools:
            size += _size(forward) * len(self.spools)
        with self._lock:
            self._pending += size
            pending = self._pending
            pause = pending > self._max_pending and not self._paused
            if pause:
                self._paused = True
        self._queue.put(
            _Chunk(
                hours, forward, now, size, on_durable, sender, on_written, path, commit, selected
            )
        )
        if pause:
            self._metrics.inc("input_pauses_total")
            log.warn("durable writer behind by {n} bytes: pausing inputs", n=pending)
            self._on_pause()

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    @property
    def running(self) -> bool:
        """The writer thread runs (liveness: /live)."""
        return self._thread is not None and self._thread.is_alive()

    def snapshot(self) -> WriterSnapshot:
        return WriterSnapshot(
            self.running, self.pending, self.last_error, dict(self.spool_errors), self.failure
        )

    def flush(self) -> Deferred[None]:
        """Fires once everything submitted so far is written and fsynced."""
        d: Deferred[None] = Deferred()
        self._queue.put(_Flush(lambda: d.callback(None)))  # run in the reactor by _commit
        return d

    def stop(self, timeout: float | None = None) -> Deferred[None]:
        """Write and fsync everything queued, then stop the thread.

        With ``timeout``, writes that still fail after it (a full disk) are given up
        (logged, counted in ``unwritten``), and the Deferred fires at the latest
        ``_STOP_GRACE`` seconds later even if the thread is stuck in the kernel.
        """
        d: Deferred[None] = Deferred()
        if self._thread is None or self._finished:
            d.callback(None)
            return d
        self._stop_waiters.append(d)
        if len(self._stop_waiters) == 1:
            if timeout is not None:
                self.give_up_after(timeout)
                self._stop_timer = self._reactor.callLater(
                    timeout + _STOP_GRACE, self._stop_overdue
                )
            self._queue.put(_Stop())
        return d

    def give_up_after(self, timeout: float) -> None:
        """From ``timeout`` seconds on, writes that fail are given up instead of retried."""
        at = time.monotonic() + timeout
        if self._give_up_at is None or at < self._give_up_at:
            self._give_up_at = at

    def _stopped_now(self) -> None:
        """Reactor side: the thread is done (or will never be); fire stop()'s Deferreds."""
        if self._stop_timer is not None and self._stop_timer.active():
            self._stop_timer.cancel()
        self._stop_timer = None
        self._finished = True
        # A thread that is gone will never answer these: nobody may wait for them.
        for d in list(self._set_waiters):
            self._fire(d)
        waiters, self._stop_waiters = self._stop_waiters, []
        for d in waiters:
            d.callback(None)

    def _stop_overdue(self) -> None:
        self._stop_timer = None
        self.failure = "did not stop in time"
        log.critical(
            "durable writer did not stop in time: {n} bytes still queued are not written",
            n=self.pending,
        )
        self._stopped_now()

    def set_spools(
        self, spools: Mapping[str, SpoolLike], notifiers: Mapping[str, Callable[[], None]]
    ) -> Deferred[None]:
        """Replace the set of spools (reload); takes effect in order with queued chunks.

        A spool that leaves the set is fsynced and closed by the writer thread; its
        files stay on disk. The Deferred fires once that is done (at once when the
        thread is not running), so a reload can wait before reopening the directory.
        """
        d: Deferred[None] = Deferred()
        if self._thread is None or self._finished:
            for name, spool in self.spools.items():
                if spools.get(name) is not spool:
                    spool.close()
            self.spools, self._on_spooled = dict(spools), dict(notifiers)
            d.callback(None)
            return d
        self._set_waiters.append(d)
        self._queue.put(_SetSpools(dict(spools), dict(notifiers), d))
        return d

    def _fire(self, d: Deferred[None]) -> None:
        if d in self._set_waiters:
            self._set_waiters.remove(d)
        if not d.called:
            d.callback(None)

    def add_syncer(self, sync: Callable[[], None]) -> None:
        """``sync`` runs in the writer thread after each fsync of staging and spools,
        before any ``on_durable`` callback (call before ``start``)."""
        self._syncers.append(sync)

    def set_limits(self, fsync_interval: float, max_pending: int) -> None:
        self._fsync_interval = fsync_interval
        self._max_pending = max_pending

    def _resume(self) -> None:
        log.info("durable writer caught up: resuming inputs")
        self._on_resume()

    def _notify(self, name: str) -> None:
        self._notifying.discard(name)  # before the call: data appended after it wakes again
        notify = self._on_spooled.get(name)
        if notify is not None:
            notify()

    # --- writer thread

    def _main(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # the thread must not end silently, whatever ended it
            self.failure = f"{type(exc).__name__}: {exc}"
            log.failure(
                "durable writer thread died: nothing more is staged or spooled; the relay exits",
                Failure(),
                level=LogLevel.critical,
            )
            self._reactor.callFromThread(self._died)

    def _died(self) -> None:
        """Reactor side of an unexpected end of the thread."""
        self._metrics.inc("writer_failures_total")
        self._stopped_now()
        if self.on_failure is not None and self.failure is not None:
            self.on_failure(self.failure)

    def _giving_up(self) -> bool:
        return self._give_up_at is not None and time.monotonic() >= self._give_up_at

    def _run(self) -> None:
        next_sync = self._clock() + self._fsync_interval
        since_commit = 0
        held: _Item | None = None  # taken from the queue while coalescing, not yet handled
        while True:
            if self._waiting and (self._queue.empty() or since_commit >= _COMMIT_EVERY):
                self._commit()
                since_commit = 0
                next_sync = self._clock() + self._fsync_interval
            timeout = max(0.0, min(next_sync, self._clock() + 1.0) - self._clock())
            item: _Item | None = held
            held = None
            if item is None:
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    item = None
            if isinstance(item, _Chunk):
                # Chunks that queued up while the disk was busy (many small reads:
                # slow senders, one TLS record each) go out together: one write per
                # hour file and per spool for all of them.
                batch = [item]
                size = item.size
                while len(batch) < _COALESCE_CHUNKS and size < _COALESCE_BYTES:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if not isinstance(more, _Chunk):
                        held = more  # handled next, in order
                        break
                    batch.append(more)
                    size += more.size
                self._write(batch)
                since_commit += len(batch)
            elif isinstance(item, _Flush):
                self._waiting.append(item.done)
                self._commit()
                since_commit = 0
            elif isinstance(item, _SetSpools):
                self._commit()
                for name, spool in self.spools.items():
                    if item.spools.get(name) is not spool:
                        self._close_spool(name, spool)
                self.spools = item.spools
                self._on_spooled = item.notifiers
                self.spool_errors = {n: e for n, e in self.spool_errors.items() if n in self.spools}
                self._reactor.callFromThread(self._fire, item.done)
            elif isinstance(item, _Stop):
                self._commit()
                try:
                    self.store.close_all()
                except OSError as exc:
                    log.error("closing staging files failed: {error}", error=str(exc))
                for name, spool in self.spools.items():
                    self._close_spool(name, spool)
                if self._given_up:
                    log.error(
                        "shutdown: not written, the disk kept failing: {what}",
                        what="; ".join(f"{t}: {n} chunks" for t, n in self._given_up.items()),
                    )
                self._reactor.callFromThread(self._stopped_now)
                return
            now = self._clock()
            if now >= next_sync or self._fsync_interval == 0:
                self._commit()
                next_sync = now + self._fsync_interval
            self._roll(now)

    def _close_spool(self, name: str, spool: SpoolLike) -> None:
        try:
            spool.close()
        except OSError as exc:
            log.error("spool {name}: closing failed: {error}", name=name, error=str(exc))

    def _write(self, batch: list[_Chunk]) -> None:
        if self.journal is not None and any(c.commit is not None for c in batch):
            plain = [c for c in batch if c.commit is None]
            if plain:
                self._write_chunks(plain)
            self._write_journaled(self.journal, [c for c in batch if c.commit is not None])
        else:
            self._write_chunks(batch)
        size = sum(chunk.size for chunk in batch)
        with self._lock:
            self._pending -= size
            resume = self._paused and self._pending < self._max_pending // 2
            if resume:
                self._paused = False
        if resume:  # the reactor hears from this thread only when something changed
            self._reactor.callFromThread(self._resume)

    def _write_journaled(self, journal: CommitLog, chunks: list[_Chunk]) -> None:
        """Relay link batches: undo marks, data, then positions and commit mark together
        (relay.link.ledger). Their spool records stay hidden from the readers until the
        commit mark is written: a roll back never takes back what was forwarded."""
        now = chunks[0].now
        hours = sorted({h for c in chunks for h in c.hours}) if self._stage else []

        def begin() -> None:
            marks = [
                Mark("staging", str(p), n, new) for p, n, new in self.store.position(hours, now)
            ]
            marks += [Mark("spool", str(p), n) for s in self.spools.values() for p, n in s.hold()]
            _journal(journal.begin, marks)

        given_up = self.unwritten
        self._retry(begin, "relay link journal")
        if given_up != self.unwritten:
            return  # shutdown, the disk failing: nothing written, nothing acknowledged
        self._journaled = []
        self._write_chunks(chunks)
        done, self._journaled = self._journaled, []
        given_up = self.unwritten
        self._retry(
            lambda: _journal(journal.commit, [c.commit for c in done if c.commit]),
            "relay link journal",
        )
        if given_up != self.unwritten:
            return  # spools stay held: the next start rolls the batch back
        self._waiting.extend(c.on_durable for c in done if c.on_durable is not None)
        for name, spool in self.spools.items():
            spool.release()
            self._wake(name)

    def _written(self, chunk: _Chunk) -> None:
        """``chunk`` is in staging and every spool: queue what waits for it."""
        if chunk.on_written is not None:
            chunk.on_written()
        if chunk.commit is not None and self.journal is not None:
            self._journaled.append(chunk)  # acknowledged after the commit mark
        elif chunk.on_durable is not None:
            self._waiting.append(chunk.on_durable)

    def _wake(self, name: str) -> None:
        if name not in self._notifying:  # one queued wake-up per spool is enough
            self._notifying.add(name)
            self._reactor.callFromThread(self._notify, name)

    def _write_chunks(self, batch: list[_Chunk]) -> None:
        # Buffers, not joined bytes: writev copies them in the kernel without the GIL
        # (a join here would hold it, and the reactor, for the whole batch).
        by_hour: dict[int, list[bytes | memoryview]] = {}
        first_seen: dict[int, float] = {}
        for chunk in batch:
            if chunk.hours and self._stage:
                recv = format_recv(chunk.now)
                for hour, blocks in chunk.hours.items():
                    parts = by_hour.get(hour)
                    if parts is None:
                        parts = by_hour[hour] = []
                        first_seen[hour] = chunk.now
                    block_parts(recv, chunk.sender, blocks, parts)
        given_up = self.unwritten
        for hour, parts in by_hour.items():
            self._retry(
                functools.partial(self.store.append, hour, parts, first_seen[hour]),
                f"staging hour {hour}",
            )
        self._spool_batch(batch, staged=given_up == self.unwritten)

    def _spool_batch(self, batch: list[_Chunk], staged: bool = True) -> None:
        """Spool records (one per chunk: its messages, octet-counted, one CRC), then
        queue the chunks' ``on_durable`` callbacks in order.

        All records go to a spool in one append when they fit; a spool that is full
        for all of them together gets them one by one, and each chunk's callback is
        queued as soon as its record is in every spool, so what is written can be
        acknowledged while a full spool blocks.
        """
        if any(c.selected for c in batch):
            self._spool_selected(batch, staged)
            return
        # Each record keeps its message count (relay.link.wire.counted): a forwarder
        # sends it without walking its frames again to count them.
        records = [_record(c) for c in batch]
        rest: list[tuple[str, SpoolLike, list[bytes]]] = []
        given_up = self.unwritten
        if self.spools and any(records):
            payloads = [r for r in records if r]
            for name, spool in self.spools.items():
                if not self._append_spool(name, spool, payloads, batch[0].now, whole=True):
                    rest.append((name, spool, records))
        # A chunk given up at shutdown (staging or any spool) is never acknowledged.
        ack = staged and given_up == self.unwritten
        for i, chunk in enumerate(batch):
            given_up = self.unwritten
            if records[i]:
                for name, spool, recs in rest:
                    self._append_spool(name, spool, [recs[i]], chunk.now)
            if ack and given_up == self.unwritten:
                self._written(chunk)

    def _spool_selected(self, batch: list[_Chunk], staged: bool) -> None:
        """``_spool_batch`` when some outputs take only part of a chunk: records per spool."""
        given_up = self.unwritten
        for name, spool in self.spools.items():
            records = [_record(c, c.selected.get(name) if c.selected else None) for c in batch]
            payloads = [r for r in records if r]
            if not payloads:
                continue
            if not self._append_spool(name, spool, payloads, batch[0].now, whole=True):
                for chunk, rec in zip(batch, records, strict=True):
                    if rec:
                        self._append_spool(name, spool, [rec], chunk.now)
        # A chunk given up at shutdown (staging or any spool) is never acknowledged.
        if not staged or given_up != self.unwritten:
            return
        for chunk in batch:
            self._written(chunk)

    def _append_spool(
        self, name: str, spool: SpoolLike, records: list[bytes], now: float, whole: bool = False
    ) -> bool:
        """Append ``records``, retrying and (block policy) waiting; False only when
        ``whole`` and they do not fit together (the caller appends them one by one)."""
        blocked = False
        failed = False
        while True:
            try:
                result = spool.append(records, now)
                break
            except self._append_errors as exc:
                if whole and len(records) > 1:
                    return False
                if isinstance(exc, ValueError):
                    # Larger than the whole spool: it can never be forwarded (it is staged).
                    log.error("spool {name}: {error}; record not forwarded", name=name, error=exc)
                    self._reactor.callFromThread(
                        self._metrics.inc, "spool_dropped_total", 1, output=name, policy="too-large"
                    )
                    return True
                if self._giving_up():  # at shutdown nothing frees space any more
                    self._give_up(f"spool {name}", "spool full")
                    return True
                # when_full = "block": wait for the forwarder to free space; the
                # queue behind us fills up and the inputs are paused.
                if not blocked:
                    blocked = True
                    self._commit()  # acknowledge what is already written before waiting
                    log.warn("spool {name} is full: blocking inputs until it drains", name=name)
                    self._reactor.callFromThread(
                        self._metrics.inc, "spool_full_blocks_total", 1, output=name
                    )
                time.sleep(_FULL_RETRY_DELAY)
            except OSError as exc:
                # Disk full or I/O error (the spool cut its partial record): retry.
                if whole and len(records) > 1:
                    return False  # one by one: what fits is acknowledged meanwhile
                self._reactor.callFromThread(
                    self._metrics.inc, "spool_write_errors_total", 1, output=name
                )
                if not failed:
                    failed = True
                    self._set_spool_error(name, f"writes failing: {exc}")
                    self._commit()
                    log.error(
                        "spool {name}: write failed, retrying: {error}", name=name, error=str(exc)
                    )
                if self._giving_up():
                    self._give_up(f"spool {name}", str(exc))
                    return True
                time.sleep(_RETRY_DELAY)
        if failed or name in self.spool_errors:
            self._set_spool_error(name, None)
        self._wake(name)
        # Spool and LanedSpool return an AppendResult; a spool that never drops need not.
        dropped_new = getattr(result, "dropped_new", 0)
        dropped_old = getattr(result, "dropped_old", 0)
        if dropped_new or dropped_old:
            self._reactor.callFromThread(self._count_drops, name, dropped_new, dropped_old)
        return True

    def _count_drops(self, name: str, new: int, old: int) -> None:
        if new:
            self._metrics.inc("spool_dropped_total", new, output=name, policy="drop-newest")
        if old:
            self._metrics.inc("spool_dropped_total", old, output=name, policy="drop-oldest")
        log.warn(
            "spool {name} full: dropped {new} new and {old} old records",
            name=name,
            new=new,
            old=old,
        )

    def _set_spool_error(self, name: str, error: str | None) -> None:
        errors = dict(self.spool_errors)
        if error is None:
            errors.pop(name, None)
        else:
            errors[name] = error
        self.spool_errors = errors

    def _give_up(self, target: str, error: str) -> None:
        """Shutdown is past its bound: leave one chunk's part for ``target`` unwritten."""
        if not self._given_up:
            log.error(
                "shutdown: writes still fail after the stop timeout; giving up: {target}: {error}",
                target=target,
                error=error,
            )
        self.unwritten += 1
        self._given_up[target] = self._given_up.get(target, 0) + 1

    def _retry(self, op: Callable[[], None], what: str = "staging") -> None:
        while True:
            try:
                op()
                self.last_error = None
                return
            except StagingWriteError as exc:
                # Disk full or I/O error: keep the batch and retry; the queue
                # grows to max_pending and then the inputs are paused.
                if self.last_error != str(exc):
                    log.error("staging write failed, retrying: {error}", error=str(exc))
                self.last_error = str(exc)
                self._reactor.callFromThread(self._metrics.inc, "staging_write_errors_total")
                if self._giving_up():
                    self._give_up(what, str(exc))
                    return
                time.sleep(_RETRY_DELAY)

    def _commit(self) -> None:
        """Fsync staging and every spool, then release the callbacks waiting for it."""
        started = time.monotonic()
        name = "staging"
        try:
            self.store.sync()
            for name in self.spools:  # the name is reported when it fails
                self.spools[name].sync()
            for sync in self._syncers:
                sync()
            self._fsync_seconds.observe(time.monotonic() - started)
        except OSError as exc:
            # Callbacks stay queued: nothing is acknowledged that is not on disk.
            log.error("fsync failed ({what}): {error}", what=name, error=str(exc))
            if name == "staging":
                self._reactor.callFromThread(self._metrics.inc, "staging_write_errors_total")
            else:
                self._set_spool_error(name, f"fsync failing: {exc}")
                self._reactor.callFromThread(
                    self._metrics.inc, "spool_write_errors_total", 1, output=name
                )
            return
        if self.spool_errors:
            self.spool_errors = {
                n: e for n, e in self.spool_errors.items() if not e.startswith("fsync")
            }
        waiting, self._waiting = self._waiting, []
        if waiting:
            # One wake-up of the reactor for all of them (one per callback was a write
            # to the waker each): RELP connections answered by one fsync go out together.
            self._reactor.callFromThread(_run_all, waiting)

    def _roll(self, now: float) -> None:
        try:
            closed = self.store.roll(now)
        except OSError as exc:
            log.error("closing staging file failed: {error}", error=str(exc))
            return
        if closed:
            self._reactor.callFromThread(
                self._metrics.inc, "staging_files_closed_total", len(closed)
            )


def _run_all(callbacks: list[Callable[[], None]]) -> None:
    """Run in the reactor; each callback on its own, as callFromThread would run them."""
    for cb in callbacks:
        try:
            cb()
        except Exception:  # the reactor's own policy for a call from a thread: log, go on
            log.failure("durable callback failed")


def _journal(op: Callable[[_T], None], arg: _T) -> None:
    """A ledger append, failing as a staging write does (retried by ``_retry``)."""
    try:
        op(arg)
    except OSError as exc:
        raise StagingWriteError(exc.errno or errno.EIO, f"relay link ledger: {exc}") from exc


def _size(msgs: Sequence[bytes] | OctetFrames) -> int:
    return len(msgs.data) if isinstance(msgs, OctetFrames) else sum(map(len, msgs))


def _record(chunk: _Chunk, msgs: Sequence[bytes] | None = None) -> bytes:
    """The spool record of a chunk: its forwarded messages (or ``msgs``, what an output's
    selector took), octet-counted, with their count and path (b"" if none)."""
    forward = chunk.forward if msgs is None else msgs
    if not forward:
        return b""
    payload = forward.data if isinstance(forward, OctetFrames) else octet.encode_many(forward)
    return counted_record(chunk.path, len(forward), payload)
