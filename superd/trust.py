"""Who may change what superd reads and starts when it runs as root.

sshd's StrictModes, applied to superd: a configuration file, an include
directory, and the program of a service must be changeable by no one but
the users the result runs as -- root for the configuration and for a
``user: root`` service, root or X for a service of user X.  The file itself
and every directory from ``/`` down to it must be owned by one of them and
not writable by group or others; a sticky directory (``/tmp``) may be
writable by others when the entry beneath it is owned by one of them.

Nothing is judged by path: the path is walked from ``/`` one component at a
time with ``openat(O_PATH|O_NOFOLLOW)``, each step judged by ``fstat`` of
the descriptor just opened.  A symlink is followed only once the directory
that holds it has passed (so only a trusted user chose where it points),
and a configuration file's bytes are read from the descriptor that was
judged, never from a second lookup of its name.

When superd does not run as root nothing here applies: it can hand out no
more than its own user has.
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
from dataclasses import dataclass
from types import TracebackType

MAX_SYMLINKS = 40  # as the kernel's own path walk (ELOOP past it)
_WRITABLE = stat.S_IWGRP | stat.S_IWOTH
_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class Untrusted(Exception):
    """Someone other than the trusted users could change this; says who and how."""


@dataclass(frozen=True)
class Trust:
    """The uids that may own what is judged, and how to name them in a message."""

    owners: frozenset[int]
    who: str


ROOT = Trust(frozenset({0}), "root")


def strict() -> bool:
    """The rules apply only when superd runs as root."""
    return os.geteuid() == 0


def read_config(path: str, limit: int, subject: str) -> bytes:
    """Up to *limit* + 1 bytes of the absolute *path*, judged as root's if strict.

    *subject* names the file in a message ("this file", or its path).  Raise
    :class:`Untrusted`, or OSError if it cannot be opened or read.
    """
    if not strict():
        with open(path, "rb") as f:
            return f.read(limit + 1)
    with _Walker(ROOT) as walk:
        name, _ = walk.to_last(path)
        fd = os.open(name, _READ, dir_fd=walk.fd)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        judge_file(st, subject, ROOT)
        return _read_fd(fd, limit + 1)
    finally:
        os.close(fd)


def check_dir(path: str) -> None:
    """As root, judge the directory *path* and each one above it; raise Untrusted."""
    if strict():
        with _Walker(ROOT) as walk:
            walk.into(path)


def program_problem(path: str, uid: int, user: str) -> str | None:
    """Why the program at absolute *path* may not run as *uid*, or None.

    Only root and that user may be able to change it or a directory above
    it; anyone else could choose what runs with the service's privileges.
    """
    trust = ROOT if uid == 0 else Trust(frozenset({0, uid}), f"root or {user}")
    try:
        with _Walker(trust) as walk:
            _, st = walk.to_last(path)
        judge_file(st, path, trust)
    except Untrusted as e:
        return f"exec: refused: the program runs as {user} and {e}"
    except OSError as e:
        return f"exec: cannot check {path}: {e.strerror}"
    return None


def unreachable(path: str, uid: int, groups: tuple[int, ...], user: str) -> str | None:
    """Why *user* could not execute the program at *path* (a directory on the
    way it may not search, or the file not executable for it), or None.

    Not a security rule (the kernel decides at exec) but the difference
    between ``check`` saying so and every client being closed in silence:
    ``user: nobody`` with a program under ``/root``, say.
    """
    if uid == 0:
        return None
    real = os.path.realpath(path)
    parts = _parts(real)
    for depth in range(len(parts) + 1):
        step = "/" + "/".join(parts[:depth])
        try:
            st = os.stat(step)
        except OSError:
            return None  # the exec check reports what is missing
        last = depth == len(parts)
        if not _may(st, uid, groups, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
            what = "execute" if last else "search"
            return (f"exec: {user} may not {what} {step} (mode "
                    f"{stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}, gid "
                    f"{st.st_gid}), so the program could never start")
    return None


def _may(st: os.stat_result, uid: int, groups: tuple[int, ...],
         u: int, g: int, o: int) -> bool:
    if st.st_uid == uid:
        return bool(st.st_mode & u)
    if st.st_gid in groups:
        return bool(st.st_mode & g)
    return bool(st.st_mode & o)


def judge_file(st: os.stat_result, subject: str, trust: Trust) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise Untrusted(f"{subject} is not a regular file")
    if st.st_uid not in trust.owners:
        raise Untrusted(f"{subject} is owned by uid {st.st_uid}, not {trust.who}")
    if st.st_mode & _WRITABLE:
        raise Untrusted(
            f"{subject} is writable by its group or others (mode {stat.S_IMODE(st.st_mode):04o})"
        )


def _read_fd(fd: int, most: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size < most:
        chunk = os.read(fd, min(most - size, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


class _Walker:
    """A directory descriptor walked down from ``/``, every step judged."""

    def __init__(self, trust: Trust) -> None:
        self.trust = trust
        self.fd = -1
        self.links = 0
        self._enter_root()

    def __enter__(self) -> _Walker:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def to_last(self, path: str) -> tuple[str, os.stat_result]:
        """Walk to the directory holding *path*'s last component; return the
        component's name there and its lstat.

        That is the last component once every symlink (checked) is followed,
        so it is never itself a symlink.
        """
        parts = _parts(path)
        while parts:
            name = parts.pop(0)
            st = self._step(os.open(name, _PATH, dir_fd=self.fd), name, parts, not parts)
            if st is not None:
                return name, st
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)

    def into(self, path: str) -> None:
        """Walk into the directory *path*, judging it and every one above it."""
        parts = _parts(path)
        while parts:
            name = parts.pop(0)
            self._step(os.open(name, _PATH, dir_fd=self.fd), name, parts, False)

    def _step(self, fd: int, name: str, parts: list[str], last: bool) -> os.stat_result | None:
        """Take one opened component: its lstat if it is the *last* and not a
        link; None once it has been entered (a directory) or followed (a link)."""
        try:
            st = os.fstat(fd)
            if name == "..":
                self._enter(fd, st, posixpath.dirname(self.path))
                return None
            self._judge_entry(st, name)
            if stat.S_ISLNK(st.st_mode):
                parts[:0] = self._follow(fd)
                return None
            if last:
                return st
            self._enter(fd, st, posixpath.join(self.path, name))
            return None
        finally:
            if fd != self.fd:
                os.close(fd)

    def _follow(self, link_fd: int) -> list[str]:
        """The components of the link's target; an absolute one restarts at ``/``."""
        self.links += 1
        if self.links > MAX_SYMLINKS:
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), self.path)
        target = os.readlink("", dir_fd=link_fd)
        if target.startswith("/"):
            self._enter_root()
        return _parts(target)

    def _enter_root(self) -> None:
        fd = os.open("/", _PATH | os.O_DIRECTORY)
        try:
            self._enter(fd, os.fstat(fd), "/")
        except BaseException:
            os.close(fd)
            raise

    def _enter(self, fd: int, st: os.stat_result, path: str) -> None:
        """Make the opened directory *fd* the current one, once it passes.
        The caller still owns *fd* if this raises."""
        self._judge_dir(st, path)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd, self.st, self.path = fd, st, path

    def _judge_dir(self, st: os.stat_result, path: str) -> None:
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        if st.st_uid not in self.trust.owners:
            raise Untrusted(f"directory {path} is owned by uid {st.st_uid}, not {self.trust.who}")
        if st.st_mode & _WRITABLE and not st.st_mode & stat.S_ISVTX:
            raise Untrusted(
                f"directory {path} is writable by its group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}) and not sticky"
            )

    def _judge_entry(self, st: os.stat_result, name: str) -> None:
        """In a sticky directory others can write, only the entry's owner can
        replace it: it must be trusted."""
        if self.st.st_mode & _WRITABLE and st.st_uid not in self.trust.owners:
            raise Untrusted(
                f"{posixpath.join(self.path, name)} is owned by uid {st.st_uid} in "
                f"{self.path}, a directory others can write; only {self.trust.who} "
                "may own what superd uses there"
            )
