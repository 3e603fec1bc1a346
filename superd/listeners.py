"""Listening sockets: bind, set options, close.

A listener is keyed by (protocol, address) so that a reload can keep the
sockets of unchanged services open.  Every socket is non-blocking and
close-on-exec; UNIX socket files are created by :mod:`superd.paths` with the
configured mode and owner, changed on reload only through a descriptor of the
inode that was bound (and only when mode or owner changed), and removed when
the listener closes (if still ours).
"""

from __future__ import annotations

import enum
import errno
import logging
import socket
from dataclasses import dataclass, field

from superd import paths
from superd.config import ListenAddr, Service
from superd.limits import TokenBucket

log = logging.getLogger(__name__)

ListenerKey = tuple[str, str | None, int | str]


class State(enum.Enum):
    LISTENING = "listening"
    BUSY = "busy"            # wait mode: a program holds the socket
    FULL = "paused at limit"  # on_limit: queue, service at its limit
    RATE = "paused by rate"  # on_limit: queue, token bucket empty
    BACKOFF = "backing off"  # accept() or spawn failing; re-armed by a timer
    BAD_PROXY = "paused: malformed PROXY headers"  # a balancer over its error budget
    FLOOD = "paused: datagram flood"  # an internal udp socket over its budget
    CLOSED = "closed"


@dataclass(eq=False)
class Listener:
    key: ListenerKey
    addr: ListenAddr
    sock: socket.socket
    service: Service
    state: State = State.LISTENING
    ident: paths.Ident | None = None  # (st_dev, st_ino) of our UNIX socket file
    applied: tuple[int, paths.Owner] | None = None  # mode and owner it has
    adopted: bool = False  # handed in by systemd or a predecessor: never closed here
    fail_streak: int = 0
    proxy_errors: TokenBucket | None = None  # malformed PROXY headers allowed a second
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    def describe(self) -> str:
        return describe(self.addr, self.service)


def describe(addr: ListenAddr, service: Service) -> str:
    """An address as the log and status show it: 127.0.0.1:7/tcp, or
    /run/x.sock (unix stream)."""
    if addr.path is not None:
        kind = "dgram" if service.protocol == "udp" else "stream"
        return f"{addr} (unix {kind})"
    return f"{addr}/{service.protocol}"


def key_for(addr: ListenAddr, protocol: str) -> ListenerKey:
    if addr.path is not None:
        return (protocol, None, addr.path)
    return (protocol, addr.host, addr.port)


def socket_address(sock: socket.socket) -> tuple[str, ListenAddr]:
    """(protocol, address) of a bound socket, as a service would write it."""
    protocol = "udp" if sock.type == socket.SOCK_DGRAM else "tcp"
    if sock.family == socket.AF_UNIX:
        name = sock.getsockname()
        path = name.decode() if isinstance(name, bytes) else name
        return protocol, ListenAddr(path=path)
    host, port = sock.getsockname()[:2]
    wildcard = host == "0.0.0.0" or (host == "::" and not sock.getsockopt(
        socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
    return protocol, ListenAddr(host=None if wildcard else host, port=port)


def adopt_listener(sock: socket.socket, addr: ListenAddr, service: Service,
                   own: bool = False) -> Listener:
    """Wrap a socket someone else bound.  *own*: it was ours before a hand-over,
    so it is ours to close and unlink; otherwise (systemd's) it is never closed
    and its mode and owner are left as systemd set them."""
    ident = paths.socket_ident(addr.path) if own and addr.path is not None else None
    listener = Listener(key_for(addr, service.protocol), addr, sock, service,
                        ident=ident, adopted=not own)
    apply_options(listener, service)
    return listener


def open_listener(addr: ListenAddr, service: Service) -> Listener:
    """Bind and (for streams) listen; raise OSError with a useful message."""
    ident = applied = None
    if addr.path is not None:
        applied = (service.mode, service.owner)
        sock, ident = paths.bind_unix(addr.path, _socktype(service), *applied)
    else:
        sock = _bind_inet(addr, service)
    listener = Listener(key_for(addr, service.protocol), addr, sock, service,
                        ident=ident, applied=applied)
    try:
        apply_options(listener, service)
    except OSError:
        close_listener(listener)
        raise
    return listener


def apply_options(listener: Listener, service: Service) -> None:
    """(Re)apply the options that can change on a bound socket."""
    sock = listener.sock
    listener.service = service
    if sock.type == socket.SOCK_STREAM:
        if listener.addr.path is None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, int(service.keepalive))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(service.nodelay))
        sock.listen(service.backlog or socket.SOMAXCONN)
    if listener.addr.path is not None and not listener.adopted:
        _update_mode_owner(listener, service)


def _update_mode_owner(listener: Listener, service: Service) -> None:
    """A kept socket whose mode or owner changed: change it through a descriptor
    of the inode that was bound, or log why not.  Unchanged: nothing on disk."""
    wanted = (service.mode, service.owner)
    path = listener.addr.path
    if listener.applied == wanted or path is None:
        return
    if listener.ident is None:
        log.error("%s: %s is not a socket file superd can vouch for; mode and owner "
                  "left alone", service.name, path)
        listener.applied = wanted  # said once
        return
    try:
        paths.set_mode_owner(path, listener.ident, *wanted)
    except OSError as e:
        log.error("%s: mode and owner of %s not changed: %s", service.name, path,
                  e.strerror or e)
        return
    listener.applied = wanted


def close_listener(listener: Listener) -> None:
    listener.state = State.CLOSED
    if listener.addr.path is not None and listener.ident is not None:
        paths.remove_socket(listener.addr.path, listener.ident)
    listener.sock.close()


def _socktype(service: Service) -> int:
    return socket.SOCK_DGRAM if service.protocol == "udp" else socket.SOCK_STREAM


def _bind_inet(addr: ListenAddr, service: Service) -> socket.socket:
    kind = _socktype(service)
    if addr.host is None:
        try:
            return _bind_one(socket.AF_INET6, kind, "::", addr.port, service, dual=True)
        except OSError as e:
            if e.errno not in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                raise
            log.info("IPv6 is unavailable; %s listens on IPv4 only", addr)
        return _bind_one(socket.AF_INET, kind, "0.0.0.0", addr.port, service)
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    return _bind_one(family, kind, addr.host, addr.port, service)


def _bind_one(family: int, kind: int, host: str, port: int, service: Service,
              dual: bool = False) -> socket.socket:
    sock = socket.socket(family, kind)
    try:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if service.reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(not dual))
        sock.setblocking(False)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock
