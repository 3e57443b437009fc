"""relay.link.wire: frames, batch bodies and the spool-record envelope (pure)."""

from __future__ import annotations

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.link import wire
from relay.link.wire import Batch, BatchHeader, FrameDecoder, WireError

ids = st.binary(min_size=1, max_size=20).map(lambda b: b.hex()[:64].encode())
paths = st.lists(ids, max_size=6).map(tuple)


@st.composite
def record_lists(draw: st.DrawFn) -> list[tuple[int, bytes]]:
    seqs = sorted(set(draw(st.lists(st.integers(1, 2**63), min_size=1, max_size=8))))
    return [(s, draw(st.binary(max_size=300))) for s in seqs]


def batch_frame(
    recs: list[tuple[int, bytes]],
    path: tuple[bytes, ...] = (),
    compression: str = "zstd",
    **over: int,
) -> bytes:
    raw = wire.encode_records(recs)
    body = wire.compress(raw, 1) if compression == "zstd" else raw
    fields = dict(
        seq=recs[-1][0],
        records=len(recs),
        messages=len(recs),
        raw_length=len(raw),
        crc=wire.checksum(raw),
        codec=wire.CODEC_ZSTD if compression == "zstd" else wire.CODEC_NONE,
    )
    fields.update(over)
    return wire.encode_batch(BatchHeader(path=path, **fields), body)


def decode_one(data: bytes, max_frame: int = 1 << 20) -> wire.Frame:
    frames = FrameDecoder(max_frame).feed(wire.PREAMBLE + data)
    assert len(frames) == 1
    return frames[0]


@settings(max_examples=200, deadline=None)
@given(record_lists(), paths, st.sampled_from(["zstd", "none"]))
def test_batch_round_trip(
    records: list[tuple[int, bytes]], path: tuple[bytes, ...], codec: str
) -> None:
    frame = decode_one(batch_frame(records, path, compression=codec))
    assert isinstance(frame, Batch)
    assert frame.header.path == path
    assert frame.header.codec == (wire.CODEC_ZSTD if codec == "zstd" else wire.CODEC_NONE)
    raw = wire.decode_body(frame, 1 << 20)
    assert wire.decode_records(raw, frame.header) == records


@settings(max_examples=100, deadline=None)
@given(record_lists(), st.integers(1, 50))
def test_frames_split_anywhere(records: list[tuple[int, bytes]], step: int) -> None:
    data = wire.PREAMBLE + batch_frame(records) + wire.encode_ack(7)
    dec = FrameDecoder(1 << 20)
    frames: list[wire.Frame] = []
    for i in range(0, len(data), step):
        frames += dec.feed(data[i : i + step])
    assert isinstance(frames[0], Batch) and frames[1] == wire.Ack(7)
    assert dec.buffered == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_only_ever_raises_wire_error(data: bytes) -> None:
    dec = FrameDecoder(4096)
    for chunk in (wire.PREAMBLE + data, data):
        try:
            for frame in dec.feed(chunk):
                if isinstance(frame, Batch):
                    wire.decode_records(wire.decode_body(frame, 4096), frame.header)
        except WireError:
            pass
        dec = FrameDecoder(4096)


def test_handshake_frames_round_trip() -> None:
    hello = wire.Hello(1, 1, 0xDEAD, "edge-1", ("zstd", "none"))
    assert FrameDecoder(100).feed(wire.encode_hello(hello)) == [hello]
    welcome = wire.Welcome(1, 42, 1 << 24, 1 << 24, 16, "zstd", "core")
    assert FrameDecoder(100).feed(wire.encode_welcome(welcome)) == [welcome]
    refuse = wire.encode_refuse(wire.R_VERSION, "no")
    assert FrameDecoder(100).feed(wire.PREAMBLE + refuse) == [wire.Refuse(wire.R_VERSION, "no")]


