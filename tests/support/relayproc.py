"""Run the relay as a real process (``python -m relay run``) and read back its staging files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.formats.staging_block import Record, iter_records, parse_file_header
from tests.support.rsyslog import free_port, wait_port

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Listener:
    transport: str  # udp | tcp | tls
    framing: str = "auto"
    port: int = 0  # 0: a free port is chosen
    ack: str = ""  # RELP: "fsync" or "write" (default: the relay's)

    def __post_init__(self) -> None:
        if not self.port:
            self.port = free_port("udp" if self.transport == "udp" else "tcp")


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table (selectors)
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    s = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


@dataclass
class RelayProcess:
    """A relay with ``listeners`` and state under ``workdir``.

    ``tls``, ``limits``, ``staging``, ``archive``, ``metrics``, ``health`` are extra keys
    for those sections. The metrics endpoint gets a free port unless ``metrics`` names one
    (``metrics_url``), so that relays of parallel tests never share the default port.
    """

    workdir: Path
    listeners: list[Listener]
    tls: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    staging: dict[str, Any] = field(default_factory=dict)
    archive: dict[str, Any] = field(default_factory=dict)
    forward: list[dict[str, Any]] = field(default_factory=list)
    relay: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    health: dict[str, Any] = field(default_factory=dict)
    relay_id: str = "test-relay"
    state: Path | None = None  # default: workdir/state
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.metrics = {"address": f"127.0.0.1:{free_port('tcp')}", **self.metrics}

    @property
    def metrics_url(self) -> str:
        return f"http://{self.metrics['address']}"

    @property
    def state_dir(self) -> Path:
        return self.state if self.state is not None else self.workdir / "state"

    @property
    def config_path(self) -> Path:
        return self.workdir / "relay.toml"

    @property
    def log_path(self) -> Path:
        return self.workdir / "relay.log"

    def config(self) -> str:
        lines = ["[relay]", f"id = {_toml(self.relay_id)}", f"state_dir = {_toml(self.state_dir)}"]
        lines += [f"{k} = {_toml(v)}" for k, v in self.relay.items()]
        for lc in self.listeners:
            lines += [
                "",
                "[[listen]]",
                f"address = {_toml(f'127.0.0.1:{lc.port}')}",
                f"transport = {_toml(lc.transport)}",
            ]
            if lc.transport != "udp":
                lines.append(f"framing = {_toml(lc.framing)}")
            if lc.ack:
                lines.append(f"ack = {_toml(lc.ack)}")
        for name in ("tls", "limits", "staging", "archive", "metrics", "health"):
            section = getattr(self, name)
            if section:
                lines += ["", f"[{name}]"] + [f"{k} = {_toml(v)}" for k, v in section.items()]
        for fwd in self.forward:
            lines += ["", "[[forward]]"] + [f"{k} = {_toml(v)}" for k, v in fwd.items()]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 20.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config())
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "run", "--config", str(self.config_path)],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        for lc in self.listeners:
            if lc.transport == "udp":
                continue
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"relay exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    wait_port(lc.port, 0.5)
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"relay not listening:\n{self.log()}") from None
        if not any(lc.transport != "udp" for lc in self.listeners):
            # Only UDP: wait for the staging directory as a sign of life (bounded).
            while not (self.state_dir / "staging").exists():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"relay did not start:\n{self.log()}")
                time.sleep(0.05)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-6000:]

    def records(self) -> list[Record]:
        return read_staging(self.state_dir)

    def wait_records(self, pred: Any, n: int, timeout: float = 20.0) -> list[Record]:
        """Wait (bounded) until at least ``n`` staged records satisfy ``pred``; return them."""
        deadline = time.monotonic() + timeout
        while True:
            got = [r for r in self.records() if pred(r)]
            if len(got) >= n or time.monotonic() > deadline:
                return got
            time.sleep(0.1)

    def __enter__(self) -> RelayProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def staging_files(state_dir: Path) -> list[Path]:
    base = state_dir / "staging"
    return sorted((base / "open").glob("*.stg")) + sorted((base / "closed").glob("*.stg"))


def read_staging(state_dir: Path) -> list[Record]:
    """Every complete record in open and closed staging files (header line checked)."""
    out: list[Record] = []
    for path in staging_files(state_dir):
        data = path.read_bytes()
        nl = data.find(b"\n")
        if nl < 0:
            continue  # header not written yet
        parse_file_header(data[:nl])
        out.extend(rec for _, rec in iter_records(data, nl + 1))
    return out
