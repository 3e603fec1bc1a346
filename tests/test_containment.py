"""A handler that raises costs what it owns, never the loop (issue 12, 1 and 2).

Before, ``loop._dispatch`` logged the exception and went on with the
descriptor still registered and readable: the same handler ran again at
once, for ever.  One ``PROXY\\r\\n`` from a balancer produced thousands of
tracebacks a second until ``proxy_timeout``.

The daemon-level test sends that header to the real daemon.  The others
drive the real ``Daemon._dispatch`` over real descriptors with handlers that
raise, since no known input makes a handler raise any more.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import time
from pathlib import Path

import pytest
from conftest import free_port, wait_until

from superd import config as configmod
from superd.guard import RETRY_SECONDS, Handler
from superd.loop import Daemon
from superd.pending import Pending
from superd.timers import Timers


def test_a_proxy_line_without_protocol_is_refused_at_once(superd) -> None:
    port = free_port()
    d = superd(f"""
        services:
          web:
            listen: 127.0.0.1:{port}
            exec: [/bin/echo, hello]
            proxy_protocol: v1
            proxy_from: [127.0.0.1]
            proxy_timeout: 60
        """)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(b"PROXY\r\n")
        try:
            data = s.recv(100)
        except ConnectionResetError:
            data = b""
        assert data == b"", "the connection must be closed, not held to proxy_timeout"
    d.wait_log(r"v1 header names no protocol")
    log = d.log()
    assert "Traceback" not in log and "internal error" not in log, log
    assert len(log.splitlines()) < 10, log


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def daemon(tmp_path: Path) -> Daemon:
    cfg = tmp_path / "superd.yaml"
    cfg.write_text(f"control: {tmp_path}/control.sock\nservices: {{}}\n")
    os.chmod(cfg, 0o644)
    d = Daemon(str(cfg), configmod.load(str(cfg)))
    d.timers = Timers(Clock())
    return d


def _one_round(d: Daemon) -> int:
    """One pass of the loop over what is ready now; how many handlers ran."""
    ready = d.selector.select(0)
    for key, events in ready:
        d._dispatch(key, events)
    return len(ready)


class Session:
    """A handler that owns a connection and has a bug."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.calls = 0
        self.closed = 0

    def __call__(self, events: int) -> None:
        self.calls += 1
        raise ValueError("a bug")

    def close(self) -> None:
        self.closed += 1
        self.sock.close()


def test_a_raising_session_is_closed_and_runs_once(daemon: Daemon, caplog) -> None:
    a, b = socket.socketpair()
    fd = a.fileno()
    session = Session(a)
    daemon.selector.register(a, selectors.EVENT_READ, session)
    b.sendall(b"readable forever")
    with caplog.at_level(logging.ERROR):
        for _ in range(50):
            _one_round(daemon)
    assert (session.calls, session.closed) == (1, 1)
    assert a.fileno() == -1 and daemon.selector.get_map().get(fd) is None
    assert sum(daemon.internal_errors.values()) == 1
    assert [r.exc_info is not None for r in caplog.records] == [True]
    b.close()


def test_a_plain_function_is_paused_then_watched_again(daemon: Daemon) -> None:
    a, b = socket.socketpair()
    calls = []

    def buggy(events: int) -> None:
        calls.append(events)
        raise KeyError("a bug")

    daemon.selector.register(a, selectors.EVENT_READ, buggy)
    b.sendall(b"x")
    for _ in range(50):
        _one_round(daemon)
    assert len(calls) == 1 and daemon.selector.get_map().get(a.fileno()) is None
    daemon.timers.clock.now += RETRY_SECONDS  # type: ignore[attr-defined]
    daemon.timers.run_due()
    assert daemon.selector.get_map()[a.fileno()].data is buggy  # not lost
    _one_round(daemon)
    assert len(calls) == 2 and sum(daemon.internal_errors.values()) == 2
    a.close()
    b.close()


def test_a_handler_with_failed_decides(daemon: Daemon) -> None:
    a, b = socket.socketpair()
    said = []

    def run(events: int) -> None:
        raise RuntimeError("a bug")

    def failed() -> None:
        said.append("failed")
        daemon.selector.unregister(a)

    daemon.selector.register(a, selectors.EVENT_READ, Handler(run, failed))
    b.sendall(b"x")
    for _ in range(10):
        _one_round(daemon)
    assert said == ["failed"]
    daemon.timers.clock.now += 60  # type: ignore[attr-defined]
    daemon.timers.run_due()
    assert daemon.selector.get_map().get(a.fileno()) is None  # its owner chose to drop it
    a.close()
    b.close()


