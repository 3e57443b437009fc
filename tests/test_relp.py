"""RELP: codec vectors (librelp doc/relp.md and what librelp puts on the wire), fuzzing,
server/client sessions talking in memory, and the Twisted protocols without sockets."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from relay.formats.staging_block import FRAMING_OCTET, split_payload
from relay.framing.rfc6587 import Frame
from relay.inputs.connection import Inputs
from relay.ops.metrics import Metrics
from relay.relp import session
from relay.relp.protocols import RelpClientFactory, RelpServerFactory
from relay.relp.session import (
    MAX_TXNR,
    Acked,
    ClientSession,
    Close,
    Closed,
    Messages,
    Nacked,
    Open,
    Opened,
    Rejected,
    RelpError,
    RelpFrame,
    RelpParser,
    RelpStateError,
    ServerClose,
    ServerSession,
    SyslogRun,
    encode,
    next_txnr,
    parse_offers,
)

MAX_DATA = 128 * 1024  # librelp's default maximum data size
# What rsyslog 8.2302's omrelp (librelp 1.11) sends to open a session, byte for byte.
LIBRELP_OPEN = (
    b"1 open 86 relp_version=0\nrelp_software=librelp,1.11.0,http://librelp.adiscon.com\n"
    b"commands=syslog\n"
)

# (wire bytes, frames) from the spec's ABNF and librelp's encoder (relpFrameBuildSendbuf).
VECTORS: list[tuple[bytes, list[RelpFrame]]] = [
    (b"1 close 0\n", [RelpFrame(1, "close", b"")]),
    (b"0 serverclose 0\n", [RelpFrame(0, "serverclose", b"")]),
    (b"2 syslog 5 hello\n", [RelpFrame(2, "syslog", b"hello")]),
    (b"3 rsp 6 200 OK\n", [RelpFrame(3, "rsp", b"200 OK")]),
    (b"4 rsp 20 500 command disabled\n", [RelpFrame(4, "rsp", b"500 command disabled")]),
    # data may hold anything, LF and NUL included: DATALEN alone delimits it
    (b"5 syslog 3 a\nb\n", [RelpFrame(5, "syslog", b"a\nb")]),
    (b"6 syslog 2 \x00\xff\n", [RelpFrame(6, "syslog", b"\x00\xff")]),
    (b"999999999 syslog 1 x\n", [RelpFrame(MAX_TXNR, "syslog", b"x")]),
    (b"7 ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef 0\n", [RelpFrame(7, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef")]),
    # leading zeros are digits like any other (librelp accumulates them)
    (b"0008 syslog 001 z\n", [RelpFrame(8, "syslog", b"z")]),
    (
        LIBRELP_OPEN,
        [
            RelpFrame(
                1,
                "open",
                b"relp_version=0\nrelp_software=librelp,1.11.0,http://librelp.adiscon.com\n"
                b"commands=syslog",
            )
        ],
    ),
    (
        b"1 syslog 1 a\n2 syslog 1 b\n",
        [RelpFrame(1, "syslog", b"a"), RelpFrame(2, "syslog", b"b")],
    ),
]

# (wire bytes, error offset, reason fragment)
BAD: list[tuple[bytes, int, str]] = [
    (b"x", 0, "txnr expected"),
    (b" 1 syslog", 0, "txnr expected"),
    (b"1234567890 ", 9, "txnr longer"),
    (b"1  syslog", 2, "command expected"),
    (b"1 sys1og", 5, "space expected after command"),
    (b"1 " + b"a" * 33, 34, "command longer"),
    (b"1 syslog x", 9, "datalen expected"),
    (b"1 syslog 1234567890", 18, "datalen longer"),
    (b"1 syslog 5x", 10, "space or LF"),
    (b"1 close 0 \n", 9, "LF expected after zero datalen"),
    (b"1 syslog 3\n", 10, "data missing"),
    (b"1 syslog 3 abcX", 14, "LF trailer"),
    (b"1 syslog 3 abcd\n", 14, "LF trailer"),
    (b"1 syslog 200 ", 9, "exceeds maximum"),
    (b"1 syslog 1 a\n\n", 13, "txnr expected"),
]


@pytest.mark.parametrize(("wire", "frames"), VECTORS)
def test_decode_vectors(wire: bytes, frames: list[RelpFrame]) -> None:
    assert RelpParser(1000).feed(wire) == frames


@pytest.mark.parametrize(("wire", "frames"), VECTORS)
def test_decode_split_at_every_byte(wire: bytes, frames: list[RelpFrame]) -> None:
    for cut in range(len(wire) + 1):
        p = RelpParser(1000)
        assert p.feed(wire[:cut]) + p.feed(wire[cut:]) == frames
    p = RelpParser(1000)
    got: list[RelpFrame] = []
    for i in range(len(wire)):
        got += p.feed(wire[i : i + 1])
    assert got == frames
    assert p.buffered == 0


@pytest.mark.parametrize(("wire", "frames"), [v for v in VECTORS if len(v[1]) == 1])
def test_encode_vectors(wire: bytes, frames: list[RelpFrame]) -> None:
    f = frames[0]
    canonical = encode(f)
    assert RelpParser(1000).feed(canonical) == frames
    if not wire.startswith(b"000"):
        assert canonical == wire


@pytest.mark.parametrize(("wire", "offset", "reason"), BAD)
def test_malformed_input_is_refused_with_offset(wire: bytes, offset: int, reason: str) -> None:
    with pytest.raises(RelpError) as e:
        RelpParser(100).feed(wire)
    assert e.value.offset == offset
    assert reason in e.value.reason


@pytest.mark.parametrize(("wire", "offset", "reason"), BAD)
def test_malformed_input_byte_by_byte(wire: bytes, offset: int, reason: str) -> None:
    p = RelpParser(100)
    with pytest.raises(RelpError) as e:
        for i in range(len(wire)):
            p.feed(wire[i : i + 1])
    assert e.value.offset == offset
    with pytest.raises(RelpError):  # the stream cannot be resynchronised
        p.feed(b"1 close 0\n")


def test_oversize_frame_fails_before_its_data_arrives() -> None:
    p = RelpParser(max_data=10)
    with pytest.raises(RelpError, match="exceeds maximum"):
        p.feed(b"1 syslog 11 ")
    assert p.buffered == 0


@pytest.mark.parametrize(
    "frame",
    [
        RelpFrame(-1, "syslog", b"x"),
        RelpFrame(MAX_TXNR + 1, "syslog", b"x"),
        RelpFrame(1, "", b"x"),
        RelpFrame(1, "sys log", b"x"),
        RelpFrame(1, "a" * 33, b"x"),
        RelpFrame(1, "sysl0g", b"x"),
    ],
)
def test_encode_refuses_invalid_frames(frame: RelpFrame) -> None:
    with pytest.raises(ValueError):
        encode(frame)


frames_st = st.builds(
    RelpFrame,
    st.integers(0, MAX_TXNR),
    st.text(
        st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"),
        min_size=1,
        max_size=32,
    ),
    st.binary(max_size=300),
    oversize=st.just(0),  # what the encoder writes; the parser sets it only past the limit
)


@given(st.lists(frames_st, max_size=8), st.data())
def test_round_trip_any_split(frames: list[RelpFrame], data: st.DataObject) -> None:
    wire = b"".join(encode(f) for f in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    p = RelpParser(300)
    got: list[RelpFrame] = []
    prev = 0
    for c in [*cuts, len(wire)]:
        got += p.feed(wire[prev:c])
        prev = c
    assert got == frames
    assert p.buffered == 0


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=200), max_size=10))
def test_arbitrary_bytes_never_crash_and_buffer_stays_bounded(chunks: list[bytes]) -> None:
    p = RelpParser(max_data=64)
    for chunk in chunks:
        try:
            frames = p.feed(chunk)
        except RelpError as e:
            assert e.offset >= 0
            return
        assert all(len(f.data) <= 64 for f in frames)
        assert p.buffered <= 53 + 64 + 1


@given(st.binary(max_size=300))
def test_arbitrary_bytes_after_a_valid_prefix(junk: bytes) -> None:
    s = ServerSession(max_data=100)
    try:
        s.feed(LIBRELP_OPEN + junk)
    except RelpError:
        pass


def test_parse_offers() -> None:
    assert parse_offers(
        b"relp_version=0\nrelp_software=librelp,1.11.0,http://x\ncommands=syslog"
    ) == {
        "relp_version": ["0"],
        "relp_software": ["librelp", "1.11.0", "http://x"],
        "commands": ["syslog"],
    }
    assert parse_offers(b"") == {}
    assert parse_offers(b"flag\ncommands=") == {"flag": [], "commands": []}


@pytest.mark.parametrize(
    ("txnr", "nxt"), [(1, 2), (998, 999), (MAX_TXNR - 1, MAX_TXNR), (MAX_TXNR, 1)]
)
def test_txnr_wraps_at_999999999_to_1(txnr: int, nxt: int) -> None:
    assert next_txnr(txnr) == nxt


# --- server session -------------------------------------------------------------------------


def opened_server(**kw: Any) -> ServerSession:
    kw.setdefault("max_data", MAX_DATA)
    s = ServerSession(**kw)
    assert s.feed(LIBRELP_OPEN) == [
        Open(
            {
                "relp_version": ["0"],
                "relp_software": ["librelp", "1.11.0", "http://librelp.adiscon.com"],
                "commands": ["syslog"],
            }
        )
    ]
    rsp = s.data_to_send()
    frames = RelpParser(MAX_DATA).feed(rsp)
    assert [(f.txnr, f.command) for f in frames] == [(1, "rsp")]
    head, _, offers = frames[0].data.partition(b"\n")
    assert head == b"200 OK"
    # librelp refuses a higher version than its own 0, and needs syslog in commands
    assert parse_offers(offers)["relp_version"] == ["0"]
    assert parse_offers(offers)["commands"] == ["syslog"]
    return s


def test_server_acks_in_txnr_order_whatever_order_deliveries_finish() -> None:
    s = opened_server()
    ev = s.feed(b"2 syslog 1 a\n3 syslog 1 b\n4 syslog 1 c\n")
    assert ev == [Messages([(2, b"a"), (3, b"b"), (4, b"c")])]
    assert s.ack([3]) == b""  # 2 not decided yet: nothing may overtake it
    assert s.ack([4]) == b""
    assert s.ack([2]) == b"2 rsp 6 200 OK\n3 rsp 6 200 OK\n4 rsp 6 200 OK\n"
    assert s.pending == 0
    with pytest.raises(ValueError):
        s.ack([2])  # answered already


def test_server_nack() -> None:
    s = opened_server()
    s.feed(b"2 syslog 1 a\n3 syslog 1 b\n")
    assert s.nack(2, "disk\nfull") == b"2 rsp 13 500 disk full\n"
    assert s.ack([3]) == b"3 rsp 6 200 OK\n"


def test_server_refuses_syslog_before_open_like_librelp() -> None:
    s = ServerSession(max_data=MAX_DATA)
    assert s.feed(b"1 syslog 1 a\n") == []
    assert s.data_to_send() == b"1 rsp 20 500 command disabled\n"
    assert not s.is_open


@pytest.mark.parametrize(
    ("offers", "answer"),
    [
        (b"commands=syslog", b"500 relp_version offer missing or invalid"),
        (b"relp_version=x\ncommands=syslog", b"500 relp_version offer missing or invalid"),
        (b"relp_version=0\ncommands=eventlog", b"500 required command not supported by client"),
    ],
)
def test_server_refuses_bad_open(offers: bytes, answer: bytes) -> None:
    s = ServerSession(max_data=MAX_DATA)
    assert s.feed(encode(RelpFrame(1, "open", offers))) == []
    assert RelpParser(MAX_DATA).feed(s.data_to_send()) == [RelpFrame(1, "rsp", answer)]
    assert not s.is_open


def test_server_answers_a_spec_client_with_version_1() -> None:
    s = ServerSession(max_data=MAX_DATA)
    s.feed(encode(RelpFrame(1, "open", b"relp_version=7\ncommands=syslog")))
    (f,) = RelpParser(MAX_DATA).feed(s.data_to_send())
    assert parse_offers(f.data.partition(b"\n")[2])["relp_version"] == ["1"]


def test_server_second_open_is_harmless() -> None:
    s = opened_server()
    assert s.feed(encode(RelpFrame(2, "open", b"relp_version=0\ncommands=syslog"))) == []
    assert s.data_to_send() == b"2 rsp 37 200 connection already open - ignored\n"


@pytest.mark.parametrize(
    "wire",
    [b"3 syslog 1 a\n", b"1 syslog 1 a\n", b"2 syslog 1 a\n2 syslog 1 b\n", b"2 bogus 0\n"],
)
def test_server_drops_out_of_sequence_or_unknown_commands(wire: bytes) -> None:
    s = opened_server()
    with pytest.raises(RelpError):
        s.feed(wire)


def test_server_ignores_client_hints() -> None:
    s = opened_server()
    assert s.feed(b"0 whatever 0\n2 syslog 1 a\n") == [Messages([(2, b"a")])]


def test_server_close_waits_for_pending_acks_then_serverclose() -> None:
    s = opened_server()
    ev = s.feed(b"2 syslog 1 a\n3 close 0\n4 syslog 4 late\n")
    assert ev == [Messages([(2, b"a")]), Close(3)]
    assert s.data_to_send() == b""
    assert not s.finished
    assert s.ack([2]) == b"2 rsp 6 200 OK\n3 rsp 0\n0 serverclose 0\n"
    assert s.finished
    assert s.feed(b"5 syslog 1 x\n") == []


def test_server_txnr_wrap() -> None:
    s = opened_server()
    s._expected = MAX_TXNR  # a long-lived session, fast-forwarded
    ev = s.feed(b"999999999 syslog 1 a\n1 syslog 1 b\n")
    assert ev == [Messages([(MAX_TXNR, b"a"), (1, b"b")])]
    assert s.ack([MAX_TXNR, 1]) == b"999999999 rsp 6 200 OK\n1 rsp 6 200 OK\n"


# --- the fast path: syslog commands in sequence as SyslogRuns -----------------------------


def _run_view(events: list[Any]) -> list[tuple[int, bytes]]:
    """(txnr, message) of every syslog command, SyslogRuns taken apart."""
    out: list[tuple[int, bytes]] = []
    for ev in events:
        if isinstance(ev, SyslogRun):
            msgs = split_payload(ev.frames, FRAMING_OCTET)
            t = ev.first
            for m in msgs:
                out.append((t, m))
                t = next_txnr(t)
            assert len(msgs) == ev.commands and t == ev.after
        elif isinstance(ev, Messages):
            out += ev.messages
    return out


def _keys(events: list[Any]) -> list[int]:
    keys: list[int] = []
    for ev in events:
        if isinstance(ev, SyslogRun):
            keys.append(ev.first)
        elif isinstance(ev, Messages):
            keys += [t for t, _ in ev.messages]
    return keys


OK = b"%d rsp 6 200 OK\n"


def test_server_runs_carry_octet_frames_and_prepared_answers() -> None:
    s = opened_server(runs=True)
    ev = s.feed(b"2 syslog 1 a\n3 syslog 13 <13>1 - - - -\n4 syslog 1 c\n5 sys")
    assert ev == [
        SyslogRun(2, 3, b"1 a13 <13>1 - - - -1 c", b"".join(OK % t for t in (2, 3, 4)), 5)
    ]
    ev = s.feed(b"log 1 d\n6 syslog 1 e\n")  # a command that spanned two reads, then more
    assert _run_view(ev) == [(5, b"d"), (6, b"e")]
    assert s.ack(_keys(ev)) == b""  # 2-4 first
    assert s.ack([2]) == b"".join(b"%d rsp 6 200 OK\n" % t for t in range(2, 7))
    assert s.pending == 0


def test_server_run_nack_refuses_each_of_its_commands() -> None:
    s = opened_server(runs=True)
    (run,) = s.feed(b"2 syslog 1 a\n3 syslog 1 b\n")
    assert s.nack(run.first, "disk full") == b"2 rsp 13 500 disk full\n3 rsp 13 500 disk full\n"


def test_server_run_wraps_txnr() -> None:
    s = opened_server(runs=True)
    s._expected = MAX_TXNR
    ev = s.feed(b"999999999 syslog 1 a\n1 syslog 1 b\n2 syslog 1 c\n")
    assert _run_view(ev) == [(MAX_TXNR, b"a"), (1, b"b"), (2, b"c")]
    assert s.ack(_keys(ev)) == b"999999999 rsp 6 200 OK\n1 rsp 6 200 OK\n2 rsp 6 200 OK\n"


_MSG = st.binary(min_size=0, max_size=30)


@st.composite
def relp_streams(draw: st.DrawFn) -> bytes:
    """Syslog commands in sequence, with what the fast path leaves to the general one:
    empty, oversize and leading-zero DATALENs, hints, a TXNR out of sequence, junk."""
    t = 2
    wire = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["msg"] * 6 + ["empty", "zero", "hint", "skip", "junk"]))
        msg = draw(_MSG)
        if kind == "msg":
            wire.append(b"%d syslog %d %s\n" % (t, len(msg), msg) if msg else b"%d syslog 0\n" % t)
        elif kind == "empty":
            wire.append(b"%d syslog 0\n" % t)
        elif kind == "zero":
            wire.append(b"%d syslog 0%d %s\n" % (t, len(msg) + 1, msg + b"z"))
        elif kind == "hint":
            wire.append(b"0 foo 0\n")
            continue
        elif kind == "skip":
            wire.append(b"%d syslog 1 a\n" % (t + 1))
        else:
            wire.append(draw(st.binary(max_size=8)))
        t += 1
    return b"".join(wire)


@settings(max_examples=300, deadline=None)
@given(relp_streams(), st.data(), st.sampled_from([None, "truncate", "reject"]))
def test_server_runs_equal_messages_on_any_stream_and_split(
    wire: bytes, data: st.DataObject, oversize: str | None
) -> None:
    """The fast path changes how commands are reported, nothing else: the same
    messages, answers, errors (reason and offset) and state as one Messages each."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=6)))
    chunks = [wire[a:b] for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True)]
    results = []
    for runs in (False, True):
        s = opened_server(runs=runs, max_data=20, oversize=oversize)
        events: list[Any] = []
        error = None
        try:
            for c in chunks:
                events += s.feed(c)
        except RelpError as e:
            error = (e.reason, e.offset)
        answers = s.data_to_send() + s.ack(_keys(events))
        trunc = [t for ev in events if isinstance(ev, Messages) for t in ev.truncated]
        rejected = [ev for ev in events if isinstance(ev, Rejected)]
        results.append((_run_view(events), trunc, rejected, error, answers, s.pending))
    assert results[0] == results[1]


