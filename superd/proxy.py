"""Receiver side of the HAProxy PROXY protocol, v1 (text) and v2 (binary).

Implemented from HAProxy's ``doc/proxy-protocol.txt`` ("Versions 1 & 2").
:func:`read_header` peeks at a balancer's header, consumes exactly its bytes
and leaves the client's payload in the socket for the program superd starts.

Length cap: ``MAX_V2_LENGTH`` = 4096 bytes after the 16-byte v2 fixed part
(the format allows 65535). The largest address block is 216 bytes (AF_UNIX)
and the TLVs balancers send (ALPN, SNI <= 255, unique ID <= 128, SSL details,
NETNS, cloud vendors' IDs) stay under 1 KiB: 4 KiB is ample room while
bounding what a connection can make the daemon peek before its program runs.

Strict (anything else is a ProxyError): v1 is one printable US-ASCII line of
at most 107 bytes ending in CRLF, single spaces, addresses valid for the
stated family (no IPv4 leading zeros, no IPv6 ``%scope``), ports 0..65535 in
plain decimal; ``UNKNOWN`` ignores the rest of its line and is reported as
command LOCAL. v2 takes version 2, LOCAL/PROXY and only the seven
family/transport bytes the spec lists; datagram families are reported as
UDP4, UDP6, UNIX_DGRAM. TLVs are walked (each must end inside the header)
and skipped; CRC32C is not verified. LOCAL and AF_UNSPEC blocks are
discarded unread: family UNKNOWN, no addresses. Addresses read as
getpeername() shows them (IPv4-mapped stays ``::ffff:a.b.c.d``); UNIX paths
via os.fsdecode, abstract names keep their leading NUL, unbound is ``""``.
"""

from __future__ import annotations

import ipaddress
import os
import select
import socket
import struct
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

MAX_V2_LENGTH: Final = 4096
V1_MAX_LENGTH: Final = 107
V1_PREFIX: Final = b"PROXY "
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED_LENGTH: Final = 16
ACCEPT_VALUES: Final = ("v1", "v2", "any")

_PEEK_SIZE: Final = V2_FIXED_LENGTH + MAX_V2_LENGTH
_EOF_MESSAGE: Final = "connection closed before the PROXY header was complete"
_V1_TOKENS: Final = (b"TCP4 ", b"TCP6 ", b"UNKNOWN ", b"UNKNOWN\r")
_V2_FAMILIES: Final = MappingProxyType({
    0x00: ("UNKNOWN", 0),
    0x11: ("TCP4", 12), 0x12: ("UDP4", 12),
    0x21: ("TCP6", 36), 0x22: ("UDP6", 36),
    0x31: ("UNIX", 216), 0x32: ("UNIX_DGRAM", 216),
})
_UNIX_PATH_SIZE: Final = 108

Address = tuple[str, int] | str | None


class ProxyError(Exception):
    """A PROXY header that is malformed, too long, truncated or not accepted."""


@dataclass(frozen=True)
class ProxyHeader:
    """One parsed PROXY header; ``length`` is its size on the wire, TLVs included."""

    version: int
    command: str
    family: str
    source: Address
    dest: Address
    length: int


def parse(data: bytes, accept: str = "any") -> ProxyHeader | None:
    """Parse a header at the start of *data*; None while more bytes are needed.

    *accept* is ``"v1"``, ``"v2"`` or ``"any"``. Raises ProxyError as soon as
    the bytes seen cannot begin an acceptable header.
    """
    if accept not in ACCEPT_VALUES:
        raise ValueError(f"accept must be one of {ACCEPT_VALUES}, not {accept!r}")
    if not data:
        return None
    if data[:1] == V1_PREFIX[:1]:
        if accept == "v2":
            raise ProxyError("PROXY protocol v1 header where only v2 is accepted")
        return _parse_v1(data)
    if data[:1] == V2_SIGNATURE[:1]:
        if accept == "v1":
            raise ProxyError("PROXY protocol v2 header where only v1 is accepted")
        return _parse_v2(data)
    raise ProxyError("not a PROXY protocol header")


