"""TcpForwardProtocol on a StringTransport: framing, settling, backpressure, loss.

The protocol writes whole spool records in wire form and counts them delivered
only once the peer's TCP acknowledged their last byte (relay.forward.tcp_settle). A
``FakeProbe`` stands for the kernel: the test sets the stream positions it
reports. tests/test_tcp_settle.py covers the settle window itself; here the
protocol's side of the contract. Every test ends with the connection lost and,
in the ``link`` fixture's teardown, no delayed call left.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.testing import StringTransport

from relay.disk.spool import Spool
from relay.formats import octet
from relay.forward.outputs import (
    SETTLE_POLL,
    SpoolFeeder,
    TcpForwardFactory,
    TcpForwardProtocol,
    _Source,
    render_lf,
    render_octet,
)
from relay.forward.spool_window import ACK_FLUSH_DELAY
from relay.ops.metrics import Metrics
from tests.support.fakepeers import SyncPool, assert_no_pending_calls
from tests.test_feeder import SyncReactor
from tests.test_tcp_settle import FakeProbe


class Link:
    """A spool, its feeder, one factory and the connections the test makes."""

    def __init__(self, directory: Path, framing: str, render: bool, window: int) -> None:
        self.spool = Spool(directory, 16 * 1024**2)
        self.spool.open()
        self.first_seq = self.spool.acked_seq
        self.reactor = SyncReactor()
        self.metrics = Metrics()
        r = (render_octet if framing == "octet-counting" else render_lf) if render else None
        self.feeder = SpoolFeeder(self.spool, self.reactor, SyncPool(), self.metrics, "out", r)  # type: ignore[arg-type]
        self.probe = FakeProbe()
        self.factory = TcpForwardFactory(
            "out",
            _Source(self.feeder),
            self.metrics,
            self.reactor,
            window,
            framing,
            probe=lambda t: self.probe,
        )
        self.feeder.listeners.append(self.factory.wake)  # as ForwardOutput does
        self.connections: list[tuple[TcpForwardProtocol, StringTransport]] = []

    def append(self, *records: list[bytes]) -> None:
        for msgs in records:
            self.spool.append([octet.encode_many(msgs)], 1.0)
        self.spool.sync()
        self.feeder.notify()

    def connect(self) -> tuple[TcpForwardProtocol, StringTransport]:
        proto: Any = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.connections.append((proto, transport))
        return proto, transport

    def lose(self, proto: TcpForwardProtocol) -> None:
        """The connection died (the transport stops its producer first, as Twisted's do)."""
        proto.transport.unregisterProducer()
        proto.stopProducing()
        proto.connectionLost(None)  # type: ignore[arg-type]
        self.connections = [(p, t) for p, t in self.connections if p is not proto]

    def poll(self, acked: int, end: int) -> None:
        """One settle poll at which the kernel reports these stream positions."""
        self.probe.acked, self.probe.end = float(acked), float(end)
        self.reactor.advance(SETTLE_POLL)

    def acked_records(self) -> int:
        self.reactor.advance(ACK_FLUSH_DELAY)
        return self.spool.acked_seq - self.first_seq


@pytest.fixture
def link(tmp_path: Path) -> Iterator[Any]:
    made: list[Link] = []

    def new(framing: str = "octet-counting", render: bool = True, window: int = 128) -> Link:
        made.append(Link(tmp_path / f"spool{len(made)}", framing, render, window))
        return made[-1]

    yield new
    for lk in made:
        for proto, _ in list(lk.connections):
            lk.lose(proto)
        lk.reactor.advance(ACK_FLUSH_DELAY)
        assert_no_pending_calls(lk.reactor)
        lk.spool.close()


R1, R2, R3 = [b"a1", b"a2"], [b"b1"], [b"c1", b"c2", b"c3"]


# --- the bytes on the wire


@pytest.mark.parametrize(
    "framing, render, wire",
    [
        ("octet-counting", True, b"2 a12 a22 b12 c12 c22 c3"),
        ("lf", True, b"a1\na2\nb1\nc1\nc2\nc3\n"),
        # A feeder without a render hands out single messages: framed one by one.
        ("octet-counting", False, b"2 a12 a22 b12 c12 c22 c3"),
        ("lf", False, b"a1\na2\nb1\nc1\nc2\nc3\n"),
    ],
)
def test_records_are_written_in_spool_order_framed_as_configured(
    link: Any, framing: str, render: bool, wire: bytes
) -> None:
    lk = link(framing, render)
    lk.append(R1, R2, R3)
    _, t = lk.connect()
    lk.reactor.advance(0)
    assert t.value() == wire
    assert lk.metrics.get("messages_forwarded_total", output="out") == 6


def test_a_record_of_another_shape_goes_as_one_octet_frame(link: Any) -> None:
    lk = link()
    lk.spool.append([b"<14>legacy record"], 1.0)
    lk.spool.sync()
    lk.feeder.notify()
    _, t = lk.connect()
    assert t.value() == octet.encode(b"<14>legacy record")


def test_records_appended_while_connected_are_written_when_the_feeder_wakes_it(
    link: Any,
) -> None:
    lk = link()
    _, t = lk.connect()
    assert t.value() == b""
    lk.append(R1)
    assert t.value() == octet.encode_many(R1)
    lk.append(R2)
    assert t.value() == octet.encode_many(R1) + octet.encode_many(R2)


# --- settling: delivered once the peer's TCP acknowledged the record's last byte


def test_a_record_settles_only_when_its_last_byte_is_acknowledged(link: Any) -> None:
    lk = link()
    r1, r2 = octet.encode_many(R1), octet.encode_many(R2)
    lk.append(R1)
    lk.connect()
    lk.poll(0, len(r1))  # r1 placed at its end
    lk.append(R2)
    lk.poll(0, len(r1) + len(r2))  # r2 placed at its own end
    lk.poll(len(r1) - 1, len(r1) + len(r2))
    assert lk.feeder.delivered == 0 and lk.acked_records() == 0
    lk.poll(len(r1) + len(r2) // 2, len(r1) + len(r2))  # halfway through r2
    assert lk.feeder.delivered == 2 and lk.acked_records() == 1
    lk.poll(len(r1) + len(r2), len(r1) + len(r2))
    assert lk.feeder.delivered == 3 and lk.acked_records() == 2
    assert lk.feeder.in_flight == 0


def test_connection_lost_mid_record_delivers_only_what_settled(link: Any) -> None:
    lk = link()
    r1, r2, r3 = octet.encode_many(R1), octet.encode_many(R2), octet.encode_many(R3)
    lk.append(R1)
    proto, _ = lk.connect()
    lk.poll(0, len(r1))
    lk.append(R2, R3)
    lk.poll(len(r1) + 1, len(r1) + len(r2) + len(r3))  # r1 done, one byte of r2
    assert lk.feeder.delivered == 2
    lk.lose(proto)
    assert lk.feeder.delivered == 2  # nothing of r2 or r3 counts as delivered
    assert lk.feeder.in_flight == 0
    assert lk.metrics.get("forward_replayed_total", output="out") == 4
    assert lk.acked_records() == 1
    # The next connection starts at r2, whole, and r1 never again.
    _, t2 = lk.connect()
    assert t2.value() == r2 + r3
    lk.poll(len(r2 + r3), len(r2 + r3))
    assert lk.feeder.delivered == 6 and lk.acked_records() == 3


def test_a_lost_connection_stops_polling_and_writes_nothing_more(link: Any) -> None:
    lk = link()
    lk.append(R1)
    proto, t = lk.connect()
    assert lk.reactor.getDelayedCalls()  # polling for r1's settlement
    lk.lose(proto)
    assert not lk.reactor.getDelayedCalls()
    lk.append(R2)  # the feeder wakes the factory: no connection, nothing written
    lk.reactor.advance(1.0)
    assert t.value() == octet.encode_many(R1)
    assert lk.factory.current is None


def test_a_connection_that_settled_everything_stops_polling(link: Any) -> None:
    lk = link()
    lk.append(R1, R2)
    lk.connect()
    wire = len(octet.encode_many(R1) + octet.encode_many(R2))
    lk.poll(wire, wire)
    assert lk.feeder.delivered == 3
    assert lk.acked_records() == 2  # runs the feeder's acknowledgement to the spool
    assert not lk.reactor.getDelayedCalls()  # the connection is idle: no poll


# --- backpressure


def test_a_paused_connection_writes_nothing_until_resumed(link: Any) -> None:
    lk = link(window=1)
    proto, t = lk.connect()
    assert t.producer is proto and t.streaming  # registered as a push producer
    proto.pauseProducing()
    lk.append(R1, R2, R3)
    lk.reactor.advance(0)
    assert t.value() == b""
    assert lk.feeder.in_flight == 0  # nothing taken from the feeder either
    proto.resumeProducing()
    lk.reactor.advance(0)
    assert t.value() == octet.encode_many(R1) + octet.encode_many(R2) + octet.encode_many(R3)


def test_pausing_between_writes_holds_the_rest(link: Any) -> None:
    lk = link(window=1)  # one record per write, one write per reactor turn
    lk.append(R1, R2, R3)
    proto, t = lk.connect()
    assert t.value() == octet.encode_many(R1)
    proto.pauseProducing()  # the transport's buffer is full
    lk.reactor.advance(0)
    assert t.value() == octet.encode_many(R1)
    proto.resumeProducing()
    lk.reactor.advance(0)
    assert t.value() == octet.encode_many(R1) + octet.encode_many(R2) + octet.encode_many(R3)


def test_stop_producing_writes_nothing_more(link: Any) -> None:
    lk = link()
    proto, t = lk.connect()
    proto.stopProducing()
    lk.append(R1)
    lk.reactor.advance(0)
    assert t.value() == b""
