"""The read side against the in-memory store: ranges to the second, filters, local
staging, bad input. (The same commands against SeaweedFS: test_archive_s3.py.)"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import select
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from archive import manifest as mf
from archive import plain
from archive.cli import _parser, run_command
from archive.daemon import Archiver
from archive.query import Filter, line_search, run_text
from archive.reader import Run
from archive.store import MemoryStore
from archive.verify import verify_range
from relay.config import Config
from relay.formats import staging_block
from tests.test_archive_helpers import (
    HOUR,
    HOUR_EPOCH,
    Msg,
    encode_block,
    mixed_traffic,
    part_at,
    stage_hour,
    write_config,
    write_staging_v2,
)

ROOT = Path(__file__).resolve().parents[1]
RANGE = ["--from", "2026-11-26T00", "--to", "2026-11-26T03"]


def _cfg(tmp_path: Path) -> Config:
    return write_config(tmp_path / "c.toml", tmp_path / "state")


def _run(cfg: Config, store: MemoryStore, *argv: str) -> int:
    args = _parser().parse_args([argv[0], "--config", str(cfg.source), *argv[1:]])
    return run_command(args, lambda _cfg: store)


def _own_time(m: Msg) -> float:
    # mixed_traffic: odd messages are RFC 5424 (microseconds), even ones RFC 3164 (seconds).
    gt = m.msg.index(b">")
    return m.recv if m.msg[gt + 1 : gt + 3] == b"1 " else math.floor(m.recv)


def _archived(tmp_path: Path, n: int = 6000) -> tuple[Config, MemoryStore, list[Msg]]:
    cfg = _cfg(tmp_path)
    store = MemoryStore()
    msgs = mixed_traffic(n)
    write_staging_v2(cfg.relay.state_dir, "relay1", HOUR, part_at(HOUR_EPOCH + 1), msgs)
    assert Archiver(cfg, store).run_once()
    return cfg, store, msgs


def _lines(msgs: list[Msg]) -> bytes:
    return b"".join(m.msg + b"\n" for m in msgs)


def test_range_to_the_second_by_the_message_own_time(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    cfg, store, msgs = _archived(tmp_path)
    start, end = HOUR_EPOCH + 600, HOUR_EPOCH + 1200
    want = [m for m in msgs if start <= _own_time(m) < end]
    assert 0 < len(want) < len(msgs) // 3
    assert _run(cfg, store, "cat", "--from", "2026-11-26T01:10", "--to", "2026-11-26T01:20") == 0
    got = capsysbinary.readouterr()
    assert got.out == _lines(want)
    assert b"times without a zone read as UTC" in got.err
    # journalctl's names, and a naive time in a stated zone (Berlin is UTC+1 in November).
    args = [
        "--since",
        "2026-11-26T02:10:00",
        "--until",
        "2026-11-26T02:20",
        "--tz",
        "Europe/Berlin",
    ]
    assert _run(cfg, store, "cat", *args) == 0
    got = capsysbinary.readouterr()
    assert got.out == _lines(want)
    assert b"2026-11-26T01:10:00Z to 2026-11-26T01:20:00Z" in got.err
    assert b"Europe/Berlin" in got.err
    # Finer than a second: stated as given (not an empty-looking 01:10:01Z to 01:10:02Z).
    fine = ["--from", "2026-11-26T01:10:01.5", "--to", "2026-11-26T01:10:02.5"]
    assert _run(cfg, store, "cat", *fine) == 0
    got = capsysbinary.readouterr()
    assert b"2026-11-26T01:10:01.5Z to 2026-11-26T01:10:02.5Z" in got.err
    second = [m for m in msgs if start + 1 <= _own_time(m) < start + 3]
    half = [m for m in second if start + 1.5 <= _own_time(m) < start + 2.5]
    assert 0 < len(half) < len(second)
    assert got.out == _lines(half)


def test_a_configured_zone_reads_times_without_one(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """[archive] query_timezone: the zone of naive times when neither --tz nor --local."""
    cfg = write_config(
        tmp_path / "c.toml", tmp_path / "state", extra='query_timezone = "Europe/Berlin"\n'
    )
    store = MemoryStore()
    msgs = mixed_traffic(6000)
    write_staging_v2(cfg.relay.state_dir, "relay1", HOUR, part_at(HOUR_EPOCH + 1), msgs)
    assert Archiver(cfg, store).run_once()
    start, end = HOUR_EPOCH + 600, HOUR_EPOCH + 1200
    want = [m for m in msgs if start <= _own_time(m) < end]
    assert (
        _run(cfg, store, "cat", "--since", "2026-11-26T02:10", "--until", "2026-11-26T02:20") == 0
    )
    got = capsysbinary.readouterr()
    assert got.out == _lines(want)
    assert b"2026-11-26T01:10:00Z to 2026-11-26T01:20:00Z" in got.err
    assert b"Europe/Berlin ([archive] query_timezone)" in got.err
    # --tz still wins
    assert (
        _run(
            cfg,
            store,
            "cat",
            "--from",
            "2026-11-26T01:10",
            "--to",
            "2026-11-26T01:20",
            "--tz",
            "UTC",
        )
        == 0
    )
    assert capsysbinary.readouterr().out == _lines(want)


def test_filters_host_app_facility_severity_regex(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    cfg, store, msgs = _archived(tmp_path)

    def pri(m: Msg) -> int:
        return int(m.msg[1 : m.msg.index(b">")])

    def app(m: Msg) -> bytes:
        if m.msg[m.msg.index(b">") + 1 :][:2] == b"1 ":
            return m.msg.split(b" ")[3]
        return m.msg.split(b" ")[4].split(b"[")[0]

    cases = [
        (["--host", "web03"], lambda m: m.host == b"web03"),
        (["--app", "postfix/smtp"], lambda m: app(m) == b"postfix/smtp"),
        (["--facility", "local3"], lambda m: pri(m) >> 3 == 19),
        (["--severity", "err"], lambda m: pri(m) & 7 <= 3),
        (["--severity", "3", "--facility", "19"], lambda m: pri(m) & 7 <= 3 and pri(m) >> 3 == 19),
        (["--grep", r"status=500 \xff"], lambda m: b"status=500 \xff" in m.msg),
        (["--grep", r"^<1[0-9]>"], lambda m: re.match(rb"<1[0-9]>", m.msg) is not None),
        (["--grep", r"404$"], lambda m: m.msg.endswith(b"404")),
        (["--grep", "second line"], lambda m: b"second line" in m.msg),
        (
            ["--grep", r"items/1\d+ status=200\s"],
            lambda m: re.search(rb"items/1\d+ status=200\s", m.msg) is not None,
        ),
    ]
    for argv, pred in cases:
        assert _run(cfg, store, "cat", *RANGE, *argv) == 0, argv
        want = [m for m in msgs if pred(m)]
        assert want, argv
        assert capsysbinary.readouterr().out == _lines(want), argv


def test_json_says_where_each_message_came_from(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    cfg, store, msgs = _archived(tmp_path, 300)
    # The current hour is still in local staging (open/), not archived.
    now_hour = "2026-11-26T02"
    current = [
        Msg(HOUR_EPOCH + 3600 + i, b"tcp://127.0.0.1:1", b"h", m.msg)
        for i, m in enumerate(msgs[:5])
    ]
    current = [
        Msg(
            c.recv, c.sender, b"live", b"<13>1 2026-11-26T02:00:0%dZ live app - - - now %d" % (i, i)
        )
        for i, c in enumerate(current)
    ]
    open_file = write_staging_v2(
        cfg.relay.state_dir, "relay1", now_hour, part_at(HOUR_EPOCH + 3600), current, where="open"
    )
    assert _run(cfg, store, "cat", *RANGE, "--json") == 0
    got = capsysbinary.readouterr()
    objs = [json.loads(line) for line in got.out.splitlines()]
    assert len(objs) == len(msgs) + len(current)
    assert {o["source"] for o in objs[: len(msgs)]} == {
        "s3://archive/" + k for k in store.objects if k.endswith(".log.zst")
    }
    assert {o["source"] for o in objs[len(msgs) :]} == {f"staging:{open_file}"}
    assert objs[-1]["host"] == "live" and objs[-1]["time"] == "2026-11-26T02:00:04.000000Z"
    assert objs[0]["fields"]["format"] in ("rfc5424", "rfc3164")
    # Every message exactly: as text, or as base64 where it is not UTF-8.
    exact = [
        base64.b64decode(o["msg_base64"]) if "msg_base64" in o else o["msg"].encode() for o in objs
    ]
    assert exact[: len(msgs)] == [m.msg for m in msgs]
    assert any("msg_base64" in o for o in objs)
    assert b"from local staging (being written)" in got.err
    assert b"1 chunk(s) from s3://archive/syslog" in got.err
    # A closed file that was uploaded but not yet removed is not read twice.
    assert _run(cfg, store, "cat", *RANGE, "--staging", "only") == 0
    assert capsysbinary.readouterr().out == _lines(current)


def test_ls_json_with_host_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, store, msgs = _archived(tmp_path, 500)
    assert _run(cfg, store, "ls", *RANGE, "--json") == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["count"] == 500 and row["chunk_format"] == plain.CHUNK_FORMAT
    counts: dict[str, int] = {}
    for m in msgs:
        h = staging_block.sanitize_host(None if m.host == b"-" else m.host).decode()
        counts[h] = counts.get(h, 0) + 1
    assert row["host_counts"] == counts
    assert _run(cfg, store, "ls", *RANGE, "--hosts") == 0
    assert "web03" in capsys.readouterr().out


def _chunk_key(store: MemoryStore) -> str:
    return next(k for k in store.objects if k.endswith(".log.zst"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--from", "2026-11-26T03", "--to", "2026-11-26T01"], "reversed range"),
        (["--since=-1m", "--until=-2m"], "--to/--until -2m is before --from/--since -1m"),
        (["--from", "2026-11-26T01", "--to", "2026-11-26T01"], "empty range"),
        (["--from", "yesterday"], "bad time"),
        ([*RANGE, "--tz", "Mars/Olympus"], "unknown time zone"),
        ([*RANGE, "--severity", "loud"], "unknown severity"),
        ([*RANGE, "--grep", "("], "--grep"),
    ],
)
def test_bad_ranges_and_options_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    cfg = _cfg(tmp_path)
    assert _run(cfg, MemoryStore(), "cat", *argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_tail_refuses_a_negative_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _cfg(tmp_path)
    (cfg.staging_dir / "open").mkdir(parents=True)
    assert _run(cfg, MemoryStore(), "tail", "-n", "-3") == 2
    assert capsys.readouterr().err == "syslog-archive: -n/--lines: -3 is negative\n"


def test_damaged_chunk_prints_what_it_can(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    cfg, store, msgs = _archived(tmp_path)
    key = _chunk_key(store)
    data, meta = store.objects[key]
    cut = len(data) * 2 // 3
    store.objects[key] = (data[:cut] + bytes([data[cut] ^ 0xFF]) + data[cut + 1 :], meta)
    assert _run(cfg, store, "cat", *RANGE) == 1
    got = capsysbinary.readouterr()
    printed = got.out.splitlines(keepends=True)
    assert 0 < len(printed) < len(msgs) + 1000
    assert got.out == b"".join(m.msg + b"\n" for m in msgs)[: len(got.out)]
    errors = [e for e in got.err.decode().splitlines() if key in e]
    assert len(errors) == 1 and "damaged" in errors[0]
    assert "Traceback" not in got.err.decode()


def test_manifest_that_does_not_match(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    cfg, store, msgs = _archived(tmp_path, 200)
    mkey = mf.manifest_key_for_chunk(_chunk_key(store))
    d = json.loads(store.objects[mkey][0])
    d["count"] = 999
    store.objects[mkey] = (json.dumps(d).encode(), {})
    assert _run(cfg, store, "cat", *RANGE) == 1
    got = capsysbinary.readouterr()
    assert got.out == b"".join(m.msg + b"\n" for m in msgs)
    assert b"holds 200 message(s), its manifest says 999" in got.err
    store.objects[mkey] = (b"{not json", {})
    assert _run(cfg, store, "cat", *RANGE) == 1
    assert b"manifest unreadable" in capsysbinary.readouterr().err


def test_missing_metadata_frames_give_the_lines(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    cfg, store, _ = _archived(tmp_path, 200)
    key = _chunk_key(store)
    data, meta = store.objects[key]
    lines = (
        zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()
    )
    # Recompressed with plain zstd: the skippable frames are gone.
    store.objects[key] = (zstandard.ZstdCompressor().compress(lines), meta)
    assert _run(cfg, store, "cat", *RANGE) == 1
    got = capsysbinary.readouterr()
    assert got.out == lines
    assert b"no metadata frames" in got.err and b"Traceback" not in got.err
    # Every line was given: the error does not claim that only a start was.
    assert b"the messages before it were printed" not in got.err


def test_verify_reports_the_retention_horizon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _cfg(tmp_path)
    store = MemoryStore()
    for h in range(3):
        stage_hour(cfg.relay.state_dir, h)
        assert Archiver(cfg, store).run_once()
    # Hour 01 expired (lifecycle): its chunk and manifest are gone.
    for k in [k for k in store.objects if "/hour=01/" in k]:
        del store.objects[k]
    hours = ["2026-11-26T02", "2026-11-26T03"]
    now = HOUR_EPOCH + 86400 * 10
    gap = verify_range(store, "syslog", hours, now=now)
    assert any("manifest missing" in p and "--retention" in p for p in gap.problems)
    # A 9.95-day retention: hour 01 lies before the horizon, hours 02 and 03 after it.
    ok = verify_range(store, "syslog", hours, retention=86400 * 10 - 1800, now=now)
    assert ok.problems == [] and ok.chunks == 2
    assert any("past the retention horizon 2026-11-26T01:30:00Z" in n for n in ok.notes)
    # From the command line, the range starting before the horizon says so.
    assert (
        _run(
            cfg,
            store,
            "verify",
            "--from",
            "2026-11-26T01",
            "--to",
            "2026-11-26T04",
            "--retention",
            "20000d",
        )
        == 1
    )
    assert (
        _run(
            cfg,
            store,
            "verify",
            "--from",
            "2026-11-26T01",
            "--to",
            "2026-11-26T04",
            "--retention",
            "1d",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "retention horizon" in out and "OK: 2 chunk(s)" in out


def test_tail_follows_local_staging(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    msgs = [
        Msg(
            HOUR_EPOCH + i,
            b"tcp://127.0.0.1:1",
            b"h",
            b"<13>1 2026-11-26T01:00:0%dZ h app - - - m%d" % (i, i),
        )
        for i in range(5)
    ]
    path = write_staging_v2(
        cfg.relay.state_dir, "relay1", HOUR, part_at(HOUR_EPOCH), msgs, where="open"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "archive", "tail", "-f", "-n", "2", "--config", str(cfg.source)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    try:
        got = bytearray()

        def line() -> bytes:
            # Unbuffered reads: select() sees only what the pipe still holds.
            assert proc.stdout is not None
            for _ in range(300):
                if b"\n" in got:
                    break
                ready, _, _ = select.select([proc.stdout], [], [], 0.1)
                if ready:
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    assert chunk, proc.stderr.read() if proc.stderr else "tail exited"
                    got.extend(chunk)
            nl = got.find(b"\n")
            assert nl >= 0, "tail printed no line within 30 s"
            out = bytes(got[: nl + 1])
            del got[: nl + 1]
            return out

        assert [line(), line()] == [msgs[3].msg + b"\n", msgs[4].msg + b"\n"]
        new = Msg(
            HOUR_EPOCH + 9,
            b"tcp://127.0.0.1:1",
            b"h",
            b"<13>1 2026-11-26T01:00:09Z h app - - - new",
        )
        block = encode_block([new])
        with open(path, "ab") as f:  # half a block first: nothing until it is whole
            f.write(block[:20])
            f.flush()
            f.write(block[20:])
        assert line() == new.msg + b"\n"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_tail_follows_across_the_hour_roll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """The relay closes an hour (its file moves to closed/ after a last block) and opens
    the next one: tail -f prints the closed hour's last message, then the new hour's."""
    import archive.tail

    cfg = _cfg(tmp_path)

    def msg(t: float, text: bytes) -> Msg:
        stamp = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ").encode()
        return Msg(t, b"tcp://127.0.0.1:1", b"h", b"<13>1 %b h app - - - %b" % (stamp, text))

    first = [msg(HOUR_EPOCH + 3590 + i, b"a%d" % i) for i in range(3)]
    late = msg(HOUR_EPOCH + 3599, b"last of the hour")
    nxt = msg(HOUR_EPOCH + 3601, b"first of the next")
    path = write_staging_v2(
        cfg.relay.state_dir, "relay1", HOUR, part_at(HOUR_EPOCH), first, where="open"
    )

    def roll() -> None:
        with open(path, "ab") as f:
            f.write(encode_block([late]))
        closed = cfg.staging_dir / "closed"
        closed.mkdir(exist_ok=True)
        os.replace(path, closed / path.name)
        write_staging_v2(
            cfg.relay.state_dir,
            "relay1",
            "2026-11-26T02",
            part_at(HOUR_EPOCH + 3600),
            [nxt],
            where="open",
        )

    steps = iter([roll, lambda: None, lambda: None])

    def sleep(_: float) -> None:
        step = next(steps, None)
        if step is None:
            raise KeyboardInterrupt  # how an operator ends tail -f
        step()

    monkeypatch.setattr(archive.tail.time, "sleep", sleep)
    assert _run(cfg, MemoryStore(), "tail", "-f", "-n", "10") == 0
    out = capsysbinary.readouterr().out
    assert out == b"".join(m.msg + b"\n" for m in [*first, late, nxt])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_escape_round_trip(msg: bytes) -> None:
    line = plain.escape(msg)
    assert b"\n" not in line and b"\r" not in line
    assert plain.unescape(line) == msg


_PATTERNS = [
    rb"a",
    rb"^a",
    rb"a$",
    rb"ab|^b",
    rb"(?<=x)a",
    rb"a(?=\n)",
    rb"a\sb",
    rb"[^a]b$",
    rb"^$",
    rb"\Aa",
    rb"b\Z",
    rb"a.*b",
    # A literal prefix: candidates by bytes.find, then the expression on the line.
    rb"ab x",
    rb"abx",
    rb"ab x$",
    rb"\Aab ",
    rb"b xa?",
    rb"a\ b",
]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"x")), min_size=1, max_size=30),
    st.sampled_from(_PATTERNS),
    st.sampled_from([b"ab x\r\x00", b"abx "]),
)
def test_grep_over_a_block_equals_grep_per_message(
    msgs: list[bytes], pattern: bytes, alphabet: bytes
) -> None:
    # Messages from a small alphabet so that patterns hit, lines of a verbatim block.
    msgs = [bytes(alphabet[c % len(alphabet)] for c in m) for m in msgs]
    data = b"pre\n" + b"".join(m + b"\n" for m in msgs) + b"post\n"
    run = Run(b"-", b"-", b"-", len(msgs), data, 4, len(data) - 5, True)
    grep = re.compile(pattern)
    flt = Filter(start=0.0, end=1e10, tz=UTC, grep=grep)
    want = b"".join(m + b"\n" for m in msgs if grep.search(m))
    assert run_text(run, flt, True, line_search(grep)) == want


def test_own_time_is_the_receive_time_when_flagged_r_or_missing() -> None:
    """Issue 13: messages are selected by their own timestamp, by the receive time
    where flagged R (a timestamp too far off) or where they have none."""
    flt = Filter(start=HOUR_EPOCH, end=HOUR_EPOCH + 60, tz=UTC)
    stamped = b"<13>1 2026-11-26T01:00:30Z h app - - - in the range"
    recv = HOUR_EPOCH + 3000  # outside the range
    assert flt.message_time(stamped, b"-", recv) == HOUR_EPOCH + 30
    assert flt.wanted(stamped, b"-", recv, True)
    assert flt.message_time(stamped, b"R", recv) == recv
    assert not flt.wanted(stamped, b"R", recv, True)
    assert flt.message_time(b"<13>1 - h app - - - no time", b"-", HOUR_EPOCH + 5) == HOUR_EPOCH + 5
    assert flt.wanted(b"<13>1 - h app - - - no time", b"-", HOUR_EPOCH + 5, True)
    # RFC 3164: seconds, in the relay's zone ([staging] timezone).
    bsd = b"<13>Nov 26 02:00:30 h app: local time"
    berlin = Filter(start=HOUR_EPOCH, end=HOUR_EPOCH + 60, tz=ZoneInfo("Europe/Berlin"))
    assert berlin.message_time(bsd, b"-", recv) == HOUR_EPOCH + 30


@pytest.mark.skipif(not hasattr(time, "tzset"), reason="needs time.tzset")
def test_local_takes_the_offset_in_force_at_the_time_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--local in December for a July time: summer time (+02:00 in Berlin), not
    today's offset."""
    cfg = _cfg(tmp_path)
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    try:
        for day, utc in (("2026-07-01", "2026-07-01T10"), ("2026-12-01", "2026-12-01T11")):
            argv = ["--local", "--from", f"{day}T12:00", "--to", f"{day}T12:30:15"]
            assert _run(cfg, MemoryStore(), "ls", *argv) == 0
            err = capsys.readouterr().err
            assert f"{utc}:00:00Z to {utc}:30:15Z" in err, err
            assert "local time (CET/CEST)" in err
    finally:
        monkeypatch.undo()
        time.tzset()


