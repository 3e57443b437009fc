"""Interop with real clients: Debian's rsyslogd 8.2302 and util-linux ``logger`` -> the relay.

One relay process (TCP with auto framing, TLS with mutual auth, UDP) and one rsyslogd with a
forward per mode serve the whole module. Every message rsyslog sends must be in staging
exactly once, byte for byte as rsyslog's omfile copy of the same template shows it.
"""

from __future__ import annotations

import collections
import datetime
import os
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.formats import octet
from relay.formats.staging_block import Record
from tests.support.certs import PKI, pki  # noqa: F401  (fixture)
from tests.support.relayproc import Listener, RelayProcess
from tests.support.rsyslog import Forward, Rsyslog, logger_path

pytestmark = pytest.mark.integration

N = 200
BATCH = 50  # messages fed at a time (UDP is paced so that no kernel buffer overflows)
WAIT = 30.0


@pytest.fixture(scope="module")
def relay(
    tmp_path_factory: pytest.TempPathFactory,
    pki: PKI,  # noqa: F811
) -> Iterator[RelayProcess]:
    proc = RelayProcess(
        tmp_path_factory.mktemp("relay"),
        [Listener("tcp"), Listener("tls"), Listener("udp")],
        tls={
            "certificate": str(pki.server.cert),
            "key": str(pki.server.key),
            "ca": str(pki.ca),
            "verify_clients": True,
            "permitted_peers": ["*.clients.test"],
            "handshake_timeout": "5s",
        },
    )
    proc.start()
    yield proc
    code = proc.stop()
    assert code == 0, proc.log()


def _port(relay: RelayProcess, transport: str) -> int:
    return next(lc.port for lc in relay.listeners if lc.transport == transport)


@pytest.fixture(scope="module")
def rsyslog(
    tmp_path_factory: pytest.TempPathFactory,
    pki: PKI,  # noqa: F811
    relay: RelayProcess,
) -> Iterator[Rsyslog]:
    forwards = [
        Forward("tcp_lf", "tcp-lf", _port(relay, "tcp")),
        Forward("tcp_octet", "tcp-octet", _port(relay, "tcp")),
        Forward("tls", "tls", _port(relay, "tls")),
        Forward("udp", "udp", _port(relay, "udp")),
    ]
    rs = Rsyslog(tmp_path_factory.mktemp("rsyslog"), forwards, pki)
    rs.start()
    yield rs
    rs.stop()


def _messages(tag: str) -> list[bytes]:
    """RFC 3164 and RFC 5424 input lines with a unique tag, some with non-ASCII UTF-8."""
    now = datetime.datetime.now(datetime.UTC)
    bsd = now.strftime("%b %d %H:%M:%S").replace(" 0", "  ", 1) if now.day < 10 else None
    bsd = bsd or now.strftime("%b %d %H:%M:%S")
    iso = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    out = []
    for i in range(N):
        text = f"{tag} seq={i:04d}"
        if i % 3 == 0:
            text += " grüße ünïcødé ✓ 日本語"
        if i % 2 == 0:
            out.append(f"<{8 + i % 8}>{bsd} host-{i % 5} app{i % 7}[{1000 + i}]: {text}".encode())
        else:
            out.append(
                f'<165>1 {iso} host5424 app 42 ID{i} [ex@32473 k="v\\"q"] \ufeff{text}'.encode()
            )
    return out


def _with(tag: str) -> object:
    needle = tag.encode()
    return lambda rec: needle in rec.msg


def _wait_tagged(rsyslog: Rsyslog, forward: str, tag: str) -> list[bytes]:
    """rsyslog's copies of the N messages carrying ``tag`` (bounded wait)."""
    deadline = time.monotonic() + WAIT
    while True:
        got = [m for m in rsyslog.sent(forward) if tag.encode() in m]
        if len(got) >= N or time.monotonic() > deadline:
            assert len(got) == N, rsyslog.diagnostics()
            return got
        time.sleep(0.05)


def _assert_exactly_once(records: list[Record], expected: list[bytes], transport: str) -> None:
    got = collections.Counter(r.msg for r in records)
    want = collections.Counter(expected)
    missing = want - got
    extra = got - want
    assert not missing and not extra, (
        f"{sum(missing.values())} missing (e.g. {list(missing)[:2]}), "
        f"{sum(extra.values())} unexpected (e.g. {list(extra)[:2]})"
    )
    assert all(r.sender.startswith(transport.encode() + b"://127.0.0.1:") for r in records)


