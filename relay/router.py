"""Router: frames of one received chunk -> staging records and forward payloads.

This is the hot path. Per chunk: one receive time, one pass over the frames
reading only the timestamp and host (relay.classify), records grouped by hour,
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
from relay.classify import routing_fields
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
        frames: Sequence[Frame],
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
        recv = record.format_recv(now)
        now_hour = int(now // 3600)
        by_hour: dict[int, list[bytes]] = {}
        forward: list[bytes] = []
        encode = record.encode
        nbytes = 0
        flagged = 0
        looped = 0
        unguarded = 0
        for frame in frames:
            msg = frame.msg
            nbytes += len(msg)
            if self._guard and loopguard.SD_ID in msg:
                verdict, via = loopguard.inspect(msg, self._id, self._max_hops)
                if verdict in (loopguard.Verdict.LOOP, loopguard.Verdict.TOO_MANY_HOPS):
                    looped += 1
                    self._log_loop(verdict, via, sender)
                    continue
            ts, host, malformed = routing_fields(msg, self._tz, now)
            flags = ""
            if ts is None or abs(ts - now) > self._max_skew:
                hour = now_hour
                flags = "R"
            else:
                hour = int(ts // 3600)
            if malformed:
                flags += "M"
            if frame.truncated:
                flags += "T"
            if frame.cut:
                flags += "C"
            if b"\0" in msg:
                flags += "N"
            if not msg.isascii():
                try:
                    msg.decode("utf-8")
                except UnicodeDecodeError:
                    flags += "U"
            if flags:
                flagged += 1
            rec = encode(
                recv, sender, record.sanitize_host(host), flags.encode() if flags else b"-", msg
            )
            bucket = by_hour.get(hour)
            if bucket is None:
                by_hour[hour] = [rec]
            else:
                bucket.append(rec)
            if self._forwarding:
                marked = loopguard.mark(msg, self._id) if self._guard else msg
                if marked is msg:
                    unguarded += 1
                forward.append(marked)
        self._sink.submit_chunk(
            {hour: b"".join(recs) for hour, recs in by_hour.items()}, forward, now, on_durable
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