def test_parser_without_an_oversize_policy_still_refuses_an_oversize_frame() -> None:
    s = opened_server(max_data=10, oversize=None)
    with pytest.raises(RelpError, match="exceeds"):
        s.feed(b"2 syslog 11 ")


BIG = b"x" * 25


@pytest.mark.parametrize("split", [None, 1, 7])
def test_server_session_truncates_an_oversize_message_and_goes_on(split: int | None) -> None:
    """Issue 11, item 5: the message before, the oversize one (cut to the maximum and
    flagged) and the one after are all answered, and the session stays open."""
    s = opened_server(max_data=10, oversize="truncate")
    wire = b"2 syslog 1 a\n3 syslog 25 " + BIG + b"\n4 syslog 1 b\n"
    chunks = [wire] if split is None else [wire[i : i + split] for i in range(0, len(wire), split)]
    events = [ev for c in chunks for ev in s.feed(c)]
    msgs = [m for ev in events if isinstance(ev, Messages) for m in ev.messages]
    assert msgs == [(2, b"a"), (3, b"x" * 10), (4, b"b")]
    assert [t for ev in events if isinstance(ev, Messages) for t in ev.truncated] == [(3, 25)]
    assert s._parser.buffered <= 60  # never the whole frame
    assert s.ack([2, 3, 4]) == b"2 rsp 6 200 OK\n3 rsp 6 200 OK\n4 rsp 6 200 OK\n"
    assert s.is_open and s.frame_start == -1