@pytest.mark.parametrize(
    ("forward", "transport"),
    [("tcp_lf", "tcp"), ("tcp_octet", "tcp"), ("tls", "tls"), ("udp", "udp")],
)
def test_rsyslog_forward_lands_exactly_once(
    rsyslog: Rsyslog, relay: RelayProcess, forward: str, transport: str
) -> None:
    tag = f"run={uuid.uuid4().hex[:12]} mode={forward}"
    lines = _messages(tag)
    before = len(rsyslog.sent(forward))
    for start in range(0, N, BATCH):
        rsyslog.send(forward, lines[start : start + BATCH])
        if transport == "udp":
            rsyslog.wait_sent(forward, before + min(start + BATCH, N), timeout=WAIT)
            relay.wait_records(_with(tag), min(start + BATCH, N), timeout=WAIT)
    expected = _wait_tagged(rsyslog, forward, tag)
    relay.wait_records(_with(tag), N, timeout=WAIT)
    time.sleep(0.3)  # anything duplicated would show up now
    records = [r for r in relay.records() if tag.encode() in r.msg]
    _assert_exactly_once(records, expected, transport)
    assert relay.alive()


def _logger(args: list[str], lines: list[str]) -> None:
    subprocess.run(
        [logger_path(), *args],
        input="".join(line + "\n" for line in lines).encode(),
        check=True,
        timeout=WAIT,
    )


@pytest.mark.parametrize(
    ("mode", "args"),
    [
        ("tcp", ["--tcp", "--octet-count", "--rfc5424"]),
        ("udp", ["--udp", "--rfc5424"]),
        ("udp", ["--udp", "--rfc3164"]),
    ],
    ids=["tcp-octet-rfc5424", "udp-rfc5424", "udp-rfc3164"],
)
def test_logger_lands_exactly_once(relay: RelayProcess, mode: str, args: list[str]) -> None:
    tag = f"run={uuid.uuid4().hex[:12]} logger={mode}"
    texts = [f"{tag} seq={i:04d}" + (" ünïcødé ✓" if i % 3 == 0 else "") for i in range(N)]
    port = str(_port(relay, mode))
    for start in range(0, N, BATCH):
        _logger(
            [*args, "-n", "127.0.0.1", "-P", port, "-t", "interop"], texts[start : start + BATCH]
        )
        if mode == "udp":
            relay.wait_records(_with(tag), min(start + BATCH, N), timeout=WAIT)
    relay.wait_records(_with(tag), N, timeout=WAIT)
    time.sleep(0.3)
    records = [r for r in relay.records() if tag.encode() in r.msg]
    for text in texts:
        # seq=0001 is not a prefix of another text; count occurrences in whole records.
        hits = [r for r in records if text.encode() in r.msg]
        assert len(hits) == 1, (text, len(hits))
        assert hits[0].msg.startswith(b"<13>")  # user.notice, logger's default
        assert hits[0].sender.startswith(f"{mode}://127.0.0.1:".encode())
    assert len(records) == N


# --- TLS bad input against the real relay -----------------------------------------------


def _tls_client(pki: PKI, client: str | None) -> ssl.SSLContext:  # noqa: F811
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(pki.ca))
    if client is not None:
        ctx.load_cert_chain(str(pki.clients[client].cert), str(pki.clients[client].key))
    return ctx


