"""What superd trusts when it runs as root, and the configurations it refuses.

Issue 11, items 3, 4, 7 and 9: the real ``superd check`` and the real
daemon as subprocesses, and a real unprivileged user (``nobody``) for every
step an attacker takes.  Each refusal is asserted at its ``FILE:LINE:COL``.

The rule (sshd's StrictModes): as root, the configuration file, every
included file and include directory, and every directory above each of them
must be owned by root and not writable by group or others; a sticky
directory may be writable when the entry beneath it is root's.  A program
that runs as user X may be changeable by root and X only.
"""

from __future__ import annotations

import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import FIXTURES, Superd, free_port, run_superd, script, tcp_exchange, wait_until

from superd.convert import convert
from superd.internal import LOOP_PORTS, UdpService

NOBODY = pwd.getpwnam("nobody")
DAEMON = pwd.getpwuid(1)  # another unprivileged user, for "writable by someone else"
ROOT_ONLY = pytest.mark.skipif(
    os.geteuid() != 0, reason="the ownership rules apply only when superd runs as root"
)
REFUSED = "refused: superd runs as root and"
USER_REQUIRED = (
    "user: is required when superd runs as root (without it every such "
    "service would share one uid, 'nobody', and could read each other's "
    "environment and signal each other's programs); write user: nobody to "
    "accept that, or a user of its own"
)


# --- helpers ------------------------------------------------------------------


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    os.chmod(path, mode)
    return path


def directory(path: Path, mode: int = 0o755, owner: pwd.struct_passwd | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)
    return path


# setpriv rather than subprocess's user=: the interpreter may live under a
# directory nobody cannot search (/root/.pyenv); past exec it is plain nobody.
AS_NOBODY = ["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}", "--clear-groups"]


