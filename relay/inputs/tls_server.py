"""TLS for the relay's listeners (RFC 5425): server context, client checks, handshake deadline.

``ServerTLS`` provides ``IOpenSSLServerConnectionCreator`` (and, for old-style callers, a
``getContext()``), so it can be passed as-is to ``SSL4ServerEndpoint`` or
``TLSMemoryBIOFactory(ServerTLS(...), False, factory)``. It creates every connection itself,
which lets it attach the peer to the ``SSL.Connection``: OpenSSL callbacks then know whom they
are refusing and log it with the reason.

Why an info callback: OpenSSL refuses some handshakes without ever calling the verify
callback (no client certificate, protocol version below the minimum, no shared cipher).
Every refusal ends with the server writing a fatal alert, so that alert is the single
place where a refusal is logged and counted; the verify callback only records the precise
reason ("certificate has expired", "peer name not permitted") for it to use.

The handshake deadline is enforced by the protocol layer with ``start_handshake_timer``
(see its docstring); ``reload()`` swaps the context for new connections (SIGHUP).
"""

from __future__ import annotations

import datetime
import hashlib
import re
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IDelayedCall, IOpenSSLServerConnectionCreator, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from relay.config import TLSConfig
from relay.inputs.addresses import host_port

if TYPE_CHECKING:
    from twisted.internet.interfaces import ITCPTransport
    from twisted.protocols.tls import TLSMemoryBIOProtocol
    from twisted.python.failure import Failure

__all__ = [
    "PeerMatcher",
    "ServerTLS",
    "TLSSetupError",
    "build_context",
    "check_tls",
    "connection_lost",
    "handshake_done",
    "start_handshake_timer",
]

log = Logger(namespace="relay.tls")

_MIN_VERSION = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

# OpenSSL info-callback flags (ssl.h); pyOpenSSL exposes these under SSL_CB_* names.
_CB_WRITE_ALERT = SSL.SSL_CB_WRITE_ALERT
_CB_HANDSHAKE_DONE = SSL.SSL_CB_HANDSHAKE_DONE
_CB_ACCEPT_LOOP = SSL.SSL_CB_ACCEPT_LOOP

# TLS alert descriptions (RFC 8446 section 6) a server sends when it refuses a handshake.
_ALERTS = {
    10: "unexpected message",
    20: "bad record mac",
    22: "record overflow",
    40: "handshake failure",
    42: "bad certificate",
    43: "unsupported certificate",
    44: "certificate revoked",
    45: "certificate expired",
    46: "certificate unknown",
    47: "illegal parameter",
    48: "unknown CA",
    49: "access denied",
    50: "decode error",
    51: "decrypt error",
    70: "protocol version",
    71: "insufficient security",
    80: "internal error",
    86: "inappropriate fallback",
    109: "missing extension",
    110: "unsupported extension",
    112: "unrecognized name",
    116: "certificate required",
    120: "no application protocol",
}

# X509_V_ERR_* codes (x509_vfy.h) whose text operators need; others print their number.
_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in chain",
    20: "unable to get local issuer certificate (unknown CA)",
    21: "unable to verify the first certificate",
    23: "certificate revoked",
    24: "invalid CA certificate",
    26: "unsupported certificate purpose",
    28: "certificate rejected",
}

_FINGERPRINT = re.compile(r"^SHA256:((?:[0-9A-F]{2}:){31}[0-9A-F]{2})$", re.IGNORECASE)
_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?$")


