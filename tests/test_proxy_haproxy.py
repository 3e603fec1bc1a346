"""PROXY protocol end to end: raw v1/v2 headers, limits on the real client,
refusals, a slowloris, and a real HAProxy in front of superd.

DESIGN.md, keys ``proxy_protocol``/``proxy_from``/``proxy_timeout`` and
"Scaling past one host": superd reads the balancer's header without blocking
its loop, consumes exactly the header (the program's first read is the
client's first byte), and from then on the real client drives the
environment, ``allow``/``deny``, ``per_source``, the log and ``superd
status``.  Balancer health checks start no program.

Everything runs on 127.0.0.0/8: the test client plays the balancer from
127.0.0.1 (the only ``proxy_from`` address), other loopback sources play
peers that are not balancers, and the addresses *inside* the headers are
documentation ranges (203.0.113.0/24, 198.51.100.0/24, 2001:db8::/32) that
are never connected to.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import resource
import selectors
import signal
import socket
import struct
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ROOT,
    TEST_USER,
    Superd,
    find_program,
    free_port,
    needs_program,
    run_superd,
    script,
    wait_until,
)

Start = Callable[..., Superd]

BALANCER = "127.0.0.1"  # the only proxy_from address in every configuration here
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# A payload that itself looks like PROXY headers: if superd consumed one byte too
# many or too few, or parsed the payload as a second header, the echo differs.
PAYLOAD = (b"PROXY TCP4 198.51.100.9 127.0.0.1 1 2\r\n" + V2_SIGNATURE
           + b"\x21\x11\x00\x0c" + bytes(range(256)) * 8 + b"\r\nend\n")


# --- PROXY header builders (HAProxy's doc/proxy-protocol.txt) --------------


def proxy_v1(src: str, sport: int, dst: str = "127.0.0.1", dport: int = 80) -> bytes:
    family = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode("ascii")


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


# TLVs a balancer may add: ALPN, AUTHORITY (SNI), UNIQUE_ID, NOOP padding.
SOME_TLVS = (tlv(0x01, b"h2") + tlv(0x02, b"service.example.test")
             + tlv(0x05, b"req-4f2a") + tlv(0x04, b"\x00" * 7))


def proxy_v2(src: str, sport: int, dst: str = "127.0.0.1", dport: int = 80,
             tlvs: bytes = b"") -> bytes:
    """A v2 PROXY command over TCP (TCP4 or TCP6 after *src*)."""
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4 and d.version == 6:
        d = ipaddress.ip_address(f"::ffff:{d}")
    family = 0x11 if s.version == 4 else 0x21
    block = s.packed + d.packed + struct.pack("!HH", sport, dport) + tlvs
    return V2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(block)) + block


def proxy_v2_local() -> bytes:
    """A v2 LOCAL command (what a balancer's health check sends)."""
    return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)


# --- configurations --------------------------------------------------------


def _config(tmp_path: Path, services: str) -> str:
    """A whole configuration with a private control socket; the programs
    run as TEST_USER (superd as root requires a user:)."""
    body = textwrap.indent(textwrap.dedent(services).strip("\n"), "  ")
    return (f"control: {tmp_path}/control.sock\nstop_timeout: 3\n"
            f"log: {{level: info}}\ndefaults: {{user: {TEST_USER}}}\nservices:\n{body}\n")


def _marks(tmp_path: Path) -> Path:
    """A directory the programs (running as nobody) leave markers in."""
    marks = tmp_path / "marks"
    marks.mkdir(exist_ok=True)
    os.chmod(marks, 0o1777)
    return marks


def _echo_program(tmp_path: Path) -> Path:
    """Marks that it ran, prints the client it was told about, echoes the rest."""
    marks = _marks(tmp_path)
    return script(tmp_path, "echo-client.sh", f"""\
        touch "{marks}/$SUPERD_SERVICE.$REMOTE_PORT"
        echo "$REMOTE_ADDR $REMOTE_PORT $TCPREMOTEIP $TCPREMOTEPORT"
        exec cat
        """)


