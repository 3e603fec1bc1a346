"""The daemon: one selectors loop that owns every piece of mutable state.

Listeners, children, internal sessions, counters and timers live here.
Signals arrive as bytes on a socketpair (``signal.set_wakeup_fd``) and are
dispatched from the loop, never inside a handler.  Each child is watched
through a pidfd and reaped with ``waitpid(WNOHANG)`` when it becomes
readable; the select timeout is the next timer's deadline.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING

from superd import config as configmod
from superd import control, guard, handoff, status
from superd import log as logmod
from superd.accept import Acceptor
from superd.children import Children
from superd.config import Config, ListenAddr, Service
from superd.control import ControlServer
from superd.errors import ConfigError
from superd.handoff import HandOver, Successor
from superd.internal import LOOP_PORTS, TcpSession, UdpService
from superd.limits import Throttle, TokenBucket, bucket_for
from superd.linger import Linger
from superd.listeners import (
    Listener,
    ListenerKey,
    State,
    adopt_listener,
    apply_options,
    describe,
    key_for,
    open_listener,
    socket_address,
)
from superd.notify import Handed, Notifier, handed_sockets
from superd.pending import Pending
from superd.spawn import SPAWN_PATH, Program
from superd.stats import ServiceStats
from superd.timers import Timer, Timers

if TYPE_CHECKING:
    from superd.metrics import MetricsServer

log = logging.getLogger(__name__)

_HANDLED = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1,
            signal.SIGUSR2, signal.SIGCHLD)
_READ = selectors.EVENT_READ
# what stops the programs now, as the person who stopped superd would say it
_AGAIN = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
BIND_RETRY_FIRST = 1.0  # seconds before a failed bind is tried again; doubles
BIND_RETRY_MAX = 60.0


class Daemon(Acceptor, HandOver):
    def __init__(self, config_path: str, cfg: Config,
                 reexec_argv: list[str] | None = None) -> None:
        self.config_path = config_path
        self.reexec_argv = reexec_argv or [sys.executable, "-m", "superd", "run",
                                           "-c", config_path]
        self.config = cfg
        self.selector = selectors.DefaultSelector()
        self.timers = Timers()
        self.listeners: dict[ListenerKey, Listener] = {}
        self.children = Children(self.selector, self.timers, self._child_exited,
                                 self._start_failed_later)
        self.sessions: set[TcpSession] = set()
        self.pending: set[Pending] = set()
        self.linger = Linger(self.selector, self.timers)
        self.programs: dict[str, Program] = {}
        self.stats: dict[str, ServiceStats] = {}
        self.total_active = 0
        self.full: set[Listener] = set()
        self.per_source: Counter[tuple[str, str]] = Counter()
        self.buckets: dict[str, TokenBucket] = {}
        self.throttle = Throttle()
        self.summary_timer: Timer | None = None
        self.stopping = False
        self.stop_timer: Timer | None = None
        self.terminated = False  # running programs were sent SIGTERM at a stop
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self.notifier = Notifier()
        self.handed: dict[ListenerKey, tuple[Handed, ListenAddr]] = {}
        self.successor: Successor | None = None
        self.pid = os.getpid()
        self.started = time.monotonic()
        self.reloads: Counter[str] = Counter()
        self.internal_errors: Counter[str] = Counter()
        self.unbound: dict[ListenerKey, tuple[ListenAddr, Service, str]] = {}
        self.loop_ports: frozenset[int] = LOOP_PORTS
        self.bind_retry = BIND_RETRY_FIRST
        self.bind_timer: Timer | None = None
        self.last_reload_ok = 1
        self.control: ControlServer | None = None
        self.metrics: MetricsServer | None = None

    # --- lifecycle ----------------------------------------------------

    def run(self) -> int:
        self.pid = os.getpid()
        self._setup_signals()
        self._take_handed(handed_sockets())
        self._apply(self.config)
        self._endpoints(self.config)
        log.info("superd %d ready: %d services, %d listeners%s; programs start through %s",
                 os.getpid(), sum(s.enabled for s in self.config.services),
                 len(self.listeners),
                 f" ({len(self.unbound)} failed to bind, retrying)" if self.unbound else "",
                 SPAWN_PATH)
        self.notifier.ready(self.status_line())
        handoff.tell_predecessor()
        self._tick_watchdog()
        while not (self.stopping and not self.children and not self.sessions
                   and not (self.control is not None and self.control.sessions)):
            for key, events in self.selector.select(self.timers.timeout()):
                self._dispatch(key, events)
            self.timers.run_due()
        self._close_endpoints()
        log.info("superd stopped")
        return 0

    def _close_endpoints(self) -> None:
        if self.control is not None:
            self.control.close()
            self.control = None
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def _endpoints(self, cfg: Config) -> None:
        """(Re)open the control socket and the metrics listener if they moved."""
        if self.control is None or self.control.path != cfg.control:
            if self.control is not None:
                self.control.close()
                self.control = None
            try:
                self.control = ControlServer(cfg.control, self.selector, self.timers,
                                             self._on_control)
            except OSError as e:
                log.warning("control socket %s: %s; superd status/reload will not reach "
                            "this daemon", cfg.control, e.strerror or e)
        if self.metrics is None or self.metrics.addr != cfg.metrics:
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None
            if cfg.metrics is not None:
                from superd.metrics import MetricsServer  # only when asked for
                try:
                    self.metrics = MetricsServer(cfg.metrics, self.selector, self.timers,
                                                 self._metrics_snapshot)
                except OSError as e:
                    log.error("metrics: cannot listen on %s: %s", cfg.metrics,
                              e.strerror or e)

    def _on_control(self, request: dict[str, object]) -> dict[str, object]:
        """Answer one control request; to a client of protocol 2, say which
        daemon answered (see superd.control)."""
        modern = control.protocol_of(request) >= 2
        reply = self._control_reply(request, modern)
        if modern:
            reply.update(protocol=control.PROTOCOL, pid=self.pid, config=self.config_path)
        return reply

    def _control_reply(self, request: dict[str, object], modern: bool) -> dict[str, object]:
        command = request.get("command")
        if command not in ("status", "reload", "stop"):
            return {"ok": False, "error": f"unknown command {command!r} "
                                          "(status, reload or stop)"}
        if command == "status":
            return status.report(self)
        refused = control.wrong_file(request, self.pid, self.config_path)
        if refused is not None:
            log.warning("control socket: %s refused: it was meant for %s, this superd "
                        "runs %s", command, request.get("config"), self.config_path)
            return refused
        if command == "reload":
            errors = self.reload()
            if errors:
                return {"ok": False, "errors": errors}
            # in force, but a listener that failed to bind is a failure too
            return {"ok": not self.unbound, "applied": True, "errors": self.unbound_text()}
        again, programs = self.stopping, len(self.children)
        now = "SIGKILL" if self.terminated else "SIGTERM"  # what a stop again sends
        grace = self._grace()
        self.stop("stop requested on the control socket", "superd stop")
        if not modern:
            return {"ok": True}
        return {"ok": True, "again": again, "signal": now, "programs": programs,
                "stop_timeout": self.config.stop_timeout, "kill_grace": grace}

    def _metrics_snapshot(self) -> dict[str, object]:
        services = {name: {"accepted": st.accepted, "active": st.active,
                           "spawn_failures": st.spawn_failures, "rejected": st.rejected,
                           "exits": st.exits, "durations": st.durations,
                           "health_checks": st.health_checks}
                    for name, st in self.stats.items()}
        return {"services": services, "listeners": len(self.listeners),
                "reloads": self.reloads, "last_reload_ok": self.last_reload_ok}

    def status_line(self) -> str:
        services = sum(s.enabled for s in self.config.services)
        missing = (f" ({len(self.unbound)} failed to bind, retrying)"
                   if self.unbound else "")
        return (f"{services} services, {len(self.listeners)} listeners{missing}, "
                f"{self.total_active} active connections")

    def _tick_watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is None or self.stopping and not self.children:
            return
        self.notifier.watchdog()
        self.notifier.status(self.status_line())
        self.timers.call_later(interval, self._tick_watchdog)

    def _take_handed(self, handed: list[Handed]) -> None:
        for h in handed:
            protocol, addr = socket_address(h.sock)
            self.handed[key_for(addr, protocol)] = (h, addr)
            log.info("received socket %s/%s%s from LISTEN_FDS", addr, protocol,
                     f" named {h.name}" if h.name else "")

    def _dispatch(self, key: selectors.SelectorKey, events: int) -> None:
        try:
            key.data(events)
        except Exception:  # a bug costs what its handler owns, never the loop
            name = guard.kind(key.data)
            self.internal_errors[name] += 1
            count = self.internal_errors[name]
            if count == 1:
                log.exception("internal error in %s; what it handled is closed or "
                              "paused, the loop goes on", name)
            elif count in (10, 100, 1000, 10_000, 100_000):
                log.error("internal error in %s: %d so far (the traceback was logged "
                          "at the first)", name, count)
            guard.contain(self.selector, self.timers, key)

    def _setup_signals(self) -> None:
        rsock, wsock = socket.socketpair()
        rsock.setblocking(False)
        wsock.setblocking(False)
        self._wakeup = (rsock, wsock)
        signal.set_wakeup_fd(wsock.fileno(), warn_on_full_buffer=False)
        for sig in _HANDLED:
            signal.signal(sig, _noop)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        for sig in signal.valid_signals():
            if sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGKILL, signal.SIGSTOP):
                continue  # Popen's restore_signals resets these two in children
            try:
                if signal.getsignal(sig) == signal.SIG_IGN:
                    signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
        self.selector.register(rsock, _READ, self._on_signals)

    def _on_signals(self, events: int) -> None:
        assert self._wakeup is not None
        try:
            data = self._wakeup[0].recv(512)
        except BlockingIOError:
            return
        for signum in data:
            if signum == signal.SIGHUP:
                self.reload()
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self.stop(signal.Signals(signum).name, _AGAIN[signum])
            elif signum == signal.SIGCHLD:
                self.children.reap_unwatched()
            elif signum == signal.SIGUSR1:
                logmod.reopen()
            elif signum == signal.SIGUSR2:
                self._hand_over()

    def reload(self) -> list[str]:
        """Re-read the configuration; the problems that refused it, or []."""
        if self.stopping:
            return ["superd is stopping"]
        log.info("reloading %s", self.config_path)
        self.notifier.reloading()
        try:
            cfg = configmod.load(self.config_path)
        except ConfigError as e:
            for problem in e.problems:
                log.error("%s", problem)
            log.error("reload refused: %d problem(s); keeping the running configuration",
                      len(e.problems))
            self.reloads["refused"] += 1
            self.last_reload_ok = 0
            self.notifier.ready(self.status_line())
            return [str(p) for p in e.problems]
        self._apply(cfg)
        self._endpoints(cfg)
        self.reloads["accepted"] += 1
        self.last_reload_ok = 1
        log.info("reloaded: %d services, %d listeners%s",
                 sum(s.enabled for s in cfg.services), len(self.listeners),
                 f"; {len(self.unbound)} failed to bind" if self.unbound else "")
        self.notifier.ready(self.status_line())
        return []

    def stop(self, why: str, again: str = "a stop") -> None:
        """Close every listener; running programs get stop_timeout to finish.

        *why* names the cause in the log, *again* what the user does to stop
        the programs now: the second stop sends them SIGTERM (then SIGKILL
        after kill_grace), the third SIGKILL."""
        if self.stopping:
            self._stop_now(why, again)
            return
        self.stopping = True
        if self.bind_timer is not None:
            self.bind_timer.cancel()
        self.notifier.stopping()
        log.info("%s: closing listeners; %d program(s) running", why, len(self.children))
        for listener in list(self.listeners.values()):
            self._close(listener)
        self.listeners.clear()
        for pending in list(self.pending):
            pending.cancel()
        self.pending.clear()
        self.linger.close_all()
        self._close_sessions()
        if self.children:
            log.info("waiting up to %g s for %s; %s again stops them now",
                     self.config.stop_timeout, _programs(len(self.children)), again)
            self.stop_timer = self.timers.call_later(self.config.stop_timeout,
                                                     self._stop_timeout)

    def _stop_now(self, why: str, again: str) -> None:
        """A stop while stopping: the running programs stop now."""
        count = len(self.children)
        if not count:
            return
        if not self.terminated:
            log.info("%s again: stopping %s now (SIGTERM, then SIGKILL after %g s; %s "
                     "again kills them)", why, _programs(count), self._grace(), again)
            self._terminate()
        else:
            log.warning("%s again: killing %s now (SIGKILL)", why, _programs(count))
            self.children.signal_all(signal.SIGKILL)

    def _close_sessions(self) -> None:
        for session in list(self.sessions):
            session.close()

    def _stop_timeout(self) -> None:
        if self.terminated:  # a second stop did it already
            return
        log.warning("stop_timeout: sending SIGTERM to %d program(s)", len(self.children))
        self._terminate()

    def _terminate(self) -> None:
        """SIGTERM to every running program now, SIGKILL after kill_grace."""
        if self.stop_timer is not None:
            self.stop_timer.cancel()
            self.stop_timer = None
        self.terminated = True
        self.children.signal_all(signal.SIGTERM)
        self.timers.call_later(self._grace(), lambda: self.children.signal_all(signal.SIGKILL))

    def _grace(self) -> float:
        """The longest kill_grace of the running programs' services."""
        return max((c.service.kill_grace for c in self.children), default=5.0)

    # --- configuration ------------------------------------------------

    def _wanted(self, cfg: Config) -> dict[ListenerKey, tuple[ListenAddr, Service]]:
        """Every listener the configuration asks for.  A socket handed in under
        a service's name (FileDescriptorName=) replaces that service's own
        listen addresses: systemd decides where it listens."""
        wanted: dict[ListenerKey, tuple[ListenAddr, Service]] = {}
        for svc in (s for s in cfg.services if s.enabled):
            named = [(k, a) for k, (h, a) in self.handed.items() if h.name == svc.name]
            for key, addr in named:
                if key[0] != svc.protocol:
                    log.error("%s: the socket named %s is %s, the service is %s; not used",
                              svc.name, svc.name, key[0], svc.protocol)
                else:
                    wanted[key] = (addr, svc)
            if not named:
                for addr in svc.listen:
                    wanted[key_for(addr, svc.protocol)] = (addr, svc)
        unused = [a for k, (h, a) in self.handed.items() if k not in wanted]
        for addr in unused:
            log.warning("a socket received through LISTEN_FDS (%s) matches no service; "
                        "kept open unused", addr)
        return wanted

    def _apply(self, cfg: Config) -> None:
        wanted = self._wanted(cfg)
        for key in [k for k in self.listeners if k not in wanted]:
            self._close(self.listeners.pop(key))
        self.config = cfg
        self.programs = {s.name: Program.for_service(s) for s in cfg.services if s.exec}
        for svc in cfg.services:
            self.stats.setdefault(svc.name, ServiceStats())
        old = self.buckets
        self.buckets = {s.name: bucket_for(s, old.get(s.name)) for s in cfg.services if s.rate}
        loop_ports = LOOP_PORTS | {a.port for s in cfg.services if s.internal and s.datagram
                                   for a in s.listen}
        self.loop_ports = loop_ports
        self.unbound = {}
        for key, (addr, svc) in wanted.items():
            why = self._listen(key, addr, svc)
            if why is not None:
                log.error("%s: cannot listen on %s: %s; retrying", svc.name,
                          describe(addr, svc), why)
                self.unbound[key] = (addr, svc, why)
        self.bind_retry = BIND_RETRY_FIRST
        self._arm_bind_retry()

    def _listen(self, key: ListenerKey, addr: ListenAddr, svc: Service) -> str | None:
        """Bind, adopt or update one listener; why it failed, or None."""
        listener = self.listeners.get(key)
        try:
            if listener is None and key in self.handed:
                listener = adopt_listener(self.handed[key][0].sock, addr, svc,
                                          own=self.handed[key][0].own)
                self.listeners[key] = listener
            elif listener is None:
                listener = open_listener(addr, svc)
                self.listeners[key] = listener
            else:
                apply_options(listener, svc)
        except OSError as e:
            return str(e.strerror or e)
        listener.extra["udp"] = (
            UdpService(svc.internal, listener.sock, self.loop_ports, svc,
                       rejected=self.stats[svc.name].rejected, throttled=self._throttled)
            if svc.internal and svc.datagram else None)
        if listener.state in (State.LISTENING, State.FULL):
            self._set_state(listener, State.LISTENING)
        return None

    def _arm_bind_retry(self) -> None:
        if self.bind_timer is not None:
            self.bind_timer.cancel()
        self.bind_timer = (self.timers.call_later(self.bind_retry, self._retry_binds)
                           if self.unbound and not self.stopping else None)

    def _retry_binds(self) -> None:
        """Listeners that failed to bind are tried again, less and less often."""
        self.bind_timer = None
        for key, (addr, svc, _) in list(self.unbound.items()):
            why = self._listen(key, addr, svc)
            if why is None:
                del self.unbound[key]
                log.info("%s: now listening on %s", svc.name, describe(addr, svc))
            else:
                self.unbound[key] = (addr, svc, why)
        self.bind_retry = min(self.bind_retry * 2, BIND_RETRY_MAX)
        self._arm_bind_retry()
        self.notifier.status(self.status_line())

    def unbound_text(self) -> list[str]:
        return [f"{svc.name}: cannot listen on {describe(addr, svc)}: {why}"
                for addr, svc, why in self.unbound.values()]


def _programs(count: int) -> str:
    return f"{count} program" if count == 1 else f"{count} programs"


def _noop(signum: int, frame: object) -> None:
    """Signal handler: the wakeup fd carries the signal into the loop."""
