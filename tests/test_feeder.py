"""SpoolFeeder: batch records in, messages out, the spool acked by whole records."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.task import Clock

from relay.disk.spool import Spool
from relay.formats import octet
from relay.forward.outputs import SpoolFeeder
from relay.forward.spool_window import ACK_FLUSH_DELAY
from relay.ops.metrics import Metrics


class SyncPool:
    """ThreadPool stand-in: runs the call at once (deferToThreadPool's interface)."""

    def callInThreadWithCallback(
        self, on_result: Callable[[bool, Any], None], f: Callable[..., Any], *a: Any, **kw: Any
    ) -> None:
        on_result(True, f(*a, **kw))


class SyncReactor(Clock):
    def callFromThread(self, f: Callable[..., Any], *a: Any, **kw: Any) -> None:
        f(*a, **kw)


BATCHES = [[b"a1", b"a2", b"a3"], [b"b1", b"b2"], [b"c1"]]


def make(tmp_path: Path) -> tuple[Spool, SpoolFeeder, SyncReactor, Metrics]:
    spool = Spool(tmp_path / "spool", 1024**2)
    spool.open()
    for batch in BATCHES:
        spool.append([octet.encode_many(batch)], 1.0)
    spool.sync()
    reactor = SyncReactor()
    metrics = Metrics()
    feeder = SpoolFeeder(spool, reactor, SyncPool(), metrics, "out")  # type: ignore[arg-type]
    feeder.notify()
    return spool, feeder, reactor, metrics


def flush(reactor: SyncReactor) -> None:
    reactor.advance(ACK_FLUSH_DELAY)


def test_records_are_split_into_messages_and_acked_by_whole_record(tmp_path: Path) -> None:
    spool, feeder, reactor, _ = make(tmp_path)
    first = spool.acked_seq
    got = feeder.take(4)
    assert [m.payload for m in got] == [b"a1", b"a2", b"a3", b"b1"]
    feeder.acked([m.seq for m in got[:3]])
    flush(reactor)
    assert spool.acked_seq == first + 1  # record a is done, b is not
    feeder.acked([got[3].seq])
    flush(reactor)
    assert spool.acked_seq == first + 1  # b2 not even sent yet
    rest = feeder.take(10)
    assert [m.payload for m in rest] == [b"b2", b"c1"]
    feeder.acked([rest[0].seq])
    flush(reactor)
    assert spool.acked_seq == first + 2
    assert feeder.delivered == 5


def test_acknowledgement_latency_is_observed_per_acknowledgement(tmp_path: Path) -> None:
    _, feeder, reactor, metrics = make(tmp_path)
    got = feeder.take(4)
    reactor.advance(0.3)
    feeder.acked([m.seq for m in got[:3]])  # one acknowledgement of three messages
    reactor.advance(2)
    feeder.acked([got[3].seq])
    buckets, total = metrics.histogram("forward_ack_latency_seconds", output="out").snapshot()
    counts = dict(buckets)
    assert counts["0.25"] == 0 and counts["0.5"] == 1 and counts["2.5"] == 2
    assert counts["+Inf"] == 2 and total == pytest.approx(2.6)


def test_lost_messages_come_back_first_and_hold_the_ack(tmp_path: Path) -> None:
    spool, feeder, reactor, metrics = make(tmp_path)
    first = spool.acked_seq
    got = feeder.take(10)
    assert len(got) == 6
    # a1..a3 and c1 acknowledged; b1, b2 lost with the connection.
    feeder.acked([got[k].seq for k in (0, 1, 2, 5)])
    feeder.lost([got[3].seq, got[4].seq])
    flush(reactor)
    assert spool.acked_seq == first + 1
    assert metrics.get("forward_replayed_total", output="out") == 2
    again = feeder.take(10)
    assert [m.payload for m in again] == [b"b1", b"b2"]
    feeder.acked([m.seq for m in again])
    flush(reactor)
    assert spool.acked_seq == first + 3


def test_a_restart_replays_a_partly_acknowledged_record_whole(tmp_path: Path) -> None:
    spool, feeder, reactor, _ = make(tmp_path)
    got = feeder.take(4)
    feeder.acked([m.seq for m in got])  # a1..a3, b1: record b only half done
    flush(reactor)
    spool.persist_ack()
    spool.close()
    spool2 = Spool(tmp_path / "spool", 1024**2)
    spool2.open()
    feeder2 = SpoolFeeder(spool2, SyncReactor(), SyncPool(), Metrics(), "out")  # type: ignore[arg-type]
    feeder2.notify()
    # b1 is sent twice (bounded duplicates: one record), nothing is lost.
    assert [m.payload for m in feeder2.take(10)] == [b"b1", b"b2", b"c1"]