def _hold_program(tmp_path: Path) -> Path:
    """Greets the client, then holds the connection until the client's EOF."""
    marks = _marks(tmp_path)
    return script(tmp_path, "hold.sh", f"""\
        touch "{marks}/$SUPERD_SERVICE.$REMOTE_PORT"
        echo "ready $REMOTE_ADDR $REMOTE_PORT"
        exec cat >/dev/null
        """)


def _proxy_keys(mode: str = "any", timeout: float | None = None) -> str:
    """The PROXY keys of one service, for the service templates below (whose
    keys sit 10 columns in before dedent)."""
    keys = [f"proxy_protocol: {mode}", f"proxy_from: [{BALANCER}]"]
    if timeout is not None:
        keys.append(f"proxy_timeout: {timeout:g}")
    return ("\n" + " " * 10).join(keys)


def cfg_echo(tmp_path: Path, any_port: int, v1_port: int, v2_port: int) -> str:
    prog = _echo_program(tmp_path)
    return _config(tmp_path, f"""\
        anyproxy:
          listen: 127.0.0.1:{any_port}
          exec: [{prog}]
          {_proxy_keys("any")}
        v1only:
          listen: 127.0.0.1:{v1_port}
          exec: [{prog}]
          {_proxy_keys("v1")}
        v2only:
          listen: 127.0.0.1:{v2_port}
          exec: [{prog}]
          {_proxy_keys("v2")}
        """)


def cfg_access(tmp_path: Path, allow_port: int, hold_port: int) -> str:
    echo, hold = _echo_program(tmp_path), _hold_program(tmp_path)
    return _config(tmp_path, f"""\
        allowed:
          listen: 127.0.0.1:{allow_port}
          exec: [{echo}]
          allow: [203.0.113.0/24]
          {_proxy_keys("any")}
        held:
          listen: 127.0.0.1:{hold_port}
          exec: [{hold}]
          per_source: 1
          {_proxy_keys("any")}
        """)


def cfg_strict(tmp_path: Path, port: int) -> str:
    """A PROXY service with a short proxy_timeout, open to 127.0.0.9 too
    (so only proxy_from, not allow, can refuse that peer)."""
    prog = _echo_program(tmp_path)
    return _config(tmp_path, f"""\
        strict:
          listen: 127.0.0.1:{port}
          exec: [{prog}]
          allow: [203.0.113.0/24, 127.0.0.0/8]
          {_proxy_keys("any", timeout=1)}
        """)


def cfg_slowloris(tmp_path: Path, slow_port: int, plain_port: int,
                  proxy_timeout: float) -> str:
    prog = _echo_program(tmp_path)
    return _config(tmp_path, f"""\
        slow:
          listen: 127.0.0.1:{slow_port}
          exec: [{prog}]
          {_proxy_keys("any", timeout=proxy_timeout)}
        plain:
          listen: 127.0.0.1:{plain_port}
          exec: [{prog}]
        """)


def cfg_balanced(tmp_path: Path, port: int) -> str:
    prog = _echo_program(tmp_path)
    return _config(tmp_path, f"""\
        balanced:
          listen: 127.0.0.1:{port}
          exec: [{prog}]
          {_proxy_keys("any")}
        """)


CONFIGS: dict[str, Callable[[Path], str]] = {
    "echo": lambda p: cfg_echo(p, free_port(), free_port(), free_port()),
    "access": lambda p: cfg_access(p, free_port(), free_port()),
    "strict": lambda p: cfg_strict(p, free_port()),
    "slowloris": lambda p: cfg_slowloris(p, free_port(), free_port(), 4),
    "balanced": lambda p: cfg_balanced(p, free_port()),
}


# --- helpers ---------------------------------------------------------------


@contextmanager
def _daemon(superd: Start, config: str) -> Iterator[Superd]:
    """Start superd; always stop it (SIGTERM to its pid, SIGKILL if it hangs)."""
    d = superd(config)
    try:
        assert "cannot listen" not in d.log(), d.log()
        yield d
    finally:
        d.stop()


