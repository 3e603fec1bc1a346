"""The control socket: one JSON request and one JSON reply per connection.

Requests are ``{"command": "status" | "reload" | "stop"}`` (protocol 2 adds
``protocol`` and ``config``: see below).  The socket is
made by :mod:`superd.paths` (mode 0600 from birth; a stale socket is
replaced, anything else at the path refused) and the peer's credentials
(``SO_PEERCRED``) are checked: only root and superd's own user are served.
Served inside the event loop: each connection is a small non-blocking state
machine with a deadline (see :mod:`superd.exchange`: at most 8 at once, 2 s
to deliver the request, back-off when out of descriptors).  The client side
checks the path the same way before it connects, so it never talks to a
socket someone else planted.

Protocol 2 says which daemon answered.  A client of protocol 2 says so in
each request (``"protocol": 2``), and the reply then carries ``protocol``,
the daemon's ``pid`` and ``config`` (the absolute path of the file it
runs); a ``stop`` reply also says how many programs get how long.  A
``reload`` or ``stop`` request may carry ``config``, the path of the file
the client means: the daemon refuses the request (``ok`` false,
``wrong_config`` true) unless its own file has the same real path, so no
other daemon that owns the socket meanwhile acts on it.

Across versions nothing fails silently.  A daemon of protocol 1 ignores
``protocol`` and ``config``, but its ``status`` report has always named its
pid and file: the client asks for ``status`` first and compares there
(:func:`check_file`), so an old daemon running another file is left alone
by the client's hand.  A client of protocol 1 sends neither key and gets
exactly the replies it always got.
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
PROTOCOL = 2
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


def protocol_of(request: dict[str, Any]) -> int:
    """The protocol the client of *request* speaks (1 if it does not say).
    Raises :class:`ValueError` for one that is not a number."""
    version = request.get("protocol", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError("protocol must be a whole number, 1 or more")
    return version


def wrong_file(request: dict[str, Any], pid: int, own: str) -> dict[str, Any] | None:
    """The refusal of a request meant for another file than *own* (the file
    the daemon *pid* runs), or None.  Raises :class:`ValueError` for a
    ``config`` that is not a path."""
    wanted = request.get("config")
    if wanted is None:
        return None  # a client of protocol 1, or --any-config
    if not isinstance(wanted, str) or not wanted or "\0" in wanted:
        raise ValueError("config must be the path of a file")
    if same_file(own, wanted):
        return None
    return {"ok": False, "wrong_config": True,
            "error": f"superd {pid} runs {own}, not {wanted}"}


def same_file(a: str, b: str) -> bool:
    """Whether paths *a* and *b* name the same file (their real paths)."""
    return os.path.realpath(a) == os.path.realpath(b)


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


class OtherFile(Exception):
    """The daemon behind the control socket runs another file than the one meant."""

    def __init__(self, socket_path: str, pid: object, theirs: object, mine: str) -> None:
        super().__init__(f"the superd answering on {socket_path} (pid {pid}) runs "
                         f"{theirs}, not {mine}")
        self.pid = pid
        self.theirs = theirs


def request(path: str, command: str, timeout: float = 30.0,
            config: str | None = None) -> dict[str, Any]:
    """Send one command to the daemon at *path*; its JSON reply.  With
    *config*, a protocol 2 daemon acts only if it runs that file.  Raise
    :class:`~superd.paths.UnsafePath` if the path is not one to trust."""
    try:
        sock = paths.connect_unix(path, timeout)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise NotRunning(f"superd is not running (nothing answers on {path}: "
                         f"{e.strerror})") from None
    message: dict[str, Any] = {"command": command, "protocol": PROTOCOL}
    if config is not None:
        message["config"] = config
    with sock:
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    reply = json.loads(data)
    if not isinstance(reply, dict):
        raise ValueError("the reply is not a JSON object")
    return reply


def check_file(path: str, status: dict[str, Any], mine: str) -> None:
    """Raise :class:`OtherFile` unless the daemon whose *status* report came
    from the control socket at *path* runs the file *mine* (by real path).
    Every superd's status report names its file, protocol 1 too."""
    theirs = status.get("config")
    if not isinstance(theirs, str) or not same_file(theirs, mine):
        raise OtherFile(path, status.get("pid"), theirs or "a file it does not name", mine)


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait up to *timeout* seconds for process *pid* to end; whether it did.

    Through a pidfd, so the wait ends the moment the process does; a process
    that has already ended counts as ended."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            return bool(sel.select(timeout))
    finally:
        os.close(fd)
