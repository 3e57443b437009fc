"""ForwardOutput without sockets: failover order, failback, balance, backoff, drops.

The output runs on a ``PeerReactor`` (a Clock whose ``connectTCP`` only records
the attempt), with a seeded random source and a real spool; the test accepts or
refuses each connection attempt. Plain TCP outputs are used (RELP only for its
``ack_timeout``): their records settle by wall time here (``StringTransport``
has no socket to ask), i.e. one ``TCP_SETTLE`` after they were written, on the
Clock.

Every test ends through the ``make`` fixture's teardown: the output is stopped,
and nothing may be left behind (no delayed call, no open connection, no
connection attempt still running).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure

from relay.config import ForwardConfig
from relay.disk.spool import Spool
from relay.formats import octet
from relay.formats.staging_block import FRAMING_OCTET, split_payload
from relay.forward.outputs import TCP_SETTLE, ForwardOutput, Peer
from relay.ops.metrics import Metrics
from relay.relp.session import Messages, Open, ServerSession
from tests.support.fakepeers import (
    ATTEMPT_DELAY,
    Attempt,
    PeerReactor,
    PeerTransport,
    SyncPool,
    assert_no_pending_calls,
)

A, B, C = "192.0.2.1", "192.0.2.2", "192.0.2.3"
PORT = 6514


class Fixed(random.Random):
    """A random source that always draws ``r``: the jitter's edges."""

    def __init__(self, r: float) -> None:
        super().__init__(0)
        self.r = r

    def random(self) -> float:
        return self.r


class Output:
    """One tcp ``[[forward]]`` output on a PeerReactor, with its spool."""

    def __init__(self, directory: Path, rng: random.Random, **cfg: Any) -> None:
        self.reactor = PeerReactor()
        self.spool = Spool(directory, 1024**2)
        self.spool.open()
        self.metrics = Metrics()
        hosts = cfg.pop("hosts", (A, B, C))
        self.cfg = ForwardConfig(
            name="out",
            peers=tuple((h, PORT) for h in hosts),
            **{
                "transport": "tcp",
                "reconnect_min": 1.0,
                "reconnect_max": 8.0,
                "failback_interval": 30.0,
                **cfg,
            },
        )
        self.out = ForwardOutput(self.cfg, self.spool, self.reactor, self.metrics, rng=rng)
        # Spool calls run inline instead of in the output's thread.
        self.pool = SyncPool()
        self.out.pool = self.out.feeder.pool = self.pool  # type: ignore[assignment]
        self.sent: list[bytes] = []
        self.records = 0
        self.first_seq = self.spool.acked_seq  # acknowledged before any record of the test
        self.stopped = False

    def start(self) -> None:
        self.out.startService()
        self.reactor.advance(0)

    def append(self, n: int, per_record: int = 1) -> list[bytes]:
        """``n`` records of ``per_record`` messages each; returns the messages."""
        msgs: list[bytes] = []
        for _ in range(n):
            batch = [b"<14>1 - h app - - - m%04d" % (len(self.sent) + k) for k in range(per_record)]
            self.sent += batch
            msgs += batch
            self.spool.append([octet.encode_many(batch)], 1.0)
            self.records += 1
        self.spool.sync()
        self.out.feeder.notify()
        return msgs

    def peer(self, host: str) -> Peer:
        return next(p for p in self.out.peers if p.host == host)

    def pending(self, host: str) -> Attempt:
        """The connection attempt to ``host`` now in progress."""
        live = [a for a in self.reactor.to(host) if a.pending]
        assert len(live) == 1, f"{host}: {len(live)} attempts in progress"
        return live[0]

    def hosts_tried(self) -> list[str]:
        return [a.host for a in self.reactor.attempts]

    def delivered_messages(self) -> int:
        return self.out.feeder.delivered

    def acked_records(self) -> int:
        """Records the spool was told are delivered (they leave it)."""
        return self.spool.acked_seq - self.first_seq

    def settle(self) -> None:
        """Let every record written so far settle and its acknowledgement reach the spool."""
        self.reactor.elapse(TCP_SETTLE + 0.2)

    def stop(self) -> None:
        if self.stopped or not self.out.running:
            return
        self.stopped = True
        done: list[object] = []
        self.out.stopService().addBoth(done.append)
        self.reactor.elapse(1.0)
        assert done == [None]
        assert self.pool.stopped


