"""Client-side TLS for forward outputs: verify the peer against the CA and its name.

Twisted's ``optionsForClientTLS`` checks the peer's certificate chain and its
name (service_identity), offers the client certificate for mutual TLS, and
lets us refuse anything below TLS 1.2.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

from relay.config import ForwardConfig


class ClientTLSError(Exception):
    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def client_options_factory(
    cfg: ForwardConfig, where: str
) -> Callable[[str], IOpenSSLClientConnectionCreator]:
    """A function peer-host -> client TLS options; raises ClientTLSError naming the key."""
    assert cfg.tls_ca is not None
    try:
        trust = ssl.Certificate.loadPEM(Path(cfg.tls_ca).read_bytes())
    except Exception as exc:  # translated at the boundary: pyOpenSSL raises many types
        raise ClientTLSError(f"{where}.tls_ca", f"cannot load CA certificate: {exc}") from exc
    client_cert = None
    if cfg.tls_certificate and cfg.tls_key:
        try:
            pem = Path(cfg.tls_certificate).read_bytes() + b"\n" + Path(cfg.tls_key).read_bytes()
            client_cert = ssl.PrivateCertificate.loadPEM(pem)
        except Exception as exc:  # as above
            raise ClientTLSError(
                f"{where}.tls_certificate", f"cannot load client certificate/key: {exc}"
            ) from exc

    def options(host: str) -> IOpenSSLClientConnectionCreator:
        return ssl.optionsForClientTLS(
            cfg.tls_peer_name or host,
            trustRoot=trust,
            clientCertificate=client_cert,
            extraCertificateOptions={"raiseMinimumTo": ssl.TLSVersion.TLSv1_2},
        )

    return options
