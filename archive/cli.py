"""``syslog-archive``: run the archiver, check the bucket, ls / cat / verify the archive.

Exit status: 0 success; 1 verify found problems (or a command failed at
run time); 2 configuration or storage unusable (check, run start-up).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import threading
import time
import uuid
import zoneinfo
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta, tzinfo
from typing import IO, Any

from twisted.logger import Logger

from archive import __version__
from archive.progress import Progress
from archive.reader import (
    TimeSpecError,
    hours_between,
    iter_chunk_bytes,
    iter_records,
    list_range,
    match,
    parse_time,
    read_manifest,
)
from archive.store import (
    AccessDenied,
    ClockSkew,
    NoSuchBucket,
    NotFound,
    ObjectStore,
    S3Store,
    StoreError,
    Unavailable,
)
from archive.verify import verify_range
from relay.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load
from relay.record import Record, RecordError

log = Logger(namespace="syslog-archive")

MAX_CLOCK_SKEW = 300.0  # seconds; S3 rejects signatures beyond 15 min, warn well before

StoreFactory = Callable[[Config], ObjectStore]


def _default_store(cfg: Config) -> ObjectStore:
    return S3Store(cfg.archive)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="syslog-archive", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"syslog-archive {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str, with_range: bool = False) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--config", default=DEFAULT_CONFIG_PATH, help="configuration file")
        if with_range:
            sp.add_argument("--from", dest="start", default="-1h", help="start (default -1h)")
            sp.add_argument("--to", dest="end", default="now", help="end, inclusive (default now)")
        return sp

    add("run", "upload closed staging hours until stopped")
    chk = add("check", "validate the configuration and probe the bucket")
    chk.add_argument(
        "--no-probe",
        action="store_true",
        help="validate the configuration only, no bucket probe (what systemctl reload runs)",
    )
    chk.add_argument(
        "--bind", action="store_true", help="also test that metrics.archive_address can be bound"
    )
    ls = add("ls", "list the chunks of a time range", True)
    ls.add_argument("--host", help="only chunks holding messages from HOST")
    cat = add("cat", "stream the messages of a time range", True)
    cat.add_argument("--host", help="only messages whose HOST field is HOST")
    cat.add_argument("--grep", help="only messages matching this regular expression")
    cat.add_argument("--json", action="store_true", help="one JSON object per message")
    add("verify", "check chunks against manifests and the manifest chain", True)
    status = add("status", "summary from the running archiver (from [metrics] archive_address)")
    status.add_argument("--json", action="store_true", help="print the JSON /status answer")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command(args, _default_store)


def run_command(args: argparse.Namespace, make_store: StoreFactory) -> int:
    if args.command == "status":
        from archive.observe import status_main

        return status_main(args)
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        for line in exc.lines():
            print(f"syslog-archive: config: {line}", file=sys.stderr)
        return 2
    if not cfg.archive.enabled and args.command in ("run", "check"):
        # The packaged default ships with the archive off: that is a valid configuration.
        msg = "archive.enabled: false (set it and archive.bucket to archive to S3)"
        if args.command == "check":
            print(f"{args.config}: OK; archive disabled, bucket not probed ({msg})")
            return 0
        print(f"syslog-archive: config: {msg}", file=sys.stderr)
        return 2
    if not cfg.archive.bucket:
        print("syslog-archive: config: archive.bucket: required", file=sys.stderr)
        return 2
    command: Callable[[argparse.Namespace, Config, StoreFactory], int] = {
        "run": _cmd_run,
        "check": _cmd_check,
        "ls": _cmd_ls,
        "cat": _cmd_cat,
        "verify": _cmd_verify,
    }[args.command]
    try:
        return command(args, cfg, make_store)
    except TimeSpecError as exc:
        print(f"syslog-archive: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"syslog-archive: storage: {_reason(exc, cfg)}", file=sys.stderr)
        return 2 if isinstance(exc, AccessDenied | NoSuchBucket | ClockSkew) else 1


def _reason(exc: StoreError, cfg: Config) -> str:
    a = cfg.archive
    where = a.endpoint_url or "the default AWS endpoint"
    if isinstance(exc, Unavailable):
        return f"cannot reach {where} (wrong endpoint, or server down): {exc}"
    if isinstance(exc, AccessDenied):
        return f"access denied by {where} (bad credentials or missing permission): {exc}"
    if isinstance(exc, NoSuchBucket):
        return f"bucket {a.bucket!r} does not exist at {where}: {exc}"
    if isinstance(exc, ClockSkew):
        return f"clock skew: this host's clock differs from the server's: {exc}"
    return str(exc)


# --- run / check -----------------------------------------------------------------


def _cmd_run(args: argparse.Namespace, cfg: Config, make_store: StoreFactory) -> int:
    from archive import observe
    from archive.daemon import Archiver, LockError, acquire_lock, install_signal_handlers
    from archive.observe import ArchiveStats
    from archive.uploader import Uploader
    from relay import systemd
    from relay.logsetup import start_logging

    start_logging(cfg.relay.log_format)
    try:
        lock_fd = acquire_lock(cfg.relay.state_dir)
    except LockError as exc:
        log.error("{reason}", reason=str(exc))
        return 2
    stop = threading.Event()
    reload = threading.Event()
    restore = install_signal_handlers(stop, reload)
    stats = ArchiveStats()
    reporter: observe.StatusReporter | None = None
    server = observe.start(cfg, stats)  # before the probe: /health answers while S3 is down
    try:
        store = make_store(cfg)
        probe = getattr(store, "server_time", None)
        if probe is not None:
            try:
                probe()
            except (AccessDenied, NoSuchBucket, ClockSkew) as exc:
                log.error("cannot start: {reason}", reason=_reason(exc, cfg))
                return 2
            except StoreError as exc:
                # Unreachable at start: not fatal, staging holds the data.
                log.warn("storage not reachable yet: {reason}", reason=_reason(exc, cfg))
        uploader = Uploader(cfg, store, hook=_fault_hook(cfg))
        systemd.notify_ready(f"archiving {cfg.staging_dir / 'closed'} to {cfg.archive.bucket}")
        archiver = Archiver(
            cfg,
            store,
            stop=stop,
            uploader=uploader,
            stats=stats,
            reload=reload,
            reloader=lambda: _reloaded(args, cfg, make_store),
        )
        if os.environ.get("NOTIFY_SOCKET"):  # STATUS= for systemctl status
            reporter = observe.StatusReporter(lambda: archiver.cfg, stats, systemd.notify_status)
            reporter.start()
        code = archiver.run()
        systemd.notify_stopping()
        return code
    finally:
        if reporter is not None:
            reporter.stop()
        if server is not None:
            server.stop()
        restore()
        os.close(lock_fd)


def _reloaded(args: argparse.Namespace, cfg: Config, make_store: StoreFactory) -> Any:
    """SIGHUP: the new (config, store, uploader), or None (logged) if it is refused."""
    from archive.uploader import Uploader

    log.info("SIGHUP: reloading {path}", path=args.config)
    try:
        new = load(args.config)
    except ConfigError as exc:
        for key, reason in exc.problems:
            log.error(
                "reload refused, the previous configuration stays: {key}: {reason}",
                key=key,
                reason=reason,
            )
        return None
    for key, old_v, new_v in (
        ("relay.id", cfg.relay.id, new.relay.id),
        ("relay.state_dir", cfg.relay.state_dir, new.relay.state_dir),
    ):
        if old_v != new_v:
            log.error("reload refused: {key} changed; restart syslog-archive for that", key=key)
            return None
    if not new.archive.enabled or not new.archive.bucket:
        log.error("reload refused: archive.enabled is false or archive.bucket is empty")
        return None
    store = make_store(new)
    return new, store, Uploader(new, store, hook=_fault_hook(new))


def _fault_hook(cfg: Config) -> Callable[[str], None] | None:
    """Fault injection for the kill -9 tests: SYSLOG_ARCHIVE_FAULT_PAUSE=STEP makes
    the uploader write STATE_DIR/archive/paused-STEP and stall there, so a test can
    kill the process at a known point (see uploader.py for the step names)."""
    step = os.environ.get("SYSLOG_ARCHIVE_FAULT_PAUSE")
    if not step:
        return None
    marker = cfg.relay.state_dir / "archive" / f"paused-{step}"

    def hook(name: str) -> None:
        if name == step and not marker.exists():
            marker.write_text(str(os.getpid()))
            time.sleep(120)

    return hook


def _cmd_check(args: argparse.Namespace, cfg: Config, make_store: StoreFactory) -> int:
    # No bind test unless asked: check must pass next to a running archiver.
    if args.bind and cfg.metrics.enabled:
        from relay.checks import bind_problems

        host, port = cfg.metrics.archive_endpoint
        problems = bind_problems("metrics.archive_address", host, port)
        for key, reason in problems:
            print(f"syslog-archive: config: {key}: {reason}", file=sys.stderr)
        if problems:
            return 2
    if args.no_probe:
        print(f"{args.config}: OK; bucket {cfg.archive.bucket!r} not probed (--no-probe)")
        return 0
    store = make_store(cfg)
    if isinstance(store, S3Store):
        # Quick failure for an operator at a terminal: few attempts, short timeouts.
        store = S3Store(cfg.archive, max_attempts=2, connect_timeout=5, read_timeout=15)
    try:
        server = store.server_time() if isinstance(store, S3Store) else None
        if server is not None and abs(server - time.time()) > MAX_CLOCK_SKEW:
            print(
                f"syslog-archive: clock skew: server time differs from this host's by "
                f"{server - time.time():+.0f}s (more than {MAX_CLOCK_SKEW:.0f}s); fix NTP",
                file=sys.stderr,
            )
            return 2
        base = cfg.archive.prefix.strip("/")
        key = f"{base}/.probe/" if base else ".probe/"
        key += f"{cfg.relay.id}-{uuid.uuid4().hex}"
        store.put_bytes(key, b"syslog-archive probe\n", {"probe": "1"})
        info = store.head(key)
        if info is None or info.metadata.get("probe") != "1":
            print(f"syslog-archive: probe object {key} not readable after put", file=sys.stderr)
            return 2
        store.delete(key)
    except StoreError as exc:
        print(f"syslog-archive: check failed: {_reason(exc, cfg)}", file=sys.stderr)
        return 2
    print(f"ok: bucket {cfg.archive.bucket!r} at {cfg.archive.endpoint_url or 'AWS'} writable")
    return 0


# --- ls / cat / verify -----------------------------------------------------------


def _hours(args: argparse.Namespace) -> list[str]:
    now = datetime.now(UTC)
    start = parse_time(args.start, now)
    end = parse_time(args.end, now)
    if end < start:
        raise TimeSpecError(f"--to {args.end} is before --from {args.start}")
    if end - start > timedelta(days=3660):
        raise TimeSpecError("range longer than ten years")
    return hours_between(start, end)


def _cmd_ls(args: argparse.Namespace, cfg: Config, make_store: StoreFactory) -> int:
    store = make_store(cfg)
    listing = list_range(store, cfg.archive.prefix, _hours(args))
    out = sys.stdout
    out.write(
        "HOUR           RELAY            PART                     MESSAGES       RAW  "
        "COMPRESSED  HOSTS  KEY\n"
    )
    for c in listing.chunks:
        got = read_manifest(store, c.manifest_key)
        m = got[0] if got else None
        if args.host and (m is None or args.host not in m.hosts):
            continue
        count = str(m.count) if m else "?"
        raw = str(m.raw_size) if m else "?"
        hosts = str(len(m.hosts)) if m else "?"
        out.write(
            f"{c.hour}  {c.relay:<15}  {c.part:<23}  {count:>8}  {raw:>8}  {c.size:>10}  "
            f"{hosts:>5}  {c.key}\n"
        )
    return 0


_Fields = Callable[[bytes, tzinfo, float], dict[str, object]]


def _json_fields() -> _Fields | None:
    try:
        from relay.parsing import to_fields
    except ImportError:  # relay.parsing missing: emit the record fields only
        return None
    return to_fields


def _record_json(rec: Record, fields: _Fields | None, tz: tzinfo) -> str:
    d: dict[str, Any] = {
        "recv": rec.recv.decode("ascii", "replace"),
        "sender": rec.sender.decode("ascii", "replace"),
        "host": rec.host.decode("ascii", "replace"),
        "flags": rec.flags.decode("ascii", "replace"),
    }
    try:
        d["msg"] = rec.msg.decode("utf-8")
    except UnicodeDecodeError:
        d["msg"] = rec.msg.decode("utf-8", "replace")
        d["msg_base64"] = base64.b64encode(rec.msg).decode("ascii")
    if fields is not None:
        # The receive time stands for "now": RFC 3164 stamps have no year.
        d["fields"] = fields(rec.msg, tz, rec.recv_epoch)
    return json.dumps(d, ensure_ascii=False, default=str, sort_keys=True)


def _cmd_cat(args: argparse.Namespace, cfg: Config, make_store: StoreFactory) -> int:
    store = make_store(cfg)
    listing = list_range(store, cfg.archive.prefix, _hours(args))
    host = args.host.encode() if args.host else None
    try:
        grep = re.compile(args.grep.encode()) if args.grep else None
    except re.error as exc:
        print(f"syslog-archive: --grep: {exc}", file=sys.stderr)
        return 2
    fields = _json_fields() if args.json else None
    tz = zoneinfo.ZoneInfo(cfg.staging.timezone)
    out: IO[bytes] = sys.stdout.buffer
    status = 0
    progress = Progress(len(listing.chunks), "cat")
    try:
        for c in listing.chunks:
            if args.host:
                got = read_manifest(store, c.manifest_key)
                if got is not None and args.host not in got[0].hosts:
                    progress.step()
                    continue
            n = 0
            try:
                for rec in iter_records(iter_chunk_bytes(store, c.key)):
                    n += 1
                    if not match(rec, host, grep):
                        continue
                    if args.json:
                        out.write(_record_json(rec, fields, tz).encode("utf-8") + b"\n")
                    else:
                        out.write(rec.msg + b"\n")
            except (RecordError, NotFound) as exc:
                out.flush()
                print(f"syslog-archive: {c.key}: {exc}", file=sys.stderr)
                status = 1
            progress.step(n, c.size)
        progress.finish()
        out.flush()
    except BrokenPipeError:
        # `| head`: not an error; keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return status


def _cmd_verify(args: argparse.Namespace, cfg: Config, make_store: StoreFactory) -> int:
    store = make_store(cfg)
    hours = _hours(args)
    progress = Progress(0, "verify")
    problems, n = verify_range(store, cfg.archive.prefix, hours, progress=progress)
    progress.finish()
    for p in problems:
        print(p)
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in {n} chunk(s), {hours[0]}..{hours[-1]}")
        return 1
    print(f"OK: {n} chunk(s) verified, {hours[0]}..{hours[-1]}")
    return 0
