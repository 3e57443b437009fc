"""Staging record encoding and decoding (format 1, docs/staging-and-archive-format.md).

Shared by the relay (writer, recovery) and the archiver (manifest, cat). Pure
functions over bytes: no files, no clock.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

FORMAT_VERSION = 1
HEADER_PREFIX = b"#syslog-relay-staging/1 "
# A record header is five space-separated fields before the message; bound it
# so a corrupt file cannot make the reader scan without end.
MAX_RECORD_HEADER = 512

FLAG_TRUNCATED = "T"
FLAG_MALFORMED = "M"
FLAG_RECEIVE_TIME = "R"
FLAG_CUT = "C"
FLAG_NUL = "N"
FLAG_BAD_UTF8 = "U"

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


def parse_file_header(line: bytes) -> dict[str, str]:
    """Fields of a staging header line (without or with its LF)."""
    if not line.startswith(HEADER_PREFIX):
        raise RecordError(0, "not a syslog-relay staging file (bad header)")
    fields: dict[str, str] = {}
    for item in line[len(HEADER_PREFIX) :].strip().split(b" "):
        key, sep, value = item.partition(b"=")
        if sep:
            fields[key.decode("ascii", "replace")] = value.decode("ascii", "replace")
    return fields


def encode(recv: bytes, sender: bytes, host: bytes, flags: bytes, msg: bytes) -> bytes:
    """One record. ``host`` must already be sanitized, ``flags`` b"-" or letters."""
    return ChunkEncoder(recv, sender).encode(host, flags, msg)


class ChunkEncoder:
    """Records of one received chunk: RECV and SENDER are formatted once, not per message."""

    __slots__ = ("prefix",)

    def __init__(self, recv: bytes, sender: bytes) -> None:
        self.prefix = recv + b" " + sender + b" "

    def encode(self, host: bytes, flags: bytes, msg: bytes) -> bytes:
        return self.encode_many([(host, flags, msg)])

    def encode_many(self, items: list[tuple[bytes, bytes, bytes]]) -> bytes:
        """Records for (HOST, FLAGS, MSG) items, as one bytes object (one write)."""
        prefix = self.prefix
        lengths = _LENGTHS
        if len(lengths) >= 4096:
            lengths.clear()
        parts: list[bytes] = []
        extend = parts.extend
        for host, flags, msg in items:
            n = len(msg)
            length = lengths.get(n)
            if length is None:
                # bytes %-formatting of an int goes through unicode: format each length once.
                length = lengths[n] = b"%d " % n
            extend((prefix, host, b" ", flags, b" ", length, msg, b"\n"))
        return b"".join(parts)


# Message length -> b"LENGTH " (ChunkEncoder).
_LENGTHS: dict[int, bytes] = {}


def decode(buf: bytes | memoryview, start: int = 0) -> tuple[Record | None, int]:
    """Decode one record at ``start``.

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
    """All complete records from ``start``; yields (offset, record).

    Stops silently at an incomplete tail; raises RecordError on corruption.
    """
    pos = start
    while pos < len(buf):
        rec, nxt = decode(buf, pos)
        if rec is None:
            return
        yield pos, rec
        pos = nxt


def valid_prefix(buf: bytes | memoryview) -> tuple[int, str | None]:
    """Length of the longest prefix of a staging file made of whole records.

    Used at recovery to cut a torn tail. Returns (length, reason) where reason
    says why the rest is not valid (None when the whole buffer is valid).
    """
    mv = memoryview(buf)
    nl = bytes(mv[:MAX_RECORD_HEADER]).find(b"\n")
    if nl < 0:
        return 0, "incomplete header line"
    try:
        parse_file_header(bytes(mv[:nl]))
    except RecordError as exc:
        return 0, exc.reason
    pos = nl + 1
    while pos < len(mv):
        try:
            rec, nxt = decode(mv, pos)
        except RecordError as exc:
            return pos, exc.reason
        if rec is None:
            return pos, "incomplete last record"
        pos = nxt
    return pos, None
