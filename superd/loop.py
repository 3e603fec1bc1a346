"""The daemon: one selectors loop that owns every piece of mutable state.

Listeners, children, internal sessions, counters and timers live here.
Signals arrive as bytes on a socketpair (``signal.set_wakeup_fd``) and are
dispatched from the loop, never inside a handler.  Each child is watched
through a pidfd and reaped with ``waitpid(WNOHANG)`` when it becomes
readable; the select timeout is the next timer's deadline.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from superd import config as configmod
from superd import handoff, status
from superd import log as logmod
from superd.children import Child, Children
from superd.config import Config, ListenAddr, Service
from superd.control import ControlServer
from superd.errors import ConfigError
from superd.handoff import HandOver, Successor
from superd.internal import LOOP_PORTS, TcpSession, UdpService
from superd.limits import Throttle, TokenBucket, access, client_ip, source_group
from superd.listeners import (
    Listener,
    ListenerKey,
    State,
    adopt_listener,
    apply_options,
    close_listener,
    key_for,
    open_listener,
    socket_address,
)
from superd.metrics import Durations, MetricsServer
from superd.notify import Handed, Notifier, handed_sockets
from superd.spawn import Program, connection_env
from superd.timers import Timer, Timers

log = logging.getLogger(__name__)

ACCEPT_BATCH = 32
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
BACKOFF_SECONDS = 0.5
QUICK_EXIT = 1.0  # a wait-mode program that fails sooner than this backs off
_HANDLED = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1,
            signal.SIGUSR2, signal.SIGCHLD)
_READ = selectors.EVENT_READ


@dataclass
class ServiceStats:
    accepted: int = 0
    active: int = 0
    spawn_failures: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    exits: Counter[str] = field(default_factory=Counter)
    durations: Durations = field(default_factory=Durations)


class Daemon(HandOver):
    def __init__(self, config_path: str, cfg: Config,
                 reexec_argv: list[str] | None = None) -> None:
        self.config_path = config_path
        self.reexec_argv = reexec_argv or [sys.executable, "-m", "superd", "run",
                                           "-c", config_path]
        self.config = cfg
        self.selector = selectors.DefaultSelector()
        self.timers = Timers()
        self.listeners: dict[ListenerKey, Listener] = {}
        self.children = Children(self.selector, self.timers, self._child_exited)
        self.sessions: set[TcpSession] = set()
        self.programs: dict[str, Program] = {}
        self.stats: dict[str, ServiceStats] = {}
        self.total_active = 0
        self.full: set[Listener] = set()
        self.per_source: Counter[tuple[str, str]] = Counter()
        self.buckets: dict[str, TokenBucket] = {}
        self.throttle = Throttle()
        self.summary_timer: Timer | None = None
        self.stopping = False
        self._wakeup: tuple[socket.socket, socket.socket] | None = None
        self.notifier = Notifier()
        self.handed: dict[ListenerKey, tuple[Handed, ListenAddr]] = {}
        self.successor: Successor | None = None
        self.handed_by_predecessor = False
        self.pid = os.getpid()
        self.started = time.monotonic()
        self.reloads: Counter[str] = Counter()
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
        log.info("superd %d ready: %d services, %d listeners", os.getpid(),
                 sum(s.enabled for s in self.config.services), len(self.listeners))
        self.notifier.ready(self.status_line())
        handoff.tell_predecessor()
        self._tick_watchdog()
        while not (self.stopping and not self.children and not self.sessions):
            for key, events in self.selector.select(self.timers.timeout()):
                self._dispatch(key.data, events)
            self.timers.run_due()
        if self.control is not None:
            self.control.close()
        if self.metrics is not None:
            self.metrics.close()
        log.info("superd stopped")
        return 0

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
                try:
                    self.metrics = MetricsServer(cfg.metrics, self.selector, self.timers,
                                                 self._metrics_snapshot)
                except OSError as e:
                    log.error("metrics: cannot listen on %s: %s", cfg.metrics,
                              e.strerror or e)

    def _on_control(self, request: dict[str, object]) -> dict[str, object]:
        command = request.get("command")
        if command == "status":
            return status.report(self)
        if command == "reload":
            errors = self.reload()
            return {"ok": not errors, "errors": errors}
        if command == "stop":
            self.stop("stop requested on the control socket")
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {command!r} "
                                      "(status, reload or stop)"}

    def _metrics_snapshot(self) -> dict[str, object]:
        services = {name: {"accepted": st.accepted, "active": st.active,
                           "spawn_failures": st.spawn_failures, "rejected": st.rejected,
                           "exits": st.exits, "durations": st.durations}
                    for name, st in self.stats.items()}
        return {"services": services, "listeners": len(self.listeners),
                "reloads": self.reloads, "last_reload_ok": self.last_reload_ok}

    def status_line(self) -> str:
        services = sum(s.enabled for s in self.config.services)
        return (f"{services} services, {len(self.listeners)} listeners, "
                f"{self.total_active} active connections")

    def _tick_watchdog(self) -> None:
        interval = self.notifier.watchdog_interval()
        if interval is None or self.stopping and not self.children:
            return
        self.notifier.watchdog()
        self.notifier.status(self.status_line())
        self.timers.call_later(interval, self._tick_watchdog)

    def _take_handed(self, handed: list[Handed]) -> None:
        self.handed_by_predecessor = bool(handed) and handoff.from_predecessor()
        for h in handed:
            protocol, addr = socket_address(h.sock)
            self.handed[key_for(addr, protocol)] = (h, addr)
            log.info("received socket %s/%s%s from LISTEN_FDS", addr, protocol,
                     f" named {h.name}" if h.name else "")

    def _dispatch(self, handler: Callable[[int], None], events: int) -> None:
        try:
            handler(events)
        except Exception:  # a bug must not take every service down
            log.exception("internal error in %r; continuing", handler)

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
                self.stop(signal.Signals(signum).name)
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
        log.info("reloaded: %d services, %d listeners",
                 sum(s.enabled for s in cfg.services), len(self.listeners))
        self.notifier.ready(self.status_line())
        return []

    def stop(self, why: str) -> None:
        if self.stopping:
            log.info("%s again: stopping programs now", why)
            self.children.signal_all(signal.SIGTERM)
            return
        self.stopping = True
        self.notifier.stopping()
        log.info("%s: closing listeners; %d program(s) running", why, len(self.children))
        for listener in list(self.listeners.values()):
            self._close(listener)
        self.listeners.clear()
        self._close_sessions()
        if self.children:
            self.timers.call_later(self.config.stop_timeout, self._stop_timeout)

    def _close_sessions(self) -> None:
        for session in list(self.sessions):
            session.close()

    def _stop_timeout(self) -> None:
        log.warning("stop_timeout: sending SIGTERM to %d program(s)", len(self.children))
        self.children.signal_all(signal.SIGTERM)
        grace = max((c.service.kill_grace for c in self.children), default=5.0)
        self.timers.call_later(grace, lambda: self.children.signal_all(signal.SIGKILL))

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
        self.buckets = {s.name: (old[s.name] if s.name in old and old[s.name].rate == s.rate
                                 else TokenBucket(s.rate))
                        for s in cfg.services if s.rate}
        loop_ports = LOOP_PORTS | {a.port for s in cfg.services if s.internal and s.datagram
                                   for a in s.listen}
        for key, (addr, svc) in wanted.items():
            listener = self.listeners.get(key)
            try:
                if listener is None and key in self.handed:
                    listener = adopt_listener(self.handed[key][0].sock, addr, svc,
                                              own=self.handed_by_predecessor)
                    self.listeners[key] = listener
                elif listener is None:
                    listener = open_listener(addr, svc)
                    self.listeners[key] = listener
                else:
                    apply_options(listener, svc)
            except OSError as e:
                log.error("%s: cannot listen on %s/%s: %s", svc.name, addr, svc.protocol,
                          e.strerror or e)
                continue
            listener.extra["udp"] = (
                UdpService(svc.internal, listener.sock, loop_ports,
                           lambda peer, svc=svc: access(svc, client_ip(peer))[0])
                if svc.internal and svc.datagram else None)
            if listener.state in (State.LISTENING, State.FULL):
                self._set_state(listener, State.LISTENING)

    # --- listeners ----------------------------------------------------

    def _set_state(self, listener: Listener, state: State) -> None:
        was_watched = listener.extra.get("watched")
        listener.state = state
        self.full.discard(listener)
        if state == State.FULL:
            self.full.add(listener)
        if state == State.LISTENING and not was_watched:
            self.selector.register(listener.sock, _READ, lambda ev: self._on_listener(listener))
            listener.extra["watched"] = True
        elif state != State.LISTENING and listener.extra.get("watched"):
            self.selector.unregister(listener.sock)
            listener.extra["watched"] = False

    def _close(self, listener: Listener) -> None:
        self._set_state(listener, State.CLOSED)
        if listener.adopted:  # systemd's: stays open for a later reload
            listener.sock.setblocking(False)
        else:
            self.handed.pop(listener.key, None)
            close_listener(listener)

    def _backoff(self, listener: Listener, delay: float,
                 state: State = State.BACKOFF) -> None:
        self._set_state(listener, state)

        def rearm() -> None:
            if listener.state == state:
                self._set_state(listener, State.LISTENING)
        self.timers.call_later(delay, rearm)

    def _on_listener(self, listener: Listener) -> None:
        if listener.state != State.LISTENING:
            return  # closed or paused earlier in this same batch of events
        svc = listener.service
        udp = listener.extra.get("udp")
        if udp is not None:
            udp(_READ)  # type: ignore[operator]
        elif svc.wait:
            self._start_wait(listener)
        else:
            self._accept(listener)

    def _at_limit(self, svc: Service) -> bool:
        return (self.stats[svc.name].active >= svc.max_connections
                or self.total_active >= self.config.max_connections)

    def _accept(self, listener: Listener) -> None:
        svc = listener.service
        bucket = self.buckets.get(svc.name)
        for _ in range(ACCEPT_BATCH):
            if svc.on_limit == "queue" and self._hold(listener, bucket):
                return
            try:
                fd, peer = listener.sock._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                self._accept_failed(listener, e)
                return
            conn = socket.socket(listener.sock.family, listener.sock.type, 0, fd)
            source = self._admit(svc, conn, peer, bucket)
            if source is not None:
                self._serve(listener, conn, peer, source)

    def _hold(self, listener: Listener, bucket: TokenBucket | None) -> bool:
        """on_limit: queue — stop accepting while at a limit; True if held."""
        if self._at_limit(listener.service):
            self._set_state(listener, State.FULL)
            return True
        if bucket is not None and not bucket.ready():
            self._backoff(listener, bucket.wait(), State.RATE)
            return True
        return False

    def _admit(self, svc: Service, conn: socket.socket, peer: object,
               bucket: TokenBucket | None) -> tuple[str, str] | None:
        """The client's per-source key if it may have a program, else None
        (the connection is then closed, counted and logged)."""
        ip = client_ip(peer)
        allowed, rule = access(svc, ip)
        if not allowed:
            self._refuse(svc, conn, peer, "denied", rule, message=False)
            return None
        if self._at_limit(svc):
            self._refuse(svc, conn, peer, "limit", "max_connections reached")
            return None
        source = (svc.name, source_group(svc, ip))
        if self.per_source[source] >= svc.per_source:
            self._refuse(svc, conn, peer, "per_source",
                         f"{source[1]} has {svc.per_source} connections (per_source)")
            return None
        if bucket is not None and not bucket.take():
            self._refuse(svc, conn, peer, "rate", f"over {svc.rate:g} connections/s (rate)")
            return None
        return source

    def _refuse(self, svc: Service, conn: socket.socket, peer: object, reason: str,
                why: str, message: bool = True) -> None:
        self.stats[svc.name].rejected[reason] += 1
        if message and svc.reject_message:
            try:
                conn.setblocking(False)
                conn.send(svc.reject_message.encode())
            except OSError:
                pass
        conn.close()
        if self.throttle.first(f"{svc.name} {reason} {_peer_host(peer)}"):
            log.warning("%s: refused %s: %s", svc.name, logmod.client_text(_peer_text(peer)),
                        why)
        elif self.summary_timer is None:
            self.summary_timer = self.timers.call_later(self.throttle.window,
                                                        self._log_summary)

    def _log_summary(self) -> None:
        self.summary_timer = None
        count = self.throttle.summary_due()
        if count:
            log.warning("refused %d more connection(s) in the last %.0fs "
                        "(not logged one by one)", count, self.throttle.window)

    def _accept_failed(self, listener: Listener, e: OSError) -> None:
        if e.errno in RESOURCE_ERRNOS:
            if not listener.extra.get("warned"):
                log.warning("%s: accept on %s failed: %s; pausing it for %.1fs",
                            listener.service.name, listener.describe(), e.strerror,
                            BACKOFF_SECONDS)
                listener.extra["warned"] = True
        else:
            log.error("%s: accept on %s failed: %s", listener.service.name,
                      listener.describe(), e.strerror)
        self._backoff(listener, BACKOFF_SECONDS)

    # --- serving ------------------------------------------------------

    def _serve(self, listener: Listener, conn: socket.socket, peer: object,
               source: tuple[str, str]) -> None:
        svc = listener.service
        stats = self.stats[svc.name]
        stats.accepted += 1
        listener.extra.pop("warned", None)
        if svc.internal:
            session = TcpSession(svc.internal, conn, self.selector, self._session_closed)
            session.service = svc
            session.source = source
            session.peer = _peer_text(peer)
            self.sessions.add(session)
            self._count(svc, +1, source)
            session.start()
            return
        try:
            env = connection_env(conn, peer)
            child = self._spawn(svc, conn.fileno(), env, _peer_text(peer))
        except OSError:
            child = None
        finally:
            conn.close()
        if child is not None:
            child.source = source
            self._count(svc, +1, source)

    def _start_wait(self, listener: Listener) -> None:
        svc = listener.service
        self._set_state(listener, State.BUSY)
        listener.sock.setblocking(True)
        try:
            child = self._spawn(svc, listener.fd, connection_env(listener.sock, None),
                                listener.describe(), listener)
        except OSError:
            child = None
        if child is None:
            listener.sock.setblocking(False)
            listener.fail_streak += 1
            self._backoff(listener, _streak_delay(listener.fail_streak))
            return
        self._count(svc, +1)

    def _spawn(self, svc: Service, stdio: int, env: dict[str, str], peer: str,
               listener: Listener | None = None) -> Child | None:
        try:
            return self.children.start(self.programs[svc.name], stdio, env, peer, listener)
        except OSError as e:
            self.stats[svc.name].spawn_failures += 1
            log.error("%s: cannot start %s for %s: %s", svc.name, svc.exec[0],
                      logmod.client_text(peer), e.strerror or e)
            return None

    def _child_exited(self, child: Child) -> None:
        svc, code = child.service, child.returncode
        status = child.status()
        elapsed = time.monotonic() - child.started
        stats = self.stats.setdefault(svc.name, ServiceStats())
        stats.exits[status] += 1
        stats.durations.observe(elapsed)
        client = logmod.client_text(child.peer)
        log.info("%s[%d] %s: %s after %.3fs", svc.name, child.pid, client, status, elapsed,
                 extra={"service": svc.name, "pid": child.pid, "client": client,
                        "status": status, "duration": round(elapsed, 6)})
        self._count(svc, -1, child.source)
        if child.listener is not None:
            self._wait_done(child.listener, code, elapsed)

    def _wait_done(self, listener: Listener, code: int, elapsed: float) -> None:
        if listener.state == State.CLOSED:
            return
        listener.sock.setblocking(False)
        if code != 0 and elapsed < QUICK_EXIT:
            listener.fail_streak += 1
            delay = _streak_delay(listener.fail_streak)
            if listener.fail_streak in (1, 5, 20):
                log.warning("%s: program failed quickly %d time(s) in a row; "
                            "waiting %.1fs before the next start",
                            listener.service.name, listener.fail_streak, delay)
            self._backoff(listener, delay)
            return
        listener.fail_streak = 0
        self._set_state(listener, State.LISTENING)

    def _session_closed(self, session: TcpSession) -> None:
        self.sessions.discard(session)
        assert session.service is not None
        self.stats[session.service.name].durations.observe(time.monotonic() - session.started)
        self._count(session.service, -1, session.source)

    def _count(self, svc: Service, delta: int, source: tuple[str, str] | None = None) -> None:
        stats = self.stats.setdefault(svc.name, ServiceStats())
        stats.active += delta
        self.total_active += delta
        if source is not None:
            self.per_source[source] += delta
            if self.per_source[source] <= 0:
                del self.per_source[source]
        if delta < 0 and self.full:
            for listener in list(self.full):
                if not self._at_limit(listener.service):
                    self._set_state(listener, State.LISTENING)


def _noop(signum: int, frame: object) -> None:
    """Signal handler: the wakeup fd carries the signal into the loop."""


def _streak_delay(streak: int) -> float:
    return min(0.1 * 2 ** min(streak, 10), 10.0)


def _peer_host(peer: object) -> str:
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


def _peer_text(peer: object) -> str:
    if isinstance(peer, tuple):
        host = str(peer[0])
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer) if peer else "local client"
