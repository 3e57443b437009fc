"""Verify a time range of the archive: chunks against manifests, manifest chain.

Every problem is a line naming the object concerned; an empty list means the
range is intact. The chain is checked per (relay, chain_id) in ``seq``
order; a link's predecessor outside the range is fetched by its key, so a
deleted manifest at the edge of the range is found too.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, cast

import zstandard

from archive import manifest as mf
from archive.reader import list_range, read_manifest
from archive.store import NotFound, ObjectStore

if TYPE_CHECKING:
    from archive.progress import Progress


def _hash_chunk(store: ObjectStore, key: str) -> tuple[int, str, int, str]:
    """(compressed size, compressed sha256, raw size, raw sha256) of an object."""
    comp = hashlib.sha256()
    raw = hashlib.sha256()
    comp_n = raw_n = 0
    dctx = zstandard.ZstdDecompressor()
    with store.open(key) as f:
        # Hash the compressed bytes as they pass into the decompressor.
        class _Tee:
            def read(self, n: int = -1) -> bytes:
                nonlocal comp_n
                b: bytes = f.read(n)
                comp.update(b)
                comp_n += len(b)
                return b

        reader = dctx.stream_reader(cast(IO[bytes], _Tee()), read_across_frames=True)
        while True:
            block = reader.read(1024 * 1024)
            if not block:
                break
            raw.update(block)
            raw_n += len(block)
        # Anything after the last frame (appended garbage) counts too.
        while True:
            b = f.read(1024 * 1024)
            if not b:
                break
            comp.update(b)
            comp_n += len(b)
    return comp_n, comp.hexdigest(), raw_n, raw.hexdigest()


@dataclass
class VerifyResult:
    problems: list[str]
    chunks: int
    notes: list[str] = field(default_factory=list)


_KEY_HOUR = re.compile(r"date=(\d{4}-\d{2}-\d{2})/hour=(\d{2})/")


def _key_epoch(key: str) -> float | None:
    mo = _KEY_HOUR.search(key)
    if mo is None:
        return None
    return datetime.strptime(f"{mo[1]}T{mo[2]}", "%Y-%m-%dT%H").replace(tzinfo=UTC).timestamp()


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def verify_range(
    store: ObjectStore,
    prefix: str,
    hours: list[str],
    progress: Progress | None = None,
    retention: float | None = None,
    now: float | None = None,
) -> VerifyResult:
    """Check ``hours``; ``progress`` gets a step per chunk.

    ``retention`` (seconds; otherwise the bucket's lifecycle expiry when the
    store can tell) sets the retention horizon: a chain whose predecessor lies
    before it starts there by expiry, which is a note, not a problem.
    """
    problems: list[str] = []
    notes: list[str] = []
    if retention is None:
        days = store.expiration_days(prefix)
        retention = days * 86400.0 if days else None
    horizon = None
    if retention is not None:
        horizon = (time.time() if now is None else now) - retention
        first = _key_epoch(mf.hour_prefix(prefix, hours[0])) if hours else None
        if first is not None and first < horizon:
            notes.append(
                f"retention horizon {_iso(horizon)}: hours before it have expired "
                f"(the range starts at {hours[0]})"
            )
    listing = list_range(store, prefix, hours)
    if progress is not None:
        progress.total = len(listing.chunks)
    chunk_keys = {c.key for c in listing.chunks}
    manifests: dict[str, tuple[mf.Manifest, str]] = {}

    for mkey in sorted(listing.manifests):
        try:
            got = read_manifest(store, mkey)
        except mf.ManifestError as exc:
            problems.append(f"manifest unreadable: {mkey}: {exc}")
            continue
        if got is None:
            problems.append(f"manifest missing: {mkey}")
            continue
        m, data = got
        manifests[mkey] = (m, mf.sha256_hex(data))
        if m.key not in chunk_keys:
            problems.append(f"chunk missing: {m.key} (described by {mkey})")

    for c in listing.chunks:
        if c.manifest_key not in manifests and c.manifest_key not in listing.manifests:
            problems.append(f"manifest missing: {c.manifest_key} (for chunk {c.key})")
            continue
        if c.manifest_key not in manifests:
            continue
        m = manifests[c.manifest_key][0]
        try:
            comp_n, comp_sha, raw_n, raw_sha = _hash_chunk(store, c.key)
        except zstandard.ZstdError as exc:
            problems.append(f"chunk altered: {c.key}: not valid zstd ({exc})")
            continue
        finally:
            if progress is not None:
                progress.step(m.count, c.size)
        if comp_n != m.compressed_size or comp_sha != m.compressed_sha256:
            problems.append(
                f"chunk altered: {c.key}: compressed sha256 {comp_sha} ({comp_n} bytes), "
                f"manifest says {m.compressed_sha256} ({m.compressed_size} bytes)"
            )
        elif raw_n != m.raw_size or raw_sha != m.raw_sha256:
            problems.append(f"chunk altered: {c.key}: uncompressed content differs from manifest")

    problems += _check_chains(store, manifests, horizon, notes)
    problems += _check_heads(store, prefix, hours, manifests)
    return VerifyResult(problems, len(listing.chunks), notes)


def _check_heads(
    store: ObjectStore, prefix: str, hours: list[str], manifests: dict[str, tuple[mf.Manifest, str]]
) -> list[str]:
    """The published chain head of each relay: its manifest must exist, unaltered."""
    problems: list[str] = []
    relays = {m.relay for m, _ in manifests.values()}
    wanted = set(hours)
    for relay in sorted(relays):
        key = mf.head_key(prefix, relay)
        try:
            with store.open(key) as f:
                head = json.loads(f.read())
        except NotFound:
            continue  # archived before heads were published
        except ValueError:
            problems.append(f"chain head unreadable: {key}")
            continue
        if head.get("hour") not in wanted:
            continue  # the newest manifest lies outside this range
        mkey = str(head.get("manifest_key"))
        got = manifests.get(mkey)
        if got is None:
            try:
                read = read_manifest(store, mkey)
            except mf.ManifestError:
                read = None
            if read is None:
                problems.append(f"manifest missing: {mkey} (the newest, named by {key})")
                continue
            sha = mf.sha256_hex(read[1])
        else:
            sha = got[1]
        if sha != head.get("manifest_sha256"):
            problems.append(f"manifest altered: {mkey} (its hash differs from {key})")
    return problems


def _check_chains(
    store: ObjectStore,
    manifests: dict[str, tuple[mf.Manifest, str]],
    horizon: float | None,
    notes: list[str],
) -> list[str]:
    problems: list[str] = []
    chains: dict[tuple[str, str], list[tuple[mf.Manifest, str, str]]] = defaultdict(list)
    for mkey, (m, sha) in manifests.items():
        chains[(m.relay, m.chain_id)].append((m, mkey, sha))
    for (relay, chain_id), links in chains.items():
        links.sort(key=lambda t: (t[0].seq, t[1]))
        by_seq: dict[int, tuple[str, str]] = {}
        for m, mkey, sha in links:
            if m.seq in by_seq:
                # One uploader numbers its manifests once each: a second manifest with
                # the same seq is a fork (a forged one, or an archiver state restored
                # from a backup), and the one it hides would otherwise pass unseen.
                problems.append(
                    f"chain forked: {by_seq[m.seq][0]} and {mkey} both have seq {m.seq} "
                    f"in chain {chain_id} of relay {relay}"
                )
                continue
            by_seq[m.seq] = (mkey, sha)
        for m, mkey, _sha in links:
            if m.prev_manifest_sha256 is None:
                if m.seq != 1:
                    problems.append(f"chain broken: {mkey} has seq {m.seq} but no predecessor")
                continue
            if m.seq - 1 in by_seq:
                prev_key, prev_sha = by_seq[m.seq - 1]
                if prev_sha != m.prev_manifest_sha256:
                    problems.append(
                        f"manifest altered: {prev_key} (its hash differs from the one "
                        f"recorded in {mkey})"
                    )
                continue
            if m.prev_manifest_key is None:
                problems.append(f"chain broken: {mkey} names no predecessor key")
                continue
            # The predecessor lies outside the range (an earlier hour, or a later
            # one for a late part): fetch it by its key.
            try:
                got = read_manifest(store, m.prev_manifest_key)
            except mf.ManifestError:
                got = None
            prev_at = _key_epoch(m.prev_manifest_key)
            if got is None and horizon is not None and prev_at is not None and prev_at < horizon:
                notes.append(
                    f"chain starts at {mkey}: its predecessor {m.prev_manifest_key} is past the "
                    f"retention horizon {_iso(horizon)} (expired)"
                )
            elif got is None:
                hint = "" if horizon is not None else "; if it expired, give --retention"
                problems.append(
                    f"manifest missing: {m.prev_manifest_key} (predecessor of {mkey}{hint})"
                )
            elif mf.sha256_hex(got[1]) != m.prev_manifest_sha256:
                problems.append(
                    f"manifest altered: {m.prev_manifest_key} (its hash differs from the "
                    f"one recorded in {mkey})"
                )
    return problems
