"""Metrics, health and status of the archiver on ``[metrics] archive_address``.

The archiver is a plain blocking loop (archive/daemon.py), so the endpoints
run in a small stdlib HTTP server thread. The loop reports what it did to an
``ArchiveStats`` (a few numbers under a lock); the staging backlog is read
from the directory at scrape time, as the relay does (relay/ops/observe.py, whose
health rule and staging scan this reuses).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NotRequired, TypedDict

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector
from twisted.logger import Logger, globalLogPublisher

from relay import __version__
from relay.config import Config
from relay.ops.metrics import UPLOAD_BUCKETS, Histogram
from relay.ops.observe import (
    LastErrors,
    Observable,
    archive_reason,
    render_health,
    render_live,
    render_status,
    scan_staging,
    staging_families,
)
from relay.ops.status import (
    StatusJSON,
    age,
    errors_lines,
    headline,
    last_upload,
    run,
    size,
    staging_lines,
)

log = Logger(namespace="syslog-archive")

PREFIX = "syslog_archive_"


class UploadStats(TypedDict):
    """ArchiveStats.snapshot(), as /status shows it under "uploads"."""

    done: int
    failed: int
    failures: dict[str, int]
    retries: int
    rejected: int
    chunks: dict[str, int]
    upload_bytes: int
    raw_bytes: int
    messages: int
    last_upload: float | None
    last_key: str | None
    last_failure: float | None
    last_error: str | None
    last_age: NotRequired[float | None]  # added by /status


class ArchiveStats:
    """What the upload loop did; written by the loop, read by the HTTP thread."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        self.clock = clock
        self.uploads = 0
        self.failures: dict[str, int] = {"transient": 0, "storage_refused": 0}
        self.retries = 0
        self.rejected = 0
        self.chunks: dict[str, int] = {"uploaded": 0, "reused": 0}
        self.upload_bytes = 0
        self.raw_bytes = 0
        self.messages = 0
        self.last_upload: float | None = None
        self.last_key: str | None = None
        self.last_failure: float | None = None
        self.last_error: str | None = None
        self.upload_seconds = Histogram(UPLOAD_BUCKETS)  # successful uploads only

    def uploaded(
        self,
        key: str,
        raw: int,
        compressed: int,
        count: int,
        reused: bool,
        seconds: float | None = None,
    ) -> None:
        if seconds is not None:
            self.upload_seconds.observe(seconds)
        with self._lock:
            self.uploads += 1
            self.chunks["reused" if reused else "uploaded"] += 1
            if not reused:
                self.upload_bytes += compressed
            self.raw_bytes += raw
            self.messages += count
            self.last_upload = self.clock()
            self.last_key = key
            self.last_error = None

    def failed(self, reason: str, kind: str = "transient") -> None:
        with self._lock:
            self.failures[kind] = self.failures.get(kind, 0) + 1
            self.last_failure = self.clock()
            self.last_error = reason

    def rejected_file(self, reason: str) -> None:
        with self._lock:
            self.rejected += 1
            self.last_error = reason

    def retrying(self) -> None:
        with self._lock:
            self.retries += 1

    def snapshot(self) -> UploadStats:
        with self._lock:
            return {
                "done": self.uploads,
                "failed": sum(self.failures.values()),
                "failures": dict(self.failures),
                "retries": self.retries,
                "rejected": self.rejected,
                "chunks": dict(self.chunks),
                "upload_bytes": self.upload_bytes,
                "raw_bytes": self.raw_bytes,
                "messages": self.messages,
                "last_upload": self.last_upload,
                "last_key": self.last_key,
                "last_failure": self.last_failure,
                "last_error": self.last_error,
            }


