"""The spawn hot path is pinned by the syscalls it makes, not by timing.

superd starts programs through its C extension, which clones with
CLONE_VM|CLONE_VFORK (no copy of the daemon's page tables), also when the
program runs as another user (the child switches its own ids).  A
regression to fork() would show up here as a clone without CLONE_VFORK.
test_privilege_spawn.py pins that the id changes happen in children only.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, tcp_exchange, wait_until

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")


def _trace_daemon(tmp_path: Path, service_extra: str, connections: int = 3) -> str:
    port = free_port()
    cfg = tmp_path / "superd.yaml"
    cfg.write_text(f"""
control: {tmp_path}/control.sock
services:
  hello:
    listen: 127.0.0.1:{port}
    exec: [/bin/echo, hello]
{service_extra}
""")
    os.chmod(cfg, 0o644)
    trace = tmp_path / "trace.txt"
    log = open(tmp_path / "superd.log", "wb")
    proc = subprocess.Popen(
        ["strace", "-f", "-qq", "--seccomp-bpf", "-e", "trace=clone,clone3,fork,vfork",
         "-o", str(trace), sys.executable, "-m", "superd", "run", "-c", str(cfg)],
        stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    daemon = None
    try:
        assert wait_until(lambda: "ready:" in (tmp_path / "superd.log").read_text(), 30)
        found = re.search(r"superd (\d+) ready", (tmp_path / "superd.log").read_text())
        assert found is not None
        daemon = int(found.group(1))
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
        log.close()
    return trace.read_text()


def _clones(trace: str) -> list[str]:
    return [line for line in trace.splitlines()
            if re.search(r"\b(clone3?|v?fork)\(", line) and "resumed" not in line]


@pytest.mark.parametrize("extra", ["    user: nobody", "    user: root"],
                         ids=["user-nobody", "user-root"])
def test_programs_start_with_clone_vfork(tmp_path: Path, extra: str) -> None:
    trace = _trace_daemon(tmp_path, extra)
    clones = _clones(trace)
    assert len(clones) >= 3, trace
    for line in clones:
        assert "CLONE_VFORK" in line, f"a program was started without vfork: {line}"
        assert "CLONE_VM" in line, line
