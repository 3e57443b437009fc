"""Test PKI made with ``cryptography``: two CAs, a server certificate and client certificates.

Works with cryptography 38 (Debian 12) and the newest. Keys are EC P-256: fast to make,
accepted by OpenSSL and by rsyslog's GnuTLS driver.

Names used by the tests:
- server: CN relay.test, SAN DNS relay.test + localhost, SAN IP 127.0.0.1
- client ``good``:     good.clients.test (SAN + CN), signed by the CA
- client ``cn_only``:  CN other.clients.test, no SAN, signed by the CA
- client ``wrong``:    intruder.evil.test, signed by the CA
- client ``expired``:  old.clients.test, signed by the CA, expired yesterday
- client ``other_ca``: good.clients.test, signed by the other CA
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLIENT_NAMES = {
    "good": "good.clients.test",
    "cn_only": "other.clients.test",
    "wrong": "intruder.evil.test",
    "expired": "old.clients.test",
    "other_ca": "good.clients.test",
    # CN in the permitted domain, DNS SAN outside it (RFC 6125: the SAN decides)
    "san_elsewhere": "sneaky.clients.test",
}


@dataclass(frozen=True)
class CertFiles:
    cert: Path  # leaf certificate (PEM); for the server, leaf then CA (full chain)
    key: Path
    fingerprint: str  # SHA256:AA:BB:... of the leaf, as rsyslog prints it


@dataclass
class PKI:
    root: Path
    ca: Path  # CA certificate (PEM)
    other_ca: Path
    server: CertFiles
    clients: dict[str, CertFiles] = field(default_factory=dict)
    garbage_key: Path = Path()
    bundle_no_certs: Path = Path()
    expired_server: CertFiles | None = None
    other_key: Path = Path()  # a valid key that matches no certificate here


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "syslog-relay tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    cn: str,
    *,
    dns: list[str],
    ips: list[str] = (),  # type: ignore[assignment]
    server: bool,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(days=1))
        .not_valid_after(not_after or now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    alt: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    alt += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if alt:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _fingerprint(cert: x509.Certificate) -> str:
    hexd = cert.fingerprint(hashes.SHA256()).hex().upper()
    return "SHA256:" + ":".join(hexd[i : i + 2] for i in range(0, len(hexd), 2))


def _write(
    root: Path,
    name: str,
    cert: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    chain: list[x509.Certificate] = (),  # type: ignore[assignment]
) -> CertFiles:
    cert_path = root / f"{name}.crt"
    key_path = root / f"{name}.key"
    cert_path.write_bytes(_pem(cert) + b"".join(_pem(c) for c in chain))
    key_path.write_bytes(_key_pem(key))
    key_path.chmod(0o600)
    return CertFiles(cert_path, key_path, _fingerprint(cert))


def make_pki(root: Path) -> PKI:
    """Write the whole test PKI under ``root`` (created if missing)."""
    root.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _ca("syslog-relay test CA")
    other, other_key = _ca("syslog-relay other CA")
    (root / "ca.crt").write_bytes(_pem(ca))
    (root / "other-ca.crt").write_bytes(_pem(other))

    srv, srv_key = _leaf(
        ca, ca_key, "relay.test", dns=["relay.test", "localhost"], ips=["127.0.0.1"], server=True
    )
    pki = PKI(
        root=root,
        ca=root / "ca.crt",
        other_ca=root / "other-ca.crt",
        server=_write(root, "server", srv, srv_key, chain=[ca]),
    )
    now = _now()
    for label, cn in CLIENT_NAMES.items():
        issuer, issuer_key = (other, other_key) if label == "other_ca" else (ca, ca_key)
        kwargs: dict[str, datetime.datetime] = {}
        if label == "expired":
            kwargs = {
                "not_before": now - datetime.timedelta(days=30),
                "not_after": now - datetime.timedelta(days=1),
            }
        dns = {"cn_only": [], "san_elsewhere": ["intruder.evil.test"]}.get(label, [cn])
        cert, key = _leaf(issuer, issuer_key, cn, dns=dns, server=False, **kwargs)
        pki.clients[label] = _write(root, f"client-{label}", cert, key)

    old, old_key = _leaf(
        ca,
        ca_key,
        "relay.test",
        dns=["relay.test"],
        server=True,
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    pki.expired_server = _write(root, "server-expired", old, old_key, chain=[ca])
    pki.garbage_key = root / "garbage.key"
    pki.garbage_key.write_bytes(
        b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n"
    )
    pki.bundle_no_certs = root / "empty-bundle.pem"
    pki.bundle_no_certs.write_bytes(b"# no certificates here\n")
    pki.other_key = root / "unrelated.key"
    pki.other_key.write_bytes(_key_pem(_key()))
    return pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """The test PKI, made once per session (import this fixture into the test module)."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def server_tls(pki: PKI, permitted_peers: list[str] | None = None) -> dict[str, object]:
    """A relay's [tls] section for this PKI; with ``permitted_peers``, mutual TLS."""
    tls: dict[str, object] = {"certificate": str(pki.server.cert), "key": str(pki.server.key)}
    if permitted_peers is not None:
        tls.update(ca=str(pki.ca), verify_clients=True, permitted_peers=permitted_peers)
    return tls