class ArchiveObserver(Observable):
    def __init__(
        self, cfg: Config, stats: ArchiveStats, clock: Callable[[], float] = time.time
    ) -> None:
        self.cfg = cfg
        self.stats = stats
        self.clock = clock
        self.started_at = clock()
        self.errors = LastErrors()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)

    def live(self) -> list[str]:
        # This HTTP thread answers; the upload loop runs in the main thread.
        if threading.main_thread().is_alive():
            return []
        return ["the upload loop (main thread) has ended"]

    def health(self) -> list[str]:
        r = archive_reason(scan_staging(self.cfg.staging_dir), self.clock(), self.cfg.health)
        return [r] if r else []

    def status(self) -> dict[str, object]:
        now = self.clock()
        reasons = self.health()
        up = self.stats.snapshot()
        up["last_age"] = round(now - up["last_upload"], 3) if up["last_upload"] else None
        a = self.cfg.archive
        return {
            "daemon": "syslog-archive",
            "version": __version__,
            "relay_id": self.cfg.relay.id,
            "pid": os.getpid(),
            "now": now,
            "started": self.started_at,
            "uptime": round(now - self.started_at, 3),
            "health": {"status": "degraded" if reasons else "ok", "reasons": reasons},
            "storage": {"bucket": a.bucket, "prefix": a.prefix, "endpoint": a.endpoint_url},
            "uploads": up,
            "staging": scan_staging(self.cfg.staging_dir).to_json(now),
            "last_errors": self.errors.to_json(),
        }


class _Collector:
    def __init__(self, obs: ArchiveObserver) -> None:
        self.obs = obs

    def collect(self) -> Iterable[Metric]:
        obs = self.obs
        s = obs.stats.snapshot()
        now = obs.clock()

        def counter(name: str, help_: str, value: float) -> Metric:
            return CounterMetricFamily(PREFIX + name, help_, value=value)

        yield InfoMetricFamily(
            "syslog_archive_build",
            "Version and relay id.",
            {"version": __version__, "relay_id": obs.cfg.relay.id},
        )
        yield GaugeMetricFamily(
            PREFIX + "start_time_seconds",
            "When the archiver started (epoch).",
            value=obs.started_at,
        )
        yield counter("uploads", "Staging files archived (chunk and manifest stored).", s["done"])
        fail = CounterMetricFamily(
            PREFIX + "upload_failures", "Failed upload attempts, by kind.", labels=["kind"]
        )
        for kind, n in sorted(s["failures"].items()):
            fail.add_metric([kind], n)
        yield fail
        yield counter(
            "upload_retries", "Upload rounds started again after a failure.", s["retries"]
        )
        yield counter("rejected_files", "Staging files moved to staging/rejected/.", s["rejected"])
        chunks = CounterMetricFamily(
            PREFIX + "chunks",
            "Chunks stored (uploaded) or found already stored by an earlier attempt (reused).",
            labels=["result"],
        )
        for result, n in sorted(s["chunks"].items()):
            chunks.add_metric([result], n)
        yield chunks
        yield counter("upload_bytes", "Compressed chunk bytes uploaded.", s["upload_bytes"])
        yield counter("raw_bytes", "Staging bytes archived (uncompressed).", s["raw_bytes"])
        yield counter("messages", "Messages archived.", s["messages"])
        buckets, total = obs.stats.upload_seconds.snapshot()
        upload = HistogramMetricFamily(
            PREFIX + "upload_duration_seconds",
            "Time to archive one staging file (compress, upload chunk and manifest), "
            "successful uploads only.",
        )
        upload.add_metric([], buckets, total)
        yield upload
        yield GaugeMetricFamily(
            PREFIX + "last_upload_timestamp_seconds",
            "When the last upload finished (epoch; 0: none since start).",
            value=s["last_upload"] or 0,
        )
        yield GaugeMetricFamily(
            PREFIX + "last_failure_timestamp_seconds",
            "When the last upload failed (epoch; 0: none since start).",
            value=s["last_failure"] or 0,
        )
        yield from staging_families(PREFIX, scan_staging(obs.cfg.staging_dir), now)
        yield GaugeMetricFamily(
            PREFIX + "healthy",
            "1 when /health says ok, 0 when degraded.",
            value=int(not obs.health()),
        )


class _Handler(BaseHTTPRequestHandler):
    observer: ArchiveObserver
    server_version = "syslog-archive"

    def do_GET(self) -> None:
        obs = self.observer
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            code, ctype, body = 200, CONTENT_TYPE_LATEST, generate_latest(obs.registry)
        elif path == "/live":
            code, body = render_live(obs.live())
            ctype = "text/plain; charset=utf-8"
        elif path == "/health":
            code, body = render_health(obs.health())
            ctype = "text/plain; charset=utf-8"
        elif path == "/status":
            code, ctype, body = 200, "application/json", render_status(obs.status())
        else:
            code, ctype = 404, "text/plain"
            body = b"not found: try /metrics, /live, /health, /status\n"
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """No access log."""


