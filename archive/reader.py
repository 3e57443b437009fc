"""Reading the archive back: time ranges, chunk listing, streamed runs of messages.

Chunks are decompressed as a stream (frame after frame) and decoded
incrementally, so ``cat`` of a large chunk uses bounded memory. Both chunk
formats and staging files come out as ``Run``s: messages of one block that
share receive time, sender and flags, with the lines of a plain chunk's
verbatim block kept as one slice so that a filter can search them whole.
"""

from __future__ import annotations

import re
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import IO

import zstandard

from archive import manifest as mf
from archive import plain
from archive.store import NotFound, ObjectStore
from relay.formats.staging_block import (
    MAX_RECORD_HEADER,
    Record,
    RecordError,
    decode_block,
    decode_many,
    split_payload,
)
from relay.units import parse_duration

_READ = 1024 * 1024


class TimeSpecError(ValueError):
    pass


_FORMATS = ("%Y-%m-%dT%H", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d")


def parse_time(spec: str, now: datetime, zone: tzinfo | None = UTC) -> datetime:
    """``2026-11-26T01``, ``2026-11-26T01:30``, ISO 8601 (``...Z``), ``now``, ``-2h``.

    A time without a zone is taken in ``zone``; None: this machine's zone, with the
    offset in force at that time (summer time), not today's."""
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
            return _in_zone(datetime.strptime(s, fmt), zone)
        except ValueError:
            pass
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise TimeSpecError(
            f"bad time {spec!r}: use 2026-11-26T01, 2026-11-26T01:30, ISO 8601, now or -2h"
        ) from None
    return _in_zone(dt, zone) if dt.tzinfo is None else dt.astimezone(UTC)


def _in_zone(naive: datetime, zone: tzinfo | None) -> datetime:
    # A naive datetime's astimezone() asks the C library (mktime) for its offset.
    return (naive if zone is None else naive.replace(tzinfo=zone)).astimezone(UTC)


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
    """The manifest at ``key`` and its bytes; None when there is none (one GET, no HEAD)."""
    try:
        with store.open(key) as f:
            data = f.read()
    except NotFound:
        return None
    return mf.parse(data), data


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


# --- runs: the common shape of plain chunks, format 1 chunks and staging --------


@dataclass(slots=True)
class Run:
    """Messages of one block: ``data[start:end]`` are their lines when ``lines`` is
    true (a plain chunk's verbatim block: one message per line, each LF-ended),
    otherwise ``msgs`` holds them."""

    recv: bytes
    sender: bytes
    flags: bytes
    count: int
    data: bytes
    start: int
    end: int
    lines: bool
    msgs: list[bytes] | None = None
    # False: more of its data frame follows, whose checksum is not checked yet
    # (archive.plain.read_segments); output up to here may still prove damaged.
    frame_end: bool = True

    def messages(self) -> list[bytes]:
        if self.msgs is None:
            self.msgs = self.data[self.start : self.end - 1].split(b"\n") if self.count else []
            if len(self.msgs) != self.count:
                raise plain.PlainError(0, f"a block holds {len(self.msgs)} lines, not {self.count}")
        return self.msgs


class _Prefixed:
    """A stream with some bytes already read put back in front."""

    def __init__(self, prefix: bytes, f: IO[bytes]) -> None:
        self.prefix = prefix
        self.f = f

    def read(self, n: int = -1) -> bytes:
        if self.prefix:
            if n < 0:
                out = self.prefix + self.f.read()
                self.prefix = b""
                return out
            out, self.prefix = self.prefix[:n], self.prefix[n:]
            return out
        return self.f.read(n)


def _stream_blocks(f: IO[bytes] | _Prefixed) -> Iterator[bytes]:
    reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)  # type: ignore[arg-type]
    while True:
        block = reader.read(_READ)
        if not block:
            return
        yield block


