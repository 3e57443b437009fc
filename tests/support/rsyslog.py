"""Run Debian's real rsyslogd as a forwarding client, with its own config in a tmp dir.

Each forward gets its own imptcp input on a free loopback port, bound to its own ruleset
with two actions: the omfwd forward under test and an omfile copy of what it sends. The
copy uses a template identical to the forward's plus an LF, so the test knows the exact
bytes rsyslog put in each frame (rsyslog escapes control characters on receive, so a
message never contains an LF of its own).

rsyslogd must exist: a missing binary is a failure, never a skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tests.support.certs import PKI

RSYSLOGD = "/usr/sbin/rsyslogd"
KINDS = ("tcp-lf", "tcp-octet", "tls", "udp")

# rsyslog's built-in templates (8.2302, runtime/rsconf.c / tools/syslogd.c), restated so the
# omfile copy can add a delimiter; the forwards themselves use the built-in names.
TRADITIONAL = '"<%PRI%>%TIMESTAMP% %HOSTNAME% %syslogtag:1:32%%msg:::sp-if-no-1st-sp%%msg%"'
PROTOCOL23 = (
    '"<%PRI%>1 %TIMESTAMP:::date-rfc3339% %HOSTNAME% %APP-NAME% %PROCID% %MSGID% '
    '%STRUCTURED-DATA% %msg%\\n"'
)


@dataclass(frozen=True)
class Forward:
    """One omfwd action to 127.0.0.1:``port``.

    kind: ``tcp-lf`` (default traditional template, LF framing), ``tcp-octet``
    (RSYSLOG_SyslogProtocol23Format, octet-counted), ``tls`` (gtls, x509/name,
    permitted peer ``peer``; traditional template, LF framing), ``udp`` (traditional).
    """

    name: str
    kind: str
    port: int
    peer: str = "relay.test"


_HANDED_OUT: set[int] = set()


def free_port(kind: str = "tcp") -> int:
    """A port free on 127.0.0.1 now, and not handed out before in this process: the kernel
    may offer a port again once the probe closes it, and one test's listener and metrics
    endpoint then collide."""
    sock_type = socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
    for _ in range(100):
        with socket.socket(socket.AF_INET, sock_type) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no port on 127.0.0.1 that was not handed out already")


def wait_port(port: int, timeout: float) -> None:
    """Wait (bounded) until a TCP port on 127.0.0.1 accepts connections."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing accepts on 127.0.0.1:{port}") from None
            time.sleep(0.05)


