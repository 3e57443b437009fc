"""Stream and datagram protocols without sockets: StringTransport and a Clock."""

from __future__ import annotations

from datetime import UTC

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from relay.formats import staging_block
from relay.inputs.connection import Inputs
from relay.inputs.tcp_udp import SyslogDatagramProtocol, SyslogStreamFactory
from relay.ops.metrics import Metrics
from relay.ops.snapshots import ListenerSnapshot
from relay.router import Router

NOW = 1_800_000_000.0
MSG = b"<34>1 2027-01-15T08:00:00.000Z host1 app 1 ID1 - hello"


class ListSink:
    def __init__(self) -> None:
        self.batches: list[tuple[int, bytes]] = []

    def submit_chunk(self, hours, forward, now, on_durable=None, sender=b"-") -> None:  # type: ignore[no-untyped-def]
        recv = staging_block.format_recv(now)
        for hour, blocks in hours.items():
            self.batches.append((hour, staging_block.encode_blocks(recv, sender, blocks)))
        if on_durable is not None:
            on_durable()

    def records(self) -> list[staging_block.Record]:
        return [r for _, data in self.batches for _, r in staging_block.iter_records(data)]


class Env:
    def __init__(self, **kw: object) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.sink = ListSink()
        self.metrics = Metrics()
        self.inputs = Inputs()
        self.router = Router(self.sink, self.metrics, UTC, 86400.0, self.clock.seconds)
        opts: dict[str, object] = dict(
            framing="auto", max_size=1024, oversize="truncate", max_connections=3, idle_timeout=30.0
        )
        opts.update(kw)
        self.factory = SyslogStreamFactory(
            "tcp:514",
            "tcp",
            self.router,
            self.metrics,
            self.inputs,
            **opts,  # type: ignore[arg-type]
        )

    def connect(self, port: int = 40000, host: str = "10.1.2.3") -> tuple[object, StringTransport]:
        proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
        assert proto is not None
        proto.callLater = self.clock.callLater  # type: ignore[attr-defined]
        tr = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        proto.makeConnection(tr)
        return proto, tr


def octet(msg: bytes) -> bytes:
    return b"%d %s" % (len(msg), msg)


def test_one_write_per_hour_per_chunk() -> None:
    env = Env()
    proto, _ = env.connect()
    other_hour = b"<34>1 2027-01-15T09:30:00Z host2 app - - - later"
    proto.dataReceived(octet(MSG) * 3 + octet(other_hour) + MSG + b"\n")  # type: ignore[attr-defined]
    assert len(env.sink.batches) == 2  # two hours -> two submissions, not five
    recs = env.sink.records()
    assert sorted(r.msg for r in recs) == sorted([MSG] * 4 + [other_hour])
    assert {r.sender for r in recs} == {b"tcp://10.1.2.3:40000"}
    assert {r.host for r in recs} == {b"host1", b"host2"}
    assert env.metrics.get("messages_received_total", listener="tcp:514") == 5


def test_malformed_is_kept_and_flagged() -> None:
    env = Env()
    proto, _ = env.connect()
    proto.dataReceived(b"total garbage \xff\xfe\x00 here\n")  # type: ignore[attr-defined]
    (rec,) = env.sink.records()
    assert rec.msg == b"total garbage \xff\xfe\x00 here"
    # Format 2 records M and R; NUL and invalid UTF-8 are left for readers to see.
    assert sorted(rec.flags) == sorted(b"MR")
    assert env.metrics.get("messages_flagged_total") == 1


def test_fatal_framing_error_closes_only_that_connection() -> None:
    env = Env()
    bad, bad_tr = env.connect(1)
    good, good_tr = env.connect(2)
    bad.dataReceived(octet(MSG) + b"12345678901234567890 x")  # type: ignore[attr-defined]
    assert bad_tr.disconnecting
    assert env.metrics.get("framing_errors_total", kind="length_too_long") == 1
    good.dataReceived(octet(MSG))  # type: ignore[attr-defined]
    assert not good_tr.disconnecting
    assert [r.msg for r in env.sink.records()] == [MSG, b"12345678901234567890 x", MSG]


def test_bytes_after_a_fatal_framing_error_are_kept_flagged() -> None:
    # Issue 11: a line that starts with digits is read as an octet count under auto
    # framing; the rest of that read used to be neither staged nor counted.
    env = Env()
    proto, tr = env.connect()
    rest = b"2026-11-26 12:00:00 not a count\n<13>Nov 26 12:00:01 h1 app: after\n"
    proto.dataReceived(octet(MSG) + rest)  # type: ignore[attr-defined]
    assert tr.disconnecting
    recs = env.sink.records()
    assert [r.msg for r in recs] == [MSG, rest]  # byte-exact, LFs included
    assert b"M" in recs[1].flags
    assert env.metrics.get("messages_received_total", listener="tcp:514") == 2
    assert env.metrics.get("bytes_received_total", listener="tcp:514") == len(octet(MSG)) + len(
        rest
    )
    assert env.metrics.get("framing_errors_total", kind="bad_length") == 1


