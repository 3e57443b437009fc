"""Metrics, health and status of the relay: /metrics, /health and /status on ``[metrics] address``.

Everything is computed when someone asks, in the reactor thread, from the
service's own objects: the hot path only bumps plain dict counters
(relay/ops/metrics.py) and never knows that it is observed. The one piece of state
kept here is "since when has this output had no connected peer", which a
LoopingCall samples every second, because no scrape may come while it lasts.

The staging scan and the health rules are plain functions shared with the
archiver (archive/observe.py), which serves the same three endpoints.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Site

from relay import __version__
from relay.config import Config, HealthConfig, ListenConfig
from relay.disk.guard import DiskGuard
from relay.disk.staging import SUFFIX, closed_dir, open_dir, parse_file_name, part_epoch
from relay.ops import systemd
from relay.ops.metrics import COUNTERS, HISTOGRAMS, Counter, HistogramSpec, Metrics
from relay.ops.snapshots import (
    BoundListener,
    ListenerSnapshot,
    PeerSnapshot,
    ReportingLedger,
    ReportingOutput,
    ReportingSpool,
    ReportingWriter,
)
from relay.ops.status import age
from relay.ops.status import size as _size

if TYPE_CHECKING:
    from twisted.internet.interfaces import IListeningPort
    from twisted.logger import ILogObserver, LogEvent
    from twisted.web import http
    from twisted.web.server import Request

    from relay.interfaces import IRelayReactor

log = Logger(namespace="relay.observe")

PREFIX = "syslog_relay_"
TICK = 1.0  # how often "no healthy peer since" is sampled
STATUS_INTERVAL = 10.0  # how often STATUS= (systemctl status) is refreshed under systemd
LAST_ERRORS = 20

# --- staging, as both daemons see it on disk --------------------------------------------


@dataclass(frozen=True)
class StagingScan:
    open_files: int = 0
    open_bytes: int = 0
    closed_files: int = 0
    closed_bytes: int = 0
    oldest_closed: str | None = None  # file name of the closed file waiting longest
    oldest_ready: float | None = None  # when it became ready for the archiver (epoch)

    def oldest_age(self, now: float) -> float:
        return max(0.0, now - self.oldest_ready) if self.oldest_ready is not None else 0.0

    def to_json(self, now: float) -> dict[str, object]:
        return {
            "open_files": self.open_files,
            "open_bytes": self.open_bytes,
            "closed_files": self.closed_files,
            "closed_bytes": self.closed_bytes,
            "oldest_closed": self.oldest_closed,
            "oldest_closed_age": round(self.oldest_age(now), 3)
            if self.oldest_ready is not None
            else None,
        }


def ready_since(name: str) -> float | None:
    """When a staging file could first be archived: the end of its hour, or, for a late
    part created after that, its creation. Counting from the hour alone would make one
    late message for yesterday look like a day of archive lag."""
    parsed = parse_file_name(name)
    if parsed is None:
        return None
    hour, part = parsed
    end = (hour + 1) * 3600.0
    created = part_epoch(part)
    return end if created is None else max(end, created)


def _dir_files(d: Path) -> Iterator[tuple[str, int]]:
    try:
        entries = list(os.scandir(d))
    except FileNotFoundError:
        return
    for e in entries:
        if not e.name.endswith(SUFFIX):
            continue
        try:
            yield e.name, e.stat().st_size
        except FileNotFoundError:
            continue  # archived or closed while we looked


def scan_staging(staging_dir: Path) -> StagingScan:
    """Count open and closed staging files; a directory listing, no file is read."""
    open_files = open_bytes = closed_files = closed_bytes = 0
    for _, size in _dir_files(open_dir(staging_dir)):
        open_files += 1
        open_bytes += size
    oldest: tuple[float, str] | None = None
    for name, size in _dir_files(closed_dir(staging_dir)):
        closed_files += 1
        closed_bytes += size
        ready = ready_since(name)
        if ready is not None and (oldest is None or (ready, name) < oldest):
            oldest = (ready, name)
    return StagingScan(
        open_files,
        open_bytes,
        closed_files,
        closed_bytes,
        oldest[1] if oldest else None,
        oldest[0] if oldest else None,
    )


# --- health rules -----------------------------------------------------------------------


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{seconds:.0f}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def no_peer_reason(output: str, since: float | None, now: float, cfg: HealthConfig) -> str | None:
    if since is None or now - since < cfg.no_peer_after:
        return None
    return f"forward {output}: no connected peer for {_duration(now - since)}"


def spool_reason(output: str, depth_bytes: int, cfg: HealthConfig) -> str | None:
    if depth_bytes <= cfg.spool_threshold:
        return None
    return (
        f"forward {output}: spool holds {depth_bytes} bytes not yet delivered "
        f"(threshold {cfg.spool_threshold})"
    )


def archive_reason(scan: StagingScan, now: float, cfg: HealthConfig) -> str | None:
    age = scan.oldest_age(now)
    if scan.oldest_ready is None or age <= cfg.archive_lag:
        return None
    return (
        f"archive: {scan.oldest_closed} waiting for {_duration(age)} "
        f"({scan.closed_files} closed files, {scan.closed_bytes} bytes not archived)"
    )


# --- last warnings and errors, for /status ----------------------------------------------


class LastErrors:
    """A log observer keeping the last warnings and errors (any thread may log)."""

    def __init__(self, size: int = LAST_ERRORS) -> None:
        self.events: deque[dict[str, object]] = deque(maxlen=size)

    def __call__(self, event: LogEvent) -> None:
        level = event.get("log_level")
        if level is None or level < LogLevel.warn:
            return
        text = formatEvent(dict(event)) if "log_format" in event else ""
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}: {failure.getErrorMessage()}" if text else failure.getErrorMessage()
        self.events.append(
            {
                "time": event.get("log_time"),
                "level": level.name,
                "namespace": event.get("log_namespace", ""),
                "text": text,
            }
        )

    def to_json(self) -> list[dict[str, object]]:
        return list(self.events)


# --- HTTP -------------------------------------------------------------------------------


class Observable:
    """What the endpoints need from a daemon.

    ``/live`` (liveness) says whether the process works at all: restart it if not.
    ``/health`` (readiness) says whether it does its job well right now: a spooling
    edge whose core is down is alive and should not be restarted, but is not ready.
    """

    registry: CollectorRegistry

    def live(self) -> list[str]:
        """Why the process should be restarted (empty: alive)."""
        return []

    def health(self) -> list[str]:
        raise NotImplementedError

    def status(self) -> dict[str, object]:
        raise NotImplementedError


def render_live(reasons: list[str]) -> tuple[int, bytes]:
    if not reasons:
        return 200, b"alive\n"
    return 503, ("dead: " + "; ".join(reasons) + "\n").encode()


def render_health(reasons: list[str]) -> tuple[int, bytes]:
    if not reasons:
        return 200, b"ok\n"
    return 503, ("degraded: " + "; ".join(reasons) + "\n").encode()


def render_status(status: Mapping[str, object]) -> bytes:
    return json.dumps(status, indent=2, sort_keys=True, default=str).encode() + b"\n"


class _Endpoint(Resource):
    isLeaf = True

    def __init__(self, render: Callable[[], tuple[int, str, bytes]]) -> None:
        super().__init__()
        self._render = render

    def render_GET(self, request: Request) -> bytes:
        code, ctype, body = self._render()
        request.setResponseCode(code)
        request.setHeader(b"content-type", ctype.encode())
        request.setHeader(b"cache-control", b"no-store")
        return body


class _QuietSite(Site):
    noisy = False

    def log(self, request: http.Request) -> None:
        """No access log: a scrape every 15 s would drown the relay's own messages."""