@pytest.mark.parametrize("split", [None, 1, 7])
def test_server_session_rejects_an_oversize_message_with_500_and_goes_on(
    split: int | None,
) -> None:
    s = opened_server(max_data=10, oversize="reject")
    wire = b"2 syslog 1 a\n3 syslog 25 " + BIG + b"\n4 syslog 1 b\n"
    chunks = [wire] if split is None else [wire[i : i + split] for i in range(0, len(wire), split)]
    events = [ev for c in chunks for ev in s.feed(c)]
    assert [m for ev in events if isinstance(ev, Messages) for m in ev.messages] == [
        (2, b"a"),
        (4, b"b"),
    ]
    assert [ev for ev in events if isinstance(ev, Rejected)] == [Rejected(3, 25)]
    assert s.data_to_send() == b""  # the 500 waits for the answer to 2
    assert s.ack([2, 4]) == (
        b"2 rsp 6 200 OK\n3 rsp 31 500 message too large (25 > 10)\n4 rsp 6 200 OK\n"
    )
    assert s.is_open


def test_server_session_oversize_frame_needs_its_trailer() -> None:
    s = opened_server(max_data=10)
    with pytest.raises(RelpError, match="LF trailer"):
        s.feed(b"2 syslog 12 " + b"y" * 12 + b"X")


