"""The classic internal services, served inside the daemon's loop.

echo (RFC 862), discard (RFC 863), daytime (RFC 867), chargen (RFC 864)
and time (RFC 868), over TCP and UDP.  TCP connections are non-blocking
state machines driven by the selector: a slow reader of chargen or echo
only slows itself.  A session ends after ``idle_timeout`` seconds without
a byte either way, and after ``timeout`` seconds in all (one timer in the
loop's heap per session), so idle clients cannot hold the limits forever.

Over UDP a reply goes only where one is safe (OpenBSD inetd's dg_badinput):
never to a non-INET peer (a UNIX path names where the reply goes, chosen
by the sender), to a source port below 1024 or of an internal service, or
to an unspecified, multicast or broadcast address; and at most
``reply_rate`` replies a second go to one source.  So a spoofed datagram
cannot start an endless loop between two superservers, nor make superd an
amplifier aimed at someone else.  Every dropped datagram is counted as a
refusal and logged through the daemon's throttle, never a line per datagram.
"""

from __future__ import annotations

import errno
import logging
import selectors
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from superd import log as logmod
from superd.config import Service
from superd.limits import (
    IPAddress,
    SourceBuckets,
    TokenBucket,
    access,
    client_ip,
    no_reply_to,
    plain_host,
    source_group,
)
from superd.timers import Timer, Timers

log = logging.getLogger(__name__)

RFC868_EPOCH = 2208988800  # seconds from 1900-01-01 to 1970-01-01
LOOP_PORTS = frozenset({0, 7, 9, 13, 19, 37})
MAX_BUFFER = 64 * 1024
UDP_BATCH = 64
RESERVED_PORTS = 1024  # a datagram from a port below this gets no reply
# Reading a datagram costs the loop even when it is dropped.  Past this many a
# second (or twice reply_rate, if higher) one internal UDP socket is not read
# for UDP_FLOOD_PAUSE: the kernel drops what its buffer cannot hold, for free.
UDP_FLOOD_FLOOR = 1000
UDP_FLOOD_PAUSE = 1.0
_INET = (socket.AF_INET, socket.AF_INET6)
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
                 on_close: Callable[[TcpSession], None], *, timers: Timers | None = None,
                 timeout: float | None = None, idle_timeout: float | None = None) -> None:
        self.name = name
        self.sock = sock
        self.selector = selector
        self.on_close = on_close
        self.out = bytearray()
        self.offset = 0  # chargen position in the cycle
        self.closing = False  # close once `out` is written
        self.events = 0
        # ends idle_timeout seconds after the last byte in or out, or timeout
        # seconds after the start: one timer, moved on only when it fires
        self.timers = timers
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.clock = time.monotonic if timers is None else timers.clock
        self.started = self.clock()
        self.last_byte = self.started
        self._timer: Timer | None = None
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
            self._arm()

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
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.out.clear()
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
        self.last_byte = self.clock()
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
        if sent:
            self.last_byte = self.clock()
        del self.out[:sent]
        if self.closing and not self.out:
            self.close()

    def _deadline(self) -> float | None:
        """When the session ends unless a byte moves first (None: never)."""
        ends = []
        if self.timeout is not None:
            ends.append(self.started + self.timeout)
        if self.idle_timeout is not None:
            ends.append(self.last_byte + self.idle_timeout)
        return min(ends, default=None)

    def _arm(self) -> None:
        deadline = self._deadline()
        if deadline is not None and self.timers is not None:
            self._timer = self.timers.call_later(max(0.0, deadline - self.clock()),
                                                 self._expire)

    def _expire(self) -> None:
        self._timer = None
        if self.sock.fileno() < 0:
            return
        deadline, now = self._deadline(), self.clock()
        if deadline is None or now < deadline:
            self._arm()  # a byte moved since the timer was set
            return
        if self.timeout is not None and now >= self.started + self.timeout:
            why = f"after {self.timeout:g}s (timeout)"
        else:
            why = f"after {self.idle_timeout:g}s without a byte either way (idle_timeout)"
        log.info("%s: closed %s %s", self.service.name if self.service else self.name,
                 logmod.client_text(self.peer or "client"), why)
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


Throttled = Callable[..., None]  # (key, level, message, *args): the daemon's _throttled


