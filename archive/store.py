"""Object storage: the few operations the archiver needs, behind one interface.

``S3Store`` speaks to any S3-compatible server with boto3; ``MemoryStore`` is
the in-memory fake that passes the same shared tests. Errors are translated
here, at the boundary, into a small hierarchy so callers decide on types,
never on error strings: ``Unavailable`` is worth retrying, the others are not.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

from relay.config import ArchiveConfig


class StoreError(Exception):
    """An object store operation failed."""


class Unavailable(StoreError):
    """Transient: unreachable, 5xx, throttled, timed out. Retry later."""


class AccessDenied(StoreError):
    """Bad credentials or missing permission."""


class NoSuchBucket(StoreError):
    """The configured bucket does not exist."""


class ClockSkew(StoreError):
    """The server rejected the request signature's time."""


class NotFound(StoreError):
    """The object does not exist."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    metadata: Mapping[str, str] = field(default_factory=dict)


class ObjectStore(Protocol):
    def put_file(self, key: str, path: Path, metadata: Mapping[str, str]) -> None:
        """Store a file, streamed from disk; multipart above the threshold."""

    def put_bytes(self, key: str, data: bytes, metadata: Mapping[str, str]) -> None: ...

    def head(self, key: str) -> ObjectInfo | None:
        """Size and user metadata, or None when the object does not exist."""

    def open(self, key: str) -> IO[bytes]:
        """A readable stream of the object; raises NotFound."""

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Objects under ``prefix`` in key order (metadata not filled)."""

    def delete(self, key: str) -> None: ...

    def abort_multipart(self, prefix: str) -> int:
        """Abort unfinished multipart uploads under ``prefix``; returns how many."""

    def expiration_days(self, prefix: str) -> int | None:
        """Days after which the bucket's lifecycle expires objects under ``prefix``;
        None when no rule does (or the store cannot tell)."""

    def server_time(self) -> float | None:
        """The server's clock (raises ClockSkew, AccessDenied, NoSuchBucket, StoreError
        when the store is unusable); None when the store has none of its own."""


def _read_exact(f: IO[bytes], n: int) -> bytes:
    parts: list[bytes] = []
    while n > 0:
        b = f.read(n)
        if not b:
            break
        parts.append(b)
        n -= len(b)
    return b"".join(parts)


# --- in-memory fake -------------------------------------------------------------


class MemoryStore:
    """Dictionary-backed store with the same semantics as S3Store.

    ``fail_next`` makes the next N calls raise Unavailable, for fault tests;
    ``uploads`` holds "multipart uploads" left behind by a failed put_file.
    """

    def __init__(self, multipart_threshold: int = 64 * 1024 * 1024) -> None:
        self.objects: dict[str, tuple[bytes, dict[str, str]]] = {}
        self.uploads: dict[str, int] = {}
        self.multipart_threshold = multipart_threshold
        self.fail_next = 0
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def _enter(self, op: str, key: str) -> None:
        self.calls.append((op, key))
        if self.fail_next > 0:
            self.fail_next -= 1
            raise Unavailable(f"{op} {key}: injected failure")

    def put_file(self, key: str, path: Path, metadata: Mapping[str, str]) -> None:
        self._enter("put", key)
        data = path.read_bytes()
        with self._lock:
            self.objects[key] = (data, dict(metadata))

    def put_bytes(self, key: str, data: bytes, metadata: Mapping[str, str]) -> None:
        self._enter("put", key)
        with self._lock:
            self.objects[key] = (bytes(data), dict(metadata))

    def head(self, key: str) -> ObjectInfo | None:
        self._enter("head", key)
        with self._lock:
            obj = self.objects.get(key)
        return None if obj is None else ObjectInfo(key, len(obj[0]), dict(obj[1]))

    def open(self, key: str) -> IO[bytes]:
        self._enter("get", key)
        with self._lock:
            obj = self.objects.get(key)
        if obj is None:
            raise NotFound(key)
        return io.BytesIO(obj[0])

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self._enter("list", prefix)
        with self._lock:
            items = sorted((k, len(v[0])) for k, v in self.objects.items() if k.startswith(prefix))
        for k, n in items:
            yield ObjectInfo(k, n)

    def delete(self, key: str) -> None:
        self._enter("delete", key)
        with self._lock:
            self.objects.pop(key, None)

    def abort_multipart(self, prefix: str) -> int:
        self._enter("abort", prefix)
        with self._lock:
            stale = [k for k in self.uploads if k.startswith(prefix)]
            for k in stale:
                del self.uploads[k]
        return len(stale)

    def expiration_days(self, prefix: str) -> int | None:
        return None  # no lifecycle rules in memory

    def server_time(self) -> float | None:
        return None  # no clock of its own to compare


