"""``superd run --daemon``: the classic double fork, for hosts without systemd.

python-daemon's ``DaemonContext`` does the detaching (double fork, new
session, cwd ``/``, umask, closing inherited descriptors) and holds a
``TimeoutPIDLockFile``.  A pidfile naming a live process refuses the start;
a stale one (its process gone) is broken and replaced.  The pid file's
directory is checked (and made) by :mod:`superd.paths` first; the lock file
is then created ``O_CREAT|O_EXCL`` by lockfile, which never follows a symlink.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import IO

import daemon
import daemon.pidfile
import lockfile

from superd import paths


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
    """``/run/superd.pid`` as root, else in the runtime directory (paths.runtime_dir)."""
    return os.path.join(paths.runtime_dir(), "superd.pid")


@contextlib.contextmanager
def detached(pidfile: str, output: IO[str] | None) -> Iterator[None]:
    """Detach from the terminal holding *pidfile*; *output* takes stdout/stderr.
    Raise OSError (:class:`~superd.paths.UnsafePath`) if *pidfile*'s place is unsafe."""
    paths.check_file_place(pidfile)
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
    """Write our pid to *path* atomically (a successor after SIGUSR2 takes it
    over): a fresh O_EXCL|O_NOFOLLOW file in the checked directory, renamed."""
    paths.write_file(path, f"{os.getpid()}\n".encode())


def remove_pidfile_if_mine(path: str) -> None:
    if pidfile_holder(path) == os.getpid():
        with contextlib.suppress(OSError):
            os.unlink(path)
