"""The archiver's /metrics, /health and /status: in process with the in-memory store,
then a real ``syslog-archive run`` whose S3 server (SeaweedFS) is stopped and restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from archive.cli import main as archive_main
from archive.daemon import Archiver
from archive.observe import ArchiveObserver, ArchiveStats, ObserveServer, StatusReporter
from archive.store import MemoryStore
from relay.config import Config
from tests.support.http import get, parse_metrics
from tests.support.http import wait_for as _wait_for
from tests.support.rsyslog import free_port
from tests.support.seaweed import SeaweedServer, bucket, seaweed  # noqa: F401 - fixtures
from tests.test_archive_helpers import mixed_traffic, part_at, write_config, write_staging

ROOT = Path(__file__).resolve().parents[1]
WAIT = 45.0  # a bound: boto3 may sit in a retry backoff when S3 returns


def wait_for(what: str, probe: Callable[[], Any], timeout: float = WAIT) -> Any:
    return _wait_for(what, probe, timeout)


def recent_hour(hours_ago: int) -> tuple[str, float]:
    epoch = (int(time.time()) // 3600 - hours_ago) * 3600.0
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H"), epoch


def config(tmp_path: Path, port: int, lag: str = "1h", **kw: Any) -> Config:
    extra = f'[metrics]\narchive_address = "127.0.0.1:{port}"\n[health]\narchive_lag = "{lag}"\n'
    return write_config(tmp_path / "syslog-relay.toml", tmp_path / "state", extra=extra, **kw)


# --- in process -------------------------------------------------------------------------


def test_stats_metrics_health_and_endpoints(tmp_path: Path) -> None:
    cfg = config(tmp_path, 0, lag="1h")
    hour, epoch = recent_hour(3)
    files = [
        write_staging(
            cfg.relay.state_dir, "relay1", hour, part_at(epoch + i), mixed_traffic(50, seed=i)
        )
        for i in range(2)
    ]
    store = MemoryStore()
    stats = ArchiveStats()
    obs = ArchiveObserver(cfg, stats)
    server = ObserveServer(obs, ("127.0.0.1", 0))
    server.start()
    base = f"http://127.0.0.1:{server.httpd.server_address[1]}"
    try:
        code, body = get(base + "/health")
        assert code == 503 and body.startswith(f"degraded: archive: {files[0].name} waiting for 2h")
        assert get(base + "/live") == (200, "alive\n")  # lagging, not dead
        m = parse_metrics(get(base + "/metrics")[1])
        assert m[("syslog_archive_staging_closed_files", ())] == 2
        assert m[("syslog_archive_healthy", ())] == 0
        assert m[("syslog_archive_upload_duration_seconds_count", ())] == 0  # there from the start

        store.fail_next = 1  # the first attempt fails, the round after it succeeds
        arch = Archiver(cfg, store, stats=stats)
        assert not arch.run_once()
        arch.stats.retrying()  # what run() does before the next round
        assert arch.run_once()
        assert not any(f.exists() for f in files)

        assert get(base + "/health") == (200, "ok\n")
        m = parse_metrics(get(base + "/metrics")[1])
        assert m[("syslog_archive_uploads_total", ())] == 2
        assert m[("syslog_archive_upload_failures_total", (("kind", "transient"),))] == 1
        assert m[("syslog_archive_upload_retries_total", ())] == 1
        assert m[("syslog_archive_chunks_total", (("result", "uploaded"),))] == 2
        assert m[("syslog_archive_chunks_total", (("result", "reused"),))] == 0
        assert m[("syslog_archive_messages_total", ())] == 100
        chunk_bytes = sum(o.size for o in store.list(""))  # chunks and manifests
        assert 0 < m[("syslog_archive_upload_bytes_total", ())] < chunk_bytes
        assert m[("syslog_archive_last_upload_timestamp_seconds", ())] > 0
        assert m[("syslog_archive_staging_closed_files", ())] == 0
        assert m[("syslog_archive_healthy", ())] == 1
        assert m[("syslog_archive_upload_duration_seconds_count", ())] == 2  # failures not
        assert m[("syslog_archive_upload_duration_seconds_bucket", (("le", "+Inf"),))] == 2

        st = json.loads(get(base + "/status")[1])
        assert st["daemon"] == "syslog-archive" and st["health"]["status"] == "ok"
        assert st["uploads"]["done"] == 2 and st["uploads"]["last_key"].endswith(".log.zst")
        assert st["uploads"]["last_error"] is None
        assert get(base + "/nothing")[0] == 404
    finally:
        server.stop()
    with pytest.raises(OSError):
        get(base + "/health")


def test_status_line_for_systemctl_status(tmp_path: Path) -> None:
    cfg = config(tmp_path, 0, lag="1h")
    hour, epoch = recent_hour(3)
    write_staging(cfg.relay.state_dir, "relay1", hour, part_at(epoch), mixed_traffic(5, seed=1))
    now = [epoch + 3 * 3600.0 + 600]
    stats = ArchiveStats(clock=lambda: now[0])
    sent: list[str] = []
    reporter = StatusReporter(lambda: cfg, stats, sent.append, interval=0.01, clock=lambda: now[0])
    now[0] += 10
    stats.uploaded("k", 100, 10, 1200, reused=False, seconds=1.5)
    line = reporter.line()
    assert line.startswith("120 msg/s archived; backlog 1 files (")
    assert "; last upload 0.0s ago; degraded: archive: " in line
    # The thread sends until stopped (bounded wait, no timing assertion).
    reporter.start()
    wait_for("a STATUS line", lambda: sent)
    reporter.stop()
    assert sent[0].startswith("0 msg/s archived; backlog 1 files")


def test_rejected_and_refused_are_counted(tmp_path: Path) -> None:
    cfg = config(tmp_path, 0)
    hour, epoch = recent_hour(1)
    write_staging(cfg.relay.state_dir, "relay1", hour, part_at(epoch), mixed_traffic(5))
    (cfg.relay.state_dir / "staging" / "closed" / f"{hour}--{part_at(epoch + 9)}.stg").write_bytes(
        b"not a staging file\n"
    )
    stats = ArchiveStats()
    assert Archiver(cfg, MemoryStore(), stats=stats).run_once()
    s = stats.snapshot()
    assert (s["done"], s["rejected"]) == (1, 1)
    assert s["last_error"].startswith(f"{hour}--{part_at(epoch + 9)}.stg: ")


# --- a real archiver process and a real S3 server ----------------------------------------


def test_health_follows_the_s3_server(
    tmp_path: Path,
    seaweed: SeaweedServer,  # noqa: F811
    bucket: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    port = free_port()
    cfg = config(
        tmp_path,
        port,
        lag="1s",
        bucket=bucket,
        endpoint=seaweed.endpoint,
        access_key=seaweed.access_key,
        secret_key=seaweed.secret_key,
    )
    conf = Path(cfg.source)
    base = f"http://127.0.0.1:{port}"
    hour, epoch = recent_hour(2)
    f = write_staging(cfg.relay.state_dir, "relay1", hour, part_at(epoch), mixed_traffic(200))
    seaweed.stop()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen(
        [sys.executable, "-m", "archive", "run", "--config", str(conf)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _, body = wait_for(
            "/health degraded with S3 down", lambda: (r := get(base + "/health"))[0] == 503 and r
        )
        assert body.startswith(f"degraded: archive: {f.name} waiting for ")
        # (Not waiting for a failed attempt: boto3 retries each call with backoff for
        # many seconds; the in-process test above counts failures.)
        m = parse_metrics(get(base + "/metrics")[1])
        assert m[("syslog_archive_healthy", ())] == 0
        assert m[("syslog_archive_uploads_total", ())] == 0
        assert m[("syslog_archive_staging_closed_files", ())] == 1
        assert archive_main(["status", "--config", str(conf)]) == 0
        text = capsys.readouterr().out
        assert "DEGRADED" in text and "0 uploaded" in text and f.name in text

        seaweed.start()
        wait_for("/health ok with S3 back", lambda: get(base + "/health") == (200, "ok\n"))
        assert not f.exists()
        m = parse_metrics(get(base + "/metrics")[1])
        assert m[("syslog_archive_uploads_total", ())] == 1
        assert m[("syslog_archive_chunks_total", (("result", "uploaded"),))] == 1
        assert m[("syslog_archive_messages_total", ())] == 200
        assert m[("syslog_archive_upload_bytes_total", ())] > 0
        assert archive_main(["status", "--config", str(conf), "--json"]) == 0
        st = json.loads(capsys.readouterr().out)
        assert st["health"]["status"] == "ok" and st["uploads"]["done"] == 1

        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
        if seaweed.proc is None:
            seaweed.start()
    assert archive_main(["status", "--config", str(conf)]) == 1
    assert "is the archiver running?" in capsys.readouterr().err
