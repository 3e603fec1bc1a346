"""systemd integration without libsystemd: sd_notify and socket activation.

``Notifier`` sends datagrams to ``$NOTIFY_SOCKET`` (a path, or an abstract
socket written with a leading ``@``).  ``handed_sockets()`` reads the
``LISTEN_FDS``/``LISTEN_PID``/``LISTEN_FDNAMES`` protocol.  Both read the
environment once at start-up; superd's children never see these variables.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3


class Notifier:
    """sd_notify(3).  Every method is a no-op when not under systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        self.sock: socket.socket | None = None
        if self.address:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.watchdog_usec = _watchdog_usec(env)

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    def detach(self) -> None:
        """Say nothing more (the main process is now another superd)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.watchdog_usec = None

    def send(self, *fields: str) -> None:
        if self.sock is None:
            return
        try:
            self.sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as e:
            log.warning("sd_notify to %s failed: %s", self.address.lstrip("\0"), e.strerror)

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half the timeout), or None."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None


@dataclass
class Handed:
    """A socket passed in by systemd (or by superd's own re-exec)."""

    sock: socket.socket
    name: str
    own: bool = False  # True: superd's own, handed over by its predecessor (SIGUSR2)


def handed_sockets(environ: Mapping[str, str] | None = None) -> list[Handed]:
    """The sockets of ``LISTEN_FDS`` if they are meant for this process.

    They are made close-on-exec and non-blocking at once, so no program
    superd starts can inherit them.
    """
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    from_predecessor = bool(env.get("SUPERD_READY_FD"))
    foreign = set(env.get("SUPERD_FOREIGN_FDS", "").split(","))
    result = []
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as e:
            log.warning("LISTEN_FDS: fd %d is not a usable socket: %s", fd, e.strerror)
            continue
        sock.setblocking(False)
        name = names[i] if i < len(names) else ""
        own = from_predecessor and str(i) not in foreign
        result.append(Handed(sock, "" if name in ("unknown", "stored") else name, own))
    return result
