"""The ready examples in etc/examples/, end to end with the real programs.

Each test copies one example into the daemon's tmp_path, substituting only
its port and paths (every substituted text must still be in the example, so
the test notices when the example changes), starts superd on it and talks
to the service with the program's own client: ssh, tftp, git, rsync,
urllib and a UNIX socket.  A test is skipped, saying what is missing, when
its program or client is not installed (``.ci/run`` installs them), or when
its example needs root and the tests do not run as root; the others run as
any user (not as root, without the example's ``user: nobody``).
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, Superd, free_port, needs_root, run_superd

Start = Callable[..., Superd]

EXAMPLES = ROOT / "etc" / "examples"
# Extra top-level settings for the copies: programs that linger (in.tftpd
# waits 15 minutes for more requests) are stopped within the fixture's wait,
# and each daemon has its own control socket.
def preamble(tmp_path: Path) -> str:
    return f"stop_timeout: 2\ncontrol: {tmp_path / 'control.sock'}\n"
# The clients, with their PATH: sbin too, where in.tftpd and sshd live.
TOOLS_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CLIENT_TIMEOUT = 30


# The Debian package of each program the tests need (.ci/run installs them).
PACKAGES = {"/usr/sbin/sshd": "openssh-server", "ssh": "openssh-client",
            "ssh-keygen": "openssh-client", "/usr/sbin/in.tftpd": "tftpd-hpa",
            "tftp": "tftp-hpa", "/usr/bin/git": "git", "/usr/bin/rsync": "rsync",
            "/bin/sh": "dash"}


def need(*programs: str) -> None:
    """Skip unless every program (an absolute path or a name) is installed."""
    missing = [p for p in programs
               if not (os.access(p, os.X_OK) if p.startswith("/")
                       else shutil.which(p, path=TOOLS_PATH))]
    if missing:
        pytest.skip("needs " + ", ".join(
            f"{p} (Debian package {PACKAGES.get(p, 'providing it')})" for p in missing))


def example(name: str, replace: dict[str, str]) -> str:
    """The text of example *name* with each key replaced by its value.  Not
    as root, ``user: nobody`` becomes no user (superd then runs the program
    as itself, as an ordinary user trying the example would write it)."""
    text = (EXAMPLES / name).read_text()
    for old, new in replace.items():
        assert old in text, f"etc/examples/{name} no longer contains {old!r}"
        text = text.replace(old, new)
    if os.geteuid() != 0:
        text = re.sub(r"(?m)^(\s*)user: nobody\b.*$", r"\1# (user: nobody: as root)", text)
    return text


def install(tmp_path: Path, name: str, replace: dict[str, str] | None = None,
            mode: int = 0o644) -> Path:
    """Copy an example's helper file into tmp_path, substituted, with *mode*."""
    path = tmp_path / name
    path.write_text(example(name, replace or {}))
    os.chmod(path, mode)
    return path


def run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": TOOLS_PATH}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=CLIENT_TIMEOUT, stdin=subprocess.DEVNULL)


def directory(path: Path) -> Path:
    """A directory the unprivileged programs can read."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o755)
    return path


# --- every example loads as written -----------------------------------------


def example_files() -> list[str]:
    return sorted(p.name for p in EXAMPLES.glob("*.yaml"))


def test_there_is_an_example_per_classic_program() -> None:
    assert example_files() == ["git-daemon.yaml", "http.yaml", "rsync.yaml", "sshd.yaml",
                               "tftp.yaml", "unix-socket.yaml"]


@needs_root("the examples are written for a root superd (user: nobody and root, a socket "
            "owned by root:adm); not as root check refuses what it could not apply")
@pytest.mark.parametrize("name", example_files())
def test_example_passes_check_as_written(tmp_path: Path, name: str) -> None:
    copy = directory(tmp_path / "examples")
    for path in EXAMPLES.iterdir():  # scripts beside the file: relative exec: paths
        shutil.copy(path, copy / path.name)
        os.chmod(copy / path.name, 0o755 if os.access(path, os.X_OK) else 0o644)
    services = yaml.safe_load((copy / name).read_text())["services"]
    for svc in services.values():
        program = svc["exec"][0]
        if program.startswith("/"):
            need(program)
    result = run_superd("check", "-c", str(copy / name))
    assert result.returncode == 0, result.stdout + result.stderr
    for svc_name in services:
        assert f"  {svc_name} " in result.stdout


# --- OpenSSH: sshd -i -------------------------------------------------------


def root_password_locked() -> bool:
    """True if root's password is locked with '!': sshd without PAM (the
    example's UsePAM no) then refuses root even with a key."""
    try:
        lines = Path("/etc/shadow").read_text().splitlines()
    except OSError:
        return False
    return any(line.startswith("root:!") for line in lines)


