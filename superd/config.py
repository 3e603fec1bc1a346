"""The configuration file: YAML in, frozen dataclasses out.

``load(path)`` reads the main file and its ``include:`` drop-ins, merges
``defaults:`` into every service, validates every key and returns a
:class:`Config`.  All problems are collected and raised together as one
:class:`~superd.errors.ConfigError`; nothing here prints or exits.
"""

from __future__ import annotations

import glob
import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from superd import fields, paths, trust
from superd.errors import ConfigError, ConfigProblem
from superd.fields import Item, Reader
from superd.yamlfile import MAX_FILE_BYTES, Where, load_nodes, mapping_items, where

INTERNAL_SERVICES = ("echo", "discard", "daytime", "chargen", "time")
DEFAULT_CONTROL_ROOT = "/run/superd/control.sock"
TOP_KEYS = ("include", "control", "metrics", "log", "stop_timeout",
            "max_connections", "defaults", "services")
LOG_KEYS = ("level", "format", "file", "target", "client_address")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ListenAddr:
    """Where a service listens: ``host``/``port``, or a UNIX ``path``.

    ``host`` None means every address, IPv4 and IPv6.
    """

    host: str | None = None
    port: int = 0
    path: str | None = None

    def __str__(self) -> str:
        if self.path is not None:
            return self.path
        if self.host is None:
            return f"*:{self.port}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Identity:
    """Who a program runs as.  ``switch`` False: superd's own identity.

    ``ignored`` names the ``user:``/``group:`` that superd, not running as
    root, did not apply because it came from ``defaults:`` (the program
    runs as superd's own user, said at check and load).  One a service
    names itself is refused instead (superd.fields).
    """

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    shell: str
    switch: bool
    ignored: str = ""


@dataclass(frozen=True)
class Service:
    name: str
    where: Where
    listen: tuple[ListenAddr, ...]
    protocol: str = "tcp"
    exec: tuple[str, ...] = ()
    internal: str | None = None
    wait: bool = False
    identity: Identity | None = None
    env: tuple[tuple[str, str], ...] = ()
    pass_env: tuple[str, ...] = ()
    cwd: str = "/"
    umask: int = 0o022
    nice: int = 0
    rlimits: tuple[tuple[str, int, int], ...] = ()
    timeout: float | None = None
    kill_grace: float = 5.0
    idle_timeout: float = 300.0  # internal tcp sessions: seconds without a byte either way
    max_connections: int = 64
    per_source: int = 16
    source_prefix: tuple[int, int] = (32, 64)
    rate: float | None = None  # new connections a second (a token bucket)
    # connections the rate lets start at once: the bucket's size.  Set
    # whenever rate is: burst:, else COUNT of rate: COUNT/PERIOD, else one
    # second's worth, at least 1
    burst: float | None = None
    reply_rate: float = 10.0  # internal udp services: replies a second to one source
    on_limit: str = "queue"
    reject_message: str | None = None
    allow: tuple[Network, ...] = ()
    deny: tuple[Network, ...] = ()
    stderr: str = "log"
    proxy_protocol: str | None = None
    proxy_from: tuple[Network, ...] = ()
    proxy_timeout: float = 5.0
    backlog: int | None = None
    reuseport: bool = False
    keepalive: bool = False
    nodelay: bool = False
    mode: int = 0o666
    owner: tuple[int, int] | None = None
    enabled: bool = True
    # keys written in the file but not acted on by this version of superd
    not_enforced: tuple[str, ...] = ()

    @property
    def datagram(self) -> bool:
        return self.protocol == "udp"


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    format: str = "text"
    file: str | None = None
    target: str = "stderr"
    client_address: str = "full"


@dataclass(frozen=True)
class Config:
    path: str
    files: tuple[str, ...]
    control: str
    metrics: ListenAddr | None
    log: LogSettings
    stop_timeout: float
    max_connections: int
    services: tuple[Service, ...] = field(default=())

    def service(self, name: str) -> Service | None:
        return next((s for s in self.services if s.name == name), None)


def load(path: str) -> Config:
    """Read and validate the configuration at *path*.

    Whatever the file holds, the answer is a Config or a ConfigError: a
    reload must never take the daemon down.  Nesting is bounded before
    anything is built (superd.yamlfile); should a file still exhaust the
    stack or the memory, that too is a problem with the file.
    """
    path = os.path.abspath(path)
    try:
        return _load(path)
    except RecursionError:
        raise ConfigError([ConfigProblem(
            path, 1, 1, "nested too deep to read (Python's recursion limit); refused")]) from None
    except MemoryError:
        raise ConfigError([ConfigProblem(
            path, 1, 1, "too large to read (out of memory); refused")]) from None


