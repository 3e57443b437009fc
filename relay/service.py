"""The one place that wires the relay: config -> writer, router, listeners.

``make_service(config, reactor)`` returns a RelayService (a MultiService).
``listen()`` binds every listener and fails with the listener's config key
when one cannot be bound, so ``run`` can exit 2 naming it.

A reload (SIGHUP) is all or nothing: it first builds everything new (TLS
context, client TLS, spools and outputs, bound sockets) without putting any of
it in use; if one part fails, what was built is undone and the running
configuration is untouched. Only then is it committed. Reloads run one at a
time (a DeferredLock): one arriving while another commits waits for it.
"""

from __future__ import annotations

import socket
import zoneinfo
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IProtocolFactory
from twisted.logger import Logger

from relay import reload as reloading
from relay.config import TLS_TRANSPORTS, Config, ForwardConfig, LimitsConfig, ListenConfig
from relay.disk.durable_writer import DurableWriter
from relay.disk.guard import DiskGuard
from relay.disk.spool import LANE_DIR, Spool, SpoolFull
from relay.disk.staging import StagingStore
from relay.forward.outputs import ForwardOutput
from relay.forward.tls_client import ClientTLSError, client_options_factory
from relay.framing.rfc6587 import Frame, Framer
from relay.inputs import tls_server
from relay.inputs.connection import Inputs
from relay.inputs.tcp_udp import SyslogDatagramProtocol, SyslogStreamFactory
from relay.link.lanes import LanedSpool
from relay.link.ledger import roll_back
from relay.ops import observe
from relay.ops.checks import problems_of
from relay.ops.metrics import Metrics
from relay.ops.snapshots import BoundListener, Listener, ListeningPort
from relay.relp.protocols import RelpServerFactory
from relay.relp.session import MAX_DATALEN
from relay.router import Router
from relay.selection import Selection

if TYPE_CHECKING:
    from twisted.internet import tcp, udp

    from relay.interfaces import HandshakeTimed, IRelayReactor, Waited
    from relay.link.output import LanedLinkOutput
    from relay.link.service import LinkState
    from relay.relp.protocols import Deliver, DeliverFrames

    Output = ForwardOutput | LanedLinkOutput
    # (on_durable, on_written) of one delivery: called once it is fsynced, or written.
    AckHooks = tuple[Callable[[], None] | None, Callable[[], None] | None]

log = Logger(namespace="relay.service")