def messages(transport: PeerTransport) -> list[bytes]:
    return split_payload(transport.value(), FRAMING_OCTET)


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Output]]:
    made: list[Output] = []

    def new(seed: int = 7, rng: random.Random | None = None, **cfg: Any) -> Output:
        o = Output(tmp_path / f"spool{len(made)}", rng or random.Random(seed), **cfg)
        made.append(o)
        return o

    yield new
    for o in made:
        o.stop()
        attempts = o.reactor.attempts
        assert not [a.host for a in attempts if a.pending], "connection attempts left running"
        assert all(a.transport.lost for a in attempts if a.transport), "connections left open"
        assert_no_pending_calls(o.reactor)
        o.spool.close()


# --- failover


def test_failover_tries_the_peers_in_order_one_at_a_time(make: Callable[..., Output]) -> None:
    o = make()
    o.append(3)
    o.start()
    assert o.hosts_tried() == [A]
    o.reactor.elapse(5)  # A neither answers nor fails: nobody else is tried meanwhile
    assert o.hosts_tried() == [A]
    o.pending(A).refuse()
    o.reactor.elapse(0.1)
    assert o.hosts_tried() == [A, B]
    o.pending(B).refuse()
    o.reactor.elapse(0.1)
    assert o.hosts_tried() == [A, B, C]
    t = o.pending(C).accept()
    assert messages(t) == o.sent
    assert o.out.healthy_peers == [f"{C}:{PORT}"]
    assert o.metrics.get("forward_retries_total", output="out", peer=f"{A}:{PORT}") == 1
    assert o.metrics.get("forward_retries_total", output="out", peer=f"{B}:{PORT}") == 1
    assert o.metrics.get("forward_connects_total", output="out", peer=f"{C}:{PORT}") == 1


def test_failover_sends_everything_through_the_first_healthy_peer(
    make: Callable[..., Output],
) -> None:
    o = make()
    o.append(2, per_record=3)
    o.start()
    t = o.pending(A).accept()
    o.append(4)
    o.reactor.advance(0)
    o.settle()
    assert messages(t) == o.sent
    assert o.hosts_tried() == [A]  # the others are never tried while A works
    assert o.delivered_messages() == len(o.sent) == 10
    assert o.acked_records() == o.records == 6  # acknowledged in the spool


def test_a_peer_that_is_backing_off_is_skipped_for_the_next_one(
    make: Callable[..., Output],
) -> None:
    o = make()
    o.start()
    o.pending(A).refuse()
    o.reactor.elapse(0.1)
    tb = o.pending(B).accept()
    tb.drop()  # B fails too: A is still backing off, so C is next, not A
    o.reactor.elapse(0.1)
    assert o.hosts_tried() == [A, B, C]
    o.pending(C).refuse()
    # Everyone is backing off now: the first one whose backoff ends is tried.
    retry = min(o.out.peers, key=lambda p: p.retry_at)
    o.reactor.elapse(retry.retry_at - o.reactor.seconds() + 0.06)
    assert o.hosts_tried()[3:] == [retry.host]


# --- a peer that connects, then drops


@pytest.mark.parametrize(
    "reason, failovers",
    [(ConnectionLost(), 1), (ConnectionDone(), 0)],
    ids=["lost", "closed-cleanly"],
)
def test_a_peer_that_connects_then_drops_hands_its_records_to_the_next(
    make: Callable[..., Output], reason: Exception, failovers: int
) -> None:
    o = make()
    o.append(3, per_record=2)
    o.start()
    ta = o.pending(A).accept()
    assert messages(ta) == o.sent
    o.reactor.elapse(TCP_SETTLE / 2)  # written, not yet settled
    ta.drop(Failure(reason))
    assert o.delivered_messages() == 0  # nothing that was in flight counts as delivered
    assert o.metrics.get("forward_replayed_total", output="out") == 6
    assert o.metrics.get("forward_failovers_total", output="out", peer=f"{A}:{PORT}") == failovers
    assert o.out.healthy_peers == []
    o.reactor.elapse(0.1)
    assert o.hosts_tried() == [A, B]  # A backs off even after a clean close
    tb = o.pending(B).accept()
    assert messages(tb) == o.sent  # the lost records first, whole, in order
    o.settle()
    assert o.delivered_messages() == 6  # counted once, by B
    assert o.acked_records() == 3


