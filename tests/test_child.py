"""What the program gets: environment, descriptors, signals, identity,
process settings, argv, stderr and exit status (DESIGN.md, "What the
program gets"), observed by real child programs over real TCP connections.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    IS_ROOT,
    TEST_USER,
    Superd,
    free_port,
    needs_root,
    script,
    tcp_exchange,
    wait_until,
)

NOBODY = pwd.getpwnam("nobody")
ROOT_PW = pwd.getpwuid(0)
# Who runs a program whose service names no user: nobody as root (conftest's
# default_user writes it), else the user running the tests (superd's own).
RUNS_AS = pwd.getpwnam(TEST_USER)
SYSTEM_DIRS = {"/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"}
CONNECTION_VARS = {"PROTO", "TCPREMOTEIP", "TCPREMOTEPORT", "TCPLOCALIP", "TCPLOCALPORT",
                   "REMOTE_ADDR", "REMOTE_PORT", "REMOTE_HOST"}

# Lists the descriptors open in the program itself.  os.listdir opens one
# more for the directory and closes it again before returning; keeping only
# the names that are still open afterwards leaves exactly the inherited ones.
FD_LISTER = """\
import os, socket
def is_open(fd):
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True
fds = sorted(int(n) for n in os.listdir('/proc/self/fd') if is_open(int(n)))
print('fds', *fds)
for fd in fds:
    print(fd, os.readlink('/proc/self/fd/%d' % fd))
peer = socket.socket(fileno=os.dup(0)).getpeername()
print('peer', peer[0], peer[1])
"""


def q(value: str) -> str:
    """*value* as a YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(value)


def talk(port: int, host: str = "127.0.0.1", source: str | None = None,
         data: bytes = b"", timeout: float = 10.0) -> tuple[tuple[str, int], bytes]:
    """Connect (from *source* if given), send, half-close, read to EOF.

    Returns the client socket's own (address, port) and the reply.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        if source is not None:
            s.bind((source, 0))
        s.connect((host, port))
        me = s.getsockname()
        if data:
            s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return (me[0], me[1]), b"".join(chunks)


def parse_env(raw: bytes) -> dict[str, str]:
    """The output of ``env -0`` as a dict."""
    result = {}
    for entry in raw.decode().split("\0"):
        if entry:
            name, sep, value = entry.partition("=")
            assert sep, f"not NAME=value: {entry!r}"
            result[name] = value
    return result


def user_env(pw: pwd.struct_passwd) -> dict[str, str]:
    return {"HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name,
            "SHELL": pw.pw_shell}


def lines(raw: bytes) -> list[str]:
    return raw.decode().splitlines()


def keyed(raw: bytes) -> dict[str, str]:
    """``key value...`` lines as a dict."""
    out = {}
    for line in lines(raw):
        key, _, value = line.partition(" ")
        out[key] = value
    return out


def unnamed_identity() -> tuple[int, int, list[int]]:
    """uid, gid and supplementary groups of a program whose service names no
    user: nobody's from the group database as root; else superd's own, which
    are this test process's (superd cannot change them)."""
    if IS_ROOT:
        return (NOBODY.pw_uid, NOBODY.pw_gid,
                sorted(set(os.getgrouplist("nobody", NOBODY.pw_gid))))
    return os.geteuid(), os.getegid(), sorted(set(os.getgroups()))


def status_groups(text: str) -> list[int]:
    m = re.search(r"^Groups:\s*(.*)$", text, re.M)
    assert m, text
    return sorted(int(g) for g in m.group(1).split())


def daemon_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """superd's own environment: the test's, plus secrets and systemd's
    variables (meant for superd itself, not for its programs)."""
    env = dict(os.environ)
    env.update(
        SECRET_TOKEN="s3cret",
        NOTIFY_SOCKET=str(tmp_path / "notify.sock"),
        LISTEN_FDS="1", LISTEN_PID="1", LISTEN_FDNAMES="nothing",
        WATCHDOG_USEC="60000000", WATCHDOG_PID="1",
        INVOCATION_ID="0123456789abcdef", JOURNAL_STREAM="8:12345",
        PYTHONPATH=os.environ.get("PYTHONPATH", ""), LANG="C.UTF-8",
    )
    env.update(extra)
    return env


