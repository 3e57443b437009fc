"""``cat`` in forked worker processes (archive.workers) against ``cat`` in threads.

The searches (--grep, field filters, --json) run in worker processes; what
they print, in which order, and how a damaged source is reported must be what
the in-process threads give. Workers.run is also driven directly: a reader
that stops mid-source, a worker that dies, errors in the source's place.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from archive import manifest as mf
from archive import workers
from archive.cli import _parser, run_command
from archive.daemon import Archiver
from archive.query import Source, SourceError, ordered
from archive.store import MemoryStore
from relay.config import Config
from tests.test_archive_helpers import (
    HOUR,
    HOUR_EPOCH,
    mixed_traffic,
    part_at,
    write_config,
    write_staging_v2,
)

RANGE = ["--from", "2026-11-26T00", "--to", "2026-11-26T03"]


def _archive(tmp_path: Path) -> tuple[Config, MemoryStore]:
    """Five chunks of one hour; the third damaged two thirds in, the fourth with a
    manifest count that does not match."""
    cfg = write_config(tmp_path / "c.toml", tmp_path / "state")
    store = MemoryStore()
    for i in range(5):
        msgs = mixed_traffic(1500, seed=i + 1)
        write_staging_v2(cfg.relay.state_dir, "relay1", HOUR, part_at(HOUR_EPOCH + 10 * i), msgs)
    assert Archiver(cfg, store).run_once()
    chunks = sorted(k for k in store.objects if k.endswith(".log.zst"))
    assert len(chunks) == 5
    data, meta = store.objects[chunks[2]]
    cut = len(data) * 2 // 3
    store.objects[chunks[2]] = (data[:cut] + bytes([data[cut] ^ 0xFF]) + data[cut + 1 :], meta)
    mkey = mf.manifest_key_for_chunk(chunks[3])
    d = json.loads(store.objects[mkey][0])
    d["count"] -= 1
    store.objects[mkey] = (json.dumps(d).encode(), store.objects[mkey][1])
    return cfg, store


def _cat(
    cfg: Config, store: MemoryStore, capsysbinary: pytest.CaptureFixture[bytes], *argv: str
) -> tuple[int, bytes, list[str]]:
    args = _parser().parse_args(["cat", "--config", str(cfg.source), *RANGE, *argv])
    code = run_command(args, lambda _cfg: store)
    out = capsysbinary.readouterr()
    errors = [e for e in out.err.decode().splitlines() if "s3://" in e and "chunk(s)" not in e]
    return code, out.out, errors


@pytest.mark.parametrize(
    "argv",
    [
        ["--grep", "sshd"],
        ["--grep", r"status=\d0[04]"],
        ["--host", "web03"],
        ["--severity", "err", "--grep", "a"],
        ["--json", "--app", "postfix/smtp"],
    ],
)
def test_workers_print_what_threads_print(
    tmp_path: Path,
    capsysbinary: pytest.CaptureFixture[bytes],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
) -> None:
    cfg, store = _archive(tmp_path)
    started: list[int] = []
    start = workers.start

    def spy(work: workers.Work, n: int) -> workers.Workers | None:
        w = start(work, n)
        started.append(0 if w is None else len(w))
        return w

    monkeypatch.setattr(workers, "start", spy)
    in_processes = _cat(cfg, store, capsysbinary, *argv, "--parallel", "3")
    in_threads = _cat(cfg, store, capsysbinary, *argv, "--parallel", "1")
    assert started == [3, 0]
    assert in_processes == in_threads
    code, out, errors = in_processes
    assert code == 1 and out
    # The damaged chunk and the one that does not match its manifest: one line each
    # (the host filter skips the chunks whose manifest lacks the host).
    assert 1 <= len(errors) <= 2 and "Traceback" not in "".join(errors)


def _src(part: str) -> Source:
    return Source(HOUR, "r", part, f"test:{part}", 0)


def _work(src: Source) -> Iterator[bytes]:
    for i in range(3):
        yield b"%s-%d\n" % (src.part.encode(), i)
        if src.part == "bad" and i == 1:
            raise SourceError(src, "damaged here")
        if src.part == "boom" and i == 1:
            raise ValueError("no such thing")


def _start(n: int) -> workers.Workers:
    w = workers.start(_work, n)
    if w is None:
        pytest.fail(f"archive.workers refused to fork beside threads: {threading.enumerate()}")
    return w


def test_pieces_and_errors_in_source_order() -> None:
    w = _start(2)
    try:
        sources = [_src(p) for p in ("a", "bad", "b", "boom", "c")]
        got = list(ordered(sources, w.run, workers=len(w)))
    finally:
        w.close()
    out = [(s.part, p if isinstance(p, bytes) else p.reason) for s, p in got]
    assert out == [
        *[("a", b"a-%d\n" % i) for i in range(3)],
        ("bad", b"bad-0\n"),
        ("bad", b"bad-1\n"),
        ("bad", "damaged here"),
        *[("b", b"b-%d\n" % i) for i in range(3)],
        ("boom", b"boom-0\n"),
        ("boom", b"boom-1\n"),
        ("boom", "ValueError: no such thing"),
        *[("c", b"c-%d\n" % i) for i in range(3)],
    ]


def test_a_reader_that_stops_mid_source_loses_only_that_worker() -> None:
    w = _start(2)
    try:
        it = w.run(_src("a"))
        assert next(it) == b"a-0\n"
        it.close()  # `| head`: the rest of "a" is left in the worker's pipe
        # The other worker, then the lost one's slot, read in this process.
        for part in ("b", "c", "d"):
            assert list(w.run(_src(part))) == [b"%s-%d\n" % (part.encode(), i) for i in range(3)]
    finally:
        w.close()
    assert all(p.exitcode is not None for p, _ in w._workers)


def test_a_worker_that_dies_is_one_error() -> None:
    w = _start(2)
    try:
        proc, _ = w._workers[0]  # the first to be taken
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        with pytest.raises(SourceError, match="worker process"):
            list(w.run(_src("a")))
        assert list(w.run(_src("b"))) == [b"b-0\n", b"b-1\n", b"b-2\n"]
    finally:
        w.close()


def test_no_fork_while_another_thread_runs() -> None:
    stop = threading.Event()
    t = threading.Thread(target=stop.wait)
    t.start()
    try:
        assert workers.start(_work, 2) is None
    finally:
        stop.set()
        t.join()
    assert workers.start(_work, 1) is None  # one worker: threads do as well
