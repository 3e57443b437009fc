"""A real full disk: staging on a small tmpfs, filled up, then freed. Nothing accepted is lost."""

from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.relayproc import Listener, RelayProcess
from tests.support.traffic import tagged
from tests.test_relay_process import _msgs, _send

pytestmark = pytest.mark.integration
WAIT = 30.0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0 and os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_pauses_and_loses_nothing(tmp_path: Path, small_disk: Path) -> None:
    state = small_disk / "state"
    lc = Listener("tcp")
    relay = RelayProcess(
        tmp_path / "relay",
        [lc],
        staging={"fsync_interval": "100ms", "max_pending": "1MiB"},
        state=state,
    )
    relay.start()
    # Leave about 300 KiB free, then send about 2.5 MB.
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - 300 * 1024))
    tag = uuid.uuid4().hex
    msgs = _msgs(tag, 8000)
    sender = threading.Thread(target=_send, args=(lc.port, msgs), daemon=True)
    sender.start()
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and "staging write failed" not in relay.log_path.read_text():
        time.sleep(0.05)
    log = relay.log_path.read_text()
    assert "staging write failed" in log and "No space left" in log
    assert relay.alive()
    filler.unlink()  # the operator frees space
    sender.join(WAIT)
    assert not sender.is_alive()
    deadline = time.monotonic() + WAIT
    got = tagged(relay, tag)
    while len(got) < len(msgs) and time.monotonic() < deadline:
        time.sleep(0.1)
        got = tagged(relay, tag)
    assert got == msgs  # exactly once, in order, nothing torn
    assert relay.stop() == 0
