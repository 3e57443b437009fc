"""The reactor's window on one forward spool: what every output's feeder shares.

Spool calls wait for the disk, so they run in the output's own thread pool (one
thread: reads and acks keep their order). The window reads ahead up to
``prefetch_records`` / ``prefetch_bytes`` and reads again once half of that is
used. It tells the spool how far everything was delivered at most once per
``ACK_FLUSH_DELAY``, with one ack in flight: the newest position wins.
Subclasses keep what was read in ``_buffer`` (``_buffer_bytes`` its payload size)
and decide how records become what the connections send.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from relay.ops.metrics import Metrics

if TYPE_CHECKING:
    from relay.disk.spool import Spool, SpoolRecord
    from relay.interfaces import IRelayReactor

log = Logger(namespace="relay.forward")

ACK_FLUSH_DELAY = 0.05

T = TypeVar("T")


class SpoolWindow(Generic[T]):
    _log: ClassVar[Logger] = log
    prefetch_records: ClassVar[int]  # read ahead at most this many records
    prefetch_bytes: ClassVar[int]  # and this many bytes

    def __init__(
        self, spool: Spool, reactor: IRelayReactor, pool: ThreadPool, metrics: Metrics, name: str
    ) -> None:
        self.spool = spool
        self.reactor = reactor
        self.pool = pool
        self.metrics = metrics
        self.name = name
        self._buffer: deque[T] = deque()  # read, not handed out yet, in spool order
        self._buffer_bytes = 0
        self._read_upto = 0  # highest spool seq read
        self._acked_upto = 0  # highest spool seq told to the spool (or about to be)
        self._reading = False
        self._acking = False
        self._exhausted = False  # the last read returned nothing
        self.listeners: list[Callable[[], None]] = []  # told when there is more to send

    def notify(self) -> None:
        """New records were appended to the spool (called by the writer, coalesced here)."""
        self._exhausted = False
        self._refill()

    def _refill(self) -> None:
        if self._reading or self._exhausted:
            return
        if (
            len(self._buffer) >= self.prefetch_records // 2
            or self._buffer_bytes >= self.prefetch_bytes // 2
        ):
            return
        self._reading = True
        d = deferToThreadPool(
            self.reactor, self.pool, self.spool.read, self.prefetch_records, self.prefetch_bytes
        )
        d.addCallbacks(self._got, self._read_failed)

    def _got(self, records: Sequence[SpoolRecord]) -> None:
        self._reading = False
        if not records:
            self._exhausted = True
            self._drained()
            return
        self._take_in(records)
        self._read_upto = records[-1].seq
        self._wake()
        self._refill()

    def _take_in(self, records: Sequence[SpoolRecord]) -> None:
        """Append what ``records`` hold to ``_buffer`` (and their size to ``_buffer_bytes``)."""
        raise NotImplementedError

    def _drained(self) -> None:
        """The spool had nothing more to read."""

    def _wake(self) -> None:
        for wake in list(self.listeners):
            wake()

    def _read_failed(self, failure: Failure) -> None:
        self._reading = False
        self.metrics.inc("spool_read_errors_total", output=self.name)
        self._log.failure("{output}: reading the spool failed; retrying", failure, output=self.name)
        self.reactor.callLater(1.0, self._refill)

    def _ack(self, upto: int) -> None:
        """Every record up to spool seq ``upto`` was delivered: the spool may drop them."""
        if upto > self._acked_upto:
            self._acked_upto = upto
            if not self._acking:
                self._acking = True
                self.reactor.callLater(ACK_FLUSH_DELAY, self._flush_ack)

    def _flush_ack(self) -> None:
        upto = self._acked_upto
        d = deferToThreadPool(self.reactor, self.pool, self.spool.ack, upto)

        def done(_: object) -> None:
            self._acking = False
            if self._acked_upto > upto:
                self._acking = True
                self.reactor.callLater(ACK_FLUSH_DELAY, self._flush_ack)
            self._refill()

        def failed(failure: Failure) -> None:
            self._log.failure("{output}: spool ack failed", failure, output=self.name)
            done(None)

        d.addCallbacks(done, failed)