def _connect(port: int, source: str | None = None, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        if source is not None:
            sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    return sock


def _send_once(sock: socket.socket, data: bytes) -> None:
    """One send() call carrying all of *data* (one segment on loopback)."""
    assert sock.send(data) == len(data)


def _read_to_close(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything until the peer closes; a reset (superd closing with the
    unread header still queued) counts as closed.  Raises TimeoutError if the
    connection stays open longer than *timeout*."""
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("connection still open")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _read_line(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def _exchange(port: int, data: bytes, source: str | None = None,
              timeout: float = 10.0) -> bytes:
    """Connect, send *data* in one send(), half-close, read until closed."""
    with _connect(port, source) as sock:
        _send_once(sock, data)
        sock.shutdown(socket.SHUT_WR)
        return _read_to_close(sock, timeout)


def _refused(port: int, data: bytes, source: str | None = None,
             shutdown: bool = False) -> bytes:
    """Send *data* and wait (bounded) for superd to close the connection.

    The echo program would keep it open until our EOF, so a close without
    half-closing first means no program took the connection."""
    with _connect(port, source) as sock:
        if data:
            _send_once(sock, data)
        if shutdown:
            sock.shutdown(socket.SHUT_WR)
        return _read_to_close(sock, timeout=15.0)


def _status(d: Superd) -> dict[str, Any]:
    result = run_superd("status", "-c", str(d.config_path), "--json")
    assert result.returncode == 0, result.stdout + result.stderr + d.log()
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def _service(d: Superd, name: str) -> dict[str, Any]:
    for svc in _status(d)["services"]:
        if svc["name"] == name:
            return dict(svc)
    raise AssertionError(f"no service {name} in superd status")


def _markers(tmp_path: Path, service: str) -> set[str]:
    return {p.name for p in _marks(tmp_path).glob(f"{service}.*")}


def _answer(addr: str, port: int) -> bytes:
    return f"{addr} {port} {addr} {port}\n".encode()


def _ensure_nofile(needed: int) -> None:
    """Raise this process's descriptor limit (up to the hard limit) if needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        pytest.skip(f"RLIMIT_NOFILE {soft} is below the {needed} descriptors this test needs")


def _fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except FileNotFoundError:
        return 0


# --- 1. headers from a test client -----------------------------------------


@pytest.mark.parametrize("header,client", [
    pytest.param(proxy_v1("203.0.113.7", 4242), ("203.0.113.7", 4242), id="v1-tcp4"),
    pytest.param(proxy_v2("203.0.113.7", 4242, tlvs=SOME_TLVS), ("203.0.113.7", 4242),
                 id="v2-tcp4-tlvs"),
    pytest.param(proxy_v1("2001:db8::7", 4343, "2001:db8::1"), ("2001:db8::7", 4343),
                 id="v1-tcp6"),
    pytest.param(proxy_v2("2001:db8::7", 4343, "2001:db8::1", tlvs=SOME_TLVS),
                 ("2001:db8::7", 4343), id="v2-tcp6-tlvs"),
])
def test_header_and_payload_in_one_send_reach_the_program_intact(
        superd: Start, tmp_path: Path, header: bytes, client: tuple[str, int]) -> None:
    port = free_port()
    with _daemon(superd, cfg_echo(tmp_path, port, free_port(), free_port())) as d:
        out = _exchange(port, header + PAYLOAD)
        # The program sees the real client, and its first read is the client's
        # first byte: nothing of the payload is lost, nothing of the header left.
        assert out == _answer(*client) + PAYLOAD, (out[:200], d.log())
        assert _markers(tmp_path, "anyproxy") == {f"anyproxy.{client[1]}"}
        assert re.search(rf"anyproxy\[\d+\] \[?{re.escape(client[0])}\]?:{client[1]}: "
                         r"exit 0", d.wait_log(r"anyproxy\[\d+\] .*exit 0")), d.log()


def test_header_dribbled_in_pieces_still_leaves_the_payload_intact(
        superd: Start, tmp_path: Path) -> None:
    port = free_port()
    header = proxy_v2("203.0.113.7", 4242, tlvs=SOME_TLVS)
    with _daemon(superd, cfg_echo(tmp_path, port, free_port(), free_port())):
        with _connect(port) as sock:
            for piece in (header[:5], header[5:15], header[15:30], header[30:]):
                sock.sendall(piece)
                time.sleep(0.2)
            sock.sendall(PAYLOAD)
            sock.shutdown(socket.SHUT_WR)
            out = _read_to_close(sock)
        assert out == _answer("203.0.113.7", 4242) + PAYLOAD


def test_version_restricted_services_refuse_the_other_version(
        superd: Start, tmp_path: Path) -> None:
    any_port, v1_port, v2_port = free_port(), free_port(), free_port()
    with _daemon(superd, cfg_echo(tmp_path, any_port, v1_port, v2_port)) as d:
        # Positive controls: each service serves the version it takes.
        assert (_exchange(v1_port, proxy_v1("203.0.113.7", 1001) + b"one")
                == _answer("203.0.113.7", 1001) + b"one")
        assert (_exchange(v2_port, proxy_v2("203.0.113.7", 2001) + b"two")
                == _answer("203.0.113.7", 2001) + b"two")
        # The other version: closed by superd, no program.
        assert _refused(v1_port, proxy_v2("203.0.113.7", 1002, tlvs=SOME_TLVS) + b"x") == b""
        assert _refused(v2_port, proxy_v1("203.0.113.7", 2002) + b"x") == b""
        assert _markers(tmp_path, "v1only") == {"v1only.1001"}
        assert _markers(tmp_path, "v2only") == {"v2only.2001"}
        for name in ("v1only", "v2only"):
            svc = _service(d, name)
            assert svc["accepted"] == 1, svc
            assert svc["rejected"] == {"proxy": 1}, svc
        assert "v2 header where only v1 is accepted" in d.log()
        assert "v1 header where only v2 is accepted" in d.log()


def test_local_and_unknown_headers_are_health_checks_without_a_program(
        superd: Start, tmp_path: Path) -> None:
    port = free_port()
    with _daemon(superd, cfg_echo(tmp_path, port, free_port(), free_port())) as d:
        assert _refused(port, proxy_v2_local() + b"ignored") == b""
        assert _refused(port, b"PROXY UNKNOWN\r\n") == b""
        svc = _service(d, "anyproxy")
        assert svc["health_checks"] == 2, svc
        assert svc["accepted"] == 0 and svc["exits"] == {} and svc["rejected"] == {}, svc
        assert _markers(tmp_path, "anyproxy") == set()


# --- 2. access control and limits use the real client ----------------------


def test_allow_list_applies_to_the_real_client(superd: Start, tmp_path: Path) -> None:
    port = free_port()
    with _daemon(superd, cfg_access(tmp_path, port, free_port())) as d:
        assert (_exchange(port, proxy_v1("203.0.113.7", 4242) + b"hi")
                == _answer("203.0.113.7", 4242) + b"hi")
        # An IPv4-mapped TCP6 source is that IPv4 client, for allow and for the program.
        assert (_exchange(port, proxy_v2("::ffff:203.0.113.9", 4343, "::1") + b"hi")
                == _answer("203.0.113.9", 4343) + b"hi")
        # The balancer (127.0.0.1) is not in allow either: only the header counts.
        assert _refused(port, proxy_v2("198.51.100.1", 5151) + b"hi") == b""
        svc = _service(d, "allowed")
        assert svc["accepted"] == 2 and svc["rejected"] == {"denied": 1}, svc
        assert _markers(tmp_path, "allowed") == {"allowed.4242", "allowed.4343"}
        log = d.wait_log(r"allowed\[\d+\] 203\.0\.113\.7:4242: exit 0")
        assert re.search(r"allowed: refused 198\.51\.100\.1:5151: not in the allow list",
                         log), log


def test_per_source_counts_the_real_client(superd: Start, tmp_path: Path) -> None:
    port = free_port()
    with _daemon(superd, cfg_access(tmp_path, free_port(), port)) as d, ExitStack() as stack:
        first = stack.enter_context(_connect(port))
        first.sendall(proxy_v1("203.0.113.7", 4242))
        assert _read_line(first) == b"ready 203.0.113.7 4242\n", d.log()
        # Same real client, another port, same balancer connection source: refused.
        assert _refused(port, proxy_v2("203.0.113.7", 4243)) == b""
        # Another real client through the same balancer is served meanwhile.
        other = stack.enter_context(_connect(port))
        other.sendall(proxy_v2("203.0.113.8", 5000, tlvs=SOME_TLVS))
        assert _read_line(other) == b"ready 203.0.113.8 5000\n", d.log()

        svc = _service(d, "held")
        assert svc["accepted"] == 2 and svc["active"] == 2, svc
        assert svc["rejected"] == {"per_source": 1}, svc
        clients = sorted(c["client"] for c in svc["connections"])
        assert clients == ["203.0.113.7:4242", "203.0.113.8:5000"], svc
        assert _markers(tmp_path, "held") == {"held.4242", "held.5000"}
        log = d.wait_log(r"held: refused 203\.0\.113\.7:4243: .*per_source")
        assert "127.0.0.1:" not in log.split("ready:", 1)[1], log

        first.shutdown(socket.SHUT_WR)
        other.shutdown(socket.SHUT_WR)
        assert _read_to_close(first) == b"" and _read_to_close(other) == b""
        d.wait_log(r"held\[\d+\] 203\.0\.113\.7:4242: exit 0")
        d.wait_log(r"held\[\d+\] 203\.0\.113\.8:5000: exit 0")


# --- 3. proxy_from ---------------------------------------------------------


def test_header_from_a_peer_not_in_proxy_from_is_refused(
        superd: Start, tmp_path: Path) -> None:
    port = free_port()
    with _daemon(superd, cfg_strict(tmp_path, port)) as d:
        header = proxy_v1("203.0.113.7", 4242) + b"payload"
        before = _service(d, "strict")["rejected"].get("proxy_from", 0)
        assert _refused(port, header, source="127.0.0.9") == b""
        assert _refused(port, proxy_v2("203.0.113.7", 4243) + b"x", source="127.0.0.9") == b""
        after = _service(d, "strict")
        assert after["rejected"].get("proxy_from", 0) == before + 2, after
        assert after["accepted"] == 0, after
        assert _markers(tmp_path, "strict") == set()
        log = d.wait_log(r"strict: refused 127\.0\.0\.9:\d+: not in proxy_from")
        # Positive control: the same header from the balancer is served.
        assert _exchange(port, header) == _answer("203.0.113.7", 4242) + b"payload", log


# --- 4. malformed, truncated, too slow -------------------------------------


def test_malformed_truncated_and_late_headers_are_refused(
        superd: Start, tmp_path: Path) -> None:
    port = free_port()
    with _daemon(superd, cfg_strict(tmp_path, port)) as d:
        assert _refused(port, b"GET / HTTP/1.0\r\n\r\n") == b""
        assert _refused(port, b"PROXY TCP4 203.0.113.7 127.0.0.1 42", shutdown=True) == b""
        assert _refused(port, proxy_v2("203.0.113.7", 42)[:20], shutdown=True) == b""
        with _connect(port) as sock:  # never completes: closed after proxy_timeout (1s)
            sock.sendall(b"PROXY TCP4 203.0.113.7 ")
            started = time.monotonic()
            assert _read_to_close(sock, timeout=15.0) == b""
            assert time.monotonic() - started >= 0.5
        with _connect(port):  # sends nothing at all: same
            pass
        assert wait_until(lambda: _service(d, "strict")["rejected"].get("proxy") == 5, 15), \
            _service(d, "strict")
        svc = _service(d, "strict")
        assert svc["accepted"] == 0 and svc["exits"] == {}, svc
        assert _markers(tmp_path, "strict") == set()
        assert "strict: refused 127.0.0.1:" in d.log()


def test_flood_of_malformed_headers_is_counted_and_logged_in_summary(
        superd: Start, tmp_path: Path) -> None:
    port = free_port()
    flood = 300
    with _daemon(superd, cfg_strict(tmp_path, port)) as d:
        start = len(d.log().splitlines())
        for i in range(flood):
            with _connect(port) as sock:
                sock.sendall(b"NOT A PROXY HEADER %d\r\n" % i)
        assert wait_until(
            lambda: _service(d, "strict")["rejected"].get("proxy") == flood, 30), \
            _service(d, "strict")

        def lines() -> list[str]:
            return d.log().splitlines()[start:]

        def summarised() -> int:
            return sum(int(m) for m in re.findall(
                r"refused (\d+) more connection", "\n".join(lines())))

        def logged_one_by_one() -> list[str]:
            return [ln for ln in lines() if re.search(r"strict: refused ", ln)]

        # Every refusal shows up either on its own line or in a summary line
        # (after the throttle's window, 10s).
        assert wait_until(lambda: len(logged_one_by_one()) + summarised() == flood, 40), \
            "\n".join(lines())
        assert 1 <= len(logged_one_by_one()) <= 10, "\n".join(lines())
        assert len(lines()) <= 20, "\n".join(lines())
        svc = _service(d, "strict")
        assert svc["accepted"] == 0 and svc["exits"] == {}, svc
        assert _markers(tmp_path, "strict") == set()


# --- 5. slowloris ----------------------------------------------------------


def test_slowloris_of_idle_connections_delays_no_one_and_times_out(
        superd: Start, tmp_path: Path) -> None:
    idle_count, proxy_timeout = 300, 4.0
    _ensure_nofile(idle_count + 200)
    slow_port, plain_port = free_port(), free_port()
    config = cfg_slowloris(tmp_path, slow_port, plain_port, proxy_timeout)
    with _daemon(superd, config) as d, ExitStack() as stack:
        base_fds = _fd_count(d.pid)
        idle = [stack.enter_context(_connect(slow_port)) for _ in range(idle_count)]
        # superd has accepted them all and holds them while they send nothing.
        assert wait_until(lambda: _fd_count(d.pid) >= base_fds + idle_count, 10), \
            (_fd_count(d.pid), base_fds)

        served = _exchange(slow_port, proxy_v2("203.0.113.7", 4242) + b"through",
                           timeout=proxy_timeout)
        assert served == _answer("203.0.113.7", 4242) + b"through", d.log()
        with _connect(plain_port, "127.0.0.6") as sock:  # the other, non-PROXY service
            cport = sock.getsockname()[1]
            _send_once(sock, b"direct")
            sock.shutdown(socket.SHUT_WR)
            plain = _read_to_close(sock, timeout=proxy_timeout)
        assert plain == _answer("127.0.0.6", cport) + b"direct", d.log()

        # Both were served while the idle connections were still pending.
        sel = selectors.DefaultSelector()
        stack.callback(sel.close)
        for sock in idle:
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
        assert sel.select(timeout=0) == [], "idle connections closed before proxy_timeout"

        # After proxy_timeout superd closes every one of them: the clients see EOF.
        closed = 0
        deadline = time.monotonic() + proxy_timeout + 20
        while closed < idle_count and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1.0):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(16)
                except ConnectionResetError:
                    data = b""
                assert data == b""
                sel.unregister(sock)
                closed += 1
        assert closed == idle_count, f"{closed} of {idle_count} idle connections closed"
        svc = _service(d, "slow")
        assert svc["rejected"] == {"proxy": idle_count}, svc
        assert svc["accepted"] == 1, svc
        assert _markers(tmp_path, "slow") == {"slow.4242"}
        assert wait_until(lambda: _fd_count(d.pid) <= base_fds + 5, 10), _fd_count(d.pid)


# --- 6. a real HAProxy -----------------------------------------------------

HAPROXY = find_program("haproxy")
needs_haproxy = needs_program("haproxy", "haproxy")


def _haproxy_config(v1_front: int, v2_front: int, superd_port: int) -> str:
    return textwrap.dedent(f"""\
        global
            maxconn 200
            nbthread 1

        defaults
            mode tcp
            timeout connect 2s
            timeout client 20s
            timeout server 20s
            timeout check 2s

        frontend via_v1
            bind 127.0.0.1:{v1_front}
            default_backend superd_v1

        frontend via_v2
            bind 127.0.0.1:{v2_front}
            default_backend superd_v2

        backend superd_v1
            server local 127.0.0.1:{superd_port} send-proxy check inter 300ms

        backend superd_v2
            server local 127.0.0.1:{superd_port} send-proxy-v2 proxy-v2-options crc32c check inter 300ms check-send-proxy
        """)  # noqa: E501


@contextmanager
def _haproxy(tmp_path: Path, config: str) -> Iterator[subprocess.Popen[bytes]]:
    assert HAPROXY is not None
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(config)
    checked = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True,
                             text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    out = open(tmp_path / "haproxy.log", "wb")
    proc = subprocess.Popen([HAPROXY, "-f", str(cfg), "-db"], stdin=subprocess.DEVNULL,
                            stdout=out, stderr=out)
    out.close()
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


@needs_haproxy
def test_haproxy_in_front_passes_real_clients_and_its_checks_start_no_program(
        superd: Start, tmp_path: Path) -> None:
    port, v1_front, v2_front = free_port(), free_port(), free_port()
    with _daemon(superd, cfg_balanced(tmp_path, port)) as d, \
            _haproxy(tmp_path, _haproxy_config(v1_front, v2_front, port)) as hap:
        def haproxy_log() -> str:
            return (tmp_path / "haproxy.log").read_text(errors="replace")

        # Both backends' checks reach superd before any client is sent.
        assert wait_until(lambda: hap.poll() is not None
                          or _service(d, "balanced")["health_checks"] >= 4, 15), \
            haproxy_log() + d.log()
        assert hap.poll() is None, haproxy_log()

        clients = [("127.0.0.5", v1_front), ("127.0.0.6", v2_front),
                   ("127.0.0.7", v1_front), ("127.0.0.8", v2_front)]
        for source, front in clients:
            with _connect(front, source) as sock:
                cport = sock.getsockname()[1]
                _send_once(sock, PAYLOAD)  # the client's first packet
                sock.shutdown(socket.SHUT_WR)
                out = _read_to_close(sock)
            assert out == _answer(source, cport) + PAYLOAD, \
                (source, front, out[:200], haproxy_log(), d.log())
            d.wait_log(rf"balanced\[\d+\] {re.escape(source)}:{cport}: exit 0")

        # ~2 s more of checks every 300 ms on each backend: counted, no programs.
        checks_before = _service(d, "balanced")["health_checks"]
        time.sleep(2.0)
        svc = _service(d, "balanced")
        assert svc["health_checks"] > checks_before, svc
        assert svc["accepted"] == len(clients), svc
        assert sum(svc["exits"].values()) == len(clients), svc
        assert svc["exits"] == {"exit 0": len(clients)}, svc
        assert svc["rejected"] == {}, (svc, d.log())
        assert svc["active"] == 0 and svc["connections"] == [], svc
        assert len(_markers(tmp_path, "balanced")) == len(clients)
        assert hap.poll() is None, haproxy_log()


@needs_haproxy
def test_example_haproxy_config_parses() -> None:
    """etc/haproxy-superd.cfg is valid for HAProxy (-c parses only: its
    placeholder backends are never connected to)."""
    assert HAPROXY is not None
    example = ROOT / "etc" / "haproxy-superd.cfg"
    text = example.read_text()
    assert "send-proxy-v2" in text and "check-send-proxy" in text
    assert "192.0.2.10" in text and "192.0.2.11" in text
    result = subprocess.run([HAPROXY, "-c", "-f", str(example)], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


# --- 7. superd check -------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_superd_check_accepts_the_configurations_used_here(
        tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(CONFIGS[name](tmp_path))
    os.chmod(path, 0o644)
    result = run_superd("check", "-c", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_superd_check_refuses_proxy_protocol_without_proxy_from(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(_config(tmp_path, f"""\
        open:
          listen: 127.0.0.1:{free_port()}
          exec: [/bin/cat]
          proxy_protocol: v2
        """))
    os.chmod(path, 0o644)
    result = run_superd("check", "-c", str(path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert re.search(rf"{re.escape(str(path))}:\d+:\d+: .*proxy_from", result.stdout
                     + result.stderr), result.stdout + result.stderr
