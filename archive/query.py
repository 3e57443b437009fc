"""Which messages a read command prints, from where, in what order.

A ``Filter`` decides per message (its own time, host, app-name, facility,
severity, a regular expression); a ``Source`` is one chunk in the bucket or
one staging file on this machine. ``ordered`` reads several sources at once
in worker threads (S3 GETs and zstd release the GIL) and hands their output
back in source order, each worker holding at most ``depth`` pieces: memory is
bounded by workers x depth x one data frame.

The common case costs per block, not per message: a block of a plain chunk
is one slice of lines. A regular expression runs over the whole slice, as
grep does, and only the lines it hits are looked at (their own time, host,
...); without one, a block whose hour lies wholly inside the range and that
no field filter looks at is printed as it is.
"""

from __future__ import annotations

import base64
import json
import queue
import re
import threading
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from pathlib import Path

from archive.reader import Run
from relay.disk import staging
from relay.formats import rfc5424
from relay.formats.routing_fields import message_host, routing_fields
from relay.formats.staging_block import parse_recv, sanitize_host

FACILITIES = (
    "kern user mail daemon auth syslog lpr news uucp cron authpriv ftp ntp security "
    "console solaris-cron local0 local1 local2 local3 local4 local5 local6 local7"
).split()
SEVERITIES = "emerg alert crit err warning notice info debug".split()
_SEVERITY_ALIASES = {"error": 3, "warn": 4, "panic": 0, "critical": 2}


def facility_number(name: str) -> int:
    if name.isdigit() and int(name) < len(FACILITIES):
        return int(name)
    try:
        return FACILITIES.index(name.lower())
    except ValueError:
        raise ValueError(f"unknown facility {name!r} (one of {', '.join(FACILITIES)})") from None


def severity_number(name: str) -> int:
    if name.isdigit() and int(name) < 8:
        return int(name)
    n = name.lower()
    if n in _SEVERITY_ALIASES:
        return _SEVERITY_ALIASES[n]
    try:
        return SEVERITIES.index(n)
    except ValueError:
        raise ValueError(f"unknown severity {name!r} (one of {', '.join(SEVERITIES)})") from None


def _pri(msg: bytes) -> int | None:
    gt = rfc5424.pri_end(msg)
    if gt < 0 or not msg[1:gt].isdigit():
        return None
    v = int(msg[1:gt])
    return v if v < 192 else None


def app_name(msg: bytes, tz: tzinfo, now: float) -> bytes | None:
    """APP-NAME (RFC 5424) or TAG (RFC 3164) of a message."""
    header = rfc5424.header_fields(msg, 3)
    if header is not None:
        _, hsp, asp = header[1]
        return msg[hsp + 1 : asp] if asp >= 0 and msg[hsp + 1 : asp] != b"-" else None
    from archive.json_view import to_fields

    app = to_fields(msg, tz, now).get("app_name")
    return app.encode("utf-8", "replace") if isinstance(app, str) else None


@dataclass(frozen=True)
class Filter:
    start: float  # epoch, included
    end: float  # epoch, excluded
    tz: tzinfo  # the relay's zone, for RFC 3164 timestamps
    host: bytes | None = None
    app: bytes | None = None
    facility: int | None = None
    severity: int | None = None  # this one and more severe (lower numbers)
    grep: re.Pattern[bytes] | None = None

    @property
    def by_fields(self) -> bool:
        return not (self.host is None and self.app is None and self.facility is None) or (
            self.severity is not None
        )

    def message_time(self, msg: bytes, flags: bytes, recv: float) -> float:
        """The message's own time; its receive time when flagged R or without one."""
        if b"R" in flags:
            return recv
        t = routing_fields(msg, self.tz, recv)[0]
        return recv if t is None else t

    def wanted(self, msg: bytes, flags: bytes, recv: float, check_time: bool) -> bool:
        if check_time and not self.start <= self.message_time(msg, flags, recv) < self.end:
            return False
        if self.facility is not None or self.severity is not None:
            pri = _pri(msg)
            if pri is None:
                return False
            if self.facility is not None and pri >> 3 != self.facility:
                return False
            if self.severity is not None and pri & 7 > self.severity:
                return False
        if self.host is not None and sanitize_host(message_host(msg)) != self.host:
            return False
        if self.app is not None and app_name(msg, self.tz, recv) != self.app:
            return False
        return self.grep is None or self.grep.search(msg) is not None

    def hour_inside(self, hour: str) -> bool:
        """Whether every moment of ``hour`` (YYYY-MM-DDTHH, UTC) lies in the range."""
        h = datetime.strptime(hour, "%Y-%m-%dT%H").replace(tzinfo=UTC).timestamp()
        return self.start <= h and h + 3600 <= self.end