def test_oversize_truncated_and_stream_stays_in_sync() -> None:
    env = Env(max_size=480)
    proto, tr = env.connect()
    big = b"<13>1 - h a - - - " + b"x" * 2000
    proto.dataReceived(octet(big) + octet(MSG))  # type: ignore[attr-defined]
    recs = env.sink.records()
    assert [len(r.msg) for r in recs] == [480, len(MSG)]
    assert b"T" in recs[0].flags
    assert not tr.disconnecting
    assert env.metrics.get("framing_errors_total", kind="oversize_truncated") == 1


def test_oversize_rejected_is_counted() -> None:
    env = Env(max_size=480, oversize="reject")
    proto, _ = env.connect()
    proto.dataReceived(octet(b"y" * 600) + octet(MSG))  # type: ignore[attr-defined]
    assert [r.msg for r in env.sink.records()] == [MSG]
    assert env.metrics.get("framing_errors_total", kind="oversize_rejected") == 1


def test_frame_cut_by_disconnect_is_kept() -> None:
    env = Env()
    proto, _ = env.connect()
    proto.dataReceived(b"%d %s" % (len(MSG) + 10, MSG))  # type: ignore[attr-defined]
    assert env.sink.records() == []
    proto.connectionLost(None)  # type: ignore[attr-defined]
    (rec,) = env.sink.records()
    assert rec.msg == MSG and b"C" in rec.flags


def test_max_connections_refuses_extra() -> None:
    env = Env(max_connections=2)
    first, _ = env.connect(1)
    env.connect(2)
    _, tr3 = env.connect(3)
    assert tr3.disconnecting
    assert env.metrics.get("connections_refused_total", reason="max_connections") == 1
    assert env.factory.snapshot() == ListenerSnapshot(2)  # what /status and /metrics show
    first.connectionLost(Failure(ConnectionDone()))
    assert env.factory.snapshot() == ListenerSnapshot(1)


def test_a_udp_listener_reports_no_connections() -> None:
    env = Env()
    udp = SyslogDatagramProtocol("udp:514", env.router, env.metrics, 480, "truncate", env.clock)
    assert udp.snapshot() == ListenerSnapshot(None, None)  # not listening: no socket to ask


def test_max_connections_per_source() -> None:
    """Issue 11, item 6: one address cannot take every slot of a listener."""
    env = Env(max_connections=10, max_connections_per_source=2)
    first, _ = env.connect(1)
    env.connect(2)
    _, tr3 = env.connect(3)
    assert tr3.disconnecting
    assert env.metrics.get("connections_refused_total", reason="max_connections_per_source") == 1
    _, other = env.connect(4, host="10.9.9.9")
    assert not other.disconnecting
    first.connectionLost(None)  # type: ignore[attr-defined]
    _, tr5 = env.connect(5)
    assert not tr5.disconnecting
    assert env.factory.sources.open == {"10.1.2.3": 2, "10.9.9.9": 1}


def test_frame_deadline_closes_a_trickling_sender_and_keeps_its_bytes() -> None:
    """Issue 11, item 6: one byte per second no longer holds a connection forever."""
    env = Env(idle_timeout=30.0, frame_timeout=10.0)
    env.factory.reactor = env.clock
    proto, tr = env.connect()
    for b in MSG[:9]:
        proto.dataReceived(bytes([b]))  # type: ignore[attr-defined]
        env.clock.advance(1)
    assert not tr.disconnecting  # 9 s into the frame
    env.clock.advance(1)
    assert tr.disconnecting
    assert env.metrics.get("frame_timeouts_total", listener="tcp:514") == 1
    assert env.metrics.get("connections_timed_out_total") == 0  # not idle: trickling
    proto.connectionLost(None)  # type: ignore[attr-defined]
    (rec,) = env.sink.records()
    assert rec.msg == MSG[:9] and b"C" in rec.flags
    assert not env.clock.getDelayedCalls()


def test_frame_deadline_is_per_frame() -> None:
    """Frames that each complete in time never trip it, however long the connection."""
    env = Env(frame_timeout=10.0)
    env.factory.reactor = env.clock
    proto, tr = env.connect()
    wire = octet(MSG) * 40
    n, h = len(octet(MSG)), len(octet(MSG)) // 2
    chunks = [wire[:h]] + [wire[i : i + n] for i in range(h, len(wire), n)]
    for chunk in chunks:  # every frame spans 2 chunks, 6 s apart: 240 s in all
        proto.dataReceived(chunk)  # type: ignore[attr-defined]
        env.clock.advance(6)
    assert not tr.disconnecting
    assert len(env.sink.records()) == 40
    proto.connectionLost(None)  # type: ignore[attr-defined]
    assert not env.clock.getDelayedCalls()


