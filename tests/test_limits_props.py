"""Property tests of superd.limits against Python's ipaddress module.

``access`` and ``source_group`` are compared with straightforward reference
implementations; ``TokenBucket`` runs on a fake clock.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import shutil
import tempfile
from pathlib import Path

from conftest import TEST_USER
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from superd import config as configmod
from superd.config import Network, Service
from superd.limits import IPAddress, TokenBucket, access, client_ip, source_group

# --- a Service to vary ----------------------------------------------------------


@functools.cache
def _base_service() -> Service:
    """One Service loaded from a tiny configuration, the way the daemon gets it."""
    directory = Path(tempfile.mkdtemp(prefix="superd-props-"))
    path = directory / "superd.yaml"
    path.write_text(f"control: {directory}/control.sock\n"
                    "services:\n  t:\n    listen: 127.0.0.1:1\n    exec: [/bin/cat]\n"
                    f"    user: {TEST_USER}\n")
    os.chmod(path, 0o644)
    try:
        svc = configmod.load(str(path)).services[0]
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    assert (svc.allow, svc.deny, svc.source_prefix) == ((), (), (32, 64))
    return svc


def _service(**changes: object) -> Service:
    return dataclasses.replace(_base_service(), **changes)  # type: ignore[arg-type]


# --- strategies -------------------------------------------------------------------

v4_addresses = st.ip_addresses(v=4)
v6_addresses = st.ip_addresses(v=6)
addresses: st.SearchStrategy[IPAddress] = st.one_of(v4_addresses, v6_addresses)


def _network_of(ip: IPAddress, prefix: int) -> Network:
    return ipaddress.ip_network(f"{ip}/{prefix}", strict=False)


@st.composite
def networks(draw: st.DrawFn, near: IPAddress | None = None) -> Network:
    """Any network; with *near*, often one that contains (or nearly contains) it."""
    if near is not None and draw(st.booleans()):
        base: IPAddress = near
        if draw(st.booleans()):  # a neighbour: flip one bit of the address
            bit = draw(st.integers(0, near.max_prefixlen - 1))
            base = ipaddress.ip_address(int(near) ^ (1 << bit))
            if base.version != near.version:
                base = near
    else:
        base = draw(addresses)
    return _network_of(base, draw(st.integers(0, base.max_prefixlen)))


@st.composite
def client_and_rules(draw: st.DrawFn) -> tuple[IPAddress, tuple[Network, ...],
                                                tuple[Network, ...]]:
    ip = draw(addresses)
    allow = tuple(draw(st.lists(networks(near=ip), max_size=5)))
    deny = tuple(draw(st.lists(networks(near=ip), max_size=5)))
    return ip, allow, deny


# --- references -------------------------------------------------------------------


def _matches(net: Network, ip: IPAddress) -> bool:
    if net.version != ip.version:
        return False
    return net.network_address <= ip <= net.broadcast_address  # type: ignore[operator]


def reference_access(allow: tuple[Network, ...], deny: tuple[Network, ...],
                     ip: IPAddress) -> bool:
    if any(_matches(n, ip) for n in deny):
        return False
    return not allow or any(_matches(n, ip) for n in allow)


# --- access -------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(client_and_rules())
def test_access_agrees_with_reference(case: tuple[IPAddress, tuple[Network, ...],
                                                  tuple[Network, ...]]) -> None:
    ip, allow, deny = case
    allowed, rule = access(_service(allow=allow, deny=deny), ip)
    assert allowed == reference_access(allow, deny, ip)
    first_deny = next((n for n in deny if _matches(n, ip)), None)
    first_allow = next((n for n in allow if _matches(n, ip)), None)
    if first_deny is not None:
        assert rule == f"deny {first_deny}"  # deny wins, and names the rule
    elif not allow:
        assert allowed and "no allow list" in rule
    elif first_allow is not None:
        assert rule == f"allow {first_allow}"
    else:
        assert rule == "not in the allow list"


@settings(max_examples=200, deadline=None)
@given(client_and_rules())
def test_other_version_rules_never_match(case: tuple[IPAddress, tuple[Network, ...],
                                                     tuple[Network, ...]]) -> None:
    ip, allow, deny = case
    allow = tuple(n for n in allow if n.version != ip.version)
    deny = tuple(n for n in deny if n.version != ip.version)
    allowed, _ = access(_service(allow=allow, deny=deny), ip)
    assert allowed == (not allow)  # only "empty allow allows all" can let it in


@given(v4_addresses)
def test_everything_allowed_by_default(ip: ipaddress.IPv4Address) -> None:
    assert access(_base_service(), ip)[0]
    assert access(_base_service(), ipaddress.IPv6Address(f"::ffff:{ip}"))[0]
    assert access(_base_service(), None)[0]  # UNIX-socket clients


@settings(max_examples=300, deadline=None)
@given(v4_addresses, st.integers(0, 65535), client_and_rules())
def test_ipv4_mapped_peers_are_judged_as_ipv4(
        ip: ipaddress.IPv4Address, port: int,
        case: tuple[IPAddress, tuple[Network, ...], tuple[Network, ...]]) -> None:
    _, allow, deny = case
    allow += (_network_of(ip, 24),)
    peer = (f"::ffff:{ip}", port, 0, 0)  # what a dual-stack socket's accept() returns
    assert client_ip(peer) == ip
    assert client_ip((str(ip), port)) == ip
    svc = _service(allow=allow, deny=deny)
    assert access(svc, client_ip(peer)) == access(svc, ip)
    assert source_group(svc, client_ip(peer)) == source_group(svc, ip)


@given(v6_addresses, st.integers(0, 65535))
def test_client_ip_of_ipv6_peers(ip: ipaddress.IPv6Address, port: int) -> None:
    expected = ip.ipv4_mapped or ip
    assert client_ip((str(ip), port, 0, 0)) == expected
    assert client_ip((f"{ip}%lo", port, 0, 1)) == expected  # a scope id is dropped


@given(st.one_of(st.none(), st.text(max_size=5), st.just(()), st.tuples(st.text(max_size=8))))
def test_client_ip_of_non_ip_peers(peer: object) -> None:
    if isinstance(peer, tuple) and peer:
        try:
            ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
        except ValueError:
            pass
        else:
            assume(False)
    assert client_ip(peer) is None


# --- source_group ---------------------------------------------------------------------


prefixes = st.tuples(st.integers(0, 32), st.integers(0, 128))


@st.composite
def address_pairs(draw: st.DrawFn) -> tuple[IPAddress, IPAddress]:
    """Two addresses of one version, often sharing a long common prefix."""
    a = draw(addresses)
    low_bits = draw(st.integers(0, a.max_prefixlen))
    mask = (1 << low_bits) - 1
    b = ipaddress.ip_address(int(a) ^ (draw(st.integers(0, mask)) if mask else 0))
    if b.version != a.version:  # small integers read back as IPv4
        b = ipaddress.IPv6Address(int(b))
    return a, b


@settings(max_examples=400, deadline=None)
@given(addresses, prefixes)
def test_source_group_is_the_prefix_network(ip: IPAddress, prefix: tuple[int, int]) -> None:
    svc = _service(source_prefix=prefix)
    bits = prefix[0] if ip.version == 4 else prefix[1]
    group = source_group(svc, ip)
    if bits == ip.max_prefixlen:
        assert group == str(ip)
    else:
        net = ipaddress.ip_network(group)
        assert net == _network_of(ip, bits)
        assert net.prefixlen == bits and _matches(net, ip)


@settings(max_examples=400, deadline=None)
@given(address_pairs(), prefixes)
def test_same_group_exactly_when_same_prefix(pair: tuple[IPAddress, IPAddress],
                                             prefix: tuple[int, int]) -> None:
    a, b = pair
    svc = _service(source_prefix=prefix)
    bits = prefix[0] if a.version == 4 else prefix[1]
    same = _network_of(a, bits) == _network_of(b, bits)
    assert (source_group(svc, a) == source_group(svc, b)) == same


@given(v4_addresses, v6_addresses, prefixes)
def test_ipv4_and_ipv6_never_share_a_group(a: ipaddress.IPv4Address, b: ipaddress.IPv6Address,
                                           prefix: tuple[int, int]) -> None:
    assume(b.ipv4_mapped is None)
    svc = _service(source_prefix=prefix)
    assert source_group(svc, a) != source_group(svc, b)


def test_source_group_examples() -> None:
    default = _base_service()
    one, other = ipaddress.ip_address("2001:db8::5"), ipaddress.ip_address("2001:db8::ffff")
    assert source_group(default, one) == source_group(default, other) == "2001:db8::/64"
    exact = _service(source_prefix=(32, 128))
    assert source_group(exact, one) == "2001:db8::5" != source_group(exact, other)
    by24 = _service(source_prefix=(24, 64))
    assert (source_group(by24, ipaddress.ip_address("10.1.2.3"))
            == source_group(by24, ipaddress.ip_address("10.1.2.200")) == "10.1.2.0/24")
    assert source_group(default, None) == "local"


# --- TokenBucket ----------------------------------------------------------------------


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


rates = st.floats(min_value=0.05, max_value=1000.0, allow_nan=False, allow_infinity=False)
steps = st.lists(st.tuples(st.floats(min_value=0.0, max_value=3.0, allow_nan=False),
                           st.integers(0, 50)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(rates, steps)
def test_token_bucket_never_exceeds_capacity_plus_rate(
        rate: float, schedule: list[tuple[float, int]]) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate, clock)
    capacity = max(1.0, rate)
    start, taken = clock.now, 0
    for advance, attempts in schedule:
        clock.now += advance
        for _ in range(attempts):
            ready = bucket.ready()
            took = bucket.take()
            assert ready == took  # ready() predicts take() at the same instant
            taken += took
            elapsed = clock.now - start
            assert taken <= capacity + rate * elapsed + 1e-6, (taken, elapsed)


@settings(max_examples=300, deadline=None)
@given(rates, steps)
def test_token_bucket_recovers_after_wait(rate: float,
                                          schedule: list[tuple[float, int]]) -> None:
    """However it was used, after wait() seconds a token is there; after a
    full second's worth of quiet the whole burst is."""
    clock = FakeClock()
    bucket = TokenBucket(rate, clock)
    for advance, attempts in schedule:
        clock.now += advance
        for _ in range(attempts):
            bucket.take()
    while bucket.take():
        pass
    delay = bucket.wait()
    assert 0.0 < delay <= 1.0 / rate + 1e-9
    clock.now += delay + 1e-9  # rounding aside: see the test below for exactly wait()
    assert bucket.take()
    clock.now += max(1.0, rate) / rate + 1e-6
    burst = 0
    while bucket.take() and burst <= rate + 1:
        burst += 1
    assert burst == int(max(1.0, rate))


@given(rates)
def test_token_bucket_frozen_clock_gives_the_burst_only(rate: float) -> None:
    bucket = TokenBucket(rate, FakeClock())
    results = [bucket.take() for _ in range(int(rate) + 5)]
    assert sum(results) == int(max(1.0, rate))
    assert results == sorted(results, reverse=True)  # no token appears from nowhere


@given(rates, st.integers(0, 5))
def test_token_bucket_wait_is_exactly_enough(rate: float, extra_takes: int) -> None:
    """wait() is "seconds until a token is available": after exactly that long,
    ready() must say so.  Otherwise the loop's RATE back-off re-arms, finds no
    token and backs off again for a delay of ~1e-17 s."""
    clock = FakeClock()
    bucket = TokenBucket(rate, clock)
    for _ in range(int(max(1.0, rate)) + extra_takes):
        bucket.take()
    clock.now += bucket.wait()
    assert bucket.ready(), (bucket.tokens, bucket.wait())
