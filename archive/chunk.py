"""Compress one staging file into a plain chunk (archive.plain): streamed, frame by frame.

The staging file is read ``frame_size`` raw bytes at a time; each block's
messages become lines (a verbatim LF-framed payload as it is, an octet-counted
one joined with LF, the rare block with LF or CR inside a message escaped) and
its header an entry of the metadata frame. When ``frame_size`` bytes of lines
are pending they are compressed as one independent zstd frame behind their
metadata frame: memory stays bounded by a staging frame plus a data frame
whatever the file size, and any data frame can be decompressed alone. The
chunk's raw SHA-256 and size are those of the lines (what ``zstdcat`` gives).
Bytes after damage in the staging file are kept unchanged in a damaged entry.

Blocks and records are decoded on the way through to make lines, count messages and
collect times and hosts for the manifest. Format 2 blocks carry their count
and receive time in the header, so the scanner's cost is per block but for
octet-counted payloads, walked frame by frame (a cache of frame starts finds
the host at a known offset) to take each message and its host. LF-framed
payloads are already lines: one pattern over the block finds every RFC 5424
HOSTNAME at once, and only a block with a line it does not match goes
message by message (``_HOST_5424``, then ``message_host`` for anything else:
the same answer). Hosts are sanitized once each, at the end.
"""

from __future__ import annotations

import hashlib
import operator
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import zstandard

from archive import plain
from relay.formats.rfc5424 import HEAD_PATTERN
from relay.formats.routing_fields import message_host
from relay.formats.staging_block import (
    BLOCK_MARK,
    FRAMING_LF,
    FRAMING_OCTET,
    MAX_BLOCK,
    MAX_RECORD_HEADER,
    RecordError,
    decode,
    parse_block_header,
    parse_file_header,
    sanitize_host,
    split_payload,
)

# First look-ahead into the next frame for a block cut by a frame boundary.
_JOIN_STEP = 64 * 1024
_MAX_HOSTNAME = 255

# The RFC 5424 branch of relay.formats.routing_fields.message_host as one pattern: the header's
# shape up to TIMESTAMP (relay.formats.rfc5424.HEAD_PATTERN), TIMESTAMP up to the next space,
# then a non-empty HOSTNAME followed by a space. A message it does not match goes
# through message_host itself; "-" and over-long names are mapped at the end.
_HOST = rb"[^ ]* ([^ ]+) "
_HOST_5424 = re.compile(HEAD_PATTERN + _HOST)
# The same after every LF of LF + a block's lines (no message there holds LF). The
# leading LF, not a MULTILINE "^", lets the engine jump from line start to line start;
# no part of the match may cross a line.
_HOST_LINES = re.compile(rb"\n" + (HEAD_PATTERN + _HOST).replace(b"[^", b"[^\n"))
# After an octet count: one call per frame gives its length and host.
_FRAME_5424 = re.compile(rb"([0-9]{1,10}) (?:" + HEAD_PATTERN + _HOST + rb")?")
_GROUP1 = operator.itemgetter(1)
# Frame start (count, PRI, hour) -> (frame length, HOSTNAME offset, message offset);
# see _octet_hosts.
_FRAME_KEY = 25
_FRAME_CACHE_MAX = 65536


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
    # Messages per host (sanitized), and the chunk format written (archive.plain).
    host_counts: dict[str, int] = field(default_factory=dict)
    chunk_format: int = plain.CHUNK_FORMAT


