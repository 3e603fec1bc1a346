"""``superd check`` run by a user other than root refuses what would fail.

Not as root, superd can bind no port below the kernel's
``net.ipv4.ip_unprivileged_port_start`` (unless it holds
CAP_NET_BIND_SERVICE) and can start programs under no identity but its own.
A file that asks for either is refused, ``FILE:LINE:COL: message``, instead
of noted.  As root the same files pass, as before.

The suite runs as root; each check runs as the real unprivileged user
``nobody`` (uid 65534, no other groups), on a file in a directory nobody may
read.  setpriv rather than runuser: the interpreter may live under a directory
nobody cannot search (/root/.pyenv); setpriv drops the ids only at exec.
"""

from __future__ import annotations

import os
import pwd
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import distinct_ports, free_port, run_superd

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root to run superd check as the user nobody")

NOBODY = pwd.getpwnam("nobody")
AS_NOBODY = ["setpriv", f"--reuid={NOBODY.pw_uid}", f"--regid={NOBODY.pw_gid}",
             "--clear-groups"]
# with CAP_NET_BIND_SERVICE kept across exec (as systemd's AmbientCapabilities= does)
WITH_BIND_CAP = ["--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service"]


def unprivileged_port_start() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())


LOW = unprivileged_port_start() - 1  # the highest port only root may bind


def write(tmp_path: Path, text: str) -> tuple[Path, str]:
    """*text* (dedented) as superd.yaml in a directory nobody can read and
    enter, but not change."""
    os.chmod(tmp_path, 0o755)
    text = textwrap.dedent(text)
    path = tmp_path / "superd.yaml"
    path.write_text(text)
    os.chmod(path, 0o644)
    return path, text


def check_as_nobody(path: Path, *setpriv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*AS_NOBODY, *setpriv, sys.executable, "-m", "superd", "check", "-c", str(path)],
        capture_output=True, text=True, timeout=60, cwd=str(path.parent),
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"})


def locate(text: str, needle: str) -> tuple[int, int]:
    index = text.index(needle)
    return text.count("\n", 0, index) + 1, index - text.rfind("\n", 0, index)