def test_records_settled_before_a_drop_are_not_sent_again(make: Callable[..., Output]) -> None:
    o = make(hosts=(A, B))
    first = o.append(2)
    o.start()
    ta = o.pending(A).accept()
    o.settle()
    later = o.append(2)
    o.reactor.advance(0)
    assert messages(ta) == first + later
    ta.drop()
    assert o.delivered_messages() == 2
    o.reactor.elapse(0.1)
    tb = o.pending(B).accept()
    assert messages(tb) == later


# --- failback


def test_failback_tries_the_first_peer_every_failback_interval_then_moves_to_it(
    make: Callable[..., Output],
) -> None:
    o = make(hosts=(A, B), failback_interval=30.0, reconnect_max=4.0)
    o.append(2)
    o.start()
    o.pending(A).refuse()
    o.reactor.elapse(0.1)
    tb = o.pending(B).accept()
    assert messages(tb) == o.sent
    # While B works, A is tried again (and refused) now and then.
    tries: list[float] = []
    end = o.reactor.seconds() + 125
    while o.reactor.seconds() < end:
        o.reactor.advance(0.05)
        for a in o.reactor.to(A):
            if a.pending:
                tries.append(a.at)
                a.refuse()
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    assert len(gaps) >= 3
    assert all(30.0 <= g < 30.0 + 0.2 for g in gaps), gaps
    assert not tb.disconnecting and o.out.healthy_peers == [f"{B}:{PORT}"]
    assert o.metrics.get("forward_failbacks_total", output="out") == 0
    # The next time A answers, the output moves to it and closes B.
    o.append(1)
    o.reactor.advance(0)
    o.reactor.elapse(30.2, step=0.05)
    ta = o.pending(A).accept()
    assert o.metrics.get("forward_failbacks_total", output="out") == 1
    assert tb.disconnecting
    o.reactor.advance(0)
    assert tb.lost and o.out.healthy_peers == [f"{A}:{PORT}"]
    o.append(2)
    o.reactor.advance(0)
    # B's records had settled; new ones go to A only.
    assert messages(ta) == o.sent[3:]
    assert messages(tb) == o.sent[:3]


def test_while_on_a_worse_peer_the_output_wakes_only_to_fail_back(
    make: Callable[..., Output],
) -> None:
    # A's backoff (at most 4 s) ends long before the next fail back (30 s): the output
    # sleeps until then instead of looking again every 50 ms.
    o = make(hosts=(A, B), failback_interval=30.0, reconnect_max=4.0)
    o.start()
    o.pending(A).refuse()
    o.reactor.elapse(0.1)
    o.pending(B).accept()
    wakes: list[float] = []
    evaluate = o.out._evaluate

    def counted() -> None:
        wakes.append(o.reactor.seconds())
        evaluate()

    o.out._evaluate = counted  # type: ignore[method-assign]
    end = o.reactor.seconds() + 95
    while o.reactor.seconds() < end:
        o.reactor.advance(0.05)
        for a in o.reactor.to(A):
            if a.pending:
                a.refuse()
    assert 3 <= len(wakes) <= 8, wakes  # one per fail back (and per refusal), not ~1,900


def test_failback_resends_what_the_retired_peer_had_not_settled(
    make: Callable[..., Output],
) -> None:
    o = make(hosts=(A, B), failback_interval=30.0)
    o.start()
    o.pending(A).refuse()
    o.reactor.elapse(0.1)
    tb = o.pending(B).accept()
    o.reactor.elapse(35, step=0.05)  # A's backoff is over and so is the failback interval
    o.append(3)
    o.reactor.advance(0)
    assert messages(tb) == o.sent  # unsettled on B when A comes back
    ta = o.pending(A).accept()
    o.reactor.advance(0)
    assert tb.lost
    assert messages(ta) == o.sent
    o.settle()
    assert o.delivered_messages() == 3


