"""Every path superd creates at run time, created safely.

superd runs as root, and the paths it makes (UNIX listening sockets, the
control socket, the pid file, the log file) live in directories other users
may reach.  One set of rules covers them all:

- A directory is opened from ``/`` one component at a time with
  ``O_PATH|O_NOFOLLOW`` and judged by ``fstat`` of what was opened: it must be
  owned by root or superd's euid, and writable by nobody else (others, or a
  group other than root's or superd's) unless it is sticky -- and then the
  entry superd uses beneath it must be superd's own.  A symbolic link on the
  way is followed only from such a directory (in a sticky one, only a link
  root or superd owns).  Missing directories are made 0755 (root) or 0700.
- A socket is born with its mode (the umask around ``bind``) and checked
  afterwards with ``lstat``; its owner, and any later change, go through an
  ``O_PATH`` descriptor of the very inode that was bound, never by path.
- Only a socket nobody listens on is removed, after a non-blocking probe;
  anything else at the path is refused and left alone.
- Files are opened ``O_NOFOLLOW`` relative to the checked directory.

A refusal is an :class:`UnsafePath` whose message names the path and why.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import socket
import stat
from collections import deque
from dataclasses import dataclass

Ident = tuple[int, int]  # (st_dev, st_ino) of a file superd made
Owner = tuple[int, int] | None

UNIX_PATH_MAX = 107  # sun_path is 108 bytes, NUL included
MAX_SYMLINKS = 40
_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LOG = (
    os.O_WRONLY
    | os.O_APPEND
    | os.O_CREAT
    | os.O_NOFOLLOW
    | os.O_CLOEXEC
    | os.O_NOCTTY
    | os.O_NONBLOCK
)  # O_NONBLOCK: a planted FIFO fails, never blocks
_TMP = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_HINT = (
    "set XDG_RUNTIME_DIR to a private directory of yours, or name the path "
    "yourself (control: in the configuration file, --pidfile)"
)


class UnsafePath(OSError):
    """superd refuses to create or touch a path; ``strerror`` says which and why."""

    def __init__(self, message: str, code: int = errno.EPERM) -> None:
        super().__init__(code, message)


@dataclass
class SafeDir:
    """An open, checked directory (an ``O_PATH`` descriptor)."""

    path: str
    fd: int
    shared: bool  # sticky and writable by others: entries must be superd's own

    def __enter__(self) -> SafeDir:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)

    def via_fd(self, name: str) -> str:
        """A name for *name* that resolves through this very directory."""
        path = f"/proc/self/fd/{self.fd}/{name}"
        return path if len(path.encode()) <= UNIX_PATH_MAX else os.path.join(self.path, name)


# --- the runtime directory of a non-root superd ----------------------------


def runtime_dir() -> str:
    """Where superd's runtime files go by default; nothing is created here.

    Root: ``/run``.  Others: ``$XDG_RUNTIME_DIR`` when set (and absolute),
    else ``/tmp/superd-UID``, which :func:`open_dir` accepts only as a
    private directory (mode 0700, owned by this uid)."""
    if os.geteuid() == 0:
        return "/run"
    return _xdg() or _fallback()


def _xdg() -> str | None:
    value = os.environ.get("XDG_RUNTIME_DIR", "")
    return value if value.startswith("/") else None


def _fallback() -> str:
    return f"/tmp/superd-{os.geteuid()}"


def _is_fallback(path: str) -> bool:
    return os.geteuid() != 0 and _xdg() is None and path == _fallback()


def _under_fallback(path: str) -> bool:
    return os.geteuid() != 0 and _xdg() is None and f"{path}/".startswith(f"{_fallback()}/")


# --- walking to a directory ---------------------------------------------------


def open_dir(path: str, create: bool = False) -> SafeDir:
    """Open the directory *path*, checking each directory from ``/`` (see the
    module docstring); with *create*, make the missing ones.  The caller closes
    it.  Raise :class:`UnsafePath`, or FileNotFoundError if it is missing."""
    path = _absolute(path)
    try:
        return _walk(path, create)
    except UnsafePath as e:
        if not _under_fallback(path):
            raise
        raise UnsafePath(f"{e.strerror}; {_HINT}", e.errno) from None


def _walk(path: str, create: bool) -> SafeDir:
    """Resolve *path* as the kernel would, one checked directory at a time."""
    todo = deque(_parts(path))
    stack = [_checked(os.open("/", _DIR), "/")]
    links = 0
    try:
        while todo:
            target = _step(stack, todo.popleft(), create)
            if target is not None:
                links = _follow(stack, todo, target, links, path)
        return stack.pop()
    finally:
        for d in stack:
            os.close(d.fd)


def _step(stack: list[SafeDir], name: str, create: bool) -> str | None:
    """Go into *name*: push its checked directory, or return a symlink's target."""
    if name == "..":
        if len(stack) > 1:
            os.close(stack.pop().fd)
        return None
    found = _enter(stack[-1], name, create)
    if isinstance(found, str):
        return found
    stack.append(found)
    return None


