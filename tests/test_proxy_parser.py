"""PROXY protocol v1/v2 parser (superd.proxy): valid headers, prefixes, malformed input,
version selection, and read_header on real loopback sockets."""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import time
from collections.abc import Iterator

import pytest

from superd.proxy import MAX_V2_LENGTH, ProxyError, ProxyHeader, parse, read_header

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
LOCAL, PROXY = 0, 1
TCP4, UDP4, TCP6, UNIX, UNSPEC = 0x11, 0x12, 0x21, 0x31, 0x00


# -- header builders (test code: the daemon only ever parses) -------------------------

def build_v1(protocol: str, source: tuple[str, int], dest: tuple[str, int]) -> bytes:
    return f"PROXY {protocol} {source[0]} {dest[0]} {source[1]} {dest[1]}\r\n".encode()


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + len(value).to_bytes(2, "big") + value


def inet_block(source: tuple[str, int], dest: tuple[str, int]) -> bytes:
    packed = ipaddress.ip_address(source[0]).packed + ipaddress.ip_address(dest[0]).packed
    return packed + struct.pack("!HH", source[1], dest[1])


def unix_block(source: bytes, dest: bytes) -> bytes:
    return source.ljust(108, b"\0") + dest.ljust(108, b"\0")


def build_v2(command: int, family: int, block: bytes = b"", *, length: int | None = None,
             version: int = 2) -> bytes:
    size = len(block) if length is None else length
    return SIG + bytes([version << 4 | command, family]) + size.to_bytes(2, "big") + block


V1_TCP4 = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::1 2001:DB8:0:0:0:0:0:2 1 65535\r\n"
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
V1_UNKNOWN_LONG = b"PROXY UNKNOWN ffff::1 ffff::2 65535 65535\r\n"
V2_TCP4 = build_v2(PROXY, TCP4, inet_block(("10.1.2.3", 40000), ("10.0.0.1", 8080)))
V2_TCP6 = build_v2(PROXY, TCP6, inet_block(("2001:db8::7", 1234), ("::1", 23)))
V2_UNIX = build_v2(PROXY, UNIX, unix_block(b"/run/lb.sock", b"/run/superd/svc.sock"))
V2_LOCAL = build_v2(LOCAL, UNSPEC)
V2_TLVS = build_v2(PROXY, TCP4, inet_block(("1.2.3.4", 5), ("6.7.8.9", 10))
                   + tlv(0x01, b"h2") + tlv(0x02, b"example.com") + tlv(0x04, b"")
                   + tlv(0x20, b"\x01\0\0\0\0" + tlv(0x21, b"TLSv1.3")) + tlv(0xE0, b"x" * 300))
VALID = {"v1-tcp4": V1_TCP4, "v1-tcp6": V1_TCP6, "v1-unknown": V1_UNKNOWN,
         "v1-unknown-long": V1_UNKNOWN_LONG, "v2-tcp4": V2_TCP4, "v2-tcp6": V2_TCP6,
         "v2-unix": V2_UNIX, "v2-local": V2_LOCAL, "v2-tlvs": V2_TLVS}


# -- valid headers -------------------------------------------------------------------

def test_v1_tcp4() -> None:
    assert parse(V1_TCP4 + b"GET / HTTP/1.1\r\n") == ProxyHeader(
        1, "PROXY", "TCP4", ("192.168.0.1", 56324), ("192.168.0.11", 443), len(V1_TCP4))


def test_v1_tcp6_accepts_upper_case_and_returns_canonical_text() -> None:
    assert parse(V1_TCP6) == ProxyHeader(
        1, "PROXY", "TCP6", ("2001:db8::1", 1), ("2001:db8::2", 65535), len(V1_TCP6))


def test_v1_tcp6_ipv4_mapped_source_is_returned_as_given() -> None:
    header = parse(b"PROXY TCP6 ::ffff:192.0.2.1 ::1 0 22\r\n")
    assert header is not None and header.source == ("::ffff:192.0.2.1", 0)


@pytest.mark.parametrize("line", [V1_UNKNOWN, V1_UNKNOWN_LONG, b"PROXY UNKNOWN anything\r\n"])
def test_v1_unknown_is_local_like_without_addresses(line: bytes) -> None:
    assert parse(line + b"payload") == ProxyHeader(1, "LOCAL", "UNKNOWN", None, None, len(line))


def test_v1_longest_line_of_107_bytes_is_accepted() -> None:
    line = b"PROXY UNKNOWN " + b"f" * 91 + b"\r\n"
    assert len(line) == 107
    header = parse(line)
    assert header is not None and header.length == 107


