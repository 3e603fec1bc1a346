"""``superd run --daemon``: the classic double fork, for hosts without systemd.

python-daemon's ``DaemonContext`` does the detaching (double fork, new
session, cwd ``/``, umask, closing inherited descriptors) and holds a
``TimeoutPIDLockFile``.  A pidfile naming a live process refuses the start;
a stale one (its process gone) is broken and replaced.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import IO

import daemon
import daemon.pidfile
import lockfile


def pidfile_holder(path: str) -> int | None:
    """The live process named in *path*, or None (absent, unreadable or stale)."""
    try:
        with open(path) as f:
            pid = int(f.read().strip() or "0")
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def default_pidfile() -> str:
    if os.geteuid() == 0:
        return "/run/superd.pid"
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/superd-{os.geteuid()}"
    return os.path.join(runtime, "superd.pid")


@contextlib.contextmanager
def detached(pidfile: str, output: IO[str] | None) -> Iterator[None]:
    """Detach from the terminal holding *pidfile*; *output* takes stdout/stderr."""
    lock = daemon.pidfile.TimeoutPIDLockFile(pidfile, acquire_timeout=0)
    if lock.is_locked() and pidfile_holder(pidfile) is None:
        lock.break_lock()
    context = daemon.DaemonContext(
        pidfile=lock, working_directory="/", umask=0o022, prevent_core=False,
        signal_map={}, stdout=output, stderr=output,
        files_preserve=[output] if output is not None else None)
    context.open()
    try:
        yield
    finally:
        with contextlib.suppress(lockfile.Error):
            context.close()  # NotMyLock after a hand-over: the successor owns it


def write_pidfile(path: str) -> None:
    """A successor (after SIGUSR2) takes over the pidfile, atomically."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def remove_pidfile_if_mine(path: str) -> None:
    if pidfile_holder(path) == os.getpid():
        with contextlib.suppress(OSError):
            os.unlink(path)
