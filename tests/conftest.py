"""Shared fixtures: the real daemon as a subprocess on loopback ports."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port that is free for both TCP and UDP on *host* right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, kind) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        other = socket.SOCK_DGRAM if kind == socket.SOCK_STREAM else socket.SOCK_STREAM
        with socket.socket(family, other) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port")


def distinct_ports(count: int) -> list[int]:
    """*count* different free ports: free_port alone may repeat one, and no
    two services of a file may share a port."""
    found: set[int] = set()
    for _ in range(count * 20):
        found.add(free_port())
        if len(found) == count:
            return sorted(found)
    raise RuntimeError("not enough free ports")


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


IS_ROOT = os.geteuid() == 0
SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def needs_root(why: str) -> pytest.MarkDecorator:
    """Skip the test unless the suite runs as root, saying *why* it needs root."""
    return pytest.mark.skipif(not IS_ROOT, reason=f"needs root: {why}")


def find_program(name: str) -> str | None:
    """The path of program *name*: on PATH, else in the sbin directories
    (haproxy, sshd and in.tftpd live there, and a non-root PATH lacks them)."""
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN_DIRS))


def needs_program(name: str, package: str) -> pytest.MarkDecorator:
    """Skip the test unless program *name* is installed (see find_program)."""
    return pytest.mark.skipif(find_program(name) is None,
                              reason=f"needs {name} (Debian package {package})")


ROOT_DEFAULT_USER = "nobody"
# The user to write for an exec service whose test is not about identity:
# as root superd requires user: (nobody is what such services used to get);
# otherwise superd's own user, which needs no switch.
TEST_USER = ROOT_DEFAULT_USER if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
_DEFAULTS = re.compile(r"^defaults:[ \t]*(?:&\S+[ \t]*)?(?:(\{)|(?:#.*)?$)", re.MULTILINE)


def default_user(text: str) -> str:
    """*text* with ``user: nobody`` in its ``defaults:`` when the suite runs as
    root and the file names no user at all.

    As root, superd refuses an exec service without ``user:`` (each would
    share one uid with every other).  Most daemon tests are not about
    identity and write none; this gives them, explicitly, the ``nobody``
    they used to get implicitly.  A test that is about ``user:`` writes one
    (or writes the file itself) and is left alone.  Not as root: unchanged,
    programs run as the invoking user as before.
    """
    if os.geteuid() != 0 or re.search(r"\buser\s*:", text):
        return text
    line = f"user: {ROOT_DEFAULT_USER}"
    m = _DEFAULTS.search(text)
    if m is None:  # appended: line numbers of what the test wrote stay put
        return text.rstrip("\n") + f"\ndefaults: {{{line}}}\n"
    head, rest = text[:m.end()], text[m.end():]
    if m.group(1):  # flow style: defaults: {a: 1}
        sep = " " if rest.lstrip().startswith("}") else ", "
        return f"{head}{line}{sep}{rest.lstrip()}"
    following = rest.lstrip("\n").split("\n", 1)[0]
    indent = following[:len(following) - len(following.lstrip())] or "  "
    return f"{head}\n{indent}{line}{rest}"


class Superd:
    """A running ``superd run`` process with its log in a file."""

    def __init__(self, workdir: Path, config: str) -> None:
        self.workdir = workdir
        self.config_path = workdir / "superd.yaml"
        self.log_path = workdir / "superd.log"
        self.write_config(config)
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, text: str) -> None:
        text = textwrap.dedent(text)
        if not re.search(r"^control:", text, re.MULTILINE):
            # a private control socket: concurrent test daemons must not share
            # the default /run/superd/control.sock
            text = f"control: {self.workdir}/control.sock\n" + text
        self.config_path.write_text(default_user(text))
        os.chmod(self.config_path, 0o644)

    def start(self, *extra: str, env: dict[str, str] | None = None,
              ready: bool = True) -> Superd:
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "superd", "run", "-c", str(self.config_path), *extra],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=env,
            cwd=str(self.workdir))
        logf.close()
        if ready:
            assert wait_until(lambda: "ready:" in self.log() or self.proc.poll() is not None,
                              15), self.log()
            assert self.proc.poll() is None, f"superd exited:\n{self.log()}"
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 10.0) -> str:
        rx = re.compile(pattern)
        ok = wait_until(lambda: len(rx.findall(self.log())) >= count, timeout)
        assert ok, f"{pattern!r} x{count} not in log:\n{self.log()}"
        return self.log()

    def reload(self, config: str | None = None, expect: str = "reloaded") -> None:
        if config is not None:
            self.write_config(config)
        before = self.log().count(expect)
        os.kill(self.pid, signal.SIGHUP)
        self.wait_log(re.escape(expect), before + 1)

    def stop(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(5)
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(5)

    def children(self) -> list[int]:
        """Pids of the daemon's direct children, from /proc."""
        path = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        try:
            return [int(p) for p in path.read_text().split()]
        except FileNotFoundError:
            return []


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A private directory that programs running as nobody can still read.

    pytest's own tmp_path lives under a 0700 directory, which a service
    running as ``nobody`` cannot enter.
    """
    path = Path(tempfile.mkdtemp(prefix="superd-test-"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def superd(tmp_path: Path) -> Iterator[callable]:
    """Factory: ``superd(config_text)`` starts a daemon; all are stopped after."""
    os.chmod(tmp_path, 0o755)
    started: list[Superd] = []

    def make(config: str, *extra: str, start: bool = True, **kw) -> Superd:
        d = Superd(tmp_path, config)
        started.append(d)
        return d.start(*extra, **kw) if start else d

    yield make
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            try:
                d.stop(5)
            except subprocess.TimeoutExpired:
                pass
        d.kill()


def run_superd(*args: str, cwd: Path | None = None,
               timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a one-shot superd command (check, ...) and capture its output."""
    return subprocess.run([sys.executable, "-m", "superd", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def tcp_exchange(port: int, data: bytes = b"", host: str = "127.0.0.1",
                 timeout: float = 5.0, shutdown: bool = True,
                 source: str | None = None) -> bytes:
    """Connect, send *data*, half-close, read until EOF."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        if source:
            s.bind((source, 0))
        s.connect((host, port))
        if data:
            s.sendall(data)
        if shutdown:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def script(tmp_path: Path, name: str, body: str) -> Path:
    """Write an executable shell script that anyone (nobody too) can run."""
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    os.chmod(path, 0o755)
    return path
