"""A reload changes a forward output's selector live: what was spooled stays, nothing twice."""

from __future__ import annotations

import json
import socket
import urllib.request
import uuid
from pathlib import Path

import pytest

from relay import config
from relay.formats import octet
from relay.ops.status import render_relay
from tests.support.relayproc import Listener, RelayProcess
from tests.support.rsyslog import free_port
from tests.support.traffic import seq_counts, wait_seq_counts
from tests.test_forwarding import relp_forward
from tests.test_reload import _hup_and_wait

pytestmark = pytest.mark.integration
WAIT = 40.0


def _send(port: int, tag: str, seqs: range) -> None:
    """user.err for even sequence numbers, user.info for odd ones, on one connection."""
    msgs = [
        b"<%d>1 - edgehost app - - - %b seq=%07d" % (11 if n % 2 == 0 else 14, tag.encode(), n)
        for n in seqs
    ]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"".join(octet.encode(m) for m in msgs))


def test_reload_changes_a_selector_without_losing_or_repeating_spooled_messages(
    tmp_path: Path,
) -> None:
    core_port = free_port()
    core = RelayProcess(tmp_path / "core", [Listener("relp", port=core_port)], relay_id="core")
    a = Listener("tcp")
    edge = RelayProcess(
        tmp_path / "edge",
        [a],
        forward=[relp_forward("core", [core_port], select={"severity": "warning"})],
        relay_id="edge",
    )
    edge.start()
    tag = uuid.uuid4().hex
    try:
        # 1. The peer is down: the selected messages (errors) wait in the spool.
        _send(a.port, tag, range(0, 200))
        assert len(wait_seq_counts(edge, tag, 200, WAIT)) == 200
        # 2. Reload: the output now takes info and above (everything sent here).
        edge.forward = [relp_forward("core", [core_port], select={"severity": "info"})]
        edge.config_path.write_text(edge.config())
        log = _hup_and_wait(edge, "reload complete")
        assert "change outputs core" not in log  # a selector alone keeps the connection
        _send(a.port, tag, range(200, 400))
        assert len(wait_seq_counts(edge, tag, 400, WAIT)) == 400
        # 3. The peer comes up: the spooled errors and everything after the reload, once.
        core.start()
        want = set(range(0, 200, 2)) | set(range(200, 400))
        got = wait_seq_counts(core, tag, len(want), WAIT)
        assert set(got) == want, f"missing {sorted(want - set(got))[:10]}\n{edge.log()}"
        assert max(got.values()) == 1
        assert max(seq_counts(edge, tag).values()) == 1  # staging: every message, once
        with urllib.request.urlopen(edge.metrics_url + "/metrics", timeout=10) as r:
            metrics = r.read().decode()
        assert 'syslog_relay_messages_selected_total{selector="forward.core"} 300.0' in metrics
        assert 'syslog_relay_messages_not_selected_total{selector="forward.core"} 100.0' in metrics
        with urllib.request.urlopen(edge.metrics_url + "/status", timeout=10) as r:
            status = json.loads(r.read())
        assert status["selectors"] == [
            {"selector": "forward.core", "selected": 300, "not_selected": 100}
        ]
        text = render_relay(status, config.load(edge.config_path))
        assert "Selectors\n  forward.core" in text
    finally:
        edge.stop()
        core.stop()