def site(target: Observable) -> Site:
    def metrics() -> tuple[int, str, bytes]:
        return 200, CONTENT_TYPE_LATEST, generate_latest(target.registry)

    def health() -> tuple[int, str, bytes]:
        code, body = render_health(target.health())
        return code, "text/plain; charset=utf-8", body

    def live() -> tuple[int, str, bytes]:
        code, body = render_live(target.live())
        return code, "text/plain; charset=utf-8", body

    def status() -> tuple[int, str, bytes]:
        return 200, "application/json", render_status(target.status())

    root = Resource()
    root.putChild(b"metrics", _Endpoint(metrics))
    root.putChild(b"live", _Endpoint(live))
    root.putChild(b"health", _Endpoint(health))
    root.putChild(b"status", _Endpoint(status))
    return _QuietSite(root)


# --- the relay --------------------------------------------------------------------------

Series = tuple[str, tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class Topology:
    """The configured names the labelled series range over (for seeding them at 0)."""

    listeners: tuple[tuple[str, str], ...] = ()  # (name, transport)
    outputs: tuple[tuple[str, str, tuple[str, ...]], ...] = ()  # (name, transport, peers)
    selectors: tuple[str, ...] = ("staging",)  # "staging", "forward.NAME", "drop.RULE"


def selector_names(cfg: Config) -> tuple[str, ...]:
    """The ``selector`` label's values: staging, every output and every drop rule."""
    return (
        "staging",
        *(f"forward.{fc.name}" for fc in cfg.forward),
        *(f"drop.{name}" for name, _ in cfg.drop),
    )


def seed_series(spec: Counter, topo: Topology) -> Iterator[dict[str, str]]:
    """Every label set of a counter this configuration can produce (the registry's domains)."""

    def ok(transport: str) -> bool:
        return spec.transports is None or transport in spec.transports

    listeners = [n for n, t in topo.listeners if ok(t)]
    outputs = [(n, peers) for n, t, peers in topo.outputs if ok(t)]
    if spec.transports is not None and not listeners and not outputs:
        return  # e.g. TLS refusals without a TLS listener
    if spec.either:
        for n in listeners:
            yield {"listener": n}
        for n, _ in outputs:
            yield {"output": n}
        return
    sets: list[dict[str, str]] = [{}]
    for label in spec.labels:
        if label == "listener":
            sets = [dict(s, listener=n) for s in sets for n in listeners]
        elif label == "output":
            sets = [dict(s, output=n) for s in sets for n, _ in outputs]
        elif label == "selector":
            sets = [dict(s, selector=n) for s in sets for n in topo.selectors]
        elif label == "peer":
            peers = dict(outputs)
            sets = [dict(s, peer=p) for s in sets for p in peers.get(s.get("output", ""), ())]
        else:
            sets = [dict(s, **{label: v}) for s in sets for v in spec.values.get(label, ())]
    yield from sets


def counter_families(
    counters: Mapping[Series, int],
    prefix: str,
    extra_labels: Callable[[dict[str, str]], dict[str, str]] = dict,
    topology: Topology | None = None,
) -> list[Metric]:
    """One counter family per registered name (relay.ops.metrics.COUNTERS), every series the
    ``topology`` can produce present from the start, at 0 until counted."""
    values: dict[Series, int] = {}
    if topology is not None:
        for name, spec in COUNTERS.items():
            for labels in seed_series(spec, topology):
                values[(name, tuple(sorted(labels.items())))] = 0
    else:
        for name, spec in COUNTERS.items():
            if not spec.labels:
                values[(name, ())] = 0
    values.update(counters)
    by_name: dict[str, list[tuple[dict[str, str], int]]] = {}
    for (name, label_items), value in values.items():
        by_name.setdefault(name, []).append((extra_labels(dict(label_items)), value))
    out: list[Metric] = []
    for name in sorted(by_name):
        spec = COUNTERS[name]
        rows = by_name[name]
        keys = list(spec.labels)
        if "listener" in keys:
            keys.append("transport")
        keys += sorted({k for labels, _ in rows for k in labels} - set(keys))
        base = name[: -len("_total")] if name.endswith("_total") else name
        fam = CounterMetricFamily(prefix + base, spec.help, labels=keys)
        merged: dict[tuple[str, ...], int] = {}
        for label_set, value in rows:
            row = tuple(label_set.get(k, "") for k in keys)
            merged[row] = merged.get(row, 0) + value
        for row, value in sorted(merged.items()):
            fam.add_metric(list(row), value)
        out.append(fam)
    return out


def histogram_families(
    metrics: Metrics, prefix: str, specs: Mapping[str, HistogramSpec] = HISTOGRAMS
) -> list[Metric]:
    out: list[Metric] = []
    for name, spec in sorted(specs.items()):
        if not spec.labels:
            metrics.histogram(name)  # one series: there from the start
        fam = HistogramMetricFamily(prefix + name, spec.help, labels=list(spec.labels))
        for (hname, labels), h in metrics.histogram_items():
            if hname != name:
                continue
            buckets, total = h.snapshot()
            d = dict(labels)
            fam.add_metric([d.get(k, "") for k in spec.labels], buckets, total)
        out.append(fam)
    return out


def _udp_drops(listeners: Iterable[tuple[ListenConfig, ListenerSnapshot]]) -> Metric:
    """Datagrams the kernel dropped on each UDP listener's socket (buffer full)."""
    fam = CounterMetricFamily(
        PREFIX + "udp_receive_drops",
        "Datagrams the kernel dropped on a UDP listener's socket, its receive buffer full "
        "(/proc/net/udp).",
        labels=["listener"],
    )
    for lc, snap in listeners:
        if lc.transport == "udp" and snap.receive_drops is not None:
            fam.add_metric([lc.name], snap.receive_drops)
    return fam


def _peer_state(peer: PeerSnapshot, now: float) -> str:
    if peer.connected:
        return "connected"
    if peer.connecting:
        return "connecting"
    if peer.failures and peer.retry_at > now:
        return "backoff"
    return "idle"


class _Listeners(Protocol):
    @property
    def ports(self) -> Sequence[BoundListener]: ...


class ObservedRelay(Protocol):
    """What the observer reads of the relay: its configuration, counters and components,
    each of which reports through its ``snapshot()`` (relay.ops.snapshots)."""

    @property
    def config(self) -> Config: ...

    @property
    def reactor(self) -> IRelayReactor: ...

    @property
    def metrics(self) -> Metrics: ...

    @property
    def listeners(self) -> _Listeners: ...

    @property
    def spools(self) -> Mapping[str, ReportingSpool]: ...

    @property
    def outputs(self) -> Mapping[str, ReportingOutput]: ...

    @property
    def writer(self) -> ReportingWriter: ...

    @property
    def disk(self) -> DiskGuard | None: ...

    @property
    def link(self) -> ReportingLedger | None: ...


class RelayObserver(Service, Observable):
    """Serves the endpoints of one RelayService and tracks its outputs' peers."""

    name = "observe"

    def __init__(
        self,
        relay: ObservedRelay,
        tick: float = TICK,
        status_sink: Callable[[str], object] | None = None,
        status_interval: float = STATUS_INTERVAL,
    ) -> None:
        self.relay = relay
        self.reactor = relay.reactor
        self.started_at = float(self.reactor.seconds())
        self.no_peer_since: dict[str, float] = {}
        self.errors = LastErrors()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(RelayCollector(self))
        ProcessCollector(registry=self.registry)
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.reactor
        self._tick = tick
        self.port: IListeningPort | None = None
        # STATUS= for systemctl status: sent only under systemd (NOTIFY_SOCKET).
        if status_sink is None and os.environ.get("NOTIFY_SOCKET"):
            status_sink = systemd.notify_status
        self.status_sink = status_sink
        self._status_loop = LoopingCall(self.send_status)
        self._status_loop.clock = self.reactor
        self._status_interval = status_interval
        self._last_rate: tuple[float, int] | None = None  # (when, messages received)

    # --- lifecycle

    def startService(self) -> None:
        super().startService()
        globalLogPublisher.addObserver(cast("ILogObserver", self.errors))
        self._loop.start(self._tick, now=True)
        if self.status_sink is not None:
            self._last_rate = (
                self.reactor.seconds(),
                self.relay.metrics.get("messages_received_total"),
            )
            self._status_loop.start(self._status_interval, now=False)
        mc = self.relay.config.metrics
        if not mc.enabled:
            return
        host, port = mc.endpoint
        try:
            # Twisted's stubs type Site's protocol apart from ServerFactory's generic one.
            self.port = self.reactor.listenTCP(port, site(self), interface=host)  # type: ignore[arg-type]
        except CannotListenError as exc:
            # Not fatal: losing the dashboards must never stop the logs.
            log.error(
                "metrics.address: cannot listen on {address}: {error}; "
                "no /metrics, /health or /status",
                address=mc.address,
                error=str(exc.socketError),
            )
            return
        log.info("metrics, health and status on http://{address}/", address=mc.address)

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self._status_loop.running:
            self._status_loop.stop()
        globalLogPublisher.removeObserver(cast("ILogObserver", self.errors))
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        stop: Callable[[], object] = port.stopListening
        return cast("defer.Deferred[None]", defer.maybeDeferred(stop))

    # --- state

    def tick(self) -> None:
        """Sample each output: remember when it last went without a connected peer."""
        now = self.reactor.seconds()
        outputs = self.relay.outputs
        for name in list(self.no_peer_since):
            if name not in outputs:
                del self.no_peer_since[name]
        for name, out in outputs.items():
            if out.snapshot().connected_peers:
                self.no_peer_since.pop(name, None)
            else:
                self.no_peer_since.setdefault(name, now)

    def staging(self) -> StagingScan:
        return scan_staging(self.relay.config.staging_dir)

    def status_line(self) -> str:
        """One line of live figures for ``systemctl status`` (STATUS=)."""
        relay = self.relay
        now = self.reactor.seconds()
        received = relay.metrics.get("messages_received_total")
        parts = []
        if self._last_rate is not None and now > self._last_rate[0]:
            rate = (received - self._last_rate[1]) / (now - self._last_rate[0])
            parts.append(f"{rate:.0f} msg/s in")
        else:
            parts.append(f"{received} msg in")
        self._last_rate = (now, received)
        for name, spool in sorted(relay.spools.items()):
            out = relay.outputs.get(name)
            snap = spool.snapshot()
            o = out.snapshot() if out is not None else None
            peers = f"{o.connected_peers}/{len(o.peers)} peers" if o else "removed"
            parts.append(f"{name}: {peers}, backlog {snap.records} records ({_size(snap.bytes)})")
        if relay.config.archive.enabled:
            scan = self.staging()
            parts.append(
                f"archive lag {age(scan.oldest_age(now))} "
                f"({scan.closed_files} files, {_size(scan.closed_bytes)})"
            )
        reasons = self.health()
        parts.append(f"degraded: {reasons[0]}" if reasons else "ok")
        return "; ".join(parts)

    def send_status(self) -> None:
        if self.status_sink is not None:
            self.status_sink(self.status_line())

    def live(self) -> list[str]:
        # The reactor answered this request; the writer thread is the other half.
        if self.relay.writer.snapshot().running:
            return []
        return ["staging: the durable writer thread is not running"]

    def health(self) -> list[str]:
        self.tick()
        now = self.reactor.seconds()
        cfg = self.relay.config
        reasons: list[str] = []
        for name in sorted(self.relay.outputs):
            r = no_peer_reason(name, self.no_peer_since.get(name), now, cfg.health)
            if r:
                reasons.append(r)
        for name, spool in sorted(self.relay.spools.items()):
            r = spool_reason(name, spool.snapshot().bytes, cfg.health)
            if r:
                reasons.append(r)
        if cfg.archive.enabled:
            r = archive_reason(self.staging(), now, cfg.health)
            if r:
                reasons.append(r)
        writer = self.relay.writer.snapshot()
        if writer.last_error:
            reasons.append(f"staging: writes failing: {writer.last_error}")
        for name, why in sorted(writer.spool_errors.items()):
            reasons.append(f"spool {name}: {why}")
        if writer.failure:
            reasons.append(f"durable writer stopped: {writer.failure}")
        disk = self.relay.disk
        if disk is not None:
            reasons.extend(disk.reasons())
        return reasons

    def selectors(self) -> list[dict[str, object]]:
        """Each configured selector with its counts (relay.selection)."""
        cfg = self.relay.config
        m = self.relay.metrics
        names = [
            *(["staging"] if cfg.staging.select is not None else []),
            *(f"forward.{fc.name}" for fc in cfg.forward if fc.select is not None),
            *(f"drop.{name}" for name, _ in cfg.drop),
        ]
        return [
            {
                "selector": name,
                "selected": m.get("messages_selected_total", selector=name),
                "not_selected": m.get("messages_not_selected_total", selector=name),
            }
            for name in names
        ]

    def status(self) -> dict[str, object]:
        relay = self.relay
        cfg = relay.config
        now = self.reactor.seconds()
        m = relay.metrics
        reasons = self.health()
        writer = relay.writer.snapshot()
        listeners = []
        for lc, port, listener in list(relay.listeners.ports):
            listeners.append(
                {
                    "name": lc.name,
                    "address": lc.address,
                    "port": port.getHost().port,
                    "transport": lc.transport,
                    "connections_open": listener.snapshot().connections_open,
                    "connections_opened": m.get("connections_opened_total", listener=lc.name),
                    "connections_refused": m.get("connections_refused_total", listener=lc.name),
                    "messages": m.get("messages_received_total", listener=lc.name),
                    "bytes": m.get("bytes_received_total", listener=lc.name),
                    "framing_errors": m.get("framing_errors_total", listener=lc.name),
                }
            )
        outputs = []
        for name, spool in sorted(relay.spools.items()):
            out = relay.outputs.get(name)
            snap = spool.snapshot()
            oldest = snap.oldest_time
            entry: dict[str, object] = {
                "name": name,
                "configured": out is not None,
                "backlog": {
                    "records": snap.records,
                    "bytes": snap.bytes,
                    "oldest_age": round(max(0.0, now - oldest), 3) if oldest else None,
                },
                "forwarded": m.get("messages_forwarded_total", output=name),
                "dropped": m.get("spool_dropped_total", output=name),
            }
            if out is not None:
                o = out.snapshot()
                since = self.no_peer_since.get(name)
                entry.update(
                    transport=o.transport,
                    mode=o.mode,
                    state="ok" if o.connected_peers else "no peer",
                    no_peer_for=round(now - since, 3) if since is not None else None,
                    in_flight=o.in_flight,
                    delivered=o.delivered,
                    peers=[
                        {
                            "peer": p.label,
                            "state": _peer_state(p, now),
                            "failures": p.failures,
                            "retry_in": round(max(0.0, p.retry_at - now), 3),
                            "retries": m.get("forward_retries_total", output=name, peer=p.label),
                        }
                        for p in o.peers
                    ],
                )
            outputs.append(entry)
        return {
            "daemon": "syslog-relay",
            "version": __version__,
            "relay_id": cfg.relay.id,
            "pid": os.getpid(),
            "now": now,
            "started": self.started_at,
            "uptime": round(now - self.started_at, 3),
            "health": {"status": "degraded" if reasons else "ok", "reasons": reasons},
            "listeners": listeners,
            "outputs": outputs,
            "staging": dict(self.staging().to_json(now), archive_enabled=cfg.archive.enabled),
            "selectors": self.selectors(),
            "writer": {"pending_bytes": writer.pending_bytes, "last_error": writer.last_error},
            "disk": relay.disk.snapshot() if relay.disk is not None else None,
            "last_errors": self.errors.to_json(),
        }


class RelayCollector:
    """prometheus_client collector reading the relay's counters and state at scrape time."""

    def __init__(self, observer: RelayObserver) -> None:
        self.observer = observer

    def collect(self) -> Iterable[Metric]:
        obs = self.observer
        relay = obs.relay
        cfg = relay.config
        now = obs.reactor.seconds()
        transports = {lc.name: lc.transport for lc in cfg.listen}

        def with_transport(labels: dict[str, str]) -> dict[str, str]:
            if "listener" in labels:
                labels["transport"] = transports.get(labels["listener"], "")
            return labels

        spools = {name: spool.snapshot() for name, spool in sorted(relay.spools.items())}
        outputs = {name: out.snapshot() for name, out in sorted(relay.outputs.items())}
        counters: dict[Series, int] = dict(relay.metrics.counters)
        for name, snap in spools.items():
            out_label = (("output", name),)
            counters[("spool_corrupt_records_total", out_label)] = snap.corrupt_records
            counters[("spool_segments_deleted_total", out_label)] = snap.segments_deleted
            if snap.lane_switches is not None:  # a link+tls output's laned spool
                counters[("link_lane_switches_total", out_label)] = snap.lane_switches
        topology = Topology(
            tuple((lc.name, lc.transport) for lc in cfg.listen),
            tuple(
                (fc.name, fc.transport, tuple(p.label for p in outputs[fc.name].peers))
                for fc in cfg.forward
                if fc.name in outputs
            ),
            selector_names(cfg),
        )
        for name in relay.outputs:
            relay.metrics.histogram("forward_ack_latency_seconds", output=name)
        yield from counter_families(counters, PREFIX, with_transport, topology)
        yield from histogram_families(relay.metrics, PREFIX)
        disk = relay.disk
        if disk is not None and disk.last is not None:
            yield GaugeMetricFamily(
                PREFIX + "state_free_bytes",
                "Free space on the state directory's filesystem (for unprivileged users).",
                value=disk.last.free,
            )
            yield GaugeMetricFamily(
                PREFIX + "state_free_floor_bytes",
                "Free-space floor: below it inputs pause ([relay] min_free, min_free_percent).",
                value=disk.floor,
            )
            yield GaugeMetricFamily(
                PREFIX + "inputs_paused_for_disk",
                "1 while the free-space floor holds the inputs (TCP/TLS/RELP paused, UDP dropped).",
                value=1 if disk.paused else 0,
            )

        yield InfoMetricFamily(
            "syslog_relay_build",
            "Version and relay id.",
            {"version": __version__, "relay_id": cfg.relay.id},
        )
        yield GaugeMetricFamily(
            PREFIX + "start_time_seconds", "When the relay started (epoch).", value=obs.started_at
        )

        conns = GaugeMetricFamily(
            PREFIX + "connections_open", "Open connections.", labels=["listener", "transport"]
        )
        listeners = [(b.config, b.listener.snapshot()) for b in relay.listeners.ports]
        for lc, ls in listeners:
            if ls.connections_open is not None:
                conns.add_metric([lc.name, lc.transport], ls.connections_open)
        yield conns
        yield _udp_drops(listeners)

        g: dict[str, GaugeMetricFamily] = {}

        def gauge(name: str, help_: str, labels: list[str]) -> GaugeMetricFamily:
            if name not in g:
                g[name] = GaugeMetricFamily(PREFIX + name, help_, labels=labels)
            return g[name]

        for name, snap in spools.items():
            oldest = snap.oldest_time
            gauge(
                "spool_records", "Spool records (received chunks) not yet delivered.", ["output"]
            ).add_metric([name], snap.records)
            gauge("spool_bytes", "Bytes in the spool not yet delivered.", ["output"]).add_metric(
                [name], snap.bytes
            )
            gauge(
                "spool_oldest_age_seconds",
                "Age of the oldest undelivered record (0 when the spool is empty).",
                ["output"],
            ).add_metric([name], max(0.0, now - oldest) if oldest else 0.0)
            gauge("spool_disk_bytes", "Spool segment files on disk.", ["output"]).add_metric(
                [name], snap.disk_bytes
            )
            for i, records in enumerate(snap.lane_records):  # link+tls: per lane
                gauge(
                    "spool_lane_records",
                    "A link+tls output's spool records not yet delivered, per lane.",
                    ["output", "lane"],
                ).add_metric([name, str(i + 1)], records)
        delivered = CounterMetricFamily(
            PREFIX + "forward_delivered",
            "Messages acknowledged (RELP) or settled (TCP/TLS): their spool records may go.",
            labels=["output"],
        )
        for name, o in outputs.items():
            delivered.add_metric([name], o.delivered)
            gauge(
                "forward_in_flight", "Records sent, not yet acknowledged.", ["output"]
            ).add_metric([name], o.in_flight)
            gauge(
                "forward_connected_peers", "Peers with a live connection.", ["output"]
            ).add_metric([name], o.connected_peers)
            since = obs.no_peer_since.get(name)
            gauge(
                "forward_no_peer_seconds",
                "How long the output has had no connected peer (0 while it has one).",
                ["output"],
            ).add_metric([name], now - since if since is not None else 0.0)
            for p in o.peers:
                gauge(
                    "forward_peer_up", "1 while connected to this peer.", ["output", "peer"]
                ).add_metric([name, p.label], 1 if p.connected else 0)
                gauge(
                    "forward_peer_failures",
                    "Consecutive failed attempts (0 once connected).",
                    ["output", "peer"],
                ).add_metric([name, p.label], p.failures)
        yield delivered
        yield from g.values()
        from relay.link.metrics import link_families

        ledger = relay.link.snapshot() if relay.link is not None else None
        yield from link_families(PREFIX, outputs, ledger)

        yield GaugeMetricFamily(
            PREFIX + "writer_pending_bytes",
            "Received bytes queued for the durable writer.",
            value=relay.writer.snapshot().pending_bytes,
        )
        scan = obs.staging()
        yield from staging_families(PREFIX, scan, now)
        yield GaugeMetricFamily(
            PREFIX + "healthy",
            "1 when /health says ok, 0 when degraded.",
            value=0 if obs.health() else 1,
        )


def staging_families(prefix: str, scan: StagingScan, now: float) -> list[Metric]:
    return [
        GaugeMetricFamily(
            prefix + "staging_open_files", "Staging files open.", value=scan.open_files
        ),
        GaugeMetricFamily(
            prefix + "staging_closed_files",
            "Closed staging files waiting for the archiver.",
            value=scan.closed_files,
        ),
        GaugeMetricFamily(
            prefix + "staging_closed_bytes",
            "Bytes of closed staging files waiting for the archiver.",
            value=scan.closed_bytes,
        ),
        GaugeMetricFamily(
            prefix + "staging_oldest_unarchived_age_seconds",
            "How long the oldest closed staging file has waited for the archiver (0: none).",
            value=scan.oldest_age(now),
        ),
    ]
