"""relay.link.session and relay.link.ledger: the state machines of both ends (pure)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.link import wire
from relay.link.ledger import ENTRY_SIZE, CommitLog, Ledger
from relay.link.protocol import build_batch, count_messages
from relay.link.session import (
    Acked,
    BatchReceived,
    Opened,
    ReceiverSession,
    Refused,
    SenderSession,
    WelcomeReceived,
)
from relay.link.wire import WireError


def pair(
    window: int = 4, codecs: tuple[str, ...] = ("zstd", "none"), committed: int = 0
) -> tuple[SenderSession, ReceiverSession]:
    s = SenderSession("edge", 77, codecs, window=8, max_raw=1 << 20)
    r = ReceiverSession("core", ("zstd", "none"), window, 1 << 20, 1 << 20, max_hops=4)
    (ev,) = r.feed(s.hello())
    assert isinstance(ev, Opened) and ev.hello.relay_id == "edge" and ev.hello.epoch == 77
    (w,) = s.feed(r.welcome(committed))
    assert isinstance(w, WelcomeReceived)
    return s, r


def send(
    s: SenderSession, recs: list[tuple[int, bytes]], path: tuple[bytes, ...] = (b"edge",)
) -> bytes:
    b = build_batch(recs, path, s.codec, 1)
    s.sent(b.seq)
    return b.frame


def test_negotiation_prefers_the_senders_order() -> None:
    s, r = pair(codecs=("none", "zstd"))
    assert s.codec == r.codec == "none"
    s, r = pair()
    assert s.codec == "zstd"
    assert s.effective_window == 4  # the receiver's window caps the sender's


@pytest.mark.parametrize(
    ("hello", "code"),
    [
        (wire.Hello(2, 3, 1, "edge", ("zstd",)), wire.R_VERSION),
        (wire.Hello(1, 1, 1, "edge", ("lz4",)), wire.R_CODEC),
        (wire.Hello(1, 1, 1, "core", ("zstd",)), wire.R_IDENTITY),
        (wire.Hello(1, 1, 1, "", ("zstd",)), wire.R_IDENTITY),
    ],
)
def test_receiver_refuses_a_mismatch(hello: wire.Hello, code: int) -> None:
    r = ReceiverSession("core", ("zstd", "none"), 4, 1 << 20, 1 << 20, 4)
    with pytest.raises(WireError) as exc:
        r.feed(wire.encode_hello(hello))
    assert exc.value.code == code
    # The refusal reaches the sender as an event with the reason.
    s = SenderSession("edge", 1, ("zstd",), 4, 1 << 20)
    s.hello()
    (ev,) = s.feed(r.refuse(exc.value))
    assert isinstance(ev, Refused) and ev.code == code and ev.reason


def test_sender_refuses_a_welcome_it_did_not_offer() -> None:
    s = SenderSession("edge", 1, ("none",), 4, 1 << 20)
    s.hello()
    bad = wire.encode_welcome(wire.Welcome(1, 0, 100, 100, 4, "zstd", "core"))
    with pytest.raises(WireError) as exc:
        s.feed(bad)
    assert exc.value.code == wire.R_CODEC


def test_batches_acks_and_window() -> None:
    s, r = pair(window=2)
    f1 = send(s, [(1, b"3 abc"), (2, b"1 x1 y")])
    f2 = send(s, [(5, b"2 zz")])
    assert not s.can_send()  # window of 2 full
    evs = r.feed(f1 + f2)
    assert [e.header.seq for e in evs if isinstance(e, BatchReceived)] == [2, 5]
    assert evs[0].header.messages == 3  # type: ignore[union-attr]
    (a,) = s.feed(r.ack(2))
    assert a == Acked(2, 1) and s.can_send()
    assert r.ack(2) == b""  # nothing new
    (a,) = s.feed(r.ack(5))
    assert a == Acked(5, 1) and s.in_flight == 0


def test_receiver_enforces_order_and_window() -> None:
    s, r = pair(window=1)
    r.feed(send(s, [(3, b"1 a")]))
    s2 = SenderSession("edge", 77, ("zstd",), 8, 1 << 20)
    s2.state, s2.welcome = "open", s.welcome
    with pytest.raises(WireError) as exc:
        r.feed(send(s2, [(2, b"1 b")]))
    assert exc.value.code == wire.R_SEQUENCE
    s, r = pair(window=1)
    r.feed(send(s, [(1, b"1 a")]))
    s.window = 5
    with pytest.raises(WireError):
        r.feed(build_batch([(2, b"1 b")], (), "zstd", 1).frame)  # window exceeded


def test_sender_refuses_an_ack_beyond_what_it_sent() -> None:
    s, _ = pair()
    send(s, [(1, b"1 a")])
    with pytest.raises(WireError) as exc:
        s.feed(wire.encode_ack(9))
    assert exc.value.code == wire.R_SEQUENCE


def test_welcome_committed_position_starts_the_stream() -> None:
    s, _ = pair(committed=40)
    assert s.last_sent == 40
    with pytest.raises(RuntimeError):
        s.sent(40)


def test_loop_guard_path() -> None:
    _, r = pair()
    h = wire.BatchHeader(1, 1, 1, 1, 0, 0, (b"edge", b"core"))
    assert r.looped(h) is not None
    assert r.looped(wire.BatchHeader(1, 1, 1, 1, 0, 0, (b"a", b"b", b"c", b"d"))) is not None
    assert r.looped(wire.BatchHeader(1, 1, 1, 1, 0, 0, (b"edge",))) is None


@given(st.lists(st.binary(max_size=40), min_size=1, max_size=20))
def test_count_messages_matches_octet_framing(msgs: list[bytes]) -> None:
    payload = b"".join(b"%d %b" % (len(m), m) for m in msgs)
    assert count_messages(payload) == len(msgs)


# --- the ledger


def test_ledger_admits_each_record_once_and_acks_after_commit() -> None:
    ledger = Ledger()
    key = ("edge", 1)
    recs = [(1, b"a"), (2, b"b"), (3, b"c")]
    assert ledger.admit(key, recs) == recs
    acks: list[int] = []
    ledger.when_committed(key, 3, lambda: acks.append(3))
    # The same batch again (a reconnect while the first is being written): nothing new,
    # and its ack waits for the commit too.
    assert ledger.admit(key, recs) == []
    ledger.when_committed(key, 3, lambda: acks.append(33))
    assert acks == []
    # Overlapping batch: only the new part is written.
    assert ledger.admit(key, [(3, b"c"), (4, b"d")]) == [(4, b"d")]
    ledger.durable(key, 3)
    assert acks == [3, 33]
    ledger.when_committed(key, 2, lambda: acks.append(2))
    assert acks[-1] == 2
    assert ledger.duplicates_total == 4
    # Another epoch of the same relay starts from nothing.
    assert ledger.admit(("edge", 2), [(1, b"x")]) == [(1, b"x")]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(0, 5)), max_size=30))
def test_ledger_never_writes_a_record_twice(sends: list[tuple[int, int]]) -> None:
    """Any resend pattern (batches re-cut, repeated, overlapping): each seq written once."""
    ledger = Ledger()
    key = ("e", 1)
    written: list[int] = []
    for start, n in sends:
        batch = [(s, b"") for s in range(start, start + n + 1)]
        written += [s for s, _ in ledger.admit(key, batch)]
    assert len(written) == len(set(written))
    assert written == sorted(written)


def test_commit_log_after_a_process_crash_keeps_written_positions(tmp_path: Path) -> None:
    log = CommitLog(tmp_path, boot=lambda: "boot-a")
    assert log.open() == {}
    log.begin([])
    log.commit([(("edge", 5), 10)])
    log.sync()
    log.begin([])
    log.commit([(("edge", 5), 20), (("other", 1), 3)])  # written, not synced: then kill -9
    again = CommitLog(tmp_path, boot=lambda: "boot-a")
    assert again.open() == {("edge", 5): 20, ("other", 1): 3}


def test_commit_log_after_a_reboot_keeps_only_synced_positions(tmp_path: Path) -> None:
    log = CommitLog(tmp_path, boot=lambda: "boot-a")
    log.open()
    log.begin([])
    log.commit([(("edge", 5), 10)])
    log.sync()
    log.begin([])
    log.commit([(("edge", 5), 20)])  # the data of 11..20 may be gone after a power loss
    again = CommitLog(tmp_path, boot=lambda: "boot-b")
    assert again.open() == {("edge", 5): 10}


def test_commit_log_cuts_a_torn_tail(tmp_path: Path) -> None:
    log = CommitLog(tmp_path, boot=lambda: "b")
    log.open()
    log.begin([])
    log.commit([(("edge", 1), 7)])
    log.sync()
    log.close()
    with open(tmp_path / "committed", "ab") as f:
        f.write(b"SRLC" + b"\xff" * (ENTRY_SIZE - 9))
    again = CommitLog(tmp_path, boot=lambda: "b")
    assert again.open() == {("edge", 1): 7}
    assert again.problems
