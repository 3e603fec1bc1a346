"""systemd integration end to end: sd_notify, socket activation with the real
``systemd-socket-activate``, the SIGUSR2 hand-over, ``--daemon`` with a
pidfile, SIGUSR1 log reopening, the unit files under ``systemd-analyze
verify``, and the graceful stop.

Every test runs the real daemon as a subprocess on loopback ports or paths
under tmp_path.  Every process a test starts (the daemon, its successor after
SIGUSR2, a detached daemon) is stopped by its pid in a ``finally``.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT, Superd, free_port, run_superd, script, tcp_exchange, wait_until

Start = Callable[..., Superd]

_SYSTEMD_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                 "LISTEN_PID", "LISTEN_FDNAMES", "SUPERD_READY_FD")


# --- helpers -------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    """This process's environment without any systemd protocol variable."""
    env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_VARS}
    env.update(extra)
    return env


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _gone(pid: int) -> bool:
    """True if *pid* no longer runs (absent, or a zombie nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _stop_pid(pid: int | None, timeout: float = 15.0) -> None:
    """SIGTERM *pid* (not necessarily our child), then SIGKILL if it lingers."""
    if pid is None or pid <= 1 or _gone(pid):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not wait_until(lambda: _gone(pid), timeout):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        wait_until(lambda: _gone(pid), 5)


def _pids_running(config: Path) -> list[int]:
    """Live processes whose command line names *config* (a unique tmp path)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(config).encode() in argv and not _gone(int(entry)):
            found.append(int(entry))
    return found


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes in session *sid*."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after the comm field: state ppid pgrp session ...
        if fields[0] not in ("Z", "X") and int(fields[3]) == sid:
            members.append(int(entry))
    return members


def _config(tmp_path: Path, body: str, **top: str) -> str:
    """A configuration with a private control socket and *body* as services."""
    lines = [f"control: {tmp_path}/control.sock"]
    lines += [f"{k}: {v}" for k, v in top.items()]
    return "\n".join(lines) + "\nservices:\n" + textwrap.indent(textwrap.dedent(body), "  ")


def _connect_pending(port: int, timeout: float = 5.0) -> socket.socket:
    """A connected client socket (the connection may only sit in a backlog)."""
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def _read_all(s: socket.socket, timeout: float = 10.0) -> bytes:
    s.settimeout(timeout)
    chunks = []
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _read_line(s: socket.socket, timeout: float = 10.0) -> bytes:
    s.settimeout(timeout)
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        data += chunk
    return data


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return False
    except ConnectionRefusedError:
        return True


def _popen_logged(d: Superd, argv: list[str], env: dict[str, str] | None = None
                  ) -> subprocess.Popen[bytes]:
    """Start *argv* as *d*'s process (so d.log()/d.reload()/d.stop() work)."""
    with open(d.log_path, "ab") as logf:
        d.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                  env=env, cwd=str(d.workdir))
    return d.proc


