"""UDP internal services under hostile input: no loops, no reflection, no amplifier.

A reply goes only where one is safe (OpenBSD inetd's dg_badinput): never to
a source port below 1024, never to an unspecified, multicast or broadcast
address; and at most ``reply_rate`` replies a second go to one source, so a
spoofed datagram between two superservers dies at once and a flood aimed
at a victim draws little.  Every daemon is real (``python -m superd run``)
and every datagram a real one on loopback; spoofed sources are written with
a raw socket (root only), as an attacker elsewhere would write them.
Waits are bounded generously; nothing asserts how fast anything is.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Superd, free_port, run_superd, wait_until

from superd.limits import SourceBuckets

Daemons = Callable[[str, str], Superd]
TIMEOUT = 10.0  # for blocking socket calls and waits: only against hangs
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0,
                               reason="needs root: low source ports and raw sockets")


# --- helpers -------------------------------------------------------------------


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    """Factory: ``daemons(name, config)`` starts a daemon in a directory of its
    own (its own control socket and log), so that several can run at once."""
    started: list[Superd] = []

    def make(name: str, config: str) -> Superd:
        work = tmp_path / name
        work.mkdir()
        os.chmod(work, 0o755)
        d = Superd(work, config)
        started.append(d)
        return d.start()

    yield make
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            os.kill(d.pid, signal.SIGCONT)  # in case a test left it stopped
            try:
                d.stop(5)
            except subprocess.TimeoutExpired:
                pass
        d.kill()


def udp_service(name: str, internal: str, listen: str, extra: str = "") -> str:
    lines = [f"  {name}:", f"    internal: {internal}", "    protocol: udp",
             f'    listen: "{listen}"', *(f"    {line}" for line in extra.splitlines())]
    return "\n".join(lines) + "\n"


def rejected(d: Superd, service: str) -> dict[str, int]:
    """The service's refusal counters, from ``superd status --json``."""
    proc = run_superd("status", "-c", str(d.config_path), "--json")
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(proc.stdout)
    for svc in report["services"]:
        if svc["name"] == service:
            return dict(svc["rejected"])
    raise AssertionError(f"no service {service!r} in {report}")


def ask(host: str, port: int, data: bytes, source: str | None = None) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT)
        s.bind((source or host, 0))
        s.sendto(data, (host, port))
        return s.recvfrom(65536)[0]


def pending(s: socket.socket) -> list[bytes]:
    """Every datagram already queued on *s*, without waiting."""
    got = []
    while select.select([s], [], [], 0)[0]:
        got.append(s.recv(65536))
    return got


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def idle(pids: list[int], window: float = 0.5) -> bool:
    """True when the processes together used under a fifth of *window* in CPU
    time during it (a loop between them keeps both busy)."""
    before = sum(cpu_seconds(p) for p in pids)
    time.sleep(window)
    return sum(cpu_seconds(p) for p in pids) - before < window / 5


def _checksum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def spoof(source: str, sport: int, target: tuple[str, int], payload: bytes) -> None:
    """Send one UDP datagram whose IP header says it comes from SOURCE:SPORT."""
    v6 = ":" in target[0]
    family = socket.AF_INET6 if v6 else socket.AF_INET
    src, dst = (socket.inet_pton(family, a) for a in (source, target[0]))
    length = 8 + len(payload)
    pseudo = src + dst + (struct.pack("!I3xB", length, 17) if v6
                          else struct.pack("!xBH", 17, length))
    check = _checksum(pseudo + struct.pack("!HHHH", sport, target[1], length, 0) + payload)
    udp = struct.pack("!HHHH", sport, target[1], length, check or 0xFFFF) + payload
    if v6:
        ip = struct.pack("!IHBB", 6 << 28, length, 17, 64) + src + dst
    else:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0, 64, 17, 0, src, dst)
    with socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.sendto(ip + udp, (target[0], 0))


# --- a loop between two superservers --------------------------------------------


