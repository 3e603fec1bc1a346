"""Starting a service's program on a socket.

``Program`` is computed once per service at (re)load: argv, the base
environment and how to start it.  ``Program.start()`` is the per-connection
hot path.  Programs are started with :class:`subprocess.Popen`, whose
fork/exec runs in C with no Python code in the child; it uses vfork when
no identity change is asked for and reports exec failures synchronously.

``rlimits`` and ``nice`` cannot be set by Popen without running Python in
the forked child, so a service that sets them is started through a small
trampoline (a fresh ``python -I -S`` that sets the limits, drops privileges
and execs the program).  It costs a Python start-up per connection, only
for those services.
"""

from __future__ import annotations

import logging
import os
import pwd
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass

from superd.config import Service
from superd.fields import DEFAULT_PATH, RLIMITS

log = logging.getLogger(__name__)

_TRAMPOLINE = """\
import os, resource, sys
a = sys.argv
i = a.index("--")
try:
    for spec in a[1:i]:
        k, _, v = spec.partition("=")
        if k == "rl":
            r, s, h = (int(x) for x in v.split(":"))
            resource.setrlimit(r, (s, h))
        elif k == "nice":
            os.setpriority(os.PRIO_PROCESS, 0, int(v))
        elif k == "ids":
            u, g, gs = v.split(":")
            os.setgroups([int(x) for x in gs.split(",") if x])
            os.setgid(int(g))
            os.setuid(int(u))
    os.execv(a[i + 1], a[i + 1:])
except OSError as e:
    sys.stderr.write("superd: cannot start %s: %s\\n" % (a[i + 1], e.strerror))
    os._exit(127)
"""


@dataclass(frozen=True)
class Program:
    """What is needed to start one service's program, computed at load."""

    service: Service
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    user: int | None
    group: int | None
    groups: tuple[int, ...] | None

    @classmethod
    def for_service(cls, service: Service) -> Program:
        ident = service.identity
        argv = service.exec
        user = group = groups = None
        if service.rlimits or service.nice:
            argv = _trampoline_argv(service)
        elif ident is not None and ident.switch:
            user, group, groups = ident.uid, ident.gid, ident.groups
        return cls(service, argv, tuple(base_env(service).items()), user, group, groups)

    def start(self, stdio: int, conn_env: dict[str, str],
              stderr: int | None) -> subprocess.Popen[bytes]:
        """Start the program with *stdio* as fds 0 and 1.

        *stderr* is the fd for fd 2, or None for /dev/null.  Raises OSError
        (from exec, or from fork) with the program's errno.
        """
        env = dict(self.env)
        env.update(conn_env)
        svc = self.service
        return subprocess.Popen(
            self.argv, stdin=stdio, stdout=stdio,
            stderr=subprocess.DEVNULL if stderr is None else stderr,
            env=env, cwd=svc.cwd, umask=svc.umask, start_new_session=True,
            restore_signals=True, close_fds=True,
            user=self.user, group=self.group, extra_groups=self.groups,
        )


def _trampoline_argv(service: Service) -> tuple[str, ...]:
    specs = [f"rl={RLIMITS[name]}:{soft}:{hard}" for name, soft, hard in service.rlimits]
    if service.nice:
        specs.append(f"nice={service.nice}")
    ident = service.identity
    if ident is not None and ident.switch:
        specs.append(f"ids={ident.uid}:{ident.gid}:{','.join(map(str, ident.groups))}")
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
    host = addr[0]
    if host.startswith("::ffff:") and "." in host:
        return host[7:], str(addr[1]), False
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