def _load(path: str) -> Config:
    fields.LOAD_GENERATION[0] += 1
    problems: list[ConfigProblem] = []
    root = _read(path, Where(path, 1, 1), "this file")
    top = _top_mapping(root, path, problems)
    reader = Reader(path, problems)
    for key, (knode, _) in top.items():
        if key not in TOP_KEYS:
            problems.append(where(knode, path).problem(fields.unknown(key, TOP_KEYS)))
    defaults = _defaults(top, path, problems)
    files = [path]
    raw = _service_nodes(top.get("services"), path, problems)
    for inc_path, at in _includes(top.get("include"), reader, files, problems):
        sub_root = _load_include(inc_path, at, problems)
        if sub_root is None:
            continue
        sub = _top_mapping(sub_root, inc_path, problems)
        for key, (knode, _) in sub.items():
            if key != "services":
                problems.append(where(knode, inc_path).problem(
                    f"unknown key '{key}' (an included file holds only services:)"))
        for name, entry in _service_nodes(sub.get("services"), inc_path, problems).items():
            if name in raw:
                first = raw[name][0]
                problems.append(entry[0].problem(
                    f"service '{name}' is already defined at {first}"))
            else:
                raw[name] = entry
    services = [fields.service(name, entry, defaults, problems)
                for name, entry in raw.items()]
    valid = [s for s in services if s is not None]
    problems.extend(fields.listen_conflicts(valid))
    config = _top_level(top, reader, files, tuple(valid))
    if problems:
        raise ConfigError(problems)
    return config


def _top_mapping(
    root: yaml.Node, path: str, problems: list[ConfigProblem]
) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    if not isinstance(root, yaml.MappingNode):
        problems.append(where(root, path).problem(
            "the file must be a mapping with a services: key"))
        return {}
    return mapping_items(root, path, problems)


def _read(path: str, at: Where, subject: str) -> yaml.Node:
    """The root node of *path*, read through superd.trust: as root, a file
    someone else could change is refused at *at* and never parsed."""
    try:
        data = trust.read_config(path, MAX_FILE_BYTES, subject)
    except trust.Untrusted as e:
        raise ConfigError([at.problem(f"refused: superd runs as root and {e}")]) from None
    except OSError as e:
        raise ConfigError([ConfigProblem(path, 1, 1, f"cannot read: {e.strerror}")]) from None
    return load_nodes(path, data)


def _defaults(
    top: dict[str, tuple[yaml.Node, yaml.Node]], path: str,
    problems: list[ConfigProblem],
) -> dict[str, Item]:
    if "defaults" not in top:
        return {}
    node = top["defaults"][1]
    if not isinstance(node, yaml.MappingNode):
        if fields.is_null(node):
            return {}
        problems.append(where(node, path).problem("defaults: must be a mapping"))
        return {}
    items = mapping_items(node, path, problems)
    result = {}
    for key, (knode, vnode) in items.items():
        if key not in fields.SERVICE_KEYS:
            problems.append(where(knode, path).problem(
                fields.unknown(key, fields.SERVICE_KEYS)))
        elif key in ("listen", "exec", "internal"):
            problems.append(where(knode, path).problem(
                f"'{key}' belongs to a service, not to defaults:"))
        else:
            result[key] = Item(path, knode, vnode)
    return result


def _service_nodes(
    entry: tuple[yaml.Node, yaml.Node] | None, path: str,
    problems: list[ConfigProblem],
) -> dict[str, tuple[Any, dict[str, Item]]]:
    """Service name to (its Where, its items), as written in one file."""
    if entry is None:
        return {}
    node = entry[1]
    if fields.is_null(node):
        return {}
    if not isinstance(node, yaml.MappingNode):
        problems.append(where(node, path).problem(
            "services: must be a mapping of service names to settings"))
        return {}
    result: dict[str, tuple[Any, dict[str, Item]]] = {}
    for name, (knode, vnode) in mapping_items(node, path, problems).items():
        if not fields.valid_name(name):
            problems.append(where(knode, path).problem(
                f"service name '{name}' must be letters, digits, '.', '_' or '-'"))
            continue
        if not isinstance(vnode, yaml.MappingNode):
            problems.append(where(vnode, path).problem(
                f"service '{name}' must be a mapping of settings"))
            continue
        items = {k: Item(path, kn, vn)
                 for k, (kn, vn) in mapping_items(vnode, path, problems).items()}
        result[name] = (where(knode, path), items)
    return result


