"""Compress one staging file into a chunk: independent zstd frames, streamed.

The staging file is read in blocks and cut into frames of ``frame_size`` raw
bytes, each compressed on its own: memory stays bounded by one frame plus one
record whatever the file size, and any frame can be decompressed alone. The
bytes are the staging file unchanged (header line included), so the chunk's
raw SHA-256 is the staging file's. Records are decoded on the way through only
to count them and collect times and hosts for the manifest.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import zstandard

from relay.record import MAX_RECORD_HEADER, RecordError, decode, parse_file_header

_READ_BLOCK = 1024 * 1024
# The relay caps messages at 16 MiB ([limits] max_message_size); a record that
# claims more is damage, and must not make the scanner buffer the whole file.
_MAX_RECORD = 16 * 1024 * 1024 + MAX_RECORD_HEADER + 1


class ChunkError(Exception):
    """The staging file cannot be archived (not a staging file at all)."""


@dataclass(frozen=True)
class ChunkInfo:
    relay: str
    hour: str
    part: str
    count: int
    first_recv: str | None
    last_recv: str | None
    hosts: tuple[str, ...]
    raw_size: int
    raw_sha256: str
    compressed_size: int
    compressed_sha256: str
    level: int
    frame_size: int
    frames: int
    # Offset and reason of the first undecodable record, if any: the bytes
    # are archived anyway (nothing is dropped), but the manifest says so.
    damaged_at: int | None = None
    damage: str | None = None


class _RecordScanner:
    """Incremental record statistics over a byte stream (after the header)."""

    def __init__(self, base: int) -> None:
        self.buf = bytearray()
        self.base = base  # file offset of buf[0]
        self.count = 0
        self.first: bytes | None = None
        self.last: bytes | None = None
        self.hosts: set[bytes] = set()
        self.damaged_at: int | None = None
        self.damage: str | None = None

    def feed(self, data: bytes) -> None:
        if self.damaged_at is not None:
            return
        self.buf += data
        pos = 0
        try:
            with memoryview(self.buf) as mv:
                while pos < len(mv):
                    rec, nxt = decode(mv, pos)
                    if rec is None:
                        break
                    self.count += 1
                    if self.first is None:
                        self.first = rec.recv
                    self.last = rec.recv
                    self.hosts.add(rec.host)
                    pos = nxt
        except RecordError as exc:
            self.damaged_at = self.base + exc.offset
            self.damage = exc.reason
            self.buf = bytearray()
            return
        del self.buf[:pos]
        self.base += pos
        if len(self.buf) > _MAX_RECORD:
            self.damaged_at = self.base
            self.damage = "record longer than the largest possible message"
            self.buf = bytearray()

    def finish(self) -> None:
        if self.damaged_at is None and self.buf:
            self.damaged_at = self.base
            self.damage = "incomplete last record"


def compress_staging(src: Path, dst: Path, *, level: int, frame_size: int) -> ChunkInfo:
    """Write the chunk for staging file ``src`` to ``dst`` (fsynced) and describe it."""
    raw_hash = hashlib.sha256()
    comp_hash = hashlib.sha256()
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True)
    raw_size = comp_size = frames = 0
    pending = bytearray()

    with open(src, "rb") as f_in, open(dst, "wb") as f_out:
        head = f_in.read(MAX_RECORD_HEADER)
        nl = head.find(b"\n")
        if nl < 0:
            raise ChunkError(f"{src}: no staging header line")
        try:
            fields = parse_file_header(head[:nl])
        except RecordError as exc:
            raise ChunkError(f"{src}: {exc.reason}") from exc
        scanner = _RecordScanner(nl + 1)

        def emit(block: bytes) -> None:
            nonlocal comp_size, frames
            frame = compressor.compress(block)
            f_out.write(frame)
            comp_hash.update(frame)
            comp_size += len(frame)
            frames += 1

        data = head
        first = True
        while data:
            raw_hash.update(data)
            raw_size += len(data)
            scanner.feed(data[nl + 1 :] if first else data)
            first = False
            pending += data
            while len(pending) >= frame_size:
                emit(bytes(pending[:frame_size]))
                del pending[:frame_size]
            data = f_in.read(_READ_BLOCK)
        if pending:
            emit(bytes(pending))
        scanner.finish()
        f_out.flush()
        os.fsync(f_out.fileno())

    def text(b: bytes | None) -> str | None:
        return None if b is None else b.decode("ascii", "replace")

    return ChunkInfo(
        relay=fields.get("relay", ""),
        hour=fields.get("hour", ""),
        part=fields.get("part", ""),
        count=scanner.count,
        first_recv=text(scanner.first),
        last_recv=text(scanner.last),
        hosts=tuple(sorted(h.decode("ascii", "replace") for h in scanner.hosts)),
        raw_size=raw_size,
        raw_sha256=raw_hash.hexdigest(),
        compressed_size=comp_size,
        compressed_sha256=comp_hash.hexdigest(),
        level=level,
        frame_size=frame_size,
        frames=frames,
        damaged_at=scanner.damaged_at,
        damage=scanner.damage,
    )