class ReloadError(Exception):
    """The new configuration was refused; ``problems`` are (key, reason)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{k}: {r}" for k, r in problems))
        self.problems = problems


class ListenError(Exception):
    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


@dataclass
class _Prepared:
    """What a reload built before committing: put in use together, or undone together."""

    tls_install: Callable[[], None] | None = None
    tls_server_created: bool = False
    ports: list[BoundListener] = field(default_factory=list)
    spools: dict[str, Spool | LanedSpool] = field(default_factory=dict)  # of added outputs
    outputs: dict[str, Output] = field(default_factory=dict)  # added and changed


class WriterService(Service):
    def __init__(
        self,
        writer: DurableWriter,
        spools: dict[str, Spool | LanedSpool],
        stop_timeout: float,
        journal_dir: Path | None = None,
    ) -> None:
        self.writer = writer
        self.spools = spools
        self.stop_timeout = stop_timeout
        self.journal_dir = journal_dir  # the relay link's ledger (relay.link.ledger)

    def startService(self) -> None:
        super().startService()
        if self.journal_dir is not None:
            # Before staging and spools are recovered: they are cut back first.
            for undone in roll_back(self.journal_dir):
                log.warn("relay link: rolled back an unfinished batch: {what}", what=undone)
        for name, spool in self.spools.items():
            report = spool.open()
            for problem in report.problems:
                log.warn("spool {name}: {problem}", name=name, problem=problem)
            log.info(
                "spool {name}: {records} records to deliver in {segments} segments",
                name=name,
                records=report.records,
                segments=report.segments,
            )
        self.writer.start()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        return self.writer.stop(self.stop_timeout)


class ListenersService(Service):
    """Owns the listening ports; stops accepting first on shutdown."""

    def __init__(self, relay: RelayService) -> None:
        self.relay = relay
        self.ports: list[BoundListener] = []

    def stopService(self) -> defer.Deferred[list[object]]:
        super().stopService()
        ports, self.ports = self.ports, []
        return defer.gatherResults(
            [defer.maybeDeferred(b.port.stopListening) for b in ports], consumeErrors=True
        )


class RelayService(MultiService):
    def __init__(self, config: Config, reactor: IRelayReactor) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.metrics = Metrics()
        self.inputs = Inputs()
        store = StagingStore(config.staging_dir, config.relay.id, config.archive.grace)
        self.spools: dict[str, Spool | LanedSpool] = {
            fc.name: _spool(config, fc) for fc in config.forward
        }
        self.outputs: dict[str, Output] = {}
        self.tls_server: tls_server.ServerTLS | None = None
        self._reload_lock = defer.DeferredLock()
        self._stopping = False
        self.writer = DurableWriter(
            store,
            reactor,
            self.metrics,
            fsync_interval=config.staging.fsync_interval,
            max_pending=config.staging.max_pending,
            on_pause=self.inputs.pause,
            on_resume=self.inputs.resume,
            clock=reactor.seconds,
            spools=self.spools,
            spool_full=(SpoolFull,),
            on_spooled={name: self._notifier(name) for name in self.spools},
            stage=config.staging.enabled,
        )
        self.router = Router(
            self.writer,
            self.metrics,
            zoneinfo.ZoneInfo(config.staging.timezone),
            config.staging.max_clock_skew,
            reactor.seconds,
            relay_id=config.relay.id,
            forwarding=bool(config.forward),
            loop_guard=config.relay.loop_guard,
            max_hops=config.relay.max_hops,
            staging=config.staging.enabled,
        )
        self.router.trust_loop_guard(config.loop_guard_listeners)
        self.router.select(_selection(config))
        # Order matters on shutdown: MultiService stops children in reverse, so
        # listeners close first, then the outputs, and the writer drains and fsyncs last.
        WriterService(
            self.writer, self.spools, config.staging.stop_timeout, config.relay.state_dir / "link"
        ).setServiceParent(self)
        self.disk = DiskGuard(self, reactor)
        self.disk.setServiceParent(self)
        self._add_outputs()
        self.listeners = ListenersService(self)
        self.listeners.setServiceParent(self)
        self.link: LinkState | None = None  # once a link+tls listener exists
        self.router.mark_inband = _mark_inband(config)
        # Typed here: the relay is checked against what the observer reads (ObservedRelay).
        self.observer = observe.RelayObserver(self)
        self.observer.setServiceParent(self)

    @defer.inlineCallbacks
    def stopService(self) -> Generator[Waited, object, None]:
        # Bound the whole shutdown by the writer's: writes still failing past
        # stop_timeout are given up, so nothing (a reload waiting on the writer,
        # an output) waits on a full disk for ever.
        self._stopping = True
        self.writer.give_up_after(self.config.staging.stop_timeout)
        # A reload in flight finishes first: an output it is stopping is no longer a
        # child, and its thread pool, left running, would keep the process alive.
        yield self._reload_lock.acquire()
        try:
            yield super().stopService()
        finally:
            self._reload_lock.release()

    def _notifier(self, name: str) -> Callable[[], None]:
        def notify() -> None:
            output = self.outputs.get(name)
            if output is not None:
                output.feeder.notify()

        return notify

    def _add_outputs(self) -> None:
        for i, fc in enumerate(self.config.forward):
            self._add_output(fc, i)

    def _add_output(self, fc: ForwardConfig, i: int) -> None:
        tls_options = client_options_factory(fc, f"forward[{i}]") if fc.uses_tls else None
        out = self._output(fc, self.spools[fc.name], tls_options)
        self.outputs[fc.name] = out
        out.setServiceParent(self)  # MultiService starts it when the relay is running

    def _output(
        self,
        fc: ForwardConfig,
        spool: Spool | LanedSpool,
        tls_options: Callable[[str], IOpenSSLClientConnectionCreator] | None,
    ) -> Output:
        """The output service for ``fc``: one connection per spool lane for a relay link."""
        if fc.is_link:
            from relay.link.output import LanedLinkOutput

            return LanedLinkOutput(
                fc, spool, self.reactor, self.metrics, tls_options, self.config.relay.id
            )
        # Not a link: its spool has no lanes (_spool; a reload to or from link+tls is refused).
        return ForwardOutput(fc, cast(Spool, spool), self.reactor, self.metrics, tls_options)

    def _acked(self, ack: str) -> Callable[[defer.Deferred[None]], AckHooks]:
        """(on_durable, on_written) for one delivery whose Deferred fires per ``ack``."""
        reactor = self.reactor

        def hooks(d: defer.Deferred[None]) -> AckHooks:
            if ack == "write":  # in the writer thread, once written to staging and spools
                return None, lambda: reactor.callFromThread(d.callback, None)
            return lambda: d.callback(None), None

        return hooks

    def deliver(self, listener: str, ack: str = "fsync") -> Deliver:
        """RELP input: stage and spool ``messages``; the Deferred fires once they are
        fsynced (``ack`` "fsync") or written (``ack`` "write") everywhere."""
        hooks = self._acked(ack)

        def deliver(messages: list[bytes | Frame], sender: bytes) -> defer.Deferred[None]:
            d: defer.Deferred[None] = defer.Deferred()
            durable, written = hooks(d)
            self.router.accept(messages, sender, listener, on_durable=durable, on_written=written)
            return d

        return deliver

    def deliver_frames(self, listener: str, ack: str = "fsync") -> DeliverFrames:
        """RELP input, fast path: octet-counted frames, staged and spooled as a stream chunk
        is (one scan per chunk, not one lookup per message); fires as ``deliver``'s."""
        router = self.router
        hooks = self._acked(ack)

        def deliver(frames: bytes, sender: bytes) -> defer.Deferred[None]:
            d: defer.Deferred[None] = defer.Deferred()
            # A fresh framer: the chunk holds whole frames, each within the RELP
            # listener's limit, which its parser applied.
            framer = Framer("octet-counting", max_size=MAX_DATALEN)
            durable, written = hooks(d)
            errors = router.receive(framer, frames, sender, listener, durable, written)
            if errors:  # pragma: no cover - the RELP parser checked every frame
                raise AssertionError(f"RELP frames refused by the framer: {errors[0]}")
            return d

        return deliver

    def _factory(self, lc: ListenConfig, limits: LimitsConfig) -> SyslogStreamFactory:
        on_connect = None
        if lc.transport == "tls":
            on_connect = self.start_handshake_timer
        return SyslogStreamFactory(
            name=lc.name,
            transport_name=lc.transport,
            router=self.router,
            metrics=self.metrics,
            inputs=self.inputs,
            framing=lc.framing,
            max_size=limits.max_message_size,
            oversize=limits.oversize,
            max_connections=limits.max_connections,
            idle_timeout=limits.idle_timeout,
            on_connect=on_connect,
            frame_timeout=limits.frame_timeout,
            max_connections_per_source=limits.max_connections_per_source,
            reactor=self.reactor,
        )

    @defer.inlineCallbacks
    def listen(self) -> Generator[Waited, object, None]:
        """Bind every listener; raises ListenError naming the config key."""
        for i, lc in enumerate(self.config.listen):
            yield self.open_listener(i, lc, self.config.limits)

    @defer.inlineCallbacks
    def open_listener(
        self, i: int, lc: ListenConfig, limits: LimitsConfig
    ) -> Generator[Waited, object, BoundListener]:
        """Bind one listener; raises ListenError naming ``listen[i].address``. Fires with
        its BoundListener."""
        key = f"listen[{i}].address"
        listener: Listener
        port: tcp.Port | udp.Port
        try:
            if lc.transport == "udp":
                listener = proto = SyslogDatagramProtocol(
                    lc.name,
                    self.router,
                    self.metrics,
                    limits.max_message_size,
                    limits.oversize,
                    self.reactor,
                )
                port = cast(
                    "udp.Port",
                    self.reactor.listenUDP(
                        lc.port, proto, interface=lc.host, maxPacketSize=65535 + 1
                    ),
                )
                self.inputs.udp_ports.append(port)
                _grow_receive_buffer(port, limits.udp_receive_buffer, lc.name)
            else:
                factory: IProtocolFactory
                if lc.transport.startswith("relp"):
                    listener = factory = self._relp_factory(lc, limits)
                elif lc.transport == "link+tls":
                    from relay.link.service import link_factory

                    listener = factory = link_factory(self, lc, limits)
                else:
                    listener = factory = self._factory(lc, limits)
                if lc.transport in TLS_TRANSPORTS:
                    from relay.inputs.tls_gather import GatheringTLSFactory

                    factory = GatheringTLSFactory(self.server_tls(), False, factory)
                endpoint_cls = TCP6ServerEndpoint if ":" in lc.host else TCP4ServerEndpoint
                endpoint = endpoint_cls(self.reactor, lc.port, backlog=1024, interface=lc.host)
                port = cast("tcp.Port", (yield endpoint.listen(factory)))
        except Exception as exc:  # translated at the boundary: bind errors vary by OS
            raise ListenError(key, f"cannot listen on {lc.address}: {exc}") from exc
        bound = BoundListener(lc, port, listener)
        self.listeners.ports.append(bound)
        log.info(
            "listening on {address} ({transport}, framing {framing})",
            address=_bound_address(port, lc),
            transport=lc.transport,
            framing=lc.framing if lc.transport != "udp" else "datagram",
        )
        return bound

    def server_tls(self) -> tls_server.ServerTLS:
        """The ServerTLS shared by every TLS listener (built on first use, reloadable)."""
        if self.tls_server is None:
            self.tls_server = tls_server.ServerTLS(self.config.tls, self._tls_rejected)
        return self.tls_server

    # --- reload (SIGHUP)

    @defer.inlineCallbacks
    def reload(self, new: Config) -> Generator[Waited, object, str]:
        """Apply ``new`` without dropping established connections or spooled records.

        All or nothing: on any problem (a check, TLS material, a spool, an address
        that does not bind) nothing changes and ReloadError names it. One reload
        runs at a time; a call made meanwhile waits its turn. Returns the summary.
        """
        yield self._reload_lock.acquire()
        try:
            summary = cast(str, (yield self._reload(new)))
        finally:
            self._reload_lock.release()
        return summary

    @defer.inlineCallbacks
    def _reload(self, new: Config) -> Generator[Waited, object, str]:
        if self._stopping:
            raise ReloadError([("reload", "the relay is stopping")])
        problems = problems_of(new, bind=False)
        if problems:
            raise ReloadError(problems)
        p = reloading.plan(self.config, new)
        prepared = _Prepared()
        try:
            yield self._prepare(p, new, prepared)
        except BaseException:
            self._undo(prepared)
            raise
        # Commit: everything new is built and bound; nothing below refuses.
        self.config = new
        if prepared.tls_install is not None:
            prepared.tls_install()
        for lc in p.listeners_close:
            for entry in list(self.listeners.ports):
                if entry.config == lc:
                    self.listeners.ports.remove(entry)
                    self._close_port(entry)
                    log.info("closed listener {address} ({t})", address=lc.address, t=lc.transport)
        self._apply_limits(new)
        self._apply_router(new)
        yield self._apply_outputs(p, prepared)
        self.metrics.inc("reloads_total", result="ok")
        if p.restart_required:
            log.warn(
                "reload: these settings need a restart and were not changed: {keys}",
                keys=", ".join(p.restart_required),
            )
        return p.summary()

    @defer.inlineCallbacks
    def _prepare(
        self, p: reloading.ReloadPlan, new: Config, prepared: _Prepared
    ) -> Generator[Waited, object, None]:
        """Build and bind what ``new`` adds, nothing in use yet; ReloadError on a problem."""
        if any(lc.transport in ("tls", "relp+tls") for lc in new.listen):
            try:
                if self.tls_server is None:
                    self.tls_server = tls_server.ServerTLS(new.tls, self._tls_rejected)
                    prepared.tls_server_created = True
                else:
                    prepared.tls_install = self.tls_server.prepare(new.tls)
            except Exception as exc:  # translated at the boundary: TLSSetupError, OpenSSL errors
                raise ReloadError([("tls", str(exc))]) from exc
        for i, fc in enumerate(new.forward):
            if fc not in p.outputs_add and fc not in p.outputs_change:
                continue
            try:
                tls_options = client_options_factory(fc, f"forward[{i}]") if fc.uses_tls else None
            except ClientTLSError as exc:
                raise ReloadError([(exc.key, exc.reason)]) from exc
            spool = self.spools.get(fc.name)
            if spool is not None and isinstance(spool, LanedSpool) != fc.is_link:
                raise ReloadError(
                    [
                        (
                            f"forward[{i}].transport",
                            'changing to or from "link+tls" needs a restart (the spool\'s '
                            "lanes are opened at start)",
                        )
                    ]
                )
            if spool is None:
                spool = _spool(new, fc)
                try:
                    spool.open()
                except OSError as exc:
                    raise ReloadError(
                        [(f"forward[{i}].name", f"cannot open spool {spool.directory}: {exc}")]
                    ) from exc
                prepared.spools[fc.name] = spool
            prepared.outputs[fc.name] = self._output(fc, spool, tls_options)
        for i, lc in p.listeners_open:
            try:
                prepared.ports.append(
                    cast(BoundListener, (yield self.open_listener(i, lc, new.limits)))
                )
            except ListenError as exc:
                raise ReloadError([(exc.key, exc.reason)]) from exc

    def _undo(self, prepared: _Prepared) -> None:
        """A refused reload: close what _prepare opened; the running set stays as it was."""
        for bound in prepared.ports:
            lc = bound.config
            self.listeners.ports = [e for e in self.listeners.ports if e.port is not bound.port]
            self._close_port(bound)
            log.info(
                "closed listener {address} ({t}) again: reload refused",
                address=lc.address,
                t=lc.transport,
            )
        for spool in prepared.spools.values():
            spool.close()
        if prepared.tls_server_created:
            self.tls_server = None

    def _close_port(self, bound: BoundListener) -> None:
        port = bound.port
        port.stopListening()
        if port in self.inputs.udp_ports:
            self.inputs.udp_ports.remove(port)
        bound.listener.close_connections()

    def _apply_limits(self, new: Config) -> None:
        # Every kind of listener takes them itself (stream, RELP, link factories; the
        # UDP protocol): setting attributes where found had missed RELP's max_data.
        for bound in self.listeners.ports:
            bound.listener.apply_limits(new.limits)
        self.writer.set_limits(new.staging.fsync_interval, new.staging.max_pending)

    def _apply_router(self, new: Config) -> None:
        self.router.configure(
            tz=zoneinfo.ZoneInfo(new.staging.timezone),
            max_skew=new.staging.max_clock_skew,
            forwarding=bool(new.forward),
            loop_guard=new.relay.loop_guard,
            max_hops=new.relay.max_hops,
        )
        self.router.trust_loop_guard(new.loop_guard_listeners)
        self.router.mark_inband = _mark_inband(new)
        self.router.select(_selection(new))

    @defer.inlineCallbacks
    def _apply_outputs(
        self, p: reloading.ReloadPlan, prepared: _Prepared
    ) -> Generator[Waited, object, None]:
        for name in p.outputs_remove + [f.name for f in p.outputs_change]:
            out = self.outputs.pop(name)
            yield out.disownServiceParent()  # its spool reader thread is joined
        spools = dict(self.spools)
        for name in p.outputs_remove:
            spool = spools.pop(name)
            log.warn(
                "output {name} removed: its spool is kept at {path} with {n} undelivered "
                "records (add the output back to deliver them)",
                name=name,
                path=str(spool.directory),
                n=spool.depth_records,
            )
        spools.update(prepared.spools)
        for fc in p.outputs_change:
            # The new connections start from the first unacknowledged record.
            spools[fc.name].rewind()
            spools[fc.name].max_bytes = fc.max_spool
            spools[fc.name].when_full = fc.when_full
            laned = spools[fc.name]
            if isinstance(laned, LanedSpool):
                laned.live_lane_after = fc.live_lane_after
        self.spools = spools
        # The writer closes the removed spools in order with what is queued; the
        # reload ends only then, so the next one may open the same directory again.
        closed = self.writer.set_spools(spools, {n: self._notifier(n) for n in spools})
        for fc in p.outputs_add + p.outputs_change:
            out = prepared.outputs[fc.name]
            self.outputs[fc.name] = out
            out.setServiceParent(self)  # MultiService starts it when the relay is running
            log.info(
                "output {name}: {what}",
                name=fc.name,
                what="started" if fc in p.outputs_add else "restarted with its new settings",
            )
        yield closed

    def _relp_factory(self, lc: ListenConfig, limits: LimitsConfig) -> RelpServerFactory:
        return RelpServerFactory(
            lc.name,
            self.deliver(lc.name, lc.ack),
            self.metrics,
            self.reactor,
            max_data=limits.max_message_size,
            oversize=limits.oversize,
            idle_timeout=limits.idle_timeout,
            max_connections=limits.max_connections,
            inputs=self.inputs,
            scheme=lc.transport,
            on_connect=self.start_handshake_timer if lc.transport == "relp+tls" else None,
            frame_timeout=limits.frame_timeout,
            max_connections_per_source=limits.max_connections_per_source,
            deliver_frames=self.deliver_frames(lc.name, lc.ack),
        )

    def start_handshake_timer(self, proto: HandshakeTimed) -> None:
        name = proto.factory.name
        call = tls_server.start_handshake_timer(
            proto.transport,
            self.reactor,
            self.config.tls.handshake_timeout,
            on_timeout=lambda: self.metrics.inc("tls_handshake_timeouts_total", listener=name),
        )
        proto.on_lost(call)

    def _tls_rejected(self, reason: str) -> None:
        self.metrics.inc("tls_handshake_refused_total", reason=reason)


