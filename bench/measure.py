"""What every bench cell does: a free port, the load, the receiver's CPU and RSS,
waiting until it is done, and checking every message it kept (bench.run for the
ingest cells, bench.forwarding for relay to relay)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.receivers import REPO, Certs, Receiver, Scenario
from relay.tools.loadgen import SEQ_RE, Digest

TICK = os.sysconf("SC_CLK_TCK")
LOADGEN_TIMEOUT = 180.0
SETTLE = 1.5  # output unchanged this long = the receiver is done
DRAIN_TIMEOUT = 60.0


def free_port(udp: bool) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run_loadgen(sc: Scenario, port: int, certs: Certs) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "relay",
        "loadgen",
        f"127.0.0.1:{port}",
        "-t",
        sc.transport,
        "-F",
        sc.framing,
        "-c",
        str(sc.connections),
        "-n",
        str(sc.count),
        "--profile",
        sc.profile,
        "--json",
    ]
    if sc.size:
        cmd += ["-s", str(sc.size)]
    if sc.rate:
        cmd += ["-r", str(sc.rate)]
    if sc.transport == "tls":
        cmd += ["--tls-records", sc.tls_records]
    p = subprocess.run(
        cmd, capture_output=True, timeout=LOADGEN_TIMEOUT, cwd=REPO, check=False, text=True
    )
    if p.returncode not in (0, 1):
        raise RuntimeError(f"loadgen failed: {p.stderr.strip()[-400:]}")
    out: dict[str, Any] = json.loads(p.stdout)
    return out


def wait_done(rx: Receiver, expected: int | None) -> float:
    """Time (epoch) at which the output reached its final size."""
    last_size, last_change = rx.output_bytes(), time.time()
    deadline = time.monotonic() + DRAIN_TIMEOUT
    while time.monotonic() < deadline:
        time.sleep(0.02)
        size = rx.output_bytes()
        now = time.time()
        if size != last_size:
            last_size, last_change = size, now
        if expected is not None and size >= expected:
            return now
        if now - last_change > SETTLE:
            break
    return last_change


def verify(rx: Receiver, sent: int, checksum: int) -> tuple[bool, int, str]:
    d = Digest()
    seen = bytearray(sent)
    dup = bad = 0
    for m in rx.messages():
        d.add(m)
        hit = SEQ_RE.search(m)
        if hit is None or int(hit.group(1)) >= sent:
            bad += 1
            continue
        i = int(hit.group(1))
        dup += seen[i]
        seen[i] = 1
    missing = sent - sum(seen)
    if d.count == sent and d.checksum == checksum and not dup and not bad:
        return True, d.count, "ok"
    return (
        False,
        d.count,
        f"FAILURE: received {d.count}/{sent}, missing {missing}, duplicates {dup}, "
        f"unknown {bad}, checksum {'ok' if d.checksum == checksum else 'differs'}",
    )
