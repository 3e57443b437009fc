"""Datagrams the kernel dropped on a UDP socket, from ``/proc/net/udp`` and ``udp6``.

A datagram that finds the socket's receive buffer full is dropped by the kernel
before the relay could see it; Linux counts these per socket (the ``drops``
column). Reading the column by the socket's inode costs one small file read per
scrape and needs no change to how datagrams are received (``SO_RXQ_OVFL``
would need ``recvmsg`` and its ancillary data on the hot path).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["drops_by_inode", "socket_drops"]

PROC_NET = Path("/proc/net")
_INODE, _DROPS = 9, 12  # columns of /proc/net/udp: ... timeout inode ref pointer drops


def drops_by_inode(text: str) -> dict[int, int]:
    """``{inode: drops}`` from the text of /proc/net/udp (or udp6); bad lines are skipped."""
    out: dict[int, int] = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) <= _DROPS:
            continue
        try:
            out[int(fields[_INODE])] = int(fields[_DROPS])
        except ValueError:
            continue
    return out


def socket_drops(fileno: int, proc_net: Path = PROC_NET) -> int | None:
    """Drops counted by the kernel for the UDP socket ``fileno``; None when unknown
    (not Linux, no procfs, or the socket is not listed)."""
    try:
        inode = os.fstat(fileno).st_ino
    except OSError:
        return None
    for name in ("udp", "udp6"):
        try:
            text = (proc_net / name).read_text()
        except OSError:
            continue
        n = drops_by_inode(text).get(inode)
        if n is not None:
            return n
    return None
