"""Plain chunks (chunk format 2): one message per line, metadata in skippable frames.

The one home of the chunk format (docs/staging-and-archive-format.md,
"Archive chunks"). A chunk is a sequence of zstd frames. Data frames hold
messages, one per line, so ``zstdcat chunk | grep`` and line-oriented engines
read it; zstd skippable frames, which every zstd decoder passes over, hold
what the relay knew beside each message (receive time, sender, framing,
flags), per block of messages as in staging, and the staging header:

    chunk   = head *(meta data)
    head    = skippable("H" "#syslog-relay-chunk/2 relay=R hour=H part=P" LF)
    meta    = skippable("M" zstd frame of: "=" DATALEN SP LINESLEN SP NBLOCKS LF *entry)
    entry   = RECV SP SENDER SP FRAMING SP FLAGS SP COUNT SP LENGTH SP ESC LF
    data    = a zstd frame of LINESLEN bytes: the LENGTH bytes of each entry in turn

A block whose messages hold no LF and no CR is stored as they are (ESC "-"),
each message followed by LF. A block where one does has every line escaped
(ESC "e"): backslash as two backslashes, LF as backslash-n, CR as
backslash-r; ``unescape`` reverses it exactly. An entry with FRAMING "!" holds
staging bytes that could not be decoded (damage), unchanged, COUNT 0.

Metadata is per block, so writing costs a join and, for the rare escaped
block, a few ``bytes.replace`` per message; reading a verbatim block is one
``split``.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

import zstandard

CHUNK_FORMAT = 2
HEAD_PREFIX = b"#syslog-relay-chunk/2 "
SKIPPABLE_MAGIC = 0x184D2A5B  # one of the 16 skippable magics (0x184D2A50..5F)
ZSTD_MAGIC = 0xFD2FB528
KIND_HEAD = b"H"
KIND_META = b"M"
ESC_NONE = b"-"
ESC_LINES = b"e"
FRAMING_DAMAGED = b"!"
# Bound what a damaged object can make the reader allocate.
MAX_META = 64 * 1024 * 1024
MAX_DATA = 1024 * 1024 * 1024
# Decompressed bytes handed out at a time: small enough to stay in the CPU cache.
PIECE = 256 * 1024

_SKIP_HEADER = struct.Struct("<II")
_UNESCAPE = re.compile(rb"\\(.)", re.DOTALL)
_UNESCAPED = {b"\\": b"\\", b"n": b"\n", b"r": b"\r"}


class PlainError(ValueError):
    """A plain chunk cannot be decoded here; ``offset`` is the object offset of the frame."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"offset {offset}: {reason}")
        self.offset = offset
        self.reason = reason


class MissingMetadata(PlainError):
    """Data frames without their metadata frames (the chunk was recompressed or cut)."""


# --- escaping ------------------------------------------------------------------


def needs_escape(payload: bytes) -> bool:
    return b"\n" in payload or b"\r" in payload


def escape(msg: bytes) -> bytes:
    return msg.replace(b"\\", b"\\\\").replace(b"\n", b"\\n").replace(b"\r", b"\\r")


def _unescaped(mo: re.Match[bytes]) -> bytes:
    c = mo.group(1)
    return _UNESCAPED.get(c, b"\\" + c)


def unescape(line: bytes) -> bytes:
    return _UNESCAPE.sub(_unescaped, line) if b"\\" in line else line


# --- writing -------------------------------------------------------------------


def skippable(kind: bytes, body: bytes) -> bytes:
    return _SKIP_HEADER.pack(SKIPPABLE_MAGIC, len(kind) + len(body)) + kind + body


def head_frame(relay: str, hour: str, part: str) -> bytes:
    return skippable(KIND_HEAD, HEAD_PREFIX + f"relay={relay} hour={hour} part={part}\n".encode())


def entry(
    recv: bytes, sender: bytes, framing: bytes, flags: bytes, count: int, length: int, esc: bytes
) -> bytes:
    return b"%b %b %b %b %d %d %b\n" % (recv, sender, framing, flags, count, length, esc)


