"""relay.link.lanes: a link output's spool in two lanes, live traffic beside a backlog.

The lane choice and the shared size bound on real spools (times given to append, as
the writer does); then both lanes' feeders and connections pumped by iosim into one
core, time by Clock: live records reach the core while the backlog still waits for
its acknowledgements, and after a crash of the edge every message is stored once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from relay.disk.spool import LANE_DIR, RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE, SpoolFull
from relay.formats import octet
from relay.forward.spool_window import ACK_FLUSH_DELAY
from relay.link.lanes import LanedSpool
from relay.link.ledger import CommitLog, Mark, roll_back
from relay.link.output import LatencyStats, RecordFeeder, load_epoch
from relay.link.protocol import LinkClientFactory, build_batch
from relay.ops.metrics import Metrics
from tests.test_link_feeder import Reactor, SyncPool
from tests.test_link_protocol import Core, connect


def body(i: int) -> bytes:
    return b"<14>1 - h a - - - msg %d" % i


def msg(i: int) -> bytes:
    """A spool record of one octet-counted message (what the core stores: ``body``)."""
    return octet.encode(body(i))


def laned(tmp_path: Path, after: float = 5.0, **kw: Any) -> LanedSpool:
    s = LanedSpool(tmp_path / "core", kw.pop("max_bytes", 1 << 30), live_lane_after=after, **kw)
    s.open()
    return s


def lane_payloads(s: LanedSpool, i: int) -> list[bytes]:
    return [r.payload for r in s.lanes[i].read(10_000, 1 << 30)]


# --- the lane choice ---------------------------------------------------------------------


def test_lanes_switch_only_to_an_empty_lane_and_keep_order_within_each(tmp_path: Path) -> None:
    s = laned(tmp_path, after=5.0)
    s.append([msg(1), msg(2)], 100.0)
    s.append([msg(3)], 104.9)  # the oldest undelivered is 4.9 s old: same lane
    assert s.current == 0
    s.append([msg(4)], 105.0)  # 5 s old, lane 2 empty: the new record takes lane 2
    assert s.current == 1 and s.switches == 1
    s.append([msg(5)], 200.0)  # lane 2 is old now too, but lane 1 still holds records
    assert s.current == 1
    assert lane_payloads(s, 0) == [msg(1), msg(2), msg(3)]
    assert lane_payloads(s, 1) == [msg(4), msg(5)]
    # The backlog lane is delivered: the next time lane 2 lags, lane 1 takes over.
    s.lanes[0].ack(3)
    s.append([msg(6)], 201.0)
    assert s.current == 0 and s.switches == 2
    assert lane_payloads(s, 0) == [msg(6)]
    assert s.snapshot().lane_switches == 2
    assert s.depth_records == 3 and s.oldest_time == 105.0
    assert (tmp_path / "core" / LANE_DIR).is_dir()
    s.close()


def test_without_a_connected_peer_an_outage_stays_in_one_lane(tmp_path: Path) -> None:
    s = laned(tmp_path, after=1.0)
    s.peer_up = False  # the output has no connection: everything is backlog
    s.append([msg(1)], 0.0)
    s.append([msg(2)], 50.0)
    assert s.current == 0 and lane_payloads(s, 0) == [msg(1), msg(2)]
    s.peer_up = True  # the peer is back: new records take the other lane
    s.append([msg(3)], 51.0)
    assert s.current == 1 and lane_payloads(s, 1) == [msg(3)]
    s.close()


def test_a_journaled_batch_holds_and_rolls_back_both_lanes(tmp_path: Path) -> None:
    """relay.link.ledger: a batch that switches lanes midway is hidden in both until
    released, and a roll back cuts both lanes to where they ended before it."""
    s = laned(tmp_path, after=1.0)
    s.append([msg(1)], 0.0)
    marks = s.hold()
    assert [Path(p).parent for p, _ in marks] == [tmp_path / "core", tmp_path / "core" / LANE_DIR]
    log = CommitLog(tmp_path / "link")
    log.open()
    log.begin([Mark("spool", str(p), n) for p, n in marks])
    s.append([msg(2)], 0.5)  # lane 1
    s.append([msg(3)], 2.0)  # lane 1's oldest is 2 s old: lane 2
    assert s.current == 1
    assert lane_payloads(s, 0) == [msg(1)]
    assert lane_payloads(s, 1) == []  # held: the batch may yet be rolled back
    s.close()  # the process dies before the commit mark
    assert roll_back(tmp_path / "link")
    again = laned(tmp_path, after=1.0)
    assert lane_payloads(again, 0) == [msg(1)]
    assert lane_payloads(again, 1) == []
    # Committed this time: hidden until released. Lane 2, with less to deliver, is current.
    assert again.current == 1
    again.hold()
    again.append([msg(2), msg(3)], 0.5)
    assert lane_payloads(again, 1) == []
    again.release()
    assert lane_payloads(again, 1) == [msg(2), msg(3)]
    again.close()
    log.close()


def test_zero_keeps_one_lane(tmp_path: Path) -> None:
    s = laned(tmp_path, after=0)
    s.append([msg(1)], 0.0)
    s.append([msg(2)], 10_000.0)
    assert s.current == 0 and lane_payloads(s, 0) == [msg(1), msg(2)]
    assert lane_payloads(s, 1) == []
    s.close()


def test_delivered_records_never_trigger_a_switch(tmp_path: Path) -> None:
    s = laned(tmp_path, after=1.0)
    for t in range(10):
        s.append([msg(t)], float(t))
        s.lanes[0].read(10, 1 << 20)
        s.lanes[0].ack(t + 1)  # the peer keeps up
    assert s.current == 0 and s.switches == 0
    s.close()


def test_both_lanes_survive_a_crash_and_the_smaller_one_takes_new_records(
    tmp_path: Path,
) -> None:
    s = laned(tmp_path, after=1.0)
    s.append([msg(i) for i in range(1, 6)], 0.0)
    s.append([msg(6)], 2.0)  # lane 2
    s.append([msg(7)], 3.0)
    first = s.lanes[0].read(2, 1 << 20)
    s.lanes[0].ack(first[-1].seq)  # two delivered, not yet persisted: they may come again
    for lane in s.lanes:
        lane._close_fds()  # kill -9: no sync, no acked write
    again = laned(tmp_path, after=1.0)
    assert again.current == 1  # lane 2 has less to deliver
    assert lane_payloads(again, 0)[-3:] == [msg(3), msg(4), msg(5)]
    assert lane_payloads(again, 1) == [msg(6), msg(7)]
    again.append([msg(8)], 4.0)
    assert again.lanes[1].last_seq == 3
    again.close()


# --- one size bound for both lanes --------------------------------------------------------


def _record(n: int) -> int:
    return RECORD_HEADER_SIZE + n


def test_the_lanes_share_max_spool(tmp_path: Path) -> None:
    big = b"x" * 4000
    limit = 4 * SEGMENT_HEADER_SIZE + 10 * _record(len(big))
    s = laned(tmp_path, after=1.0, max_bytes=limit, when_full="block")
    for i in range(6):
        s.append([big], float(i))  # lane 1 until its oldest is 1 s old, then lane 2
    assert s.current == 1 and s.lanes[1].depth_records == 5
    with pytest.raises(SpoolFull):
        while True:
            s.append([big], 10.0)
    assert s.disk_bytes <= limit
    s.close()


def test_drop_oldest_drops_the_older_lane_first(tmp_path: Path) -> None:
    limit = 64 * 1024
    s = laned(tmp_path, after=1.0, max_bytes=limit, when_full="drop-oldest")
    n = 0
    while s.current == 0 or s.lanes[1].depth_records < 3:
        s.append([b"%05d" % n + b"y" * 3995], n * 0.5)
        n += 1
    dropped = 0
    for _ in range(40):
        dropped += s.append([b"%05d" % n + b"y" * 3995], n * 0.5).dropped_old
        n += 1
    assert s.disk_bytes <= limit
    assert dropped > 0
    kept = sorted(int(p[:5]) for i in (0, 1) for p in lane_payloads(s, i))
    assert kept == list(range(n - len(kept), n))  # the newest records, whichever lane


def test_reload_settings_reach_both_lanes(tmp_path: Path) -> None:
    s = laned(tmp_path)
    s.max_bytes, s.when_full = 1 << 25, "drop-newest"
    assert [(x.max_bytes, x.when_full) for x in s.lanes] == [(1 << 25, "drop-newest")] * 2
    with pytest.raises(TypeError):
        s.read(1, 1)
    s.close()


# --- both lanes into one core ---------------------------------------------------------------


def lane_client(feeder: RecordFeeder, clock: Clock, epoch: int) -> LinkClientFactory:
    """A sender whose batches hold one small record each (the window shows)."""

    def build(
        recs: Sequence[tuple[int, bytes]],
        path: Sequence[bytes],
        codec: str,
        lvl: int,
        messages: int | None = None,
    ) -> Any:
        return defer.succeed(build_batch(recs, path, codec, lvl, messages))  # fmt: skip

    return LinkClientFactory(
        "core", feeder, Metrics(), clock, "edge", epoch, build, ("zstd", "none"), 1, 8, 16,
        1 << 24, 30.0, LatencyStats(),
    )  # fmt: skip


class Edge:
    """Both lanes of one output: a feeder and a connection each, into ``core``."""

    def __init__(self, tmp_path: Path, core: Core, reactor: Reactor) -> None:
        self.spool = laned(tmp_path, after=1.0)
        self.reactor = reactor
        self.feeders = [
            RecordFeeder(lane, reactor, SyncPool(), Metrics(), "core", b"edge")  # type: ignore[arg-type]
            for lane in self.spool.lanes
        ]
        self.epochs = [load_epoch(lane.directory, boot=lambda: "b") for lane in self.spool.lanes]
        self.conns = []
        for f, e in zip(self.feeders, self.epochs, strict=True):
            cf = lane_client(f, reactor, e)
            f.listeners.append(cf.wake)
            self.conns.append(connect(core, cf, reactor))

    def append(self, msgs: list[bytes], now: float) -> None:
        self.spool.append(msgs, now)
        for f in self.feeders:
            f.notify()

    def pump(self) -> None:
        for _, _, p in self.conns:
            p.flush()
        self.reactor.advance(ACK_FLUSH_DELAY)
        for _, _, p in self.conns:
            p.flush()

    def crash(self) -> None:
        for _, client, p in self.conns:
            client.transport.loseConnection()
            p.flush()
        for lane in self.spool.lanes:
            lane._close_fds()


def drain(core: Core, edge: Edge) -> None:
    for _ in range(1000):
        edge.pump()
        if not core.pending and not any(f.in_flight for f in edge.feeders):
            edge.pump()
            if not core.pending:
                return
        core.commit()
    raise AssertionError("not drained")


def test_live_records_reach_the_core_while_the_backlog_waits(tmp_path: Path) -> None:
    reactor = Reactor()
    core = Core(reactor)
    edge = Edge(tmp_path, core, reactor)
    backlog = [body(i) for i in range(1, 41)]
    edge.append(
        [octet.encode(b) for b in backlog], 0.0
    )  # the core does not commit: 4 batches in flight, 36 wait
    edge.pump()
    assert len(core.stored) == 4
    live = [body(i) for i in range(1000, 1004)]
    for i, m in enumerate(live):
        edge.append(
            [octet.encode(m)], 10.0 + i
        )  # the backlog is 10 s old: live records take lane 2
    edge.pump()
    assert edge.spool.current == 1
    assert core.stored[4:] == live  # at the core, 36 backlog records still to come
    drain(core, edge)
    assert sorted(core.stored) == sorted(backlog + live)
    assert [m for m in core.stored if m in backlog] == backlog  # in order within a lane
    assert core.ledger.senders == 2  # one (relay id, epoch) key per lane
    assert edge.spool.depth_records == 0


def test_an_edge_crash_with_both_lanes_busy_stores_every_message_once(tmp_path: Path) -> None:
    reactor = Reactor()
    core = Core(reactor)
    edge = Edge(tmp_path, core, reactor)
    backlog = [body(i) for i in range(1, 31)]
    live = [body(i) for i in range(1000, 1010)]
    edge.append([octet.encode(b) for b in backlog], 0.0)
    for i, m in enumerate(live[:5]):
        edge.append([octet.encode(m)], 10.0 + i)
    edge.pump()
    core.commit()  # the first batches of each lane durable and acknowledged
    edge.pump()  # more batches of each lane written at the core; then the edge dies
    assert 8 < len(core.stored) < len(backlog) + 5
    edge.crash()
    core.commit()  # what the core had written becomes durable anyway
    again = Edge(tmp_path, core, reactor)
    assert again.epochs == edge.epochs  # the same boot: the core knows both positions
    for i, m in enumerate(live[5:]):
        again.append([octet.encode(m)], 20.0 + i)
    drain(core, again)
    assert sorted(core.stored) == sorted(backlog + live)  # each exactly once
    assert [m for m in core.stored if m in backlog] == backlog
    # The restarted edge read again records the core had: its WELCOME per lane skipped them.
    skipped = sum(f.metrics.get("link_already_committed_total") for f in again.feeders)
    assert skipped >= 5
