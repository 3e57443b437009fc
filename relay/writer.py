"""The staging writer: one thread owns the StagingStore; the reactor only enqueues.

Why a thread: write(2) can stall for seconds when the disk falls behind (dirty
page throttling) and fsync always can; neither may stall the reactor. The
queue is bounded in bytes: above ``max_pending`` the writer asks the inputs to
pause (TCP/TLS clients are then held back by TCP flow control) and resumes
them below half of it, so memory stays bounded whatever the load.

Ordering: batches are written in the order they were submitted, so the
messages of one connection stay in order within an hour file.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from relay.metrics import Metrics
from relay.staging import StagingStore, StagingWriteError

log = Logger(namespace="relay.writer")

_RETRY_DELAY = 1.0


@dataclass
class _Flush:
    done: Callable[[], None]


@dataclass
class _Stop:
    pass


_Item = tuple[int, bytes, float] | _Flush | _Stop


class StagingWriter:
    """Asynchronous front of a StagingStore; methods are called from the reactor thread."""

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
    ) -> None:
        self.store = store
        self._reactor = reactor
        self._metrics = metrics
        self._fsync_interval = fsync_interval
        self._max_pending = max_pending
        self._on_pause = on_pause
        self._on_resume = on_resume
        self._clock = clock
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._pending = 0  # bytes queued, guarded by _lock
        self._lock = threading.Lock()
        self._paused = False  # touched only in the reactor thread
        self._thread: threading.Thread | None = None
        self._stopped: Deferred[None] | None = None
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
        self._thread = threading.Thread(target=self._run, name="staging-writer", daemon=True)
        self._thread.start()

    def submit(self, hour: int, data: bytes, now: float) -> None:
        """Queue records for ``hour``; written by the thread with one write(2)."""
        with self._lock:
            self._pending += len(data)
            pending = self._pending
        self._queue.put((hour, data, now))
        if pending > self._max_pending and not self._paused:
            self._paused = True
            self._metrics.inc("input_pauses_total")
            log.warn("staging writer behind by {n} bytes: pausing inputs", n=pending)
            self._on_pause()

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    def flush(self) -> Deferred[None]:
        """Fires once everything submitted so far is written and fsynced."""
        d: Deferred[None] = Deferred()
        self._queue.put(_Flush(lambda: self._reactor.callFromThread(d.callback, None)))
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

    def _drained(self) -> None:
        if self._paused and self.pending < self._max_pending // 2:
            self._paused = False
            log.info("staging writer caught up: resuming inputs")
            self._on_resume()

    # --- writer thread

    def _run(self) -> None:
        next_sync = self._clock() + self._fsync_interval
        while True:
            timeout = max(0.0, min(next_sync, self._clock() + 1.0) - self._clock())
            try:
                item: _Item | None = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            if isinstance(item, tuple):
                self._append(*item)
            elif isinstance(item, _Flush):
                self._sync()
                item.done()
            elif isinstance(item, _Stop):
                self._sync()
                self.store.close_all()
                stopped = self._stopped
                if stopped is not None:
                    self._reactor.callFromThread(stopped.callback, None)
                return
            now = self._clock()
            if now >= next_sync or self._fsync_interval == 0:
                self._sync()
                next_sync = now + self._fsync_interval
            self._roll(now)

    def _append(self, hour: int, data: bytes, now: float) -> None:
        while True:
            try:
                self.store.append(hour, data, now)
                break
            except StagingWriteError as exc:
                # Disk full or I/O error: keep the batch and retry; the queue
                # grows to max_pending and then the inputs are paused.
                if self.last_error != str(exc):
                    log.error("staging write failed, retrying: {error}", error=str(exc))
                self.last_error = str(exc)
                self._reactor.callFromThread(self._metrics.inc, "staging_write_errors_total")
                time.sleep(_RETRY_DELAY)
        self.last_error = None
        with self._lock:
            self._pending -= len(data)
        self._reactor.callFromThread(self._drained)

    def _sync(self) -> None:
        try:
            self.store.sync()
        except OSError as exc:
            log.error("staging fsync failed: {error}", error=str(exc))
            self._reactor.callFromThread(self._metrics.inc, "staging_write_errors_total")

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
