"""The checks both PROXY targets make of one input (superd.proxy, v1 and v2).

For each accept mode the target names:

- ``parse`` raises nothing but ProxyError;
- a header it returns is no longer than the input, parses the same on its own,
  and its proper prefixes are "need more" (None), never an error: a header
  split across TCP segments must wait, not fail;
- None ("need more") only while fewer bytes than the largest header are in,
  so no peer can hold a connection with a header that never ends;
- ``read_header`` over a socket whose peer sent the input and closed agrees
  with ``parse`` and consumes exactly the header's bytes, leaving the rest.
"""

from __future__ import annotations

import socket

from superd.proxy import (
    _PEEK_SIZE,
    V1_MAX_LENGTH,
    V1_PREFIX,
    ProxyError,
    ProxyHeader,
    parse,
    read_header,
)

Outcome = ProxyHeader | None | ProxyError


def check(data: bytes, accept: str) -> None:
    """Every property above for *data* in mode *accept*; AssertionError if one fails."""
    result = _parse(data, accept)
    if isinstance(result, ProxyHeader):
        assert 0 < result.length <= len(data), result
        assert _parse(data[: result.length], accept) == result
        for size in _prefix_sizes(result.length):
            assert _parse(data[:size], accept) is None, (size, _parse(data[:size], accept))
    elif result is None:
        cap = V1_MAX_LENGTH if data[:1] == V1_PREFIX[:1] else _PEEK_SIZE
        assert len(data) < cap, f"still waiting after {len(data)} bytes"
    header, rest = _over_socket(data, accept)
    if isinstance(result, ProxyHeader):
        assert header == result, (header, result)
        assert rest == data[result.length :]
    else:
        assert isinstance(header, ProxyError), header


def _parse(data: bytes, accept: str) -> Outcome:
    try:
        return parse(data, accept)
    except ProxyError as e:
        return e


def _prefix_sizes(length: int) -> list[int]:
    """Every prefix of a v1 line; for v2 the fixed part, block edges and the end."""
    if length <= V1_MAX_LENGTH:
        return list(range(length))
    edges = {length - 1, length - 2, length - 3, length // 2, 16 + 12, 16 + 36, 16 + 216}
    return sorted(set(range(17)) | {n for n in edges if 0 <= n < length})


def _over_socket(data: bytes, accept: str) -> tuple[Outcome, bytes]:
    """What read_header makes of *data* sent by a peer that then closed, and the rest."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(data)
        theirs.shutdown(socket.SHUT_WR)
        try:
            header: Outcome = read_header(ours, accept)
        except ProxyError as e:
            return e, b""
        rest = bytearray()
        while chunk := ours.recv(65536):
            rest += chunk
        return header, bytes(rest)
