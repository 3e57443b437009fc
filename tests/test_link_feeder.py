"""relay.link.output.RecordFeeder over a real spool, the thread pool made synchronous."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock

from relay.forwarder import ACK_FLUSH_DELAY
from relay.link import wire
from relay.link.output import RecordFeeder, load_epoch
from relay.metrics import Metrics
from relay.spool import Spool


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
    assert f.take(conn, 1 << 20) == ([(1, b"3 abc"), (2, b"2 de")], (b"edge",))
    assert f.take(conn, 1 << 20) == ([(3, b"1 f"), (4, b"1 g")], (b"e0", b"edge"))
    assert f.take(conn, 1) == ([(5, b"1 h")], (b"edge",))  # at least one record
    assert f.take(conn, 1 << 20) is None
    f.acked(4)
    reactor.advance(ACK_FLUSH_DELAY)
    assert spool.acked_seq == 4 and f.in_flight == 1 and f.delivered == 4
    spool.close()


def test_one_owner_and_lost_records_go_first(tmp_path: Path) -> None:
    f, spool, reactor = feeder(tmp_path, [b"1 a", b"1 b", b"1 c"])
    a, b = object(), object()
    assert f.take(a, 10) == ([(1, b"1 a")], (b"edge",))
    assert f.take(b, 10) is None  # a owns the stream
    f.lost(b)  # not the owner: nothing happens
    assert f.take(a, 10) == ([(2, b"1 b")], (b"edge",))
    f.lost(a)
    # The next owner starts with what a had in flight, in order.
    assert f.take(b, 100) == ([(1, b"1 a"), (2, b"1 b"), (3, b"1 c")], (b"edge",))
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
    assert f.take(a, 100) == ([(3, b"1 c")], (b"edge",))
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
