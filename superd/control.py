"""The control socket: one JSON request and one JSON reply per connection.

Requests are ``{"command": "status" | "reload" | "stop"}``.  The socket is
made by :mod:`superd.paths` (mode 0600 from birth; a stale socket is
replaced, anything else at the path refused) and the peer's credentials
(``SO_PEERCRED``) are checked: only root and superd's own user are served.
Served inside the event loop: each connection is a small non-blocking state
machine with a deadline (see :mod:`superd.exchange`: at most 8 at once, 2 s
to deliver the request, back-off when out of descriptors).  The client side
checks the path the same way before it connects, so it never talks to a
socket someone else planted.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import struct
from collections.abc import Callable
from typing import Any

from superd import paths
from superd.exchange import Endpoint, Exchange
from superd.timers import Timers

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
Handler = Callable[[dict[str, Any]], dict[str, Any]]


def parse_request(data: bytes) -> dict[str, Any]:
    """The request object in *data* (its first line; an empty line is ``{}``).

    Pure, for fuzzing: raises :class:`ValueError` for anything that is not a
    JSON object (bad UTF-8, bad JSON, nesting too deep, another JSON type).
    """
    line = data.split(b"\n", 1)[0]
    if not line:
        return {}
    try:
        request = json.loads(line)
    except RecursionError:
        raise ValueError("nested too deep") from None
    if not isinstance(request, dict):
        raise ValueError("not an object")
    return request


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class ControlServer(Endpoint):
    def __init__(self, path: str, selector: selectors.BaseSelector, timers: Timers,
                 handler: Handler) -> None:
        self.path = path
        self.handler = handler
        sock, self.ident = _bind(path)
        super().__init__("control socket", sock, selector, timers)

    def close(self) -> None:
        super().close()
        paths.remove_socket(self.path, self.ident)

    def exchange(self, conn: socket.socket) -> Exchange:
        return _Session(self, conn, peer_uid(conn))


class _Session(Exchange):
    def __init__(self, server: ControlServer, conn: socket.socket, uid: int) -> None:
        self.server = server
        self.uid = uid
        super().__init__(conn, server)

    def complete(self, data: bytes) -> bool:
        return not data or b"\n" in data or len(self.inbuf) >= MAX_REQUEST

    def answer(self) -> bytes:
        if self.uid not in (0, os.geteuid()):
            # the request is read first, so that closing sends no reset
            log.warning("control socket: refused uid %d (only root and uid %d are served)",
                        self.uid, os.geteuid())
            reply: dict[str, Any] = {"ok": False, "error": "permission denied"}
        else:
            try:
                reply = self.server.handler(parse_request(self.inbuf))
            except ValueError as e:
                reply = {"ok": False, "error": f"bad request: {e}"}
        return json.dumps(reply).encode() + b"\n"


def _bind(path: str) -> tuple[socket.socket, paths.Ident]:
    """The listening control socket, mode 0600 from birth (see superd.paths)."""
    sock, ident = paths.bind_unix(path, socket.SOCK_STREAM, 0o600)
    try:
        sock.listen(16)
    except OSError:
        sock.close()
        paths.remove_socket(path, ident)
        raise
    return sock, ident


class NotRunning(Exception):
    """No daemon answers on the control socket."""


def request(path: str, command: str, timeout: float = 30.0) -> dict[str, Any]:
    """Send one command to the daemon at *path*; its JSON reply.  Raise
    :class:`~superd.paths.UnsafePath` if the path is not one to trust."""
    try:
        sock = paths.connect_unix(path, timeout)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise NotRunning(f"superd is not running (nothing answers on {path}: "
                         f"{e.strerror})") from None
    with sock:
        sock.sendall(json.dumps({"command": command}).encode() + b"\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return json.loads(data)  # type: ignore[no-any-return]
