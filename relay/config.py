"""Configuration: TOML parsed once into frozen dataclasses.

Validation collects every problem as ``KEY: reason`` (``listen[1].address: ...``)
instead of stopping at the first, so ``check`` can show an operator all of them.
Nothing here reads the configuration at import time; callers pass it down.
"""

from __future__ import annotations

import os
import socket
import tomllib
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from relay import selectors
from relay.units import parse_duration, parse_size

DEFAULT_CONFIG_PATH = "/etc/syslog-relay/syslog-relay.toml"

TRANSPORTS = ("udp", "tcp", "tls", "relp", "relp+tls", "link+tls")
FORWARD_TRANSPORTS = ("tcp", "tls", "relp", "relp+tls", "link+tls")
TLS_TRANSPORTS = ("tls", "relp+tls", "link+tls")
FRAMINGS = ("auto", "octet-counting", "lf")
OVERSIZE = ("truncate", "reject")


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` is a list of (key, reason)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{k}: {r}" for k, r in problems))
        self.problems = problems

    def lines(self) -> list[str]:
        return [f"{k}: {r}" for k, r in self.problems]


@dataclass(frozen=True)
class ListenConfig:
    address: str
    host: str
    port: int
    transport: str
    framing: str = "auto"
    name: str = ""
    # Loop-guard elements naming this relay make a message count as a loop (dropped
    # unstaged) only here: senders authenticated by certificate (docs/forwarding.md).
    trust_loop_guard: bool = False
    # RELP: answer 200 OK once messages are fsynced ("fsync") or once written ("write").
    ack: str = "fsync"


@dataclass(frozen=True)
class TLSConfig:
    certificate: str | None = None
    key: str | None = None
    ca: str | None = None
    verify_clients: bool = False
    permitted_peers: tuple[str, ...] = ()
    permitted_peers_match_cn: bool = False
    min_version: str = "1.2"
    handshake_timeout: float = 10.0


@dataclass(frozen=True)
class LimitsConfig:
    max_message_size: int = 64 * 1024
    oversize: str = "truncate"
    max_connections: int = 4096
    idle_timeout: float = 300.0
    udp_receive_buffer: int = 8 * 1024 * 1024
    frame_timeout: float = 30.0
    max_connections_per_source: int = 512


@dataclass(frozen=True)
class StagingConfig:
    fsync_interval: float = 1.0
    max_clock_skew: float = 86400.0
    timezone: str = "UTC"
    max_pending: int = 64 * 1024 * 1024
    stop_timeout: float = 20.0
    # False: an edge that only forwards; every message goes to the forward spools only.
    enabled: bool = True
    # Retention of staging files nobody will archive (closed hours with the archive
    # off, archived/ with keep_uploaded): by age (seconds) and total size (bytes);
    # None = no bound. relay/retention.py applies it.
    keep_for: float | None = None
    keep_size: int | None = None
    # What staging (and so the archive) keeps; None: everything (relay.selectors).
    select: selectors.Node | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ArchiveConfig:
    enabled: bool = False
    grace: float = 300.0
    bucket: str = ""
    prefix: str = "syslog"
    endpoint_url: str | None = None
    region: str = "us-east-1"
    addressing_style: str = "path"
    access_key_id: str | None = None
    secret_access_key: str | None = None
    compression_level: int = 3
    frame_size: int = 16 * 1024 * 1024
    multipart_threshold: int = 64 * 1024 * 1024
    multipart_chunksize: int = 16 * 1024 * 1024
    poll_interval: float = 10.0
    retry_max_backoff: float = 300.0
    storage_class: str | None = None
    sse: str | None = None
    sse_kms_key_id: str | None = None
    object_lock_mode: str | None = None
    object_lock_days: int = 0
    keep_uploaded: bool = False
    # syslog-archive ls/cat/tail: the zone of times given without one (--tz, --local win)
    query_timezone: str = "UTC"


@dataclass(frozen=True)
class ForwardConfig:
    name: str
    peers: tuple[tuple[str, int], ...]
    transport: str = "relp"
    mode: str = "failover"
    max_spool: int = 10 * 1024**3
    when_full: str = "block"
    window: int = 128
    ack_timeout: float = 30.0
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0
    failback_interval: float = 30.0
    framing: str = "octet-counting"
    tls_certificate: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_peer_name: str | None = None
    # transport = "link+tls" only (docs/relay-link.md)
    compression: str = "zstd"
    compression_level: int = 1
    batch_size: int = 1024 * 1024
    compression_threads: int = 2
    # New records take the spool's other lane once the oldest undelivered one is this
    # old (and that lane is empty); 0: one lane (relay.link.lanes)
    live_lane_after: float = 2.0
    # What this output takes; None: everything. Not compared: a reload that changes
    # only the selector keeps the connection (the router applies it to new messages).
    select: selectors.Node | None = field(default=None, compare=False)

    @property
    def uses_tls(self) -> bool:
        return self.transport in TLS_TRANSPORTS

    @property
    def acknowledged(self) -> bool:
        return self.transport.startswith(("relp", "link"))

    @property
    def is_link(self) -> bool:
        return self.transport == "link+tls"


@dataclass(frozen=True)
class LinkConfig:
    """What a ``link+tls`` listener accepts (docs/relay-link.md)."""

    window: int = 16
    max_batch_size: int = 17 * 1024 * 1024
    compression: tuple[str, ...] = ("zstd", "none")


@dataclass(frozen=True)
class RelayConfig:
    id: str
    state_dir: Path = Path("/var/lib/syslog-relay")
    log_format: str = "auto"
    loop_guard: bool = True
    max_hops: int = 16
    # Free-space floor on state_dir's filesystem (relay/disk/guard.py): the larger
    # of the two; both 0 turns the guard off.
    min_free: int = 1024**3
    min_free_percent: float = 5.0


@dataclass(frozen=True)
class MetricsConfig:
    """The /metrics, /health and /status endpoints (relay/ops/observe.py, archive/observe.py)."""

    enabled: bool = True
    address: str = "127.0.0.1:9514"
    archive_address: str = "127.0.0.1:9515"

    @property
    def endpoint(self) -> tuple[str, int]:
        return _address(self.address)

    @property
    def archive_endpoint(self) -> tuple[str, int]:
        return _address(self.archive_address)


@dataclass(frozen=True)
class HealthConfig:
    no_peer_after: float = 300.0
    spool_threshold: int = 1024**3
    archive_lag: float = 7200.0


@dataclass(frozen=True)
class Config:
    relay: RelayConfig
    listen: tuple[ListenConfig, ...]
    forward: tuple[ForwardConfig, ...]
    tls: TLSConfig
    limits: LimitsConfig
    staging: StagingConfig
    archive: ArchiveConfig
    source: str = ""
    metrics: MetricsConfig = MetricsConfig()
    health: HealthConfig = HealthConfig()
    link: LinkConfig = LinkConfig()
    drop: tuple[tuple[str, selectors.Node], ...] = ()  # [[drop]] rules: (name, selector)

    @property
    def selectors(self) -> selectors.Selectors | None:
        """Every configured selector; None when there is none (nothing to decide)."""
        sel = selectors.Selectors(
            staging=self.staging.select,
            forward={fc.name: fc.select for fc in self.forward if fc.select is not None},
            drop=self.drop,
            plain_outputs=any(fc.select is None for fc in self.forward),
        )
        return None if sel.empty else sel

    @property
    def staging_dir(self) -> Path:
        return self.relay.state_dir / "staging"

    @property
    def loop_guard_listeners(self) -> frozenset[str]:
        """Names of the listeners whose loop-guard elements are trusted (a name that
        an untrusted listener shares is not)."""
        trusted = {lc.name for lc in self.listen if lc.trust_loop_guard}
        return frozenset(trusted - {lc.name for lc in self.listen if not lc.trust_loop_guard})


# --- converters: each takes the raw TOML value and returns the typed value or
# raises ValueError with an operator-readable reason.


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {type(v).__name__}")
    return v


def _opt_str(v: object) -> str | None:
    s = _str(v)
    return s or None


def _bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def _int(lo: int, hi: int) -> Callable[[object], int]:
    def conv(v: object) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"expected an integer, got {v!r}")
        if not lo <= v <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {v}")
        return v

    return conv


def _choice(*choices: str) -> Callable[[object], str]:
    def conv(v: object) -> str:
        if v not in choices:
            raise ValueError(f"must be one of {', '.join(map(repr, choices))}, got {v!r}")
        return str(v)

    return conv


def _opt_choice(*choices: str) -> Callable[[object], str | None]:
    inner = _choice(*choices)

    def conv(v: object) -> str | None:
        return None if v == "" else inner(v)

    return conv


def _size(lo: int, hi: int) -> Callable[[object], int]:
    def conv(v: object) -> int:
        n = parse_size(v)
        if not lo <= n <= hi:
            raise ValueError(f"must be between {lo} and {hi} bytes, got {n}")
        return n

    return conv


def _duration(lo: float, hi: float) -> Callable[[object], float]:
    def conv(v: object) -> float:
        d = parse_duration(v)
        if not lo <= d <= hi:
            raise ValueError(f"must be between {lo:g}s and {hi:g}s, got {d:g}s")
        return d

    return conv


def _str_list(v: object) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ValueError("expected a list of non-empty strings")
    return tuple(v)


def _percent(v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"expected a number (percent), got {v!r}")
    if not 0 <= v <= 50:
        raise ValueError(f"must be between 0 and 50, got {v}")
    return float(v)


def _keep(v: object) -> tuple[float | None, int | None]:
    """``"30d"``, ``"20GiB"`` or both in a list: (age in seconds, size in bytes)."""
    items = v if isinstance(v, list) else [v]
    age: float | None = None
    size: int | None = None
    for item in items:
        if item == "":
            continue
        if not isinstance(item, str):
            raise ValueError(f'expected a duration ("30d"), a size ("20GiB") or both, got {item!r}')
        try:
            d = parse_duration(item)
        except ValueError:
            try:
                n = parse_size(item)
            except ValueError:
                raise ValueError(
                    f'expected a duration ("30d") or a size ("20GiB"), got {item!r}'
                ) from None
            if size is not None:
                raise ValueError("more than one size") from None
            if n <= 0:
                raise ValueError("a size of 0 would delete every closed hour") from None
            size = n
            continue
        if item.strip().isdigit():
            raise ValueError(f'give a unit: "{item}d" (days) or "{item}GiB" (size)')
        if age is not None:
            raise ValueError("more than one duration")
        if d < 3600:
            raise ValueError(f"must be at least 1h, got {item!r}")
        age = d
    return age, size


def _timezone(v: object) -> str:
    name = _str(v)
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r}") from exc
    return name


def _address(v: object) -> tuple[str, int]:
    s = _str(v)
    host, sep, port_s = s.rpartition(":")
    if not sep or not port_s.isdigit():
        raise ValueError(f"expected HOST:PORT, got {s!r}")
    port = int(port_s)
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0..65535, got {port}")
    host = host.strip("[]") or "0.0.0.0"
    return host, port


def _table(v: object) -> dict[str, object]:
    if not isinstance(v, dict):
        raise ValueError(f"expected a table (a selector), got {type(v).__name__}")
    return v


def _select(
    raw: dict[str, object] | None, key: str, listeners: frozenset[str], problems: _Problems
) -> selectors.Node | None:
    """The parsed selector at ``key`` (None: none, or invalid and reported)."""
    if raw is None:
        return None
    try:
        return selectors.parse(raw, listeners)
    except selectors.SelectorError as exc:
        problems.add(f"{key}.{exc.key}" if exc.key else key, exc.reason)
        return None


def _endpoint(v: object) -> str:
    _address(v)
    return _str(v)


Converter = Callable[[object], Any]
# Each key of a section: its converter and the value a missing (or invalid) key gets.
Spec = Mapping[str, tuple[Converter, object]]


def _spec(cls: type | None, converters: Mapping[str, Converter], **derived: object) -> Spec:
    """A section's spec: each key's converter, with the default of ``cls``'s field of
    the same name, so that a default is written once: in the dataclass. A key with no
    field default (required, or not a field) gets None; ``derived`` gives the value of
    a key that parse() resolves itself."""
    defaults: dict[str, object] = {}
    for f in fields(cls) if cls is not None else ():
        if f.name in converters and f.default_factory is not MISSING:
            raise TypeError(f"{f.name}: a default_factory is not read here, use a plain default")
        if f.default is not MISSING:
            defaults[f.name] = f.default
    if unknown := derived.keys() - converters.keys():
        raise TypeError(f"derived keys without a converter: {sorted(unknown)}")
    return {
        key: (conv, derived[key] if key in derived else defaults.get(key))
        for key, conv in converters.items()
    }


_RELAY: Spec = _spec(
    RelayConfig,
    {
        "id": _str,  # None: the host name (resolved in parse)
        "state_dir": _str,
        "log_format": _choice("auto", "text", "json"),
        "loop_guard": _bool,
        "max_hops": _int(1, 255),
        "min_free": _size(0, 1024**5),
        "min_free_percent": _percent,
    },
)
_LISTEN: Spec = _spec(
    ListenConfig,
    {
        "address": _str,
        "transport": _choice(*TRANSPORTS),
        "framing": _choice(*FRAMINGS),
        "name": _str,
        "trust_loop_guard": _bool,
        "ack": _choice("fsync", "write"),
    },
    # None: decided from the transport and [tls] verify_clients (resolved in parse).
    trust_loop_guard=None,
)
_FORWARD: Spec = _spec(
    ForwardConfig,
    {
        "name": _str,
        "peers": _str_list,
        "transport": _choice(*FORWARD_TRANSPORTS),
        "mode": _choice("failover", "balance"),
        # At least 16 MiB: one received chunk (a batch) must always fit in an empty spool.
        "max_spool": _size(16 * 1024 * 1024, 1024**5),
        "when_full": _choice("block", "drop-oldest", "drop-newest"),
        "window": _int(1, 100_000),
        "ack_timeout": _duration(0.1, 3600),
        "reconnect_min": _duration(0.01, 3600),
        "reconnect_max": _duration(0.01, 86400),
        "failback_interval": _duration(0.1, 86400),
        "framing": _choice("octet-counting", "lf"),
        "tls_certificate": _opt_str,
        "tls_key": _opt_str,
        "tls_ca": _opt_str,
        "tls_peer_name": _opt_str,
        "compression": _choice("zstd", "none"),
        "compression_level": _int(1, 19),
        "batch_size": _size(4096, 16 * 1024 * 1024),
        "compression_threads": _int(1, 8),
        "live_lane_after": _duration(0, 86400),
        "select": _table,
    },
)
_DROP: Spec = _spec(None, {"name": _str, "select": _table})
_TLS: Spec = _spec(
    TLSConfig,
    {
        "certificate": _opt_str,
        "key": _opt_str,
        "ca": _opt_str,
        "verify_clients": _bool,
        "permitted_peers": _str_list,
        "permitted_peers_match_cn": _bool,
        "min_version": _choice("1.2", "1.3"),
        "handshake_timeout": _duration(0.1, 3600),
    },
)
_LIMITS: Spec = _spec(
    LimitsConfig,
    {
        "max_message_size": _size(480, 16 * 1024 * 1024),
        "oversize": _choice(*OVERSIZE),
        "max_connections": _int(1, 1_000_000),
        "idle_timeout": _duration(0, 30 * 86400),
        "udp_receive_buffer": _size(0, 1024**3),
        "frame_timeout": _duration(0, 86400),
        "max_connections_per_source": _int(0, 1_000_000),
    },
)
_STAGING_DEFAULTS = StagingConfig()
_STAGING: Spec = _spec(
    StagingConfig,
    {
        "fsync_interval": _duration(0, 3600),
        "max_clock_skew": _duration(60, 365 * 86400),
        "timezone": _timezone,
        "max_pending": _size(1024 * 1024, 16 * 1024**3),
        "stop_timeout": _duration(1, 3600),
        "enabled": _bool,
        "keep": _keep,
        "select": _table,
    },
    # One key for two fields (split in parse).
    keep=(_STAGING_DEFAULTS.keep_for, _STAGING_DEFAULTS.keep_size),
)
_ARCHIVE: Spec = _spec(
    ArchiveConfig,
    {
        "enabled": _bool,
        "query_timezone": _timezone,
        "grace": _duration(0, 86400),
        "bucket": _str,
        "prefix": _str,
        "endpoint_url": _opt_str,
        "region": _str,
        "addressing_style": _choice("path", "virtual", "auto"),
        "access_key_id": _opt_str,
        "secret_access_key": _opt_str,
        "compression_level": _int(1, 22),
        "frame_size": _size(64 * 1024, 256 * 1024 * 1024),
        "multipart_threshold": _size(5 * 1024 * 1024, 5 * 1024**3),
        "multipart_chunksize": _size(5 * 1024 * 1024, 5 * 1024**3),
        "poll_interval": _duration(0.05, 3600),
        "retry_max_backoff": _duration(0.1, 86400),
        "storage_class": _opt_str,
        "sse": _opt_choice("AES256", "aws:kms"),
        "sse_kms_key_id": _opt_str,
        "object_lock_mode": _opt_choice("GOVERNANCE", "COMPLIANCE"),
        "object_lock_days": _int(0, 36500),
        "keep_uploaded": _bool,
    },
)

_METRICS: Spec = _spec(
    MetricsConfig,
    {
        "enabled": _bool,
        "address": _endpoint,
        "archive_address": _endpoint,
    },
)


def _codecs(v: object) -> tuple[str, ...]:
    names = _str_list(v)
    for name in names:
        if name not in ("zstd", "none"):
            raise ValueError(f"unknown compression {name!r} (zstd, none)")
    if not names:
        raise ValueError("accept at least one of zstd, none")
    return names


_LINK: Spec = _spec(
    LinkConfig,
    {
        "window": _int(1, 1024),
        # At least one spool record (16 MiB) and its record header must fit.
        "max_batch_size": _size(17 * 1024 * 1024, 256 * 1024 * 1024),
        "compression": _codecs,
    },
)

_HEALTH: Spec = _spec(
    HealthConfig,
    {
        "no_peer_after": _duration(0.1, 30 * 86400),
        "spool_threshold": _size(1, 1024**5),
        "archive_lag": _duration(1, 365 * 86400),
    },
)


class _Problems:
    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, key: str, reason: str) -> None:
        self.items.append((key, reason))


def _section(raw: object, spec: Spec, where: str, problems: _Problems) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.add(where, f"expected a table, got {type(raw).__name__}")
        raw = {}
    for key in raw:
        if key not in spec:
            problems.add(f"{where}.{key}", "unknown key")
    for key, (conv, default) in spec.items():
        if key in raw:
            try:
                out[key] = conv(raw[key])
            except ValueError as exc:
                problems.add(f"{where}.{key}", str(exc))
                out[key] = default
        else:
            out[key] = default
    return out


def _check_readable(path: str | None, key: str, problems: _Problems) -> None:
    if path is None:
        return
    if not os.path.exists(path):
        problems.add(key, f"file not found: {path}")
    elif not os.access(path, os.R_OK):
        problems.add(key, f"file not readable: {path}")


def parse(data: Mapping[str, object], source: str = "") -> Config:
    """Build a Config from parsed TOML; raises ConfigError listing every problem."""
    problems = _Problems()
    known = {
        "relay",
        "listen",
        "forward",
        "tls",
        "limits",
        "staging",
        "archive",
        "metrics",
        "health",
        "link",
        "drop",
    }
    for key in data:
        if key not in known:
            problems.add(key, "unknown section")

    relay = _section(data.get("relay"), _RELAY, "relay", problems)
    relay_id = relay["id"] or socket.gethostname()
    if not relay_id or any(c in relay_id for c in " /\\\n\t") or len(relay_id) > 64:
        problems.add("relay.id", "must be 1-64 characters without spaces or slashes")

    listens: list[ListenConfig] = []
    listen_trust: list[tuple[str, bool | None]] = []  # (config key prefix, trust_loop_guard)
    raw_listen = data.get("listen", [])
    if not isinstance(raw_listen, list):
        problems.add("listen", "expected an array of tables ([[listen]])")
        raw_listen = []
    seen: dict[tuple[str, int, str], str] = {}
    for i, item in enumerate(raw_listen):
        where = f"listen[{i}]"
        sec = _section(item, _LISTEN, where, problems)
        if sec["address"] is None:
            problems.add(f"{where}.address", "missing (HOST:PORT)")
            continue
        if sec["transport"] is None:
            problems.add(f"{where}.transport", f"missing (one of {', '.join(TRANSPORTS)})")
            continue
        try:
            host, port = _address(sec["address"])
        except ValueError as exc:
            problems.add(f"{where}.address", str(exc))
            continue
        proto = "udp" if sec["transport"] == "udp" else "tcp"
        if port and (host, port, proto) in seen:
            problems.add(f"{where}.address", f"same address as {seen[(host, port, proto)]}")
        seen[(host, port, proto)] = where
        if sec["ack"] != "fsync" and sec["transport"] not in ("relp", "relp+tls"):
            problems.add(f"{where}.ack", "only RELP listeners acknowledge messages")
        listens.append(
            ListenConfig(
                address=sec["address"],
                host=host,
                port=port,
                transport=sec["transport"],
                framing=sec["framing"],
                name=sec["name"] or f"{sec['transport']}:{port}",
                ack=sec["ack"],
            )
        )
        listen_trust.append((where, sec["trust_loop_guard"]))

    listener_names = frozenset(lc.name for lc in listens)
    forwards = _forwards(data.get("forward", []), problems, listener_names)
    drops = _drops(data.get("drop", []), problems, listener_names)

    tls = _section(data.get("tls"), _TLS, "tls", problems)
    if any(lc.transport in TLS_TRANSPORTS for lc in listens):
        for key in ("certificate", "key"):
            if not tls[key]:
                problems.add(f"tls.{key}", 'required by a listener with transport = "tls"')
        if tls["verify_clients"] and not tls["ca"]:
            problems.add("tls.ca", "required when verify_clients = true")
    for key in ("certificate", "key", "ca"):
        _check_readable(tls[key], f"tls.{key}", problems)
    if any(lc.transport == "link+tls" for lc in listens) and not tls["verify_clients"]:
        # The ledger trusts the relay id a sender announces: senders must be authenticated.
        problems.add("tls.verify_clients", 'must be true with a "link+tls" listener')
    if tls["permitted_peers"] and not tls["verify_clients"]:
        problems.add("tls.permitted_peers", "has no effect unless verify_clients = true")
    if tls["permitted_peers_match_cn"] and not tls["permitted_peers"]:
        problems.add("tls.permitted_peers_match_cn", "has no effect without permitted_peers")
    for i, (lc, (where, trust)) in enumerate(zip(listens, listen_trust, strict=True)):
        authenticated = lc.transport in ("tls", "relp+tls", "link+tls") and bool(
            tls["verify_clients"]
        )
        if trust and not authenticated:
            problems.add(
                f"{where}.trust_loop_guard",
                "needs transport tls or relp+tls and tls.verify_clients = true "
                "(only senders authenticated by certificate can be trusted)",
            )
        listens[i] = replace(lc, trust_loop_guard=authenticated if trust is None else trust)

    limits = _section(data.get("limits"), _LIMITS, "limits", problems)
    staging = _section(data.get("staging"), _STAGING, "staging", problems)
    staging["keep_for"], staging["keep_size"] = staging.pop("keep")
    staging["select"] = _select(staging["select"], "staging.select", listener_names, problems)
    archive = _section(data.get("archive"), _ARCHIVE, "archive", problems)
    if not staging["enabled"]:
        if archive["enabled"]:
            problems.add("staging.enabled", "the archive needs staging (archive.enabled = true)")
        if not forwards:
            problems.add("staging.enabled", "false needs a [[forward]] output, or nothing is kept")
    if archive["enabled"] and not archive["bucket"]:
        problems.add("archive.bucket", "required when archive.enabled = true")
    if archive["object_lock_mode"] and archive["object_lock_days"] <= 0:
        problems.add("archive.object_lock_days", "must be > 0 when object_lock_mode is set")
    if archive["sse_kms_key_id"] and archive["sse"] != "aws:kms":
        problems.add("archive.sse_kms_key_id", 'only valid with sse = "aws:kms"')

    link = _section(data.get("link"), _LINK, "link", problems)
    metrics = _section(data.get("metrics"), _METRICS, "metrics", problems)
    health = _section(data.get("health"), _HEALTH, "health", problems)
    if metrics["enabled"] and _address(metrics["address"]) == _address(metrics["archive_address"]):
        problems.add("metrics.archive_address", "must differ from metrics.address")

    if problems.items:
        raise ConfigError(problems.items)
    return Config(
        relay=RelayConfig(
            id=relay_id,
            state_dir=Path(relay["state_dir"]),
            log_format=relay["log_format"],
            loop_guard=relay["loop_guard"],
            max_hops=relay["max_hops"],
            min_free=relay["min_free"],
            min_free_percent=relay["min_free_percent"],
        ),
        listen=tuple(listens),
        forward=tuple(forwards),
        tls=TLSConfig(**tls),
        limits=LimitsConfig(**limits),
        staging=StagingConfig(**staging),
        archive=ArchiveConfig(**archive),
        source=source,
        metrics=MetricsConfig(**metrics),
        health=HealthConfig(**health),
        link=LinkConfig(**link),
        drop=tuple(drops),
    )


def _drops(
    raw: object, problems: _Problems, listeners: frozenset[str]
) -> list[tuple[str, selectors.Node]]:
    if not isinstance(raw, list):
        problems.add("drop", "expected an array of tables ([[drop]])")
        return []
    out: list[tuple[str, selectors.Node]] = []
    names: set[str] = set()
    for i, item in enumerate(raw):
        where = f"drop[{i}]"
        sec = _section(item, _DROP, where, problems)
        name = sec["name"]
        if not name or not all(c.isalnum() or c in "-_." for c in name) or len(name) > 64:
            problems.add(f"{where}.name", "missing or not 1-64 letters, digits, '-', '_' or '.'")
            continue
        if name in names:
            problems.add(f"{where}.name", f"duplicate rule name {name!r}")
        names.add(name)
        if sec["select"] is None:
            problems.add(f"{where}.select", "missing (the messages this rule drops)")
            continue
        node = _select(sec["select"], f"{where}.select", listeners, problems)
        if node is not None:
            out.append((name, node))
    return out


def _forwards(
    raw: object, problems: _Problems, listeners: frozenset[str] = frozenset()
) -> list[ForwardConfig]:
    if not isinstance(raw, list):
        problems.add("forward", "expected an array of tables ([[forward]])")
        return []
    out: list[ForwardConfig] = []
    names: set[str] = set()
    for i, item in enumerate(raw):
        where = f"forward[{i}]"
        sec = _section(item, _FORWARD, where, problems)
        name = sec["name"]
        if not name:
            problems.add(f"{where}.name", "missing (a short name for this output)")
            continue
        if not all(c.isalnum() or c in "-_." for c in name) or len(name) > 64:
            problems.add(f"{where}.name", "use 1-64 letters, digits, '-', '_' or '.'")
            continue
        if name in names:
            problems.add(f"{where}.name", f"duplicate output name {name!r}")
        names.add(name)
        if not sec["peers"]:
            problems.add(f"{where}.peers", 'missing (a list of "HOST:PORT")')
            continue
        peers: list[tuple[str, int]] = []
        for j, peer in enumerate(sec["peers"]):
            try:
                host, port = _address(peer)
            except ValueError as exc:
                problems.add(f"{where}.peers[{j}]", str(exc))
                continue
            if port == 0:
                problems.add(f"{where}.peers[{j}]", "port 0 is not a peer")
            peers.append((host, port))
        if sec["reconnect_min"] > sec["reconnect_max"]:
            problems.add(f"{where}.reconnect_min", "must not exceed reconnect_max")
        if sec["transport"] == "link+tls" and sec["mode"] != "failover":
            problems.add(
                f"{where}.mode",
                'transport "link+tls" sends one ordered stream: only "failover" is supported',
            )
        if sec["transport"] in TLS_TRANSPORTS and not sec["tls_ca"]:
            problems.add(f"{where}.tls_ca", "required to verify the peer with transport TLS")
        if bool(sec["tls_certificate"]) != bool(sec["tls_key"]):
            problems.add(f"{where}.tls_key", "tls_certificate and tls_key go together")
        for key in ("tls_certificate", "tls_key", "tls_ca"):
            _check_readable(sec[key], f"{where}.{key}", problems)
        del sec["peers"]
        sec["select"] = _select(sec["select"], f"{where}.select", listeners, problems)
        out.append(ForwardConfig(peers=tuple(peers), **sec))
    return out


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a configuration file; raises ConfigError."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError([("config", f"file not found: {path}")]) from None
    except PermissionError:
        raise ConfigError([("config", f"permission denied: {path}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([("config", f"invalid TOML in {path}: {exc}")]) from None
    return parse(data, source=str(path))
