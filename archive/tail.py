"""``syslog-archive tail [-f]``: the newest messages of local staging, then new ones.

Staging files in ``open/`` are read from their start (the last ``lines``
matching messages are kept), then, with ``follow``, polled for growth: a
complete block appended by the relay is printed, an incomplete one waits for
the next poll. A file renamed to ``closed/`` at the end of its hour is read to
its end through the descriptor already open; a new hour's file is picked up
when it appears. Everything is read through ``archive.reader`` like ``cat``.
"""

from __future__ import annotations

import collections
import sys
import time
from collections.abc import Callable
from datetime import tzinfo
from pathlib import Path
from typing import IO

from archive.query import Filter, run_json, run_text
from archive.reader import Run, decode_staging
from relay.disk import staging
from relay.formats.staging_block import MAX_RECORD_HEADER, RecordError

POLL = 0.5
_READ = 4 * 1024 * 1024


class _Followed:
    """One staging file: its descriptor and the bytes read but not yet decoded."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f: IO[bytes] = open(path, "rb")  # kept open while followed
        self.buf = bytearray()
        self.header_done = False

    def runs(self) -> list[Run]:
        """The complete runs appended since the last call."""
        while chunk := self.f.read(_READ):
            self.buf += chunk
        pos = 0
        if not self.header_done:
            nl = self.buf.find(b"\n")
            if nl < 0:
                if len(self.buf) > MAX_RECORD_HEADER:
                    raise RecordError(0, "no header line")
                return []
            pos = nl + 1
            self.header_done = True
        out: list[Run] = []
        gen = decode_staging(self.buf, pos)
        while True:
            try:
                out.append(next(gen))
            except StopIteration as stop:
                pos = stop.value
                break
        del self.buf[:pos]
        return out

    def close(self) -> None:
        self.f.close()


def tail(
    staging_dir: Path,
    flt: Filter,
    *,
    lines: int,
    follow: bool,
    as_json: bool,
    json_fields: Callable[[bytes, tzinfo, float], dict[str, object]] | None,
    polls: int | None = None,
) -> int:
    """Print the last ``lines`` messages of ``staging_dir/open``, then follow it.

    ``polls`` bounds the follow loop (tests); None follows until interrupted.
    """
    out = sys.stdout.buffer
    open_dir = staging.open_dir(staging_dir)
    followed: dict[str, _Followed] = {}
    status = 0

    def text(run: Run, where: Path) -> bytes:
        if as_json:
            return run_json(run, flt, True, f"staging:{where}", json_fields)
        return run_text(run, flt, True, None)

    def scan(first: bool) -> list[bytes]:
        nonlocal status
        pieces: list[bytes] = []
        try:
            names = staging.file_names(open_dir)
        except OSError:
            names = []
        for name in names:
            if name not in followed:
                try:
                    followed[name] = _Followed(open_dir / name)
                except OSError:
                    continue  # renamed to closed/ between listing and opening
        for name, fol in list(followed.items()):
            try:
                pieces += [text(r, fol.path) for r in fol.runs()]
            except RecordError as exc:
                print(f"syslog-archive: {fol.path}: damaged: {exc}", file=sys.stderr)
                status = 1
                fol.close()
                del followed[name]
                continue
            if name not in names and not first:
                fol.close()  # closed by the relay and read to its end
                del followed[name]
        return [p for p in pieces if p]

    last: collections.deque[bytes] = collections.deque(maxlen=max(0, lines))
    for piece in scan(True):
        for line in piece.splitlines(keepends=True):
            last.append(line)
    out.write(b"".join(last))
    out.flush()
    n = 0
    while follow and (polls is None or n < polls):
        time.sleep(POLL)
        n += 1
        for piece in scan(False):
            out.write(piece)
        out.flush()
    for fol in followed.values():
        fol.close()
    return status
