"""The archiver against a real S3 server (SeaweedFS ``weed mini`` on 127.0.0.1).

One module holds every test that needs the server, so the session fixture
starts it once. The store contract runs against both the S3 store and the
in-memory fake.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zstandard

from archive import plain
from archive.cli import main
from archive.daemon import Archiver, Backoff
from archive.store import (
    AccessDenied,
    MemoryStore,
    NoSuchBucket,
    NotFound,
    ObjectStore,
    S3Store,
    Unavailable,
    expiry_days,
)
from archive.verify import verify_range
from relay.config import Config
from tests.support.seaweed import SeaweedServer, bucket, seaweed  # noqa: F401 - fixtures
from tests.test_archive_helpers import (
    HOUR,
    HOUR_EPOCH,
    Msg,
    mixed_traffic,
    part_at,
    stage_hour,
    write_config,
    write_staging,
    write_staging_v2,
)

ROOT = Path(__file__).resolve().parents[1]
RANGE = ["--from", "2026-11-26T00", "--to", "2026-11-26T03"]


def _config(tmp_path: Path, server: SeaweedServer, bucket_name: str, extra: str = "") -> Config:
    return write_config(
        tmp_path / "syslog-relay.toml",
        tmp_path / "state",
        bucket=bucket_name,
        endpoint=server.endpoint,
        access_key=server.access_key,
        secret_key=server.secret_key,
        extra=extra,
    )


def _keys(server: SeaweedServer, bucket_name: str) -> list[str]:
    r = server.client().list_objects_v2(Bucket=bucket_name)
    return sorted(o["Key"] for o in r.get("Contents", []))


# --- the store contract, for the fake and for S3 ---------------------------------------


class StoreContract:
    store: ObjectStore

    def _stale_upload(self, key: str) -> None:
        raise NotImplementedError

    def _uploads(self, prefix: str) -> int:
        raise NotImplementedError

    def test_put_head_get_with_metadata(self) -> None:
        self.store.put_bytes("p/a", b"hello\x00world\n", {"raw-sha256": "ab" * 32})
        info = self.store.head("p/a")
        assert info is not None
        assert (info.size, dict(info.metadata)) == (12, {"raw-sha256": "ab" * 32})
        with self.store.open("p/a") as f:
            assert f.read() == b"hello\x00world\n"

    def test_missing_object(self) -> None:
        assert self.store.head("p/none") is None
        with pytest.raises(NotFound):
            self.store.open("p/none")

    def test_list_by_prefix_in_key_order(self) -> None:
        for k in ["q/b", "q/a", "q/c/d", "r/a"]:
            self.store.put_bytes(k, k.encode(), {})
        assert [(o.key, o.size) for o in self.store.list("q/")] == [
            ("q/a", 3),
            ("q/b", 3),
            ("q/c/d", 5),
        ]

    def test_delete(self) -> None:
        self.store.put_bytes("d/x", b"1", {})
        self.store.delete("d/x")
        assert self.store.head("d/x") is None
        self.store.delete("d/x")  # deleting a missing object is not an error

    @pytest.mark.parametrize("size", [1000, 11 * 1024 * 1024 + 17])
    def test_put_file_small_and_multipart(self, tmp_path: Path, size: int) -> None:
        data = os.urandom(size)
        (tmp_path / "f").write_bytes(data)
        self.store.put_file("f/obj", tmp_path / "f", {"k": "v"})
        info = self.store.head("f/obj")
        assert info is not None and info.size == size and info.metadata["k"] == "v"
        with self.store.open("f/obj") as f:
            assert f.read() == data

    def test_abort_stale_multipart(self) -> None:
        self._stale_upload("m/key")
        self._stale_upload("other/key")
        assert self._uploads("m/") == 1
        assert self.store.abort_multipart("m/") == 1
        assert self._uploads("m/") == 0
        assert self._uploads("other/") == 1


class TestMemoryStore(StoreContract):
    @pytest.fixture(autouse=True)
    def _store(self) -> None:
        self.store = self.mem = MemoryStore()

    def _stale_upload(self, key: str) -> None:
        self.mem.uploads[key] = 1

    def _uploads(self, prefix: str) -> int:
        return sum(1 for k in self.mem.uploads if k.startswith(prefix))


class TestS3Store(StoreContract):
    @pytest.fixture(autouse=True)
    def _store(self, tmp_path: Path, seaweed: SeaweedServer, bucket: str) -> None:  # noqa: F811
        self.server, self.bucket = seaweed, bucket
        self.store = S3Store(_config(tmp_path, seaweed, bucket).archive)

    def _stale_upload(self, key: str) -> None:
        self.server.client().create_multipart_upload(Bucket=self.bucket, Key=key)

    def _uploads(self, prefix: str) -> int:
        r = self.server.client().list_multipart_uploads(Bucket=self.bucket, Prefix=prefix)
        return len(r.get("Uploads", []))


# --- errors and `check` ------------------------------------------------------------------


def test_store_errors_are_typed(tmp_path: Path, seaweed: SeaweedServer, bucket: str) -> None:  # noqa: F811
    cfg = _config(tmp_path, seaweed, bucket)
    bad = S3Store(
        _config(tmp_path, seaweed, bucket).archive.__class__(
            **{**cfg.archive.__dict__, "secret_access_key": "wrong"}
        ),
        max_attempts=1,
    )
    with pytest.raises(AccessDenied):
        bad.put_bytes("x", b"x", {})
    missing = S3Store(
        cfg.archive.__class__(**{**cfg.archive.__dict__, "bucket": "no-such-bucket-here"}),
        max_attempts=1,
    )
    with pytest.raises(NoSuchBucket):
        missing.server_time()
    down = S3Store(
        cfg.archive.__class__(**{**cfg.archive.__dict__, "endpoint_url": "http://127.0.0.1:9"}),
        max_attempts=1,
        connect_timeout=1,
    )
    with pytest.raises(Unavailable):
        down.head("x")


@pytest.mark.parametrize(
    ("change", "status", "reason"),
    [
        ({}, 0, "ok: bucket"),
        ({"secret": "wrong"}, 2, "access denied"),
        ({"bucket": "missing-bucket"}, 2, "does not exist"),
        ({"endpoint": "http://127.0.0.1:9"}, 2, "cannot reach"),
    ],
)
def test_check(
    tmp_path: Path,
    seaweed: SeaweedServer,  # noqa: F811
    bucket: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    change: dict[str, str],
    status: int,
    reason: str,
) -> None:
    conf = tmp_path / "c.toml"
    write_config(
        conf,
        tmp_path / "state",
        bucket=change.get("bucket", bucket),
        endpoint=change.get("endpoint", seaweed.endpoint),
        access_key=seaweed.access_key,
        secret_key=change.get("secret", seaweed.secret_key),
    )
    assert main(["check", "--config", str(conf)]) == status
    out = capsys.readouterr()
    assert reason in out.out + out.err
    assert [k for k in _keys(seaweed, bucket) if ".probe" in k] == []


def test_check_rejects_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('[archive]\ncompression_level = 99\n[relay]\nid = "r"\n')
    assert main(["check", "--config", str(conf)]) == 2
    assert "archive.compression_level" in capsys.readouterr().err


# --- round trip ------------------------------------------------------------------------


@pytest.fixture
def hour_of_traffic(
    tmp_path: Path,
    seaweed: SeaweedServer,  # noqa: F811
    bucket: str,  # noqa: F811
) -> Iterator[tuple[Config, list[Msg], str]]:
    """A whole hour from two relays' worth of parts, archived to a fresh bucket."""
    cfg = _config(tmp_path, seaweed, bucket)
    msgs = mixed_traffic(12000)
    # Two parts for the hour (a restart in the middle), written in order.
    write_staging(cfg.relay.state_dir, "relay1", HOUR, part_at(HOUR_EPOCH + 1), msgs[:7000])
    # The second part is format 2 (blocks): cat/ls/verify read both.
    write_staging_v2(cfg.relay.state_dir, "relay1", HOUR, part_at(HOUR_EPOCH + 1800), msgs[7000:])
    arch = Archiver(cfg, S3Store(cfg.archive))
    assert arch.run_once()
    assert list((cfg.staging_dir / "closed").iterdir()) == []
    yield cfg, msgs, bucket


