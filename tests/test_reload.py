"""SIGHUP reload under steady load with real relay processes."""

from __future__ import annotations

import hashlib
import shutil
import signal
import socket
import ssl
import time
import uuid
from pathlib import Path

import pytest

from tests.support.certs import PKI, make_pki, pki  # noqa: F401  (fixture)
from tests.support.relayproc import Listener, RelayProcess
from tests.support.rsyslog import free_port
from tests.support.traffic import Load, seq_counts, wait_seq_counts
from tests.test_forwarding import relp_forward

pytestmark = pytest.mark.integration
WAIT = 30.0


def _cert_sha256(port: int) -> str:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw) as s:
            der = s.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def _fp_hex(fp: str) -> str:
    return fp.split(":", 1)[1].replace(":", "").lower()


def _hup_and_wait(relay: RelayProcess, marker: str) -> str:
    assert relay.proc is not None
    before = relay.log_path.read_text().count(marker)
    relay.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        text = relay.log_path.read_text()
        if text.count(marker) > before:
            return text
        time.sleep(0.05)
    raise AssertionError(f"no {marker!r} in the log:\n{relay.log()}")


def test_reload_under_load(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    p1, p2 = free_port(), free_port()
    core1 = RelayProcess(tmp_path / "c1", [Listener("relp", port=p1)], relay_id="c1")
    core2 = RelayProcess(tmp_path / "c2", [Listener("relp", port=p2)], relay_id="c2")
    cert = tmp_path / "server.crt"
    key = tmp_path / "server.key"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    a, t = Listener("tcp"), Listener("tls")
    edge = RelayProcess(
        tmp_path / "edge",
        [a, t],
        tls={"certificate": str(cert), "key": str(key)},
        forward=[relp_forward("core", [p1])],
        relay_id="edge",
    )
    core1.start()
    core2.start()
    edge.start()
    assert _cert_sha256(t.port) == _fp_hex(pki.server.fingerprint)
    tag = uuid.uuid4().hex
    load = Load(a.port, tag, n=8000, rate=2000).start()  # one connection for the whole test

    # 1. New certificate, a new listener, a second peer for the output.
    pki2 = make_pki(tmp_path / "pki2")
    shutil.copy(pki2.server.cert, cert)
    shutil.copy(pki2.server.key, key)
    b = Listener("tcp")
    edge.listeners.append(b)
    edge.forward = [relp_forward("core", [p1, p2], mode="balance")]
    edge.config_path.write_text(edge.config())
    log = _hup_and_wait(edge, "reload complete")
    assert "open 127.0.0.1:" in log and "change outputs core" in log
    assert _cert_sha256(t.port) == _fp_hex(pki2.server.fingerprint)
    tag_b = uuid.uuid4().hex
    Load(b.port, tag_b, n=100, rate=1000).start().join()

    # 2. An invalid configuration is refused; the running one stays.
    good = edge.config_path.read_text()
    edge.config_path.write_text(good + "\n[limits]\nbogus_key = 1\n")
    log = _hup_and_wait(edge, "reload refused")
    assert "limits.bogus_key: unknown key" in log
    edge.config_path.write_text(good)

    # 3. Remove the listener again and the output: its spool is kept and reported.
    edge.listeners.remove(b)
    edge.config_path.write_text(edge.config())
    _hup_and_wait(edge, "reload complete")
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", b.port), timeout=2).close()

    load.join()  # the load's single connection was never dropped (sendall would raise)
    got = seq_counts(core1, tag) + seq_counts(core2, tag)
    deadline = time.monotonic() + WAIT
    while len(got) < 8000 and time.monotonic() < deadline:
        time.sleep(0.3)
        got = seq_counts(core1, tag) + seq_counts(core2, tag)
    assert set(got) == set(range(8000)), f"missing {8000 - len(got)}\n{edge.log()}"
    assert len(wait_seq_counts(edge, tag_b, 100, 40)) == 100
    assert edge.alive()

    edge.forward = []
    edge.config_path.write_text(edge.config())
    log = _hup_and_wait(edge, "reload complete")
    assert "output core removed: its spool is kept" in log
    assert (edge.state_dir / "spool" / "core").is_dir()
    for r in (edge, core1, core2):
        r.stop()
