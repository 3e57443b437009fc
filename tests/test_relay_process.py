"""The relay as a real process: kill -9 and restart, SIGTERM drain, hour close, idle floods."""

from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from relay.formats import octet
from tests.support.relayproc import Listener, RelayProcess, staging_files
from tests.support.traffic import tagged, wait_tagged

pytestmark = pytest.mark.integration
WAIT = 20.0


def _msgs(tag: str, n: int, ts: str = "-") -> list[bytes]:
    return [f"<14>1 {ts} host{i % 3} app - - - {tag} seq={i:06d}".encode() for i in range(n)]


def _send(port: int, msgs: list[bytes]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"".join(octet.encode(m) for m in msgs))


def test_kill_9_keeps_everything_staged_and_restart_continues(tmp_path: Path) -> None:
    lc = Listener("tcp")
    relay = RelayProcess(tmp_path, [lc], staging={"fsync_interval": "10s"})
    relay.start()
    tag = uuid.uuid4().hex
    first = _msgs(tag + "-a", 2000)
    _send(lc.port, first)
    # Written to staging means in the page cache: a kill -9 cannot take it back,
    # even though the 10 s fsync interval has not passed.
    assert len(wait_tagged(relay, tag + "-a", 2000, WAIT)) == 2000
    assert relay.proc is not None
    os.kill(relay.proc.pid, signal.SIGKILL)
    relay.proc.wait(10)
    relay.start()
    second = _msgs(tag + "-b", 500)
    _send(lc.port, second)
    assert len(wait_tagged(relay, tag + "-b", 500, WAIT)) == 500
    assert relay.stop() == 0
    got = tagged(relay, tag)
    assert got == first + second  # exactly once, in order
    assert "staging recovered 1 open files" in relay.log()


def test_sigterm_drains_and_fsyncs(tmp_path: Path) -> None:
    lc = Listener("tcp")
    relay = RelayProcess(tmp_path, [lc], staging={"fsync_interval": "1h"})
    relay.start()
    tag = uuid.uuid4().hex
    msgs = _msgs(tag, 5000)
    _send(lc.port, msgs)
    time.sleep(1.0)  # let the relay read the socket; the queue drain is what SIGTERM must keep
    assert relay.stop() == 0
    assert tagged(relay, tag) == msgs