@pytest.fixture
def notify_sock(tmp_path: Path) -> Iterator[socket.socket]:
    """A datagram socket at $NOTIFY_SOCKET so superd's sd_notify succeeds."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(tmp_path / "notify.sock"))
        yield s


# A wrapper that changes what superd inherits (ignored and blocked signals,
# and, as root, supplementary groups), writes what it set to its output (the
# log) and execs the real superd in the same process.
WRAPPER = """\
import os, re, signal, sys
for sig in (signal.SIGHUP, signal.SIGQUIT, signal.SIGALRM, signal.SIGTTOU,
            signal.SIGTTIN, signal.SIGTSTP, signal.SIGPIPE, signal.SIGXFSZ,
            signal.SIGUSR2, signal.SIGWINCH):
    signal.signal(sig, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1, signal.SIGALRM,
                                          signal.SIGWINCH, signal.SIGCHLD})
if os.geteuid() == 0:
    os.setgroups([4, 27, 100])
status = open("/proc/self/status").read()
for line in re.findall(r"^(?:SigIgn|SigBlk|Groups):.*$", status, re.M):
    os.write(1, ("wrapper " + line + "\\n").encode())
os.execv(sys.executable, [sys.executable, "-m", "superd", "run", "-c", sys.argv[1]])
"""


@pytest.fixture
def wrapped_superd(tmp_path: Path) -> Iterator[Callable[[str], Superd]]:
    """Factory: superd started through WRAPPER; stopped by its pid after."""
    started: list[Superd] = []

    def make(config: str) -> Superd:
        d = Superd(tmp_path, config)
        started.append(d)
        with open(d.log_path, "ab") as logf:
            d.proc = subprocess.Popen(
                [sys.executable, "-c", WRAPPER, str(d.config_path)],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, cwd=str(tmp_path))
        proc = d.proc
        assert wait_until(lambda: "ready:" in d.log() or proc.poll() is not None, 15), d.log()
        assert proc.poll() is None, f"superd exited:\n{d.log()}"
        return d

    yield make
    for d in started:
        try:
            d.stop(10)
        except subprocess.TimeoutExpired:
            pass
        finally:
            d.kill()


# --- 1. environment --------------------------------------------------------


def test_env_is_exactly_the_documented_set(superd, tmp_path: Path, notify_sock) -> None:
    port = free_port()
    d = superd(f"""
        services:
          showenv:
            listen: 127.0.0.1:{port}
            exec: [env, "-0"]
            env: {{LANG: C.UTF-8, GREETING: "hello world"}}
        """, env=daemon_env(tmp_path))
    (cip, cport), raw = talk(port, source="127.0.0.2")
    assert cip == "127.0.0.2"
    env = parse_env(raw)
    path = env.pop("PATH")
    assert set(path.split(":")) <= SYSTEM_DIRS and "/usr/bin" in path.split(":"), path
    assert env == {
        "PROTO": "TCP",
        "TCPREMOTEIP": "127.0.0.2", "TCPREMOTEPORT": str(cport),
        "TCPLOCALIP": "127.0.0.1", "TCPLOCALPORT": str(port),
        "REMOTE_ADDR": "127.0.0.2", "REMOTE_PORT": str(cport), "REMOTE_HOST": "127.0.0.2",
        "SUPERD_SERVICE": "showenv",
        **user_env(RUNS_AS),
        "LANG": "C.UTF-8", "GREETING": "hello world",
    }
    assert d.proc is not None and d.proc.poll() is None


def test_pass_env_copies_only_what_it_names(superd, tmp_path: Path, notify_sock) -> None:
    port = free_port()
    superd(f"""
        services:
          passer:
            listen: 127.0.0.1:{port}
            exec: [env, "-0"]
            pass_env: [SECRET_TOKEN, NOT_SET_ANYWHERE]
        """, env=daemon_env(tmp_path))
    env = parse_env(talk(port)[1])
    assert env["SECRET_TOKEN"] == "s3cret"
    assert "NOT_SET_ANYWHERE" not in env
    for private in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                    "WATCHDOG_USEC", "WATCHDOG_PID", "INVOCATION_ID", "JOURNAL_STREAM",
                    "PYTHONPATH"):
        assert private not in env
    assert set(env) == {"PATH", "SECRET_TOKEN", "SUPERD_SERVICE", "PROTO",
                        *CONNECTION_VARS, *user_env(RUNS_AS)}


@needs_root("user: root is applied only when superd runs as root")
def test_env_for_root_service_has_root_home(superd, tmp_path: Path) -> None:
    port = free_port()
    superd(f"""
        services:
          rootenv:
            listen: 127.0.0.1:{port}
            exec: [env, "-0"]
            user: root
        """)
    env = parse_env(talk(port)[1])
    assert {k: env.get(k) for k in user_env(ROOT_PW)} == user_env(ROOT_PW)


def test_env_over_ipv6_is_tcp6(superd, tmp_path: Path) -> None:
    port = free_port(host="::1")
    superd(f"""
        services:
          six:
            listen: "[::1]:{port}"
            exec: [env, "-0"]
        """)
    (cip, cport), raw = talk(port, host="::1")
    env = parse_env(raw)
    assert {k: env[k] for k in ("PROTO", *CONNECTION_VARS)} == {
        "PROTO": "TCP6",
        "TCPREMOTEIP": "::1", "TCPREMOTEPORT": str(cport),
        "TCPLOCALIP": "::1", "TCPLOCALPORT": str(port),
        "REMOTE_ADDR": "::1", "REMOTE_PORT": str(cport), "REMOTE_HOST": "::1",
    }
    assert cip == "::1"


def test_env_on_dual_stack_port_unmaps_ipv4(superd, tmp_path: Path) -> None:
    port = free_port()
    superd(f"""
        services:
          dual:
            listen: {port}
            exec: [env, "-0"]
        """)
    (cip, cport), raw = talk(port, source="127.0.0.2")
    env = parse_env(raw)
    assert {k: env[k] for k in ("PROTO", *CONNECTION_VARS)} == {
        "PROTO": "TCP",
        "TCPREMOTEIP": "127.0.0.2", "TCPREMOTEPORT": str(cport),
        "TCPLOCALIP": "127.0.0.1", "TCPLOCALPORT": str(port),
        "REMOTE_ADDR": "127.0.0.2", "REMOTE_PORT": str(cport), "REMOTE_HOST": "127.0.0.2",
    }
    (cip6, cport6), raw6 = talk(port, host="::1")
    env6 = parse_env(raw6)
    assert (env6["PROTO"], env6["TCPREMOTEIP"], env6["TCPREMOTEPORT"],
            env6["TCPLOCALIP"]) == ("TCP6", "::1", str(cport6), "::1")


# --- 2. descriptors --------------------------------------------------------


# `null` is written both ways: the table in DESIGN.md writes it bare, and bare
# `null` is also YAML's null -- superd must not quietly read it as "unset".
@pytest.mark.parametrize("mode", ["log", "socket", '"null"', "null"],
                         ids=["log", "socket", "null-quoted", "null-bare"])
def test_only_fds_0_1_2(superd, tmp_path: Path, mode: str) -> None:
    port = free_port()
    superd(f"""
        services:
          fds:
            listen: 127.0.0.1:{port}
            exec: [python3, "-I", "-c", {q(FD_LISTER)}]
            stderr: {mode}
        """)
    (cip, cport), raw = talk(port, source="127.0.0.2")
    out = keyed(raw)
    assert out["fds"] == "0 1 2", raw.decode()
    assert re.fullmatch(r"socket:\[\d+\]", out["0"]), out
    assert out["1"] == out["0"]
    assert out["peer"] == f"{cip} {cport}"  # the connected socket, not the listener
    if mode == "log":
        assert re.fullmatch(r"pipe:\[\d+\]", out["2"]), out
    elif mode == "socket":
        assert out["2"] == out["0"]
    else:
        assert out["2"] == "/dev/null"


def test_no_fds_leak_through_the_rlimit_trampoline(superd, tmp_path: Path) -> None:
    port = free_port()
    superd(f"""
        services:
          fdslim:
            listen: 127.0.0.1:{port}
            exec: [python3, "-I", "-c", {q(FD_LISTER)}]
            rlimits: {{nofile: 256}}
            nice: 1
        """)
    out = keyed(talk(port)[1])
    assert out["fds"] == "0 1 2", out
    assert re.fullmatch(r"pipe:\[\d+\]", out["2"]), out


# --- 3. signals and session -------------------------------------------------

SIGNALS_SCRIPT = """\
echo "pid $$"
ps -o sid= -p $$ | sed 's/^ */sid /'
exec grep -E '^Sig(Ign|Blk):' /proc/self/status
"""


def _signal_report(raw: bytes) -> dict[str, str]:
    out = dict(re.findall(r"^(\w+):?\s+(\S+)\s*$", raw.decode(), re.M))
    assert {"pid", "sid", "SigIgn", "SigBlk"} <= set(out), raw.decode()
    return out


@pytest.mark.parametrize("settings", [
    "",
    "rlimits: {nofile: 512}",
    "nice: 3",
], ids=["plain", "rlimits", "nice"])
def test_default_signals_empty_mask_own_session(wrapped_superd, tmp_path: Path,
                                                settings: str) -> None:
    prog = script(tmp_path, "signals.sh", SIGNALS_SCRIPT)
    port = free_port()
    d = wrapped_superd(f"""
        services:
          sigs:
            listen: 127.0.0.1:{port}
            exec: [{prog}]
            {settings}
        """)
    # the wrapper worked: superd inherited ignored and blocked signals
    wrapped = dict(re.findall(r"^wrapper (\w+):[ \t]*(.*?)[ \t]*$", d.log(), re.M))
    assert int(wrapped["SigIgn"], 16) and int(wrapped["SigBlk"], 16), d.log()
    if IS_ROOT:  # and supplementary groups
        status = Path(f"/proc/{d.pid}/status").read_text()
        assert re.search(r"^Groups:\s*4 27 100\s*$", status, re.M), status
    out = _signal_report(talk(port)[1])
    assert out["sid"] == out["pid"]
    assert out["SigIgn"] == "0000000000000000", f"ignored in the program: {out['SigIgn']}"
    assert out["SigBlk"] == "0000000000000000", f"blocked in the program: {out['SigBlk']}"


@pytest.mark.parametrize("settings", ["", "nice: 1"], ids=["plain", "nice"])
def test_sigpipe_kills_the_program_by_default(superd, tmp_path: Path, settings: str) -> None:
    # A writer whose reader has gone dies of SIGPIPE (status 128+13), as in a
    # login shell; with SIGPIPE ignored `yes` would exit 1 on EPIPE instead.
    prog = script(tmp_path, "pipe.sh", """\
        exec 3>&1
        { yes; echo "yes exit $?" >&3; } | head -n 1 >/dev/null
        """)
    port = free_port()
    d = superd(f"""
        services:
          piper:
            listen: 127.0.0.1:{port}
            exec: [{prog}]
            {settings}
        """)
    assert talk(port)[1] == f"yes exit {128 + signal.SIGPIPE}\n".encode()
    assert d.proc is not None and d.proc.poll() is None


# --- 4. identity -----------------------------------------------------------

IDENTITY_SCRIPT = """\
echo "uid $(id -u)"
echo "gid $(id -g)"
grep '^Groups:' /proc/self/status
"""


def _identity(raw: bytes) -> tuple[int, int, list[int]]:
    text = raw.decode()
    out = keyed(raw)
    return int(out["uid"]), int(out["gid"]), status_groups(text)


@needs_root("runs the program as nobody")
def test_user_nobody_gets_group_db_groups(wrapped_superd, tmp_path: Path) -> None:
    prog = script(tmp_path, "id.sh", IDENTITY_SCRIPT)
    port = free_port()
    # superd itself has supplementary groups 4 27 100 (the wrapper): none may leak.
    wrapped_superd(f"""
        services:
          who:
            listen: 127.0.0.1:{port}
            exec: [{prog}]
            user: nobody
        """)
    uid, gid, groups = _identity(talk(port)[1])
    assert (uid, gid) == (NOBODY.pw_uid, NOBODY.pw_gid)
    assert groups == sorted(set(os.getgrouplist("nobody", NOBODY.pw_gid)))


@needs_root("user: root is applied only when superd runs as root")
def test_user_root_gets_roots_groups_not_superds(wrapped_superd, tmp_path: Path) -> None:
    prog = script(tmp_path, "id.sh", IDENTITY_SCRIPT)
    port = free_port()
    wrapped_superd(f"""
        services:
          rootwho:
            listen: 127.0.0.1:{port}
            exec: [{prog}]
            user: root
        """)
    uid, gid, groups = _identity(talk(port)[1])
    assert (uid, gid) == (0, 0)
    # root's supplementary groups from the group database (systemd skips
    # initgroups for gid 0, so none at all is fine too) -- not superd's own.
    assert set(groups) <= set(os.getgrouplist("root", 0)), groups


@needs_root("runs programs as nobody:daemon and root:users")
def test_group_key_sets_the_primary_group(superd, tmp_path: Path) -> None:
    prog = script(tmp_path, "id.sh", IDENTITY_SCRIPT)
    port, port2 = free_port(), free_port()
    superd(f"""
        services:
          grouped:
            listen: 127.0.0.1:{port}
            exec: [{prog}]
            user: nobody
            group: daemon
          rootgrouped:
            listen: 127.0.0.1:{port2}
            exec: [{prog}]
            user: root
            group: users
        """)
    uid, gid, groups = _identity(talk(port)[1])
    assert (uid, gid) == (NOBODY.pw_uid, 1)
    assert set(groups) == set(os.getgrouplist("nobody", 1))
    uid, gid, groups = _identity(talk(port2)[1])
    assert (uid, gid) == (0, 100)
    assert set(groups) == set(os.getgrouplist("root", 100))


@needs_root("runs the program as uid 1")
def test_user_given_as_number(superd, tmp_path: Path) -> None:
    prog = script(tmp_path, "idenv.sh", IDENTITY_SCRIPT + 'echo "user $USER"\n'
                  'echo "home $HOME"\n')
    port = free_port()
    daemon_pw = pwd.getpwuid(1)
    superd(f"""
        services:
          numeric:
            listen: 127.0.0.1:{port}
            exec: [{prog}]
            user: 1
        """)
    raw = talk(port)[1]
    uid, gid, groups = _identity(raw)
    assert (uid, gid) == (1, daemon_pw.pw_gid)
    assert set(groups) == set(os.getgrouplist(daemon_pw.pw_name, daemon_pw.pw_gid))
    out = keyed(raw)
    assert (out["user"], out["home"]) == (daemon_pw.pw_name, daemon_pw.pw_dir)


@pytest.mark.skipif(IS_ROOT, reason="as root, user: is applied (the tests above)")
def test_user_from_defaults_is_not_applied_when_not_root(superd, tmp_path: Path) -> None:
    """Not as root, a user: from defaults: naming someone else is not applied:
    the program runs as superd's own user, and the log says so.  (One a
    service names itself is refused at load: tests/test_check_nonroot.py.)"""
    prog = script(tmp_path, "idenv.sh", IDENTITY_SCRIPT + 'echo "user $USER"\n')
    port = free_port()
    d = superd(f"""
        defaults:
          user: root
        services:
          rootwho:
            listen: 127.0.0.1:{port}
            exec: [{prog}]
        """)
    raw = talk(port)[1]
    assert _identity(raw) == unnamed_identity()
    assert keyed(raw)["user"] == RUNS_AS.pw_name
    d.wait_log(r"(?m)warning: rootwho: user: root from defaults: is not applied: superd "
               r"does not run as "
               rf"root, so its programs run as {re.escape(RUNS_AS.pw_name)}$")


# --- 5. process settings ----------------------------------------------------

SETTINGS_SCRIPT = """\
echo "uid $(id -u)"
echo "cwd $(/bin/pwd -P)"
echo "umask $(umask)"
echo "nice $(ps -o ni= -p $$ | tr -d ' ')"
cat /proc/$$/limits
"""


def _limit(limits: str, name: str) -> tuple[str, str]:
    m = re.search(rf"^{re.escape(name)}\s+(\S+)\s+(\S+)", limits, re.M)
    assert m, limits
    return m.group(1), m.group(2)


def test_defaults_cwd_root_umask_022_nice_0(superd, tmp_path: Path) -> None:
    prog = script(tmp_path, "settings.sh", SETTINGS_SCRIPT)
    port = free_port()
    superd(f"""
        services:
          plain:
            listen: 127.0.0.1:{port}
            exec: [{prog}]
        """)
    out = keyed(talk(port)[1])
    assert (out["cwd"], out["umask"], out["nice"]) == ("/", "0022", "0")


def test_cwd_umask_nice_rlimits_as_nobody(superd, tmp_path: Path) -> None:
    prog = script(tmp_path, "settings.sh", SETTINGS_SCRIPT)
    workdir = tmp_path / "work"
    workdir.mkdir(mode=0o755)
    port = free_port()
    superd(f"""
        services:
          tuned:
            listen: 127.0.0.1:{port}
            exec: [{prog}]
            cwd: {workdir}
            umask: "027"
            nice: 5
            rlimits: {{nofile: 256, cpu: 100, as: 512M}}
        """)
    raw = talk(port)[1]
    out = keyed(raw)
    text = raw.decode()
    assert out["uid"] == str(RUNS_AS.pw_uid)
    assert out["cwd"] == str(workdir)
    assert out["umask"] == "0027"
    assert out["nice"] == "5"
    assert _limit(text, "Max open files") == ("256", "256")
    assert _limit(text, "Max cpu time") == ("100", "100")
    assert _limit(text, "Max address space") == (str(512 * 1024**2),) * 2


def test_rlimits_alone_keep_user_and_settings(superd, tmp_path: Path) -> None:
    prog = script(tmp_path, "settings.sh", SETTINGS_SCRIPT + IDENTITY_SCRIPT)
    port = free_port()
    superd(f"""
        services:
          limited:
            listen: 127.0.0.1:{port}
            exec: [{prog}]
            rlimits: {{nofile: [128, 200]}}
            umask: "077"
        """)
    raw = talk(port, source="127.0.0.2")[1]
    assert _identity(raw) == unnamed_identity()
    out = keyed(raw)
    assert (out["cwd"], out["umask"], out["nice"]) == ("/", "0077", "0")
    assert _limit(raw.decode(), "Max open files") == ("128", "200")


def test_rlimits_program_still_sees_connection_env(superd, tmp_path: Path) -> None:
    port = free_port()
    superd(f"""
        services:
          limenv:
            listen: 127.0.0.1:{port}
            exec: [env, "-0"]
            rlimits: {{nofile: 256}}
        """)
    (cip, cport), raw = talk(port, source="127.0.0.2")
    env = parse_env(raw)
    expected = {"PATH", "SUPERD_SERVICE", "PROTO", *CONNECTION_VARS, *user_env(RUNS_AS)}
    assert {k: v for k, v in env.items() if k not in expected} == {}
    assert expected <= set(env)
    assert env["TCPREMOTEPORT"] == str(cport) and env["TCPREMOTEIP"] == "127.0.0.2"


# --- 6. argv ----------------------------------------------------------------

ARGS_SCRIPT = """\
for a in "$@"; do printf '[%s]\\n' "$a"; done
"""


def test_exec_list_arrives_literally(superd, tmp_path: Path) -> None:
    prog = script(tmp_path, "args.sh", ARGS_SCRIPT)
    canary = tmp_path / "pwned"
    args = ["a b", "$HOME", f"; touch {canary}", "*", f"$(touch {canary})", "`id`", "",
            "tab\there", "'quoted'"]
    port = free_port()
    superd(f"""
        services:
          args:
            listen: 127.0.0.1:{port}
            exec: [{q(str(prog))}, {", ".join(q(a) for a in args)}]
        """)
    assert lines(talk(port)[1]) == [f"[{a}]" for a in args]
    assert not canary.exists()


def test_exec_string_is_split_like_a_shell_never_run_by_one(superd, tmp_path: Path) -> None:
    prog = script(tmp_path, "args.sh", ARGS_SCRIPT)
    canary = tmp_path / "pwned"
    command = (f"{prog} 'a b' '$HOME' \"; touch {canary}\" '*' x\\ y "
               f"'$(touch {canary})' >out |pipe")
    port = free_port()
    superd(f"""
        services:
          strargs:
            listen: 127.0.0.1:{port}
            exec: {q(command)}
        """)
    assert lines(talk(port)[1]) == [
        "[a b]", "[$HOME]", f"[; touch {canary}]", "[*]", "[x y]",
        f"[$(touch {canary})]", "[>out]", "[|pipe]"]
    assert not canary.exists()
    assert not (tmp_path / "out").exists()


def test_exec_string_quoting_matches_sh(superd, tmp_path: Path) -> None:
    # Only quoting, nothing a shell would expand: /bin/sh is the reference.
    prog = script(tmp_path, "args.sh", ARGS_SCRIPT)
    command = (f"{prog} 'a b' \"x\\\"y\" 'it'\\''s' \"back\\\\slash\" "
               "\"\\$HOME\" \"\\`id\\`\" plain\\ space \"\" 'tab\there'")
    reference = subprocess.run(["/bin/sh", "-c", command], capture_output=True,
                               check=True, timeout=10).stdout
    assert lines(reference)[:4] == ["[a b]", '[x"y]', "[it's]", "[back\\slash]"]
    port = free_port()
    superd(f"""
        services:
          quoting:
            listen: 127.0.0.1:{port}
            exec: {q(command)}
        """)
    assert lines(talk(port)[1]) == lines(reference)


# --- 7. stderr --------------------------------------------------------------

STDERR_SCRIPT = """\
echo "pid $$"
echo "warning from $$" >&2
echo "second line" >&2
echo "stdout line"
exit 3
"""


def test_stderr_log_lines_are_tagged(superd, tmp_path: Path) -> None:
    prog = script(tmp_path, "err.sh", STDERR_SCRIPT)
    port = free_port()
    d = superd(f"""
        services:
          errlog:
            listen: 127.0.0.1:{port}
            exec: [{prog}]
        """)
    reply = lines(talk(port)[1])
    assert reply[1:] == ["stdout line"]
    pid = reply[0].split()[1]
    d.wait_log(rf"(?m)errlog\[{pid}\]: warning from {pid}$")
    log = d.wait_log(rf"(?m)errlog\[{pid}\]: second line$")
    assert "stdout line" not in log


def test_stderr_socket_reaches_the_client(superd, tmp_path: Path) -> None:
    prog = script(tmp_path, "err.sh", STDERR_SCRIPT)
    port = free_port()
    d = superd(f"""
        services:
          errsock:
            listen: 127.0.0.1:{port}
            exec: [{prog}]
            stderr: socket
        """)
    reply = lines(talk(port)[1])
    pid = reply[0].split()[1]
    assert reply[1:] == [f"warning from {pid}", "second line", "stdout line"]
    log = d.wait_log(rf"errsock\[{pid}\]\D.*\bexit 3\b")
    assert "warning from" not in log and "second line" not in log


@pytest.mark.parametrize("mode", ['"null"', "null"], ids=["quoted", "bare"])
def test_stderr_null_goes_nowhere(superd, tmp_path: Path, mode: str) -> None:
    prog = script(tmp_path, "err.sh", STDERR_SCRIPT)
    port = free_port()
    d = superd(f"""
        services:
          errnull:
            listen: 127.0.0.1:{port}
            exec: [{prog}]
            stderr: {mode}
        """)
    reply = lines(talk(port)[1])
    pid = reply[0].split()[1]
    assert reply[1:] == ["stdout line"]
    log = d.wait_log(rf"errnull\[{pid}\]\D.*\bexit 3\b")
    assert "warning from" not in log and "second line" not in log


# --- 8. exit status ---------------------------------------------------------


def test_exit_status_and_signal_death_are_logged_and_serving_goes_on(
        superd, tmp_path: Path) -> None:
    fails = script(tmp_path, "fails.sh", 'echo "pid $$"\nexit 3\n')
    dies = script(tmp_path, "dies.sh", 'echo "pid $$"\nkill -TERM $$\necho "not reached"\n')
    usr1 = script(tmp_path, "usr1.sh", 'echo "pid $$"\nkill -USR1 $$\n')
    ok = script(tmp_path, "ok.sh", 'echo "fine $SUPERD_SERVICE"\n')
    p_fail, p_die, p_usr1, p_ok = (free_port() for _ in range(4))
    d = superd(f"""
        services:
          fails:
            listen: 127.0.0.1:{p_fail}
            exec: [{fails}]
          dies:
            listen: 127.0.0.1:{p_die}
            exec: [{dies}]
          usr1:
            listen: 127.0.0.1:{p_usr1}
            exec: [{usr1}]
          ok:
            listen: 127.0.0.1:{p_ok}
            exec: [{ok}]
        """)
    for round_ in range(2):
        (_, cport), raw = talk(p_fail)
        pid = keyed(raw)["pid"]
        d.wait_log(rf"fails\[{pid}\]\D.*127\.0\.0\.1:{cport}\b.*\bexit 3\b")
        (_, cport), raw = talk(p_die)
        pid = keyed(raw)["pid"]
        assert lines(raw) == [f"pid {pid}"]
        d.wait_log(rf"dies\[{pid}\]\D.*127\.0\.0\.1:{cport}\b.*\bSIGTERM\b")
        (_, cport), raw = talk(p_usr1)
        pid = keyed(raw)["pid"]
        d.wait_log(rf"usr1\[{pid}\]\D.*127\.0\.0\.1:{cport}\b.*\bSIGUSR1\b")
        assert tcp_exchange(p_ok) == b"fine ok\n", round_
    assert d.proc is not None and d.proc.poll() is None
    assert wait_until(lambda: not d.children())
    assert d.stop() == 0