def as_nobody(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """One step of the attacker: *argv* run as uid/gid 65534, no other groups."""
    return subprocess.run(
        [*AS_NOBODY, *argv], input=stdin, capture_output=True, text=True, check=True, timeout=30
    )


def locate(text: str, needle: str) -> tuple[int, int]:
    """1-based (line, column) of the first *needle* in *text*."""
    index = text.index(needle)
    return text.count("\n", 0, index) + 1, index - text.rfind("\n", 0, index)


def refusals(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The ``FILE:LINE:COL: message`` lines of a refused ``superd check``."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert re.fullmatch(r"superd: \d+ problem\(s\) in the configuration", lines[-1])
    return lines[:-1]


def assert_refused(
    result: subprocess.CompletedProcess[str], file: Path, where: tuple[int, int], message: str
) -> None:
    """Exactly one problem: *message* at *file*:*where*."""
    found = refusals(result)
    expected = f"{file}:{where[0]}:{where[1]}: {message}"
    assert found == [expected], "\n".join(found)


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return run_superd("check", "-c", str(path))


def reload_outcome(d: Superd) -> str:
    """SIGHUP; "reloaded" or "refused", whichever the daemon logs next."""

    def counts() -> tuple[int, int]:
        log = d.log()
        return log.count("reloaded:"), log.count("reload refused")

    before = counts()
    os.kill(d.pid, signal.SIGHUP)
    assert wait_until(lambda: counts() != before, 10), d.log()
    return "reloaded" if counts()[0] > before[0] else "refused"


def poke(port: int) -> None:
    """Connect once (whatever listens there runs its program); refused is fine."""
    try:
        tcp_exchange(port, timeout=5)
    except OSError:
        pass


SERVICE = """\
    services:
      echo:
        internal: echo
    """


# --- 3. configuration files: judged on the opened descriptor -------------------

SWAPPER = """\
import os, sys
link, first, second = sys.argv[1:]
tmp = link + ".new"
while True:
    for target in (first, second):
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        os.symlink(target, tmp)
        os.rename(tmp, link)
"""


@ROOT_ONLY
def test_include_dir_symlink_swap_attack_on_reload(superd: Any, tmp_path: Path) -> None:
    """The reviewer's attack end to end: an include directory handed to another
    user, whose symlink flips between their own file and a root-owned one while
    root reloads.  The directory itself is refused, so the flip never matters."""
    old_port, evil_port = free_port(), free_port()
    hello = script(tmp_path, "hello.sh", "echo old\n")
    conf_d = directory(tmp_path / "conf.d")
    d = superd(f"""
        include: conf.d/*.yaml
        services:
          hello:
            listen: 127.0.0.1:{old_port}
            exec: [{hello}]
            user: nobody
        """)
    assert tcp_exchange(old_port) == b"old\n"
    os.chown(conf_d, NOBODY.pw_uid, NOBODY.pw_gid)  # the mistake the attack needs
    decoy = write(tmp_path / "decoy.yaml", "services: {}\n")  # root's own, harmless
    attacker = directory(tmp_path / "attacker", owner=NOBODY)
    pwned = attacker / "pwned"
    evil = attacker / "evil.yaml"
    as_nobody(
        "sh",
        "-c",
        f"cat > {evil}",
        stdin=textwrap.dedent(f"""\
        services:
          evil:
            listen: 127.0.0.1:{evil_port}
            exec: [/bin/sh, -c, "id -u > {pwned}"]
            user: root
        """),
    )
    swapper = subprocess.Popen(
        [*AS_NOBODY, sys.executable, "-c", SWAPPER, str(conf_d / "x.yaml"), str(evil), str(decoy)]
    )
    outcomes = []
    try:
        assert wait_until(lambda: (conf_d / "x.yaml").is_symlink(), 10)
        for _ in range(30):
            outcomes.append(reload_outcome(d))
            poke(evil_port)
            if pwned.exists():
                break
    finally:
        swapper.kill()
        swapper.wait(10)
    assert not pwned.exists(), f"the attacker's command ran as uid {pwned.read_text()}"
    assert outcomes == ["refused"] * 30, outcomes
    assert (
        f"include: {REFUSED} directory {conf_d} is owned by uid {NOBODY.pw_uid}, not root"
    ) in d.log()
    assert tcp_exchange(old_port) == b"old\n"  # the running configuration still serves


@ROOT_ONLY
def test_main_file_in_world_writable_directory_is_refused(tmp_path: Path) -> None:
    shared = directory(tmp_path / "shared", 0o777)
    path = write(shared / "superd.yaml", SERVICE)
    assert_refused(
        check(path),
        path,
        (1, 1),
        f"{REFUSED} directory {shared} is writable by its group or others "
        "(mode 0777) and not sticky",
    )
    # what the mode allows: anyone may put their own file in its place
    as_nobody("sh", "-c", f"echo 'services: {{}}' > {shared}/mine && mv -f {shared}/mine {path}")
    assert path.stat().st_uid == NOBODY.pw_uid


@ROOT_ONLY
def test_sticky_directory_is_fine_when_the_entry_is_roots(tmp_path: Path) -> None:
    sticky = directory(tmp_path / "sticky", 0o1777)
    path = write(sticky / "superd.yaml", SERVICE)
    result = check(path)
    assert result.returncode == 0, result.stderr


@ROOT_ONLY
def test_symlink_of_another_user_in_a_sticky_directory_is_refused(tmp_path: Path) -> None:
    """In /tmp-like directories the owner of a symlink can point it elsewhere at
    will: root's file behind it does not make it root's choice."""
    sticky = directory(tmp_path / "sticky", 0o1777)
    target = write(tmp_path / "real.yaml", SERVICE)
    link = sticky / "superd.yaml"
    as_nobody("ln", "-s", str(target), str(link))
    assert_refused(
        check(link),
        link,
        (1, 1),
        f"{REFUSED} {link} is owned by uid {NOBODY.pw_uid} in {sticky}, a "
        "directory others can write; only root may own what superd uses there",
    )


@ROOT_ONLY
def test_symlink_in_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    """The path as written counts, not only where it ends: whoever can swap the
    link chooses what root reads."""
    theirs = directory(tmp_path / "theirs", owner=NOBODY)
    target = write(tmp_path / "real.yaml", SERVICE)
    link = theirs / "superd.yaml"
    as_nobody("ln", "-s", str(target), str(link))
    assert_refused(
        check(link),
        link,
        (1, 1),
        f"{REFUSED} directory {theirs} is owned by uid {NOBODY.pw_uid}, not root",
    )


@ROOT_ONLY
def test_symlinks_root_controls_are_followed(tmp_path: Path) -> None:
    srv = directory(tmp_path / "srv")
    write(srv / "echo.yaml", SERVICE)
    etc = directory(tmp_path / "etc")
    main = write(etc / "superd.yaml", "include: conf.d/*.yaml\nservices: {}\n")
    (directory(etc / "conf.d") / "echo.yaml").symlink_to("../../srv/echo.yaml")
    result = check(main)
    assert result.returncode == 0, result.stderr
    assert f"includes {etc}/conf.d/echo.yaml" in result.stdout
    (tmp_path / "link.yaml").symlink_to(srv / "echo.yaml")
    result = check(tmp_path / "link.yaml")
    assert result.returncode == 0, result.stderr


@ROOT_ONLY
def test_include_file_writable_by_group_is_refused_at_the_include_line(tmp_path: Path) -> None:
    text = "services: {}\ninclude: [conf.d/*.yaml]\n"
    main = write(tmp_path / "superd.yaml", text)
    inc = write(tmp_path / "conf.d" / "web.yaml", SERVICE, 0o664)
    os.chown(inc, 0, NOBODY.pw_gid)
    assert_refused(
        check(main),
        main,
        locate(text, "conf.d/"),
        f"{REFUSED} {inc} is writable by its group or others (mode 0664)",
    )


@ROOT_ONLY
def test_include_directory_writable_by_group_is_refused(tmp_path: Path) -> None:
    text = "include: conf.d/*.yaml\nservices: {}\n"
    main = write(tmp_path / "superd.yaml", text)
    conf_d = directory(tmp_path / "conf.d", 0o775)
    os.chown(conf_d, 0, NOBODY.pw_gid)
    write(conf_d / "echo.yaml", SERVICE)
    assert_refused(
        check(main),
        main,
        locate(text, "conf.d/"),
        f"include: {REFUSED} directory {conf_d} is writable by its group or "
        "others (mode 0775) and not sticky",
    )


@ROOT_ONLY
def test_include_directory_owned_by_another_user_is_refused_even_when_empty(tmp_path: Path) -> None:
    text = "include: conf.d/*.yaml\nservices: {}\n"
    main = write(tmp_path / "superd.yaml", text)
    conf_d = directory(tmp_path / "conf.d", owner=NOBODY)
    assert_refused(
        check(main),
        main,
        locate(text, "conf.d/"),
        f"include: {REFUSED} directory {conf_d} is owned by uid {NOBODY.pw_uid}, not root",
    )


# --- 9. programs: changeable by root and the service's own user only ------------


def program_config(tmp_path: Path, prog: Path, user: str) -> tuple[Path, str]:
    text = (
        f"services:\n  web:\n    listen: 127.0.0.1:{free_port()}\n"
        f"    exec: [{prog}, -v]\n    user: {user}\n"
    )
    return write(tmp_path / "superd.yaml", text), text


@ROOT_ONLY
def test_root_program_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    prog = script(tmp_path, "prog.sh", "echo hi\n")
    os.chown(prog, NOBODY.pw_uid, NOBODY.pw_gid)
    path, text = program_config(tmp_path, prog, "root")
    assert_refused(
        check(path),
        path,
        locate(text, "["),
        f"exec: refused: the program runs as root and {prog} is owned by uid "
        f"{NOBODY.pw_uid}, not root",
    )


@ROOT_ONLY
def test_root_program_in_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = directory(tmp_path / "bin", owner=NOBODY)
    prog = script(theirs, "prog.sh", "echo hi\n")  # root's file, but nobody may replace it
    path, text = program_config(tmp_path, prog, "root")
    assert_refused(
        check(path),
        path,
        locate(text, "["),
        f"exec: refused: the program runs as root and directory {theirs} is "
        f"owned by uid {NOBODY.pw_uid}, not root",
    )


@ROOT_ONLY
def test_root_program_writable_by_group_is_refused(tmp_path: Path) -> None:
    prog = script(tmp_path, "prog.sh", "echo hi\n")
    os.chown(prog, 0, DAEMON.pw_gid)
    os.chmod(prog, 0o775)
    path, text = program_config(tmp_path, prog, "root")
    assert_refused(
        check(path),
        path,
        locate(text, "["),
        f"exec: refused: the program runs as root and {prog} is writable by "
        "its group or others (mode 0775)",
    )


@ROOT_ONLY
def test_program_of_user_x_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    prog = script(tmp_path, "prog.sh", "echo hi\n")
    os.chown(prog, DAEMON.pw_uid, DAEMON.pw_gid)
    path, text = program_config(tmp_path, prog, "nobody")
    assert_refused(
        check(path),
        path,
        locate(text, "["),
        f"exec: refused: the program runs as nobody and {prog} is owned by uid "
        f"{DAEMON.pw_uid}, not root or nobody",
    )


@ROOT_ONLY
def test_program_of_user_x_writable_by_a_group_is_refused(tmp_path: Path) -> None:
    """Group write is refused even for X's own group: others may share it (nogroup)."""
    prog = script(tmp_path, "prog.sh", "echo hi\n")
    os.chown(prog, NOBODY.pw_uid, NOBODY.pw_gid)
    os.chmod(prog, 0o775)
    path, text = program_config(tmp_path, prog, "nobody")
    assert_refused(
        check(path),
        path,
        locate(text, "["),
        f"exec: refused: the program runs as nobody and {prog} is writable by "
        "its group or others (mode 0775)",
    )


@ROOT_ONLY
def test_program_of_user_x_may_be_xs_own(tmp_path: Path) -> None:
    mine = directory(tmp_path / "home", owner=NOBODY)
    prog = script(mine, "prog.sh", "echo hi\n")
    os.chown(prog, NOBODY.pw_uid, NOBODY.pw_gid)
    path, _ = program_config(tmp_path, prog, "nobody")
    result = check(path)
    assert result.returncode == 0, result.stderr


# --- 4. internal services never answer a UNIX datagram peer ---------------------


def test_internal_service_on_a_unix_datagram_path_is_refused(tmp_path: Path) -> None:
    text = (
        f"services:\n  echo:\n    listen: {tmp_path}/echo.sock\n    protocol: udp\n"
        "    internal: echo\n"
    )
    path = write(tmp_path / "superd.yaml", text)
    assert_refused(
        check(path),
        path,
        locate(text, "echo:"),
        "service 'echo': internal services do not listen on UNIX datagram "
        "paths: a datagram's sender names the path its reply goes to, and can "
        "point it at any socket superd may write to (superd answers only IPv4 "
        "and IPv6 peers)",
    )


def unix_dgram(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    return sock


def test_udp_service_never_replies_to_a_unix_peer(tmp_path: Path) -> None:
    """Defence in depth behind check: the sender's path, swapped for a symlink
    to another socket after sending, gets no reply, and neither does the socket."""
    server, client, victim = (unix_dgram(tmp_path / n) for n in ("srv", "cli", "victim"))
    try:
        service = UdpService("echo", server, LOOP_PORTS)
        client.sendto(b"first", str(tmp_path / "srv"))
        client.sendto(b"second", str(tmp_path / "srv"))
        os.unlink(tmp_path / "cli")
        os.symlink(tmp_path / "victim", tmp_path / "cli")
        service(0)
        time.sleep(0.1)
        for sock in (client, victim):
            with pytest.raises(BlockingIOError):
                sock.recv(100)
        assert service.dropped == 2
    finally:
        for sock in (server, client, victim):
            sock.close()


def test_udp_service_still_answers_inet_peers() -> None:
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client,
    ):
        server.bind(("127.0.0.1", 0))
        server.setblocking(False)
        client.bind(("127.0.0.1", 0))
        client.settimeout(5)
        client.sendto(b"ping", server.getsockname())
        UdpService("echo", server, LOOP_PORTS)(0)
        assert client.recv(100) == b"ping"


# --- 7. a service without user: -------------------------------------------------


@ROOT_ONLY
def test_exec_service_without_user_is_refused_as_root(tmp_path: Path) -> None:
    text = textwrap.dedent(f"""\
        services:
          first:
            listen: 127.0.0.1:{free_port()}
            exec: [/bin/cat]
          second:
            listen: 127.0.0.1:{free_port()}
            exec: [/bin/cat]
            user: nobody
          echo:
            listen: 127.0.0.1:{free_port()}
            internal: echo
        """)
    path = write(tmp_path / "superd.yaml", text)
    assert_refused(check(path), path, locate(text, "first:"), f"service 'first': {USER_REQUIRED}")


@ROOT_ONLY
def test_user_nobody_in_defaults_is_accepted(tmp_path: Path) -> None:
    path = write(
        tmp_path / "superd.yaml",
        f"""\
        defaults:
          user: nobody
        services:
          first:
            listen: 127.0.0.1:{free_port()}
            exec: [/bin/cat]
        """,
    )
    result = check(path)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^  first .* nobody +/bin/cat$", result.stdout, re.M), result.stdout


@ROOT_ONLY
def test_not_root_a_missing_user_is_superds_own_and_no_ownership_rules(tmp_path: Path) -> None:
    """As another user, superd hands out nothing it does not have: the file may
    be that user's, in a directory anyone can write, and user: may be left out."""
    shared = directory(tmp_path / "shared", 0o777)
    text = f"services:\n  cat:\n    listen: 127.0.0.1:{free_port()}\n    exec: [/bin/cat]\n"
    as_nobody("sh", "-c", f"cat > {shared}/superd.yaml", stdin=text)
    result = as_nobody(sys.executable, "-m", "superd", "check", "-c", f"{shared}/superd.yaml")
    assert re.search(r"^  cat .* nobody +/bin/cat$", result.stdout, re.M), result.stdout


# --- 7. superd convert fills user: from its source ------------------------------


def exec_services(text: str) -> dict[str, Any]:
    return {
        name: svc for name, svc in (yaml.safe_load(text)["services"] or {}).items() if "exec" in svc
    }


@pytest.mark.parametrize("name", ["debian-inetd.conf", "tricky-inetd.conf", "tricky-xinetd.conf"])
def test_convert_writes_the_sources_user_for_every_program(name: str) -> None:
    services = exec_services(convert([str(FIXTURES / "convert" / name)]))
    assert services
    assert {n: s for n, s in services.items() if "user" not in s} == {}


def test_convert_inetd_user_and_group_fields(tmp_path: Path) -> None:
    source = write(
        tmp_path / "inetd.conf",
        "2001 stream tcp nowait daemon /bin/cat cat\n"
        "2002 stream tcp nowait nobody.nogroup /bin/cat cat\n"
        "2003 stream tcp nowait nobody:nogroup/staff /bin/cat cat\n",
    )
    services = exec_services(convert([str(source)]))
    assert [(s["user"], s.get("group")) for s in services.values()] == [
        ("daemon", None),
        ("nobody", "nogroup"),
        ("nobody", "nogroup"),
    ]


def test_convert_xinetd_without_user_says_what_to_write(tmp_path: Path) -> None:
    source = write(
        tmp_path / "xinetd.conf",
        "service cat\n{\n\ttype = UNLISTED\n"
        "\tsocket_type = stream\n\twait = no\n\tport = 2001\n"
        "\tserver = /bin/cat\n}\n",
    )
    out = convert([str(source)])
    assert "user" not in exec_services(out)["cat"]
    assert (
        "# no user in the source: superd running as root refuses a service without "
        "user: (without it every such service would share the uid 'nobody'); write "
        "user: nobody to accept that, or a user of its own"
    ) in out
