"""What the relay's components say about themselves: one frozen snapshot per kind.

Each listener (stream factory, UDP protocol, RELP and relay-link factories), the durable
writer, every spool and every output has a ``snapshot()`` returning one of these;
relay.ops.observe builds /metrics, /health and /status from them and from the counters
(relay.ops.metrics), never from the components' attributes. The Protocols at the end say what
the observer and the reload (relay.service) need of each kind.

Snapshots are taken in the reactor thread at scrape time (and once a second for the
outputs' peers): none is on the hot path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from relay.config import LimitsConfig, ListenConfig


@dataclass(frozen=True)
class ListenerSnapshot:
    # Open connections; None for UDP, which has none.
    connections_open: int | None
    # UDP: datagrams the kernel dropped on the socket, its buffer full (None: unknown).
    receive_drops: int | None = None


@dataclass(frozen=True)
class WriterSnapshot:
    running: bool  # the writer thread is alive (/live)
    pending_bytes: int  # received bytes queued, not yet written
    last_error: str | None  # why staging writes fail now (None: they do not)
    spool_errors: Mapping[str, str]  # output -> why its spool writes fail now
    failure: str | None  # why the thread ended unexpectedly (or did not stop)


@dataclass(frozen=True)
class SpoolSnapshot:
    records: int  # not yet delivered
    bytes: int  # on disk, not yet delivered
    oldest_time: float | None  # of the oldest undelivered record (None: empty)
    disk_bytes: int  # every segment file: the quantity max_spool bounds
    corrupt_records: int  # skipped as corrupt since the spool was opened
    segments_deleted: int  # segment files deleted since the spool was opened
    lane_records: tuple[int, ...] = ()  # a link+tls output's laned spool: records per lane
    lane_switches: int | None = None  # ... and how often appends switched lanes


@dataclass(frozen=True)
class PeerSnapshot:
    label: str  # host:port
    connected: bool
    connecting: bool
    failures: int  # consecutive failed attempts
    retry_at: float  # reactor time of the next attempt after a failure


@dataclass(frozen=True)
class LinkOutputSnapshot:
    """A relay link output's own figures."""

    latency_buckets: tuple[tuple[str, int], ...]  # cumulative, as Prometheus wants them
    latency_sum: float
    batches_in_flight: int


@dataclass(frozen=True)
class OutputSnapshot:
    transport: str
    mode: str
    in_flight: int  # records sent, not yet acknowledged
    delivered: int  # messages acknowledged (or settled)
    connected_peers: int  # peers with a live connection
    peers: tuple[PeerSnapshot, ...] = ()
    link: LinkOutputSnapshot | None = None  # link+tls outputs only


@dataclass(frozen=True)
class LedgerSnapshot:
    """The relay link receiver's dedup ledger (relay.link.service.LinkState)."""

    senders: int  # sending relays (and spool epochs) remembered
    write_errors: int  # ledger appends that failed


# --- what the observer and the reload need of each kind -----------------------------------


class Listener(Protocol):
    """A listening port's protocol factory (or a UDP listener's protocol)."""

    def snapshot(self) -> ListenerSnapshot: ...

    def apply_limits(self, limits: LimitsConfig) -> None:
        """New [limits] from a reload: the next frame, datagram or connection follows them."""

    def close_connections(self) -> None:
        """Its listening port was closed by a reload: end the connections it holds open
        (RELP and relay link); a plain stream listener leaves them to the sender."""


class ReportingWriter(Protocol):
    def snapshot(self) -> WriterSnapshot: ...


class ReportingSpool(Protocol):
    def snapshot(self) -> SpoolSnapshot: ...


class ReportingOutput(Protocol):
    def snapshot(self) -> OutputSnapshot: ...


class ReportingLedger(Protocol):
    def snapshot(self) -> LedgerSnapshot: ...


class ListenAddress(Protocol):
    @property
    def port(self) -> int: ...


class ListeningPort(Protocol):
    """What the relay keeps of a bound port (Twisted's IListeningPort)."""

    def getHost(self) -> ListenAddress: ...

    def stopListening(self) -> object: ...


class BoundListener(NamedTuple):
    """A listener the relay opened: its configuration, its port, and the factory (or UDP
    protocol) that reports on it and takes new limits."""

    config: ListenConfig
    port: ListeningPort
    listener: Listener
