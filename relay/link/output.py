"""The ``link+tls`` forward output: spool records -> batches -> one core at a time.

Unlike the RELP feeder (relay.forward.outputs.SpoolFeeder) this one hands out whole
spool records, so a batch is one or more received chunks and its sequence
number is the last record's spool seq. One connection at a time owns the
stream (``RecordFeeder.take``): the receiver's ledger counts on a sender's
records arriving in increasing seq, so records lost in flight on one
connection are sent again, first, by the next owner, and never overtaken by
a connection that already sent later ones. Hence failover only (a
``balance`` link would interleave two streams).

The epoch (``link-epoch`` in the spool directory) changes when the spool is new
or the machine rebooted since it was written (a power loss can give unsynced
seqs again): the receiver then starts a fresh position for this sender.

``LanedLinkOutput`` is what a ``[[forward]]`` table with ``transport =
"link+tls"`` becomes: one ``LinkOutput`` per lane of its spool
(relay.link.lanes), each with its own epoch, connection, window and threads,
so live records in one lane never wait behind a backlog in the other.
"""

from __future__ import annotations

import bisect
import os
import random
import struct
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from relay.config import ForwardConfig
from relay.disk.fileio import fsync_dir
from relay.disk.spool import LINK_EPOCH_FILE, Spool, SpoolRecord
from relay.formats import loop_guard
from relay.forward.outputs import ForwardOutput, Peer
from relay.forward.spool_window import SpoolWindow
from relay.link.lanes import LanedSpool
from relay.link.ledger import boot_id
from relay.link.protocol import (
    LATENCY_BUCKETS,
    BuiltBatch,
    LinkClientFactory,
    LinkClientProtocol,
    build_batch,
)
from relay.link.wire import open_record
from relay.ops.metrics import Metrics
from relay.ops.snapshots import LinkOutputSnapshot, OutputSnapshot

if TYPE_CHECKING:
    from twisted.internet.interfaces import (
        IOpenSSLClientConnectionCreator,
        IStreamClientEndpoint,
    )

    from relay.interfaces import ClientFactory, IRelayReactor

log = Logger(namespace="relay.link")

PREFETCH_RECORDS = 4096
PREFETCH_BYTES = 8 * 1024 * 1024
# A batch holds at least one spool record, and a record is at most 16 MiB.
MAX_RAW = 17 * 1024 * 1024

_EPOCH = struct.Struct("!8sQ64s")  # magic, epoch, boot id
_EPOCH_MAGIC = b"SRLKEPO1"


def load_epoch(directory: Path, boot: Callable[[], str] = boot_id) -> int:
    """This spool's sender epoch; a new one when the file is missing, damaged or from
    another boot (written with fsync, then the directory)."""
    path = directory / LINK_EPOCH_FILE
    this_boot = boot().encode()[:64]
    try:
        data = path.read_bytes()
        body, crc = data[: _EPOCH.size], data[_EPOCH.size :]
        magic, epoch, boot_b = _EPOCH.unpack(body)
        if (
            magic == _EPOCH_MAGIC
            and crc == struct.pack("!I", zlib.crc32(body) & 0xFFFFFFFF)
            and this_boot
            and boot_b.rstrip(b"\0") == this_boot
        ):
            return int(epoch)
    except (OSError, struct.error):
        pass
    epoch = random.getrandbits(63) | 1
    body = _EPOCH.pack(_EPOCH_MAGIC, epoch, this_boot)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, body + struct.pack("!I", zlib.crc32(body) & 0xFFFFFFFF))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(directory)
    return epoch


