"""Validation of each configuration value, one function per kind of value.

A :class:`Reader` turns a YAML node into a Python value or records a
problem at the node's position and returns None.  ``service()`` builds one
:class:`~superd.config.Service` from its items and ``defaults:``.
"""

from __future__ import annotations

import difflib
import functools
import grp
import ipaddress
import math
import os
import pwd
import re
import resource
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import yaml

from superd import paths, trust
from superd.errors import ConfigProblem
from superd.yamlfile import Where, kind, mapping_items, scalar, where

T = TypeVar("T")

SERVICE_KEYS = (
    "listen", "protocol", "exec", "internal", "wait", "user", "group", "env",
    "pass_env", "cwd", "umask", "nice", "rlimits", "timeout", "kill_grace",
    "max_connections", "per_source", "source_prefix", "rate", "burst", "on_limit",
    "reject_message", "allow", "deny", "stderr", "proxy_protocol",
    "proxy_from", "proxy_timeout", "backlog", "reuseport", "keepalive",
    "nodelay", "mode", "owner", "enabled", "idle_timeout", "reply_rate",
)
# Parsed and validated, but not acted on yet by this version.
NOT_ENFORCED: frozenset[str] = frozenset()
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RLIMITS = {
    "nofile": resource.RLIMIT_NOFILE, "nproc": resource.RLIMIT_NPROC,
    "cpu": resource.RLIMIT_CPU, "as": resource.RLIMIT_AS,
    "fsize": resource.RLIMIT_FSIZE, "core": resource.RLIMIT_CORE,
    "data": resource.RLIMIT_DATA, "stack": resource.RLIMIT_STACK,
    "memlock": resource.RLIMIT_MEMLOCK,
}
SIZE_RLIMITS = frozenset({"as", "fsize", "core", "data", "stack", "memlock"})
# The largest finite limit (rlim_t is 64 bits; all ones is RLIM_INFINITY, and
# Python's setrlimit takes a signed 64-bit value).
MAX_RLIMIT = 2**63 - 1
MAX_SECONDS = 365 * 86400  # durations: more than 0, at most a year
MAX_RATE = 1_000_000.0  # connections (or replies) a second
MIN_RATE = 1e-6  # about one every 11.6 days: 1/rate is a delay on the timer heap
# No number superd takes is written with more characters than this; longer
# ones are refused unread (int() of 5,000 digits raises, and YAML 1.1's
# base-60 "1:2:3..." of 200,000 parts takes minutes to compute).
MAX_NUMBER_TEXT = 40
_SIZE = re.compile(r"^(\d+)\s*([KMGT]?)i?B?$", re.IGNORECASE)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# rate: COUNT/PERIOD, PERIOD a unit or a number of seconds: 40/min, 40/60
_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*/\s*(?:(\d+(?:\.\d+)?)|(s|second|min|minute|h|hour))")
_PERIODS = {"s": 1, "second": 1, "min": 60, "minute": 60, "h": 3600, "hour": 3600}
NOT_A_RATE = ("{key}: '{text}' is not a rate: write a number a second, or COUNT/PERIOD "
              "such as 40/min (PERIOD: s, min, h or a number of seconds)")
BURST_NEEDS_RATE = ("burst: needs rate: (burst is how many connections the rate lets "
                    "start at once)")
CAP_NET_BIND_SERVICE = 10  # the capability's bit in /proc/self/status CapEff
USER_REQUIRED = (
    "service '{name}': user: is required when superd runs as root (without it every "
    "such service would share one uid, 'nobody', and could read each other's "
    "environment and signal each other's programs); write user: nobody to accept "
    "that, or a user of its own")
INTERNAL_UNIX_DGRAM = (
    "service '{name}': internal services do not listen on UNIX datagram paths: a "
    "datagram's sender names the path its reply goes to, and can point it at any "
    "socket superd may write to (superd answers only IPv4 and IPv6 peers)")
_PRIVATE_ENV = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                "WATCHDOG_USEC", "WATCHDOG_PID")


@dataclass(frozen=True)
class Item:
    """One ``key: value`` of a service, with the file it was written in."""

    file: str
    key: yaml.Node
    value: yaml.Node


