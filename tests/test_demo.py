"""`make run` end to end: relay + archiver + SeaweedFS, one message into the archive."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert "smoke: the message is in the archive" in r.stdout
    assert f"logger --tcp --octet-count --rfc5424 -n 127.0.0.1 -P {port}" in r.stdout