class ObserveServer:
    """The HTTP thread; ``stop()`` closes the socket."""

    def __init__(self, observer: ArchiveObserver, address: tuple[str, int]) -> None:
        handler = type("Handler", (_Handler,), {"observer": observer})
        self.observer = observer
        self.httpd = ThreadingHTTPServer(address, handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, name="observe-http", daemon=True
        )

    def start(self) -> None:
        globalLogPublisher.addObserver(self.observer.errors)  # type: ignore[arg-type]
        self.thread.start()

    def stop(self) -> None:
        globalLogPublisher.removeObserver(self.observer.errors)  # type: ignore[arg-type]
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


def start(cfg: Config, stats: ArchiveStats) -> ObserveServer | None:
    """Serve the endpoints if enabled; a port in use is logged, never fatal."""
    if not cfg.metrics.enabled:
        return None
    try:
        server = ObserveServer(ArchiveObserver(cfg, stats), cfg.metrics.archive_endpoint)
    except OSError as exc:
        log.error(
            "metrics.archive_address: cannot listen on {address}: {error}; "
            "no /metrics, /health or /status",
            address=cfg.metrics.archive_address,
            error=exc.strerror or str(exc),
        )
        return None
    server.start()
    log.info("metrics, health and status on http://{address}/", address=cfg.metrics.archive_address)
    return server


# --- STATUS= for systemctl status ------------------------------------------------------

STATUS_INTERVAL = 10.0


class StatusReporter:
    """Sends a line of live figures to systemd every ``interval`` seconds, from a thread
    (the upload loop may sit in one long upload)."""

    def __init__(
        self,
        cfg: Callable[[], Config],
        stats: ArchiveStats,
        send: Callable[[str], object],
        interval: float = STATUS_INTERVAL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.stats = stats
        self.send = send
        self.interval = interval
        self.clock = clock
        self._last = (clock(), stats.snapshot()["messages"])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status", daemon=True)

    def line(self) -> str:
        cfg = self.cfg()
        now = self.clock()
        s = self.stats.snapshot()
        then, before = self._last
        self._last = (now, s["messages"])
        rate = (s["messages"] - before) / (now - then) if now > then else 0.0
        scan = scan_staging(cfg.staging_dir)
        last = s["last_upload"]
        parts = [
            f"{rate:.0f} msg/s archived",
            f"backlog {scan.closed_files} files ({size(scan.closed_bytes)}), "
            f"archive lag {age(scan.oldest_age(now))}",
            f"last upload {age(now - last)} ago" if last else "no upload yet",
        ]
        reason = archive_reason(scan, now, cfg.health)
        if reason:
            parts.append(f"degraded: {reason}")
        elif s["last_error"]:
            parts.append(f"retrying: {s['last_error']}")
        else:
            parts.append("ok")
        return "; ".join(parts)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.send(self.line())

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)


# --- syslog-archive status --------------------------------------------------------------


def render(status: StatusJSON, cfg: Config) -> str:
    lines = headline(status, "syslog-archive")
    st = status.get("storage", {})
    lines.append(
        f"Storage: bucket {st.get('bucket')!r} prefix {st.get('prefix')!r} "
        f"at {st.get('endpoint') or 'AWS'}"
    )
    up = status.get("uploads", {})
    lines.append("Uploads")
    lines.append(f"  {last_upload(status)}")
    lines.append(
        f"  {up.get('messages', 0)} messages, {size(up.get('raw_bytes'))} raw -> "
        f"{size(up.get('upload_bytes'))} uploaded; {up.get('retries', 0)} retries, "
        f"{up.get('rejected', 0)} rejected files"
    )
    if up.get("last_failure"):
        lines.append(f"  last failure {age(status['now'] - up['last_failure'])} ago")
    lines.append("Staging")
    lines += staging_lines(status.get("staging", {}))
    lines += errors_lines(status.get("last_errors", []))
    return "\n".join(lines) + "\n"


def status_main(args: argparse.Namespace) -> int:
    """``syslog-archive status [--config PATH] [--json]``."""
    return run(
        args, "syslog-archive status", "archiver", lambda c: c.metrics.archive_endpoint, render
    )