def unknown(key: str, known: tuple[str, ...] | frozenset[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown key '{key}'{hint}"


def is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null")


def _number(text: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts '²', which int() refuses."""
    return text.isascii() and text.isdigit()


def valid_name(name: str) -> bool:
    return bool(_NAME.match(name))


class Reader:
    """Turns nodes of one file into values, recording problems."""

    def __init__(self, file: str, problems: list[ConfigProblem]) -> None:
        self.file = file
        self.problems = problems

    def error(self, node: yaml.Node, message: str) -> None:
        self.problems.append(where(node, self.file).problem(message))

    def opt(self, node: yaml.Node | None, parse: Callable[[yaml.Node, str], T],
            key: str) -> T | None:
        if node is None or is_null(node):
            return None
        return parse(node, key)

    def _scalar(self, node: yaml.Node, key: str, tags: tuple[str, ...],
                want: str) -> Any:
        if isinstance(node, yaml.ScalarNode) and node.tag.rsplit(":", 1)[-1] in tags:
            if too_long(node) and node.tag.rsplit(":", 1)[-1] in ("int", "float"):
                self.error(node, f"{key}: {_shown(node.value)} is out of range")
                return None
            return scalar(node)
        self.error(node, f"{key}: expected {want}, got {kind(node)}")
        return None

    def string(self, node: yaml.Node, key: str) -> str | None:
        # as written, never constructed: `user: 1:2:3...` is a YAML 1.1 number
        if isinstance(node, yaml.ScalarNode) and node.tag.rsplit(":", 1)[-1] in (
                "str", "int", "float"):
            if "\0" in node.value:  # no path, argument or variable can hold one
                self.error(node, f"{key}: a NUL character is not allowed here")
                return None
            return str(node.value)
        self.error(node, f"{key}: expected a string, got {kind(node)}")
        return None

    def boolean(self, node: yaml.Node, key: str) -> bool | None:
        return self._scalar(node, key, ("bool",), "true or false")

    def integer(self, node: yaml.Node, key: str, low: int, high: int) -> int | None:
        value = self._scalar(node, key, ("int",), "a whole number")
        if value is not None and not low <= value <= high:
            self.error(node, f"{key}: {value} is out of range {low}..{high}")
            return None
        return value

    def positive_int(self, node: yaml.Node, key: str) -> int | None:
        return self.integer(node, key, 1, 1_000_000)

    def seconds(self, node: yaml.Node, key: str) -> float | None:
        value = self._scalar(node, key, ("int", "float"), "a number of seconds")
        if value is None:
            return None
        if not math.isfinite(value):
            self.error(node, f"{key}: {value} is not a finite number of seconds")
        elif value <= 0:
            self.error(node, f"{key}: {value} must be more than 0 seconds")
        elif value > MAX_SECONDS:
            self.error(node, f"{key}: {value} is out of range: at most {MAX_SECONDS} "
                             "seconds (365 days)")
        else:
            return float(value)
        return None

    def per_second(self, node: yaml.Node, key: str, what: str) -> float | None:
        """A rate: finite, at least MIN_RATE (1/rate is a delay), at most MAX_RATE."""
        value = self._scalar(node, key, ("int", "float"), f"{what} per second")
        if value is not None and not MIN_RATE <= value <= MAX_RATE:
            self.error(node, f"{key}: {value} is out of range: at least {MIN_RATE:f}, "
                             f"at most {MAX_RATE:.0f} {what} per second")
            return None
        return None if value is None else float(value)

    def choice(self, node: yaml.Node, key: str, options: tuple[str, ...]) -> str | None:
        value = self._scalar(node, key, ("str",), "one of " + ", ".join(options))
        if value is not None and value not in options:
            self.error(node, f"{key}: '{value}' is not one of {', '.join(options)}")
            return None
        return value

    def octal(self, node: yaml.Node, key: str, high: int) -> int | None:
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":int"):
            if too_long(node):
                self.error(node, f"{key}: {_shown(node.value)} is not an octal mode "
                                 f"up to {high:o}")
                return None
            self.error(node, f'{key}: write it as a quoted octal string such as '
                             f'"{node.value.zfill(3)}" (unquoted, YAML reads '
                             f'{node.value} as the number {scalar(node)})')
            return None
        text = self.string(node, key)
        if text is None:
            return None
        if not re.fullmatch(r"0?[0-7]{1,4}", text) or int(text, 8) > high:
            self.error(node, f"{key}: '{text}' is not an octal mode up to {high:o}")
            return None
        return int(text, 8)

    def str_list(self, node: yaml.Node, key: str) -> list[str] | None:
        nodes = node.value if isinstance(node, yaml.SequenceNode) else [node]
        values = [self.string(n, key) for n in nodes]
        return None if None in values else [v for v in values if v is not None]

    def abs_path(self, node: yaml.Node, key: str) -> str | None:
        text = self.string(node, key)
        if text is not None and not os.path.isabs(text):
            self.error(node, f"{key}: '{text}' must be an absolute path")
            return None
        return text

    def created_path(self, node: yaml.Node, key: str) -> str | None:
        """An absolute path superd will create (a socket, the log file): its
        directory must pass the rules of :mod:`superd.paths`."""
        text = self.abs_path(node, key)
        problem = None if text is None else paths.place_problem(text)
        if problem is not None:
            self.error(node, f"{key}: refused: {problem}")
            return None
        return text

    def networks(self, node: yaml.Node, key: str) -> tuple[Any, ...] | None:
        texts = self.str_list(node, key)
        if texts is None:
            return None
        nets = []
        for text in texts:
            try:
                net = ipaddress.ip_network(text, strict=False)
                mapped = net.network_address.ipv4_mapped if net.version == 6 else None
                if mapped is not None and net.prefixlen >= 96:
                    # clients on dual-stack sockets are matched as IPv4: so are rules
                    net = ipaddress.ip_network(f"{mapped}/{net.prefixlen - 96}")
                nets.append(net)
            except ValueError:
                self.error(node, f"{key}: '{text}' is not an address or CIDR")
        return tuple(nets)

    def metrics_addr(self, node: yaml.Node, key: str) -> Any:
        from superd.config import ListenAddr

        text = self.string(node, key)
        if text is None:
            return None
        parsed = parse_listen(text, "tcp")
        if isinstance(parsed, str) or parsed.path is not None:
            self.error(node, f"{key}: {parsed if isinstance(parsed, str) else 'use ADDR:PORT'}")
            return None
        return ListenAddr(parsed.host, parsed.port)


def parse_listen(text: str, protocol: str | None) -> Any:
    """A ListenAddr for *text*, or a message saying what is wrong."""
    from superd.config import ListenAddr

    text = text.strip()
    if text.startswith("/"):
        return ListenAddr(path=os.path.normpath(text))
    host: str | None
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            return f"'{text}': write an IPv6 address as [ADDR]:PORT"
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    elif ":" in text:
        return f"'{text}': write an IPv6 address as [ADDR]:PORT"
    else:
        host, port = None, text
    if host in ("", "*"):
        host = None
    if host is not None:
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            return f"'{host}' is not an IP address (superd does not resolve host names)"
    number = port_number(port, protocol)
    if isinstance(number, str):
        return number
    return ListenAddr(host=host, port=number)


def port_number(port: str, protocol: str | None) -> int | str:
    if _number(port):
        value = int(port) if len(port) <= MAX_NUMBER_TEXT else 0  # int() of 5,000 digits raises
        return value if 0 < value < 65536 else f"port {_shown(port)} is out of range 1..65535"
    try:
        if protocol is None:
            return socket.getservbyname(port)
        return socket.getservbyname(port, protocol)
    except (OSError, ValueError):
        return f"'{port}' is not a port number or a service name in /etc/services"


def listen_conflicts(services: list[Any]) -> list[ConfigProblem]:
    """No two listen addresses (of one service or two) may overlap.

    A bare port (every address, dual-stack) overlaps any address on that
    port; ``0.0.0.0`` overlaps every IPv4 address, ``::`` every IPv6 one.
    """
    problems: list[ConfigProblem] = []
    taken: dict[tuple[str, Any], list[tuple[str | None, Any]]] = {}
    for svc in services:
        if not svc.enabled:
            continue
        for addr in svc.listen:
            slot = (svc.protocol, addr.path or addr.port)
            clash = next((other for host, other in taken.get(slot, [])
                          if addr.path or _overlap(host, addr.host)), None)
            if clash is not None:
                w = svc.where
                whose = "itself" if clash is svc else f"service '{clash.name}'"
                problems.append(ConfigProblem(
                    w.file, w.line, w.col,
                    f"service '{svc.name}' listens on {addr}/{svc.protocol}, "
                    f"which overlaps {whose}"))
            taken.setdefault(slot, []).append((addr.host, svc))
    return problems


def _overlap(a: str | None, b: str | None) -> bool:
    if a is None or b is None or a == b:
        return True
    va, vb = ipaddress.ip_address(a), ipaddress.ip_address(b)
    if va.version != vb.version:
        return False
    return va.is_unspecified or vb.is_unspecified


def service(name: str, entry: tuple[Where, dict[str, Item]],
            defaults: dict[str, Item], problems: list[ConfigProblem]) -> Any:
    """Build one Service, or None if it has problems (recorded)."""
    from superd.config import Service

    place, own = entry
    items = {**defaults, **own}
    before = len(problems)
    for key, item in own.items():
        if key not in SERVICE_KEYS:
            Reader(item.file, problems).error(item.key, unknown(key, SERVICE_KEYS))
    values: dict[str, Any] = {}
    for key in SERVICE_KEYS:
        item = items.get(key)
        if item is None or (is_null(item.value) and key != "stderr"):
            continue
        value = _PARSERS[key](Reader(item.file, problems), item.value, key)
        if value is not None:
            values[key] = value
    _complete(name, place, items, values, problems)
    _rate_burst(own, items, values, problems)
    _bindable(name, place, items, values, problems)
    if len(problems) > before:
        return None
    group = values.pop("group", None)
    values.pop("user", None)
    ident = values["identity"] = _identity(name, place, own, items, group, problems)
    if ident is None:
        return None
    if "exec" in values and trust.strict():  # else: superd has no more to give than its own
        refused = (trust.program_problem(values["exec"][0], ident.uid, ident.user)
                   or trust.unreachable(values["exec"][0], ident.uid,
                                        (ident.gid, *ident.groups), ident.user))
        if refused:
            Reader(items["exec"].file, problems).error(items["exec"].value, refused)
            return None
    written = sorted(k for k in own if k in NOT_ENFORCED)
    return Service(name=name, where=place, not_enforced=tuple(written), **values)


def _complete(name: str, place: Where, items: dict[str, Item],
              values: dict[str, Any], problems: list[ConfigProblem]) -> None:
    """Cross-key rules and defaults that depend on other keys."""
    protocol = values.setdefault("protocol", "tcp")
    has_exec, has_internal = "exec" in values, "internal" in values
    # a key written with no value (`exec:` alone) is not given
    items = {k: item for k, item in items.items() if not is_null(item.value)}
    if ("exec" in items) == ("internal" in items):
        problems.append(place.problem(
            f"service '{name}' needs exactly one of exec: or internal:"))
        return
    if not (has_exec or has_internal):
        return
    if "wait" not in values:
        values["wait"] = protocol == "udp" and not has_internal
    if has_internal and "wait" in items and values["wait"]:
        problems.append(place.problem("internal services do not take wait: true"))
    elif protocol == "udp" and not values["wait"] and has_exec:
        problems.append(place.problem(
            "udp services run with wait: true (a datagram socket has no "
            "connections to hand out one at a time)"))
    if "listen" not in items:
        port = port_number(name, protocol)
        if isinstance(port, str):
            problems.append(place.problem(
                f"no listen: given and '{name}' is not a {protocol} service "
                "in /etc/services"))
            return
        from superd.config import ListenAddr
        values["listen"] = (ListenAddr(port=port),)
    if "exec" in values:
        values["exec"] = _resolve_program(values["exec"], items["exec"], problems)
    if "proxy_protocol" in values and not values.get("proxy_from"):
        Reader(items["proxy_protocol"].file, problems).error(
            items["proxy_protocol"].key,
            "proxy_protocol: needs proxy_from: the balancers' addresses "
            "(there is no safe default)")
    unix = [a for a in values.get("listen", ()) if a.path]
    if has_internal and protocol == "udp" and unix:
        problems.append(place.problem(INTERNAL_UNIX_DGRAM.format(name=name)))
    if ("mode" in items or "owner" in items) and not unix:
        key = "mode" if "mode" in items else "owner"
        Reader(items[key].file, problems).error(
            items[key].key, f"{key}: applies only to UNIX socket paths")


def _rate_burst(own: dict[str, Item], items: dict[str, Item], values: dict[str, Any],
                problems: list[ConfigProblem]) -> None:
    """rate: as connections a second, and the burst its bucket holds:
    burst:, else COUNT of COUNT/PERIOD, else one second's worth (at least 1).
    A burst: from defaults: shapes only the services that have a rate."""
    rate = values.get("rate")
    if rate is not None:
        per_second, count = rate
        values["rate"] = per_second
        values.setdefault("burst", max(1.0, per_second if count is None else count))
        return
    rate_item = items.get("rate")
    if "burst" in own and (rate_item is None or is_null(rate_item.value)):
        Reader(own["burst"].file, problems).error(own["burst"].key, BURST_NEEDS_RATE)
    values.pop("burst", None)


def _bindable(name: str, place: Where, items: dict[str, Item], values: dict[str, Any],
              problems: list[ConfigProblem]) -> None:
    """Not as root, a port below the kernel's unprivileged start cannot be
    bound: refused at its listen: address (at the name when the port comes
    from /etc/services).  Disabled services bind nothing."""
    if "listen" not in values or not values.get("enabled", True):
        return
    floor = lowest_bindable_port()
    if not floor:
        return
    item = items.get("listen")
    if item is None or is_null(item.value):
        nodes: list[yaml.Node | None] = [None] * len(values["listen"])
    else:
        nodes = item.value.value if isinstance(item.value, yaml.SequenceNode) else [item.value]
    for addr, node in zip(values["listen"], nodes, strict=True):
        if addr.path is not None or addr.port >= floor:
            continue
        why = _low_port(addr.port, floor)
        if node is None:
            problems.append(place.problem(
                f"service '{name}': no listen: given, so it listens on port {addr.port} "
                f"({name} in /etc/services), and {why}"))
        else:
            assert item is not None
            Reader(item.file, problems).error(node, f"listen: {why}")


def _low_port(port: int, floor: int) -> str:
    me = pwd.getpwuid(os.geteuid()).pw_name
    return (f"port {port} is below {floor} (net.ipv4.ip_unprivileged_port_start): only "
            "root or a process with CAP_NET_BIND_SERVICE may listen on it, and superd "
            f"runs as {me} (uid {os.geteuid()}); run superd as root, or choose a port of "
            f"{floor} or above")


def lowest_bindable_port() -> int:
    """The lowest port superd can bind, 0 for any: as root, with
    CAP_NET_BIND_SERVICE, or with sockets handed in by systemd (LISTEN_FDS:
    it may hand the low ones), any; otherwise the kernel's
    net.ipv4.ip_unprivileged_port_start (1024 unless set)."""
    if os.geteuid() == 0 or _has_bind_capability():
        return 0
    if (os.environ.get("LISTEN_PID") == str(os.getpid())
            and os.environ.get("LISTEN_FDS", "0") not in ("", "0")):
        return 0
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024


def _has_bind_capability() -> bool:
    try:
        with open("/proc/self/status") as f:
            caps = next((line.split()[1] for line in f if line.startswith("CapEff:")), "0")
        return bool(int(caps, 16) >> CAP_NET_BIND_SERVICE & 1)
    except (OSError, ValueError, IndexError):
        return False


def _resolve_program(argv: tuple[str, ...], item: Item,
                     problems: list[ConfigProblem]) -> tuple[str, ...]:
    program = argv[0]
    if "/" not in program:
        found = shutil.which(program, path=DEFAULT_PATH)
        if found is None:
            Reader(item.file, problems).error(
                item.value, f"exec: '{program}' is not found in {DEFAULT_PATH}")
            return argv
        program = found
    elif not os.path.isabs(program):
        program = os.path.normpath(os.path.join(os.path.dirname(item.file), program))
    if not os.path.isfile(program):
        Reader(item.file, problems).error(item.value, f"exec: {program} does not exist")
    elif not os.access(program, os.X_OK):
        Reader(item.file, problems).error(item.value, f"exec: {program} is not executable")
    return (program, *argv[1:])


@functools.lru_cache(maxsize=256)
def _grouplist_cached(user: str, gid: int, generation: int) -> tuple[int, ...]:
    return tuple(os.getgrouplist(user, gid))


def _grouplist(user: str, gid: int) -> tuple[int, ...]:
    """The user's groups; looked up once per user for a whole load (500
    services as nobody cost one NSS lookup, not 500), fresh on the next."""
    return _grouplist_cached(user, gid, LOAD_GENERATION[0])


LOAD_GENERATION = [0]  # bumped by config.load(): cached lookups last one load


MAX_ID = 2**32 - 1  # uid_t/gid_t; the all-ones value is the kernel's "unchanged"


def _identity(name: str, place: Where, own: dict[str, Item], items: dict[str, Item],
              group: str | None, problems: list[ConfigProblem]) -> Any:
    from superd.config import Identity

    root = os.geteuid() == 0
    item = items.get("user")
    user = None if item is None or is_null(item.value) else str(item.value.value)
    if user is None and root and "exec" in items:
        problems.append(place.problem(USER_REQUIRED.format(name=name)))
        return None
    if user is None:
        user = "nobody" if root else pwd.getpwuid(os.geteuid()).pw_name
    try:
        pw = pwd.getpwuid(int(user)) if _number(user) else pwd.getpwnam(user)
    except (KeyError, ValueError, OverflowError):
        assert item is not None
        Reader(item.file, problems).error(item.value, f"user: no user '{user}'")
        return None
    gid = pw.pw_gid
    if group is not None:
        try:
            gid = int(group) if _number(group) else grp.getgrnam(group).gr_gid
            if not 0 <= gid < MAX_ID:  # (2**32 - 1 means "no change" to the kernel)
                raise ValueError(group)
        except (KeyError, ValueError, OverflowError):
            gitem = items["group"]
            Reader(gitem.file, problems).error(gitem.value, f"group: no group '{group}'")
            return None
    if not root:
        return _as_self(name, own, items, user, pw.pw_uid, group, gid, problems)
    groups = _grouplist(pw.pw_name, gid)
    switch = root and (pw.pw_uid, gid, sorted(groups)) != (0, 0, sorted(os.getgroups()))
    # (as root, even `user: root` gets root's groups, not whatever superd inherited)
    return Identity(pw.pw_name, pw.pw_uid, gid, groups, pw.pw_dir, pw.pw_shell, switch)


def _as_self(name: str, own: dict[str, Item], items: dict[str, Item], user: str, uid: int,
             group: str | None, gid: int, problems: list[ConfigProblem]) -> Any:
    """Not as root, superd starts programs only as itself.  A service that
    names someone else in its own user: or group: is refused (its program
    would not run as written).  One that takes them from ``defaults:`` (a
    file written for root, tried as an ordinary user) runs as superd's own
    user, and check and the log say so.  Internal services run inside
    superd, so no user applies to them."""
    from superd.config import Identity

    me = pwd.getpwuid(os.geteuid())
    if "exec" in own and uid != me.pw_uid and "user" in own:
        Reader(own["user"].file, problems).error(own["user"].value, (
            f"service '{name}': user: {user} cannot be given: superd runs as {me.pw_name} "
            f"(uid {me.pw_uid}), not as root, and starts programs only as itself; run "
            f"superd as root, or write user: {me.pw_name} (or no user:)"))
        return None
    if "exec" in own and group is not None and gid != os.getegid() and "group" in own:
        Reader(own["group"].file, problems).error(own["group"].value, (
            f"service '{name}': group: {group} cannot be given: superd runs as "
            f"{me.pw_name} with group {_group_name(os.getegid())} ({os.getegid()}), not "
            "as root, and starts programs only with its own group; run superd as root, "
            "or remove group:"))
        return None
    other = uid != me.pw_uid or (group is not None and gid != os.getegid())
    ignored = user if group is None else f"{user}:{group}"
    return Identity(me.pw_name, me.pw_uid, os.getegid(), tuple(os.getgroups()),
                    me.pw_dir, me.pw_shell, False,
                    ignored=ignored if other and "exec" in own else "")


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


# --- one parser per key -------------------------------------------------


def _listen(r: Reader, node: yaml.Node, key: str) -> Any:
    nodes = node.value if isinstance(node, yaml.SequenceNode) else [node]
    if not nodes:
        r.error(node, "listen: give at least one address")
        return None
    result = []
    for n in nodes:
        text = r.string(n, key)
        if text is None:
            continue
        parsed = parse_listen(text, None)
        if isinstance(parsed, str):
            r.error(n, f"listen: {parsed}")
        elif parsed.path is not None and (problem := paths.place_problem(parsed.path)):
            r.error(n, f"listen: refused: {problem}")
        else:
            result.append(parsed)
    return tuple(result) if len(result) == len(nodes) else None


def split_words(text: str) -> list[str]:
    """Split like a POSIX shell splits words, quoting only: no expansion,
    no globbing, no operators.  Raise ValueError for an unclosed quote."""
    words: list[str] = []
    word: list[str] | None = None
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\n":
            if word is not None:
                words.append("".join(word))
                word = None
            i += 1
            continue
        word = word if word is not None else []
        if c == "\\":
            if i + 1 < n and text[i + 1] != "\n":
                word.append(text[i + 1])
            i += 2
        elif c == "'":
            end = text.find("'", i + 1)
            if end < 0:
                raise ValueError("no closing single quote")
            word.append(text[i + 1:end])
            i = end + 1
        elif c == '"':
            i = _double_quoted(text, i + 1, word)
        else:
            word.append(c)
            i += 1
    if word is not None:
        words.append("".join(word))
    return words


def _double_quoted(text: str, i: int, word: list[str]) -> int:
    """Append the inside of a double-quoted part; the index after its end."""
    while i < len(text):
        c = text[i]
        if c == '"':
            return i + 1
        if c == "\\" and i + 1 < len(text) and text[i + 1] in '$`"\\\n':
            if text[i + 1] != "\n":
                word.append(text[i + 1])
            i += 2
            continue
        word.append(c)
        i += 1
    raise ValueError("no closing double quote")


def _exec(r: Reader, node: yaml.Node, key: str) -> tuple[str, ...] | None:
    if isinstance(node, yaml.SequenceNode):
        argv = r.str_list(node, key)
    else:
        text = r.string(node, key)
        try:
            argv = None if text is None else split_words(text)
        except ValueError as e:
            r.error(node, f"exec: cannot split into words: {e}")
            return None
    if argv is not None and not argv:
        r.error(node, "exec: give the program and its arguments")
        return None
    if argv is not None and any("\0" in a for a in argv):
        r.error(node, "exec: an argument holds a NUL byte")
        return None
    return None if argv is None else tuple(argv)


def _env(r: Reader, node: yaml.Node, key: str) -> tuple[tuple[str, str], ...] | None:
    if not isinstance(node, yaml.MappingNode):
        r.error(node, "env: expected a mapping of NAME: value")
        return None
    pairs = []
    for name, (knode, vnode) in mapping_items(node, r.file, r.problems).items():
        value = r.string(vnode, f"env.{name}")
        if not _ENV_NAME.match(name):
            r.error(knode, f"env: '{name}' is not a valid variable name")
        elif value is not None:
            pairs.append((name, value))
    return tuple(pairs)


def _pass_env(r: Reader, node: yaml.Node, key: str) -> tuple[str, ...] | None:
    names = r.str_list(node, key)
    if names is None:
        return None
    for name in names:
        if not _ENV_NAME.match(name):
            r.error(node, f"pass_env: '{name}' is not a valid variable name")
        elif name in _PRIVATE_ENV:
            r.error(node, f"pass_env: {name} is superd's own and never passed on")
    return tuple(names)


def _rlimits(r: Reader, node: yaml.Node, key: str) -> Any:
    if not isinstance(node, yaml.MappingNode):
        r.error(node, "rlimits: expected a mapping such as {nofile: 1024, as: 512M}")
        return None
    result = []
    for name, (knode, vnode) in mapping_items(node, r.file, r.problems).items():
        if name not in RLIMITS:
            r.error(knode, f"rlimits: {unknown(name, tuple(RLIMITS))}")
            continue
        pair = vnode.value if isinstance(vnode, yaml.SequenceNode) else [vnode, vnode]
        if len(pair) != 2:
            r.error(vnode, f"rlimits.{name}: give one value or [soft, hard]")
            continue
        soft, hard = (_limit_value(r, n, name) for n in pair)
        if soft is None or hard is None:
            continue
        if hard != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft > hard):
            r.error(vnode, f"rlimits.{name}: soft limit is above the hard limit")
            continue
        result.append((name, soft, hard))
    return tuple(result)


def _limit_value(r: Reader, node: yaml.Node, name: str) -> int | None:
    if isinstance(node, yaml.ScalarNode) and node.value in ("unlimited", "infinity"):
        return resource.RLIM_INFINITY
    if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":int"):
        value = r._scalar(node, f"rlimits.{name}", ("int",), "a whole number")
        if value is not None and value < 0:
            r.error(node, f"rlimits.{name}: must not be negative")
            return None
        return _limit_in_range(r, node, name, value)
    text = r.string(node, f"rlimits.{name}")
    m = _SIZE.match(text or "")
    if text is not None and (m is None or name not in SIZE_RLIMITS or too_long(node)):
        unit = " (sizes take K, M or G)" if name in SIZE_RLIMITS else ""
        r.error(node, f"rlimits.{name}: '{_shown(text)}' is not a number or unlimited{unit}")
        return None
    if m is None:
        return None
    value = int(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper())
    return _limit_in_range(r, node, name, value)


def _limit_in_range(r: Reader, node: yaml.Node, name: str, value: int | None) -> int | None:
    """*value*, if the kernel can take it as a finite limit of *name*."""
    high = nr_open() if name == "nofile" else MAX_RLIMIT
    if value is not None and value > high:
        why = " (the kernel's fs.nr_open)" if name == "nofile" else ""
        r.error(node, f"rlimits.{name}: {value} is out of range 0..{high}{why}; "
                      "write unlimited for no limit")
        return None
    return value


def nr_open() -> int:
    """The most descriptors the kernel lets a process have (1048576 unless set)."""
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024 * 1024


def too_long(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and len(node.value) > MAX_NUMBER_TEXT


def _shown(text: str) -> str:
    """*text* for a message: a number too long to read is cut short."""
    return text if len(text) <= MAX_NUMBER_TEXT else f"{text[:20]}... ({len(text)} characters)"


def _source_prefix(r: Reader, node: yaml.Node, key: str) -> tuple[int, int] | None:
    if not isinstance(node, yaml.MappingNode):
        r.error(node, "source_prefix: expected {v4: 32, v6: 64}")
        return None
    items = mapping_items(node, r.file, r.problems)
    v4, v6 = 32, 64
    for name, (knode, vnode) in items.items():
        if name == "v4":
            v4 = _or(r.integer(vnode, "source_prefix.v4", 0, 32), v4)
        elif name == "v6":
            v6 = _or(r.integer(vnode, "source_prefix.v6", 0, 128), v6)
        else:
            r.error(knode, unknown(name, ("v4", "v6")))
    return (v4, v6)


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def _owner(r: Reader, node: yaml.Node, key: str) -> tuple[int, int] | None:
    text = r.string(node, key)
    if text is None:
        return None
    user, _, group = text.partition(":")
    try:
        pw = pwd.getpwuid(int(user)) if _number(user) else pwd.getpwnam(user)
        gid = pw.pw_gid if not group else (
            int(group) if _number(group) else grp.getgrnam(group).gr_gid)
    except (KeyError, ValueError, OverflowError):
        r.error(node, f"owner: no such user or group in '{text}'")
        return None
    euid = os.geteuid()
    if euid != 0 and (pw.pw_uid != euid or gid not in (os.getegid(), *os.getgroups())):
        r.error(node, f"owner: {text} cannot be given: superd does not run as root, so "
                      "its sockets can belong only to its own user and one of its groups")
        return None
    return (pw.pw_uid, gid)


def _rate(r: Reader, node: yaml.Node, key: str) -> tuple[float, float | None] | None:
    """(connections a second, COUNT of a COUNT/PERIOD or None for a number)."""
    if not (isinstance(node, yaml.ScalarNode) and node.tag.endswith(":str")):
        value = r.per_second(node, key, "connections")
        return None if value is None else (value, None)
    text = node.value.strip()
    m = None if too_long(node) else _RATE.fullmatch(text)
    period = 0.0 if m is None else float(m.group(2) or _PERIODS.get(m.group(3), 0))
    if m is None or period <= 0:
        r.error(node, NOT_A_RATE.format(key=key, text=_shown(node.value)))
        return None
    count = float(m.group(1))
    if not MIN_RATE <= count / period <= MAX_RATE:
        r.error(node, f"{key}: {text} is out of range: at least {MIN_RATE:f}, "
                      f"at most {MAX_RATE:.0f} connections per second")
        return None
    return count / period, count


def _reply_rate(r: Reader, node: yaml.Node, key: str) -> float | None:
    return r.per_second(node, key, "replies")


_PARSERS: dict[str, Callable[[Reader, yaml.Node, str], Any]] = {
    "listen": _listen,
    "protocol": lambda r, n, k: r.choice(n, k, ("tcp", "udp")),
    "exec": _exec,
    "internal": lambda r, n, k: r.choice(
        n, k, ("echo", "discard", "daytime", "chargen", "time")),
    "wait": Reader.boolean,
    "user": Reader.string,
    "group": Reader.string,
    "env": _env,
    "pass_env": _pass_env,
    "cwd": Reader.abs_path,
    "umask": lambda r, n, k: r.octal(n, k, 0o777),
    "nice": lambda r, n, k: r.integer(n, k, -20, 19),
    "rlimits": _rlimits,
    "timeout": Reader.seconds,
    "kill_grace": Reader.seconds,
    "max_connections": Reader.positive_int,
    "per_source": Reader.positive_int,
    "source_prefix": _source_prefix,
    "rate": _rate,
    "burst": lambda r, n, k: r.integer(n, k, 1, 1_000_000),
    "on_limit": lambda r, n, k: r.choice(n, k, ("queue", "reject")),
    "reject_message": Reader.string,
    "allow": Reader.networks,
    "deny": Reader.networks,
    # a bare `stderr: null` is YAML's null: it means the same as "null"
    "stderr": lambda r, n, k: "null" if is_null(n) else r.choice(n, k, ("log", "socket", "null")),
    "proxy_protocol": lambda r, n, k: r.choice(n, k, ("v1", "v2", "any")),
    "proxy_from": Reader.networks,
    "proxy_timeout": Reader.seconds,
    "backlog": lambda r, n, k: r.integer(n, k, 1, 65535),
    "reuseport": Reader.boolean,
    "keepalive": Reader.boolean,
    "nodelay": Reader.boolean,
    "mode": lambda r, n, k: r.octal(n, k, 0o777),
    "owner": _owner,
    "enabled": Reader.boolean,
    "idle_timeout": Reader.seconds,
    "reply_rate": _reply_rate,
}
