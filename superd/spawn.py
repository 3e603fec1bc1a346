"""Starting a service's program on a socket: the hot path.

``Program`` is computed once per service at (re)load: argv, the base
environment, the identity, the process settings.  ``Program.start()`` runs
per connection.  The daemon's own credentials, directory and umask never
change: everything the program needs is set in the child, before exec.

Two ways to start, chosen when superd is installed:

- ``superd._spawn`` (a small C extension, built by pip where a compiler
  is present): ``clone(CLONE_VM|CLONE_VFORK|CLONE_PIDFD)``; the child makes
  raw system calls only (signals to default, setsid, descriptors, rlimits,
  nice, setgroups/setresgid/setresuid, umask, chdir, execve), reports a
  failing step's errno synchronously, and hands back a pidfd.
- without it, ``subprocess`` in C: fork (CPython gives up vfork when ids
  change), ``user=``/``group=``/``extra_groups=`` in the child; ``rlimits``
  and ``nice`` go through a small ``python -I -S`` trampoline that sets them,
  drops privileges and execs (a Python start-up per connection, for those
  services only).

``SPAWN_PATH`` names the one in use; ``superd check`` and the start-up log
print it.
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

from superd.config import Identity, Service
from superd.fields import DEFAULT_PATH, RLIMITS
from superd.limits import plain_host

try:
    from superd import _spawn
except ImportError:  # built without a compiler: the fork path
    _spawn = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "superd-exec")
HAVE_HELPER = _spawn is not None and os.access(HELPER, os.X_OK)

SPAWN_PATH = (
    "clone(CLONE_VM|CLONE_VFORK) from the superd._spawn extension, other users "
    "through superd-exec" if HAVE_HELPER
    else "clone(CLONE_VM|CLONE_VFORK) from the superd._spawn extension, other users "
    "through subprocess and a Python trampoline (superd-exec is not built)"
    if _spawn is not None
    else "subprocess; other users, rlimits and nice through a Python trampoline "
    "(the superd._spawn extension is not built)")

_TRAMPOLINE = """\
import os, resource, signal, sys
a = sys.argv
i = a.index("--")
env = dict(os.environ)
status = None
step = "start"
try:
    for spec in a[1:i]:
        k, _, v = spec.partition("=")
        step = k
        if k == "status":
            status = int(v)
            os.set_inheritable(status, False)
        elif k == "rl":
            r, s, h = (int(x) for x in v.split(":"))
            resource.setrlimit(r, (s, h))
        elif k == "nice":
            os.setpriority(os.PRIO_PROCESS, 0, int(v))
        elif k == "cwd":
            os.chdir(v)
        elif k == "unset":
            env.pop(v, None)
        elif k == "ids":
            u, g, gs = v.split(":")
            os.setgroups([int(x) for x in gs.split(",") if x])
            os.setresgid(int(g), int(g), int(g))
            os.setresuid(int(u), int(u), int(u))
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    step = "execve"
    os.execve(a[i + 1], a[i + 1:], env)
except OSError as e:
    if status is not None:
        os.write(status, b"%d %s\\n" % (e.errno or 0, step.encode()))
    os._exit(127)
