"""Upgrade superd in place without refusing a connection (SIGUSR2).

The running daemon starts a new superd and hands it every listening socket
the LISTEN_FDS way (fds 3, 4, ... named after their services), plus the
write end of a pipe in ``SUPERD_READY_FD``.  The new process binds nothing
it was given, and writes ``ready`` on the pipe once it serves.  Only then
does the old process close its copies (never unlinking UNIX socket files)
and wait for its running programs to finish; clients arriving meanwhile
wait in the kernel's listen queue of the shared sockets.  If the new
process fails, the old one keeps serving as if nothing happened.
"""

from __future__ import annotations

import fcntl
import logging
import os
import selectors
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from superd.listeners import State

if TYPE_CHECKING:
    from superd.loop import Daemon

log = logging.getLogger(__name__)

READY_ENV = "SUPERD_READY_FD"
_READ = selectors.EVENT_READ
_SHELL = 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"'


@dataclass
class Successor:
    pid: int
    pidfd: int
    ready_fd: int


def start_successor(sockets: list[tuple[socket.socket, str]], argv: list[str]) -> Successor:
    """Start *argv* with *sockets* as fds 3.. (LISTEN_FDS); raise OSError."""
    count = len(sockets)
    floor = 3 + count + 1  # park the fds above the range they are moved into
    parked = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, floor) for s, _ in sockets]
    rfd, wfd = os.pipe()
    parked_w = fcntl.fcntl(wfd, fcntl.F_DUPFD_CLOEXEC, floor)
    os.close(wfd)
    env = {k: v for k, v in os.environ.items() if k not in ("LISTEN_PID", READY_ENV)}
    env.update(LISTEN_FDS=str(count), LISTEN_FDNAMES=":".join(n for _, n in sockets),
               **{READY_ENV: str(3 + count)})
    actions = [(os.POSIX_SPAWN_DUP2, fd, 3 + i) for i, fd in enumerate(parked)]
    actions.append((os.POSIX_SPAWN_DUP2, parked_w, 3 + count))
    try:
        # sh sets LISTEN_PID to its own pid, which exec keeps for superd
        pid = os.posix_spawn("/bin/sh", ["sh", "-c", _SHELL, "superd", *argv], env,
                             file_actions=actions)
        pidfd = os.pidfd_open(pid)
    except OSError:
        os.close(rfd)
        raise
    finally:
        for fd in (*parked, parked_w):
            os.close(fd)
    os.set_blocking(rfd, False)
    return Successor(pid, pidfd, rfd)


def from_predecessor() -> bool:
    """True in a process started by start_successor()."""
    return bool(os.environ.get(READY_ENV)) and os.environ.get("LISTEN_PID") == str(os.getpid())


def tell_predecessor() -> None:
    """In a successor: say we serve, so the old process lets go."""
    fd_text = os.environ.get(READY_ENV)
    if not fd_text or os.environ.get("LISTEN_PID") != str(os.getpid()):
        return
    try:
        fd = int(fd_text)
        os.write(fd, b"ready")
        os.close(fd)
    except (ValueError, OSError) as e:
        log.warning("could not tell the previous superd that this one is ready: %s", e)


class HandOver:
    """The daemon's side of SIGUSR2 (mixed into :class:`superd.loop.Daemon`)."""

    def _hand_over(self: Daemon) -> None:
        if self.stopping or self.successor is not None:
            log.warning("SIGUSR2 ignored: %s", "stopping" if self.stopping
                        else "a hand-over is already under way")
            return
        socks = [(lst.sock, lst.service.name) for lst in self.listeners.values()]
        used = {id(lst.sock) for lst in self.listeners.values()}
        socks += [(h.sock, h.name) for h, _ in self.handed.values() if id(h.sock) not in used]
        try:
            succ = start_successor(socks, self.reexec_argv)
        except OSError as e:
            log.error("SIGUSR2: cannot start a new superd: %s; still serving", e.strerror)
            return
        self.successor = succ
        log.info("SIGUSR2: started superd %d with %d socket(s); serving until it is ready",
                 succ.pid, len(socks))
        self.selector.register(succ.ready_fd, _READ, lambda ev: self._successor_said())
        self.selector.register(succ.pidfd, _READ, lambda ev: self._successor_exited())

    def _successor_said(self: Daemon) -> None:
        assert self.successor is not None
        try:
            data = os.read(self.successor.ready_fd, 16)
        except BlockingIOError:
            return
        self.selector.unregister(self.successor.ready_fd)
        os.close(self.successor.ready_fd)
        if data != b"ready":
            log.error("the new superd %d failed before it was ready; still serving",
                      self.successor.pid)
            return
        log.info("superd %d serves now; closing listeners and waiting for %d program(s)",
                 self.successor.pid, len(self.children))
        self.notifier.send(f"MAINPID={self.successor.pid}")
        self.stopping = True
        for listener in list(self.listeners.values()):
            self._set_state(listener, State.CLOSED)
            listener.sock.close()  # shared with the successor: never unlink
        self.listeners.clear()
        for h, _ in self.handed.values():
            h.sock.close()
        self.handed.clear()
        if self.sessions:  # internal-service clients may finish, within stop_timeout
            self.timers.call_later(self.config.stop_timeout, self._close_sessions)

    def _successor_exited(self: Daemon) -> None:
        assert self.successor is not None
        succ, self.successor = self.successor, None
        self.selector.unregister(succ.pidfd)
        os.close(succ.pidfd)
        _, status = os.waitpid(succ.pid, os.WNOHANG)
        if not self.stopping:
            log.error("the new superd %d exited (status %d) before it was ready; "
                      "still serving", succ.pid, os.waitstatus_to_exitcode(status))
            try:
                self.selector.unregister(succ.ready_fd)
                os.close(succ.ready_fd)
            except (KeyError, ValueError, OSError):
                pass

