"""The relay link's wire format: the one module that encodes and decodes it.

Everything here is sans-IO and bounded: ``FrameDecoder.feed`` takes bytes and
returns frames, refusing any frame longer than its limit before buffering it.
A batch body is a sequence of spool records (sequence number, length,
payload); the batch header carries the raw length, the message count, a
CRC-32 of the raw body and the loop-guard path, so forwarded messages are never
rewritten. Format: ``docs/relay-link.md``.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import zstandard

PREAMBLE = b"\x93SRLINK\n"
VERSION = 1
MIN_VERSION = 1

# Frame types.
HELLO = 0x01
WELCOME = 0x02
REFUSE = 0x03
BATCH = 0x10
ACK = 0x11

CODEC_NONE = 0
CODEC_ZSTD = 1
CODEC_NAMES = {"none": CODEC_NONE, "zstd": CODEC_ZSTD}

# Refusal codes (REFUSE frame); the text says more.
R_VERSION = 1
R_CODEC = 2
R_PROTOCOL = 3
R_CHECKSUM = 4
R_TOO_LARGE = 5
R_DECOMPRESS = 6
R_IDENTITY = 7
R_SEQUENCE = 8
R_UNAVAILABLE = 9
REFUSAL_NAMES = {
    R_VERSION: "version",
    R_CODEC: "codec",
    R_PROTOCOL: "protocol",
    R_CHECKSUM: "checksum",
    R_TOO_LARGE: "too-large",
    R_DECOMPRESS: "decompress",
    R_IDENTITY: "identity",
    R_SEQUENCE: "sequence",
    R_UNAVAILABLE: "unavailable",
}

FRAME_HEADER = struct.Struct("!BI")  # type, body length
_HELLO = struct.Struct("!HHQ")  # min version, max version, epoch
_WELCOME = struct.Struct("!HQIIH")  # version, committed seq, max batch, max raw, window
_BATCH = struct.Struct("!QIIIIB")  # seq, records, messages, raw length, crc32, codec
_RECORD = struct.Struct("!QI")  # record seq, payload length
_ACK = struct.Struct("!Q")
_REFUSE = struct.Struct("!H")

# Limits of the handshake frames (the batch limit is negotiated).
MAX_CONTROL = 4096
MAX_ID = 64
MAX_PATH = 255
MAX_BATCH_HEADER = 64 + 256 * 256  # fixed fields, then at most 255 names of 1 + 255 bytes

# Spool records of link-received messages keep the path they came with (``envelope``);
# a link output's records also carry their message count (``counted``).
_ENVELOPE = b"\x00P"
_COUNTED = b"\x00M"
_COUNT = struct.Struct("!I")


class WireError(Exception):
    """The peer sent something this module cannot accept; ``code`` is a refusal code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason

    @property
    def kind(self) -> str:
        return REFUSAL_NAMES.get(self.code, "protocol")


@dataclass(frozen=True)
class Hello:
    min_version: int
    max_version: int
    epoch: int
    relay_id: str
    codecs: tuple[str, ...]


@dataclass(frozen=True)
class Welcome:
    version: int
    committed: int
    max_batch: int
    max_raw: int
    window: int
    codec: str
    relay_id: str


@dataclass(frozen=True)
class Refuse:
    code: int
    reason: str


@dataclass(frozen=True)
class Ack:
    seq: int


@dataclass(frozen=True)
class BatchHeader:
    seq: int
    records: int
    messages: int
    raw_length: int
    crc: int
    codec: int
    path: tuple[bytes, ...]


@dataclass(frozen=True)
class Batch:
    header: BatchHeader
    body: bytes  # as on the wire (compressed when codec is zstd)


Frame = Hello | Welcome | Refuse | Ack | Batch


# --- small strings


def _str8(s: bytes) -> bytes:
    if len(s) > 255:
        raise ValueError("string longer than 255 bytes")
    return bytes([len(s)]) + s


def _read_str8(buf: bytes, i: int) -> tuple[bytes, int]:
    if i >= len(buf):
        raise WireError(R_PROTOCOL, "frame ends inside a string")
    n = buf[i]
    end = i + 1 + n
    if end > len(buf):
        raise WireError(R_PROTOCOL, "frame ends inside a string")
    return buf[i + 1 : end], end


def _frame(kind: int, body: bytes) -> bytes:
    return FRAME_HEADER.pack(kind, len(body)) + body


# --- encoders


def encode_hello(hello: Hello) -> bytes:
    body = _HELLO.pack(hello.min_version, hello.max_version, hello.epoch)
    body += _str8(hello.relay_id.encode())
    body += bytes([len(hello.codecs)]) + b"".join(_str8(c.encode()) for c in hello.codecs)
    return PREAMBLE + _frame(HELLO, body)


