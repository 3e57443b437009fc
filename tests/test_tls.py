"""Real TLS handshakes on 127.0.0.1 against relay.inputs.tls_server.ServerTLS.

The server side is a tiny Twisted echo protocol behind ``TLSMemoryBIOFactory`` on a
private reactor (not the global one) run in a thread for this module; clients are the
standard library's ``ssl``. A refusal must show on the client (the connection fails or is
closed before any application data) and through ``on_reject`` with the expected reason.
"""

from __future__ import annotations

import datetime
import inspect
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from relay.config import TLSConfig
from relay.inputs.tls_server import (
    PeerMatcher,
    ServerTLS,
    TLSSetupError,
    check_tls,
    connection_lost,
    fingerprint,
    peer_entry_problem,
)
from tests.support.certs import PKI, pki  # noqa: F401  (fixture)

WAIT = 10.0
_TLS_FACTORY_ARGS = inspect.signature(TLSMemoryBIOFactory.__init__).parameters


@pytest.fixture(scope="module")
def reactor() -> Iterator[SelectReactor]:
    r = SelectReactor()
    t = threading.Thread(target=r.run, kwargs={"installSignalHandlers": False}, daemon=True)
    t.start()
    yield r
    r.callFromThread(r.stop)
    t.join(WAIT)


