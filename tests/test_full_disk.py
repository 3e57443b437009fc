"""A real full disk: staging on a small tmpfs, filled up, then freed. Nothing accepted is lost.

Two ways: with the free-space guard off, the disk really fills (ENOSPC, retried);
with the guard on (the default), the inputs pause at the floor before it does.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.formats import octet
from tests.support.http import get, parse_metrics
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
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
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
        relay={"min_free": 0, "min_free_percent": 0},  # no guard: let the disk fill
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


def _fill(disk: Path, leave: int) -> Path:
    filler = disk / "filler"
    st = os.statvfs(disk)
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def _gauge(relay: RelayProcess, name: str) -> float | None:
    samples = parse_metrics(get(relay.metrics_url + "/metrics")[1])
    return samples.get((name, ()))


def _udp_dropped(relay: RelayProcess) -> float:
    samples = parse_metrics(get(relay.metrics_url + "/metrics")[1])
    return sum(
        v
        for (name, labels), v in samples.items()
        if name == "syslog_relay_udp_dropped_total" and ("reason", "disk_floor") in labels
    )


def _send_paced(port: int, msgs: list[bytes]) -> None:
    """About 2.5 MB/s: the guard samples free space once a second, so the floor
    (8 MiB here, 1 GiB by default) must exceed a second of traffic."""
    data = b"".join(octet.encode(m) for m in msgs)
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        for i in range(0, len(data), 128 * 1024):
            s.sendall(data[i : i + 128 * 1024])
            time.sleep(0.05)


def test_inputs_pause_at_the_free_space_floor_and_resume_when_space_returns(
    tmp_path: Path, small_disk: Path
) -> None:
    lc, lu = Listener("tcp"), Listener("udp")
    relay = RelayProcess(
        tmp_path / "relay",
        [lc, lu],
        staging={"fsync_interval": "100ms", "max_pending": "1MiB"},
        relay={"min_free": "8MiB", "min_free_percent": 0},
        state=small_disk / "state",
    )
    relay.start()
    samples = parse_metrics(get(relay.metrics_url + "/metrics")[1])
    seeded = [v for (n, lab), v in samples.items() if n == "syslog_relay_udp_dropped_total"]
    assert seeded == [0]  # exported at 0 from the start, for increase()-based alerts
    assert samples[("syslog_relay_disk_floor_pauses_total", ())] == 0
    filler = _fill(small_disk, 12 * 1024 * 1024)  # 4 MiB above the floor
    tag = uuid.uuid4().hex
    msgs = [m + b" " + b"p" * 200 for m in _msgs(tag, 100_000)]  # about 27 MB
    sender = threading.Thread(target=_send_paced, args=(lc.port, msgs), daemon=True)
    sender.start()

    deadline = time.monotonic() + WAIT
    code, body = get(relay.metrics_url + "/health")
    while "below the floor" not in body and time.monotonic() < deadline:
        time.sleep(0.1)
        code, body = get(relay.metrics_url + "/health")
    assert code == 503 and "disk:" in body and "inputs paused" in body
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.sendto(f"<14>1 - h app - - - {tag}-udp dropped".encode(), ("127.0.0.1", lu.port))
    deadline = time.monotonic() + WAIT
    while _udp_dropped(relay) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _udp_dropped(relay) == 1
    assert _gauge(relay, "syslog_relay_inputs_paused_for_disk") == 1
    assert _gauge(relay, "syslog_relay_state_free_floor_bytes") == 8 * 1024 * 1024
    held = len(tagged(relay, tag))
    assert 0 < held < len(msgs)  # paused part way: the rest waits in the sender
    assert sender.is_alive()
    st = os.statvfs(small_disk)
    assert st.f_bavail * st.f_frsize > 2 * 1024 * 1024  # stopped well before full

    filler.unlink()  # the operator frees space; nothing else is done
    sender.join(WAIT * 2)
    assert not sender.is_alive()
    deadline = time.monotonic() + WAIT
    got = tagged(relay, tag)
    while len(got) < len(msgs) and time.monotonic() < deadline:
        time.sleep(0.1)
        got = tagged(relay, tag)
    assert got == msgs  # every message staged exactly once, in order
    assert get(relay.metrics_url + "/health") == (200, "ok\n")
    assert _gauge(relay, "syslog_relay_inputs_paused_for_disk") == 0
    assert _gauge(relay, "syslog_relay_disk_floor_pauses_total") == 1
    log = relay.log_path.read_text()
    assert "below the floor" in log and "resuming inputs" in log
    assert "staging write failed" not in log  # the disk never filled
    assert relay.stop() == 0
