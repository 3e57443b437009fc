"""``python -m bench.scan``: the hot path's framing + hour scan alone, per traffic profile.

Feeds pre-framed chunks of each loadgen profile through the relay's Framer
(relay.framing.hour_runs behind it) and reports µs per message and the share of messages
that reached the full reader. No sockets, no receivers: for measuring a
change to the fast path before and after (``make bench`` measures the whole
relay against rsyslog).
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC

from relay.framing.hour_runs import HourIndex
from relay.framing.rfc6587 import Framer
from relay.tools import fleet, loadgen

CHUNK = 64 * 1024  # what one socket read gives the reactor under load


def chunks(profile: str, framing: str, n: int, size: int = 0) -> list[bytes]:
    spec = loadgen.LoadSpec(profile=profile, count=n, size=size, framing=framing)
    msgs = loadgen.generate(spec, 0, range(n))
    data = loadgen.frame(msgs, framing)
    return [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]


def measure(parts: list[bytes], framing: str, n: int, rounds: int = 5) -> tuple[float, float]:
    """(best µs per message, share of messages sent to the full reader)."""
    best = float("inf")
    slow = 0
    for _ in range(rounds):
        index = HourIndex(UTC, 3600.0)
        index.at(time.time())
        calls = 0
        classify = index.classify

        def counted(msg: bytes, classify: object = classify) -> tuple[int, bytes]:
            nonlocal calls
            calls += 1
            return classify(msg)  # type: ignore[operator, no-any-return]

        index.classify = counted  # type: ignore[method-assign]
        framer = Framer("octet-counting" if framing == "octet-counting" else "lf", 65536)
        t = time.process_time()
        for part in parts:
            framer.feed_runs(part, index)
        best = min(best, time.process_time() - t)
        slow = calls
    return best / n * 1e6, slow / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scan", description=__doc__.split("\n")[0])
    p.add_argument("-n", "--count", type=int, default=200_000)
    p.add_argument("--profiles", default=",".join(fleet.PROFILES))
    args = p.parse_args(argv)
    print("| profile | framing | µs/msg | to the full reader |\n|---|---|---:|---:|")
    for profile in args.profiles.split(","):
        for framing in ("octet-counting", "lf"):
            parts = chunks(profile, framing, args.count)
            us, slow = measure(parts, framing, args.count)
            print(f"| {profile} | {framing} | {us:.2f} | {slow:.1%} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