def encode_welcome(w: Welcome) -> bytes:
    body = _WELCOME.pack(w.version, w.committed, w.max_batch, w.max_raw, w.window)
    body += _str8(w.codec.encode()) + _str8(w.relay_id.encode())
    return PREAMBLE + _frame(WELCOME, body)


def encode_refuse(code: int, reason: str) -> bytes:
    text = reason.encode("utf-8", "replace")[:1024]
    return _frame(REFUSE, _REFUSE.pack(code) + text)


def encode_ack(seq: int) -> bytes:
    return _frame(ACK, _ACK.pack(seq))


def encode_records(records: Sequence[tuple[int, bytes]]) -> bytes:
    """The raw body of a batch: each record's seq and length, then its payload."""
    out: list[bytes] = []
    for seq, payload in records:
        out.append(_RECORD.pack(seq, len(payload)))
        out.append(payload)
    return b"".join(out)


def encode_batch(header: BatchHeader, body: bytes) -> bytes:
    """A BATCH frame; ``body`` is the raw body, or its zstd frame when the codec says so."""
    head = _BATCH.pack(
        header.seq, header.records, header.messages, header.raw_length, header.crc, header.codec
    )
    head += bytes([len(header.path)]) + b"".join(_str8(p) for p in header.path)
    return FRAME_HEADER.pack(BATCH, len(head) + len(body)) + head + body


def checksum(raw: bytes) -> int:
    return zlib.crc32(raw) & 0xFFFFFFFF


def compress(raw: bytes, level: int) -> bytes:
    """One zstd frame with the content size in its header (the receiver bounds by it)."""
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw)


# --- decoders


def decode_body(batch: Batch, max_raw: int) -> bytes:
    """The raw body of ``batch``, checked against its header; WireError when it is not."""
    h = batch.header
    if h.raw_length > max_raw:
        raise WireError(R_TOO_LARGE, f"batch of {h.raw_length} raw bytes, limit {max_raw}")
    if h.codec == CODEC_NONE:
        raw = batch.body
    elif h.codec == CODEC_ZSTD:
        try:
            params = zstandard.get_frame_parameters(batch.body)
        except zstandard.ZstdError as exc:
            raise WireError(R_DECOMPRESS, f"not a zstd frame: {exc}") from exc
        if params.content_size != h.raw_length:
            # Also refuses frames without a declared size: nothing is inflated unbounded.
            raise WireError(
                R_DECOMPRESS,
                f"zstd frame declares {params.content_size} bytes, header {h.raw_length}",
            )
        try:
            raw = zstandard.ZstdDecompressor().decompress(batch.body, max_output_size=max_raw)
        except zstandard.ZstdError as exc:
            raise WireError(R_DECOMPRESS, f"zstd frame does not decompress: {exc}") from exc
    else:
        raise WireError(R_CODEC, f"unknown codec {h.codec}")
    if len(raw) != h.raw_length:
        raise WireError(R_DECOMPRESS, f"body of {len(raw)} bytes, header says {h.raw_length}")
    if checksum(raw) != h.crc:
        raise WireError(R_CHECKSUM, f"checksum mismatch in batch {h.seq}")
    return raw


def decode_records(raw: bytes, header: BatchHeader) -> list[tuple[int, bytes]]:
    """The records of a checked raw body; seqs strictly increase and end at the batch seq."""
    out: list[tuple[int, bytes]] = []
    i = 0
    n = len(raw)
    last = 0
    size = _RECORD.size
    while i < n:
        if i + size > n:
            raise WireError(R_PROTOCOL, "batch body ends inside a record header")
        seq, length = _RECORD.unpack_from(raw, i)
        i += size
        if i + length > n:
            raise WireError(R_PROTOCOL, "batch body ends inside a record")
        if seq <= last:
            raise WireError(R_SEQUENCE, f"record seq {seq} after {last}")
        out.append((seq, raw[i : i + length]))
        last = seq
        i += length
    if len(out) != header.records or (out and last != header.seq) or not out:
        raise WireError(R_PROTOCOL, "records do not match the batch header")
    return out


