"""What users of the command line expect: ``--version``, ``superd stop``, help
with a description and an example, a Ctrl-C that says what it waits for, and
``status``/``reload``/``stop`` that say which daemon answered and refuse to
act on a daemon that runs another file than ``-c FILE``.

Every daemon here is real (``python -m superd run``), on loopback ports and
control sockets under tmp_path; every one is stopped by its pid.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import Superd, default_user, free_port, run_superd, wait_until

from superd import cli

Start = Callable[..., Superd]


# --- helpers -------------------------------------------------------------


def _sleeper(port: int, stop_timeout: int) -> str:
    return f"""
        stop_timeout: {stop_timeout}
        services:
          nap:
            listen: 127.0.0.1:{port}
            exec: [/bin/sleep, "30"]
        """


def _clients(d: Superd, port: int, count: int) -> list[socket.socket]:
    """*count* connected clients, each with its running program."""
    clients = [socket.create_connection(("127.0.0.1", port), timeout=10)
               for _ in range(count)]
    assert wait_until(lambda: len(d.children()) == count), d.log()
    return clients


def _other_file(tmp_path: Path, control: Path, name: str = "b") -> Path:
    """A second configuration file, in its own directory, naming *control*."""
    directory = tmp_path / name
    directory.mkdir(mode=0o755)
    path = directory / "superd.yaml"
    path.write_text(default_user(f"control: {control}\nservices: {{}}\n"))
    os.chmod(path, 0o644)
    return path


def _status(config: Path | str) -> dict[str, Any]:
    proc = run_superd("status", "-c", str(config), "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert isinstance(rep, dict)
    return rep


def _ask(path: Path, request: dict[str, Any]) -> dict[str, Any]:
    """One raw request on the control socket; the daemon's reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    reply = json.loads(data)
    assert isinstance(reply, dict)
    return reply


# --- --version and --help ------------------------------------------------