class TLSSetupError(Exception):
    """The TLS files could not be loaded; ``problems`` is a list of (key, reason)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{k}: {r}" for k, r in problems))
        self.problems = problems


# --- permitted peers ----------------------------------------------------------------------


def fingerprint(der: bytes) -> str:
    """SHA-256 fingerprint as rsyslog prints it: ``SHA256:AA:BB:...``."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return "SHA256:" + ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def peer_entry_problem(entry: str) -> str | None:
    """Why a ``permitted_peers`` entry is not usable, or None."""
    if entry.upper().startswith("SHA"):
        if _FINGERPRINT.match(entry):
            return None
        return f"{entry!r} is not a SHA-256 fingerprint (SHA256: then 32 hex pairs with colons)"
    labels = entry.lower().rstrip(".").split(".")
    for i, label in enumerate(labels):
        if label == "*" and i == 0 and len(labels) > 1:
            continue
        if not _LABEL.match(label):
            return f"{entry!r} is not a host name (a wildcard is only allowed as '*.' at the start)"
    return None


@dataclass(frozen=True)
class PeerMatcher:
    """rsyslog-style PermittedPeer: host names (``*.`` wildcard) and/or SHA-256 fingerprints.

    Names are compared case-insensitively with the certificate's SAN DNS names; as RFC 6125
    (6.4.4) says, the subject CN is used only when the certificate has no DNS SAN, unless
    ``match_cn`` (``[tls] permitted_peers_match_cn``) asks for rsyslog's looser rule, which
    also accepts a CN beside SANs that do not match. ``*.example.net`` matches exactly one
    label in place of the star (``a.example.net``, not ``example.net`` nor
    ``a.b.example.net``). A fingerprint matches the SHA-256 of the whole certificate (DER),
    written ``SHA256:AA:BB:...`` in any case.
    """

    names: frozenset[str] = field(default_factory=frozenset)
    suffixes: frozenset[str] = field(default_factory=frozenset)
    fingerprints: frozenset[str] = field(default_factory=frozenset)
    match_cn: bool = False

    @classmethod
    def from_entries(cls, entries: Iterable[str], match_cn: bool = False) -> PeerMatcher:
        names: set[str] = set()
        suffixes: set[str] = set()
        fps: set[str] = set()
        for entry in entries:
            if _FINGERPRINT.match(entry):
                fps.add(entry.upper())
            elif entry.startswith("*."):
                suffixes.add(entry[1:].lower().rstrip("."))
            else:
                names.add(entry.lower().rstrip("."))
        return cls(frozenset(names), frozenset(suffixes), frozenset(fps), match_cn)

    def __bool__(self) -> bool:
        return bool(self.names or self.suffixes or self.fingerprints)

    def name_matches(self, name: str) -> bool:
        name = name.lower().rstrip(".")
        if name in self.names:
            return True
        head, dot, rest = name.partition(".")
        return bool(head and dot and "." + rest in self.suffixes)

    def matches(self, cert: x509.Certificate) -> bool:
        if self.fingerprints:
            if fingerprint(cert.public_bytes(serialization.Encoding.DER)) in self.fingerprints:
                return True
        sans = _san_dns(cert)
        names = sans + _common_names(cert) if self.match_cn or not sans else sans
        return any(self.name_matches(n) for n in names)