# --- balance


def test_balance_connects_every_peer_and_spreads_the_records(make: Callable[..., Output]) -> None:
    o = make(mode="balance", window=1)
    o.append(30)
    o.start()
    assert sorted(o.hosts_tried()) == [A, B, C]  # all at once, none waiting for another
    ts = [o.pending(h).accept() for h in (A, B, C)]
    o.reactor.advance(0)
    got = [messages(t) for t in ts]
    assert all(len(g) >= 5 for g in got), [len(g) for g in got]
    assert sorted(m for g in got for m in g) == o.sent  # each record once
    assert all(g == sorted(g) for g in got)  # in order per connection
    assert sorted(o.out.healthy_peers) == [f"{h}:{PORT}" for h in (A, B, C)]


def test_balance_retries_a_dropped_peer_while_the_others_carry_its_records(
    make: Callable[..., Output],
) -> None:
    o = make(mode="balance", window=1)
    o.start()
    ta, tb, tc = (o.pending(h).accept() for h in (A, B, C))
    o.append(9)
    o.reactor.advance(0)
    on_b = messages(tb)
    assert on_b
    tb.drop()
    o.reactor.advance(0)
    resent = messages(ta)[3:] + messages(tc)[3:]
    assert sorted(resent) == on_b  # B's unsettled records went to A and C
    peer_b = o.peer(B)
    o.reactor.elapse(peer_b.retry_at - o.reactor.seconds() - 0.02)
    assert o.hosts_tried().count(B) == 1  # not before its backoff ends
    o.reactor.elapse(0.1)
    assert o.hosts_tried().count(B) == 2
    assert o.hosts_tried().count(A) == o.hosts_tried().count(C) == 1
    o.pending(B).accept()
    o.settle()
    assert o.delivered_messages() == 9


def test_balance_does_not_wait_for_a_refusing_peer(make: Callable[..., Output]) -> None:
    o = make(mode="balance", hosts=(A, B))
    o.append(4)
    o.start()
    o.pending(A).refuse()
    tb = o.pending(B).accept()
    assert messages(tb) == o.sent
    o.settle()
    assert o.delivered_messages() == 4


# --- backoff


def refusals(o: Output, host: str, n: int) -> list[tuple[float, float]]:
    """Refuse ``n`` attempts in a row; (delay until the next attempt, its base) each."""
    out: list[tuple[float, float]] = []
    peer = o.peer(host)
    cfg = o.cfg
    for k in range(1, n + 1):
        o.pending(host).refuse()
        failed_at = o.reactor.seconds()
        delay = peer.retry_at - failed_at
        out.append((delay, min(cfg.reconnect_max, cfg.reconnect_min * 2 ** (k - 1))))
        # The next attempt comes when the delay is over, not before.
        tries = len(o.reactor.to(host))
        o.reactor.elapse(delay - 0.02, step=0.05)
        assert len(o.reactor.to(host)) == tries
        o.reactor.elapse(0.04)
        assert len(o.reactor.to(host)) == tries + 1
    return out


def test_backoff_doubles_from_reconnect_min_to_reconnect_max_with_jitter(
    make: Callable[..., Output],
) -> None:
    o = make(seed=3, hosts=(A,), reconnect_min=1.0, reconnect_max=8.0)
    o.start()
    got = refusals(o, A, 7)
    bases = [base for _, base in got]
    assert bases == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 8.0]
    for delay, base in got:
        assert base / 2 <= delay <= base  # jitter: 50-100 % (docs/forwarding.md)
    ratios = {round(delay / base, 9) for delay, base in got}
    assert len(ratios) == len(got)  # each delay drew its own jitter
    # The jitter comes from the injected source: the same seed, the same delays.
    again = make(seed=3, hosts=(A,), reconnect_min=1.0, reconnect_max=8.0)
    again.start()
    assert [d for d, _ in refusals(again, A, 7)] == pytest.approx([d for d, _ in got])
    assert o.metrics.get("forward_retries_total", output="out", peer=f"{A}:{PORT}") == 7


