"""Both ends of the link and the ledger under random reconnects, commits and crashes
(Hypothesis state machine, sans-IO): every record is stored exactly once.

The model: a sender with records 1..N and its acknowledged position; a receiver whose
durable writer stores admitted records at once (page cache) and makes them durable at
``commit``; connections that drop at any point; a receiver that is killed -9 (page cache
and ledger entries survive: the ledger recovers the written position) or loses power
(what was not committed is gone, and the ledger recovers the committed position).
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from relay.link.ledger import Ledger
from relay.link.protocol import build_batch
from relay.link.session import Acked, BatchReceived, Opened, ReceiverSession, SenderSession

N = 12
KEY = ("edge", 1)


class LinkMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.acked = 0  # the sender's spool: everything up to here was acknowledged
        self.sender: SenderSession | None = None
        self.receiver: ReceiverSession | None = None
        self.ledger = Ledger()
        self.stored: list[int] = []  # record seqs in staging (page cache included)
        self.durable = 0  # len(stored) that is fsynced
        self.pending: list[int] = []  # batch seqs written, waiting for the commit
        self.written_upto = 0  # the ledger's written entry (follows the data)
        self.conn = 0

    # --- connections

    @precondition(lambda self: self.sender is None)
    @rule()
    def connect(self) -> None:
        self.conn += 1
        s = SenderSession("edge", KEY[1], ("zstd", "none"), window=3, max_raw=1 << 20)
        r = ReceiverSession("core", ("zstd",), 3, 1 << 20, 1 << 20, max_hops=8)
        (ev,) = r.feed(s.hello())
        assert isinstance(ev, Opened)
        s.feed(r.welcome(self.ledger.committed(KEY)))
        assert s.welcome is not None
        # Records the receiver committed count as delivered; the rest are sent again.
        self.acked = max(self.acked, s.welcome.committed)
        s.start_after(self.acked)
        self.sender, self.receiver = s, r

    @precondition(lambda self: self.sender is not None)
    @rule()
    def drop(self) -> None:
        self.sender = self.receiver = None

    # --- traffic

    @precondition(lambda self: self.sender is not None and self.sender.can_send())
    @rule(n=st.integers(1, 4))
    def send(self, n: int) -> None:
        s, r = self.sender, self.receiver
        assert s is not None and r is not None
        first = s.last_sent + 1
        seqs = [q for q in range(first, first + n) if q <= N]
        if not seqs:
            return
        frame = build_batch([(q, b"1 x") for q in seqs], (b"edge",), s.codec, 1).frame
        s.sent(seqs[-1])
        for ev in r.feed(frame):
            assert isinstance(ev, BatchReceived)
            fresh = self.ledger.admit(KEY, ev.records)
            if fresh:
                self.stored += [q for q, _ in fresh]
                self.pending.append(ev.header.seq)
                self.written_upto = ev.header.seq
            conn, seq = self.conn, ev.header.seq
            self.ledger.when_committed(KEY, seq, lambda c=conn, q=seq: self._ack(c, q))

    def _ack(self, conn: int, seq: int) -> None:
        if conn != self.conn or self.sender is None or self.receiver is None:
            return  # that connection is gone
        for ev in self.sender.feed(self.receiver.ack(seq)):
            assert isinstance(ev, Acked)
            self.acked = max(self.acked, ev.seq)

    @rule()
    def commit(self) -> None:
        self.durable = len(self.stored)
        pending, self.pending = self.pending, []
        for seq in pending:
            self.ledger.durable(KEY, seq)

    # --- crashes of the receiver

    @rule()
    def kill_9(self) -> None:
        # Page cache survives: data and the written entries; the ledger restarts from them.
        self.sender = self.receiver = None
        self.durable = len(self.stored)
        self.pending = []
        self.ledger = Ledger({KEY: self.written_upto})

    @rule()
    def power_loss(self) -> None:
        self.sender = self.receiver = None
        del self.stored[self.durable :]
        self.pending = []
        committed = self.ledger.committed(KEY)
        self.written_upto = committed
        self.ledger = Ledger({KEY: committed})

    # --- what must hold

    @invariant()
    def never_twice(self) -> None:
        assert len(self.stored) == len(set(self.stored)), self.stored

    @invariant()
    def acked_means_durable(self) -> None:
        assert set(range(1, self.acked + 1)) <= set(self.stored[: self.durable])

    def teardown(self) -> None:
        # Drain: reconnect, send everything, commit, until the sender has all acks.
        for _ in range(4 * N):
            if self.acked >= N:
                break
            if self.sender is None:
                self.connect()
            while self.sender is not None and self.sender.can_send():
                before = self.sender.last_sent
                self.send(4)
                if self.sender.last_sent == before:
                    break
            self.commit()
        assert self.acked == N
        assert sorted(self.stored) == list(range(1, N + 1))


LinkMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
TestLink = LinkMachine.TestCase
