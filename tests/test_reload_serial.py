"""relay.reload.Coalescer: one reload at a time, requests during one become one more."""

from __future__ import annotations

from twisted.internet import defer

from relay.reload import Coalescer


def test_requests_during_a_run_become_one_more_run() -> None:
    runs: list[defer.Deferred[None]] = []

    def action() -> defer.Deferred[None]:
        d: defer.Deferred[None] = defer.Deferred()
        runs.append(d)
        return d

    c = Coalescer(action)
    c.request()
    assert len(runs) == 1 and c.running
    for _ in range(5):
        c.request()  # while the first runs: coalesced
    assert len(runs) == 1
    runs[0].callback(None)
    assert len(runs) == 2 and c.running  # exactly one more
    runs[1].callback(None)
    assert len(runs) == 2 and not c.running
    c.request()
    assert len(runs) == 3


def test_a_failed_or_synchronous_run_does_not_block_the_next() -> None:
    calls: list[int] = []

    def action() -> defer.Deferred[None]:
        calls.append(1)
        if len(calls) == 1:
            return defer.fail(RuntimeError("reload failed"))
        return defer.succeed(None)

    c = Coalescer(action)
    c.request()
    c.request()
    assert calls == [1, 1] and not c.running


def test_a_request_made_by_a_synchronous_run_is_run_after_it_not_inside_it() -> None:
    depth: list[int] = []
    active = [0]

    def action() -> None:
        active[0] += 1
        depth.append(active[0])
        if len(depth) < 50:
            c.request()  # a SIGHUP handled while this one runs
        active[0] -= 1

    c = Coalescer(action)
    c.request()
    assert len(depth) == 50 and max(depth) == 1 and not c.running