def test_frame_deadline_waits_while_the_relay_is_not_reading() -> None:
    env = Env(frame_timeout=10.0, idle_timeout=0)
    env.factory.reactor = env.clock
    proto, tr = env.connect()
    proto.dataReceived(octet(MSG)[:5])  # type: ignore[attr-defined]
    env.inputs.pause()  # the disk is behind: the sender cannot finish its frame
    env.clock.pump([5] * 20)
    assert not tr.disconnecting
    env.inputs.resume()
    env.clock.pump([5] * 3)
    assert tr.disconnecting
    proto.connectionLost(None)  # type: ignore[attr-defined]
    assert not env.clock.getDelayedCalls()


def test_idle_timeout_and_slow_client() -> None:
    env = Env(idle_timeout=30.0)
    proto, tr = env.connect()
    # One byte per second keeps the connection alive and never loses a byte.
    for b in octet(MSG):
        env.clock.advance(1)
        proto.dataReceived(bytes([b]))  # type: ignore[attr-defined]
    assert [r.msg for r in env.sink.records()] == [MSG]
    assert not tr.disconnecting
    env.clock.advance(31)
    assert env.metrics.get("connections_timed_out_total") == 1
    proto.connectionLost(None)  # type: ignore[attr-defined]
    assert not env.clock.getDelayedCalls()


def test_pause_and_resume_all_inputs() -> None:
    env = Env()
    _, tr1 = env.connect(1)
    env.inputs.pause()
    _, tr2 = env.connect(2)  # a connection made while paused starts paused
    assert tr1.producerState == "paused" and tr2.producerState == "paused"
    env.inputs.resume()
    assert tr1.producerState == "producing" and tr2.producerState == "producing"


@pytest.mark.parametrize(
    ("msg", "skewed"),
    [
        (b"<34>1 2027-01-15T06:10:00+00:00 h a - - - in range", False),
        (b"<34>1 2031-01-01T00:00:00Z h a - - - far future", True),
        (b"<34>1 - h a - - - no timestamp", True),
    ],
)
def test_hour_from_timestamp_or_receive_time(msg: bytes, skewed: bool) -> None:
    env = Env()
    proto, _ = env.connect()
    proto.dataReceived(octet(msg))  # type: ignore[attr-defined]
    ((hour, _data),) = env.sink.batches
    (rec,) = env.sink.records()
    if skewed:
        assert hour == int(NOW // 3600) and b"R" in rec.flags
    else:
        assert hour == int(NOW // 3600) - 2
        assert b"R" not in rec.flags


def test_udp_datagram_is_one_message() -> None:
    env = Env()
    udp = SyslogDatagramProtocol("udp:514", env.router, env.metrics, 480, "truncate", env.clock)
    udp.datagramReceived(MSG + b"\n" + MSG, ("127.0.0.1", 5555))
    udp.datagramReceived(b"z" * 1000, ("127.0.0.1", 5555))
    udp.datagramReceived(b"", ("127.0.0.1", 5555))
    udp.datagramReceived(MSG, ("127.0.0.2", 6666))
    assert env.sink.batches == []  # collected until the end of the reactor turn
    env.clock.advance(0)
    # one batch per sender
    assert [r.sender for r in env.sink.records()].count(b"udp://127.0.0.1:5555") == 2
    assert len(env.sink.batches) == 2
    recs = env.sink.records()
    assert recs[0].msg == MSG + b"\n" + MSG
    assert recs[0].sender == b"udp://127.0.0.1:5555"
    assert len(recs[1].msg) == 480 and b"T" in recs[1].flags
    assert env.metrics.get("framing_errors_total", kind="empty") == 1


def test_a_frame_split_across_reads_is_kept_whole_and_flushed_at_disconnect() -> None:
    env = Env()
    proto, _ = env.connect()
    proto.dataReceived(octet(MSG) * 50)  # type: ignore[attr-defined]
    assert len(env.sink.batches) == 1  # one chunk, one batch
    assert len(env.sink.records()) == 50
    proto.dataReceived(octet(MSG)[:10])  # type: ignore[attr-defined]
    proto.dataReceived(octet(MSG)[10:])  # type: ignore[attr-defined]
    assert len(env.sink.records()) == 51
    proto.dataReceived(octet(MSG)[:10])  # type: ignore[attr-defined]
    proto.connectionLost(None)  # type: ignore[attr-defined]
    recs = env.sink.records()
    assert len(recs) == 52 and b"C" in recs[-1].flags  # cut, kept, flagged