# --- S3 -------------------------------------------------------------------------


_DENIED = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "403",
}
_SKEW = {"RequestTimeTooSkewed"}
_NO_BUCKET = {"NoSuchBucket"}
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_TRANSIENT = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "ServiceUnavailable",
    "InternalError",
    "OperationAborted",
}


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


def _file_md5_b64(f: IO[bytes], size: int) -> str:
    h = hashlib.md5()
    f.seek(0)
    left = size
    while left > 0:
        b = f.read(min(left, 1024 * 1024))
        if not b:
            break
        h.update(b)
        left -= len(b)
    f.seek(0)
    return base64.b64encode(h.digest()).decode("ascii")


def _import_boto3() -> None:
    """Import boto3 without urllib3.contrib.pyopenssl, which saves every command ~40 ms.

    botocore.httpsession imports that module only to find urllib3's own
    SSLContext in case pyOpenSSL was injected into urllib3 (never here), and
    falls back to urllib3.util.ssl_.SSLContext, the same class, on ImportError.
    With pyOpenSSL installed (the relay's TLS needs it) the import loads
    OpenSSL and cryptography, a sixth of ``syslog-archive cat``'s start-up.
    The block lasts for that one import."""
    if "botocore.httpsession" in sys.modules:
        return
    name = "urllib3.contrib.pyopenssl"
    block = name not in sys.modules
    if block:
        sys.modules[name] = None  # type: ignore[assignment]  # None: ImportError
    try:
        import boto3  # noqa: F401
        import botocore.httpsession  # noqa: F401
    finally:
        if block and sys.modules.get(name, False) is None:
            del sys.modules[name]


def _botocore_at_least(major: int, minor: int) -> bool:
    import botocore

    parts = botocore.__version__.split(".")
    return (int(parts[0]), int(parts[1])) >= (major, minor)