"""


CONNECTION_VARS = frozenset({
    "PROTO", "TCPREMOTEIP", "TCPREMOTEPORT", "TCPLOCALIP", "TCPLOCALPORT",
    "REMOTE_ADDR", "REMOTE_PORT", "REMOTE_HOST", "REMOTE_UID", "REMOTE_GID", "REMOTE_PID",
})

Ids = tuple[int, int, tuple[int, ...]]


@dataclass(frozen=True, eq=False)
class Program:
    """What is needed to start one service's program, computed at load."""

    service: Service
    path: bytes
    argv: tuple[bytes, ...]
    env: tuple[bytes, ...]  # "NAME=value", without the connection's variables
    ids: Ids | None  # root's own identity set in the clone child; None: unchanged
    cwd: bytes | None  # None: / (or superd-exec changes it)
    rlimits: tuple[tuple[int, int, int], ...]
    reports: bool  # a later stage (superd-exec, the trampoline) reports on a pipe
    fork: bool  # through subprocess, not the extension

    @classmethod
    def for_service(cls, service: Service) -> Program:
        ident = service.identity
        if ident is not None and ident.ignored:
            log.warning("%s: %s", service.name, ignored_text(ident))
        switch = ident is not None and ident.switch
        other = switch and ident is not None and ident.uid != 0
        fork = _spawn is None or (other and not HAVE_HELPER)
        argv, cwd = service.exec, service.cwd
        ids: Ids | None = None
        if other and not fork:
            argv, cwd = _helper_argv(service), "/"
        elif fork and (other or service.rlimits or service.nice):
            argv, cwd = _trampoline_argv(service), "/"  # limits, identity, cwd, exec
        elif switch and ident is not None:
            ids = (ident.uid, ident.gid, ident.groups)  # root's own groups
        env = tuple(os.fsencode(f"{k}={v}") for k, v in base_env(service).items()
                    if k not in CONNECTION_VARS)
        return cls(service, os.fsencode(argv[0]), tuple(map(os.fsencode, argv)), env, ids,
                   None if cwd == "/" else os.fsencode(cwd),
                   tuple((RLIMITS[name], soft, hard) for name, soft, hard in service.rlimits),
                   reports=argv is not service.exec, fork=fork)

    def start(self, stdio: int, conn_env: dict[str, str],
              stderr: int | None) -> tuple[int, int | None, int | None]:
        """Start the program with *stdio* as fds 0 and 1; return (pid, pidfd,
        status), *status* the read end of the pipe on which a later stage
        reports a failure (the loop reads it), or None.

        *stderr* is the fd for fd 2, or None for /dev/null.  Raises OSError
        with the errno of the step that failed before exec.
        """
        env = [*self.env, *(os.fsencode(f"{k}={v}") for k, v in conn_env.items())]
        rfd, wfd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK) if self.reports else (None, None)
        try:
            pid, pidfd = self._start(stdio, env, stderr, wfd)
        except BaseException:
            if rfd is not None:
                os.close(rfd)
            raise
        finally:
            if wfd is not None:
                os.close(wfd)
        return pid, pidfd, rfd

    def _start(self, stdio: int, env: list[bytes], stderr: int | None,
               status: int | None) -> tuple[int, int | None]:
        svc = self.service
        if self.fork:
            return self._fork(stdio, env, stderr, status), None
        return _spawn.spawn(self.path, self.argv, env, stdio,  # type: ignore[no-any-return]
                            -1 if stderr is None else stderr,
                            -1 if status is None else status, self.cwd, self.ids,
                            -1 if svc.umask == DAEMON_UMASK else svc.umask,
                            svc.nice or None, self.rlimits)

    def _fork(self, stdio: int, env: list[bytes], stderr: int | None,
              status: int | None) -> int:
        """Without the extension: subprocess's fork and exec, in C, as root
        or superd's own user; another user only through the trampoline."""
        uid, gid, groups = self.ids if self.ids is not None else (None, None, None)
        argv = self.argv if status is None else (*self.argv[:5], b"status=%d" % status,
                                                 *self.argv[5:])
        proc = subprocess.Popen(
            argv, executable=self.path, stdin=stdio, stdout=stdio,
            stderr=subprocess.DEVNULL if stderr is None else stderr,
            env=dict(e.split(b"=", 1) for e in env), cwd=self.cwd, close_fds=True,
            pass_fds=() if status is None else (status,),
            restore_signals=True, start_new_session=True, umask=self.service.umask,
            user=uid, group=gid, extra_groups=None if groups is None else list(groups))
        # superd reaps its children itself (pidfd, waitpid): mark this object
        # done so that subprocess never waits on the pid, which may be reused.
        proc.returncode = 0
        return proc.pid


def read_report(fd: int) -> OSError | None:
    """What a later stage said on its status pipe: None at end of file (the
    program was exec'd), else the failure as an OSError with ``step``."""
    data = os.read(fd, 256)
    if not data:
        return None
    code, _, step = data.decode("ascii", "replace").strip().partition(" ")
    errno_ = int(code) if code.isdigit() else 0
    error = OSError(errno_, os.strerror(errno_) if errno_ else "failed")
    error.step = step or "start"  # type: ignore[attr-defined]
    return error


def _helper_argv(service: Service) -> tuple[str, ...]:
    ident = service.identity
    assert ident is not None
    cwd = "" if service.cwd == "/" else service.cwd
    return (HELPER, str(ident.uid), str(ident.gid), ",".join(map(str, ident.groups)), cwd,
            "--", service.exec[0], *service.exec)


def ignored_text(ident: Identity) -> str:
    return (f"user: {ident.ignored} from defaults: is not applied: superd does not run as "
            f"root, so its programs run as {ident.user}")


def failure_text(e: OSError) -> str:
    """Why a start failed, naming the step when it was not exec itself."""
    step = getattr(e, "step", "execve")
    reason = e.strerror or str(e)
    return reason if step == "execve" else f"{step}: {reason}"


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
    if service.cwd != "/":
        specs.append(f"cwd={service.cwd}")  # after the ids: checked as the user
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
