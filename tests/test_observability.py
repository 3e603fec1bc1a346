"""Watching superd: ``superd status``/``reload``, the control socket, metrics, logs.

Every daemon here is real (``python -m superd run``) and every client is a
real socket on 127.0.0.0/8; the expected numbers come from traffic the test
itself makes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    ROOT,
    TEST_USER,
    Superd,
    free_port,
    needs_root,
    run_superd,
    script,
    tcp_exchange,
    wait_until,
)
from prometheus_client.parser import text_string_to_metric_families

StartSuperd = Callable[..., Superd]
NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"  # readable by nobody, unlike a python under /root


# --- helpers -------------------------------------------------------------


def _status(d: Superd) -> dict[str, Any]:
    proc = run_superd("status", "-c", str(d.config_path), "--json")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(proc.stdout)
    assert isinstance(rep, dict)
    return rep


def _service(rep: dict[str, Any], name: str) -> dict[str, Any]:
    for svc in rep["services"]:
        if svc["name"] == name:
            assert isinstance(svc, dict)
            return svc
    raise AssertionError(f"no service {name!r} in {rep}")


def _connect(port: int, source: str, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def _name(s: socket.socket) -> str:
    host, port = s.getsockname()
    return f"{host}:{port}"


def _refused_by_server(port: int, source: str) -> bytes:
    """Connect from *source*; what the server sends before closing (b"" if nothing)."""
    with _connect(port, source) as s:
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
        return data


def _columns(header: str) -> list[int]:
    """Start offsets of the header's column names (names have no spaces)."""
    return [m.start() for m in re.finditer(r"\S+", header)]


def _cells(row: str, starts: list[int]) -> list[str]:
    ends = [*starts[1:], len(row) + 1]
    return [row[a:b].strip() for a, b in zip(starts, ends, strict=True)]


