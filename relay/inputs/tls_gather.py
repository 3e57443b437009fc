"""TLS listeners that hand the application one chunk per socket read, not one per TLS record.

Twisted's ``TLSMemoryBIOProtocol`` calls the wrapped protocol's ``dataReceived``
once per ``SSL_read``, i.e. once per TLS record, and most syslog senders write
one record per message: the framing, routing and writer hand-off would then run
per message. This subclass drains every record the read decrypted and delivers
their concatenation once. Only ``_flushReceiveBIO`` changes; its error handling
is Twisted's (the same in 22.4 and current releases, which both are tested).
"""

from __future__ import annotations

from OpenSSL.SSL import Connection, Error, WantReadError, ZeroReturnError
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

_RECV = 2**15


class GatheringTLSProtocol(TLSMemoryBIOProtocol):
    _tlsConnection: Connection

    def _flushReceiveBIO(self) -> None:
        got: list[bytes] = []
        recv = self._tlsConnection.recv
        while not self._lostTLSConnection:
            try:
                data = recv(_RECV)
            except WantReadError:
                break
            except ZeroReturnError:
                # close_notify: what came before it is delivered first.
                self._deliver(got)
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                self._deliver(got)
                self._tlsShutdownFinished(Failure())
            else:
                got.append(data)
        self._deliver(got)
        self._flushSendBIO()

    def _deliver(self, got: list[bytes]) -> None:
        if got and not self._aborted:
            data = got[0] if len(got) == 1 else b"".join(got)
            ProtocolWrapper.dataReceived(self, data)
        got.clear()


class GatheringTLSFactory(TLSMemoryBIOFactory):
    protocol = GatheringTLSProtocol
