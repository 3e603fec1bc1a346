"""Accepting clients: listener states, admission, refusals, starting programs.

A mixin of :class:`superd.loop.Daemon`, which owns the state used here
(listeners, counters, children, timers); this module holds the per-connection
path from ``accept()`` to a running program, and what happens when it ends.
"""

from __future__ import annotations

import logging
import selectors
import socket
import time
from typing import TYPE_CHECKING

from superd import log as logmod
from superd.children import Child
from superd.config import Service
from superd.guard import BACKOFF_SECONDS, RESOURCE_ERRNOS, Handler
from superd.internal import UDP_FLOOD_PAUSE, TcpSession
from superd.limits import (
    TokenBucket,
    access,
    client_ip,
    in_networks,
    plain_host,
    quick_group,
    source_group,
)
from superd.listeners import Listener, State, close_listener
from superd.pending import MAX_PENDING, Pending
from superd.proxy import ProxyHeader
from superd.spawn import connection_env, failure_text
from superd.stats import ServiceStats

if TYPE_CHECKING:
    from superd.loop import Daemon

log = logging.getLogger("superd.loop")

ACCEPT_BATCH = 32
QUICK_EXIT = 1.0  # a wait-mode program that fails sooner than this backs off
# An honest balancer never sends a malformed PROXY header.  Past this many a
# second on one listener, from hosts in proxy_from, the listener is paused for
# PROXY_PAUSE: a storm of bad headers then costs the daemon a bounded share of
# a core instead of all of it.  Only proxy_from hosts can trigger it, and they
# carry that listener's traffic anyway.
PROXY_ERRORS_PER_SECOND = 100
PROXY_PAUSE = 1.0
_READ = selectors.EVENT_READ


