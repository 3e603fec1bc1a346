"""Running programs: start, watch through pidfds, time out, reap.

The loop's selector and timers are shared; each child's pidfd (from the
spawn itself, or ``pidfd_open`` on the fork path) is registered with a
handler that reaps it (``waitpid(WNOHANG)`` in ``Child.poll``) the moment
it exits.  If no pidfd can be had (descriptor exhaustion) the child is
still reaped on SIGCHLD by ``reap_unwatched``.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from superd.config import Service
from superd.guard import Handler
from superd.listeners import Listener
from superd.log import StderrReader, client_text
from superd.spawn import Program, read_report
from superd.timers import Timer, Timers

log = logging.getLogger(__name__)
_READ = selectors.EVENT_READ


@dataclass(eq=False)
class Child:
    pid: int
    service: Service
    listener: Listener | None
    peer: str
    started: float
    pidfd: int | None = None
    timer: Timer | None = None
    signalled: str = ""
    source: tuple[str, str] | None = None
    returncode: int | None = None  # as subprocess: -N for a signal
    start_failed: bool = False  # superd-exec reported that the program never ran
    report_fd: int | None = None  # superd-exec's status pipe, until it has spoken

    def poll(self) -> int | None:
        """Reap the child if it has exited (waitpid WNOHANG)."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = 255  # reaped by someone else: should not happen
                return self.returncode
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def status(self) -> str:
        code = self.returncode
        if code is None:
            return "running"
        return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"


class Children:
    def __init__(self, selector: selectors.BaseSelector, timers: Timers,
                 on_exit: Callable[[Child], None],
                 on_start_failed: Callable[[Child, OSError], None]) -> None:
        self.selector = selector
        self.timers = timers
        self.on_exit = on_exit
        self.on_start_failed = on_start_failed
        self.running: dict[int, Child] = {}
        self.unwatched: set[Child] = set()  # no pidfd: reaped on SIGCHLD

    def __len__(self) -> int:
        return len(self.running)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(list(self.running.values()))

    def start(self, program: Program, stdio: int, env: dict[str, str], peer: str,
              listener: Listener | None = None) -> Child:
        """Start *program* on *stdio*; raise OSError if it cannot start."""
        svc = program.service
        rfd = wfd = None
        try:
            if svc.stderr == "log":
                rfd, wfd = os.pipe()
            err = wfd if svc.stderr == "log" else (stdio if svc.stderr == "socket" else None)
            pid, pidfd, status = program.start(stdio, env, err)
        except OSError:
            if rfd is not None:
                os.close(rfd)
            raise
        finally:
            if wfd is not None:
                os.close(wfd)
        child = Child(pid, svc, listener, peer, time.monotonic(), pidfd)
        self._watch(child, rfd)
        if status is not None:
            child.report_fd = status
            self.selector.register(status, _READ, Handler(
                lambda ev: self._on_report(child), lambda: self._drop(child)))
        return child

    def _on_report(self, child: Child) -> None:
        """The later stage (superd-exec) said how its exec went: at end of file
        the program runs; otherwise it could not start, and says why."""
        if child.report_fd is None:
            return  # read already, when its exit came first in the same batch
        try:
            error = read_report(child.report_fd)
        except BlockingIOError:
            return  # nothing yet (never after it exited or exec'd)
        self._drop(child)
        if error is not None:
            child.start_failed = True
            self.on_start_failed(child, error)

    def _drop(self, child: Child) -> None:
        if child.report_fd is not None:
            self.selector.unregister(child.report_fd)
            os.close(child.report_fd)
            child.report_fd = None

    def _watch(self, child: Child, stderr_fd: int | None) -> None:
        self.running[child.pid] = child
        try:
            if child.pidfd is None:  # the fork path hands back no pidfd
                child.pidfd = os.pidfd_open(child.pid)
            self.selector.register(child.pidfd, _READ, Handler(
                lambda ev: self._on_ready(child), lambda: self._unwatch(child)))
        except OSError as e:
            log.warning("cannot watch %d through a pidfd: %s; relying on SIGCHLD",
                        child.pid, e.strerror)
            if child.pidfd is not None:
                os.close(child.pidfd)
            child.pidfd = None
            self.unwatched.add(child)
        if stderr_fd is not None:
            os.set_blocking(stderr_fd, False)
            reader = StderrReader(stderr_fd, child.service.name, child.pid)
            self.selector.register(stderr_fd, _READ, Handler(
                lambda ev: self._on_stderr(reader), lambda: self._close_stderr(reader)))
        if child.service.timeout:
            child.timer = self.timers.call_later(child.service.timeout,
                                                 lambda: self._expire(child))
        log.debug("%s[%d] started for %s", child.service.name, child.pid,
                  client_text(child.peer))

    def _on_stderr(self, reader: StderrReader) -> None:
        if not reader.read():
            self._close_stderr(reader)

    def _close_stderr(self, reader: StderrReader) -> None:
        self.selector.unregister(reader.fd)
        os.close(reader.fd)

    def _unwatch(self, child: Child) -> None:
        """Its pidfd handler failed: reap it on SIGCHLD instead."""
        if child.pidfd is not None:
            self.selector.unregister(child.pidfd)
            os.close(child.pidfd)
            child.pidfd = None
        self.unwatched.add(child)

    def _expire(self, child: Child) -> None:
        svc = child.service
        if child.signalled:
            log.warning("%s[%d] still running %gs after SIGTERM; sending SIGKILL",
                        svc.name, child.pid, svc.kill_grace)
            child.signalled = "SIGKILL"
            killpg(child.pid, signal.SIGKILL)
            return
        log.warning("%s[%d] ran past its timeout of %gs; sending SIGTERM to its "
                    "process group", svc.name, child.pid, svc.timeout)
        child.signalled = "SIGTERM"
        killpg(child.pid, signal.SIGTERM)
        child.timer = self.timers.call_later(svc.kill_grace, lambda: self._expire(child))

    def _on_ready(self, child: Child) -> None:
        if child.report_fd is not None:  # its report first: it may be why it exited
            self._on_report(child)
        if child.poll() is not None:
            self._reaped(child)

    def reap_unwatched(self) -> None:
        for child in list(self.unwatched):  # O(children without a pidfd), usually none
            if child.poll() is not None:
                self._reaped(child)

    def _reaped(self, child: Child) -> None:
        del self.running[child.pid]
        self.unwatched.discard(child)
        if child.pidfd is not None:
            self.selector.unregister(child.pidfd)
            os.close(child.pidfd)
        if child.timer is not None:
            child.timer.cancel()
        self.on_exit(child)

    def signal_all(self, sig: int) -> None:
        for child in self.running.values():
            killpg(child.pid, sig)


def killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
