"""Starting a service's program on a socket: the hot path.

``Program`` is computed once per service at (re)load: argv, the base
environment, the identity.  ``Program.start()`` runs per connection and
starts the program with ``os.posix_spawn``: glibc implements it with
``clone(CLONE_VFORK)``, runs no Python code in the child, and reports an
exec failure (ENOENT, EACCES) synchronously as an OSError.

posix_spawn cannot change the user, the directory or the umask of the
child, so superd changes its own for the few microseconds of the call
(it is single-threaded): it sets its *real* uid/gid and groups to the
service's while keeping effective uid 0, and ``POSIX_SPAWN_RESETIDS`` makes
the child's effective ids equal to those real ids before exec.  After exec
the program holds the service's uid/gid in all of real, effective, saved
and filesystem ids, with no capabilities, exactly as after setuid().
superd restores its own ids at once.  cwd and umask are switched and
restored the same way.

``rlimits`` and ``nice`` cannot be applied that way without changing
superd's own limits, so a service that sets them starts through a small
trampoline (``python -I -S``) that sets them, drops privileges and execs
the program: a Python start-up (~15 ms) per connection, for those
services only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import signal
import socket
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from superd import cspawn
from superd.config import Identity, Service
from superd.fields import DEFAULT_PATH, RLIMITS
from superd.limits import plain_host

log = logging.getLogger(__name__)

_TRAMPOLINE = """\
import os, resource, signal, sys
a = sys.argv
i = a.index("--")
env = dict(os.environ)
try:
    for spec in a[1:i]:
        k, _, v = spec.partition("=")
        if k == "rl":
            r, s, h = (int(x) for x in v.split(":"))
            resource.setrlimit(r, (s, h))
        elif k == "nice":
            os.setpriority(os.PRIO_PROCESS, 0, int(v))
        elif k == "unset":
            env.pop(v, None)
        elif k == "ids":
            u, g, gs = v.split(":")
            os.setgroups([int(x) for x in gs.split(",") if x])
            os.setgid(int(g))
            os.setuid(int(u))
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    os.execve(a[i + 1], a[i + 1:], env)
except OSError as e:
    sys.stderr.write("superd: cannot start %s: %s\\n" % (a[i + 1], e.strerror))
    os._exit(127)
"""


CONNECTION_VARS = frozenset({
    "PROTO", "TCPREMOTEIP", "TCPREMOTEPORT", "TCPLOCALIP", "TCPLOCALPORT",
    "REMOTE_ADDR", "REMOTE_PORT", "REMOTE_HOST", "REMOTE_UID", "REMOTE_GID", "REMOTE_PID",
})


@dataclass(frozen=True, eq=False)
class Program:
    """What is needed to start one service's program, computed at load."""

    service: Service
    argv: tuple[str, ...]
    env: tuple[bytes, ...]  # "NAME=value", without the connection's variables
    ids: Identity | None  # switched to around the spawn; None: superd's own
    c_argv: object = None  # cspawn's argv array
    attrs: object = None  # cspawn.Attributes

    @classmethod
    def for_service(cls, service: Service) -> Program:
        ident = service.identity
        argv = service.exec
        ids = ident if ident is not None and ident.switch else None
        if service.rlimits or service.nice:
            argv = _trampoline_argv(service)
            ids = None  # the trampoline drops privileges itself, after the limits
        env = tuple(os.fsencode(f"{k}={v}") for k, v in base_env(service).items()
                    if k not in CONNECTION_VARS)
        if not cspawn.available:
            return cls(service, argv, env, ids)
        return cls(service, argv, env, ids, cspawn.encode_argv(argv),
                   cspawn.Attributes(resetids=ids is not None))

    def start(self, stdio: int, conn_env: dict[str, str], stderr: int | None) -> int:
        """Start the program with *stdio* as fds 0 and 1; return its pid.

        *stderr* is the fd for fd 2, or None for /dev/null.  Raises OSError
        (from exec, or from clone) with the program's errno.
        """
        env = [*self.env, *(os.fsencode(f"{k}={v}") for k, v in conn_env.items())]
        svc = self.service
        with _ids(self.ids), _umask(svc.umask):
            if self.attrs is not None:
                cwd = None if svc.cwd == "/" else os.fsencode(svc.cwd)
                return cspawn.spawn(os.fsencode(self.argv[0]), self.c_argv,  # type: ignore[arg-type]
                                    env, self.attrs, stdio, stderr, cwd)  # type: ignore[arg-type]
            return self._os_spawn(stdio, env, stderr)

    def _os_spawn(self, stdio: int, env: list[bytes], stderr: int | None) -> int:
        """The fallback without glibc's extras (signals 32/33 stay as inherited)."""
        actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
            (os.POSIX_SPAWN_DUP2, stdio, 0), (os.POSIX_SPAWN_DUP2, stdio, 1)]
        if stderr is None:
            actions.append((os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_RDWR, 0))
        else:
            actions.append((os.POSIX_SPAWN_DUP2, stderr, 2))
        environ = dict(e.split(b"=", 1) for e in env)
        with _cwd(self.service.cwd):
            return os.posix_spawn(self.argv[0], self.argv, environ, file_actions=actions,
                                  setsid=True, setsigmask=(), setsigdef=_SIGDEF,
                                  resetids=self.ids is not None)


