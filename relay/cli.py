"""``syslog-relay``: run, check, loadgen, --version."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from twisted.logger import Logger

from relay import __version__
from relay.config import DEFAULT_CONFIG_PATH, ConfigError, load
from relay.ops.checks import problems_of

EXIT_CONFIG = 2
EXIT_FAILURE = 1  # the durable writer died, or shutdown gave up writes (both logged)
if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.python.failure import Failure

    from relay.interfaces import IRelayReactor
    from relay.service import RelayService

log = Logger(namespace="relay.cli")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="syslog-relay", description=__doc__)
    p.add_argument("--version", action="version", version=f"syslog-relay {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the relay in the foreground")
    run.add_argument("--config", default=DEFAULT_CONFIG_PATH)
    run.add_argument("--log-format", choices=("auto", "text", "json"), default=None)
    run.add_argument("--log-level", choices=("debug", "info", "warn", "error"), default="info")
    st = sub.add_parser("status", help="summary from the running relay (via [metrics] address)")
    st.add_argument("--config", default=DEFAULT_CONFIG_PATH)
    st.add_argument("--json", action="store_true", help="print the JSON /status answer")
    sub.add_parser("loadgen", help="generate syslog load (see: syslog-relay loadgen --help)")
    chk = sub.add_parser("check", help="validate the configuration; exit 2 naming each problem")
    chk.add_argument("--config", default=DEFAULT_CONFIG_PATH)
    # No bind test by default: check must pass against the configuration of a running
    # relay (systemctl reload runs it first), which holds its own addresses.
    chk.add_argument(
        "--bind",
        action="store_true",
        help="also test that the listen and metrics addresses can be bound "
        "(fails while a relay holds them)",
    )
    chk.add_argument("--no-bind", action="store_true", help="no bind test (the default; kept)")
    return p


def _report(problems: Sequence[tuple[str, str]] | Sequence[str]) -> None:
    for p in problems:
        print(p if isinstance(p, str) else f"{p[0]}: {p[1]}", file=sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        _report(exc.lines())
        return EXIT_CONFIG
    problems = problems_of(cfg, bind=args.bind)
    if problems:
        _report(problems)
        return EXIT_CONFIG
    print(f"{args.config}: OK ({len(cfg.listen)} listeners, state in {cfg.relay.state_dir})")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        _report(exc.lines())
        return EXIT_CONFIG
    problems = problems_of(cfg, bind=False)
    if problems:
        _report(problems)
        return EXIT_CONFIG

    from twisted.internet import reactor as _reactor

    from relay.ops import systemd
    from relay.ops.log_setup import start_logging
    from relay.reload import Coalescer
    from relay.service import ListenError, make_service

    reactor = cast("IRelayReactor", _reactor)
    start_logging(args.log_format or cfg.relay.log_format, level=args.log_level)
    cfg.relay.state_dir.mkdir(parents=True, exist_ok=True)
    service = make_service(cfg, reactor)
    exit_code = [0]

    def writer_failed(reason: str) -> None:
        # Nothing more can be staged: exit non-zero so that systemd restarts the relay
        # (/health fails meanwhile; the writer logged why at critical level).
        exit_code[0] = EXIT_FAILURE
        if reactor.running:
            reactor.stop()

    service.writer.on_failure = writer_failed

    def started() -> Deferred[None]:
        service.startService()
        d = service.listen()

        def ready(_: object) -> None:
            systemd.notify_ready(f"listening on {len(cfg.listen)} addresses")
            interval = systemd.watchdog_interval()
            if interval:
                from twisted.internet import task

                ping = task.LoopingCall(systemd.notify_watchdog)
                ping.clock = reactor
                ping.start(interval, now=False)

        def failed(f: Failure) -> None:
            if f.check(ListenError):
                err = cast(ListenError, f.value)
                print(f"{err.key}: {err.reason}", file=sys.stderr)
            else:
                print(f"startup failed: {f.getErrorMessage()}", file=sys.stderr)
            exit_code[0] = EXIT_CONFIG
            reactor.stop()

        d.addCallbacks(ready, failed)
        return d

    def stopping() -> Deferred[None] | None:
        systemd.notify_stopping()
        return service.stopService()

    def reload() -> Deferred[None] | None:
        from relay.service import ReloadError

        systemd.notify_reloading()
        log.info("SIGHUP: reloading {path}", path=args.config)
        try:
            new = load(args.config)
        except ConfigError as exc:
            _reload_refused(service, exc.problems)
            systemd.notify_ready()
            return None
        d = service.reload(new)

        def done(summary: str) -> None:
            log.info("reload complete: {summary}", summary=summary)
            systemd.notify_ready()

        def refused(f: Failure) -> None:
            if f.check(ReloadError):
                _reload_refused(service, cast(ReloadError, f.value).problems)
            else:
                service.metrics.inc("reloads_total", result="failed")
                log.failure("reload failed while it was being applied", f)
            systemd.notify_ready()

        return d.addCallbacks(done, refused)

    # One reload at a time: SIGHUPs during one become a single reload after it.
    reloads = Coalescer(reload)

    reactor.callWhenRunning(started)
    reactor.addSystemEventTrigger("before", "shutdown", stopping)
    # SIGTERM/SIGINT: the reactor's own handlers stop it, which runs ``stopping``
    # (stop accepting, drain the writer, fsync) before the process exits.
    # SIGHUP (systemctl reload): reload configuration and certificates, in the reactor.
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(reloads.request))
    reactor.run()
    if service.writer.failure is not None or service.writer.unwritten:
        return EXIT_FAILURE  # logged: the writer died, or shutdown gave up writes
    return exit_code[0]


def _reload_refused(service: RelayService, problems: Sequence[tuple[str, str]]) -> None:
    service.metrics.inc("reloads_total", result="refused")
    for key, reason in problems:
        log.error(
            "reload refused, the previous configuration stays: {key}: {reason}",
            key=key,
            reason=reason,
        )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["loadgen"]:
        # The load generator has its own argument parser (relay/tools/loadgen.py).
        from relay.tools import loadgen

        return loadgen.main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "check":
        return cmd_check(args)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "status":
        from relay.ops import status

        return status.main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