def line_pattern(grep: re.Pattern[bytes]) -> re.Pattern[bytes] | None:
    """``grep`` for searching many lines at once (MULTILINE: ``^``/``$`` at line ends),
    or None when it cannot be (``\\A``, ``\\Z`` mean the whole message)."""
    if b"\\A" in grep.pattern or b"\\Z" in grep.pattern:
        return None
    return re.compile(grep.pattern, grep.flags | re.MULTILINE)


_META = frozenset(b".^$*+?{}[]|()\\")
_QUANTIFIERS = frozenset(b"*+?{")
MIN_LITERAL = 3  # shorter: too many candidate lines to confirm one by one


def required_literal(grep: re.Pattern[bytes]) -> bytes | None:
    """Bytes that every match of ``grep`` starts with (its leading plain characters and
    escaped punctuation), or None when there are fewer than MIN_LITERAL.

    Conservative: any ``|`` in the pattern, any flag (IGNORECASE, VERBOSE, ...)
    or an inline group at the start gives None; a character followed by a
    quantifier is not required."""
    p = grep.pattern
    if grep.flags & ~re.UNICODE or b"|" in p:  # bytes patterns carry no UNICODE; be safe
        return None
    out = bytearray()
    i = 0
    while i < len(p):
        c = p[i]
        if c == 0x5C:  # backslash: only an escaped ASCII punctuation character is itself
            if i + 1 < len(p) and p[i + 1] < 0x80 and not chr(p[i + 1]).isalnum():
                out.append(p[i + 1])
                i += 2
                continue
            break
        if c in _META:
            if c in _QUANTIFIERS and out:
                out.pop()
            break
        out.append(c)
        i += 1
    return bytes(out) if len(out) >= MIN_LITERAL else None


@dataclass(frozen=True)
class LineSearch:
    """How to find the lines of many that ``grep`` matches, searching them as one text:
    candidates by a literal every match starts with (``bytes.find``, as grep does)
    or by ``grep`` in MULTILINE mode; each candidate line is then confirmed with
    ``grep`` itself."""

    grep: re.Pattern[bytes]
    literal: bytes | None
    multiline: re.Pattern[bytes] | None


def line_search(grep: re.Pattern[bytes]) -> LineSearch | None:
    """The LineSearch for ``grep``; None when lines must be searched one by one."""
    literal = required_literal(grep)
    multiline = line_pattern(grep) if literal is None else None
    if literal is None and multiline is None:
        return None
    return LineSearch(grep, literal, multiline)


def _line_hits(ls: LineSearch, run: Run) -> list[bytes]:
    """The lines of a verbatim run that ``ls.grep`` finds, searched as one text.

    A candidate's line is confirmed with ``ls.grep`` alone (a MULTILINE match may
    run across lines, or look behind into the previous one)."""
    data, pos, end = run.data, run.start, run.end
    out: list[bytes] = []
    confirm = ls.grep.search
    find = data.find
    literal = ls.literal
    search = ls.multiline.search if ls.multiline is not None else None
    while pos < end:
        if literal is not None:
            at = find(literal, pos, end)
            if at < 0:
                break
        else:
            assert search is not None
            mo = search(data, pos, end)
            if mo is None:
                break
            at = mo.start()
        e = find(b"\n", at, end)
        if e < 0:  # an empty match at the very end, after the last line
            break
        s = max(data.rfind(b"\n", pos, at) + 1, pos)
        line = data[s:e]
        if confirm(line) is not None:
            out.append(line)
        pos = e + 1
    return out


def run_text(run: Run, flt: Filter, inside: bool, ls: LineSearch | None) -> bytes:
    """What ``cat`` prints for one run: each selected message followed by LF.

    With a regular expression (``ls``: its ``line_search``) a verbatim run is
    searched as one text, as grep does, and only the lines it hits go through
    the other filters (their own time, host, ...); otherwise every message does."""
    if run.lines:
        if ls is not None and flt.grep is not None:
            hits = _line_hits(ls, run)
            if hits and (flt.by_fields or not inside):
                recv = parse_recv(run.recv) if run.recv != b"-" else flt.start
                wanted = flt.wanted
                hits = [m for m in hits if wanted(m, run.flags, recv, not inside)]
            return b"".join([m + b"\n" for m in hits])
        if inside and not flt.by_fields and flt.grep is None:
            return run.data[run.start : run.end]
    recv = parse_recv(run.recv) if run.recv != b"-" else flt.start
    wanted = flt.wanted
    msgs = [m for m in run.messages() if wanted(m, run.flags, recv, not inside)]
    return b"".join([m + b"\n" for m in msgs])