class NotifySocket:
    """The service manager's side of sd_notify: a bound UNIX datagram socket."""

    def __init__(self, address: str, creds: bool = False) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if creds:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.seen: list[tuple[list[str], int | None]] = []

    def close(self) -> None:
        self.sock.close()

    def recv(self, timeout: float = 10.0) -> tuple[list[str], int | None] | None:
        """One datagram as its lines, with the sender's pid (if creds)."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return None
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = None
        for level, kind, cdata in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", cdata[:12])[0]
        message = (data.decode().split("\n"), pid)
        self.seen.append(message)
        return message

    def next(self, timeout: float = 10.0) -> list[str]:
        got = self.recv(timeout)
        assert got is not None, f"no sd_notify datagram within {timeout}s; had {self.seen}"
        return got[0]

    def wait_for(self, predicate: Callable[[list[str], int | None], bool],
                 timeout: float = 10.0, limit: int = 1000) -> tuple[list[str], int | None]:
        """Read datagrams until one satisfies *predicate*."""
        deadline = time.monotonic() + timeout
        for _ in range(limit):
            left = deadline - time.monotonic()
            got = self.recv(max(left, 0)) if left > 0 else None
            if got is None:
                break
            if predicate(*got):
                return got
        raise AssertionError(f"no matching sd_notify datagram in {timeout}s; "
                             f"had {self.seen[-30:]}")

    def drain(self, seconds: float) -> list[list[str]]:
        """Every datagram arriving within *seconds*."""
        out = []
        deadline = time.monotonic() + seconds
        for _ in range(10000):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            got = self.recv(left)
            if got is None:
                break
            out.append(got[0])
        return out


_STATUS = re.compile(r"STATUS=\d+ services, \d+ listeners, \d+ active connections")


def _is_ready(lines: list[str]) -> bool:
    return (len(lines) == 2 and lines[0] == "READY=1"
            and _STATUS.fullmatch(lines[1]) is not None)


class Hammer(threading.Thread):
    """Sequential request/reply exchanges in a loop, counting every failure."""

    def __init__(self, exchange: Callable[[bytes], bytes], seconds: float = 6.0,
                 limit: int = 20000) -> None:
        super().__init__(daemon=True)
        self.exchange = exchange
        self.seconds, self.limit = seconds, limit
        self.ok = 0
        self.failures: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.seconds
        for i in range(self.limit):
            if self.halt.is_set() or time.monotonic() > deadline:
                return
            payload = f"n{i}".encode()
            try:
                reply = self.exchange(payload)
            except OSError as e:
                self.failures.append(repr(e))
                continue
            if reply != payload:
                self.failures.append(f"wrong reply {reply!r} to {payload!r}")
            else:
                self.ok += 1


def _unix_exchange(path: Path, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return _read_all(s, timeout)


# --- 1. sd_notify --------------------------------------------------------


def test_notify_ready_reloading_stopping_sequence(superd: Start, tmp_path: Path) -> None:
    port = free_port()
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    text = _config(tmp_path, f"""
        echo: {{listen: "127.0.0.1:{port}", internal: echo}}
    """)
    try:
        d = superd(text, env=_env(NOTIFY_SOCKET=notify.address))
        assert notify.next() == ["READY=1", "STATUS=1 services, 1 listeners, "
                                            "0 active connections"]

        # a reload: RELOADING=1 with the monotonic time, then READY=1 again
        before = _monotonic_usec()
        d.reload(text)
        reloading = notify.next()
        after = _monotonic_usec()
        assert len(reloading) == 2 and reloading[0] == "RELOADING=1", reloading
        name, _, value = reloading[1].partition("=")
        assert name == "MONOTONIC_USEC" and value.isdigit(), reloading
        assert before <= int(value) <= after, (before, value, after)
        assert _is_ready(notify.next()), notify.seen
        assert tcp_exchange(port, b"still") == b"still"

        # a refused reload still ends with READY=1 (systemd waits for it)
        before = _monotonic_usec()
        d.reload("services: [\n", expect="reload refused")
        reloading = notify.next()
        after = _monotonic_usec()
        assert reloading[0] == "RELOADING=1" and len(reloading) == 2, reloading
        assert before <= int(reloading[1].removeprefix("MONOTONIC_USEC=")) <= after
        assert _is_ready(notify.next()), notify.seen
        assert tcp_exchange(port, b"kept") == b"kept"

        assert d.stop() == 0
        assert notify.next() == ["STOPPING=1"]
        assert notify.drain(0.3) == [], notify.seen
        assert [lines[0] for lines, _ in notify.seen] == [
            "READY=1", "RELOADING=1", "READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    finally:
        notify.close()


def test_notify_abstract_socket(superd: Start, tmp_path: Path) -> None:
    name = f"superd-test-{uuid.uuid4().hex}"
    notify = NotifySocket("\0" + name)
    port = free_port()
    try:
        d = superd(_config(tmp_path, f"""
            echo: {{listen: "127.0.0.1:{port}", internal: echo}}
        """), env=_env(NOTIFY_SOCKET="@" + name))
        assert _is_ready(notify.next())
        assert "sd_notify" not in d.log(), d.log()
        assert d.stop() == 0
        assert notify.next() == ["STOPPING=1"]
    finally:
        notify.close()


def test_notify_watchdog_pings(superd: Start, tmp_path: Path) -> None:
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    port = free_port()
    try:
        d = superd(_config(tmp_path, f"""
            echo: {{listen: "127.0.0.1:{port}", internal: echo}}
        """), env=_env(NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="400000"))
        assert _is_ready(notify.next())
        got = notify.drain(2.0)
        pings = [lines for lines in got if lines == ["WATCHDOG=1"]]
        assert len(pings) >= 3, got  # every 0.2 s: about ten
        assert d.stop() == 0
    finally:
        notify.close()


def test_notify_watchdog_meant_for_another_pid_is_ignored(superd: Start,
                                                          tmp_path: Path) -> None:
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    port = free_port()
    try:
        d = superd(_config(tmp_path, f"""
            echo: {{listen: "127.0.0.1:{port}", internal: echo}}
        """), env=_env(NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="400000",
                       WATCHDOG_PID="1"))
        assert _is_ready(notify.next())
        got = notify.drain(1.0)
        assert ["WATCHDOG=1"] not in got, got
        assert d.stop() == 0
    finally:
        notify.close()


def test_programs_do_not_see_systemd_variables(superd: Start, tmp_path: Path) -> None:
    notify = NotifySocket(str(tmp_path / "notify.sock"))
    port = free_port()
    try:
        superd(_config(tmp_path, f"""
            env: {{listen: "127.0.0.1:{port}", exec: [/usr/bin/env]}}
        """), env=_env(NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="400000",
                       LISTEN_FDS="1", LISTEN_PID="1", LISTEN_FDNAMES="x"))
        out = tcp_exchange(port).decode()
        names = {line.partition("=")[0] for line in out.splitlines()}
        assert "SUPERD_SERVICE" in names, out
        leaked = names & {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                          "LISTEN_PID", "LISTEN_FDNAMES", "SUPERD_READY_FD"}
        assert not leaked, out
    finally:
        notify.close()


# --- 2. socket activation --------------------------------------------------


def _socket_activate() -> str:
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.skip("systemd-socket-activate is not installed (Debian package systemd)")
    return tool


def _activated(d: Superd, *tool_args: str) -> subprocess.Popen[bytes]:
    """``systemd-socket-activate ARGS python -m superd run -c FILE`` as *d*."""
    argv = [_socket_activate(), *tool_args, sys.executable, "-m", "superd", "run",
            "-c", str(d.config_path)]
    return _popen_logged(d, argv, env=_env())


def _wait_listening(d: Superd, port: int) -> None:
    d.wait_log(rf"Listening on 127\.0\.0\.1:{port} as \d+")


def test_socket_activation_named_socket_replaces_listen(superd: Start,
                                                        tmp_path: Path) -> None:
    p1, p2 = free_port(), free_port()
    d = superd(_config(tmp_path, f"""
        hello: {{listen: "127.0.0.1:{p2}", exec: [/bin/echo, hello]}}
    """), start=False)
    proc = _activated(d, "-l", f"127.0.0.1:{p1}", "--fdname=hello")
    try:
        _wait_listening(d, p1)
        # the tool execs superd on the first connection; superd serves it
        assert tcp_exchange(p1, timeout=15) == b"hello\n", d.log()
        log = d.wait_log("ready:")
        assert proc.poll() is None
        assert f"received socket 127.0.0.1:{p1}/tcp named hello" in log, log
        assert tcp_exchange(p1) == b"hello\n"
        assert _refused(p2), "the service's own listen address must not be bound"
        assert "matches no service" not in log, log
        # a reload keeps serving on the handed socket, still not on p2
        d.reload()
        assert tcp_exchange(p1) == b"hello\n"
        assert _refused(p2)
    finally:
        _stop_pid(proc.pid)
        proc.wait(5)
    assert proc.returncode == 0, d.log()


def test_socket_activation_unnamed_unmatched_and_reload(superd: Start,
                                                        tmp_path: Path) -> None:
    p3, p5 = free_port(), free_port()
    hello = f'hello: {{listen: "127.0.0.1:{p3}", exec: [/bin/echo, hello]}}\n'
    late = f'late: {{listen: "127.0.0.1:{p5}", exec: [/bin/echo, late]}}\n'
    d = superd(_config(tmp_path, hello), start=False)
    proc = _activated(d, "-l", f"127.0.0.1:{p3}", "-l", f"127.0.0.1:{p5}")
    pending: list[socket.socket] = []
    try:
        _wait_listening(d, p5)
        assert tcp_exchange(p3, timeout=15) == b"hello\n", d.log()
        log = d.wait_log("ready:")
        # unnamed: matched by address, and superd did not bind its own socket
        assert re.search(rf"received socket 127\.0\.0\.1:{p3}/tcp from LISTEN_FDS$", log,
                         re.M), log
        assert "cannot listen" not in log, log
        # the socket that matches no service: kept open, with a warning
        assert re.search(rf"warning: a socket received through LISTEN_FDS "
                         rf"\(127\.0\.0\.1:{p5}\) matches no service", log), log
        early = _connect_pending(p5)  # accepted by the kernel, served by nobody yet
        pending.append(early)
        early.settimeout(0.5)
        with pytest.raises(TimeoutError):
            early.recv(1)

        # a reload that adds a service on that address adopts the socket
        d.reload(_config(tmp_path, hello + late))
        assert _read_all(early) == b"late\n", d.log()
        assert tcp_exchange(p5) == b"late\n"
        assert tcp_exchange(p3) == b"hello\n"

        # a reload that drops a service does not close its adopted socket ...
        d.reload(_config(tmp_path, late))
        waiting = _connect_pending(p3)  # not refused: the socket is still open
        pending.append(waiting)
        waiting.settimeout(0.5)
        with pytest.raises(TimeoutError):
            waiting.recv(1)
        assert tcp_exchange(p5) == b"late\n"
        # ... and one that brings it back serves the clients that waited
        d.reload(_config(tmp_path, hello + late))
        assert _read_all(waiting) == b"hello\n", d.log()
        assert tcp_exchange(p3) == b"hello\n"
        assert "cannot listen" not in d.log(), d.log()
    finally:
        for s in pending:
            s.close()
        _stop_pid(proc.pid)
        proc.wait(5)
    assert proc.returncode == 0, d.log()


def test_socket_activation_socket_survives_handover_and_reload(superd: Start,
                                                                tmp_path: Path) -> None:
    """A socket systemd handed in stays open unused when its service goes,
    also in the superd that took over after SIGUSR2."""
    p3 = free_port()
    hello = f'hello: {{listen: "127.0.0.1:{p3}", exec: [/bin/echo, hello]}}\n'
    d = superd(_config(tmp_path, hello), start=False)
    proc = _activated(d, "-l", f"127.0.0.1:{p3}")
    new: int | None = None
    waiting: socket.socket | None = None
    try:
        _wait_listening(d, p3)
        assert tcp_exchange(p3, timeout=15) == b"hello\n", d.log()
        d.wait_log("ready:")
        os.kill(proc.pid, signal.SIGUSR2)
        new = _successor_pid(d)
        d.wait_log(rf"superd {new} serves now")
        assert proc.wait(15) == 0, d.log()
        assert tcp_exchange(p3) == b"hello\n"
        # reload the new process with the service removed: the socket stays open
        d.write_config(_config(tmp_path, ""))
        os.kill(new, signal.SIGHUP)
        d.wait_log(r"reloaded: 0 services")
        try:
            waiting = _connect_pending(p3)
        except ConnectionRefusedError:
            pytest.fail("the socket handed in by systemd was closed by a reload after "
                        f"the hand-over:\n{d.log()}")
        d.write_config(_config(tmp_path, hello))
        os.kill(new, signal.SIGHUP)
        d.wait_log(r"reloaded: 1 services", count=1)
        assert _read_all(waiting) == b"hello\n", d.log()
        assert tcp_exchange(p3) == b"hello\n"
    finally:
        if waiting is not None:
            waiting.close()
        _stop_pid(new)
        _stop_pid(proc.pid)
        for pid in _pids_running(d.config_path):
            _stop_pid(pid)
        proc.wait(5)


# --- 3. SIGUSR2 hand-over ---------------------------------------------------


def _successor_pid(d: Superd, timeout: float = 15.0) -> int:
    log = d.wait_log(r"SIGUSR2: started superd \d+", timeout=timeout)
    return int(re.findall(r"SIGUSR2: started superd (\d+)", log)[-1])


def test_handover_without_a_refused_connection(superd: Start, tmp_path: Path) -> None:
    echo, slow = free_port(), free_port()
    local = tmp_path / "local.sock"
    script(tmp_path, "slow.sh", "echo start\nsleep 3\necho done\n")
    d = superd(_config(tmp_path, f"""
        echo: {{listen: "127.0.0.1:{echo}", internal: echo}}
        slow: {{listen: "127.0.0.1:{slow}", exec: [{tmp_path}/slow.sh]}}
        local: {{listen: {local}, internal: echo}}
    """))
    old = d.pid
    new: int | None = None
    # bounded by time; the count bound must outlast the hand-over (a fast
    # machine does 20,000 UNIX exchanges before the old process has let go)
    tcp = Hammer(lambda data: tcp_exchange(echo, data, timeout=5), seconds=12, limit=500_000)
    unix = Hammer(lambda data: _unix_exchange(local, data), seconds=12, limit=500_000)
    long_conn = socket.create_connection(("127.0.0.1", slow), timeout=10)
    try:
        assert _read_line(long_conn) == b"start\n"
        tcp.start()
        unix.start()
        assert wait_until(lambda: tcp.ok > 20 and unix.ok > 20, 10), (tcp.failures,
                                                                      unix.failures)
        os.kill(old, signal.SIGUSR2)
        new = _successor_pid(d)
        assert new != old
        d.wait_log(rf"superd {new} serves now")
        d.wait_log(rf"superd\[{new}\] info: superd {new} ready:")
        assert d.proc is not None
        assert d.proc.poll() is None, "the old process waits for its running program"
        # the old process lets go only after its program finished
        assert _read_all(long_conn) == b"done\n", d.log()
        assert d.proc.wait(15) == 0, d.log()
        served_before_exit = (tcp.ok, unix.ok)
        assert wait_until(lambda: tcp.ok > served_before_exit[0] + 20
                          and unix.ok > served_before_exit[1] + 20, 10), (
            served_before_exit, tcp.ok, unix.ok, tcp.is_alive(), unix.is_alive(),
            tcp.failures[:3], unix.failures[:3], d.log()[-3000:])
        tcp.halt.set()
        unix.halt.set()
        tcp.join(10)
        unix.join(10)
        assert tcp.failures == [], tcp.failures[:5]
        assert unix.failures == [], unix.failures[:5]
        assert not _gone(new)
        assert local.exists(), "the UNIX socket file must survive the hand-over"
        assert tcp_exchange(echo, b"after") == b"after"
        assert _unix_exchange(local, b"after") == b"after"
        assert tcp_exchange(slow) == b"start\ndone\n"
        log = d.log()
        assert "internal error" not in log, log
    finally:
        tcp.halt.set()
        unix.halt.set()
        long_conn.close()
        _stop_pid(new)
        for pid in _pids_running(d.config_path):
            if pid != old:
                _stop_pid(pid)
    # the successor owns the socket file now: it removes it when it stops
    assert wait_until(lambda: not local.exists(), 5), "socket file left behind"
    tcp.join(10)
    unix.join(10)


def test_handover_with_broken_config_keeps_serving(superd: Start, tmp_path: Path) -> None:
    port = free_port()
    good = _config(tmp_path, f"""
        echo: {{listen: "127.0.0.1:{port}", internal: echo}}
    """)
    d = superd(good)
    new: int | None = None
    try:
        d.write_config("services: [\n")
        os.kill(d.pid, signal.SIGUSR2)
        first = _successor_pid(d)
        d.wait_log(rf"the new superd {first} (exited|failed)")
        assert wait_until(lambda: _gone(first), 10)
        assert d.proc is not None and d.proc.poll() is None
        assert tcp_exchange(port, b"still here") == b"still here"
        log = d.log()
        assert "serves now" not in log, log
        assert "problem(s) in the configuration" in log, log
        # the failure is over: a later SIGUSR2 with a good file works
        d.write_config(good)
        os.kill(d.pid, signal.SIGUSR2)
        d.wait_log(r"SIGUSR2: started superd \d+", count=2)
        new = int(re.findall(r"SIGUSR2: started superd (\d+)", d.log())[-1])
        d.wait_log(rf"superd {new} serves now")
        assert d.proc.wait(15) == 0
        assert tcp_exchange(port, b"new one") == b"new one"
        assert "internal error" not in d.log(), d.log()
    finally:
        _stop_pid(new)
        for pid in _pids_running(d.config_path):
            if pid != d.pid:
                _stop_pid(pid)


def test_handover_keeps_control_socket_and_metrics(superd: Start, tmp_path: Path) -> None:
    """After SIGUSR2, ``superd status``/``superd reload`` and the metrics
    endpoint reach the new process (without a reload to re-bind them)."""
    port, metrics = free_port(), free_port()
    d = superd(_config(tmp_path, f"""
        echo: {{listen: "127.0.0.1:{port}", internal: echo}}
    """, metrics=f"127.0.0.1:{metrics}"))
    config = str(d.config_path)
    before = run_superd("status", "-c", config, "--json")
    assert before.returncode == 0, before.stderr
    new: int | None = None
    try:
        os.kill(d.pid, signal.SIGUSR2)
        new = _successor_pid(d)
        d.wait_log(rf"superd {new} serves now")
        assert d.proc is not None and d.proc.wait(15) == 0
        assert tcp_exchange(port, b"x") == b"x"
        status = run_superd("status", "-c", config, "--json")
        assert status.returncode == 0, status.stderr + d.log()
        assert json.loads(status.stdout)["pid"] == new
        scrape = tcp_exchange(metrics, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert scrape.startswith(b"HTTP/1.0 200"), scrape[:200]
        assert b"superd_" in scrape
    finally:
        _stop_pid(new)
        for pid in _pids_running(d.config_path):
            if pid != d.pid:
                _stop_pid(pid)


def test_handover_under_systemd_notify_and_watchdog(superd: Start, tmp_path: Path) -> None:
    """As under systemd (Type=notify, WatchdogSec=, NotifyAccess=main), where
    the service manager sets WATCHDOG_PID to the main pid and hears only the
    main process: after SIGUSR2 the old process, still the main one,
    announces MAINPID=, and the new one then keeps the watchdog fed."""
    port = free_port()
    notify = NotifySocket(str(tmp_path / "notify.sock"), creds=True)
    d = superd(_config(tmp_path, f"""
        echo: {{listen: "127.0.0.1:{port}", internal: echo}}
    """), start=False)
    # systemd sets WATCHDOG_PID to the pid it started: the shell execs superd
    argv = ["/bin/sh", "-c", 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"', "sh",
            sys.executable, "-m", "superd", "run", "-c", str(d.config_path)]
    _popen_logged(d, argv, env=_env(NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="400000"))
    old = d.pid
    new: int | None = None
    try:
        lines, pid = notify.wait_for(lambda lines, pid: lines[0] == "READY=1")
        assert pid == old and _is_ready(lines)
        notify.wait_for(lambda lines, pid: lines == ["WATCHDOG=1"] and pid == old)
        os.kill(old, signal.SIGUSR2)
        new = _successor_pid(d)
        lines, pid = notify.wait_for(lambda lines, pid: lines[0].startswith("MAINPID="))
        assert lines == [f"MAINPID={new}"] and pid == old, (lines, pid)
        assert d.proc is not None
        assert d.proc.wait(15) == 0
        if not any(pid == new and _is_ready(lines) for lines, pid in notify.seen):
            notify.wait_for(lambda lines, pid: pid == new and _is_ready(lines))
        assert tcp_exchange(port, b"x") == b"x"
        # the old process is gone: the new main process must feed the watchdog,
        # after the MAINPID= that made it the one a NotifyAccess=main systemd hears
        notify.wait_for(lambda lines, pid: lines == ["WATCHDOG=1"] and pid == new,
                        timeout=3.0)
        switch = notify.seen.index(([f"MAINPID={new}"], old))
        assert (["WATCHDOG=1"], new) in notify.seen[switch:], notify.seen
    finally:
        notify.close()
        _stop_pid(new)
        for pid in _pids_running(d.config_path):
            if pid != old:
                _stop_pid(pid)


def test_after_handover_the_old_process_applies_stop_timeout_and_goes_quiet(
        superd: Start, tmp_path: Path) -> None:
    """Issue 12, finding 10: the old process waited for ever for long programs,
    and kept sending WATCHDOG=1 and STATUS= that could hide a hung successor."""
    port = free_port()
    script(tmp_path, "long.sh", "echo start\nsleep 60\n")
    notify = NotifySocket(str(tmp_path / "notify.sock"), creds=True)
    d = superd(_config(tmp_path, f"""
        long: {{listen: "127.0.0.1:{port}", exec: [{tmp_path}/long.sh], kill_grace: 1}}
    """, stop_timeout="1"), start=False)
    argv = ["/bin/sh", "-c", 'WATCHDOG_PID=$$; export WATCHDOG_PID; exec "$@"', "sh",
            sys.executable, "-m", "superd", "run", "-c", str(d.config_path)]
    _popen_logged(d, argv, env=_env(NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="400000"))
    old = d.pid
    new: int | None = None
    client = None
    try:
        notify.wait_for(lambda lines, pid: lines[0] == "READY=1" and pid == old)
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert _read_line(client) == b"start\n"
        os.kill(old, signal.SIGUSR2)
        new = _successor_pid(d)
        notify.wait_for(lambda lines, pid: lines == [f"MAINPID={new}"] and pid == old)
        switch = len(notify.seen)
        assert d.proc is not None
        assert d.proc.wait(20) == 0, "the old process must not wait for ever: " + d.log()
        d.wait_log(r"stop_timeout: sending SIGTERM to 1 program")
        assert [m for m in notify.seen[switch:] if m[1] == old] == []
    finally:
        if client is not None:
            client.close()
        notify.close()
        _stop_pid(new)
        for pid in _pids_running(d.config_path):
            if pid != old:
                _stop_pid(pid)


# --- 4. --daemon --pidfile ----------------------------------------------------


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def _dead_pid() -> int:
    proc = subprocess.Popen(["/bin/true"])
    proc.wait(10)
    return proc.pid


def test_daemon_mode_with_pidfile(tmp_path: Path) -> None:
    port = free_port()
    pidfile = tmp_path / "superd.pid"
    logfile = tmp_path / "daemon.log"
    config = tmp_path / "superd.yaml"
    config.write_text(_config(tmp_path, f"""
        echo: {{listen: "127.0.0.1:{port}", internal: echo}}
    """, log=f"{{file: {logfile}}}"))
    os.chmod(config, 0o644)
    pidfile.write_text(f"{_dead_pid()}\n")  # stale: does not prevent the start
    args = ("run", "--daemon", "--pidfile", str(pidfile), "-c", str(config))
    pid: int | None = None
    try:
        started = time.monotonic()
        first = run_superd(*args, timeout=30)
        assert first.returncode == 0, first.stdout + first.stderr
        assert time.monotonic() - started < 20
        assert wait_until(lambda: (p := _read_pid(pidfile)) is not None and not _gone(p), 10), (
            pidfile.read_text() if pidfile.exists() else "no pidfile")
        pid = _read_pid(pidfile)
        assert pid is not None
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        assert wait_until(lambda: "ready:" in logfile.read_text() if logfile.exists()
                          else False, 15)
        assert tcp_exchange(port, b"detached") == b"detached"

        second = run_superd(*args, timeout=30)
        assert second.returncode == 1, second.stdout + second.stderr
        assert "already running" in second.stderr, second.stderr
        assert _read_pid(pidfile) == pid and not _gone(pid)
        assert tcp_exchange(port, b"first still") == b"first still"

        os.kill(pid, signal.SIGTERM)
        assert wait_until(lambda: _gone(pid), 15), logfile.read_text()
        assert wait_until(lambda: not pidfile.exists(), 5), "pidfile left behind"
        assert "superd stopped" in logfile.read_text()
    finally:
        _stop_pid(pid)
        for other in _pids_running(config):
            _stop_pid(other)


def test_daemon_mode_handover_moves_the_pidfile(tmp_path: Path) -> None:
    port = free_port()
    pidfile = tmp_path / "superd.pid"
    logfile = tmp_path / "daemon.log"
    config = tmp_path / "superd.yaml"
    config.write_text(_config(tmp_path, f"""
        echo: {{listen: "127.0.0.1:{port}", internal: echo}}
    """, log=f"{{file: {logfile}}}"))
    os.chmod(config, 0o644)
    pid: int | None = None
    new: int | None = None
    try:
        result = run_superd("run", "--daemon", "--pidfile", str(pidfile), "-c", str(config))
        assert result.returncode == 0, result.stderr
        assert wait_until(lambda: _read_pid(pidfile) is not None, 10)
        pid = _read_pid(pidfile)
        assert pid is not None
        assert wait_until(lambda: "ready:" in logfile.read_text(), 15)
        os.kill(pid, signal.SIGUSR2)
        assert wait_until(lambda: "serves now" in logfile.read_text(), 15), \
            logfile.read_text()
        new = int(re.findall(r"superd (\d+) serves now", logfile.read_text())[-1])
        assert wait_until(lambda: _gone(pid), 15)
        assert wait_until(lambda: _read_pid(pidfile) == new, 5), pidfile.read_text()
        assert tcp_exchange(port, b"moved") == b"moved"
        os.kill(new, signal.SIGTERM)
        assert wait_until(lambda: _gone(new), 15)
        assert wait_until(lambda: not pidfile.exists(), 5), "pidfile left behind"
    finally:
        _stop_pid(new)
        _stop_pid(pid)
        for other in _pids_running(config):
            _stop_pid(other)



@pytest.mark.skipif(os.path.exists("/dev/log") or os.geteuid() != 0,
                    reason="needs to stand in for syslog on /dev/log (root, none there)")
def test_daemon_mode_handover_keeps_logging_to_syslog(tmp_path: Path) -> None:
    """Issue 12, finding 10: a --daemon superd with no log file logs to syslog;
    before, the superd that took over on SIGUSR2 logged to /dev/null, because
    the switch to syslog was not in the argv it was started with.  A real
    datagram socket on /dev/log stands in for syslog (removed afterwards)."""
    port = free_port()
    pidfile = tmp_path / "superd.pid"
    config = tmp_path / "superd.yaml"
    config.write_text(_config(tmp_path, f"""
        echo: {{listen: "127.0.0.1:{port}", internal: echo}}
    """))
    os.chmod(config, 0o644)
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslog.bind("/dev/log")
    syslog.settimeout(0.2)
    lines: list[str] = []

    def heard(pattern: str) -> re.Match[str] | None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            found = re.search(pattern, "\n".join(lines))
            if found:
                return found
            try:
                lines.append(syslog.recv(65536).decode(errors="replace"))
            except TimeoutError:
                pass
        return None

    pid: int | None = None
    new: int | None = None
    try:
        result = run_superd("run", "--daemon", "--pidfile", str(pidfile), "-c", str(config))
        assert result.returncode == 0, result.stderr
        assert wait_until(lambda: _read_pid(pidfile) is not None, 10)
        pid = _read_pid(pidfile)
        assert heard(rf"superd\[{pid}\]: .*ready:"), lines
        os.kill(pid, signal.SIGUSR2)
        found = heard(r"superd (\d+) serves now")
        assert found, lines
        new = int(found.group(1))
        assert heard(rf"superd\[{new}\]: .*ready:"), lines  # the successor's own line
        assert tcp_exchange(port, b"moved") == b"moved"
        assert wait_until(lambda: _gone(pid), 15)  # type: ignore[arg-type]
        os.kill(new, signal.SIGTERM)
        assert heard(rf"superd\[{new}\]: .*superd stopped"), lines
    finally:
        _stop_pid(new)
        _stop_pid(pid)
        for other in _pids_running(config):
            _stop_pid(other)
        syslog.close()
        os.unlink("/dev/log")

# --- 5. SIGUSR1 ---------------------------------------------------------------


def test_sigusr1_reopens_the_log_file(superd: Start, tmp_path: Path) -> None:
    port = free_port()
    logfile = tmp_path / "file.log"
    script(tmp_path, "fail.sh", "exit 3\n")
    d = superd(_config(tmp_path, f"""
        fail: {{listen: "127.0.0.1:{port}", exec: [{tmp_path}/fail.sh]}}
    """, log=f"{{file: {logfile}}}"), start=False)
    d.start(ready=False)

    def text(path: Path) -> str:
        return path.read_text() if path.exists() else ""

    assert wait_until(lambda: "ready:" in text(logfile), 15), d.log() + text(logfile)
    assert tcp_exchange(port) == b""
    assert wait_until(lambda: "exit 3" in text(logfile), 10), text(logfile)
    rotated = tmp_path / "file.log.1"
    os.rename(logfile, rotated)
    os.kill(d.pid, signal.SIGUSR1)
    assert wait_until(lambda: "log files reopened" in text(logfile), 10), d.log()
    assert tcp_exchange(port) == b""
    assert wait_until(lambda: "exit 3" in text(logfile), 10), text(logfile)
    assert text(rotated).count("exit 3") == 1, text(rotated)
    assert "log files reopened" not in text(rotated)
    assert d.stop() == 0
    assert "superd stopped" in text(logfile)


# --- 6. unit files -------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed")
def test_unit_files_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None
    beside = Path(sys.executable).parent / "superd"  # the venv's, even when not activated
    superd_bin = str(beside) if beside.exists() else shutil.which("superd")
    assert superd_bin is not None, "the superd entry point is not installed"
    service = (ROOT / "systemd" / "superd.service").read_text()
    assert "/usr/local/bin/superd" in service
    (tmp_path / "superd.service").write_text(service.replace("/usr/local/bin/superd",
                                                             superd_bin))
    shutil.copy(ROOT / "systemd" / "superd.socket", tmp_path / "superd.socket")
    result = subprocess.run([analyze, "verify", "--man=no", str(tmp_path / "superd.service"),
                             str(tmp_path / "superd.socket")],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for line in output.splitlines():
        assert "superd.s" not in line and "Unknown" not in line, output


def test_unit_lets_only_the_main_process_notify() -> None:
    """NotifyAccess=all would let any program superd starts (as any service's
    user) send MAINPID=, STOPPING=1 or WATCHDOG=1 to systemd on superd's behalf;
    the hand-over works with main (test_handover_under_systemd_notify_and_watchdog)."""
    lines = (ROOT / "systemd" / "superd.service").read_text().splitlines()
    settings = [line.split("=", 1)[1] for line in lines if line.startswith("NotifyAccess=")]
    assert settings == ["main"]


# --- 7. graceful stop --------------------------------------------------------


def test_stop_timeout_kills_a_program_ignoring_sigterm(superd: Start,
                                                       tmp_path: Path) -> None:
    port = free_port()
    script(tmp_path, "stubborn.sh", "trap '' TERM\necho started\nsleep 30\necho never\n")
    d = superd(_config(tmp_path, f"""
        stubborn: {{listen: "127.0.0.1:{port}", exec: [{tmp_path}/stubborn.sh]}}
    """, stop_timeout="1"))
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    child: int | None = None
    try:
        assert _read_line(client) == b"started\n"
        assert wait_until(lambda: len(d.children()) == 1, 5)
        child = d.children()[0]
        assert wait_until(lambda: len(_session_members(child)) >= 2, 5)  # sh and sleep
        started = time.monotonic()
        assert d.stop(timeout=20) == 0, d.log()
        assert time.monotonic() - started < 10, d.log()
        assert wait_until(lambda: _session_members(child) == [], 5), _session_members(child)
        assert _read_all(client) == b""
        assert "never" not in d.log()
    finally:
        client.close()
        if child is not None:
            for pid in _session_members(child):
                os.kill(pid, signal.SIGKILL)


def test_stop_lets_a_running_program_finish(superd: Start, tmp_path: Path) -> None:
    port = free_port()
    script(tmp_path, "finish.sh", "echo begin\nsleep 1\necho middle\nsleep 0.5\necho end\n")
    d = superd(_config(tmp_path, f"""
        finish: {{listen: "127.0.0.1:{port}", exec: [{tmp_path}/finish.sh]}}
    """, stop_timeout="5"))
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        assert _read_line(client) == b"begin\n"
        assert d.proc is not None
        os.kill(d.pid, signal.SIGTERM)
        d.wait_log("closing listeners")
        assert wait_until(lambda: _refused(port), 5), "listeners close at once"
        assert d.proc.poll() is None, "superd waits for its running program"
        assert _read_all(client) == b"middle\nend\n"
        assert d.proc.wait(15) == 0, d.log()
        assert "stop_timeout" not in d.log(), d.log()
    finally:
        client.close()
