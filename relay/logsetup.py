"""Log output: readable text on a terminal, compact JSON lines otherwise (journald, files).

Twisted's own jsonFileLogObserver serialises whole events (loggers, class
UUIDs); operators want one small object per line: time, level, namespace,
the formatted message and the event's plain scalar fields for filtering.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
    textFileLogObserver,
)
from zope.interface import provider

_SCALARS = (str, int, float, bool)


def _json_observer(out: IO[str]) -> Any:
    @provider(ILogObserver)  # type: ignore[untyped-decorator,misc]
    def observe(event: dict[str, Any]) -> None:
        level = event.get("log_level")
        line: dict[str, Any] = {
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
        out.write(json.dumps(line, default=str) + "\n")
        out.flush()

    return observe


def start_logging(fmt: str = "auto", stream: IO[str] | None = None, level: str = "info") -> None:
    out = stream if stream is not None else sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    observer: Any = _json_observer(out) if use_json else textFileLogObserver(out)
    predicate: Any = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    filtered: Any = FilteringLogObserver(observer, [predicate])
    globalLogBeginner.beginLoggingTo([filtered], redirectStandardIO=False)