def test_v2_tcp4() -> None:
    assert parse(V2_TCP4 + b"\x16\x03\x01") == ProxyHeader(
        2, "PROXY", "TCP4", ("10.1.2.3", 40000), ("10.0.0.1", 8080), 28)


def test_v2_tcp6() -> None:
    assert parse(V2_TCP6) == ProxyHeader(
        2, "PROXY", "TCP6", ("2001:db8::7", 1234), ("::1", 23), 52)


def test_v2_ipv4_mapped_source_is_returned_as_given() -> None:
    header = parse(build_v2(PROXY, TCP6, inet_block(("::ffff:10.9.8.7", 1), ("::1", 2))))
    assert header is not None and header.source == ("::ffff:10.9.8.7", 1)


def test_v2_unix_paths() -> None:
    assert parse(V2_UNIX) == ProxyHeader(
        2, "PROXY", "UNIX", "/run/lb.sock", "/run/superd/svc.sock", 16 + 216)


def test_v2_unix_abstract_and_unbound() -> None:
    header = parse(build_v2(PROXY, UNIX, unix_block(b"", b"\0superd")))
    assert header is not None and (header.source, header.dest) == ("", "\0superd")


def test_v2_local_without_addresses() -> None:
    assert parse(V2_LOCAL + b"data") == ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, 16)


def test_v2_local_ignores_the_address_block() -> None:
    header = build_v2(LOCAL, TCP4, inet_block(("1.2.3.4", 1), ("5.6.7.8", 2)) + b"\xff")
    assert parse(header) == ProxyHeader(2, "LOCAL", "UNKNOWN", None, None, len(header))


def test_v2_proxy_unspec_has_no_addresses() -> None:
    header = build_v2(PROXY, UNSPEC, b"junk")
    assert parse(header) == ProxyHeader(2, "PROXY", "UNKNOWN", None, None, 20)


def test_v2_tlvs_are_skipped_and_counted_in_length() -> None:
    header = parse(V2_TLVS + b"payload")
    assert header is not None
    assert header.source == ("1.2.3.4", 5) and header.dest == ("6.7.8.9", 10)
    assert header.length == len(V2_TLVS)


def test_v2_datagram_family_is_reported() -> None:
    header = parse(build_v2(PROXY, UDP4, inet_block(("1.2.3.4", 53), ("5.6.7.8", 53))))
    assert header is not None and header.family == "UDP4" and header.source == ("1.2.3.4", 53)


def test_v2_length_at_the_cap_is_accepted() -> None:
    block = inet_block(("1.2.3.4", 1), ("5.6.7.8", 2))
    block += tlv(0x04, b"\0" * (MAX_V2_LENGTH - len(block) - 3))
    header = parse(build_v2(PROXY, TCP4, block))
    assert header is not None and header.length == 16 + MAX_V2_LENGTH


# -- incomplete input ----------------------------------------------------------------

@pytest.mark.parametrize("header", VALID.values(), ids=VALID.keys())
def test_every_prefix_is_incomplete_and_the_whole_parses(header: bytes) -> None:
    for end in range(len(header)):
        assert parse(header[:end]) is None, header[:end]
    parsed = parse(header)
    assert parsed is not None and parsed.length == len(header)


# -- malformed input -----------------------------------------------------------------

