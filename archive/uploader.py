"""Idempotent upload of one closed staging file.

Every step can be interrupted (crash, kill -9, S3 down) and the whole thing
run again from the start; the order makes that safe:

1. compress the staging file to a temp chunk (raw SHA-256 identifies content);
2. if the manifest already exists: it must describe the same raw bytes
   (a retry after the manifest was stored) -> go to 5;
3. if the chunk exists with the same raw SHA-256 in its metadata, reuse it;
   if with another, stop: never overwrite (ConflictError); if absent, abort
   stale multipart uploads for the key, upload, and verify with a head;
4. store the manifest, linked to the chain head;
5. persist the chain head (only now: it must never name an unstored manifest);
6. verify chunk and manifest with heads, then delete the staging file (or
   move it to staging/archived/ with keep_uploaded).

Keys are deterministic, so a retry never creates a second copy.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from archive import manifest as mf
from archive.chunk import ChunkInfo, compress_staging
from archive.store import ObjectStore, StoreError
from relay.config import Config
from relay.disk.staging import archived_dir

META_RAW_SHA = "raw-sha256"
META_COMP_SHA = "compressed-sha256"
META_RAW_SIZE = "raw-size"
META_COUNT = "count"


class ConflictError(StoreError):
    """An object already exists under our key with different content."""


class VerifyError(StoreError):
    """The stored object does not match what was uploaded."""


@dataclass(frozen=True)
class UploadResult:
    key: str
    manifest_key: str
    manifest: mf.Manifest
    reused_chunk: bool
    reused_manifest: bool


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ChainState:
    """The chain head, in STATE_DIR/archive/chain.json, replaced atomically."""

    def __init__(self, archive_dir: Path) -> None:
        self.path = archive_dir / "chain.json"

    def load(self) -> mf.ChainLink | None:
        try:
            d = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        return mf.ChainLink(d["chain_id"], int(d["seq"]), d["key"], d["sha256"])

    def save(self, link: mf.ChainLink) -> None:
        tmp = self.path.with_suffix(".tmp")
        data = json.dumps(
            {"chain_id": link.chain_id, "seq": link.seq, "key": link.key, "sha256": link.sha256}
        ).encode()
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)


def _chunk_metadata(info: ChunkInfo) -> dict[str, str]:
    return {
        META_RAW_SHA: info.raw_sha256,
        META_COMP_SHA: info.compressed_sha256,
        META_RAW_SIZE: str(info.raw_size),
        META_COUNT: str(info.count),
    }


class Uploader:
    """Uploads closed staging files of one relay to one store."""

    def __init__(
        self,
        cfg: Config,
        store: ObjectStore,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        hook: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.now = now
        # Called with a step name between steps; tests use it to crash there.
        self.hook = hook or (lambda step: None)
        self.archive_dir = cfg.relay.state_dir / "archive"
        self.tmp_dir = self.archive_dir / "tmp"
        self.archived_dir = archived_dir(cfg.staging_dir)
        self.chain = ChainState(self.archive_dir)
        self._manifest_bytes = b""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def upload(self, staging: Path) -> UploadResult:
        a = self.cfg.archive
        tmp = self.tmp_dir / (staging.name + ".zst.tmp")
        try:
            info = compress_staging(
                staging, tmp, level=a.compression_level, frame_size=a.frame_size
            )
            self.hook("compressed")
            key = mf.chunk_key(a.prefix, info.relay, info.hour, info.part)
            mkey = mf.manifest_key(a.prefix, info.relay, info.hour, info.part)

            existing = self._existing_manifest(mkey, info)
            reused_chunk = True
            if existing is None:
                reused_chunk, comp_sha, comp_size = self._ensure_chunk(key, tmp, info)
                self.hook("chunk-stored")
                manifest = self._store_manifest(info, key, mkey, comp_sha, comp_size)
                self.hook("manifest-stored")
            else:
                manifest = existing
            self._advance_chain(manifest, mkey)
            self.hook("chain-saved")
            self._verify(key, mkey, manifest)
            self._retire(staging)
            self.hook("staging-removed")
            return UploadResult(key, mkey, manifest, reused_chunk, existing is not None)
        finally:
            tmp.unlink(missing_ok=True)

    # -- steps

    def _existing_manifest(self, mkey: str, info: ChunkInfo) -> mf.Manifest | None:
        if self.store.head(mkey) is None:
            return None
        with self.store.open(mkey) as f:
            data = f.read()
        m = mf.parse(data)
        if m.raw_sha256 != info.raw_sha256:
            raise ConflictError(
                f"{mkey} exists and describes other content "
                f"(raw sha256 {m.raw_sha256}, staging {info.raw_sha256})"
            )
        self._manifest_bytes = data
        return m

    def _ensure_chunk(self, key: str, tmp: Path, info: ChunkInfo) -> tuple[bool, str, int]:
        head = self.store.head(key)
        if head is not None:
            if head.metadata.get(META_RAW_SHA) != info.raw_sha256:
                raise ConflictError(
                    f"{key} exists with other content (raw sha256 "
                    f"{head.metadata.get(META_RAW_SHA)}, staging {info.raw_sha256})"
                )
            # Same raw bytes uploaded by an earlier attempt (maybe by another
            # zstd version): keep that object and describe it as stored.
            comp = head.metadata.get(META_COMP_SHA, "")
            return True, comp, head.size
        self.store.abort_multipart(key)
        self.store.put_file(key, tmp, _chunk_metadata(info))
        head = self.store.head(key)
        if (
            head is None
            or head.size != info.compressed_size
            or head.metadata.get(META_RAW_SHA) != info.raw_sha256
        ):
            raise VerifyError(f"{key}: stored object does not match after upload")
        return False, info.compressed_sha256, info.compressed_size

    def _store_manifest(
        self, info: ChunkInfo, key: str, mkey: str, comp_sha: str, comp_size: int
    ) -> mf.Manifest:
        prev = self.chain.load()
        m = mf.build(info, key, prev, uuid.uuid4().hex, self.now())
        if comp_sha != info.compressed_sha256 or comp_size != info.compressed_size:
            m = _replace(m, compressed_sha256=comp_sha, compressed_size=comp_size)
        data = m.to_bytes()
        self.store.put_bytes(mkey, data, {META_RAW_SHA: info.raw_sha256})
        self._manifest_bytes = data
        return m

    def _advance_chain(self, m: mf.Manifest, mkey: str) -> None:
        current = self.chain.load()
        if current is None or current.chain_id != m.chain_id or current.seq < m.seq:
            current = mf.ChainLink(m.chain_id, m.seq, mkey, mf.sha256_hex(self._manifest_bytes))
            self.chain.save(current)
        # Published after every upload (again on a retry): verify compares the newest
        # manifests in the bucket with it, so deleting the latest ones is noticed too.
        if current.key == mkey:
            head = mf.head_bytes(current, m.relay, m.hour)
            self.store.put_bytes(mf.head_key(self.cfg.archive.prefix, m.relay), head, {})

    def _verify(self, key: str, mkey: str, m: mf.Manifest) -> None:
        head = self.store.head(key)
        if head is None or head.size != m.compressed_size:
            raise VerifyError(f"{key}: missing or wrong size after upload")
        if head.metadata.get(META_RAW_SHA) != m.raw_sha256:
            raise VerifyError(f"{key}: metadata does not match the manifest")
        if self.store.head(mkey) is None:
            raise VerifyError(f"{mkey}: missing after upload")

    def _retire(self, staging: Path) -> None:
        if self.cfg.archive.keep_uploaded:
            self.archived_dir.mkdir(parents=True, exist_ok=True)
            os.replace(staging, self.archived_dir / staging.name)
            _fsync_dir(self.archived_dir)
        else:
            staging.unlink()
        _fsync_dir(staging.parent)


def _replace(m: mf.Manifest, **changes: object) -> mf.Manifest:
    from dataclasses import replace

    return replace(m, **changes)  # type: ignore[arg-type]
