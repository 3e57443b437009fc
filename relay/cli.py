"""``syslog-relay``: run, check, loadgen, --version."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from relay import __version__
from relay.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="syslog-relay", description=__doc__)
    p.add_argument("--version", action="version", version=f"syslog-relay {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the relay in the foreground")
    run.add_argument("--config", default=DEFAULT_CONFIG_PATH)
    run.add_argument("--log-format", choices=("auto", "text", "json"), default=None)
    run.add_argument("--log-level", choices=("debug", "info", "warn", "error"), default="info")
    sub.add_parser("loadgen", help="generate syslog load (see: syslog-relay loadgen --help)")
    chk = sub.add_parser("check", help="validate the configuration; exit 2 naming each problem")
    chk.add_argument("--config", default=DEFAULT_CONFIG_PATH)
    chk.add_argument(
        "--no-bind", action="store_true", help="do not test that listen addresses are free"
    )
    return p


def _problems(cfg: Config, bind: bool) -> list[tuple[str, str]]:
    """Checks beyond the schema: TLS material loads, ports are free."""
    problems: list[tuple[str, str]] = []
    if any(lc.transport in ("tls", "relp+tls") for lc in cfg.listen) or cfg.tls.certificate:
        from relay import tls

        problems.extend(tls.check_tls(cfg.tls))
    for i, fc in enumerate(cfg.forward):
        if fc.uses_tls:
            from relay.tlsclient import ClientTLSError, client_options_factory

            try:
                client_options_factory(fc, f"forward[{i}]")
            except ClientTLSError as exc:
                problems.append((exc.key, exc.reason))
    if bind:
        for i, lc in enumerate(cfg.listen):
            family = socket.AF_INET6 if ":" in lc.host else socket.AF_INET
            kind = socket.SOCK_DGRAM if lc.transport == "udp" else socket.SOCK_STREAM
            with socket.socket(family, kind) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((lc.host, lc.port))
                except OSError as exc:
                    problems.append(
                        (f"listen[{i}].address", f"cannot listen on {lc.address}: {exc.strerror}")
                    )
    state = cfg.relay.state_dir
    probe = state if state.exists() else state.parent
    if not os.access(probe, os.W_OK):
        problems.append(("relay.state_dir", f"not writable: {probe}"))
    return problems


def _report(problems: Sequence[tuple[str, str]] | Sequence[str]) -> None:
    for p in problems:
        print(p if isinstance(p, str) else f"{p[0]}: {p[1]}", file=sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        _report(exc.lines())
        return EXIT_CONFIG
    problems = _problems(cfg, bind=not args.no_bind)
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
    problems = _problems(cfg, bind=False)
    if problems:
        _report(problems)
        return EXIT_CONFIG

    from twisted.internet import reactor as _reactor

    from relay import systemd
    from relay.logsetup import start_logging
    from relay.service import ListenError, make_service

    reactor: Any = _reactor
    start_logging(args.log_format or cfg.relay.log_format, level=args.log_level)
    cfg.relay.state_dir.mkdir(parents=True, exist_ok=True)
    service = make_service(cfg, reactor)
    exit_code = [0]

    def started() -> Any:
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

        def failed(f: Any) -> None:
            if f.check(ListenError):
                print(f"{f.value.key}: {f.value.reason}", file=sys.stderr)
            else:
                print(f"startup failed: {f.getErrorMessage()}", file=sys.stderr)
            exit_code[0] = EXIT_CONFIG
            reactor.stop()

        d.addCallbacks(ready, failed)
        return d

    def stopping() -> Any:
        systemd.notify_stopping()
        return service.stopService()

    reactor.callWhenRunning(started)
    reactor.addSystemEventTrigger("before", "shutdown", stopping)
    # SIGTERM/SIGINT: the reactor's own handlers stop it, which runs ``stopping``
    # (stop accepting, drain the writer, fsync) before the process exits.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    reactor.run()
    return exit_code[0]


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["loadgen"]:
        # The load generator has its own argument parser (relay/loadgen.py).
        from relay import loadgen

        return loadgen.main(argv[1:])
    args = _parser().parse_args(argv)
    if args.command == "check":
        return cmd_check(args)
    if args.command == "run":
        return cmd_run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
