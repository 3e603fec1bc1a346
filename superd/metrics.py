"""Prometheus metrics, served from the daemon's own event loop.

prometheus-client renders the text format (``generate_latest``) from a
custom collector that reads the loop's counters at scrape time; there is
no second thread, so nothing reads loop state while the loop changes it.
The HTTP side is the least a scraper needs: ``GET /metrics`` (any other
path is 404), one request per connection, with the limits of
:mod:`superd.exchange` (8 scrapes at once, 2 s to send the request).  The
collector reads counters only: nothing here walks ``/proc``.
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
from superd.exchange import Endpoint, Exchange
from superd.timers import Timers

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_METHODS = (b"GET", b"HEAD")


def parse_request(data: bytes) -> str:
    """The path of the HTTP request whose head starts *data*.

    Pure, for fuzzing: raises :class:`ValueError` unless the request line is
    ``GET`` or ``HEAD`` followed by a target.  The target is decoded as
    Latin-1, so every byte string maps to some path.
    """
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ", 2)
    if len(parts) < 2 or parts[0] not in _METHODS or not parts[1]:
        raise ValueError("malformed request line")
    return parts[1].decode("latin-1")


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


class MetricsServer(Endpoint):
    def __init__(self, addr: ListenAddr, selector: selectors.BaseSelector, timers: Timers,
                 snapshot: Callable[[], dict]) -> None:  # type: ignore[type-arg]
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DaemonCollector(snapshot))
        self.addr = addr
        super().__init__("metrics", _listen(addr), selector, timers)

    def exchange(self, conn: socket.socket) -> Exchange:
        return _Scrape(self, conn)

    def render(self, path: str) -> bytes:
        if path.split("?", 1)[0] not in ("/metrics", "/"):
            body = b"not found\n"
            return _response(b"404 Not Found", b"text/plain", body)
        return _response(b"200 OK", CONTENT_TYPE.encode(), generate_latest(self.registry))


def _listen(addr: ListenAddr) -> socket.socket:
    host = addr.host or "::"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and addr.host is None:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, addr.port))
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    return sock


def _response(status: bytes, ctype: bytes, body: bytes) -> bytes:
    return (b"HTTP/1.0 " + status + b"\r\nContent-Type: " + ctype +
            b"\r\nContent-Length: " + str(len(body)).encode() +
            b"\r\nConnection: close\r\n\r\n" + body)


class _Scrape(Exchange):
    """One HTTP request: read the request head, answer, close."""

    def __init__(self, server: MetricsServer, conn: socket.socket) -> None:
        self.server = server
        super().__init__(conn, server)

    def complete(self, data: bytes) -> bool:
        return not data or b"\r\n\r\n" in self.inbuf or len(self.inbuf) > 16384

    def answer(self) -> bytes:
        try:
            path = parse_request(self.inbuf)
        except ValueError:
            return _response(b"400 Bad Request", b"text/plain", b"bad request\n")
        return self.server.render(path)
