"""SIGHUP reload under steady load with real relay processes."""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import signal
import socket
import ssl
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from relay.formats import octet
from relay.tools import loadgen
from relay.tools.loadgen import LoadSpec
from tests.support.certs import PKI, make_pki, pki  # noqa: F401  (fixture)
from tests.support.http import wait_for
from tests.support.relayproc import Listener, RelayProcess
from tests.support.rsyslog import free_port
from tests.support.traffic import Load, seq_counts, wait_seq_counts
from tests.test_forwarding import relp_forward

pytestmark = pytest.mark.integration
WAIT = 30.0
LSEQ = re.compile(rb" seq=(\d{10}) ")  # relay.tools.loadgen's sequence token


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
                s.sendall(octet.encode(msg))
                s.settimeout(3)
                try:
                    return s.recv(1) != b""  # the relay never writes: EOF or alert = refused
                except TimeoutError:
                    return True
    except (ssl.SSLError, ConnectionError):
        return False


def _tcp_send(port: int, msg: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(octet.encode(msg))


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


# --- a storm of overlapping reloads under load


def _fds(relay: RelayProcess) -> list[str]:
    """What the relay's descriptors point at (sockets, files), sorted."""
    assert relay.proc is not None
    base = f"/proc/{relay.proc.pid}/fd"
    out = []
    for fd in os.listdir(base):
        try:
            out.append(os.readlink(f"{base}/{fd}"))
        except FileNotFoundError:
            continue  # closed meanwhile
    return sorted(out)


def _reloads_settled(relay: RelayProcess) -> bool:
    """Every SIGHUP read so far has finished (complete, refused or failed)."""
    text = relay.log_path.read_text()
    ends = sum(text.count(m) for m in ("reload complete", "reload refused", "reload failed"))
    return text.count("SIGHUP: reloading") == ends


def test_overlapping_reloads_under_tcp_tls_relp_load(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    """Before: SIGHUPs during a reload interleaved with it (KeyError, two Spool objects
    on one directory, spool fds closed twice, fds growing, the writer thread dying)."""
    a, t, r = Listener("tcp"), Listener("tls"), Listener("relp")
    extra = Listener("tcp")
    relay = RelayProcess(
        tmp_path / "r",
        [a, t, r],
        tls={"certificate": str(pki.server.cert), "key": str(pki.server.key)},
        staging={"fsync_interval": "100ms"},
    )
    relay.start()
    with_extra = RelayProcess(
        relay.workdir,
        [a, t, r, extra],
        tls=relay.tls,
        staging=relay.staging,
        forward=[relp_forward("core", [free_port()])],
        metrics=relay.metrics,
    )
    configs = [with_extra.config(), relay.config()]

    def write_config(text: str) -> None:
        tmp = relay.config_path.with_suffix(".new")
        tmp.write_text(text)
        os.replace(tmp, relay.config_path)  # the relay never reads half a file

    warm = uuid.uuid4().hex  # the staging file of the hour is open from here on
    _tcp_send(a.port, f"<14>1 - h app - - - {warm} warm-up".encode())
    assert len(relay.wait_records(lambda rec: warm.encode() in rec.msg, 1)) == 1
    fds_before = _fds(relay)
    per = 6000
    specs = [
        LoadSpec(port=a.port, transport="tcp", count=per, rate=500, seq_start=0),
        LoadSpec(port=t.port, transport="tls", count=per, rate=500, seq_start=per),
        LoadSpec(port=r.port, transport="relp", count=per, rate=500, seq_start=2 * per),
    ]
    results: list[Any] = []
    loads = [
        threading.Thread(target=lambda s=s: results.append(loadgen.run(s)), daemon=True)
        for s in specs
    ]
    for th in loads:
        th.start()
    rng = random.Random(11)
    assert relay.proc is not None
    for i in range(100):
        write_config(configs[i % 2])
        relay.proc.send_signal(signal.SIGHUP)
        time.sleep(rng.uniform(0.04, 0.2))
    write_config(configs[1])  # the last word: without the extra listener and output
    relay.proc.send_signal(signal.SIGHUP)
    for th in loads:
        th.join(60)
        assert not th.is_alive()
    assert [res.errors for res in results] == [[], [], []]
    assert sum(res.sent for res in results) == 3 * per
    wait_for("the reloads to settle", lambda: _reloads_settled(relay), WAIT)

    # Nothing lost, nothing twice.
    seqs: Counter[int] = Counter()
    deadline = time.monotonic() + WAIT
    while len(seqs) < 3 * per and time.monotonic() < deadline:
        seqs = Counter(int(m.group(1)) for rec in relay.records() if (m := LSEQ.search(rec.msg)))
        time.sleep(0.2)
    assert set(seqs) == set(range(3 * per))
    assert [s for s, n in seqs.items() if n != 1] == []

    log = relay.log_path.read_text()
    assert "Traceback" not in log and '"critical"' not in log
    assert "reload failed" not in log and "reload refused" not in log
    assert log.count("reload complete") >= 2
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", extra.port), timeout=2).close()
    # No descriptor left behind: spools, sockets and listeners came and went.
    try:
        wait_for("the descriptors to come back", lambda: len(_fds(relay)) <= len(fds_before), WAIT)
    except AssertionError:
        raise AssertionError(f"before: {fds_before}\nafter: {_fds(relay)}") from None
    # Still staging.
    tag = uuid.uuid4().hex
    _tcp_send(a.port, f"<14>1 - h app - - - {tag} after".encode())
    assert len(relay.wait_records(lambda rec: tag.encode() in rec.msg, 1)) == 1
    assert relay.stop() == 0


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.05])
def test_sigterm_while_a_reload_removes_an_output(tmp_path: Path, delay: float) -> None:
    """Before: the reload had taken the output out of the service but not yet stopped
    its thread pool when the reactor stopped; the pool's thread kept the process alive."""
    a = Listener("tcp")
    relay = RelayProcess(tmp_path, [a], forward=[relp_forward("core", [free_port()])])
    relay.start()
    assert relay.proc is not None
    try:
        relay.forward = []
        relay.config_path.write_text(relay.config())
        relay.proc.send_signal(signal.SIGHUP)
        time.sleep(delay)  # within the reload: stopping the removed output takes 0.1 s
        relay.proc.send_signal(signal.SIGTERM)
        assert relay.proc.wait(WAIT) == 0
    finally:
        if relay.proc.poll() is None:
            relay.proc.kill()
            relay.proc.wait()
    assert "Traceback" not in relay.log_path.read_text()