@pytest.mark.parametrize("r, ratio", [(0.0, 0.5), (1.0 - 2**-53, 1.0)], ids=["low", "high"])
def test_backoff_jitter_edges(make: Callable[..., Output], r: float, ratio: float) -> None:
    o = make(rng=Fixed(r), hosts=(A,), reconnect_min=2.0, reconnect_max=5.0)
    o.start()
    got = refusals(o, A, 3)
    assert [base for _, base in got] == [2.0, 4.0, 5.0]
    assert [delay for delay, _ in got] == pytest.approx([ratio * b for _, b in got])


def test_backoff_starts_over_after_a_connection(make: Callable[..., Output]) -> None:
    o = make(rng=Fixed(0.0), hosts=(A,), reconnect_min=1.0, reconnect_max=60.0)
    o.start()
    assert [d for d, _ in refusals(o, A, 4)] == pytest.approx([0.5, 1.0, 2.0, 4.0])
    ta = o.pending(A).accept()
    o.reactor.elapse(10)
    ta.drop()
    assert o.peer(A).retry_at - o.reactor.seconds() == pytest.approx(0.5)


# --- stopping


def test_stop_closes_the_connection_and_keeps_unsettled_records(
    make: Callable[..., Output],
) -> None:
    o = make(hosts=(A,))
    o.append(3)
    o.start()
    ta = o.pending(A).accept()
    o.stop()
    assert ta.lost
    assert o.delivered_messages() == 0
    assert o.acked_records() == 0  # still in the spool for the next start
    assert o.reactor.to(A) == [o.reactor.attempts[0]]  # no reconnect after the stop


def test_stop_while_connecting_abandons_the_attempt(make: Callable[..., Output]) -> None:
    o = make(hosts=(A, B))
    o.append(1)
    o.start()
    attempt = o.pending(A)
    o.stop()
    assert not attempt.pending
    assert o.hosts_tried() == [A]


def test_stop_while_backing_off_schedules_no_retry(make: Callable[..., Output]) -> None:
    o = make(hosts=(A,))
    o.start()
    o.pending(A).refuse()
    o.stop()
    o.reactor.elapse(o.cfg.reconnect_max + ATTEMPT_DELAY)
    assert o.hosts_tried() == [A]


# --- RELP: a peer that connects and then answers nothing


class RelpPeer:
    """The far end of an accepted connection, answering as a RELP server (sans-IO session)."""

    def __init__(self, transport: PeerTransport) -> None:
        self.transport = transport
        self.session = ServerSession(max_data=128 * 1024)
        self.seen = 0
        self.messages: list[bytes] = []

    def answer(self) -> None:
        """Read what the output wrote since the last call; answer open and every message."""
        data = self.transport.value()[self.seen :]
        self.seen += len(data)
        acks = b""
        for event in self.session.feed(data):
            if isinstance(event, Messages):
                self.messages += [m for _, m in event.messages]
                acks += self.session.ack([t for t, _ in event.messages])
            else:
                assert isinstance(event, Open), event
        out = self.session.data_to_send() + acks
        if out:
            self.transport.protocol.dataReceived(out)


def test_a_silent_relp_peer_is_abandoned_after_ack_timeout_for_the_next(
    make: Callable[..., Output],
) -> None:
    o = make(hosts=(A, B), transport="relp", ack_timeout=5.0)
    o.append(2, per_record=2)
    o.start()
    ta = o.pending(A).accept()
    assert b" open " in ta.value()  # the session opens; A never answers
    o.reactor.elapse(4.9)
    assert not ta.disconnecting
    o.reactor.elapse(0.2)
    assert ta.lost
    assert o.metrics.get("relp_ack_timeouts_total", output="out") == 1
    assert o.metrics.get("forward_failovers_total", output="out", peer=f"{A}:{PORT}") == 1
    o.reactor.elapse(0.1)
    assert o.hosts_tried() == [A, B]
    peer = RelpPeer(o.pending(B).accept())
    peer.answer()  # open answered: the messages follow
    peer.answer()  # and are acknowledged
    assert peer.messages == o.sent
    o.reactor.elapse(0.1)
    assert o.delivered_messages() == 4 and o.acked_records() == 2
