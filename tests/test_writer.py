"""DurableWriter: ordering, flush durability, backpressure, disk-full retry."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from relay.disk.durable_writer import DurableWriter
from relay.disk.staging import StagingStore
from relay.formats import octet, staging_block
from relay.link import wire
from relay.ops.metrics import Metrics
from tests.support.threadreactor import ThreadReactor

NOW = 1_800_000_000.0
H = int(NOW // 3600)


def rec(msg: bytes) -> list[tuple[bytes, bytes, int, bytes]]:
    """One staging block holding ``msg``."""
    return [(staging_block.FRAMING_OCTET, b"-", 1, octet.encode_many([msg]))]


def messages(root: Path) -> list[bytes]:
    out = []
    for f in sorted(root.rglob("*.stg")):
        data = f.read_bytes()
        out += [r.msg for _, r in staging_block.iter_records(data, data.index(b"\n") + 1)]
    return out


class Harness:
    def __init__(self, root: Path, max_pending: int = 1 << 20, store: Any = None) -> None:
        self.reactor = ThreadReactor()
        self.metrics = Metrics()
        self.events: list[str] = []
        self.store = store or StagingStore(root, "r", grace=300)
        self.writer = DurableWriter(
            self.store,
            self.reactor,
            self.metrics,
            fsync_interval=0.05,
            max_pending=max_pending,
            on_pause=lambda: self.events.append("pause"),
            on_resume=lambda: self.events.append("resume"),
            clock=lambda: NOW,
        )
        self.writer.start()

    def wait(self, d: Any) -> None:
        done: list[object] = []
        d.addBoth(done.append)
        self.reactor.pump_until(lambda: bool(done))

    def stop(self) -> None:
        self.wait(self.writer.stop())


def test_flush_writes_in_order(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    for i in range(200):
        h.writer.submit_chunk({H: rec(b"m%03d" % i)}, (), NOW)
    h.wait(h.writer.flush())
    assert messages(tmp_path) == [b"m%03d" % i for i in range(200)]
    assert h.writer.pending == 0
    h.stop()
    # Every group commit is timed.
    buckets, total = h.metrics.histogram("fsync_duration_seconds").snapshot()
    assert buckets[-1][0] == "+Inf" and buckets[-1][1] >= 1 and total >= 0


def test_backpressure_pauses_and_resumes(tmp_path: Path) -> None:
    gate = threading.Event()

    class SlowStore(StagingStore):
        def append(self, hour: int, data: bytes, now: float) -> None:
            gate.wait(10)
            super().append(hour, data, now)

    h = Harness(tmp_path, max_pending=10_000, store=SlowStore(tmp_path, "r", grace=300))
    blob = rec(b"x" * 1000)
    for _ in range(20):
        h.writer.submit_chunk({H: blob}, (), NOW)
    assert h.events == ["pause"]
    assert h.metrics.get("input_pauses_total") == 1
    gate.set()
    h.wait(h.writer.flush())
    h.reactor.pump_until(lambda: h.events == ["pause", "resume"])
    assert len(messages(tmp_path)) == 20
    h.stop()


def test_disk_full_retries_without_loss(tmp_path: Path, monkeypatch: Any) -> None:
    import relay.disk.durable_writer as writer_mod

    monkeypatch.setattr(writer_mod, "_RETRY_DELAY", 0.01)
    failures = {"left": 3}
    real_writev = os.writev

    def flaky(fd: int, buffers: Any) -> int:
        if failures["left"] > 0 and sum(len(b) for b in buffers) > 100:
            failures["left"] -= 1
            raise OSError(28, "No space left on device")
        return real_writev(fd, buffers)

    h = Harness(tmp_path)
    monkeypatch.setattr(os, "writev", flaky)
    h.writer.submit_chunk({H: rec(b"y" * 200)}, (), NOW)
    h.wait(h.writer.flush())
    monkeypatch.setattr(os, "writev", real_writev)
    assert messages(tmp_path) == [b"y" * 200]
    h.reactor.pump_until(lambda: h.metrics.get("staging_write_errors_total") == 3)
    h.stop()


def test_stop_drains_queue(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    for i in range(50):
        h.writer.submit_chunk({H: rec(b"%d" % i)}, (), NOW)
    h.stop()
    assert len(messages(tmp_path)) == 50


def messages_of(payload: bytes) -> list[bytes]:
    """The messages of a spool record payload, after checking the count it carries."""
    _, frames, count = wire.open_record(payload)
    msgs = staging_block.split_payload(frames, staging_block.FRAMING_OCTET)
    assert count == len(msgs)
    return msgs


class FakeSpool:
    """In-memory stand-in with the Spool's append/sync/close and a block policy."""

    class Full(Exception):
        pass

    def __init__(self, capacity: int = 1 << 30) -> None:
        self.records: list[bytes] = []
        self.payloads: list[bytes] = []  # as appended: one batch record per chunk
        self.synced = 0
        self.capacity = capacity
        self.closed = False

    def append(self, payloads: Any, now: float) -> object:
        """Records are batches (one per chunk, with their count); kept here as the
        messages they hold."""
        self.payloads.extend(payloads)
        msgs = [m for p in payloads for m in messages_of(p)]
        if len(self.records) + len(msgs) > self.capacity:
            raise FakeSpool.Full()
        self.records.extend(msgs)
        return None

    def sync(self) -> None:
        self.synced = len(self.records)

    def hold(self) -> list[tuple[Path, int]]:
        return [(Path("fake"), len(self.records))]

    def release(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def make_writer(tmp_path: Path, spools: dict[str, FakeSpool], **kw: Any) -> tuple[Any, Any]:
    reactor = ThreadReactor()
    events: list[str] = []
    w = DurableWriter(
        StagingStore(tmp_path, "r", grace=300),
        reactor,
        kw.get("metrics") or Metrics(),
        fsync_interval=kw.get("fsync_interval", 3600),
        max_pending=kw.get("max_pending", 1 << 20),
        on_pause=lambda: events.append("pause"),
        on_resume=lambda: events.append("resume"),
        clock=lambda: NOW,
        spools=spools,
        spool_full=(FakeSpool.Full,),
    )
    w.start()
    return w, reactor


def test_chunk_goes_to_staging_and_every_spool_and_acks_after_fsync(tmp_path: Path) -> None:
    a, b = FakeSpool(), FakeSpool()
    w, reactor = make_writer(tmp_path, {"a": a, "b": b})
    acked: list[int] = []
    for i in range(20):
        w.submit_chunk(
            {H: rec(b"m%d" % i)}, [b"p%d" % i], NOW, on_durable=lambda i=i: acked.append(i)
        )
    reactor.pump_until(lambda: len(acked) == 20)
    # Acknowledged only what is fsynced in both spools (group commit, in order).
    assert acked == list(range(20))
    assert a.synced == b.synced == 20
    assert a.records == b.records == [b"p%d" % i for i in range(20)]
    assert messages(tmp_path) == [b"m%d" % i for i in range(20)]
    done: list[object] = []
    w.stop().addBoth(done.append)
    reactor.pump_until(lambda: bool(done))
    assert a.closed and b.closed


def test_full_spool_blocks_until_space(tmp_path: Path, monkeypatch: Any) -> None:
    import relay.disk.durable_writer as writer_mod

    monkeypatch.setattr(writer_mod, "_FULL_RETRY_DELAY", 0.01)
    spool = FakeSpool(capacity=5)
    w, reactor = make_writer(tmp_path, {"s": spool}, max_pending=200)
    acked: list[int] = []
    for i in range(10):
        w.submit_chunk(
            {H: rec(b"x" * 50)}, [b"p%d" % i], NOW, on_durable=lambda i=i: acked.append(i)
        )
    reactor.pump_until(lambda: len(acked) == 5)
    assert len(spool.records) == 5
    spool.records.clear()  # the forwarder delivered and acked them
    reactor.pump_until(lambda: len(acked) == 10)
    assert spool.records == [b"p%d" % i for i in range(5, 10)]
    done: list[object] = []
    w.stop().addBoth(done.append)
    reactor.pump_until(lambda: bool(done))


def test_a_chunk_is_one_spool_record(tmp_path: Path) -> None:
    spool = FakeSpool()
    w, reactor = make_writer(tmp_path, {"s": spool})
    acked: list[int] = []
    fwd = [b"<13>1 - h a - - - m%d" % i for i in range(300)]
    w.submit_chunk({H: rec(b"x")}, fwd, NOW, on_durable=lambda: acked.append(1))
    reactor.pump_until(lambda: acked == [1])
    assert spool.payloads == [wire.counted((), 300, octet.encode_many(fwd))]
    assert spool.records == fwd
    done: list[object] = []
    w.stop().addBoth(done.append)
    reactor.pump_until(lambda: bool(done))


def test_chunks_queued_behind_a_slow_disk_are_written_together_in_order(tmp_path: Path) -> None:
    gate = threading.Event()
    appends: list[int] = []

    class SlowStore(StagingStore):
        def append(self, hour: int, data: bytes, now: float) -> None:
            gate.wait(10)
            appends.append(len(data))
            super().append(hour, data, now)

    h = Harness(tmp_path, store=SlowStore(tmp_path, "r", grace=300))
    for i in range(100):
        h.writer.submit_chunk({H: rec(b"m%03d" % i)}, (), NOW)
    gate.set()
    h.wait(h.writer.flush())
    assert messages(tmp_path) == [b"m%03d" % i for i in range(100)]
    assert len(appends) < 100  # the first write held the rest back; they went out together
    h.stop()


def test_a_record_larger_than_the_spool_is_counted_and_the_writer_goes_on(tmp_path: Path) -> None:
    class TinySpool(FakeSpool):
        def append(self, payloads: Any, now: float) -> object:
            if any(len(p) > 1000 for p in payloads):
                raise ValueError("batch of 2000 bytes can never fit in 1000")
            return super().append(payloads, now)

    spool = TinySpool()
    metrics = Metrics()
    w, reactor = make_writer(tmp_path, {"s": spool}, metrics=metrics)
    acked: list[int] = []
    w.submit_chunk({H: rec(b"big")}, [b"x" * 2000], NOW, on_durable=lambda: acked.append(1))
    w.submit_chunk({H: rec(b"small")}, [b"p"], NOW, on_durable=lambda: acked.append(2))
    reactor.pump_until(lambda: acked == [1, 2])
    assert spool.records == [b"p"]
    assert messages(tmp_path) == [b"big", b"small"]  # staged either way
    reactor.pump_until(
        lambda: metrics.get("spool_dropped_total", output="s", policy="too-large") == 1
    )
    done: list[object] = []
    w.stop().addBoth(done.append)
    reactor.pump_until(lambda: bool(done))


# --- lifecycle: a dying thread, failing spools, a bounded stop


class FailingSpool(FakeSpool):
    """A spool on a full disk: every append fails until ``healed``."""

    def __init__(self) -> None:
        super().__init__()
        self.healed = False

    def append(self, payloads: Any, now: float) -> object:
        if not self.healed:
            raise OSError(28, "No space left on device")
        return super().append(payloads, now)


def test_a_writer_thread_that_dies_says_so_and_stop_does_not_wait(tmp_path: Path) -> None:
    class BrokenStore(StagingStore):
        def append(self, hour: int, data: Any, now: float) -> None:
            raise RuntimeError("a bug in the writer")

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        h = Harness(tmp_path, store=BrokenStore(tmp_path, "r", grace=300))
        failed: list[str] = []
        h.writer.on_failure = failed.append
        h.writer.submit_chunk({H: rec(b"x")}, (), NOW)
        h.reactor.pump_until(lambda: bool(failed))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert failed == ["RuntimeError: a bug in the writer"] == [h.writer.failure]
    assert h.metrics.get("writer_failures_total") == 1
    critical = [e for e in events if e.get("log_level") == LogLevel.critical]
    assert critical and "durable writer thread died" in critical[0]["log_format"]
    done: list[object] = []
    h.writer.set_spools({}, {}).addBoth(done.append)  # a reload must not wait for it
    assert done == [None]
    h.stop()  # fires at once: the thread is gone, nothing would ever answer a _Stop


def test_spool_write_failures_are_reported_until_the_spool_recovers(
    tmp_path: Path, monkeypatch: Any
) -> None:
    import relay.disk.durable_writer as writer_mod

    monkeypatch.setattr(writer_mod, "_RETRY_DELAY", 0.01)
    spool = FailingSpool()
    w, reactor = make_writer(tmp_path, {"core": spool})
    acked: list[int] = []
    w.submit_chunk({H: rec(b"m")}, [b"p"], NOW, on_durable=lambda: acked.append(1))
    reactor.pump_until(lambda: "core" in w.spool_errors)
    assert "No space left on device" in w.spool_errors["core"]
    assert acked == []
    spool.healed = True
    reactor.pump_until(lambda: acked == [1])
    assert w.spool_errors == {}
    done: list[object] = []
    w.stop().addBoth(done.append)
    reactor.pump_until(lambda: bool(done))


def test_stop_gives_up_failing_writes_after_its_timeout_and_acks_none_of_them(
    tmp_path: Path, monkeypatch: Any
) -> None:
    import relay.disk.durable_writer as writer_mod

    monkeypatch.setattr(writer_mod, "_RETRY_DELAY", 0.01)
    spool = FailingSpool()
    w, reactor = make_writer(tmp_path, {"core": spool})
    acked: list[int] = []
    for i in range(5):
        w.submit_chunk({H: rec(b"m%d" % i)}, [b"p"], NOW, on_durable=lambda i=i: acked.append(i))
    reactor.pump_until(lambda: "core" in w.spool_errors)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        w.give_up_after(0)
        done: list[object] = []
        w.stop().addBoth(done.append)
        reactor.pump_until(lambda: bool(done))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert w.unwritten == 5 and acked == []
    assert messages(tmp_path) == [b"m%d" % i for i in range(5)]  # staging was fine
    text = "\n".join(formatEvent(e) for e in events)
    assert "giving up: spool core" in text and "spool core: 5 chunks" in text


def test_stop_fires_even_when_the_thread_is_stuck_in_the_kernel(tmp_path: Path) -> None:
    from twisted.internet.task import Clock

    import relay.disk.durable_writer as writer_mod

    class Reactor(ThreadReactor):
        """Thread hand-off, with timers on a test clock."""

        def __init__(self) -> None:
            super().__init__()
            self.clock = Clock()
            self.callLater = self.clock.callLater

    stuck, release = threading.Event(), threading.Event()

    class StuckStore(StagingStore):
        def append(self, hour: int, data: Any, now: float) -> None:
            stuck.set()
            release.wait(30)  # a write(2) that does not come back

    reactor = Reactor()
    w = DurableWriter(
        StuckStore(tmp_path, "r", grace=300),
        reactor,
        Metrics(),
        fsync_interval=3600,
        max_pending=1 << 20,
        on_pause=lambda: None,
        on_resume=lambda: None,
        clock=lambda: NOW,
    )
    w.start()
    w.submit_chunk({H: rec(b"m")}, (), NOW)
    assert stuck.wait(10)
    done: list[object] = []
    w.stop(timeout=1.0).addBoth(done.append)
    reactor.clock.advance(1.0 + writer_mod._STOP_GRACE)
    assert done == [None] and w.failure == "did not stop in time"
    release.set()
    reactor.pump_until(lambda: w._thread is not None and not w._thread.is_alive())
    assert not reactor.clock.getDelayedCalls()


def test_stop_gives_up_failing_staging_writes_and_says_which_hour(
    tmp_path: Path, monkeypatch: Any
) -> None:
    import relay.disk.durable_writer as writer_mod

    monkeypatch.setattr(writer_mod, "_RETRY_DELAY", 0.01)
    h = Harness(tmp_path)

    def full(fd: int, buffers: Any) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "writev", full)
    acked: list[int] = []
    h.writer.submit_chunk({H: rec(b"m")}, (), NOW, on_durable=lambda: acked.append(1))
    h.reactor.pump_until(lambda: h.writer.last_error is not None)
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        h.writer.give_up_after(0)
        h.stop()
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert h.writer.unwritten == 1 and acked == []
    text = "\n".join(formatEvent(e) for e in events)
    assert f"giving up: staging hour {H}: " in text and "No space left" in text


