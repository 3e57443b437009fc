"""relay/ops/observe.py without sockets: fake service objects, a Clock, parsed exposition."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.application.service import MultiService
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.web.test.requesthelper import DummyRequest

from relay.config import Config, ForwardConfig, HealthConfig, LimitsConfig, parse
from relay.disk.staging import file_name, hour_index, part_name
from relay.ops import observe
from relay.ops.metrics import (
    COUNTERS,
    FRAMING_KINDS,
    HISTOGRAMS,
    SPOOL_DROP_POLICIES,
    Metrics,
    UnknownMetric,
)
from relay.ops.observe import (
    StagingScan,
    archive_reason,
    counter_families,
    ready_since,
    render_health,
    scan_staging,
)
from relay.ops.snapshots import (
    BoundListener,
    ListenerSnapshot,
    OutputSnapshot,
    PeerSnapshot,
    SpoolSnapshot,
    WriterSnapshot,
)
from tests.support.certs import PKI, pki, server_tls  # noqa: F401  (fixture)

T0 = 1_780_000_000.0  # 2026-05-28, a whole hour + 1600 s


@dataclass
class FakePeer:
    label: str
    connected: bool = False
    connecting: bool = False
    failures: int = 0
    retry_at: float = 0.0

    def snapshot(self) -> PeerSnapshot:
        return PeerSnapshot(
            self.label, self.connected, self.connecting, self.failures, self.retry_at
        )


@dataclass
class FakeFeeder:
    in_flight: int = 0
    delivered: int = 0


@dataclass
class FakeOutput:
    cfg: ForwardConfig
    peers: list[FakePeer]
    feeder: FakeFeeder = field(default_factory=FakeFeeder)

    def snapshot(self) -> OutputSnapshot:
        return OutputSnapshot(
            self.cfg.transport,
            self.cfg.mode,
            self.feeder.in_flight,
            self.feeder.delivered,
            sum(p.connected for p in self.peers),
            tuple(p.snapshot() for p in self.peers),
        )


@dataclass
class FakeSpool:
    depth_records: int = 0
    depth_bytes: int = 0
    oldest_time: float | None = None
    disk_bytes: int = 0
    corrupt: int = 0
    deleted: int = 0

    def snapshot(self) -> SpoolSnapshot:
        return SpoolSnapshot(
            self.depth_records,
            self.depth_bytes,
            self.oldest_time,
            self.disk_bytes,
            self.corrupt,
            self.deleted,
        )


@dataclass
class FakeWriter:
    pending: int = 0
    last_error: str | None = None
    running: bool = True
    spool_errors: dict[str, str] = field(default_factory=dict)
    failure: str | None = None

    def snapshot(self) -> WriterSnapshot:
        return WriterSnapshot(
            self.running, self.pending, self.last_error, self.spool_errors, self.failure
        )


class FakeHost:
    def __init__(self, port: int) -> None:
        self.port = port


@dataclass
class FakeListener:
    connections_open: int | None = None

    def snapshot(self) -> ListenerSnapshot:
        return ListenerSnapshot(self.connections_open)

    def apply_limits(self, limits: LimitsConfig) -> None:
        pass


class FakePort:
    def __init__(self, port: int) -> None:
        self._port = port

    def getHost(self) -> FakeHost:
        return FakeHost(self._port)

    def stopListening(self) -> None:
        pass


@dataclass
class FakeListeners:
    ports: list[BoundListener] = field(default_factory=list)


class FakeRelay(MultiService):
    def __init__(self, config: Config, clock: Clock) -> None:
        super().__init__()
        self.config = config
        self.reactor = clock
        self.metrics = Metrics()
        self.writer = FakeWriter()
        self.listeners = FakeListeners()
        self.disk = None
        self.link = None
        self.spools: dict[str, FakeSpool] = {fc.name: FakeSpool() for fc in config.forward}
        self.outputs: dict[str, FakeOutput] = {
            fc.name: FakeOutput(fc, [FakePeer(f"{h}:{p}") for h, p in fc.peers])
            for fc in config.forward
        }


def make_config(tmp_path: Path, archive: bool = False, **health: str) -> Config:
    data: dict[str, Any] = {
        "relay": {"id": "edge1", "state_dir": str(tmp_path / "state")},
        "listen": [
            {"address": "127.0.0.1:5514", "transport": "tcp", "name": "tcp-in"},
            {"address": "127.0.0.1:5514", "transport": "udp"},
        ],
        "forward": [{"name": "core", "peers": ["10.0.0.1:2514", "10.0.0.2:2514"]}],
        "metrics": {"enabled": False},
        "health": {
            "no_peer_after": "10s",
            "spool_threshold": "1MiB",
            "archive_lag": "1h",
            **health,
        },
    }
    if archive:
        data["archive"] = {"enabled": True, "bucket": "b"}
    return parse(data)


@pytest.fixture
def relay(tmp_path: Path) -> FakeRelay:
    clock = Clock()
    clock.advance(T0)
    return FakeRelay(make_config(tmp_path), clock)


def attach(relay: FakeRelay) -> observe.RelayObserver:
    """The observer as RelayService adds it, on the fake."""
    obs = observe.RelayObserver(relay)
    obs.setServiceParent(relay)
    return obs


def started(relay: FakeRelay) -> observe.RelayObserver:
    obs = attach(relay)
    relay.startService()
    return obs


# --- health -----------------------------------------------------------------------------


# (seconds to advance, is the first peer connected afterwards, expected degraded)
NO_PEER_STEPS = [
    (0, False, False),  # started without a peer: the clock starts now
    (9, False, False),
    (1, False, True),  # 10 s without a peer
    (5, False, True),
    (1, True, False),  # connected: ok at once
    (30, True, False),
    (1, False, False),  # lost again: a new 10 s begin
    (9.5, False, False),
    (0.5, False, True),
]


def test_no_peer_degrades_after_the_configured_time_and_recovers(relay: FakeRelay) -> None:
    obs = started(relay)
    peer = relay.outputs["core"].peers[0]
    try:
        for i, (advance, connected, degraded) in enumerate(NO_PEER_STEPS):
            relay.reactor.advance(advance)
            peer.connected = connected
            obs.tick()  # what the LoopingCall does every second
            reasons = obs.health()
            assert bool(reasons) == degraded, (i, reasons)
            if degraded:
                assert reasons[0].startswith("forward core: no connected peer for ")
    finally:
        relay.stopService()
    assert not relay.reactor.getDelayedCalls()


def test_the_loop_samples_peers_between_scrapes(relay: FakeRelay) -> None:
    obs = started(relay)
    peer = relay.outputs["core"].peers[1]
    peer.connected = True
    relay.reactor.advance(1)  # the LoopingCall runs
    assert obs.no_peer_since == {}
    peer.connected = False
    relay.reactor.advance(1)
    assert obs.no_peer_since == {"core": T0 + 2}
    relay.reactor.advance(30)
    assert obs.health() == ["forward core: no connected peer for 30s"]
    relay.stopService()
    assert not relay.reactor.getDelayedCalls()


def test_spool_threshold_and_writer_error(relay: FakeRelay) -> None:
    obs = started(relay)
    relay.outputs["core"].peers[0].connected = True
    relay.spools["core"].depth_bytes = 1024 * 1024
    assert obs.health() == []  # at the threshold: still ok
    relay.spools["core"].depth_bytes += 1
    relay.writer.last_error = "[Errno 28] No space left on device"
    assert obs.health() == [
        "forward core: spool holds 1048577 bytes not yet delivered (threshold 1048576)",
        "staging: writes failing: [Errno 28] No space left on device",
    ]
    relay.stopService()


def _closed(state: Path, hour: int, created: float) -> Path:
    d = state / "staging" / "closed"
    d.mkdir(parents=True, exist_ok=True)
    p = d / file_name(hour, part_name(created))
    p.write_bytes(b"x" * 100)
    return p


def test_archive_lag_only_with_the_archive_enabled(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(T0)
    hour = int(T0) // 3600 - 3  # ended 2 h + 1600 s ago
    for archive, degraded in ((False, False), (True, True)):
        cfg = make_config(tmp_path, archive=archive)
        relay = FakeRelay(cfg, clock)
        relay.outputs["core"].peers[0].connected = True
        obs = started(relay)
        _closed(cfg.relay.state_dir, hour, hour * 3600 + 10)
        reasons = obs.health()
        relay.stopService()
        assert bool(reasons) == degraded, reasons
    assert reasons == [
        f"archive: {file_name(hour, part_name(hour * 3600 + 10))} waiting for 2h26m "
        "(1 closed files, 100 bytes not archived)"
    ]


def test_a_late_part_counts_from_its_creation(tmp_path: Path) -> None:
    hour = int(T0) // 3600 - 20
    created = T0 - 600  # a late message for an hour 20 h ago, closed recently
    name = file_name(hour, part_name(created))
    assert ready_since(name) == pytest.approx(created)
    assert ready_since(file_name(hour, part_name(hour * 3600 + 5))) == (hour + 1) * 3600
    assert ready_since("not-a-staging-file") is None
    state = tmp_path / "state"
    _closed(state, hour, created)
    scan = scan_staging(state / "staging")
    assert scan.closed_files == 1 and scan.oldest_closed == name
    assert archive_reason(scan, T0, HealthConfig(archive_lag=3600)) is None


def test_scan_counts_open_and_closed_and_picks_the_longest_waiting(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    assert scan_staging(staging) == StagingScan()  # no directories yet
    h = hour_index("2026-05-28T10")
    _closed(tmp_path, h, h * 3600 + 1)
    _closed(tmp_path, h - 5, T0)  # late part of an older hour: sorts first, waits less
    (staging / "open").mkdir()
    (staging / "open" / file_name(h + 1, part_name(T0))).write_bytes(b"y" * 7)
    (staging / "closed" / "README").write_text("not staging")
    scan = scan_staging(staging)
    assert (scan.open_files, scan.open_bytes, scan.closed_files, scan.closed_bytes) == (
        1,
        7,
        2,
        200,
    )
    assert scan.oldest_closed == file_name(h, part_name(h * 3600 + 1))
    assert scan.oldest_ready == (h + 1) * 3600


def test_render_health() -> None:
    assert render_health([]) == (200, b"ok\n")
    assert render_health(["a", "b"]) == (503, b"degraded: a; b\n")


@given(st.floats(min_value=0, max_value=10 * 365 * 86400))
def test_duration_text_is_short_and_never_fails(seconds: float) -> None:
    text = observe._duration(seconds)
    assert 2 <= len(text) <= 12 and text[-1] in "sm"


# --- metrics ----------------------------------------------------------------------------


def _scrape(obs: observe.RelayObserver) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    text = generate_latest(obs.registry).decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_collector_exposes_counters_and_state(relay: FakeRelay) -> None:
    obs = started(relay)
    m = relay.metrics
    m.inc("messages_received_total", 100, listener="tcp-in")
    m.inc("bytes_received_total", 4200, listener="tcp-in")
    m.inc("framing_errors_total", 3, listener="tcp-in", kind="length_too_long")
    m.inc("forward_retries_total", 2, output="core", peer="10.0.0.1:2514")
    m.inc("input_pauses_total")
    lc_tcp, lc_udp = relay.config.listen
    relay.listeners.ports = [
        BoundListener(lc_tcp, FakePort(5514), FakeListener(4)),
        BoundListener(lc_udp, FakePort(5514), FakeListener(None)),
    ]
    out = relay.outputs["core"]
    out.peers[1].connected = True
    out.peers[0].failures = 2
    out.feeder.delivered, out.feeder.in_flight = 90, 10
    spool = relay.spools["core"]
    spool.depth_records, spool.depth_bytes, spool.oldest_time = 10, 420, T0 - 7
    spool.corrupt, spool.deleted = 1, 2
    relay.writer.pending = 5
    got = _scrape(obs)
    tcp = (("listener", "tcp-in"), ("transport", "tcp"))
    udp = (("listener", "udp:5514"), ("transport", "udp"))
    assert got["syslog_relay_messages_received_total"] == {tcp: 100, udp: 0}
    assert got["syslog_relay_bytes_received_total"][tcp] == 4200
    assert got["syslog_relay_connections_opened_total"] == {tcp: 0}  # UDP has none
    framing = got["syslog_relay_framing_errors_total"]
    assert framing[(("kind", "length_too_long"), *tcp)] == 3
    assert len(framing) == 2 * len(FRAMING_KINDS) and sum(framing.values()) == 3  # at 0 from start
    assert got["syslog_relay_forward_retries_total"] == {
        (("output", "core"), ("peer", "10.0.0.1:2514")): 2,
        (("output", "core"), ("peer", "10.0.0.2:2514")): 0,
    }
    assert got["syslog_relay_input_pauses_total"] == {(): 1}
    assert got["syslog_relay_messages_forwarded_total"] == {(("output", "core"),): 0}
    assert got["syslog_relay_connections_open"] == {tcp: 4}
    core = (("output", "core"),)
    assert got["syslog_relay_spool_records"] == {core: 10}
    assert got["syslog_relay_spool_bytes"] == {core: 420}
    assert got["syslog_relay_spool_oldest_age_seconds"] == {core: 7}
    assert got["syslog_relay_forward_delivered_total"] == {core: 90}
    assert got["syslog_relay_spool_corrupt_records_total"] == {core: 1}
    assert got["syslog_relay_spool_segments_deleted_total"] == {core: 2}
    assert got["syslog_relay_spool_dropped_total"] == {
        (("output", "core"), ("policy", p)): 0 for p in SPOOL_DROP_POLICIES
    }
    assert got["syslog_relay_forward_ack_latency_seconds_count"] == {core: 0}
    assert got["syslog_relay_fsync_duration_seconds_count"] == {(): 0}
    assert got["syslog_relay_forward_in_flight"] == {core: 10}
    assert got["syslog_relay_forward_connected_peers"] == {core: 1}
    assert got["syslog_relay_forward_peer_up"] == {
        (("output", "core"), ("peer", "10.0.0.1:2514")): 0,
        (("output", "core"), ("peer", "10.0.0.2:2514")): 1,
    }
    assert (
        got["syslog_relay_forward_peer_failures"][(("output", "core"), ("peer", "10.0.0.1:2514"))]
        == 2
    )
    assert got["syslog_relay_writer_pending_bytes"] == {(): 5}
    assert got["syslog_relay_healthy"] == {(): 1}
    assert got["syslog_relay_build_info"] == {
        (("relay_id", "edge1"), ("version", observe.__version__)): 1
    }
    assert got["syslog_relay_start_time_seconds"] == {(): T0}
    assert "process_cpu_seconds_total" in got
    out.peers[1].connected = False
    relay.reactor.pump([1] * 11)  # the loop samples every second
    got = _scrape(obs)
    assert got["syslog_relay_healthy"] == {(): 0}
    assert got["syslog_relay_forward_no_peer_seconds"] == {core: 10}  # sampled each second
    relay.stopService()


def test_counter_families_merge_label_sets() -> None:
    m = Metrics()
    m.inc("spool_dropped_total", 2, output="a", policy="drop-newest")
    m.inc("spool_dropped_total", 1, output="a")
    fams = {f.name: f for f in counter_families(m.counters, "p_")}
    # Without a topology only the unlabelled counters are seeded.
    assert "p_input_pauses" in fams and "p_messages_received" not in fams
    samples = {tuple(sorted(s.labels.items())): s.value for s in fams["p_spool_dropped"].samples}
    assert samples == {
        (("output", "a"), ("policy", "")): 1,
        (("output", "a"), ("policy", "drop-newest")): 2,
    }


def test_an_unregistered_name_cannot_create_a_series() -> None:
    m = Metrics()
    with pytest.raises(UnknownMetric):
        m.inc("mesages_received_total", listener="x")
    with pytest.raises(UnknownMetric):
        m.histogram("fsync_durations_seconds")
    assert not m.counters


# Every way the code names a series: metrics.inc("x", ...), a bound inc("x", ...),
# callFromThread(self._metrics.inc, "x", ...), counters[("x", ...)] (observe's spool
# counters), histogram("x", ...).
_COUNTED = re.compile(r'(?:\binc\(|\.inc,|counters\[\()\s*"([a-z_]+)"')
_HISTOGRAMS = re.compile(r'\bhistogram\(\s*"([a-z_]+)"')


def test_every_counted_name_is_registered() -> None:
    """Static: each name the code counts (relay/ and archive/, subpackages included) is in
    the registry with a real HELP line, and each registered name is counted somewhere."""
    root = Path(__file__).resolve().parent.parent
    names: set[str] = set()
    histograms: set[str] = set()
    for path in [*root.glob("relay/**/*.py"), *root.glob("archive/**/*.py")]:
        text = path.read_text()
        names |= set(_COUNTED.findall(text))
        histograms |= set(_HISTOGRAMS.findall(text))
    assert len(names) > 60 and "link_acks_total" in names  # relay/link/ is searched too
    assert names - set(COUNTERS) == set()
    assert set(COUNTERS) - names == set()  # no registered name that nothing counts
    assert histograms == set(HISTOGRAMS)
    for name, spec in COUNTERS.items():
        assert name.endswith("_total"), name
        assert len(spec.help) > 20 and not spec.help.startswith("Relay counter"), name
    for name, hspec in HISTOGRAMS.items():
        assert len(hspec.help) > 20, name


def test_every_series_is_exported_at_zero_from_the_start(
    tmp_path: Path,
    pki: PKI,  # noqa: F811
) -> None:
    """A relay with every transport: each registered counter has a series before any event,
    and every HELP line is real."""
    data: dict[str, Any] = {
        "relay": {"id": "edge1", "state_dir": str(tmp_path / "state")},
        "listen": [
            {"address": f"127.0.0.1:{5514 + i}", "transport": t, "name": t}
            for i, t in enumerate(("tcp", "udp", "tls", "relp", "relp+tls", "link+tls"))
        ],
        "tls": server_tls(pki, permitted_peers=["*.clients.test"]),
        "forward": [
            {"name": "core", "peers": ["10.0.0.1:2514"], "transport": "relp"},
            {"name": "plain", "peers": ["10.0.0.2:514"], "transport": "tcp"},
            {
                "name": "link",
                "peers": ["10.0.0.3:2515"],
                "transport": "link+tls",
                "tls_ca": str(pki.ca),
            },
        ],
        "metrics": {"enabled": False},
    }
    relay = FakeRelay(parse(data), Clock())
    obs = started(relay)
    text = generate_latest(obs.registry).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in COUNTERS:
        fam = fams[observe.PREFIX + name.removesuffix("_total")]
        assert fam.samples, name
        assert all(s.value == 0 for s in fam.samples), name
    for fam in fams.values():
        assert fam.documentation and "Relay counter" not in fam.documentation, fam.name
    relp_in = {s.labels["listener"] for s in fams["syslog_relay_relp_acks"].samples}
    assert relp_in == {"relp", "relp+tls"}
    relp_errors = {
        (s.labels["listener"], s.labels["output"])
        for s in fams["syslog_relay_relp_protocol_errors"].samples
    }
    assert relp_errors == {("relp", ""), ("relp+tls", ""), ("", "core")}
    assert {s.labels["output"] for s in fams["syslog_relay_messages_forwarded"].samples} == {
        "core",
        "plain",
        "link",
    }
    relay.stopService()


# --- status and the HTTP endpoints --------------------------------------------------------


def _get(obs: observe.RelayObserver, path: bytes) -> tuple[int, bytes, bytes]:
    s = observe.site(obs)
    req = DummyRequest([path])
    res = s.resource.getChildWithDefault(path, req)
    body = res.render(req)
    return req.responseCode or 200, req.responseHeaders.getRawHeaders(b"content-type")[0], body


def test_endpoints(relay: FakeRelay) -> None:
    obs = started(relay)
    lc = relay.config.listen[0]
    relay.listeners.ports = [BoundListener(lc, FakePort(40001), FakeListener(2))]
    relay.metrics.inc("messages_received_total", 7, listener="tcp-in")
    out = relay.outputs["core"]
    out.peers[0].failures, out.peers[0].retry_at = 3, T0 + 4
    out.peers[1].connecting = True
    relay.spools["core"].depth_records = 7
    relay.spools["core"].depth_bytes = 300
    relay.spools["core"].oldest_time = T0 - 2.5
    Logger(namespace="test").warn("peer {p} down", p="x")
    Logger(namespace="test").info("not kept")
    relay.reactor.advance(1)

    code, ctype, body = _get(obs, b"status")
    assert (code, ctype) == (200, b"application/json")
    st_ = json.loads(body)
    assert st_["daemon"] == "syslog-relay" and st_["relay_id"] == "edge1"
    assert st_["uptime"] == 1
    assert st_["listeners"] == [
        {
            "name": "tcp-in",
            "address": "127.0.0.1:5514",
            "port": 40001,
            "transport": "tcp",
            "connections_open": 2,
            "connections_opened": 0,
            "connections_refused": 0,
            "messages": 7,
            "bytes": 0,
            "framing_errors": 0,
        }
    ]
    (core,) = st_["outputs"]
    assert core["backlog"] == {"records": 7, "bytes": 300, "oldest_age": 3.5}
    assert core["state"] == "no peer" and core["no_peer_for"] == 1
    assert [(p["peer"], p["state"], p["failures"], p["retry_in"]) for p in core["peers"]] == [
        ("10.0.0.1:2514", "backoff", 3, 3),
        ("10.0.0.2:2514", "connecting", 0, 0),
    ]
    assert st_["health"] == {"status": "ok", "reasons": []}
    assert [e["text"] for e in st_["last_errors"]] == ["peer x down"]
    assert st_["staging"]["closed_files"] == 0

    code, ctype, body = _get(obs, b"health")
    assert (code, body) == (200, b"ok\n")
    relay.reactor.advance(10)
    code, _, body = _get(obs, b"health")
    assert (code, body) == (503, b"degraded: forward core: no connected peer for 11s\n")
    # Not ready, but alive: a liveness probe must not restart a spooling edge.
    assert _get(obs, b"live") == (200, b"text/plain; charset=utf-8", b"alive\n")
    relay.writer.running = False
    code, _, body = _get(obs, b"live")
    assert (code, body) == (503, b"dead: staging: the durable writer thread is not running\n")
    relay.writer.running = True

    code, ctype, body = _get(obs, b"metrics")
    assert code == 200 and ctype.startswith(b"text/plain")
    assert b"syslog_relay_messages_received_total" in body
    relay.stopService()
    Logger(namespace="test").error("after stop")
    assert "after stop" not in [e["text"] for e in obs.errors.events]


def test_status_line_for_systemctl_status(tmp_path: Path) -> None:
    clock = Clock()
    clock.advance(T0)
    relay = FakeRelay(make_config(tmp_path, archive=True), clock)
    sent: list[str] = []
    obs = attach(relay)
    obs.status_sink = sent.append
    relay.startService()
    relay.outputs["core"].peers[0].connected = True
    relay.spools["core"].depth_records, relay.spools["core"].depth_bytes = 3, 2048
    relay.metrics.inc("messages_received_total", 2500, listener="tcp-in")
    clock.advance(observe.STATUS_INTERVAL)
    assert sent == [
        "250 msg/s in; core: 1/2 peers, backlog 3 records (2.0 KiB); "
        "archive lag 0.0s (0 files, 0 B); ok"
    ]
    relay.outputs["core"].peers[0].connected = False
    clock.pump([1.0] * 20)
    assert sent[-1].startswith("0 msg/s in; core: 0/2 peers, backlog 3 records")
    assert "; degraded: forward core: no connected peer for " in sent[-1]
    relay.stopService()
    assert len(sent) == 3 and not clock.getDelayedCalls()


def test_attach_to_a_real_service(tmp_path: Path) -> None:
    from relay.service import make_service

    clock = Clock()
    service = make_service(make_config(tmp_path), clock)
    obs: Any = service.getServiceNamed("observe")
    assert obs is service.observer  # type: ignore[attr-defined]
    assert obs.relay is service and not obs.running


def test_failing_spool_writes_and_a_dead_writer_degrade_health(relay: FakeRelay) -> None:
    obs = started(relay)
    relay.outputs["core"].peers[0].connected = True
    assert obs.health() == []
    relay.writer.spool_errors = {"core": "writes failing: [Errno 28] No space left on device"}
    relay.writer.failure = "RuntimeError: a bug"
    assert obs.health() == [
        "spool core: writes failing: [Errno 28] No space left on device",
        "durable writer stopped: RuntimeError: a bug",
    ]
    relay.stopService()


def test_a_spools_corrupt_records_and_deleted_segments_reach_metrics(
    relay: FakeRelay, tmp_path: Path
) -> None:
    """The spool counts them itself (Spool.snapshot); /metrics shows them per output."""
    from relay.disk.spool import RECORD_HEADER_SIZE, SEGMENT_HEADER_SIZE, Spool
    from tests.test_spool import payload, read_all, seg_files

    spool = Spool(tmp_path / "sp", 64 * 1024)  # small segments: a few records each
    spool.open()
    spool.append([payload(i, 20) for i in range(6)], 7.0)
    rec_size = RECORD_HEADER_SIZE + len(payload(0, 20))
    with open(seg_files(tmp_path / "sp")[-1], "r+b") as f:
        f.seek(SEGMENT_HEADER_SIZE + 3 * rec_size + 30)
        f.write(b"!")
    for i in range(40):
        spool.append([payload(100 + i, 1000)], 8.0)
    seqs = [r.seq for r in read_all(spool)]
    assert 4 not in seqs and len(seqs) == 45  # the corrupt record was skipped
    spool.ack(seqs[-1])
    relay.spools["core"] = spool  # type: ignore[assignment]
    obs = started(relay)
    try:
        got = _scrape(obs)
    finally:
        relay.stopService()
        spool.close()
    core = (("output", "core"),)
    assert got["syslog_relay_spool_corrupt_records_total"] == {core: 1}
    assert got["syslog_relay_spool_segments_deleted_total"][core] > 0
    assert got["syslog_relay_spool_records"] == {core: 0}