def test_version_comes_from_the_package_metadata() -> None:
    proc = run_superd("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"superd {importlib.metadata.version('superd')}\n"


def test_version_without_package_metadata_falls_back() -> None:
    """Run from a checkout that was never installed: the module's version."""
    import superd

    assert cli.package_version("superd-no-such-distribution") == superd.__version__


def _subcommands() -> list[str]:
    parser = cli._parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(action.choices)  # type: ignore[attr-defined]


@pytest.mark.parametrize("command", _subcommands())
def test_each_subcommand_help_has_a_description_and_an_example(command: str) -> None:
    proc = run_superd(command, "--help")
    assert proc.returncode == 0, proc.stderr
    usage, _, rest = proc.stdout.partition("\n\n")
    assert usage.startswith(f"usage: superd {command}"), proc.stdout
    description = rest.split("\n\n", 1)[0]
    assert not description.startswith(("positional arguments:", "options:")), proc.stdout
    assert len(description.split()) >= 5, description
    example = re.search(r"^examples?:\n((?:  .*\n?)+)", proc.stdout, re.MULTILINE)
    assert example, proc.stdout
    assert f"superd {command}" in example.group(1), example.group(1)


def test_top_level_help_lists_stop_and_version() -> None:
    proc = run_superd("--help")
    assert proc.returncode == 0, proc.stderr
    assert "--version" in proc.stdout
    assert re.search(r"^    stop\s+\S", proc.stdout, re.MULTILINE), proc.stdout


# --- superd stop ---------------------------------------------------------


def test_stop_stops_the_daemon_after_its_programs_get_stop_timeout(
        superd: Start, tmp_path: Path) -> None:
    port = free_port()
    d = superd(_sleeper(port, 1))
    clients = _clients(d, port, 1)
    try:
        proc = run_superd("stop", "-c", str(d.config_path))
        assert proc.returncode == 0, proc.stdout + proc.stderr + d.log()
        assert d.proc is not None and d.proc.poll() is not None, "stop returned too early"
        assert d.proc.returncode == 0
        assert proc.stdout.splitlines() == [
            f"superd: stopping superd {d.pid} ({d.config_path}): waiting up to 1 s for "
            "1 program; `superd stop` again stops them now",
            f"superd: superd {d.pid} stopped",
        ], proc.stdout
        log = d.log()
        assert "stop requested on the control socket: closing listeners" in log
        assert "waiting up to 1 s for 1 program; superd stop again stops them now" in log
        assert "stop_timeout: sending SIGTERM to 1 program(s)" in log
        assert log.rstrip().endswith("superd stopped"), log
        assert not (tmp_path / "control.sock").exists()
        assert clients[0].recv(10) == b""  # the program is gone: its socket closed
    finally:
        for c in clients:
            c.close()


def test_stop_an_idle_daemon_and_then_nothing_runs(superd: Start, tmp_path: Path) -> None:
    d = superd("services: {}\n")
    proc = run_superd("stop", "-c", str(d.config_path))
    assert proc.returncode == 0, proc.stderr + d.log()
    assert proc.stdout == (f"superd: stopping superd {d.pid} ({d.config_path})\n"
                           f"superd: superd {d.pid} stopped\n")
    assert d.proc is not None and d.proc.poll() == 0
    assert "superd stopped" in d.log()
    again = run_superd("stop", "-c", str(d.config_path))
    assert again.returncode == 1, again.stdout
    assert "not running" in again.stderr and "Traceback" not in again.stderr


def test_a_second_stop_stops_the_programs_now(superd: Start, tmp_path: Path) -> None:
    port = free_port()
    d = superd(_sleeper(port, 600))
    clients = _clients(d, port, 2)
    try:
        # the first stop waits for the programs; ask it from the side
        assert _ask(tmp_path / "control.sock", {"command": "stop"})["ok"] is True
        d.wait_log("waiting up to 600 s for 2 programs; superd stop again stops them now")
        assert d.proc is not None and d.proc.poll() is None
        proc = run_superd("stop", "-c", str(d.config_path))
        assert proc.returncode == 0, proc.stdout + proc.stderr + d.log()
        assert proc.stdout.splitlines()[0] == (
            f"superd: superd {d.pid} was already stopping; its 2 programs get SIGTERM now")
        assert d.proc.poll() == 0
        assert "stop requested on the control socket again: stopping 2 programs now" in d.log()
    finally:
        for c in clients:
            c.close()


# --- Ctrl-C --------------------------------------------------------------


def test_first_ctrl_c_says_what_it_waits_for_and_a_second_stops_now(
        superd: Start, tmp_path: Path) -> None:
    port = free_port()
    d = superd(_sleeper(port, 600))
    clients = _clients(d, port, 2)
    try:
        programs = d.children()
        os.kill(d.pid, signal.SIGINT)
        d.wait_log(r"waiting up to 600 s for 2 programs; Ctrl-C again stops them now")
        assert d.proc is not None and d.proc.poll() is None, "the first Ctrl-C waits"
        assert sorted(d.children()) == sorted(programs)
        os.kill(d.pid, signal.SIGINT)
        assert d.proc.wait(15) == 0, d.log()  # long before the 600 s (or sleep's 30 s)
        assert "SIGINT again: stopping 2 programs now" in d.log()
        for c in clients:
            assert c.recv(10) == b""
    finally:
        for c in clients:
            c.close()


def test_one_program_is_one_program(superd: Start, tmp_path: Path) -> None:
    port = free_port()
    d = superd(_sleeper(port, 600))
    clients = _clients(d, port, 1)
    try:
        os.kill(d.pid, signal.SIGTERM)
        d.wait_log(r"waiting up to 600 s for 1 program; SIGTERM again stops them now")
        os.kill(d.pid, signal.SIGTERM)
        assert d.proc is not None and d.proc.wait(15) == 0, d.log()
    finally:
        for c in clients:
            c.close()


# --- which daemon answered ----------------------------------------------


def test_status_shows_the_daemons_pid_and_file(superd: Start, tmp_path: Path) -> None:
    d = superd("services: {}\n")
    real = str(d.config_path)  # absolute, as the daemon was started
    rep = _status(d.config_path)
    assert (rep["pid"], rep["config"]) == (d.pid, real)
    assert rep["control"] == str(tmp_path / "control.sock")
    assert rep["protocol"] == 2
    text = run_superd("status", "-c", str(d.config_path))
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[0].startswith(f"superd {d.pid}: up ")
    assert text.stdout.splitlines()[0].endswith(f", config {real}")
    assert text.stderr == ""

    # the same file by another name (a relative path, a symlink): no note
    link = tmp_path / "link.yaml"
    link.symlink_to(d.config_path)
    for name in ("superd.yaml", str(link)):
        proc = run_superd("status", "-c", name, cwd=tmp_path)
        assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr


def test_status_through_another_file_says_which_daemon_answered(
        superd: Start, tmp_path: Path) -> None:
    d = superd("services: {}\n")
    other = _other_file(tmp_path, tmp_path / "control.sock")
    proc = run_superd("status", "-c", str(other))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].endswith(f", config {d.config_path}")
    assert proc.stderr == (f"superd: note: the superd answering on {tmp_path}/control.sock "
                           f"(pid {d.pid}) runs {d.config_path}, not {other}\n")