def _relp_send(port: int, msg: bytes) -> bytes:
    """One message over a fresh RELP session; the server's answer to it."""
    from relay.relp.session import Acked, ClientSession, Nacked

    c = ClientSession(128)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(c.open())
        while c.state != "open":
            c.feed(s.recv(65536))
        s.sendall(c.send(msg, "m"))
        while True:
            events = c.feed(s.recv(65536))
            for ev in events:
                if isinstance(ev, Acked):
                    return b"200"
                if isinstance(ev, Nacked):
                    return ev.reason.encode()


def _tls_send_many(port: int, pki: PKI, msgs: list[bytes]) -> None:  # noqa: F811
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw) as s:
            s.sendall(b"".join(octet.encode(m) for m in msgs))


def _tcp_send_many(port: int, msgs: list[bytes]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"".join(octet.encode(m) for m in msgs))


@pytest.mark.parametrize("oversize", ["truncate", "reject"])
def test_reloaded_limits_reach_tcp_tls_udp_and_relp_listeners(
    tmp_path: Path,
    pki: PKI,  # noqa: F811
    oversize: str,
) -> None:
    """Issue 15: [limits] max_message_size and oversize were set on a reload only where
    an attribute of that name was found: RELP (max_data) and UDP listeners kept the old.
    Started at 64 KiB (the default oversize, truncate) and reloaded to 1 KiB with
    ``oversize``: a 2 KiB message on each kind of listener is cut to 1 KiB and flagged, or
    refused (RELP answers 500) while the small message after it on the same connection
    (or socket) arrives."""
    listeners = {kind: Listener(kind) for kind in ("tcp", "tls", "udp", "relp")}
    tls = {"certificate": str(pki.server.cert), "key": str(pki.server.key)}

    def relay_at(workdir: Path, limits: dict[str, Any], metrics: dict[str, Any]) -> RelayProcess:
        return RelayProcess(
            workdir, list(listeners.values()), tls=tls, limits=limits, metrics=dict(metrics)
        )

    relay = relay_at(tmp_path / "r", {"max_message_size": "64KiB"}, {})
    relay.start()
    try:
        relay.config_path.write_text(
            relay_at(
                relay.workdir,
                {"max_message_size": "1KiB", "oversize": oversize},
                relay.metrics,
            ).config()
        )
        _hup_and_wait(relay, "reload complete")
        tag = uuid.uuid4().hex
        big = {
            kind: f"<14>1 - h app - - - {tag} {kind} big ".encode() + b"x" * 2000
            for kind in listeners
        }
        small = {kind: f"<14>1 - h app - - - {tag} {kind} small".encode() for kind in listeners}
        _tcp_send_many(listeners["tcp"].port, [big["tcp"], small["tcp"]])
        _tls_send_many(listeners["tls"].port, pki, [big["tls"], small["tls"]])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(big["udp"], ("127.0.0.1", listeners["udp"].port))
            s.sendto(small["udp"], ("127.0.0.1", listeners["udp"].port))
        answer = _relp_send(listeners["relp"].port, big["relp"])
        assert _relp_send(listeners["relp"].port, small["relp"]) == b"200"
        want = 8 if oversize == "truncate" else 4
        got = relay.wait_records(lambda rec: tag.encode() in rec.msg, want)
        assert len(got) == want
        smalls = [rec for rec in got if rec.msg.endswith(b" small")]
        assert sorted(rec.msg for rec in smalls) == sorted(small.values())
        bigs = [rec for rec in got if b" big " in rec.msg]
        if oversize == "truncate":
            assert answer == b"200"
            assert sorted(rec.msg for rec in bigs) == sorted(m[:1024] for m in big.values())
            assert all(b"T" in rec.flags for rec in bigs), [rec.flags for rec in bigs]
        else:
            assert answer.startswith(b"500"), answer
            assert bigs == []  # each came before its small one, which arrived
    finally:
        relay.stop()


def test_a_reload_does_not_turn_an_output_into_a_link_or_back(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    """A link+tls output's spool has two lanes, opened at start: a reload that changes an
    output's transport to or from link+tls is refused (before, it made a link output a
    RELP one), and the running output keeps going."""
    from tests.test_link_relays import link_forward

    dead = free_port()
    relp, link = relp_forward("core", [dead]), link_forward(pki, [dead])
    for i, (before, after) in enumerate([(relp, link), (link, relp)]):
        relay = RelayProcess(tmp_path / f"r{i}", [Listener("tcp")], forward=[before])
        relay.start()
        try:
            changed = RelayProcess(
                relay.workdir, relay.listeners, forward=[after], metrics=relay.metrics
            )
            relay.config_path.write_text(changed.config())
            log = _hup_and_wait(relay, "reload refused")
            assert "forward[0].transport" in log and "needs a restart" in log
            assert "Traceback" not in log
        finally:
            relay.stop()