@implementer(IHandshakeListener)
class _Echo(Protocol):
    factory: _EchoFactory

    def connectionMade(self) -> None:
        from relay.inputs.tls_server import start_handshake_timer

        self.timer = start_handshake_timer(
            self.transport,
            self.factory.reactor,
            self.factory.handshake_timeout,
            lambda: self.factory.timeouts.append(1),
        )

    def handshakeCompleted(self) -> None:
        if self.timer.active():
            self.timer.cancel()

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(b"OK " + data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.timer.active():
            self.timer.cancel()
        connection_lost(self.transport, reason)
        self.factory.lost.append(1)


class _EchoFactory(Factory):
    protocol = _Echo

    def __init__(self, reactor: Any, handshake_timeout: float) -> None:
        self.reactor = reactor
        self.handshake_timeout = handshake_timeout
        self.timeouts: list[int] = []
        self.lost: list[int] = []


@dataclass
class Server:
    tls: ServerTLS
    port: int
    factory: _EchoFactory
    rejects: list[str] = field(default_factory=list)


@pytest.fixture
def serve(reactor: SelectReactor) -> Iterator[Callable[[TLSConfig], Server]]:
    ports: list[Any] = []

    def start(cfg: TLSConfig) -> Server:
        rejects: list[str] = []
        tls = ServerTLS(cfg, on_reject=rejects.append)
        factory = _EchoFactory(reactor, cfg.handshake_timeout)
        # Twisted >= 23 aggregates TLS writes on a clock that defaults to the global
        # reactor; this module runs a private one, so pass it where the argument exists.
        kw = {"clock": reactor} if "clock" in _TLS_FACTORY_ARGS else {}
        wrapped = TLSMemoryBIOFactory(tls, False, factory, **kw)
        endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port = blockingCallFromThread(reactor, endpoint.listen, wrapped)
        ports.append(port)
        return Server(tls, port.getHost().port, factory, rejects)

    yield start
    for port in ports:
        blockingCallFromThread(reactor, port.stopListening)


def _cfg(pki: PKI, **kw: Any) -> TLSConfig:  # noqa: F811
    base = TLSConfig(
        certificate=str(pki.server.cert),
        key=str(pki.server.key),
        ca=str(pki.ca),
        verify_clients=True,
    )
    return replace(base, **kw)


def _client_ctx(
    pki: PKI,  # noqa: F811
    client: str | None,
    max_version: str | None = None,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(pki.ca))
    if client is not None:
        files = pki.clients[client]
        ctx.load_cert_chain(str(files.cert), str(files.key))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if max_version == "1.1":
            # Let the client offer TLS 1.1 at all, so that the refusal is the server's.
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        elif max_version == "1.2":
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _talk(ctx: ssl.SSLContext, port: int) -> tuple[str, str, int]:
    """Handshake, send a line, read the echo: ("ok", echo, local port) or ("refused", why, ...)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    local_port = raw.getsockname()[1]
    try:
        with ctx.wrap_socket(raw, server_hostname="relay.test") as s:
            s.sendall(b"ping\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(100)
                if not chunk:
                    return "refused", f"closed after {data!r}", local_port
                data += chunk
            return "ok", data.decode(), local_port
    except (ssl.SSLError, ConnectionError) as exc:
        return "refused", str(exc), local_port
    finally:
        raw.close()


def _wait_for(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


# (case id, config overrides, client certificate, client max version, expected reject or None)
CASES: list[tuple[str, dict[str, Any], str | None, str | None, str | None]] = [
    ("no-verify-no-cert", {"verify_clients": False, "ca": None}, None, None, None),
    ("good", {}, "good", None, None),
    ("good-tls12", {}, "good", "1.2", None),
    ("no-cert", {}, None, None, "no_certificate"),
    ("no-cert-tls12", {}, None, "1.2", "no_certificate"),
    ("other-ca", {}, "other_ca", None, "unknown_ca"),
    ("other-ca-tls12", {}, "other_ca", "1.2", "unknown_ca"),
    ("expired", {}, "expired", None, "expired"),
    ("expired-tls12", {}, "expired", "1.2", "expired"),
    ("name-permitted", {"permitted_peers": ("good.clients.test",)}, "good", None, None),
    ("name-case", {"permitted_peers": ("GOOD.Clients.Test",)}, "good", None, None),
    ("name-not-permitted", {"permitted_peers": ("good.clients.test",)}, "wrong", None,
     "not_permitted"),
    ("wildcard", {"permitted_peers": ("*.clients.test",)}, "good", None, None),
    ("wildcard-cn-only", {"permitted_peers": ("*.clients.test",)}, "cn_only", None, None),
    ("wildcard-other", {"permitted_peers": ("*.clients.test",)}, "wrong", "1.2",
     "not_permitted"),
    ("wildcard-one-label", {"permitted_peers": ("*.test",)}, "good", None, "not_permitted"),
    ("cn-ignored-beside-san", {"permitted_peers": ("*.clients.test",)}, "san_elsewhere", None,
     "not_permitted"),
    ("name-cn-ignored-beside-san", {"permitted_peers": ("sneaky.clients.test",)},
     "san_elsewhere", None, "not_permitted"),
    ("cn-matched-on-request", {"permitted_peers": ("*.clients.test",),
     "permitted_peers_match_cn": True}, "san_elsewhere", None, None),
    ("san-matched-with-cn-option", {"permitted_peers": ("intruder.evil.test",),
     "permitted_peers_match_cn": True}, "san_elsewhere", None, None),
    ("tls11", {"verify_clients": False, "ca": None}, None, "1.1", "protocol_version"),
    ("tls11-verify", {}, "good", "1.1", "protocol_version"),
    ("min13-client12", {"min_version": "1.3"}, "good", "1.2", "protocol_version"),
    ("min13-client13", {"min_version": "1.3"}, "good", None, None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "client", "max_version", "expected"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_handshake(
    serve: Callable[[TLSConfig], Server],
    pki: PKI,  # noqa: F811
    overrides: dict[str, Any],
    client: str | None,
    max_version: str | None,
    expected: str | None,
) -> None:
    server = serve(_cfg(pki, **overrides))
    outcome, detail, _ = _talk(_client_ctx(pki, client, max_version), server.port)
    if expected is None:
        assert (outcome, detail) == ("ok", "OK ping\n")
        assert server.rejects == []
    else:
        assert outcome == "refused", detail
        _wait_for(lambda: bool(server.rejects), "on_reject")
        assert server.rejects == [expected]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", []),  # connect and hang up: not a refusal
        (b"\x16\x03\x01\x00", []),  # hung up inside the ClientHello record
        (b"GET / HTTP/1.0\r\n\r\n", ["bad_handshake"]),
        (b"\x00" * 100, ["bad_handshake"]),
        (b"<13>Nov 26 01:02:03 host app: plain syslog to the TLS port\n", ["bad_handshake"]),
        (b"\x16\x03\x01\x02\x00" + b"\x01" * 600, ["protocol_version"]),
    ],
    ids=["eof", "partial-hello", "http", "zeros", "plain-syslog", "bogus-hello"],
)
def test_non_tls_input(
    serve: Callable[[TLSConfig], Server],
    pki: PKI,  # noqa: F811
    payload: bytes,
    expected: list[str],
) -> None:
    server = serve(_cfg(pki))
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as raw:
        raw.sendall(payload)
        raw.shutdown(socket.SHUT_WR)
        try:
            while raw.recv(4096):
                pass
        except ConnectionResetError:
            pass
    _wait_for(lambda: server.factory.lost == [1], "connectionLost")
    assert server.rejects == expected
    # The listener keeps serving.
    assert _talk(_client_ctx(pki, "good"), server.port)[0] == "ok"


def test_fingerprint_permitted(
    serve: Callable[[TLSConfig], Server],
    pki: PKI,  # noqa: F811
) -> None:
    # The "wrong" name is let in by its fingerprint (lower case, as operators paste it),
    # while "good" (right name pattern elsewhere, but not listed) is refused.
    fp = pki.clients["wrong"].fingerprint.lower()
    server = serve(_cfg(pki, permitted_peers=(fp, "nobody.clients.test")))
    assert _talk(_client_ctx(pki, "wrong"), server.port)[0] == "ok"
    assert _talk(_client_ctx(pki, "good"), server.port)[0] == "refused"
    _wait_for(lambda: bool(server.rejects), "on_reject")
    assert server.rejects == ["not_permitted"]


def test_refusal_logged_with_reason_and_peer(
    serve: Callable[[TLSConfig], Server],
    pki: PKI,  # noqa: F811
) -> None:
    events: list[dict[str, Any]] = []
    observer = events.append
    globalLogPublisher.addObserver(observer)
    try:
        server = serve(_cfg(pki))
        outcome, _, local_port = _talk(_client_ctx(pki, "expired"), server.port)
        _wait_for(lambda: bool(server.rejects), "on_reject")
    finally:
        globalLogPublisher.removeObserver(observer)
    assert outcome == "refused"
    refusals = [e for e in events if e.get("reject")]
    assert len(refusals) == 1
    assert refusals[0]["peer"] == f"127.0.0.1:{local_port}"
    assert "certificate has expired" in refusals[0]["reason"]
    assert "old.clients.test" in refusals[0]["reason"]


def test_refusal_does_not_disturb_other_clients(
    serve: Callable[[TLSConfig], Server],
    pki: PKI,  # noqa: F811
) -> None:
    server = serve(_cfg(pki, permitted_peers=("*.clients.test",)))
    good = _client_ctx(pki, "good")
    results = []
    for client in ("good", "wrong", "good", "other_ca", "good"):
        ctx = good if client == "good" else _client_ctx(pki, client)
        results.append(_talk(ctx, server.port)[0])
    assert results == ["ok", "refused", "ok", "refused", "ok"]
    _wait_for(lambda: len(server.rejects) == 2, "two rejects")
    assert server.rejects == ["not_permitted", "unknown_ca"]


def test_handshake_timeout_closes_silent_client(
    serve: Callable[[TLSConfig], Server],
    pki: PKI,  # noqa: F811
) -> None:
    server = serve(_cfg(pki, handshake_timeout=0.2))
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as raw:
        # Send nothing: the server must close (abort) the connection by itself.
        try:
            assert raw.recv(100) == b""
        except ConnectionResetError:
            pass
    _wait_for(lambda: server.factory.timeouts == [1], "timeout callback")
    # A client that completes the handshake in time is not affected by the timer.
    assert _talk(_client_ctx(pki, "good"), server.port)[0] == "ok"
    time.sleep(0.4)  # past the deadline of that connection: no late timeout counted
    assert server.factory.timeouts == [1]


def test_reload_uses_new_config_for_new_connections(
    serve: Callable[[TLSConfig], Server],
    pki: PKI,  # noqa: F811
) -> None:
    server = serve(_cfg(pki, permitted_peers=("good.clients.test",)))
    assert _talk(_client_ctx(pki, "good"), server.port)[0] == "ok"
    server.tls.reload(_cfg(pki, permitted_peers=("other.clients.test",)))
    assert _talk(_client_ctx(pki, "good"), server.port)[0] == "refused"
    assert _talk(_client_ctx(pki, "cn_only"), server.port)[0] == "ok"
    # A broken reload raises and keeps the previous context.
    with pytest.raises(TLSSetupError) as err:
        server.tls.reload(_cfg(pki, key=str(pki.garbage_key)))
    assert err.value.problems[0][0] == "tls.key"
    assert _talk(_client_ctx(pki, "cn_only"), server.port)[0] == "ok"


# --- check_tls --------------------------------------------------------------------------


def test_check_tls_clean(pki: PKI) -> None:  # noqa: F811
    fp = pki.clients["good"].fingerprint
    assert check_tls(_cfg(pki, permitted_peers=("*.clients.test", fp, fp.lower()))) == []


@pytest.mark.parametrize(
    ("overrides", "key", "reason_part"),
    [
        ({"key": "GARBAGE"}, "tls.key", "not a valid PEM private key"),
        ({"key": "OTHER"}, "tls.key", "does not match tls.certificate"),
        ({"ca": "EMPTY"}, "tls.ca", "no PEM certificate"),
        ({"certificate": "EMPTY"}, "tls.certificate", "no PEM certificate"),
        ({"certificate": "EXPIRED", "key": "EXPIRED_KEY"}, "tls.certificate", "expired on"),
        ({"key": "/nonexistent/x.key"}, "tls.key", "cannot read"),
        ({"permitted_peers": ("SHA256:AB:CD",)}, "tls.permitted_peers", "not a SHA-256"),
        ({"permitted_peers": ("a.*.test",)}, "tls.permitted_peers", "wildcard"),
    ],
)
def test_check_tls_problems(
    pki: PKI,  # noqa: F811
    overrides: dict[str, Any],
    key: str,
    reason_part: str,
) -> None:
    assert pki.expired_server is not None
    names = {
        "GARBAGE": str(pki.garbage_key),
        "OTHER": str(pki.other_key),
        "EMPTY": str(pki.bundle_no_certs),
        "EXPIRED": str(pki.expired_server.cert),
        "EXPIRED_KEY": str(pki.expired_server.key),
    }
    resolved = {k: (names.get(v, v) if isinstance(v, str) else v) for k, v in overrides.items()}
    problems = check_tls(_cfg(pki, **resolved))
    assert any(k == key and reason_part in r for k, r in problems), problems


def test_build_refuses_mismatched_key(pki: PKI) -> None:  # noqa: F811
    with pytest.raises(TLSSetupError) as err:
        ServerTLS(_cfg(pki, key=str(pki.other_key)))
    assert err.value.problems == [("tls.key", "does not match tls.certificate")]


# --- permitted peers (pure) -------------------------------------------------------------

MATCH_CASES = [
    (("host.example.net",), "host.example.net", True),
    (("host.example.net",), "HOST.Example.NET", True),
    (("host.example.net",), "other.example.net", False),
    (("*.example.net",), "a.example.net", True),
    (("*.example.net",), "example.net", False),
    (("*.example.net",), "a.b.example.net", False),
    (("*.example.net",), "aexample.net", False),
    (("*.example.net",), ".example.net", False),
]


@pytest.mark.parametrize(("entries", "name", "expected"), MATCH_CASES)
def test_name_matching(entries: tuple[str, ...], name: str, expected: bool) -> None:
    assert PeerMatcher.from_entries(entries).name_matches(name) is expected


def _cert(cn: str, dns: list[str]) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")]))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if dns:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False
        )
    return builder.sign(key, hashes.SHA256())


# (CN, DNS SANs, permitted, match_cn, expected): issue 11, item 8
CERT_CASES = [
    ("client9.edge.example", ["intruder.other.example"], "*.edge.example", False, False),
    ("client9.edge.example", ["intruder.other.example"], "*.edge.example", True, True),
    ("client9.edge.example", ["intruder.other.example"], "client9.edge.example", False, False),
    ("client9.edge.example", [], "*.edge.example", False, True),  # no DNS SAN: the CN
    ("x", ["a.edge.example", "b.other.example"], "*.edge.example", False, True),
    ("x", ["a.edge.example"], "x", False, False),
]


@pytest.mark.parametrize(("cn", "dns", "entry", "match_cn", "expected"), CERT_CASES)
def test_permitted_names_follow_rfc6125_unless_cn_matching_is_asked(
    cn: str, dns: list[str], entry: str, match_cn: bool, expected: bool
) -> None:
    matcher = PeerMatcher.from_entries([entry], match_cn=match_cn)
    assert matcher.matches(_cert(cn, dns)) is expected


@given(st.binary(min_size=1, max_size=64))
def test_fingerprint_format_is_accepted(der: bytes) -> None:
    fp = fingerprint(der)
    assert peer_entry_problem(fp) is None
    assert peer_entry_problem(fp.lower()) is None
    assert PeerMatcher.from_entries([fp.lower()]).fingerprints == {fp}
