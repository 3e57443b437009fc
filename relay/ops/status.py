"""``syslog-relay status``: ask the running relay for /status and print a summary (or the JSON).

The daemons already know everything (relay/ops/observe.py, archive/observe.py);
this is a small HTTP client and a text renderer. ``syslog-archive status``
uses ``run`` with its own renderer. Exit status: 0 the daemon answered
(degraded or not: the summary says which), 1 it could not be reached,
2 the configuration is invalid.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from relay.config import Config, ConfigError, load

TIMEOUT = 5.0

# A daemon's /status document (or a part of it) as json.loads returns it: the renderers
# read its fields unchecked, each with a default.
StatusJSON = dict[str, Any]


class Unreachable(Exception):
    """The daemon did not answer /status."""


def url(address: tuple[str, int], path: str = "/status") -> str:
    host, port = address
    # A wildcard bind is reached on loopback.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}{path}"


def fetch(address: tuple[str, int], timeout: float = TIMEOUT) -> StatusJSON:
    where = url(address)
    try:
        with urllib.request.urlopen(where, timeout=timeout) as resp:
            data = resp.read()
    except urllib.error.HTTPError as exc:
        raise Unreachable(f"{where} answered HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        raise Unreachable(f"cannot reach {where} ({reason})") from None
    try:
        status = json.loads(data)
    except ValueError:
        raise Unreachable(f"{where} did not answer JSON: is that the right port?") from None
    if not isinstance(status, dict):
        raise Unreachable(f"{where} did not answer a JSON object")
    return status


def run(
    args: argparse.Namespace,
    prog: str,
    daemon: str,
    address: Callable[[Config], tuple[str, int]],
    render: Callable[[StatusJSON, Config], str],
) -> int:
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        for line in exc.lines():
            print(f"{prog}: config: {line}", file=sys.stderr)
        return 2
    if not cfg.metrics.enabled:
        print(
            f"{prog}: metrics.enabled = false in {args.config}: the {daemon} serves no status",
            file=sys.stderr,
        )
        return 1
    try:
        status = fetch(address(cfg))
    except Unreachable as exc:
        print(
            f"{prog}: {exc}; is the {daemon} running? (address from [metrics] in {args.config})",
            file=sys.stderr,
        )
        return 1
    if args.json:
        sys.stdout.write(json.dumps(status, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(render(status, cfg))
    return 0


def main(args: argparse.Namespace) -> int:
    """``syslog-relay status [--config PATH] [--json]``."""
    return run(args, "syslog-relay status", "relay", lambda c: c.metrics.endpoint, render_relay)


# --- text -------------------------------------------------------------------------------


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 2 * 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def headline(status: StatusJSON, name: str) -> list[str]:
    health = status.get("health", {})
    lines = [
        f"{status.get('daemon', name)} {status.get('version', '?')} "
        f"(relay {status.get('relay_id', '?')}, pid {status.get('pid', '?')}), "
        f"up {age(status.get('uptime'))}: " + ("OK" if health.get("status") == "ok" else "DEGRADED")
    ]
    lines += [f"  ! {r}" for r in health.get("reasons", [])]
    return lines


def staging_lines(st: StatusJSON) -> list[str]:
    line = (
        f"  {st.get('open_files', 0)} open file(s) ({size(st.get('open_bytes'))}); "
        f"{st.get('closed_files', 0)} closed waiting for the archiver "
        f"({size(st.get('closed_bytes'))})"
    )
    if st.get("oldest_closed"):
        line += f", oldest {st['oldest_closed']} waiting {age(st.get('oldest_closed_age'))}"
    return [line]


def errors_lines(events: list[StatusJSON], n: int = 5) -> list[str]:
    if not events:
        return []
    from datetime import UTC, datetime

    out = ["Recent warnings and errors"]
    for e in events[-n:]:
        t = e.get("time")
        when = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if t else "?"
        out.append(f"  {when} {e.get('level', '?')} {e.get('namespace', '')}: {e.get('text', '')}")
    return out


def render_relay(status: StatusJSON, cfg: Config) -> str:
    lines = headline(status, "syslog-relay")
    lines.append("Listeners")
    for lc in status.get("listeners", []):
        open_ = lc.get("connections_open")
        lines.append(
            f"  {lc['name']:<16} {lc['transport']:<8} {lc['address']:<22} "
            f"{'-' if open_ is None else open_:>5} open  {lc['messages']:>12} msgs "
            f"{size(lc['bytes']):>10}  {lc['framing_errors']} framing errors, "
            f"{lc['connections_refused']} refused"
        )
    if not status.get("listeners"):
        lines.append("  (none)")
    if status.get("outputs"):
        lines.append("Forward outputs")
    for out in status.get("outputs", []):
        b = out["backlog"]
        if not out.get("configured", True):
            state = "REMOVED from the configuration, spool kept"
        else:
            state = out["state"]
            if out.get("no_peer_for") is not None:
                state += f" for {age(out['no_peer_for'])}"
        lines.append(
            f"  {out['name']} ({out.get('transport', '?')}, {out.get('mode', '?')}): {state}; "
            f"backlog {b['records']} records, {size(b['bytes'])}, oldest {age(b['oldest_age'])}; "
            f"delivered {out.get('delivered', 0)}, dropped {out.get('dropped', 0)}"
        )
        for p in out.get("peers", []):
            extra = ""
            if p["state"] == "backoff":
                extra = f" ({p['failures']} failures, retry in {age(p['retry_in'])})"
            lines.append(f"    {p['peer']:<28} {p['state']}{extra}")
    if status.get("selectors"):
        lines.append("Selectors")
    for sel in status.get("selectors", []):
        lines.append(
            f"  {sel['selector']:<24} {sel['selected']:>12} selected {sel['not_selected']:>12} not"
        )
    lines.append("Staging")
    st = status.get("staging", {})
    lines += staging_lines(st)
    w = status.get("writer", {})
    line = f"  writer: {size(w.get('pending_bytes'))} pending"
    if w.get("last_error"):
        line += f"; FAILING: {w['last_error']}"
    lines.append(line)
    disk = status.get("disk")
    if disk and disk.get("free_bytes") is not None:
        lines.append(
            f"  disk: {size(disk['free_bytes'])} free of {size(disk.get('total_bytes'))} "
            f"on {disk.get('path')}, floor {size(disk.get('floor_bytes'))}"
            + ("; INPUTS PAUSED" if disk.get("inputs_paused") else "")
        )
    if cfg.archive.enabled and cfg.metrics.enabled:
        lines.append("Archive")
        try:
            arch = fetch(cfg.metrics.archive_endpoint, timeout=2.0)
        except Unreachable as exc:
            lines.append(f"  syslog-archive not answering: {exc}")
        else:
            lines.append(f"  {last_upload(arch)}")
    lines += errors_lines(status.get("last_errors", []))
    return "\n".join(lines) + "\n"


def last_upload(arch: StatusJSON) -> str:
    up = arch.get("uploads", {})
    line = f"{up.get('done', 0)} uploaded, {up.get('failed', 0)} failed"
    if up.get("last_key"):
        line += f"; last upload {age(up.get('last_age'))} ago: {up['last_key']}"
    else:
        line += "; nothing uploaded since start"
    if up.get("last_error"):
        line += f"; last failure: {up['last_error']}"
    return line
