"""One request, one reply, then close: the shape of a control-socket request
and of a metrics scrape, served in the event loop with a deadline."""

from __future__ import annotations

import selectors
import socket

from superd.timers import Timer, Timers

_R, _W = selectors.EVENT_READ, selectors.EVENT_WRITE


class Exchange:
    """Subclasses say when the request is complete and what to answer."""

    def __init__(self, conn: socket.socket, selector: selectors.BaseSelector,
                 timers: Timers, deadline: float) -> None:
        self.conn = conn
        self.selector = selector
        self.inbuf = b""
        self.outbuf = b""
        conn.setblocking(False)
        self.timer: Timer = timers.call_later(deadline, self.close)
        selector.register(conn, _R, self)

    def complete(self, data: bytes) -> bool:
        """Whether the request is all here (*data*: the bytes just read)."""
        raise NotImplementedError

    def answer(self) -> bytes:
        raise NotImplementedError

    def closed(self) -> None:
        """Called once the connection is closed."""

    def __call__(self, events: int) -> None:
        if self.outbuf:
            self._write()
            return
        try:
            data = self.conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        self.inbuf += data
        if self.complete(data):
            self.outbuf = self.answer()
            self.selector.modify(self.conn, _W, self)

    def _write(self) -> None:
        try:
            sent = self.conn.send(self.outbuf)
        except BlockingIOError:
            return
        except OSError:
            sent = len(self.outbuf)
        self.outbuf = self.outbuf[sent:]
        if not self.outbuf:
            self.close()

    def close(self) -> None:
        if self.conn.fileno() < 0:
            return
        self.timer.cancel()
        self.selector.unregister(self.conn)
        self.conn.close()
        self.closed()
