"""Progress for long commands (cat, verify): on a terminal only, never in pipes or logs."""

from __future__ import annotations

import sys
import time
from typing import IO


class Progress:
    """One self-overwriting status line on stderr when it is a terminal; otherwise silent."""

    def __init__(
        self, total: int, what: str, stream: IO[str] | None = None, interval: float = 0.2
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty()
        self.total = total
        self.what = what
        self.done = 0
        self.messages = 0
        self.bytes = 0
        self._interval = interval
        self._last = 0.0
        self._start = time.monotonic()

    def step(self, messages: int = 0, nbytes: int = 0) -> None:
        self.done += 1
        self.messages += messages
        self.bytes += nbytes
        now = time.monotonic()
        if self.enabled and (now - self._last >= self._interval or self.done == self.total):
            self._last = now
            rate = self.bytes / max(now - self._start, 1e-6) / 1e6
            self.stream.write(
                f"\r{self.what}: {self.done}/{self.total} chunks, {self.messages} messages, "
                f"{self.bytes / 1e6:.1f} MB ({rate:.1f} MB/s)\x1b[K"
            )
            self.stream.flush()

    def finish(self) -> None:
        if self.enabled and self._last:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