@needs_root("the example runs sshd as root, to log in as root")
def test_sshd_inetd_mode_runs_a_command(superd: Start, tmp_path: Path) -> None:
    need("/usr/sbin/sshd", "ssh", "ssh-keygen")
    if root_password_locked():
        pytest.skip("root's password is locked with '!' in /etc/shadow; sshd with "
                    "UsePAM no refuses locked accounts (usermod -p '*' root allows keys)")
    port = free_port()
    keys = tmp_path / "sshd"
    setup = run(["sh", str(EXAMPLES / "sshd-setup.sh"), str(keys)])
    assert setup.returncode == 0, setup.stderr
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "client_key")])
    authorized = tmp_path / "authorized_keys"
    shutil.copy(tmp_path / "client_key.pub", authorized)
    # The test's keys live under /tmp, which StrictModes would refuse; the
    # first value of a keyword wins, so these lines go first.
    config = keys / "sshd_config"
    config.write_text(f"AuthorizedKeysFile {authorized}\nStrictModes no\n"
                      + config.read_text())
    d = superd(preamble(tmp_path) + example("sshd.yaml", {
        "127.0.0.1:2222": f"127.0.0.1:{port}",
        "/etc/superd/sshd/": f"{keys}/",
    }))
    result = run(["ssh", "-F", "/dev/null", "-i", str(tmp_path / "client_key"),
                  "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                  "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                  "-o", "ConnectTimeout=10", "-o", "LogLevel=ERROR",
                  "-p", str(port), "root@127.0.0.1", "echo ok"])
    assert (result.returncode, result.stdout) == (0, "ok\n"), result.stderr + d.log()
    d.wait_log(r"ssh\[\d+\]: Accepted publickey for root from 127\.0\.0\.1")


@needs_root("the example runs sshd as root")
def test_sshd_refuses_a_password_login(superd: Start, tmp_path: Path) -> None:
    need("/usr/sbin/sshd", "ssh")
    port = free_port()
    keys = tmp_path / "sshd"
    assert run(["sh", str(EXAMPLES / "sshd-setup.sh"), str(keys)]).returncode == 0
    superd(preamble(tmp_path) + example("sshd.yaml", {
        "127.0.0.1:2222": f"127.0.0.1:{port}",
        "/etc/superd/sshd/": f"{keys}/",
    }))
    result = run(["ssh", "-F", "/dev/null", "-o", "BatchMode=yes",
                  "-o", "PubkeyAuthentication=no", "-o", "StrictHostKeyChecking=no",
                  "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=10",
                  "-p", str(port), "root@127.0.0.1", "echo ok"])
    assert result.returncode == 255
    assert "Permission denied (publickey)" in result.stderr


# --- tftpd-hpa: UDP wait mode -----------------------------------------------


@needs_root("the example runs in.tftpd as root, which drops to user tftp itself")
def test_tftpd_serves_files_from_one_waiting_program(superd: Start, tmp_path: Path) -> None:
    need("/usr/sbin/in.tftpd", "tftp")
    try:
        pwd.getpwnam("tftp")
    except KeyError:
        pytest.skip("no user tftp (the tftpd-hpa package creates it)")
    port = free_port(socket.SOCK_DGRAM)
    served = directory(tmp_path / "tftp")
    (served / "hello.txt").write_text("hello over tftp\n")
    os.chmod(served / "hello.txt", 0o644)
    d = superd(preamble(tmp_path) + example("tftp.yaml", {
        "127.0.0.1:6969": f"127.0.0.1:{port}",
        "/srv/tftp": str(served),
    }))
    out = directory(tmp_path / "out")
    for attempt in (1, 2):  # the second request is served by the same in.tftpd
        (out / "hello.txt").unlink(missing_ok=True)
        result = run(["tftp", "127.0.0.1", str(port), "-c", "get", "hello.txt"], cwd=out)
        assert result.returncode == 0, result.stdout + result.stderr
        assert (out / "hello.txt").read_text() == "hello over tftp\n", (attempt, d.log())
    assert len(d.children()) == 1, d.log()  # wait mode: one program holds the socket
    result = run(["tftp", "127.0.0.1", str(port), "-c", "get", "missing.txt"], cwd=out)
    assert "File not found" in result.stdout + result.stderr


# --- git daemon --inetd -----------------------------------------------------