class S3Store:
    """boto3 client configured for S3-compatible servers (MinIO, SeaweedFS, AWS)."""

    def __init__(
        self,
        cfg: ArchiveConfig,
        *,
        max_attempts: int = 5,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
    ) -> None:
        _import_boto3()
        import boto3
        from botocore.config import Config as BotoConfig

        self.cfg = cfg
        self.bucket = cfg.bucket
        extra: dict[str, object] = {}
        if _botocore_at_least(1, 36):
            # botocore >= 1.36 adds CRC32 trailing checksums (aws-chunked bodies) by
            # default; several S3-compatible servers reject or mis-store those. Our
            # integrity check is the SHA-256 in the manifest, plus Content-MD5
            # where Object Lock needs it, so checksums only when an API requires one.
            extra["request_checksum_calculation"] = "when_required"
            extra["response_checksum_validation"] = "when_required"
        boto_cfg = BotoConfig(
            s3={"addressing_style": cfg.addressing_style},
            signature_version="s3v4",
            # "standard" retries 5xx, throttling and connection errors with
            # jittered exponential backoff; the daemon retries further on top.
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            **extra,
        )
        # Credentials from the config when set, otherwise boto3's usual chain
        # (environment, ~/.aws/credentials, AWS_SHARED_CREDENTIALS_FILE, ...).
        session = boto3.session.Session(
            aws_access_key_id=cfg.access_key_id,
            aws_secret_access_key=cfg.secret_access_key,
            region_name=cfg.region,
        )
        self.client: Any = session.client("s3", endpoint_url=cfg.endpoint_url, config=boto_cfg)

    # -- error translation

    def _translate(self, exc: Exception, what: str) -> StoreError:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            msg = f"{what}: {code or status} {err.get('Message', '')}".strip()
            if code in _NO_BUCKET:
                return NoSuchBucket(msg)
            if code in _SKEW:
                return ClockSkew(msg)
            if code in _DENIED or status == 403:
                return AccessDenied(msg)
            if code in _NOT_FOUND or status == 404:
                return NotFound(msg)
            if code in _TRANSIENT or status >= 500 or status == 429:
                return Unavailable(msg)
            return StoreError(msg)
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return AccessDenied(f"{what}: {exc}")
        if isinstance(exc, BotoCoreError):
            # EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ...
            return Unavailable(f"{what}: {exc}")
        return StoreError(f"{what}: {exc}")

    def _call(self, what: str, op: str, **kwargs: object) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, op)(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, what) from exc

    # -- write

    def _put_args(self, metadata: Mapping[str, str]) -> dict[str, object]:
        args: dict[str, object] = {"Bucket": self.bucket, "Metadata": dict(metadata)}
        cfg = self.cfg
        if cfg.storage_class:
            args["StorageClass"] = cfg.storage_class
        if cfg.sse:
            args["ServerSideEncryption"] = cfg.sse
            if cfg.sse_kms_key_id:
                args["SSEKMSKeyId"] = cfg.sse_kms_key_id
        if cfg.object_lock_mode:
            args["ObjectLockMode"] = cfg.object_lock_mode
            args["ObjectLockRetainUntilDate"] = datetime.fromtimestamp(
                datetime.now(UTC).timestamp() + cfg.object_lock_days * 86400, UTC
            )
        return args

    @property
    def _need_md5(self) -> bool:
        # S3 requires Content-MD5 (or a checksum) on writes with Object Lock.
        return self.cfg.object_lock_mode is not None

    def put_bytes(self, key: str, data: bytes, metadata: Mapping[str, str]) -> None:
        args = self._put_args(metadata)
        if self._need_md5:
            args["ContentMD5"] = _md5_b64(data)
        self._call(f"put {key}", "put_object", Key=key, Body=data, **args)

    def put_file(self, key: str, path: Path, metadata: Mapping[str, str]) -> None:
        size = os.path.getsize(path)
        if size <= self.cfg.multipart_threshold:
            with open(path, "rb") as f:
                args = self._put_args(metadata)
                if self._need_md5:
                    args["ContentMD5"] = _file_md5_b64(f, size)
                self._call(f"put {key}", "put_object", Key=key, Body=f, **args)
            return
        self._put_multipart(key, path, metadata)

    def _put_multipart(self, key: str, path: Path, metadata: Mapping[str, str]) -> None:
        # Parts are read one at a time: memory is bounded by multipart_chunksize.
        resp = self._call(
            f"create multipart {key}",
            "create_multipart_upload",
            Key=key,
            **self._put_args(metadata),
        )
        upload_id = resp["UploadId"]
        parts: list[dict[str, object]] = []
        try:
            with open(path, "rb") as f:
                number = 1
                while True:
                    body = _read_exact(f, self.cfg.multipart_chunksize)
                    if not body:
                        break
                    extra: dict[str, object] = {}
                    if self._need_md5:
                        extra["ContentMD5"] = _md5_b64(body)
                    r = self._call(
                        f"upload part {number} of {key}",
                        "upload_part",
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=body,
                        **extra,
                    )
                    parts.append({"ETag": r["ETag"], "PartNumber": number})
                    number += 1
            self._call(
                f"complete multipart {key}",
                "complete_multipart_upload",
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )
        except BaseException:
            # Best effort: if this fails too, abort_multipart() before the next
            # attempt cleans up (the uploader always calls it first).
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            except Exception:  # already failing: the original error is the one to raise
                pass
            raise

    # -- read

    def head(self, key: str) -> ObjectInfo | None:
        try:
            r = self._call(f"head {key}", "head_object", Bucket=self.bucket, Key=key)
        except NotFound:
            return None
        return ObjectInfo(key, int(r["ContentLength"]), dict(r.get("Metadata", {})))

    def open(self, key: str) -> IO[bytes]:
        r = self._call(f"get {key}", "get_object", Bucket=self.bucket, Key=key)
        body: IO[bytes] = r["Body"]
        return body

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        token: str | None = None
        while True:
            args: dict[str, object] = {"Bucket": self.bucket, "Prefix": prefix}
            if token:
                args["ContinuationToken"] = token
            r = self._call(f"list {prefix}", "list_objects_v2", **args)
            for obj in r.get("Contents", []):
                yield ObjectInfo(obj["Key"], int(obj["Size"]))
            if not r.get("IsTruncated"):
                return
            token = r.get("NextContinuationToken")

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", "delete_object", Bucket=self.bucket, Key=key)

    def abort_multipart(self, prefix: str) -> int:
        r = self._call(
            f"list multipart {prefix}", "list_multipart_uploads", Bucket=self.bucket, Prefix=prefix
        )
        n = 0
        for up in r.get("Uploads", []):
            if not str(up["Key"]).startswith(prefix):
                continue
            try:
                self._call(
                    f"abort multipart {up['Key']}",
                    "abort_multipart_upload",
                    Bucket=self.bucket,
                    Key=up["Key"],
                    UploadId=up["UploadId"],
                )
            except NotFound:
                pass
            n += 1
        return n

    def expiration_days(self, prefix: str) -> int | None:
        """Days after which the bucket's lifecycle rules expire objects under ``prefix``
        (the shortest enabled rule that covers it), or None when none does or the
        configuration cannot be read."""
        try:
            r = self._call(
                f"lifecycle of {self.bucket}",
                "get_bucket_lifecycle_configuration",
                Bucket=self.bucket,
            )
        except StoreError:
            return None
        return expiry_days(r.get("Rules", []), prefix)

    # -- probe, for `check` and start-up

    def server_time(self) -> float | None:
        """The server's clock (HTTP Date of a HeadBucket), for the skew check."""
        try:
            r = self._call(f"head bucket {self.bucket}", "head_bucket", Bucket=self.bucket)
        except NotFound as exc:
            raise NoSuchBucket(f"bucket {self.bucket!r} does not exist") from exc
        date = r.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        if not date:
            return None
        from email.utils import parsedate_to_datetime

        return parsedate_to_datetime(date).timestamp()


def expiry_days(rules: list[dict[str, Any]], prefix: str) -> int | None:
    """The shortest ``Expiration.Days`` of the enabled lifecycle ``rules`` whose
    prefix covers every hour under ``prefix`` (None: no rule does).

    The keys are ``PREFIX/date=...``, so the documented rule ``syslog/`` covers
    the prefix ``syslog``, and so does ``syslog/date=``; ``sys`` also matches
    (S3 prefixes are plain string prefixes), ``syslog/date=2026`` does not
    cover every hour. A rule narrowed by tags or object size is not counted.
    """
    base = prefix.strip("/")
    hours = f"{base}/date=" if base else "date="
    days: list[int] = []
    for rule in rules:
        flt = rule.get("Filter") or {}
        if {"Tag", "And", "ObjectSizeGreaterThan", "ObjectSizeLessThan"} & flt.keys():
            continue
        rule_prefix = str(flt.get("Prefix", rule.get("Prefix", "")) or "")
        exp = rule.get("Expiration") or {}
        if rule.get("Status") == "Enabled" and "Days" in exp and hours.startswith(rule_prefix):
            days.append(int(exp["Days"]))
    return min(days) if days else None
