"""Logging set-up, and the reader that turns a child's stderr into log lines."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time
from typing import TextIO

from superd.config import LogSettings

log = logging.getLogger("superd")
child_log = logging.getLogger("superd.child")
MAX_LINE = 4096

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
           "warning": logging.WARNING, "error": logging.ERROR}


class TextFormatter(logging.Formatter):
    """``LEVEL message``, with a timestamp unless journald adds its own."""

    def __init__(self, stamp: bool) -> None:
        super().__init__()
        self.stamp = stamp

    def format(self, record: logging.LogRecord) -> str:
        text = f"{record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
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
    """Send superd's log to stderr (or the configured file), replacing handlers."""
    if settings.target == "file" and settings.file:
        handler: logging.Handler = logging.FileHandler(settings.file)
        stamp = True
    elif settings.target == "syslog":
        handler = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        handler.ident = f"superd[{os.getpid()}]: "
        stamp = False
    else:
        out = stream or sys.stderr
        handler = logging.StreamHandler(out)
        stamp = not under_journal(out)
    if settings.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(stamp))
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    log.addHandler(handler)
    log.setLevel(_LEVELS[settings.level])
    log.propagate = False


def reopen() -> None:
    """SIGUSR1: reopen log files (after logrotate moved them)."""
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                if handler.stream:
                    handler.stream.close()
                handler.stream = handler._open()
            finally:
                handler.release()
    log.info("log files reopened")


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
