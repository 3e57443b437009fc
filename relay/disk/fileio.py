"""Small file helpers shared by the staging store and the spool."""

from __future__ import annotations

import os
from pathlib import Path


def write_all(fd: int, data: bytes) -> None:
    """write(2) until all of ``data`` is written (a regular file may take it in parts)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


# Linux's IOV_MAX; os.writev refuses longer lists.
_IOV_MAX = 1024


def writev_all(fd: int, buffers: list[bytes | memoryview]) -> int:
    """writev(2) until every buffer is written; returns the bytes written.

    The kernel copies straight from the buffers (no join in Python, and the GIL
    is released meanwhile); a regular file may take them in parts.
    """
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    total = 0
    i = 0
    while i < len(views):
        n = os.writev(fd, views[i : i + _IOV_MAX])
        total += n
        while i < len(views) and n >= len(views[i]):
            n -= len(views[i])
            i += 1
        if n:
            views[i] = views[i][n:]
    return total


def fsync_dir(path: Path) -> None:
    """Make a create, rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def truncate_synced(path: Path, size: int) -> str:
    """Cut ``path`` to ``size`` bytes and fsync it, if it is longer; returns what was done."""
    try:
        now = path.stat().st_size
    except FileNotFoundError:
        return ""
    if now <= size:
        return ""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)
    return f"cut {path} from {now} to {size} bytes"