def _mark_inband(config: Config) -> bool:
    """In-band loop-guard marks are needed unless every output is a relay link
    (whose batches carry the path: messages then stay byte-exact)."""
    return not config.forward or not all(fc.is_link for fc in config.forward)


def _spool(config: Config, fc: ForwardConfig) -> Spool | LanedSpool:
    directory = config.relay.state_dir / "spool" / fc.name
    if fc.is_link:
        return LanedSpool(directory, fc.max_spool, fc.when_full, fc.live_lane_after)
    if any((directory / LANE_DIR).glob("*.seg")):
        log.warn(
            "spool {dir}: {lane}/ holds the second lane of a former link+tls output, which "
            "transport {t} does not send (make the output link+tls again to deliver it)",
            dir=str(directory),
            lane=LANE_DIR,
            t=fc.transport,
        )
    return Spool(directory, fc.max_spool, fc.when_full)


def _bound_address(port: ListeningPort, lc: ListenConfig) -> str:
    host = port.getHost()
    return f"{lc.host}:{host.port}"


def _grow_receive_buffer(port: udp.Port, size: int, name: str) -> None:
    """A larger socket buffer absorbs bursts while the reactor is busy.

    SO_RCVBUFFORCE passes net.core.rmem_max when the process may (root or
    CAP_NET_ADMIN); otherwise SO_RCVBUF gets what the kernel allows.
    """
    if not size:
        return
    sock: socket.socket = port.socket
    try:
        # Linux only; 33 is its value where Python's socket module lacks the name.
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_RCVBUFFORCE", 33), size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    if got < size:
        log.warn(
            "{listener}: UDP receive buffer is {got} bytes, not {want}: raise net.core.rmem_max",
            listener=name,
            got=got,
            want=size,
        )


def make_service(config: Config, reactor: IRelayReactor) -> RelayService:
    return RelayService(config, reactor)


def _selection(config: Config) -> Selection | None:
    """The router's selectors (relay.selection); None when none is configured."""
    sel = config.selectors
    return None if sel is None else Selection(sel)
