"""Who is on the other end of a listener's connection: (host, port) and the sender name
(``tcp://host:port``) that staging records and logs carry."""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet.address import IPv4Address, IPv6Address

if TYPE_CHECKING:
    from twisted.internet.interfaces import IAddress


def host_port(addr: IAddress) -> tuple[str, int] | None:
    """An IP address's (host, port); None for any other kind (UNIX sockets, test doubles)."""
    if isinstance(addr, (IPv4Address, IPv6Address)):
        return addr.host, addr.port
    return None


def format_sender(transport_name: str, addr: IAddress | tuple[str, int]) -> bytes:
    hp = addr if isinstance(addr, tuple) else host_port(addr)  # a datagram's sender: a tuple
    host, port = hp if hp is not None else (None, None)
    if host is None:
        return f"{transport_name}://unknown:0".encode()
    if ":" in str(host):
        return f"{transport_name}://[{host}]:{port}".encode()
    return f"{transport_name}://{host}:{port}".encode()


def source_host(addr: IAddress) -> str:
    hp = host_port(addr)
    return hp[0] if hp is not None else "unknown"
