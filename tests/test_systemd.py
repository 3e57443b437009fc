"""relay.ops.systemd against a real AF_UNIX datagram socket, as systemd would provide."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.ops import systemd


class _Listener:
    """A bound SOCK_DGRAM socket standing in for systemd's notify socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env = {"NOTIFY_SOCKET": env_value}

    def received(self) -> list[str]:
        self.sock.settimeout(2.0)
        return self.sock.recv(65536).decode("utf-8").split("\n")

    def nothing_pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(65536)
        except BlockingIOError:
            return True
        return False


@pytest.fixture
def path_listener() -> Iterator[_Listener]:
    # sun_path is limited to 108 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="sdn", dir="/tmp") as d:
        path = str(Path(d) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            yield _Listener(sock, path)


@pytest.fixture
def abstract_listener() -> Iterator[_Listener]:
    name = f"syslog-relay-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        yield _Listener(sock, "@" + name)


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest) -> _Listener:
    fixture = "path_listener" if request.param == "path" else "abstract_listener"
    result: _Listener = request.getfixturevalue(fixture)
    return result


SENDERS: list[tuple[Callable[..., bool], tuple[str, ...], list[str]]] = [
    (systemd.notify_ready, (), ["READY=1"]),
    (systemd.notify_ready, ("listening on tcp:514",), ["READY=1", "STATUS=listening on tcp:514"]),
    (systemd.notify_stopping, (), ["STOPPING=1"]),
    (systemd.notify_reloading, (), ["RELOADING=1"]),
    (systemd.notify_watchdog, (), ["WATCHDOG=1"]),
    (systemd.notify_status, ("3 peers, backlog 0",), ["STATUS=3 peers, backlog 0"]),
    (systemd.notify_status, ("two\nlines",), ["STATUS=two lines"]),
]


@pytest.mark.parametrize(("send", "args", "expected"), SENDERS)
def test_sends_one_datagram(
    listener: _Listener,
    send: Callable[..., bool],
    args: tuple[str, ...],
    expected: list[str],
) -> None:
    assert send(*args, environ=listener.env) is True
    assert listener.received() == expected
    assert listener.nothing_pending()


def test_uses_os_environ_by_default(
    abstract_listener: _Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", abstract_listener.env["NOTIFY_SOCKET"])
    assert systemd.notify_ready() is True
    assert abstract_listener.received() == ["READY=1"]


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"NOTIFY_SOCKET": ""},
        {"NOTIFY_SOCKET": "relative/path"},
        {"NOTIFY_SOCKET": "vsock:2:1234"},
        {"NOTIFY_SOCKET": "/nonexistent/syslog-relay/notify"},
        {"NOTIFY_SOCKET": f"@syslog-relay-nobody-{uuid.uuid4().hex}"},
    ],
)
def test_no_op_or_false_without_a_usable_socket(env: dict[str, str]) -> None:
    assert systemd.notify_ready(environ=env) is False
    assert systemd.notify_stopping(environ=env) is False


def test_no_assignments_sends_nothing(abstract_listener: _Listener) -> None:
    assert systemd.notify(environ=abstract_listener.env) is False
    assert abstract_listener.nothing_pending()


def test_unset_notify_socket_in_process_env_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify_ready() is False


@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=200))
def test_status_is_always_one_assignment(text: str) -> None:
    name = f"syslog-relay-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        assert systemd.notify_status(text, environ={"NOTIFY_SOCKET": "@" + name})
        lines = sock.recv(65536).decode("utf-8").split("\n")
    assert len(lines) == 1
    assert lines[0].startswith("STATUS=")


MY_PID = str(os.getpid())

WATCHDOG_CASES: list[tuple[dict[str, str], float | None]] = [
    ({}, None),
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": MY_PID}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({"WATCHDOG_USEC": "1"}, 0.0000005),
    ({"WATCHDOG_PID": MY_PID}, None),
]


@pytest.mark.parametrize(("env", "expected"), WATCHDOG_CASES)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert systemd.watchdog_interval(environ=env) == expected


def test_watchdog_interval_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", MY_PID)
    assert systemd.watchdog_interval() == 2.0


def test_a_running_relay_keeps_status_up_to_date(
    tmp_path: Path, abstract_listener: _Listener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real relay under a stand-in notify socket: READY=1, then STATUS= lines with live
    figures, every STATUS_INTERVAL (bounded wait, no timing assertion)."""
    from relay.ops.observe import STATUS_INTERVAL
    from tests.support.relayproc import Listener, RelayProcess

    monkeypatch.setenv("NOTIFY_SOCKET", abstract_listener.env["NOTIFY_SOCKET"])
    abstract_listener.sock.settimeout(STATUS_INTERVAL * 4)
    with RelayProcess(tmp_path, [Listener("tcp")]) as relay:
        monkeypatch.delenv("NOTIFY_SOCKET")
        seen: list[str] = []
        for _ in range(20):
            seen += abstract_listener.sock.recv(65536).decode().split("\n")
            if any("msg/s in" in line for line in seen):
                break
        assert relay.alive()
    assert "READY=1" in seen
    status = [line for line in seen if "msg/s in" in line]
    assert status and status[0].startswith("STATUS=0 msg/s in; ") and status[0].endswith("; ok")
