"""Property tests for superd.proxy: arbitrary bytes only ever raise ProxyError, and
generated v1/v2 headers round-trip whatever payload follows them."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_proxy_parser import (
    PROXY,
    SIG,
    build_v1,
    build_v2,
    drain,
    inet_block,
    tlv,
    unix_block,
    wait_for_bytes,
)

from superd.proxy import MAX_V2_LENGTH, ProxyError, ProxyHeader, parse, read_header

ACCEPT = st.sampled_from(["v1", "v2", "any"])
PORTS = st.integers(min_value=0, max_value=65535)
PAYLOADS = st.binary(max_size=200)


@dataclass(frozen=True)
class Generated:
    """A header on the wire and the addresses it must parse back to."""

    wire: bytes
    family: str
    source: tuple[str, int] | str
    dest: tuple[str, int] | str


def parse_or_error(data: bytes, accept: str = "any") -> ProxyHeader | None:
    try:
        return parse(data, accept)
    except ProxyError:
        return None


# -- arbitrary input -----------------------------------------------------------------

PREFIXES = st.sampled_from([b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN",
                            SIG, SIG + b"\x20", SIG + b"\x21", SIG + b"\x21\x11",
                            SIG + b"\x21\x21", SIG + b"\x21\x31", SIG + b"\x20\x00"])


@given(st.binary(max_size=600), ACCEPT)
# found by review: a v1 line with no protocol field raised IndexError, which
# spun the loop for proxy_timeout (issue 12, finding 1)
@example(b"PROXY\r\n", "any")
@example(b"PROXY \r\n", "v1")
@example(b"P\r\n", "any")
def test_arbitrary_bytes_never_raise_anything_but_proxy_error(data: bytes, accept: str) -> None:
    result = parse_or_error(data, accept)
    assert result is None or isinstance(result, ProxyHeader)


@given(PREFIXES, st.binary(max_size=400), ACCEPT)
def test_plausible_prefixes_with_garbage_never_crash(prefix: bytes, tail: bytes,
                                                     accept: str) -> None:
    result = parse_or_error(prefix + tail, accept)
    if result is not None:
        assert 0 < result.length <= len(prefix + tail)


@given(PREFIXES, st.text(alphabet="0123456789abcdefABCDEF:. \r\n%+-xUNKOWTCP", max_size=110))
def test_v1_like_text_never_crashes(prefix: bytes, tail: str) -> None:
    result = parse_or_error(prefix + tail.encode())
    if result is not None and result.version == 1:
        assert result.length <= 107


# -- generated valid headers ---------------------------------------------------------

@st.composite
def v1_headers(draw: st.DrawFn) -> Generated:
    version = draw(st.sampled_from([4, 6]))
    addresses = st.ip_addresses(v=4) if version == 4 else st.ip_addresses(v=6)
    source, dest = draw(addresses), draw(addresses)
    exploded = version == 6 and draw(st.booleans())
    texts = [a.exploded if exploded else str(a) for a in (source, dest)]
    if draw(st.booleans()):
        texts = [t.upper() for t in texts]
    sport, dport = draw(PORTS), draw(PORTS)
    protocol = f"TCP{version}"
    wire = build_v1(protocol, (texts[0], sport), (texts[1], dport))
    return Generated(wire, protocol, (str(source), sport), (str(dest), dport))


@st.composite
def tlv_blocks(draw: st.DrawFn, room: int) -> bytes:
    block = b""
    for kind, value in draw(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)),
                                     max_size=6)):
        item = tlv(kind, value)
        if len(block) + len(item) <= room:
            block += item
    return block


@st.composite
def v2_headers(draw: st.DrawFn) -> Generated:
    family = draw(st.sampled_from(["TCP4", "UDP4", "TCP6", "UDP6", "UNIX", "UNIX_DGRAM"]))
    byte = {"TCP4": 0x11, "UDP4": 0x12, "TCP6": 0x21, "UDP6": 0x22, "UNIX": 0x31,
            "UNIX_DGRAM": 0x32}[family]
    source: tuple[str, int] | str
    dest: tuple[str, int] | str
    if family.startswith("UNIX"):
        paths = st.binary(max_size=106).map(lambda p: b"/" + p.replace(b"\0", b"_"))
        raw_source, raw_dest = draw(paths), draw(paths)
        block = unix_block(raw_source, raw_dest)
        source = raw_source.decode(errors="surrogateescape")
        dest = raw_dest.decode(errors="surrogateescape")
    else:
        addresses = st.ip_addresses(v=4 if family.endswith("4") else 6)
        source = (str(draw(addresses)), draw(PORTS))
        dest = (str(draw(addresses)), draw(PORTS))
        block = inet_block(source, dest)
    block += draw(tlv_blocks(MAX_V2_LENGTH - len(block)))
    return Generated(build_v2(PROXY, byte, block), family, source, dest)


def same_address(got: tuple[str, int] | str | None, want: tuple[str, int] | str) -> bool:
    if isinstance(want, str):
        return got == want
    assert isinstance(got, tuple)
    return ipaddress.ip_address(got[0]) == ipaddress.ip_address(want[0]) and got[1] == want[1]


def check_round_trip(generated: Generated, payload: bytes, accept: str) -> None:
    header = parse(generated.wire + payload, accept)
    assert header is not None
    assert header.family == generated.family and header.command == "PROXY"
    assert same_address(header.source, generated.source)
    assert same_address(header.dest, generated.dest)
    assert header.length == len(generated.wire)


@given(v1_headers(), PAYLOADS, st.sampled_from(["v1", "any"]))
def test_v1_round_trip(generated: Generated, payload: bytes, accept: str) -> None:
    check_round_trip(generated, payload, accept)


@given(v2_headers(), PAYLOADS, st.sampled_from(["v2", "any"]))
def test_v2_round_trip(generated: Generated, payload: bytes, accept: str) -> None:
    check_round_trip(generated, payload, accept)


@given(st.one_of(v1_headers(), v2_headers()), st.data())
def test_any_strict_prefix_of_a_valid_header_is_incomplete(generated: Generated,
                                                           data: st.DataObject) -> None:
    end = data.draw(st.integers(min_value=0, max_value=len(generated.wire) - 1))
    assert parse(generated.wire[:end]) is None


@given(st.one_of(v1_headers(), v2_headers()), st.data())
def test_a_corrupted_valid_header_never_crashes(generated: Generated,
                                                data: st.DataObject) -> None:
    wire = bytearray(generated.wire)
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    result = parse_or_error(bytes(wire) + b"payload")
    assert result is None or result.length <= len(wire) + len(b"payload")


@settings(max_examples=50)
@given(st.one_of(v1_headers(), v2_headers()), st.binary(min_size=1, max_size=200), st.data())
def test_read_header_over_a_socketpair_consumes_exactly_the_header(
        generated: Generated, payload: bytes, data: st.DataObject) -> None:
    stream = generated.wire + payload
    split = data.draw(st.integers(min_value=1, max_value=len(stream)))
    client, server = socket.socketpair()
    with client, server:
        server.setblocking(False)
        client.sendall(stream[:split])
        wait_for_bytes(server, split)
        first = read_header(server)
        assert (first is None) == (split < len(generated.wire))
        client.sendall(stream[split:])
        if first is None:
            wait_for_bytes(server, len(stream))
        header = first or read_header(server)
        assert header is not None and header.length == len(generated.wire)
        assert drain(server, len(payload)) == payload
