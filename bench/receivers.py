"""Receivers under test: this relay, rsyslogd and syslog-ng, as child processes.

Each writes every message it receives to disk (page cache, no per-message
fsync; the relay additionally fsyncs staging every second) so the harness can
read the output back and check every message. Each receiver:
``start()`` (waits until it listens), ``pid``, ``output_bytes()``,
``messages()`` (the received messages, exactly), ``stop()``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYSLOG_NG_ROOT = Path(os.environ.get("BENCH_SYSLOG_NG_ROOT", REPO / "bench/.cache/syslog-ng"))
START_TIMEOUT = 20.0


class Unavailable(Exception):
    """The receiver cannot run on this machine (reason in the message)."""


@dataclass(frozen=True)
class Scenario:
    name: str
    transport: str  # tcp | tls | udp | relp
    framing: str  # octet-counting | lf
    connections: int
    count: int
    rate: float = 0.0  # 0 = flat out
    tls_records: str = "large"
    size: int = 0  # 0: the profile's default (uniform 300 B mean, others 250 B median)
    profile: str = "uniform"  # loadgen --profile (relay.tools.fleet)
    others: str = "all"  # beside the relay: all | rsyslog (imptcp/imtcp/imrelp only) | none
    relay_toml: str = ""  # appended to the relay's configuration (outputs, selectors)
    listen_toml: str = ""  # appended to the relay's [[listen]] table (e.g. ack = "write")


@dataclass(frozen=True)
class Certs:
    ca: Path
    cert: Path  # server (relay.test, localhost, 127.0.0.1)
    key: Path
    client_cert: Path = Path()  # good.clients.test, for mutual TLS between relays
    client_key: Path = Path()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int, udp: bool) -> bool:
    """Whether something listens on 127.0.0.1:port (from /proc, no connection made)."""
    files = ("/proc/net/udp", "/proc/net/udp6") if udp else ("/proc/net/tcp", "/proc/net/tcp6")
    want = f":{port:04X}"
    for fn in files:
        try:
            lines = Path(fn).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[1].endswith(want) and (udp or f[3] == "0A"):
                return True
    return False


class Receiver:
    name = "receiver"
    family = ""  # relay | rsyslog | syslog-ng

    def __init__(self, workdir: Path, port: int, sc: Scenario, certs: Certs) -> None:
        self.dir = workdir
        self.port = port
        self.sc = sc
        self.certs = certs
        self.proc: subprocess.Popen[bytes] | None = None
        self.out = workdir / "out.log"

    # -- to override
    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def output_bytes(self) -> int:
        try:
            return self.out.stat().st_size
        except FileNotFoundError:
            return 0

    def expected_bytes(self, msg_bytes: int, count: int) -> int | None:
        return msg_bytes + count  # one LF per message

    def messages(self) -> Iterator[bytes]:
        with open(self.out, "rb") as f:
            for line in f:
                yield line[:-1] if line.endswith(b"\n") else line

    # -- common
    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        log = open(self.dir / "receiver.log", "wb")
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=self.dir
        )
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while not _listening(self.port, self.sc.transport == "udp"):
            if self.proc.poll() is not None:
                raise Unavailable(f"{self.name} exited at start: {self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise Unavailable(f"{self.name} did not listen within {START_TIMEOUT:g}s")
            time.sleep(0.05)

    def log_tail(self, n: int = 400) -> str:
        try:
            return (self.dir / "receiver.log").read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class Relay(Receiver):
    name = "syslog-relay"
    family = "relay"

    def env(self) -> dict[str, str]:
        # The relay of this checkout, whatever the venv's editable install points at
        # (it runs from its work directory, where ``-m relay`` would find the other).
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        return env

    def command(self) -> list[str]:
        framing = "octet-counting" if self.sc.framing == "octet-counting" else "lf"
        cfg = self.dir / "relay.toml"
        tls = ""
        if self.sc.transport == "tls":
            tls = f'[tls]\ncertificate = "{self.certs.cert}"\nkey = "{self.certs.key}"\n'
        cfg.write_text(
            f'[relay]\nid = "bench"\nstate_dir = "{self.dir / "state"}"\nlog_format = "json"\n'
            f'[[listen]]\naddress = "127.0.0.1:{self.port}"\n'
            f'transport = "{self.sc.transport}"\n'
            + (f'framing = "{framing}"\n' if self.sc.transport in ("tcp", "tls") else "")
            + self.sc.listen_toml
            + tls
            + '[staging]\nfsync_interval = "1s"\n'
            # a free port: the default one may be taken by another relay on the machine
            + f'[metrics]\naddress = "127.0.0.1:{free_port()}"\n'
            + self.sc.relay_toml
        )
        return [sys.executable, "-m", "relay", "run", "--config", str(cfg), "--log-level", "warn"]

    def _files(self) -> list[Path]:
        st = self.dir / "state" / "staging"
        return sorted([*st.glob("open/*.stg"), *st.glob("closed/*.stg")])

    def output_bytes(self) -> int:
        total = 0
        for p in self._files():
            try:
                total += p.stat().st_size
            except FileNotFoundError:
                pass  # moved from open/ to closed/ between glob and stat
        return total

    def expected_bytes(self, msg_bytes: int, count: int) -> int | None:
        return None  # record metadata varies: wait until the output stops growing

    def messages(self) -> Iterator[bytes]:
        from relay.formats.staging_block import iter_records

        for p in self._files():
            data = p.read_bytes()
            start = data.index(b"\n") + 1
            for _, rec in iter_records(data, start):
                yield rec.msg


class Rsyslog(Receiver):
    family = "rsyslog"

    def __init__(self, input_module: str, *args: object) -> None:
        self.input_module = input_module  # imptcp | imtcp | imudp | imrelp
        super().__init__(*args)  # type: ignore[arg-type]
        self.name = f"rsyslog {input_module}" + (" gtls" if self.sc.transport == "tls" else "")

    def command(self) -> list[str]:
        exe = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
        if not os.access(exe, os.X_OK):
            raise Unavailable("rsyslogd not installed (apt-get install rsyslog)")
        g = f'workDirectory="{self.dir}" maxMessageSize="64k"'
        mod = self.input_module
        mod_args = ""
        if self.sc.transport == "tls":
            g += (
                f' defaultNetstreamDriver="gtls" defaultNetstreamDriverCAFile="{self.certs.ca}"'
                f' defaultNetstreamDriverCertFile="{self.certs.cert}"'
                f' defaultNetstreamDriverKeyFile="{self.certs.key}"'
            )
            mod_args = (
                ' streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon"'
            )
        if mod in ("imtcp", "imptcp"):
            mod_args += ' maxSessions="1000"' if mod == "imtcp" else ""
        inp = f'input(type="{mod}" address="127.0.0.1" port="{self.port}" ruleset="bench"'
        if mod == "imrelp":  # imrelp has no address parameter: it listens on all
            inp = f'input(type="imrelp" port="{self.port}" ruleset="bench"'
        inp += ' rcvbufSize="8m")' if mod == "imudp" else ")"
        conf = self.dir / "rsyslog.conf"
        conf.write_text(
            f"global({g})\n"
            'main_queue(queue.size="200000" queue.dequeueBatchSize="1024")\n'
            f'module(load="{mod}"{mod_args})\n'
            'template(name="raw" type="string" string="%rawmsg%\\n")\n'
            'ruleset(name="bench") {\n'
            f'  action(type="omfile" file="{self.out}" template="raw" ioBufferSize="256k")\n'
            "}\n" + inp + "\n"
        )
        return [exe, "-n", "-f", str(conf), "-i", str(self.dir / "rsyslogd.pid")]


class SyslogNg(Receiver):
    family = "syslog-ng"

    def __init__(self, tuned: bool, *args: object) -> None:
        self.tuned = tuned
        super().__init__(*args)  # type: ignore[arg-type]
        self.name = "syslog-ng" + (" log-fetch-limit(1000)" if tuned else " stock")

    def env(self) -> dict[str, str]:
        r = SYSLOG_NG_ROOT
        libs = [r / "usr/lib/x86_64-linux-gnu", r / "lib/x86_64-linux-gnu", r / "usr/lib/syslog-ng"]
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = ":".join(map(str, libs))
        return env

    def command(self) -> list[str]:
        exe = SYSLOG_NG_ROOT / "usr/sbin/syslog-ng"
        if not exe.exists():
            raise Unavailable(f"not unpacked in {SYSLOG_NG_ROOT} (run bench/setup.sh)")
        sc = self.sc
        opts = f'ip("127.0.0.1") port({self.port}) max-connections(64)'
        flags = "store-raw-message"
        if self.tuned:
            opts += " log-fetch-limit(1000) log-iw-size(64000)"
        if sc.transport == "udp":
            src = f'syslog({opts} transport("udp") so-rcvbuf(8388608) flags({flags}))'
        elif sc.transport == "tls":
            tls = (
                f'tls(key-file("{self.certs.key}") cert-file("{self.certs.cert}") '
                "peer-verify(optional-untrusted))"
            )
            src = f'syslog({opts} transport("tls") {tls} flags({flags}))'
        elif sc.framing == "lf":
            src = f'network({opts} transport("tcp") flags(syslog-protocol, {flags}))'
        else:
            src = f'syslog({opts} transport("tcp") flags({flags}))'
        conf = self.dir / "syslog-ng.conf"
        # flow-control: without it syslog-ng drops messages once the file
        # destination's queue is full (seen with 16 connections and a large
        # log-iw-size), which the verification rightly reports as loss.
        conf.write_text(
            "@version: 3.38\n"
            "options { stats-freq(0); keep-hostname(yes); };\n"
            f"source s_bench {{ {src}; }};\n"
            f'destination d_bench {{ file("{self.out}" template("${{RAWMSG}}\\n")); }};\n'
            "log { source(s_bench); destination(d_bench); flags(flow-control); };\n"
        )
        return [
            str(exe),
            "-F",
            "--no-caps",
            "-f",
            str(conf),
            f"--module-path={SYSLOG_NG_ROOT / 'usr/lib/syslog-ng/3.38'}",
            f"--persist-file={self.dir / 'syslog-ng.persist'}",
            f"--pidfile={self.dir / 'syslog-ng.pid'}",
            f"--control={self.dir / 'syslog-ng.ctl'}",
        ]


def receivers_for(sc: Scenario) -> list[tuple[str, type[Receiver], tuple[object, ...]]]:
    """(label, class, leading args) of every receiver that runs scenario ``sc``."""
    out: list[tuple[str, type[Receiver], tuple[object, ...]]] = [("relay", Relay, ())]
    if sc.others == "none":
        return out
    if sc.transport == "relp":
        return [*out, ("rsyslog", Rsyslog, ("imrelp",))]
    if sc.transport == "udp":
        out.append(("rsyslog", Rsyslog, ("imudp",)))
    elif sc.transport == "tls":
        out.append(("rsyslog", Rsyslog, ("imtcp",)))
    else:
        out.append(("rsyslog", Rsyslog, ("imptcp",)))
        if sc.others == "all":
            out.append(("rsyslog-imtcp", Rsyslog, ("imtcp",)))
    if sc.others != "all":
        return out
    out.append(("syslog-ng", SyslogNg, (False,)))
    out.append(("syslog-ng-tuned", SyslogNg, (True,)))
    return out
