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

import pytest
from conftest import TEST_USER
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from superd import config as configmod
from superd.config import Network, Service
from superd.limits import (
    IPAddress,
    TokenBucket,
    access,
    bucket_for,
    client_ip,
    source_group,
)

# --- a Service to vary ----------------------------------------------------------


@functools.cache
def _base_service() -> Service:
    """One Service loaded from a tiny configuration, the way the daemon gets it."""
    directory = Path(tempfile.mkdtemp(prefix="superd-props-"))
    path = directory / "superd.yaml"
    path.write_text(f"control: {directory}/control.sock\n"
                    "services:\n  t:\n    listen: 127.0.0.1:2000\n    exec: [/bin/cat]\n"
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


# --- TokenBucket with a capacity (burst:) ------------------------------------------

capacities = st.integers(1, 500)


@settings(max_examples=300, deadline=None)
@given(rates, capacities, steps)
def test_bucket_with_a_capacity_stays_between_zero_and_it(
        rate: float, capacity: int, schedule: list[tuple[float, int]]) -> None:
    """However it is used, the bucket never holds less than nothing or more
    than its capacity, and never gives more than capacity + rate * t tokens
    in t seconds."""
    clock = FakeClock()
    bucket = TokenBucket(rate, clock, capacity=capacity)
    assert bucket.capacity == capacity
    start, taken = clock.now, 0
    for advance, attempts in schedule:
        clock.now += advance
        assert bucket.ready() == (bucket.tokens >= 1.0)
        assert 0.0 <= bucket.tokens <= capacity
        for _ in range(attempts):
            taken += bucket.take()
            assert 0.0 <= bucket.tokens <= capacity
        assert taken <= capacity + rate * (clock.now - start) + 1e-6, (taken, clock.now - start)


@settings(max_examples=200, deadline=None)
@given(rates, capacities)
def test_a_full_bucket_gives_its_whole_capacity_at_once(rate: float, capacity: int) -> None:
    """inetd's nowait.N: N clients arriving together are all served at once."""
    clock = FakeClock()
    bucket = TokenBucket(rate, clock, capacity=capacity)
    results = [bucket.take() for _ in range(capacity + 3)]
    assert results == [True] * capacity + [False] * 3
    clock.now += bucket.wait()
    assert bucket.take()  # one interval later, exactly one more
    assert not bucket.take()
    clock.now += capacity / rate + 1e-6  # a quiet spell refills it to the brim, no more
    assert sum(bucket.take() for _ in range(capacity + 3)) == capacity


@given(rates)
def test_default_capacity_is_one_seconds_worth_as_before(rate: float) -> None:
    """Without a capacity the bucket is what it always was: one second's
    worth, at least one token (what the daemon builds until it passes one)."""
    assert TokenBucket(rate, FakeClock()).capacity == max(1.0, rate)
    assert TokenBucket(rate, FakeClock(), capacity=None).capacity == max(1.0, rate)


@given(rates, st.floats(min_value=-5.0, max_value=0.999, allow_nan=False))
def test_a_capacity_below_one_token_is_refused(rate: float, capacity: float) -> None:
    try:
        TokenBucket(rate, FakeClock(), capacity=capacity)
    except ValueError as e:
        assert "at least 1" in str(e)
    else:
        raise AssertionError(f"capacity {capacity} accepted")


@given(rates, capacities, st.integers(0, 5))
def test_wait_is_exactly_enough_with_a_capacity(rate: float, capacity: int,
                                                extra_takes: int) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate, clock, capacity=capacity)
    for _ in range(capacity + extra_takes):
        bucket.take()
    clock.now += bucket.wait()
    assert bucket.ready(), (bucket.tokens, bucket.wait())


def test_bucket_for_keeps_a_bucket_only_while_rate_and_burst_are_unchanged() -> None:
    """What the daemon calls at every load: a reload that leaves rate and
    burst alone keeps the bucket (and its debt); any change starts afresh."""
    clock = FakeClock()
    svc = _service(rate=0.05, burst=3)
    first = bucket_for(svc, None, clock)
    assert (first.rate, first.capacity) == (0.05, 3)
    assert [first.take() for _ in range(4)] == [True, True, True, False]
    assert bucket_for(svc, first, clock) is first
    assert bucket_for(_service(rate=0.05, burst=4), first, clock) is not first
    assert bucket_for(_service(rate=0.1, burst=3), first, clock) is not first
    plain = bucket_for(_service(rate=5.0, burst=None), None, clock)
    assert plain.capacity == 5.0  # no burst: one second's worth, as before


# --- rate: and burst: as written in the file -------------------------------------------


