"""Relay roles as real processes: an edge without staging forwards everything to
the core, and its forward spool alone carries the messages across a kill -9."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

from tests.support.http import get
from tests.support.relayproc import Listener, RelayProcess
from tests.support.rsyslog import free_port
from tests.support.traffic import Load, wait_seq_counts
from tests.test_forwarding import relp_forward

pytestmark = pytest.mark.integration
WAIT = 40.0


def _status(relay: RelayProcess) -> dict[str, object]:
    code, body = get(relay.metrics_url + "/status")
    assert code == 200, body
    result: dict[str, object] = json.loads(body)
    return result


def test_edge_without_staging_forwards_through_a_kill_9(tmp_path: Path) -> None:
    core_port = free_port()
    core = RelayProcess(tmp_path / "core", [Listener("relp", port=core_port)], relay_id="core")
    edge_in = Listener("tcp")
    edge = RelayProcess(
        tmp_path / "edge",
        [edge_in],
        forward=[relp_forward("core", [core_port])],
        staging={"enabled": False},
        relay_id="edge",
    )
    edge.start()  # the core is down: everything waits in the edge's spool
    tag = uuid.uuid4().hex
    Load(edge_in.port, tag, n=800, rate=8000).start().join()
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        st = _status(edge)
        outputs = st["outputs"]
        assert isinstance(outputs, list)
        listeners = st["listeners"]
        assert isinstance(listeners, list)
        writer = st["writer"]
        assert isinstance(writer, dict)
        if listeners[0]["messages"] == 800 and writer["pending_bytes"] == 0:
            break
        time.sleep(0.1)
    assert edge.proc is not None
    os.kill(edge.proc.pid, signal.SIGKILL)
    edge.proc.wait(10)
    assert list((edge.state_dir / "staging").rglob("*.stg")) == []  # never staged

    edge.start()
    core.start()
    got = wait_seq_counts(core, tag, 800, WAIT)
    assert sorted(got) == list(range(800)), edge.log()
    assert set(got.values()) == {1}  # nothing was in flight at the kill: no duplicates
    assert list((edge.state_dir / "staging").rglob("*.stg")) == []
    for r in (edge, core):
        assert r.stop() == 0
