"""The Debian packaging agrees with the code: versions, dependencies, config, units, examples.

Fast static checks; building, installing and running the package is
packaging/ci-deb-test.sh.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest

import relay
from relay.config import DEFAULT_CONFIG_PATH, ConfigError, load, parse

TOP = Path(__file__).resolve().parent.parent
DEBIAN = TOP / "packaging" / "debian"
PACKAGED_CONFIG = DEBIAN / "conf" / "syslog-relay.toml"
RSYSLOG_EXAMPLES = TOP / "etc" / "rsyslog.d"

# PyPI distribution -> Debian 12 binary package.
DEBIAN_NAMES = {
    "twisted": "python3-twisted",
    "service-identity": "python3-service-identity",
    "pyopenssl": "python3-openssl",
    "zstandard": "python3-zstandard",
    "boto3": "python3-boto3",
    "prometheus-client": "python3-prometheus-client",
}


def _control_depends() -> dict[str, str | None]:
    text = (DEBIAN / "control").read_text()
    m = re.search(r"^Depends:(.*?)(?=^\S)", text, re.M | re.S)
    assert m, "no Depends in debian/control"
    out: dict[str, str | None] = {}
    for item in m.group(1).split(","):
        item = " ".join(item.split())
        if not item:
            continue
        dm = re.fullmatch(r"([\w.+:${}-]+)(?: \(>= ([^)]+)\))?", item)
        assert dm, f"unexpected Depends item {item!r}"
        out[dm.group(1)] = dm.group(2)
    return out


def test_changelog_version_is_the_code_version() -> None:
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    m = re.match(r"syslog-relay \(([^)]+)\) ", first)
    assert m, first
    assert m.group(1) == relay.__version__


def test_depends_match_pyproject_minimums() -> None:
    project = tomllib.loads((TOP / "pyproject.toml").read_text())["project"]
    depends = _control_depends()
    for req in project["dependencies"]:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", req.replace(" ", ""))
        assert m, f"pyproject dependency without a minimum: {req}"
        name = m.group(1).lower()
        assert name in DEBIAN_NAMES, f"{name}: add its Debian package to DEBIAN_NAMES and control"
        assert depends.get(DEBIAN_NAMES[name]) == m.group(2), name
    python_min = project["requires-python"].removeprefix(">=")
    assert depends["python3"] == python_min
    assert "adduser" in depends  # postinst runs adduser


def test_packaged_config_is_the_working_default() -> None:
    cfg = load(PACKAGED_CONFIG)
    assert [(lc.transport, lc.host, lc.port) for lc in cfg.listen] == [("tcp", "0.0.0.0", 514)]
    assert cfg.archive.enabled is False
    assert str(cfg.relay.state_dir) == "/var/lib/syslog-relay"
    assert cfg.tls.certificate is None


def test_packaged_config_commented_settings_are_valid_when_uncommented() -> None:
    # Uncommenting every commented setting (not prose: "# ...") must give a
    # configuration whose only problems are the example certificate files.
    text = re.sub(r"(?m)^#(?=\[|[a-z_]+ = )", "", PACKAGED_CONFIG.read_text())
    with pytest.raises(ConfigError) as info:
        parse(tomllib.loads(text))
    keys = {key for key, reason in info.value.problems if "file not found" in reason}
    assert keys == {"tls.certificate", "tls.key", "tls.ca"}, info.value.problems
    assert len(info.value.problems) == 3


def test_install_files_exist() -> None:
    # Paths in debian/*.install are relative to the build tree, where
    # packaging/debian is copied to debian/.
    for line in (DEBIAN / "syslog-relay.install").read_text().splitlines():
        src, dest = line.split()
        assert (DEBIAN / src.removeprefix("debian/")).is_file(), src
        assert not dest.startswith("/")
    for list_name in ("syslog-relay.manpages", "syslog-relay.docs", "syslog-relay.examples"):
        for line in (DEBIAN / list_name).read_text().splitlines():
            assert list(TOP.glob(line)), f"{list_name}: {line} matches nothing"
    install = (DEBIAN / "syslog-relay.install").read_text()
    assert "debian/conf/syslog-relay.toml etc/syslog-relay/\n" in install
    assert DEFAULT_CONFIG_PATH == "/etc/syslog-relay/syslog-relay.toml"


@pytest.mark.parametrize("name", ["relay", "archive"])
def test_wrapper_imports_the_private_cli(name: str) -> None:
    text = (DEBIAN / "bin" / f"syslog-{name}").read_text()
    assert text.startswith("#!/usr/bin/python3 -I\n")
    assert 'sys.path.insert(0, "/usr/share/syslog-relay")' in text
    # The function the wheel's console script calls (pyproject.toml [project.scripts]).
    scripts = tomllib.loads((TOP / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts[f"syslog-{name}"].partition(":")
    assert module == f"{name}.cli"
    assert f"from {name}.cli import {func}" in text and f"sys.exit({func}())" in text
    compile(text, f"syslog-{name}", "exec")
    rules = (DEBIAN / "rules").read_text()
    assert "PYBUILD_INSTALL_DIR = /usr/share/syslog-relay" in rules


def _unit(name: str) -> dict[str, list[str]]:
    """KEY -> values of a unit file (keys may repeat)."""
    out: dict[str, list[str]] = {}
    for raw in (DEBIAN / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key, []).append(value)
    return out


UNITS = {
    "syslog-relay": "syslog-relay.service",
    "syslog-archive": "syslog-relay.syslog-archive.service",
}

HARDENING = {
    "Type": "notify",
    "User": "syslog-relay",
    "Group": "syslog-relay",
    "StateDirectory": "syslog-relay",
    "ConfigurationDirectory": "syslog-relay",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "SystemCallFilter": "@system-service",
    "ReadWritePaths": "/var/lib/syslog-relay",
}


@pytest.mark.parametrize("program", sorted(UNITS))
def test_unit_is_hardened(program: str) -> None:
    unit = _unit(UNITS[program])
    for key, value in HARDENING.items():
        assert unit.get(key) == [value], key
    assert unit["ExecStart"] == [f"/usr/bin/{program} run --config {DEFAULT_CONFIG_PATH}"]
    caps = unit.get("AmbientCapabilities", [])
    if program == "syslog-relay":
        assert caps == ["CAP_NET_BIND_SERVICE"]
        assert unit["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    else:
        assert caps == []
        assert unit["CapabilityBoundingSet"] == [""]
        assert unit["EnvironmentFile"] == ["-/etc/default/syslog-archive"]


def _rsyslog_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["rsyslogd", "-N1", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("name", ["60-syslog-relay-tls.conf", "61-syslog-relay-tcp.conf"])
def test_rsyslog_forwarding_examples(name: str) -> None:
    path = RSYSLOG_EXAMPLES / name
    text = path.read_text()
    # The framing and template the interop tests exercise against the relay.
    assert 'TCP_Framing="octet-counted"' in text
    assert 'template="RSYSLOG_SyslogProtocol23Format"' in text
    result = _rsyslog_check(path)
    assert result.returncode == 0, result.stderr


def test_rsyslog_relp_example_is_valid_but_for_missing_certificates() -> None:
    result = _rsyslog_check(RSYSLOG_EXAMPLES / "62-syslog-relay-relp.conf")
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors, "expected complaints about the example certificate paths"
    assert all("couldn't be accessed" in line for line in errors), errors


def test_every_python_package_goes_into_the_wheel() -> None:
    """A subpackage missing from [tool.setuptools] packages is missing from the .deb
    (relay.link was: the installed relay failed to import)."""
    listed = set(
        tomllib.loads((TOP / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(TOP).parts)
        for top in ("relay", "archive")
        for init in (TOP / top).rglob("__init__.py")
    }
    assert found <= listed, sorted(found - listed)