class LatencyStats:
    """Ack latency histogram (cumulative buckets, as Prometheus wants them)."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        total = 0
        for le, n in zip([*map(str, self.buckets), "+Inf"], self.counts, strict=True):
            total += n
            out.append((le, total))
        return out


class _Rec:
    __slots__ = ("count", "path", "payload", "seq")

    def __init__(
        self, seq: int, path: tuple[bytes, ...], payload: bytes, count: int | None
    ) -> None:
        self.seq = seq
        self.path = path
        self.payload = payload
        self.count = count  # messages, when the spool record says (else counted when sent)


class RecordFeeder(SpoolWindow[_Rec]):
    """Reactor-side window of spool records for one owner connection at a time."""

    _log = log
    prefetch_records = PREFETCH_RECORDS
    prefetch_bytes = PREFETCH_BYTES

    def __init__(
        self,
        spool: Spool,
        reactor: IRelayReactor,
        pool: ThreadPool,
        metrics: Metrics,
        name: str,
        me: bytes,
    ) -> None:
        super().__init__(spool, reactor, pool, metrics, name)
        self.me = me
        self._retry: deque[_Rec] = deque()
        self._outstanding: deque[_Rec] = deque()  # taken by the owner, not acknowledged
        self._owner: object | None = None
        self._skip_upto = 0  # the receiver already committed these
        self.delivered = 0  # records

    # --- in

    def _take_in(self, records: Sequence[SpoolRecord]) -> None:
        me = self.me
        for rec in records:
            path, body, count = open_record(rec.payload)
            self._buffer.append(_Rec(rec.seq, (*path, me), body, count))
            self._buffer_bytes += len(body)

    def _drained(self) -> None:
        self._advance()

    # --- out

    def take(
        self, owner: object, max_bytes: int
    ) -> tuple[list[tuple[int, bytes]], tuple[bytes, ...], int | None] | None:
        """The next batch for ``owner``: records of one path, about ``max_bytes`` (at least
        one), and their message count when every record knows its own (else None)."""
        if self._owner is not None and self._owner is not owner:
            return None
        out: list[tuple[int, bytes]] = []
        path: tuple[bytes, ...] | None = None
        size = 0
        messages: int | None = 0
        while True:
            src = self._retry if self._retry else self._buffer
            if not src:
                break
            rec = src[0]
            if rec.seq <= self._skip_upto:
                src.popleft()
                if src is self._buffer:
                    self._buffer_bytes -= len(rec.payload)
                self.metrics.inc("link_already_committed_total", output=self.name)
                self.delivered += 1
                continue
            if out and (rec.path != path or size + len(rec.payload) + 12 > max_bytes):
                break
            src.popleft()
            if src is self._buffer:
                self._buffer_bytes -= len(rec.payload)
            path = rec.path
            out.append((rec.seq, rec.payload))
            if messages is not None:
                messages = None if rec.count is None else messages + rec.count
            size += len(rec.payload) + 12
            self._outstanding.append(rec)
        self._refill()
        if not out:
            self._advance()
            return None
        self._owner = owner
        assert path is not None
        return out, path, messages

    def committed(self, upto: int) -> None:
        """The receiver has every record up to ``upto`` already (WELCOME)."""
        self._skip_upto = max(self._skip_upto, upto)

    def acked(self, upto: int) -> None:
        while self._outstanding and self._outstanding[0].seq <= upto:
            self._outstanding.popleft()
            self.delivered += 1
        self.metrics.inc("link_acks_total", output=self.name)
        self._advance()

    def lost(self, owner: object) -> None:
        """The owner's connection is gone: its unacknowledged records go first, in order."""
        if owner is not self._owner:
            return
        self._owner = None
        recs = sorted([*self._outstanding, *self._retry], key=lambda r: r.seq)
        replayed = len(self._outstanding)
        self._outstanding.clear()
        self._retry = deque(recs)
        if replayed:
            self.metrics.inc("link_records_replayed_total", replayed, output=self.name)
        self._wake()

    def _advance(self) -> None:
        lowest = [q[0].seq for q in (self._outstanding, self._retry, self._buffer) if q]
        self._ack(min(lowest) - 1 if lowest else self._read_upto)

    @property
    def in_flight(self) -> int:
        return len(self._outstanding)