def test_oversize_open_is_still_an_error() -> None:
    s = ServerSession(max_data=10)
    with pytest.raises(RelpError, match="exceeds"):
        s.feed(b"1 open 5000 ")


# --- client session and pairs ---------------------------------------------------------------


def pair(window: int = 4) -> tuple[ClientSession, ServerSession]:
    c, s = ClientSession(window), ServerSession(max_data=MAX_DATA)
    s.feed(c.open())
    assert not c.can_send
    assert c.feed(s.data_to_send()) == [
        Opened(
            {
                "relp_version": ["0"],
                "relp_software": ["syslog-relay", "0.1.0"],
                "commands": ["syslog"],
            }
        )
    ]
    return c, s


def test_client_open_offers_match_librelp_shape() -> None:
    c = ClientSession(128)
    (f,) = RelpParser(MAX_DATA).feed(c.open())
    assert (f.txnr, f.command) == (1, "open")
    offers = parse_offers(f.data)
    assert offers["relp_version"] == ["0"]
    assert offers["commands"] == ["syslog"]
    with pytest.raises(RelpStateError):
        c.send(b"x", 1)  # not before the answer to open


def test_pair_window_and_in_order_acks() -> None:
    c, s = pair(window=3)
    wire = b"".join(c.send(b"m%d" % i, i) for i in range(3))
    assert not c.can_send
    with pytest.raises(RelpStateError):
        c.send(b"too many", 99)
    (msgs,) = s.feed(wire)
    assert isinstance(msgs, Messages)
    assert [m for _, m in msgs.messages] == [b"m0", b"m1", b"m2"]
    assert c.in_flight == [0, 1, 2]
    txnrs = [t for t, _ in msgs.messages]
    assert c.feed(s.ack(txnrs[:2])) == [Acked([0, 1])]
    assert c.in_flight == [2]
    assert c.room == 2
    assert c.feed(s.ack(txnrs[2:])) == [Acked([2])]


def test_client_releases_acks_in_send_order_even_if_answered_out_of_order() -> None:
    c, _ = pair()
    for i in range(3):
        c.send(b"x", i)
    assert c.feed(b"4 rsp 6 200 OK\n") == []
    assert c.feed(b"3 rsp 6 200 OK\n") == []
    assert c.feed(b"2 rsp 6 200 OK\n") == [Acked([0, 1, 2])]


def test_client_nack_keeps_order() -> None:
    c, _ = pair()
    for i in range(3):
        c.send(b"x", i)
    out = c.feed(b"2 rsp 6 200 OK\n3 rsp 13 500 disk full\n4 rsp 6 200 OK\n")
    assert out == [Acked([0]), Nacked(1, "500 disk full"), Acked([2])]
    assert c.in_flight == []


@pytest.mark.parametrize(
    "wire",
    [b"9 rsp 6 200 OK\n", b"2 rsp 2 OK\n", b"2 syslog 1 x\n", b"2 rsp 6 200OK!\n"],
)
def test_client_refuses_bogus_answers(wire: bytes) -> None:
    c, _ = pair()
    c.send(b"x", 0)
    with pytest.raises(RelpError):
        c.feed(wire)


