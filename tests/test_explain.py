"""``superd explain`` answers from where the service really listens.

A client of an address family the service does not listen on, or one
outside this host for a service on a loopback address, cannot connect at
all: explain says so instead of judging it by allow/deny.  Each case runs
the real ``superd explain`` on a real file.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import TEST_USER, distinct_ports, run_superd

# an address of TEST-NET-3 (RFC 5737): documentation only, never this host's
ELSEWHERE_V4 = "203.0.113.7"
ELSEWHERE_V6 = "2001:db8::7"  # RFC 3849


def _local(address: str) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((address, 0))
        except OSError as e:
            assert e.errno == errno.EADDRNOTAVAIL, e
            return False
    return True


@pytest.fixture
def config(tmp_path: Path) -> Path:
    v4, v6, both, unix, *more = distinct_ports(10)
    path = tmp_path / "superd.yaml"
    path.write_text(textwrap.dedent(f"""\
        control: {tmp_path}/control.sock
        defaults: {{user: {TEST_USER}}}
        services:
          v4:
            listen: 127.0.0.1:{v4}
            exec: [/bin/cat]
          v6:
            listen: "[::1]:{v6}"
            exec: [/bin/cat]
          pair:
            listen: [127.0.0.1:{both}, "[::1]:{both}"]
            exec: [/bin/cat]
          any:
            listen: {more[0]}
            exec: [/bin/cat]
          any4:
            listen: 0.0.0.0:{more[1]}
            exec: [/bin/cat]
            deny: [10.0.0.0/8]
          any6:
            listen: "[::]:{more[2]}"
            exec: [/bin/cat]
          unix:
            listen: {tmp_path}/s{unix}.sock
            exec: [/bin/cat]
          limited:
            listen: {more[3]}
            exec: [/bin/cat]
            rate: 3/min
          plain:
            listen: {more[4]}
            exec: [/bin/cat]
            rate: 20
          bursty:
            listen: {more[5]}
            exec: [/bin/cat]
            rate: 0.5
            burst: 10
        """))
    os.chmod(path, 0o644)
    return path


def explain(config: Path, service: str, client: str) -> str:
    result: subprocess.CompletedProcess[str] = run_superd(
        "explain", service, client, "-c", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    return result.stdout


def verdict(out: str) -> str:
    return out.splitlines()[1]


def test_an_ipv6_client_cannot_reach_a_service_on_127_0_0_1(config: Path) -> None:
    """The reported case: ALLOWED for ::1 on a service that listens only on
    127.0.0.1, where no IPv6 client can connect at all."""
    out = explain(config, "v4", "::1")
    assert "ALLOWED" not in out and "DENIED" not in out, out
    assert re.fullmatch(r"client ::1: UNREACHABLE \(the service listens only on "
                        r"127\.0\.0\.1:\d+, IPv4: an IPv6 client cannot connect to it\)",
                        verdict(out)), out
    assert "no program starts" in out
    assert "environment:" not in out and "per_source" not in out


def test_an_ipv4_client_cannot_reach_a_service_on_ipv6_only(config: Path) -> None:
    for service in ("v6", "any6"):  # [::] is IPv6 only (IPV6_V6ONLY), unlike a bare port
        out = explain(config, service, "127.0.0.1")
        assert verdict(out).startswith("client 127.0.0.1: UNREACHABLE (the service "
                                       "listens only on [::"), out
        assert "an IPv4 client cannot connect to it" in verdict(out), out
        assert "environment:" not in out
    # an IPv4-mapped address is the IPv4 client it stands for
    assert "UNREACHABLE" in verdict(explain(config, "v6", "::ffff:127.0.0.1"))


def test_a_client_elsewhere_cannot_reach_a_loopback_address(config: Path) -> None:
    for service, client in (("v4", ELSEWHERE_V4), ("v6", ELSEWHERE_V6)):
        if _local(client):
            pytest.skip(f"{client} is one of this host's addresses")
        out = explain(config, service, client)
        assert verdict(out).startswith(f"client {client}: UNREACHABLE ("), out
        assert ("a loopback address: only programs on this host can connect, and "
                f"{client} is not one of this host's addresses") in verdict(out), out


def test_clients_that_can_connect_are_judged_by_the_rules(config: Path) -> None:
    cases = {
        ("v4", "127.0.0.1"): "ALLOWED (no allow list: everyone not denied)",
        ("v4", "127.0.0.5"): "ALLOWED (no allow list: everyone not denied)",  # all of 127/8
        ("v4", "::ffff:127.0.0.1"): "ALLOWED",  # an IPv4 client on a dual-stack socket
        ("v6", "::1"): "ALLOWED",
        ("pair", "::1"): "ALLOWED",
        ("pair", "127.0.0.1"): "ALLOWED",
        ("any", "::1"): "ALLOWED",  # a bare port: every address, IPv4 and IPv6
        ("any", ELSEWHERE_V4): "ALLOWED",
        ("any", ELSEWHERE_V6): "ALLOWED",
        ("any4", ELSEWHERE_V4): "ALLOWED",
        ("any4", "10.1.2.3"): "DENIED (deny 10.0.0.0/8)",
        ("any6", ELSEWHERE_V6): "ALLOWED",
    }
    for (service, client), expected in cases.items():
        line = verdict(explain(config, service, client))
        shown = client.removeprefix("::ffff:")
        assert line.startswith(f"client {shown}: {expected}"), (service, client, line)
    assert "UNREACHABLE" in verdict(explain(config, "any4", "::1"))


def test_the_environment_names_the_address_the_client_reaches(config: Path) -> None:
    def env(client: str) -> dict[str, str]:
        out = explain(config, "pair", client)
        lines = out.split("environment:\n", 1)[1].splitlines()
        return dict(line.strip().split("=", 1) for line in lines if line.startswith("  "))

    assert env("::1")["TCPLOCALIP"] == "::1"
    assert env("::1")["PROTO"] == "TCP6"
    assert env("127.0.0.1")["TCPLOCALIP"] == "127.0.0.1"


def test_an_ip_client_cannot_reach_a_unix_socket_service(config: Path) -> None:
    out = explain(config, "unix", "127.0.0.1")
    assert verdict(out).startswith("client 127.0.0.1: UNREACHABLE (the service listens "
                                   "only on UNIX socket paths"), out
    assert "environment:" not in out


def test_explain_shows_the_burst(config: Path) -> None:
    limited = explain(config, "limited", "127.0.0.1")
    assert ("rate: 0.05 new connections/s, burst 3 (up to 3 at once after a quiet "
            "spell, then one every 20s)") in limited, limited
    plain = explain(config, "plain", "127.0.0.1")
    assert "rate: 20 new connections/s, burst 20 (up to 20 at once" in plain, plain
    bursty = explain(config, "bursty", "127.0.0.1")
    assert "rate: 0.5 new connections/s, burst 10 (up to 10 at once after a quiet " \
           "spell, then one every 2s)" in bursty, bursty
