"""The internal services (echo, discard, daytime, chargen, time) end to end.

RFC 862/863/867/864/868 over TCP and UDP, served inside the daemon's loop.
Every test runs the real daemon (the ``superd`` fixture) on loopback ports
and talks to it with real sockets.  Timeouts only keep a broken daemon from
hanging the suite; nothing asserts how fast anything is.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from conftest import Superd, free_port, tcp_exchange, wait_until

Start = Callable[..., Superd]

RFC868_EPOCH = 2208988800
KINDS = ("echo", "discard", "daytime", "chargen", "time")
PRINTABLE = frozenset(range(32, 127))
CHARGEN_LINE = 74  # 72 printable characters + CRLF
TIMEOUT = 10.0  # for every blocking socket call: only against hangs


# --- helpers -------------------------------------------------------------------


def internal_config(ports: dict[str, int], host: str = "127.0.0.1",
                    protocols: tuple[str, ...] = ("tcp", "udp"), extra: str = "") -> str:
    """Every internal service in *ports*, over each protocol, on HOST:PORT
    (the same port number for tcp and udp, as /etc/services has them)."""
    lines = ["services:"]
    for kind, port in ports.items():
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        for proto in protocols:
            lines += [f"  {kind}-{proto}:",
                      f"    internal: {kind}",
                      f"    protocol: {proto}",
                      f'    listen: "{where}"']
            if extra:
                lines += [f"    {line}" for line in extra.splitlines()]
    return "\n".join(lines) + "\n"


def start_all(superd: Start, host: str = "127.0.0.1", extra: str = "") -> tuple[
        Superd, dict[str, int]]:
    ports = {kind: free_port(host=host) for kind in KINDS}
    assert len(set(ports.values())) == len(ports)
    return superd(internal_config(ports, host, extra=extra)), ports


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


@contextmanager
def tcp_client(port: int, host: str = "127.0.0.1",
               rcvbuf: int | None = None) -> Iterator[socket.socket]:
    with socket.socket(family_of(host), socket.SOCK_STREAM) as s:
        if rcvbuf is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(TIMEOUT)
        s.connect((host, port))
        yield s


@contextmanager
def udp_client(host: str = "127.0.0.1", port: int = 0,
               timeout: float = TIMEOUT) -> Iterator[socket.socket]:
    with socket.socket(family_of(host), socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.bind((host, port))
        yield s


@contextmanager
def bound_or_skip(host: str, port: int) -> Iterator[socket.socket]:
    """A UDP socket bound to HOST:PORT with a short timeout (for "nothing
    comes back"); skips the test if the port is taken on this host."""
    with socket.socket(family_of(host), socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        try:
            s.bind((host, port))
        except OSError as e:
            pytest.skip(f"[{host}]:{port}/udp cannot be bound here: {e}")
        yield s


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    for _ in range(n + 1):  # every recv returns at least one byte or raises
        if len(buf) >= n:
            break
        chunk = s.recv(min(65536, n - len(buf)))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def read_to_end(s: socket.socket, limit: int = 64 << 20) -> tuple[bytes, bool]:
    """Everything until EOF (or a reset); (data, was_reset).  At most *limit*
    bytes: a server that never closes fails instead of hanging."""
    buf = bytearray()
    while len(buf) <= limit:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return bytes(buf), True
        if not chunk:
            return bytes(buf), False
        buf += chunk
    raise AssertionError(f"no EOF after {limit} bytes")


def udp_ask(s: socket.socket, target: tuple[str, int], data: bytes) -> bytes:
    s.sendto(data, target)
    reply, peer = s.recvfrom(65536)
    assert peer[:2] == target[:2] or peer[1] == target[1]
    return reply


def parse_daytime(line: bytes) -> float:
    """Seconds since the epoch of a daytime reply ("Tue Mar 05 10:04:05 2024 UTC")."""
    text = line.decode("ascii").strip()
    fields = text.split()
    assert len(fields) >= 5, text
    parsed = time.strptime(" ".join(fields[:5]), "%a %b %d %H:%M:%S %Y")
    return time.mktime(parsed)


def check_chargen_lines(data: bytes, first: int | None = None) -> int:
    """Assert that *data* (starting on a line boundary) is well-formed chargen:
    72 printable characters and CRLF per line, each line starting one
    character later than the one before and continuing the rotating pattern.
    Returns the number of complete lines."""
    lines = data.split(b"\r\n")
    complete, tail = lines[:-1], lines[-1]
    assert complete, data[:200]
    start = complete[0][0] if first is None else first
    for i, line in enumerate(complete):
        assert len(line) == 72, (i, line)
        assert set(line) <= PRINTABLE, (i, line)
        want_first = 32 + (start - 32 + i) % 95
        assert line[0] == want_first, (i, line)
        assert line == bytes(32 + (want_first - 32 + k) % 95 for k in range(72)), (i, line)
    assert len(tail) < 72 and set(tail) <= PRINTABLE
    return len(complete)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if a new server could bind HOST:PORT for TCP (listening, with
    SO_REUSEADDR as every server does) and for UDP."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(family_of(host), kind) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return False
                raise
            if kind == socket.SOCK_STREAM:
                s.listen()
    return True


def inq(s: socket.socket) -> int:
    """Bytes waiting in the socket's receive queue (SIOCINQ == FIONREAD)."""
    import fcntl
    import termios
    raw = fcntl.ioctl(s.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


def wait_stalled(s: socket.socket) -> int:
    """Wait until a client that never reads has data queued and the queue has
    stopped growing (its receive window is full); the queued byte count."""
    assert wait_until(lambda: inq(s) > 0, TIMEOUT), "nothing arrived"
    last, same = -1, 0
    for _ in range(500):  # at most ~10 s
        now = inq(s)
        same = same + 1 if now == last else 0
        if same >= 5:
            return now
        last = now
        time.sleep(0.02)
    raise AssertionError("the receive queue never stopped growing")


def fill_without_reading(s: socket.socket, limit: int = 256 << 20) -> int:
    """Send until the kernel pushes back; bytes sent.  Fails if the peer
    takes *limit* bytes without ever pushing back."""
    s.setblocking(False)
    sent = 0
    chunk = b"x" * 65536
    try:
        while sent < limit:
            try:
                sent += s.send(chunk)
            except BlockingIOError:
                # the peer may just be slow: give it a moment, then try again
                _, writable, _ = select.select([], [s], [], 0.5)
                if not writable:
                    return sent
    finally:
        s.settimeout(TIMEOUT)
    raise AssertionError(f"sent {limit} bytes without the peer ever pushing back")


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    # utime and stime: fields 14 and 15 of /proc/PID/stat (state, field 3, is fields[0])
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def daemon_alive(d: Superd) -> bool:
    return d.proc is not None and d.proc.poll() is None


# --- 1. TCP echo (RFC 862) -----------------------------------------------------


def test_tcp_echo_returns_bytes_exactly(superd: Start) -> None:
    d, ports = start_all(superd)
    for payload in (b"x", b"hello\r\n", bytes(range(256)), b"\0\xff\r\n" * 1000):
        assert tcp_exchange(ports["echo"], payload, timeout=TIMEOUT) == payload
    # interactive: each write comes back before the next is sent
    with tcp_client(ports["echo"]) as s:
        for i in range(20):
            msg = f"line {i}\n".encode()
            s.sendall(msg)
            assert recv_exact(s, len(msg)) == msg
        s.shutdown(socket.SHUT_WR)
        assert read_to_end(s) == (b"", False)
    # nothing sent: the server closes when the client does
    assert tcp_exchange(ports["echo"], b"", timeout=TIMEOUT) == b""
    assert daemon_alive(d)


def test_tcp_echo_one_mebibyte_with_concurrent_reading(superd: Start) -> None:
    d, ports = start_all(superd)
    payload = os.urandom(1 << 20)
    errors: list[BaseException] = []
    with tcp_client(ports["echo"]) as s:
        def send() -> None:
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
            except BaseException as e:  # reported by the main thread
                errors.append(e)
        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        received, reset = read_to_end(s, limit=2 << 20)
        sender.join(TIMEOUT)
        assert not sender.is_alive()
    assert not errors, errors
    assert not reset
    assert len(received) == len(payload)
    assert received == payload
    assert daemon_alive(d)


def test_tcp_echo_sender_that_never_reads_is_pushed_back(superd: Start) -> None:
    """A client that writes without reading fills its own path (superd stops
    reading it), then gets every byte back once it reads."""
    d, ports = start_all(superd)
    with tcp_client(ports["echo"]) as s:
        sent = fill_without_reading(s)
        assert sent > 0
        # other clients are served meanwhile
        assert tcp_exchange(ports["echo"], b"still here", timeout=TIMEOUT) == b"still here"
        s.shutdown(socket.SHUT_WR)
        received, reset = read_to_end(s, limit=sent + 1)
    assert not reset
    assert received == b"x" * sent
    assert daemon_alive(d)


def test_tcp_echo_hundred_concurrent_clients(superd: Start) -> None:
    port = free_port()
    d = superd(f"""
    services:
      echo:
        internal: echo
        listen: "127.0.0.1:{port}"
        max_connections: 200
        per_source: 200
    """)
    clients: list[socket.socket] = []
    try:
        for _ in range(100):
            s = socket.socket()
            clients.append(s)
            s.settimeout(TIMEOUT)
            s.connect(("127.0.0.1", port))
        # all 100 are open at once; each gets its own data back, twice
        for round_ in range(2):
            for i, s in enumerate(clients):
                s.sendall(f"client {i} round {round_} {'.' * i}\n".encode())
            for i, s in enumerate(clients):
                msg = f"client {i} round {round_} {'.' * i}\n".encode()
                assert recv_exact(s, len(msg)) == msg
        for s in clients:
            s.shutdown(socket.SHUT_WR)
        for s in clients:
            assert read_to_end(s) == (b"", False)
    finally:
        for s in clients:
            s.close()
    assert daemon_alive(d)


# --- 2. TCP discard (RFC 863) --------------------------------------------------


def test_tcp_discard_returns_nothing_and_closes_when_client_closes(superd: Start) -> None:
    d, ports = start_all(superd)
    assert tcp_exchange(ports["discard"], b"into the void\n" * 10000, timeout=TIMEOUT) == b""
    with tcp_client(ports["discard"]) as s:
        for _ in range(10):
            s.sendall(os.urandom(100_000))
        # the connection stays open while the client sends: nothing to read
        readable, _, _ = select.select([s], [], [], 0.3)
        assert not readable, "discard sent something or closed early"
        s.shutdown(socket.SHUT_WR)
        assert read_to_end(s) == (b"", False)
    assert daemon_alive(d)


# --- 3. TCP daytime (RFC 867) --------------------------------------------------


def test_tcp_daytime_one_line_then_close(superd: Start) -> None:
    d, ports = start_all(superd)
    before = time.time()
    with tcp_client(ports["daytime"]) as s:
        data, reset = read_to_end(s, limit=1000)
    after = time.time()
    assert not reset
    assert data.endswith(b"\r\n"), data
    assert data.count(b"\n") == 1 and data.count(b"\r") == 1, data
    assert set(data[:-2]) <= PRINTABLE, data
    when = parse_daytime(data)
    assert int(before) - 1 <= when <= after + 1, (data, before, after)
    # the server closes without waiting for the client to send or close
    assert tcp_exchange(ports["daytime"], b"", shutdown=False, timeout=TIMEOUT).endswith(b"\r\n")
    assert daemon_alive(d)


# --- 4. TCP time (RFC 868) -----------------------------------------------------


def test_tcp_time_four_bytes_big_endian_since_1900_then_close(superd: Start) -> None:
    d, ports = start_all(superd)
    before = time.time()
    with tcp_client(ports["time"]) as s:
        data, reset = read_to_end(s, limit=1000)
    after = time.time()
    assert not reset
    assert len(data) == 4, data
    (value,) = struct.unpack("!I", data)
    assert int(before) + RFC868_EPOCH - 1 <= value <= int(after) + RFC868_EPOCH + 1, \
        (value, before + RFC868_EPOCH)
    assert len(tcp_exchange(ports["time"], b"", shutdown=False, timeout=TIMEOUT)) == 4
    assert daemon_alive(d)


# --- 5. TCP chargen (RFC 864) --------------------------------------------------


def test_tcp_chargen_rotating_lines(superd: Start) -> None:
    d, ports = start_all(superd)
    with tcp_client(ports["chargen"]) as s:
        data = recv_exact(s, CHARGEN_LINE * 95 * 3 + 10)  # three full cycles and more
    lines = check_chargen_lines(data, first=ord(" "))
    assert lines == 95 * 3
    assert daemon_alive(d)


def test_tcp_chargen_stops_when_client_closes(superd: Start) -> None:
    d, ports = start_all(superd)
    before = fd_count(d.pid)
    for _ in range(20):
        with tcp_client(ports["chargen"]) as s:
            recv_exact(s, 10_000)
            s.shutdown(socket.SHUT_WR)
    assert wait_until(lambda: fd_count(d.pid) == before, TIMEOUT), (fd_count(d.pid), before)
    assert daemon_alive(d)


def test_tcp_slow_chargen_reader_does_not_stall_others(superd: Start) -> None:
    d, ports = start_all(superd)
    with tcp_client(ports["chargen"], rcvbuf=4096) as slow:
        wait_stalled(slow)  # its receive buffer is full; superd cannot write to it
        # meanwhile: echo, a second chargen client, daytime and time all work
        for i in range(5):
            msg = f"echo while stalled {i}".encode()
            assert tcp_exchange(ports["echo"], msg, timeout=TIMEOUT) == msg
            with tcp_client(ports["chargen"]) as other:
                check_chargen_lines(recv_exact(other, CHARGEN_LINE * 200), first=ord(" "))
            assert tcp_exchange(ports["daytime"], timeout=TIMEOUT).endswith(b"\r\n")
            assert len(tcp_exchange(ports["time"], timeout=TIMEOUT)) == 4
        # the slow reader is still connected and still gets a correct stream
        assert inq(slow) > 0
        check_chargen_lines(recv_exact(slow, CHARGEN_LINE * 500), first=ord(" "))
    assert daemon_alive(d)


def test_stalled_clients_do_not_make_the_loop_spin(superd: Start) -> None:
    """A chargen and an echo client that never read leave superd idle (it
    waits for writability instead of retrying the send in a loop)."""
    d, ports = start_all(superd)
    with tcp_client(ports["chargen"], rcvbuf=4096) as c, \
            tcp_client(ports["echo"], rcvbuf=4096) as e:
        wait_stalled(c)
        fill_without_reading(e)
        before = cpu_seconds(d.pid)
        time.sleep(1.0)
        used = cpu_seconds(d.pid) - before
        # a busy loop uses ~1 s here; an idle daemon ~0.  Generous, not a benchmark.
        assert used < 0.5, f"superd used {used:.2f}s of CPU in 1s with two stalled clients"
    assert daemon_alive(d)


def test_tcp_slow_echo_client_does_not_stall_others(superd: Start) -> None:
    d, ports = start_all(superd)
    with tcp_client(ports["echo"], rcvbuf=4096) as slow:
        fill_without_reading(slow)
        for i in range(5):
            msg = f"other {i}".encode()
            assert tcp_exchange(ports["echo"], msg, timeout=TIMEOUT) == msg
            with tcp_client(ports["chargen"]) as other:
                check_chargen_lines(recv_exact(other, CHARGEN_LINE * 100), first=ord(" "))
    assert daemon_alive(d)


def test_tcp_internal_max_connections_queue_resumes(superd: Start) -> None:
    """Internal sessions count against max_connections; when one closes, a
    client waiting in the listen queue is served (on_limit: queue)."""
    port = free_port()
    d = superd(f"""
    services:
      echo:
        internal: echo
        listen: "127.0.0.1:{port}"
        max_connections: 2
    """)
    with tcp_client(port) as a, tcp_client(port) as b:
        for s in (a, b):
            s.sendall(b"in")
            assert recv_exact(s, 2) == b"in"
        with tcp_client(port) as waiting:
            waiting.sendall(b"queued")
            readable, _, _ = select.select([waiting], [], [], 0.3)
            assert not readable, "a third session was served past max_connections: 2"
            a.shutdown(socket.SHUT_WR)
            assert read_to_end(a) == (b"", False)
            assert recv_exact(waiting, 6) == b"queued"
            waiting.shutdown(socket.SHUT_WR)
            assert read_to_end(waiting) == (b"", False)
        b.sendall(b"still")
        assert recv_exact(b, 5) == b"still"
    assert daemon_alive(d)


def test_internal_services_honour_deny(superd: Start) -> None:
    """deny applies to internal services too, over TCP and UDP, and to IPv4
    clients of a dual-stack socket (seen as ::ffff:127.0.0.1)."""
    tcp, udp, dual = free_port(), free_port(), free_port()
    d = superd(f"""
    services:
      echo-tcp:
        internal: echo
        listen: "127.0.0.1:{tcp}"
        deny: [127.0.0.1]
      echo-udp:
        internal: echo
        protocol: udp
        listen: "127.0.0.1:{udp}"
        deny: [127.0.0.0/8]
      echo-dual:
        internal: echo
        protocol: udp
        listen: {dual}
        deny: [127.0.0.1]
    """)
    with tcp_client(tcp) as s:
        s.sendall(b"let me in")
        data, _reset = read_to_end(s)
    assert data == b""
    for target in (("127.0.0.1", udp), ("127.0.0.1", dual)):
        with udp_client(timeout=0.5) as s:
            s.sendto(b"let me in", target)
            with pytest.raises(socket.timeout):
                s.recvfrom(65536)
    with udp_client("::1") as s:  # not denied
        assert udp_ask(s, ("::1", dual), b"v6") == b"v6"
    d.wait_log(r"echo-tcp: refused 127\.0\.0\.1:\d+")
    assert daemon_alive(d)


# --- 6. UDP variants -----------------------------------------------------------


def test_udp_echo_returns_the_datagram(superd: Start) -> None:
    d, ports = start_all(superd)
    target = ("127.0.0.1", ports["echo"])
    with udp_client() as s:
        for payload in (b"x", b"hello\r\n", bytes(range(256)), os.urandom(8192),
                        os.urandom(60_000)):
            assert udp_ask(s, target, payload) == payload
    assert daemon_alive(d)


def test_udp_discard_returns_nothing(superd: Start) -> None:
    d, ports = start_all(superd)
    with udp_client(timeout=0.5) as s:
        s.sendto(b"nothing comes back", ("127.0.0.1", ports["discard"]))
        # a marker through echo, sent after it from the same socket: the first
        # datagram this socket receives must be the marker's echo
        s.settimeout(TIMEOUT)
        assert udp_ask(s, ("127.0.0.1", ports["echo"]), b"marker") == b"marker"
        s.settimeout(0.5)
        with pytest.raises(socket.timeout):
            s.recvfrom(65536)
    assert daemon_alive(d)


def test_udp_daytime_and_time_formats(superd: Start) -> None:
    d, ports = start_all(superd)
    with udp_client() as s:
        before = time.time()
        line = udp_ask(s, ("127.0.0.1", ports["daytime"]), b"")
        stamp = udp_ask(s, ("127.0.0.1", ports["time"]), b"anything")
        after = time.time()
    assert line.endswith(b"\r\n") and line.count(b"\n") == 1, line
    assert set(line[:-2]) <= PRINTABLE, line
    assert int(before) - 1 <= parse_daytime(line) <= after + 1, line
    assert len(stamp) == 4, stamp
    (value,) = struct.unpack("!I", stamp)
    assert int(before) + RFC868_EPOCH - 1 <= value <= int(after) + RFC868_EPOCH + 1
    assert daemon_alive(d)


def test_udp_chargen_datagram_of_printable_chars(superd: Start) -> None:
    # 200 requests back to back are a benchmark, not a client: over the
    # default reply_rate (10 a second per source), so this test raises it
    d, ports = start_all(superd, extra="reply_rate: 1000")
    with udp_client() as s:
        for i in range(200):  # past a full cycle of starting lines
            data = udp_ask(s, ("127.0.0.1", ports["chargen"]), f"{i}".encode())
            assert 0 < len(data) <= 512, len(data)
            assert set(data) <= PRINTABLE | {ord("\r"), ord("\n")}, data
            # the lines in it have the chargen shape (the first may be partial)
            head, _, rest = data.partition(b"\r\n")
            assert len(head) <= 72 and set(head) <= PRINTABLE
            if rest.count(b"\r\n"):
                check_chargen_lines(rest)
    assert daemon_alive(d)


# --- 7. UDP loop protection ----------------------------------------------------


@pytest.mark.parametrize("source_port", [7, 9, 13, 19, 37])
def test_udp_echo_ignores_datagrams_from_internal_service_ports(
        superd: Start, source_port: int) -> None:
    if os.geteuid() != 0:
        pytest.skip("binding a port below 1024 needs root")
    d, ports = start_all(superd)
    target = ("127.0.0.1", ports["echo"])
    with bound_or_skip("127.0.0.1", source_port) as looper:
        looper.sendto(b"bounce me", target)
        # the same datagram from an ordinary port is answered; it was sent
        # after the first, so by the time it is answered the first was handled
        with udp_client() as ordinary:
            assert udp_ask(ordinary, target, b"bounce me") == b"bounce me"
        with pytest.raises(socket.timeout):
            looper.recvfrom(65536)
    assert daemon_alive(d)


def test_udp_echo_ignores_datagrams_from_its_own_configured_ports(superd: Start) -> None:
    """The ports superd's own internal UDP services listen on (not only the
    well-known 7/9/13/19/37) are loop ports too: a second superserver whose
    chargen is on such a port cannot bounce packets off this echo."""
    echo = free_port()
    chargen = free_port(host="::1")
    d = superd(f"""
    services:
      echo:
        internal: echo
        protocol: udp
        listen: "127.0.0.1:{echo}"
      chargen:
        internal: chargen
        protocol: udp
        listen: "[::1]:{chargen}"
    """)
    target = ("127.0.0.1", echo)
    # the chargen is on [::1]:PORT, so 127.0.0.1:PORT is free for the client
    with udp_client(port=chargen, timeout=0.5) as looper, udp_client() as ordinary:
        looper.sendto(b"loop?", target)
        assert udp_ask(ordinary, target, b"loop?") == b"loop?"
        with pytest.raises(socket.timeout):
            looper.recvfrom(65536)
    assert daemon_alive(d)


# --- 8. IPv6 and dual stack ----------------------------------------------------


def exercise(host: str, ports: dict[str, int]) -> None:
    """One round of every service over TCP and UDP at HOST."""
    assert tcp_exchange(ports["echo"], b"six", host=host, timeout=TIMEOUT) == b"six"
    assert tcp_exchange(ports["discard"], b"gone", host=host, timeout=TIMEOUT) == b""
    assert tcp_exchange(ports["daytime"], host=host, timeout=TIMEOUT).endswith(b"\r\n")
    assert len(tcp_exchange(ports["time"], host=host, timeout=TIMEOUT)) == 4
    with tcp_client(ports["chargen"], host=host) as s:
        check_chargen_lines(recv_exact(s, CHARGEN_LINE * 100), first=ord(" "))
    with udp_client(host) as s:
        assert udp_ask(s, (host, ports["echo"]), b"udp six") == b"udp six"
        assert udp_ask(s, (host, ports["daytime"]), b"").endswith(b"\r\n")
        assert len(udp_ask(s, (host, ports["time"]), b"")) == 4
        chars = udp_ask(s, (host, ports["chargen"]), b"")
        assert 0 < len(chars) <= 512
        s.sendto(b"gone", (host, ports["discard"]))
        assert udp_ask(s, (host, ports["echo"]), b"after") == b"after"


def test_internal_services_on_ipv6_loopback(superd: Start) -> None:
    d, ports = start_all(superd, host="::1")
    exercise("::1", ports)
    # bound to ::1 only: not reachable over IPv4
    with socket.socket() as s:
        s.settimeout(TIMEOUT)
        assert s.connect_ex(("127.0.0.1", ports["echo"])) == errno.ECONNREFUSED
    assert daemon_alive(d)


def test_internal_services_on_dual_stack_bare_port(superd: Start) -> None:
    ports: dict[str, int] = {}
    for kind in KINDS:
        for _ in range(20):  # free on both families
            port = free_port()
            if port_free(port, "::1") and port not in ports.values():
                ports[kind] = port
                break
    assert len(ports) == len(KINDS)
    lines = ["services:"]
    for kind, port in ports.items():
        for proto in ("tcp", "udp"):
            lines += [f"  {kind}-{proto}:", f"    internal: {kind}",
                      f"    protocol: {proto}", f"    listen: {port}"]
    d = superd("\n".join(lines) + "\n")
    exercise("127.0.0.1", ports)
    exercise("::1", ports)
    assert daemon_alive(d)


def test_udp_loop_protection_on_dual_stack_socket(superd: Start) -> None:
    """On a dual-stack socket IPv4 peers arrive as ::ffff:127.0.0.1; the
    source-port check must still apply, for both families."""
    if os.geteuid() != 0:
        pytest.skip("binding a port below 1024 needs root")
    echo = free_port()
    d = superd(f"""
    services:
      echo:
        internal: echo
        protocol: udp
        listen: {echo}
    """)
    for host in ("127.0.0.1", "::1"):
        with bound_or_skip(host, 19) as looper:
            looper.sendto(b"loop?", (host, echo))
            with udp_client(host) as ordinary:
                assert udp_ask(ordinary, (host, echo), b"loop?") == b"loop?"
            with pytest.raises(socket.timeout):
                looper.recvfrom(65536)
    assert daemon_alive(d)


# --- 9. Graceful stop with internal clients connected ----------------------------


def test_sigterm_with_internal_clients_connected(superd: Start) -> None:
    d, ports = start_all(superd)
    clients: list[socket.socket] = []
    try:
        for kind in ("echo", "discard", "chargen"):
            for _ in range(3):
                s = socket.socket()
                clients.append(s)
                s.settimeout(TIMEOUT)
                s.connect(("127.0.0.1", ports[kind]))
        # every session is established inside the daemon before it is told to stop
        for s in clients[:3]:
            s.sendall(b"ping")
            assert recv_exact(s, 4) == b"ping"
        for s in clients[6:]:
            recv_exact(s, 100)
        slow = socket.socket()  # a chargen client that never reads
        clients.append(slow)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.settimeout(TIMEOUT)
        slow.connect(("127.0.0.1", ports["chargen"]))
        wait_stalled(slow)

        assert d.stop(TIMEOUT) == 0, d.log()  # SIGTERM
        assert "SIGTERM" in d.log()
        for s in clients:
            data, _reset = read_to_end(s)  # EOF or reset, not a timeout
            assert s is slow or s in clients[6:9] or data == b"", data
    finally:
        for s in clients:
            s.close()
    for port in ports.values():
        assert port_free(port), f"port {port} still in use after superd stopped"


# --- 10. Descriptors stay flat --------------------------------------------------


def test_fd_count_flat_over_2000_echo_connections(superd: Start) -> None:
    d, ports = start_all(superd)
    before = fd_count(d.pid)
    for i in range(2000):
        msg = f"{i}".encode()
        assert tcp_exchange(ports["echo"], msg, timeout=TIMEOUT) == msg
    assert wait_until(lambda: fd_count(d.pid) == before, TIMEOUT), \
        (fd_count(d.pid), before)
    assert fd_count(d.pid) == before
    assert daemon_alive(d)


def test_fd_count_flat_over_abrupt_internal_clients(superd: Start) -> None:
    """Clients that reset, vanish mid-stream or never send: every session's
    descriptor is still released."""
    d, ports = start_all(superd)
    linger_rst = struct.pack("ii", 1, 0)
    before = fd_count(d.pid)
    for i in range(100):
        for kind in ("echo", "discard", "chargen", "daytime", "time"):
            with tcp_client(ports[kind]) as s:
                if kind == "echo":
                    s.sendall(b"x" * 1000)
                elif kind == "chargen":
                    recv_exact(s, 100)
                if i % 2:  # close with RST instead of FIN
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_rst)
    assert wait_until(lambda: fd_count(d.pid) == before, TIMEOUT), \
        (fd_count(d.pid), before)
    # and the services still work
    assert tcp_exchange(ports["echo"], b"ok", timeout=TIMEOUT) == b"ok"
    assert daemon_alive(d)


# --- 11. Internal TCP sessions end: idle_timeout and timeout ----------------------


def test_tcp_idle_clients_are_closed_and_free_max_connections(superd: Start) -> None:
    """Clients that connect and never send cannot hold max_connections: after
    idle_timeout they are closed (logged) and a queued client is served
    (finding 9: 64 idle clients held the service forever)."""
    port = free_port()
    d = superd(f"""
    services:
      echo:
        internal: echo
        listen: "127.0.0.1:{port}"
        max_connections: 2
        idle_timeout: 1
    """)
    with tcp_client(port) as a, tcp_client(port) as b, tcp_client(port) as queued:
        queued.sendall(b"let me in")
        for s in (a, b):
            assert read_to_end(s) == (b"", False)  # closed by superd, not reset
        assert recv_exact(queued, 9) == b"let me in"
    d.wait_log(r"echo: closed 127\.0\.0\.1:\d+ after 1s without a byte either way "
               r"\(idle_timeout\)", count=2)
    assert daemon_alive(d)


def test_tcp_busy_session_ends_at_timeout(superd: Start) -> None:
    """timeout: on an internal service closes a session after that long even
    while bytes flow (it used to be accepted and ignored)."""
    port = free_port()
    d = superd(f"""
    services:
      echo:
        internal: echo
        listen: "127.0.0.1:{port}"
        timeout: 1
    """)
    echoed, closed = 0, False
    with tcp_client(port) as s:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and not closed:
            try:
                s.sendall(b".")
                closed = s.recv(1) == b""
                echoed += not closed
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            time.sleep(0.05)
    assert closed, f"still open after {echoed} echoes"
    assert echoed > 0
    d.wait_log(r"echo: closed 127\.0\.0\.1:\d+ after 1s \(timeout\)")
    assert daemon_alive(d)


def test_tcp_idle_deadline_moves_with_every_byte_either_way() -> None:
    """TcpSession on a fake clock: the idle deadline counts from the last
    byte in or out, not from the start."""
    import selectors

    from superd.internal import TcpSession
    from superd.timers import Timers

    now = [100.0]
    timers = Timers(clock=lambda: now[0])
    selector = selectors.DefaultSelector()
    ours, client = socket.socketpair()
    closed: list[TcpSession] = []
    session = TcpSession("echo", ours, selector, closed.append, timers=timers,
                         idle_timeout=300.0)
    try:
        session.start()
        for _ in range(3):  # 3 x 200 s, with a byte each time
            now[0] += 200.0
            timers.run_due()
            client.sendall(b"x")
            session(selectors.EVENT_READ)
            assert client.recv(1) == b"x"
        now[0] += 299.0
        timers.run_due()
        assert not closed
        assert timers.timeout() == 1.0  # 300 s after the last byte, not the first
        now[0] += 1.0
        timers.run_due()
        assert closed == [session]
        assert client.recv(1) == b""
    finally:
        session.close()
        client.close()
        selector.close()
