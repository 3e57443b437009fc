"""Object keys and manifests (format 1, docs/staging-and-archive-format.md).

A manifest describes one chunk and links to the same relay's previous
manifest by its SHA-256, so the manifests of a relay form a hash chain: a
deleted or altered chunk or manifest shows up as a broken link or a hash
mismatch. ``seq`` numbers the links so a gap names what is missing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from archive.chunk import ChunkInfo

MANIFEST_FORMAT = 1
CHUNK_SUFFIX = ".log.zst"
MANIFEST_SUFFIX = ".manifest.json"


class ManifestError(ValueError):
    """A manifest object could not be parsed."""


def hour_prefix(prefix: str, hour: str) -> str:
    """``PREFIX/date=YYYY-MM-DD/hour=HH/`` for a staging hour ``YYYY-MM-DDTHH``."""
    date, sep, hh = hour.partition("T")
    if not sep or len(date) != 10 or len(hh) != 2 or not hh.isdigit():
        raise ValueError(f"bad hour {hour!r}")
    base = prefix.strip("/")
    return f"{base}/date={date}/hour={hh}/" if base else f"date={date}/hour={hh}/"


def hour_of(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H")


def chunk_key(prefix: str, relay: str, hour: str, part: str) -> str:
    return f"{hour_prefix(prefix, hour)}{relay}-{part}{CHUNK_SUFFIX}"


def manifest_key(prefix: str, relay: str, hour: str, part: str) -> str:
    return f"{hour_prefix(prefix, hour)}{relay}-{part}{MANIFEST_SUFFIX}"


def head_key(prefix: str, relay: str) -> str:
    """Where the relay's chain head is published (the one object that is replaced)."""
    base = prefix.strip("/")
    return f"{base}/_chain/{relay}.json" if base else f"_chain/{relay}.json"


def head_bytes(link: ChainLink, relay: str, hour: str) -> bytes:
    """The published chain head: lets verify notice that the newest manifests are gone."""
    d = {
        "relay": relay,
        "chain_id": link.chain_id,
        "seq": link.seq,
        "manifest_key": link.key,
        "manifest_sha256": link.sha256,
        "hour": hour,
    }
    return (json.dumps(d, sort_keys=True) + "\n").encode("utf-8")


def manifest_key_for_chunk(key: str) -> str:
    return key[: -len(CHUNK_SUFFIX)] + MANIFEST_SUFFIX


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Manifest:
    format: int
    relay: str
    hour: str
    part: str
    key: str
    chain_id: str
    seq: int
    prev_manifest_key: str | None
    prev_manifest_sha256: str | None
    count: int
    first_recv: str | None
    last_recv: str | None
    hosts: tuple[str, ...]
    raw_size: int
    raw_sha256: str
    compressed_size: int
    compressed_sha256: str
    zstd_level: int
    frame_size: int
    frames: int
    damaged_at: int | None
    damage: str | None
    created: str
    # Added with plain chunks; a manifest without them describes a format 1 chunk
    # (the staging file as it was) with no per-host counts.
    chunk_format: int = 1
    host_counts: dict[str, int] | None = None

    def to_bytes(self) -> bytes:
        d: dict[str, object] = asdict(self)
        d["hosts"] = list(self.hosts)
        return (json.dumps(d, indent=1, sort_keys=True) + "\n").encode("utf-8")


@dataclass(frozen=True)
class ChainLink:
    """Where the relay's chain stands: the last stored manifest."""

    chain_id: str
    seq: int
    key: str
    sha256: str


def build(
    info: ChunkInfo,
    key: str,
    prev: ChainLink | None,
    new_chain_id: str,
    now: datetime,
) -> Manifest:
    return Manifest(
        format=MANIFEST_FORMAT,
        relay=info.relay,
        hour=info.hour,
        part=info.part,
        key=key,
        chain_id=prev.chain_id if prev else new_chain_id,
        seq=prev.seq + 1 if prev else 1,
        prev_manifest_key=prev.key if prev else None,
        prev_manifest_sha256=prev.sha256 if prev else None,
        count=info.count,
        first_recv=info.first_recv,
        last_recv=info.last_recv,
        hosts=info.hosts,
        raw_size=info.raw_size,
        raw_sha256=info.raw_sha256,
        compressed_size=info.compressed_size,
        compressed_sha256=info.compressed_sha256,
        zstd_level=info.level,
        frame_size=info.frame_size,
        frames=info.frames,
        damaged_at=info.damaged_at,
        damage=info.damage,
        created=now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        chunk_format=info.chunk_format,
        host_counts=dict(info.host_counts),
    )


_FIELDS = {f for f in Manifest.__dataclass_fields__}
_OPTIONAL = {"chunk_format", "host_counts"}


def parse(data: bytes) -> Manifest:
    try:
        d = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"not JSON: {exc}") from exc
    if not isinstance(d, dict):
        raise ManifestError("not a JSON object")
    if d.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"unsupported manifest format {d.get('format')!r}")
    missing = _FIELDS - _OPTIONAL - d.keys()
    if missing:
        raise ManifestError(f"missing fields: {', '.join(sorted(missing))}")
    d = {k: v for k, v in d.items() if k in _FIELDS}
    d["hosts"] = tuple(d["hosts"])
    try:
        return Manifest(**d)
    except TypeError as exc:
        raise ManifestError(str(exc)) from exc
