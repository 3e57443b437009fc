"""``python -m bench``: this relay vs rsyslog and syslog-ng, same load, same run.

For every scenario and receiver: start the receiver, run ``syslog-relay
loadgen`` (pre-generated messages, its own processes) against it, wait until
the receiver's output stops growing, then read the output back and check the
count and checksum of every message. A run that loses, duplicates or alters a
message is a FAILURE, never a number. Receiver CPU comes from
/proc/PID/stat (all threads), peak RSS from VmHWM.

Throughput = messages / (time the receiver's output reached its final size
- time the load generator started sending). Ratios compare with the rsyslog
and syslog-ng rows of the same scenario in the same run, since absolute
numbers drift on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.forwarding import ForwardScenario, run_backlog_drain, run_relay_to_relay
from bench.measure import cpu_seconds, free_port, peak_rss_mb, run_loadgen, verify, wait_done
from bench.receivers import REPO, Certs, Receiver, Scenario, Unavailable, receivers_for


def full_scenarios(scale: float = 1.0) -> list[Scenario]:
    n = int(1_000_000 * scale)
    octet, lf = "octet-counting", "lf"
    fleet = "fleet"
    return [
        # The headline: traffic that looks like a fleet (relay.tools.fleet).
        Scenario("fleet tcp octet 4 conn", "tcp", octet, 4, n, profile=fleet),
        Scenario("fleet tcp lf 4 conn", "tcp", lf, 4, n, profile=fleet),
        Scenario("fleet tcp octet 1 conn", "tcp", octet, 1, n, profile=fleet),
        Scenario("fleet tcp octet 16 conn", "tcp", octet, 16, n, profile=fleet),
        Scenario("fleet tls large records 4 conn", "tls", octet, 4, n, profile=fleet),
        Scenario(
            "fleet tls record/msg 4 conn",
            "tls",
            octet,
            4,
            n // 5,
            tls_records="per-message",
            profile=fleet,
        ),
        Scenario("fleet relp 4 conn", "relp", octet, 4, n // 5, profile=fleet),
        # answered once written, not fsynced: still more than imrelp keeps (it answers
        # before writing), and the sender's window no longer waits for the disk
        Scenario(
            'fleet relp 4 conn, ack = "write"',
            "relp",
            octet,
            4,
            n // 5,
            profile=fleet,
            others="rsyslog",
            listen_toml='ack = "write"\n',
        ),
        # UDP has no flow control: paced so that a receiver that keeps up loses nothing.
        Scenario("fleet udp 1 sender 50k/s", "udp", octet, 1, n // 5, rate=50_000, profile=fleet),
        # Selectors (relay.selection): the same fleet run with two forward outputs
        # (peers down: every selected message is spooled) and their selectors.
        *selector_scenarios(n),
        # Adversarial: what a fast path tuned on the fleet must not fall over on.
        *adversarial_scenarios(n),
        # loadgen's own traffic: one stamp per batch, one form. The best case.
        Scenario("best case (uniform) tcp octet 4 conn", "tcp", octet, 4, n),
    ]


# Two outputs whose peer does not answer (their spools fill), as TOML.
_OUTPUTS = (
    '[[forward]]\nname = "security"\npeers = ["127.0.0.1:9"]\ntransport = "tcp"\n{sec}'
    '[[forward]]\nname = "web"\npeers = ["127.0.0.1:9"]\ntransport = "tcp"\n{web}'
)
# rsyslog's `auth,authpriv.*;*.warning`, `:hostname, startswith, "web-"` and a drop rule
# on an app-name (that no fleet sender has, so that every message can be verified).
THREE_SELECTORS = (
    _OUTPUTS.format(
        sec='select = { any = [{ facility = ["auth", "authpriv"] }, { severity = "warning" }] }\n',
        web='select = { host = "web-*" }\n',
    )
    + '[[drop]]\nname = "noisy"\nselect = { app = "bench-noisy", severity_below = "notice" }\n'
)


def selector_scenarios(n: int) -> list[Scenario]:
    """Relay only: the fleet run with two outputs, with and without three selectors
    (``--only selector`` runs these three)."""
    octet = "octet-counting"

    def sc(name: str, toml: str) -> Scenario:
        return Scenario(name, "tcp", octet, 4, n, profile="fleet", others="none", relay_toml=toml)

    return [
        sc("fleet tcp octet 4 conn, no outputs, no selector", ""),
        sc("fleet tcp octet 4 conn, 2 outputs, no selector", _OUTPUTS.format(sec="", web="")),
        sc("fleet tcp octet 4 conn, 3 selectors", THREE_SELECTORS),
    ]


def selector_ratios(runs: list[Run]) -> list[str]:
    """The selector row against the same fleet run without selectors (same bench run)."""
    by = {r.scenario: r for r in runs if r.label == "relay" and r.ok}
    sel = by.get("fleet tcp octet 4 conn, 3 selectors")
    if sel is None:
        return []
    out = []
    for base in ("2 outputs", "no outputs"):
        ref = by.get(f"fleet tcp octet 4 conn, {base}, no selector")
        if ref is not None:
            ratio = sel.msgs_per_s / ref.msgs_per_s
            out.append(f"3 selectors vs {base} without selectors: {ratio:.2f}x msg/s")
    return out


def adversarial_scenarios(n: int) -> list[Scenario]:
    """TCP octet-counted, 4 connections, relay and rsyslog imptcp only."""
    octet = "octet-counting"

    def adv(name: str, count: int, profile: str, size: int = 0, conns: int = 4) -> Scenario:
        return Scenario(
            name, "tcp", octet, conns, count, size=size, profile=profile, others="rsyslog"
        )

    return [
        adv("adversarial: every message another zone", n, "zones"),
        adv("adversarial: only zones like +05:30", n, "halfhour"),
        adv("adversarial: only RFC 3164", n, "rfc3164"),
        adv("adversarial: clocks days off (R)", n, "skewed"),
        adv("adversarial: 1 KB messages", n // 3, "fleet", size=1024),
        adv("adversarial: 8 KB messages", n // 25, "fleet", size=8192),
        adv("adversarial: 64 conn, 1-3 senders each", n, "direct", conns=64),
    ]


def quick_scenarios() -> list[Scenario]:
    return [
        Scenario("fleet tcp octet 4 conn", "tcp", "octet-counting", 4, 20_000, profile="fleet"),
        Scenario(
            "fleet tls record/msg 4 conn",
            "tls",
            "octet-counting",
            4,
            5_000,
            tls_records="per-message",
            profile="fleet",
        ),
    ]


def full_forward_scenarios(scale: float = 1.0) -> list[ForwardScenario]:
    n = int(1_000_000 * scale)
    backlog = int(2_000_000 * scale)
    return [
        ForwardScenario("relay->relay RELP+TLS", "relp+tls", n),
        ForwardScenario("relay->relay TLS", "tls", n),
        ForwardScenario("relay->relay link+tls", "link+tls", n),
        # Live traffic outlasts the catch-up (backlog / (drain rate - 20k/s), about
        # backlog / 25k here) so that the latency after it is measured too.
        ForwardScenario(
            f"backlog drain {_count(backlog)} messages + live 20k/s",
            "relp+tls",
            backlog,
            live_rate=20_000,
            live_seconds=round(backlog / 20_000 + 10, 1),
        ),
        ForwardScenario(
            f"backlog drain {_count(backlog)} messages + live 20k/s, link+tls",
            "link+tls",
            backlog,
            live_rate=20_000,
            live_seconds=round(backlog / 20_000 + 10, 1),
        ),
    ]


def quick_forward_scenarios() -> list[ForwardScenario]:
    return [
        ForwardScenario("relay->relay RELP+TLS", "relp+tls", 5_000),
        ForwardScenario(
            "backlog drain 10k messages + live 2k/s",
            "relp+tls",
            10_000,
            live_rate=2_000,
            live_seconds=1.0,
        ),
    ]


def _count(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}k"


@dataclass
class Run:
    scenario: str
    receiver: str
    label: str
    ok: bool = False
    status: str = ""
    sent: int = 0
    received: int = 0
    msgs_per_s: float = 0.0
    mb_per_s: float = 0.0
    cpu_us_per_msg: float = 0.0
    peak_rss_mb: float = 0.0
    seconds: float = 0.0
    loadgen_msgs_per_s: float = 0.0
    runs: list[dict[str, float]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def run_one(
    sc: Scenario,
    label: str,
    cls: type[Receiver],
    args: tuple[object, ...],
    root: Path,
    certs: Certs,
) -> dict[str, Any]:
    port = free_port(sc.transport == "udp")
    rx = cls(*args, root, port, sc, certs)  # type: ignore[call-arg, arg-type]
    rx.start()
    try:
        cpu0 = cpu_seconds(rx.pid)
        lg = run_loadgen(sc, port, certs)
        done = wait_done(rx, rx.expected_bytes(lg["payload"], lg["sent"]))
        cpu1 = cpu_seconds(rx.pid)
        rss = peak_rss_mb(rx.pid)
    finally:
        rx.stop()
    ok, received, status = verify(rx, lg["sent"], lg["checksum"])
    if lg["errors"]:
        ok, status = False, "FAILURE: loadgen: " + "; ".join(lg["errors"])
    if lg["sent"] != sc.count:
        ok, status = False, f"FAILURE: loadgen sent {lg['sent']} of {sc.count}"
    secs = max(done - lg["start"], 1e-6)
    return {
        "ok": ok,
        "status": status,
        "name": rx.name,
        "sent": lg["sent"],
        "received": received,
        "seconds": secs,
        "msgs_per_s": lg["sent"] / secs,
        "mb_per_s": lg["bytes"] / secs / 1e6,
        "cpu_us_per_msg": (cpu1 - cpu0) / max(lg["sent"], 1) * 1e6,
        "peak_rss_mb": rss,
        "loadgen_msgs_per_s": lg["msgs_per_s"],
    }


def run_scenario(sc: Scenario, root: Path, certs: Certs, repeat: int) -> list[Run]:
    runs = []
    for label, cls, args in receivers_for(sc):
        runs.append(
            _repeat(
                sc.name,
                label,
                repeat,
                lambda i, label=label, cls=cls, args=args: run_one(  # type: ignore[misc]
                    sc, label, cls, args, root / f"{_slug(sc.name)}-{label}-{i}", certs
                ),
            )
        )
    return runs


def run_forward_scenario(fs: ForwardScenario, root: Path, certs: Certs, repeat: int) -> list[Run]:
    """Relay to relay: the relay pipeline, then rsyslog's; backlog drain: the relay alone."""
    # rsyslog has no counterpart of the relay link: its rows compare with the RELP/TLS ones.
    labels = ["relay"] if fs.drain or fs.transport == "link+tls" else ["relay", "rsyslog"]
    runs = []
    for label in labels:

        def one(i: int, label: str = label) -> dict[str, Any]:
            where = root / f"{_slug(fs.name)}-{label}-{i}"
            if fs.drain:
                return run_backlog_drain(fs, where, certs)
            return run_relay_to_relay(label, fs, where, certs)

        runs.append(_repeat(fs.name, label, repeat, one))
    return runs


