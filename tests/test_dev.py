"""``./dev``: the two commands that take a fresh checkout to a running daemon
and to a test run.

Each test runs the real script on a copy of the checkout (what a fresh clone
holds, taken from the working tree so that uncommitted edits are tested), never
on this checkout's own ``.venv``.  One copy is set up once for the module (a
real venv and a real ``pip install -e``); the failure paths stop before
anything is installed.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, free_port, tcp_exchange, wait_until

SETUP_TIMEOUT = 600  # a venv and pip install from the registry, on a slow day
QUICK_TIMEOUT = 60
# what pip needs to install the project, and what ./dev run serves by default
PROJECT = ["dev", "pyproject.toml", "setup.py", "README.md", "superd", "man", "etc"]


def copy_checkout(dest: Path) -> Path:
    """The files of a fresh clone that ./dev and pip use, copied to *dest*."""
    dest.mkdir(mode=0o755)
    skip = shutil.ignore_patterns("__pycache__", "*.so", "superd-exec", "*.egg-info")
    for name in PROJECT:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=skip)
        else:
            shutil.copy2(src, dest / name)
    return dest


def dev(checkout: Path, *args: str, env: dict[str, str] | None = None,
        timeout: float = QUICK_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(checkout / "dev"), *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env=env, timeout=timeout)


@pytest.fixture
def checkout() -> Iterator[Path]:
    """A copy of the checkout, not set up."""
    top = Path(tempfile.mkdtemp(prefix="superd-dev-"))
    os.chmod(top, 0o755)
    yield copy_checkout(top / "superd")
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def installed() -> Iterator[tuple[Path, str]]:
    """A copy of the checkout after ``./dev setup``, and what setup printed."""
    top = Path(tempfile.mkdtemp(prefix="superd-dev-"))
    os.chmod(top, 0o755)
    try:
        tree = copy_checkout(top / "superd")
        result = dev(tree, "setup", timeout=SETUP_TIMEOUT)
        assert result.returncode == 0, result.stdout + result.stderr
        yield tree, result.stderr
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_dev_is_executable_and_ci_runs_exactly_dev_test() -> None:
    assert os.access(ROOT / "dev", os.X_OK)
    commands = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1] in ("./dev test", "exec ./dev test"), commands


@pytest.mark.parametrize("args", [["frobnicate"], []], ids=["unknown-verb", "no-verb"])
def test_unknown_verb_prints_usage_and_exits_2(checkout: Path, args: list[str]) -> None:
    result = dev(checkout, *args)
    assert result.returncode == 2, result.stderr
    assert "usage: ./dev run" in result.stderr
    assert "./dev test" in result.stderr
    assert not (checkout / ".venv").exists()


def test_python3_without_venv_module_names_python3_venv(checkout: Path) -> None:
    # Debian's python3 without python3-venv: no ensurepip, so -m venv fails
    fake = checkout.parent / "fakebin"
    fake.mkdir()
    (fake / "python3").write_text(textwrap.dedent(f"""\
        #!/bin/sh
        case "$*" in
          *ensurepip*|*"-m venv"*)
            echo "Traceback (most recent call last):" >&2
            echo "ModuleNotFoundError: No module named 'ensurepip'" >&2
            exit 1 ;;
        esac
        exec {sys.executable} "$@"
        """))
    os.chmod(fake / "python3", 0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    result = dev(checkout, "run", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "python3-venv" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (checkout / ".venv").exists()


def test_python3_too_old_says_which_is_needed(checkout: Path) -> None:
    fake = checkout.parent / "fakebin"
    fake.mkdir()
    (fake / "python3").write_text(textwrap.dedent("""\
        #!/bin/sh
        # Debian 11's python3, as far as ./dev can tell
        case "$*" in
          --version) echo "Python 3.9.2" ;;
          *) exit 1 ;;
        esac
        """))
    os.chmod(fake / "python3", 0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    result = dev(checkout, "run", env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "needs Python 3.11 or newer" in result.stderr
    assert "Python 3.9.2" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (checkout / ".venv").exists()


def test_no_python3_names_the_package(checkout: Path) -> None:
    bash = shutil.which("bash")
    assert bash is not None
    empty = checkout.parent / "emptybin"
    empty.mkdir()
    result = subprocess.run([bash, str(checkout / "dev"), "run"], capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=QUICK_TIMEOUT,
                            env={"PATH": str(empty), "HOME": str(checkout.parent)})
    assert result.returncode == 1, result.stdout + result.stderr
    assert "apt-get install python3 python3-venv" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (checkout / ".venv").exists()


def test_setup_installs_the_man_pages_with_the_package(installed: tuple[Path, str]) -> None:
    tree, said = installed
    venv = tree / ".venv"
    records = list(venv.glob("lib/python3*/site-packages/superd-*.dist-info/RECORD"))
    assert len(records) == 1, records
    record = records[0].read_text()
    # pip put them there (the editable install itself), not ./dev
    assert "share/man/man8/superd.8," in record
    assert "share/man/man5/superd.yaml.5," in record
    for page in ("man8/superd.8", "man5/superd.yaml.5"):
        installed_page = venv / "share" / "man" / page
        assert installed_page.read_bytes() == (tree / "man" / page.split("/")[1]).read_bytes()
    assert "man superd" in said.strip().splitlines()[-1]


def test_man_finds_the_pages_through_the_venv_bin_on_path(installed: tuple[Path, str]) -> None:
    man = shutil.which("man")
    if man is None:
        pytest.skip("man is not installed (Debian: man-db)")
    tree, _ = installed
    venv = tree / ".venv"
    env = {k: v for k, v in os.environ.items() if k not in ("MANPATH", "MANOPT")}
    env["PATH"] = f"{venv / 'bin'}:/usr/bin:/bin"
    for name, page in (("superd", "man8/superd.8"), ("superd.yaml", "man5/superd.yaml.5")):
        found = subprocess.run([man, "-w", name], capture_output=True, text=True, env=env,
                               timeout=QUICK_TIMEOUT)
        assert found.returncode == 0, found.stderr
        assert Path(found.stdout.strip()) == venv / "share" / "man" / page


def test_setup_again_reuses_the_install_until_the_packaging_changes(
        installed: tuple[Path, str]) -> None:
    tree, _ = installed
    stamp = tree / ".venv" / ".dev-installed"
    before = stamp.stat().st_mtime_ns
    again = dev(tree, "setup", timeout=SETUP_TIMEOUT)
    assert again.returncode == 0, again.stderr
    assert "installing" not in again.stderr
    assert stamp.stat().st_mtime_ns == before

    later = before / 1e9 + 60
    os.utime(tree / "setup.py", (later, later))
    changed = dev(tree, "setup", timeout=SETUP_TIMEOUT)
    assert changed.returncode == 0, changed.stderr
    assert "installing" in changed.stderr
    assert stamp.stat().st_mtime_ns != before


def test_run_execs_superd_so_its_signals_reach_it(installed: tuple[Path, str]) -> None:
    tree, _ = installed
    work = Path(tempfile.mkdtemp(prefix="superd-dev-run-"))
    os.chmod(work, 0o755)
    port = free_port()
    config = work / "superd.yaml"
    config.write_text(textwrap.dedent(f"""\
        control: {work}/control.sock
        services:
          echo:
            listen: 127.0.0.1:{port}
            internal: echo
        """))
    os.chmod(config, 0o644)
    log = work / "dev.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(tree / "dev"), "run", "-c", str(config)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=work)
    try:
        assert wait_until(lambda: "ready:" in log.read_text() or proc.poll() is not None,
                          30), log.read_text()
        assert proc.poll() is None, log.read_text()
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert argv[1] == bytes(tree / ".venv" / "bin" / "superd"), argv
        assert tcp_exchange(port, b"echo me") == b"echo me"
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()
        assert "man superd" in log.read_text()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)
        shutil.rmtree(work, ignore_errors=True)
