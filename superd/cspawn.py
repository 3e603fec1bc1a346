"""glibc's posix_spawn through ctypes, for what os.posix_spawn cannot say.

``os.posix_spawn`` builds its signal sets with ``sigaddset``, which refuses
glibc's two internal signals (32 and 33); glibc's child then leaves them
*ignored* across exec, so every program would start with SigIgn bits set.
Calling posix_spawn directly lets superd put every signal, the internal
ones included, in the "set to default" set, and use
``posix_spawn_file_actions_addchdir_np`` for the working directory.

The attribute object (flags, signal sets) is built once per service and
reused; file actions are built per connection.  Everything runs in C: no
Python code runs in the child.  If libc lacks these symbols (not glibc),
``available`` is False and spawn.py falls back to ``os.posix_spawn``.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence

POSIX_SPAWN_RESETIDS = 0x01
POSIX_SPAWN_SETSIGDEF = 0x04
POSIX_SPAWN_SETSIGMASK = 0x08
POSIX_SPAWN_SETSID = 0x80
_SIGSET_BYTES = 128  # glibc's sigset_t: 1024 bits
_OPAQUE_BYTES = 1024  # more than glibc's posix_spawnattr_t / file_actions_t

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _spawn = _libc.posix_spawn
    _attr_init = _libc.posix_spawnattr_init
    _attr_setflags = _libc.posix_spawnattr_setflags
    _attr_setsigdefault = _libc.posix_spawnattr_setsigdefault
    _attr_setsigmask = _libc.posix_spawnattr_setsigmask
    _fa_init = _libc.posix_spawn_file_actions_init
    _fa_destroy = _libc.posix_spawn_file_actions_destroy
    _fa_dup2 = _libc.posix_spawn_file_actions_adddup2
    _fa_open = _libc.posix_spawn_file_actions_addopen
    _fa_chdir = _libc.posix_spawn_file_actions_addchdir_np
    available = True
except (OSError, AttributeError):
    available = False


def _all_signals() -> ctypes.Array[ctypes.c_char]:
    """A sigset_t holding signals 1..64, bits set directly (no sigaddset)."""
    buf = ctypes.create_string_buffer(_SIGSET_BYTES)
    ctypes.memmove(buf, (2 ** 64 - 1).to_bytes(8, "little"), 8)
    return buf


class Attributes:
    """posix_spawnattr_t for one service: new session, empty mask, all
    signals to default, and RESETIDS when superd switches identity."""

    def __init__(self, resetids: bool) -> None:
        self.buf = ctypes.create_string_buffer(_OPAQUE_BYTES)
        self._sigdef = _all_signals()
        self._mask = ctypes.create_string_buffer(_SIGSET_BYTES)
        flags = POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK
        if resetids:
            flags |= POSIX_SPAWN_RESETIDS
        _check(_attr_init(self.buf))
        _check(_attr_setflags(self.buf, ctypes.c_short(flags)))
        _check(_attr_setsigdefault(self.buf, self._sigdef))
        _check(_attr_setsigmask(self.buf, self._mask))


def encode_argv(argv: Sequence[str]) -> ctypes.Array[ctypes.c_char_p]:
    return (ctypes.c_char_p * (len(argv) + 1))(*[os.fsencode(a) for a in argv], None)


def spawn(path: bytes, argv: ctypes.Array[ctypes.c_char_p], env: Sequence[bytes],
          attrs: Attributes, stdio: int, stderr: int | None, cwd: bytes | None) -> int:
    """Start *path* with *stdio* on fds 0 and 1; return the pid or raise OSError."""
    envp = (ctypes.c_char_p * (len(env) + 1))(*env, None)
    actions = ctypes.create_string_buffer(_OPAQUE_BYTES)
    _check(_fa_init(actions))
    try:
        _check(_fa_dup2(actions, stdio, 0))
        _check(_fa_dup2(actions, stdio, 1))
        if stderr is None:
            _check(_fa_open(actions, 2, b"/dev/null", os.O_RDWR, 0))
        else:
            _check(_fa_dup2(actions, stderr, 2))
        if cwd is not None:
            _check(_fa_chdir(actions, cwd))
        pid = ctypes.c_int(0)
        _check(_spawn(ctypes.byref(pid), path, actions, attrs.buf, argv, envp), path)
        return pid.value
    finally:
        _fa_destroy(actions)


def _check(rc: int, path: bytes | None = None) -> None:
    """posix_spawn* return an errno value (not -1 with errno set)."""
    if rc != 0:
        if path is not None:
            raise OSError(rc, os.strerror(rc), os.fsdecode(path))
        raise OSError(rc, os.strerror(rc))