class LinkOutput(ForwardOutput):
    """A ``[[forward]]`` output with ``transport = "link+tls"``."""

    def __init__(
        self,
        cfg: ForwardConfig,
        spool: Spool,
        reactor: IRelayReactor,
        metrics: Metrics,
        tls_options: Callable[[str], IOpenSSLClientConnectionCreator] | None,
        relay_id: str,
        rng: random.Random | None = None,
        latency: LatencyStats | None = None,
        lane: str = "",
    ) -> None:
        super().__init__(cfg, spool, reactor, metrics, tls_options, rng)
        self.relay_id = relay_id
        self.feeder = RecordFeeder(  # type: ignore[assignment]
            spool, reactor, self.pool, metrics, cfg.name, loop_guard.safe_id(relay_id)
        )
        self.feeder.listeners.append(self._wake_all)
        if lane:
            self.name = f"forward-{cfg.name}-{lane}"
            self.pool.name = f"spool-{cfg.name}-{lane}"
        self.zstd_pool = ThreadPool(
            minthreads=1,
            maxthreads=cfg.compression_threads,
            name=f"link-zstd-{cfg.name}{'-' + lane if lane else ''}",
        )
        self.latency = latency if latency is not None else LatencyStats()
        self.epoch = 0
        self.on_peers: Callable[[], None] | None = None  # a peer connected or went away

    def startService(self) -> None:
        self.epoch = load_epoch(Path(self.feeder.spool.directory))
        self.zstd_pool.start()
        super().startService()

    def stopService(self) -> Deferred[None]:
        d = super().stopService()

        def stop(result: object) -> None:
            self.zstd_pool.stop()

        d.addCallback(stop)
        return d

    @property
    def batches_in_flight(self) -> int:
        # Its peers' factories are LinkClientFactory (_connect).
        return sum(
            cast(LinkClientProtocol, p.factory.current).batches_in_flight
            for p in self.peers
            if p.factory is not None and p.factory.current is not None
        )

    def _build(
        self,
        records: Sequence[tuple[int, bytes]],
        path: Sequence[bytes],
        codec: str,
        level: int,
        messages: int | None = None,
    ) -> Deferred[BuiltBatch]:
        return deferToThreadPool(
            self.reactor, self.zstd_pool, build_batch, records, path, codec, level, messages
        )

    def _connected(self, proto: object, peer: Peer, factory: ClientFactory) -> None:
        super()._connected(proto, peer, factory)
        if self.on_peers is not None:
            self.on_peers()

    def _disconnected(self, peer: Peer, reason: Failure) -> None:
        super()._disconnected(peer, reason)
        if self.on_peers is not None:
            self.on_peers()

    def _connect(self, peer: Peer) -> None:
        peer.connecting = True
        cfg = self.cfg
        codecs = ("zstd", "none") if cfg.compression != "none" else ("none",)
        factory = LinkClientFactory(
            self.output,
            cast(RecordFeeder, self.feeder),  # set in __init__
            self.metrics,
            self.reactor,
            self.relay_id,
            self.epoch,
            self._build,
            codecs,
            cfg.compression_level,
            cfg.window,
            cfg.batch_size,
            MAX_RAW,
            cfg.ack_timeout,
            self.latency,
        )
        factory.on_connection_lost = lambda reason: self._disconnected(peer, reason)
        ep: IStreamClientEndpoint = HostnameEndpoint(
            self.reactor, peer.host, peer.port, timeout=max(1, int(cfg.ack_timeout))
        )
        if cfg.uses_tls:
            assert self._tls_options is not None
            ep = wrapClientTLS(self._tls_options(peer.host), ep)
        d = peer.attempt = cast("Deferred[object]", ep.connect(factory))
        d.addCallbacks(self._connected, self._failed, (peer, factory), {}, (peer,), {})


class _Feeders:
    """The lanes' feeders seen as one (the writer's wake-up, status and metrics)."""

    def __init__(self, feeders: Sequence[RecordFeeder]) -> None:
        self.feeders = tuple(feeders)

    def notify(self) -> None:
        for f in self.feeders:
            f.notify()

    @property
    def in_flight(self) -> int:
        return sum(f.in_flight for f in self.feeders)

    @property
    def delivered(self) -> int:
        return sum(f.delivered for f in self.feeders)


class LanedLinkOutput(MultiService):
    """A ``link+tls`` ``[[forward]]`` output: one ``LinkOutput`` per spool lane."""

    def __init__(
        self,
        cfg: ForwardConfig,
        spool: Spool | LanedSpool,
        reactor: IRelayReactor,
        metrics: Metrics,
        tls_options: Callable[[str], IOpenSSLClientConnectionCreator] | None,
        relay_id: str,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.output = cfg.name
        self.name = f"forward-{cfg.name}"
        self.latency = LatencyStats()
        # A plain Spool (an output turned into a link by a reload) is one lane.
        lanes = spool.lanes if isinstance(spool, LanedSpool) else (spool,)
        self.lanes = [
            LinkOutput(
                cfg,
                lane,
                reactor,
                metrics,
                tls_options,
                relay_id,
                rng,
                latency=self.latency,
                lane=f"lane{i + 1}" if i else "",
            )
            for i, lane in enumerate(lanes)
        ]
        for out in self.lanes:
            out.setServiceParent(self)
            out.on_peers = self._peers_changed
        self._spool = spool
        if isinstance(spool, LanedSpool):
            spool.peer_up = False  # until a lane connects
        self.feeder = _Feeders([cast(RecordFeeder, out.feeder) for out in self.lanes])

    def _peers_changed(self) -> None:
        # Read by the writer thread (relay.link.lanes): a bool, set whole.
        if isinstance(self._spool, LanedSpool):
            self._spool.peer_up = any(p.factory is not None for o in self.lanes for p in o.peers)

    @property
    def peers(self) -> list[Peer]:
        """The first lane's peers (status shows one set; every lane has the same)."""
        return self.lanes[0].peers

    @property
    def healthy_peers(self) -> list[str]:
        seen = [label for out in self.lanes for label in out.healthy_peers]
        return list(dict.fromkeys(seen))

    @property
    def batches_in_flight(self) -> int:
        return sum(out.batches_in_flight for out in self.lanes)

    def snapshot(self) -> OutputSnapshot:
        # The first lane's (transport, mode, its peers: every lane has the same), with
        # the figures of all lanes together.
        return replace(
            self.lanes[0].snapshot(),
            in_flight=self.feeder.in_flight,
            delivered=self.feeder.delivered,
            connected_peers=len(self.healthy_peers),
            link=LinkOutputSnapshot(
                tuple(self.latency.cumulative()), self.latency.sum, self.batches_in_flight
            ),
        )
