"""The operator documentation agrees with the code: README files, examples, man pages.

Static checks; the installed package itself is packaging/ci-deb-test.sh.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from archive import cli as archive_cli
from relay import cli as relay_cli
from relay import config

TOP = Path(__file__).resolve().parent.parent
README = (TOP / "README.md").read_text()
EXAMPLES = sorted((TOP / "etc" / "examples").glob("*.toml"))


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, re.M | re.S)


def _parse_without_files(text: str, monkeypatch: pytest.MonkeyPatch) -> config.Config:
    """Parse as the relay does, but for the certificate files, which are examples."""
    monkeypatch.setattr(config, "_check_readable", lambda *a: None)
    return config.parse(tomllib.loads(text))


def test_every_toml_block_in_the_readme_is_valid_toml_on_its_own() -> None:
    blocks = _blocks("toml")
    assert len(blocks) >= 4
    for block in blocks:
        tomllib.loads(block)  # two files interleaved in one block would fail here


def test_complete_files_in_the_readme_are_valid_configurations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    complete = [b for b in _blocks("toml") if b.startswith("# /etc/syslog-relay/syslog-relay.toml")]
    assert len(complete) >= 4
    for block in complete:
        _parse_without_files(block, monkeypatch)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_files_are_valid_and_shown_in_the_readme(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = path.read_text()
    _parse_without_files(text, monkeypatch)
    assert text in README, f"README shows {path.name} as a complete file"


def test_docs_the_readme_links_to_are_installed() -> None:
    installed = set((TOP / "packaging" / "debian" / "syslog-relay.docs").read_text().split())
    linked = set(re.findall(r"\]\((docs/[\w.-]+\.md)", README))
    assert linked and linked <= installed, linked - installed
    for doc in installed:
        assert (TOP / doc).is_file(), doc


def test_benchmark_history_lives_in_docs() -> None:
    section = README.split("## Benchmark", 1)[1].split("\n## ", 1)[0]
    assert "docs/benchmarks.md" in section
    assert "What made the difference" not in README
    assert "What made the difference" in (TOP / "docs" / "benchmarks.md").read_text()


def _commands(parser: argparse.ArgumentParser) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[name] = {
                    opt
                    for a in sub._actions
                    for opt in a.option_strings
                    if opt.startswith("--") and opt != "--help"
                }
    return out


def _man(name: str) -> str:
    text = (TOP / "packaging" / "man" / name).read_text()
    return text.replace("\\-", "-")


@pytest.mark.parametrize(
    ("page", "parser"),
    [
        ("syslog-relay.8", relay_cli._parser),
        ("syslog-archive.8", archive_cli._parser),
    ],
)
def test_man_pages_name_every_command_and_option(page: str, parser: Any) -> None:
    man = _man(page)
    synopsis = man.split(".SH SYNOPSIS", 1)[1].split(".SH DESCRIPTION", 1)[0]
    for command, options in _commands(parser()).items():
        assert re.search(rf"\b{command}\b", synopsis), f"{page}: {command} not in SYNOPSIS"
        for opt in options:
            assert opt in man, f"{page}: {command} {opt} not documented"


def test_config_man_page_names_every_key() -> None:
    man = _man("syslog-relay.toml.5")
    specs = {
        "relay": config._RELAY,
        "listen": config._LISTEN,
        "forward": config._FORWARD,
        "tls": config._TLS,
        "limits": config._LIMITS,
        "staging": config._STAGING,
        "archive": config._ARCHIVE,
        "metrics": config._METRICS,
        "health": config._HEALTH,
        "link": config._LINK,
        "drop": config._DROP,
    }
    for section, spec in specs.items():
        assert re.search(rf"^\.SH \[*{section}\]*$", man, re.M), section
        for key in spec:
            assert re.search(rf"\b{key}\b", man), f"syslog-relay.toml(5): {section}.{key}"


def _fake(bin_dir: Path, name: str, script: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)


def test_postinst_says_why_the_relay_did_not_start(tmp_path: Path) -> None:
    """The systemd branch of postinst with stand-ins for the system commands: a
    failed start is explained (journal, who holds port 514), not hidden."""
    systemd = tmp_path / "run-systemd-system"
    systemd.mkdir()
    script = (TOP / "packaging" / "debian" / "syslog-relay.postinst").read_text()
    script = script.replace("/run/systemd/system", str(systemd))
    (tmp_path / "postinst").write_text(script)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for ok in ("getent", "adduser", "install", "dpkg-statoverride", "systemctl"):
        _fake(bin_dir, ok, "exit 0")
    _fake(bin_dir, "deb-systemd-invoke", 'echo "invoke $*" >&2; exit 1')
    _fake(
        bin_dir,
        "journalctl",
        'echo "listen[0].address: cannot listen on 0.0.0.0:514: Address already in use"',
    )
    _fake(
        bin_dir, "ss", "echo 'tcp LISTEN 0 25 0.0.0.0:514 0.0.0.0:* users:((\"rsyslogd\",pid=9))'"
    )
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    r = subprocess.run(
        ["sh", str(tmp_path / "postinst"), "configure", ""],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert "invoke restart syslog-relay.service" in r.stderr
    assert "syslog-relay.service did not start" in r.stderr
    assert "Address already in use" in r.stderr
    assert "Port 514 is already in use (by rsyslog?)" in r.stderr and "rsyslogd" in r.stderr
    assert "syslog-relay check && systemctl restart syslog-relay.service" in r.stderr
    assert "syslog-archive" not in r.stderr  # a first install does not touch the archiver

    _fake(bin_dir, "deb-systemd-invoke", "exit 0")
    r = subprocess.run(
        ["sh", str(tmp_path / "postinst"), "configure", "0.0.9"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0 and "did not start" not in r.stderr, r.stderr