RECS = [(5, b"3 abc"), (9, b"2 de")]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (batch_frame(RECS, crc=1), wire.R_CHECKSUM),
        (batch_frame(RECS, compression="none", crc=2), wire.R_CHECKSUM),
        (batch_frame(RECS, raw_length=10**9), wire.R_TOO_LARGE),
        (batch_frame(RECS, raw_length=5), wire.R_DECOMPRESS),
        (batch_frame(RECS, records=3), wire.R_PROTOCOL),
        (batch_frame(RECS, seq=8), wire.R_PROTOCOL),
        (batch_frame(RECS, compression="none", codec=7), wire.R_CODEC),
    ],
    ids=[
        "bad-crc-zstd",
        "bad-crc-none",
        "claims-too-much",
        "size-mismatch",
        "count",
        "seq",
        "codec",
    ],
)
def test_batch_refusals(frame: bytes, code: int) -> None:
    got = decode_one(frame)
    assert isinstance(got, Batch)
    with pytest.raises(WireError) as exc:
        wire.decode_records(wire.decode_body(got, 1 << 20), got.header)
    assert exc.value.code == code


def test_not_zstd_and_truncated_zstd_are_refused() -> None:
    raw = wire.encode_records(RECS)
    for body in (b"definitely not zstd", wire.compress(raw, 1)[:-3]):
        h = BatchHeader(9, 2, 2, len(raw), wire.checksum(raw), wire.CODEC_ZSTD, ())
        got = decode_one(wire.encode_batch(h, body))
        assert isinstance(got, Batch)
        with pytest.raises(WireError) as exc:
            wire.decode_body(got, 1 << 20)
        assert exc.value.code in (wire.R_DECOMPRESS, wire.R_CHECKSUM)


def test_decompression_bomb_is_refused_before_inflating() -> None:
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 << 20))
    assert len(bomb) < 1 << 16
    raw_claim = 100
    h = BatchHeader(1, 1, 1, raw_claim, 0, wire.CODEC_ZSTD, ())
    got = decode_one(wire.encode_batch(h, bomb))
    with pytest.raises(WireError) as exc:
        wire.decode_body(got, 1 << 20)  # type: ignore[arg-type]
    assert exc.value.code == wire.R_DECOMPRESS
    # A frame without a declared size is refused as well (it could inflate unbounded).
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 100)
    got = decode_one(wire.encode_batch(BatchHeader(1, 1, 1, 100, 0, wire.CODEC_ZSTD, ()), unsized))
    with pytest.raises(WireError):
        wire.decode_body(got, 1 << 20)  # type: ignore[arg-type]


def test_oversized_frame_refused_before_buffering() -> None:
    dec = FrameDecoder(1000)
    header = wire.FRAME_HEADER.pack(wire.BATCH, 5000)
    with pytest.raises(WireError) as exc:
        dec.feed(wire.PREAMBLE + header)
    assert exc.value.code == wire.R_TOO_LARGE
    with pytest.raises(WireError):
        FrameDecoder(1000).feed(wire.PREAMBLE + wire.FRAME_HEADER.pack(wire.ACK, 10_000))


@pytest.mark.parametrize(
    "first",
    [
        b"<14>1 2026-11-26T01:02:03Z host app - - - hi\n",
        b"57 <14>1 -",
        b"\x16\x03\x01\x02\x00",
        b"1 open 85 relp",
    ],
)
def test_other_protocols_are_refused_at_the_first_bytes(first: bytes) -> None:
    with pytest.raises(WireError) as exc:
        FrameDecoder(1000).feed(first)
    assert exc.value.code == wire.R_PROTOCOL


def test_partial_preamble_waits() -> None:
    dec = FrameDecoder(1000)
    assert dec.feed(wire.PREAMBLE[:3]) == []
    assert dec.feed(wire.PREAMBLE[3:] + wire.encode_ack(1)) == [wire.Ack(1)]


@given(paths, st.binary(max_size=100))
def test_envelope_round_trip(path: tuple[bytes, ...], body: bytes) -> None:
    assert wire.open_envelope(wire.envelope(path, b"3 abc" + body)) == (path, b"3 abc" + body)


def test_plain_records_have_no_envelope() -> None:
    assert wire.open_envelope(b"3 abc") == ((), b"3 abc")
    assert wire.open_envelope(b"\x00P\x05ab") == ((), b"\x00P\x05ab")  # damaged: left as it is
