"""The classic internal services, served inside the daemon's loop.

echo (RFC 862), discard (RFC 863), daytime (RFC 867), chargen (RFC 864)
and time (RFC 868), over TCP and UDP.  TCP connections are non-blocking
state machines driven by the selector: a slow reader of chargen or echo
only slows itself.  Over UDP, datagrams from port 0 and from the ports of
internal services are dropped, so two superservers cannot be made to
bounce packets at each other forever; so is every datagram from a
non-INET peer (a UNIX path names where the reply goes, chosen by the sender).
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

RFC868_EPOCH = 2208988800  # seconds from 1900-01-01 to 1970-01-01
LOOP_PORTS = frozenset({0, 7, 9, 13, 19, 37})
MAX_BUFFER = 64 * 1024
UDP_BATCH = 64
_EV_R, _EV_W = selectors.EVENT_READ, selectors.EVENT_WRITE


def _chargen_cycle() -> bytes:
    chars = bytes(range(32, 127))
    lines = [(chars * 2)[i:i + 72] + b"\r\n" for i in range(len(chars))]
    return b"".join(lines)


CHARGEN = _chargen_cycle()
_CHARGEN2 = CHARGEN * 2


def daytime() -> bytes:
    return time.strftime("%a %b %d %H:%M:%S %Y %Z\r\n").encode()


def rfc868() -> bytes:
    return struct.pack("!I", (int(time.time()) + RFC868_EPOCH) & 0xFFFFFFFF)


class TcpSession:
    """One client of an internal TCP service."""

    def __init__(self, name: str, sock: socket.socket, selector: selectors.BaseSelector,
                 on_close: Callable[[TcpSession], None]) -> None:
        self.name = name
        self.sock = sock
        self.selector = selector
        self.on_close = on_close
        self.out = bytearray()
        self.offset = 0  # chargen position in the cycle
        self.closing = False  # close once `out` is written
        self.events = 0
        self.started = time.monotonic()
        # set by the loop: what status and per_source accounting need
        self.service: Any = None
        self.source: tuple[str, str] | None = None
        self.peer = ""

    def start(self) -> None:
        self.sock.setblocking(False)
        if self.name == "daytime":
            self.out += daytime()
            self.closing = True
        elif self.name == "time":
            self.out += rfc868()
            self.closing = True
        self._flush()
        if self.sock.fileno() >= 0:
            self._watch()

    def __call__(self, events: int) -> None:
        if events & _EV_R:
            self._read()
        if self.sock.fileno() >= 0 and events & _EV_W:
            self._flush()
        if self.sock.fileno() >= 0:
            self._watch()

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return
        if self.events:
            self.selector.unregister(self.sock)
        self.sock.close()
        self.on_close(self)

    def _watch(self) -> None:
        wanted = 0
        if self.name == "chargen" or self.out:
            wanted |= _EV_W
        if len(self.out) < MAX_BUFFER and not self.closing:
            wanted |= _EV_R
        if wanted == self.events:
            return
        if self.events == 0:
            self.selector.register(self.sock, wanted, self)
        elif wanted == 0:
            self.selector.unregister(self.sock)
        else:
            self.selector.modify(self.sock, wanted, self)
        self.events = wanted

    def _read(self) -> None:
        try:
            data = self.sock.recv(MAX_BUFFER)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not data:
            if self.out and self.name == "echo":
                self.closing = True  # write back what we have, then close
            else:
                self.close()
            return
        if self.name == "echo":
            self.out += data
            self._flush()

    def _flush(self) -> None:
        if self.name == "chargen" and len(self.out) < len(CHARGEN):
            start = self.offset % len(CHARGEN)
            self.out += _CHARGEN2[start:start + len(CHARGEN)]
            self.offset += len(CHARGEN)
        try:
            sent = self.sock.send(self.out) if self.out else 0
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        del self.out[:sent]
        if self.closing and not self.out:
            self.close()


def udp_reply(name: str, data: bytes, counter: int) -> bytes | None:
    if name == "echo":
        return data
    if name == "daytime":
        return daytime()
    if name == "time":
        return rfc868()
    if name == "chargen":
        start = (counter * 74) % len(CHARGEN)
        return _CHARGEN2[start:start + 512]
    return None  # discard


class UdpService:
    """The handler of an internal service's datagram socket."""

    def __init__(self, name: str, sock: socket.socket, loop_ports: frozenset[int],
                 allowed: Callable[[object], bool] = lambda peer: True) -> None:
        self.name = name
        self.sock = sock
        self.loop_ports = loop_ports
        self.allowed = allowed
        self.counter = 0
        self.dropped = 0

    def __call__(self, events: int) -> None:
        for _ in range(UDP_BATCH):
            try:
                data, peer = self.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno != errno.ECONNREFUSED:
                    log.warning("%s/udp: recvfrom failed: %s", self.name, e.strerror)
                return
            self._answer(data, peer)

    def _answer(self, data: bytes, peer: object) -> None:
        if not self._may_answer(peer):
            self.dropped += 1
            return
        reply = udp_reply(self.name, data, self.counter)
        self.counter += 1
        if reply is None or not peer:
            return
        try:
            self.sock.sendto(reply, peer)
        except OSError:
            pass  # the client's problem; never the daemon's

    def _may_answer(self, peer: object) -> bool:
        """Only IPv4 and IPv6 peers, from no loop port, and allowed.

        A UNIX datagram peer is a path its sender chose and can swap for a
        symlink to any socket superd may write to (OpenBSD inetd's
        dg_badinput drops every non-INET peer too).
        """
        if self.sock.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        if not isinstance(peer, tuple) or peer[1] in self.loop_ports:
            return False
        return self.allowed(peer)
