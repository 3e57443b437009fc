"""Rate-limited logging for per-connection events.

A flood of bad clients must not become a flood of log lines: each kind of
event logs at most ``burst`` lines per ``period`` and then one summary of how
many were suppressed. Counters still count every event.
"""

from __future__ import annotations

from collections.abc import Callable


class RateLimiter:
    def __init__(self, clock: Callable[[], float], burst: int = 10, period: float = 10.0) -> None:
        self._clock = clock
        self._burst = burst
        self._period = period
        self._windows: dict[str, tuple[float, int, int]] = {}  # key -> (start, logged, suppressed)

    def allow(self, key: str) -> tuple[bool, int]:
        """(log this one?, how many were suppressed since the last line logged for ``key``)."""
        now = self._clock()
        start, logged, suppressed = self._windows.get(key, (now, 0, 0))
        if now - start >= self._period:
            start, logged = now, 0
        if logged < self._burst:
            self._windows[key] = (start, logged + 1, 0)
            return True, suppressed
        self._windows[key] = (start, logged, suppressed + 1)
        return False, 0