def plain_runs(segments: Iterator[plain.Segment], lines_only: bool = False) -> Iterator[Run]:
    """Runs of a plain chunk's segments; PlainError when a block does not add up.

    ``lines_only``: verbatim blocks next to each other in a segment come as one
    Run, with the receive time, sender and flags of the first, for a caller
    that needs only their lines (fewer, longer texts to search)."""
    for seg in segments:
        last: Run | None = None
        for e, start, end in seg.blocks():
            if e.damaged:
                if last is not None:
                    yield last
                raise plain.PlainError(
                    seg.offset, "the staging file was damaged here; the rest is kept undecoded"
                )
            if e.count == 0:
                continue
            # The data frame's checksum vouches for the bytes; the line count is
            # checked when the lines are split (Run.messages), not for a whole-block pass.
            if seg.data[end - 1 : end] != b"\n":
                raise plain.PlainError(seg.offset, "a block's lines do not match its metadata")
            if lines_only and last is not None and last.lines and not e.escaped:
                last.end = end
                last.count += e.count
                continue
            if last is not None:
                yield last
            if e.escaped:
                msgs = plain.messages(e, seg.data, start, end)
                last = Run(e.recv, e.sender, e.flags, e.count, seg.data, start, end, False, msgs)
            else:
                last = Run(e.recv, e.sender, e.flags, e.count, seg.data, start, end, True)
            last.frame_end = False
        if last is not None:
            last.frame_end = seg.frame_end
            yield last


def record_runs(records: Iterator[Record]) -> Iterator[Run]:
    """Format 1 chunks and staging: one run per message (the shapes are mixed)."""
    for rec in records:
        yield Run(rec.recv, rec.sender, rec.flags, 1, b"", 0, 0, False, [rec.msg])


def stream_runs(
    f: IO[bytes], head: dict[str, str] | None = None, lines_only: bool = False
) -> Iterator[Run]:
    """Runs of a chunk object of either format, read from ``f`` (``lines_only``: see
    plain_runs).

    A plain chunk whose metadata frames are missing (recompressed with plain
    ``zstd``) gives its lines as stored, one message each (escaping not
    reversed, no receive time), then raises plain.MissingMetadata.
    """
    first = f.read(8)
    src = _Prefixed(first, f)
    if plain.is_plain(first):
        segments = plain.read_segments(src, head)  # type: ignore[arg-type]
        try:
            yield from plain_runs(segments, lines_only)
            return
        except plain.MissingMetadata as exc:
            missing = exc
        blocks = _stream_blocks(src)
    else:
        blocks = _stream_blocks(src)
        start = b""
        for block in blocks:
            start = block
            break
        if start.startswith(b"#syslog-relay-staging/"):
            yield from record_runs(iter_records(_chain(start, blocks)))
            return
        missing = plain.MissingMetadata(0, "no metadata frames (recompressed?)")
        blocks = _chain(start, blocks)
    yield from _bare_lines(blocks)
    raise plain.MissingMetadata(
        missing.offset, f"{missing.reason}: lines given as stored, without receive time or flags"
    )


def _chain(first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    if first:
        yield first
    yield from rest


def _bare_lines(blocks: Iterator[bytes]) -> Iterator[Run]:
    tail = b""
    for block in blocks:
        data = tail + block
        end = data.rfind(b"\n") + 1
        tail = data[end:]
        if end:
            n = data.count(b"\n", 0, end)
            yield Run(b"-", b"-", b"?", n, data, 0, end, True)
    if tail:
        yield Run(b"-", b"-", b"?", 1, tail + b"\n", 0, len(tail) + 1, True)


def iter_chunk_runs(store: ObjectStore, key: str, lines_only: bool = False) -> Iterator[Run]:
    with store.open(key) as f:
        yield from stream_runs(f, lines_only=lines_only)


def staging_runs(f: IO[bytes], complete: bool) -> Iterator[Run]:
    """Runs of a staging file (format 1 or 2) from its start. ``complete`` false: a
    file still being written, whose incomplete last block is left for later."""
    buf = bytearray()
    header_done = False
    while True:
        block = f.read(_READ * 4)
        if not block:
            break
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
        pos = yield from decode_staging(buf, pos)
        del buf[:pos]
    if buf and complete:
        raise RecordError(0, "staging file ends inside a block")


def decode_staging(buf: bytearray, pos: int) -> Generator[Run, None, int]:
    with memoryview(buf) as mv:
        while pos < len(mv):
            if mv[pos] == 0x40:  # "@": a format 2 block
                header, payload, nxt = decode_block(mv, pos)
                if header is None:
                    break
                recv, sender, framing, flags, count = header
                msgs = split_payload(payload, framing, pos)
                if len(msgs) != count:
                    raise RecordError(pos, "block count does not match")
                yield Run(recv, sender, flags, count, b"", 0, 0, False, msgs)
            else:
                recs, nxt = decode_many(mv, pos)
                if recs is None:
                    break
                yield from record_runs(iter(recs))
            pos = nxt
    return pos
