"""What the loop does when a handler raises: a bug costs what the handler owns.

Every descriptor in the loop's selector has a handler.  If one raises, the
loop logs the traceback (once per kind of handler and throttle window),
counts it, and *contains* it so that it never runs again for that
readiness, which is what keeps a bug from becoming a busy loop (the
descriptor stays readable, so a handler that raises before reading would
otherwise be called again at once):

- a handler with a ``failed()`` method decides itself (a listener backs
  off, a pending connection is refused and closed, a child is left to
  SIGCHLD);
- otherwise one with ``close()`` is closed (a session: its connection);
- otherwise the descriptor is unregistered and watched again after
  :data:`RETRY_SECONDS` (never lost, never spinning).

:class:`Handler` gives a plain function a ``failed()``.
"""

from __future__ import annotations

import errno
import logging
import selectors
from collections.abc import Callable

from superd.timers import Timers

log = logging.getLogger(__name__)

RETRY_SECONDS = 1.0

# accept() failing for lack of resources: every listener (services, control,
# metrics) stops watching its socket for this long instead of spinning
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
BACKOFF_SECONDS = 0.5


class Handler:
    """A selector callback with what to do if it raises."""

    __slots__ = ("run", "failed")

    def __init__(self, run: Callable[[int], None], failed: Callable[[], None]) -> None:
        self.run = run
        self.failed = failed

    def __call__(self, events: int) -> None:
        self.run(events)


def kind(handler: object) -> str:
    """A stable name for the kind of handler, for logs and throttling."""
    inner = getattr(handler, "run", handler)
    return getattr(inner, "__qualname__", None) or type(inner).__qualname__


def contain(selector: selectors.BaseSelector, timers: Timers,
            key: selectors.SelectorKey) -> None:
    """After *key*'s handler raised: make sure it cannot run again at once."""
    handler = key.data
    failed = getattr(handler, "failed", None) or getattr(handler, "close", None)
    if callable(failed):
        try:
            failed()
        except Exception:
            log.exception("internal error while containing %s", kind(handler))
    current = selector.get_map().get(key.fd)
    if current is None or current.data is not handler:
        return  # closed or re-registered by its owner
    selector.unregister(key.fd)  # the owner did not (or closed it without): watch it later

    def rewatch() -> None:
        if key.fd not in selector.get_map() and _open(key.fileobj):
            try:
                selector.register(key.fileobj, key.events, handler)
            except (OSError, ValueError):
                pass  # closed meanwhile
    timers.call_later(RETRY_SECONDS, rewatch)


def _open(fileobj: object) -> bool:
    fileno = getattr(fileobj, "fileno", None)
    return not callable(fileno) or fileno() >= 0
