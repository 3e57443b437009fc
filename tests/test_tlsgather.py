"""GatheringTLSProtocol: every TLS record of one socket read reaches the protocol at once."""

from __future__ import annotations

import inspect
from typing import Any

from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory

from relay.config import TLSConfig
from relay.inputs.tls_gather import GatheringTLSFactory
from relay.inputs.tls_server import ServerTLS
from tests.support.certs import PKI, pki  # noqa: F401  (fixture)

_KW = inspect.signature(TLSMemoryBIOFactory.__init__).parameters


class Recorder(Protocol):
    def __init__(self) -> None:
        self.calls: list[bytes] = []
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.calls.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True


def connect(pki: PKI) -> tuple[Any, SSL.Connection, Recorder, StringTransport, Clock]:  # noqa: F811
    server_cert, server_key = str(pki.server.cert), str(pki.server.key)
    cfg = TLSConfig(certificate=server_cert, key=server_key, ca=str(pki.ca), verify_clients=True)
    rec = Recorder()
    clock = Clock()
    kw = {"clock": clock} if "clock" in _KW else {}
    factory = GatheringTLSFactory(ServerTLS(cfg), False, Factory.forProtocol(lambda: rec), **kw)
    server = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    server.makeConnection(transport)
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.use_certificate_file(str(pki.clients["good"].cert))
    ctx.use_privatekey_file(str(pki.clients["good"].key))
    ctx.load_verify_locations(str(pki.ca))
    client = SSL.Connection(ctx, None)
    client.set_connect_state()
    for _ in range(20):  # handshake, bounded
        try:
            client.do_handshake()
        except SSL.WantReadError:
            pass
        out = pending(client)
        if out:
            server.dataReceived(out)
        clock.advance(1)
        back = transport.value()
        transport.clear()
        if back:
            client.bio_write(back)
        if client.get_peer_certificate() is not None and not out and not back:
            break
    return server, client, rec, transport, clock


def pending(client: SSL.Connection) -> bytes:
    chunks = []
    while True:
        try:
            chunks.append(client.bio_read(65536))
        except SSL.WantReadError:
            return b"".join(chunks)


def test_records_of_one_read_arrive_in_one_call(pki: PKI) -> None:  # noqa: F811
    server, client, rec, _, _ = connect(pki)
    msgs = [b"%d <13>1 - h app - - - message %d" % (30 + len(str(i)), i) for i in range(50)]
    for m in msgs:
        client.send(m)  # one TLS record each, as most senders write them
    server.dataReceived(pending(client))
    assert rec.calls == [b"".join(msgs)]
    # Split across two reads: two calls, nothing lost or repeated.
    for m in msgs[:3]:
        client.send(m)
    wire = pending(client)
    server.dataReceived(wire[:50])
    server.dataReceived(wire[50:])
    assert b"".join(rec.calls[1:]) == b"".join(msgs[:3])


def test_data_before_close_notify_is_delivered_first(pki: PKI) -> None:  # noqa: F811
    server, client, rec, _, _ = connect(pki)
    client.send(b"last words")
    client.shutdown()
    server.dataReceived(pending(client))
    assert rec.calls == [b"last words"]