def read_header(sock: socket.socket, accept: str = "any") -> ProxyHeader | None:
    """Consume a complete PROXY header from *sock* and nothing after it.

    Never blocks: None means more bytes are needed. Raises ProxyError for a bad
    header or when the peer closes before the header is complete; other socket
    errors (ECONNRESET...) propagate as OSError. A partial header stays queued,
    so a level-triggered selector keeps reporting the socket readable: retry
    from a short timer rather than on readiness until the header is complete.
    """
    header = _peek_parse(sock, accept)
    if header is None and _peer_closed(sock):
        header = _peek_parse(sock, accept)  # the rest may have come with the FIN
        if header is None:
            raise ProxyError(_EOF_MESSAGE)
    if header is not None:
        _consume(sock, header.length)
    return header


def _peek_parse(sock: socket.socket, accept: str) -> ProxyHeader | None:
    try:
        data = sock.recv(_PEEK_SIZE, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    if not data:
        raise ProxyError(_EOF_MESSAGE)
    return parse(data, accept)


def _peer_closed(sock: socket.socket) -> bool:
    """True if the peer has shut down its side (or the socket has an error)."""
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    closed = select.POLLRDHUP | select.POLLHUP | select.POLLERR
    return any(events & closed for _fd, events in poller.poll(0))


def _consume(sock: socket.socket, count: int) -> None:
    while count > 0:
        try:
            chunk = sock.recv(count, socket.MSG_DONTWAIT)
        except BlockingIOError as exc:
            raise ProxyError("PROXY header bytes vanished while being consumed") from exc
        if not chunk:
            raise ProxyError(_EOF_MESSAGE)
        count -= len(chunk)


# version 1

def _parse_v1(data: bytes) -> ProxyHeader | None:
    window = data[:V1_MAX_LENGTH]
    end = window.find(b"\r\n")
    if end >= 0:
        line = window[:end]
        _check_v1_text(line, complete=True)
        return _decode_v1(line.decode("ascii"), end + 2)
    _check_v1_text(window, complete=False)
    if len(window) >= V1_MAX_LENGTH:
        raise ProxyError(f"no CRLF within the first {V1_MAX_LENGTH} bytes of a v1 header")
    return None


def _check_v1_text(text: bytes, complete: bool) -> None:
    """Reject early what can never become a valid v1 line."""
    head = text[: len(V1_PREFIX)]
    if V1_PREFIX[: len(head)] != head:
        raise ProxyError("not a PROXY protocol v1 header")
    body = text[:-1] if not complete and text.endswith(b"\r") else text
    if not (body.isascii() and body.decode("ascii").isprintable()):
        raise ProxyError("v1 header contains a byte that is not printable US-ASCII")
    rest = text[len(V1_PREFIX):]
    if not any(_could_start(rest, token) for token in _V1_TOKENS):
        raise ProxyError("v1 protocol must be TCP4, TCP6 or UNKNOWN")


def _could_start(text: bytes, token: bytes) -> bool:
    size = min(len(text), len(token))
    return text[:size] == token[:size]


def _decode_v1(line: str, length: int) -> ProxyHeader:
    fields = line.split(" ")
    if len(fields) < 2:
        raise ProxyError("v1 header names no protocol")
    protocol = fields[1]
    if protocol == "UNKNOWN":
        return ProxyHeader(1, "LOCAL", "UNKNOWN", None, None, length)
    if protocol not in ("TCP4", "TCP6"):
        raise ProxyError(f"v1 protocol must be TCP4, TCP6 or UNKNOWN, not {protocol!r}")
    if len(fields) != 6:
        raise ProxyError("v1 header needs exactly 6 fields separated by single spaces")
    source = (_v1_address(fields[2], protocol), _v1_port(fields[4]))
    dest = (_v1_address(fields[3], protocol), _v1_port(fields[5]))
    return ProxyHeader(1, "PROXY", protocol, source, dest, length)


def _v1_address(text: str, protocol: str) -> str:
    kind: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]
    kind = ipaddress.IPv4Address if protocol == "TCP4" else ipaddress.IPv6Address
    try:
        packed = kind(text).packed
    except ValueError as exc:
        raise ProxyError(f"bad {protocol} address {text!r} in v1 header") from exc
    canonical = _address_text(packed)
    if "%" in text or (protocol == "TCP4" and canonical != text):
        raise ProxyError(f"bad {protocol} address {text!r} in v1 header (scope, leading zero)")
    return canonical