@pytest.mark.parametrize(
    "answer",
    [
        b"500 go away",
        b"200 OK\nrelp_version=2\ncommands=syslog",
        b"200 OK\nrelp_version=0\ncommands=",
    ],
)
def test_client_refuses_unusable_open_answers(answer: bytes) -> None:
    c = ClientSession(128)
    c.open()
    with pytest.raises(RelpError):
        c.feed(encode(RelpFrame(1, "rsp", answer)))


def test_client_accepts_librelp_open_answer_and_close() -> None:
    c = ClientSession(128)
    c.open()
    rsp = b"200 OK\nrelp_version=0\nrelp_software=librelp,1.11.0,http://librelp.adiscon.com\ncommands=syslog"
    assert isinstance(c.feed(encode(RelpFrame(1, "rsp", rsp)))[0], Opened)
    c.send(b"a", "a")
    assert c.close() == b"3 close 0\n"
    assert not c.can_send
    # librelp answers close with empty data, then the serverclose hint
    assert c.feed(b"2 rsp 6 200 OK\n3 rsp 0\n0 serverclose 0\n") == [
        Acked(["a"]),
        Closed(),
        ServerClose(),
    ]


def test_pair_full_conversation_with_wrap() -> None:
    c, s = pair(window=5)
    c._txnr = MAX_TXNR - 2
    s._expected = MAX_TXNR - 2
    sent: list[int] = []
    acked: list[object] = []
    for _ in range(20):
        while c.can_send and len(sent) < 20:
            wire = c.send(b"msg %d" % len(sent), len(sent))
            sent.append(len(sent))
            for ev in s.feed(wire):
                assert isinstance(ev, Messages)
                for ev2 in c.feed(s.ack([t for t, _ in ev.messages])):
                    assert isinstance(ev2, Acked)
                    acked += ev2.tokens
        if len(sent) == 20:
            break
    assert acked == list(range(20))
    (close_ev,) = s.feed(c.close())
    assert isinstance(close_ev, Close)
    assert c.feed(s.data_to_send()) == [Closed(), ServerClose()]
    assert s.finished


# --- Twisted protocols ----------------------------------------------------------------------


class Deliveries:
    def __init__(self) -> None:
        self.calls: list[tuple[list[bytes], bytes, Deferred[None]]] = []

    def __call__(self, messages: list[bytes], sender: bytes) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.calls.append((messages, sender, d))
        return d


def server(**kw: Any) -> tuple[Any, StringTransport, Deliveries, Metrics, Clock]:
    deliveries, metrics, clock = Deliveries(), Metrics(), Clock()
    kw.setdefault("max_data", MAX_DATA)
    f = RelpServerFactory("relp_in", deliveries, metrics, clock, **kw)
    proto = f.buildProtocol(None)
    t = StringTransport()
    proto.makeConnection(t)
    received = proto.dataReceived

    def recv(data: bytes) -> None:
        """One reactor turn: the data, then the group commit scheduled for the turn's end."""
        received(data)
        clock.advance(0)

    proto.recv = recv
    return proto, t, deliveries, metrics, clock


def test_server_protocol_acks_only_after_deliver_fires() -> None:
    proto, t, deliveries, metrics, _ = server()
    proto.recv(LIBRELP_OPEN)
    assert t.value().startswith(b"1 rsp ")
    t.clear()
    proto.recv(b"2 syslog 1 a\n3 syslog 2 bb\n4 sys")
    proto.recv(b"log 1 c\n")
    assert [c[0] for c in deliveries.calls] == [[b"a", b"bb"], [b"c"]]  # one call per chunk
    assert deliveries.calls[0][1] == b"relp://192.168.1.1:54321"
    assert t.value() == b""
    deliveries.calls[1][2].callback(None)
    assert t.value() == b""  # 4 may not overtake 2 and 3
    deliveries.calls[0][2].callback(None)
    assert t.value() == b"2 rsp 6 200 OK\n3 rsp 6 200 OK\n4 rsp 6 200 OK\n"
    assert metrics.get("relp_messages_received_total") == 3
    assert metrics.get("relp_acks_total") == 3


def test_server_protocol_delivers_runs_as_octet_frames() -> None:
    """With deliver_frames (the relay's listeners), a turn of syslog commands in sequence
    is one chunk of octet-counted frames; a turn with a truncated message is delivered
    message by message, in arrival order."""
    frames: list[tuple[bytes, bytes, Deferred[None]]] = []

    def deliver_frames(data: bytes, sender: bytes) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        frames.append((data, sender, d))
        return d

    proto, t, deliveries, metrics, _ = server(
        deliver_frames=deliver_frames, max_data=10, oversize="truncate"
    )
    proto.recv(LIBRELP_OPEN)
    t.clear()
    proto.dataReceived(b"2 syslog 1 a\n3 syslog 2 bb\n4 sys")
    proto.recv(b"log 1 c\n")
    assert [(f[0], f[1]) for f in frames] == [(b"1 a2 bb1 c", b"relp://192.168.1.1:54321")]
    assert deliveries.calls == []
    proto.recv(b"5 syslog 1 d\n6 syslog 12 " + b"y" * 12 + b"\n7 syslog 1 e\n")
    assert [c[0] for c in deliveries.calls] == [[b"d", Frame(b"y" * 10, truncated=True), b"e"]]
    deliveries.calls[0][2].callback(None)
    assert t.value() == b""  # 2-4 first
    frames[0][2].callback(None)
    assert t.value() == b"".join(b"%d rsp 6 200 OK\n" % i for i in range(2, 8))
    assert metrics.get("relp_messages_received_total") == 6
    assert metrics.get("relp_acks_total") == 6


