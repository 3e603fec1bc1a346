"""Issue 11, the paths superd creates at run time: what a local user can do to them.

Each test performs the attack with a real unprivileged user (``nobody``, and
uid 65533 as a second local user), real symlinks and real signals against the
real daemon, and checks that superd refuses, says why, and touches nothing it
does not own.  Findings 1, 5, 6, 8 and the path part of 9.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import ROOT, Superd, free_port, tcp_exchange, wait_until

Start = Callable[..., Superd]
Completed = subprocess.CompletedProcess[str]
NOBODY = 65534
OTHER = 65533  # a second local user (no passwd entry needed)
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by nobody, unlike a python under /root
SQUAT = Path(f"/tmp/superd-{NOBODY}")  # nobody's fallback runtime directory
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as other users")


def as_user(uid: int, *argv: str, env: dict[str, str] | None = None) -> Completed:
    """Run *argv* as *uid* (group *uid*, no supplementary groups)."""
    return subprocess.run(
        list(argv),
        user=uid,
        group=uid,
        extra_groups=[],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )


def secret_file(tmp_path: Path) -> Path:
    """A root-only file an attacker would like to open up."""
    secret = tmp_path / "secret"
    secret.write_text("root only\n")
    os.chmod(secret, 0o600)
    return secret


def assert_untouched(secret: Path) -> None:
    st = os.stat(secret)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, os.geteuid(), os.getegid())
    assert secret.read_text() == "root only\n"


def run_briefly(config: Path, *extra: str, timeout: float = 15) -> tuple[int | None, str]:
    """``superd run``, expected to refuse and exit at once: (exit code or None
    if it was still running after *timeout*, its output)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "superd", "run", "-c", str(config), *extra],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd="/",
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=10)
        return None, out


def write_config(tmp_path: Path, text: str) -> Path:
    config = tmp_path / "superd.yaml"
    config.write_text(textwrap.dedent(text))
    os.chmod(config, 0o644)
    return config


# --- 1. a reload never chmods or chowns through a symlink ----------------------


@root_only
def test_reload_symlink_attack_from_the_owner_of_the_socket_directory(
    superd: Start, tmp_path: Path
) -> None:
    """The reviewer's attack: the socket's directory is handed to nobody after
    superd bound there; nobody swaps the socket for a symlink to a root-owned
    0600 file and waits for SIGHUP.  The reload is refused with the reason,
    the file is untouched, and the running configuration keeps serving."""
    sockdir = tmp_path / "sockdir"
    sockdir.mkdir(mode=0o755)
    sock, secret, port = sockdir / "svc.sock", secret_file(tmp_path), free_port()
    d = superd(f"""
    services:
      local: {{listen: {sock}, internal: echo, mode: "0666", owner: "nobody:nogroup"}}
      inet: {{listen: "127.0.0.1:{port}", internal: echo}}
    """)
    assert stat.S_ISSOCK(os.lstat(sock).st_mode)
    os.chown(sockdir, NOBODY, NOBODY)  # the mistake the attack needs
    attack = as_user(NOBODY, "/bin/sh", "-c", f"rm -f {sock} && ln -s {secret} {sock}")
    assert attack.returncode == 0, attack.stderr
    d.reload(expect="reload refused")
    assert_untouched(secret)
    assert os.path.islink(sock)
    d.wait_log(
        rf"listen: refused: directory {re.escape(str(sockdir))} is owned by uid {NOBODY}"
    )
    assert tcp_exchange(port, b"still serving") == b"still serving"
    assert d.stop() == 0
    assert os.path.islink(sock), "superd removed a symlink it did not make"
    assert_untouched(secret)


def test_reload_touches_only_the_socket_it_bound(superd: Start, tmp_path: Path) -> None:
    """Unchanged mode: nothing on disk changes (not even ctime).  A changed
    mode reaches the inode that was bound, never what the path names now."""
    sock, secret = tmp_path / "s.sock", secret_file(tmp_path)
    config = 'services:\n  local: {{listen: {}, internal: echo, mode: "{}"}}\n'
    d = superd(config.format(sock, "0666"))
    before = os.lstat(sock)
    assert stat.S_IMODE(before.st_mode) == 0o666
    d.reload()
    assert os.lstat(sock).st_ctime_ns == before.st_ctime_ns, "a reload touched the socket"

    d.reload(config.format(sock, "0640"))
    after = os.lstat(sock)
    assert (after.st_ino, stat.S_IMODE(after.st_mode)) == (before.st_ino, 0o640)

    sock.unlink()  # as anyone who could write the directory would
    sock.symlink_to(secret)
    d.reload(config.format(sock, "0666"))
    d.wait_log(
        rf"mode and owner of {re.escape(str(sock))} not changed: .*no longer the "
        r"socket superd bound"
    )
    assert_untouched(secret)
    assert d.stop() == 0
    assert sock.is_symlink(), "superd removed a symlink it did not make"
    assert_untouched(secret)