def test_spoofed_datagram_between_two_superds_loops_only_briefly(daemons: Daemons) -> None:
    """Two daemons with a UDP echo each on high ports, and one datagram that
    says it comes from A's echo, sent to B's: B answers A, A answers B, ...
    (finding 3: 46,869 datagrams in 3 s and no end).  Neither daemon knows
    the other's port; the per-source reply_rate ends the loop, counted and
    logged once, and both daemons go idle and keep serving everyone."""
    port_b = free_port(socket.SOCK_DGRAM)
    b = daemons("b", "services:\n" + udp_service("echo", "echo", f"127.0.0.1:{port_b}"))
    port_a = free_port(socket.SOCK_DGRAM)
    while port_a == port_b:
        port_a = free_port(socket.SOCK_DGRAM)
    # The seed datagram leaves from A's port before A binds it; B is stopped
    # meanwhile, so its echo goes to A's echo, not to this socket.
    os.kill(b.pid, signal.SIGSTOP)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as seed:
            seed.bind(("127.0.0.1", port_a))
            seed.sendto(b"round and round", ("127.0.0.1", port_b))
        a = daemons("a", "services:\n" + udp_service("echo", "echo", f"127.0.0.1:{port_a}"))
    finally:
        os.kill(b.pid, signal.SIGCONT)

    def cut() -> int:
        return sum(rejected(d, "echo").get("reply_rate", 0) for d in (a, b))

    assert wait_until(lambda: cut() >= 1, TIMEOUT), (a.log(), b.log())
    assert wait_until(lambda: idle([a.pid, b.pid]), TIMEOUT), "the loop goes on"
    assert cut() == 1  # one datagram looped, one was dropped: the loop is over
    lines = [line for d in (a, b) for line in d.log().splitlines() if "reply_rate" in line]
    assert len(lines) == 1, lines
    assert "dropped a datagram from 127.0.0.1:" in lines[0]
    # another source was never limited; 127.0.0.1 is answered again once its
    # bucket has refilled
    for port in (port_a, port_b):
        assert ask("127.0.0.1", port, b"other", source="127.0.0.2") == b"other"
        assert wait_until(lambda p=port: _answered("127.0.0.1", p), TIMEOUT)


def _answered(host: str, port: int) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.3)
            s.sendto(b"back?", (host, port))
            return s.recv(100) == b"back?"
    except TimeoutError:
        return False


# --- who gets no reply ----------------------------------------------------------


@ROOT_ONLY
def test_no_reply_to_source_ports_below_1024(daemons: Daemons) -> None:
    """A datagram from a reserved port (DNS, NTP, SNMP, ...) would make the
    reply hit that service, or start a loop with it: dropped and counted.
    These five all got answers before (finding 3)."""
    port = free_port(socket.SOCK_DGRAM)
    d = daemons("d", "services:\n" + udp_service("echo", "echo", f"127.0.0.1:{port}"))
    reserved = (17, 53, 123, 161, 1019)
    socks = []
    try:
        for source in reserved:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(s)
            try:
                s.bind(("127.0.0.1", source))
            except OSError as e:
                pytest.skip(f"127.0.0.1:{source}/udp cannot be bound here: {e}")
            s.sendto(b"reflect me", ("127.0.0.1", port))
        # sent after them: by the time it is answered, they were handled
        assert ask("127.0.0.1", port, b"marker") == b"marker"
        select.select(socks, [], [], 0.2)
        assert [pending(s) for s in socks] == [[]] * len(reserved)
    finally:
        for s in socks:
            s.close()
    assert rejected(d, "echo").get("source_port") == len(reserved)
    lines = [line for line in d.log().splitlines() if "source port" in line]
    assert 1 <= len(lines) <= 5, lines  # the throttle's share, not one per datagram


@ROOT_ONLY
def test_no_reply_to_unspecified_multicast_or_broadcast_sources(daemons: Daemons) -> None:
    """Sources no reply should go to reach the socket over loopback.  A
    reply to [::] goes to [::1] (Linux reads :: as "this host"): an attacker
    who can send from :: reaches a local service on any port."""
    v4, v6 = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM, host="::1")
    d = daemons("d", "services:\n" + udp_service("echo4", "echo", f"127.0.0.1:{v4}")
                + udp_service("echo6", "echo", f"[::1]:{v6}"))
    v4_sources = ("224.0.0.1", "255.255.255.255", "0.1.2.3", "240.0.0.1")
    v6_sources = ("::", "::ffff:224.0.0.1", "::ffff:255.255.255.255")
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as local:
        local.bind(("::1", 0))  # where a reply to [::]:PORT would land
        sport = local.getsockname()[1]
        for source in v4_sources:
            spoof(source, sport, ("127.0.0.1", v4), b"reflect me")
        for source in v6_sources:
            spoof(source, sport, ("::1", v6), b"reflect me")
        assert ask("127.0.0.1", v4, b"marker") == b"marker"
        assert ask("::1", v6, b"marker") == b"marker"
        select.select([local], [], [], 0.2)
        assert pending(local) == []
    assert rejected(d, "echo4").get("source_address") == len(v4_sources)
    assert rejected(d, "echo6").get("source_address") == len(v6_sources)


# --- reply_rate -----------------------------------------------------------------