def _includes(
    entry: tuple[yaml.Node, yaml.Node] | None, reader: Reader,
    files: list[str], problems: list[ConfigProblem],
) -> list[tuple[str, Where]]:
    """The files the include: globs match, each with the place of its glob."""
    if entry is None:
        return []
    node = entry[1]
    patterns = reader.str_list(node, "include")
    if patterns is None:
        return []
    found: list[tuple[str, Where]] = []
    nodes = node.value if isinstance(node, yaml.SequenceNode) else [node]
    for pattern, pnode in zip(patterns, nodes, strict=True):
        full = os.path.join(os.path.dirname(reader.file), pattern)
        at = where(pnode, reader.file)
        if _include_dir(os.path.dirname(full), at, problems):
            for match in sorted(glob.glob(full)):
                if os.path.isfile(match) and match not in files:
                    files.append(match)
                    found.append((match, at))
    return found


def _include_dir(directory: str, at: Where, problems: list[ConfigProblem]) -> bool:
    """True if *directory* exists and, as root, only root can change it."""
    if not os.path.isdir(directory):
        problems.append(at.problem(f"include: directory {directory} does not exist"))
        return False
    try:
        trust.check_dir(directory)
    except trust.Untrusted as e:
        problems.append(at.problem(f"include: refused: superd runs as root and {e}"))
        return False
    except OSError as e:
        problems.append(at.problem(f"include: cannot open {directory}: {e.strerror}"))
        return False
    return True


def _load_include(path: str, at: Where, problems: list[ConfigProblem]) -> yaml.Node | None:
    try:
        return _read(path, at, path)
    except ConfigError as e:
        problems.extend(e.problems)
        return None


def _top_level(
    top: dict[str, tuple[yaml.Node, yaml.Node]], reader: Reader,
    files: list[str], services: tuple[Service, ...],
) -> Config:
    def node(key: str) -> yaml.Node | None:
        return top[key][1] if key in top else None

    control = reader.opt(node("control"), reader.created_path, "control")
    metrics = reader.opt(node("metrics"), reader.metrics_addr, "metrics")
    stop = reader.opt(node("stop_timeout"), reader.seconds, "stop_timeout")
    total = reader.opt(node("max_connections"), reader.positive_int, "max_connections")
    return Config(
        path=reader.file,
        files=tuple(files),
        control=control or default_control_path(),
        metrics=metrics,
        log=_log_settings(node("log"), reader),
        stop_timeout=10.0 if stop is None else stop,
        max_connections=1024 if total is None else total,
        services=services,
    )


def default_control_path() -> str:
    if os.geteuid() == 0:
        return DEFAULT_CONTROL_ROOT
    runtime = paths.runtime_dir()
    return os.path.join(runtime, "superd", "control.sock")


def _log_settings(node: yaml.Node | None, reader: Reader) -> LogSettings:
    if node is None or fields.is_null(node):
        return LogSettings()
    if not isinstance(node, yaml.MappingNode):
        reader.error(node, "log: must be a mapping, e.g. {level: info, format: text}")
        return LogSettings()
    items = mapping_items(node, reader.file, reader.problems)
    values: dict[str, Any] = {}
    choices = {"level": ("debug", "info", "warning", "error"),
               "format": ("text", "json"),
               "target": ("stderr", "syslog", "file"),
               "client_address": ("full", "hash", "none")}
    for key, (knode, vnode) in items.items():
        if key not in LOG_KEYS:
            reader.error(knode, fields.unknown(key, LOG_KEYS))
        elif key == "file":
            values[key] = reader.created_path(vnode, "log.file")
        else:
            values[key] = reader.choice(vnode, f"log.{key}", choices[key])
    values = {k: v for k, v in values.items() if v is not None}
    if "file" in values and "target" not in values:
        values["target"] = "file"
    if values.get("target") == "file" and "file" not in items:
        reader.error(items["target"][1], "log.target: file needs log.file: PATH (where "
                     "the log goes); without it every line would be lost")
    return LogSettings(**values)