def _repeat(name: str, label: str, repeat: int, one: Callable[[int], dict[str, Any]]) -> Run:
    """``repeat`` runs of one cell; the median run's numbers, or the first failure."""
    r = Run(name, "", label)
    results: list[dict[str, Any]] = []
    for i in range(repeat):
        try:
            res = one(i)
        except Unavailable as exc:
            r.receiver, r.status = _display(label), f"unavailable: {exc}"
            break
        except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
            r.receiver, r.status = _display(label), f"FAILURE: {exc}"
            break
        r.receiver = res["name"]
        results.append(res)
        if not res["ok"]:
            r.status = res["status"]
            break
    else:
        med = sorted(results, key=lambda x: x["msgs_per_s"])[len(results) // 2]
        r.ok, r.status = True, "ok"
        for k in (
            "sent",
            "received",
            "msgs_per_s",
            "mb_per_s",
            "seconds",
            "loadgen_msgs_per_s",
        ):
            setattr(r, k, med[k])
        r.cpu_us_per_msg = statistics.median(x["cpu_us_per_msg"] for x in results)
        r.peak_rss_mb = max(x["peak_rss_mb"] for x in results)
        r.details = {k: v for k, v in med.items() if k not in _RUN_KEYS}
    r.runs = [{k: v for k, v in x.items() if isinstance(v, (int, float))} for x in results]
    print(_row(r, None, None), flush=True)
    return r


_RUN_KEYS = {
    "ok",
    "status",
    "name",
    "sent",
    "received",
    "seconds",
    "msgs_per_s",
    "mb_per_s",
    "cpu_us_per_msg",
    "peak_rss_mb",
    "loadgen_msgs_per_s",
}


def drain_details(runs: list[Run]) -> str:
    """The backlog-drain numbers that do not fit the table."""
    out = []
    for r in runs:
        d = r.details
        if not r.ok or "backlog" not in d:
            continue
        during, after = d["live_latency_until_caught_up_s"], d["live_latency_after_caught_up_s"]

        def lat(x: dict[str, float]) -> str:
            if not x["n"]:
                return "none"
            return (
                f"p50 {x['p50']:.3f} s, p99 {x['p99']:.3f} s, max {x['max']:.3f} s (n={x['n']:,})"
            )

        out.append(
            f"{r.scenario}: {d['backlog']:,} backlog messages ({d['backlog_spool_mb']:.0f} MB "
            f"spooled) drained in {d['drain_seconds']:.1f} s ({r.msgs_per_s:,.0f} msg/s) while "
            f"{d['live_messages']:,} live messages arrived at {d['live_rate']:,.0f}/s; live "
            f"traffic caught up (delivered within 1 s) {d['caught_up_seconds']:.1f} s after "
            f"the core started; all delivered after {d['all_delivered_seconds']:.1f} s. Edge "
            f"RSS: {d['edge_rss_before_drain_mb']:.0f} MB before the drain, peak "
            f"{d['edge_rss_peak_during_drain_mb']:.0f} MB during it (VmHWM over the whole run, "
            f"loading included: {d['edge_vmhwm_mb']:.0f} MB). Live latency (core receive time - "
            f"send time) until caught up: {lat(during)}; after: {lat(after)}."
        )
        if "live_latency_during_drain_s" in d:
            out[-1] += (
                f" The core's first batch {d['first_batch_seconds']:.1f} s after its start, "
                f"the backlog's last {d['last_backlog_received_seconds']:.1f} s after it; "
                f"live sent during the drain (first batch to backlog acknowledged): "
                f"{lat(d['live_latency_during_drain_s'])}; sent while the core was starting: "
                f"{lat(d['live_latency_sent_while_core_started_s'])}. CPU during the drain: "
                f"edge {d['drain_cpu_us_per_msg_edge']:.2f}, core "
                f"{d['drain_cpu_us_per_msg_core']:.2f} us per backlog message; core RSS peak "
                f"{d['core_rss_peak_during_drain_mb']:.0f} MB."
            )
    return "\n".join(out)


def _display(label: str) -> str:
    return {"relay": "syslog-relay"}.get(label, label)


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s)


