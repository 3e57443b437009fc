"""The archiver on staging format 2 (blocks): plain chunks, manifest statistics, damage,
reading back."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from archive import plain
from archive.chunk import _RecordScanner, compress_staging
from archive.reader import iter_records, stream_runs
from relay.formats import octet, staging_block
from relay.formats.routing_fields import message_host
from tests.test_archive_helpers import (
    HOUR,
    HOUR_EPOCH,
    Msg,
    encode_block,
    flags_for,
    mixed_traffic,
    write_staging_v2,
)

PART = "20261126T010203000000Z"
SENDER = b"tcp://127.0.0.1:40000"


def _host(msg: bytes) -> str:
    return staging_block.sanitize_host(message_host(msg)).decode("ascii", "replace")


def _raw(chunk: Path) -> bytes:
    data = chunk.read_bytes()
    return (
        zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()
    )


def _lines(blocks: list[list[bytes]]) -> bytes:
    """What zstdcat gives for blocks of these messages: one line each, a block
    with LF or CR in any message escaped whole."""
    out = []
    for msgs in blocks:
        esc = any(b"\n" in m or b"\r" in m for m in msgs)
        out += [(plain.escape(m) if esc else m) + b"\n" for m in msgs]
    return b"".join(out)


def _read_back(chunk: Path) -> list[bytes]:
    with open(chunk, "rb") as f:
        return [m for run in stream_runs(f) for m in run.messages()]


def _rebuild(chunk: Path) -> bytes:
    """The staging file again, from a plain chunk alone (the format keeps all of it)."""
    head: dict[str, str] = {}
    with open(chunk, "rb") as f:
        segments = list(plain.read_segments(f, head))
    out = [staging_block.file_header(head["relay"], head["hour"], head["part"])]
    for seg in segments:
        for e, start, end in seg.blocks():
            if e.damaged:
                out.append(seg.data[start:end])
                continue
            msgs = plain.messages(e, seg.data, start, end)
            if e.framing == staging_block.FRAMING_LF:
                payload = b"".join(m + b"\n" for m in msgs)
            else:
                payload = octet.encode_many(msgs)
            out += [
                staging_block.block_header(e.recv, e.sender, e.framing, e.flags, e.count, payload)
            ]
            out += [payload, b"\n"]
    return b"".join(out)


def _staging(tmp_path: Path, blocks: list[bytes], header: bytes | None = None) -> Path:
    p = tmp_path / "s.stg"
    p.write_bytes((header or staging_block.file_header("r1", HOUR, PART)) + b"".join(blocks))
    return p


@pytest.mark.parametrize("frame_size", [64 * 1024, 100_000, 4 * 1024 * 1024])
def test_round_trip_lf_and_octet_blocks(tmp_path: Path, frame_size: int) -> None:
    # ~1 MB: blocks cross frame boundaries; messages with LF and NUL sit in "o" blocks.
    msgs = mixed_traffic(5000)
    src = write_staging_v2(tmp_path, "r1", HOUR, PART, msgs, block=37)
    raw = src.read_bytes()
    assert b"@" + staging_block.format_recv(msgs[37].recv) + b" " in raw
    info = compress_staging(src, tmp_path / "c.zst", level=3, frame_size=frame_size)
    assert info.damaged_at is None and info.damage is None
    assert info.count == len(msgs)
    assert set(info.hosts) == {_host(m.msg) for m in msgs}
    assert info.first_recv == staging_block.format_recv(msgs[0].recv).decode()
    last_block = msgs[(len(msgs) - 1) // 37 * 37]
    assert info.last_recv == staging_block.format_recv(last_block.recv).decode()
    lines = _lines([[m.msg for m in msgs[i : i + 37]] for i in range(0, len(msgs), 37)])
    assert _raw(tmp_path / "c.zst") == lines  # one message per line
    assert (info.raw_size, info.raw_sha256) == (len(lines), hashlib.sha256(lines).hexdigest())
    assert info.chunk_format == 2 and sum(info.host_counts.values()) == len(msgs)
    assert _read_back(tmp_path / "c.zst") == [m.msg for m in msgs]  # byte-exact
    assert _rebuild(tmp_path / "c.zst") == raw
    got = list(iter_records(raw[i : i + 997] for i in range(0, len(raw), 997)))
    assert [r.msg for r in got] == [m.msg for m in msgs]  # byte-exact, LF and NUL included
    assert [r.host.decode() for r in got] == [_host(m.msg) for m in msgs]
    assert {r.flags for r in got} == {b"-"}


def test_hosts_match_message_host_on_tricky_headers(tmp_path: Path) -> None:
    tricky = [
        b"<13>1 2026-11-26T01:00:00Z host-a app - - - x",
        b"<13>1 2026-11-26T01:00:00Z - app - - - dash host",
        b"<13>1 2026-11-26T01:00:00Z " + b"h" * 300 + b" app - - - too long",
        b"<13>1 2026-11-26T01:00:00Z nospace",
        b"<13>1 2026-11-26T01:00:00Z",
        b"<>1  host-b x",
        b"<1234>1 stamp host-c x",
        b"<13>Nov 26 01:00:00 host-d sshd[1]: 3164",
        b"<13>Nov 26 01:00:00 sshd[1]: no host",
        b"no header at all",
        b"<13>1 stamp ho\x01st\xff x",
        b"",
        b"<13>1 2026-11-26T01:00:00Z\nlf-host x",
    ]
    msgs = [Msg(HOUR_EPOCH, SENDER, b"", m) for m in tricky]
    # Octet blocks of one and of many messages: the pattern must not run into the next frame.
    blocks = [encode_block(msgs)] + [encode_block([m]) for m in msgs]
    blocks.append(encode_block([m for m in msgs if b"\n" not in m.msg and m.msg], lf=True))
    info = compress_staging(
        _staging(tmp_path, blocks), tmp_path / "c.zst", level=1, frame_size=65536
    )
    assert info.damage is None
    assert set(info.hosts) == {_host(m) for m in tricky}
    assert info.count == 2 * len(tricky) + len([m for m in tricky if b"\n" not in m and m])


_HEADERISH = st.builds(
    lambda pri, stamp, host, rest: b"<" + pri + b">1 " + stamp + b" " + host + rest,
    st.binary(max_size=4),
    st.binary(max_size=8),
    st.binary(max_size=12),
    st.binary(max_size=12),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.one_of(_HEADERISH, st.binary(max_size=40)), max_size=8), max_size=8))
def test_scanner_hosts_equal_message_host(blocks: list[list[bytes]]) -> None:
    data = staging_block.file_header("r1", HOUR, PART)
    for msgs in blocks:
        payload = octet.encode_many(msgs)
        data += (
            staging_block.block_header(b"t", SENDER, b"o", b"-", len(msgs), payload)
            + payload
            + b"\n"
        )
    scanner = _RecordScanner(0)
    scanner.feed(data, data.index(b"\n") + 1)
    scanner.finish()
    assert scanner.damage is None
    assert scanner.count == sum(map(len, blocks))
    assert scanner.host_names() == sorted({_host(m) for msgs in blocks for m in msgs})


def _blocks(n: int = 6, per: int = 40) -> tuple[list[Msg], list[bytes]]:
    msgs = mixed_traffic(n * per, seed=3)
    return msgs, [
        encode_block(msgs[i : i + per], lf=i % 80 == 40) for i in range(0, len(msgs), per)
    ]


def _corrupt(block: bytes, how: str) -> bytes:
    nl = block.index(b"\n")
    head, payload = block[:nl].split(b" "), block[nl + 1 : -1]
    if how == "payload byte":
        return block[: nl + 5] + bytes([block[nl + 5] ^ 0x20]) + block[nl + 6 :]
    if how == "count":
        head[4] = b"%d" % (int(head[4]) + 1)
    elif how == "framing":
        head[2] = b"x"
    elif how == "check byte":
        return block[:-1] + b"X"
    return b" ".join(head) + b"\n" + payload + b"\n"


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("payload byte", "checksum mismatch"),
        ("count", "its header says"),
        ("framing", "unknown block framing"),
        ("check byte", "not terminated by LF"),
    ],
)
@pytest.mark.parametrize("frame_size", [64 * 1024, 4 * 1024 * 1024])
def test_damaged_block_reported_at_its_offset(
    tmp_path: Path, how: str, reason: str, frame_size: int
) -> None:
    msgs, blocks = _blocks(n=40)  # ~500 KB: the bad block is past the first 64 KiB frame
    bad = 30
    blocks[bad] = _corrupt(blocks[bad], how)
    src = _staging(tmp_path, blocks)
    at = len(staging_block.file_header("r1", HOUR, PART)) + sum(map(len, blocks[:bad]))
    info = compress_staging(src, tmp_path / "c.zst", level=3, frame_size=frame_size)
    assert info.damaged_at == at
    assert info.damage is not None and reason in info.damage
    assert info.count == 40 * bad  # the messages before the damage
    before = _lines([[m.msg for m in msgs[i : i + 40]] for i in range(0, 40 * bad, 40)])
    # Nothing dropped: the undecodable rest follows the lines unchanged.
    assert _raw(tmp_path / "c.zst") == before + src.read_bytes()[at:]
    assert _rebuild(tmp_path / "c.zst") == src.read_bytes()
    with pytest.raises(plain.PlainError), open(tmp_path / "c.zst", "rb") as f:
        n = 0
        for run in stream_runs(f):
            n += run.count
    assert n == 40 * bad
    with pytest.raises(staging_block.RecordError) as exc:
        list(iter_records(iter([src.read_bytes()])))
    assert reason in exc.value.reason


def test_torn_last_block(tmp_path: Path) -> None:
    _, blocks = _blocks()
    src = _staging(tmp_path, [*blocks[:-1], blocks[-1][:-7]])
    info = compress_staging(src, tmp_path / "c.zst", level=3, frame_size=65536)
    assert info.count == 200
    assert info.damaged_at == src.stat().st_size - len(blocks[-1]) + 7
    assert info.damage == "incomplete last record"


def test_format_1_records_and_blocks_mixed(tmp_path: Path) -> None:
    msgs = mixed_traffic(400, seed=5)
    old = [
        staging_block.encode(
            staging_block.format_recv(m.recv), m.sender, b"old-" + m.host, flags_for(m.msg), m.msg
        )
        for m in msgs[:200]
    ]
    new = [encode_block(msgs[i : i + 50]) for i in range(200, 400, 50)]
    for header in (
        staging_block.file_header("r1", HOUR, PART),
        staging_block.HEADER_PREFIX_1 + b"relay=r1\n",
    ):
        src = _staging(tmp_path, old + new, header)
        info = compress_staging(src, tmp_path / "c.zst", level=3, frame_size=65536)
        assert info.damage is None and info.count == 400
        assert set(info.hosts) == {"old-" + m.host.decode() for m in msgs[:200]} | {
            _host(m.msg) for m in msgs[200:]
        }
        assert info.first_recv == staging_block.format_recv(msgs[0].recv).decode()
        assert info.last_recv == staging_block.format_recv(msgs[350].recv).decode()
        got = list(iter_records(iter([src.read_bytes()])))
        assert [r.msg for r in got] == [m.msg for m in msgs]
        assert got[0].flags == flags_for(msgs[0].msg) and got[-1].flags == b"-"


def test_block_flags_kept(tmp_path: Path) -> None:
    msgs = mixed_traffic(3)
    src = _staging(tmp_path, [encode_block(msgs, flags=b"TR")])
    got = list(iter_records(iter([src.read_bytes()])))
    assert [r.flags for r in got] == [b"TR"] * 3
    assert [r.sender for r in got] == [msgs[0].sender] * 3
