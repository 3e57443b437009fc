"""Router.receive: staging blocks as received, forward payloads marked, loops dropped."""

from __future__ import annotations

from datetime import UTC
from typing import Any

from relay.formats import loop_guard, octet, staging_block
from relay.framing.rfc6587 import Framer
from relay.ops.metrics import Metrics
from relay.router import Router

NOW = 1_800_000_000.0 + 600
HOUR = int(NOW // 3600)
STAMP = b"2027-01-15T08:10:00.000000Z"


class Sink:
    def __init__(self) -> None:
        self.chunks: list[tuple[dict[int, list[Any]], list[bytes]]] = []
        self.octet: list[bool] = []  # forward payloads handed over as one OctetFrames

    def submit_chunk(
        self, hours: Any, forward: Any, now: float, on_durable: Any = None, sender: bytes = b"-"
    ) -> None:
        self.octet.append(isinstance(forward, staging_block.OctetFrames))
        if isinstance(forward, staging_block.OctetFrames):  # the messages of octet-counted frames
            forward = staging_block.split_payload(forward.data, staging_block.FRAMING_OCTET)
        self.chunks.append(({h: list(b) for h, b in hours.items()}, list(forward)))


def router(sink: Sink, metrics: Metrics, forwarding: bool) -> Router:
    return Router(sink, metrics, UTC, 3600.0, lambda: NOW, relay_id="edge", forwarding=forwarding)


MSGS = [
    b"<13>1 " + STAMP + b" web1 app - - - one",
    b"<13>Jan 15 08:10:00 web2 tag: legacy",
    b"<13>1 " + STAMP + b' web1 app - - [x@1 a="b"] three',
]


def test_forwarding_keeps_staging_as_received_and_marks_what_is_forwarded() -> None:
    sink, metrics = Sink(), Metrics()
    data = octet.encode_many(MSGS)
    assert (
        router(sink, metrics, forwarding=True).receive(
            Framer("auto", 65536), data, b"tcp://x:1", "in"
        )
        == []
    )
    ((hours, forward),) = sink.chunks
    ((framing, flags, count, payload),) = hours[HOUR]
    assert (framing, flags, count, bytes(payload)) == (b"o", b"-", 3, data)
    assert forward == [loop_guard.mark(m, b"edge") for m in MSGS]
    assert forward[1] == MSGS[1]  # RFC 3164 cannot carry the mark
    assert metrics.get("forward_unguarded_total") == 1
    assert metrics.get("messages_received_total", listener="in") == 3


def test_a_frame_split_across_reads_is_marked_with_the_rest_of_its_chunk() -> None:
    # A read that completes a frame begun in the one before holds that frame on its
    # own, beside the read's runs: the whole chunk is marked in one pass all the same.
    sink, metrics = Sink(), Metrics()
    r = router(sink, metrics, forwarding=True)
    framer = Framer("auto", 65536)
    data = octet.encode_many(MSGS * 3)
    cut = len(octet.encode_many(MSGS[:1])) + 20  # inside the second frame
    r.receive(framer, data[:cut], b"t", "in")
    r.receive(framer, data[cut:], b"t", "in")
    forward = [m for _, f in sink.chunks for m in f]
    assert forward == [loop_guard.mark(m, b"edge") for m in MSGS * 3]
    assert sink.octet == [True, True]
    assert metrics.get("forward_unguarded_total") == 3  # the RFC 3164 message, thrice


def test_without_forwarding_nothing_is_queued_for_spools() -> None:
    sink = Sink()
    router(sink, Metrics(), forwarding=False).receive(
        Framer("auto", 65536), octet.encode_many(MSGS), b"t", "in"
    )
    ((_, forward),) = sink.chunks
    assert forward == []


def test_a_message_that_passed_here_is_dropped_from_staging_and_forwarding() -> None:
    sink, metrics = Sink(), Metrics()
    looped = loop_guard.mark(loop_guard.mark(MSGS[0], b"edge"), b"core")
    other = loop_guard.mark(MSGS[2], b"core")
    data = octet.encode_many([looped, other])
    r = router(sink, metrics, forwarding=True)
    r.trust_loop_guard(["in"])  # a listener of authenticated relays (mutual TLS)
    r.receive(Framer("auto", 65536), data, b"tcp://x:1", "in")
    ((hours, forward),) = sink.chunks
    staged = [m for b in hours[HOUR] for m in staging_block.split_payload(bytes(b[3]), b[0])]
    assert staged == [other]
    assert forward == [loop_guard.mark(other, b"edge")]
    assert metrics.get("messages_looped_total", listener="in") == 1


def test_a_frame_split_across_reads_is_not_counted_as_flagged() -> None:
    sink, metrics = Sink(), Metrics()
    r = router(sink, metrics, forwarding=False)
    framer = Framer("auto", 65536)
    data = octet.encode_many(MSGS[:1] * 3)
    r.receive(framer, data[:40], b"t", "in")
    r.receive(framer, data[40:], b"t", "in")
    staged = [
        (m, b[1])
        for hours, _ in sink.chunks
        for b in hours[HOUR]
        for m in staging_block.split_payload(bytes(b[3]), b[0])
    ]
    assert staged == [(MSGS[0], b"-")] * 3
    assert metrics.get("messages_received_total", listener="in") == 3
    assert metrics.get("messages_flagged_total", listener="in") == 0


def test_a_loop_mark_from_an_unauthenticated_listener_does_not_skip_staging() -> None:
    # Issue 11.12: anyone who knows the relay's id could add its loop-guard element
    # and have the message dropped unstaged. Off the trusted listeners it is staged,
    # flagged L, and not forwarded (which still ends a forwarding cycle).
    sink, metrics = Sink(), Metrics()
    forged = loop_guard.mark(MSGS[0], b"edge")
    hops = MSGS[2]
    for i in range(16):
        hops = loop_guard.mark(hops, b"r%d" % i)
    data = octet.encode_many([forged, MSGS[1], hops])
    r = router(sink, metrics, forwarding=True)
    r.trust_loop_guard(["relays"])
    r.receive(Framer("auto", 65536), data, b"tcp://x:1", "in")
    ((hours, forward),) = sink.chunks
    staged = [
        (m, b[1]) for b in hours[HOUR] for m in staging_block.split_payload(bytes(b[3]), b[0])
    ]
    assert staged == [(forged, b"L"), (MSGS[1], b"-"), (hops, b"L")]
    assert forward == [MSGS[1]]
    assert metrics.get("messages_looped_total") == 0
    assert metrics.get("loop_guard_untrusted_total", listener="in") == 2
    assert metrics.get("messages_flagged_total", listener="in") == 2
    assert metrics.get("messages_received_total", listener="in") == 3
    # The same bytes on the trusted listener are loops.
    r.receive(Framer("auto", 65536), data, b"tls://core:1", "relays")
    hours, forward = sink.chunks[1]
    staged = [
        (m, b[1]) for b in hours[HOUR] for m in staging_block.split_payload(bytes(b[3]), b[0])
    ]
    assert staged == [(MSGS[1], b"-")]
    assert metrics.get("messages_looped_total", listener="relays") == 2


def test_a_forged_via_that_is_not_utf8_is_logged_not_raised() -> None:
    sink = Sink()
    msg = MSGS[0].replace(b"- - -", b'- - [relay@32473 via="\xff\xfe,edge"]')
    router(sink, Metrics(), forwarding=False).accept([msg], b"udp://x:1", "udp")
    ((hours, _),) = sink.chunks
    assert [b[1] for b in hours[HOUR]] == [b"L"]
