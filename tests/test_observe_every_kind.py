"""/status and /metrics of a real RelayService with every listener and output kind, against
a recorded copy (tests/golden/observe_every_kind.json).

The observer reads each component's ``snapshot()``; this pins what it serves: every key of
/status and every metric name, label set and value, with the figures that change from run
to run (times, pid, bound ports, process metrics) left out. After an intended change to the
endpoints, regenerate the copy with ``UPDATE_GOLDEN=1 pytest tests/test_observe_every_kind.py``
and review its diff.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.python.failure import Failure

from relay.config import parse
from relay.service import make_service
from tests.support.certs import PKI, pki, server_tls  # noqa: F401  (fixture)

GOLDEN = Path(__file__).parent / "golden" / "observe_every_kind.json"
LISTENERS = ("tcp", "udp", "tls", "relp", "relp+tls", "link+tls")
# Different on every run: not compared.
VOLATILE_STATUS = {"now", "started", "uptime", "pid", "version", "port", "oldest_age", "path"}
VOLATILE_STATUS |= {"no_peer_for", "time"}
VOLATILE_METRICS = ("process_", "python_", "syslog_relay_start_time_seconds", "syslog_relay_build")
# Real time since the spool's record and the outputs' start: the series, not their value.
VOLATILE_VALUES = ("syslog_relay_spool_oldest_age_seconds", "syslog_relay_forward_no_peer_seconds")


def _config(tmp_path: Path, pki: PKI) -> dict[str, Any]:  # noqa: F811
    return {
        "relay": {"id": "edge1", "state_dir": str(tmp_path / "state")},
        "listen": [{"address": "127.0.0.1:0", "transport": t, "name": t} for t in LISTENERS],
        "tls": server_tls(pki, permitted_peers=["*.clients.test"]),
        "forward": [
            {"name": "relp", "peers": ["127.0.0.1:9", "127.0.0.2:9"], "transport": "relp"},
            {"name": "tcp", "peers": ["127.0.0.1:9"], "transport": "tcp"},
            {"name": "tls", "peers": ["127.0.0.1:9"], "transport": "tls", "tls_ca": str(pki.ca)},
            {
                "name": "link",
                "peers": ["127.0.0.1:9"],
                "transport": "link+tls",
                "tls_ca": str(pki.ca),
            },
        ],
        "metrics": {"enabled": False},
    }


def _masked(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("<volatile>" if k in VOLATILE_STATUS else _masked(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


def _exposition(registry: Any) -> list[list[Any]]:
    text = generate_latest(registry).decode()
    rows = []
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith(VOLATILE_METRICS):
            continue
        for s in fam.samples:
            value = "<volatile>" if s.name in VOLATILE_VALUES else s.value
            rows.append([s.name, sorted(s.labels.items()), value, fam.type, fam.documentation])
    return sorted(rows, key=lambda r: (r[0], r[1]))


def test_status_and_metrics_of_every_listener_and_output_kind(
    tmp_path: Path,
    pki: PKI,  # noqa: F811
) -> None:
    service = make_service(parse(_config(tmp_path, pki)), reactor)
    for spool in service.spools.values():
        spool.open()
    # Bound on the real reactor (synchronously: it is not run), never started.
    service.listen()
    try:
        assert sorted(lc.transport for lc, *_ in service.listeners.ports) == sorted(LISTENERS)
        service.spools["tcp"].append([b"<14>1 - h app - - - one", b"<14>1 - h app - - - two"], 1.0)
        service.metrics.inc("messages_received_total", 3, listener="tcp")
        obs = service.observer  # type: ignore[attr-defined]
        got = {
            "status": _masked(obs.status()),
            "health": obs.health(),
            "metrics": _exposition(obs.registry),
        }
    finally:
        for _, port, *_ in service.listeners.ports:
            port.connectionLost(Failure(ConnectionError("test over")))
        for spool in service.spools.values():
            spool.close()
    got = json.loads(json.dumps(got, default=str))
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    expected = json.loads(GOLDEN.read_text())
    assert got["status"] == expected["status"]
    assert got["health"] == expected["health"]
    want = {(r[0], json.dumps(r[1])): r[2:] for r in expected["metrics"]}
    have = {(r[0], json.dumps(r[1])): r[2:] for r in got["metrics"]}
    assert sorted(set(want) - set(have)) == [], "series gone"
    assert sorted(set(have) - set(want)) == [], "series added"
    assert {k: v for k, v in have.items() if want[k] != v} == {}
