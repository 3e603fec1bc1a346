"""A failure is never reported as success (issue 12, finding 12).

Before, a listener that failed to bind at start-up was logged once and
never tried again (the daemon said "ready" with the listeners it had), and
``superd reload`` printed "configuration reloaded" and exited 0 when a new
listener failed to bind.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from conftest import free_port, run_superd, tcp_exchange, wait_until


def _occupy(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", port))
    s.listen(1)
    return s


def test_a_listener_that_failed_to_bind_is_retried_and_said(superd) -> None:
    port, echo = free_port(), free_port()
    holder = _occupy(port)
    try:
        d = superd(f"""
            services:
              late:
                listen: 127.0.0.1:{port}
                internal: echo
              echo:
                listen: 127.0.0.1:{echo}
                internal: echo
            """)
        d.wait_log(rf"late: cannot listen on 127.0.0.1:{port}/tcp: .*; retrying")
        assert "ready: 2 services, 1 listeners (1 failed to bind, retrying)" in d.log()
        status = run_superd("status", "-c", str(d.config_path))
        assert status.returncode == 0, status.stderr
        row = next(line for line in status.stdout.splitlines() if line.startswith("late "))
        assert "failed to bind, retrying" in row, status.stdout
        assert tcp_exchange(echo, b"up") == b"up"
    finally:
        holder.close()
    d.wait_log(rf"late: now listening on 127.0.0.1:{port}/tcp", timeout=15)
    assert tcp_exchange(port, b"late") == b"late"


def test_reload_exits_1_and_names_the_listener_that_failed(superd) -> None:
    port, echo = free_port(), free_port()
    d = superd(f"""
        services:
          echo:
            listen: 127.0.0.1:{echo}
            internal: echo
        """)
    holder = _occupy(port)
    try:
        d.write_config(f"""
            services:
              echo:
                listen: 127.0.0.1:{echo}
                internal: echo
              late:
                listen: 127.0.0.1:{port}
                internal: echo
            """)
        result = run_superd("reload", "-c", str(d.config_path))
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert f"late: cannot listen on 127.0.0.1:{port}/tcp" in result.stderr
        assert "configuration reloaded, but 1 listener(s) failed to bind" in result.stderr
        assert tcp_exchange(echo, b"still") == b"still"
    finally:
        holder.close()
    assert wait_until(lambda: "late: now listening" in d.log(), 15), d.log()


no_syslog = pytest.mark.skipif(os.path.exists("/dev/log"),
                               reason="a syslog listens on /dev/log here")


@no_syslog
def test_syslog_target_without_syslog_warns_once_and_logs_to_stderr(superd) -> None:
    """Before, every log line printed a logging traceback of its own."""
    echo = free_port()
    d = superd(f"""
        log: {{target: syslog}}
        services:
          echo:
            listen: 127.0.0.1:{echo}
            internal: echo
        """)
    for _ in range(3):
        assert tcp_exchange(echo, b"x") == b"x"
    d.reload()
    log = d.log()
    assert log.count("no syslog listens on /dev/log here; logging to stderr") == 1, log
    assert "Traceback" not in log and "--- Logging error ---" not in log, log
    assert "reloaded:" in log


@no_syslog
def test_daemon_mode_with_nowhere_to_log_is_refused(tmp_path: Path) -> None:
    """Before, --daemon without a log file logged to a syslog that was not
    there: every line was lost without a word."""
    echo = free_port()
    config = tmp_path / "superd.yaml"
    config.write_text(f"control: {tmp_path}/control.sock\nservices:\n"
                      f"  echo: {{listen: '127.0.0.1:{echo}', internal: echo}}\n")
    os.chmod(config, 0o644)
    result = run_superd("run", "--daemon", "--pidfile", str(tmp_path / "superd.pid"),
                        "-c", str(config), timeout=30)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "no syslog listens on /dev/log" in result.stderr
    assert "log: {file: PATH}" in result.stderr
    assert not (tmp_path / "superd.pid").exists()


def test_a_failing_program_is_a_warning_and_a_clean_exit_is_not(superd, tmp_path: Path) -> None:
    """Issue 16, finding 11: a program's non-zero exit was logged at info, so
    ``log: {level: warning}`` hid every failing program."""
    from conftest import script

    fails, works = free_port(), free_port()
    script(tmp_path, "fails.sh", "exit 3\n")
    d = superd(f"""
        log: {{level: warning}}
        services:
          fails:
            listen: 127.0.0.1:{fails}
            exec: [{tmp_path}/fails.sh]
          works:
            listen: 127.0.0.1:{works}
            exec: [/bin/echo, fine]
        """, ready=False)
    assert wait_until(lambda: d.proc.poll() is not None or _listening(works), 15), d.log()
    assert tcp_exchange(works) == b"fine\n"
    assert tcp_exchange(fails) == b""
    log = d.wait_log(r"warning: fails\[\d+\] 127\.0\.0\.1:\d+: exit 3 after")
    assert "works[" not in log, log


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_a_log_file_target_without_a_file_is_refused(tmp_path: Path) -> None:
    """Found while writing docs/: ``log: {target: file}`` with no ``file:`` was
    accepted and logged to stderr (under --daemon: nowhere)."""
    config = tmp_path / "superd.yaml"
    config.write_text(f"control: {tmp_path}/control.sock\n"
                      "log: {level: info, target: file}\nservices: {}\n")
    os.chmod(config, 0o644)
    result = run_superd("check", "-c", str(config))
    assert result.returncode == 1, result.stdout + result.stderr
    assert (f"{config}:2:28: log.target: file needs log.file: PATH (where the log goes); "
            "without it every line would be lost") in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
