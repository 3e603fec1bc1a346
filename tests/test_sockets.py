"""Sockets end to end: wait mode (UDP, TCP, UNIX datagram), IPv6, UNIX stream
sockets, timeouts, spawn failures, reaping, limits and graceful stop.

Every test runs the real daemon (the ``superd`` fixture) on loopback ports or
paths under tmp_path, with small programs written at test time.
"""

from __future__ import annotations

import errno
import grp
import os
import re
import signal
import socket
import stat
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

from conftest import Superd, free_port, script, tcp_exchange, wait_until

Start = Callable[..., Superd]

PYTHON = "/usr/bin/python3"  # readable and runnable by nobody (pytest's may not be)


def socket_owner() -> tuple[str, int, int]:
    """An ``owner:`` to give a UNIX socket file, with its uid and gid:
    nobody:nogroup as root; otherwise our own uid and one of our groups
    (another than our primary one when we have one), by number: the only
    owners a non-root superd can give."""
    if os.geteuid() == 0:
        return "nobody:nogroup", 65534, grp.getgrnam("nogroup").gr_gid
    others = sorted(set(os.getgroups()) - {os.getegid()})
    uid, gid = os.geteuid(), (others[0] if others else os.getegid())
    return f"{uid}:{gid}", uid, gid


# A wait-mode datagram server in the in.tftpd mould: it takes the bound socket
# on fd 0, answers each datagram with "pid blocking proto payload", and exits
# after IDLE seconds without traffic.  It never changes the socket's blocking
# mode itself (select() provides the idle timeout), so that the test can tell
# whether superd makes its own listener non-blocking again afterwards.
DGRAM_SERVER = """\
import os, select, socket, sys
idle = float(sys.argv[1])
blocking = os.get_blocking(0)
s = socket.socket(fileno=0)
while select.select([s], [], [], idle)[0]:
    data, peer = s.recvfrom(4096)
    head = f"{os.getpid()} {int(blocking)} {os.environ.get('PROTO')} "
    s.sendto(head.encode() + data, peer)
s.detach()
"""

# A wait-mode stream server: it is handed the listening socket and accepts.
STREAM_WAIT_SERVER = """\
import os, select, socket, sys
idle = float(sys.argv[1])
s = socket.socket(fileno=0)
listening = s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
while select.select([s], [], [], idle)[0]:
    conn, peer = s.accept()
    conn.sendall(f"{os.getpid()} {listening} {os.environ.get('PROTO')}\\n".encode())
    conn.close()
s.detach()
"""


def pyprog(tmp_path: Path, name: str, body: str) -> Path:
    """Write an executable Python program that nobody can run."""
    path = tmp_path / name
    path.write_text(f"#!{PYTHON}\n" + textwrap.dedent(body))
    os.chmod(path, 0o755)
    return path


def proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat fields from the state on (index 0 is the state), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2:].split()


def is_dead(pid: int) -> bool:
    """Gone, or a zombie.  Orphans are reparented to PID 1, which in some
    sandboxes never reaps them; a zombie no longer runs and holds nothing."""
    fields = proc_stat(pid)
    return fields is None or fields[0] in ("Z", "X")


def zombie_children(d: Superd) -> list[int]:
    return [pid for pid in d.children() if (proc_stat(pid) or ["?"])[0] == "Z"]


def cpu_seconds(pid: int) -> float:
    fields = proc_stat(pid)
    assert fields is not None
    # utime and stime are fields 14 and 15 of /proc/PID/stat (state is 3)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def socket_fd(pid: int, table: str, port: int) -> int:
    """The fd of *pid* that is the socket bound to 127.0.0.1:PORT in /proc/net/TABLE."""
    want = f"0100007F:{port:04X}"
    inodes = {line.split()[9] for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]
              if line.split()[1] == want}
    assert inodes, f"nothing bound to 127.0.0.1:{port} in /proc/net/{table}"
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return int(fd)
    raise AssertionError(f"process {pid} holds no socket bound to port {port}")


def fd_nonblocking(pid: int, fd: int) -> bool:
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("flags:"):
            return bool(int(line.split()[1], 8) & os.O_NONBLOCK)
    raise AssertionError("no flags in fdinfo")