def _decode(kind: int, body: bytes) -> Frame:
    try:
        if kind == BATCH:
            seq, records, messages, raw_length, crc, codec = _BATCH.unpack_from(body, 0)
            i = _BATCH.size
            if i >= len(body):
                raise WireError(R_PROTOCOL, "batch frame without a path")
            path: list[bytes] = []
            count = body[i]
            i += 1
            for _ in range(count):
                name, i = _read_str8(body, i)
                path.append(name)
            h = BatchHeader(seq, records, messages, raw_length, crc, codec, tuple(path))
            return Batch(h, body[i:])
        if kind == ACK:
            if len(body) != _ACK.size:
                raise WireError(R_PROTOCOL, "ack frame of the wrong size")
            return Ack(_ACK.unpack(body)[0])
        if kind == HELLO:
            lo, hi, epoch = _HELLO.unpack_from(body, 0)
            rid, i = _read_str8(body, _HELLO.size)
            if i >= len(body):
                raise WireError(R_PROTOCOL, "hello without codecs")
            codecs: list[str] = []
            n = body[i]
            i += 1
            for _ in range(n):
                c, i = _read_str8(body, i)
                codecs.append(c.decode("ascii", "replace"))
            return Hello(lo, hi, epoch, rid.decode("utf-8", "replace"), tuple(codecs))
        if kind == WELCOME:
            version, committed, max_batch, max_raw, window = _WELCOME.unpack_from(body, 0)
            codec, i = _read_str8(body, _WELCOME.size)
            rid, i = _read_str8(body, i)
            return Welcome(
                version,
                committed,
                max_batch,
                max_raw,
                window,
                codec.decode("ascii", "replace"),
                rid.decode("utf-8", "replace"),
            )
        if kind == REFUSE:
            (code,) = _REFUSE.unpack_from(body, 0)
            return Refuse(code, body[_REFUSE.size :].decode("utf-8", "replace"))
    except struct.error as exc:
        raise WireError(R_PROTOCOL, f"frame type {kind:#x} too short") from exc
    raise WireError(R_PROTOCOL, f"unknown frame type {kind:#x}")


class FrameDecoder:
    """Bytes in, frames out. The preamble comes first; every frame is bounded.

    ``max_frame`` bounds BATCH frames (the negotiated batch size plus its header);
    every other frame is at most ``MAX_CONTROL`` bytes. The buffer therefore never
    holds more than one frame plus one read.
    """

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._preamble = False

    def feed(self, data: bytes) -> list[Frame]:
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        i = 0
        if not self._preamble:
            have = bytes(buf[: len(PREAMBLE)])
            if not PREAMBLE.startswith(have):
                del buf[:]
                raise WireError(R_PROTOCOL, f"not a relay link peer (first bytes {have!r})")
            if len(have) < len(PREAMBLE):
                return frames
            self._preamble = True
            i = len(PREAMBLE)
        hsize = FRAME_HEADER.size
        try:
            while len(buf) - i >= hsize:
                kind, length = FRAME_HEADER.unpack_from(buf, i)
                limit = self.max_frame if kind == BATCH else MAX_CONTROL
                if length > limit:
                    raise WireError(
                        R_TOO_LARGE, f"frame type {kind:#x} of {length} bytes, limit {limit}"
                    )
                if len(buf) - i - hsize < length:
                    break
                body = bytes(buf[i + hsize : i + hsize + length])
                i += hsize + length
                frames.append(_decode(kind, body))
        finally:
            del buf[:i]
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buf)


# --- the path envelope of spool records


def envelope(path: Sequence[bytes], payload: bytes) -> bytes:
    """A spool record payload that remembers the link path its messages arrived with.

    Plain records are octet-counted frames and start with a digit; this one starts
    with NUL, so the two never mix up (``open_envelope``).
    """
    return _ENVELOPE + bytes([len(path)]) + b"".join(_str8(p) for p in path) + payload


def counted(path: Sequence[bytes], count: int, payload: bytes) -> bytes:
    """A link output's spool record payload: its message count (the batch header's, not
    counted again frame by frame when the record is sent) and the path, if any."""
    names = b"".join(_str8(p) for p in path)
    return _COUNTED + _COUNT.pack(count) + bytes([len(path)]) + names + payload


def open_envelope(payload: bytes) -> tuple[tuple[bytes, ...], bytes]:
    """(path, octet-counted messages) of a spool record payload; () for a plain record."""
    path, body, _ = open_record(payload)
    return path, body


def open_record(payload: bytes) -> tuple[tuple[bytes, ...], bytes, int | None]:
    """(path, octet-counted messages, message count or None when not recorded)."""
    if payload.startswith(_COUNTED):
        i = len(_COUNTED) + _COUNT.size
        if len(payload) < i:
            return (), payload, None  # not ours after all: forwarded as it is
        count: int | None = _COUNT.unpack_from(payload, len(_COUNTED))[0]
    elif payload.startswith(_ENVELOPE):
        i = len(_ENVELOPE)
        count = None
    else:
        return (), payload, None
    try:
        names = payload[i]
        i += 1
        path: list[bytes] = []
        for _ in range(names):
            name, i = _read_str8(payload, i)
            path.append(name)
    except (IndexError, WireError):
        return (), payload, None  # not ours after all: forwarded as it is
    return tuple(path), payload[i:], count
