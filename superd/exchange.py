"""One request, one reply, then close: the shape of a control-socket request
and of a metrics scrape, served in the event loop with deadlines.

:class:`Endpoint` is the listening side.  It serves at most ``cap``
exchanges at once: at the cap it stops watching its socket, and the kernel's
accept queue holds the rest until one ends.  When ``accept()`` fails for
want of descriptors or memory it stops watching its socket too, tries again
from a timer, and logs once per episode (and at most once a minute), as
service listeners do.  Neither case can spin the loop or flood the log.
"""

from __future__ import annotations

import logging
import selectors
import socket

from superd.guard import BACKOFF_SECONDS, RESOURCE_ERRNOS, Handler
from superd.timers import Timer, Timers

log = logging.getLogger(__name__)

_R, _W = selectors.EVENT_READ, selectors.EVENT_WRITE
ACCEPT_BATCH = 16
MAX_EXCHANGES = 8  # served at once, per endpoint
READ_DEADLINE = 2.0  # to deliver the whole request
WRITE_DEADLINE = 10.0  # to take the whole reply
QUIET = 60.0  # seconds between two warnings of the same kind


class Exchange:
    """Subclasses say when the request is complete and what to answer."""

    def __init__(self, conn: socket.socket, endpoint: Endpoint) -> None:
        self.conn = conn
        self.endpoint = endpoint
        self.selector = endpoint.selector
        self.inbuf = b""
        self.outbuf = b""
        conn.setblocking(False)
        self.selector.register(conn, _R, self)
        self.timer: Timer = endpoint.timers.call_later(endpoint.read_deadline, self.close)

    def complete(self, data: bytes) -> bool:
        """Whether the request is all here (*data*: the bytes just read)."""
        raise NotImplementedError

    def answer(self) -> bytes:
        raise NotImplementedError

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
            self.timer.cancel()
            self.outbuf = self.answer()
            if self.conn.fileno() < 0:  # the answer closed the endpoint (a reload moved it)
                return
            self.timer = self.endpoint.timers.call_later(WRITE_DEADLINE, self.close)
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
        self.endpoint.ended(self)


class Endpoint:
    """A listening socket whose connections are :class:`Exchange` objects."""

    def __init__(self, name: str, sock: socket.socket, selector: selectors.BaseSelector,
                 timers: Timers, cap: int = MAX_EXCHANGES,
                 read_deadline: float = READ_DEADLINE) -> None:
        self.name = name  # for the log: "control socket", "metrics"
        self.sock = sock
        self.selector = selector
        self.timers = timers
        self.cap = cap
        self.read_deadline = read_deadline
        self.sessions: set[Exchange] = set()  # open requests: the loop waits for them
        self.watched = False
        self.retry: Timer | None = None  # set while accept() is backing off
        self.failing = False  # in an episode of accept() failures
        self.told = False  # ... and its start was logged
        self.last_warned: dict[str, float] = {}
        sock.setblocking(False)
        self._watch(True)

    def exchange(self, conn: socket.socket) -> Exchange:
        """The exchange that serves *conn* (may raise OSError)."""
        raise NotImplementedError

    def close(self) -> None:
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
        self._watch(False)
        self.sock.close()
        for session in list(self.sessions):
            session.close()

    def ended(self, session: Exchange) -> None:
        self.sessions.discard(session)
        if self.retry is None and self.sock.fileno() >= 0:
            self._watch(True)

    def _watch(self, on: bool) -> None:
        if on and not self.watched:
            self.selector.register(self.sock, _R, Handler(self._on_accept, self._pause))
        elif not on and self.watched:
            self.selector.unregister(self.sock)
        self.watched = on

    def _on_accept(self, events: int) -> None:
        for _ in range(ACCEPT_BATCH):
            if len(self.sessions) >= self.cap:
                self._watch(False)  # ended() watches again; the kernel queues the rest
                self._warn("cap", "%s: %d requests in progress; more wait in the queue until one "
                           "ends", self.name, self.cap)
                return
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                self._accept_failed(e)
                return
            self._recovered()
            try:
                self.sessions.add(self.exchange(conn))
            except OSError as e:  # the peer left already, or no room to watch it
                conn.close()
                log.debug("%s: dropped a connection: %s", self.name, e)

    def _pause(self) -> None:
        """Stop watching; watch again in a moment (also what superd.guard
        calls if accepting raised)."""
        self._watch(False)
        if self.retry is None:
            self.retry = self.timers.call_later(BACKOFF_SECONDS, self._rearm)

    def _accept_failed(self, e: OSError) -> None:
        self._pause()
        if self.failing:
            return
        self.failing = True
        level = logging.WARNING if e.errno in RESOURCE_ERRNOS else logging.ERROR
        self.told = self._warn("accept", "%s: accept failed: %s; pausing it for %.1fs at a time "
                   "until it works again", self.name, e.strerror, BACKOFF_SECONDS, level=level)

    def _rearm(self) -> None:
        self.retry = None
        if self.sock.fileno() >= 0:
            self._watch(True)

    def _recovered(self) -> None:
        if self.failing:
            self.failing = False
            if self.told:
                log.info("%s: accepting again", self.name)

    def _warn(self, kind: str, msg: str, *args: object, level: int = logging.WARNING) -> bool:
        """Log, unless a warning of this *kind* was logged in the last minute."""
        now = self.timers.clock()
        last = self.last_warned.get(kind)
        if last is not None and now - last < QUIET:
            return False
        self.last_warned[kind] = now
        log.log(level, msg, *args)
        return True
