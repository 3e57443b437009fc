"""``python -m bench.select``: the router alone, with and without selectors, on fleet traffic.

Feeds pre-framed 64 KiB chunks of a loadgen profile through Router.receive
(framing, hour scan, selection, loop-guard marks) into a sink that keeps
nothing, and reports µs of CPU per message for each configuration, best of
``--rounds``. No sockets, no disk: for measuring the selective path before
and after a change (the ``make bench`` row "fleet tcp octet 4 conn, 3
selectors" measures the whole relay).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC
from typing import Any

from bench.scan import chunks
from relay import config
from relay.formats.staging_block import Block
from relay.framing.rfc6587 import Framer
from relay.ops.metrics import Metrics
from relay.router import Router
from relay.selection import Selection

# The bench row's selectors (bench/receivers.py writes the same into relay.toml).
THREE_SELECTORS: dict[str, Any] = {
    "forward": [
        {
            "name": "security",
            "peers": ["127.0.0.1:9"],
            "select": {"any": [{"facility": ["auth", "authpriv"]}, {"severity": "warning"}]},
        },
        {"name": "web", "peers": ["127.0.0.1:9"], "select": {"host": "web-*"}},
    ],
    "drop": [{"name": "noisy", "select": {"app": "bench-noisy", "severity_below": "notice"}}],
}
TWO_OUTPUTS: dict[str, Any] = {
    "forward": [
        {"name": "security", "peers": ["127.0.0.1:9"]},
        {"name": "web", "peers": ["127.0.0.1:9"]},
    ]
}
CONFIGS: dict[str, dict[str, Any]] = {
    "staging only, no selectors": {},
    "2 outputs, no selectors": TWO_OUTPUTS,
    "2 outputs, 3 selectors": THREE_SELECTORS,
    "staging only, severity selector": {"staging": {"select": {"severity": "info"}}},
}


class _Null:
    def submit_chunk(
        self,
        hours: Mapping[int, list[Block]],
        forward: Sequence[bytes],
        now: float,
        on_durable: Callable[[], None] | None = None,
        sender: bytes = b"-",
        selected: Mapping[str, Sequence[bytes]] | None = None,
    ) -> None:
        pass


def measure(parts: list[bytes], raw: dict[str, Any], n: int, rounds: int) -> float:
    cfg = config.parse({"listen": [{"address": "127.0.0.1:0", "transport": "tcp"}], **raw})
    best = float("inf")
    for _ in range(rounds):
        router = Router(
            _Null(), Metrics(), UTC, 86400.0, time.time, "bench", forwarding=bool(cfg.forward)
        )
        sel = cfg.selectors
        router.select(None if sel is None else Selection(sel))
        framer = Framer("octet-counting", 65536)
        t = time.process_time()
        for part in parts:
            router.receive(framer, part, b"-", "tcp:0")
        best = min(best, time.process_time() - t)
    return best / n * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.select", description=__doc__.split("\n")[0])
    p.add_argument("-n", "--count", type=int, default=200_000)
    p.add_argument("--profile", default="fleet")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    parts = chunks(args.profile, "octet-counting", args.count)
    print(f"| configuration ({args.profile}) | µs/msg |\n|---|---:|")
    for name, raw in CONFIGS.items():
        us = measure(parts, raw, args.count, args.rounds)
        print(f"| {name} | {us:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
