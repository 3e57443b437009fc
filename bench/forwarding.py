"""Relay-to-relay and backlog-drain scenarios: an edge forwards to a core.

Relay to relay: the load generator feeds the edge's TCP input (octet-counted,
4 connections); the edge forwards to the core (RELP+TLS or TLS, mutual TLS,
the core verifying the edge's client certificate); the core's output is read
back and every message checked. rsyslog does the same with imptcp -> omrelp
(or omfwd gtls) -> imrelp (or imtcp gtls) -> omfile, template ``%rawmsg%`` at
both ends, so the core holds exactly the bytes the load generator sent.

Throughput is measured at the core: messages / (time the core's output
reached its final size - time the load generator started). CPU and peak RSS
are the edge's and the core's added together.

The relay edge marks forwarded RFC 5424 messages with its loop-guard element
(``[relay@32473 via="edge"]``, docs/forwarding.md); the core's messages are
unmarked before they are checked, so the check stays byte-exact.

Backlog drain: the core is down while the load generator fills the edge's
spool (flat out); then the core starts while live traffic continues at a
fixed rate. Reported: how long the core took to acknowledge the whole backlog
(the edge's ``messages_forwarded_total`` reaching it: delivery is in order,
so the backlog goes first), the drain rate, the edge's RSS before and during
the drain, the edge+core CPU, and the live messages' latency (receive time at
the core minus the time the paced sender sent them) until the edge has caught
up (live messages queue behind the backlog, then behind each other) and after.
Every backlog and live message is checked at the core.
"""

from __future__ import annotations

import re
import shutil
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.measure import cpu_seconds, free_port, peak_rss_mb, run_loadgen, verify, wait_done
from bench.receivers import Certs, Receiver, Relay, Scenario

EDGE_ID = "edge"
_MARK = b'[relay@32473 via="' + EDGE_ID.encode() + b'"]'
RECONNECT = {"reconnect_min": "0.2s", "reconnect_max": "1s", "ack_timeout": "30s"}
DRAIN_TIMEOUT = 600.0
POLL = 0.25
CAUGHT_UP = 1.0  # seconds: a live message delivered within this is "live" again
# RELP messages in flight, both implementations. librelp's default (128) ran at
# under 1k msg/s from omrelp here (a round trip of ~0.2 s per window); 1024 ran
# ~35x faster. The relay uses the same window so that both run the same protocol.
WINDOW = 1024


@dataclass(frozen=True)
class ForwardScenario:
    name: str
    transport: str  # edge -> core: relp+tls | tls | relp | link+tls
    count: int  # relay to relay: messages; backlog drain: backlog messages
    connections: int = 4
    live_rate: float = 0.0  # backlog drain: live messages/s while it drains
    live_seconds: float = 0.0
    size: int = 0  # 0: the profile's default
    profile: str = "fleet"

    @property
    def drain(self) -> bool:
        return self.live_rate > 0

    def load(self, count: int | None = None) -> Scenario:
        """The load generator's part (TCP into the edge)."""
        n = self.count if count is None else count
        return Scenario(
            self.name,
            "tcp",
            "octet-counting",
            self.connections,
            n,
            size=self.size,
            profile=self.profile,
        )


def unmark(msg: bytes) -> bytes:
    """``msg`` as the load generator sent it (the edge's loop-guard element removed)."""
    i = msg.find(_MARK)
    if i < 0:
        return msg
    rest = msg[i + len(_MARK) :]
    # The element replaced "-" (no structured data) or went in front of the first one.
    return msg[:i] + (rest if rest.startswith(b"[") else b"-" + rest)


def _toml_tls(certs: Certs) -> str:
    return (
        f'[tls]\ncertificate = "{certs.cert}"\nkey = "{certs.key}"\nca = "{certs.ca}"\n'
        'verify_clients = true\npermitted_peers = ["*.clients.test"]\n'
    )