def _san_dns(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(san.value.get_values_for_type(x509.DNSName))


def _common_names(cert: x509.Certificate) -> list[str]:
    return [
        attr.value
        for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if isinstance(attr.value, str)
    ]


def cert_names(cert: x509.Certificate) -> list[str]:
    """SAN DNS names followed by the subject CNs."""
    return _san_dns(cert) + _common_names(cert)


def _describe(cert: x509.Certificate) -> str:
    names = cert_names(cert)
    return ",".join(names[:4]) if names else cert.subject.rfc4514_string()


# --- per-connection state ------------------------------------------------------------

# Per-connection state lives here, keyed weakly by the SSL.Connection, not in its app data,
# which Twisted >= 23.8 sets to the protocol itself.
_STATES: weakref.WeakKeyDictionary[SSL.Connection, _ConnState] = weakref.WeakKeyDictionary()


class _ConnState:
    """Kept per SSL.Connection (in _STATES): who the peer is and why it was refused."""

    __slots__ = (
        "cert_requested",
        "handshake_done",
        "hello_read",
        "owner",
        "pending_alert",
        "protocol",
        "reason",
        "reported",
    )

    def __init__(self, protocol: TLSMemoryBIOProtocol | None, owner: ServerTLS | None) -> None:
        self.protocol = protocol  # the TLSMemoryBIOProtocol
        self.owner = owner
        self.hello_read = False
        self.pending_alert: str | None = None
        self.reason: str | None = None
        self.reported = False
        self.handshake_done = False
        self.cert_requested = False

    def peer(self) -> str:
        transport = self.protocol.transport if self.protocol is not None else None
        if transport is None:
            return "?"
        try:
            addr = transport.getPeer()
        except Exception:  # a torn-down transport; only used for a log line
            return "?"
        hp = host_port(addr)
        if hp is None:
            return str(addr)
        host, port = hp
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- context ------------------------------------------------------------------------------


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """Server-side TLS for all TLS listeners; rebuild from files with ``reload()``.

    ``on_reject(reason)`` is called once per refused handshake (reason is short and stable
    enough to label a counter: see ``REASONS``); the log line carries the details.
    """

    REASONS = (
        "no_certificate",
        "unknown_ca",
        "expired",
        "not_permitted",
        "bad_certificate",
        "protocol_version",
        "handshake_failure",
        "bad_handshake",
        "other",
    )

    def __init__(
        self,
        cfg: TLSConfig,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self._on_reject = on_reject or (lambda reason: None)
        self._cfg = cfg
        self._ctx = build_context(cfg, self._info, self._state)

    @property
    def config(self) -> TLSConfig:
        return self._cfg

    def reload(self, cfg: TLSConfig | None = None) -> None:
        """Re-read certificate, key and CA (and take a new config if given).

        New connections use the new context; established ones keep theirs. On failure
        raises TLSSetupError and keeps the previous context.
        """
        self.prepare(cfg if cfg is not None else self._cfg)()

    def prepare(self, cfg: TLSConfig) -> Callable[[], None]:
        """Build the context for ``cfg`` now (raises TLSSetupError like reload) and
        return the call that puts it in use: a reload commits only once all is built."""
        ctx = build_context(cfg, self._info, self._state)

        def install() -> None:
            self._cfg, self._ctx = cfg, ctx
            log.info("TLS context reloaded from {certificate}", certificate=cfg.certificate)

        return install

    # IOpenSSLServerConnectionCreator
    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        conn = SSL.Connection(self._ctx, None)
        _STATES[conn] = _ConnState(tlsProtocol, self)
        return conn

    def _state(self, conn: SSL.Connection) -> _ConnState:
        state = _STATES.get(conn)
        if state is None:
            # Made through getContext(): newer Twisted puts the protocol in the app data.
            state = _STATES[conn] = _ConnState(conn.get_app_data(), self)
        return state

    # Old-style context factory (twisted.internet.ssl.ContextFactory); connections made from
    # it have no peer attached, so their refusals are logged with peer "?".
    def getContext(self) -> SSL.Context:
        return self._ctx

    def _info(self, conn: SSL.Connection, where: int, ret: int) -> None:
        state = self._state(conn)
        if where & _CB_HANDSHAKE_DONE:
            state.handshake_done = True
            return
        if where & _CB_ACCEPT_LOOP and not state.cert_requested:
            # TLS 1.2 answers a missing client certificate with a bare "handshake failure";
            # knowing that a certificate was asked for tells it from other failures.
            where_now = conn.get_state_string()
            state.hello_read = state.hello_read or b"client hello" in where_now
            state.cert_requested = b"certificate request" in where_now
            return
        # ret = (level << 8) | description; level 2 is fatal.
        if where & _CB_WRITE_ALERT and ret >> 8 == 2 and not state.reported:
            desc = ret & 0xFF
            alert = _ALERTS.get(desc, f"alert {desc}")
            if state.handshake_done:
                # An established connection that fails (often a client closing without
                # close_notify): the protocol layer sees connectionLost; no refusal here.
                state.reported = True
                log.debug(
                    "TLS alert to {peer} after handshake: {alert}", peer=state.peer(), alert=alert
                )
                return
            if desc == 50 and not state.hello_read:
                # OpenSSL says "decode error" both for a client that hung up before its
                # ClientHello was complete and for a garbled one; connection_lost tells.
                state.pending_alert = alert
                return
            if state.reason is None and desc == 40 and state.cert_requested:
                state.reason = "no client certificate"
            self._refuse(state, state.reason or alert, _label(desc, state.reason), alert)

    def _refuse(self, state: _ConnState, reason: str, label: str, alert: str) -> None:
        state.reported = True
        log.warn(
            "TLS handshake from {peer} refused: {reason} (alert: {alert})",
            peer=state.peer(),
            reason=reason,
            alert=alert,
            reject=label,
        )
        self._on_reject(label)


def connection_lost(transport: object, reason: Failure | None) -> None:
    """Report a TLS connection that ended before its handshake without a refusal alert.

    Call it from the wrapped protocol's ``connectionLost(reason)`` with ``self.transport``.
    Bytes that are not TLS at all make OpenSSL fail without an alert, so only here can such
    a refusal be logged and counted (``bad_handshake``). A client that simply hung up
    before or during its ClientHello is logged at debug level and not counted; an aborted
    connection (handshake timeout) is counted by ``start_handshake_timer``'s callback.
    """
    get_handle = getattr(transport, "getHandle", None)  # TLS transports have it, not all others
    handle = get_handle() if get_handle is not None else None
    state = _STATES.get(handle) if isinstance(handle, SSL.Connection) else None
    if state is None or state.reported or state.handshake_done:
        return
    err = reason.value if reason is not None else None
    if isinstance(err, SSL.Error):
        text = _ossl(err)
        if "unexpected eof" in text.lower():
            state.reported = True
            log.debug("TLS client {peer} hung up during the handshake", peer=state.peer())
            return
        assert state.owner is not None
        state.owner._refuse(
            state, f"not a TLS handshake ({text})", "bad_handshake", state.pending_alert or "none"
        )
        return
    state.reported = True
    log.debug("TLS client {peer} closed before the handshake ended", peer=state.peer())


def build_context(
    cfg: TLSConfig,
    info: Callable[[SSL.Connection, int, int], None] | None = None,
    state_of: Callable[[SSL.Connection], _ConnState] | None = None,
) -> SSL.Context:
    """A server SSL.Context from ``cfg``'s files; raises TLSSetupError naming the key."""
    problems = _file_problems(cfg)
    if problems:
        raise TLSSetupError(problems)
    assert cfg.certificate is not None and cfg.key is not None
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(_MIN_VERSION[cfg.min_version])
    # No resumption: a resumed session would skip client verification, including
    # permitted_peers that a reload may have narrowed.
    ctx.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        | SSL.OP_NO_TICKET
        | SSL.OP_NO_RENEGOTIATION
    )
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    ctx.set_session_id(b"syslog-relay")
    try:
        ctx.use_certificate_chain_file(cfg.certificate.encode())
    except SSL.Error as exc:
        raise TLSSetupError([("tls.certificate", f"cannot load: {_ossl(exc)}")]) from None
    try:
        ctx.use_privatekey_file(cfg.key.encode())
    except SSL.Error as exc:
        # OpenSSL checks the key against the certificate already loaded.
        text = _ossl(exc)
        reason = "does not match tls.certificate" if "mismatch" in text else f"cannot load: {text}"
        raise TLSSetupError([("tls.key", reason)]) from None
    try:
        ctx.check_privatekey()
    except SSL.Error:
        raise TLSSetupError([("tls.key", "does not match tls.certificate")]) from None
    if cfg.verify_clients:
        assert cfg.ca is not None
        try:
            ctx.load_verify_locations(cfg.ca.encode())
        except SSL.Error as exc:
            raise TLSSetupError([("tls.ca", f"cannot load: {_ossl(exc)}")]) from None
        for ca in _load_pem_certs(_read(cfg.ca)):
            ctx.add_client_ca(_to_openssl(ca))
        matcher = PeerMatcher.from_entries(cfg.permitted_peers, cfg.permitted_peers_match_cn)
        ctx.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
            _make_verify(matcher, state_of or (lambda conn: _ConnState(None, None))),
        )
    if info is not None:
        ctx.set_info_callback(info)
    return ctx