def _ratio(r: Run, ref: Run | None) -> str:
    if ref is None or not ref.ok or not r.ok or not ref.msgs_per_s:
        return "-"
    return f"{r.msgs_per_s / ref.msgs_per_s:.2f}"


def _row(r: Run, rs: Run | None, ng: Run | None) -> str:
    if not r.ok:
        return f"| {r.scenario} | {r.receiver} | {r.status} | | | | | | |"
    return (
        f"| {r.scenario} | {r.receiver} | {r.msgs_per_s:,.0f} | {r.mb_per_s:.1f} "
        f"| {r.cpu_us_per_msg:.2f} | {r.peak_rss_mb:.0f} | {_ratio(r, rs)} | {_ratio(r, ng)} "
        f"| {r.received:,} ok |"
    )


HEADER = (
    "| scenario | receiver | msg/s | MB/s | CPU µs/msg | peak RSS MB | vs rsyslog | vs syslog-ng "
    "| verified |\n|---|---|---:|---:|---:|---:|---:|---:|---|"
)


def table(runs: list[Run], extra: list[str]) -> str:
    lines = [HEADER]
    by_sc: dict[str, list[Run]] = {}
    for r in runs:
        by_sc.setdefault(r.scenario, []).append(r)
    for rows in by_sc.values():
        rs = next((r for r in rows if r.label == "rsyslog"), None)
        ng = next((r for r in rows if r.label == "syslog-ng-tuned"), None)
        lines += [_row(r, rs, ng) for r in rows]
    lines += extra
    return "\n".join(lines)


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    osname = "Linux"
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                osname = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, {osname}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small counts, two scenarios (<1 min)")
    p.add_argument("--repeat", type=int, default=None, help="runs per cell, median (default 3)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply message counts")
    p.add_argument(
        "--only", default="", help="run scenarios whose name contains this (comma: any of)"
    )
    p.add_argument("--no-archive", action="store_true", help="skip the archive scenario")
    p.add_argument("--output", help="JSON result path (default bench/results/DATE.json)")
    p.add_argument("--note", default="", help="free text stored with the results")
    args = p.parse_args(argv)
    # SIGTERM ends the run through the finally blocks, which stop the receivers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    repeat = args.repeat or (1 if args.quick else 3)
    scenarios = quick_scenarios() if args.quick else full_scenarios(args.scale)
    forwards = quick_forward_scenarios() if args.quick else full_forward_scenarios(args.scale)
    if args.only:
        wanted = [w for w in args.only.split(",") if w]
        scenarios = [s for s in scenarios if any(w in s.name for w in wanted)]
        forwards = [s for s in forwards if any(w in s.name for w in wanted)]

    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="syslog-relay-bench-") as tmp:
        root = Path(tmp)
        certs = _certs(root / "pki")
        print(f"# syslog-relay bench {started:%Y-%m-%d %H:%M} UTC on {machine()}")
        print(HEADER, flush=True)
        runs: list[Run] = []
        for sc in scenarios:
            runs += run_scenario(sc, root, certs, repeat)
        for fs in forwards:
            runs += run_forward_scenario(fs, root, certs, repeat)
        archive: dict[str, Any] = {}
        if not args.no_archive and not args.quick:
            from bench.archive import archive_scenario

            archive = archive_scenario(root, certs)
    text = table(runs, [])
    ratios = selector_ratios(runs)
    if ratios:
        text += "\n\n" + "\n".join(ratios)
    details = drain_details(runs)
    print()
    print(f"Run {started:%Y-%m-%d %H:%M} UTC on {machine()}; {repeat} run(s) per cell, median.")
    print(text)
    if details:
        print()
        print(details)
    if archive:
        print()
        print(archive["table"])
    failures = [r for r in runs if r.status.startswith("FAILURE")]
    result = {
        "date": started.isoformat(),
        "machine": machine(),
        "repeat": repeat,
        "quick": args.quick,
        "note": args.note,
        "runs": [asdict(r) for r in runs],
        "archive": archive,
        "table": text,
        "drain": details,
        "failures": len(failures),
    }
    out = (
        Path(args.output)
        if args.output
        else (
            REPO
            / "bench/results"
            / f"{started:%Y%m%dT%H%M%SZ}{'-quick' if args.quick else ''}.json"
        )
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nresults: {out}")
    if failures:
        print(f"{len(failures)} FAILURE(S): messages lost or altered", file=sys.stderr)
        return 1
    return 0


def _certs(root: Path) -> Certs:
    sys.path.insert(0, str(REPO))
    from tests.support.certs import make_pki

    pki = make_pki(root)
    good = pki.clients["good"]
    return Certs(pki.ca, pki.server.cert, pki.server.key, good.cert, good.key)
