"""Close a refused connection gracefully, so the client reads our message.

A client that spoke first (HTTP, SMTP) has unread bytes in our receive
queue; closing at once makes Linux answer with a reset, and the client's
kernel drops the ``reject_message`` it had not read yet.  So superd shuts
down its sending side, reads and discards what the client sends until EOF
or a short deadline, then closes.  At most ``MAX_LINGER`` connections
linger at once; past that they are closed at once.
"""

from __future__ import annotations

import contextlib
import selectors
import socket

from superd.timers import Timers

MAX_LINGER = 256
LINGER_SECONDS = 1.0


class Linger:
    def __init__(self, selector: selectors.BaseSelector, timers: Timers) -> None:
        self.selector = selector
        self.timers = timers
        self.open: set[socket.socket] = set()

    def close(self, conn: socket.socket, message: bytes) -> None:
        """Send *message* (best effort), then close without a reset."""
        conn.setblocking(False)
        with contextlib.suppress(OSError):
            conn.send(message)
        if len(self.open) >= MAX_LINGER:
            conn.close()
            return
        try:
            conn.shutdown(socket.SHUT_WR)
            self.selector.register(conn, selectors.EVENT_READ, lambda ev: self._drain(conn))
        except (OSError, ValueError):
            conn.close()
            return
        self.open.add(conn)
        self.timers.call_later(LINGER_SECONDS, lambda: self._finish(conn))

    def _drain(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._finish(conn)

    def _finish(self, conn: socket.socket) -> None:
        if conn in self.open:
            self.open.discard(conn)
            self.selector.unregister(conn)
            conn.close()

    def close_all(self) -> None:
        for conn in list(self.open):
            self._finish(conn)