class _RecordScanner:
    """Incremental message statistics over the frames of a staging file.

    ``feed`` takes each frame as read; a block or record cut by the end of a
    frame is kept (``tail``) and completed from the start of the next one, so
    nothing but that one block is ever copied.
    """

    def __init__(self, base: int) -> None:
        self.tail = b""
        self.base = base  # file offset of tail[0], or of the next frame's first scanned byte
        self.count = 0
        self.first: bytes | None = None
        self.last: bytes | None = None
        self.hosts: Counter[bytes] = Counter()  # sanitized (format 1 HOST fields)
        self.raw_hosts: Counter[bytes | None] = Counter()  # as message_host gives them
        self._frames: dict[bytes, tuple[int, int, int]] = {}
        # Output of the scan: lines and metadata entries not yet written (archive.plain).
        self.lines: list[bytes] = []
        self.entries: list[bytes] = []
        self.pending = 0
        self.damaged_at: int | None = None
        self.damage: str | None = None

    def feed(self, data: bytes, start: int = 0) -> None:
        """Scan ``data[start:]``, the bytes that follow everything fed so far."""
        if self.damaged_at is not None:
            return
        pos = start
        base = self.base - start  # file offset of data[0]
        if self.tail:
            tail = self.tail
            step = _JOIN_STEP
            try:
                while True:
                    joined = tail + data[start : start + step]
                    done = self._scan(joined, 0)
                    if done or start + step >= len(data):
                        break
                    step *= 4
            except RecordError as exc:
                self._damaged(self.base + exc.offset, exc.reason)
                return
            if not done:
                self._keep(joined, 0, self.base)
                return
            base = self.base + len(tail) - start
            pos = start + done - len(tail)
        try:
            end = self._scan(data, pos)
        except RecordError as exc:
            self._damaged(base + exc.offset, exc.reason)
            return
        self._keep(data, end, base)

    def _keep(self, data: bytes, end: int, base: int) -> None:
        """Carry ``data[end:]`` (an incomplete block; ``data`` starts at file offset ``base``)."""
        self.base = base + end
        self.tail = data[end:]
        if len(self.tail) > MAX_BLOCK:
            self._damaged(self.base, "record longer than the largest possible message")

    def _damaged(self, offset: int, reason: str) -> None:
        self.damaged_at = offset
        self.damage = reason
        self.tail = b""

    def finish(self) -> None:
        if self.damaged_at is None and self.tail:
            self._damaged(self.base, "incomplete last record")

    def host_counts(self) -> dict[str, int]:
        counts: Counter[bytes] = Counter(self.hosts)
        for h, n in self.raw_hosts.items():
            h2 = sanitize_host(None if h == b"-" or (h and len(h) > _MAX_HOSTNAME) else h)
            counts[h2] += n
        return {h.decode("ascii", "replace"): n for h, n in sorted(counts.items()) if n}

    def host_names(self) -> list[str]:
        return list(self.host_counts())

    def _emit(
        self,
        recv: bytes,
        sender: bytes,
        framing: bytes,
        flags: bytes,
        count: int,
        lines: bytes,
        esc: bytes,
    ) -> None:
        self.lines.append(lines)
        self.entries.append(plain.entry(recv, sender, framing, flags, count, len(lines), esc))
        self.pending += len(lines)

    def take(self) -> tuple[list[bytes], list[bytes]]:
        """The lines and entries scanned since the last call."""
        out = self.lines, self.entries
        self.lines, self.entries, self.pending = [], [], 0
        return out

    def _scan(self, buf: bytes, pos: int) -> int:
        """Account every complete block/record of ``buf`` from ``pos``; return where the
        first incomplete one starts. RecordError offsets are relative to ``buf``."""
        n = len(buf)
        find = buf.find
        with memoryview(buf) as mv:
            while pos < n:
                if buf[pos] != BLOCK_MARK:
                    rec, nxt = decode(mv, pos)
                    if rec is None:
                        return pos
                    self.count += 1
                    if self.first is None:
                        self.first = rec.recv
                    self.last = rec.recv
                    self.hosts[rec.host] += 1
                    if plain.needs_escape(rec.msg):
                        line, esc = plain.escape(rec.msg) + b"\n", plain.ESC_LINES
                    else:
                        line, esc = rec.msg + b"\n", plain.ESC_NONE
                    self._emit(rec.recv, rec.sender, b"l", rec.flags, 1, line, esc)
                    pos = nxt
                    continue
                nl = find(b"\n", pos, pos + MAX_RECORD_HEADER)
                if nl < 0:
                    if n - pos < MAX_RECORD_HEADER:
                        return pos
                    raise RecordError(pos, "block header line too long")
                header, length, crc = parse_block_header(buf[pos + 1 : nl], pos)
                if crc is None:
                    raise RecordError(pos, "bad block checksum field")
                recv, sender, framing, flags, count = header
                p_start = nl + 1
                p_end = p_start + length
                if p_end >= n:
                    return pos
                if buf[p_end] != 0x0A:
                    raise RecordError(pos, "block not terminated by LF after its length")
                if zlib.crc32(mv[p_start:p_end]) != crc:
                    raise RecordError(pos, "block checksum mismatch")
                payload = buf[p_start:p_end]
                lines, esc = self._block_lines(payload, framing, count, pos)
                self._emit(recv, sender, framing, flags, count, lines, esc)
                if count:
                    self.count += count
                    if self.first is None:
                        self.first = recv
                    self.last = recv
                pos = p_end + 1
        return pos

    def _block_lines(
        self, payload: bytes, framing: bytes, count: int, offset: int
    ) -> tuple[bytes, bytes]:
        """Check that ``payload`` holds ``count`` messages and collect their hosts;
        return the block's lines and their ESC (archive.plain).

        An LF-framed payload is its own lines: one MULTILINE-like pattern over it
        finds every RFC 5424 HOSTNAME at once, and only a block with a line it
        does not match goes message by message. An octet-counted payload is walked
        frame by frame (``_octet_hosts``, the host taken on the way) and its
        messages joined with LF. A block with LF or CR inside a message is escaped.
        """
        if framing == FRAMING_OCTET:
            msgs = self._octet_hosts(payload, offset)
            if len(msgs) != count:
                raise RecordError(
                    offset, f"block holds {len(msgs)} messages, its header says {count}"
                )
            if plain.needs_escape(payload):
                return b"".join([plain.escape(m) + b"\n" for m in msgs]), plain.ESC_LINES
            msgs.append(b"")  # one join gives every line its LF
            return b"\n".join(msgs), plain.ESC_NONE
        if framing == FRAMING_LF and payload[-1:] == b"\n" and b"\r" not in payload:
            n = payload.count(b"\n")
            if n != count:
                raise RecordError(offset, f"block holds {n} messages, its header says {count}")
            hosts = _HOST_LINES.findall(b"\n" + payload)
            if len(hosts) == n:
                self.raw_hosts.update(hosts)
            else:
                self._message_hosts(payload[:-1].split(b"\n"))
            return payload, plain.ESC_NONE
        msgs = split_payload(payload, framing, offset)
        if len(msgs) != count:
            raise RecordError(offset, f"block holds {len(msgs)} messages, its header says {count}")
        self._message_hosts(msgs)
        # LF-framed messages never hold LF; CR (CRLF senders) they may.
        return b"".join([plain.escape(m) + b"\n" for m in msgs]), plain.ESC_LINES

    def _message_hosts(self, msgs: list[bytes]) -> None:
        found = list(map(_HOST_5424.match, msgs))
        self.raw_hosts.update(map(_GROUP1, filter(None, found)))
        if None in found:
            raw_hosts = self.raw_hosts
            for m, mo in zip(msgs, found, strict=True):
                if mo is None:
                    raw_hosts[message_host(m)] += 1

    def _octet_hosts(self, payload: bytes, offset: int) -> list[bytes]:
        """Walk an octet-counted payload, collecting hosts; return the messages.

        Frames that start like an earlier one (same count, PRI and hour: the first
        _FRAME_KEY bytes) have their HOSTNAME at the same offset when the timestamp
        ends where it did: two searches and a slice per message. Anything else
        takes one pattern match (count and host) and teaches the cache.
        """
        find = payload.find
        get = self._frames.get
        hosts: list[bytes | None] = []
        add = hosts.append
        msgs: list[bytes] = []
        keep = msgs.append
        n = len(payload)
        i = 0
        while i < n:
            e = get(payload[i : i + _FRAME_KEY])
            if e is not None:
                flen, hoff, moff = e
                end = i + flen
                h0 = i + hoff
                if end <= n and find(b" ", i + _FRAME_KEY, h0) == h0 - 1:
                    he = find(b" ", h0, end)
                    if he > h0:
                        add(payload[h0:he])
                        keep(payload[i + moff : end])
                        i = end
                        continue
            mo = _FRAME_5424.match(payload, i)
            if mo is None:
                raise RecordError(offset, "bad octet count inside a block")
            digits, host = mo.groups()
            start = i + len(digits) + 1
            end = start + int(digits)
            if end > n:
                raise RecordError(offset, "octet-counted frame runs past the block")
            if host is not None and mo.end() <= end:
                add(host)
                h0 = mo.start(2)
                if h0 - 1 >= i + _FRAME_KEY and len(self._frames) < _FRAME_CACHE_MAX:
                    self._frames[payload[i : i + _FRAME_KEY]] = (end - i, h0 - i, start - i)
            else:  # not the usual header, or the match ran into the next frame
                add(message_host(payload[start:end]))
            keep(payload[start:end])
            i = end
        self.raw_hosts.update(hosts)
        return msgs