def _get(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    """HTTP GET on 127.0.0.1:port: (status, content type, body)."""
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(port: int) -> Samples:
    code, ctype, body = _get(port)
    assert code == 200, body
    assert ctype.startswith("text/plain; version=0.0.4"), ctype
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def _val(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _as_nobody(code: str, *args: str,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python3 -c CODE ARGS`` as nobody (uid and gid 65534, no groups)."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip(f"{SYSTEM_PYTHON} is needed to run a client as nobody")
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         SYSTEM_PYTHON, *(["-I"] if env is None else []), "-c", code, *args],
        capture_output=True, text=True, timeout=30, env=env, cwd="/")


# A raw control client: connect, send one request, read the reply to EOF.
# Prints {"connect_errno": N} or {"reply": TEXT, "reset": bool, "epipe": bool}.
RAW_CLIENT = textwrap.dedent("""\
    import json, socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    try:
        s.connect(sys.argv[1])
    except OSError as e:
        print(json.dumps({"connect_errno": e.errno}))
        sys.exit(0)
    data, reset, epipe = b"", False, False
    try:
        s.sendall(sys.argv[2].encode() + b"\\n")
    except BrokenPipeError:
        epipe = True
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except ConnectionResetError:
        reset = True
    print(json.dumps({"reply": data.decode(), "reset": reset, "epipe": epipe}))
""")


def _start_plain(config: Path, log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``superd run`` with stderr on *log* (opened here, so its inode is known)."""
    with open(log, "ab") as logf:
        return subprocess.Popen([sys.executable, "-m", "superd", "run", "-c", str(config)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=logf, env=env)


@contextmanager
def _running(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)


# --- 1. superd status ------------------------------------------------------


def test_status_json_and_table_with_live_connections(superd: StartSuperd,
                                                     tmp_path: Path) -> None:
    hold = script(tmp_path, "hold.sh", "cat >/dev/null\n")
    p_hold, p_off, p_taken = free_port(), free_port(), free_port()
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blocker.bind(("127.0.0.1", p_taken))
    blocker.listen(1)
    clients: list[socket.socket] = []
    try:
        d = superd(f"""
            services:
              hold:
                listen: 127.0.0.1:{p_hold}
                exec: [{hold}]
                deny: [127.0.0.9]
              off:
                listen: 127.0.0.1:{p_off}
                exec: [/bin/cat]
                enabled: false
              taken:
                listen: 127.0.0.1:{p_taken}
                exec: [/bin/cat]
            """)
        d.wait_log(rf"taken: cannot listen on 127\.0\.0\.1:{p_taken}")
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            clients.append(_connect(p_hold, source))
        assert _refused_by_server(p_hold, "127.0.0.9") == b""
        assert wait_until(lambda: len(d.children()) == 3), d.log()
        assert wait_until(lambda: _service(_status(d), "hold")["rejected"] == {"denied": 1})
        time.sleep(0.05)  # let the connections age a little

        rep = _status(d)
        assert rep["ok"] is True
        assert rep["pid"] == d.pid
        assert rep["config"] == str(d.config_path)
        assert rep["active"] == 3
        assert rep["max_connections"] == 1024
        assert rep["uptime"] > 0
        svc = _service(rep, "hold")
        assert svc["state"] == "listening"
        assert svc["protocol"] == "tcp"
        assert svc["program"] == str(hold)
        assert [x["address"] for x in svc["listeners"]] == [f"127.0.0.1:{p_hold}/tcp"]
        assert svc["accepted"] == 3
        assert svc["active"] == 3
        assert svc["rejected"] == {"denied": 1}
        assert svc["spawn_failures"] == 0
        assert svc["exits"] == {}
        conns = svc["connections"]
        assert sorted(c["pid"] for c in conns) == sorted(d.children())
        mine = {_name(c) for c in clients}
        assert {c["client"] for c in conns} == mine
        assert len(conns) == 3
        for c in conns:
            assert c["age"] > 0
            assert isinstance(c["cpu"], float | int) and c["cpu"] >= 0
            assert isinstance(c["rss"], int) and c["rss"] > 0

        off = _service(rep, "off")
        assert off["state"] == "disabled"
        assert off["listeners"] == [] and off["connections"] == []
        taken = _service(rep, "taken")
        assert taken["state"] == "failed to bind, retrying"
        assert taken["listeners"] == []

        # the same report as a table
        proc = run_superd("status", "-c", str(d.config_path))
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert re.fullmatch(rf"superd {d.pid}: up \S+, 3 of 1024 connections, config "
                            + re.escape(str(d.config_path)), lines[0]), lines[0]
        header = lines[1]
        assert header.split() == ["SERVICE", "STATE", "LISTEN", "ACTIVE", "ACCEPTED",
                                  "REFUSED", "FAILED", "EXITS"]
        starts = _columns(header)
        rows = {_cells(r, starts)[0]: _cells(r, starts) for r in lines[2:5]}
        assert rows["hold"] == ["hold", "listening", f"127.0.0.1:{p_hold}/tcp", "3", "3",
                                "denied=1", "0", "-"]
        assert rows["off"] == ["off", "disabled", "-", "0", "0", "0", "0", "-"]
        assert rows["taken"] == ["taken", "failed to bind, retrying", "-", "0", "0", "0", "0", "-"]
        assert lines[5] == ""
        cheader = lines[6]
        assert cheader.split() == ["SERVICE", "PID", "CLIENT", "AGE", "CPU", "RSS"]
        cstarts = _columns(cheader)
        crows = [_cells(r, cstarts) for r in lines[7:]]
        assert len(crows) == 3
        assert {int(r[1]) for r in crows} == set(d.children())
        assert {r[2] for r in crows} == mine
        for r in crows:
            assert r[0] == "hold"
            assert re.fullmatch(r"\d+\.\ds", r[3]), r
            assert re.fullmatch(r"\d+\.\d\ds", r[4]), r
            assert re.fullmatch(r"\d+\.\dM", r[5]), r

        # the programs end when their clients hang up
        for c in clients:
            c.close()
        clients.clear()
        assert wait_until(lambda: _service(_status(d), "hold")["exits"] == {"exit 0": 3})
        svc = _service(_status(d), "hold")
        assert svc["active"] == 0 and svc["connections"] == [] and svc["accepted"] == 3
        proc = run_superd("status", "-c", str(d.config_path))
        assert "exit 0=3" in proc.stdout
        assert "CLIENT" not in proc.stdout  # no connections table when there are none
        assert d.stop() == 0
    finally:
        for c in clients:
            c.close()
        blocker.close()


# --- 2. superd reload --------------------------------------------------------


def test_reload_command_good_and_broken_file(superd: StartSuperd, tmp_path: Path) -> None:
    old_port, new_port = free_port(), free_port()
    old = script(tmp_path, "old.sh", "echo old\n")
    new = script(tmp_path, "new.sh", "echo new\n")
    first = f"""
        services:
          old:
            listen: 127.0.0.1:{old_port}
            exec: [{old}]
        """
    d = superd(first)
    assert tcp_exchange(old_port) == b"old\n"

    d.write_config(first + f"""
          new:
            listen: 127.0.0.1:{new_port}
            exec: [{new}]
        """)
    proc = run_superd("reload", "-c", str(d.config_path))
    assert proc.returncode == 0, proc.stderr
    assert "reloaded" in proc.stdout
    assert tcp_exchange(new_port) == b"new\n"
    assert tcp_exchange(old_port) == b"old\n"

    d.write_config(f"""
        services:
          old:
            listen: 127.0.0.1:{old_port}
            exce: [{old}]
        """)
    proc = run_superd("reload", "-c", str(d.config_path))
    assert proc.returncode == 1, proc.stdout
    assert re.search(rf"^{re.escape(str(d.config_path))}:\d+:\d+: .*exce", proc.stderr,
                     re.MULTILINE), proc.stderr
    assert "keeps the running one" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert tcp_exchange(old_port) == b"old\n"
    assert tcp_exchange(new_port) == b"new\n"
    d.wait_log(r"reload refused")
    assert d.stop() == 0


def test_status_and_reload_without_a_daemon(tmp_path: Path) -> None:
    config = tmp_path / "superd.yaml"
    sock_path = tmp_path / "control.sock"
    config.write_text(f"control: {sock_path}\nservices: {{}}\n")
    # first no socket file at all, then a stale one nobody listens on
    for stale in (False, True):
        if stale:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.bind(str(sock_path))
        for args in (("status",), ("status", "--json"), ("reload",)):
            proc = run_superd(*args, "-c", str(config))
            assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
            assert "not running" in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr, proc.stderr
            assert proc.stdout == ""


# --- 3. the control socket -------------------------------------------------


@needs_root("runs control clients as nobody (setpriv)")
def test_control_socket_serves_only_root(superd: StartSuperd, tmp_path: Path) -> None:
    d = superd("services: {}\n")
    path = str(tmp_path / "control.sock")
    assert os.stat(path).st_mode & 0o777 == 0o600

    # mode 0600: nobody cannot even connect
    proc = _as_nobody(RAW_CLIENT, path, json.dumps({"command": "stop"}))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"connect_errno": 13}  # EACCES

    # with the mode opened up, the daemon itself refuses (SO_PEERCRED)
    os.chmod(path, 0o666)
    proc = _as_nobody(RAW_CLIENT, path, json.dumps({"command": "stop"}))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert json.loads(result["reply"]) == {"ok": False, "error": "permission denied"}
    d.wait_log(r"control socket: refused uid 65534")
    assert d.proc is not None and d.proc.poll() is None  # "stop" was not obeyed
    assert _status(d)["ok"] is True

    # `superd status` run as nobody shows the daemon's answer: the reply is sent
    # (the raw client above read it), so the command must not see a reset or EPIPE
    proc = _as_nobody("import sys; from superd.cli import main; sys.exit(main())",
                      "status", "-c", str(d.config_path),
                      env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("superd: permission denied"), proc.stderr


def test_control_stop_command(superd: StartSuperd, tmp_path: Path) -> None:
    d = superd("services: {}\n")
    path = str(tmp_path / "control.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(b'{"command": "stop"}\n')
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert d.proc is not None
    assert d.proc.wait(15) == 0
    d.wait_log(r"stop requested on the control socket")
    assert not os.path.exists(path)  # removed on the way out
    assert json.loads(data or b"null") == {"ok": True}, "no reply to stop"


def test_control_unknown_command_and_bad_request(superd: StartSuperd,
                                                 tmp_path: Path) -> None:
    superd("services: {}\n")
    path = str(tmp_path / "control.sock")

    def ask(raw: bytes) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(raw)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        reply = json.loads(data)
        assert isinstance(reply, dict)
        return reply

    reply = ask(b'{"command": "dance"}\n')
    assert reply["ok"] is False and "unknown command 'dance'" in reply["error"]
    reply = ask(b"[1, 2]\n")
    assert reply["ok"] is False and reply["error"].startswith("bad request")
    reply = ask(b"{not json\n")
    assert reply["ok"] is False and reply["error"].startswith("bad request")


# --- 4. metrics ---------------------------------------------------------------


def test_metrics_values_and_endpoint_moves(superd: StartSuperd, tmp_path: Path) -> None:
    mport, mport2, p_x, p_gone = free_port(), free_port(), free_port(), free_port()
    hello = script(tmp_path, "hello.sh", "echo hello\n")
    gone = script(tmp_path, "gone.sh", "echo never\n")
    services = f"""
        services:
          x:
            listen: 127.0.0.1:{p_x}
            exec: [{hello}]
            deny: [127.0.0.9/32]
          gone:
            listen: 127.0.0.1:{p_gone}
            exec: [{gone}]
        """
    d = superd(f"metrics: 127.0.0.1:{mport}\n" + textwrap.dedent(services))
    gone.unlink()  # loaded fine, cannot start now

    samples = _scrape(mport)
    assert _val(samples, "superd_last_reload_success") == 1.0
    assert not [k for k in samples if k[0] == "superd_reloads_total"]
    assert _val(samples, "superd_listeners") == 2.0

    for _ in range(5):
        assert tcp_exchange(p_x) == b"hello\n"
    for _ in range(2):
        assert _refused_by_server(p_x, "127.0.0.9") == b""
    assert _refused_by_server(p_gone, "127.0.0.1") == b""
    d.wait_log(r"gone: cannot start")
    assert wait_until(lambda: _val(_scrape(mport), "superd_child_exits_total",
                                   service="x", status="exit 0") == 5.0), d.log()

    s = _scrape(mport)
    assert _val(s, "superd_connections_accepted_total", service="x") == 5.0
    assert _val(s, "superd_connections_rejected_total", service="x", reason="denied") == 2.0
    assert _val(s, "superd_spawn_failures_total", service="x") == 0.0
    assert _val(s, "superd_spawn_failures_total", service="gone") == 1.0
    assert _val(s, "superd_health_checks_total", service="x") == 0.0
    assert _val(s, "superd_active_connections", service="x") == 0.0
    assert _val(s, "superd_active_connections", service="gone") == 0.0
    assert [k for k in s if k[0] == "superd_child_exits_total"] == [
        ("superd_child_exits_total", frozenset({("service", "x"), ("status", "exit 0")}))]
    assert _val(s, "superd_connection_duration_seconds_count", service="x") == 5.0
    assert _val(s, "superd_connection_duration_seconds_bucket", service="x", le="+Inf") == 5.0
    assert _val(s, "superd_connection_duration_seconds_count", service="gone") == 0.0
    total = _val(s, "superd_connection_duration_seconds_sum", service="x")
    assert total is not None and total > 0
    buckets = sorted((float(dict(k[1])["le"]), v) for k, v in s.items()
                     if k[0] == "superd_connection_duration_seconds_bucket"
                     and dict(k[1])["service"] == "x")
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    assert _val(s, "superd_listeners") == 2.0

    # the same counters in `superd status`
    rep = _status(d)
    x = _service(rep, "x")
    assert (x["accepted"], x["rejected"], x["exits"]) == (5, {"denied": 2}, {"exit 0": 5})
    assert _service(rep, "gone")["spawn_failures"] == 1

    for path in ("/nope", "/metricsx", "/metrics/extra"):
        code, _, _ = _get(mport, path)
        assert code == 404, path

    # an accepted reload (the program is back: a reload checks it), then a refused one
    script(tmp_path, "gone.sh", "echo never\n")
    d.reload()
    s = _scrape(mport)
    assert _val(s, "superd_reloads_total", result="accepted") == 1.0
    assert _val(s, "superd_last_reload_success") == 1.0
    d.reload("metrics: [oops\n", expect="reload refused")
    s = _scrape(mport)
    assert _val(s, "superd_reloads_total", result="accepted") == 1.0
    assert _val(s, "superd_reloads_total", result="refused") == 1.0
    assert _val(s, "superd_last_reload_success") == 0.0
    assert _val(s, "superd_connections_accepted_total", service="x") == 5.0

    # metrics: moves to another port
    d.reload(f"metrics: 127.0.0.1:{mport2}\n" + textwrap.dedent(services))
    s = _scrape(mport2)
    assert _val(s, "superd_reloads_total", result="accepted") == 2.0
    assert _val(s, "superd_last_reload_success") == 1.0
    assert _val(s, "superd_connections_accepted_total", service="x") == 5.0
    with pytest.raises(urllib.error.URLError) as info:
        _get(mport)
    assert isinstance(info.value.reason, ConnectionRefusedError)
    assert d.stop() == 0


# --- 5. logs --------------------------------------------------------------------


def test_log_connection_end_and_child_stderr(superd: StartSuperd, tmp_path: Path) -> None:
    port = free_port()
    prog = script(tmp_path, "talk.sh", 'echo "pid $$"\necho "oops from the child" >&2\n')
    d = superd(f"""
        services:
          x:
            listen: 127.0.0.1:{port}
            exec: [{prog}]
        """)
    seen: list[tuple[int, str]] = []
    for _ in range(3):
        with _connect(port, "127.0.0.1") as s:
            client = _name(s)
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        m = re.fullmatch(rb"pid (\d+)\n", reply)
        assert m, reply
        seen.append((int(m.group(1)), client))
    text = d.wait_log(r"exit 0 after", 3)
    text = d.wait_log(r"oops from the child", 3)
    ends = [line for line in text.splitlines() if "exit 0 after" in line]
    assert len(ends) == 3, text
    for pid, client in seen:
        mine = [line for line in ends
                if re.search(rf" x\[{pid}\] {re.escape(client)}: exit 0 after \d+\.\d+s$",
                             line)]
        assert len(mine) == 1, (pid, client, text)
        assert re.search(rf"info: x\[{pid}\]: oops from the child$", text, re.MULTILINE), text


def test_log_json_format(superd: StartSuperd, tmp_path: Path) -> None:
    port = free_port()
    prog = script(tmp_path, "talk.sh", 'echo "pid $$"\necho "oops from the child" >&2\n')
    d = superd(f"""
        log: {{format: json}}
        services:
          x:
            listen: 127.0.0.1:{port}
            exec: [{prog}]
            deny: [127.0.0.9]
        """)
    with _connect(port, "127.0.0.3") as s:
        client = _name(s)
        s.shutdown(socket.SHUT_WR)
        reply = s.recv(4096)
    pid = int(reply.split()[1])
    assert _refused_by_server(port, "127.0.0.9") == b""
    d.wait_log(r"exit 0 after")
    d.wait_log(r"oops from the child")
    d.wait_log(r"refused 127\.0\.0\.9")
    assert d.stop() == 0
    entries = [json.loads(line) for line in d.log().splitlines()]
    assert all(isinstance(e, dict) and {"time", "level", "logger", "message"} <= e.keys()
               for e in entries)
    ends = [e for e in entries if "exit 0 after" in e["message"]]
    assert len(ends) == 1, entries
    end = ends[0]
    assert end["level"] == "info"
    assert (end["service"], end["pid"], end["client"], end["status"]) == (
        "x", pid, client, "exit 0")
    assert isinstance(end["duration"], float) and end["duration"] > 0
    stderr_lines = [e for e in entries if "oops from the child" in e["message"]]
    assert len(stderr_lines) == 1
    assert stderr_lines[0]["message"] == f"x[{pid}]: oops from the child"
    assert (stderr_lines[0]["service"], stderr_lines[0]["pid"]) == ("x", pid)
    refused = [e for e in entries if "refused 127.0.0.9" in e["message"]]
    assert len(refused) == 1 and refused[0]["level"] == "warning"
    assert any(e["message"].startswith(f"superd {d.pid} ready:") for e in entries)


def test_log_client_address_hash(superd: StartSuperd, tmp_path: Path) -> None:
    port = free_port()
    prog = script(tmp_path, "addr.sh", 'echo "$REMOTE_ADDR"\n')
    d = superd(f"""
        log: {{client_address: hash, level: debug}}
        services:
          x:
            listen: 127.0.0.1:{port}
            exec: [{prog}]
            deny: [127.0.1.0/24]
        """)
    for source in ("127.0.0.7", "127.0.0.7", "127.0.0.8"):
        with _connect(port, source) as s:
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        assert reply == source.encode() + b"\n"  # the program sees the real address
    assert _refused_by_server(port, "127.0.1.9") == b""
    text = d.wait_log(r"exit 0 after", 3)
    # the rule is hidden too: a /32 rule would name the client
    text = d.wait_log(r"(?m)x: refused client-[0-9a-f]{12}: an access rule$")
    for ip in ("127.0.0.7", "127.0.0.8", "127.0.1.9"):
        assert ip not in text, text
    tokens = re.findall(r" x\[\d+\] (\S+): exit 0 after", text)
    assert len(tokens) == 3, text
    assert all(re.fullmatch(r"client-[0-9a-f]{12}", t) for t in tokens), tokens
    assert tokens[0] == tokens[1] != tokens[2]
    started = re.findall(r"x\[\d+\] started for (\S+)", text)
    assert started == tokens, text


def test_log_client_address_none(superd: StartSuperd, tmp_path: Path) -> None:
    port = free_port()
    prog = script(tmp_path, "addr.sh", 'echo "$REMOTE_ADDR"\n')
    d = superd(f"""
        log: {{client_address: none}}
        services:
          x:
            listen: 127.0.0.1:{port}
            exec: [{prog}]
        """)
    assert tcp_exchange(port, source="127.0.0.6") == b"127.0.0.6\n"
    text = d.wait_log(r"exit 0 after")
    assert re.search(r" x\[\d+\] client: exit 0 after \d+\.\d+s$", text, re.MULTILINE), text
    assert "127.0.0.6" not in text


def test_log_refusal_flood_is_summarised(superd: StartSuperd, tmp_path: Path) -> None:
    port = free_port()
    d = superd(f"""
        services:
          x:
            listen: 127.0.0.1:{port}
            exec: [/bin/cat]
            deny: [127.0.0.0/8]
        """)
    for _ in range(300):
        assert _refused_by_server(port, "127.0.0.1") == b""
    assert wait_until(lambda: _service(_status(d), "x")["rejected"] == {"denied": 300})
    text = d.wait_log(r"refused \d+ more connection\(s\)", timeout=16)

    def accounted(log: str) -> int:
        lines = len(re.findall(r"x: refused 127\.0\.0\.1:\d+: deny 127\.0\.0\.0/8", log))
        summed = sum(int(n) for n in re.findall(r"refused (\d+) more connection", log))
        return lines + summed

    assert wait_until(lambda: accounted(d.log()) == 300, 25), d.log()
    text = d.log()
    one_by_one = re.findall(r"x: refused 127\.0\.0\.1", text)
    assert 1 <= len(one_by_one) <= 10, text
    assert len(text.splitlines()) < 30, text


# --- 6. journald priority prefixes -----------------------------------------------


def test_journal_priority_prefixes(tmp_path: Path) -> None:
    port, p_gone = free_port(), free_port()
    gone = script(tmp_path, "gone.sh", "echo never\n")
    config = tmp_path / "superd.yaml"
    config.write_text(textwrap.dedent(f"""\
        control: {tmp_path}/control.sock
        services:
          x:
            listen: 127.0.0.1:{port}
            exec: [/bin/cat]
            user: {TEST_USER}
            deny: [127.0.0.9]
          gone:
            listen: 127.0.0.1:{p_gone}
            exec: [{gone}]
            user: {TEST_USER}
        """))
    log = tmp_path / "journal.log"
    log.touch()
    st = os.stat(log)
    env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    with _running(_start_plain(config, log, env)) as proc:
        assert wait_until(lambda: "ready:" in log.read_text() or proc.poll() is not None, 15)
        assert proc.poll() is None, log.read_text()
        gone.unlink()
        assert _refused_by_server(port, "127.0.0.9") == b""
        assert _refused_by_server(p_gone, "127.0.0.1") == b""
        assert wait_until(lambda: "cannot start" in log.read_text()), log.read_text()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(15) == 0
    lines = log.read_text().splitlines()
    assert lines, "no log"
    for line in lines:
        assert re.match(r"<[2-7]>(debug|info|warning|error|critical): ", line), line
        assert not re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", line), line
        assert "superd[" not in line, line
    assert any(re.fullmatch(r"<6>info: superd \d+ ready: .*", x) for x in lines), lines
    assert any(re.fullmatch(r"<4>warning: x: refused 127\.0\.0\.9:\d+: deny .*", x)
               for x in lines), lines
    assert any(re.fullmatch(r"<3>error: gone: cannot start .*", x) for x in lines), lines
    assert any(re.fullmatch(r"<6>info: superd stopped", x) for x in lines), lines


def test_no_journal_prefix_when_stream_does_not_match(tmp_path: Path) -> None:
    config = tmp_path / "superd.yaml"
    config.write_text(f"control: {tmp_path}/control.sock\nservices: {{}}\n")
    log = tmp_path / "plain.log"
    log.touch()
    st = os.stat(log)
    env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}
    with _running(_start_plain(config, log, env)) as proc:
        assert wait_until(lambda: "ready:" in log.read_text() or proc.poll() is not None, 15)
        assert proc.poll() is None, log.read_text()
    lines = log.read_text().splitlines()
    assert lines
    for line in lines:
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d superd\[\d+\] \w+: ", line), line
