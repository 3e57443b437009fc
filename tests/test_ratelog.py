from __future__ import annotations

from relay.ops.log_rate_limit import RateLimiter


def test_burst_then_suppressed_then_summary() -> None:
    now = [0.0]
    rl = RateLimiter(lambda: now[0], burst=3, period=10)
    assert [rl.allow("k")[0] for _ in range(5)] == [True, True, True, False, False]
    assert rl.allow("other") == (True, 0)
    now[0] = 10.0
    assert rl.allow("k") == (True, 2)  # the next line says how many were suppressed
    assert rl.allow("k") == (True, 0)