# --- 5. the control socket never deletes a regular file -------------------------


def test_control_path_naming_a_regular_file_is_left_alone(superd: Start, tmp_path: Path) -> None:
    typo = tmp_path / "superd.conf"
    typo.write_text("precious\n")
    port = free_port()
    d = superd(f"""
    control: {typo}
    services:
      inet: {{listen: "127.0.0.1:{port}", internal: echo}}
    """)
    d.wait_log(
        rf"control socket {re.escape(str(typo))}: {re.escape(str(typo))} exists "
        r"and is not a socket \(a regular file\)"
    )
    assert typo.read_text() == "precious\n"
    assert stat.S_ISREG(os.lstat(typo).st_mode)
    assert tcp_exchange(port, b"up") == b"up"
    status = subprocess.run(
        [sys.executable, "-m", "superd", "status", "-c", str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert status.returncode == 1
    assert "not a socket" in status.stderr, status.stderr
    assert d.stop() == 0
    assert typo.read_text() == "precious\n"


# --- 6. the stale-socket probe never blocks -----------------------------------------


@contextlib.contextmanager
def full_backlog(path: Path) -> Iterator[socket.socket]:
    """A live listener at *path* with backlog 0 and its queue full."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    clients: list[socket.socket] = []
    try:
        server.bind(str(path))
        server.listen(0)
        for _ in range(32):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            clients.append(client)
            client.setblocking(False)
            if client.connect_ex(str(path)) == errno.EAGAIN:
                break
        else:
            raise AssertionError("could not fill the backlog")
        yield server
    finally:
        for client in clients:
            client.close()
        server.close()


def test_stale_probe_does_not_block_on_a_full_backlog(superd: Start, tmp_path: Path) -> None:
    busy, port = tmp_path / "busy.sock", free_port()
    with full_backlog(busy):
        inode = os.lstat(busy).st_ino
        d = superd(f"""
        services:
          local: {{listen: {busy}, internal: echo}}
          inet: {{listen: "127.0.0.1:{port}", internal: echo}}
        """)  # waits (at most 15 s) for "ready:"
        d.wait_log(rf"cannot listen on {re.escape(str(busy))} \(unix stream\): "
                   r".*in use by another process")
        d.reload()  # a reload probes again: it must not freeze either
        d.wait_log(r"in use by another process", count=2)
        assert os.lstat(busy).st_ino == inode
        assert tcp_exchange(port, b"alive") == b"alive"


# --- 8. the non-root fallback directory cannot be squatted ------------------------

PLANTED = """\
import os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o777)
s.listen(8)
s.settimeout(20)
try:
    while True:
        conn, _ = s.accept()
        print("served", flush=True)
        conn.sendall(b'{"ok": true, "planted": true, "services": []}\\n')
        conn.close()
except OSError:
    pass
"""

CONTROL_SERVER = """\
import selectors, sys
from superd import config, control
from superd.timers import Timers
try:
    control.ControlServer(config.default_control_path(), selectors.DefaultSelector(),
                          Timers(), lambda request: request)
except OSError as e:
    print(e.strerror)
    sys.exit(3)
"""


@pytest.fixture
def squat() -> Iterator[Path]:
    """nobody's fallback runtime directory, removed before and after."""
    shutil.rmtree(SQUAT, ignore_errors=True)
    yield SQUAT
    shutil.rmtree(SQUAT, ignore_errors=True)


@root_only
def test_squatted_fallback_runtime_directory(tmp_path: Path, squat: Path) -> None:
    """Another user makes /tmp/superd-65534 (0777) first and plants a listener
    that answers ``superd status``; nobody, without XDG_RUNTIME_DIR, must refuse
    to talk to it or bind there, and say what to set."""
    control = squat / "superd" / "control.sock"
    made = as_user(OTHER, "/bin/sh", "-c", f"mkdir -m 0777 {squat} {squat}/superd")
    assert made.returncode == 0, made.stderr
    planter = subprocess.Popen(
        [SYSTEM_PYTHON, "-I", "-c", PLANTED, str(control)],
        user=OTHER,
        group=OTHER,
        extra_groups=[],
        cwd="/",
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert wait_until(lambda: control.is_socket(), 10)
        inode = os.lstat(control).st_ino
        config = write_config(tmp_path, "services: {}\n")
        env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}  # no XDG_RUNTIME_DIR
        cli = "import sys; from superd.cli import main; sys.exit(main())"
        status = as_user(NOBODY, SYSTEM_PYTHON, "-c", cli, "status", "-c", str(config), env=env)
        assert status.returncode == 1, (status.stdout, status.stderr)
        assert "planted" not in status.stdout
        assert f"directory {squat} is owned by uid {OTHER}" in status.stderr, status.stderr
        assert "XDG_RUNTIME_DIR" in status.stderr, status.stderr
        daemon = as_user(NOBODY, SYSTEM_PYTHON, "-c", CONTROL_SERVER, env=env)
        assert daemon.returncode == 3, (daemon.stdout, daemon.stderr)
        assert "XDG_RUNTIME_DIR" in daemon.stdout, daemon.stdout
        assert os.lstat(control).st_ino == inode
    finally:
        os.kill(planter.pid, signal.SIGTERM)
        out, _ = planter.communicate(timeout=10)
    assert "served" not in out, "a superd command talked to the planted listener"


# --- 9. directories others can write --------------------------------------------


def test_directory_others_can_write_is_refused_for_sockets(superd: Start, tmp_path: Path) -> None:
    """check names the line; a reload to such a file is refused and keeps the old one."""
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # no sticky bit: anyone could rename what superd makes
    port = free_port()
    bad = f"""
    control: {shared}/control.sock
    services:
      local: {{listen: {shared}/svc.sock, internal: echo}}
      inet: {{listen: "127.0.0.1:{port}", internal: echo}}
    """
    why = (rf"refused: directory {re.escape(str(shared))} is writable by others "
           r"\(mode 0777\) and not sticky")
    config = write_config(tmp_path, bad)
    code, out = run_briefly(config)
    assert code == 1, out
    assert re.search(rf"^{re.escape(str(config))}:2:10: control: {why}", out, re.M), out
    assert re.search(rf"^{re.escape(str(config))}:4:19: listen: {why}", out, re.M), out
    assert list(shared.iterdir()) == []
    d = superd(f"""
    services:
      inet: {{listen: "127.0.0.1:{port}", internal: echo}}
    """)
    d.reload(bad.replace(f"    control: {shared}/control.sock\n", ""), expect="reload refused")
    d.wait_log(rf"listen: {why}")
    assert list(shared.iterdir()) == []
    assert tcp_exchange(port, b"up") == b"up"


def test_directory_others_can_write_is_refused_for_log_and_pid_files(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    port = free_port()
    services = f'services:\n  inet: {{listen: "127.0.0.1:{port}", internal: echo}}\n'
    control = f"control: {tmp_path}/control.sock\n"
    config = write_config(tmp_path, f"{control}log: {{file: {shared}/superd.log}}\n{services}")
    code, out = run_briefly(config)
    assert code == 1, out
    assert f"directory {shared} is writable by others" in out
    config = write_config(tmp_path, control + services)
    code, out = run_briefly(config, "--pidfile", f"{shared}/superd.pid")
    assert code == 1, out
    assert f"directory {shared} is writable by others" in out
    assert list(shared.iterdir()) == []


@root_only
def test_sticky_directory_only_for_superds_own_entries(superd: Start, tmp_path: Path) -> None:
    """In a sticky directory superd makes its own control socket, but will not
    log into a file another user put there first."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    planted = sticky / "superd.log"
    made = as_user(NOBODY, "/bin/sh", "-c", f"echo mine > {planted}")
    assert made.returncode == 0, made.stderr
    port = free_port()
    services = f'services:\n  inet: {{listen: "127.0.0.1:{port}", internal: echo}}\n'
    config = write_config(tmp_path, f"log: {{file: {planted}}}\n{services}")
    code, out = run_briefly(config)
    assert code == 1, out
    assert f"{planted} belongs to uid {NOBODY}" in out, out
    assert planted.read_text() == "mine\n"

    d = superd(f"control: {sticky}/control.sock\n{services}")
    assert stat.S_ISSOCK(os.lstat(sticky / "control.sock").st_mode)
    status = subprocess.run(
        [sys.executable, "-m", "superd", "status", "-c", str(d.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert status.returncode == 0, status.stderr


def test_log_file_symlink_is_not_followed(tmp_path: Path) -> None:
    secret = secret_file(tmp_path)
    link = tmp_path / "superd.log"
    link.symlink_to(secret)
    port = free_port()
    config = write_config(
        tmp_path,
        f"""\
        control: {tmp_path}/control.sock
        log: {{file: {link}}}
        services:
          inet: {{listen: "127.0.0.1:{port}", internal: echo}}
        """,
    )
    code, out = run_briefly(config)
    assert code == 1, out
    assert f"{link} is a symbolic link" in out, out
    assert_untouched(secret)


def test_a_live_socket_of_another_type_is_not_taken_for_stale(
    superd: Start, tmp_path: Path
) -> None:
    """A SOCK_SEQPACKET listener answers a stream or datagram probe with
    EPROTOTYPE, which is alive, not stale: superd must not unlink it."""
    path = tmp_path / "theirs.sock"
    port = free_port()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as live:
        live.bind(str(path))
        live.listen(1)
        inode = os.lstat(path).st_ino
        d = superd(f"""
        services:
          local: {{listen: {path}, internal: echo}}
          inet: {{listen: "127.0.0.1:{port}", internal: echo}}
        """)
        d.wait_log(rf"cannot listen on {re.escape(str(path))} \(unix stream\): .*in use")
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
            client.connect(str(path))  # still theirs
        assert os.lstat(path).st_ino == inode
        assert tcp_exchange(port, b"up") == b"up"