def test_server_protocol_group_commits_a_reactor_turn() -> None:
    """Over TLS every record is its own dataReceived: one turn still makes one commit."""
    proto, _, deliveries, _, clock = server()
    proto.recv(LIBRELP_OPEN)
    for i in range(2, 6):
        proto.dataReceived(b"%d syslog 1 %d\n" % (i, i))
    assert deliveries.calls == []
    clock.advance(0)
    assert [c[0] for c in deliveries.calls] == [[b"2", b"3", b"4", b"5"]]
    proto.dataReceived(b"6 syslog 1 x\n")
    proto.connectionLost()  # before the commit: never stored, never acknowledged
    clock.advance(0)
    assert len(deliveries.calls) == 1
    assert clock.getDelayedCalls() == []


def test_server_protocol_failed_delivery_is_never_acknowledged() -> None:
    proto, t, deliveries, metrics, _ = server()
    proto.recv(LIBRELP_OPEN)
    t.clear()
    proto.recv(b"2 syslog 1 a\n")
    deliveries.calls[0][2].errback(OSError("disk"))
    assert t.value() == b""
    assert t.disconnected
    assert metrics.get("relp_deliver_failures_total") == 1


def test_server_protocol_close_after_acks() -> None:
    proto, t, deliveries, _, _ = server()
    proto.recv(LIBRELP_OPEN)
    t.clear()
    proto.recv(b"2 syslog 1 a\n3 close 0\n")
    assert not t.disconnecting
    deliveries.calls[0][2].callback(None)
    assert t.value() == b"2 rsp 6 200 OK\n3 rsp 0\n0 serverclose 0\n"
    assert t.disconnecting


def test_server_protocol_protocol_error_closes() -> None:
    proto, t, _, metrics, _ = server(max_data=16)
    proto.recv(LIBRELP_OPEN)
    proto.recv(b"2 syslog 17x")
    assert t.disconnected
    assert metrics.get("relp_protocol_errors_total") == 1


@pytest.mark.parametrize("policy", ["truncate", "reject"])
def test_server_protocol_applies_the_oversize_policy(policy: str) -> None:
    """Issue 11, item 5: an oversize message neither aborts the session nor loses the
    message before it; truncated ones are delivered flagged, rejected ones answered 500."""
    proto, t, deliveries, metrics, _ = server(max_data=16, oversize=policy)
    proto.recv(LIBRELP_OPEN)
    t.clear()
    proto.recv(b"2 syslog 1 a\n3 syslog 20 " + b"z" * 20 + b"\n4 syslog 1 b\n")
    assert not t.disconnecting
    ((batch, _, d),) = deliveries.calls
    d.callback(None)
    if policy == "truncate":
        assert batch == [b"a", Frame(b"z" * 16, truncated=True), b"b"]
        assert t.value() == b"2 rsp 6 200 OK\n3 rsp 6 200 OK\n4 rsp 6 200 OK\n"
        assert metrics.get("framing_errors_total", kind="oversize_truncated") == 1
    else:
        assert batch == [b"a", b"b"]
        assert t.value() == (
            b"2 rsp 6 200 OK\n3 rsp 31 500 message too large (20 > 16)\n4 rsp 6 200 OK\n"
        )
        assert metrics.get("framing_errors_total", kind="oversize_rejected") == 1
    assert metrics.get("relp_protocol_errors_total") == 0
    assert proto.session is not None and proto.session.is_open


def test_server_protocol_backpressure() -> None:
    proto, t, deliveries, metrics, _ = server(max_unacked=10)
    proto.recv(LIBRELP_OPEN)
    proto.recv(b"2 syslog 6 aaaaaa\n")
    assert t.producerState == "producing"
    proto.recv(b"3 syslog 6 bbbbbb\n")
    assert t.producerState == "paused"
    assert metrics.get("relp_backpressure_pauses_total") == 1
    deliveries.calls[0][2].callback(None)
    assert t.producerState == "paused"  # 6 bytes still outstanding > 10 // 2
    deliveries.calls[1][2].callback(None)
    assert t.producerState == "producing"


def test_server_protocol_stops_reading_while_its_answers_are_unsent() -> None:
    """A client that never reads: the transport pauses its producer once the unsent
    answers pass its buffer size, and the connection is not read until they drain,
    whatever else resumes the inputs meanwhile (issue 11, item 1)."""
    inputs = Inputs()
    proto, t, deliveries, metrics, _ = server(inputs=inputs)
    assert t.producer is not None and t.streaming  # the answers' producer
    proto.recv(LIBRELP_OPEN)
    proto.recv(b"2 syslog 1 a\n")
    deliveries.calls[0][2].callback(None)
    t.producer.pauseProducing()  # what a TCP transport does past its 64 KiB buffer
    assert t.producerState == "paused"
    assert proto.holds == {"answers"}
    assert metrics.get("relp_answer_backpressure_pauses_total") == 1
    inputs.pause()  # storage full, then free again: answers still unsent
    inputs.resume()
    assert t.producerState == "paused"
    t.producer.resumeProducing()  # drained
    assert t.producerState == "producing"
    assert not proto.paused


def test_server_protocol_frame_deadline() -> None:
    """Issue 11, item 6: a RELP command trickled byte by byte is cut off."""
    proto, t, _, metrics, clock = server(frame_timeout=10)
    proto.recv(LIBRELP_OPEN)
    for b in b"2 syslog 5 ab":
        proto.recv(bytes([b]))
        clock.advance(0.5)
    assert not t.disconnecting
    clock.advance(10)
    assert t.disconnecting
    assert metrics.get("frame_timeouts_total", listener="relp_in") == 1
    proto.connectionLost()
    assert clock.getDelayedCalls() == []


def test_server_protocol_frame_deadline_spares_complete_commands_and_paused_reads() -> None:
    proto, t, deliveries, metrics, clock = server(frame_timeout=10, max_unacked=4)
    proto.recv(LIBRELP_OPEN)
    for txnr in range(2, 12):  # each command completes 8 s after it started
        frame = b"%d syslog 1 x\n" % txnr
        proto.recv(frame[:3])
        clock.advance(8)
        proto.recv(frame[3:])
        for _, _, d in deliveries.calls:
            if not d.called:
                d.callback(None)
    assert not t.disconnecting
    proto.recv(b"12 syslog 6 aaaaaa\n13 sys")  # unacked > max_unacked: not read any more
    assert proto.holds == {"unacked"}
    clock.pump([5] * 10)
    assert not t.disconnecting  # our pause, not the client's delay
    deliveries.calls[-1][2].callback(None)
    clock.pump([5] * 3)
    assert t.disconnecting
    assert metrics.get("frame_timeouts_total") == 1
    proto.connectionLost()
    assert clock.getDelayedCalls() == []