def test_round_trip_byte_exact(
    hour_of_traffic: tuple[Config, list[Msg], str],
    seaweed: SeaweedServer,  # noqa: F811
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    cfg, msgs, bucket_name = hour_of_traffic
    conf = str(cfg.source)
    keys = _keys(seaweed, bucket_name)
    assert "syslog/_chain/relay1.json" in keys  # the published chain head
    keys = [k for k in keys if "/_chain/" not in k]
    chunks = [k for k in keys if k.endswith(".log.zst")]
    assert len(chunks) == 2 and len(keys) == 4
    assert all(k.startswith("syslog/date=2026-11-26/hour=01/relay1-") for k in keys)

    assert main(["cat", "--config", conf, *RANGE]) == 0
    assert capsysbinary.readouterr().out == b"".join(m.msg + b"\n" for m in msgs)

    assert main(["cat", "--config", conf, *RANGE, "--host", "web03"]) == 0
    want = [m.msg for m in msgs if m.host == b"web03"]
    assert capsysbinary.readouterr().out == b"".join(m + b"\n" for m in want)

    assert main(["cat", "--config", conf, *RANGE, "--grep", r"status=500.*\x00nul"]) == 0
    want = [m.msg for m in msgs if b"status=500" in m.msg and b"\x00nul" in m.msg]
    assert want and capsysbinary.readouterr().out == b"".join(m + b"\n" for m in want)

    assert main(["cat", "--config", conf, "--from", "2026-11-26T02", "--to", "2026-11-26T03"]) == 0
    assert capsysbinary.readouterr().out == b""

    assert main(["cat", "--config", conf, *RANGE, "--json", "--host", "db-1.example.net"]) == 0
    lines = capsysbinary.readouterr().out.splitlines()
    objs = [json.loads(line) for line in lines]
    want_msgs = [m for m in msgs if m.host == b"db-1.example.net"]
    assert len(objs) == len(want_msgs)
    assert {o["host"] for o in objs} == {"db-1.example.net"}
    assert "second line" in "".join(o["msg"] for o in objs)


def test_ls_and_verify_and_zstdcat(
    hour_of_traffic: tuple[Config, list[Msg], str],
    seaweed: SeaweedServer,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    cfg, msgs, bucket_name = hour_of_traffic
    conf = str(cfg.source)
    assert main(["ls", "--config", conf, *RANGE]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert len(rows) == 2
    assert sum(int(r.split()[3]) for r in rows) == len(msgs)
    assert main(["ls", "--config", conf, *RANGE, "--host", "nobody"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == []

    assert main(["verify", "--config", conf, *RANGE]) == 0
    assert "OK: 2 chunk(s)" in capsys.readouterr().out

    # Plain zstd reads a chunk (format 2 staging -> plain chunk): one message per line,
    # LF inside a message escaped; the format 1 part is archived as it was.
    chunks = sorted(k for k in _keys(seaweed, bucket_name) if k.endswith(".log.zst"))
    (tmp_path / "c.zst").write_bytes(
        seaweed.client().get_object(Bucket=bucket_name, Key=chunks[1])["Body"].read()
    )
    out = subprocess.run(["zstdcat", str(tmp_path / "c.zst")], capture_output=True, check=True)
    lines = out.stdout.split(b"\n")[:-1]
    assert len(lines) == len(msgs) - 7000
    assert set(lines) >= {m.msg for m in msgs[7000:] if b"\n" not in m.msg}
    assert plain.escape(msgs[7007].msg) in lines and b"\n" in msgs[7007].msg
    legacy = subprocess.run(
        ["zstdcat", "-c", "-"],
        input=seaweed.client().get_object(Bucket=bucket_name, Key=chunks[0])["Body"].read(),
        capture_output=True,
        check=True,
    )
    assert legacy.stdout.startswith(b"#syslog-relay-staging/1 relay=relay1 hour=2026-11-26T01 ")


def test_verify_names_deleted_and_altered_chunks(
    tmp_path: Path,
    seaweed: SeaweedServer,  # noqa: F811
    bucket: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = _config(tmp_path, seaweed, bucket)
    for i in range(4):
        write_staging(
            cfg.relay.state_dir,
            "relay1",
            HOUR,
            part_at(HOUR_EPOCH + i * 60),
            mixed_traffic(100, seed=i),
        )
    assert Archiver(cfg, S3Store(cfg.archive)).run_once()
    chunks = [k for k in _keys(seaweed, bucket) if k.endswith(".log.zst")]
    manifests = [k for k in _keys(seaweed, bucket) if k.endswith(".manifest.json")]
    c = seaweed.client()
    c.delete_object(Bucket=bucket, Key=chunks[0])
    body = c.get_object(Bucket=bucket, Key=chunks[1])["Body"].read()
    altered = body + zstandard.ZstdCompressor().compress(b"forged\n")
    c.put_object(Bucket=bucket, Key=chunks[1], Body=altered)
    c.delete_object(Bucket=bucket, Key=manifests[2])

    assert main(["verify", "--config", str(cfg.source), *RANGE]) == 1
    out = capsys.readouterr().out
    assert f"chunk missing: {chunks[0]}" in out
    assert f"chunk altered: {chunks[1]}" in out
    assert f"manifest missing: {manifests[2]}" in out
    assert chunks[3] not in out


def test_verify_notices_that_the_newest_chunk_and_manifest_are_gone(
    tmp_path: Path,
    seaweed: SeaweedServer,  # noqa: F811
    bucket: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = _config(tmp_path, seaweed, bucket)
    for i in range(3):
        write_staging(
            cfg.relay.state_dir, "relay1", HOUR, part_at(HOUR_EPOCH + i), mixed_traffic(20, seed=i)
        )
    assert Archiver(cfg, S3Store(cfg.archive)).run_once()
    assert main(["verify", "--config", str(cfg.source), *RANGE]) == 0
    capsys.readouterr()
    keys = _keys(seaweed, bucket)
    newest = [k for k in keys if part_at(HOUR_EPOCH + 2) in k]
    assert len(newest) == 2  # chunk and manifest of the last upload
    for key in newest:
        seaweed.client().delete_object(Bucket=bucket, Key=key)
    # Nothing links forward to the newest manifest: the published chain head does.
    assert main(["verify", "--config", str(cfg.source), *RANGE]) == 1
    out = capsys.readouterr().out
    manifest = next(k for k in newest if k.endswith(".manifest.json"))
    assert f"manifest missing: {manifest} (the newest, named by syslog/_chain/relay1.json)" in out


# --- faults ----------------------------------------------------------------------------


class _KillDuringUpload(S3Store):
    """Stops the S3 server right after the first part of a multipart upload."""

    def __init__(self, cfg: Any, server: SeaweedServer, **kw: Any) -> None:
        super().__init__(cfg, **kw)
        self.server = server
        self.killed = threading.Event()

    def _call(self, what: str, op: str, **kwargs: Any) -> Any:
        r = super()._call(what, op, **kwargs)
        if op == "upload_part" and not self.killed.is_set():
            self.killed.set()
            self.server.stop(signal.SIGKILL)
        return r


def test_s3_down_during_upload_then_back(
    tmp_path: Path,
    seaweed: SeaweedServer,  # noqa: F811
    bucket: str,  # noqa: F811
) -> None:
    cfg = _config(tmp_path, seaweed, bucket)
    # Incompressible payload so the chunk is above the 5 MiB multipart threshold.
    big = [
        Msg(HOUR_EPOCH + i, b"udp://h:1", b"h%d" % (i % 5), os.urandom(2000)) for i in range(6000)
    ]
    f = write_staging(cfg.relay.state_dir, "relay1", HOUR, part_at(HOUR_EPOCH), big)
    store = _KillDuringUpload(
        cfg.archive, seaweed, max_attempts=2, connect_timeout=1, read_timeout=5
    )
    arch = Archiver(cfg, store)
    arch.backoff = Backoff(0.5, base=0.1)

    def restart_after_a_failure() -> None:
        # Bring S3 back only once the archiver has seen it gone (bounded wait).
        deadline = time.monotonic() + 30
        while arch.failures == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        seaweed.start()

    restarter = threading.Thread(target=restart_after_a_failure)
    restarter.start()
    deadline = time.monotonic() + 60
    try:
        while f.exists() and time.monotonic() < deadline:
            if not arch.run_once():
                time.sleep(arch.backoff.next_delay())
    finally:
        restarter.join(60)
    assert store.killed.is_set() and arch.failures >= 1
    assert not f.exists()
    keys = _keys(seaweed, bucket)
    assert len([k for k in keys if k.endswith(".log.zst")]) == 1
    assert len([k for k in keys if k.endswith(".manifest.json")]) == 1
    r = seaweed.client().list_multipart_uploads(Bucket=bucket)
    assert r.get("Uploads", []) == []
    _r = verify_range(S3Store(cfg.archive), "syslog", [HOUR])
    problems, n = _r.problems, _r.chunks
    assert (problems, n) == ([], 1)


def _spawn(conf: Path, env_extra: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    return subprocess.Popen(
        [sys.executable, "-m", "archive", "run", "--config", str(conf)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize("step", ["chunk-stored", "chain-saved"])
def test_kill_9_between_upload_and_staging_deletion(
    tmp_path: Path,
    seaweed: SeaweedServer,  # noqa: F811
    bucket: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    step: str,
) -> None:
    cfg = _config(tmp_path, seaweed, bucket)
    conf = Path(cfg.source)
    files = [
        write_staging(
            cfg.relay.state_dir, "relay1", HOUR, part_at(HOUR_EPOCH + i), mixed_traffic(300, seed=i)
        )
        for i in range(2)
    ]
    marker = cfg.relay.state_dir / "archive" / f"paused-{step}"
    p = _spawn(conf, {"SYSLOG_ARCHIVE_FAULT_PAUSE": step})
    try:
        _wait_for(lambda: marker.exists() or p.poll() is not None, 30, f"archiver to reach {step}")
        assert p.poll() is None, p.stderr.read() if p.stderr else ""
        p.kill()
        p.wait(10)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    assert files[0].exists()  # killed before the staging file was removed
    assert any(k.endswith(".log.zst") for k in _keys(seaweed, bucket))

    p = _spawn(conf, {})
    try:
        _wait_for(lambda: not any(f.exists() for f in files), 30, "backlog to drain")
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    keys = _keys(seaweed, bucket)
    assert len([k for k in keys if k.endswith(".log.zst")]) == 2
    assert len([k for k in keys if k.endswith(".manifest.json")]) == 2
    assert main(["verify", "--config", str(conf), *RANGE]) == 0
    assert "OK: 2 chunk(s)" in capsys.readouterr().out


def test_run_refuses_to_start_with_bad_credentials(
    tmp_path: Path,
    seaweed: SeaweedServer,  # noqa: F811
    bucket: str,  # noqa: F811
) -> None:
    conf = tmp_path / "c.toml"
    write_config(
        conf,
        tmp_path / "state",
        bucket=bucket,
        endpoint=seaweed.endpoint,
        access_key=seaweed.access_key,
        secret_key="wrong",
    )
    p = _spawn(conf, {})
    try:
        assert p.wait(30) == 2
        assert p.stderr is not None and b"access denied" in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_zstd_stream_reads_concatenated_frames() -> None:
    # Guard for the reader's assumption on every zstandard version we support.
    c = zstandard.ZstdCompressor()
    data = c.compress(b"a" * 10) + c.compress(b"b" * 10)
    r = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
    assert r.read() == b"a" * 10 + b"b" * 10


def test_sighup_reloads_the_bucket_and_refuses_a_bad_config(
    tmp_path: Path,
    seaweed: SeaweedServer,  # noqa: F811
) -> None:
    first, second = seaweed.new_bucket(), seaweed.new_bucket()
    cfg = _config(tmp_path, seaweed, first)
    conf = Path(cfg.source)
    log_path = tmp_path / "archive.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log_path, "wb") as log_file:
        p = subprocess.Popen(
            [sys.executable, "-m", "archive", "run", "--config", str(conf)],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=log_file,
        )
    try:
        f1 = write_staging(
            cfg.relay.state_dir, "relay1", HOUR, part_at(HOUR_EPOCH), mixed_traffic(50)
        )
        _wait_for(lambda: not f1.exists(), 30, "first file archived")
        assert any(k.endswith(".log.zst") for k in _keys(seaweed, first))
        # A broken configuration is refused; the archiver keeps running on the old one.
        good = conf.read_text()
        conf.write_text(good + "\nnot valid toml [[[\n")
        p.send_signal(signal.SIGHUP)
        _wait_for(lambda: b"reload refused" in log_path.read_bytes(), 30, "reload refused")
        assert p.poll() is None
        # A new bucket takes effect for the next upload.
        conf.write_text(good.replace(f'bucket = "{first}"', f'bucket = "{second}"'))
        p.send_signal(signal.SIGHUP)
        _wait_for(lambda: b"configuration reloaded" in log_path.read_bytes(), 30, "reload")
        f2 = write_staging(
            cfg.relay.state_dir, "relay1", HOUR, part_at(HOUR_EPOCH + 1), mixed_traffic(50)
        )
        _wait_for(lambda: not f2.exists(), 30, "second file archived")
        assert any(k.endswith(".log.zst") for k in _keys(seaweed, second))
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def test_object_lock_retention_on_a_locked_bucket(
    tmp_path: Path,
    seaweed: SeaweedServer,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Object Lock (with the Content-MD5 it requires) on chunks and manifests, multipart too."""
    import uuid as _uuid
    from datetime import UTC, datetime, timedelta

    locked = f"lock-{_uuid.uuid4().hex[:12]}"
    seaweed.client().create_bucket(Bucket=locked, ObjectLockEnabledForBucket=True)
    cfg = _config(
        tmp_path,
        seaweed,
        locked,
        extra='object_lock_mode = "GOVERNANCE"\nobject_lock_days = 2\n',
    )
    small = write_staging(
        cfg.relay.state_dir, "relay1", HOUR, part_at(HOUR_EPOCH), mixed_traffic(100)
    )
    # Incompressible messages above the 5 MiB multipart threshold: a multipart upload.
    big_msgs = [
        Msg(HOUR_EPOCH + 60 + i, b"tcp://10.0.0.9:514", b"bulk", b"<13>bulk " + os.urandom(60_000))
        for i in range(110)
    ]
    big = write_staging(cfg.relay.state_dir, "relay1", HOUR, part_at(HOUR_EPOCH + 60), big_msgs)
    assert Archiver(cfg, S3Store(cfg.archive)).run_once()
    assert not small.exists()
    client = seaweed.client()
    keys = _keys(seaweed, locked)
    assert "syslog/_chain/relay1.json" in keys  # the published chain head
    data_keys = [k for k in keys if "/_chain/" not in k]
    assert len(data_keys) == 4
    assert all(k.endswith((".log.zst", ".manifest.json")) for k in data_keys)
    for key in data_keys:
        head = client.head_object(Bucket=locked, Key=key)
        assert head.get("ObjectLockMode") == "GOVERNANCE", key
        until = head["ObjectLockRetainUntilDate"]
        assert timedelta(days=1) < until - datetime.now(UTC) <= timedelta(days=2, minutes=5)
    assert main(["verify", "--config", str(cfg.source), *RANGE]) == 0
    assert "OK:" in capsys.readouterr().out
    assert not big.exists()


def _doc_sql(name: str) -> str:
    """The SQL block of docs/archive-queries.md that starts ``-- name: NAME``."""
    text = (ROOT / "docs" / "archive-queries.md").read_text()
    for block in re.findall(r"```sql\n(.*?)```", text, re.DOTALL):
        if block.startswith(f"-- name: {name}\n"):
            return str(block)
    raise AssertionError(f"no SQL block {name!r} in docs/archive-queries.md")


_DUCKDB = """
import json, sys
import duckdb, s3fs
q = json.load(sys.stdin)
con = duckdb.connect()
con.register_filesystem(
    s3fs.S3FileSystem(key=q["key"], secret=q["secret"], endpoint_url=q["endpoint"])
)
con.execute(q["view"])
hosts = [[str(d), h, host, n] for d, h, host, n in con.execute(q["hosts"]).fetchall()]
lines = [r[0] for r in con.execute(q["grep"]).fetchall()]
print(json.dumps({"hosts": hosts, "lines": lines}))
"""


@pytest.mark.query
def test_duckdb_recipe(
    tmp_path: Path,
    seaweed: SeaweedServer,  # noqa: F811
    bucket: str,  # noqa: F811
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    # Deselected in the Debian run (-m "not query"): duckdb and s3fs are the [query] extra.
    cfg = _config(tmp_path, seaweed, bucket)
    msgs = mixed_traffic(4000, seed=7)
    late = mixed_traffic(1500, seed=8, start=HOUR_EPOCH + 3600)
    write_staging_v2(cfg.relay.state_dir, "relay1", HOUR, part_at(HOUR_EPOCH + 1), msgs[:2500])
    write_staging_v2(cfg.relay.state_dir, "relay1", HOUR, part_at(HOUR_EPOCH + 1800), msgs[2500:])
    write_staging_v2(
        cfg.relay.state_dir, "relay1", "2026-11-26T02", part_at(HOUR_EPOCH + 3601), late
    )
    assert Archiver(cfg, S3Store(cfg.archive)).run_once()

    # In a process of its own, as a user would run it, and so that s3fs's threads
    # do not stay in this one (archive.workers forks only a single-threaded process).
    query = {
        "key": seaweed.access_key,
        "secret": seaweed.secret_key,
        "endpoint": seaweed.endpoint,
        "view": _doc_sql("view").replace("BUCKET", bucket),
        "hosts": _doc_sql("hosts_per_hour"),
        "grep": _doc_sql("grep_hours"),
    }
    done = subprocess.run(
        [sys.executable, "-c", _DUCKDB],
        input=json.dumps(query),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    got = {(f"{d}T{h}", host): n for d, h, host, n in result["hosts"]}

    assert main(["ls", "--config", str(cfg.source), *RANGE, "--json"]) == 0
    want: dict[tuple[str, str], int] = {}
    for line in capsysbinary.readouterr().out.splitlines():
        chunk = json.loads(line)
        for host, n in chunk["host_counts"].items():
            want[(chunk["hour"], host)] = want.get((chunk["hour"], host), 0) + n
    assert got == want
    assert sum(got.values()) == len(msgs) + len(late)

    lines = result["lines"]
    assert (
        main(
            [
                "cat",
                "--config",
                str(cfg.source),
                "--from",
                HOUR,
                "--to",
                "2026-11-26T02",
                "--grep",
                "status=500",
            ]
        )
        == 0
    )
    printed = capsysbinary.readouterr().out.decode("latin-1").splitlines()
    # A message holding LF is one escaped line for DuckDB, several lines from cat.
    assert sorted(lines) == sorted(
        plain.escape(m.msg).decode("latin-1") for m in msgs if b"status=500" in m.msg
    )
    assert len(printed) == sum(m.msg.count(b"\n") + 1 for m in msgs if b"status=500" in m.msg)


def test_missing_bucket_is_one_line(
    tmp_path: Path,
    seaweed: SeaweedServer,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = _config(tmp_path, seaweed, "no-such-bucket-here")
    for cmd in ("ls", "cat", "verify"):
        assert main([cmd, "--config", str(cfg.source), *RANGE]) == 2, cmd
        err = capsys.readouterr().err.splitlines()
        problems = [e for e in err if "no-such-bucket-here" in e]
        assert len(problems) == 1 and "does not exist" in problems[0], (cmd, err)
        assert not any("Traceback" in e for e in err)
    assert main(["cat", "--config", str(cfg.source), *RANGE, "--staging", "no"]) == 2
    (problem,) = [e for e in capsys.readouterr().err.splitlines() if "no-such-bucket" in e]
    assert problem.endswith("does not exist; nothing read"), problem
    # No server there: exit 1 (it may come back), one line too.
    down = write_config(
        tmp_path / "down.toml",
        tmp_path / "state",
        endpoint="http://127.0.0.1:1",
        access_key=seaweed.access_key,
        secret_key=seaweed.secret_key,
    )
    for cmd in ("ls", "cat", "verify"):
        assert main([cmd, "--config", str(down.source), *RANGE]) == 1, cmd
        err = capsys.readouterr().err.splitlines()
        assert len([e for e in err if "cannot reach http://127.0.0.1:1" in e]) == 1, (cmd, err)
        assert not any("Traceback" in e for e in err)


def test_verify_reads_the_documented_lifecycle_rule(
    tmp_path: Path,
    seaweed: SeaweedServer,  # noqa: F811
    bucket: str,  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The rule of docs/staging-and-archive-format.md ("Prefix": "syslog/") sets the
    retention horizon of `verify` for the prefix "syslog" without --retention."""
    cfg = _config(tmp_path, seaweed, bucket)
    for h in range(2):
        stage_hour(cfg.relay.state_dir, h)
        assert Archiver(cfg, S3Store(cfg.archive)).run_once()
    c = seaweed.client()
    for k in [k for k in _keys(seaweed, bucket) if "/hour=01/" in k]:
        c.delete_object(Bucket=bucket, Key=k)
    argv = ["verify", "--config", str(cfg.source), "--from", "2026-11-26T02", "--to=now"]
    assert main(argv) == 1
    assert "if it expired, give --retention" in capsys.readouterr().out
    rule = {"ID": "syslog-expiry", "Status": "Enabled", "Filter": {"Prefix": "syslog/"}}
    c.put_bucket_lifecycle_configuration(
        Bucket=bucket, LifecycleConfiguration={"Rules": [{**rule, "Expiration": {"Days": 1}}]}
    )
    assert S3Store(cfg.archive).expiration_days("syslog") == 1
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "past the retention horizon" in out and "OK: 1 chunk(s)" in out


@pytest.mark.parametrize(
    ("rule_prefix", "prefix", "days"),
    [
        ("syslog/", "syslog", 7),
        ("syslog/", "/syslog/", 7),
        ("syslog/date=", "syslog", 7),
        ("", "syslog", 7),
        ("sys", "syslog", 7),
        ("", "", 7),
        ("date=", "", 7),
        ("syslog/date=2026", "syslog", None),
        ("other/", "syslog", None),
        ("syslog/", "", None),
    ],
)
def test_expiry_days_covers_the_prefix(rule_prefix: str, prefix: str, days: int | None) -> None:
    rules: list[dict[str, Any]] = [
        {"Status": "Enabled", "Filter": {"Prefix": rule_prefix}, "Expiration": {"Days": 7}},
        {"Status": "Disabled", "Filter": {"Prefix": ""}, "Expiration": {"Days": 1}},
        {"Status": "Enabled", "Filter": {"Tag": {"Key": "k"}}, "Expiration": {"Days": 2}},
    ]
    assert expiry_days(rules, prefix) == days
