"""Configuration: the reference file is valid and documents every key; bad input is named."""

from __future__ import annotations

import ast
import dataclasses
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from relay import config
from relay.units import parse_duration, parse_size

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "etc" / "syslog-relay.toml"


def test_reference_config_is_valid() -> None:
    cfg = config.load(REFERENCE)
    assert [lc.transport for lc in cfg.listen] == ["tcp", "udp"]
    assert cfg.limits.max_message_size == 64 * 1024
    assert cfg.archive.grace == 300


# Each section: its spec and the dataclass that holds its defaults.
SECTIONS: dict[str, tuple[config.Spec, type[Any]]] = {
    "relay": (config._RELAY, config.RelayConfig),
    "listen": (config._LISTEN, config.ListenConfig),
    "forward": (config._FORWARD, config.ForwardConfig),
    "tls": (config._TLS, config.TLSConfig),
    "limits": (config._LIMITS, config.LimitsConfig),
    "staging": (config._STAGING, config.StagingConfig),
    "archive": (config._ARCHIVE, config.ArchiveConfig),
    "metrics": (config._METRICS, config.MetricsConfig),
    "health": (config._HEALTH, config.HealthConfig),
    "link": (config._LINK, config.LinkConfig),
}
# Keys whose spec default is not the field's: parse() resolves them itself.
DERIVED = {("listen", "trust_loop_guard"), ("staging", "keep")}


@pytest.mark.parametrize(("section", "spec"), [(k, v[0]) for k, v in SECTIONS.items()])
def test_reference_config_documents_every_key(section: str, spec: config.Spec) -> None:
    text = REFERENCE.read_text()
    for key in spec:
        assert re.search(rf"^#?\s*{key}\s*=", text, re.M) or re.search(
            rf"^#\s+{key}\s+=", text, re.M
        ), f"{section}.{key} is not documented in etc/syslog-relay.toml"


def _field_default(cls: type[Any], key: str) -> object:
    for f in dataclasses.fields(cls):
        if f.name == key:
            return f.default
    return dataclasses.MISSING


def test_spec_defaults_are_the_dataclass_defaults() -> None:
    for section, (spec, cls) in SECTIONS.items():
        for key, (_conv, default) in spec.items():
            field_default = _field_default(cls, key)
            if (section, key) in DERIVED:
                continue
            if field_default is dataclasses.MISSING:
                assert default is None, f"{section}.{key}: a default belongs in {cls.__name__}"
            else:
                assert default == field_default, f"{section}.{key}"
    # The derived ones: trust_loop_guard is decided in parse, keep fills two fields.
    assert config._LISTEN["trust_loop_guard"][1] is None
    staging = config.StagingConfig()
    assert config._STAGING["keep"][1] == (staging.keep_for, staging.keep_size)
    assert config.parse({}).staging == staging


def test_defaults_are_written_once() -> None:
    """Every spec table is built by _spec from converters alone: a literal default
    next to a converter would be a second copy of the dataclass default."""
    tree = ast.parse((ROOT / "relay" / "config.py").read_text())
    tables = 0
    for node in tree.body:
        if not (isinstance(node, ast.AnnAssign) and ast.unparse(node.annotation) == "Spec"):
            continue
        name = ast.unparse(node.target)
        tables += 1
        call = node.value
        assert isinstance(call, ast.Call) and ast.unparse(call.func) == "_spec", name
        converters = call.args[1]
        assert isinstance(converters, ast.Dict), name
        for value in converters.values:
            assert not isinstance(value, ast.Tuple), f"{name}: a default next to a converter"
        assert {(name, kw.arg) for kw in call.keywords} <= {
            ("_LISTEN", "trust_loop_guard"),
            ("_STAGING", "keep"),
        }, name
    assert tables == len(SECTIONS) + 1  # and [[drop]]


# Lines in the reference file that show an example, or a default parse() derives.
EXAMPLES = {
    ("listen", "name", '"TRANSPORT:PORT"'),  # "" in ListenConfig, filled in by parse
    ("listen", "framing", '"octet-counting"'),  # in the commented-out TLS listener
    ("archive", "object_lock_days", "365"),
}


