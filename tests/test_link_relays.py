"""The relay link between real relay processes: loss, duplicates and refusals, message by
message at the core (loopback only, bounded in time)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support.certs import PKI, pki, server_tls  # noqa: F401  (fixture)
from tests.support.http import get
from tests.support.relayproc import Listener, RelayProcess
from tests.support.rsyslog import free_port
from tests.support.traffic import Load, wait_seq_counts

pytestmark = pytest.mark.integration
WAIT = 40.0


def link_forward(pki: PKI, ports: list[int], **kw: Any) -> dict[str, Any]:  # noqa: F811
    fwd: dict[str, Any] = {
        "name": "core",
        "peers": [f"127.0.0.1:{p}" for p in ports],
        "transport": "link+tls",
        "reconnect_min": "0.1s",
        "reconnect_max": "0.5s",
        "ack_timeout": "5s",
        "max_spool": "256MiB",
        "tls_ca": str(pki.ca),
        "tls_certificate": str(pki.clients["good"].cert),
        "tls_key": str(pki.clients["good"].key),
        "tls_peer_name": "relay.test",
    }
    fwd.update(kw)
    return fwd


def make_pair(
    tmp_path: Path,
    pki: PKI,  # noqa: F811
    core_port: int | None = None,
    **fwd: Any,
) -> tuple[RelayProcess, RelayProcess, Listener]:
    core_port = core_port or free_port()
    core = RelayProcess(
        tmp_path / "core",
        [Listener("link+tls", port=core_port)],
        tls=server_tls(pki, ["*.clients.test"]),
        relay_id="core",
    )
    edge_in = Listener("tcp")
    edge = RelayProcess(
        tmp_path / "edge",
        [edge_in],
        forward=[link_forward(pki, [core_port], **fwd)],
        relay_id="edge",
    )
    return core, edge, edge_in


def assert_exact(got: Any, n: int, log: str) -> None:
    missing = sorted(set(range(n)) - set(got))
    assert not missing, f"{len(missing)} missing, first {missing[:5]}\n{log}"
    dups = {s: c for s, c in got.items() if c > 1}
    assert not dups, f"{len(dups)} duplicated, first {sorted(dups)[:5]}\n{log}"


def test_edge_to_core_byte_exact_and_counted(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    core, edge, edge_in = make_pair(tmp_path, pki)
    core.start()
    edge.start()
    try:
        tag = uuid.uuid4().hex
        Load(edge_in.port, tag, n=3000, rate=3000).start().join()
        got = wait_seq_counts(core, tag, 3000, WAIT)
        assert_exact(got, 3000, edge.log() + core.log())
        # Byte-exact: the core staged what the edge received (no in-band loop-guard mark).
        sample = [r.msg for r in core.records() if tag.encode() in r.msg][:3]
        assert all(b"relay@32473" not in m for m in sample), sample
        metrics = get(edge.metrics_url + "/metrics")[1]
        assert 'syslog_relay_link_bytes_wire_total{output="core"}' in metrics
        assert "syslog_relay_link_ack_latency_seconds_bucket" in metrics
    finally:
        edge.stop()
        core.stop()
