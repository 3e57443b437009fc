"""The shipped alert rules: valid (promtool check rules), each alert fires on a synthetic
host in trouble and stays quiet on a healthy one (promtool test rules), and every metric
they name is one the daemons export."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from prometheus_client import generate_latest
from twisted.internet.task import Clock

from archive.observe import ArchiveObserver, ArchiveStats
from relay.config import parse
from tests.test_observe import FakeRelay, attach

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "etc" / "prometheus" / "syslog-relay.rules.yml"
TESTS = ROOT / "tests" / "prometheus" / "syslog-relay.rules.test.yml"


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool not found: apt-get install prometheus (tools/setup.sh does)"
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


def alerts() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.M)


def test_rules_are_valid() -> None:
    r = promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in r.stdout


def test_each_alert_fires_in_trouble_and_stays_quiet_when_healthy() -> None:
    text = TESTS.read_text()
    trouble, healthy = text.split("  - name: healthy\n")
    assert len(alerts()) >= 10
    for name in alerts():
        assert re.search(rf"alertname: {name}\n\s+exp_alerts:\n\s+- exp_labels:", trouble), name
        assert f"alertname: {name}, exp_alerts: []}}" in healthy, name
    r = promtool("test", "rules", TESTS.name, cwd=TESTS.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_the_old_archive_failing_rule_could_never_fire(tmp_path: Path) -> None:
    """The README's earlier rule compared series with different labels (`kind`)."""
    old = "increase(syslog_archive_upload_failures_total[30m]) > 0 and increase(syslog_archive_uploads_total[30m]) == 0"  # noqa: E501
    rules = RULES.read_text()
    start = rules.index("        expr: >\n          sum without (kind)")
    end = rules.index("        labels:", start)
    (tmp_path / "old.rules.yml").write_text(rules[:start] + f"        expr: {old}\n" + rules[end:])
    tests = TESTS.read_text().replace(
        "../../etc/prometheus/syslog-relay.rules.yml", "old.rules.yml"
    )
    (tmp_path / "t.yml").write_text(tests)
    r = promtool("test", "rules", "t.yml", cwd=tmp_path)
    assert r.returncode != 0
    failed = re.findall(r"alertname: (\w+), time", r.stdout + r.stderr)
    assert failed == ["SyslogArchiveFailing"], r.stdout


def _exported(text: str) -> set[str]:
    return set(re.findall(r"^(\w+)(?:\{| )", text, re.M))


def test_every_metric_in_the_rules_is_exported(tmp_path: Path) -> None:
    data = {
        "relay": {"id": "edge1", "state_dir": str(tmp_path / "state")},
        "listen": [{"address": "127.0.0.1:5514", "transport": "tcp"}],
        "forward": [{"name": "core", "peers": ["10.0.0.1:2514"]}],
        "archive": {"enabled": True, "bucket": "b"},
        "metrics": {"enabled": False},
    }
    cfg = parse(data)
    relay = FakeRelay(cfg, Clock())
    obs = attach(relay)
    relay.startService()
    names = _exported(generate_latest(obs.registry).decode())
    relay.stopService()
    names |= _exported(generate_latest(ArchiveObserver(cfg, ArchiveStats()).registry).decode())
    used = set(re.findall(r"\bsyslog_(?:relay|archive)_\w+", RULES.read_text()))
    assert used and used <= names, used - names
