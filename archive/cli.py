"""``syslog-archive``: run the archiver, check the bucket, ls / cat / verify the archive.

Exit status: 0 success; 1 verify found problems (or a command failed at
run time); 2 configuration or storage unusable (check, run start-up).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
import uuid
import zoneinfo
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import IO, TYPE_CHECKING

import zstandard

from archive import __version__, workers
from archive import manifest as mf
from archive.manifest import ManifestError
from archive.plain import MissingMetadata, PlainError
from archive.progress import Progress
from archive.query import (
    Filter,
    LineSearch,
    Source,
    SourceError,
    line_search,
    ordered,
    run_json,
    run_text,
    staging_sources,
)
from archive.reader import (
    TimeSpecError,
    hours_between,
    iter_chunk_runs,
    list_range,
    parse_time,
    read_manifest,
    staging_runs,
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
from relay.disk.staging import closed_dir, open_dir
from relay.formats.staging_block import RecordError
from relay.units import parse_duration


class _Log:
    """The daemon's twisted.logger.Logger, made on first use: the read commands
    (ls, cat, tail) start without importing Twisted."""

    def __getattr__(self, name: str) -> Callable[..., None]:  # info, warn, error, failure
        from twisted.logger import Logger

        method: Callable[..., None] = getattr(Logger(namespace="syslog-archive"), name)
        return method


log = _Log()

MAX_CLOCK_SKEW = 300.0  # seconds; S3 rejects signatures beyond 15 min, warn well before

if TYPE_CHECKING:
    from archive.uploader import Uploader

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
            sp.add_argument(
                "--from", "--since", dest="start", default="-1h", help="start, included (-1h)"
            )
            sp.add_argument(
                "--to", "--until", dest="end", default="now", help="end, excluded (now)"
            )
            zone = sp.add_mutually_exclusive_group()
            zone.add_argument(
                "--local", action="store_true", help="times without a zone are local time"
            )
            zone.add_argument(
                "--tz",
                help="times without a zone are in this zone ([archive] query_timezone: UTC)",
            )
        return sp

    def filters(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--host", help="only messages whose HOST is HOST")
        sp.add_argument("--app", help="only messages whose APP-NAME (RFC 3164: TAG) is APP")
        sp.add_argument("--facility", help="only this facility (name or number)")
        sp.add_argument("--severity", help="only this severity and more severe (err, 3, ...)")
        sp.add_argument("--grep", help="only messages matching this regular expression")
        sp.add_argument("--json", action="store_true", help="one JSON object per message")

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
    ls.add_argument("--json", action="store_true", help="one JSON object per chunk")
    ls.add_argument("--hosts", action="store_true", help="messages per host of each chunk")
    cat = add("cat", "stream the messages of a time range", True)
    filters(cat)
    cat.add_argument(
        "--staging",
        choices=("auto", "no", "only"),
        default="auto",
        help="local staging for the hours not archived yet (auto: when it is here)",
    )
    cat.add_argument("--parallel", type=int, default=4, help="chunks fetched at once (4)")
    tail = add("tail", "the newest messages in local staging; -f follows")
    filters(tail)
    tail.add_argument("-n", "--lines", type=int, default=10, help="how many (10)")
    tail.add_argument("-f", "--follow", action="store_true", help="print new messages as they come")
    verify = add("verify", "check chunks against manifests and the manifest chain", True)
    verify.add_argument(
        "--retention",
        help="expiry of the bucket (e.g. 365d): a chain that starts past it is not a gap",
    )
    status = add("status", "summary from the running archiver (from [metrics] archive_address)")
    status.add_argument("--json", action="store_true", help="print the JSON /status answer")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command(args, _default_store)


# Commands that hold nothing to clean up when they return (workers and threads ended).
_QUICK_EXIT = frozenset({"ls", "cat", "tail"})


def script() -> int:
    """The ``syslog-archive`` command: ``main()``; the read commands then leave without
    the interpreter's teardown of boto3's hundreds of modules (~25 ms, a tenth
    of an empty ``cat``'s start-up), their output flushed first."""
    args = _parser().parse_args()
    code = run_command(args, _default_store)
    if args.command not in _QUICK_EXIT:
        return code
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # `| head`
        pass
    sys.stderr.flush()
    os._exit(code)


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
    args.query_timezone = cfg.archive.query_timezone
    if not cfg.archive.enabled and args.command in ("run", "check"):
        # The packaged default ships with the archive off: that is a valid configuration.
        msg = "archive.enabled: false (set it and archive.bucket to archive to S3)"
        if args.command == "check":
            print(f"{args.config}: OK; archive disabled, bucket not probed ({msg})")
            return 0
        print(f"syslog-archive: config: {msg}", file=sys.stderr)
        return 2
    if not cfg.archive.bucket and args.command != "tail":
        print("syslog-archive: config: archive.bucket: required", file=sys.stderr)
        return 2
    command: Callable[[argparse.Namespace, Config, StoreFactory], int] = {
        "run": _cmd_run,
        "check": _cmd_check,
        "ls": _cmd_ls,
        "cat": _cmd_cat,
        "verify": _cmd_verify,
        "tail": _cmd_tail,
    }[args.command]
    try:
        return command(args, cfg, make_store)
    except (TimeSpecError, _UsageError) as exc:
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
    from relay.ops import systemd
    from relay.ops.log_setup import start_logging

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
        try:
            store.server_time()  # the probe: is the store usable at all?
        except (AccessDenied, NoSuchBucket, ClockSkew) as exc:
            log.error("cannot start: {reason}", reason=_reason(exc, cfg))
            return 2
        except StoreError as exc:
            # Unreachable at start: not fatal, staging holds the data.
            log.warn("storage not reachable yet: {reason}", reason=_reason(exc, cfg))
        uploader = Uploader(cfg, store, hook=_fault_hook(cfg))
        systemd.notify_ready(f"archiving {closed_dir(cfg.staging_dir)} to {cfg.archive.bucket}")
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


def _reloaded(
    args: argparse.Namespace, cfg: Config, make_store: StoreFactory
) -> tuple[Config, ObjectStore, Uploader] | None:
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
        from relay.ops.checks import bind_problems

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


# --- ls / cat / tail / verify -----------------------------------------------------


@dataclass(frozen=True)
class _Range:
    start: datetime
    end: datetime  # excluded
    hours: list[str]
    zone: str  # where times without a zone were taken
    fractions: tuple[bool, bool] = (False, False)  # start, end given finer than a second


def _zone(args: argparse.Namespace) -> tuple[tzinfo | None, str]:
    """The zone of times given without one (None: this machine's), and its name."""
    # Not every subcommand has --tz, --local or the configured zone.
    if getattr(args, "tz", None):
        try:
            return zoneinfo.ZoneInfo(args.tz), args.tz
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise TimeSpecError(f"--tz: unknown time zone {args.tz!r}") from None
    if getattr(args, "local", False):
        # Not datetime.now().astimezone().tzinfo: that is today's fixed offset, an
        # hour off for a summer time asked in winter.
        names = "/".join(dict.fromkeys(time.tzname))
        return None, f"local time ({names})"
    configured = getattr(args, "query_timezone", "UTC")  # [archive] query_timezone
    if configured != "UTC":
        return zoneinfo.ZoneInfo(configured), f"{configured} ([archive] query_timezone)"
    return UTC, "UTC"


def _range(args: argparse.Namespace) -> _Range:
    now = datetime.now(UTC)
    zone, name = _zone(args)
    start = parse_time(args.start, now, zone)
    end = parse_time(args.end, now, zone)
    if end < start:
        raise TimeSpecError(
            f"reversed range: --to/--until {args.end} is before --from/--since {args.start}"
        )
    if end == start:
        raise TimeSpecError(f"empty range: --from and --to are both {_iso(start, True)}")
    if end - start > timedelta(days=3660):
        raise TimeSpecError("range longer than ten years")
    hours = hours_between(start, end - timedelta(microseconds=1))
    # `now` and -10m carry the clock's microseconds: stated to the second.
    fine = tuple("." in spec and spec[:1].isdigit() for spec in (args.start, args.end))
    return _Range(start, end, hours, name, (fine[0], fine[1]))


def _announce(rng: _Range) -> None:
    """The range as understood, on stderr so that a pipe gets only messages."""
    print(
        f"syslog-archive: {_iso(rng.start, rng.fractions[0])} to "
        f"{_iso(rng.end, rng.fractions[1])} (end excluded; times without "
        f"a zone read as {rng.zone})",
        file=sys.stderr,
    )


def _iso(dt: datetime, fraction: bool = False) -> str:
    """UTC to the second; with ``fraction``, also the fraction of a second if any."""
    utc = dt.astimezone(UTC)
    if fraction and utc.microsecond:
        return utc.strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0") + "Z"
    return utc.strftime("%Y-%m-%dT%H:%M:%SZ")


def _hours(args: argparse.Namespace) -> list[str]:
    rng = _range(args)
    _announce(rng)
    return rng.hours


def _cmd_ls(args: argparse.Namespace, cfg: Config, make_store: StoreFactory) -> int:
    store = make_store(cfg)
    listing = list_range(store, cfg.archive.prefix, _hours(args))
    out = sys.stdout
    status = 0
    if not args.json:
        out.write(
            "HOUR           RELAY            PART                     MESSAGES       RAW  "
            "COMPRESSED  HOSTS  KEY\n"
        )
    for c in listing.chunks:
        try:
            got = read_manifest(store, c.manifest_key)
        except ManifestError as exc:
            print(f"syslog-archive: {c.manifest_key}: {exc}", file=sys.stderr)
            got, status = None, 1
        m = got[0] if got else None
        if args.host and (m is None or args.host not in m.hosts):
            continue
        if args.json:
            d: dict[str, object] = {
                "hour": c.hour,
                "relay": c.relay,
                "part": c.part,
                "key": c.key,
                "compressed_size": c.size,
                "manifest": m is not None,
            }
            if m is not None:
                d.update(
                    count=m.count,
                    raw_size=m.raw_size,
                    hosts=list(m.hosts),
                    host_counts=m.host_counts,
                    first_recv=m.first_recv,
                    last_recv=m.last_recv,
                    chunk_format=m.chunk_format,
                    damage=m.damage,
                )
            out.write(json.dumps(d, sort_keys=True) + "\n")
            continue
        count = str(m.count) if m else "?"
        raw = str(m.raw_size) if m else "?"
        hosts = str(len(m.hosts)) if m else "?"
        out.write(
            f"{c.hour}  {c.relay:<15}  {c.part:<23}  {count:>8}  {raw:>8}  {c.size:>10}  "
            f"{hosts:>5}  {c.key}\n"
        )
        if args.hosts and m is not None and m.host_counts is not None:
            for h, n in sorted(m.host_counts.items()):
                out.write(f"    {h:<40}  {n:>8}\n")
    return status


_Fields = Callable[[bytes, tzinfo, float], dict[str, object]]


def _json_fields() -> _Fields | None:
    try:
        from archive.json_view import to_fields
    except ImportError:  # archive.json_view missing: emit the record fields only
        return None
    return to_fields


def _filter(args: argparse.Namespace, cfg: Config, start: float, end: float) -> Filter:
    from archive.query import facility_number, severity_number

    try:
        grep = re.compile(args.grep.encode()) if args.grep else None
    except re.error as exc:
        raise _UsageError(f"--grep: {exc}") from None
    try:
        facility = facility_number(args.facility) if args.facility else None
        severity = severity_number(args.severity) if args.severity else None
    except ValueError as exc:
        raise _UsageError(str(exc)) from None
    return Filter(
        start=start,
        end=end,
        tz=zoneinfo.ZoneInfo(cfg.staging.timezone),
        host=args.host.encode() if args.host else None,
        app=args.app.encode() if args.app else None,
        facility=facility,
        severity=severity,
        grep=grep,
    )


class _UsageError(Exception):
    """A bad option value: one line, exit 2."""


def _cat_sources(
    args: argparse.Namespace, cfg: Config, store: ObjectStore, hours: list[str]
) -> tuple[list[Source], list[str], int]:
    """(sources in time order, notes on where they come from, exit status so far)."""
    sources: list[Source] = []
    notes: list[str] = []
    status = 0
    bucket = f"s3://{cfg.archive.bucket}/{cfg.archive.prefix.strip('/')}"
    archived: set[tuple[str, str, str]] = set()
    if args.staging != "only":
        try:
            listing = list_range(store, cfg.archive.prefix, hours)
        except StoreError as exc:
            local = "reading local staging only" if args.staging == "auto" else "nothing read"
            notes.append(f"storage: {_reason(exc, cfg)}; {local}")
            status = 2 if isinstance(exc, AccessDenied | NoSuchBucket | ClockSkew) else 1
        else:
            for c in listing.chunks:
                archived.add((c.hour, c.relay, c.part))
                sources.append(
                    Source(
                        c.hour,
                        c.relay,
                        c.part,
                        f"s3://{cfg.archive.bucket}/{c.key}",
                        c.size,
                        key=c.key,
                    )
                )
            if hours:
                notes.append(f"{len(listing.chunks)} chunk(s) from {bucket}")
    if args.staging != "no" and cfg.staging_dir.is_dir():
        for src in staging_sources(cfg.staging_dir, hours, cfg.relay.id):
            if (src.hour, src.relay, src.part) in archived:
                continue  # uploaded, not yet removed from staging
            sources.append(src)
            state = "being written" if not src.complete else "closed, not archived yet"
            notes.append(f"{src.hour} from local staging ({state}): {src.path}")
    elif args.staging == "only":
        notes.append(f"no local staging at {cfg.staging_dir}")
        status = status or 1
    sources.sort(key=lambda s: (s.hour, s.part, s.relay))
    return sources, notes, status


def _cmd_cat(args: argparse.Namespace, cfg: Config, make_store: StoreFactory) -> int:
    rng = _range(args)
    flt = _filter(args, cfg, rng.start.timestamp(), rng.end.timestamp())
    _announce(rng)
    store = make_store(cfg)
    fields = _json_fields() if args.json else None
    search = line_search(flt.grep) if flt.grep is not None else None

    def work(src: Source) -> Iterator[bytes]:
        return _read_source(store, src, flt, args, fields, search)

    # A search, field filters or JSON hold the GIL per message: worker processes
    # then, forked before the store's first request (archive.workers).
    procs = workers.start(work, args.parallel) if _per_message(flt, args) else None
    try:
        if procs is None:
            return _cat_run(args, cfg, store, rng, work, max(1, args.parallel))
        # One thread per worker: each takes a worker for a whole source (Workers.run).
        return _cat_run(args, cfg, store, rng, procs.run, len(procs))
    finally:
        if procs is not None:
            procs.close()


def _per_message(flt: Filter, args: argparse.Namespace) -> bool:
    """Whether reading spends its time in Python per message or match (a regular
    expression, field filters, JSON) rather than in zstd, which releases the GIL."""
    return flt.grep is not None or flt.by_fields or bool(args.json)


def _cat_run(
    args: argparse.Namespace,
    cfg: Config,
    store: ObjectStore,
    rng: _Range,
    work: Callable[[Source], Iterator[bytes]],
    parallel: int,
) -> int:
    sources, notes, status = _cat_sources(args, cfg, store, rng.hours)
    for note in notes:
        print(f"syslog-archive: {note}", file=sys.stderr)
    out: IO[bytes] = sys.stdout.buffer
    progress = Progress(len(sources), "cat")
    pieces = ordered(sources, work, workers=parallel)
    try:
        current: Source | None = None
        for src, piece in pieces:
            if src is not current:
                if current is not None:
                    progress.step(0, current.size)
                current = src
            if isinstance(piece, SourceError):
                out.flush()
                print(f"syslog-archive: {src.where}: {piece.reason}", file=sys.stderr)
                status = status or 1
                continue
            out.write(piece)
        if current is not None:
            progress.step(0, current.size)
        progress.finish()
        out.flush()
    except BrokenPipeError:
        # `| head`: not an error; keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        pieces.close()  # stops the readers before the workers are closed
    return status


def _read_source(
    store: ObjectStore,
    src: Source,
    flt: Filter,
    args: argparse.Namespace,
    fields: _Fields | None,
    search: LineSearch | None,
) -> Iterator[bytes]:
    """What ``cat`` prints for one source, in pieces of about a data frame."""
    inside = flt.hour_inside(src.hour)
    expect: int | None = None
    if src.key is not None:
        try:
            got = read_manifest(store, mf.manifest_key_for_chunk(src.key))
        except ManifestError as exc:
            raise SourceError(src, f"manifest unreadable: {exc}") from None
        if got is not None:
            if flt.host is not None and flt.host.decode() not in got[0].hosts:
                return
            expect = got[0].count
    n = 0
    ready: list[bytes] = []  # output of data frames whose checksum was checked
    pending: list[bytes] = []  # output of the data frame being read
    size = 0
    try:
        if src.key is not None:
            # Where neither time nor a field filter looks at a message, its block's
            # receive time and flags do not matter: blocks come merged.
            lines_only = inside and not flt.by_fields and not args.json
            runs = iter_chunk_runs(store, src.key, lines_only)
        else:
            assert src.path is not None
            f = open(src.path, "rb")
            runs = staging_runs(f, src.complete)
        for run in runs:
            n += run.count
            if args.json:
                piece = run_json(run, flt, inside, src.where, fields)
            else:
                piece = run_text(run, flt, inside, search)
            if piece:
                pending.append(piece)
                size += len(piece)
            if run.frame_end:
                ready += pending
                pending = []
                if size >= _PIECE:
                    yield b"".join(ready)
                    ready, size = [], 0
    except MissingMetadata as exc:  # raised after every line was given
        yield b"".join(ready + pending)
        raise SourceError(src, f"damaged: {exc}") from None
    except (RecordError, PlainError) as exc:
        yield b"".join(ready)
        raise SourceError(src, f"damaged: {exc}; the messages before it were printed") from None
    except zstandard.ZstdError as exc:
        yield b"".join(ready)
        raise SourceError(src, f"damaged: not valid zstd ({exc})") from None
    except NotFound:
        raise SourceError(src, "chunk missing (deleted after listing?)") from None
    except StoreError as exc:
        yield b"".join(ready)
        raise SourceError(src, f"storage: {exc}") from None
    except OSError as exc:
        raise SourceError(src, f"cannot read: {exc.strerror or exc}") from None
    finally:
        if src.path is not None and src.key is None:
            try:
                f.close()
            except UnboundLocalError:
                pass
    yield b"".join(ready + pending)
    if expect is not None and n != expect:
        raise SourceError(src, f"holds {n} message(s), its manifest says {expect}")


_PIECE = 4 * 1024 * 1024


def _cmd_tail(args: argparse.Namespace, cfg: Config, make_store: StoreFactory) -> int:
    from archive.tail import tail

    flt = _filter(args, cfg, float("-inf"), float("inf"))
    if args.lines < 0:
        raise _UsageError(f"-n/--lines: {args.lines} is negative")
    if not open_dir(cfg.staging_dir).is_dir():
        print(
            f"syslog-archive: tail: no local staging at {cfg.staging_dir} (run it where the "
            "relay runs, or use cat)",
            file=sys.stderr,
        )
        return 2
    fields = _json_fields() if args.json else None
    try:
        return tail(
            cfg.staging_dir,
            flt,
            lines=args.lines,
            follow=args.follow,
            json_fields=fields,
            as_json=args.json,
        )
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _cmd_verify(args: argparse.Namespace, cfg: Config, make_store: StoreFactory) -> int:
    store = make_store(cfg)
    hours = _hours(args)
    retention = None
    if args.retention:
        try:
            retention = parse_duration(args.retention)
        except ValueError as exc:
            raise _UsageError(f"--retention: {exc}") from None
    progress = Progress(0, "verify")
    result = verify_range(store, cfg.archive.prefix, hours, progress=progress, retention=retention)
    progress.finish()
    for note in result.notes:
        print(note)
    for p in result.problems:
        print(p)
    if result.problems:
        print(
            f"FAILED: {len(result.problems)} problem(s) in {result.chunks} chunk(s), "
            f"{hours[0]}..{hours[-1]}"
        )
        return 1
    print(f"OK: {result.chunks} chunk(s) verified, {hours[0]}..{hours[-1]}")
    return 0
