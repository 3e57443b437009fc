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
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from relay.metrics import Metrics
from relay.record import Block, block_parts, format_recv, octet_frames
from relay.staging import StagingStore, StagingWriteError

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


class SpoolLike(Protocol):
    def append(self, payloads: Sequence[bytes], now: float) -> Any: ...
    def sync(self) -> None: ...
    def close(self) -> None: ...


@dataclass
class _Chunk:
    hours: Mapping[int, list[Block]]
    forward: Sequence[bytes]
    now: float
    size: int
    on_durable: Callable[[], None] | None
    sender: bytes
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
    spools: dict[str, Any]
    notifiers: dict[str, Callable[[], None]]


_Item = _Chunk | _Flush | _Stop | _SetSpools


class StagingWriter:
    """Asynchronous front of staging and spools; methods are called from the reactor thread."""

    def __init__(
        self,
        store: StagingStore,
        reactor: Any,
        metrics: Metrics,
        fsync_interval: float,
        max_pending: int,
        on_pause: Callable[[], None],
        on_resume: Callable[[], None],
        clock: Callable[[], float] = time.time,
        spools: Mapping[str, SpoolLike] | None = None,
        spool_full: tuple[type[BaseException], ...] = (),
        on_spooled: Mapping[str, Callable[[], None]] | None = None,
    ) -> None:
        self.store = store
        self.spools = dict(spools or {})
        self._spool_full = spool_full
        # ValueError: a batch larger than the whole spool (relay.spool.Spool.append).
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
        self._stopped: Deferred[None] | None = None
        self._waiting: list[Callable[[], None]] = []  # writer thread only
        self.last_error: str | None = None

    # --- reactor side

    def start(self) -> None:
        report = self.store.recover(self._clock())
        for problem in report.problems:
            log.warn("staging recovery: {problem}", problem=problem)
        if report.torn_bytes:
            self._metrics.inc("staging_recovery_torn_bytes_total", report.torn_bytes)
        log.info(
            "staging recovered {files} open files, closed {closed}",
            files=report.files,
            closed=len(report.closed),
        )
        self._thread = threading.Thread(target=self._run, name="durable-writer", daemon=True)
        self._thread.start()

    def submit(self, hour: int, blocks: list[Block], now: float, sender: bytes = b"-") -> None:
        """Queue staging blocks for one hour (no forwarding, no ack)."""
        self.submit_chunk({hour: blocks}, (), now, None, sender)

    def submit_chunk(
        self,
        hours: Mapping[int, list[Block]],
        forward: Sequence[bytes],
        now: float,
        on_durable: Callable[[], None] | None = None,
        sender: bytes = b"-",
        selected: Mapping[str, Sequence[bytes]] | None = None,
    ) -> None:
        """Queue one received chunk; ``on_durable`` runs once it is fsynced everywhere.

        ``selected``: the messages of each output with a selector (relay.selection);
        every other spool gets ``forward``."""
        size = sum(len(b[3]) for blocks in hours.values() for b in blocks)
        if selected:
            size += sum(sum(map(len, selected.get(n, forward))) for n in self.spools)
        elif forward:
            size += sum(len(p) for p in forward) * len(self.spools)
        with self._lock:
            self._pending += size
            pending = self._pending
            pause = pending > self._max_pending and not self._paused
            if pause:
                self._paused = True
        self._queue.put(_Chunk(hours, forward, now, size, on_durable, sender, selected))
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

    def flush(self) -> Deferred[None]:
        """Fires once everything submitted so far is written and fsynced."""
        d: Deferred[None] = Deferred()
        self._queue.put(_Flush(lambda: d.callback(None)))  # run in the reactor by _commit
        return d

    def stop(self) -> Deferred[None]:
        """Write and fsync everything queued, then stop the thread."""
        d: Deferred[None] = Deferred()
        if self._thread is None:
            d.callback(None)
            return d
        self._stopped = d
        self._queue.put(_Stop())
        return d

    def set_spools(
        self, spools: Mapping[str, SpoolLike], notifiers: Mapping[str, Callable[[], None]]
    ) -> None:
        """Replace the set of spools (reload); takes effect in order with queued chunks.

        A spool that leaves the set is fsynced and closed by the writer thread; its
        files stay on disk.
        """
        self._queue.put(_SetSpools(dict(spools), dict(notifiers)))

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
                        spool.close()
                self.spools = item.spools
                self._on_spooled = item.notifiers
            elif isinstance(item, _Stop):
                self._commit()
                self.store.close_all()
                for spool in self.spools.values():
                    spool.close()
                stopped = self._stopped
                if stopped is not None:
                    self._reactor.callFromThread(stopped.callback, None)
                return
            now = self._clock()
            if now >= next_sync or self._fsync_interval == 0:
                self._commit()
                next_sync = now + self._fsync_interval
            self._roll(now)

    def _write(self, batch: list[_Chunk]) -> None:
        # Buffers, not joined bytes: writev copies them in the kernel without the GIL
        # (a join here would hold it, and the reactor, for the whole batch).
        by_hour: dict[int, list[bytes | memoryview]] = {}
        first_seen: dict[int, float] = {}
        for chunk in batch:
            if chunk.hours:
                recv = format_recv(chunk.now)
                for hour, blocks in chunk.hours.items():
                    parts = by_hour.get(hour)
                    if parts is None:
                        parts = by_hour[hour] = []
                        first_seen[hour] = chunk.now
                    block_parts(recv, chunk.sender, blocks, parts)
        for hour, parts in by_hour.items():
            self._retry(functools.partial(self.store.append, hour, parts, first_seen[hour]))
        self._spool_batch(batch)
        size = sum(chunk.size for chunk in batch)
        with self._lock:
            self._pending -= size
            resume = self._paused and self._pending < self._max_pending // 2
            if resume:
                self._paused = False
        if resume:  # the reactor hears from this thread only when something changed
            self._reactor.callFromThread(self._resume)

    def _spool_batch(self, batch: list[_Chunk]) -> None:
        """Spool records (one per chunk: its messages, octet-counted, one CRC), then
        queue the chunks' ``on_durable`` callbacks in order.

        All records go to a spool in one append when they fit; a spool that is full
        for all of them together gets them one by one, and each chunk's callback is
        queued as soon as its record is in every spool, so what is written can be
        acknowledged while a full spool blocks.
        """
        if any(c.selected for c in batch):
            self._spool_selected(batch)
            return
        records = [octet_frames(c.forward) if c.forward else b"" for c in batch]
        rest: list[tuple[str, SpoolLike]] = []
        if self.spools and any(records):
            payloads = [r for r in records if r]
            for name, spool in self.spools.items():
                if not self._append_spool(name, spool, payloads, batch[0].now, whole=True):
                    rest.append((name, spool))
        for chunk, rec in zip(batch, records, strict=True):
            if rec:
                for name, spool in rest:
                    self._append_spool(name, spool, [rec], chunk.now)
            if chunk.on_durable is not None:
                self._waiting.append(chunk.on_durable)

    def _spool_selected(self, batch: list[_Chunk]) -> None:
        """``_spool_batch`` when some outputs take only part of a chunk: records per spool."""
        for name, spool in self.spools.items():
            records = []
            for c in batch:
                msgs = c.forward if c.selected is None else c.selected.get(name, c.forward)
                records.append(octet_frames(msgs) if msgs else b"")
            payloads = [r for r in records if r]
            if not payloads:
                continue
            if not self._append_spool(name, spool, payloads, batch[0].now, whole=True):
                for chunk, rec in zip(batch, records, strict=True):
                    if rec:
                        self._append_spool(name, spool, [rec], chunk.now)
        for chunk in batch:
            if chunk.on_durable is not None:
                self._waiting.append(chunk.on_durable)

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
                if not failed:
                    failed = True
                    self._commit()
                    log.error(
                        "spool {name}: write failed, retrying: {error}", name=name, error=str(exc)
                    )
                self._reactor.callFromThread(
                    self._metrics.inc, "spool_write_errors_total", 1, output=name
                )
                time.sleep(_RETRY_DELAY)
        if name not in self._notifying:  # one queued wake-up per spool is enough
            self._notifying.add(name)
            self._reactor.callFromThread(self._notify, name)
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

    def _retry(self, op: Callable[[], None]) -> None:
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
                time.sleep(_RETRY_DELAY)

    def _commit(self) -> None:
        """Fsync staging and every spool, then release the callbacks waiting for it."""
        started = time.monotonic()
        try:
            self.store.sync()
            for spool in self.spools.values():
                spool.sync()
            self._fsync_seconds.observe(time.monotonic() - started)
        except OSError as exc:
            # Callbacks stay queued: nothing is acknowledged that is not on disk.
            log.error("fsync failed: {error}", error=str(exc))
            self._reactor.callFromThread(self._metrics.inc, "staging_write_errors_total")
            return
        waiting, self._waiting = self._waiting, []
        for cb in waiting:
            self._reactor.callFromThread(cb)

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
