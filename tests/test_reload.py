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

from relay.framing import encode_octet_counted
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


# --- a refused reload changes nothing (TLS, limits, listeners, outputs)


def _tls_send(port: int, pki: PKI, msg: bytes, client: str | None) -> bool:  # noqa: F811
    """Send ``msg`` over TLS (with ``client``'s certificate, or none): True when the
    relay kept the connection (a refused client gets an alert or EOF on read)."""
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.check_hostname = False
    if client is not None:
        ctx.load_cert_chain(pki.clients[client].cert, pki.clients[client].key)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw) as s:
                s.sendall(encode_octet_counted(msg))
                s.settimeout(3)
                try:
                    return s.recv(1) != b""  # the relay never writes: EOF or alert = refused
                except TimeoutError:
                    return True
    except (ssl.SSLError, ConnectionError):
        return False


def _tcp_send(port: int, msg: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(encode_octet_counted(msg))


@pytest.mark.parametrize("refusal", ["bind", "spool"])
def test_a_refused_reload_changes_nothing(tmp_path: Path, pki: PKI, refusal: str) -> None:  # noqa: F811
    """Before: a bind failure (or a spool that cannot open) after the TLS context was
    swapped left verify_clients=false in force while the log said nothing changed."""
    a, b, t = Listener("tcp"), Listener("tcp"), Listener("tls")
    dead_peer = free_port()
    tls_cfg = {
        "certificate": str(pki.server.cert),
        "key": str(pki.server.key),
        "ca": str(pki.ca),
        "verify_clients": True,
    }
    relay = RelayProcess(
        tmp_path / "r",
        [a, b, t],
        tls=tls_cfg,
        limits={"max_message_size": "64KiB"},
        forward=[relp_forward("core", [dead_peer])],
    )
    relay.start()
    tag = uuid.uuid4().hex
    assert not _tls_send(t.port, pki, f"<14>1 - h app - - - {tag} no-cert-0".encode(), None)

    # The new configuration: clients without a certificate, a smaller message limit,
    # listener b gone, output core changed and output x added, and one thing that fails.
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    new = RelayProcess(
        relay.workdir,
        [a, t],
        tls={**tls_cfg, "verify_clients": False},
        limits={"max_message_size": "1KiB"},
        forward=[relp_forward("core", [dead_peer, free_port()]), relp_forward("x", [dead_peer])],
        metrics=relay.metrics,
    )
    if refusal == "bind":
        new.listeners.append(Listener("tcp", port=busy.getsockname()[1]))
    else:
        (relay.state_dir / "spool").mkdir(exist_ok=True)
        (relay.state_dir / "spool" / "x").write_text("in the way")
    relay.config_path.write_text(new.config())
    log = _hup_and_wait(relay, "reload refused")
    key = "listen[2].address" if refusal == "bind" else "forward[1].name"
    assert f"the previous configuration stays: {key}" in log

    # TLS: still no client without a certificate; with one, yes.
    assert not _tls_send(t.port, pki, f"<14>1 - h app - - - {tag} no-cert-1".encode(), None)
    assert _tls_send(t.port, pki, f"<14>1 - h app - - - {tag} good-cert".encode(), "good")
    # Limits: a 2000-byte message is kept whole (the new limit would truncate it).
    big = f"<14>1 - h app - - - {tag} big ".encode() + b"x" * 2000
    _tcp_send(a.port, big)
    # Listeners: b still accepts.
    _tcp_send(b.port, f"<14>1 - h app - - - {tag} via-b".encode())
    got = {r.msg: r.flags for r in relay.wait_records(lambda r: tag.encode() in r.msg, 3)}
    assert set(got) == {
        f"<14>1 - h app - - - {tag} good-cert".encode(),
        big,
        f"<14>1 - h app - - - {tag} via-b".encode(),
    }
    assert b"T" not in got[big]
    # Outputs: x was never started, core never restarted.
    text = relay.log_path.read_text()
    assert "output x: started" not in text and "restarted with its new settings" not in text
    assert "Traceback" not in text
    busy.close()

    # The same configuration without the failing part is taken whole.
    if refusal == "bind":
        new.listeners.pop()
    else:
        (relay.state_dir / "spool" / "x").unlink()
    relay.config_path.write_text(new.config())
    log = _hup_and_wait(relay, "reload complete")
    assert _tls_send(t.port, pki, f"<14>1 - h app - - - {tag} no-cert-2".encode(), None)
    assert "output x: started" in log
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", b.port), timeout=2).close()
    assert relay.stop() == 0
