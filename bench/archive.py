"""Archive scenario: staging hours -> zstd chunks -> S3 (local SeaweedFS).

The staging input is made by this relay from loadgen traffic, then compressed
with the archiver's own code (archive.chunk.compress_staging) and uploaded to a
local SeaweedFS with boto3. Reported in MB/s of raw staging bytes, with the
compression ratio next to ``zstd -3`` on the same bytes.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.receivers import Certs, Relay, Scenario, Unavailable

MESSAGES = 500_000


def _staging(root: Path, certs: Certs) -> list[Path]:
    from bench.run import _free_port, _loadgen

    sc = Scenario("archive input", "tcp", "octet-counting", 4, MESSAGES)
    port = _free_port(False)
    rx = Relay(root / "archive-relay", port, sc, certs)
    rx.start()
    try:
        lg = _loadgen(sc, port, certs)
        if lg["sent"] != MESSAGES:
            raise RuntimeError(f"loadgen sent {lg['sent']} of {MESSAGES}")
        time.sleep(1.5)
    finally:
        rx.stop()
    return rx._files()


def archive_scenario(root: Path, certs: Certs) -> dict[str, Any]:
    try:
        files = _staging(root, certs)
    except (Unavailable, RuntimeError, OSError) as exc:
        return {"table": f"archive: FAILURE making staging input: {exc}", "ok": False}
    raw = sum(p.stat().st_size for p in files)
    rows: dict[str, Any] = {"raw_bytes": raw, "files": len(files), "ok": True}
    try:
        from archive.chunk import compress_staging
    except ImportError as exc:
        return {"table": f"archive: not available yet ({exc})", "ok": False}

    out = root / "chunks"
    out.mkdir()
    t = time.perf_counter()
    comp = 0
    chunks = []
    for p in files:
        dst = out / (p.name + ".zst")
        info = compress_staging(p, dst, level=3, frame_size=4 * 1024 * 1024)
        comp += info.compressed_size
        chunks.append(dst)
    t_comp = time.perf_counter() - t
    rows["archiver_compress_mb_s"] = raw / t_comp / 1e6
    rows["archiver_ratio"] = raw / comp

    zstd = shutil.which("zstd")
    if zstd:
        t = time.perf_counter()
        zsize = 0
        for p in files:
            r = subprocess.run([zstd, "-3", "-q", "-c", str(p)], capture_output=True, check=True)
            zsize += len(r.stdout)
        rows["zstd3_mb_s"] = raw / (time.perf_counter() - t) / 1e6
        rows["zstd3_ratio"] = raw / zsize
    else:
        rows["zstd3"] = "zstd not installed"

    rows["upload"] = _upload(root, chunks)
    if isinstance(rows["upload"], float):
        rows["archiver_end_to_end_mb_s"] = raw / (t_comp + rows["upload"]) / 1e6
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
    lines.append(f"({r['raw_bytes'] / 1e6:.0f} MB raw staging in {r['files']} file(s))")
    return "\n".join(lines)