def test_server_protocol_max_connections_per_source() -> None:
    proto, t, _, metrics, _ = server(max_connections_per_source=1)
    again = proto.factory.buildProtocol(None)
    t2 = StringTransport()
    again.makeConnection(t2)
    assert t2.disconnecting and not t.disconnecting
    assert metrics.get("connections_refused_total", reason="max_connections_per_source") == 1
    proto.connectionLost()
    third = proto.factory.buildProtocol(None)
    t3 = StringTransport()
    third.makeConnection(t3)
    assert not t3.disconnecting


def test_server_protocol_idle_client_not_reading_its_answers_is_aborted() -> None:
    """serverclose would wait behind the unread answers for ever: abort instead."""
    proto, t, _, metrics, clock = server(idle_timeout=30)
    proto.recv(LIBRELP_OPEN)
    t.producer.pauseProducing()
    clock.advance(31)
    assert t.disconnected  # aborted
    assert b"serverclose" not in t.value()
    assert metrics.get("connections_timed_out_total") == 1
    proto.connectionLost()
    assert clock.getDelayedCalls() == []


def test_server_protocol_unacked_pause_survives_an_inputs_resume() -> None:
    inputs = Inputs()
    proto, t, deliveries, _, _ = server(max_unacked=4, inputs=inputs)
    proto.recv(LIBRELP_OPEN)
    proto.recv(b"2 syslog 6 aaaaaa\n")
    assert t.producerState == "paused"
    inputs.pause()
    inputs.resume()
    assert t.producerState == "paused"  # still 6 bytes unacknowledged
    deliveries.calls[0][2].callback(None)
    assert t.producerState == "producing"
    proto.connectionLost()
    assert inputs.producers == set()


def test_server_protocol_idle_timeout_sends_serverclose() -> None:
    proto, t, deliveries, metrics, clock = server(idle_timeout=30)
    proto.recv(LIBRELP_OPEN)
    proto.recv(b"2 syslog 1 a\n")
    clock.advance(31)
    assert not t.disconnecting  # a delivery is still pending: we are the slow side
    deliveries.calls[0][2].callback(None)
    t.clear()
    clock.advance(31)
    assert t.value() == b"0 serverclose 0\n"
    assert t.disconnecting
    assert metrics.get("connections_timed_out_total") == 1
    proto.connectionLost()
    assert clock.getDelayedCalls() == []


def test_server_protocol_late_delivery_after_disconnect_writes_nothing() -> None:
    proto, t, deliveries, _, _ = server()
    proto.recv(LIBRELP_OPEN)
    proto.recv(b"2 syslog 1 a\n")
    proto.connectionLost()
    t.clear()
    deliveries.calls[0][2].callback(None)
    assert t.value() == b""


class Source:
    def __init__(self, messages: list[bytes]) -> None:
        self.messages = messages
        self.queue: list[tuple[object, bytes]] = list(enumerate(messages))
        self.acked: list[object] = []
        self.lost: list[list[object]] = []

    def next_batch(self, max_records: int) -> list[tuple[object, bytes]]:
        out, self.queue = self.queue[:max_records], self.queue[max_records:]
        return [(tok, msg) for tok, msg in out]

    def on_ack(self, tokens: list[object]) -> None:
        self.acked += tokens

    def on_lost(self, tokens: list[object]) -> None:
        self.lost.append(tokens)
        # rewind: lost tokens go back to the front, in order
        self.queue = [(t, self.messages[t]) for t in tokens if isinstance(t, int)] + self.queue


def client(
    source: Source, **kw: Any
) -> tuple[Any, StringTransport, Metrics, Clock, RelpClientFactory]:
    metrics, clock = Metrics(), Clock()
    kw.setdefault("window", 128)
    kw.setdefault("ack_timeout", 30.0)
    f = RelpClientFactory("fwd", source, metrics, clock, **kw)
    proto = f.buildProtocol(None)
    t = StringTransport()
    proto.makeConnection(t)
    return proto, t, metrics, clock, f


def open_answer() -> bytes:
    s = ServerSession(max_data=MAX_DATA)
    s.feed(ClientSession(128).open())
    return s.data_to_send()


def test_client_protocol_window_and_acks() -> None:
    src = Source([b"m%d" % i for i in range(5)])
    proto, t, metrics, clock, f = client(src, window=2, ack_timeout=10)
    assert t.value().startswith(b"1 open ")
    t.clear()
    proto.dataReceived(open_answer())
    assert t.value() == b"2 syslog 2 m0\n3 syslog 2 m1\n"
    t.clear()
    proto.dataReceived(b"2 rsp 6 200 OK\n")
    assert src.acked == [0]
    assert t.value() == b"4 syslog 2 m2\n"
    t.clear()
    proto.dataReceived(b"3 rsp 6 200 OK\n4 rsp 6 200 OK\n")
    assert src.acked == [0, 1, 2]
    assert t.value() == b"5 syslog 2 m3\n6 syslog 2 m4\n"
    t.clear()
    proto.dataReceived(b"5 rsp 6 200 OK\n6 rsp 6 200 OK\n")
    assert t.value() == b""
    assert clock.getDelayedCalls() == []  # nothing in flight, no timer
    src.queue = [(5, b"late")]
    f.wake()
    assert t.value() == b"7 syslog 4 late\n"
    assert metrics.get("messages_forwarded_total") == 5


def test_client_protocol_silent_peer_is_abandoned_and_in_flight_reported() -> None:
    src = Source([b"m%d" % i for i in range(3)])
    proto, t, metrics, clock, _ = client(src, window=8, ack_timeout=5)
    proto.dataReceived(open_answer())
    proto.dataReceived(b"2 rsp 6 200 OK\n")
    clock.advance(4)
    assert not t.disconnected
    clock.advance(2)
    assert t.disconnected
    assert metrics.get("relp_ack_timeouts_total") == 1
    proto.connectionLost()
    assert src.acked == [0]
    assert src.lost == [[1, 2]]
    assert clock.getDelayedCalls() == []