def refusals(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert re.fullmatch(r"superd: \d+ problem\(s\) in the configuration", lines[-1]), lines
    return lines[:-1]


def at(path: Path, text: str, needle: str, message: str) -> str:
    line, col = locate(text, needle)
    return f"{path}:{line}:{col}: {message}"


def low_port_message(port: int) -> str:
    return (f"port {port} is below {LOW + 1} (net.ipv4.ip_unprivileged_port_start): "
            "only root or a process with CAP_NET_BIND_SERVICE may listen on it, and "
            f"superd runs as nobody (uid {NOBODY.pw_uid}); run superd as root, or choose "
            f"a port of {LOW + 1} or above")


@pytest.fixture(autouse=True)
def _ports_below_the_start() -> None:
    if LOW < 1:
        pytest.skip("net.ipv4.ip_unprivileged_port_start is 0: any user may bind any port")


def test_a_port_only_root_may_bind_is_an_error(tmp_path: Path) -> None:
    high = free_port()
    path, text = write(tmp_path, f"""\
        services:
          web:
            listen: 127.0.0.1:{LOW}
            exec: [/bin/cat]
          pair:
            listen: [127.0.0.1:{high}, "[::1]:{LOW}"]
            exec: [/bin/cat]
          echo:
            internal: echo
        """)
    found = refusals(check_as_nobody(path))
    assert found == [  # in the order of the file
        at(path, text, f"127.0.0.1:{LOW}", f"listen: {low_port_message(LOW)}"),
        at(path, text, f'"[::1]:{LOW}"', f"listen: {low_port_message(LOW)}"),
        at(path, text, "echo:",
           "service 'echo': no listen: given, so it listens on port 7 (echo in "
           f"/etc/services), and {low_port_message(7)}"),
    ], "\n".join(found)


def test_a_user_other_than_ones_own_is_an_error(tmp_path: Path) -> None:
    ports = distinct_ports(4)
    path, text = write(tmp_path, f"""\
        defaults:
          user: daemon
        services:
          cat:
            listen: 127.0.0.1:{ports[0]}
            exec: [/bin/cat]
            user: root
          dog:
            listen: 127.0.0.1:{ports[1]}
            exec: [/bin/cat]
          own:
            listen: 127.0.0.1:{ports[2]}
            exec: [/bin/cat]
            user: nobody
            group: root
          echo:
            listen: 127.0.0.1:{ports[3]}
            internal: echo
        """)
    found = refusals(check_as_nobody(path))
    tail = (f"superd runs as nobody (uid {NOBODY.pw_uid}), not as root, and starts "
            "programs only as itself; run superd as root, or write user: nobody "
            "(or no user:)")
    group_tail = (f"superd runs as nobody with group nogroup ({NOBODY.pw_gid}), not as "
                  "root, and starts programs only with its own group; run superd as "
                  "root, or remove group:")
    assert found == [  # in the order of the file; dog's user comes from defaults:
        at(path, text, "root\n", f"service 'cat': user: root cannot be given: {tail}"),
        at(path, text, "root\n  echo:",
           f"service 'own': group: root cannot be given: {group_tail}"),
    ], "\n".join(found)  # the internal service runs inside superd: no user applies


def test_a_user_from_defaults_is_not_applied_and_said(tmp_path: Path) -> None:
    """A file written for root (``defaults: {user: nobody}``, as etc/superd.yaml
    has) tried by an ordinary user: its services run as that user, and check
    says so; only a service that names a user itself is refused."""
    path, _ = write(tmp_path, f"""\
        defaults:
          user: daemon
        services:
          dog:
            listen: 127.0.0.1:{free_port()}
            exec: [/bin/cat]
        """)
    result = check_as_nobody(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert ("note: dog: user: daemon from defaults: is not applied: superd does not run as "
            "root, so its programs run as nobody") in result.stdout, result.stdout


def test_what_nobody_can_do_passes_without_a_note(tmp_path: Path) -> None:
    path, _ = write(tmp_path, f"""\
        services:
          cat:
            listen: 127.0.0.1:{free_port()}
            exec: [/bin/cat]
            user: nobody
          off:
            listen: 127.0.0.1:{LOW}
            exec: [/bin/cat]
            enabled: false
        """)
    result = check_as_nobody(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    assert "note:" not in result.stdout, result.stdout
    assert re.search(r"^  cat .* nobody +/bin/cat$", result.stdout, re.M), result.stdout


def test_cap_net_bind_service_lets_a_user_listen_on_low_ports(tmp_path: Path) -> None:
    path, _ = write(tmp_path, f"""\
        services:
          web:
            listen: 127.0.0.1:{LOW}
            exec: [/bin/cat]
        """)
    assert refusals(check_as_nobody(path))  # without the capability: refused
    result = check_as_nobody(path, *WITH_BIND_CAP)
    assert result.returncode == 0, result.stdout + result.stderr


def test_root_is_unchanged(tmp_path: Path) -> None:
    """The same ports and users as root: accepted, as they always were."""
    path, _ = write(tmp_path, f"""\
        services:
          web:
            listen: 127.0.0.1:{LOW}
            exec: [/bin/cat]
            user: root
          cat:
            listen: 127.0.0.1:{free_port()}
            exec: [/bin/cat]
            user: daemon
            group: root
          echo:
            internal: echo
        """)
    result = run_superd("check", "-c", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "note:" not in result.stdout


def test_a_socket_owner_other_than_ones_own_is_an_error(tmp_path: Path) -> None:
    """Before, not as root, ``owner:`` naming someone else passed check and
    the listener then failed to bind (EPERM) for ever, retrying."""
    path, text = write(tmp_path, """\
        services:
          local:
            listen: /tmp/superd-never-bound/s.sock
            internal: echo
            owner: "root:root"
        """)
    found = refusals(check_as_nobody(path))
    assert found == [at(path, text, '"root:root"', (
        "owner: root:root cannot be given: superd does not run as root, so its sockets "
        "can belong only to its own user and one of its groups"))], "\n".join(found)
