"""Helpers shared by the test_archive_* modules (no tests here).

Staging files are written directly with relay.formats.staging_block, as the relay would
leave them in staging/closed/; no relay process is needed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from relay.config import Config, load
from relay.formats import octet, staging_block

HOUR = "2026-11-26T01"
HOUR_EPOCH = datetime(2026, 11, 26, 1, tzinfo=UTC).timestamp()


@dataclass(frozen=True)
class Msg:
    recv: float
    sender: bytes
    host: bytes
    msg: bytes


def mixed_traffic(
    n: int, seed: int = 1, start: float = HOUR_EPOCH, span: float = 3599.0
) -> list[Msg]:
    """RFC 5424 and RFC 3164 messages across an hour, some with LF, NUL, bad UTF-8."""
    rng = random.Random(seed)
    hosts = [b"web%02d" % i for i in range(12)] + [b"db-1.example.net", b"-"]
    apps = [b"sshd", b"nginx", b"kernel", b"cron", b"postfix/smtp"]
    out: list[Msg] = []
    for i in range(n):
        t = start + span * i / max(1, n - 1)
        host = rng.choice(hosts)
        app = rng.choice(apps)
        body = b"event %d user=%d path=/api/v1/items/%d status=%d" % (
            i,
            rng.randrange(1000),
            rng.randrange(100000),
            rng.choice([200, 200, 404, 500]),
        )
        kind = i % 10
        if kind == 7:
            body += b"\nsecond line\n  third line"
        elif kind == 8:
            body += b"\x00nul\x00inside"
        elif kind == 9:
            body += b" \xff\xfe not utf-8"
        ts = datetime.fromtimestamp(t, UTC)
        if i % 2:
            msg = b"<%d>1 %s %s %s %d ID%d - %s" % (
                rng.randrange(192),
                ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode(),
                host,
                app,
                rng.randrange(1, 65535),
                i % 50,
                body,
            )
        else:
            msg = b"<%d>%s %s %s[%d]: %s" % (
                rng.randrange(192),
                ts.strftime("%b %d %H:%M:%S").encode(),
                host,
                app,
                rng.randrange(1, 65535),
                body,
            )
        out.append(Msg(t, b"tcp://127.0.0.1:%d" % (40000 + i % 100), host, msg))
    return out


def flags_for(msg: bytes) -> bytes:
    f = b""
    if b"\x00" in msg:
        f += b"N"
    try:
        msg.decode("utf-8")
    except UnicodeDecodeError:
        f += b"U"
    return f or b"-"


def write_staging(
    state_dir: Path, relay_id: str, hour: str, part: str, msgs: list[Msg], where: str = "closed"
) -> Path:
    d = state_dir / "staging" / where
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{hour}--{part}.stg"
    with open(path, "wb") as f:
        # Format 1: one record per message, behind a format 1 header.
        f.write(
            staging_block.HEADER_PREFIX_1 + f"relay={relay_id} hour={hour} part={part}\n".encode()
        )
        for m in msgs:
            f.write(
                staging_block.encode(
                    staging_block.format_recv(m.recv),
                    m.sender,
                    staging_block.sanitize_host(m.host),
                    flags_for(m.msg),
                    m.msg,
                )
            )
    return path


def write_staging_v2(
    state_dir: Path,
    relay_id: str,
    hour: str,
    part: str,
    msgs: list[Msg],
    where: str = "closed",
    block: int = 50,
) -> Path:
    """Format 2 staging as the relay writes it: blocks of up to ``block`` messages,
    LF-framed when no message holds LF (every other block), octet-counted otherwise."""
    d = state_dir / "staging" / where
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{hour}--{part}.stg"
    with open(path, "wb") as f:
        f.write(staging_block.file_header(relay_id, hour, part))
        for k, i in enumerate(range(0, len(msgs), block)):
            f.write(encode_block(msgs[i : i + block], lf=k % 2 == 1))
    return path


def encode_block(msgs: list[Msg], lf: bool = False, flags: bytes = b"-") -> bytes:
    """One format 2 block: RECV and SENDER of the first message (one received chunk)."""
    bodies = [m.msg for m in msgs]
    if lf and not any(b"\n" in b for b in bodies):
        payload = b"".join(b + b"\n" for b in bodies)
        framing = staging_block.FRAMING_LF
    else:
        payload = octet.encode_many(bodies)
        framing = staging_block.FRAMING_OCTET
    recv = staging_block.format_recv(msgs[0].recv)
    head = staging_block.block_header(recv, msgs[0].sender, framing, flags, len(msgs), payload)
    return head + payload + b"\n"


def part_at(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y%m%dT%H%M%S%fZ")


def stage_hour(state_dir: Path, h: int) -> Path:
    """Closed staging of relay1 for hour ``h`` after HOUR_EPOCH: 20 messages of mixed traffic."""
    start = HOUR_EPOCH + 3600 * h
    return write_staging_v2(
        state_dir,
        "relay1",
        f"2026-11-26T0{h + 1}",
        part_at(start),
        mixed_traffic(20, seed=h, start=start),
    )


def write_config(
    path: Path,
    state_dir: Path,
    *,
    relay_id: str = "relay1",
    bucket: str = "archive",
    endpoint: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    extra: str = "",
) -> Config:
    lines = [
        "[relay]",
        f'id = "{relay_id}"',
        f'state_dir = "{state_dir}"',
        "[archive]",
        "enabled = true",
        f'bucket = "{bucket}"',
        'prefix = "syslog"',
        'frame_size = "64KiB"',
        'multipart_threshold = "5MiB"',
        'multipart_chunksize = "5MiB"',
        'poll_interval = "100ms"',
        'retry_max_backoff = "1s"',
    ]
    if endpoint:
        lines.append(f'endpoint_url = "{endpoint}"')
    if access_key:
        lines.append(f'access_key_id = "{access_key}"')
    if secret_key:
        lines.append(f'secret_access_key = "{secret_key}"')
    path.write_text("\n".join(lines) + "\n" + extra)
    return load(path)
