"""Listening sockets: bind, set options, close.

A listener is keyed by (protocol, address) so that a reload can keep the
sockets of unchanged services open.  Every socket is non-blocking and
close-on-exec; UNIX socket files are created with the configured mode and
owner and removed when the listener closes (if still ours).
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import socket
import stat
from dataclasses import dataclass, field

from superd.config import ListenAddr, Service

log = logging.getLogger(__name__)

ListenerKey = tuple[str, str | None, int | str]


class State(enum.Enum):
    LISTENING = "listening"
    BUSY = "busy"            # wait mode: a program holds the socket
    FULL = "paused at limit"  # on_limit: queue, service at its limit
    RATE = "paused by rate"  # on_limit: queue, token bucket empty
    BACKOFF = "backing off"  # accept() or spawn failing; re-armed by a timer
    CLOSED = "closed"


@dataclass(eq=False)
class Listener:
    key: ListenerKey
    addr: ListenAddr
    sock: socket.socket
    service: Service
    state: State = State.LISTENING
    inode: int | None = None
    adopted: bool = False  # handed in by systemd or a predecessor: never closed here
    fail_streak: int = 0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    def describe(self) -> str:
        if self.addr.path is not None:
            kind = "dgram" if self.service.protocol == "udp" else "stream"
            return f"{self.addr} (unix {kind})"
        return f"{self.addr}/{self.service.protocol}"


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
    inode = None
    if own and addr.path is not None:
        try:
            inode = os.lstat(addr.path).st_ino
        except OSError:
            inode = None
    listener = Listener(key_for(addr, service.protocol), addr, sock, service,
                        inode=inode, adopted=not own)
    apply_options(listener, service)
    return listener


def open_listener(addr: ListenAddr, service: Service) -> Listener:
    """Bind and (for streams) listen; raise OSError with a useful message."""
    if addr.path is not None:
        sock, inode = _bind_unix(addr.path, service)
    else:
        sock, inode = _bind_inet(addr, service), None
    listener = Listener(key_for(addr, service.protocol), addr, sock, service,
                        inode=inode)
    apply_options(listener, service)
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
        _set_mode_owner(listener.addr.path, service)


def close_listener(listener: Listener) -> None:
    listener.state = State.CLOSED
    path = listener.addr.path
    if path is not None and listener.inode is not None:
        try:
            if os.lstat(path).st_ino == listener.inode:
                os.unlink(path)
        except OSError:
            pass
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


def _bind_unix(path: str, service: Service) -> tuple[socket.socket, int]:
    _remove_stale(path)
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, _socktype(service))
    sock.setblocking(False)
    old = os.umask(0o177)  # no window in which others may connect
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    return sock, os.lstat(path).st_ino


def _remove_stale(path: str) -> None:
    """Remove a socket file nobody listens on; refuse anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_UNIX, kind) as probe:
            try:
                probe.connect(path)
            except OSError as e:
                if e.errno in (errno.ECONNREFUSED, errno.EPROTOTYPE):
                    continue
                raise
        raise OSError(errno.EADDRINUSE, f"{path} is in use by another process")
    os.unlink(path)  # stale: left by a process that is gone


def _set_mode_owner(path: str, service: Service) -> None:
    if service.owner is not None:
        os.chown(path, *service.owner)
    os.chmod(path, service.mode)