class RelayNode(Relay):
    """A relay (edge or core) with its own config; the core's messages are unmarked."""

    def __init__(
        self,
        workdir: Path,
        port: int,
        sc: Scenario,
        certs: Certs,
        *,
        relay_id: str,
        listen: str,
        metrics_port: int,
        forward: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(workdir, port, sc, certs)
        self.relay_id = relay_id
        self.listen = listen
        self.metrics_port = metrics_port
        self.forward = forward
        self.name = f"syslog-relay {relay_id}"

    def command(self) -> list[str]:
        import sys

        cfg = self.dir / "relay.toml"
        text = (
            f'[relay]\nid = "{self.relay_id}"\nstate_dir = "{self.dir / "state"}"\n'
            'log_format = "json"\n'
            f'[[listen]]\naddress = "127.0.0.1:{self.port}"\ntransport = "{self.listen}"\n'
            + ('framing = "octet-counting"\n' if self.listen in ("tcp", "tls") else "")
            # An edge only forwards (etc/examples/edge*.toml): the core stages.
            + (
                "[staging]\nenabled = false\n"
                if self.forward
                else '[staging]\nfsync_interval = "1s"\n'
            )
            + f'[metrics]\naddress = "127.0.0.1:{self.metrics_port}"\n'
            + (_toml_tls(self.certs) if self.listen in ("tls", "relp+tls", "link+tls") else "")
        )
        if self.forward:
            text += "[[forward]]\n" + "".join(
                f"{k} = {_value(v)}\n" for k, v in self.forward.items()
            )
        cfg.write_text(text)
        return [sys.executable, "-m", "relay", "run", "--config", str(cfg), "--log-level", "warn"]

    def messages(self) -> Iterator[bytes]:
        for m in super().messages():
            yield unmark(m)

    def records(self) -> Iterator[Any]:
        from relay.formats.staging_block import iter_records

        for p in self._files():
            data = p.read_bytes()
            for _, rec in iter_records(data, data.index(b"\n") + 1):
                yield rec

    def scrape(self) -> str:
        """The /metrics text ("" if unreachable): one request for several figures."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return str(r.read().decode())
        except OSError:
            return ""

    def counter(self, name: str, text: str | None = None) -> float:
        """Sum of a counter/gauge over its labels from /metrics (0 if unreachable)."""
        text = self.scrape() if text is None else text
        pat = re.compile(rf"^syslog_relay_{name}(?:\{{[^}}]*\}})? (\S+)$", re.M)
        return sum(float(v) for v in pat.findall(text))

    def lane_records(self, text: str | None = None) -> dict[str, float]:
        """A link+tls output's undelivered spool records per lane ({} without lanes)."""
        text = self.scrape() if text is None else text
        pat = re.compile(r'^syslog_relay_spool_lane_records\{.*lane="(\d+)".*\} (\S+)$', re.M)
        return {lane: float(v) for lane, v in pat.findall(text)}


def _value(v: object) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, int):
        return str(v)
    return f'"{v}"'


def _relay_forward(transport: str, core_port: int, certs: Certs) -> dict[str, Any]:
    return {
        "name": "core",
        "peers": [f"127.0.0.1:{core_port}"],
        "transport": transport,
        "max_spool": "4GiB",
        "window": WINDOW,
        **RECONNECT,
        "tls_ca": str(certs.ca),
        "tls_peer_name": "relay.test",
        "tls_certificate": str(certs.client_cert),
        "tls_key": str(certs.client_key),
    }


class RsyslogNode(Receiver):
    """rsyslogd as edge (imptcp -> omrelp/omfwd) or core (imrelp/imtcp -> omfile)."""

    family = "rsyslog"

    def __init__(
        self,
        workdir: Path,
        port: int,
        sc: Scenario,
        certs: Certs,
        *,
        role: str,
        transport: str,
        core_port: int = 0,
        queue: int = 200_000,
    ) -> None:
        super().__init__(workdir, port, sc, certs)
        self.role, self.transport, self.core_port, self.queue = role, transport, core_port, queue
        self.name = f"rsyslog {role}"

    def command(self) -> list[str]:
        exe = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
        c = self.certs
        g = f'workDirectory="{self.dir}" maxMessageSize="64k"'
        relp = self.transport.startswith("relp")
        tls = self.transport.endswith("tls")
        if tls and not relp:
            mine = (c.client_cert, c.client_key) if self.role == "edge" else (c.cert, c.key)
            g += (
                f' defaultNetstreamDriver="gtls" defaultNetstreamDriverCAFile="{c.ca}"'
                f' defaultNetstreamDriverCertFile="{mine[0]}"'
                f' defaultNetstreamDriverKeyFile="{mine[1]}"'
            )
        lines = [
            f"global({g})",
            # Inputs are only lightly flow-controlled: a queue that fills drops after
            # timeoutEnqueue. Large enough for the whole run, and a long timeout.
            f'main_queue(queue.type="LinkedList" queue.size="{self.queue}" '
            'queue.dequeueBatchSize="1024" queue.timeoutEnqueue="120000")',
            'template(name="raw" type="string" string="%rawmsg%")',
            'template(name="rawlf" type="string" string="%rawmsg%\\n")',
        ]
        if self.role == "edge":
            lines.append('module(load="imptcp")')
            if relp:
                lines.append('module(load="omrelp")')
                opts = (
                    f'type="omrelp" target="127.0.0.1" port="{self.core_port}" template="raw"'
                    f' windowSize="{WINDOW}"'
                )
                if tls:
                    opts += (
                        f' tls="on" tls.caCert="{c.ca}" tls.myCert="{c.client_cert}"'
                        f' tls.myPrivKey="{c.client_key}" tls.authMode="name"'
                        ' tls.permittedPeer=["relay.test"]'
                    )
            else:
                opts = (
                    f'type="omfwd" target="127.0.0.1" port="{self.core_port}" protocol="tcp"'
                    ' template="raw" TCP_Framing="octet-counted"'
                )
                if tls:
                    opts += (
                        ' StreamDriver="gtls" StreamDriverMode="1"'
                        ' StreamDriverAuthMode="x509/name" StreamDriverPermittedPeers="relay.test"'
                    )
            lines += [
                'ruleset(name="fwd") {',
                f'  action({opts} action.resumeRetryCount="-1" action.resumeInterval="1")',
                "}",
                f'input(type="imptcp" address="127.0.0.1" port="{self.port}" ruleset="fwd")',
            ]
        else:
            if relp:
                lines.append('module(load="imrelp")')
                inp = f'input(type="imrelp" address="127.0.0.1" port="{self.port}" ruleset="out"'
                if tls:
                    inp += (
                        f' tls="on" tls.caCert="{c.ca}" tls.myCert="{c.cert}"'
                        f' tls.myPrivKey="{c.key}" tls.authMode="name"'
                        ' tls.permittedPeer=["good.clients.test"]'
                    )
            else:
                mod = 'module(load="imtcp"'
                if tls:
                    mod += (
                        ' streamDriver.name="gtls" streamDriver.mode="1"'
                        ' streamDriver.authMode="x509/name"'
                        ' permittedPeer=["good.clients.test"]'
                    )
                lines.append(mod + ")")
                inp = f'input(type="imtcp" address="127.0.0.1" port="{self.port}" ruleset="out"'
            lines += [
                'ruleset(name="out") {',
                f'  action(type="omfile" file="{self.out}" template="rawlf" ioBufferSize="256k")',
                "}",
                inp + ")",
            ]
        conf = self.dir / "rsyslog.conf"
        conf.write_text("\n".join(lines) + "\n")
        return [exe, "-n", "-f", str(conf), "-i", str(self.dir / "rsyslogd.pid")]


