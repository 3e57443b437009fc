"""A stand-in for the reactor's thread hand-off, for testing thread-owning objects.

``callFromThread`` queues calls; ``pump_until`` runs them in the test's thread
until a condition holds, bounded in time.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from typing import Any


class ThreadReactor:
    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[
            tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]
        ] = queue.SimpleQueue()

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kw: Any) -> None:
        self.calls.put((f, args, kw))

    def seconds(self) -> float:
        return time.time()

    def pump_until(self, cond: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached in time")
            try:
                f, args, kw = self.calls.get(timeout=0.05)
            except queue.Empty:
                continue
            f(*args, **kw)