def _documented_values(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of every ``key = value`` and ``# key = value`` line,
    under the last [section] or [[section]] header (commented or not)."""
    section = ""
    out = []
    for line in text.splitlines():
        if m := re.match(r"^(?:# )?(?:One )?\[\[?(\w+)", line):
            section = m.group(1)
        elif m := re.match(r"^(?:# )?(\w+) = (.+?)(?:\s+#.*)?$", line):
            out.append((section, m.group(1), m.group(2)))
        elif m := re.match(r'^#\s+(\w+)\s+= .*\(.*default (".*?")\)', line):
            out.append((section, m.group(1), m.group(2)))  # the [[listen]] key list
    return out


def test_reference_config_documents_the_dataclass_defaults() -> None:
    """The value the reference file shows for a key with a default is that default
    (an optional key's commented line is an example, as is one in EXAMPLES)."""
    compared = set()
    for section, key, value in _documented_values(REFERENCE.read_text()):
        if section not in SECTIONS or key not in SECTIONS[section][0]:
            continue
        if (section, key, value) in EXAMPLES or (section, key) in DERIVED:
            continue
        spec, cls = SECTIONS[section]
        default = _field_default(cls, key)
        if default is dataclasses.MISSING or default is None:
            continue
        parsed = spec[key][0](tomllib.loads(f"v = {value}")["v"])
        if key == "state_dir":
            parsed = Path(parsed)
        assert parsed == default, f"etc/syslog-relay.toml: {section}.{key} = {value}"
        compared.add((section, key))
    # Most keys with a default show it; a change to the file's layout that hid them
    # from this test would fail here.
    assert len(compared) >= 60, sorted(compared)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"relay": {"bogus": 1}}, "relay.bogus: unknown key"),
        ({"nonsense": {}}, "nonsense: unknown section"),
        (
            {"listen": [{"address": "1.2.3.4", "transport": "tcp"}]},
            "listen[0].address: expected HOST:PORT",
        ),
        (
            {"listen": [{"address": ":514", "transport": "sctp"}]},
            "listen[0].transport: must be one of",
        ),
        (
            {"listen": [{"address": ":99999", "transport": "tcp"}]},
            "listen[0].address: port must be",
        ),
        ({"listen": [{"address": ":514", "transport": "tls"}]}, "tls.certificate: required"),
        ({"limits": {"max_message_size": "1GiB"}}, "limits.max_message_size: must be between"),
        ({"limits": {"max_message_size": True}}, "limits.max_message_size: expected a size"),
        ({"limits": {"oversize": "drop"}}, "limits.oversize: must be one of"),
        ({"limits": {"idle_timeout": "soon"}}, "limits.idle_timeout: expected a duration"),
        ({"limits": {"frame_timeout": "2d"}}, "limits.frame_timeout: must be between"),
        (
            {"limits": {"max_connections_per_source": -1}},
            "limits.max_connections_per_source: must be between",
        ),
        ({"staging": {"timezone": "Mars/Olympus"}}, "staging.timezone: unknown time zone"),
        ({"tls": {"certificate": "/nonexistent.pem"}}, "tls.certificate: file not found"),
        ({"tls": {"verify_clients": "yes"}}, "tls.verify_clients: expected true or false"),
        (
            {"tls": {"permitted_peers_match_cn": "yes"}},
            "tls.permitted_peers_match_cn: expected true or false",
        ),
        (
            {"tls": {"permitted_peers_match_cn": True}},
            "tls.permitted_peers_match_cn: has no effect without permitted_peers",
        ),
        ({"archive": {"enabled": True}}, "archive.bucket: required"),
        (
            {"listen": [{"address": ":514", "transport": "relp", "trust_loop_guard": True}]},
            "listen[0].trust_loop_guard: needs transport tls or relp+tls and tls.verify_clients",
        ),
        (
            {
                "listen": [
                    {"address": ":514", "transport": "tcp"},
                    {"address": ":514", "transport": "tcp"},
                ]
            },
            "listen[1].address: same address as listen[0]",
        ),
        (
            {"listen": [{"address": ":514", "transport": "tcp", "ack": "write"}]},
            "listen[0].ack: only RELP listeners acknowledge messages",
        ),
        (
            {"listen": [{"address": ":514", "transport": "relp", "ack": "never"}]},
            "listen[0].ack:",
        ),
    ],
)
def test_invalid_config_names_key_and_reason(data: dict[str, object], expected: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.parse(data)
    assert any(line.startswith(expected) for line in err.value.lines()), err.value.lines()


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(config.ConfigError) as err:
        config.parse({"relay": {"x": 1}, "limits": {"oversize": "no", "max_connections": 0}})
    assert len(err.value.problems) == 3


@pytest.mark.parametrize(
    ("text", "n"), [("64KiB", 65536), ("1MB", 1_000_000), (100, 100), ("2 GiB", 2 << 30)]
)
def test_sizes(text: object, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize(("text", "s"), [("5m", 300), ("250ms", 0.25), (3, 3.0), ("1d", 86400)])
def test_durations(text: object, s: float) -> None:
    assert parse_duration(text) == s


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args], capture_output=True, text=True, timeout=60
    )