def _follow(stack: list[SafeDir], todo: deque[str], target: str, links: int, path: str) -> int:
    if links >= MAX_SYMLINKS:
        raise UnsafePath(f"{path}: too many symbolic links", errno.ELOOP)
    if target.startswith("/"):
        while len(stack) > 1:
            os.close(stack.pop().fd)
    todo.extendleft(reversed(_parts(target)))
    return links + 1


def _enter(top: SafeDir, name: str, create: bool) -> SafeDir | str:
    """The checked subdirectory *name* of *top*, or the target of a symlink there."""
    path = os.path.join(top.path, name)
    try:
        fd = os.open(name, _DIR, dir_fd=top.fd)
    except FileNotFoundError:
        if not create:
            raise FileNotFoundError(errno.ENOENT, f"directory {path} does not exist") from None
        fd = _make(top, name)
    except OSError as e:
        if e.errno not in (errno.ENOTDIR, errno.ELOOP):
            raise
        return _link(top, name, path)
    return _checked(fd, path)


def _make(top: SafeDir, name: str) -> int:
    with contextlib.suppress(FileExistsError):  # made meanwhile: judged like any other
        os.mkdir(name, 0o755 if os.geteuid() == 0 else 0o700, dir_fd=top.fd)
    return os.open(name, _DIR, dir_fd=top.fd)


def _link(top: SafeDir, name: str, path: str) -> str:
    st = os.lstat(name, dir_fd=top.fd)
    if not stat.S_ISLNK(st.st_mode):
        raise UnsafePath(f"{path} is {_kind(st.st_mode)}, not a directory", errno.ENOTDIR)
    if top.shared and not _mine(st.st_uid):
        raise UnsafePath(
            f"{path} is a symbolic link owned by uid {st.st_uid} in "
            f"{top.path}, a directory others can write; not followed"
        )
    return os.readlink(name, dir_fd=top.fd)


def _checked(fd: int, path: str) -> SafeDir:
    try:
        st = os.fstat(fd)
        _judge(st, path)
    except BaseException:
        os.close(fd)
        raise
    return SafeDir(path, fd, _shared(st))


def _judge(st: os.stat_result, path: str) -> None:
    mode = stat.S_IMODE(st.st_mode)
    if not _mine(st.st_uid):
        raise UnsafePath(
            f"directory {path} is owned by uid {st.st_uid}; superd creates "
            f"files only where root or uid {os.geteuid()} owns every directory"
        )
    if _shared(st) and not mode & stat.S_ISVTX:
        raise UnsafePath(
            f"directory {path} is writable by {_writers(st)} (mode {mode:04o}) "
            "and not sticky: anyone there could replace what superd creates"
        )
    if _is_fallback(path) and (st.st_uid != os.geteuid() or mode & 0o077):
        raise UnsafePath(
            f"directory {path} is not private (uid {st.st_uid}, mode "
            f"{mode:04o}; it must be uid {os.geteuid()}, mode 0700)"
        )


def _mine(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _shared(st: os.stat_result) -> bool:
    """Others may add, remove or rename entries (sticky or not)."""
    return bool(st.st_mode & stat.S_IWOTH or _group_writes(st))


def _group_writes(st: os.stat_result) -> bool:
    return bool(st.st_mode & stat.S_IWGRP) and st.st_gid not in (0, os.getegid())


def _writers(st: os.stat_result) -> str:
    return "others" if st.st_mode & stat.S_IWOTH else f"group {st.st_gid}"


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISFIFO, "a named pipe"),
    )
    return next((text for test, text in kinds if test(mode)), "a device")


def _absolute(path: str) -> str:
    return path if path.startswith("/") else os.path.join(os.getcwd(), path)


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p and p != "."]


def _split(path: str) -> tuple[str, str]:
    directory, name = os.path.split(_absolute(path))
    if name in ("", ".", ".."):
        raise UnsafePath(f"{path} does not name a file", errno.EISDIR)
    return directory, name