class UdpService:
    """The handler of an internal service's datagram socket.

    *service* gives the access rules, ``source_prefix`` and ``reply_rate``
    (without one: no rules, the default rate).  *rejected* is the service's
    refusal counter; *throttled* logs a drop unless its kind has had its
    share of lines this window.
    """

    def __init__(self, name: str, sock: socket.socket, loop_ports: frozenset[int],
                 service: Service | None = None, *, rejected: Counter[str] | None = None,
                 throttled: Throttled | None = None) -> None:
        self.name = name
        self.sock = sock
        self.loop_ports = loop_ports
        self.service = service
        self.label = service.name if service is not None else name
        self.rejected: Counter[str] = Counter() if rejected is None else rejected
        self.throttled = throttled
        rate = service.reply_rate if service is not None else Service.reply_rate
        self.replies = SourceBuckets(rate)
        self.budget = TokenBucket(max(UDP_FLOOD_FLOOR, 2 * rate))
        self.counter = 0
        self.dropped = 0

    def __call__(self, events: int) -> bool:
        """Read and answer what is queued.  True when the socket is over its
        budget: the caller then leaves it unread for UDP_FLOOD_PAUSE."""
        for _ in range(UDP_BATCH):
            try:
                data, peer = self.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as e:
                if e.errno != errno.ECONNREFUSED:
                    log.warning("%s/udp: recvfrom failed: %s", self.label, e.strerror)
                return False
            if not self.budget.take():
                self.dropped += 1
                self.rejected["flood"] += 1
                if self.throttled is not None:
                    self.throttled(f"{self.label} flood", logging.WARNING,
                                   "%s/udp: over %d datagrams a second (a flood, the last "
                                   "from %s); not reading it for %.0fs", self.label,
                                   self.budget.rate, _peer_text(peer), UDP_FLOOD_PAUSE)
                return True
            self._answer(data, peer)
        return False

    def _answer(self, data: bytes, peer: object) -> None:
        refusal = self._refusal(peer)
        if refusal is not None:
            self._drop(peer, *refusal)
            return
        reply = udp_reply(self.name, data, self.counter)
        self.counter += 1
        if reply is None:
            return
        try:
            self.sock.sendto(reply, peer)
        except OSError:
            pass  # the client's problem; never the daemon's

    def _refusal(self, peer: object) -> tuple[str, str] | None:
        """(reason, why) if *peer* gets no reply; None if it gets one."""
        if self.sock.family not in _INET or not isinstance(peer, tuple):
            # a UNIX datagram peer is a path its sender chose and can swap for
            # a symlink to any socket superd may write to
            return "source_address", "not an IPv4 or IPv6 peer"
        port = peer[1]
        if port < RESERVED_PORTS or port in self.loop_ports:
            return "source_port", (f"source port {port} is below {RESERVED_PORTS} or an "
                                   "internal service's (a reply could start a loop)")
        ip = client_ip(peer)
        if ip is None or no_reply_to(ip):
            return "source_address", "an unspecified, multicast or broadcast source"
        if self.service is not None and not access(self.service, ip)[0]:
            return "denied", "allow/deny"
        if self.name != "discard" and not self._take(ip):
            return "reply_rate", (f"over reply_rate {self.replies.rate:g}/s for this source "
                                  "(a loop or a flood)")
        return None

    def _take(self, ip: IPAddress) -> bool:
        forgotten = self.replies.forgotten
        group = source_group(self.service, ip) if self.service is not None else str(ip)
        took = self.replies.take(group)
        if self.replies.forgotten != forgotten and self.throttled is not None:
            self.throttled(f"{self.label} reply_sources", logging.WARNING,
                           "%s/udp: more than %d sources sent datagrams within a second; "
                           "forgetting the least recent", self.label, self.replies.limit)
        return took

    def _drop(self, peer: object, reason: str, why: str) -> None:
        self.dropped += 1
        self.rejected[reason] += 1
        if self.throttled is not None:
            self.throttled(f"{self.label} {reason}", logging.WARNING,
                           "%s/udp: dropped a datagram from %s: %s", self.label,
                           logmod.client_text(_peer_text(peer)), why)


def _peer_text(peer: object) -> str:
    if isinstance(peer, tuple):
        host = plain_host(str(peer[0]))
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return f"UNIX peer {peer!r}" if peer else "unnamed UNIX peer"
