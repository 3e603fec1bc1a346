"""The Debian package (debian/), built, installed and used as a sysadmin would.

``dpkg-buildpackage -us -uc -b`` builds the .deb from a copy of the source
tree; ``apt-get install ./superd_*.deb`` installs it; then the installed
unit must verify with ``systemd-analyze verify`` as shipped, ``superd
check`` must pass on the shipped /etc/superd/superd.yaml (a conffile, no
service enabled), ``man`` must find both pages, and the installed
/usr/bin/superd must serve a service dropped into /etc/superd/conf.d/.
The package is purged afterwards.

Needs root (it installs a package) and the build tools ``./dev test``
installs as root (debhelper, dh-python, pybuild-plugin-pyproject); skips
with the reason otherwise.  Debian 12 machines in CI run no systemd, so
the unit is verified but never started: what systemd would do with
Type=notify, the watchdog and the hand-over is tested against superd run
by hand in tests/test_systemd.py, not through this unit.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, free_port, wait_until

# the system's tools and Python, never a virtualenv's or pyenv's
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
BUILD_DEPS = ("dpkg-buildpackage", "dh", "dh_python3", "apt-get")
BUILD_FILES = (("/usr/share/build-essential/essential-packages-list", "build-essential"),
               ("/usr/share/doc/python3-all-dev", "python3-all-dev"),
               ("/usr/lib/python3/dist-packages/setuptools/__init__.py", "python3-setuptools"),
               ("/usr/share/doc/pybuild-plugin-pyproject", "pybuild-plugin-pyproject"))
UNIT = Path("/lib/systemd/system/superd.service")
CONFIG = Path("/etc/superd/superd.yaml")
DROP_IN = Path("/etc/superd/conf.d/zz-test-debian.yaml")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "installs a Debian package: needs root"
    if not Path("/etc/debian_version").exists():
        return "not a Debian system"
    for tool in BUILD_DEPS:
        if shutil.which(tool, path=SYSTEM_PATH) is None:
            return f"needs {tool} (./dev test installs the package build tools as root)"
    for path, package in BUILD_FILES:
        if not Path(path).exists():
            return f"needs Debian's {package} (./dev test installs it as root)"
    if not (ROOT / "debian" / "control").exists():
        return "no debian/ directory in this tree"
    if subprocess.run(["dpkg-query", "-W", "-f=${Status}", "superd"], capture_output=True,
                      text=True).stdout.startswith("install ok"):
        return "a superd package is already installed here; not replacing it"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def _run(*cmd: str, cwd: Path | None = None,
         timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "DEBIAN_FRONTEND": "noninteractive",
           "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _source_copy(dest: Path) -> None:
    """The tracked and not-ignored files of this tree (no venv, no built parts)."""
    listed = subprocess.run(["git", "-c", f"safe.directory={ROOT}", "ls-files", "-co",
                             "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Build the .deb, install it, yield its path; purge the package after."""
    work = tmp_path_factory.mktemp("deb")
    tree = work / "superd"
    tree.mkdir()
    _source_copy(tree)
    built = _run("dpkg-buildpackage", "-us", "-uc", "-b", cwd=tree)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    [deb] = work.glob("superd_*.deb")
    try:
        inst = _run("apt-get", "install", "-y", "-q", f"./{deb.name}", cwd=work)
        assert inst.returncode == 0, inst.stdout[-3000:] + inst.stderr[-3000:]
        yield deb
    finally:
        DROP_IN.unlink(missing_ok=True)
        _run("apt-get", "purge", "-y", "-q", "superd")


def test_the_package_holds_what_a_sysadmin_expects(installed: Path) -> None:
    listing = _run("dpkg-deb", "--contents", str(installed)).stdout
    paths = {line.split()[-1] for line in listing.splitlines() if line.strip()}
    for path in ("./usr/bin/superd", "./lib/systemd/system/superd.service",
                 "./usr/share/man/man8/superd.8.gz", "./usr/share/man/man5/superd.yaml.5.gz",
                 "./etc/superd/superd.yaml", "./etc/superd/conf.d/"):
        assert path in paths, (path, listing)
    conffiles = _run("dpkg-query", "-W", "-f=${Conffiles}", "superd").stdout
    assert str(CONFIG) in conffiles, conffiles
    found = _run("man", "-w", "superd", "superd.yaml")
    assert found.returncode == 0, found.stderr
    assert "/usr/share/man/man8/superd.8" in found.stdout
    assert "/usr/share/man/man5/superd.yaml.5" in found.stdout


def test_the_installed_unit_verifies_as_shipped(installed: Path) -> None:
    if shutil.which("systemd-analyze", path=SYSTEM_PATH) is None:
        pytest.skip("needs systemd-analyze (Debian package systemd)")
    text = UNIT.read_text()
    assert "ExecStart=/usr/bin/superd run -c /etc/superd/superd.yaml" in text, text
    verify = _run("systemd-analyze", "verify", str(UNIT))
    assert verify.returncode == 0 and verify.stdout + verify.stderr == "", (
        verify.stdout + verify.stderr)


def test_check_passes_on_the_shipped_file_with_no_service(installed: Path) -> None:
    text = CONFIG.read_text()
    assert "conf.d" in text and "services: {}" in text
    check = _run("/usr/bin/superd", "check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"configuration {CONFIG}: OK" in check.stdout, check.stdout


def test_the_installed_superd_serves_a_drop_in_service(installed: Path) -> None:
    echo, hello = free_port(), free_port()
    DROP_IN.write_text("services:\n"
                       f"  deb-echo: {{listen: '127.0.0.1:{echo}', internal: echo}}\n"
                       f"  deb-hello: {{listen: '127.0.0.1:{hello}', exec: [/bin/echo, hi],"
                       " user: nobody}\n")
    os.chmod(DROP_IN, 0o644)
    check = _run("/usr/bin/superd", "check")
    assert check.returncode == 0 and "deb-hello" in check.stdout, check.stdout + check.stderr
    control = Path("/run/superd/control.sock")
    if control.exists():
        with socket.socket(socket.AF_UNIX) as probe:
            if probe.connect_ex(str(control)) == 0:
                pytest.skip("another superd answers on /run/superd/control.sock")
    log = installed.parent / "run.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(["/usr/bin/superd", "run"], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, env={"PATH": SYSTEM_PATH})
    try:
        assert wait_until(lambda: "ready:" in log.read_text() or proc.poll() is not None,
                          15), log.read_text()
        assert proc.poll() is None, log.read_text()
        assert "ready: 2 services, 2 listeners" in log.read_text()
        with socket.create_connection(("127.0.0.1", echo), timeout=10) as s:
            s.sendall(b"packaged")
            s.shutdown(socket.SHUT_WR)
            assert s.recv(100) == b"packaged"
        with socket.create_connection(("127.0.0.1", hello), timeout=10) as s:
            assert s.recv(100) == b"hi\n"
        # the package's own Python: the C spawn path was built into it
        assert "superd._spawn extension" in log.read_text(), log.read_text()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