def test_damage_found_at_start_is_counted(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    for i in range(3):
        h.writer.submit_chunk({H: rec(b"m%d" % i)}, (), NOW)
    h.stop()
    (path,) = (tmp_path / "open").glob("*.stg")
    data = bytearray(path.read_bytes())
    second = data.index(b"\n@", data.index(b"\n@") + 1) + 1  # the second block
    data[second + 40] ^= 0x01
    path.write_bytes(bytes(data))
    h2 = Harness(tmp_path)  # starts the writer: recovery runs
    assert h2.metrics.get("staging_recovery_corrupt_regions_total") == 1
    assert h2.metrics.get("staging_recovery_corrupt_bytes_total") > 0
    h2.stop()
    assert messages(tmp_path / "open") == [b"m0", b"m2"]


def test_outputs_with_a_selector_get_their_own_messages(tmp_path: Path) -> None:
    """relay.selection: ``selected`` lists per output; the other spools get ``forward``."""
    sec, web, plain = FakeSpool(), FakeSpool(), FakeSpool()
    w, reactor = make_writer(tmp_path, {"sec": sec, "web": web, "plain": plain})
    acked: list[int] = []
    for i in range(10):
        fwd = [b"a%d" % i, b"b%d" % i]
        selected = {"sec": [b"a%d" % i], "web": [] if i % 2 else [b"b%d" % i]}
        w.submit_chunk(
            {H: rec(b"m%d" % i)}, fwd, NOW, lambda i=i: acked.append(i), b"-", selected=selected
        )
    reactor.pump_until(lambda: len(acked) == 10)
    assert acked == list(range(10))
    assert sec.records == [b"a%d" % i for i in range(10)]
    assert web.records == [b"b%d" % i for i in range(0, 10, 2)]
    assert plain.records == [m for i in range(10) for m in (b"a%d" % i, b"b%d" % i)]
    assert messages(tmp_path) == [b"m%d" % i for i in range(10)]
    done: list[object] = []
    w.stop().addBoth(done.append)
    reactor.pump_until(lambda: bool(done))
