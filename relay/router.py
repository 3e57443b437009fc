"""Router: frames of one received chunk -> staging records, one write per hour.

This is the hot path. Per chunk: one receive time, one pass over the frames
reading only the timestamp and host (relay.classify), records grouped by hour
and handed to the writer as one bytes object per hour.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import tzinfo
from typing import Protocol

from relay import record
from relay.classify import routing_fields
from relay.framing import Frame
from relay.metrics import Metrics


class Sink(Protocol):
    def submit(self, hour: int, data: bytes, now: float) -> None: ...


class Router:
    def __init__(
        self,
        sink: Sink,
        metrics: Metrics,
        tz: tzinfo,
        max_skew: float,
        clock: Callable[[], float],
    ) -> None:
        self._sink = sink
        self._metrics = metrics
        self._tz = tz
        self._max_skew = max_skew
        self._clock = clock

    def accept(self, frames: Sequence[Frame], sender: bytes, listener: str) -> None:
        """Stage every frame; never drops one (malformed input is flagged, not lost)."""
        if not frames:
            return
        now = self._clock()
        recv = record.format_recv(now)
        now_hour = int(now // 3600)
        by_hour: dict[int, list[bytes]] = {}
        encode = record.encode
        nbytes = 0
        flagged = 0
        for frame in frames:
            msg = frame.msg
            nbytes += len(msg)
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
        for hour, recs in by_hour.items():
            self._sink.submit(hour, b"".join(recs), now)
        self._metrics.inc("messages_received_total", len(frames), listener=listener)
        self._metrics.inc("bytes_received_total", nbytes, listener=listener)
        if flagged:
            self._metrics.inc("messages_flagged_total", flagged, listener=listener)
