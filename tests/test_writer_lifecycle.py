"""The durable writer's lifecycle in a real relay process: a full disk under a forward
spool degrades /health and SIGTERM still ends within [staging] stop_timeout, saying what
it could not write; a writer thread that dies takes the process down with exit code 1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.http import get, wait_for
from tests.support.relayproc import REPO, Listener, RelayProcess
from tests.support.rsyslog import free_port
from tests.support.traffic import wait_tagged
from tests.test_forwarding import relp_forward
from tests.test_relay_process import _msgs, _send

pytestmark = pytest.mark.integration
WAIT = 30.0


@pytest.fixture
def spool_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs where the relay's forward spools live (staging stays on the big disk)."""
    if os.geteuid() != 0 and os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    spool = tmp_path / "relay" / "state" / "spool"
    spool.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(spool)], check=True)
    try:
        yield spool
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


def test_full_spool_disk_degrades_health_and_sigterm_ends_in_time(
    tmp_path: Path, spool_disk: Path
) -> None:
    lc = Listener("tcp")
    relay = RelayProcess(
        tmp_path / "relay",
        [lc],
        staging={"fsync_interval": "100ms", "stop_timeout": "2s"},
        # A peer that is never there: every message stays in the spool.
        forward=[relp_forward("core", [free_port()], max_spool="1GiB")],
    )
    relay.start()
    assert get(relay.metrics_url + "/health") == (200, "ok\n")
    tag = uuid.uuid4().hex
    msgs = _msgs(tag, 6000)  # about 400 KB a copy: the spool's disk fills up
    for _ in range(4):
        _send(lc.port, msgs)
    _, body = wait_for(
        "/health to say which spool fails",
        lambda: (r := get(relay.metrics_url + "/health"))[0] == 503 and "spool core" in r[1] and r,
        WAIT,
    )
    assert "spool core: writes failing" in body and "No space left on device" in body
    assert len(wait_tagged(relay, tag, len(msgs), WAIT)) >= len(msgs)  # what came first

    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGTERM)
    # Bounded: stop_timeout (2 s) and the writer's grace, far below this wait.
    assert relay.proc.wait(WAIT) == 1
    log = relay.log_path.read_text()
    assert "writes still fail after the stop timeout; giving up: spool core" in log
    assert "shutdown: not written, the disk kept failing: spool core:" in log
    assert "Traceback" not in log


POISON = """
import sys
from relay import cli
from relay.disk import staging

real = staging.StagingStore.append


def append(self, hour, data, now):
    if any(b"POISON" in bytes(b) for b in (data if isinstance(data, list) else [data])):
        raise RuntimeError("a bug in the writer")
    return real(self, hour, data, now)


staging.StagingStore.append = append
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_dead_writer_thread_exits_the_relay_non_zero(tmp_path: Path) -> None:
    lc = Listener("tcp")
    relay = RelayProcess(tmp_path, [lc])
    relay.workdir.mkdir(parents=True, exist_ok=True)
    relay.config_path.write_text(relay.config())
    with open(relay.log_path, "ab") as log:
        relay.proc = subprocess.Popen(
            [sys.executable, "-c", POISON, "run", "--config", str(relay.config_path)],
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        tag = uuid.uuid4().hex
        wait_for("the relay to listen", lambda: relay.log_path.read_text().count("listening"), WAIT)
        _send(lc.port, _msgs(tag, 10))
        assert len(wait_tagged(relay, tag, 10, WAIT)) == 10
        _send(lc.port, [b"<14>1 - h app - - - POISON"])
        assert relay.proc.wait(WAIT) == 1  # systemd's Restart=on-failure restarts it
    finally:
        if relay.proc.poll() is None:
            relay.proc.kill()
            relay.proc.wait()
    log = relay.log_path.read_text()
    assert '"critical"' in log and "durable writer thread died" in log
    assert "RuntimeError: a bug in the writer" in log
