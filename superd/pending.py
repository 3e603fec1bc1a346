"""Connections waiting for their PROXY header, read without blocking the loop.

Each pending connection is registered for reading with a deadline
(``proxy_timeout``).  When :func:`superd.proxy.read_header` has consumed
exactly the header, the connection goes on with the address the header
carries; a malformed header, a timeout or a LOCAL command (a balancer's
health check) closes it without starting a program.

At most ``MAX_PENDING`` connections may wait at once, all services
together: past that, new connections on PROXY services are refused at
once, so a slowloris of idle connections costs a bounded number of
descriptors and never delays clients of other services.
"""

from __future__ import annotations

import selectors
import socket
from collections.abc import Callable

from superd.proxy import ProxyError, ProxyHeader, read_header
from superd.timers import Timer, Timers

MAX_PENDING = 512

Done = Callable[["Pending", ProxyHeader], None]
Failed = Callable[["Pending", str], None]


class Pending:
    def __init__(self, conn: socket.socket, peer: object, accept: str, timeout: float,
                 selector: selectors.BaseSelector, timers: Timers,
                 on_done: Done, on_fail: Failed) -> None:
        self.conn = conn
        self.peer = peer  # the balancer's address
        self.accept = accept
        self.selector = selector
        self.on_done = on_done
        self.on_fail = on_fail
        self.context: object = None  # the loop's (listener, ...) for on_done
        self.timers = timers
        self.delay = 0.01
        self.watching = True
        self.retry: Timer | None = None
        self.expired = False  # refused for proxy_timeout, not for what it sent
        conn.setblocking(False)
        self.timer: Timer = timers.call_later(timeout, self._timed_out)
        selector.register(conn, selectors.EVENT_READ, self)

    def __call__(self, events: int) -> None:
        try:
            header = read_header(self.conn, self.accept)
        except ProxyError as e:
            self._finish()
            self.on_fail(self, str(e))
            return
        except OSError as e:
            self._finish()
            self.on_fail(self, f"connection error: {e.strerror}")
            return
        if header is not None:
            self._finish()
            self.conn.setblocking(True)
            self.on_done(self, header)
        else:
            # Part of a header stays queued and keeps the socket readable: look
            # again after a growing pause instead of spinning on readiness.
            self.selector.unregister(self.conn)
            self.watching = False
            self.retry = self.timers.call_later(self.delay, self._rewatch)
            self.delay = min(self.delay * 2, 0.5)

    def _rewatch(self) -> None:
        self.retry = None
        self.selector.register(self.conn, selectors.EVENT_READ, self)
        self.watching = True

    def failed(self) -> None:
        """This handler raised (a bug): refuse the connection, as for a bad header."""
        self._finish()
        self.on_fail(self, "internal error while reading the PROXY header")

    def cancel(self) -> None:
        """Close without a verdict (superd is stopping)."""
        self._finish()
        self.conn.close()

    def _timed_out(self) -> None:
        self.expired = True
        self._finish()
        self.on_fail(self, "no complete PROXY header within proxy_timeout")

    def _finish(self) -> None:
        self.timer.cancel()
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
        if self.watching:
            self.selector.unregister(self.conn)
            self.watching = False
