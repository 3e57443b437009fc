"""Counters and histograms kept in the process, and the one list of their names.

The hot path increments plain dict entries (reactor thread only), so counting
costs next to nothing. ``COUNTERS`` and ``HISTOGRAMS`` are the registry: every
name the daemon may count, with its HELP text, its labels and the label values
it can take. ``Metrics.inc`` refuses a name that is not there, so a typo fails
the tests instead of creating a series, and the metrics endpoint
(relay/ops/observe.py) exports every series at 0 from the start, so that
``increase()`` sees the first event. To add a counter: one line in
``COUNTERS``, then ``metrics.inc(name, ...)`` where it happens.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# Label values that are not names from the configuration.
FRAMING_KINDS = (
    "bad_length",
    "length_too_long",
    "oversize_truncated",
    "oversize_rejected",
    "empty",
    "cut",
)
TLS_REFUSALS = (
    "no_certificate",
    "not_permitted",
    "expired",
    "unknown_ca",
    "bad_certificate",
    "protocol_version",
    "handshake_failure",
    "other",
)
SPOOL_DROP_POLICIES = ("drop-newest", "drop-oldest", "too-large")

TLS = ("tls", "relp+tls", "link+tls")
RELP = ("relp", "relp+tls")
LINK = ("link+tls",)
STREAM = ("tcp", "tls", "relp", "relp+tls", "link+tls")  # listeners with connections (not UDP)


@dataclass(frozen=True)
class Counter:
    """A counter's HELP and labels.

    ``listener`` and ``output`` take the configured names (``peer`` the output's
    peers); ``transports`` limits them to listeners or outputs of those transports
    (None: all). Other labels take the fixed ``values``. A counter without labels
    is one series.
    """

    help: str
    labels: tuple[str, ...] = ()
    values: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    transports: tuple[str, ...] | None = None
    # For the few counted both per listener and per output: which one a series has.
    either: bool = False


_L = ("listener",)
_O = ("output",)
_OP = ("output", "peer")

COUNTERS: dict[str, Counter] = {
    # inputs
    "messages_received_total": Counter("Messages received, per listener.", _L),
    "bytes_received_total": Counter(
        "Bytes of whole messages received (TCP/TLS: framing included).", _L
    ),
    "messages_flagged_total": Counter(
        "Messages kept with a flag (malformed, truncated, cut...).", _L
    ),
    "loop_guard_untrusted_total": Counter(
        "Messages marked as looped that came from a listener not trusted with the loop "
        "guard: staged, flagged L, not forwarded.",
        _L,
    ),
    "messages_looped_total": Counter(
        "Forwarded messages that came back (loop guard) and were dropped.", _L
    ),
    "framing_errors_total": Counter(
        "Framing errors by kind (oversize_*, bad_length, empty, cut...).",
        ("listener", "kind"),
        {"kind": FRAMING_KINDS},
    ),
    "connections_opened_total": Counter(
        "Connections accepted, per listener.", _L, transports=STREAM
    ),
    "connections_refused_total": Counter(
        "Connections refused, by reason.",
        ("listener", "reason"),
        {"reason": ("max_connections", "max_connections_per_source")},
        transports=STREAM,
    ),
    "connections_timed_out_total": Counter(
        "Connections closed for idleness.", _L, transports=STREAM
    ),
    "frame_timeouts_total": Counter(
        "Connections closed: a frame was not complete within frame_timeout.",
        _L,
        transports=STREAM,
    ),
    "tls_handshake_refused_total": Counter(
        "TLS handshakes refused, by reason.",
        ("reason",),
        {"reason": TLS_REFUSALS},
        transports=TLS,
    ),
    "tls_handshake_timeouts_total": Counter(
        "TLS handshakes that did not finish in time.", _L, transports=TLS
    ),
    "writer_failures_total": Counter(
        "Times the durable writer thread ended unexpectedly (the relay then exits 1)."
    ),
    "disk_floor_pauses_total": Counter(
        "Times free space on the state directory fell below the floor (inputs paused)."
    ),
    "udp_dropped_total": Counter(
        "UDP datagrams dropped by the relay, by reason (disk_floor: below the free-space floor).",
        ("listener", "reason"),
        {"reason": ("disk_floor",)},
        transports=("udp",),
    ),
    "staging_pruned_files_total": Counter("Staging files deleted by [staging] keep."),
    "staging_pruned_bytes_total": Counter("Bytes of staging files deleted by [staging] keep."),
    "input_pauses_total": Counter("Times the durable writer fell behind and paused the inputs."),
    # RELP input
    "relp_messages_received_total": Counter(
        "Messages received in RELP syslog commands.", _L, transports=RELP
    ),
    "relp_acks_total": Counter(
        "RELP messages acknowledged to the sender (after fsync).", _L, transports=RELP
    ),
    "relp_sessions_closed_total": Counter(
        "RELP sessions closed by the client (close command).", _L, transports=RELP
    ),
    "relp_backpressure_pauses_total": Counter(
        "Times a RELP session stopped reading because its window was full.",
        _L,
        transports=RELP,
    ),
    "relp_answer_backpressure_pauses_total": Counter(
        "Times a RELP session stopped reading because its client left answers unread.",
        _L,
        transports=RELP,
    ),
    "relp_deliver_failures_total": Counter(
        "RELP messages that could not be staged (answered with an error).", _L, transports=RELP
    ),
    "relp_protocol_errors_total": Counter(
        "RELP protocol violations by the peer (the session is closed).",
        ("listener", "output"),
        transports=RELP,
        either=True,
    ),
    # relay link (relay/link, docs/relay-link.md)
    "link_bytes_raw_total": Counter(
        "Relay link: batch bytes before compression, per output.", _O, transports=LINK
    ),
    "link_bytes_wire_total": Counter(
        "Relay link: batch bytes on the wire (after compression), per output.",
        _O,
        transports=LINK,
    ),
    "link_batches_sent_total": Counter(
        "Relay link: batches sent (resent ones included).", _O, transports=LINK
    ),
    "link_acks_total": Counter(
        "Relay link: cumulative acknowledgements received.", _O, transports=LINK
    ),
    "link_records_replayed_total": Counter(
        "Relay link: spool records sent again after a lost connection.", _O, transports=LINK
    ),
    "link_lane_switches_total": Counter(
        "Relay link: times new records took the spool's other lane (a backlog kept draining "
        "in the lane they left).",
        _O,
        transports=LINK,
    ),
    "link_already_committed_total": Counter(
        "Relay link: records the peer had committed already (not resent).",
        _O,
        transports=LINK,
    ),
    "link_ack_timeouts_total": Counter(
        "Relay link: connections abandoned for want of an acknowledgement.",
        _O,
        transports=LINK,
    ),
    "link_refused_total": Counter(
        "Relay link: connections refused or closed for a protocol fault, by reason.",
        ("listener", "output"),
        transports=LINK,
        either=True,
    ),
    "link_refused_by_peer_total": Counter(
        "Relay link: refusals received from the peer, by reason.", _O, transports=LINK
    ),
    "link_sessions_total": Counter(
        "Relay link: sessions accepted by a listener.", _L, transports=LINK
    ),
    "link_batches_received_total": Counter(
        "Relay link: batches received by a listener.", _L, transports=LINK
    ),
    "link_bytes_received_raw_total": Counter(
        "Relay link: raw (decompressed) batch bytes received.", _L, transports=LINK
    ),
    "link_duplicates_suppressed_total": Counter(
        "Relay link: spool records received again and not written (already committed).",
        _L,
        transports=LINK,
    ),
    "link_duplicate_batches_total": Counter(
        "Relay link: batches that were entirely duplicates.", _L, transports=LINK
    ),
    # staging
    "staging_write_errors_total": Counter("Failed staging or spool writes/fsyncs (retried)."),
    "staging_files_closed_total": Counter("Hourly staging files closed for the archiver."),
    "staging_recovery_corrupt_bytes_total": Counter(
        "Bytes of damaged staging blocks set aside in staging/corrupt/ at start-up."
    ),
    "staging_recovery_corrupt_regions_total": Counter(
        "Damaged regions of open staging files set aside at start-up (the rest kept)."
    ),
    "staging_recovery_torn_bytes_total": Counter(
        "Bytes of torn staging tails cut off at start-up (a crash mid-write)."
    ),
    # forward outputs and their spools
    "messages_forwarded_total": Counter(
        "Messages written to a peer (TCP/TLS) or acknowledged by it (RELP).", _O
    ),
    "forward_replayed_total": Counter("Messages sent again after a connection was lost.", _O),
    "forward_unguarded_total": Counter(
        "Messages forwarded without a loop-guard check (no relay.id in the message)."
    ),
    "forward_connects_total": Counter("Connections established to a peer.", _OP),
    "forward_retries_total": Counter(
        "Connection attempts to a peer that failed or were lost.", _OP
    ),
    "forward_failovers_total": Counter("Connections to a peer lost in failover mode.", _OP),
    "forward_failbacks_total": Counter("Switches back to a preferred peer.", _O),
    "relp_client_connections_total": Counter(
        "RELP sessions opened to a peer.", _O, transports=RELP
    ),
    "relp_messages_sent_total": Counter(
        "Messages sent to a RELP peer (retransmissions included).", _O, transports=RELP
    ),
    "relp_nacks_total": Counter(
        "RELP error responses from the peer (the messages are sent again).", _O, transports=RELP
    ),
    "relp_ack_timeouts_total": Counter(
        "RELP sessions abandoned because the peer stopped acknowledging.", _O, transports=RELP
    ),
    "relp_in_flight_lost_total": Counter(
        "RELP messages in flight when a session was lost (sent again).", _O, transports=RELP
    ),
    "spool_dropped_total": Counter(
        "Spool records (a received chunk's messages each) dropped: full or too large.",
        ("output", "policy"),
        {"policy": SPOOL_DROP_POLICIES},
    ),
    "spool_full_blocks_total": Counter("Times a full spool blocked the inputs.", _O),
    "spool_write_errors_total": Counter("Failed spool appends or fsyncs (retried).", _O),
    "spool_read_errors_total": Counter("Failed spool reads (retried).", _O),
    # These two are the spool's own (Spool.snapshot()), read at scrape time.
    "spool_corrupt_records_total": Counter(
        "Corrupt spool records skipped (CRC or framing damage found on reading or recovery).", _O
    ),
    "spool_segments_deleted_total": Counter(
        "Spool segment files deleted: delivered, or dropped by when_full = drop-oldest.", _O
    ),
    # selectors (relay/selection.py): "forward.NAME", "staging", "drop.RULE"
    "messages_selected_total": Counter(
        "Messages a selector took (an output or staging received them; a drop rule dropped them).",
        ("selector",),
    ),
    "messages_not_selected_total": Counter(
        "Messages a selector passed over (not sent to that output or staging; not dropped).",
        ("selector",),
    ),
    # the daemon
    "reloads_total": Counter(
        "Configuration reloads (SIGHUP), by result.",
        ("result",),
        {"result": ("ok", "refused", "failed")},
    ),
}

# Histogram bucket bounds, in seconds.
FSYNC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ACK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
UPLOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


@dataclass(frozen=True)
class HistogramSpec:
    help: str
    buckets: tuple[float, ...]
    labels: tuple[str, ...] = ()


HISTOGRAMS: dict[str, HistogramSpec] = {
    "fsync_duration_seconds": HistogramSpec(
        "Time to fsync staging and every spool once (one group commit).", FSYNC_BUCKETS
    ),
    "forward_ack_latency_seconds": HistogramSpec(
        "From handing messages to a peer connection to their acknowledgement "
        "(RELP: the peer's rsp; TCP/TLS: the peer's TCP acknowledgement, "
        "polled every 10 ms), per acknowledgement.",
        ACK_BUCKETS,
        _O,
    ),
}


class UnknownMetric(KeyError):
    """A name missing from COUNTERS or HISTOGRAMS: add it there (with a HELP line)."""


class Histogram:
    """Cumulative-bucket histogram; ``observe`` may be called from any thread."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = tuple(buckets)
        self._counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[tuple[str, int]], float]:
        """([(le, cumulative count)...] ending with "+Inf", sum)."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        out: list[tuple[str, int]] = []
        acc = 0
        for bound, n in zip((*map(repr, self.bounds), "+Inf"), counts, strict=True):
            acc += n
            out.append((bound, acc))
        return out, total


class Metrics:
    def __init__(self) -> None:
        self.counters: defaultdict[tuple[str, tuple[tuple[str, str], ...]], int] = defaultdict(int)
        self.histograms: dict[tuple[str, tuple[tuple[str, str], ...]], Histogram] = {}
        self._hlock = threading.Lock()

    def inc(self, name: str, n: int = 1, **labels: str) -> None:
        if name not in COUNTERS:
            raise UnknownMetric(name)
        self.counters[(name, tuple(sorted(labels.items())))] += n

    def histogram(self, name: str, **labels: str) -> Histogram:
        """The histogram ``name`` with these labels (created at first use; keep a reference
        where it is observed often)."""
        spec = HISTOGRAMS.get(name)
        if spec is None:
            raise UnknownMetric(name)
        key = (name, tuple(sorted(labels.items())))
        with self._hlock:
            h = self.histograms.get(key)
            if h is None:
                h = self.histograms[key] = Histogram(spec.buckets)
            return h

    def histogram_items(self) -> list[tuple[tuple[str, tuple[tuple[str, str], ...]], Histogram]]:
        with self._hlock:
            return sorted(self.histograms.items(), key=lambda kv: kv[0])

    def get(self, name: str, **labels: str) -> int:
        """Sum of ``name`` over every label set that contains ``labels``."""
        want = set(labels.items())
        return sum(v for (k, lab), v in self.counters.items() if k == name and want <= set(lab))
