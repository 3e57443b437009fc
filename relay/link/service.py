"""Wiring of the receiving side: one ledger and commit log per relay, a factory per listener."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from twisted.logger import Logger

from relay.config import LimitsConfig, ListenConfig
from relay.framing.rfc6587 import Framer
from relay.link.ledger import Commit, CommitLog, Ledger
from relay.link.protocol import LinkServerFactory
from relay.ops.snapshots import LedgerSnapshot
from relay.router import Framed, Router

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from relay.config import Config
    from relay.disk.durable_writer import DurableWriter
    from relay.inputs.connection import Inputs
    from relay.interfaces import HandshakeTimed
    from relay.ops.metrics import Metrics

log = Logger(namespace="relay.link")


class LinkHost(Protocol):
    """What the link's wiring takes from the relay service (relay.service.RelayService)."""

    config: Config
    router: Router
    writer: DurableWriter
    metrics: Metrics
    inputs: Inputs
    link: LinkState | None  # made by the first link listener, shared by the others

    @property
    def reactor(self) -> IReactorTime: ...

    def start_handshake_timer(self, proto: HandshakeTimed) -> None: ...


class LinkState:
    """The receiver's dedup state: recovered once, shared by every link listener."""

    def __init__(self, relay: LinkHost) -> None:
        self.commits = CommitLog(relay.config.relay.state_dir / "link")
        recovered = self.commits.open()
        for problem in self.commits.problems:
            log.warn("relay link ledger: {problem}", problem=problem)
        for undone in self.commits.rolled_back:
            log.warn("relay link ledger: rolled back an unfinished batch: {what}", what=undone)
        log.info("relay link ledger: {n} sending relays/epochs known", n=len(recovered))
        self.ledger = Ledger(recovered)
        relay.writer.journal = self.commits
        relay.writer.add_syncer(self.commits.sync)

    def snapshot(self) -> LedgerSnapshot:
        return LedgerSnapshot(self.ledger.senders, self.commits.write_errors)


def link_factory(relay: LinkHost, lc: ListenConfig, limits: LimitsConfig) -> LinkServerFactory:
    if relay.link is None:
        relay.link = LinkState(relay)
    state: LinkState = relay.link
    cfg = relay.config

    max_message = cfg.link.max_batch_size  # the sender applied its own limits

    def deliver(
        data: bytes | list[bytes] | Framed,
        sender: bytes,
        on_durable: Callable[[], None],
        commit: Commit,
        path: Sequence[bytes],
    ) -> None:
        if isinstance(data, Framed):
            relay.router.route(data, sender, lc.name, on_durable, path=path, commit=commit)
        elif isinstance(data, bytes):
            # Whole octet-counted frames: the hot path frames them with the hour cache.
            framer = Framer("octet-counting", max_message)
            relay.router.receive(
                framer, data, sender, lc.name, on_durable, path=path, commit=commit
            )
        else:
            relay.router.accept(
                data, sender, lc.name, on_durable=on_durable, path=path, commit=commit
            )

    router: Router = relay.router

    def frame(data: bytes) -> Framed:
        return router.frame(Framer("octet-counting", max_message), data)

    return LinkServerFactory(
        lc.name,
        cfg.relay.id,
        deliver,
        state.ledger,
        relay.metrics,
        relay.reactor,
        codecs=cfg.link.compression,
        window=cfg.link.window,
        max_batch=cfg.link.max_batch_size,
        max_raw=cfg.link.max_batch_size,
        max_hops=cfg.relay.max_hops,
        max_connections=limits.max_connections,
        inputs=relay.inputs,
        on_connect=relay.start_handshake_timer,
        # TLS handshake, then HELLO: each within [tls] handshake_timeout.
        hello_timeout=cfg.tls.handshake_timeout * 2,
        frame=frame,
    )
