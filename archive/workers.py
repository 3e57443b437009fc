"""Reading sources in forked processes, for the reads whose time goes to Python.

``cat --grep`` spends its time in zstd, which releases the GIL, and in the
search, which holds it (``bytes.find``, ``re``); so do the field filters and
``--json``, per message. In threads one core searches while the others wait
for the GIL. Each forked worker reads whole sources (the GETs, zstd, the
search) and sends back only what is printed, so every core searches, as
``zstdcat | grep`` keeps two busy.

Forked, not spawned: a worker starts in a millisecond with the modules and
the S3 client already loaded, where a spawned one would pay the start-up
again. That is safe under two conditions: the fork happens while this is the
only thread (``start`` checks it: no lock can be held by a thread the child
lacks), and before the store made its first request (the caller's part: the
connection pool is then empty, so no socket is shared, each process opens its
own).

A worker reads one source at a time and sends its output in pieces through
its pipe to the parent's thread that asked for the source (``query.ordered``
keeps the sources in order and bounds the pieces waiting), so memory stays
bounded as with threads.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from archive.query import Source, SourceError

Work = Callable[[Source], Iterator[bytes]]
_Worker = tuple[BaseProcess, Connection]


class Workers:
    """Forked processes that run ``work(source)`` and stream its pieces back."""

    def __init__(self, work: Work, workers: list[_Worker]) -> None:
        self._work = work
        self._workers = workers
        # None: a worker lost mid-source; the thread that takes it reads in-process.
        self._idle: queue.SimpleQueue[_Worker | None] = queue.SimpleQueue()
        for w in workers:
            self._idle.put(w)

    def __len__(self) -> int:
        return len(self._workers)

    def run(self, src: Source) -> Iterator[bytes]:
        """``work(src)``'s pieces, read by an idle worker. For at most len(self)
        threads at once (each takes a worker for the whole source)."""
        w = self._idle.get()
        if w is None:
            self._idle.put(None)
            yield from self._work(src)
            return
        proc, conn = w
        reason: str | None = None
        done = False
        try:
            conn.send(src)
            while piece := conn.recv_bytes():
                yield piece
            reason = conn.recv()
            done = True
        except (EOFError, OSError):
            reason = "the worker process reading it ended"
        finally:
            if done:
                self._idle.put(w)
            else:
                # Left mid-source (the reader stopped, or the worker died): the
                # rest of this source is in its pipe, so it cannot take another.
                proc.terminate()
                self._idle.put(None)
        if reason is not None:
            raise SourceError(src, reason)

    def close(self) -> None:
        """Ask idle workers to exit, then end any that did not."""
        for _, conn in self._workers:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc, conn in self._workers:
            proc.join(timeout=5)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
            conn.close()


def start(work: Work, n: int) -> Workers | None:
    """``n`` forked workers, or None where threads must do: fewer than two wanted or
    CPUs, another thread running (forking is then unsafe), or no fork here."""
    if (
        n < 2
        or len(os.sched_getaffinity(0)) < 2
        or threading.active_count() > 1
        or "fork" not in multiprocessing.get_all_start_methods()
    ):
        return None
    ctx = multiprocessing.get_context("fork")
    # A child flushes its stdio when it exits: nothing of ours may wait in them.
    sys.stdout.flush()
    sys.stderr.flush()
    workers: list[_Worker] = []
    for _ in range(n):
        parent, child = ctx.Pipe()
        inherited = [c for _, c in workers] + [parent]
        proc = ctx.Process(
            target=_serve, args=(child, work, inherited), name="archive-read", daemon=True
        )
        try:
            proc.start()
        except OSError:  # no more processes (EAGAIN, ENOMEM): go on with those started
            parent.close()
            child.close()
            break
        child.close()
        workers.append((proc, parent))
    return Workers(work, workers) if workers else None


def _serve(conn: Connection, work: Work, inherited: list[Connection]) -> None:
    """A worker's loop: a source in, its pieces out, then b"" and None or the reason
    it failed; None in: exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    for c in inherited:  # the parent's ends: the parent alone must hold them
        c.close()
    try:
        while (src := conn.recv()) is not None:
            reason: str | None = None
            try:
                for piece in work(src):
                    if piece:
                        conn.send_bytes(piece)
            except SourceError as exc:
                reason = exc.reason
            except Exception as exc:  # as query.ordered: one line in the source's place
                reason = f"{type(exc).__name__}: {exc}"
            conn.send_bytes(b"")
            conn.send(reason)
    except (EOFError, OSError):
        pass  # the parent is gone or stopped reading: nothing left to do
