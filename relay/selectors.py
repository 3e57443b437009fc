"""Selectors: which messages an output, staging or a drop rule takes.

Syntax (TOML, one table; its keys are ANDed)::

    facility = ["auth", "authpriv"]     # rsyslog names; any of them
    severity = "warning"                # warning or more severe ($syslogseverity <= 4)
    severity = ["err", "crit"]          # exactly these
    severity_below = "notice"           # less severe than notice (info, debug)
    host = ["web-*", "db?"]             # glob on HOSTNAME (case-insensitive)
    app = "sshd"                        # glob on APP-NAME (RFC 3164: the tag)
    listener = ["tenant-a"]             # the [[listen]] the message came in on
    regex = "session opened"            # re.search on the message bytes as received
    malformed = true                    # the message has no readable header (flag M)
    any = [{...}, {...}]                # one of these selectors
    all = [{...}, {...}]                # each of these selectors
    not = {...}                         # not this selector

Parsing and validation are here (errors name the key); ``compile_plan`` turns
the configured selectors into per-listener decisions (relay.selection applies
them to chunks). Facility and severity come from the PRI; without one a
message is user.notice (RFC 3164 4.3.3). Host and app never match a malformed
message: select those with ``malformed = true``.

Regexes use Python's ``re`` (the linear-time RE2 binding is not packaged for
Debian 12): each sees at most the first ``REGEX_WINDOW`` bytes of a message,
which bounds the time any pattern can take per message, and patterns with a
quantified group that itself holds an unbounded quantifier (``(a+)+``, the
classic catastrophic shape) are refused by ``check``.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from relay.formats import rfc3164, rfc5424

# rsyslog's names (runtime/syslogd-types.h, rsyslog.conf(5)).
FACILITIES: dict[str, int] = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6,
    "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11, "ntp": 12,
    "security": 13, "audit": 13, "console": 14, "alert": 14, "clock": 15,
    **{f"local{i}": 16 + i for i in range(8)},
}  # fmt: skip
SEVERITIES: dict[str, int] = {
    "emerg": 0, "panic": 0, "alert": 1, "crit": 2, "err": 3, "error": 3,
    "warning": 4, "warn": 4, "notice": 5, "info": 6, "debug": 7,
}  # fmt: skip
NO_PRI = 13  # user.notice
REGEX_WINDOW = 4096
_ALL_PRI = frozenset(range(192))
_KEYS = (
    "facility", "severity", "severity_below", "host", "app", "listener", "regex",
    "malformed", "any", "all", "not",
)  # fmt: skip


class SelectorError(ValueError):
    """A selector that cannot be used; ``key`` is the dotted key below the selector."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key
        self.reason = reason


# --- the tree


@dataclass(frozen=True)
class Pri:
    """The PRI (facility * 8 + severity) is one of ``values``."""

    values: frozenset[int]


@dataclass(frozen=True)
class Glob:
    field: str  # "host" or "app"
    pattern: re.Pattern[bytes]


@dataclass(frozen=True)
class Listener:
    names: frozenset[str]


@dataclass(frozen=True)
class Regex:
    pattern: re.Pattern[bytes]


@dataclass(frozen=True)
class Malformed:
    value: bool


@dataclass(frozen=True)
class All:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Any_:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Not:
    item: Node


Node = Pri | Glob | Listener | Regex | Malformed | All | Any_ | Not


# --- parsing


def parse(raw: object, listeners: frozenset[str] | None = None) -> Node:
    """The selector tree of a TOML table; raises SelectorError naming the key."""
    node = _parse(raw, "", listeners)
    if not any(_pri_verdict(node, p, None) is not False for p in range(192)):
        raise SelectorError("", "can never match (its facility/severity conditions exclude it)")
    return node