# Signals superd ignores (Python ignores these two) go back to default in
# the child; handled signals are reset by exec itself, and superd ignores no
# others (loop._setup_signals resets any it inherited).
_SIGDEF = (signal.SIGPIPE, signal.SIGXFSZ)


@contextlib.contextmanager
def _ids(ident: Identity | None) -> Iterator[None]:
    if ident is None:
        yield
        return
    groups = os.getgroups()
    os.setgroups(list(ident.groups))
    os.setresgid(ident.gid, -1, -1)
    os.setresuid(ident.uid, -1, -1)
    try:
        yield
    finally:
        os.setresuid(0, -1, -1)
        os.setresgid(0, -1, -1)
        os.setgroups(groups)


@contextlib.contextmanager
def _cwd(path: str) -> Iterator[None]:
    if path == "/":
        yield
        return
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir("/")


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    if mask == DAEMON_UMASK:
        yield
        return
    os.umask(mask)
    try:
        yield
    finally:
        os.umask(DAEMON_UMASK)


DAEMON_UMASK = 0o022


def prepare_daemon() -> None:
    """What the spawn path assumes of superd itself: cwd / and umask 022."""
    os.chdir("/")
    os.umask(DAEMON_UMASK)


def _trampoline_argv(service: Service) -> tuple[str, ...]:
    specs = [f"rl={RLIMITS[name]}:{soft}:{hard}" for name, soft, hard in service.rlimits]
    if service.nice:
        specs.append(f"nice={service.nice}")
    ident = service.identity
    if ident is not None and ident.switch:
        specs.append(f"ids={ident.uid}:{ident.gid}:{','.join(map(str, ident.groups))}")
    if "LC_CTYPE" not in base_env(service):
        specs.append("unset=LC_CTYPE")  # Python's locale coercion (PEP 538) adds it
    return (sys.executable, "-I", "-S", "-c", _TRAMPOLINE, *specs, "--", *service.exec)


def base_env(service: Service, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment every connection of *service* starts from."""
    source = os.environ if environ is None else environ
    env = {"PATH": DEFAULT_PATH}
    ident = service.identity
    if ident is not None:
        env.update(HOME=ident.home, USER=ident.user, LOGNAME=ident.user,
                   SHELL=ident.shell)
    else:
        pw = pwd.getpwuid(os.geteuid())
        env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name,
                   SHELL=pw.pw_shell)
    for name in service.pass_env:
        if name in source:
            env[name] = source[name]
    env.update(service.env)
    env["SUPERD_SERVICE"] = service.name
    return env


def _ip_port(addr: tuple[str, int] | tuple[str, int, int, int]) -> tuple[str, str, bool]:
    """Address text, port text and whether it is IPv6 (mapped v4 unmapped)."""
    host = plain_host(addr[0])
    return host, str(addr[1]), ":" in host


def connection_env(sock: socket.socket, peer: object) -> dict[str, str]:
    """The variables that describe one connection (or a wait-mode socket)."""
    family = sock.family
    if family == socket.AF_UNIX:
        env = {"PROTO": "UNIX"}
        if sock.type == socket.SOCK_STREAM and peer is not None:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            pid, uid, gid = struct.unpack("3i", creds)
            env.update(REMOTE_PID=str(pid), REMOTE_UID=str(uid), REMOTE_GID=str(gid))
        return env
    local_ip, local_port, v6 = _ip_port(sock.getsockname())
    tcp = sock.type == socket.SOCK_STREAM
    if peer is None:  # wait mode: the program meets its clients itself
        return {"PROTO": ("TCP" if tcp else "UDP") + ("6" if v6 else "")}
    assert isinstance(peer, tuple)
    ip, port, v6 = _ip_port(peer)
    proto = ("TCP" if tcp else "UDP") + ("6" if v6 else "")
    env = {"PROTO": proto, "REMOTE_ADDR": ip, "REMOTE_PORT": port, "REMOTE_HOST": ip}
    if tcp:
        env.update(TCPREMOTEIP=ip, TCPREMOTEPORT=port,
                   TCPLOCALIP=local_ip, TCPLOCALPORT=local_port)
    return env