def _entry(d: SafeDir, name: str, path: str) -> os.stat_result | None:
    """lstat of *name*; in a directory others can write it must be superd's own."""
    try:
        st = os.lstat(name, dir_fd=d.fd)
    except FileNotFoundError:
        return None
    if d.shared and not _mine(st.st_uid):
        raise UnsafePath(
            f"{path} belongs to uid {st.st_uid}, in {d.path}, a directory "
            "others can write; superd leaves it alone"
        )
    return st


# --- UNIX sockets -------------------------------------------------------------


def bind_unix(path: str, kind: int, mode: int, owner: Owner = None) -> tuple[socket.socket, Ident]:
    """A non-blocking AF_UNIX socket bound at *path*, born with *mode*, given
    *owner*; with its identity on disk.  A stale socket file there is replaced;
    anything else is refused."""
    directory, name = _split(path)
    with open_dir(directory, create=True) as d:
        _remove_stale(d, name, path)
        sock = socket.socket(socket.AF_UNIX, kind)
        try:
            sock.setblocking(False)
            _bind_with_mode(sock, path, mode)
            ident = _bound(d, name, path)
            _change(d, name, path, ident, mode, owner)
        except BaseException:
            sock.close()
            raise
    return sock, ident


def _bind_with_mode(sock: socket.socket, path: str, mode: int) -> None:
    # The full path, not via_fd(): getsockname() must name the configured path
    # (a hand-over finds its listeners by it).  Every directory on the way was
    # just checked and no one else can change it; _bound() verifies the result.
    old = os.umask(~mode & 0o777)  # born with exactly *mode*: no looser window
    try:
        sock.bind(path)
    finally:
        os.umask(old)


def _bound(d: SafeDir, name: str, path: str) -> Ident:
    st = os.lstat(name, dir_fd=d.fd)
    if not stat.S_ISSOCK(st.st_mode):
        raise UnsafePath(f"{path} is {_kind(st.st_mode)} after bind, not the socket bound")
    return st.st_dev, st.st_ino


def set_mode_owner(path: str, ident: Ident, mode: int, owner: Owner) -> None:
    """Give the socket superd bound at *path* (*ident*) *mode* and *owner*,
    through a descriptor of that inode; refuse if the path now names anything else."""
    directory, name = _split(path)
    with open_dir(directory) as d:
        _change(d, name, path, ident, mode, owner)


def _change(d: SafeDir, name: str, path: str, ident: Ident, mode: int, owner: Owner) -> None:
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d.fd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode) or (st.st_dev, st.st_ino) != ident:
            raise UnsafePath(
                f"{path} is no longer the socket superd bound (it is "
                f"{_kind(st.st_mode)}); its mode and owner were left alone"
            )
        here = f"/proc/self/fd/{fd}"  # names exactly this inode, whatever the path says
        if owner is not None and (st.st_uid, st.st_gid) != owner:
            os.chown(here, *owner)
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(here, mode)
    finally:
        os.close(fd)


