"""A disk that never fills: the free-space floor, staging retention, staging off.

Tier 2: the guard on a Clock with a fake statvfs; retention on real files; the
writer without staging. The real-process test on a small tmpfs is in
tests/test_full_disk.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from relay import config
from relay.disk.durable_writer import DurableWriter
from relay.disk.guard import DiskGuard, Space, below_floor, floor_of
from relay.disk.staging import file_name, prune
from relay.inputs.connection import Inputs
from relay.inputs.tcp_udp import SyslogDatagramProtocol
from relay.ops.metrics import Metrics
from tests.test_writer import NOW, FakeSpool, make_writer, rec

GiB = 1024**3
MiB = 1024**2


def _config(**relay: Any) -> config.Config:
    return config.parse({"relay": {"id": "r", "state_dir": "/nonexistent", **relay}})


# --- configuration


def test_keep_takes_a_duration_a_size_or_both() -> None:
    def keep(v: object) -> tuple[float | None, int | None]:
        c = config.parse({"relay": {"id": "r"}, "staging": {"keep": v}})
        return c.staging.keep_for, c.staging.keep_size

    assert keep("30d") == (30 * 86400, None)
    assert keep("20GiB") == (None, 20 * GiB)
    assert keep(["20GiB", "2d"]) == (2 * 86400, 20 * GiB)
    assert keep("") == (None, None)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("30", "give a unit"),
        ("10m", "at least 1h"),
        (["1d", "2d"], "more than one duration"),
        ("0B", "would delete every closed hour"),
        ("soon", "expected a duration"),
        (7, "expected a duration"),
    ],
)
def test_bad_keep_is_refused_naming_the_key(value: object, reason: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.parse({"relay": {"id": "r"}, "staging": {"keep": value}})
    assert err.value.problems[0][0] == "staging.keep"
    assert reason in err.value.problems[0][1]


def test_staging_off_needs_a_forward_output_and_no_archive() -> None:
    with pytest.raises(config.ConfigError) as err:
        config.parse(
            {"relay": {"id": "r"}, "staging": {"enabled": False}, "archive": {"enabled": True}}
        )
    keys = [k for k, _ in err.value.problems]
    assert keys.count("staging.enabled") == 2
    ok = config.parse(
        {
            "relay": {"id": "r"},
            "staging": {"enabled": False},
            "forward": [{"name": "core", "peers": ["127.0.0.1:2514"]}],
        }
    )
    assert not ok.staging.enabled


def test_floor_is_the_larger_of_size_and_percent() -> None:
    assert floor_of(_config(), 100 * GiB) == 5 * GiB
    assert floor_of(_config(), 4 * GiB) == GiB
    assert floor_of(_config(min_free="0", min_free_percent=0), 100 * GiB) == 0
    assert not below_floor(0, 0, False)  # guard off
    assert below_floor(99, 100, False) and not below_floor(100, 100, False)
    assert below_floor(105, 100, True) and not below_floor(110, 100, True)


# --- the floor


class FakeRelay:
    def __init__(self, cfg: config.Config) -> None:
        self.config = cfg
        self.inputs = Inputs()
        self.metrics = Metrics()

        class Writer:
            pending = 0

        self.writer = Writer()


class Producer:
    def __init__(self) -> None:
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False


class UDPPort:
    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol
        self.reading = True

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


class Sink:
    def __init__(self) -> None:
        self.frames: list[Any] = []

    def accept(self, frames: Any, sender: bytes, listener: str) -> None:
        self.frames += frames


def test_below_the_floor_streams_pause_udp_drops_counted_and_all_resume() -> None:
    clock = Clock()
    relay = FakeRelay(_config(min_free="100MiB", min_free_percent=0))
    free = [500 * MiB]
    guard = DiskGuard(relay, clock, space=lambda _: Space(free[0], 10 * GiB))
    stream = Producer()
    relay.inputs.add(stream)
    sink = Sink()
    udp = SyslogDatagramProtocol("udp:514", sink, relay.metrics, 2048, "truncate", clock)  # type: ignore[arg-type]
    port = UDPPort(udp)
    relay.inputs.udp_ports.append(port)
    guard.startService()
    assert not stream.paused and guard.reasons() == []

    free[0] = 99 * MiB
    clock.advance(1)
    assert stream.paused and port.reading  # UDP reads on, to count what it drops
    assert "below the floor of 100.0 MiB" in guard.reasons()[0]
    assert relay.metrics.get("disk_floor_pauses_total") == 1
    udp.datagramReceived(b"<14>1 - h a - - - dropped", ("127.0.0.1", 5000))
    clock.advance(0)
    assert sink.frames == []
    assert relay.metrics.get("udp_dropped_total", reason="disk_floor") == 1

    # The writer's own pause overlaps: the disk's resume must not resume it.
    relay.inputs.pause()
    assert not port.reading
    free[0] = 105 * MiB
    clock.advance(1)
    assert stream.paused  # not yet a tenth above the floor
    free[0] = 200 * MiB
    clock.advance(1)
    assert stream.paused and not port.reading and guard.reasons() == []
    relay.inputs.resume()
    assert not stream.paused and port.reading
    udp.datagramReceived(b"<14>1 - h a - - - kept", ("127.0.0.1", 5000))
    clock.advance(0)
    assert len(sink.frames) == 1
    guard.stopService()
    assert not clock.getDelayedCalls()


def test_the_writers_queue_counts_against_free_space() -> None:
    clock = Clock()
    relay = FakeRelay(_config(min_free="100MiB", min_free_percent=0))
    guard = DiskGuard(relay, clock, space=lambda _: Space(150 * MiB, 10 * GiB))
    guard.startService()
    assert not guard.paused
    relay.writer.pending = 60 * MiB
    clock.advance(1)
    assert guard.paused and relay.inputs.paused
    guard.stopService()


def test_unreadable_free_space_is_reported_not_fatal() -> None:
    clock = Clock()
    relay = FakeRelay(_config())

    def broken(_: Path) -> Space:
        raise FileNotFoundError(2, "No such file or directory")

    guard = DiskGuard(relay, clock, space=broken)
    guard.startService()
    assert "cannot read free space" in guard.reasons()[0]
    assert not relay.inputs.paused
    guard.stopService()


# --- retention


def _staged(d: Path, hour: int, size: int) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / file_name(hour, "20260101T000000000000Z")
    p.write_bytes(b"x" * size)
    return p


def test_prune_by_age_deletes_hours_older_than_keep_oldest_first(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    hour = int(now // 3600)
    files = [_staged(tmp_path, hour - k, 10) for k in (1, 30, 50, 47)]
    (tmp_path / "notes.txt").write_text("operator's")  # never touched
    done = prune([tmp_path], now, 48 * 3600, None)
    assert [n for n, _ in done.files] == [files[2].name]
    assert done.bytes == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [files[0].name, files[1].name, files[3].name, "notes.txt"]
    )


def test_prune_by_size_keeps_the_newest_that_fit(tmp_path: Path) -> None:
    hour = 500_000
    files = [_staged(tmp_path, hour + k, 100) for k in range(5)]
    done = prune([tmp_path, tmp_path / "absent"], hour * 3600.0, None, 250)
    assert [n for n, _ in done.files] == [f.name for f in files[:3]]
    assert prune([tmp_path], hour * 3600.0, None, 250).files == []
    assert prune([tmp_path / "absent"], 0, 3600.0, 1).files == []


def test_prune_counts_the_size_of_every_directory_together(tmp_path: Path) -> None:
    hour = 500_000
    older = _staged(tmp_path / "archived", hour, 100)
    newer = _staged(tmp_path / "closed", hour + 1, 100)
    done = prune([tmp_path / "closed", tmp_path / "archived"], hour * 3600.0, None, 150)
    assert [n for n, _ in done.files] == [older.name]
    assert newer.exists()


def _sync(f: Any) -> defer.Deferred[Any]:
    return defer.succeed(f())


def test_guard_prunes_closed_hours_only_with_the_archive_off(tmp_path: Path) -> None:
    now = 1_800_000_000.0
    hour = int(now // 3600)
    staging = tmp_path / "staging"
    old_closed = _staged(staging / "closed", hour - 100, 10)
    old_archived = _staged(staging / "archived", hour - 100, 10)
    young = _staged(staging / "closed", hour - 2, 10)
    for archive, gone in ((True, [old_archived]), (False, [old_closed])):
        raw: dict[str, Any] = {
            "relay": {"id": "r", "state_dir": str(tmp_path)},
            "staging": {"keep": "2d"},
        }
        if archive:
            raw["archive"] = {"enabled": True, "bucket": "b"}
        relay = FakeRelay(config.parse(raw))
        clock = Clock()
        clock.advance(now)
        guard = DiskGuard(relay, clock, space=lambda _: Space(GiB, GiB), in_thread=_sync)
        guard.startService()
        guard.stopService()
        assert [p for p in gone if p.exists()] == []
        assert relay.metrics.get("staging_pruned_files_total") == 1
        assert relay.metrics.get("staging_pruned_bytes_total") == 10
        if archive:
            assert old_closed.exists()  # the archiver still needs it
    assert young.exists()


# --- staging off


def test_without_staging_messages_go_to_the_spools_only(tmp_path: Path) -> None:
    spool = FakeSpool()
    w, reactor = make_writer(tmp_path, {"core": spool})
    w._stage = False  # as DurableWriter(stage=False) from [staging] enabled = false
    acked: list[int] = []
    hour = int(NOW // 3600)
    for i in range(5):
        w.submit_chunk({hour: rec(b"m%d" % i)}, [b"p%d" % i], NOW, lambda i=i: acked.append(i))
    reactor.pump_until(lambda: len(acked) == 5)
    assert spool.records == [b"p%d" % i for i in range(5)]
    assert list(tmp_path.rglob("*.stg")) == []
    done: list[object] = []
    w.stop().addBoth(done.append)
    reactor.pump_until(lambda: bool(done))
    assert isinstance(w, DurableWriter) and os.path.isdir(tmp_path / "open")


def test_a_reloaded_floor_applies_at_the_next_tick() -> None:
    clock = Clock()
    relay = FakeRelay(_config(min_free="100MiB", min_free_percent=0))
    guard = DiskGuard(relay, clock, space=lambda _: Space(150 * MiB, 10 * GiB))
    guard.startService()
    assert not guard.paused
    relay.config = _config(min_free="200MiB", min_free_percent=0)  # as RelayService.reload
    clock.advance(1)
    assert guard.paused and guard.floor == 200 * MiB
    guard.stopService()


def test_status_shows_the_disk_and_a_pause() -> None:
    from relay.ops.status import render_relay

    status: dict[str, Any] = {
        "health": {"status": "degraded", "reasons": ["disk: 1.0 MiB free ..."]},
        "disk": {
            "path": "/var/lib/syslog-relay",
            "free_bytes": MiB,
            "total_bytes": GiB,
            "floor_bytes": 100 * MiB,
            "inputs_paused": True,
        },
    }
    text = render_relay(status, _config())
    assert "disk: 1.0 MiB free of 1.0 GiB on /var/lib/syslog-relay, floor 100.0 MiB" in text
    assert "INPUTS PAUSED" in text and "! disk:" in text