MALFORMED = {
    "http": b"GET / HTTP/1.1\r\n",
    "first-byte": b"X",
    "tls": b"\x16\x03\x01\x02\x00",
    "v1-lowercase": b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1-no-space": b"PROXYTCP4",
    "v1-bad-protocol": b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1-udp": b"PROXY UDP4 ",
    "v1-unknownx": b"PROXY UNKNOWNX\r\n",
    "v1-too-long": b"PROXY UNKNOWN " + b"f" * 93,
    "v1-108-bytes": b"PROXY UNKNOWN " + b"f" * 92 + b"\r\n",
    "v1-bare-lf": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
    "v1-bare-cr": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
    "v1-cr-cr-lf": b"PROXY UNKNOWN \r\r\n",
    "v1-nul": b"PROXY TCP4 1.2.3.4\0",
    "v1-tab": b"PROXY TCP4\t1.2.3.4 5.6.7.8 1 2\r\n",
    "v1-non-ascii": "PROXY UNKNOWN é\r\n".encode(),
    "v1-double-space": b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
    "v1-trailing-space": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
    "v1-missing-port": b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    "v1-extra-field": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
    "v1-empty-protocol": b"PROXY \r\n",
    "v1-bad-ipv4": b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
    "v1-short-ipv4": b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
    "v1-leading-zero-ipv4": b"PROXY TCP4 1.2.3.04 5.6.7.8 1 2\r\n",
    "v1-v6-in-tcp4": b"PROXY TCP4 ::1 ::1 1 2\r\n",
    "v1-v4-in-tcp6": b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1-scoped-v6": b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
    "v1-bad-v6": b"PROXY TCP6 2001:db8:::1 ::1 1 2\r\n",
    "v1-hostname": b"PROXY TCP4 localhost 5.6.7.8 1 2\r\n",
    "v1-port-too-big": b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
    "v1-port-leading-zero": b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
    "v1-port-sign": b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",
    "v1-port-negative": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 -2\r\n",
    "v1-port-hex": b"PROXY TCP4 1.2.3.4 5.6.7.8 0x10 2\r\n",
    "v1-port-empty": b"PROXY TCP4 1.2.3.4 5.6.7.8  2\r\n",
    "v1-port-unicode-digit": "PROXY TCP4 1.2.3.4 5.6.7.8 \u0661 2\r\n".encode(),
    "v2-bad-signature": b"\r\n\r\n\x00\r\nQUIX\n",
    "v2-bad-signature-early": b"\r\n\r\n\x01",
    "v2-version-1": build_v2(PROXY, TCP4, inet_block(("1.2.3.4", 1), ("5.6.7.8", 2)), version=1),
    "v2-version-3": build_v2(PROXY, TCP4, inet_block(("1.2.3.4", 1), ("5.6.7.8", 2)), version=3),
    "v2-version-only": SIG + b"\x11",
    "v2-command-2": build_v2(2, TCP4, inet_block(("1.2.3.4", 1), ("5.6.7.8", 2))),
    "v2-command-f": SIG + b"\x2f",
    "v2-family-4": build_v2(PROXY, 0x41, b"\0" * 12),
    "v2-transport-3": build_v2(PROXY, 0x13, b"\0" * 12),
    "v2-inet-unspec-transport": build_v2(PROXY, 0x10, b"\0" * 12),
    "v2-unspec-stream": build_v2(PROXY, 0x01),
    "v2-family-early": SIG + b"\x21\xff",
    "v2-truncated-tcp4": build_v2(PROXY, TCP4, b"\0" * 11),
    "v2-truncated-tcp6": build_v2(PROXY, TCP6, b"\0" * 35),
    "v2-truncated-unix": build_v2(PROXY, UNIX, b"\0" * 215),
    "v2-zero-length-tcp4": build_v2(PROXY, TCP4),
    "v2-tlv-overrun": build_v2(PROXY, TCP4, inet_block(("1.2.3.4", 1), ("5.6.7.8", 2))
                               + b"\x01\x00\x05abcd"),
    "v2-tlv-truncated-type-length": build_v2(PROXY, TCP4, inet_block(("1.2.3.4", 1),
                                                                     ("5.6.7.8", 2)) + b"\x01\x00"),
    "v2-tlv-overrun-after-good": build_v2(PROXY, TCP4, inet_block(("1.2.3.4", 1), ("5.6.7.8", 2))
                                          + tlv(1, b"ok") + b"\x02\xff\xff"),
    "v2-over-long-length": build_v2(PROXY, TCP4, length=MAX_V2_LENGTH + 1),
    "v2-max-length": build_v2(PROXY, TCP4, length=0xFFFF),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_input_raises(data: bytes) -> None:
    with pytest.raises(ProxyError):
        parse(data)


@pytest.mark.parametrize("data", [b"G", b"\r\n\r\n\x00\r\nQ\x00", b"PROXY TCP7",
                                  b"PROXY TCP4 1\n", SIG + b"\x11", SIG + b"\x21\x44",
                                  build_v2(PROXY, TCP4, length=5000)[:16]])
def test_hopeless_prefixes_are_refused_without_waiting(data: bytes) -> None:
    with pytest.raises(ProxyError):
        parse(data)


def test_a_truncated_tlv_is_only_incomplete_until_the_announced_length_arrives() -> None:
    header = build_v2(PROXY, TCP4, inet_block(("1.2.3.4", 1), ("5.6.7.8", 2)) + tlv(1, b"abc"))
    assert parse(header[:-1]) is None


# -- accepted versions ---------------------------------------------------------------

@pytest.mark.parametrize("header", [V1_TCP4, V1_UNKNOWN])
def test_accept_v2_refuses_v1(header: bytes) -> None:
    assert parse(header, accept="v1") is not None
    for data in (header, header[:1]):
        with pytest.raises(ProxyError, match="only v2"):
            parse(data, accept="v2")


@pytest.mark.parametrize("header", [V2_TCP4, V2_LOCAL])
def test_accept_v1_refuses_v2(header: bytes) -> None:
    assert parse(header, accept="v2") is not None
    for data in (header, header[:1]):
        with pytest.raises(ProxyError, match="only v1"):
            parse(data, accept="v1")


def test_unknown_accept_value_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        parse(V1_TCP4, accept="v3")


# -- read_header on real sockets -----------------------------------------------------

@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client, server) connected over 127.0.0.1; the server end is non-blocking."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=5)
        server, _ = listener.accept()
    server.setblocking(False)
    with client, server:
        yield client, server