def _label(alert: int, reason: str | None) -> str:
    if reason is not None:
        if reason == "no client certificate":
            return "no_certificate"
        if reason.startswith("peer not permitted"):
            return "not_permitted"
        if "expired" in reason or "not yet valid" in reason:
            return "expired"
        if "issuer" in reason or "self-signed" in reason:
            return "unknown_ca"
        return "bad_certificate"
    return {
        116: "no_certificate",
        70: "protocol_version",
        40: "handshake_failure",
        48: "unknown_ca",
        45: "expired",
        42: "bad_certificate",
    }.get(alert, "other")


def _make_verify(
    matcher: PeerMatcher, state_of: Callable[[SSL.Connection], _ConnState]
) -> Callable[[SSL.Connection, crypto.X509, int, int, int], bool]:
    def verify(conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int) -> bool:
        state = state_of(conn)
        pcert = cert.to_cryptography()
        if not ok:
            if state.reason is None:
                text = _VERIFY_ERRORS.get(errno, f"X509 verify error {errno}")
                state.reason = f"{text} (depth {depth}, {_describe(pcert)})"
            return False
        if depth == 0 and matcher and not matcher.matches(pcert):
            state.reason = (
                f"peer not permitted: {_describe(pcert)} "
                f"{fingerprint(pcert.public_bytes(serialization.Encoding.DER))}"
            )
            return False
        return True

    return verify