def _sub(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _names(v: object, key: str) -> list[str]:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
        raise SelectorError(key, "expected a name or a non-empty list of names")
    return list(v)


def _parse(raw: object, where: str, listeners: frozenset[str] | None) -> Node:
    if not isinstance(raw, dict):
        raise SelectorError(where, f"expected a table, got {type(raw).__name__}")
    if not raw:
        raise SelectorError(where, "empty selector (leave it out to take everything)")
    items: list[Node] = []
    for key, v in raw.items():
        k = _sub(where, key)
        if key not in _KEYS:
            raise SelectorError(k, f"unknown key (one of {', '.join(_KEYS)})")
        if key == "facility":
            codes = set()
            for name in _names(v, k):
                if name.lower() not in FACILITIES:
                    raise SelectorError(k, f"unknown facility {name!r}")
                codes.add(FACILITIES[name.lower()])
            items.append(Pri(frozenset(p for p in _ALL_PRI if p >> 3 in codes)))
        elif key in ("severity", "severity_below"):
            names = _names(v, k)
            sev = []
            for name in names:
                if name.lower() not in SEVERITIES:
                    raise SelectorError(k, f"unknown severity {name!r}")
                sev.append(SEVERITIES[name.lower()])
            if key == "severity_below":
                if len(sev) != 1:
                    raise SelectorError(k, "expected one severity")
                ok = set(range(sev[0] + 1, 8))
                if not ok:
                    raise SelectorError(k, "nothing is less severe than debug: can never match")
            elif isinstance(v, str):
                ok = set(range(sev[0] + 1))  # at or above: as severe or more
            else:
                ok = set(sev)
            items.append(Pri(frozenset(p for p in _ALL_PRI if p & 7 in ok)))
        elif key in ("host", "app"):
            items.append(Glob(key, _glob(_names(v, k), k, ignore_case=key == "host")))
        elif key == "listener":
            names = _names(v, k)
            if listeners is not None:
                for name in names:
                    if name not in listeners:
                        raise SelectorError(k, f"no [[listen]] is named {name!r}")
            items.append(Listener(frozenset(names)))
        elif key == "regex":
            items.append(Regex(_regex(v, k)))
        elif key == "malformed":
            if not isinstance(v, bool):
                raise SelectorError(k, "expected true or false")
            items.append(Malformed(v))
        elif key in ("any", "all"):
            if not isinstance(v, list) or not v:
                raise SelectorError(k, "expected a non-empty array of selectors")
            subs = tuple(_parse(x, f"{k}[{i}]", listeners) for i, x in enumerate(v))
            items.append(Any_(subs) if key == "any" else All(subs))
        else:  # not
            items.append(Not(_parse(v, k, listeners)))
    return items[0] if len(items) == 1 else All(tuple(items))


def _glob(patterns: list[str], key: str, ignore_case: bool) -> re.Pattern[bytes]:
    parts = []
    for p in patterns:
        if any(c.isspace() or not c.isprintable() for c in p) or not p.isascii():
            raise SelectorError(key, f"bad glob {p!r}: printable ASCII without spaces only")
        depth = 0
        for c in p:
            if c == "[":
                depth += 1
            elif c == "]" and depth:
                depth = 0
        if depth:
            raise SelectorError(key, f"bad glob {p!r}: '[' without a closing ']'")
        parts.append(fnmatch.translate(p))
    return re.compile("|".join(parts).encode(), re.IGNORECASE if ignore_case else 0)


# A group quantified while it holds an unbounded quantifier: (a+)+, (a*b?)*, (x|y+){2,}.
_NESTED = re.compile(r"\((?:[^()\\]|\\.)*(?:[+*]|\{\d*,\})(?:[^()\\]|\\.)*\)(?:[+*]|\{\d*,\d*\})")


def _regex(v: object, key: str) -> re.Pattern[bytes]:
    if not isinstance(v, str) or not v:
        raise SelectorError(key, "expected a regular expression (a non-empty string)")
    if _NESTED.search(v):
        raise SelectorError(
            key, f"regex {v!r}: a repeated group that holds a repetition can backtrack for ever"
        )
    try:
        return re.compile(v.encode("utf-8"))
    except re.error as exc:
        raise SelectorError(key, f"bad regex {v!r}: {exc}") from None


# --- the fields a selector reads


def pri_of(msg: bytes) -> int:
    """The message's PRI; user.notice when it has none."""
    gt = rfc5424.pri_end(msg)
    digits = msg[1:gt] if gt > 0 else b""
    if digits.isdigit() and int(digits) < 192:
        return int(digits)
    return NO_PRI


def header_of(msg: bytes) -> tuple[bytes, bytes]:
    """(HOSTNAME, APP-NAME) as written (RFC 3164: host and tag); b"-" where absent.

    Only meaningful for a message that is not malformed (flag M).
    """
    header = rfc5424.header_fields(msg, 3)
    if header is not None:
        sp, hsp, asp = header[1]
        if hsp < 0:
            return msg[sp + 1 :] or b"-", b"-"
        return msg[sp + 1 : hsp], (msg[hsp + 1 :] if asp < 0 else msg[hsp + 1 : asp]) or b"-"
    try:
        host, tag = rfc3164.names(msg)
    except rfc3164.ParseError:
        return b"-", b"-"
    return (host or "-").encode(), (tag or "-").encode()


# --- evaluation


def matches(
    node: Node, msg: bytes, listener: str, malformed: bool, header: tuple[bytes, bytes] | None
) -> bool:
    """The reference evaluation of one message (tests, and the general per-message case)."""
    t = type(node)
    if t is Pri:
        return pri_of(msg) in node.values  # type: ignore[union-attr]
    if t is Listener:
        return listener in node.names  # type: ignore[union-attr]
    if t is Malformed:
        return malformed is node.value  # type: ignore[union-attr]
    if t is Regex:
        return node.pattern.search(msg, 0, REGEX_WINDOW) is not None  # type: ignore[union-attr]
    if t is Glob:
        if malformed:
            return False
        if header is None:
            header = header_of(msg)
        value = header[0] if node.field == "host" else header[1]  # type: ignore[union-attr]
        return node.pattern.match(value) is not None  # type: ignore[union-attr]
    if t is Not:
        return not matches(node.item, msg, listener, malformed, header)  # type: ignore[union-attr]
    if t is All:
        return all(matches(n, msg, listener, malformed, header) for n in node.items)  # type: ignore[union-attr]
    return any(matches(n, msg, listener, malformed, header) for n in node.items)  # type: ignore[union-attr]


def _pri_verdict(node: Node, pri: int, listener: str | None) -> bool | None:
    """Three-valued: True/False when the PRI (and the listener, when given) decide, else None."""
    t = type(node)
    if t is Pri:
        return pri in node.values  # type: ignore[union-attr]
    if t is Listener:
        return None if listener is None else listener in node.names  # type: ignore[union-attr]
    if t is Not:
        v = _pri_verdict(node.item, pri, listener)  # type: ignore[union-attr]
        return None if v is None else not v
    if t is All or t is Any_:
        stop = t is Any_  # Any_: a True decides; All: a False decides
        unknown = False
        for n in node.items:  # type: ignore[union-attr]
            v = _pri_verdict(n, pri, listener)
            if v is None:
                unknown = True
            elif v is stop:
                return stop
        return None if unknown else not stop
    return None


def has_regex(node: Node) -> bool:
    return any(isinstance(n, Regex) for n in leaves(node))


def leaves(node: Node) -> Iterator[Node]:
    if isinstance(node, All | Any_):
        for n in node.items:
            yield from leaves(n)
    elif isinstance(node, Not):
        yield from leaves(node.item)
    else:
        yield node


@dataclass(frozen=True)
class Selectors:
    """Everything selectable in one configuration: None means "takes everything"."""

    staging: Node | None = None
    forward: Mapping[str, Node] | None = None
    drop: tuple[tuple[str, Node], ...] = ()
    # Whether some forward output has no selector (it takes every message not dropped).
    plain_outputs: bool = True

    @property
    def empty(self) -> bool:
        return self.staging is None and not self.forward and not self.drop