def test_client_protocol_silent_on_open() -> None:
    src = Source([])
    _, t, metrics, clock, _ = client(src, ack_timeout=5)
    clock.advance(5)
    assert t.disconnected
    assert metrics.get("relp_ack_timeouts_total") == 1


def test_client_protocol_progress_rearms_the_timer() -> None:
    src = Source([b"m%d" % i for i in range(3)])
    proto, t, _, clock, _ = client(src, window=1, ack_timeout=5)
    proto.dataReceived(open_answer())
    for txnr in (2, 3, 4):
        clock.advance(4)
        proto.dataReceived(b"%d rsp 6 200 OK\n" % txnr)
    assert not t.disconnected
    assert src.acked == [0, 1, 2]


def test_client_protocol_connection_loss_reports_in_flight_once() -> None:
    src = Source([b"m%d" % i for i in range(4)])
    proto, _, metrics, _, f = client(src, window=3)
    proto.dataReceived(open_answer())
    proto.dataReceived(b"2 rsp 6 200 OK\n")
    proto.connectionLost()
    proto.connectionLost()
    assert src.lost == [[1, 2, 3]]
    assert f.current is None
    assert metrics.get("relp_in_flight_lost_total") == 3


def test_client_protocol_nack_without_handler_replays() -> None:
    src = Source([b"m%d" % i for i in range(3)])
    proto, t, metrics, _, _ = client(src, window=3)
    proto.dataReceived(open_answer())
    proto.dataReceived(b"2 rsp 6 200 OK\n3 rsp 8 500 full\n")
    assert t.disconnected
    assert src.acked == [0]
    assert src.lost == [[1, 2]]
    assert metrics.get("relp_nacks_total") == 1


def test_client_protocol_nack_without_handler_resends_what_was_answered_after_it() -> None:
    src = Source([b"m%d" % i for i in range(4)])
    proto, t, _, _, _ = client(src, window=4)
    proto.dataReceived(open_answer())
    proto.dataReceived(b"2 rsp 6 200 OK\n3 rsp 8 500 full\n4 rsp 6 200 OK\n")
    assert t.disconnected
    assert src.acked == [0]
    assert src.lost == [[1, 2, 3]]  # no gap behind the caller's ack position


class NackingSource(Source):
    def __init__(self, messages: list[bytes]) -> None:
        super().__init__(messages)
        self.nacked: list[tuple[object, str]] = []

    def on_nack(self, token: object, reason: str) -> None:
        self.nacked.append((token, reason))


def test_client_protocol_nack_with_handler_goes_on() -> None:
    src = NackingSource([b"m%d" % i for i in range(3)])
    proto, t, _, _, _ = client(src, window=4)
    proto.dataReceived(open_answer())
    proto.dataReceived(b"2 rsp 6 200 OK\n3 rsp 8 500 full\n4 rsp 6 200 OK\n")
    assert not t.disconnecting
    assert src.acked == [0, 2]
    assert src.nacked == [(1, "500 full")]


def test_client_protocol_serverclose() -> None:
    src = Source([b"m0"])
    proto, t, _, _, _ = client(src)
    proto.dataReceived(open_answer())
    proto.dataReceived(b"0 serverclose 0\n")
    assert t.disconnected
    assert src.lost == [[0]]


def test_client_protocol_graceful_close() -> None:
    src = Source([b"m0"])
    proto, t, _, clock, _ = client(src)
    proto.dataReceived(open_answer())
    t.clear()
    proto.close()
    assert t.value() == b""  # m0 still in flight
    proto.dataReceived(b"2 rsp 6 200 OK\n")
    assert t.value() == b"3 close 0\n"
    proto.dataReceived(b"3 rsp 0\n0 serverclose 0\n")
    assert t.disconnecting
    proto.connectionLost()
    assert src.lost == [[]]
    assert clock.getDelayedCalls() == []


def test_client_and_server_protocols_end_to_end_in_memory() -> None:
    """Pump bytes between the two protocols; deliveries finish immediately or fail."""
    msgs = [b"<13>1 - h app - - - message %d" % i for i in range(50)]
    src = Source(msgs)
    cproto, ct, _, _, _ = client(src, window=7)
    delivered: list[bytes] = []
    failures = iter([False] * 3 + [True] + [False] * 1000)

    def deliver(batch: list[bytes], sender: bytes) -> Deferred[None]:
        if next(failures):
            return fail(OSError("transient"))
        delivered.extend(batch)
        return succeed(None)

    metrics = Metrics()
    sclock = Clock()
    sf = RelpServerFactory("in", deliver, metrics, sclock, max_data=MAX_DATA)

    def connect() -> tuple[Any, StringTransport]:
        sp = sf.buildProtocol(None)
        st_ = StringTransport()
        sp.makeConnection(st_)
        return sp, st_

    sproto, stt = connect()
    for _ in range(500):
        if ct.value():
            data = ct.value()
            ct.clear()
            sproto.dataReceived(data)
            sclock.advance(0)
        if stt.value():
            data = stt.value()
            stt.clear()
            cproto.dataReceived(data)
        if stt.disconnected and not ct.disconnected:
            cproto.connectionLost()
            cproto, ct, _, _, _ = client(src, window=7)
            sproto, stt = connect()
        if len(src.acked) == len(msgs):
            break
    assert src.acked == list(range(len(msgs)))
    # the failed batch was never acked, so it was replayed: every message arrived
    assert set(delivered) == set(msgs)
    assert metrics.get("relp_deliver_failures_total") == 1


@settings(max_examples=300, deadline=None)
@given(
    first=st.one_of(
        st.integers(1, 400),
        st.integers(1, MAX_TXNR),
        st.integers(MAX_TXNR - 400, MAX_TXNR),
    ),
    count=st.integers(1, 700),
)
def test_answers_cut_from_blocks_are_the_answers_one_by_one(first: int, count: int) -> None:
    # Across hundreds, digit-count changes (99 -> 100, 999 -> 1000) and the wrap.
    one_by_one = b"".join(
        b"%d rsp 6 200 OK\n" % ((t - 1) % MAX_TXNR + 1) for t in range(first, first + count)
    )
    assert session._answers(first, count) == one_by_one