def _tls_send(
    ctx: ssl.SSLContext, port: int, payload: bytes, ports: list[int] | None = None
) -> str:
    """Send LF-framed payload over TLS and wait for the server to close or refuse."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    if ports is not None:
        ports.append(raw.getsockname()[1])
    try:
        with ctx.wrap_socket(raw, server_hostname="relay.test") as s:
            s.sendall(payload)
            s.settimeout(1.0)
            try:
                data = s.recv(100)
            except TimeoutError:
                return "open"  # the relay kept the connection: accepted
            return "closed" if data == b"" else "data"
    except (ssl.SSLError, ConnectionError) as exc:
        return f"refused: {exc}"
    finally:
        raw.close()


@pytest.mark.parametrize(
    ("client", "reason"),
    [
        ("other_ca", "unknown CA"),
        ("wrong", "peer not permitted"),
        ("expired", "certificate has expired"),
        (None, "certificate required"),
    ],
)
def test_tls_refused_clients_and_relay_keeps_serving(
    relay: RelayProcess,
    pki: PKI,  # noqa: F811
    client: str | None,
    reason: str,
) -> None:
    port = _port(relay, "tls")
    tag = f"run={uuid.uuid4().hex[:12]} refused={client}"
    ports: list[int] = []
    outcome = _tls_send(
        _tls_client(pki, client), port, f"<13>Nov 26 01:02:03 h app: {tag}\n".encode(), ports
    )
    assert outcome.startswith("refused") or outcome == "closed", outcome
    # A good client right after (and meanwhile) still works.
    good = f"run={uuid.uuid4().hex[:12]} after={client}"
    assert (
        _tls_send(_tls_client(pki, "good"), port, f"<13>Nov 26 01:02:03 h app: {good}\n".encode())
        == "open"
    )
    assert len(relay.wait_records(_with(good), 1, timeout=WAIT)) == 1
    assert relay.wait_records(_with(tag), 1, timeout=0.5) == []
    assert relay.alive()
    # Logged with the reason and the peer's address.
    peer = f"127.0.0.1:{ports[0]}"
    lines = [ln for ln in relay.log().splitlines() if peer in ln and "refused" in ln]
    assert len(lines) == 1, relay.log()
    assert reason in lines[0]


def test_tls_refusal_while_rsyslog_streams(
    rsyslog: Rsyslog,
    relay: RelayProcess,
    pki: PKI,  # noqa: F811
) -> None:
    """Refused handshakes in parallel with a live rsyslog TLS stream do not disturb it."""
    tag = f"run={uuid.uuid4().hex[:12]} mode=tls-parallel"
    lines = _messages(tag)
    port = _port(relay, "tls")
    outcomes: list[str] = []

    def intruders() -> None:
        for _ in range(10):
            outcomes.append(_tls_send(_tls_client(pki, "other_ca"), port, b"<13>x\n"))

    t = threading.Thread(target=intruders)
    t.start()
    rsyslog.send("tls", lines)
    t.join(WAIT)
    expected = _wait_tagged(rsyslog, "tls", tag)
    records = relay.wait_records(_with(tag), N, timeout=WAIT)
    _assert_exactly_once(records, expected, "tls")
    assert len(outcomes) == 10
    assert all(o.startswith("refused") or o == "closed" for o in outcomes), outcomes


# --- the harness itself: rsyslog's omfile copy is what goes on the wire -----------------


def _capture_tcp(pki: PKI | None, tls: bool) -> tuple[int, list[bytes], threading.Thread]:  # noqa: F811
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(WAIT)
    buf: list[bytes] = []

    def run() -> None:
        try:
            conn, _ = srv.accept()
        except TimeoutError:
            return  # the test's assertion on the empty capture tells
        finally:
            srv.close()
        if tls:
            assert pki is not None
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(pki.server.cert), str(pki.server.key))
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(str(pki.ca))
            conn = ctx.wrap_socket(conn, server_side=True)
        conn.settimeout(WAIT)
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except (TimeoutError, OSError):
                    return
                if not data:
                    return
                buf.append(data)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return srv.getsockname()[1], buf, t


def test_rsyslog_copy_matches_wire(tmp_path: Path, pki: PKI) -> None:  # noqa: F811
    lf_port, lf_buf, lf_t = _capture_tcp(None, tls=False)
    oc_port, oc_buf, oc_t = _capture_tcp(None, tls=False)
    tls_port, tls_buf, tls_t = _capture_tcp(pki, tls=True)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(WAIT)
    forwards = [
        Forward("lf", "tcp-lf", lf_port),
        Forward("oc", "tcp-octet", oc_port),
        Forward("tls", "tls", tls_port),
        Forward("udp", "udp", udp.getsockname()[1]),
    ]
    lines = _messages("harness")[:20]
    with Rsyslog(tmp_path / "rs", forwards, pki) as rs:
        for f in forwards:
            rs.send(f.name, lines)
        copies = {f.name: rs.wait_sent(f.name, len(lines)) for f in forwards}
        datagrams = [udp.recv(65536) for _ in lines]
        # omfile may run ahead of omfwd's queue: wait for the wire before stopping rsyslog.
        deadline = time.monotonic() + WAIT
        for name, buf in (("lf", lf_buf), ("oc", oc_buf), ("tls", tls_buf)):
            size = sum(len(m) + 1 + (len(str(len(m))) if name == "oc" else 0) for m in copies[name])
            while sum(len(b) for b in buf) < size and time.monotonic() < deadline:
                time.sleep(0.05)
    for t in (lf_t, oc_t, tls_t):
        t.join(WAIT)
    udp.close()
    assert b"".join(lf_buf) == b"".join(m + b"\n" for m in copies["lf"])
    assert b"".join(tls_buf) == b"".join(m + b"\n" for m in copies["tls"])
    # Octet-counted frames carry the template's trailing LF inside the count.
    assert octet.split(b"".join(oc_buf)) == copies["oc"]
    assert all(m.endswith(b"\n") for m in copies["oc"])
    assert datagrams == copies["udp"]
    assert os.path.getsize(rs.copy_path("lf")) > 0


def test_plain_text_on_tls_port_is_logged(relay: RelayProcess) -> None:
    """Non-TLS bytes on a TLS listener: connection closed, refusal logged with the peer."""
    port = _port(relay, "tls")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        local = s.getsockname()[1]
        s.sendall(b"<13>Nov 26 01:02:03 h app: plain text on the TLS port\n")
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        while s.recv(4096):
            pass
    deadline = time.monotonic() + WAIT
    peer = f"127.0.0.1:{local}"
    while time.monotonic() < deadline:
        lines = [
            ln for ln in relay.log().splitlines() if peer in ln and "not a TLS handshake" in ln
        ]
        if lines:
            break
        time.sleep(0.1)
    assert lines, relay.log()[-3000:]
    assert relay.alive()
