"""`make run` end to end: relay + archiver + SeaweedFS, one message into the archive."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.rsyslog import wait_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.integration
def test_make_run_smoke() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "demo.py"), "--smoke", "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "smoke: the message just sent is read from local staging" in r.stdout
    assert "smoke: the message is in the archive" in r.stdout
    assert f"logger --tcp --octet-count --rfc5424 -n 127.0.0.1 -P {port}" in r.stdout


def _gone(pid: int) -> bool:
    """Exited (a zombie counts: it runs nothing; PID 1 of a container may never reap it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _start_demo(run: Path) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tools" / "demo.py"),
            "--port",
            str(port),
            "--run-dir",
            str(run),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (run / "pids").exists():
        assert demo.poll() is None and time.monotonic() < deadline, "demo did not start"
        time.sleep(0.2)
    pids = {
        name: int(pid)
        for name, pid in (ln.split() for ln in (run / "pids").read_text().splitlines())
    }
    assert set(pids) == {"relay", "archive", "weed"}
    wait_port(port, 60)
    return demo, pids


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT, signal.SIGKILL])
def test_make_run_stops_everything_it_started(tmp_path: Path, sig: int) -> None:
    """SIGHUP: the terminal went away; SIGINT: Ctrl-C; SIGKILL: the demo itself dies."""
    demo, pids = _start_demo(tmp_path / "run")
    try:
        demo.send_signal(sig)
        demo.wait(60)
        if sig != signal.SIGKILL:
            assert demo.returncode == 0
        deadline = time.monotonic() + 60
        while not all(_gone(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert {n: _gone(p) for n, p in pids.items()} == dict.fromkeys(pids, True)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        for pid in pids.values():
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
