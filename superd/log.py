"""Logging set-up, and the reader that turns a child's stderr into log lines."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import logging.handlers
import os
import secrets
import socket
import sys
import time
from typing import TextIO

from superd import paths
from superd.config import LogSettings

log = logging.getLogger("superd")
child_log = logging.getLogger("superd.child")
MAX_LINE = 4096

_JOURNAL_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
                     logging.ERROR: 3, logging.CRITICAL: 2}
# How client addresses appear in log lines (log.client_address); set by setup().
_policy = {"client_address": "full", "key": secrets.token_bytes(16)}

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
           "warning": logging.WARNING, "error": logging.ERROR}


class SafeFileHandler(logging.FileHandler):
    """A FileHandler whose file is opened by :func:`superd.paths.open_log`:
    ``O_APPEND|O_NOFOLLOW``, mode 0640, a regular file in a directory that
    passes superd's rules; OSError (naming the path) otherwise."""

    def _open(self) -> TextIO:
        fd = paths.open_log(self.baseFilename)
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


class TextFormatter(logging.Formatter):
    """``LEVEL message``, with a timestamp unless journald adds its own."""

    def __init__(self, stamp: bool, journal: bool = False) -> None:
        super().__init__()
        self.stamp = stamp
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if self.journal:  # journald reads <N> as the syslog priority (journalctl -p)
            return f"<{_JOURNAL_PRIORITY.get(record.levelno, 6)}>{text}"
        if self.stamp:
            when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
            text = f"{when} superd[{os.getpid()}] {text}"
        return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("service", "pid", "client", "status", "duration"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        return json.dumps(entry)


def under_journal(stream: TextIO) -> bool:
    """True when *stream* is connected to journald (JOURNAL_STREAM matches)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return bool(value) and f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


def setup(settings: LogSettings, stream: TextIO | None = None) -> None:
    """Send superd's log to stderr (or the configured file), replacing handlers.
    Raise OSError if the log file cannot be opened safely."""
    journal = False
    syslog = syslog_handler() if settings.target == "syslog" else None
    if settings.target == "file" and settings.file:
        handler: logging.Handler = SafeFileHandler(settings.file)
        stamp = True
    elif syslog is not None:
        handler = syslog
        stamp = False
    else:
        out = stream or sys.stderr
        handler = logging.StreamHandler(out)
        journal = under_journal(out)
        stamp = not journal
    if settings.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(stamp, journal))
    _policy["client_address"] = settings.client_address
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    log.addHandler(handler)
    log.setLevel(_LEVELS[settings.level])
    log.propagate = False
    if settings.target == "syslog" and syslog is None:
        log.warning("log: no syslog listens on %s here; logging to stderr instead",
                    SYSLOG_SOCKET)


SYSLOG_SOCKET = "/dev/log"


def syslog_handler() -> logging.Handler | None:
    """A handler for the local syslog, or None if nothing listens on /dev/log
    (then every line would print a logging traceback of its own)."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(SYSLOG_SOCKET)
            except OSError:
                continue
        handler = logging.handlers.SysLogHandler(
            address=SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_DAEMON,
            socktype=kind)
        handler.ident = f"superd[{os.getpid()}]: "
        return handler
    return None


def client_text(peer: str) -> str:
    """A client address as log lines show it: full, a keyed hash, or hidden.

    The hash is an HMAC with a key made at start-up: stable while superd
    runs (lines about one client can be matched), not reversible by trying
    every IPv4 address.  The port is dropped along with the address.
    """
    policy = _policy["client_address"]
    if policy == "full":
        return peer
    if policy == "none":
        return "client"
    host = peer.rsplit(":", 1)[0] if peer.count(":") == 1 or peer.startswith("[") else peer
    key = _policy["key"]
    assert isinstance(key, bytes)
    digest = hmac.new(key, host.encode(), hashlib.sha256).hexdigest()[:12]
    return f"client-{digest}"


def rule_text(rule: str) -> str:
    """An allow/deny rule as logs show it: hidden unless client addresses are
    logged in full (a /32 rule would name the client)."""
    return rule if _policy["client_address"] == "full" else "an access rule"


def reopen() -> None:
    """SIGUSR1: reopen log files (after logrotate moved them).  A file that
    cannot be reopened safely is reported, and the old one kept."""
    handlers = [h for h in log.handlers if isinstance(h, logging.FileHandler)]
    if all([_reopen(h) for h in handlers]):
        log.info("log files reopened")


def _reopen(handler: logging.FileHandler) -> bool:
    try:
        stream = handler._open()
    except OSError as e:
        log.error("log file %s not reopened: %s; still writing to the old one",
                  handler.baseFilename, e.strerror or e)
        return False
    handler.acquire()
    try:
        old, handler.stream = handler.stream, stream
    finally:
        handler.release()
    if old:
        old.close()
    return True


class StderrReader:
    """Reads a child's stderr pipe; each line becomes a tagged log record."""

    def __init__(self, fd: int, service: str, pid: int) -> None:
        self.fd = fd
        self.service = service
        self.pid = pid
        self.partial = b""

    def read(self) -> bool:
        """Read what is there; False at end of file (the caller closes)."""
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            if self.partial:
                self._emit(self.partial)
                self.partial = b""
            return False
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        if len(self.partial) > MAX_LINE:
            self._emit(self.partial)
            self.partial = b""
        for line in lines:
            self._emit(line)
        return True

    def _emit(self, line: bytes) -> None:
        text = line[:MAX_LINE].decode("utf-8", "replace").rstrip("\r")
        child_log.info("%s[%d]: %s", self.service, self.pid, text,
                          extra={"service": self.service, "pid": self.pid})
