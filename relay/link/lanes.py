"""The two lanes of a ``link+tls`` output's spool: live traffic is not held behind a backlog.

A lane is a whole spool (``relay.disk.spool.Spool``): its own segments, acked
position and sender epoch (``link-epoch``), so its seqs form their own stream
and the receiver's ledger, keyed by (relay id, epoch), deduplicates each lane
on its own. Lane 1 is the output's spool directory itself (a spool written
before lanes existed is lane 1 as it is); lane 2 is its ``lane2/``
subdirectory. Each lane is sent over its own connection
(``relay.link.output.LinkOutput``), so a lane never waits for the other's
acknowledgements, window or batches.

New records go to the *current* lane. When its oldest undelivered record is
older than ``live_lane_after``, the other lane has nothing left to deliver and
a peer is connected (during an outage everything is backlog: one lane keeps it
whole), the other lane becomes current: the backlog keeps draining through its lane
while new records take the empty one. Hence, without ever reordering inside a
lane: the non-current lane only ever holds records older than every record of
the current one, and a lane is only reused once it is empty. The choice is
made in the writer thread at each append; after a restart the lane with less
to deliver is current.

Both lanes share the output's ``max_spool`` (each spool counts the other's
bytes as used). ``drop-oldest`` drops from the older, non-current lane first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from twisted.logger import Logger

from relay.disk.spool import (
    LANE_DIR,
    RECORD_HEADER_SIZE,
    AppendResult,
    Spool,
    SpoolRecord,
    SpoolRecovery,
)
from relay.ops.snapshots import SpoolSnapshot

log = Logger(namespace="relay.link")

__all__ = ["LanedSpool"]


class LanedSpool:
    """Two spools behind the writer's spool interface; see the module docstring."""

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        when_full: str = "block",
        live_lane_after: float = 2.0,
        *,
        make: Callable[..., Spool] = Spool,
    ) -> None:
        self.directory = Path(directory)
        self.live_lane_after = live_lane_after
        one: Spool = make(self.directory, max_bytes, when_full, shared=lambda: two.disk_bytes)
        two: Spool = make(
            self.directory / LANE_DIR, max_bytes, when_full, shared=lambda: one.disk_bytes
        )
        self.lanes: tuple[Spool, Spool] = (one, two)
        # The writer gives its records their message count (relay.link.wire.counted).
        self.counted = True
        self.current = 0
        self.switches = 0
        # Set by the output (relay.link.output.LanedLinkOutput) from the reactor: whether
        # a lane has a connected peer. While none has, everything is backlog: new records
        # stay in the current lane, so an outage does not split its backlog in two.
        self.peer_up = True

    # --- configuration (reload) applies to both lanes

    @property
    def max_bytes(self) -> int:
        return self.lanes[0].max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        for lane in self.lanes:
            lane.max_bytes = value

    @property
    def when_full(self) -> str:
        return self.lanes[0].when_full

    @when_full.setter
    def when_full(self, value: str) -> None:
        for lane in self.lanes:
            lane.when_full = value

    # --- lifecycle

    def open(self) -> SpoolRecovery:
        """Recover both lanes; the one with less to deliver takes new records."""
        reports = [lane.open() for lane in self.lanes]
        depth = [lane.depth_bytes for lane in self.lanes]
        self.current = 1 if depth[1] < depth[0] else 0
        out = SpoolRecovery()
        for i, r in enumerate(reports):
            out.segments += r.segments
            out.records += r.records
            out.torn_bytes += r.torn_bytes
            out.corrupt_records += r.corrupt_records
            out.problems += [f"lane {i + 1}: {p}" for p in r.problems] if i else r.problems
        return out

    def close(self) -> None:
        for lane in self.lanes:
            lane.close()

    # --- writer thread

    def append(self, payloads: Sequence[bytes], now: float) -> AppendResult:
        lane = self._choose(now)
        other = self.lanes[1 - self.current]
        if lane.when_full == "drop-oldest" and other.disk_bytes and payloads:
            # The other lane's records are the older ones: they go first.
            need = sum(len(p) for p in payloads) + RECORD_HEADER_SIZE * len(payloads)
            dropped = other.shed(need)
            result = lane.append(payloads, now)
            result.dropped_old += dropped
            return result
        return lane.append(payloads, now)

    def _choose(self, now: float) -> Spool:
        lane = self.lanes[self.current]
        after = self.live_lane_after
        if after <= 0 or not self.peer_up:
            return lane
        oldest = lane.oldest_time
        if oldest is None or now - oldest < after:
            return lane
        other = self.lanes[1 - self.current]
        if other.depth_records:
            return lane  # both lanes hold a backlog: keep each in order
        self.current = 1 - self.current
        self.switches += 1
        log.info(
            "spool {dir}: lane {old} holds {n} records to deliver, the oldest {age:.1f}s old; "
            "new records take lane {new}",
            dir=str(self.directory),
            old=2 - self.current,
            new=self.current + 1,
            n=lane.depth_records,
            age=now - oldest,
        )
        return other

    def sync(self) -> None:
        for lane in self.lanes:
            lane.sync()

    def hold(self) -> list[tuple[Path, int]]:
        """Both lanes, held together (a journaled batch, relay.link.ledger): a batch's
        records may go to either lane, or to both when it switches lanes midway."""
        return [mark for lane in self.lanes for mark in lane.hold()]

    def release(self) -> None:
        for lane in self.lanes:
            lane.release()

    # --- reader side: each lane has its own reader (relay.link.output.LinkOutput)

    def rewind(self) -> None:
        for lane in self.lanes:
            lane.rewind()

    def read(self, max_records: int, max_bytes: int) -> list[SpoolRecord]:
        raise TypeError("a laned spool is read lane by lane (LanedSpool.lanes)")

    # --- introspection: the output as a whole

    @property
    def depth_records(self) -> int:
        return sum(lane.depth_records for lane in self.lanes)

    @property
    def depth_bytes(self) -> int:
        return sum(lane.depth_bytes for lane in self.lanes)

    @property
    def oldest_time(self) -> float | None:
        times = [t for t in (lane.oldest_time for lane in self.lanes) if t is not None]
        return min(times, default=None)

    @property
    def disk_bytes(self) -> int:
        return sum(lane.disk_bytes for lane in self.lanes)

    @property
    def segments(self) -> int:
        return sum(lane.segments for lane in self.lanes)

    def snapshot(self) -> SpoolSnapshot:
        snaps = [lane.snapshot() for lane in self.lanes]
        oldest = [s.oldest_time for s in snaps if s.oldest_time is not None]
        return SpoolSnapshot(
            sum(s.records for s in snaps),
            sum(s.bytes for s in snaps),
            min(oldest) if oldest else None,
            sum(s.disk_bytes for s in snaps),
            sum(s.corrupt_records for s in snaps),
            sum(s.segments_deleted for s in snaps),
            lane_records=tuple(s.records for s in snaps),
            lane_switches=self.switches,
        )
