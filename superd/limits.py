"""Access control and connection limits, as pure functions and small objects.

Nothing here touches sockets or the clock directly: the loop asks
``decide()`` whether a client may have a program, and owns the counters.
Time is injected (``clock``) so token buckets can be tested without sleeping.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from superd.config import Network, Service

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def client_ip(peer: object) -> IPAddress | None:
    """The client's address, with IPv4-mapped IPv6 turned back into IPv4."""
    if not isinstance(peer, tuple) or not peer:
        return None
    try:
        ip = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")


def no_reply_to(ip: IPAddress) -> bool:
    """True for a source address no datagram should be sent back to: the
    unspecified address (0.0.0.0/8, ::), multicast, and the IPv4 broadcast
    and reserved range 240.0.0.0/4 (OpenBSD inetd's dg_badinput).  A
    subnet's broadcast address cannot be known here; Linux drops datagrams
    from it, as from multicast sources, as martians before any socket."""
    if ip.is_unspecified or ip.is_multicast:
        return True
    return isinstance(ip, ipaddress.IPv4Address) and (ip in _THIS_NETWORK or ip.is_reserved)


def _contains(net: Network, ip: IPAddress) -> bool:
    return net.version == ip.version and ip in net


def in_networks(nets: tuple[Network, ...], ip: IPAddress | None) -> bool:
    return ip is not None and any(_contains(net, ip) for net in nets)


def access(service: Service, ip: IPAddress | None) -> tuple[bool, str]:
    """(allowed, the rule that decided).  Deny wins; a non-empty allow rejects
    everyone it does not name.  UNIX-socket clients (no IP) are allowed."""
    if ip is None:
        return True, "not an IP client (UNIX socket): allow/deny do not apply"
    for net in service.deny:
        if _contains(net, ip):
            return False, f"deny {net}"
    if not service.allow:
        return True, "no allow list: everyone not denied"
    for net in service.allow:
        if _contains(net, ip):
            return True, f"allow {net}"
    return False, "not in the allow list"


def plain_host(host: str) -> str:
    """An IPv4-mapped IPv6 address (a v4 client on a dual-stack socket) as the
    plain dotted IPv4 address; any other address unchanged."""
    return host[7:] if host.startswith("::ffff:") and "." in host else host


def quick_group(service: Service, peer: object) -> str | None:
    """The hot path's shortcut: for a service without allow/deny rules and an
    IPv4 client counted by its /32, the group is the address text itself.
    None: take the general path (client_ip, access, source_group)."""
    if service.allow or service.deny or service.source_prefix[0] != 32:
        return None
    if not isinstance(peer, tuple):
        return None
    host = plain_host(str(peer[0]))
    return host if host.count(".") == 3 and ":" not in host else None


def source_group(service: Service, ip: IPAddress | None) -> str:
    """The group a client counts in for ``per_source``: its /32 or /64 by default."""
    if ip is None:
        return "local"
    prefix = service.source_prefix[0 if ip.version == 4 else 1]
    if prefix == ip.max_prefixlen:
        return str(ip)
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


class TokenBucket:
    """``rate`` tokens a second, holding at most ``capacity`` (the burst: how
    many may be taken at once after a quiet spell).  Without a capacity it
    holds one second's worth, at least one token."""

    __slots__ = ("rate", "capacity", "tokens", "clock", "last")

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic,
                 capacity: float | None = None) -> None:
        if capacity is not None and not capacity >= 1.0:
            raise ValueError(f"a token bucket's capacity must be at least 1, not {capacity}")
        self.rate = rate
        self.capacity = max(1.0, rate) if capacity is None else float(capacity)
        self.tokens = self.capacity
        self.clock = clock
        self.last = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
        self.last = now

    def take(self) -> bool:
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def ready(self) -> bool:
        """True when a token is available (without taking it)."""
        self._refill()
        return self.tokens >= 1.0

    def full(self) -> bool:
        """True when the bucket has refilled completely: it is then no
        different from a new one."""
        self._refill()
        return self.tokens >= self.capacity

    def wait(self) -> float:
        """Seconds until a token is available."""
        self._refill()
        if self.tokens >= 1.0:
            return 0.0
        # a hair more than the exact quotient, so that floating-point rounding
        # never leaves the bucket just short of a token when the timer fires
        return (1.0 - self.tokens) / self.rate + 5e-10


def bucket_for(service: Service, old: TokenBucket | None,
               clock: Callable[[], float] = time.monotonic) -> TokenBucket:
    """The bucket for *service*'s ``rate:`` and ``burst:``: *old* while both
    are unchanged (a reload keeps what clients have spent), else a new full one."""
    assert service.rate is not None
    capacity = max(1.0, service.rate) if service.burst is None else float(service.burst)
    if old is not None and (old.rate, old.capacity) == (service.rate, capacity):
        return old
    return TokenBucket(service.rate, clock, capacity)


class SourceBuckets:
    """A :class:`TokenBucket` per source, for at most ``limit`` sources.

    Sources are kept least recently seen first.  One whose bucket has
    refilled is forgotten as a new source arrives, losing nothing (a new
    bucket is the same).  When ``limit`` sources were all seen within the
    refill time, the least recently seen is forgotten anyway and counted in
    ``forgotten``: memory stays bounded under a flood from spoofed
    addresses, and nobody is refused for it.  To have one address's bucket
    refilled that way a sender must first send from ``limit`` others.
    """

    def __init__(self, rate: float, limit: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.limit = limit
        self.clock = clock
        self.forgotten = 0
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, source: str) -> bool:
        """Take one token from *source*'s bucket; False if it has none."""
        bucket = self._buckets.get(source)
        if bucket is None:
            self._make_room()
            bucket = self._buckets[source] = TokenBucket(self.rate, self.clock)
        else:
            self._buckets.move_to_end(source)
        return bucket.take()

    def _make_room(self) -> None:
        buckets = self._buckets
        while buckets and next(iter(buckets.values())).full():
            buckets.popitem(last=False)
        if len(buckets) >= self.limit:
            buckets.popitem(last=False)
            self.forgotten += 1


@dataclass
class Throttle:
    """At most ``burst`` full log lines per key and window; the rest are
    counted and reported as one summary per window.  Keys name a service and
    a reason, not a client, so a flood spread over many addresses is bounded
    too."""

    window: float = 10.0
    clock: Callable[[], float] = time.monotonic
    burst: int = 5
    suppressed: int = 0
    _windows: dict[str, tuple[float, int]] = field(default_factory=dict)
    _window_start: float = 0.0

    def first(self, key: str) -> bool:
        """True when this event should be logged in full."""
        now = self.clock()
        start, count = self._windows.get(key, (now, 0))
        if now - start >= self.window:
            start, count = now, 0
        if count >= self.burst:
            self.suppressed += 1
            return False
        if len(self._windows) > 10_000:
            self._windows.clear()
        self._windows[key] = (start, count + 1)
        return True

    def summary_due(self) -> int:
        """How many events were suppressed, once per window (0 otherwise)."""
        now = self.clock()
        if self.suppressed and now - self._window_start >= self.window:
            count, self.suppressed = self.suppressed, 0
            self._window_start = now
            return count
        return 0