def meta_frame(
    compressor: zstandard.ZstdCompressor, data_len: int, lines_len: int, entries: list[bytes]
) -> bytes:
    text = b"=%d %d %d\n%b" % (data_len, lines_len, len(entries), b"".join(entries))
    return skippable(KIND_META, compressor.compress(text))


# --- reading -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    recv: bytes
    sender: bytes
    framing: bytes
    flags: bytes
    count: int
    length: int
    escaped: bool

    @property
    def damaged(self) -> bool:
        return self.framing == FRAMING_DAMAGED


@dataclass(frozen=True, slots=True)
class Segment:
    """Whole blocks of one data frame with their entries: ``data[start:]`` starts with
    what zstdcat gives for them (``data`` may hold more around them: a piece of the
    frame as decompressed, shared by segments rather than copied)."""

    offset: int  # object offset of the meta frame
    entries: list[Entry]
    data: bytes
    frame_end: bool = True  # the last segment of its data frame (archive.plain.read_segments)
    start: int = 0

    def blocks(self) -> Iterator[tuple[Entry, int, int]]:
        """(entry, start, end) of each entry's bytes in ``data``."""
        pos = self.start
        for e in self.entries:
            yield e, pos, pos + e.length
            pos += e.length


def parse_head(body: bytes) -> dict[str, str]:
    if not body.startswith(HEAD_PREFIX):
        raise ValueError("not a plain chunk head")
    fields: dict[str, str] = {}
    for item in body[len(HEAD_PREFIX) :].strip().split(b" "):
        key, sep, value = item.partition(b"=")
        if sep:
            fields[key.decode("ascii", "replace")] = value.decode("ascii", "replace")
    return fields


def _parse_meta(text: bytes, offset: int) -> tuple[int, int, list[Entry]]:
    lines = text.split(b"\n")
    if not lines or lines[-1] != b"" or lines[0][:1] != b"=":
        raise PlainError(offset, "metadata frame is not well formed")
    try:
        data_len, lines_len, n = (int(x) for x in lines[0][1:].split(b" "))
        entries = []
        for line in lines[1:-1]:
            recv, sender, framing, flags, count, length, esc = line.split(b" ")
            entries.append(
                Entry(recv, sender, framing, flags, int(count), int(length), esc == ESC_LINES)
            )
    except ValueError:
        raise PlainError(offset, "metadata frame is not well formed") from None
    if n != len(entries) or sum(e.length for e in entries) != lines_len:
        raise PlainError(offset, "metadata frame does not add up")
    return data_len, lines_len, entries


def _read_exact(f: IO[bytes], n: int) -> bytes:
    parts: list[bytes] = []
    while n > 0:
        b = f.read(n)
        if not b:
            break
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


def is_plain(first: bytes) -> bool:
    """Whether an object starting with these (at least 4) bytes is a plain chunk."""
    return len(first) >= 4 and _SKIP_HEADER.unpack_from(first + b"\0" * 4)[0] == SKIPPABLE_MAGIC


