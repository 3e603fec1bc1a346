"""The daemon's own credentials never change, so a service's uid cannot reach it.

Before, superd set its *real* uid and groups to the service's for the whole
posix_spawn (RESETIDS did the rest), and kill(2) lets a process signal any
process whose real uid equals its own: a program running as ``nobody``
could SIGSTOP or SIGKILL the root daemon while it was starting another
``nobody`` program.  These tests do that attack with a real process running
as uid 65534, under a real load of connections, and read the daemon's ids
from /proc while it runs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, free_port, tcp_exchange, wait_until

NOBODY = 65534
# the venv's python may live under /root, which nobody cannot enter
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (switches users)")

# The attacker: as uid 65534, signal the daemon as often as it can for a
# bounded time and count what the kernel allowed.
ATTACKER = """
import errno, os, signal, sys, time
pid, seconds = int(sys.argv[1]), float(sys.argv[2])
allowed = denied = 0
end = time.monotonic() + seconds
while time.monotonic() < end and allowed + denied < 5_000_000:
    for sig in (0, 0, 0, 0, 0, 0, 0, signal.SIGSTOP):
        try:
            os.kill(pid, sig)
        except PermissionError:
            denied += 1
        else:
            allowed += 1
            if sig == signal.SIGSTOP:
                os.kill(pid, signal.SIGCONT)  # allowed too: let the test go on
print(allowed, denied, os.getuid(), os.geteuid())
"""


def _ids(pid: int) -> tuple[str, ...]:
    """The Uid:, Gid: and Groups: lines of /proc/PID/status, spaces folded."""
    status = Path(f"/proc/{pid}/status").read_text()
    return tuple(" ".join(line.split()) for line in status.splitlines()
                 if line.startswith(("Uid:", "Gid:", "Groups:")))


def _load(port: int, stop: threading.Event, served: list[int]) -> None:
    """Short connections, one after another, until *stop* (bounded)."""
    for _ in range(20_000):
        if stop.is_set():
            return
        try:
            if tcp_exchange(port, timeout=5) == b"hello\n":
                served[0] += 1
        except OSError:
            pass


def _attack_under_load(d, port: int, seconds: float) -> None:
    """Signal the daemon as uid 65534 while 4 clients keep it starting
    programs as nobody; read its ids from /proc all along."""
    before = _ids(d.pid)
    assert before[:2] == ("Uid: 0 0 0 0", "Gid: 0 0 0 0"), before
    stop, served = threading.Event(), [0]
    clients = [threading.Thread(target=_load, args=(port, stop, served)) for _ in range(4)]
    for t in clients:
        t.start()
    seen: set[tuple[str, ...]] = set()
    try:
        attacker = subprocess.Popen(
            [SYSTEM_PYTHON, "-I", "-c", ATTACKER, str(d.pid), str(seconds)],
            user=NOBODY, group=NOBODY, extra_groups=[], stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + seconds + 30
        while attacker.poll() is None and time.monotonic() < deadline:
            seen.add(_ids(d.pid))
        out, _ = attacker.communicate(timeout=30)
    finally:
        stop.set()
        for t in clients:
            t.join(30)
    allowed, denied, uid, euid = map(int, out.split())
    assert (uid, euid) == (NOBODY, NOBODY)
    assert served[0] >= 20, f"the load did not run: {served[0]} connections\n{d.log()}"
    assert denied > 1000
    assert allowed == 0, f"uid 65534 signalled the daemon {allowed} times ({denied} denied)"
    assert seen == {before}, f"the daemon's ids changed under load: {seen}"
    assert d.proc.poll() is None


@root_only
def test_a_services_uid_cannot_signal_the_daemon_under_load(superd) -> None:
    port = free_port()
    d = superd(f"""
        services:
          hello:
            listen: 127.0.0.1:{port}
            exec: [/bin/echo, hello]
            user: nobody
            max_connections: 64
        """)
    _attack_under_load(d, port, 4)


@pytest.fixture
def no_extension(tmp_path: Path) -> dict[str, str]:
    """An environment in which superd is installed without its C extension,
    as on a machine without a compiler: a copy of the package minus the .so."""
    pkg = tmp_path / "nocc" / "superd"
    shutil.copytree(ROOT / "superd", pkg,
                    ignore=shutil.ignore_patterns("*.so", "superd-exec", "__pycache__"))
    # an editable install would still find the built module in the checkout:
    # make the import fail as it does where it was never built
    (pkg / "_spawn.py").write_text("raise ImportError('superd._spawn is not built')\n")
    return dict(os.environ, PYTHONPATH=str(tmp_path / "nocc"))


@root_only
def test_without_the_extension_the_fork_path_is_as_safe(superd, no_extension) -> None:
    port, limited = free_port(), free_port()
    d = superd(f"""
        services:
          hello:
            listen: 127.0.0.1:{port}
            exec: [/bin/echo, hello]
            user: nobody
          limited:
            listen: 127.0.0.1:{limited}
            exec: [/bin/sh, -c, "id -u; ulimit -n; nice; umask; pwd"]
            user: nobody
            rlimits: {{nofile: 64}}
            nice: 3
            umask: "077"
            cwd: /tmp
        """, env=no_extension)
    assert "programs start through subprocess" in d.log()
    assert tcp_exchange(limited) == b"65534\n64\n3\n0077\n/tmp\n"
    _attack_under_load(d, port, 2)


@root_only
def test_programs_still_get_the_services_identity(superd, tmp_path: Path) -> None:
    port = free_port()
    superd(f"""
        services:
          who:
            listen: 127.0.0.1:{port}
            exec: [/bin/sh, -c, "grep -E '^(Uid|Gid|Groups):' /proc/self/status; umask; pwd"]
            user: nobody
            group: nogroup
            umask: "077"
            cwd: /tmp
        """)
    out = tcp_exchange(port).decode()
    assert re.search(rf"^Uid:\s+{NOBODY}\s+{NOBODY}\s+{NOBODY}\s+{NOBODY}$", out, re.M), out
    assert re.search(r"^Groups:\s*65534\s*$", out, re.M), out
    assert "0077\n/tmp\n" in out


@root_only
def test_a_failing_setting_costs_the_connection_not_the_daemon(superd, tmp_path: Path) -> None:
    """chdir as nobody into a root-only directory fails in the child: the
    daemon logs the step and the reason once, and keeps serving."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    port, ok_port = free_port(), free_port()
    d = superd(f"""
        services:
          broken:
            listen: 127.0.0.1:{port}
            exec: [/bin/echo, never]
            user: nobody
            cwd: {private}
          fine:
            listen: 127.0.0.1:{ok_port}
            exec: [/bin/echo, hello]
            user: nobody
        """)
    assert tcp_exchange(port) == b""
    d.wait_log(r"broken.*Permission denied")
    assert tcp_exchange(ok_port) == b"hello\n"
    assert _ids(d.pid)[0] == "Uid: 0 0 0 0"


