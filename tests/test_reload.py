"""SIGHUP reload: a diff by name, unchanged listeners never close."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from conftest import free_port, script, tcp_exchange, wait_until


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            inodes.add(target)
    return inodes


def _listener_inode(port: int) -> str:
    """The socket inode listening on 127.0.0.1:port, from /proc/net/tcp."""
    want = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if parts[1] == want and parts[3] == "0A":
            return f"socket:[{parts[9]}]"
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


class Hammer(threading.Thread):
    """Connects to an echo service in a loop, counting every failure."""

    def __init__(self, port: int, seconds: float = 30.0, limit: int = 20000) -> None:
        super().__init__(daemon=True)
        self.port, self.seconds, self.limit = port, seconds, limit
        self.ok = 0
        self.failures: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.seconds
        while not self.halt.is_set() and time.monotonic() < deadline and self.ok < self.limit:
            try:
                payload = f"n{self.ok}".encode()
                if tcp_exchange(self.port, payload, timeout=5) != payload:
                    self.failures.append("wrong reply")
                else:
                    self.ok += 1
            except OSError as e:
                self.failures.append(repr(e))


def test_reload_add_remove_change_while_hammered(superd, tmp_path: Path) -> None:
    steady, gone, changed, added = (free_port() for _ in range(4))
    script(tmp_path, "v1.sh", "echo version-1\n")
    script(tmp_path, "v2.sh", "echo version-2\n")
    base = f"""
    services:
      steady: {{listen: "127.0.0.1:{steady}", internal: echo}}
      changed: {{listen: "127.0.0.1:{changed}", exec: [./v1.sh]}}
    """
    d = superd(base + f"""
      gone: {{listen: "127.0.0.1:{gone}", internal: echo}}
    """)
    assert tcp_exchange(changed) == b"version-1\n"
    assert tcp_exchange(gone, b"x") == b"x"
    inode_before = _listener_inode(steady)

    hammer = Hammer(steady)
    hammer.start()
    assert wait_until(lambda: hammer.ok > 50, 10)
    for round_ in range(5):
        program = "./v2.sh" if round_ % 2 == 0 else "./v1.sh"
        d.reload(f"""
        services:
          steady: {{listen: "127.0.0.1:{steady}", internal: echo}}
          changed: {{listen: "127.0.0.1:{changed}", exec: [{program}]}}
          added: {{listen: "127.0.0.1:{added}", internal: echo}}
        """)
        assert tcp_exchange(changed) == f"version-{2 if round_ % 2 == 0 else 1}\n".encode()
        assert tcp_exchange(added, b"new") == b"new"
        d.reload(base)
    count_at_end = hammer.ok
    assert wait_until(lambda: hammer.ok > count_at_end + 20, 10)
    hammer.halt.set()
    hammer.join(10)

    assert hammer.failures == []
    assert hammer.ok > 100
    # the unchanged service kept the very same listening socket
    assert _listener_inode(steady) == inode_before
    assert inode_before in _socket_inodes(d.pid)
    # the removed and the added-then-removed services are closed
    for port in (gone, added):
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0
    assert d.stop() == 0


def test_broken_reload_keeps_running_configuration(superd, tmp_path: Path) -> None:
    port = free_port()
    good = f"""
    services:
      echo: {{listen: "127.0.0.1:{port}", internal: echo}}
    """
    d = superd(good)
    d.write_config(good + "    oops: [unclosed\n")
    d.reload(expect="reload refused")
    log = d.log()
    assert f"{d.config_path}:" in log
    assert "Traceback" not in log
    assert tcp_exchange(port, b"still here") == b"still here"

    d.write_config(f"""
    services:
      echo: {{listen: "127.0.0.1:{port}", internal: ech}}
      other: {{listen: "127.0.0.1:{free_port()}", exec: [/nonexistent/prog]}}
    """)
    d.reload(expect="reload refused: 2 problem")
    log = d.log()
    assert "internal: 'ech' is not one of" in log
    assert "/nonexistent/prog does not exist" in log
    assert tcp_exchange(port, b"unchanged") == b"unchanged"
    assert d.stop() == 0


def test_reload_moves_service_and_changes_protocol(superd, tmp_path: Path) -> None:
    first, second = free_port(), free_port()
    d = superd(f"""
    services:
      svc: {{listen: "127.0.0.1:{first}", internal: echo}}
    """)
    assert tcp_exchange(first, b"a") == b"a"
    d.reload(f"""
    services:
      svc: {{listen: "127.0.0.1:{second}", internal: echo, protocol: udp}}
    """)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", first)) != 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(5)
        u.sendto(b"dgram", ("127.0.0.1", second))
        assert u.recvfrom(100)[0] == b"dgram"
    assert d.stop() == 0


def test_reload_keeps_running_programs(superd, tmp_path: Path) -> None:
    port = free_port()
    script(tmp_path, "slow.sh", "read line; echo got $line\n")
    d = superd(f"""
    services:
      slow: {{listen: "127.0.0.1:{port}", exec: [./slow.sh]}}
    """)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        assert wait_until(lambda: len(d.children()) == 1)
        d.reload(f"""
        services:
          renamed: {{listen: "127.0.0.1:{free_port()}", internal: echo}}
        """)
        c.sendall(b"after-reload\n")
        assert c.recv(100) == b"got after-reload\n"
    assert wait_until(lambda: d.children() == [])
    assert d.stop() == 0