class Acceptor:
    """The serving half of the daemon (see the module docstring)."""

    # --- listeners ----------------------------------------------------

    def _set_state(self: Daemon, listener: Listener, state: State) -> None:
        was_watched = listener.extra.get("watched")
        listener.state = state
        self.full.discard(listener)
        if state == State.FULL:
            self.full.add(listener)
        if state == State.LISTENING and not was_watched:
            self.selector.register(listener.sock, _READ, Handler(
                lambda ev: self._on_listener(listener),
                lambda: self._backoff(listener, BACKOFF_SECONDS)))
            listener.extra["watched"] = True
        elif state != State.LISTENING and listener.extra.get("watched"):
            self.selector.unregister(listener.sock)
            listener.extra["watched"] = False

    def _close(self: Daemon, listener: Listener) -> None:
        self._set_state(listener, State.CLOSED)
        if listener.adopted:  # systemd's: stays open for a later reload
            listener.sock.setblocking(False)
        else:
            self.handed.pop(listener.key, None)
            close_listener(listener)

    def _backoff(self: Daemon, listener: Listener, delay: float,
                 state: State = State.BACKOFF) -> None:
        self._set_state(listener, state)

        def rearm() -> None:
            if listener.state == state:
                self._set_state(listener, State.LISTENING)
        self.timers.call_later(delay, rearm)

    def _on_listener(self: Daemon, listener: Listener) -> None:
        if listener.state != State.LISTENING:
            return  # closed or paused earlier in this same batch of events
        svc = listener.service
        udp = listener.extra.get("udp")
        if udp is not None:
            if udp(_READ):  # type: ignore[operator]
                self._backoff(listener, UDP_FLOOD_PAUSE, State.FLOOD)
        elif svc.wait:
            self._start_wait(listener)
        else:
            self._accept(listener)

    def _at_limit(self: Daemon, svc: Service) -> bool:
        return (self.stats[svc.name].active >= svc.max_connections
                or self.total_active >= self.config.max_connections)

    def _accept(self: Daemon, listener: Listener) -> None:
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
            if svc.proxy_protocol:
                self._await_proxy(listener, conn, peer)
                continue
            source = self._admit(svc, conn, peer, bucket)
            if source is not None:
                self._serve(listener, conn, peer, source)

    # --- PROXY protocol -------------------------------------------------

    def _await_proxy(self: Daemon, listener: Listener, conn: socket.socket,
                     peer: object) -> None:
        svc = listener.service
        if not in_networks(svc.proxy_from, client_ip(peer)):
            self._refuse(svc, conn, peer, "proxy_from",
                         "not in proxy_from (PROXY headers are taken only from the "
                         "balancers listed there)", message=False)
        elif len(self.pending) >= MAX_PENDING:
            self._refuse(svc, conn, peer, "proxy_pending",
                         f"{MAX_PENDING} connections already wait for a PROXY header",
                         message=False)
        else:
            pending = Pending(conn, peer, svc.proxy_protocol or "any", svc.proxy_timeout,
                              self.selector, self.timers, self._proxy_done,
                              self._proxy_failed)
            pending.context = listener
            self.pending.add(pending)

    def _proxy_done(self: Daemon, pending: Pending, header: ProxyHeader) -> None:
        self.pending.discard(pending)
        listener = pending.context
        assert isinstance(listener, Listener)
        svc, conn = listener.service, pending.conn
        if listener.state == State.CLOSED or self.stopping:
            conn.close()
            return
        if _health_check(header, pending.peer):
            self.stats[svc.name].health_checks += 1
            conn.close()
            return
        source = self._admit(svc, conn, header.source, self.buckets.get(svc.name))
        if source is not None:
            self._serve(listener, conn, header.source, source)

    def _proxy_failed(self: Daemon, pending: Pending, why: str) -> None:
        self.pending.discard(pending)
        listener = pending.context
        assert isinstance(listener, Listener)
        svc = listener.service
        self._refuse(svc, pending.conn, pending.peer, "proxy", why, message=False)
        if pending.expired or listener.state != State.LISTENING:
            return
        if listener.proxy_errors is None:
            listener.proxy_errors = TokenBucket(PROXY_ERRORS_PER_SECOND)
        if not listener.proxy_errors.take():
            self._throttled(f"{svc.name} proxy pause", logging.WARNING,
                            "%s: over %d malformed PROXY headers a second on %s (the last "
                            "from %s); pausing it for %.0fs", svc.name,
                            PROXY_ERRORS_PER_SECOND, listener.describe(),
                            _peer_text(pending.peer), PROXY_PAUSE)
            self._backoff(listener, PROXY_PAUSE, State.BAD_PROXY)

    def _hold(self: Daemon, listener: Listener, bucket: TokenBucket | None) -> bool:
        """on_limit: queue — stop accepting while at a limit; True if held."""
        if self._at_limit(listener.service):
            self._set_state(listener, State.FULL)
            return True
        if bucket is not None and not bucket.ready():
            self._backoff(listener, bucket.wait(), State.RATE)
            return True
        return False

    def _admit(self: Daemon, svc: Service, conn: socket.socket, peer: object,
               bucket: TokenBucket | None) -> tuple[str, str] | None:
        """The client's per-source key if it may have a program, else None
        (the connection is then closed, counted and logged)."""
        group = quick_group(svc, peer)  # IPv4 /32, no rules: no ipaddress objects
        if group is None:
            ip = client_ip(peer)
            allowed, rule = access(svc, ip)
            if not allowed:
                self._refuse(svc, conn, peer, "denied", logmod.rule_text(rule), message=False)
                return None
            group = source_group(svc, ip)
        if self._at_limit(svc):
            self._refuse(svc, conn, peer, "limit", "max_connections reached")
            return None
        source = (svc.name, group)
        if self.per_source[source] >= svc.per_source:
            self._refuse(svc, conn, peer, "per_source",
                         f"{source[1]} has {svc.per_source} connections (per_source)")
            return None
        if bucket is not None and not bucket.take():
            self._refuse(svc, conn, peer, "rate", f"over {svc.rate:g} connections/s (rate)")
            return None
        return source

    def _refuse(self: Daemon, svc: Service, conn: socket.socket, peer: object, reason: str,
                why: str, message: bool = True) -> None:
        self.stats[svc.name].rejected[reason] += 1
        if message and svc.reject_message:
            self.linger.close(conn, svc.reject_message.encode())
        else:
            conn.close()
        self._throttled(f"{svc.name} {reason}", logging.WARNING, "%s: refused %s: %s",
                        svc.name, logmod.client_text(_peer_text(peer)), why)

    def _throttled(self: Daemon, key: str, level: int, msg: str, *args: object) -> None:
        """Log, unless *key* has had its share this window (then summarise)."""
        if self.throttle.first(key):
            log.log(level, msg, *args)
        elif self.summary_timer is None:
            self.summary_timer = self.timers.call_later(self.throttle.window,
                                                        self._log_summary)

    def _log_summary(self: Daemon) -> None:
        self.summary_timer = None
        count = self.throttle.summary_due()
        if count:
            log.warning("refused %d more connection(s) in the last %.0fs (refusals and "
                        "start failures are summarised, not logged one by one)",
                        count, self.throttle.window)

    def _accept_failed(self: Daemon, listener: Listener, e: OSError) -> None:
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

    def _serve(self: Daemon, listener: Listener, conn: socket.socket, peer: object,
               source: tuple[str, str]) -> None:
        svc = listener.service
        stats = self.stats[svc.name]
        stats.accepted += 1
        listener.extra.pop("warned", None)
        if svc.internal:
            session = TcpSession(svc.internal, conn, self.selector, self._session_closed,
                                 timers=self.timers, timeout=svc.timeout,
                                 idle_timeout=svc.idle_timeout)
            session.service = svc
            session.source = source
            session.peer = _peer_text(peer)
            self.sessions.add(session)
            self._count(svc, +1, source)
            session.start()
            return
        try:
            child = self._spawn(svc, conn, peer, None)
        except OSError as e:
            if e.errno in RESOURCE_ERRNOS and listener.state == State.LISTENING:
                self._backoff(listener, BACKOFF_SECONDS)  # out of descriptors: let some go
            return
        finally:
            conn.close()
        child.source = source
        self._count(svc, +1, source)

    def _start_wait(self: Daemon, listener: Listener) -> None:
        svc = listener.service
        self._set_state(listener, State.BUSY)
        listener.sock.setblocking(True)
        try:
            self._spawn(svc, listener.sock, None, listener)
        except OSError:
            listener.sock.setblocking(False)
            listener.fail_streak += 1
            self._backoff(listener, _streak_delay(listener.fail_streak))
            return
        self._count(svc, +1)

    def _spawn(self: Daemon, svc: Service, conn: socket.socket, peer: object,
               listener: Listener | None) -> Child:
        """Start *svc*'s program on *conn* (a client's connection, or in wait
        mode the listener itself, peer None).  A failure is counted and
        logged here, then raised for the caller to decide on its socket:
        the decision rests on this start's errno, never an older one's."""
        client = listener.describe() if listener is not None else _peer_text(peer)
        try:
            env = connection_env(conn, peer)
            return self.children.start(self.programs[svc.name], conn.fileno(), env, client,
                                       listener)
        except OSError as e:
            self._start_failed(svc, client, e)
            raise

    def _start_failed(self: Daemon, svc: Service, peer: str, e: OSError) -> None:
        self.stats[svc.name].spawn_failures += 1
        self._throttled(f"{svc.name} spawn {e.errno}", logging.ERROR,
                        "%s: cannot start %s for %s: %s", svc.name, svc.exec[0],
                        logmod.client_text(peer), failure_text(e))

    def _start_failed_later(self: Daemon, child: Child, e: OSError) -> None:
        """superd-exec (another user's program) reported after the spawn returned."""
        self._start_failed(child.service, child.peer, e)

    def _child_exited(self: Daemon, child: Child) -> None:
        svc, code = child.service, child.returncode
        status = child.status()
        elapsed = time.monotonic() - child.started
        stats = self.stats.get(svc.name) or self.stats.setdefault(svc.name, ServiceStats())
        client = logmod.client_text(child.peer)
        if child.start_failed:  # counted and said as a start failure, not a program's exit
            log.debug("%s[%d] %s: %s (never started)", svc.name, child.pid, client, status)
        else:
            stats.exits[status] += 1
            stats.durations.observe(elapsed)
            level = logging.INFO if code == 0 else logging.WARNING  # a failure shows at warning
            log.log(level, "%s[%d] %s: %s after %.3fs", svc.name, child.pid, client, status,
                    elapsed, extra={"service": svc.name, "pid": child.pid, "client": client,
                                    "status": status, "duration": round(elapsed, 6)})
        self._count(svc, -1, child.source)
        if child.listener is not None:
            self._wait_done(child.listener, code, elapsed)

    def _wait_done(self: Daemon, listener: Listener, code: int, elapsed: float) -> None:
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

    def _session_closed(self: Daemon, session: TcpSession) -> None:
        self.sessions.discard(session)
        assert session.service is not None
        self.stats[session.service.name].durations.observe(time.monotonic() - session.started)
        self._count(session.service, -1, session.source)

    def _count(self: Daemon, svc: Service, delta: int,
               source: tuple[str, str] | None = None) -> None:
        stats = self.stats.get(svc.name) or self.stats.setdefault(svc.name, ServiceStats())
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


def _health_check(header: ProxyHeader, peer: object) -> bool:
    """A balancer's own probe rather than a client: v2 LOCAL, v1 UNKNOWN, or
    (HAProxy's v1 checks) a header whose source is the connection itself."""
    if header.command != "PROXY" or not isinstance(header.source, tuple):
        return True
    if not isinstance(peer, tuple):
        return False
    return (client_ip(header.source) == client_ip(peer)
            and header.source[1] == peer[1])


def _streak_delay(streak: int) -> float:
    return min(0.1 * 2 ** min(streak, 10), 10.0)


def _peer_text(peer: object) -> str:
    if isinstance(peer, tuple):
        host = plain_host(str(peer[0]))
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer) if peer else "local client"