class _ChunkWriter:
    """Writes frames to the chunk file, hashing the object and the lines as they go."""

    def __init__(self, f_out: BinaryIO, level: int) -> None:
        self.f_out = f_out
        self.compressor = zstandard.ZstdCompressor(level=level, write_checksum=True)
        self.meta_compressor = zstandard.ZstdCompressor(level=3)
        self.raw_hash = hashlib.sha256()
        self.comp_hash = hashlib.sha256()
        self.raw_size = self.comp_size = self.frames = 0

    def write(self, data: bytes) -> None:
        self.f_out.write(data)
        self.comp_hash.update(data)
        self.comp_size += len(data)

    def segment(self, lines: list[bytes], entries: list[bytes]) -> None:
        """One metadata frame and the data frame of ``lines`` (the bytes of ``entries``)."""
        if not entries:
            return
        # Streamed block by block, not joined first: each block is compressed and
        # hashed while it is still in the CPU cache, and no frame-sized copy is made.
        size = sum(map(len, lines))
        cobj = self.compressor.compressobj(size=size)
        compress = cobj.compress
        hash_update = self.raw_hash.update
        parts: list[bytes] = []
        for block in lines:
            hash_update(block)
            out = compress(block)
            if out:
                parts.append(out)
        parts.append(cobj.flush())
        frame = b"".join(parts)
        self.write(plain.meta_frame(self.meta_compressor, len(frame), size, entries))
        self.write(frame)
        self.raw_size += size
        self.frames += 1

    def legacy_frame(self, data: bytes) -> None:
        """Chunk format 1: the staging bytes themselves, one frame per ``frame_size``."""
        frame = self.compressor.compress(data)
        self.write(frame)
        self.raw_hash.update(data)
        self.raw_size += len(data)
        self.frames += 1


