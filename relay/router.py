"""Router: frames of one received chunk -> staging records and forward payloads.

This is the hot path. Per chunk: one receive time, one pass over the frames
reading only the hour and host (relay.classify.routing_hour), records grouped by hour,
and everything handed to the durable writer as ONE chunk: one write per hour
file and one per forward spool.

Loop guard (relay.loopguard): a message that already passed through this
relay is a loop and is neither staged again nor forwarded; counted and logged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import tzinfo
from typing import Protocol

from twisted.logger import Logger

from relay import loopguard, record
from relay.classify import routing_hour
from relay.framing import Frame
from relay.metrics import Metrics
from relay.ratelog import RateLimiter

log = Logger(namespace="relay.router")


class Sink(Protocol):
    def submit_chunk(
        self,
        hours: Mapping[int, bytes],
        forward: Sequence[bytes],
        now: float,
        on_durable: Callable[[], None] | None = None,
    ) -> None: ...


class Router:
    def __init__(
        self,
        sink: Sink,
        metrics: Metrics,
        tz: tzinfo,
        max_skew: float,
        clock: Callable[[], float],
        relay_id: str = "relay",
        forwarding: bool = False,
        loop_guard: bool = True,
        max_hops: int = 16,
    ) -> None:
        self._sink = sink
        self._metrics = metrics
        self._tz = tz
        self._max_skew = max_skew
        self._clock = clock
        self._forwarding = forwarding
        self._guard = loop_guard
        self._max_hops = max_hops
        self._id = loopguard.safe_id(relay_id)
        self._limiter = RateLimiter(clock)

    def configure(
        self, tz: tzinfo, max_skew: float, forwarding: bool, loop_guard: bool, max_hops: int
    ) -> None:
        """New settings from a reload; the next chunk uses them."""
        self._tz = tz
        self._max_skew = max_skew
        self._forwarding = forwarding
        self._guard = loop_guard
        self._max_hops = max_hops

    def accept(
        self,
        frames: Sequence[bytes | Frame],
        sender: bytes,
        listener: str,
        on_durable: Callable[[], None] | None = None,
    ) -> None:
        """Stage (and queue for forwarding) every frame; malformed input is flagged, not lost.

        ``on_durable`` runs once the whole chunk is fsynced in staging and every spool.
        """
        if not frames:
            if on_durable is not None:
                on_durable()
            return
        now = self._clock()
        sanitize = record.sanitize_host
        tz = self._tz
        now_hour = int(now // 3600)
        skew_hours = self._max_skew / 3600.0
        by_hour: dict[int, list[tuple[bytes, bytes, bytes]]] = {}
        forward: list[bytes] = []
        guard = self._guard
        forwarding = self._forwarding
        sd_id = loopguard.SD_ID
        nbytes = 0
        flagged = 0
        looped = 0
        unguarded = 0
        for frame in frames:
            if type(frame) is bytes:  # the common case: an ordinary frame (Framer.feed_batch)
                msg = frame
                truncated = cut = False
            else:
                msg = frame.msg  # type: ignore[union-attr]
                truncated = frame.truncated  # type: ignore[union-attr]
                cut = frame.cut  # type: ignore[union-attr]
            nbytes += len(msg)
            # bytes.find, not `in`: `x in bytes` first tries x as an int and raises inside.
            if guard and msg.find(sd_id) >= 0:
                verdict, via = loopguard.inspect(msg, self._id, self._max_hops)
                if verdict in (loopguard.Verdict.LOOP, loopguard.Verdict.TOO_MANY_HOPS):
                    looped += 1
                    self._log_loop(verdict, via, sender)
                    continue
            hour, host, malformed = routing_hour(msg, tz, now)
            flags = ""
            if hour is None or abs(hour - now_hour) > skew_hours:
                hour = now_hour
                flags = "R"
            if malformed:
                flags += "M"
            if truncated:
                flags += "T"
            if cut:
                flags += "C"
            if msg.find(b"\0") >= 0:
                flags += "N"
            if not msg.isascii():
                try:
                    msg.decode("utf-8")
                except UnicodeDecodeError:
                    flags += "U"
            if flags:
                flagged += 1
            rec = (sanitize(host), flags.encode() if flags else b"-", msg)
            bucket = by_hour.get(hour)
            if bucket is None:
                by_hour[hour] = [rec]
            else:
                bucket.append(rec)
            if forwarding:
                marked = loopguard.mark(msg, self._id) if guard else msg
                if marked is msg:
                    unguarded += 1
                forward.append(marked)
        # Per-chunk metadata: receive time and sender are formatted once.
        encoder = record.ChunkEncoder(record.format_recv(now), sender)
        self._sink.submit_chunk(
            {hour: encoder.encode_many(items) for hour, items in by_hour.items()},
            forward,
            now,
            on_durable,
        )
        self._metrics.inc("messages_received_total", len(frames), listener=listener)
        self._metrics.inc("bytes_received_total", nbytes, listener=listener)
        if flagged:
            self._metrics.inc("messages_flagged_total", flagged, listener=listener)
        if looped:
            self._metrics.inc("messages_looped_total", looped, listener=listener)
        if unguarded and self._guard:
            self._metrics.inc("forward_unguarded_total", unguarded)

    def _log_loop(self, verdict: loopguard.Verdict, via: list[bytes], sender: bytes) -> None:
        ok, suppressed = self._limiter.allow(verdict.value)
        if ok:
            log.warn(
                "dropping a message from {sender}: {why} (via {via}){more}",
                sender=sender.decode(),
                why="it already passed through this relay (forwarding loop)"
                if verdict is loopguard.Verdict.LOOP
                else "too many relay hops",
                via=",".join(v.decode() for v in via),
                more=f" ({suppressed} similar suppressed)" if suppressed else "",
            )
