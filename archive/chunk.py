"""Compress one staging file into a chunk: independent zstd frames, streamed.

The staging file is read one frame (``frame_size`` raw bytes) at a time and
each frame is compressed on its own: memory stays bounded by one frame plus
one block whatever the file size, and any frame can be decompressed alone.
The bytes are the staging file unchanged (header line included), so the
chunk's raw SHA-256 is the staging file's. Hashing and compression take the
frame as read (one call each, no copy).

Blocks and records are decoded on the way through only to count messages and
collect times and hosts for the manifest. Format 2 blocks carry their count
and receive time in the header, so the scanner's cost is per block except for
the host: it is taken from every message, by one compiled pattern mapped over
the block's messages for the usual RFC 5424 header and ``message_host`` for
anything else (the same answer, see ``_HOST_5424``). Hosts are sanitized once
each, at the end, not per message.
"""

from __future__ import annotations

import hashlib
import operator
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import zstandard

from relay.classify import message_host
from relay.record import (
    BLOCK_MARK,
    FRAMING_OCTET,
    MAX_RECORD_HEADER,
    RecordError,
    decode,
    parse_file_header,
    sanitize_host,
    split_payload,
)

# The relay caps messages at 16 MiB ([limits] max_message_size) and a block
# holds one read's worth of messages; a record or block that claims more is
# damage, and must not make the scanner buffer the whole file.
_MAX_RECORD = 32 * 1024 * 1024 + MAX_RECORD_HEADER + 1
# First look-ahead into the next frame for a block cut by a frame boundary.
_JOIN_STEP = 64 * 1024
_MAX_HOSTNAME = 255