def compress_staging(src: Path, dst: Path, *, level: int, frame_size: int) -> ChunkInfo:
    """Write the plain chunk for staging file ``src`` to ``dst`` (fsynced) and describe it."""
    with open(src, "rb", buffering=0) as f_in, open(dst, "wb") as f_out:
        out = _ChunkWriter(f_out, level)
        data = f_in.read(frame_size)
        nl = data.find(b"\n", 0, MAX_RECORD_HEADER)
        if nl < 0:
            raise ChunkError(f"{src}: no staging header line")
        try:
            fields = parse_file_header(data[:nl])
        except RecordError as exc:
            raise ChunkError(f"{src}: {exc.reason}") from exc
        plain_chunk = fields.get("format") == "2"
        if plain_chunk:
            out.write(
                plain.head_frame(
                    fields.get("relay", ""), fields.get("hour", ""), fields.get("part", "")
                )
            )
        scanner = _RecordScanner(nl + 1)
        start = nl + 1
        while data:
            # A short read mid-file (a pipe, a signal) must not shorten a frame.
            while len(data) < frame_size:
                more = f_in.read(frame_size - len(data))
                if not more:
                    break
                data += more
            scanner.feed(data, start)
            start = 0
            if not plain_chunk:
                # Format 1 staging keeps a HOST per record that its message may not
                # hold: such a file is archived unchanged (chunk format 1).
                scanner.take()
                out.legacy_frame(data)
            elif scanner.pending >= frame_size:
                out.segment(*scanner.take())
            if plain_chunk and scanner.damaged_at is not None:
                break
            data = f_in.read(frame_size)
        scanner.finish()
        if plain_chunk:
            out.segment(*scanner.take())
        if plain_chunk and scanner.damaged_at is not None:
            # The undecodable rest is archived unchanged: nothing is dropped.
            f_in.seek(scanner.damaged_at)
            while rest := f_in.read(frame_size):
                e = plain.entry(b"-", b"-", plain.FRAMING_DAMAGED, b"-", 0, len(rest), b"-")
                out.segment([rest], [e])
        f_out.flush()
        os.fsync(f_out.fileno())

    def text(b: bytes | None) -> str | None:
        return None if b is None else b.decode("ascii", "replace")

    host_counts = scanner.host_counts()
    return ChunkInfo(
        relay=fields.get("relay", ""),
        hour=fields.get("hour", ""),
        part=fields.get("part", ""),
        count=scanner.count,
        first_recv=text(scanner.first),
        last_recv=text(scanner.last),
        hosts=tuple(host_counts),
        raw_size=out.raw_size,
        raw_sha256=out.raw_hash.hexdigest(),
        compressed_size=out.comp_size,
        compressed_sha256=out.comp_hash.hexdigest(),
        level=level,
        frame_size=frame_size,
        frames=out.frames,
        damaged_at=scanner.damaged_at,
        damage=scanner.damage,
        host_counts=host_counts,
        chunk_format=plain.CHUNK_FORMAT if plain_chunk else 1,
    )