def test_git_daemon_serves_a_clone(superd: Start, tmp_path: Path) -> None:
    need("/usr/bin/git")
    port = free_port()
    work = tmp_path / "work"
    base = directory(tmp_path / "git")
    git = ["git", "-c", "user.name=superd test", "-c", "user.email=test@example.org"]
    assert run([*git, "init", "-q", str(work)]).returncode == 0
    (work / "README").write_text("served by git daemon through superd\n")
    assert run([*git, "-C", str(work), "add", "README"]).returncode == 0
    assert run([*git, "-C", str(work), "commit", "-qm", "first"]).returncode == 0
    repo = base / "project.git"
    assert run([*git, "clone", "-q", "--bare", str(work), str(repo)]).returncode == 0
    (repo / "git-daemon-export-ok").touch()
    run(["chmod", "-R", "a+rX", str(base)])
    d = superd(preamble(tmp_path) + example("git-daemon.yaml", {
        "127.0.0.1:9418": f"127.0.0.1:{port}",
        "/srv/git": str(base),
    }))
    clone = tmp_path / "clone"
    result = run(["git", "clone", "-q", f"git://127.0.0.1:{port}/project.git", str(clone)])
    assert result.returncode == 0, result.stderr + d.log()
    assert (clone / "README").read_text() == "served by git daemon through superd\n"


def test_git_daemon_refuses_an_unexported_repository(superd: Start, tmp_path: Path) -> None:
    need("/usr/bin/git")
    port = free_port()
    base = directory(tmp_path / "git")
    assert run(["git", "init", "-q", "--bare", str(base / "private.git")]).returncode == 0
    d = superd(preamble(tmp_path) + example("git-daemon.yaml", {
        "127.0.0.1:9418": f"127.0.0.1:{port}",
        "/srv/git": str(base),
    }))
    result = run(["git", "clone", "-q", f"git://127.0.0.1:{port}/private.git",
                  str(tmp_path / "clone")])
    assert result.returncode != 0
    d.wait_log(r"git\[\d+\]: .*/private\.git': repository not exported")


# --- rsync --daemon ---------------------------------------------------------


def test_rsync_daemon_lists_and_copies_a_module(superd: Start, tmp_path: Path) -> None:
    need("/usr/bin/rsync")
    port = free_port()
    data = directory(tmp_path / "data")
    (data / "file.txt").write_text("rsync payload\n")
    os.chmod(data / "file.txt", 0o644)
    conf = install(tmp_path, "rsyncd.conf", {"/srv/rsync": str(data)})
    superd(preamble(tmp_path) + example("rsync.yaml", {
        "127.0.0.1:8873": f"127.0.0.1:{port}",
        "/etc/superd/rsyncd.conf": str(conf),
    }))
    modules = run(["rsync", f"rsync://127.0.0.1:{port}/"])
    assert modules.returncode == 0, modules.stderr
    assert modules.stdout.split()[:3] == ["pub", "public", "files"]
    listing = run(["rsync", f"rsync://127.0.0.1:{port}/pub/"])
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.rstrip().endswith(" file.txt")
    copy = run(["rsync", "-r", f"rsync://127.0.0.1:{port}/pub/", str(tmp_path / "copy")])
    assert copy.returncode == 0, copy.stderr
    assert (tmp_path / "copy" / "file.txt").read_text() == "rsync payload\n"


# --- a shell-script HTTP responder ------------------------------------------


def http(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no *_proxy
    try:
        with opener.open(request, timeout=10) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_http_responder_answers_get_head_and_others(superd: Start, tmp_path: Path) -> None:
    need("/bin/sh")
    port = free_port()
    install(tmp_path, "http-hello.sh", mode=0o755)
    superd(preamble(tmp_path) + example("http.yaml", {
        "127.0.0.1:8080": f"127.0.0.1:{port}",
    }))
    status, headers, body = http(port, "/some/path?q=1")
    assert status == 200
    assert body == b"hello from superd\npath: /some/path?q=1\nclient: 127.0.0.1\n"
    assert headers["Content-Length"] == str(len(body))
    assert headers["Content-Type"] == "text/plain; charset=utf-8"
    status, headers, body = http(port, "/", method="HEAD")
    assert (status, body) == (200, b"")
    assert int(headers["Content-Length"]) > 0
    status, _, body = http(port, "/", method="DELETE")
    assert (status, body) == (501, b"method not implemented\n")


# --- a UNIX-socket service --------------------------------------------------


@needs_root("the example's socket file is owned by root:adm")
def test_unix_socket_service_sees_its_peer(superd: Start, tmp_path: Path) -> None:
    need("/bin/sh")
    try:
        adm = grp.getgrnam("adm").gr_gid
    except KeyError:
        pytest.skip("no group adm (the example's owner: root:adm)")
    path = tmp_path / "run" / "peer-info.sock"
    install(tmp_path, "peer-info.sh", mode=0o755)
    superd(preamble(tmp_path) + example("unix-socket.yaml", {
        "/run/superd/peer-info.sock": str(path),
    }))
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, adm)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        chunks = []
        while chunk := s.recv(4096):
            chunks.append(chunk)
    lines = b"".join(chunks).decode().splitlines()
    assert lines[0] == f"hello uid 0 gid {os.getgid()} pid {os.getpid()}"
    assert lines[1].startswith("load ") and len(lines[1].split()) == 4