# --- handshake deadline -------------------------------------------------------------------


def handshake_done(transport: object) -> bool:
    """Whether the TLS handshake on ``transport`` (a TLSMemoryBIOProtocol) has completed.

    Asks OpenSSL through the public ``getHandle()``: a connection has a current cipher only
    once the handshake is done. Twisted's private ``_handshakeDone`` is the fallback.
    """
    handle = None
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is not None:
        handle = get_handle()
    if isinstance(handle, SSL.Connection):
        return handle.get_cipher_name() is not None
    return bool(getattr(transport, "_handshakeDone", False))


def start_handshake_timer(
    transport: ITCPTransport,
    reactor: IReactorTime,
    timeout: float,
    on_timeout: Callable[[], None] | None = None,
) -> IDelayedCall:
    """Abort ``transport`` if its TLS handshake has not completed ``timeout`` seconds from now.

    Call it from the wrapped protocol's ``connectionMade`` with ``self.transport`` (the
    ``TLSMemoryBIOProtocol``). Cancel the returned call in ``handshakeCompleted()`` (declare
    ``IHandshakeListener``) and in ``connectionLost``; forgetting is harmless because the
    call re-checks the handshake state before aborting. ``on_timeout`` runs just before the
    abort (count it there); the timeout is logged here.
    """

    def fire() -> None:
        if handshake_done(transport):
            return
        peer = "?"
        try:
            addr = transport.getPeer()
            peer = f"{addr.host}:{addr.port}"
        except Exception:  # only for the log line
            pass
        log.warn(
            "TLS handshake from {peer} not completed within {timeout}s; closing",
            peer=peer,
            timeout=timeout,
        )
        if on_timeout is not None:
            on_timeout()
        transport.abortConnection()

    return reactor.callLater(timeout, fire)


# --- check --------------------------------------------------------------------------------


