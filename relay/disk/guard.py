"""A disk that never fills: the free-space floor and staging retention.

The floor: once a second (statvfs, never per write: the hot path stays free of
it) the guard compares the free space of ``state_dir``'s filesystem, less what
the writer still has queued, with ``[relay] min_free`` / ``min_free_percent``
(the larger). Below it every stream input (TCP, TLS, RELP) is paused, so
senders are held back by TCP flow control, and UDP datagrams are dropped and
counted; what was accepted before is still written, in the space the floor
keeps. Above the floor plus a tenth of it (no flapping) everything resumes.

Retention (``[staging] keep``): every minute, in a thread, staging files that
nobody will archive (``closed/`` with the archive off, ``archived/`` kept by
``keep_uploaded``) beyond the configured age or total size are deleted, oldest
hour first, counted and logged. A closed file the archiver still needs is never
deleted here.

Both read the relay's current configuration on each tick, so a reload applies.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from relay.config import Config
from relay.disk.staging import Pruned, archived_dir, closed_dir, prune
from relay.ops.status import size as format_size

if TYPE_CHECKING:
    from twisted.python.failure import Failure

    from relay.inputs.connection import Inputs
    from relay.interfaces import IRelayReactor
    from relay.ops.metrics import Metrics


class _Pending(Protocol):
    @property
    def pending(self) -> int: ...  # bytes queued, not yet written


class GuardedRelay(Protocol):
    """What the guard reads of the relay and pauses in it."""

    @property
    def config(self) -> Config: ...

    @property
    def writer(self) -> _Pending: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def inputs(self) -> Inputs: ...


log = Logger(namespace="relay.disk")

TICK = 1.0  # statvfs this often
RETENTION_EVERY = 60.0


@dataclass(frozen=True)
class Space:
    free: int
    total: int


def statvfs_space(path: Path) -> Space:
    st = os.statvfs(path)
    return Space(free=st.f_bavail * st.f_frsize, total=st.f_blocks * st.f_frsize)


def floor_of(config: Config, total: int) -> int:
    """The free-space floor in bytes (0: guard off)."""
    return max(config.relay.min_free, int(total * config.relay.min_free_percent / 100))


def below_floor(free: int, floor: int, paused: bool) -> bool:
    """Whether the inputs should be paused; resumes only a tenth of the floor above it."""
    if floor <= 0:
        return False
    return free < (floor + floor // 10 if paused else floor)


class DiskGuard(Service):
    """Pauses the relay's inputs below the floor; prunes staging beyond ``keep``."""

    def __init__(
        self,
        relay: GuardedRelay,
        reactor: IRelayReactor,
        space: Callable[[Path], Space] = statvfs_space,
        in_thread: Callable[[Callable[[], Pruned]], defer.Deferred[Pruned]] | None = None,
    ) -> None:
        self.relay = relay
        self.reactor = reactor
        self._space = space
        self._in_thread = in_thread or (
            lambda f: threads.deferToThreadPool(reactor, reactor.getThreadPool(), f)
        )
        self._loop = LoopingCall(self.tick)
        self._loop.clock = reactor
        self._next_retention = 0.0
        self._pruning = False
        self.paused = False
        self.last: Space | None = None
        self.floor = 0
        self.error: str | None = None

    def startService(self) -> None:
        super().startService()
        self._loop.start(TICK, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    @property
    def config(self) -> Config:
        config: Config = self.relay.config
        return config

    def tick(self) -> None:
        self._check_space()
        now = self.reactor.seconds()
        if now >= self._next_retention and not self._pruning:
            self._next_retention = now + RETENTION_EVERY
            self._retention(now)

    # --- the floor

    def _check_space(self) -> None:
        state_dir = self.config.relay.state_dir
        try:
            space = self._space(state_dir)
        except OSError as exc:
            if self.error != str(exc):
                log.error(
                    "cannot read free space of {path}: {error}", path=str(state_dir), error=exc
                )
            self.error = str(exc)
            return
        self.error = None
        self.last = space
        self.floor = floor_of(self.config, space.total)
        free = space.free - self.relay.writer.pending
        pause = below_floor(free, self.floor, self.paused)
        if pause and not self.paused:
            self.paused = True
            self.relay.metrics.inc("disk_floor_pauses_total")
            log.warn(
                "free space on {path} below the floor: {free} free, floor {floor}; "
                "pausing TCP/TLS/RELP inputs and dropping UDP until space returns",
                path=str(state_dir),
                free=format_size(space.free),
                floor=format_size(self.floor),
            )
            self.relay.inputs.pause(self.relay.inputs.DISK)
        elif self.paused and not pause:
            self.paused = False
            log.info(
                "free space on {path} back above the floor ({free} free): resuming inputs",
                path=str(state_dir),
                free=format_size(space.free),
            )
            self.relay.inputs.resume(self.relay.inputs.DISK)

    def reasons(self) -> list[str]:
        """/health: why the disk holds the relay back, if it does."""
        if self.paused and self.last is not None:
            return [
                f"disk: {format_size(self.last.free)} free on "
                f"{self.config.relay.state_dir}, below the floor of {format_size(self.floor)}: "
                "inputs paused, UDP dropped"
            ]
        if self.error:
            return [f"disk: cannot read free space: {self.error}"]
        return []

    def snapshot(self) -> dict[str, object]:
        return {
            "path": str(self.config.relay.state_dir),
            "free_bytes": self.last.free if self.last else None,
            "total_bytes": self.last.total if self.last else None,
            "floor_bytes": self.floor,
            "inputs_paused": self.paused,
        }

    # --- retention

    def _retention(self, now: float) -> None:
        cfg = self.config
        keep_for, keep_size = cfg.staging.keep_for, cfg.staging.keep_size
        if keep_for is None and keep_size is None:
            return
        dirs = [archived_dir(cfg.staging_dir)]
        if not cfg.archive.enabled:
            dirs.insert(0, closed_dir(cfg.staging_dir))

        self._pruning = True
        d = self._in_thread(lambda: prune(dirs, now, keep_for, keep_size))
        d.addCallbacks(self._pruned, self._prune_failed)
        d.addBoth(self._prune_done)

    def _pruned(self, done: Pruned) -> None:
        if not done.files:
            return
        self.relay.metrics.inc("staging_pruned_files_total", len(done.files))
        self.relay.metrics.inc("staging_pruned_bytes_total", done.bytes)
        log.info(
            "staging keep: deleted {n} files ({size}), oldest {first}, newest {last}",
            n=len(done.files),
            size=format_size(done.bytes),
            first=done.files[0][0],
            last=done.files[-1][0],
        )

    def _prune_failed(self, failure: Failure) -> None:
        log.error("staging keep: pruning failed: {error}", error=failure.getErrorMessage())

    def _prune_done(self, _: object) -> None:
        self._pruning = False
