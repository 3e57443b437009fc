"""Staging record encoding and decoding (docs/staging-and-archive-format.md).

Format 2 (written): a file is a header line and BLOCKS; a block is one run of
messages of one received chunk, stored with the framing they arrived in
(octet-counted or LF lines) behind one header line carrying the per-chunk
metadata (receive time, sender), the flags common to the run, the message
count, the length and a CRC-32 of the payload. The relay pays per block, not
per message. Format 1 (one record per message) is still read: staging files
written before an upgrade and chunks already archived.

Shared by the relay (writer, recovery) and the archiver (manifest, cat). Pure
functions over bytes: no files, no clock.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from relay.formats import octet
from relay.formats.routing_fields import message_host

FORMAT_VERSION = 2
HEADER_PREFIX = b"#syslog-relay-staging/2 "
HEADER_PREFIX_1 = b"#syslog-relay-staging/1 "
_HEADER_START = b"#syslog-relay-staging/"
BLOCK_MARK = 0x40  # "@": a format 2 block header starts with it, a format 1 record never does
FRAMING_OCTET = b"o"
FRAMING_LF = b"l"
# A record header is five space-separated fields before the message; bound it
# so a corrupt file cannot make the reader scan without end.
MAX_RECORD_HEADER = 512

# Carried a loop-guard element naming this relay from a sender it does not
# authenticate: staged (not dropped as a loop), not forwarded. Bytes, as the router adds it.
FLAG_LOOP = b"L"

_HOST_SAFE = re.compile(rb"[^\x21-\x7e]")


class RecordError(ValueError):
    """A staging record could not be decoded; ``offset`` is where it starts."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"offset {offset}: {reason}")
        self.offset = offset
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Record:
    recv: bytes  # RECV field as written, e.g. b"2026-11-26T01:02:03.123456Z"
    sender: bytes
    host: bytes
    flags: bytes
    msg: bytes

    @property
    def recv_epoch(self) -> float:
        return parse_recv(self.recv)


