"""Counters and gauges kept in the process; the metrics endpoint (issue 7) exposes them.

Deliberately tiny and reactor-thread only: the hot path increments plain
dict entries, so counting costs next to nothing.
"""

from __future__ import annotations

from collections import defaultdict


class Metrics:
    def __init__(self) -> None:
        self.counters: defaultdict[tuple[str, tuple[tuple[str, str], ...]], int] = defaultdict(int)

    def inc(self, name: str, n: int = 1, **labels: str) -> None:
        self.counters[(name, tuple(sorted(labels.items())))] += n

    def get(self, name: str, **labels: str) -> int:
        """Sum of ``name`` over every label set that contains ``labels``."""
        want = set(labels.items())
        return sum(v for (k, lab), v in self.counters.items() if k == name and want <= set(lab))

    def snapshot(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (name, labels), value in sorted(self.counters.items()):
            key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else "")
            out[key] = value
        return out
