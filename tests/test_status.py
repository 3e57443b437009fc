"""/metrics, /health and ``syslog-relay status`` against real relay processes, and the
status client's edge cases (unreachable daemon, bad config, disabled endpoint)."""

from __future__ import annotations

import argparse
import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.formats import octet
from relay.ops import status
from tests.support.http import Samples, get, parse_metrics
from tests.support.http import wait_for as _wait_for
from tests.support.relayproc import Listener, RelayProcess
from tests.support.rsyslog import free_port

WAIT = 20.0


def wait_for(what: str, probe: Callable[[], Any], timeout: float = WAIT) -> Any:
    return _wait_for(what, probe, timeout)


def scrape(relay: RelayProcess) -> Samples:
    _, text = get(relay.metrics_url + "/metrics")
    return parse_metrics(text)


def args(relay: RelayProcess, as_json: bool) -> argparse.Namespace:
    return argparse.Namespace(config=str(relay.config_path), json=as_json)


@pytest.fixture
def relays(tmp_path: Path) -> Iterator[list[RelayProcess]]:
    started: list[RelayProcess] = []
    yield started
    for r in started:
        r.stop()


def test_metrics_health_and_status_follow_traffic_and_the_peer(
    tmp_path: Path, relays: list[RelayProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    core_port = free_port()
    core = RelayProcess(tmp_path / "core", [Listener("relp", port=core_port)], relay_id="core")
    inp = Listener("tcp", framing="octet-counting")
    edge = RelayProcess(
        tmp_path / "edge",
        [inp],
        relay_id="edge",
        forward=[
            {
                "name": "core",
                "peers": [f"127.0.0.1:{core_port}"],
                "transport": "relp",
                "reconnect_min": "100ms",
                "reconnect_max": "300ms",
            }
        ],
        health={"no_peer_after": "1s"},
    )
    relays.append(edge)
    edge.start()
    listener = (("listener", f"tcp:{inp.port}"), ("transport", "tcp"))
    output = (("output", "core"),)
    peer = (*output, ("peer", f"127.0.0.1:{core_port}"))
    msgs = [f"<14>1 - host{i % 3} app - - - observe seq={i:04d}".encode() for i in range(100)]
    with socket.create_connection(("127.0.0.1", inp.port), timeout=10) as s:
        s.sendall(b"".join(octet.encode(m) for m in msgs))
    garbage = b"99999999999999999999 garbage"
    for _ in range(3):  # garbage: an octet count that can never end
        with socket.create_connection(("127.0.0.1", inp.port), timeout=10) as s:
            s.sendall(garbage)
            s.settimeout(10)
            assert s.recv(1) == b""  # the relay closed it
    # What it had read of each is kept as one message flagged M (issue 11.11).
    n = 100 + 3

    m = wait_for(
        "103 messages received and spooled in /metrics",
        lambda: (
            (m := scrape(edge)).get(("syslog_relay_messages_received_total", listener)) == n
            and m.get(("syslog_relay_spool_bytes", output), 0) > sum(len(x) for x in msgs)
            and m
        ),
    )
    # A spool record holds the messages of one received chunk.
    assert 1 <= m[("syslog_relay_spool_records", output)] <= n
    framed = sum(len(octet.encode(x)) for x in msgs)
    assert framed < m[("syslog_relay_bytes_received_total", listener)] <= framed + 3 * len(garbage)
    # Ours, and the one that RelayProcess.start made to see the port open.
    assert m[("syslog_relay_connections_opened_total", listener)] == 4 + 1
    assert m[("syslog_relay_framing_errors_total", (("kind", "length_too_long"), *listener))] == 3
    assert m[("syslog_relay_forward_peer_up", peer)] == 0
    assert m[("syslog_relay_forward_delivered_total", output)] == 0
    assert m[("syslog_relay_staging_open_files", ())] >= 1

    _, body = wait_for(
        "/health degraded", lambda: (r := get(edge.metrics_url + "/health"))[0] == 503 and r
    )
    assert body.startswith("degraded: forward core: no connected peer for ")
    assert scrape(edge)[("syslog_relay_forward_retries_total", peer)] >= 1

    assert status.main(args(edge, as_json=True)) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["health"]["status"] == "degraded"
    (lst,) = st["listeners"]
    assert (lst["messages"], lst["framing_errors"], lst["connections_opened"]) == (n, 3, 5)
    (out,) = st["outputs"]
    assert out["backlog"]["records"] == m[("syslog_relay_spool_records", output)]
    assert out["state"] == "no peer"
    assert out["peers"][0]["state"] in ("backoff", "connecting", "idle")
    assert status.main(args(edge, as_json=False)) == 0
    text = capsys.readouterr().out
    assert "DEGRADED" in text and "no connected peer" in text and f"tcp:{inp.port}" in text

    relays.append(core)
    core.start()
    wait_for("/health ok", lambda: get(edge.metrics_url + "/health") == (200, "ok\n"))
    m = wait_for(
        "the backlog delivered",
        lambda: (
            (m := scrape(edge)).get(("syslog_relay_forward_delivered_total", output)) == n and m
        ),
    )
    assert m[("syslog_relay_forward_peer_up", peer)] == 1
    wait_for(
        "an empty spool",
        lambda: scrape(edge)[("syslog_relay_spool_records", output)] == 0,
    )
    assert len(core.wait_records(lambda r: b"observe seq=" in r.msg, 100)) == 100
    cm = scrape(core)
    relp_in = (("listener", f"relp:{core_port}"), ("transport", "relp"))
    assert cm[("syslog_relay_relp_acks_total", relp_in)] == n
    assert cm[("syslog_relay_messages_received_total", relp_in)] == n  # counted once
    assert cm[("syslog_relay_bytes_received_total", relp_in)] > sum(len(x) for x in msgs)  # marked

    assert status.main(args(edge, as_json=False)) == 0
    text = capsys.readouterr().out
    assert ": OK" in text and "connected" in text


def test_status_of_a_relay_that_is_not_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    conf = tmp_path / "relay.toml"
    conf.write_text(
        f'[relay]\nid = "r"\nstate_dir = "{tmp_path}"\n[metrics]\naddress = "127.0.0.1:{port}"\n'
    )
    ns = argparse.Namespace(config=str(conf), json=False)
    assert status.main(ns) == 1
    err = capsys.readouterr().err
    assert f"cannot reach http://127.0.0.1:{port}/status" in err and "is the relay running" in err

    conf.write_text(f'[relay]\nid = "r"\nstate_dir = "{tmp_path}"\n[metrics]\nenabled = false\n')
    assert status.main(ns) == 1
    assert "metrics.enabled = false" in capsys.readouterr().err

    conf.write_text('[metrics]\naddress = "nowhere"\n')
    assert status.main(ns) == 2
    assert "metrics.address: expected HOST:PORT" in capsys.readouterr().err


def test_status_of_something_else_on_the_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import http.server
    import threading

    class NotUs(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>hello</html>")

        def log_message(self, *a: Any) -> None:
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), NotUs)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        conf = tmp_path / "relay.toml"
        conf.write_text(
            f'[relay]\nid = "r"\nstate_dir = "{tmp_path}"\n'
            f'[metrics]\naddress = "127.0.0.1:{httpd.server_address[1]}"\n'
        )
        assert status.main(argparse.Namespace(config=str(conf), json=True)) == 1
        assert "did not answer JSON" in capsys.readouterr().err
    finally:
        httpd.shutdown()
        httpd.server_close()
        t.join(5)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (("127.0.0.1", 9514), "http://127.0.0.1:9514/status"),
        (("0.0.0.0", 9514), "http://127.0.0.1:9514/status"),
        (("::", 1), "http://[::1]:1/status"),
        (("fe80::1", 2), "http://[fe80::1]:2/status"),
    ],
)
def test_url(address: tuple[str, int], expected: str) -> None:
    assert status.url(address) == expected


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (5 * 1024**3, "5.0 GiB"), (None, "-")],
)
def test_size(n: int | None, text: str) -> None:
    assert status.size(n) == text


@pytest.mark.parametrize(
    ("s", "text"),
    [
        (None, "-"),
        (3.25, "3.2s"),
        (42, "42s"),
        (600, "10m00s"),
        (7300, "2h01m"),
        (90000, "25h00m"),
        (3 * 86400 + 3600, "3d01h"),
    ],
)
def test_age(s: float | None, text: str) -> None:
    assert status.age(s) == text