def test_a_pending_connection_whose_callback_raises_is_refused(daemon: Daemon) -> None:
    a, b = socket.socketpair()
    refused: list[str] = []

    def done(pending: Pending, header: object) -> None:
        raise ValueError("a bug after the header")

    def fail(pending: Pending, why: str) -> None:
        refused.append(why)
        pending.conn.close()

    Pending(a, None, "v1", 30, daemon.selector, daemon.timers, done, fail)
    b.sendall(b"PROXY UNKNOWN\r\n")
    deadline = time.monotonic() + 5
    while not refused and time.monotonic() < deadline:
        _one_round(daemon)
    assert refused == ["internal error while reading the PROXY header"]
    assert wait_until(lambda: b.recv(10) == b"", 5)
    b.close()


def test_a_storm_of_malformed_proxy_headers_pauses_the_listener(superd) -> None:
    """Finding 1's storm (overload goal): a host in proxy_from that sends
    malformed headers as fast as it can connects no faster than the daemon
    will refuse them.  Past PROXY_ERRORS_PER_SECOND on one listener the
    listener is paused for a second, said once; then it serves again."""
    from conftest import run_superd

    from superd.accept import PROXY_ERRORS_PER_SECOND
    port = free_port()
    d = superd(f"""
        services:
          web:
            listen: 127.0.0.1:{port}
            exec: [/bin/echo, hello]
            proxy_protocol: v1
            proxy_from: [127.0.0.1]
        """)
    storm = PROXY_ERRORS_PER_SECOND + 30
    socks = []
    try:
        for _ in range(storm):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"PROXY\r\n")
            socks.append(s)
        d.wait_log(r"web: over \d+ malformed PROXY headers a second .*pausing it")
        status = run_superd("status", "-c", str(d.config_path))
        assert status.returncode == 0, status.stderr
        row = next(line for line in status.stdout.splitlines() if line.startswith("web "))
        assert "malformed PROXY" in row, status.stdout
        for s in socks:  # all refused in the end: closed without a byte
            try:
                assert s.recv(16) == b""
            except ConnectionResetError:
                pass
    finally:
        for s in socks:
            s.close()
    # after the pause an honest header is served
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"PROXY TCP4 192.0.2.1 127.0.0.1 4000 80\r\n")
        assert s.recv(16) == b"hello\n"
    log = d.log()
    assert log.count("pausing it") == 1, log
    assert "Traceback" not in log, log


def _free_fds_below(limit: int) -> int:
    free = 0
    for fd in range(limit):
        try:
            os.fstat(fd)
        except OSError:
            free += 1
    return free


def test_a_start_failure_backs_off_only_for_its_own_errno(tmp_path: Path) -> None:
    """Issue 12, finding 14: the backoff for running out of descriptors
    rested on ``last_spawn_errno``, which nothing cleared, so an old EMFILE
    could pause a listener for an unrelated failure.  Now the decision rests
    on the failure in hand.  Real listener, real client, real spawns (a
    program the kernel cannot run: ENOEXEC), a real EMFILE from a lowered
    RLIMIT_NOFILE; the loop's timers run on a clock this test moves."""
    import resource

    from superd.guard import BACKOFF_SECONDS
    from superd.listeners import State

    program = tmp_path / "not-a-program"
    program.write_bytes(b"\x00\x01 neither ELF nor a script\n")
    os.chmod(program, 0o755)
    port = free_port()
    cfg = tmp_path / "superd.yaml"
    user = "    user: root\n" if os.geteuid() == 0 else ""
    cfg.write_text(f"control: {tmp_path}/control.sock\nservices:\n  bad:\n"
                   f"    listen: 127.0.0.1:{port}\n    exec: [{program}]\n{user}")
    os.chmod(cfg, 0o644)
    d = Daemon(str(cfg), configmod.load(str(cfg)))
    d.timers = Timers(Clock())
    d._apply(d.config)
    [listener] = d.listeners.values()
    clients: list[socket.socket] = []

    def connect() -> None:
        clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))

    def serve() -> None:
        deadline = time.monotonic() + 5
        before = d.stats["bad"].spawn_failures
        while d.stats["bad"].spawn_failures == before and time.monotonic() < deadline:
            _one_round(d)

    try:
        # 1. out of descriptors: room for the accepted connection, none for the pidfd
        connect()  # before the limit: the client lives in this process too
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = next(n for n in range(3, soft) if _free_fds_below(n) == 1)
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        try:
            serve()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert d.stats["bad"].spawn_failures == 1
        assert listener.state == State.BACKOFF
        d.timers.clock.now += BACKOFF_SECONDS  # type: ignore[attr-defined]
        d.timers.run_due()
        assert listener.state == State.LISTENING
        # 2. the program cannot run: the client is closed, the listener goes on
        connect()
        serve()
        assert d.stats["bad"].spawn_failures == 2
        assert listener.state == State.LISTENING
        for c in clients:
            assert c.recv(10) == b""
    finally:
        for c in clients:
            c.close()
        for lst in d.listeners.values():
            lst.sock.close()
