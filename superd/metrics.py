"""Prometheus metrics, served from the daemon's own event loop.

prometheus-client renders the text format (``generate_latest``) from a
custom collector that reads the loop's counters at scrape time; there is
no second thread, so nothing reads loop state while the loop changes it.
The HTTP side is the least a scraper needs: ``GET /metrics`` (any other
path is 404), one request per connection, with a deadline.
"""

from __future__ import annotations

import logging
import selectors
import socket
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from superd.config import ListenAddr
from superd.exchange import Exchange
from superd.timers import Timers

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_R = selectors.EVENT_READ




class DaemonCollector(Collector):
    """Reads a snapshot function (called in the loop's thread at scrape time)."""

    def __init__(self, snapshot: Callable[[], dict]) -> None:  # type: ignore[type-arg]
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        labels = ["service"]
        accepted = CounterMetricFamily("superd_connections_accepted",
                                       "Connections accepted and served", labels=labels)
        rejected = CounterMetricFamily("superd_connections_rejected",
                                       "Connections refused, by reason",
                                       labels=["service", "reason"])
        failures = CounterMetricFamily("superd_spawn_failures",
                                       "Programs that could not be started", labels=labels)
        active = GaugeMetricFamily("superd_active_connections",
                                   "Connections being served now", labels=labels)
        exits = CounterMetricFamily("superd_child_exits", "Programs that ended, by status",
                                    labels=["service", "status"])
        checks = CounterMetricFamily("superd_health_checks",
                                     "PROXY LOCAL connections (balancer health checks)",
                                     labels=labels)
        hist = HistogramMetricFamily("superd_connection_duration_seconds",
                                     "How long programs ran", labels=labels)
        for name, s in snap["services"].items():
            accepted.add_metric([name], s["accepted"])
            failures.add_metric([name], s["spawn_failures"])
            checks.add_metric([name], s["health_checks"])
            active.add_metric([name], s["active"])
            for reason, n in s["rejected"].items():
                rejected.add_metric([name, reason], n)
            for status, n in s["exits"].items():
                exits.add_metric([name, status], n)
            hist.add_metric([name], s["durations"].buckets(), s["durations"].total)
        yield from (accepted, rejected, failures, checks, active, exits, hist)
        yield GaugeMetricFamily("superd_listeners", "Listening sockets open",
                                value=snap["listeners"])
        reloads = CounterMetricFamily("superd_reloads", "Configuration reloads, by result",
                                      labels=["result"])
        for result, n in snap["reloads"].items():
            reloads.add_metric([result], n)
        yield reloads
        yield GaugeMetricFamily("superd_last_reload_success",
                                "1 if the last reload was accepted (1 before any reload)",
                                value=snap["last_reload_ok"])


class MetricsServer:
    def __init__(self, addr: ListenAddr, selector: selectors.BaseSelector, timers: Timers,
                 snapshot: Callable[[], dict]) -> None:  # type: ignore[type-arg]
        self.selector = selector
        self.timers = timers
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DaemonCollector(snapshot))
        host = addr.host or "::"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and addr.host is None:
                self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            self.sock.bind((host, addr.port))
            self.sock.listen(64)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self.addr = addr
        selector.register(self.sock, _R, self._on_accept)

    def close(self) -> None:
        self.selector.unregister(self.sock)
        self.sock.close()

    def _on_accept(self, events: int) -> None:
        for _ in range(16):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as e:
                log.warning("metrics: accept failed: %s", e.strerror)
                return
            _Scrape(self, conn)

    def render(self, path: bytes) -> bytes:
        if path.split(b"?", 1)[0] not in (b"/metrics", b"/"):
            body = b"not found\n"
            return _response(b"404 Not Found", b"text/plain", body)
        return _response(b"200 OK", CONTENT_TYPE.encode(), generate_latest(self.registry))


def _response(status: bytes, ctype: bytes, body: bytes) -> bytes:
    return (b"HTTP/1.0 " + status + b"\r\nContent-Type: " + ctype +
            b"\r\nContent-Length: " + str(len(body)).encode() +
            b"\r\nConnection: close\r\n\r\n" + body)


class _Scrape(Exchange):
    """One HTTP request: read the request head, answer, close."""

    def __init__(self, server: MetricsServer, conn: socket.socket) -> None:
        self.server = server
        super().__init__(conn, server.selector, server.timers, 10.0)

    def complete(self, data: bytes) -> bool:
        return not data or b"\r\n\r\n" in self.inbuf or len(self.inbuf) > 16384

    def answer(self) -> bytes:
        parts = self.inbuf.split(b" ", 2)
        if len(parts) >= 2 and parts[0] in (b"GET", b"HEAD"):
            return self.server.render(parts[1])
        return _response(b"400 Bad Request", b"text/plain", b"bad request\n")