def _pipeline(
    label: str, fs: ForwardScenario, root: Path, certs: Certs, count: int
) -> tuple[Receiver, Receiver, int]:
    """(edge, core, edge input port), not started."""

    edge_port, core_port = free_port(False), free_port(False)
    sc = fs.load(count)
    if label == "relay":
        core: Receiver = RelayNode(
            root / "core",
            core_port,
            sc,
            certs,
            relay_id="core",
            listen=fs.transport,
            metrics_port=free_port(False),
        )
        edge: Receiver = RelayNode(
            root / "edge",
            edge_port,
            sc,
            certs,
            relay_id=EDGE_ID,
            listen="tcp",
            metrics_port=free_port(False),
            forward=_relay_forward(fs.transport, core_port, certs),
        )
    else:
        queue = max(200_000, int(count * 1.2))
        core = RsyslogNode(root / "core", core_port, sc, certs, role="core", transport=fs.transport)
        edge = RsyslogNode(
            root / "edge",
            edge_port,
            sc,
            certs,
            role="edge",
            transport=fs.transport,
            core_port=core_port,
            queue=queue,
        )
    return edge, core, edge_port


def _stop(*nodes: Receiver) -> None:
    for n in nodes:
        n.stop()


def run_relay_to_relay(label: str, fs: ForwardScenario, root: Path, certs: Certs) -> dict[str, Any]:

    edge, core, port = _pipeline(label, fs, root, certs, fs.count)
    core.start()
    try:
        edge.start()
        pids = (edge.pid, core.pid)
        cpu_edge0, cpu_core0 = map(cpu_seconds, pids)
        lg = run_loadgen(fs.load(), port, certs)
        done = wait_done(core, core.expected_bytes(lg["payload"], lg["sent"]))
        cpu_edge1, cpu_core1 = map(cpu_seconds, pids)
        cpu0, cpu1 = cpu_edge0 + cpu_core0, cpu_edge1 + cpu_core1
        rss_edge, rss_core = map(peak_rss_mb, pids)
        wire_ratio = None
        if isinstance(edge, RelayNode) and fs.transport == "link+tls":
            raw = edge.counter("link_bytes_raw_total")
            wire_ratio = edge.counter("link_bytes_wire_total") / raw if raw else None
    finally:
        _stop(edge, core)
    ok, received, status = verify(core, lg["sent"], lg["checksum"])
    if lg["errors"] or lg["sent"] != fs.count:
        ok, status = False, f"FAILURE: loadgen sent {lg['sent']} of {fs.count} {lg['errors']}"
    secs = max(done - lg["start"], 1e-6)
    return {
        "ok": ok,
        "status": status,
        "name": "syslog-relay edge → core"
        if label == "relay"
        else f"rsyslog {_rsyslog_path(fs.transport)}",
        "sent": lg["sent"],
        "received": received,
        "seconds": secs,
        "msgs_per_s": lg["sent"] / secs,
        "mb_per_s": lg["bytes"] / secs / 1e6,
        "cpu_us_per_msg": (cpu1 - cpu0) / max(lg["sent"], 1) * 1e6,
        "peak_rss_mb": rss_edge + rss_core,
        "loadgen_msgs_per_s": lg["msgs_per_s"],
        "edge_peak_rss_mb": rss_edge,
        "core_peak_rss_mb": rss_core,
        "wire_ratio": wire_ratio,  # link: bytes on the wire / raw batch bytes
        "edge_cpu_us_per_msg": (cpu_edge1 - cpu_edge0) / max(lg["sent"], 1) * 1e6,
        "core_cpu_us_per_msg": (cpu_core1 - cpu_core0) / max(lg["sent"], 1) * 1e6,
    }


