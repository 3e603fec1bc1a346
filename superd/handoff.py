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
FOREIGN_ENV = "SUPERD_FOREIGN_FDS"  # indexes of handed sockets that are systemd's
_READ = selectors.EVENT_READ
# sh sets LISTEN_PID (and WATCHDOG_PID, if systemd set one) to its own pid,
# which exec keeps for the new superd
_SHELL = ('LISTEN_PID=$$; export LISTEN_PID; '
          'if [ -n "${WATCHDOG_PID-}" ]; then WATCHDOG_PID=$$; export WATCHDOG_PID; fi; '
          'exec "$@"')


@dataclass
class Successor:
    pid: int
    pidfd: int
    ready_fd: int


def start_successor(sockets: list[tuple[socket.socket, str, bool]],
                    argv: list[str]) -> Successor:
    """Start *argv* with *sockets* as fds 3.. (LISTEN_FDS); raise OSError.

    Each socket comes with its service name and whether it is superd's own
    (False: systemd's, which the successor must never close either)."""
    count = len(sockets)
    floor = 3 + count + 1  # park the fds above the range they are moved into
    parked = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD_CLOEXEC, floor) for s, _, _ in sockets]
    rfd, wfd = os.pipe()
    parked_w = fcntl.fcntl(wfd, fcntl.F_DUPFD_CLOEXEC, floor)
    os.close(wfd)
    env = {k: v for k, v in os.environ.items()
           if k not in ("LISTEN_PID", READY_ENV, FOREIGN_ENV)}
    env.update(LISTEN_FDS=str(count), LISTEN_FDNAMES=":".join(n for _, n, _ in sockets),
               **{READY_ENV: str(3 + count),
                  FOREIGN_ENV: ",".join(str(i) for i, (_, _, own) in enumerate(sockets)
                                        if not own)})
    actions = [(os.POSIX_SPAWN_DUP2, fd, 3 + i) for i, fd in enumerate(parked)]
    actions.append((os.POSIX_SPAWN_DUP2, parked_w, 3 + count))
    try:
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
        socks = [(lst.sock, lst.service.name, not lst.adopted)
                 for lst in self.listeners.values()]
        used = {id(lst.sock) for lst in self.listeners.values()}
        socks += [(h.sock, h.name, h.own) for h, _ in self.handed.values()
                  if id(h.sock) not in used]
        self._close_endpoints()  # the successor binds the control socket and metrics
        try:
            succ = start_successor(socks, self.reexec_argv)
        except OSError as e:
            log.error("SIGUSR2: cannot start a new superd: %s; still serving", e.strerror)
            self._endpoints(self.config)
            return
        self.successor = succ
        log.info("SIGUSR2: started superd %d with %d socket(s); serving until it is ready",
                 succ.pid, len(socks))
        self.selector.register(succ.ready_fd, _READ, lambda ev: self._successor_said())
        self.selector.register(succ.pidfd, _READ, lambda ev: self._successor_exited())

    def _successor_said(self: Daemon) -> None:
        succ = self.successor
        if succ is None or succ.ready_fd < 0:
            return
        try:
            data = os.read(succ.ready_fd, 16)
        except BlockingIOError:
            return
        self.selector.unregister(succ.ready_fd)
        os.close(succ.ready_fd)
        succ.ready_fd = -1
        if data != b"ready":
            return  # it failed; _successor_exited says so when it is reaped
        log.info("superd %d serves now; closing listeners and waiting for %d program(s)",
                 succ.pid, len(self.children))
        self.notifier.send(f"MAINPID={succ.pid}")
        # from here systemd hears the successor alone: no WATCHDOG=1 or STATUS=
        # of ours may hide it if it hangs
        self.notifier.detach()
        self.stopping = True
        if self.children:  # as at a stop: running programs get stop_timeout
            self.timers.call_later(self.config.stop_timeout, self._stop_timeout)
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
        succ, self.successor = self.successor, None
        if succ is None:
            return
        self.selector.unregister(succ.pidfd)
        os.close(succ.pidfd)
        _, status = os.waitpid(succ.pid, os.WNOHANG)
        code = os.waitstatus_to_exitcode(status)
        if succ.ready_fd >= 0:
            self.selector.unregister(succ.ready_fd)
            os.close(succ.ready_fd)
        if self.stopping:
            log.error("the new superd %d exited (status %d) after taking over", succ.pid, code)
            return
        log.error("the new superd %d exited (status %d) before it was ready; still serving",
                  succ.pid, code)
        self._endpoints(self.config)