def test_check_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(
        f'[relay]\nstate_dir = "{tmp_path}"\n'
        '[[listen]]\naddress = "127.0.0.1:0"\ntransport = "tcp"\n'
    )
    r = run_cli("check", "--config", str(good))
    assert r.returncode == 0, r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[limits]\noversize = "drop"\nfoo = 1\n')
    r = run_cli("check", "--config", str(bad))
    assert r.returncode == 2
    assert "limits.oversize: must be one of" in r.stderr
    assert "limits.foo: unknown key" in r.stderr
    r = run_cli("check", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "config: file not found" in r.stderr
    broken = tmp_path / "broken.toml"
    broken.write_text("[relay\n")
    r = run_cli("check", "--config", str(broken))
    assert r.returncode == 2 and "invalid TOML" in r.stderr


def test_check_and_run_report_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = tmp_path / "c.toml"
        cfg.write_text(
            f'[relay]\nstate_dir = "{tmp_path}/state"\n'
            f'[[listen]]\naddress = "127.0.0.1:{port}"\ntransport = "tcp"\n'
        )
        r = run_cli("check", "--config", str(cfg))
        assert r.returncode == 0, r.stderr  # no bind test unless asked
        r = run_cli("check", "--bind", "--config", str(cfg))
        assert r.returncode == 2
        assert f"listen[0].address: cannot listen on 127.0.0.1:{port}" in r.stderr
        r = run_cli("run", "--config", str(cfg))
        assert r.returncode == 2
        assert f"listen[0].address: cannot listen on 127.0.0.1:{port}" in r.stderr


def test_version() -> None:
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("syslog-relay ")


def test_archive_check_with_archive_disabled_is_ok() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "archive", "check", "--config", str(REFERENCE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "archive disabled" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "archive", "run", "--config", str(REFERENCE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "archive.enabled: false" in r.stderr


def test_status_subcommand_without_a_running_relay(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[relay]\nstate_dir = "{tmp_path}"\n[metrics]\naddress = "127.0.0.1:{port}"\n')
    r = run_cli("status", "--config", str(cfg))
    assert r.returncode == 1
    assert f"127.0.0.1:{port}" in r.stderr


def test_check_reports_metrics_address_in_use(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        cfg = tmp_path / "c.toml"
        cfg.write_text(
            f'[relay]\nstate_dir = "{tmp_path}"\n[metrics]\naddress = "127.0.0.1:{port}"\n'
        )
        r = run_cli("check", "--bind", "--config", str(cfg))
        assert r.returncode == 2
        assert f"metrics.address: cannot listen on 127.0.0.1:{port}" in r.stderr


def test_loop_guard_is_trusted_only_on_listeners_that_authenticate_relays(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("")
    tls = {"certificate": str(pem), "key": str(pem), "ca": str(pem), "verify_clients": True}
    listen = [
        {"address": ":514", "transport": "tcp", "name": "clients"},
        {"address": ":2514", "transport": "relp+tls", "name": "relays"},
        {"address": ":6514", "transport": "tls", "name": "tls-clients", "trust_loop_guard": False},
        {"address": ":2515", "transport": "relp", "name": "plain-relp"},
    ]
    cfg = config.parse({"listen": listen, "tls": tls})
    assert [lc.trust_loop_guard for lc in cfg.listen] == [False, True, False, False]
    assert cfg.loop_guard_listeners == {"relays"}
    # Without client certificates nothing is trusted; a name shared with an untrusted
    # listener is not trusted either.
    assert (
        config.parse(
            {"listen": listen, "tls": {**tls, "verify_clients": False}}
        ).loop_guard_listeners
        == frozenset()
    )
    listen[0]["name"] = "relays"
    assert config.parse({"listen": listen, "tls": tls}).loop_guard_listeners == frozenset()