class RsyslogdProcess:
    """A private rsyslogd: config written to ``workdir``, checked with -N1, run with -n.

    Subclasses give ``config()`` and ``ports()`` (TCP ports to wait for at start).
    """

    def __init__(self, workdir: Path) -> None:
        if not os.path.exists(RSYSLOGD):
            raise RuntimeError(f"{RSYSLOGD} is missing: apt-get install rsyslog rsyslog-gnutls")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "work").mkdir(exist_ok=True)
        self.conf = self.dir / "rsyslog.conf"
        self.pidfile = self.dir / "rsyslogd.pid"
        self.internal_log = self.dir / "internal.log"
        self.stderr_path = self.dir / "stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        raise NotImplementedError

    def ports(self) -> list[int]:
        raise NotImplementedError

    def start(self, timeout: float = 20.0) -> None:
        self.conf.write_text(self.config())
        check = subprocess.run(
            [RSYSLOGD, "-N1", "-f", str(self.conf)], capture_output=True, timeout=timeout
        )
        if check.returncode != 0:
            raise RuntimeError(f"rsyslogd rejects its config:\n{check.stderr.decode()}")
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [RSYSLOGD, "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
            )
        deadline = time.monotonic() + timeout
        for port in self.ports():
            if self.proc.poll() is not None:
                raise RuntimeError(f"rsyslogd exited at start:\n{self.diagnostics()}")
            wait_port(port, max(0.1, deadline - time.monotonic()))

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait; returns the exit code (None if it had to be killed)."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
            return None

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL: for tests whose rsyslog has undeliverable messages queued."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout)

    def diagnostics(self) -> str:
        out = []
        for path in (self.stderr_path, self.internal_log):
            if path.exists():
                out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)

    def __enter__(self) -> RsyslogdProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Rsyslog(RsyslogdProcess):
    def __init__(
        self,
        workdir: Path,
        forwards: Iterable[Forward],
        pki: PKI | None = None,
        client: str = "good",
    ) -> None:
        super().__init__(workdir)
        self.forwards = {f.name: f for f in forwards}
        for f in self.forwards.values():
            if f.kind not in KINDS:
                raise ValueError(f"unknown forward kind {f.kind!r}")
            if f.kind == "tls" and pki is None:
                raise ValueError("a tls forward needs the test PKI")
        self.pki = pki
        self.client = client
        self.inputs = {name: free_port() for name in self.forwards}

    def ports(self) -> list[int]:
        return list(self.inputs.values())

    def copy_path(self, name: str) -> Path:
        return self.dir / f"sent-{name}.log"

    def config(self) -> str:
        glob = [f'workDirectory="{self.dir / "work"}"']
        if self.pki is not None:
            client = self.pki.clients[self.client]
            glob += [
                f'DefaultNetstreamDriverCAFile="{self.pki.ca}"',
                f'DefaultNetstreamDriverCertFile="{client.cert}"',
                f'DefaultNetstreamDriverKeyFile="{client.key}"',
            ]
        lines = [
            f"global({' '.join(glob)})",
            'module(load="imptcp")',
            f'template(name="copy_traditional" type="string" string={TRADITIONAL[:-1]}\\n")',
            f'template(name="copy_protocol23" type="string" string={PROTOCOL23})',
            # rsyslog's own messages (start, errors) go to the default ruleset.
            f'*.* action(type="omfile" file="{self.internal_log}")',
        ]
        for name, fwd in self.forwards.items():
            port = self.inputs[name]
            lines.append(
                f'input(type="imptcp" address="127.0.0.1" port="{port}" ruleset="r_{name}")'
            )
            common = (
                f'target="127.0.0.1" port="{fwd.port}" '
                'action.resumeRetryCount="-1" action.resumeInterval="1" '
                'queue.type="LinkedList" queue.size="100000"'
            )
            if fwd.kind == "tcp-lf":
                action = f'action(type="omfwd" {common} protocol="tcp")'
                copy = "copy_traditional"
            elif fwd.kind == "tcp-octet":
                action = (
                    f'action(type="omfwd" {common} protocol="tcp" '
                    'template="RSYSLOG_SyslogProtocol23Format" TCP_Framing="octet-counted")'
                )
                copy = "copy_protocol23"
            elif fwd.kind == "tls":
                action = (
                    f'action(type="omfwd" {common} protocol="tcp" StreamDriver="gtls" '
                    'StreamDriverMode="1" StreamDriverAuthMode="x509/name" '
                    f'StreamDriverPermittedPeers="{fwd.peer}")'
                )
                copy = "copy_traditional"
            else:
                action = f'action(type="omfwd" {common} protocol="udp")'
                copy = "copy_traditional"
            lines += [
                f'ruleset(name="r_{name}") {{',
                f"  {action}",
                f'  action(type="omfile" file="{self.copy_path(name)}" template="{copy}")',
                "}",
            ]
        return "\n".join(lines) + "\n"

    def send(self, name: str, messages: Iterable[bytes]) -> None:
        """Feed messages (syslog lines without LF) to the input of forward ``name``."""
        payload = b"".join(m + b"\n" for m in messages)
        with socket.create_connection(("127.0.0.1", self.inputs[name]), timeout=10) as s:
            s.sendall(payload)

    def sent(self, name: str) -> list[bytes]:
        """The exact frame contents forward ``name`` sent so far (from the omfile copy).

        For ``tcp-octet`` the trailing LF of RSYSLOG_SyslogProtocol23Format is part of
        the frame (rsyslog counts it), so it is kept; for the others it is the delimiter.
        """
        path = self.copy_path(name)
        if not path.exists():
            return []
        data = path.read_bytes()
        kind = self.forwards[name].kind
        if kind == "tcp-octet":
            return [line + b"\n" for line in data.split(b"\n")[:-1]]
        return data.split(b"\n")[:-1]

    def wait_sent(self, name: str, n: int, timeout: float = 20.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.sent(name)
            if len(got) >= n:
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"rsyslog copied {len(got)}/{n} messages for {name}\n{self.diagnostics()}"
                )
            time.sleep(0.05)


def logger_path() -> str:
    path = shutil.which("logger")
    if path is None:
        raise RuntimeError("logger (util-linux / bsdutils) is missing")
    return path