def test_verify_names_a_fork_in_the_manifest_chain(tmp_path: Path) -> None:
    # The archiver's chain head is put back to an older one (a forged upload, or its
    # state restored from a backup): two manifests then follow the same predecessor.
    cfg = _cfg(tmp_path)
    store = MemoryStore()
    chain = cfg.relay.state_dir / "archive" / "chain.json"
    for h in range(2):
        stage_hour(cfg.relay.state_dir, h)
        assert Archiver(cfg, store).run_once()
    saved = chain.read_bytes()
    stage_hour(cfg.relay.state_dir, 2)
    assert Archiver(cfg, store).run_once()
    hours = ["2026-11-26T01", "2026-11-26T02", "2026-11-26T03", "2026-11-26T04"]
    assert verify_range(store, "syslog", hours, now=HOUR_EPOCH + 86400).problems == []
    chain.write_bytes(saved)
    stage_hour(cfg.relay.state_dir, 3)
    assert Archiver(cfg, store).run_once()
    problems = verify_range(store, "syslog", hours, now=HOUR_EPOCH + 86400).problems
    forks = [p for p in problems if p.startswith("chain forked:")]
    assert len(forks) == 1, problems
    assert "hour=03" in forks[0] and "hour=04" in forks[0] and "both have seq 3" in forks[0]