def _v1_port(text: str) -> int:
    leading_zero = len(text) > 1 and text[0] == "0"
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or leading_zero:
        raise ProxyError(f"bad port {text!r} in v1 header")
    port = int(text)
    if port > 65535:
        raise ProxyError(f"port {port} out of range in v1 header")
    return port


# version 2

def _parse_v2(data: bytes) -> ProxyHeader | None:
    signature = data[: len(V2_SIGNATURE)]
    if V2_SIGNATURE[: len(signature)] != signature:
        raise ProxyError("bad PROXY protocol v2 signature")
    if len(data) > 12:
        _check_version_command(data[12])
    if len(data) > 13 and data[13] not in _V2_FAMILIES:
        raise ProxyError(f"unsupported v2 family/transport byte 0x{data[13]:02x}")
    if len(data) < V2_FIXED_LENGTH:
        return None
    length = int.from_bytes(data[14:16], "big")
    if length > MAX_V2_LENGTH:
        raise ProxyError(f"v2 header announces {length} bytes, more than {MAX_V2_LENGTH}")
    total = V2_FIXED_LENGTH + length
    if len(data) < total:
        return None
    return _decode_v2(data[12] & 0x0F, data[13], data[V2_FIXED_LENGTH:total], total)


def _check_version_command(byte: int) -> None:
    if byte >> 4 != 2:
        raise ProxyError(f"unsupported PROXY protocol version {byte >> 4} in v2 header")
    if byte & 0x0F not in (0, 1):
        raise ProxyError(f"unknown v2 command 0x{byte & 0x0F:x}")


def _decode_v2(command: int, family_byte: int, block: bytes, total: int) -> ProxyHeader:
    family, size = _V2_FAMILIES[family_byte]
    if command == 0:
        return ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, total)
    if family == "UNKNOWN":
        return ProxyHeader(2, "PROXY", "UNKNOWN", None, None, total)
    if len(block) < size:
        raise ProxyError(f"v2 {family} address block needs {size} bytes, header has {len(block)}")
    _walk_tlvs(block[size:])
    source, dest = _v2_addresses(family, block[:size])
    return ProxyHeader(2, "PROXY", family, source, dest, total)


def _walk_tlvs(tlvs: bytes) -> None:
    """Check that the TLVs tile the rest of the header exactly."""
    offset = 0
    while offset < len(tlvs):
        if len(tlvs) - offset < 3:
            raise ProxyError("truncated TLV at the end of a v2 header")
        offset += 3 + int.from_bytes(tlvs[offset + 1 : offset + 3], "big")
        if offset > len(tlvs):
            raise ProxyError("a TLV runs past the end of the v2 header")


def _v2_addresses(family: str, block: bytes) -> tuple[Address, Address]:
    if family in ("UNIX", "UNIX_DGRAM"):
        return _unix_path(block[:_UNIX_PATH_SIZE]), _unix_path(block[_UNIX_PATH_SIZE:])
    width = 4 if family in ("TCP4", "UDP4") else 16
    source_port, dest_port = struct.unpack_from("!HH", block, 2 * width)
    source = _address_text(block[:width])
    dest = _address_text(block[width : 2 * width])
    return (source, source_port), (dest, dest_port)


def _address_text(packed: bytes) -> str:
    """The address as socket.getpeername() shows it (IPv4-mapped as ::ffff:a.b.c.d)."""
    family = socket.AF_INET if len(packed) == 4 else socket.AF_INET6
    return socket.inet_ntop(family, packed)


def _unix_path(raw: bytes) -> str:
    if raw[:1] == b"\0":
        name = raw[1:].rstrip(b"\0")
        return "\0" + os.fsdecode(name) if name else ""
    return os.fsdecode(raw.split(b"\0", 1)[0])