def run_json(
    run: Run,
    flt: Filter,
    inside: bool,
    source: str,
    fields: Callable[[bytes, tzinfo, float], dict[str, object]] | None,
) -> bytes:
    """One JSON object per selected message (recv, sender, host, flags, msg, fields, source)."""
    recv = parse_recv(run.recv) if run.recv != b"-" else flt.start
    out: list[bytes] = []
    for m in run.messages():
        if not flt.wanted(m, run.flags, recv, not inside):
            continue
        d: dict[str, object] = {
            "recv": run.recv.decode("ascii", "replace"),
            "sender": run.sender.decode("ascii", "replace"),
            "host": sanitize_host(message_host(m)).decode("ascii", "replace"),
            "flags": run.flags.decode("ascii", "replace"),
            "time": datetime.fromtimestamp(flt.message_time(m, run.flags, recv), UTC)
            .isoformat(timespec="microseconds")
            .replace("+00:00", "Z"),
            "source": source,
        }
        try:
            d["msg"] = m.decode("utf-8")
        except UnicodeDecodeError:
            d["msg"] = m.decode("utf-8", "replace")
            d["msg_base64"] = base64.b64encode(m).decode("ascii")
        if fields is not None:
            # The receive time stands for "now": RFC 3164 stamps have no year.
            d["fields"] = fields(m, flt.tz, recv)
        out.append(json.dumps(d, ensure_ascii=False, default=str, sort_keys=True).encode())
        out.append(b"\n")
    return b"".join(out)


# --- sources -----------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One chunk in the bucket (``key``) or one staging file here (``path``)."""

    hour: str
    relay: str
    part: str
    where: str  # for the user: s3://BUCKET/KEY or staging:PATH
    size: int
    key: str | None = None
    path: Path | None = None
    complete: bool = True  # false: a staging file still being written


def staging_sources(staging_dir: Path, hours: Sequence[str], relay: str) -> list[Source]:
    """Staging files of ``hours`` in ``staging_dir``/closed and /open (closed first)."""
    wanted = set(hours)
    out: list[Source] = []
    for d, complete in (
        (staging.closed_dir(staging_dir), True),
        (staging.open_dir(staging_dir), False),
    ):
        try:
            names = staging.file_names(d)
        except OSError:
            continue
        for name in names:
            split = staging.split_file_name(name)
            if split is None or split[0] not in wanted:
                continue
            hour, part = split
            p = d / name
            try:
                size = p.stat().st_size
            except OSError:
                continue  # archived and removed meanwhile
            out.append(Source(hour, relay, part, f"staging:{p}", size, path=p, complete=complete))
    return out


# --- parallel, ordered ---------------------------------------------------------------


class SourceError(Exception):
    """Reading a source failed part-way; what was read before was handed out."""

    def __init__(self, source: Source, reason: str) -> None:
        super().__init__(reason)
        self.source = source
        self.reason = reason


_DONE = object()


def ordered(
    sources: Sequence[Source],
    work: Callable[[Source], Iterator[bytes]],
    *,
    workers: int = 4,
    depth: int = 4,
) -> Generator[tuple[Source, bytes | SourceError], None, None]:
    """``work(source)`` for every source, ``workers`` at a time, output in source order.

    Each worker's queue holds at most ``depth`` pieces; a failure of a source is
    handed out as a SourceError in its place (the others go on). Stops the
    workers when the consumer stops (``| head``).
    """
    stop = threading.Event()
    queues: list[queue.Queue[object]] = [queue.Queue(maxsize=depth) for _ in sources]

    def put(q: queue.Queue[object], item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def task(i: int) -> None:
        q = queues[i]
        try:
            for piece in work(sources[i]):
                if piece and not put(q, piece):
                    return
        except SourceError as exc:
            put(q, exc)
        except Exception as exc:  # any failure of one source: reported as one line, others go on
            put(q, SourceError(sources[i], f"{type(exc).__name__}: {exc}"))
        put(q, _DONE)

    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="archive-read")
    try:
        for i in range(len(sources)):
            pool.submit(task, i)
        for i, src in enumerate(sources):
            while True:
                item = queues[i].get()
                if item is _DONE:
                    break
                assert isinstance(item, bytes | SourceError)
                yield src, item
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