def socket_ident(path: str) -> Ident | None:
    """The identity of the socket file at *path* (one handed over to us), or None."""
    directory, name = _split(path)
    try:
        with open_dir(directory) as d:
            st = _entry(d, name, path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if st is not None and stat.S_ISSOCK(st.st_mode) else None


def remove_socket(path: str, ident: Ident) -> None:
    """Unlink *path* if it is still the socket superd bound; never raise."""
    directory, name = _split(path)
    with contextlib.suppress(OSError), open_dir(directory) as d:
        st = os.lstat(name, dir_fd=d.fd)
        if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == ident:
            os.unlink(name, dir_fd=d.fd)


def _remove_stale(d: SafeDir, name: str, path: str) -> None:
    """Remove a socket file nobody listens on; refuse anything else."""
    st = _entry(d, name, path)
    if st is None:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UnsafePath(
            f"{path} exists and is not a socket ({_kind(st.st_mode)}); superd leaves it alone",
            errno.EEXIST,
        )
    if _listening(d, name, path):
        raise UnsafePath(f"{path} is in use by another process", errno.EADDRINUSE)
    again = os.lstat(name, dir_fd=d.fd)
    if (again.st_dev, again.st_ino) == (st.st_dev, st.st_ino):
        os.unlink(name, dir_fd=d.fd)  # stale: left by a process that is gone


def _listening(d: SafeDir, name: str, path: str) -> bool:
    """Whether someone listens on socket *name*: a non-blocking connect, so a
    full backlog answers EAGAIN at once instead of freezing superd."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_UNIX, kind) as probe:
            probe.setblocking(False)
            code = probe.connect_ex(d.via_fd(name))
        # EPROTOTYPE: alive, of another type (SOCK_SEQPACKET, say); only a
        # socket nobody has bound refuses every kind of probe
        if code in (0, errno.EAGAIN, errno.EINPROGRESS, errno.EPROTOTYPE):
            return True
        if code != errno.ECONNREFUSED:
            raise UnsafePath(
                f"{path}: cannot tell whether anyone listens there "
                f"({os.strerror(code)}); left alone",
                code,
            )
    return False


def connect_unix(path: str, timeout: float) -> socket.socket:
    """A client's stream connection to *path*, only if the directories pass the
    rules above and the socket belongs to root or to us.  FileNotFoundError or
    ConnectionRefusedError: nobody there."""
    directory, name = _split(path)
    with open_dir(directory) as d:
        _vouch(os.lstat(name, dir_fd=d.fd), path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(d.via_fd(name))
        except BaseException:
            sock.close()
            raise
    return sock


def _vouch(st: os.stat_result, path: str) -> None:
    """A socket a client may talk to: root's or its own, nobody else's."""
    if not stat.S_ISSOCK(st.st_mode):
        raise UnsafePath(f"{path} is {_kind(st.st_mode)}, not a socket", errno.ENOTSOCK)
    if not _mine(st.st_uid):
        raise UnsafePath(
            f"{path} belongs to uid {st.st_uid}, neither root nor uid {os.geteuid()}: not asking it"
        )


# --- files ----------------------------------------------------------------------


def open_log(path: str) -> int:
    """A descriptor on log file *path* for appending (created 0640): never
    through a symlink, and only a regular file, in a directory that passes."""
    directory, name = _split(path)
    with open_dir(directory) as d:
        _entry(d, name, path)  # the clear message; fstat below closes the race
        try:
            fd = os.open(name, _LOG, 0o640, dir_fd=d.fd)
        except OSError as e:
            raise _open_error(e, path) from None
        try:
            _regular(os.fstat(fd), d, path)
        except BaseException:
            os.close(fd)
            raise
    os.set_blocking(fd, True)
    return fd


def _open_error(e: OSError, path: str) -> OSError:
    if e.errno == errno.ELOOP:
        return UnsafePath(f"{path} is a symbolic link; superd does not follow it", errno.ELOOP)
    return OSError(e.errno, f"{path}: {e.strerror}")


def _regular(st: os.stat_result, d: SafeDir, path: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePath(f"{path} is {_kind(st.st_mode)}, not a regular file")
    if d.shared and not _mine(st.st_uid):
        raise UnsafePath(
            f"{path} belongs to uid {st.st_uid}, in {d.path}, a directory "
            "others can write; superd leaves it alone"
        )
    if d.shared and st.st_nlink != 1:  # a hard link to a file of root's, say
        raise UnsafePath(
            f"{path} has {st.st_nlink} links, in {d.path}, a directory others "
            "can write; superd writes only to a file of its own"
        )


def write_file(path: str, data: bytes, mode: int = 0o644) -> None:
    """Replace *path* with *data* atomically: a new file (``O_EXCL|O_NOFOLLOW``)
    in the checked directory, renamed over it.  The directory is made if missing."""
    directory, name = _split(path)
    with open_dir(directory, create=True) as d:
        _entry(d, name, path)
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, _TMP, mode, dir_fd=d.fd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, name, src_dir_fd=d.fd, dst_dir_fd=d.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=d.fd)
            raise


def place_problem(path: str) -> str | None:
    """Why superd would refuse to create *path*, judged now without creating
    anything (for ``superd check`` and reloads), or None.  A directory still
    to be made is judged by the existing ones above it, as superd makes it."""
    try:
        directory, name = _split(path)
        with open_dir(directory) as d:
            _entry(d, name, path)
    except UnsafePath as e:
        return e.strerror
    except OSError:
        return None  # missing: made at run time under directories that passed
    return None


def check_file_place(path: str) -> None:
    """Before a library creates *path* by name (python-daemon's pid file):
    make and check its directory, and refuse anything but a regular file there."""
    directory, name = _split(path)
    with open_dir(directory, create=True) as d:
        st = _entry(d, name, path)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise UnsafePath(f"{path} is {_kind(st.st_mode)}, not a regular file")