# The RFC 5424 branch of relay.classify.message_host as one pattern: the first
# ">" at index 1..4 after "<", then "1 ", TIMESTAMP up to the next space, then
# a non-empty HOSTNAME followed by a space. A message it does not match goes
# through message_host itself; "-" and over-long names are mapped at the end.
_HOST_5424 = re.compile(rb"<[^>]{0,3}>1 [^ ]* ([^ ]+) ")
# The same after an octet count: one call per frame gives its length and host.
_FRAME_5424 = re.compile(rb"([0-9]{1,10}) (?:<[^>]{0,3}>1 [^ ]* ([^ ]+) )?")
_GROUP1 = operator.itemgetter(1)
# Frame start (count, PRI, hour) -> (frame length, HOSTNAME offset); see _octet_hosts.
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
        self.hosts: set[bytes] = set()  # sanitized (format 1 HOST fields)
        self.raw_hosts: set[bytes | None] = set()  # as message_host gives them
        self._frames: dict[bytes, tuple[int, int]] = {}
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
        if len(self.tail) > _MAX_RECORD:
            self._damaged(self.base, "record longer than the largest possible message")

    def _damaged(self, offset: int, reason: str) -> None:
        self.damaged_at = offset
        self.damage = reason
        self.tail = b""

    def finish(self) -> None:
        if self.damaged_at is None and self.tail:
            self._damaged(self.base, "incomplete last record")

    def host_names(self) -> list[str]:
        hosts = set(self.hosts)
        for h in self.raw_hosts:
            hosts.add(sanitize_host(None if h == b"-" or (h and len(h) > _MAX_HOSTNAME) else h))
        return sorted(h.decode("ascii", "replace") for h in hosts)

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
                    self.hosts.add(rec.host)
                    pos = nxt
                    continue
                nl = find(b"\n", pos, pos + MAX_RECORD_HEADER)
                if nl < 0:
                    if n - pos < MAX_RECORD_HEADER:
                        return pos
                    raise RecordError(pos, "block header line too long")
                parts = buf[pos + 1 : nl].split(b" ")
                if len(parts) != 7:
                    raise RecordError(pos, "block header does not have seven fields")
                recv, _sender, framing, _flags, count_s, length_s, crc_s = parts
                if not (count_s.isdigit() and length_s.isdigit() and len(length_s) <= 12):
                    raise RecordError(pos, "bad block count or length")
                try:
                    crc = int(crc_s, 16) if len(crc_s) == 8 else -1
                except ValueError:
                    crc = -1
                if crc < 0:
                    raise RecordError(pos, "bad block checksum field")
                p_start = nl + 1
                p_end = p_start + int(length_s)
                if p_end >= n:
                    return pos
                if buf[p_end] != 0x0A:
                    raise RecordError(pos, "block not terminated by LF after its length")
                if zlib.crc32(mv[p_start:p_end]) != crc:
                    raise RecordError(pos, "block checksum mismatch")
                count = int(count_s)
                self._block_hosts(buf[p_start:p_end], framing, count, pos)
                if count:
                    self.count += count
                    if self.first is None:
                        self.first = recv
                    self.last = recv
                pos = p_end + 1
        return pos

    def _block_hosts(self, payload: bytes, framing: bytes, count: int, offset: int) -> None:
        """Check that ``payload`` holds ``count`` messages; collect their hosts."""
        if framing == FRAMING_OCTET:
            n = self._octet_hosts(payload, offset)
        else:
            msgs = split_payload(payload, framing, offset)
            n = len(msgs)
            found = list(map(_HOST_5424.match, msgs))
            self.raw_hosts.update(map(_GROUP1, filter(None, found)))
            if None in found:
                add = self.raw_hosts.add
                for m, mo in zip(msgs, found, strict=True):
                    if mo is None:
                        add(message_host(m))
        if n != count:
            raise RecordError(offset, f"block holds {n} messages, its header says {count}")

    def _octet_hosts(self, payload: bytes, offset: int) -> int:
        """Walk an octet-counted payload, collecting hosts; return the number of messages.

        Frames that start like an earlier one (same count, PRI and hour: the first
        _FRAME_KEY bytes) have their HOSTNAME at the same offset when the timestamp
        ends where it did: two searches and a slice per message. Anything else
        takes one pattern match (count and host) and teaches the cache.
        """
        find = payload.find
        get = self._frames.get
        add = self.raw_hosts.add
        n = len(payload)
        i = count = 0
        while i < n:
            e = get(payload[i : i + _FRAME_KEY])
            if e is not None:
                end = i + e[0]
                h0 = i + e[1]
                if end <= n and find(b" ", i + _FRAME_KEY, h0) == h0 - 1:
                    he = find(b" ", h0, end)
                    if he > h0:
                        add(payload[h0:he])
                        i = end
                        count += 1
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
                    self._frames[payload[i : i + _FRAME_KEY]] = (end - i, h0 - i)
            else:  # not the usual header, or the match ran into the next frame
                add(message_host(payload[start:end]))
            i = end
            count += 1
        return count


def compress_staging(src: Path, dst: Path, *, level: int, frame_size: int) -> ChunkInfo:
    """Write the chunk for staging file ``src`` to ``dst`` (fsynced) and describe it."""
    raw_hash = hashlib.sha256()
    comp_hash = hashlib.sha256()
    compressor = zstandard.ZstdCompressor(level=level, write_checksum=True)
    raw_size = comp_size = frames = 0

    with open(src, "rb", buffering=0) as f_in, open(dst, "wb") as f_out:
        data = f_in.read(frame_size)
        nl = data.find(b"\n", 0, MAX_RECORD_HEADER)
        if nl < 0:
            raise ChunkError(f"{src}: no staging header line")
        try:
            fields = parse_file_header(data[:nl])
        except RecordError as exc:
            raise ChunkError(f"{src}: {exc.reason}") from exc
        scanner = _RecordScanner(nl + 1)
        start = nl + 1
        while data:
            # A short read mid-file (a pipe, a signal) must not shorten a frame.
            while len(data) < frame_size:
                more = f_in.read(frame_size - len(data))
                if not more:
                    break
                data += more
            raw_hash.update(data)
            raw_size += len(data)
            scanner.feed(data, start)
            start = 0
            frame = compressor.compress(data)
            f_out.write(frame)
            comp_hash.update(frame)
            comp_size += len(frame)
            frames += 1
            data = f_in.read(frame_size)
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
        hosts=tuple(scanner.host_names()),
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