def read_segments(
    f: IO[bytes], head: dict[str, str] | None = None, piece: int = PIECE
) -> Iterator[Segment]:
    """The segments of a plain chunk read from ``f``.

    A data frame is decompressed as a stream and handed out in segments of
    whole blocks of about ``piece`` bytes: the reader searches each while it
    is still in the CPU cache, and memory holds one compressed data frame and
    one piece. The last segment of a frame (``frame_end``) comes only after
    the frame's checksum was checked, so a caller that holds a frame's output
    until then prints nothing from a damaged frame. ``head`` (if given) is
    filled with the head's fields. Raises PlainError on damage,
    MissingMetadata when a data frame has no metadata frame before it;
    zstandard.ZstdError when a data frame does not decompress.
    """
    dctx = zstandard.ZstdDecompressor()
    offset = 0
    while True:
        hdr = _read_exact(f, 8)
        if not hdr:
            return
        if len(hdr) < 8:
            raise PlainError(offset, "object ends inside a frame header")
        magic, size = _SKIP_HEADER.unpack(hdr)
        if magic == ZSTD_MAGIC:
            raise MissingMetadata(offset, "data frame without its metadata frame")
        if magic != SKIPPABLE_MAGIC:
            raise PlainError(offset, "not a zstd frame")
        if size > MAX_META:
            raise PlainError(offset, "metadata frame too large")
        body = _read_exact(f, size)
        if len(body) < size:
            raise PlainError(offset, "object ends inside a metadata frame")
        meta_at = offset
        offset += 8 + size
        kind = body[:1]
        if kind == KIND_HEAD:
            if head is not None:
                try:
                    head.update(parse_head(body[1:]))
                except ValueError:
                    raise PlainError(meta_at, "bad head frame") from None
            continue
        if kind != KIND_META:
            continue  # a later kind of metadata this reader does not know
        try:
            text = dctx.decompress(body[1:])
        except zstandard.ZstdError as exc:
            raise PlainError(meta_at, f"metadata frame does not decompress: {exc}") from None
        data_len, lines_len, entries = _parse_meta(text, meta_at)
        if data_len > MAX_DATA or lines_len > MAX_DATA:
            raise PlainError(meta_at, "data frame too large")
        frame = _read_exact(f, data_len)
        if len(frame) < data_len:
            raise PlainError(offset, "object ends inside a data frame")
        yield from _pieces(dctx, frame, lines_len, entries, meta_at, offset, piece)
        offset += data_len


def _pieces(
    dctx: zstandard.ZstdDecompressor,
    frame: bytes,
    lines_len: int,
    entries: list[Entry],
    meta_at: int,
    data_at: int,
    piece: int,
) -> Iterator[Segment]:
    """The segments of one data frame, decompressed ``piece`` bytes at a time.

    The blocks wholly inside a piece are handed out in place (a segment that
    starts inside it); only a block cut by a piece's end is joined from its
    parts, so each byte is copied about once, by zstd."""
    if not lines_len:
        yield Segment(meta_at, entries, b"", True)
        return
    rest: list[bytes | memoryview] = []  # the start of entries[first]: less than a block
    have = 0  # bytes in rest
    got = 0
    first = 0  # the first entry not handed out yet
    held: Segment | None = None  # a frame's last segment waits for the end of the frame
    for out in dctx.read_to_iter(frame, write_size=piece):
        got += len(out)
        if got > lines_len:
            raise PlainError(data_at, "data frame is not the length its metadata says")
        segments: list[Segment] = []
        pos = 0  # where the bytes of out not handed out start
        if have:
            need = entries[first].length - have
            if len(out) < need:  # a block longer than a piece (damage kept as it was)
                rest.append(out)
                have += len(out)
                continue
            joined = b"".join([*rest, memoryview(out)[:need]])
            segments.append(Segment(meta_at, entries[first : first + 1], joined, False))
            first += 1
            pos = need
            rest, have = [], 0
        end = pos
        i = first
        while i < len(entries) and end + entries[i].length <= len(out):
            end += entries[i].length
            i += 1
        if i > first:
            segments.append(Segment(meta_at, entries[first:i], out, False, pos))
            first = i
        if end < len(out):
            rest, have = [memoryview(out)[end:]], len(out) - end
        for seg in segments:
            if held is not None:
                yield held
            held = seg
    if got != lines_len or have:
        raise PlainError(data_at, "data frame is not the length its metadata says")
    if held is None:
        held = Segment(meta_at, [], b"", False)
    # Entries of no bytes after the last line (a block of no messages).
    yield Segment(meta_at, held.entries + entries[first:], held.data, True, held.start)


def messages(e: Entry, data: bytes, start: int, end: int) -> list[bytes]:
    """The messages of one entry's bytes; PlainError (offset 0) when the count differs."""
    if e.damaged or e.count == 0:
        return []
    if data[end - 1 : end] != b"\n":
        raise PlainError(0, "block lines do not end with LF")
    msgs = data[start : end - 1].split(b"\n")
    if len(msgs) != e.count:
        raise PlainError(0, f"block holds {len(msgs)} lines, its metadata says {e.count}")
    if e.escaped:
        msgs = [unescape(m) for m in msgs]
    return msgs