def _load_text(text: str) -> tuple[str, str, Service | list[str]]:
    """Load a one-service file ending in *text*: (its path, its whole text,
    the Service or the problems as ``FILE:LINE:COL: message`` lines)."""
    directory = Path(tempfile.mkdtemp(prefix="superd-props-"))
    path = directory / "superd.yaml"
    whole = (f"control: {directory}/control.sock\n"
             "services:\n  t:\n    listen: 127.0.0.1:2000\n    exec: [/bin/cat]\n"
             f"    user: {TEST_USER}\n" + text)
    path.write_text(whole)
    os.chmod(path, 0o644)
    try:
        return str(path), whole, configmod.load(str(path)).services[0]
    except configmod.ConfigError as e:
        return str(path), whole, [str(p) for p in e.problems]
    finally:
        shutil.rmtree(directory, ignore_errors=True)


PERIODS = {"s": 1.0, "second": 1.0, "min": 60.0, "minute": 60.0, "h": 3600.0,
           "hour": 3600.0}


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 100_000), st.sampled_from(sorted(PERIODS)))
def test_rate_count_per_period_holds_one_periods_worth(count: int, unit: str) -> None:
    """rate: COUNT/PERIOD is COUNT a PERIOD, and COUNT may start at once."""
    _, _, svc = _load_text(f"    rate: {count}/{unit}\n")
    assert isinstance(svc, Service), svc
    assert svc.rate == count / PERIODS[unit]
    assert svc.burst == max(1, count)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 10_000), st.integers(1, 86_400), st.integers(1, 1000))
def test_rate_count_per_seconds_and_an_explicit_burst(count: int, seconds: int,
                                                      burst: int) -> None:
    _, _, svc = _load_text(f"    rate: {count}/{seconds}\n    burst: {burst}\n")
    assert isinstance(svc, Service), svc
    assert svc.rate == count / seconds
    assert svc.burst == burst


@given(st.floats(min_value=0.001, max_value=1_000_000, allow_nan=False))
@settings(max_examples=50, deadline=None)
def test_a_plain_rate_keeps_one_seconds_worth(rate: float) -> None:
    _, _, svc = _load_text(f"    rate: {rate!r}\n")
    assert isinstance(svc, Service), svc
    assert svc.rate == rate and svc.burst == max(1.0, rate)


@pytest.mark.parametrize(("line", "needle", "message"), [
    ("rate: 40/fortnight", "40/fortnight",
     "rate: '40/fortnight' is not a rate: write a number a second, or COUNT/PERIOD "
     "such as 40/min (PERIOD: s, min, h or a number of seconds)"),
    ("rate: 0/min", "0/min", "rate: 0/min is out of range: at least 0.000001, "
                             "at most 1000000 connections per second"),
    ("rate: 1/0", "1/0", "rate: '1/0' is not a rate: write a number a second"),
    ("rate: 2000000/s", "2000000/s", "rate: 2000000/s is out of range"),
    ("rate: 10\n    burst: 0", "0", "burst: 0 is out of range 1..1000000"),
    ("rate: 10\n    burst: 2.5", "2.5", "burst: expected a whole number, got a number"),
    ("burst: 40", "burst", "burst: needs rate: (burst is how many connections the rate "
                           "lets start at once)"),
])
def test_rate_and_burst_mistakes_are_located(line: str, needle: str, message: str) -> None:
    path, text, found = _load_text(f"    {line}\n")
    assert isinstance(found, list), found
    index = text.rindex(needle)
    row, col = text.count("\n", 0, index) + 1, index - text.rfind("\n", 0, index)
    assert len(found) == 1, found
    assert found[0].startswith(f"{path}:{row}:{col}: {message}"), (found, row, col)


def test_burst_from_defaults_needs_no_rate_in_every_service() -> None:
    """defaults: {burst: 5} shapes the services that have a rate and
    leaves the others unlimited, as any limit in defaults does."""
    directory = Path(tempfile.mkdtemp(prefix="superd-props-"))
    path = directory / "superd.yaml"
    path.write_text(f"control: {directory}/control.sock\n"
                    f"defaults: {{burst: 5, user: {TEST_USER}}}\n"
                    "services:\n"
                    "  a: {listen: '127.0.0.1:2000', exec: [/bin/cat], rate: 1/min}\n"
                    "  b: {listen: '127.0.0.1:2001', exec: [/bin/cat]}\n")
    os.chmod(path, 0o644)
    try:
        cfg = configmod.load(str(path))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    a, b = cfg.service("a"), cfg.service("b")
    assert a is not None and b is not None
    assert (a.rate, a.burst) == (1 / 60, 5)
    assert (b.rate, b.burst) == (None, None)