def test_reply_rate_limits_one_source_and_spares_the_others(daemons: Daemons) -> None:
    """A burst of empty datagrams to chargen (512 bytes back for 0 sent, in
    finding 3) draws at most reply_rate replies a second (one second's worth
    at once), while another source is answered; every drop is counted, and
    logged only up to the throttle's share."""
    port = free_port(socket.SOCK_DGRAM)
    d = daemons("d", "services:\n" + udp_service("chargen", "chargen", f"127.0.0.1:{port}",
                                                 "reply_rate: 2"))
    sent = 60
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood:
        flood.bind(("127.0.0.1", 0))
        started = time.monotonic()
        for _ in range(sent):
            flood.sendto(b"", ("127.0.0.1", port))
        # another source, sent after the flood: answered, and by then the
        # flood was handled
        assert len(ask("127.0.0.1", port, b"", source="127.0.0.2")) > 0
        elapsed = time.monotonic() - started
        select.select([flood], [], [], 0.2)
        replies = pending(flood)
    # a burst of 2, and 2 tokens a second after it (+1 for rounding)
    assert 1 <= len(replies) <= 2 + 2 * elapsed + 1, (len(replies), elapsed)
    assert sum(map(len, replies)) <= 512 * len(replies)
    assert rejected(d, "chargen").get("reply_rate") == sent - len(replies)
    lines = [line for line in d.log().splitlines() if "reply_rate" in line]
    assert 1 <= len(lines) <= 5, lines


def test_source_table_stays_bounded_and_refuses_no_one() -> None:
    """SourceBuckets on a frozen clock: 10,000 spoofed sources in one instant
    keep at most `limit` buckets (the least recent forgotten and counted),
    every one of them still gets its first reply, a source that spent its
    burst stays limited while fewer than `limit` others pass, and once the
    buckets have refilled they are forgotten for free."""
    now = [1000.0]
    table = SourceBuckets(2.0, limit=100, clock=lambda: now[0])
    assert [table.take("victim") for _ in range(3)] == [True, True, False]
    for i in range(99):
        assert table.take(f"10.0.{i // 256}.{i % 256}")
    assert not table.take("victim")  # still there: 100 sources fit
    assert table.forgotten == 0
    assert all(table.take(f"10.1.{i // 256}.{i % 256}") for i in range(10_000))
    assert len(table) == 100
    assert table.forgotten == 10_000  # each newcomer pushed out one busy source
    now[0] += 1.0  # every bucket is full again
    assert table.take("newcomer")
    assert len(table) == 1
    assert table.forgotten == 10_000  # forgetting a full bucket loses nothing


def test_check_rejects_bad_reply_rate_and_idle_timeout(tmp_path: Path) -> None:
    """Both keys are validated where they are written (FILE:LINE:COL)."""
    path = tmp_path / "superd.yaml"
    path.write_text("services:\n"
                    "  echo:\n"
                    "    internal: echo\n"
                    f"    listen: 127.0.0.1:{free_port()}\n"
                    "    reply_rate: 0\n"
                    "    idle_timeout: -5\n"
                    "  chargen:\n"
                    "    internal: chargen\n"
                    "    protocol: udp\n"
                    f"    listen: 127.0.0.1:{free_port()}\n"
                    "    reply_rate: fast\n")
    os.chmod(path, 0o644)
    proc = run_superd("check", "-c", str(path))
    assert proc.returncode != 0
    assert f"{path}:5:17: reply_rate: 0 is out of range" in proc.stderr, proc.stderr
    assert f"{path}:6:19: idle_timeout: -5 must be more than 0 seconds" in proc.stderr
    assert (f"{path}:11:17: reply_rate: expected replies per second, got a string"
            in proc.stderr), proc.stderr


# --- a flood ------------------------------------------------------------------


def test_a_flood_is_left_to_the_kernel_for_a_second(daemons: Daemons) -> None:
    """Reading a flood costs the daemon a core even when it answers none of
    it (the overload goal: under a fifth of one).  Past its budget of
    datagrams a second, an internal UDP socket is not read for a second: the
    kernel drops what does not fit in the socket's buffer, for free.  Said
    once; then the service answers again."""
    from superd.internal import UDP_FLOOD_FLOOR
    port = free_port(socket.SOCK_DGRAM)
    d = daemons("d", "services:\n" + udp_service("echo", "echo", f"127.0.0.1:{port}"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as flood:
        flood.bind(("127.0.0.1", 0))
        # paced so that the socket's buffer does not fill and the daemon reads
        # it all: about 5 budgets a second, for at most 5 s
        for _ in range(500):
            for _ in range(UDP_FLOOD_FLOOR // 20):
                flood.sendto(b"x" * 64, ("127.0.0.1", port))
            if "not reading it" in d.log():
                break
            time.sleep(0.01)
    d.wait_log(rf"echo/udp: over {UDP_FLOOD_FLOOR} datagrams a second .*not reading it for 1s")
    deadline = time.monotonic() + TIMEOUT
    answer = b""
    while not answer and time.monotonic() < deadline:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(1.0)  # the pause ends and what the buffer held is read
            s.bind(("127.0.0.2", 0))
            s.sendto(b"after", ("127.0.0.1", port))
            try:
                answer = s.recv(100)
            except TimeoutError:
                pass
    assert answer == b"after"
    log = d.log()
    assert log.count("not reading it") == 1, log
    assert "Traceback" not in log, log
