"""Reading the archive back: time ranges, chunk listing, streamed records.

Chunks are decompressed as a stream (frame after frame) and records decoded
incrementally, so ``cat`` of a large chunk uses bounded memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import zstandard

from archive import manifest as mf
from archive.store import ObjectStore
from relay.record import MAX_RECORD_HEADER, Record, RecordError, decode_many
from relay.units import parse_duration

_READ = 1024 * 1024


class TimeSpecError(ValueError):
    pass


_FORMATS = ("%Y-%m-%dT%H", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d")


def parse_time(spec: str, now: datetime) -> datetime:
    """``2026-11-26T01``, ``2026-11-26T01:30``, ISO 8601 (``...Z``), ``now``, ``-2h``."""
    s = spec.strip()
    if s == "now":
        return now
    if s.startswith("-"):
        try:
            return now - timedelta(seconds=parse_duration(s[1:]))
        except ValueError as exc:
            raise TimeSpecError(f"bad relative time {spec!r}: {exc}") from None
    for fmt in _FORMATS:
        try:
            return datetime.strptime(s, fmt).replace(tzinfo=UTC)
        except ValueError:
            pass
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise TimeSpecError(
            f"bad time {spec!r}: use 2026-11-26T01, 2026-11-26T01:30, ISO 8601, now or -2h"
        ) from None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def hours_between(start: datetime, end: datetime) -> list[str]:
    """Every UTC hour from start's to end's, both included (``YYYY-MM-DDTHH``)."""
    h = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    last = end.astimezone(UTC)
    out: list[str] = []
    while h <= last and len(out) < 24 * 366 * 20:
        out.append(mf.hour_of(h))
        h += timedelta(hours=1)
    return out


@dataclass(frozen=True)
class ChunkRef:
    key: str
    size: int
    hour: str
    relay: str
    part: str

    @property
    def manifest_key(self) -> str:
        return mf.manifest_key_for_chunk(self.key)


@dataclass(frozen=True)
class Listing:
    chunks: list[ChunkRef]
    manifests: dict[str, int]  # manifest key -> size


def list_range(store: ObjectStore, prefix: str, hours: list[str]) -> Listing:
    chunks: list[ChunkRef] = []
    manifests: dict[str, int] = {}
    for hour in hours:
        hp = mf.hour_prefix(prefix, hour)
        for obj in store.list(hp):
            name = obj.key[len(hp) :]
            if "/" in name:
                continue
            if name.endswith(mf.CHUNK_SUFFIX):
                relay, _, part = name[: -len(mf.CHUNK_SUFFIX)].rpartition("-")
                chunks.append(ChunkRef(obj.key, obj.size, hour, relay, part))
            elif name.endswith(mf.MANIFEST_SUFFIX):
                manifests[obj.key] = obj.size
    return Listing(chunks, manifests)


def read_manifest(store: ObjectStore, key: str) -> tuple[mf.Manifest, bytes] | None:
    if store.head(key) is None:
        return None
    with store.open(key) as f:
        data = f.read()
    return mf.parse(data), data


def iter_chunk_bytes(store: ObjectStore, key: str) -> Iterator[bytes]:
    """The decompressed bytes of a chunk, in blocks."""
    with store.open(key) as f:
        reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        while True:
            block = reader.read(_READ)
            if not block:
                return
            yield block


def iter_records(blocks: Iterator[bytes]) -> Iterator[Record]:
    """Messages of a staging/chunk byte stream, format 1 or 2 (skips the header line).

    For format 2 the HOST of each Record is taken from its message, sanitized."""
    buf = bytearray()
    header_done = False
    for block in blocks:
        buf += block
        pos = 0
        if not header_done:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > MAX_RECORD_HEADER:
                    raise RecordError(0, "no header line")
                continue
            pos = nl + 1
            header_done = True
        with memoryview(buf) as mv:
            while pos < len(mv):
                # A format 2 block gives all its messages at once, a format 1 record one.
                recs, nxt = decode_many(mv, pos)
                if recs is None:
                    break
                yield from recs
                pos = nxt
        del buf[:pos]
    if buf:
        raise RecordError(0, "chunk ends inside a record")


def match(rec: Record, host: bytes | None, grep: re.Pattern[bytes] | None) -> bool:
    if host is not None and rec.host != host:
        return False
    return grep is None or grep.search(rec.msg) is not None