@pytest.fixture
def unix_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    client, server = socket.socketpair()
    server.setblocking(False)
    with client, server:
        yield client, server


def wait_for_bytes(sock: socket.socket, count: int, timeout: float = 5.0) -> None:
    """Wait until *count* bytes are queued on *sock* (peeked, not consumed)."""
    deadline = time.monotonic() + timeout
    while True:
        select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        try:
            if len(sock.recv(count, socket.MSG_PEEK | socket.MSG_DONTWAIT)) >= count:
                return
        except BlockingIOError:
            pass
        assert time.monotonic() < deadline, f"{count} bytes never arrived"
        time.sleep(0.001)


def wait_for_eof(sock: socket.socket, timeout: float = 5.0) -> None:
    poller = select.poll()
    poller.register(sock, select.POLLRDHUP)
    assert poller.poll(int(timeout * 1000)), "the peer's FIN never arrived"


def drain(sock: socket.socket, count: int) -> bytes:
    wait_for_bytes(sock, count)
    return sock.recv(count + 100)


PAYLOAD = b"SSH-2.0-client\r\n\x00\xff and more"


@pytest.mark.parametrize("header", [V1_TCP4, V1_TCP6, V1_UNKNOWN, V2_TCP4, V2_TLVS, V2_LOCAL])
def test_read_header_leaves_the_payload_sent_in_the_same_packet(
        tcp_pair: tuple[socket.socket, socket.socket], header: bytes) -> None:
    client, server = tcp_pair
    client.send(header + PAYLOAD)
    wait_for_bytes(server, len(header) + len(PAYLOAD))
    parsed = read_header(server)
    assert parsed == parse(header) and parsed is not None and parsed.length == len(header)
    assert drain(server, len(PAYLOAD)) == PAYLOAD


def test_read_header_on_a_unix_socketpair(unix_pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = unix_pair
    client.send(V2_TCP6 + PAYLOAD)
    header = read_header(server, accept="v2")
    assert header is not None and header.source == ("2001:db8::7", 1234)
    assert drain(server, len(PAYLOAD)) == PAYLOAD


def test_read_header_with_nothing_sent_yet_is_none(
        tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    assert read_header(tcp_pair[1]) is None


@pytest.mark.parametrize("header,split", [(V1_TCP4, 6), (V1_TCP4, 40), (V2_TLVS, 10),
                                          (V2_TLVS, 16), (V2_TLVS, 100)])
def test_read_header_waits_for_the_rest_of_a_split_header(
        tcp_pair: tuple[socket.socket, socket.socket], header: bytes, split: int) -> None:
    client, server = tcp_pair
    client.send(header[:split])
    wait_for_bytes(server, split)
    assert read_header(server) is None
    assert read_header(server) is None  # nothing was consumed
    client.send(header[split:] + PAYLOAD)
    wait_for_bytes(server, len(header) + len(PAYLOAD))
    assert read_header(server) == parse(header)
    assert drain(server, len(PAYLOAD)) == PAYLOAD


def test_read_header_raises_on_eof_mid_header(
        tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = tcp_pair
    client.send(V2_TCP4[:20])
    client.shutdown(socket.SHUT_WR)
    wait_for_bytes(server, 20)
    wait_for_eof(server)
    with pytest.raises(ProxyError, match="connection closed before the PROXY header"):
        read_header(server)


def test_read_header_raises_on_eof_before_any_byte(
        tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = tcp_pair
    client.shutdown(socket.SHUT_WR)
    wait_for_eof(server)
    with pytest.raises(ProxyError, match="connection closed before the PROXY header"):
        read_header(server)


def test_read_header_accepts_a_complete_header_followed_by_eof(
        tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = tcp_pair
    client.send(V1_TCP6)
    client.shutdown(socket.SHUT_WR)
    wait_for_bytes(server, len(V1_TCP6))
    wait_for_eof(server)
    assert read_header(server) == parse(V1_TCP6)
    assert server.recv(10) == b""


def test_read_header_raises_on_malformed_input_at_once(
        tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = tcp_pair
    client.send(b"GET / HTTP/1.0\r\n\r\n")
    wait_for_bytes(server, 1)
    with pytest.raises(ProxyError):
        read_header(server)


def test_read_header_refuses_the_version_not_accepted(
        unix_pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = unix_pair
    client.send(V1_TCP4)
    with pytest.raises(ProxyError, match="only v2"):
        read_header(server, accept="v2")