def test_late_hour_is_closed_after_grace(tmp_path: Path) -> None:
    lc = Listener("tcp")
    relay = RelayProcess(tmp_path, [lc], archive={"grace": "1s"})
    relay.start()
    tag = uuid.uuid4().hex
    two_hours_ago = (datetime.now(UTC) - timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    late = _msgs(tag, 10, ts=two_hours_ago)
    now_msgs = _msgs(tag + "-now", 3)
    _send(lc.port, late + now_msgs)
    deadline = time.monotonic() + WAIT
    closed = relay.state_dir / "staging" / "closed"
    while time.monotonic() < deadline and not list(closed.glob("*.stg")):
        time.sleep(0.1)
    files = list(closed.glob("*.stg"))
    assert len(files) == 1
    hour = (datetime.now(UTC) - timedelta(hours=2)).strftime("%Y-%m-%dT%H")
    assert files[0].name.startswith(hour + "--")
    # The current hour stays open.
    assert len(staging_files(relay.state_dir)) == 2
    relay.stop()


def test_thousands_of_idle_connections_are_bounded(tmp_path: Path) -> None:
    lc = Listener("tcp")
    limits = {"max_connections": 1000, "idle_timeout": "2s", "max_connections_per_source": 0}
    relay = RelayProcess(tmp_path, [lc], limits=limits)
    relay.start()
    socks: list[socket.socket] = []
    try:
        for _ in range(1200):
            socks.append(socket.create_connection(("127.0.0.1", lc.port), timeout=10))
        # A working client among them: its message lands once a slot is free.
        tag = uuid.uuid4().hex
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                _send(lc.port, _msgs(tag, 1))
            except OSError:
                pass
            if tagged(relay, tag):
                break
            time.sleep(0.2)
        assert tagged(relay, tag)
        # The idle ones are closed by the relay within the idle timeout.
        closed = 0
        deadline = time.monotonic() + WAIT
        for s in socks:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                if s.recv(1) == b"":
                    closed += 1
            except ConnectionResetError:
                closed += 1
            except TimeoutError:
                pass
        assert closed == len(socks)
    finally:
        for s in socks:
            s.close()
    assert relay.alive()
    log = relay.log_path.read_text()
    assert "max_connections (1000) reached" in log
    assert "idle for 2s, closing" in log
    # A flood of events is rate-limited in the log (the counters count every one).
    assert log.count("max_connections (1000) reached") <= 30
    assert log.count("idle for 2s, closing") <= 30
    relay.stop()


def test_garbage_and_huge_line_do_not_hurt_other_clients(tmp_path: Path) -> None:
    lc = Listener("tcp")
    relay = RelayProcess(tmp_path, [lc], limits={"max_message_size": "8KiB"})
    relay.start()
    tag = uuid.uuid4().hex
    with socket.create_connection(("127.0.0.1", lc.port), timeout=10) as bad:
        bad.sendall(b"<13>" + b"A" * (1024 * 1024))  # 1 MiB, no LF
        with socket.create_connection(("127.0.0.1", lc.port), timeout=10) as worse:
            worse.sendall(b"99999999999999999999 garbage")
            worse.settimeout(10)
            assert worse.recv(1) == b""  # closed: the stream cannot be resynchronised
        _send(lc.port, _msgs(tag, 100))
        assert len(wait_tagged(relay, tag, 100, WAIT)) == 100
    # The huge line was truncated to 8 KiB and kept, flagged.
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        big = [r for r in relay.records() if r.msg.startswith(b"<13>AAAA")]
        if big:
            break
        time.sleep(0.1)
    assert [len(r.msg) for r in big] == [8192]
    assert b"T" in big[0].flags
    # What the relay had read of the garbage is kept, flagged M (issue 11.11).
    (kept,) = [r for r in relay.records() if r.msg.startswith(b"9999")]
    # All of it, unless the relay's read that hit the error ended sooner.
    assert b"99999999999999999999 garbage".startswith(kept.msg) and len(kept.msg) > 10
    assert b"M" in kept.flags
    log = relay.log()
    assert "length_too_long" in log and "oversize_truncated" in log
    assert "is kept, flagged M" in log
    relay.stop()


def test_a_flipped_bit_in_an_open_staging_file_costs_one_block_at_restart(tmp_path: Path) -> None:
    # Issue 11.4: recovery used to cut the file at the first bad block, losing all later ones.
    from relay.formats import staging_block

    lc = Listener("tcp")
    relay = RelayProcess(tmp_path, [lc])
    relay.start()
    tag = uuid.uuid4().hex
    msgs = _msgs(tag, 20_000)
    for i in range(0, len(msgs), 1000):  # a block per connection at least: reads coalesce
        with socket.create_connection(("127.0.0.1", lc.port), timeout=10) as s:
            s.sendall(b"".join(octet.encode(m) for m in msgs[i : i + 1000]))
    assert len(wait_tagged(relay, tag, 20_000, WAIT)) == 20_000
    assert relay.stop() == 0
    path = max(staging_files(relay.state_dir), key=lambda p: p.stat().st_size)
    data = path.read_bytes()
    pos, blocks = data.index(b"\n") + 1, []
    while pos < len(data):
        header, payload, nxt = staging_block.decode_block(data, pos)
        assert header is not None
        blocks.append((pos, nxt, staging_block.split_payload(payload, header[2])))
        pos = nxt
    assert len(blocks) >= 20
    start, end, lost = blocks[6]
    with open(path, "r+b") as f:  # one bit, in the middle of block 6
        f.seek((start + end) // 2)
        byte = f.read(1)[0]
        f.seek((start + end) // 2)
        f.write(bytes([byte ^ 0x10]))
    relay.start()
    assert relay.stop() == 0
    gone = set(lost)
    assert tagged(relay, tag) == [m for m in msgs if m not in gone]
    assert (relay.state_dir / "staging" / "corrupt" / f"{path.name}.at-{start}").exists()
    assert f"damaged bytes at offset {start}" in relay.log()