# --- the syscalls, pinned with strace -----------------------------------

ID_CALLS = ("setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
            "setgroups", "setfsuid", "setfsgid")
strace = pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")


def _trace(tmp_path: Path, service: str, port: int, connections: int = 3) -> tuple[str, int]:
    cfg = tmp_path / "superd.yaml"
    cfg.write_text(f"control: {tmp_path}/control.sock\nservices:\n{service}")
    os.chmod(cfg, 0o644)
    trace, logpath = tmp_path / "trace.txt", tmp_path / "superd.log"
    calls = ",".join(("clone", "clone3", "fork", "vfork", "execve", *ID_CALLS))
    with open(logpath, "wb") as log:
        proc = subprocess.Popen(
            ["strace", "-f", "-qq", "-e", f"trace={calls}", "-o", str(trace),
             sys.executable, "-m", "superd", "run", "-c", str(cfg)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    daemon = None
    try:
        assert wait_until(lambda: "ready:" in logpath.read_text(), 30), logpath.read_text()
        daemon = int(re.search(r"superd (\d+) ready", logpath.read_text()).group(1))
        for _ in range(connections):
            assert tcp_exchange(port) == b"hello\n"
        time.sleep(0.2)
    finally:
        if daemon is not None:
            os.kill(daemon, signal.SIGTERM)  # the traced daemon; strace then exits
        else:
            proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return trace.read_text(), daemon


def _calls(trace: str, names: tuple[str, ...]) -> list[tuple[int, str]]:
    rx = re.compile(r"^(\d+)\s+(" + "|".join(names) + r")\(")
    return [(int(m.group(1)), line) for line in trace.splitlines()
            if (m := rx.match(line))]


@root_only
@strace
@pytest.mark.parametrize("extra", ["    user: nobody\n",
                                   "    user: nobody\n    rlimits: {nofile: 64}\n    nice: 5\n",
                                   "    user: root\n"],
                         ids=["nobody", "nobody-rlimits-nice", "root"])
def test_identity_changes_only_in_children_and_clone_keeps_vfork(
        tmp_path: Path, extra: str) -> None:
    """The syscalls pin the hot path with no timing: every clone of the daemon
    shares its memory and suspends it (CLONE_VM|CLONE_VFORK, no copy of its
    page tables), and no identity call ever runs in the daemon itself."""
    port = free_port()
    service = (f"  hello:\n    listen: 127.0.0.1:{port}\n    exec: [/bin/echo, hello]\n"
               f"{extra}")
    trace, daemon = _trace(tmp_path, service, port)
    ids = _calls(trace, ID_CALLS)
    if "nobody" in extra:
        assert len(ids) >= 3, trace  # one identity switch per program at least
    assert [line for pid, line in ids if pid == daemon] == [], \
        "the daemon changed its own credentials"
    clones = [line for pid, line in _calls(trace, ("clone", "clone3", "fork", "vfork"))
              if pid == daemon and "resumed" not in line]
    assert len(clones) >= 3, trace
    for line in clones:
        assert "CLONE_VM" in line and "CLONE_VFORK" in line, line
    # no Python trampoline any more: the only exec per connection is the program's
    execs = [line for _, line in _calls(trace, ("execve",)) if "/bin/echo" in line]
    pythons = [line for pid, line in _calls(trace, ("execve",)) if pid != daemon
               and "python" in line and "superd" not in line]
    assert len(execs) >= 3 and pythons == [], trace


# --- a service's uid cannot freeze the daemon through a child -------------

FREEZER = """
import os, signal, sys, time
superd, prog, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
os.chmod(prog, 0)  # its owner may: every start now fails after the switch
stopped = set()
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        kids = open(f"/proc/{superd}/task/{superd}/children").read().split()
    except OSError:
        break
    for pid in map(int, kids):
        try:
            os.kill(pid, signal.SIGSTOP)  # allowed only for its own processes
            stopped.add(pid)
        except (PermissionError, ProcessLookupError):
            pass
print(len(stopped))
"""


@root_only
def test_a_services_uid_cannot_freeze_the_daemon_by_stopping_a_child(
        superd, tmp_path: Path) -> None:
    """The program belongs to the service's user (allowed), who makes every
    start fail after the identity switch and stops each child it can: the
    daemon never waits on such a child, so it goes on serving."""
    prog = tmp_path / "mine.sh"
    prog.write_text("#!/bin/sh\necho never\n")
    os.chmod(prog, 0o755)
    os.chown(prog, NOBODY, NOBODY)
    port, echo = free_port(), free_port()
    d = superd(f"""
        services:
          victim:
            listen: 127.0.0.1:{port}
            exec: [{prog}]
            user: nobody
          echo:
            listen: 127.0.0.1:{echo}
            internal: echo
        """)
    attacker = subprocess.Popen(
        [SYSTEM_PYTHON, "-I", "-c", FREEZER, str(d.pid), str(prog), "4"],
        user=NOBODY, group=NOBODY, extra_groups=[], stdout=subprocess.PIPE, text=True)
    answered = 0
    try:
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):  # a start; its program never runs
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            assert tcp_exchange(echo, b"ping", timeout=5) == b"ping", d.log()
            answered += 1
        out, _ = attacker.communicate(timeout=30)
    finally:
        for pid in d.children():  # let whatever the attacker stopped go
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert answered >= 20
    assert int(out) >= 1, "the attack never caught a child: it tested nothing"
    d.wait_log(r"victim: cannot start .*: Permission denied")
    assert "exit 127" not in d.log(), "a start failure is said once, as a start failure"
    assert d.proc.poll() is None