@pytest.mark.parametrize(("command", "verb"), [("reload", "reloading"), ("stop", "stopping")])
def test_reload_and_stop_refuse_a_daemon_running_another_file(
        superd: Start, tmp_path: Path, command: str, verb: str) -> None:
    d = superd("services: {}\n")
    sock = tmp_path / "control.sock"
    other = _other_file(tmp_path, sock)
    proc = run_superd(command, "-c", str(other))
    assert proc.returncode == 1, proc.stdout
    assert proc.stdout == ""
    assert proc.stderr == (
        f"superd: not {verb}: the superd answering on {sock} (pid {d.pid}) runs "
        f"{d.config_path}, not {other}\n"
        f"superd: give -c {d.config_path} to reach that daemon, or --any-config to "
        f"{command} it anyway\n"), proc.stderr
    assert d.proc is not None and d.proc.poll() is None
    assert "reloading" not in d.log() and "stop requested" not in d.log()

    # the override acts on the daemon behind the socket, and says which one
    proc = run_superd(command, "-c", str(other), "--any-config")
    assert proc.returncode == 0, proc.stderr + d.log()
    if command == "reload":
        assert proc.stdout == (f"superd: superd {d.pid} reloaded {d.config_path}\n")
        d.wait_log(rf"reloading {re.escape(str(d.config_path))}")
    else:
        assert proc.stdout.splitlines()[-1] == f"superd: superd {d.pid} stopped"
        assert d.proc.poll() == 0


def test_the_daemon_itself_refuses_a_request_meant_for_another_file(
        superd: Start, tmp_path: Path) -> None:
    """The check is in the daemon too, so no window lets another daemon act."""
    d = superd("services: {}\n")
    sock = tmp_path / "control.sock"
    for command in ("reload", "stop"):
        reply = _ask(sock, {"command": command, "protocol": 2,
                            "config": "/etc/elsewhere.yaml"})
        assert reply == {"ok": False, "wrong_config": True, "protocol": 2, "pid": d.pid,
                         "config": str(d.config_path),
                         "error": f"superd {d.pid} runs {d.config_path}, "
                                  "not /etc/elsewhere.yaml"}
    for bad in ({"config": 42}, {"config": ""}, {"protocol": "2"}, {"protocol": 0}):
        reply = _ask(sock, {"command": "reload", **bad})
        assert reply["ok"] is False and reply["error"].startswith("bad request"), reply
    assert d.proc is not None and d.proc.poll() is None
    assert "reloading" not in d.log()

    # the same file by a name with a symlink in it
    link = tmp_path / "link"
    link.symlink_to(tmp_path, target_is_directory=True)
    reply = _ask(sock, {"command": "reload", "protocol": 2,
                        "config": str(link / "superd.yaml")})
    assert (reply["ok"], reply["pid"], reply["protocol"]) == (True, d.pid, 2), reply
    # a client of protocol 1 (no "protocol", no "config") gets the replies it always got
    assert _ask(sock, {"command": "reload"}) == {"ok": True, "applied": True, "errors": []}
    d.wait_log("reloaded", 2)
    status = _ask(sock, {"command": "status"})
    assert "protocol" not in status and status["pid"] == d.pid


@pytest.mark.parametrize("same", [True, False], ids=["same-file", "other-file"])
def test_the_file_is_also_checked_with_a_daemon_of_protocol_1(
        tmp_path: Path, same: bool) -> None:
    """A superd from before the check ignores "config" in a request, but its
    status report always named its pid and file: the client asks that first."""
    config = tmp_path / "superd.yaml"
    config.write_text(f"control: {tmp_path}/control.sock\nservices: {{}}\n")
    os.chmod(config, 0o644)
    theirs = config if same else tmp_path / "elsewhere.yaml"
    with _protocol_1_daemon(tmp_path / "control.sock", theirs) as heard:
        proc = run_superd("reload", "-c", str(config))
    if same:
        assert proc.returncode == 0, proc.stderr
        assert [r["command"] for r in heard] == ["status", "reload"]
        assert proc.stdout == f"superd: superd 4242 reloaded {config}\n"
    else:
        assert proc.returncode == 1, proc.stdout
        assert [r["command"] for r in heard] == ["status"], "reload was sent"
        assert f"(pid 4242) runs {theirs}, not {config}" in proc.stderr


@contextmanager
def _protocol_1_daemon(path: Path, config: Path) -> Iterator[list[dict[str, Any]]]:
    """A control socket that answers as superd 0.1.0 did (pid 4242 running
    *config*), and the requests it heard."""
    heard: list[dict[str, Any]] = []
    done = threading.Event()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    os.chmod(path, 0o600)
    server.listen(4)
    server.settimeout(0.1)

    def serve() -> None:
        for _ in range(300):  # at most 30 s
            if done.is_set():
                return
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                request = json.loads(conn.makefile("rb").readline())
                heard.append(request)
                reply: dict[str, Any] = {"ok": True, "applied": True, "errors": []}
                if request["command"] == "status":
                    reply = {"ok": True, "pid": 4242, "config": str(config), "uptime": 1.0,
                             "active": 0, "max_connections": 1024, "reloads": {},
                             "services": []}
                conn.sendall(json.dumps(reply).encode() + b"\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield heard
    finally:
        done.set()
        thread.join(10)
        server.close()
