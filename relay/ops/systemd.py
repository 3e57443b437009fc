"""sd_notify(3) and the watchdog interval in pure stdlib, for ``Type=notify`` units.

Why not python3-systemd: one more dependency for five lines of socket code, and
the protocol is stable: newline-separated ``KEY=VALUE`` assignments in one
datagram to the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a leading ``@``
means the Linux abstract namespace). Outside systemd the variable is unset and
every call is a no-op, so the daemons call these unconditionally.

Notification is best-effort, as in libsystemd: a failed send returns False
instead of raising, because a daemon that cannot reach systemd must keep
serving; the caller logs it (systemd's own start timeout then reports it).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = [
    "notify",
    "notify_ready",
    "notify_reloading",
    "notify_status",
    "notify_stopping",
    "notify_watchdog",
    "watchdog_interval",
]


def _socket_address(value: str) -> str | None:
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    # vsock: and relative paths are not used by any systemd we run under.
    return None


def _one_line(text: str) -> str:
    # A newline would start a new assignment: STATUS text must stay one line.
    return " ".join(text.splitlines())


def notify(*assignments: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``KEY=VALUE`` assignments to the service manager in one datagram.

    Returns True when the datagram was sent, False when ``NOTIFY_SOCKET`` is
    unset or unusable or the send failed.
    """
    env = os.environ if environ is None else environ
    address = _socket_address(env.get("NOTIFY_SOCKET", ""))
    if address is None or not assignments:
        return False
    payload = "\n".join(assignments).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(payload)
    except OSError:
        return False
    return True


def notify_ready(status: str | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """READY=1: the service listens (relay) or runs its loop (archiver)."""
    extra = [f"STATUS={_one_line(status)}"] if status else []
    return notify("READY=1", *extra, environ=environ)


def notify_reloading(environ: Mapping[str, str] | None = None) -> bool:
    """RELOADING=1 on SIGHUP; send notify_ready() when the reload is done."""
    return notify("RELOADING=1", environ=environ)


def notify_stopping(environ: Mapping[str, str] | None = None) -> bool:
    """STOPPING=1 when SIGTERM starts the drain."""
    return notify("STOPPING=1", environ=environ)


def notify_status(text: str, environ: Mapping[str, str] | None = None) -> bool:
    """STATUS=...: one line shown by ``systemctl status``."""
    return notify(f"STATUS={_one_line(text)}", environ=environ)


def notify_watchdog(environ: Mapping[str, str] | None = None) -> bool:
    """WATCHDOG=1: keep-alive ping, every watchdog_interval() seconds."""
    return notify("WATCHDOG=1", environ=environ)


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings, or None when no watchdog is armed.

    This is half of ``WatchdogSec`` (``$WATCHDOG_USEC``), the margin
    sd_watchdog_enabled(3) recommends. ``$WATCHDOG_PID``, when set, must be
    our pid: otherwise the variables were inherited from a parent.
    """
    env = os.environ if environ is None else environ
    usec_s = env.get("WATCHDOG_USEC", "")
    pid_s = env.get("WATCHDOG_PID", "")
    if not usec_s.isdigit() or int(usec_s) <= 0:
        return None
    if pid_s and (not pid_s.isdigit() or int(pid_s) != os.getpid()):
        return None
    return int(usec_s) / 2_000_000