def format_recv(epoch: float) -> bytes:
    """Receive time as RECV: UTC with microseconds."""
    dt = datetime.fromtimestamp(epoch, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode("ascii")


def parse_recv(recv: bytes) -> float:
    return (
        datetime.strptime(recv.decode("ascii"), "%Y-%m-%dT%H:%M:%S.%fZ")
        .replace(tzinfo=UTC)
        .timestamp()
    )


@functools.lru_cache(maxsize=4096)  # hosts repeat: the hot path pays a dict lookup
def sanitize_host(host: bytes | None) -> bytes:
    """HOST field: printable ASCII without spaces, at most 255 bytes, "-" if empty."""
    if not host:
        return b"-"
    return _HOST_SAFE.sub(b"?", host[:255]) or b"-"


def file_header(relay_id: str, hour: str, part: str) -> bytes:
    return HEADER_PREFIX + f"relay={relay_id} hour={hour} part={part}\n".encode()


def file_version(line: bytes) -> int:
    """Format version of a staging header line: 1 or 2; RecordError otherwise."""
    if line.startswith(HEADER_PREFIX):
        return 2
    if line.startswith(HEADER_PREFIX_1):
        return 1
    raise RecordError(0, "not a syslog-relay staging file (bad header)")


def parse_file_header(line: bytes) -> dict[str, str]:
    """Fields of a staging header line (without or with its LF), ``format`` included."""
    version = file_version(line)
    fields: dict[str, str] = {"format": str(version)}
    for item in line[len(HEADER_PREFIX) :].strip().split(b" "):
        key, sep, value = item.partition(b"=")
        if sep:
            fields[key.decode("ascii", "replace")] = value.decode("ascii", "replace")
    return fields


def encode(recv: bytes, sender: bytes, host: bytes, flags: bytes, msg: bytes) -> bytes:
    """One format 1 record (read, no longer written: tests and tools make old files with it).

    ``host`` must already be sanitized, ``flags`` b"-" or letters.
    """
    return b"%b %b %b %b %d %b\n" % (recv, sender, host, flags, len(msg), msg)


def block_header(
    recv: bytes,
    sender: bytes,
    framing: bytes,
    flags: bytes,
    count: int,
    payload: bytes | memoryview,
) -> bytes:
    """Header line of a format 2 block; the block is header + payload + LF.

    ``payload`` holds ``count`` messages framed as ``framing`` says: FRAMING_OCTET
    ("LEN SP MSG" back to back) or FRAMING_LF ("MSG LF" each, no LF inside a MSG).
    """
    return b"@%b %b %b %b %d %d %08x\n" % (
        recv,
        sender,
        framing,
        flags,
        count,
        len(payload),
        zlib.crc32(payload),
    )


# (framing, flags, count, payload): a block before its header line; the router
# makes them (payloads are slices of the received chunk), the writer encodes them.
Block = tuple[bytes, bytes, int, bytes | memoryview]


def block_parts(
    recv: bytes, sender: bytes, blocks: list[Block], parts: list[bytes | memoryview]
) -> None:
    """Append the buffers of encoded blocks (header, payload, LF each) to ``parts``:
    the writer hands them to writev(2) without joining them."""
    for framing, flags, count, payload in blocks:
        parts += (block_header(recv, sender, framing, flags, count, payload), payload, b"\n")


def encode_blocks(recv: bytes, sender: bytes, blocks: list[Block]) -> bytes:
    """(framing, flags, count, payload) blocks of one chunk, encoded as one bytes."""
    parts: list[bytes | memoryview] = []
    block_parts(recv, sender, blocks, parts)
    return b"".join(parts)


class OctetFrames:
    """Forwarded messages that are already octet-counted frames (``LEN SP MSG`` back to
    back, as received): a spool record payload as it is, the chunk not taken apart."""

    __slots__ = ("count", "data")

    def __init__(self, data: bytes, count: int) -> None:
        self.data = data
        self.count = count

    def __len__(self) -> int:
        return self.count


def split_payload(payload: bytes, framing: bytes, offset: int = 0) -> list[bytes]:
    """The messages of a block payload; RecordError (at ``offset``) when it is not well framed."""
    if framing == FRAMING_LF:
        if payload[-1:] != b"\n":
            raise RecordError(offset, "LF block payload does not end with LF")
        return payload[:-1].split(b"\n")
    if framing != FRAMING_OCTET:
        raise RecordError(offset, f"unknown block framing {framing[:8]!r}")
    try:
        return octet.split(payload)
    except octet.OctetError as exc:
        raise RecordError(offset, exc.reason) from None


def decode_many(buf: bytes | memoryview, start: int = 0) -> tuple[list[Record] | None, int]:
    """Decode the block (format 2) or record (format 1) at ``start``: its messages as Records.

    Returns (records, next_offset), or (None, start) for an incomplete tail;
    raises RecordError on corruption (a bad CRC, a count that does not match).
    Format 2 keeps no HOST: it is taken from each message with
    ``relay.formats.routing_fields.message_host`` (the relay does not parse it on the hot path).
    """
    mv = memoryview(buf)
    if start >= len(mv):
        return None, start
    if mv[start] != BLOCK_MARK:
        rec, nxt = decode(mv, start)
        return (None if rec is None else [rec]), nxt
    header, payload, nxt = _block_at(mv, start)
    if header is None:
        return None, start
    recv, sender, framing, flags, count = header
    msgs = split_payload(payload, framing, start)
    if len(msgs) != count:
        raise RecordError(start, f"block holds {len(msgs)} messages, its header says {count}")
    host = sanitize_host
    return [Record(recv, sender, host(message_host(m)), flags, m) for m in msgs], nxt


BlockHeader = tuple[bytes, bytes, bytes, bytes, int]


def parse_block_header(line: bytes, offset: int = 0) -> tuple[BlockHeader, int, int | None]:
    """The fields of a format 2 block header line, given without its "@" and its LF:
    ((recv, sender, framing, flags, count), payload length, CRC-32). The CRC is None
    when its field is not eight hex digits: a reader of the whole block rejects that,
    one that needs only the block's length need not. RecordError at ``offset`` when
    the line does not have seven fields or the count or length is not a number."""
    parts = line.split(b" ")
    if len(parts) != 7:
        raise RecordError(offset, "block header does not have seven fields")
    recv, sender, framing, flags, count_s, length_s, crc_s = parts
    if not (count_s.isdigit() and length_s.isdigit() and len(length_s) <= 12):
        raise RecordError(offset, "bad block count or length")
    crc: int | None = None
    if len(crc_s) == 8:
        try:
            crc = int(crc_s, 16)
        except ValueError:
            pass
        else:
            if crc < 0:
                crc = None
    return (recv, sender, framing, flags, int(count_s)), int(length_s), crc


def decode_block(buf: bytes | memoryview, start: int = 0) -> tuple[BlockHeader | None, bytes, int]:
    """The block at ``start`` without splitting it: ((recv, sender, framing, flags, count),
    payload, next_offset), or (None, b"", start) for an incomplete tail. CRC checked."""
    return _block_at(memoryview(buf), start)


def _block_at(mv: memoryview, start: int) -> tuple[BlockHeader | None, bytes, int]:
    end_search = min(len(mv), start + MAX_RECORD_HEADER)
    head = bytes(mv[start:end_search])
    nl = head.find(b"\n")
    if nl < 0:
        if end_search - start < MAX_RECORD_HEADER and len(mv) == end_search:
            return None, b"", start
        raise RecordError(start, "block header line too long")
    header, length, crc = parse_block_header(head[1:nl], start)
    if crc is None:
        raise RecordError(start, "bad block checksum field")
    p_start = start + nl + 1
    p_end = p_start + length
    if p_end + 1 > len(mv):
        return None, b"", start
    if mv[p_end] != 0x0A:
        raise RecordError(start, "block not terminated by LF after its length")
    payload = bytes(mv[p_start:p_end])
    if zlib.crc32(payload) != crc:
        raise RecordError(start, "block checksum mismatch")
    return header, payload, p_end + 1


def decode(buf: bytes | memoryview, start: int = 0) -> tuple[Record | None, int]:
    """Decode one format 1 record at ``start``.

    Returns (record, next_offset), or (None, start) when the buffer ends before
    the record does (an incomplete tail). Raises RecordError when the bytes at
    ``start`` are not a record.
    """
    mv = memoryview(buf)
    end_search = min(len(mv), start + MAX_RECORD_HEADER)
    head = bytes(mv[start:end_search])
    parts = head.split(b" ", 5)
    if len(parts) < 6:
        if end_search - start < MAX_RECORD_HEADER and len(mv) == end_search:
            return None, start
        raise RecordError(start, "record header has fewer than five fields")
    recv, sender, host, flags, length_s, _ = parts
    if not length_s.isdigit() or len(length_s) > 12:
        raise RecordError(start, f"bad record length {length_s[:20]!r}")
    length = int(length_s)
    msg_start = start + len(recv) + len(sender) + len(host) + len(flags) + len(length_s) + 5
    msg_end = msg_start + length
    if msg_end + 1 > len(mv):
        return None, start
    if mv[msg_end] != 0x0A:
        raise RecordError(start, "record not terminated by LF after its length")
    return Record(recv, sender, host, flags, bytes(mv[msg_start:msg_end])), msg_end + 1


def iter_records(buf: bytes | memoryview, start: int = 0) -> Iterator[tuple[int, Record]]:
    """All complete messages from ``start`` (format 1 or 2); yields (offset, record).

    The offset is that of the record or of the block holding the message. Stops
    silently at an incomplete tail; raises RecordError on corruption.
    """
    pos = start
    while pos < len(buf):
        recs, nxt = decode_many(buf, pos)
        if recs is None:
            return
        for rec in recs:
            yield pos, rec
        pos = nxt


# The largest block a reader accepts: messages are capped at 16 MiB ([limits]
# max_message_size) and a block holds one read's worth of them; a header that claims
# more is damage, and must not make a reader buffer without end (archive/chunk.py
# included).
MAX_BLOCK = 32 * 1024 * 1024 + MAX_RECORD_HEADER + 1


def block_length(head: bytes | memoryview) -> int | None:
    """Whole length (header line, payload, check byte) of the format 2 block whose
    header line starts ``head``; None when ``head`` ends before its header line does
    (give at least MAX_RECORD_HEADER bytes unless the file ends sooner). Raises
    RecordError when it is not a block header or claims more than MAX_BLOCK."""
    line = bytes(head[:MAX_RECORD_HEADER])
    if line[:1] != b"@":
        raise RecordError(0, "not a block header")
    nl = line.find(b"\n")
    if nl < 0:
        if len(line) < MAX_RECORD_HEADER:
            return None
        raise RecordError(0, "block header line too long")
    total = nl + 1 + parse_block_header(line[1:nl])[1] + 1
    if total > MAX_BLOCK:
        raise RecordError(0, "block longer than the largest possible")
    return total


def check_block(buf: bytes | memoryview, start: int = 0) -> int | None:
    """Check the whole format 2 block at ``start`` at C speed: header fields, check byte,
    CRC, framing, and COUNT where counting is one call (LF blocks). Returns where the
    next block starts, None when ``buf`` ends first; raises RecordError (at ``start``)
    when the block is damaged.

    The COUNT of an octet-counted block is not walked here (a loop per message: minutes
    for a busy hour at recovery); readers that split the messages check it anyway."""
    header, payload, nxt = _block_at(memoryview(buf), start)
    if header is None:
        return None
    framing, count = header[2], header[4]
    if framing == FRAMING_LF:
        if payload[-1:] != b"\n":
            raise RecordError(start, "LF block payload does not end with LF")
        if payload.count(b"\n") != count:
            raise RecordError(start, f"LF block holds another number of lines than {count}")
    elif framing != FRAMING_OCTET:
        raise RecordError(start, f"unknown block framing {framing[:8]!r}")
    elif (count == 0) != (not payload):  # a frame is at least "0 ": no bytes iff no messages
        raise RecordError(
            start, f"octet-counted block of {len(payload)} bytes and {count} messages"
        )
    return nxt