def refused(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex((host, port)) == errno.ECONNREFUSED


class DgramClient:
    """A datagram client that matches replies to what it sent by token."""

    def __init__(self, family: int, target: object) -> None:
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_UNIX:
            self.sock.bind("")  # autobind: an abstract address anyone may answer
        self.target = target
        self.sock.settimeout(0.2)
        self.n = 0

    def ask(self, timeout: float = 5.0, resend: bool = False) -> tuple[int, bool, str]:
        """Send a fresh token; return (pid, blocking, proto) of the reply to it.

        With *resend*, the token is sent again every 0.2 s until answered
        (for services that are backing off).  Replies to older tokens are
        skipped.
        """
        self.n += 1
        token = f"tok{self.n}"
        deadline = time.monotonic() + timeout
        self.sock.sendto(token.encode(), self.target)
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                if resend:
                    self.sock.sendto(token.encode(), self.target)
                continue
            pid, blocking, proto, payload = data.decode().split()
            if payload == token:
                return int(pid), blocking == "1", proto
        raise AssertionError(f"no reply to {token} within {timeout}s")

    def close(self) -> None:
        self.sock.close()


# --- 1. UDP wait mode -------------------------------------------------------


def test_udp_wait_mode_one_program_at_a_time(superd: Start, tmp_path: Path) -> None:
    port = free_port(socket.SOCK_DGRAM)
    prog = pyprog(tmp_path, "dgram.py", DGRAM_SERVER)
    d = superd(f"""
    services:
      tftp:
        listen: "127.0.0.1:{port}"
        protocol: udp
        exec: [{prog}, "1.0"]
    """)
    lfd = socket_fd(d.pid, "udp", port)
    assert fd_nonblocking(d.pid, lfd)
    client = DgramClient(socket.AF_INET, ("127.0.0.1", port))
    try:
        first, blocking, proto = client.ask()
        assert blocking, "the program was handed a non-blocking socket"
        assert proto == "UDP"
        assert d.children() == [first]
        # while it runs, every datagram goes to the same program
        for _ in range(5):
            assert client.ask()[0] == first
        assert d.children() == [first]
        # superd shares the socket with it, and left it blocking for it
        assert not fd_nonblocking(d.pid, lfd)

        # idle for 1 s, the program exits; superd takes the socket back
        assert wait_until(lambda: d.children() == [], 10)
        assert wait_until(lambda: fd_nonblocking(d.pid, lfd), 5), \
            "superd's listener is still blocking after the program exited"
        second, blocking, _ = client.ask()
        assert second != first
        assert blocking
        assert client.ask()[0] == second
        assert wait_until(lambda: d.children() == [], 10)
        third = client.ask()[0]
        assert third not in (first, second)
    finally:
        client.close()
    assert "Traceback" not in d.log()
    assert d.stop() == 0


# --- 2. TCP wait mode -------------------------------------------------------


def test_tcp_wait_mode_program_accepts(superd: Start, tmp_path: Path) -> None:
    port = free_port()
    prog = pyprog(tmp_path, "acceptor.py", STREAM_WAIT_SERVER)
    d = superd(f"""
    services:
      acceptor:
        listen: "127.0.0.1:{port}"
        wait: true
        exec: [{prog}, "1.0"]
    """)
    replies = [tcp_exchange(port).decode().split() for _ in range(3)]
    pids = {int(r[0]) for r in replies}
    assert len(pids) == 1, replies
    assert all(r[1:] == ["1", "TCP"] for r in replies), replies  # SO_ACCEPTCONN set
    assert d.children() == list(pids)
    assert wait_until(lambda: d.children() == [], 10)
    again = tcp_exchange(port).decode().split()
    assert int(again[0]) not in pids
    assert d.stop() == 0


# --- 3. a failing wait-mode program does not make superd spin -----------------


def test_udp_wait_failing_program_backs_off_then_recovers(superd: Start,
                                                          tmp_path: Path) -> None:
    port = free_port(socket.SOCK_DGRAM)
    bad = script(tmp_path, "bad.sh", "exit 3\n")
    good = pyprog(tmp_path, "dgram.py", DGRAM_SERVER)
    config = """
    services:
      tftp:
        listen: "127.0.0.1:{port}"
        protocol: udp
        exec: [{prog}]
    """
    d = superd(config.format(port=port, prog=bad))
    client = DgramClient(socket.AF_INET, ("127.0.0.1", port))
    try:
        cpu_before = cpu_seconds(d.pid)
        deadline = time.monotonic() + 2.0
        sent = 0
        while time.monotonic() < deadline:
            client.sock.sendto(f"junk{sent}".encode(), client.target)
            sent += 1
            time.sleep(0.01)
        used = cpu_seconds(d.pid) - cpu_before
        assert used < 1.0, f"superd used {used:.2f}s of CPU in 2s with a failing program"
        d.wait_log(r"warning: tftp: program failed quickly \d+ time\(s\) in a row; "
                   r"waiting [\d.]+s before the next start")
        starts = len(re.findall(r"tftp\[\d+\].*: exit 3 after", d.log()))
        assert 1 <= starts <= 20, f"{starts} starts of the failing program in 2s"

        d.reload(config.format(port=port, prog=f'{good}, "1.0"'))
        pid, blocking, proto = client.ask(timeout=30, resend=True)
        assert blocking and proto == "UDP"
        assert client.ask()[0] == pid
    finally:
        client.close()
    assert d.stop() == 0


# --- 4. IPv6 ------------------------------------------------------------------


def test_ipv6_and_dual_stack(superd: Start, tmp_path: Path) -> None:
    v6only, dual = free_port(host="::1"), free_port()
    who = script(tmp_path, "who.sh", 'echo "$PROTO $REMOTE_ADDR $TCPLOCALIP"\n')
    d = superd(f"""
    services:
      six: {{listen: "[::1]:{v6only}", exec: [{who}]}}
      both: {{listen: {dual}, exec: [{who}]}}
    """)
    assert tcp_exchange(v6only, host="::1") == b"TCP6 ::1 ::1\n"
    assert refused(v6only)  # [::1] is IPv6 only
    assert tcp_exchange(dual, host="::1") == b"TCP6 ::1 ::1\n"
    assert tcp_exchange(dual, host="127.0.0.1") == b"TCP 127.0.0.1 127.0.0.1\n"
    assert d.stop() == 0


# --- 5. UNIX stream sockets -----------------------------------------------------


def test_unix_stream_socket(superd: Start, tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    blocker = tmp_path / "regular.sock"
    blocker.write_text("precious data\n")
    # a stale socket file: bound, then closed without unlinking
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        assert probe.connect_ex(str(path)) == errno.ECONNREFUSED

    port = free_port()
    owner, uid, gid = socket_owner()
    creds = script(tmp_path, "creds.sh",
                   'echo "$PROTO $REMOTE_UID $REMOTE_GID $REMOTE_PID"\n')
    d = superd(f"""
    services:
      local:
        listen: {path}
        mode: "0660"
        owner: "{owner}"
        exec: [{creds}]
      blocked:
        listen: {blocker}
        exec: [{creds}]
      inet: {{listen: "127.0.0.1:{port}", internal: echo}}
    """)
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert "local: cannot listen" not in d.log()
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (uid, gid)

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(5)
        c.connect(str(path))  # refused if the stale file had been kept
        c.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := c.recv(4096):
            reply += chunk
    assert reply.decode().split() == ["UNIX", str(os.getuid()), str(os.getgid()),
                                      str(os.getpid())]

    # a regular file in the way is left alone; that service alone is down
    assert blocker.read_text() == "precious data\n"
    d.wait_log(rf"error: blocked: cannot listen on {re.escape(str(blocker))} \(unix stream\): .*"
               r"not a socket")
    assert tcp_exchange(port, b"still serving") == b"still serving"

    assert d.stop() == 0
    assert not path.exists(), "the socket file was left behind at stop"
    assert blocker.read_text() == "precious data\n"


# --- 6. UNIX datagram sockets ---------------------------------------------------


def test_unix_datagram_wait_mode(superd: Start, tmp_path: Path) -> None:
    path = tmp_path / "d.sock"
    prog = pyprog(tmp_path, "dgram.py", DGRAM_SERVER)
    d = superd(f"""
    services:
      ldgram:
        listen: {path}
        protocol: udp
        exec: [{prog}, "1.0"]
    """)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    client = DgramClient(socket.AF_UNIX, str(path))
    try:
        first, blocking, proto = client.ask()
        assert proto == "UNIX"
        assert blocking
        assert client.ask()[0] == first
        assert d.children() == [first]
        assert wait_until(lambda: d.children() == [], 10)
        assert client.ask()[0] != first
    finally:
        client.close()
    assert d.stop() == 0
    assert not path.exists()


# --- 7. timeout: SIGTERM, then SIGKILL to the whole process group ---------------


def test_timeout_kills_process_group(superd: Start, tmp_path: Path) -> None:
    port = free_port()
    stubborn = script(tmp_path, "stubborn.sh", """\
        trap '' TERM
        sleep 60 &
        echo "$$ $!"
        sleep 60
        """)
    d = superd(f"""
    services:
      stubborn:
        listen: "127.0.0.1:{port}"
        exec: [{stubborn}]
        timeout: 1
        kill_grace: 1
    """)
    started = time.monotonic()
    # EOF only comes when every holder of the socket (both processes) is dead
    reply = tcp_exchange(port, timeout=20).decode().split()
    elapsed = time.monotonic() - started
    pid, grandchild = int(reply[0]), int(reply[1])
    assert elapsed < 15
    log = d.wait_log(rf"stubborn\[{pid}\].*: signal SIGKILL after")
    term = log.index(f"stubborn[{pid}] ran past its timeout of 1s; sending SIGTERM")
    kill = log.index(f"stubborn[{pid}] still running 1s after SIGTERM; sending SIGKILL")
    assert term < kill
    assert wait_until(lambda: is_dead(pid) and is_dead(grandchild), 10)
    assert proc_stat(pid) is None, "superd did not reap its child"
    assert wait_until(lambda: d.children() == [], 5)
    assert zombie_children(d) == []
    assert d.stop() == 0


# --- 8. spawn failures ----------------------------------------------------------


def test_spawn_failure_closes_client_and_recovers(superd: Start, tmp_path: Path) -> None:
    port, other = free_port(), free_port()
    prog = script(tmp_path, "hello.sh", "echo hello\n")
    body = prog.read_text()
    d = superd(f"""
    services:
      hello: {{listen: "127.0.0.1:{port}", exec: [{prog}]}}
      other: {{listen: "127.0.0.1:{other}", internal: echo}}
    """)
    assert tcp_exchange(port) == b"hello\n"

    prog.unlink()
    started = time.monotonic()
    assert tcp_exchange(port, timeout=10) == b""
    assert time.monotonic() - started < 5
    d.wait_log(rf"error: hello: cannot start {re.escape(str(prog))} .*127\.0\.0\.1.*: "
               r"No such file or directory")
    assert tcp_exchange(other, b"other ok") == b"other ok"

    prog.write_text(body)
    os.chmod(prog, 0o755)
    assert tcp_exchange(port) == b"hello\n"

    os.chmod(prog, 0o644)
    started = time.monotonic()
    assert tcp_exchange(port, timeout=10) == b""
    assert time.monotonic() - started < 5
    d.wait_log(rf"error: hello: cannot start {re.escape(str(prog))} .*127\.0\.0\.1.*: "
               r"Permission denied")
    assert tcp_exchange(other, b"other ok") == b"other ok"

    os.chmod(prog, 0o755)
    assert tcp_exchange(port) == b"hello\n"
    assert "Traceback" not in d.log()
    assert d.stop() == 0


# --- 9. reaping -----------------------------------------------------------------


def test_many_connections_leave_no_zombies_or_fds(superd: Start) -> None:
    port = free_port()
    d = superd(f"""
    services:
      truesvc: {{listen: "127.0.0.1:{port}", exec: [/bin/true]}}
    """)
    fds_at_start = fd_count(d.pid)
    failures: list[str] = []

    def worker(n: int) -> None:
        for _ in range(n):
            try:
                if tcp_exchange(port, timeout=10) != b"":
                    failures.append("unexpected data")
            except OSError as e:
                failures.append(repr(e))

    threads = [threading.Thread(target=worker, args=(50,), daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert failures == []
    assert wait_until(lambda: d.children() == [], 10), zombie_children(d)
    assert wait_until(lambda: fd_count(d.pid) == fds_at_start, 10), \
        f"{fd_count(d.pid)} fds now, {fds_at_start} at start"
    assert d.stop() == 0


# --- 10. max_connections: queue and reject --------------------------------------


def served(port: int, tag: bytes) -> socket.socket:
    """A connection to a /bin/cat service that is being served (echoes)."""
    c = socket.create_connection(("127.0.0.1", port), timeout=5)
    c.sendall(tag)
    assert c.recv(100) == tag
    return c


def test_max_connections_queue(superd: Start) -> None:
    port = free_port()
    d = superd(f"""
    services:
      queued:
        listen: "127.0.0.1:{port}"
        exec: [/bin/cat]
        max_connections: 2
    """)
    first, second = served(port, b"one"), served(port, b"two")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as third:
            third.sendall(b"three")
            third.settimeout(1.0)
            try:
                early = third.recv(100)
            except TimeoutError:
                early = None
            assert early is None, f"the third client was served at the limit: {early!r}"
            assert len(d.children()) == 2
            first.close()  # cat sees EOF and exits; a slot frees up
            third.settimeout(10)
            assert third.recv(100) == b"three"
    finally:
        first.close()
        second.close()
    assert wait_until(lambda: d.children() == [], 10)
    assert d.stop() == 0


def test_max_connections_reject_message(superd: Start) -> None:
    port = free_port()
    d = superd(f"""
    services:
      rejecting:
        listen: "127.0.0.1:{port}"
        exec: [/bin/cat]
        max_connections: 2
        on_limit: reject
        reject_message: "busy\\n"
    """)
    a, b = served(port, b"a"), served(port, b"b")
    try:
        # a client that waits for the server to speak first
        assert tcp_exchange(port, timeout=10, shutdown=False) == b"busy\n"
        d.wait_log(r"rejecting: refused .*127\.0\.0\.1.*: max_connections reached")
        # a client that sends its request first (HTTP, SMTP pipelining, ...)
        # must get the message too, not a reset that discards it
        outcomes: list[bytes | str] = []
        for _ in range(20):
            try:
                outcomes.append(tcp_exchange(port, b"request\n", timeout=10,
                                             shutdown=False))
            except OSError as e:
                outcomes.append(repr(e))
        assert outcomes == [b"busy\n"] * 20, outcomes
        a.sendall(b"still")
        assert a.recv(100) == b"still"
    finally:
        a.close()
        b.close()
    assert wait_until(lambda: d.children() == [], 10)
    assert tcp_exchange(port, b"again") == b"again"
    assert d.stop() == 0


# --- 11. graceful stop ----------------------------------------------------------


def test_sigterm_lets_running_program_finish(superd: Start, tmp_path: Path) -> None:
    port = free_port()
    slow = script(tmp_path, "slow.sh", """\
        echo start
        sleep 2
        echo end of output
        """)
    d = superd(f"""
    stop_timeout: 5
    services:
      slow: {{listen: "127.0.0.1:{port}", exec: [{slow}]}}
    """)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.shutdown(socket.SHUT_WR)
        reply = c.recv(100)
        assert reply == b"start\n"
        os.kill(d.pid, signal.SIGTERM)
        # (probe only once superd has seen the signal: an earlier probe would
        # be accepted and served, and would count as a second program)
        d.wait_log("SIGTERM: closing listeners; 1 program[(]s[)] running")
        assert wait_until(lambda: refused(port), 5), "listener still open after SIGTERM"
        assert d.proc is not None and d.proc.poll() is None  # still waiting for slow.sh
        while chunk := c.recv(100):
            reply += chunk
    assert reply == b"start\nend of output\n"
    assert d.proc.wait(15) == 0
    assert "stop_timeout" not in d.log()


def test_sigterm_kills_program_after_stop_timeout(superd: Start, tmp_path: Path) -> None:
    port = free_port()
    deaf = script(tmp_path, "deaf.sh", """\
        trap '' TERM
        echo "$$"
        sleep 60
        """)
    d = superd(f"""
    stop_timeout: 1
    services:
      deaf: {{listen: "127.0.0.1:{port}", exec: [{deaf}]}}
    """)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        pid = int(c.recv(100))
        started = time.monotonic()
        os.kill(d.pid, signal.SIGTERM)
        assert d.proc is not None
        assert d.proc.wait(20) == 0
        elapsed = time.monotonic() - started
        assert c.recv(100) == b""
    assert elapsed < 15
    assert is_dead(pid)
    log = d.log()
    assert "stop_timeout: sending SIGTERM to 1 program(s)" in log
    assert re.search(rf"deaf\[{pid}\].*: signal SIGKILL after", log), log
