"""relay.link.output.RecordFeeder over a real spool, the thread pool made synchronous."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock

from relay.disk.spool import Spool
from relay.forward.spool_window import ACK_FLUSH_DELAY
from relay.link import wire
from relay.link.output import RecordFeeder, load_epoch
from relay.ops.metrics import Metrics


class SyncPool:
    def callInThreadWithCallback(
        self, on_result: Callable[[bool, Any], None], f: Callable[..., Any], *a: Any, **kw: Any
    ) -> None:
        on_result(True, f(*a, **kw))


class Reactor(Clock):
    def callFromThread(self, f: Callable[..., Any], *a: Any, **kw: Any) -> None:
        f(*a, **kw)


def feeder(tmp_path: Path, payloads: list[bytes]) -> tuple[RecordFeeder, Spool, Reactor]:
    spool = Spool(tmp_path / "spool", 1 << 30)
    spool.open()
    spool.append(payloads, 0.0)
    reactor = Reactor()
    f = RecordFeeder(spool, reactor, SyncPool(), Metrics(), "core", b"edge")  # type: ignore[arg-type]
    f.notify()
    return f, spool, reactor


def test_batches_are_whole_records_of_one_path_within_the_size(tmp_path: Path) -> None:
    recs = [b"3 abc", b"2 de", wire.envelope((b"e0",), b"1 f"), wire.envelope((b"e0",), b"1 g")]
    f, spool, reactor = feeder(tmp_path, [*recs, b"1 h"])
    conn = object()
    assert f.take(conn, 1 << 20) == ([(1, b"3 abc"), (2, b"2 de")], (b"edge",), None)
    assert f.take(conn, 1 << 20) == ([(3, b"1 f"), (4, b"1 g")], (b"e0", b"edge"), None)
    assert f.take(conn, 1) == ([(5, b"1 h")], (b"edge",), None)  # at least one record
    assert f.take(conn, 1 << 20) is None
    f.acked(4)
    reactor.advance(ACK_FLUSH_DELAY)
    assert spool.acked_seq == 4 and f.in_flight == 1 and f.delivered == 4
    spool.close()


def test_one_owner_and_lost_records_go_first(tmp_path: Path) -> None:
    f, spool, reactor = feeder(tmp_path, [b"1 a", b"1 b", b"1 c"])
    a, b = object(), object()
    assert f.take(a, 10) == ([(1, b"1 a")], (b"edge",), None)
    assert f.take(b, 10) is None  # a owns the stream
    f.lost(b)  # not the owner: nothing happens
    assert f.take(a, 10) == ([(2, b"1 b")], (b"edge",), None)
    f.lost(a)
    # The next owner starts with what a had in flight, in order.
    assert f.take(b, 100) == ([(1, b"1 a"), (2, b"1 b"), (3, b"1 c")], (b"edge",), None)
    f.acked(3)
    reactor.advance(ACK_FLUSH_DELAY)
    assert spool.acked_seq == 3
    spool.close()


def test_records_the_receiver_committed_are_not_sent_again(tmp_path: Path) -> None:
    f, spool, reactor = feeder(tmp_path, [b"1 a", b"1 b", b"1 c"])
    a = object()
    f.take(a, 10)
    f.lost(a)
    f.committed(2)  # WELCOME: the receiver has 1 and 2
    assert f.take(a, 100) == ([(3, b"1 c")], (b"edge",), None)
    assert f.metrics.get("link_already_committed_total") == 2
    f.acked(3)
    reactor.advance(ACK_FLUSH_DELAY)
    assert spool.acked_seq == 3
    spool.close()


def test_epoch_is_kept_within_a_boot_and_renewed_after_a_reboot(tmp_path: Path) -> None:
    e1 = load_epoch(tmp_path, boot=lambda: "boot-a")
    assert load_epoch(tmp_path, boot=lambda: "boot-a") == e1
    e2 = load_epoch(tmp_path, boot=lambda: "boot-b")
    assert e2 != e1 and e2 != 0
    (tmp_path / "link-epoch").write_bytes(b"damaged")
    assert load_epoch(tmp_path, boot=lambda: "boot-b") not in (e2, 0)


def test_counted_records_give_their_count_and_the_path() -> None:
    """A link output's spool records carry their message count
    (relay.disk.durable_writer): the batch header takes it instead of counting frames again;
    one record without it: counted."""
    assert wire.open_record(wire.counted((b"e0",), 2, b"1 a1 b")) == ((b"e0",), b"1 a1 b", 2)
    assert wire.open_record(wire.counted((), 1, b"1 a")) == ((), b"1 a", 1)
    assert wire.open_envelope(wire.counted((b"e0",), 2, b"1 a1 b")) == ((b"e0",), b"1 a1 b")
    assert wire.open_record(b"\x00M\x00") == ((), b"\x00M\x00", None)  # too short: as it is
    assert wire.open_record(b"1 a") == ((), b"1 a", None)


def test_a_batch_of_counted_records_has_their_count(tmp_path: Path) -> None:
    recs = [wire.counted((), 2, b"1 a1 b"), wire.counted((), 1, b"1 c")]
    f, spool, _ = feeder(tmp_path, recs)
    assert f.take(object(), 1 << 20) == ([(1, b"1 a1 b"), (2, b"1 c")], (b"edge",), 3)
    spool.close()
    g, spool2, _ = feeder(tmp_path / "2", [recs[0], b"1 x"])
    assert g.take(object(), 1 << 20) == ([(1, b"1 a1 b"), (2, b"1 x")], (b"edge",), None)
    spool2.close()
