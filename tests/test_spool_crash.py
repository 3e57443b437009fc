"""Spool under kill -9: a real child process appends, syncs and reports; it is killed at a
random moment, the spool is reopened and checked, and the next child carries on.

What must hold after every kill: each record up to the highest seq the child reported as
synced is there exactly once and in order; seqs keep growing across restarts; with a reader
acking in the child, nothing it had not acked is missing (only acked records may return).
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from relay.disk.spool import Spool, SpoolRecord

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, threading, time
from pathlib import Path
from relay.disk.spool import Spool

directory, rnd, mode = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
out = sys.stdout
lock = threading.Lock()

def say(line):
    with lock:
        out.write(line + "\n")
        out.flush()

s = Spool(directory, 1 << 30, segment_size=128 * 1024,
          ack_persist_records=300, ack_persist_interval=0.02)
s.open()
say("open %d %d" % (s.last_seq, s.acked_seq))

def reader():
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        recs = s.read(150, 1 << 20)
        if not recs:
            time.sleep(0.001)
            continue
        say("acking %d" % recs[-1].seq)  # said before: the real ack is never above it
        s.ack(recs[-1].seq)
        say("persisted %d" % s.persisted_ack_seq)

if mode == "ack":
    threading.Thread(target=reader, daemon=True).start()

pad = b"x" * 200
i = 0
deadline = time.monotonic() + 20
while time.monotonic() < deadline and i < 200_000:
    s.append([b"%d %d " % (rnd, i + k) + pad for k in range(50)], time.time())
    i += 50
    if i % 250 == 0:
        s.sync()
        say("synced %d" % s.synced_seq)
say("done")
time.sleep(30)
"""


def _run_child(directory: Path, rnd: int, mode: str, rng: random.Random) -> list[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory), str(rnd), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    lines: list[str] = []
    first_sync = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode().strip()
            lines.append(line)
            if line.startswith("synced"):
                first_sync.set()

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        assert first_sync.wait(timeout=20), f"child never synced: {lines}"
        time.sleep(rng.uniform(0.0, 0.4))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        t.join(timeout=10)
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        proc.stderr.close()
        assert proc.stdout is not None
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, err
    assert "done" not in lines, "killed too late to mean anything"
    return lines


def _last(lines: list[str], word: str) -> int:
    values = [int(m.group(1)) for line in lines if (m := re.fullmatch(word + r" (\d+)", line))]
    return max(values, default=0)


def _read_all(s: Spool) -> list[SpoolRecord]:
    out: list[SpoolRecord] = []
    for _ in range(100_000):
        got = s.read(5000, 4 * 1024**2)
        if not got:
            return out
        out.extend(got)
    raise AssertionError("read() never ran dry")


def _check_payloads(records: list[SpoolRecord], contiguous_from_zero: bool) -> None:
    """Per child round, the counters in payloads follow each other without gap or repeat."""
    last: dict[int, int] = {}
    for r in records:
        rnd_s, i_s, _ = r.payload.split(b" ", 2)
        rnd, i = int(rnd_s), int(i_s)
        if rnd in last:
            assert i == last[rnd] + 1, (rnd, i, last[rnd])
        elif contiguous_from_zero:
            assert i == 0, (rnd, i)
        assert all(rnd >= other for other in last), "rounds out of order"
        last[rnd] = i


@pytest.mark.parametrize("mode", ["append", "ack"])
def test_kill_9_loses_nothing_synced(tmp_path: Path, mode: str) -> None:
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    directory = tmp_path / "spool"
    previous_last = 0
    max_acking = 0
    for rnd in range(3):
        lines = _run_child(directory, rnd, mode, rng)
        synced = _last(lines, "synced")
        opened = re.fullmatch(r"open (\d+) (\d+)", lines[0])
        assert opened is not None, lines[:3]
        assert int(opened.group(1)) >= previous_last  # seqs never go back across restarts
        assert synced > previous_last

        s = Spool(directory, 1 << 30, segment_size=128 * 1024)
        report = s.open()
        assert report.corrupt_records == 0, report.problems
        records = _read_all(s)
        seqs = [r.seq for r in records]
        if mode == "append":
            # Nothing acked: every record ever appended is there, once, in order.
            assert seqs == list(range(1, len(seqs) + 1))
            assert len(seqs) >= synced
            _check_payloads(records, contiguous_from_zero=True)
        else:
            max_acking = max(max_acking, _last(lines, "acking"))
            assert s.acked_seq >= _last(lines, "persisted")
            # Everything above what the child could have acked is there; below, a
            # contiguous stretch of already-acked records may come again.
            if seqs:
                assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
                assert seqs[0] <= max_acking + 1
            assert max(seqs[-1] if seqs else 0, max_acking) >= synced
            _check_payloads(records, contiguous_from_zero=False)
        previous_last = s.last_seq
        s.close()
