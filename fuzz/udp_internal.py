"""Fuzz target: a datagram to a UDP internal service (superd.internal).

An input picks the service (its first byte), the daemon's datagram counter,
the sender's address family, address, port and IPv6 scope, and the datagram
(the rest).  Two things are fuzzed with it:

- ``udp_reply``: echo returns the datagram, discard nothing, daytime a
  CRLF-terminated line, time four bytes, chargen at most 512 bytes of the
  RFC 864 character cycle;
- ``UdpService`` reading that datagram from a socket (a stand-in that
  records what would be sent): nothing escapes, and a reply goes only to
  a source port of 1024 or more that is no internal service's, from an
  address that is not unspecified, multicast, 0.0.0.0/8 or 240.0.0.0/4
  (checked here with ipaddress, independently of superd.limits).
"""

from __future__ import annotations

import ipaddress
import selectors
import socket

import atheris

from fuzz.target import main

with atheris.instrument_imports(include=["superd"]):
    from superd.internal import CHARGEN, LOOP_PORTS, UdpService, udp_reply

NAMES = ("echo", "discard", "daytime", "chargen", "time")


class FakeSocket:
    """Hands out one queued datagram, then would block; records what is sent."""

    def __init__(self, family: socket.AddressFamily) -> None:
        self.family = family
        self.queue: list[tuple[bytes, tuple[object, ...]]] = []
        self.sent: list[tuple[bytes, tuple[object, ...]]] = []

    def recvfrom(self, size: int) -> tuple[bytes, tuple[object, ...]]:
        if not self.queue:
            raise BlockingIOError
        return self.queue.pop()

    def sendto(self, data: bytes, peer: tuple[object, ...]) -> int:
        self.sent.append((data, peer))
        return len(data)


SOCKETS = {family: FakeSocket(family) for family in (socket.AF_INET, socket.AF_INET6)}
SERVICES = {(name, family): UdpService(name, sock, LOOP_PORTS)  # type: ignore[arg-type]
            for name in NAMES for family, sock in SOCKETS.items()}


def test_one_input(data: bytes) -> None:
    provider = atheris.FuzzedDataProvider(data)
    name = NAMES[provider.ConsumeIntInRange(0, len(NAMES) - 1)]
    counter = provider.ConsumeIntInRange(0, 2**64 - 1)
    family = socket.AF_INET6 if provider.ConsumeBool() else socket.AF_INET
    peer = _peer(provider, family)
    datagram = provider.ConsumeBytes(provider.remaining_bytes())
    _check_reply(name, datagram, udp_reply(name, datagram, counter))
    sock = SOCKETS[family]
    sock.queue.append((datagram, peer))
    SERVICES[name, family](selectors.EVENT_READ)
    for reply, to in sock.sent:
        assert to == peer and _may_reply(peer), (peer, reply)
    sock.sent.clear()


def _peer(provider: atheris.FuzzedDataProvider, family: int) -> tuple[object, ...]:
    port = provider.ConsumeIntInRange(0, 65535)
    if family == socket.AF_INET:
        return socket.inet_ntop(family, provider.ConsumeBytes(4).ljust(4, b"\0")), port
    host = socket.inet_ntop(family, provider.ConsumeBytes(16).ljust(16, b"\0"))
    scope = provider.ConsumeIntInRange(0, 3)
    if scope:
        host += f"%eth{scope}"
    return host, port, 0, scope


def _may_reply(peer: tuple[object, ...]) -> bool:
    host, port = str(peer[0]).split("%")[0], peer[1]
    assert isinstance(port, int)
    if port < 1024 or port in LOOP_PORTS:
        return False
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast:
        return False
    v4_bad = (ipaddress.ip_network("0.0.0.0/8"), ipaddress.ip_network("240.0.0.0/4"))
    return not (ip.version == 4 and any(ip in net for net in v4_bad))


def _check_reply(name: str, datagram: bytes, reply: bytes | None) -> None:
    if name == "echo":
        assert reply == datagram
    elif name == "discard":
        assert reply is None
    elif name == "daytime":
        assert reply is not None and reply.endswith(b"\r\n") and len(reply) < 100, reply
    elif name == "time":
        assert reply is not None and len(reply) == 4, reply
    else:
        assert reply is not None and 0 < len(reply) <= 512, reply
        assert reply in CHARGEN * 2, reply


if __name__ == "__main__":
    main(test_one_input)