def check_tls(cfg: TLSConfig, now: datetime.datetime | None = None) -> list[tuple[str, str]]:
    """Problems with the TLS files for ``syslog-relay check``, as (key, reason)."""
    problems = _file_problems(cfg)
    if not problems:
        try:
            build_context(cfg)
        except TLSSetupError as exc:
            problems.extend(exc.problems)
    now = now or datetime.datetime.now(datetime.UTC)
    leaf = None
    if cfg.certificate:
        try:
            certs = _load_pem_certs(_read(cfg.certificate))
        except OSError:
            certs = []
        leaf = certs[0] if certs else None
    if leaf is not None:
        if _not_after(leaf) < now:
            problems.append(
                ("tls.certificate", f"expired on {_not_after(leaf):%Y-%m-%d %H:%M} UTC")
            )
        elif _not_before(leaf) > now:
            problems.append(
                ("tls.certificate", f"not valid before {_not_before(leaf):%Y-%m-%d %H:%M} UTC")
            )
    for entry in cfg.permitted_peers:
        reason = peer_entry_problem(entry)
        if reason is not None:
            problems.append(("tls.permitted_peers", reason))
    return problems


def _file_problems(cfg: TLSConfig) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    if not cfg.certificate:
        problems.append(("tls.certificate", "not set"))
    if not cfg.key:
        problems.append(("tls.key", "not set"))
    if cfg.verify_clients and not cfg.ca:
        problems.append(("tls.ca", "required when verify_clients = true"))
    for key, path in (("certificate", cfg.certificate), ("key", cfg.key), ("ca", cfg.ca)):
        if not path:
            continue
        try:
            data = _read(path)
        except OSError as exc:
            problems.append((f"tls.{key}", f"cannot read {path}: {exc.strerror}"))
            continue
        if key == "key":
            reason = _key_problem(data)
            if reason:
                problems.append(("tls.key", reason))
        elif not _load_pem_certs(data):
            problems.append((f"tls.{key}", f"no PEM certificate in {path}"))
    return problems


def _key_problem(data: bytes) -> str | None:
    try:
        serialization.load_pem_private_key(data, password=None)
    except TypeError:
        return "the key is encrypted; a key without passphrase is required"
    except ValueError:
        return "not a valid PEM private key"
    except UnsupportedAlgorithm as exc:
        return f"unsupported key type ({exc})"
    return None


_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL
)


def _load_pem_certs(data: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle (cryptography 38 has no load_pem_x509_certificates)."""
    certs = []
    for m in _PEM_CERT.finditer(data):
        try:
            certs.append(x509.load_pem_x509_certificate(m.group(0)))
        except ValueError:
            continue
    return certs


def _to_openssl(cert: x509.Certificate) -> x509.Certificate | crypto.X509:
    # pyOpenSSL >= 24 takes cryptography certificates and warns on its own X509 objects;
    # 23.0 only takes X509.
    if tuple(int(p) for p in _pyopenssl_version()[:2]) >= (24, 0):
        return cert
    return crypto.X509.from_cryptography(cert)


def _pyopenssl_version() -> list[str]:
    import OpenSSL

    return OpenSSL.__version__.split(".")


# cryptography >= 42 has the aware not_valid_*_utc; Debian 12's (38) only the naive ones.


def _not_after(cert: x509.Certificate) -> datetime.datetime:
    value = getattr(cert, "not_valid_after_utc", None)
    if value is None:
        value = cert.not_valid_after.replace(tzinfo=datetime.UTC)
    return value  # type: ignore[no-any-return]


def _not_before(cert: x509.Certificate) -> datetime.datetime:
    value = getattr(cert, "not_valid_before_utc", None)
    if value is None:
        value = cert.not_valid_before.replace(tzinfo=datetime.UTC)
    return value  # type: ignore[no-any-return]


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _ossl(exc: SSL.Error) -> str:
    """Short text of an OpenSSL error stack: the reason of the first error."""
    try:
        first = exc.args[0][0]
        return str(first[2] or first[1])
    except (IndexError, TypeError):
        return str(exc)