def _rsyslog_path(transport: str) -> str:
    return {
        "relp+tls": "omrelp → imrelp (TLS)",
        "relp": "omrelp → imrelp",
        "tls": "omfwd → imtcp (gtls)",
    }[transport]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _stats(xs: list[float]) -> dict[str, float]:
    return {
        "n": len(xs),
        "p50": _percentile(xs, 0.5),
        "p99": _percentile(xs, 0.99),
        "max": max(xs, default=float("nan")),
    }


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_backlog_drain(fs: ForwardScenario, root: Path, certs: Certs) -> dict[str, Any]:
    """The backlog-drain scenario (relay only); see the module docstring."""
    import subprocess
    import sys

    from bench.receivers import REPO

    edge, core, port = _pipeline("relay", fs, root, certs, fs.count)
    assert isinstance(edge, RelayNode) and isinstance(core, RelayNode)
    n = fs.count
    live_n = int(fs.live_rate * fs.live_seconds)
    edge.start()
    try:
        # 1. The core is down: the backlog goes into the edge's spool.
        lg = run_loadgen(fs.load(), port, certs)
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while edge.counter("messages_received_total") < n and time.monotonic() < deadline:
            time.sleep(POLL)
        # Everything received is spooled once the spool stops growing (group commit).
        spooled, last = -1.0, edge.counter("spool_bytes")
        while spooled != last and time.monotonic() < deadline:
            time.sleep(2 * POLL)
            spooled, last = last, edge.counter("spool_bytes")
        rss_before = _rss_mb(edge.pid)
        # 2. Live traffic starts, paced, one connection, and the core with it: the
        # live load generator pre-generates its messages first (seconds for millions),
        # so the core starts only once the first live message reached the edge;
        # otherwise a fast drain ends before anything live is sent.
        live_cmd = [
            sys.executable,
            "-m",
            "relay",
            "loadgen",
            f"127.0.0.1:{port}",
            "-c",
            "1",
            "-n",
            str(live_n),
            "-r",
            str(fs.live_rate),
            "--profile",
            fs.profile,
            *(["-s", str(fs.size)] if fs.size else []),
            "--seq-start",
            str(n),
            "--seed",
            "2",
            "--json",
        ]
        live = subprocess.Popen(
            live_cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while edge.counter("messages_received_total") <= n and time.monotonic() < deadline:
            if live.poll() is not None:
                break  # failed: reported below
            time.sleep(POLL / 4)
        core.start()
        t_core = time.time()
        cpu0 = cpu_seconds(edge.pid) + cpu_seconds(core.pid)
        ecpu0, ccpu0 = cpu_seconds(edge.pid), cpu_seconds(core.pid)
        ecpu1 = ccpu1 = 0.0
        rss_peak = rss_before
        core_rss_peak = 0.0
        drained_at = 0.0
        # A link+tls edge sends live records through the spool's other lane: the
        # backlog is drained once the lane holding it is empty (the forwarded count
        # includes live messages). Other transports: one lane, the forwarded count.
        lanes = edge.lane_records()
        backlog_lane = max(lanes, key=lambda k: lanes[k]) if lanes else None
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while time.monotonic() < deadline:
            rss_peak = max(rss_peak, _rss_mb(edge.pid))
            core_rss_peak = max(core_rss_peak, _rss_mb(core.pid))
            text = edge.scrape()  # one request per poll: scraping costs the edge CPU
            fwd = edge.counter("messages_forwarded_total", text)
            if not drained_at:
                if backlog_lane is not None:
                    done = edge.lane_records(text).get(backlog_lane, 1.0) == 0
                else:
                    done = fwd >= n
                if done:
                    drained_at = time.time()
                    ecpu1, ccpu1 = cpu_seconds(edge.pid), cpu_seconds(core.pid)
            if live.poll() is not None and fwd >= n + live_n:
                break
            time.sleep(POLL)
        all_at = time.time()
        out, err = live.communicate(timeout=60)
        cpu1 = cpu_seconds(edge.pid) + cpu_seconds(core.pid)
        hwm = peak_rss_mb(edge.pid)
        # Nothing to wait for at the core: RELP acknowledged only what it had fsynced.
    finally:
        _stop(edge, core)
    if live.returncode not in (0, 1):
        raise RuntimeError(f"live loadgen failed: {err.strip()[-400:]}")
    import json

    lv = json.loads(out)
    total = lg["sent"] + lv["sent"]
    checksum = (lg["checksum"] + lv["checksum"]) & ((1 << 64) - 1)
    ok, received, status = verify(core, total, checksum)
    if lg["errors"] or lv["errors"] or lg["sent"] != n or lv["sent"] != live_n:
        ok, status = False, f"FAILURE: loadgen sent {lg['sent']}+{lv['sent']} of {n}+{live_n}"
    if not drained_at:
        ok, status = False, f"FAILURE: backlog not drained within {DRAIN_TIMEOUT:g}s"
    # Live latency: receive time at the core minus when the paced sender sent it.
    # Live messages queue behind the backlog (one ordered spool), then behind each
    # other until the edge has caught up: caught up = from the first live message
    # (in send order) delivered within CAUGHT_UP of being sent, all later ones too.
    seq_re = re.compile(rb" seq=(\d{10}) ")
    t_live, rate = lv["start"], fs.live_rate
    lat = [float("nan")] * live_n
    first_at = float("inf")  # the core received its first batch: the drain begins
    last_backlog_at = 0.0
    for rec in core.records():
        first_at = min(first_at, rec.recv_epoch)
        m = seq_re.search(rec.msg)
        if m is None or not n <= int(m.group(1)) < n + live_n:
            if m is not None and int(m.group(1)) < n:
                last_backlog_at = max(last_backlog_at, rec.recv_epoch)
            continue
        k = int(m.group(1)) - n
        lat[k] = rec.recv_epoch - (t_live + k / rate)
    # Live messages sent while the backlog drained (from the core's first batch to
    # the backlog's acknowledgement), and those sent while the core was starting.
    k0 = max(0, min(live_n, int((first_at - t_live) * rate) + 1))
    k1 = max(k0, min(live_n, int((drained_at - t_live) * rate) + 1)) if drained_at else k0
    in_drain = [x for x in lat[k0:k1] if x == x]
    while_down = [x for x in lat[: max(0, min(k0, int((first_at - t_live) * rate)))] if x == x]
    missing_in_drain = sum(1 for x in lat[k0:k1] if x != x)
    k_caught = live_n
    for k in range(live_n - 1, -1, -1):
        if not lat[k] <= CAUGHT_UP:  # NaN (missing) counts as late
            break
        k_caught = k
    caught_at = t_live + k_caught / rate if k_caught < live_n else 0.0
    late = [x for x in lat[:k_caught] if x == x]
    steady = lat[k_caught:]
    drain_s = max(drained_at - t_core, 1e-6)
    return {
        "ok": ok,
        "status": status,
        "name": "syslog-relay edge → core",
        "sent": total,
        "received": received,
        "seconds": drain_s,
        "msgs_per_s": n / drain_s,
        "mb_per_s": lg["bytes"] / drain_s / 1e6,
        "cpu_us_per_msg": (cpu1 - cpu0) / max(total, 1) * 1e6,
        "peak_rss_mb": rss_peak,
        "loadgen_msgs_per_s": lg["msgs_per_s"],
        "core_rss_peak_during_drain_mb": core_rss_peak,
        "first_batch_seconds": first_at - t_core,
        "last_backlog_received_seconds": last_backlog_at - t_core,
        "drain_cpu_us_per_msg_edge": (ecpu1 - ecpu0) / n * 1e6 if drained_at else float("nan"),
        "drain_cpu_us_per_msg_core": (ccpu1 - ccpu0) / n * 1e6 if drained_at else float("nan"),
        "live_latency_during_drain_s": _stats(in_drain),
        "live_missing_during_drain": missing_in_drain,
        "live_latency_sent_while_core_started_s": _stats(while_down),
        "backlog": n,
        "backlog_spool_mb": spooled / 1e6,
        "live_messages": lv["sent"],
        "live_rate": rate,
        "drain_seconds": drain_s,
        "all_delivered_seconds": all_at - t_core,
        "edge_rss_before_drain_mb": rss_before,
        "edge_rss_peak_during_drain_mb": rss_peak,
        "edge_vmhwm_mb": hwm,
        "caught_up_seconds": caught_at - t_core if caught_at else float("nan"),
        "live_latency_until_caught_up_s": _stats(late),
        "live_latency_after_caught_up_s": _stats(steady),
    }
