"""Log output: readable text on a terminal, compact JSON lines otherwise (journald, files).

Twisted's own jsonFileLogObserver serialises whole events (loggers, class
UUIDs); operators want one small object per line: time, level, namespace,
the formatted message and the event's plain scalar fields for filtering.

Under systemd, with stderr connected to the journal (``$JOURNAL_STREAM`` names
its device and inode, see systemd.exec(5)), every line starts with the
sd-daemon(3) priority prefix ``<N>``: journald takes it off and stores the
priority, so ``journalctl -p warning`` works, and the JSON after it keeps the
fields searchable (``journalctl -u syslog-relay -g '"peer": "10.0.0.7'``, or
``-o cat | jq``).
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, cast

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
    globalLogBeginner,
    textFileLogObserver,
)
from zope.interface import provider

if TYPE_CHECKING:
    from twisted.logger import LogEvent

_SCALARS = (str, int, float, bool)

# Twisted's levels as syslog priorities (sd-daemon(3) prefixes).
PRIORITY = {
    LogLevel.debug: 7,
    LogLevel.info: 6,
    LogLevel.warn: 4,
    LogLevel.error: 3,
    LogLevel.critical: 2,
}


def _prefix(event: LogEvent) -> str:
    return f"<{PRIORITY.get(event.get('log_level', LogLevel.info), 6)}>"


def _json_observer(out: IO[str], journal: bool = False) -> ILogObserver:
    @provider(ILogObserver)  # type: ignore[untyped-decorator,misc]
    def observe(event: LogEvent) -> None:
        level = event.get("log_level")
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": level.name if level is not None else "info",
            "ns": event.get("log_namespace", "-"),
            "msg": formatEvent(event),
        }
        for key, value in event.items():
            if not key.startswith("log_") and isinstance(value, _SCALARS) and key not in line:
                line[key] = value
        failure = event.get("log_failure")
        if failure is not None:
            line["traceback"] = failure.getTraceback()
        text = json.dumps(line, default=str)
        out.write((_prefix(event) + text if journal else text) + "\n")
        out.flush()

    return cast(ILogObserver, observe)


def _journal_text_observer(out: IO[str]) -> ILogObserver:
    """Text lines, each (tracebacks too) with the event's priority prefix."""

    @provider(ILogObserver)  # type: ignore[untyped-decorator,misc]
    def observe(event: LogEvent) -> None:
        text = formatEventAsClassicLogText(event)
        if not text:
            return
        prefix = _prefix(event)
        out.write("".join(prefix + line + "\n" for line in text.splitlines()))
        out.flush()

    return cast(ILogObserver, observe)


def on_journal(out: IO[str], environ: Mapping[str, str] | None = None) -> bool:
    """True when ``out`` is the journal stream systemd gave us ($JOURNAL_STREAM)."""
    env = os.environ if environ is None else environ
    dev, _, ino = env.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(out.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def start_logging(fmt: str = "auto", stream: IO[str] | None = None, level: str = "info") -> None:
    out = stream if stream is not None else sys.stderr
    journal = on_journal(out)
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    observer: ILogObserver
    if use_json:
        observer = _json_observer(out, journal)
    else:
        observer = _journal_text_observer(out) if journal else textFileLogObserver(out)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    filtered = FilteringLogObserver(observer, [predicate])
    globalLogBeginner.beginLoggingTo([filtered], redirectStandardIO=False)
