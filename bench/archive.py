"""Archive scenario: staging hours -> zstd chunks -> S3 (local SeaweedFS).

The staging input is format 2 as the relay writes it: blocks of about 200
messages (one per TCP read), octet-counted, of realistic ~300-byte RFC 5424
messages from ``syslog-relay loadgen``'s templates (50 hosts, varied apps and
sizes), with an occasional LF block. It is written directly with
relay.record (no relay process: the archiver's speed is what is measured),
then compressed with the archiver's own code (archive.chunk.compress_staging)
and uploaded to a local SeaweedFS with boto3. Reported in MB/s of raw staging
bytes, with the compression ratio next to ``zstd -3`` on the same bytes.

``python -m bench.archive [--messages N] [--runs R] [--no-upload]`` runs it alone.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.receivers import Certs

MESSAGES = 500_000
BLOCK = 200  # messages per block: one TCP read of 64 KiB
FILES = 2


def write_staging(path: Path, messages: int, *, part: int = 0, seed: int = 1) -> None:
    """A format 2 staging file of ``messages`` loadgen messages in blocks of ~BLOCK."""
    from relay import record
    from relay.loadgen import LoadSpec, generate

    spec = LoadSpec(count=messages, connections=4, seed=seed)
    hour = "2026-11-26T01"
    recv0 = 1795654800.0  # 2026-11-26T01:00:00Z
    with open(path, "wb") as f:
        f.write(record.file_header("bench", hour, f"20261126T010000{part:06d}Z"))
        seq = 0
        nblock = 0
        while seq < messages:
            n = min(messages - seq, BLOCK - 17 + nblock % 35)  # blocks of 183..217
            conn = nblock % 4
            msgs = generate(spec, conn, range(seq, seq + n))
            recv = record.format_recv(recv0 + seq * 3599.0 / messages)
            sender = b"tcp://10.0.%d.%d:%d" % (conn, 10 + conn, 40000 + conn)
            if nblock % 50 == 49:  # some senders frame with LF
                payload = b"".join([m + b"\n" for m in msgs])
                framing = record.FRAMING_LF
            else:
                payload = record.octet_frames(msgs)
                framing = record.FRAMING_OCTET
            f.write(record.block_header(recv, sender, framing, b"-", n, payload))
            f.write(payload)
            f.write(b"\n")
            seq += n
            nblock += 1


def _staging(root: Path, messages: int = MESSAGES) -> list[Path]:
    d = root / "archive-staging"
    d.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(FILES):
        p = d / f"2026-11-26T01--{i}.stg"
        write_staging(p, messages // FILES, part=i, seed=i + 1)
        files.append(p)
    return files


def measure(files: list[Path], out: Path, runs: int = 3) -> dict[str, Any]:
    """Archiver and ``zstd -3`` on ``files``: best-of-``runs`` MB/s (CPU and wall), ratios."""
    from archive.chunk import compress_staging
    from relay.config import ArchiveConfig

    raw = sum(p.stat().st_size for p in files)
    rows: dict[str, Any] = {"raw_bytes": raw, "files": len(files), "ok": True}
    out.mkdir(parents=True, exist_ok=True)
    walls: list[float] = []
    cpus: list[float] = []
    comp = count = 0
    chunks: list[Path] = []
    for _ in range(runs):
        comp = count = 0
        chunks = []
        t = time.perf_counter()
        c = time.process_time()
        for p in files:
            dst = out / (p.name + ".zst")
            info = compress_staging(p, dst, level=3, frame_size=ArchiveConfig().frame_size)
            if info.damaged_at is not None:
                raise RuntimeError(f"{p}: archiver reports damage: {info.damage}")
            comp += info.compressed_size
            count += info.count
            chunks.append(dst)
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    rows["archiver_messages"] = count
    rows["archiver_compress_mb_s"] = raw / min(walls) / 1e6
    rows["archiver_compress_mb_s_runs"] = [round(raw / w / 1e6) for w in walls]
    rows["archiver_cpu_mb_s"] = raw / statistics.median(cpus) / 1e6
    rows["archiver_ratio"] = raw / comp
    rows["chunks"] = chunks

    zstd = shutil.which("zstd")
    if zstd:
        best = float("inf")
        zsize = 0
        for _ in range(runs):
            zsize = 0
            t = time.perf_counter()
            for p in files:
                r = subprocess.run(
                    [zstd, "-3", "-q", "-c", str(p)], capture_output=True, check=True
                )
                zsize += len(r.stdout)
            best = min(best, time.perf_counter() - t)
        rows["zstd3_mb_s"] = raw / best / 1e6
        rows["zstd3_ratio"] = raw / zsize
        rows["ratio_vs_zstd3"] = rows["archiver_ratio"] / rows["zstd3_ratio"]
    else:
        rows["zstd3"] = "zstd not installed"
    return rows


def archive_scenario(root: Path, certs: Certs | None = None) -> dict[str, Any]:
    try:
        files = _staging(root)
    except OSError as exc:
        return {"table": f"archive: FAILURE making staging input: {exc}", "ok": False}
    rows = measure(files, root / "chunks")
    chunks = rows.pop("chunks")
    rows["upload"] = _upload(root, chunks)
    if isinstance(rows["upload"], float):
        t_comp = rows["raw_bytes"] / rows["archiver_compress_mb_s"] / 1e6
        rows["archiver_end_to_end_mb_s"] = rows["raw_bytes"] / (t_comp + rows["upload"]) / 1e6
    rows["table"] = _table(rows)
    return rows


def _upload(root: Path, chunks: list[Path]) -> float | str:
    """Seconds to put every chunk into a fresh SeaweedFS bucket, or why not."""
    try:
        from tests.support.seaweed import SeaweedServer, find_weed

        server = SeaweedServer(find_weed(), root / "seaweed")
        server.start()
    except Exception as exc:
        return f"SeaweedFS unavailable: {exc}"
    except BaseException as exc:  # pytest's Failed when weed is missing
        return f"SeaweedFS unavailable: {exc}"
    try:
        bucket = server.new_bucket()
        client = server.client()
        t = time.perf_counter()
        for c in chunks:
            client.upload_file(str(c), bucket, c.name)
        return time.perf_counter() - t
    finally:
        server.stop()


def _table(r: dict[str, Any]) -> str:
    lines = [
        "| archive (staging -> zstd -> S3) | raw MB/s | ratio |",
        "|---|---:|---:|",
        f"| archiver compress (archive.chunk, level 3) | {r['archiver_compress_mb_s']:.0f} "
        f"| {r['archiver_ratio']:.2f} |",
        f"| archiver compress, per CPU second | {r['archiver_cpu_mb_s']:.0f} | |",
    ]
    if "zstd3_ratio" in r:
        lines.append(f"| zstd -3 (same bytes) | {r['zstd3_mb_s']:.0f} | {r['zstd3_ratio']:.2f} |")
    up = r["upload"]
    if isinstance(up, float):
        lines.append(
            f"| archiver compress + upload to SeaweedFS | {r['archiver_end_to_end_mb_s']:.0f} "
            f"| {r['archiver_ratio']:.2f} |"
        )
    else:
        lines.append(f"| upload to SeaweedFS | {up} | |")
    lines.append(
        f"({r['raw_bytes'] / 1e6:.0f} MB raw format 2 staging, {r['archiver_messages']} messages "
        f"in {r['files']} file(s); wall MB/s best of {len(r['archiver_compress_mb_s_runs'])})"
    )
    if "ratio_vs_zstd3" in r:
        lines.append(f"(archiver ratio / zstd -3 ratio: {r['ratio_vs_zstd3']:.3f})")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=MESSAGES)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--no-upload", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files = _staging(root, args.messages)
        rows = measure(files, root / "chunks", args.runs)
        chunks = rows.pop("chunks")
        rows["upload"] = "skipped" if args.no_upload else _upload(root, chunks)
        print(_table(rows))
        print(
            "archiver runs (MB/s wall):",
            rows["archiver_compress_mb_s_runs"],
            f"CPU-time MB/s: {rows['archiver_cpu_mb_s']:.0f}",
        )


if __name__ == "__main__":
    main()
