"""``check`` next to a running daemon, and the units' ``ExecReload`` (check, then SIGHUP).

systemd runs a unit's ExecReload= lines in order and stops at the first that
fails, which then fails ``systemctl reload`` with that line's output in
``systemctl status``. Here the lines are read from the packaged units and run
the same way against a real relay process (the program paths mapped to this
checkout), so the test follows the unit file.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

from relay.config import DEFAULT_CONFIG_PATH
from tests.support.http import get, wait_for
from tests.support.relayproc import REPO, Listener, RelayProcess

DEBIAN = REPO / "packaging" / "debian"


def _exec_reload(unit: str, config: Path, pid: int) -> list[list[str]]:
    """The unit's ExecReload= command lines, runnable from this checkout."""
    programs = {
        "/usr/bin/syslog-relay": [sys.executable, "-m", "relay"],
        "/usr/bin/syslog-archive": [sys.executable, "-m", "archive"],
    }
    out = []
    for line in (DEBIAN / unit).read_text().splitlines():
        if not line.startswith("ExecReload="):
            continue
        argv = shlex.split(line.removeprefix("ExecReload="))
        argv = [str(config) if a == DEFAULT_CONFIG_PATH else a for a in argv]
        argv = [str(pid) if a == "$MAINPID" else a for a in argv]
        out.append(programs.get(argv[0], [argv[0]]) + argv[1:])
    return out


def _systemctl_reload(commands: list[list[str]]) -> subprocess.CompletedProcess[str] | None:
    """Run the lines as systemd does: stop at the first failure and return it (None: ok)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for argv in commands:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
        if r.returncode != 0:
            return r
    return None


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=60, env=env
    )


def test_check_passes_while_the_relay_holds_its_addresses(tmp_path: Path) -> None:
    tcp, udp = Listener("tcp"), Listener("udp")
    with RelayProcess(tmp_path, [tcp, udp]) as relay:
        # A real relay with its writer thread: alive (/live), whatever /health says.
        assert wait_for("/live", lambda: get(relay.metrics_url + "/live"), 20) == (200, "alive\n")
        conf = str(relay.config_path)
        r = _cli("relay", "check", "--config", conf)
        assert r.returncode == 0, r.stderr
        assert "OK" in r.stdout
        r = _cli("relay", "check", "--no-bind", "--config", conf)  # kept, a no-op
        assert r.returncode == 0, r.stderr
        r = _cli("relay", "check", "--bind", "--config", conf)
        assert r.returncode == 2
        assert f"listen[0].address: cannot listen on 127.0.0.1:{tcp.port}" in r.stderr
        assert f"listen[1].address: cannot listen on 127.0.0.1:{udp.port}" in r.stderr
        assert f"metrics.address: cannot listen on {relay.metrics['address']}" in r.stderr
    r = _cli("relay", "check", "--bind", "--config", conf)  # stopped: the addresses are free
    assert r.returncode == 0, r.stderr


def test_relay_unit_reload_checks_first(tmp_path: Path) -> None:
    with RelayProcess(tmp_path, [Listener("tcp")]) as relay:
        assert relay.proc is not None
        commands = _exec_reload("syslog-relay.service", relay.config_path, relay.proc.pid)
        assert [c[3] for c in commands[:1]] == ["check"]  # python -m relay check ...
        assert commands[-1][:2] == ["/bin/kill", "-HUP"]

        # A good configuration: the check passes although the relay holds the port,
        # and the relay reloads.
        assert _systemctl_reload(commands) is None
        wait_for("reload complete", lambda: "reload complete" in relay.log(), 20)

        # A bad one: the check fails, naming the key; no SIGHUP reaches the relay.
        good = relay.config_path.read_text()
        relay.config_path.write_text(good + '\n[limits]\noversize = "explode"\n')
        failed = _systemctl_reload(commands)
        assert failed is not None and failed.returncode == 2
        assert "limits.oversize: must be one of" in failed.stderr
        assert relay.log().count("SIGHUP: reloading") == 1
        assert relay.alive()
    assert relay.proc.returncode == 0


def test_archive_unit_reload_checks_first_without_probing(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(
        f'[relay]\nstate_dir = "{tmp_path}"\n'
        # Nothing listens there: --no-probe must not reach for the bucket.
        '[archive]\nenabled = true\nbucket = "b"\nendpoint_url = "http://127.0.0.1:9"\n'
    )
    commands = _exec_reload("syslog-relay.syslog-archive.service", conf, 0)
    assert commands[-1][:2] == ["/bin/kill", "-HUP"]
    commands = commands[:-1]  # no archiver runs here: the check is what is under test
    assert commands and commands[0][3:5] == ["check", "--no-probe"]
    assert _systemctl_reload(commands) is None
    conf.write_text(conf.read_text() + "compression_level = 99\n")
    failed = _systemctl_reload(commands)
    assert failed is not None and failed.returncode == 2
    assert "archive.compression_level" in failed.stderr


def test_archive_check_binds_only_when_asked(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        conf = tmp_path / "c.toml"
        conf.write_text(
            f'[relay]\nstate_dir = "{tmp_path}"\n[archive]\nenabled = true\nbucket = "b"\n'
            f'[metrics]\narchive_address = "127.0.0.1:{port}"\n'
        )
        r = _cli("archive", "check", "--no-probe", "--config", str(conf))
        assert r.returncode == 0, r.stderr
        r = _cli("archive", "check", "--no-probe", "--bind", "--config", str(conf))
        assert r.returncode == 2
        assert f"metrics.archive_address: cannot listen on 127.0.0.1:{port}" in r.stderr
