"""``superd convert``: inetd.conf and xinetd configuration to superd YAML.

``convert(paths)`` reads each file, tells the format by its content (xinetd
``service NAME {`` / ``defaults`` / ``include(dir)``, or inetd.conf lines of
six or more fields), maps every entry to a superd service and returns one
YAML document. Whatever superd cannot carry over is written as a comment
beside the service, with the reason; an entry that cannot become a service
at all (RPC, TCPMUX, ``redirect``, an unknown port) is written commented
out. Nothing here prints; problems that stop the conversion raise
:class:`ConvertError` naming ``FILE:LINE``.

One convenience beyond inetd itself: an ``internal`` entry on a numeric
port may name the built-in as its argv[0] (``127.0.0.1:7007 stream tcp
nowait root internal echo``); inetd only finds built-ins by service name.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import re
import socket
from dataclasses import dataclass, field
from typing import Any

import yaml

INTERNAL = ("echo", "discard", "daytime", "chargen", "time")
MAX_BYTES = 4 * 1024 * 1024
_OFF = "#<off>#"
_XI_HEAD = re.compile(r"^(?:service\s+(\S+)|(defaults))\s*(\{)?\s*$")
_XI_ATTR = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(\+=|-=|=)\s*(.*)$")
_WAIT = re.compile(r"^(wait|nowait)(?:\.(\d+))?((?:/\d+){0,3})$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PRIVATE_ENV = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                "WATCHDOG_USEC", "WATCHDOG_PID")
_KEY_ORDER = ("enabled", "listen", "protocol", "internal", "exec", "wait", "user", "group",
              "env", "pass_env", "umask", "nice", "rlimits", "max_connections",
              "per_source", "rate", "allow", "deny", "keepalive", "nodelay")
_XI_LISTS = ("only_from", "no_access", "passenv", "env", "log_on_success",
             "log_on_failure", "disabled", "enabled")
_XI_INHERIT = ("only_from", "no_access", "passenv", "log_on_success", "log_on_failure",
               "access_times", "banner", "banner_success", "banner_fail")
_XI_FROM_DEFAULTS = ("bind", "v6only")
_XI_HANDLED = frozenset({
    "id", "type", "socket_type", "protocol", "wait", "server", "server_args", "port",
    "bind", "interface", "v6only", "disable", "redirect", "flags", "only_from",
    "no_access", "rpc_version", "rpc_number"})
_DROPPED = {
    "log_type": "superd logs to stderr or journald itself (top-level log:)",
    "log_on_success": "superd logs every connection itself",
    "log_on_failure": "superd logs every refusal itself",
    "access_times": "superd has no time-of-day windows",
    "banner": "superd sends no banner files",
    "banner_success": "superd sends no banner files",
    "banner_fail": "superd sends no banner files (see reject_message: for refusals)",
    "deny_time": "superd has no SENSOR trap",
    "max_load": "superd does not limit by load average",
    "libwrap": "superd does not use TCP wrappers; write allow:/deny: instead",
    "groups": "superd always gives the user's supplementary groups",
    "mdns": "superd does not register services over mDNS",
    "leaky_bucket": "superd's rate: is a plain token bucket; set it by hand",
    "rlimit_rss": "Linux ignores RLIMIT_RSS; superd has no such limit",
}
_XI_DEFAULT_KEYS = ("instances", "per_source", "cps", "umask")
_UNLIMITED = object()
_RLIMITS = {"rlimit_as": "as", "rlimit_cpu": "cpu", "rlimit_files": "nofile",
            "rlimit_data": "data", "rlimit_stack": "stack"}
_SIZE_RLIMITS = frozenset({"as", "data", "stack"})
_FLAG_NOTES = {
    "INTERCEPT": "superd does not intercept packets",
    "NORETRY": "superd logs a failed fork and closes the client; it never retries",
    "IDONLY": "superd does no ident (RFC 1413) lookups",
    "LABELED": "superd does not set SELinux contexts",
}


class ConvertError(Exception):
    """The conversion cannot go on: unreadable file, unknown format, bad syntax."""


class _Skip(Exception):
    """This entry cannot become a superd service; the message says why."""


@dataclass
class _Service:
    """One source entry on its way to a superd service."""

    name: str
    origin: str
    title: str
    tag: str = ""
    protocol: str = "tcp"
    binds: list[tuple[str | None, int | str]] = field(default_factory=list)
    keys: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None

    def note(self, text: str) -> None:
        self.notes.append(text)


@dataclass
class _Doc:
    sources: list[str] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    defaults: dict[str, Any] = field(default_factory=dict)
    default_notes: list[str] = field(default_factory=list)
    services: list[_Service] = field(default_factory=list)


def convert(paths: list[str]) -> str:
    """Read inetd.conf or xinetd configuration file(s), detect the format by content,
    and return an equivalent superd YAML document (a string) with a comment beside
    anything that could not be carried over and why."""
    if not paths:
        raise ConvertError("no file given to convert")
    doc = _Doc()
    xinetd: list[_Block] = []
    for path in paths:
        text = _read(path)
        if _detect(path, text) == "inetd":
            doc.sources.append(path)
            _inetd_file(path, text, doc.services)
        else:
            xinetd.extend(_xi_parse(path, text, doc, set()))
    if xinetd:
        _xi_convert(xinetd, doc)
    _name_services(doc.services)
    _resolve_overlaps(doc.services)
    return _render(doc)


# --- reading and telling the format ------------------------------------


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise ConvertError(f"{path}: cannot read: {e.strerror}") from e
    if len(data) > MAX_BYTES:
        raise ConvertError(f"{path}: larger than 4 MiB; not a configuration file")
    return data.decode("utf-8", errors="replace")


def _meaningful(text: str, off: bool = True) -> list[tuple[int, str, bool]]:
    """(line number, text, enabled) of lines that are not blank or comments.

    With *off*, Debian's ``#<off>#`` lines count, as disabled entries.
    """
    result = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        enabled = not (off and line.startswith(_OFF))
        if not enabled:
            line = line[len(_OFF):].strip()
        if line and not line.startswith("#"):
            result.append((n, line, enabled))
    return result


def _detect(path: str, text: str) -> str:
    lines = _meaningful(text)
    for _, line, enabled in lines:
        words = line.split()
        if enabled and (_XI_HEAD.match(line) or words[0] in ("include", "includedir")):
            return "xinetd"
    entries = 0
    for n, line, enabled in lines:
        words = line.split()
        if len(words) >= 6:
            entries += 1
        elif enabled and not (len(words) == 1 and words[0].endswith(":")):
            raise ConvertError(f"{path}:{n}: neither an inetd.conf entry (six or more "
                               f"fields) nor xinetd syntax: {line!r}")
    if not entries:
        raise ConvertError(f"{path}: no inetd.conf entries or xinetd services found")
    return "inetd"


# --- inetd.conf ----------------------------------------------------------


def _inetd_file(path: str, text: str, out: list[_Service]) -> None:
    default_hosts: list[str | None] = [None]
    for n, line, enabled in _meaningful(text):
        words = line.split()
        if len(words) == 1 and words[0].endswith(":"):
            if enabled:
                default_hosts = _split_hosts(words[0][:-1])
        elif len(words) >= 6:
            out.append(_inetd_entry(words, f"{path}:{n}", default_hosts, enabled))


def _split_hosts(text: str) -> list[str | None]:
    return [None if h in ("*", "") else h.strip("[]") for h in text.split(",")]


def _inetd_entry(words: list[str], origin: str, default_hosts: list[str | None],
                 enabled: bool) -> _Service:
    service, socktype, proto, waitf, userf, program = words[:6]
    conv = _Service(name=service, origin=origin, title=" ".join(words))
    if not enabled:
        conv.keys["enabled"] = False
        conv.note("disabled in the source (#<off>#, as update-inetd writes it)")
    try:
        _inetd_socket(service, socktype, proto, default_hosts, conv)
        wait, rate_max = _inetd_wait(waitf, origin, conv)
        if program == "internal":
            name = _internal_name(service.rpartition(":")[2], conv.protocol, words[6:])
            conv.keys["internal"] = name
        else:
            _inetd_wait_mode(wait, conv)
            _inetd_user(userf, conv)
            _inetd_exec(program, words[6:], conv)
        if rate_max:
            _per_minute(rate_max, conv)
    except _Skip as e:
        conv.skipped = str(e)
    return conv


def _inetd_socket(service: str, socktype: str, proto: str,
                  default_hosts: list[str | None], conv: _Service) -> None:
    base, *options = proto.split(",")
    if options:
        conv.note(f"{','.join(options)}: superd does not set socket buffer sizes")
    if base.startswith("rpc/") or ("/" in service and base != "unix"):
        raise _Skip("Sun RPC services are not supported by superd")
    kinds = {"stream": "tcp", "dgram": "udp"}
    if socktype not in kinds:
        raise _Skip(f"socket type '{socktype}': superd serves stream and dgram only")
    conv.protocol = kinds[socktype]
    conv.tag = base
    if base == "unix":
        if not service.startswith("/"):
            raise _Skip(f"UNIX socket '{service}' is not an absolute path")
        conv.name = os.path.basename(service.rstrip("/")) or "unix"
        conv.binds = [(None, os.path.normpath(service))]
        return
    if not re.fullmatch(rf"{conv.protocol}(4|6|46)?", base):
        raise _Skip(f"protocol '{base}' does not fit socket type '{socktype}'")
    hosts_text, sep, name = service.rpartition(":")
    hosts = _split_hosts(hosts_text) if sep else default_hosts
    conv.name = name
    port = _port(name, conv.protocol)
    if port is None:
        _no_port(f"'{name}' is not a port number", conv)
    else:
        conv.binds = _inetd_binds(hosts, port, base[3:], conv)


def _no_port(what: str, conv: _Service) -> None:
    """Carry on converting, but leave the entry commented out."""
    conv.keys["listen"] = "PORT"
    conv.skipped = (f"{what} or a {conv.protocol} service in /etc/services on this "
                    "machine: write listen: PORT and uncomment it")


def _port(name: str, protocol: str) -> int | None:
    if name.isdigit():
        return int(name) if 0 < int(name) < 65536 else None
    try:
        return socket.getservbyname(name, protocol)
    except OSError:
        return None


def _inetd_binds(hosts: list[str | None], port: int, family: str,
                 conv: _Service) -> list[tuple[str | None, int | str]]:
    wildcard = {"4": "0.0.0.0", "6": "::"}.get(family)
    if family == "46":
        conv.note("tcp46/udp46: superd's dual-stack socket shows IPv4 clients as plain "
                  "IPv4 addresses, not v4-mapped IPv6 ones")
    binds: list[tuple[str | None, int | str]] = []
    for host in hosts:
        if host is None:
            binds.append((wildcard, port))
        elif _ip(host) is not None:
            binds.append((_ip(host), port))
        else:
            _host_name(host, conv)
    if not binds:
        binds.append((wildcard, port))
    return binds


def _ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _host_name(host: str, conv: _Service) -> None:
    conv.keys["enabled"] = False
    conv.note(f"listen address '{host}' is a host name and superd never resolves names: "
              "write its IP address and then enable the service (as converted it would "
              "listen on every address)")


def _inetd_wait(text: str, origin: str, conv: _Service) -> tuple[bool, int]:
    m = _WAIT.match(text)
    if m is None:
        raise ConvertError(f"{origin}: '{text}' is not wait or nowait[.max]")
    freebsd = [int(v) for v in m.group(3).split("/")[1:]]
    for key, value in zip(("max_connections", "", "per_source"), freebsd, strict=False):
        if key and value:
            conv.keys[key] = value
        elif value:
            conv.note(f"{value} connections per source per minute (FreeBSD): superd "
                      "limits concurrent connections per source (per_source:) instead")
    return m.group(1) == "wait", int(m.group(2) or 0)


def _per_minute(count: int, conv: _Service) -> None:
    conv.keys["rate"] = max(0.001, round(count / 60, 3))
    conv.note(f"at most {count} starts a minute (inetd stopped the service for ten "
              f"minutes past that): rate: {count}/60 a second; superd queues instead")


def _inetd_wait_mode(wait: bool, conv: _Service) -> None:
    if conv.protocol == "tcp" and wait:
        conv.keys["wait"] = True
    elif conv.protocol == "udp" and not wait:
        conv.note("nowait on a datagram service: superd hands a udp socket to one "
                  "program at a time (wait: true)")


def _inetd_user(text: str, conv: _Service) -> None:
    text, _, login_class = text.partition("/")
    if login_class:
        conv.note(f"login class '{login_class}': superd has no login classes")
    sep = ":" if ":" in text else "."
    user, _, group = text.partition(sep)
    _set_user(user, group, conv)


def _set_user(user: str, group: str, conv: _Service) -> None:
    if user:
        conv.keys["user"] = user
        if not user.isdigit() and not _user_exists(user):
            conv.note(f"user '{user}' does not exist on this machine")
    if group:
        conv.keys["group"] = group


def _user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def _internal_name(service: str, protocol: str, argv: list[str]) -> str:
    if service.isdigit():
        if argv and argv[0] in INTERNAL:
            return argv[0]
        raise _Skip("an internal service on a numeric port: inetd finds built-ins by "
                    "name (write the name as argv[0]: 'internal echo')")
    official = service
    port = _port(service, protocol)
    if port is not None:
        try:
            official = socket.getservbyport(port, protocol)
        except OSError:
            official = service
    for name in (official, service):
        if name in INTERNAL:
            return name
    raise _Skip(f"internal service '{service}' has no superd equivalent (superd "
                f"serves {', '.join(INTERNAL)})")


def _inetd_exec(program: str, argv: list[str], conv: _Service) -> None:
    argv0 = argv[0] if argv else os.path.basename(program)
    _set_exec(program, argv0, argv[1:], conv)


def _set_exec(program: str, argv0: str, args: list[str], conv: _Service) -> None:
    if os.path.basename(program) == "tcpd":
        real = argv0 if argv0.startswith("/") else f"/usr/sbin/{argv0}"
        conv.note(f"tcpd (TCP wrappers) dropped, {real} started directly: superd does "
                  "not read /etc/hosts.allow or /etc/hosts.deny; write allow:/deny:")
        program = real
    elif os.path.basename(argv0) != os.path.basename(program):
        conv.note(f"argv[0] was '{argv0}'; superd starts the program with argv[0] "
                  f"= {program}")
    conv.keys["exec"] = [program, *args]
    if not os.path.exists(program):
        conv.note(f"{program} does not exist on this machine: superd check refuses "
                  "the file until it is installed")


# --- xinetd: parsing -----------------------------------------------------


@dataclass
class _Attr:
    name: str
    op: str
    values: list[str]
    line: int


@dataclass
class _Block:
    kind: str
    name: str
    file: str
    line: int
    attrs: list[_Attr] = field(default_factory=list)


def _xi_parse(path: str, text: str, doc: _Doc, seen: set[str]) -> list[_Block]:
    real = os.path.realpath(path)
    if real in seen:
        raise ConvertError(f"{path}: included twice (an include loop?)")
    seen.add(real)
    doc.sources.append(path)
    blocks: list[_Block] = []
    block: _Block | None = None
    opened = True
    for n, line, _ in _meaningful(text, off=False):
        if block is not None and not opened:
            if line != "{":
                raise ConvertError(f"{path}:{block.line}: '{block.kind} {block.name}' "
                                   "must be followed by a line holding only '{'")
            opened = True
        elif block is not None:
            if line.split("#")[0].strip() == "}":
                block = None
            else:
                block.attrs.append(_xi_attr(path, n, line))
        else:
            block, opened = _xi_top(path, n, line, doc, seen, blocks)
    if block is not None:
        raise ConvertError(f"{path}:{block.line}: '{block.kind} {block.name}' has no "
                           "closing '}'")
    return blocks


def _xi_attr(path: str, n: int, line: str) -> _Attr:
    m = _XI_ATTR.match(line)
    if m is None:
        raise ConvertError(f"{path}:{n}: expected 'attribute = value' or '}}', "
                           f"got {line!r}")
    return _Attr(m.group(1), m.group(2), m.group(3).split(), n)


def _xi_top(path: str, n: int, line: str, doc: _Doc, seen: set[str],
            blocks: list[_Block]) -> tuple[_Block | None, bool]:
    head = _XI_HEAD.match(line)
    if head:
        block = _Block("service" if head.group(1) else "defaults", head.group(1) or "",
                       path, n)
        blocks.append(block)
        return block, head.group(3) is not None
    words = line.split()
    if words[0] in ("include", "includedir") and len(words) == 2:
        target = os.path.join(os.path.dirname(path), words[1])
        if os.path.realpath(target) in seen:
            raise ConvertError(f"{path}:{n}: {line}: already read (an include loop?)")
        try:
            text = _read(target) if words[0] == "include" else ""
            names = sorted(os.listdir(target)) if words[0] == "includedir" else []
        except (ConvertError, OSError) as e:
            reason = e.strerror if isinstance(e, OSError) else str(e)
            raise ConvertError(f"{path}:{n}: {line}: {reason}") from e
        if words[0] == "include":
            blocks.extend(_xi_parse(target, text, doc, seen))
        else:
            blocks.extend(_xi_includedir(target, names, doc, seen))
        return None, True
    raise ConvertError(f"{path}:{n}: expected 'service NAME', 'defaults', 'include' or "
                       f"'includedir', got {line!r}")


def _xi_includedir(directory: str, names: list[str], doc: _Doc,
                   seen: set[str]) -> list[_Block]:
    skipped = [n for n in names if "." in n or n.endswith("~")]
    if skipped:
        doc.header.append(f"includedir {directory}: skipped {', '.join(skipped)} "
                          "(xinetd ignores names that contain '.' or end in '~')")
    blocks = []
    for name in names:
        path = os.path.join(directory, name)
        if name not in skipped and os.path.isfile(path):
            blocks.extend(_xi_parse(path, _read(path), doc, seen))
    return blocks


# --- xinetd: defaults{} --------------------------------------------------


@dataclass
class _XDefaults:
    values: dict[str, list[str]] = field(default_factory=dict)
    allow: list[str] | None = None
    deny: list[str] | None = None


def _apply(current: list[str] | None, op: str, values: list[str]) -> list[str]:
    if op == "=":
        return list(values)
    if op == "+=":
        return (current or []) + [v for v in values if v not in (current or [])]
    return [v for v in current or [] if v not in values]


def _xi_convert(blocks: list[_Block], doc: _Doc) -> None:
    defaults = [b for b in blocks if b.kind == "defaults"]
    dfl = _xi_defaults(defaults[0], doc) if defaults else _XDefaults()
    for extra in defaults[1:]:
        doc.default_notes.append(f"{extra.file}:{extra.line}: a second defaults section "
                                 "is ignored, as xinetd does")
    services = [_xi_service(b, dfl, doc.defaults) for b in blocks if b.kind == "service"]
    if any("exec" in c.keys and "pass_env" not in c.keys for c in services):
        doc.header.append("xinetd passed its own environment to programs unless passenv "
                          "was set; superd passes only env:, pass_env: and a minimal PATH")
    doc.services.extend(services)


def _xi_defaults(block: _Block, doc: _Doc) -> _XDefaults:
    dfl = _XDefaults()
    for attr in block.attrs:
        op = "+=" if attr.name in _XI_LISTS and attr.op == "=" else attr.op
        dfl.values[attr.name] = _apply(dfl.values.get(attr.name), op, attr.values)
    probe = _Service(name="defaults", origin="", title="")
    for name, values in dfl.values.items():
        _xi_default_value(name, values, dfl, probe, doc)
    _unlimited(probe, None)
    doc.defaults.update(probe.keys)
    doc.default_notes.extend(f"defaults: {n}" for n in probe.notes)
    return dfl


def _xi_default_value(name: str, values: list[str], dfl: _XDefaults, probe: _Service,
                      doc: _Doc) -> None:
    where = f"{name} = {' '.join(values)}"
    if name in _XI_DEFAULT_KEYS:
        _XI_SETTERS[name](values, probe)
    elif name in ("only_from", "no_access"):
        nets = _networks(values, name, probe)
        if nets:
            key = "allow" if name == "only_from" else "deny"
            probe.keys[key] = nets
            setattr(dfl, key, nets)
    elif name == "passenv":
        _xi_passenv(values, probe)
    elif name in _XI_FROM_DEFAULTS:
        probe.note(f"{where}: carried into each service's listen:")
    elif name in ("enabled", "disabled"):
        pass
    elif name in _DROPPED:
        probe.note(f"{where}: not carried over: {_DROPPED[name]}")
    else:
        probe.note(f"{where}: not carried over: xinetd ignores it in defaults too")


# --- xinetd: one service -------------------------------------------------


def _xi_effective(block: _Block, dfl: _XDefaults,
                  conv: _Service) -> tuple[dict[str, list[str]], set[str]]:
    eff = {k: list(v) for k, v in dfl.values.items() if k in _XI_INHERIT}
    own: set[str] = set()
    for attr in block.attrs:
        name = "bind" if attr.name == "interface" else attr.name
        if name in _XI_LISTS:
            eff[name] = _apply(eff.get(name), attr.op, attr.values)
        elif attr.op != "=":
            conv.note(f"line {attr.line}: '{attr.op}' does not apply to {name}; "
                      "ignored, as xinetd does")
            continue
        elif name in own:
            conv.note(f"line {attr.line}: {name} set twice; xinetd keeps the first")
            continue
        else:
            eff[name] = attr.values
        own.add(name)
    for name in _XI_FROM_DEFAULTS:
        if name not in eff and name in dfl.values:
            eff[name] = dfl.values[name]
    return eff, own


def _xi_service(block: _Block, dfl: _XDefaults, defaults: dict[str, Any]) -> _Service:
    conv = _Service(name=block.name, origin=f"{block.file}:{block.line}",
                     title=f"service {block.name}")
    eff, own = _xi_effective(block, dfl, conv)
    if "id" in eff:
        conv.name = eff["id"][0]
        conv.title += f" (id {conv.name})"
        conv.tag = "-"
    flags = set(eff.get("flags", []))
    try:
        _xi_enabled(eff, dfl, conv)
        _xi_unsupported(eff, flags)
        _xi_socket(eff, conv)
        _xi_listen(block.name, eff, flags, conv)
        _xi_program(block.name, eff, flags, conv)
        _xi_flags(flags, conv)
        _xi_access(eff, dfl, conv)
        for name in sorted(own - _XI_HANDLED, key=list(eff).index):
            _xi_value(name, eff[name], conv)
        if eff.get("passenv") != dfl.values.get("passenv"):
            _xi_passenv(eff.get("passenv", []), conv, force=True)
        _unlimited(conv, defaults.get("max_connections"))
    except _Skip as e:
        conv.skipped = str(e)
    return conv


def _first(eff: dict[str, list[str]], name: str) -> str:
    values = eff.get(name) or [""]
    return values[0]


def _xi_enabled(eff: dict[str, list[str]], dfl: _XDefaults, conv: _Service) -> None:
    ident = _first(eff, "id") or conv.name
    reason = None
    if _first(eff, "disable").lower() == "yes":
        reason = "disable = yes"
    elif "DISABLE" in eff.get("flags", []):
        reason = "flags = DISABLE"
    elif ident in dfl.values.get("disabled", []):
        reason = "listed in defaults' disabled"
    elif "enabled" in dfl.values and ident not in dfl.values["enabled"]:
        reason = "not listed in defaults' enabled"
    if reason:
        conv.keys["enabled"] = False
        conv.note(f"disabled in the source ({reason})")


def _xi_unsupported(eff: dict[str, list[str]], flags: set[str]) -> None:
    types = set(eff.get("type", []))
    if "RPC" in types or "rpc_version" in eff:
        raise _Skip("Sun RPC services are not supported by superd")
    if types & {"TCPMUX", "TCPMUXPLUS"}:
        raise _Skip("TCPMUX (RFC 1078) services are not supported by superd")
    if "SENSOR" in flags:
        raise _Skip("flags = SENSOR: superd has no port-scan trap (deny_time)")


def _xi_program(name: str, eff: dict[str, list[str]], flags: set[str],
                conv: _Service) -> None:
    types = set(eff.get("type", []))
    if "UNLISTED" in types and "port" in eff:
        conv.note("type = UNLISTED: superd takes the port from listen:")
    if "INTERNAL" in types:
        if name not in INTERNAL:
            raise _Skip(f"xinetd internal service '{name}' has no superd equivalent "
                        f"(superd serves {', '.join(INTERNAL)})")
        conv.keys["internal"] = name
        return
    if "redirect" in eff:
        target = " ".join(eff["redirect"])
        raise _Skip(f"redirect = {target}: superd does not forward connections itself; "
                    "use exec: a forwarder such as [socat, '-', 'TCP:HOST:PORT']")
    if "server" not in eff:
        raise _Skip("no server given")
    _xi_wait(eff, conv)
    _set_user(_first(eff, "user"), _first(eff, "group"), conv)
    args = eff.get("server_args", [])
    if "NAMEINARGS" in flags and args:
        _set_exec(eff["server"][0], args[0], args[1:], conv)
    else:
        _set_exec(eff["server"][0], os.path.basename(eff["server"][0]), args, conv)


def _xi_socket(eff: dict[str, list[str]], conv: _Service) -> None:
    kinds = {"stream": "tcp", "dgram": "udp"}
    socktype = _first(eff, "socket_type")
    protocol = _first(eff, "protocol") or kinds.get(socktype, "")
    if socktype and socktype not in kinds:
        raise _Skip(f"socket_type = {socktype}: superd serves stream and dgram only")
    if protocol not in ("tcp", "udp"):
        raise _Skip(f"protocol = {protocol or '(none)'}: superd serves tcp and udp only")
    if socktype and kinds[socktype] != protocol:
        raise _Skip(f"socket_type = {socktype} does not fit protocol = {protocol}")
    conv.protocol = protocol
    conv.tag = conv.tag or protocol


def _xi_wait(eff: dict[str, list[str]], conv: _Service) -> None:
    wait = _first(eff, "wait").lower() == "yes"
    if conv.protocol == "tcp" and wait:
        conv.keys["wait"] = True
    elif conv.protocol == "udp" and not wait:
        conv.note("wait = no on a udp service: superd hands a udp socket to one program "
                  "at a time (wait: true)")


def _xi_listen(name: str, eff: dict[str, list[str]], flags: set[str],
               conv: _Service) -> None:
    port = _port(_first(eff, "port") or name, conv.protocol)
    host: str | None = None
    if "bind" in eff:
        host = _ip(_first(eff, "bind"))
        if host is None:
            _host_name(_first(eff, "bind"), conv)
    if host is None and "IPv4" in flags and "IPv6" not in flags:
        host = "0.0.0.0"
    elif host is None and "IPv6" in flags and _first(eff, "v6only").lower() == "yes":
        host = "::"
    if port is None:
        _no_port(f"no port given and '{name}' is not a port number", conv)
    else:
        conv.binds = [(host, port)]


def _xi_flags(flags: set[str], conv: _Service) -> None:
    for flag in sorted(flags):
        if flag in ("KEEPALIVE", "NODELAY") and conv.protocol == "tcp":
            conv.keys[flag.lower()] = True
        elif flag in ("KEEPALIVE", "NODELAY"):
            conv.note(f"flags {flag}: applies to tcp only")
        elif flag in _FLAG_NOTES:
            conv.note(f"flags {flag}: not carried over: {_FLAG_NOTES[flag]}")
        elif flag not in ("IPv4", "IPv6", "REUSE", "NOLIBWRAP", "NAMEINARGS", "DISABLE"):
            conv.note(f"flags {flag}: unknown to superd convert; not carried over")


def _xi_access(eff: dict[str, list[str]], dfl: _XDefaults, conv: _Service) -> None:
    allow = deny = None
    if "only_from" in eff:
        quiet = eff["only_from"] == dfl.values.get("only_from")
        allow = _networks(eff["only_from"], "only_from", conv, quiet)
        if not allow:
            conv.keys["enabled"] = False
            conv.note("only_from leaves no address superd can match, so xinetd served "
                      "nobody or only named hosts: disabled; write allow: and enable it")
        elif allow != dfl.allow:
            conv.keys["allow"] = allow
    if "no_access" in eff:
        quiet = eff["no_access"] == dfl.values.get("no_access")
        deny = _networks(eff["no_access"], "no_access", conv, quiet)
        if deny != (dfl.deny or []):
            conv.keys["deny"] = deny
    if allow and deny and _shadowed(allow, deny):
        conv.note("an only_from entry lies inside a no_access one: xinetd let the more "
                  "specific match win, superd's deny always wins")


def _xi_value(name: str, values: list[str], conv: _Service) -> None:
    if name in _XI_SETTERS:
        _XI_SETTERS[name](values, conv)
    elif name in _DROPPED:
        conv.note(f"{name} = {' '.join(values)}: not carried over: {_DROPPED[name]}")
    elif name not in ("user", "group", "passenv"):
        conv.note(f"{name} = {' '.join(values)}: unknown xinetd attribute; not carried "
                  "over (xinetd ignores it too)")


# --- xinetd: value converters --------------------------------------------


def _limit(key: str) -> Any:
    def setter(values: list[str], conv: _Service) -> None:
        text = values[0] if values else ""
        if text.isdigit() and 0 < int(text) <= 1_000_000:
            conv.keys[key] = int(text)
        elif text.upper() == "UNLIMITED":
            conv.keys[key] = _UNLIMITED
        else:
            conv.note(f"'{text}' is not a usable {key}; not carried over")
    return setter


def _unlimited(conv: _Service, fallback: Any) -> None:
    """superd always limits: UNLIMITED becomes its default, or no extra limit."""
    if conv.keys.get("max_connections") is _UNLIMITED:
        conv.keys["max_connections"] = 64
        conv.note("instances = UNLIMITED: superd always has a limit; max_connections: 64 "
                  "(its default) is written here, raise it if needed")
    if conv.keys.get("per_source") is _UNLIMITED:
        most = conv.keys.get("max_connections") or fallback
        conv.keys["per_source"] = most if isinstance(most, int) else 64
        conv.note("per_source = UNLIMITED: per_source set to max_connections, so it adds "
                  "no limit of its own")


def _cps(values: list[str], conv: _Service) -> None:
    try:
        rate = float(values[0])
    except (IndexError, ValueError):
        conv.note(f"cps = {' '.join(values)}: not a rate; not carried over")
        return
    if rate <= 0:
        conv.note(f"cps = {' '.join(values)}: not a rate; not carried over")
        return
    conv.keys["rate"] = int(rate) if rate.is_integer() else rate
    off = values[1] if len(values) > 1 else "10"
    conv.note(f"cps = {' '.join(values)}: rate: {values[0]} a second; past it xinetd "
              f"turned the service off for {off} s, superd pauses accepting instead")


def _umask(values: list[str], conv: _Service) -> None:
    text = values[0] if values else ""
    if re.fullmatch(r"[0-7]{1,4}", text) and int(text, 8) <= 0o777:
        conv.keys["umask"] = f"{int(text, 8):03o}"
    else:
        conv.note(f"umask = {text}: not an octal mask; not carried over")


def _nice(values: list[str], conv: _Service) -> None:
    text = values[0] if values else ""
    if re.fullmatch(r"-?\d+", text) and -20 <= int(text) <= 19:
        conv.keys["nice"] = int(text)
    else:
        conv.note(f"nice = {text}: not in -20..19; not carried over")


def _env(values: list[str], conv: _Service) -> None:
    env: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if sep and _ENV_NAME.match(name):
            env[name] = value
        else:
            conv.note(f"env {item}: not NAME=value; not carried over")
    if env:
        conv.keys["env"] = env


def _xi_passenv(values: list[str], conv: _Service, force: bool = False) -> None:
    names = [v for v in values if _ENV_NAME.match(v) and v not in _PRIVATE_ENV]
    for bad in (v for v in values if v not in names):
        conv.note(f"passenv {bad}: not passed on (not a name, or superd's own)")
    if names or force:
        conv.keys["pass_env"] = names


def _rlimit(attr: str) -> Any:
    key = _RLIMITS[attr]

    def setter(values: list[str], conv: _Service) -> None:
        text = values[0] if values else ""
        size = re.fullmatch(r"(\d+)([KM]?)", text.upper())
        if text.upper() == "UNLIMITED":
            value: int | str = "unlimited"
        elif size and (key in _SIZE_RLIMITS or not size.group(2)):
            value = int(size.group(1)) if not size.group(2) else text.upper()
        else:
            conv.note(f"{attr} = {text}: not a usable limit; not carried over")
            return
        conv.keys.setdefault("rlimits", {})[key] = value
    return setter


_XI_SETTERS: dict[str, Any] = {
    "instances": _limit("max_connections"),
    "per_source": _limit("per_source"),
    "cps": _cps,
    "umask": _umask,
    "nice": _nice,
    "env": _env,
    **{attr: _rlimit(attr) for attr in _RLIMITS},
}


def _networks(values: list[str], attr: str, conv: _Service,
              quiet: bool = False) -> list[str]:
    nets: list[str] = []
    dropped: list[str] = []
    for value in values:
        found = _xi_address(value)
        if found is None:
            dropped.append(value)
        nets.extend(n for n in found or [] if n not in nets)
    if dropped and not quiet:
        warn = " superd will NOT refuse them" if attr == "no_access" else ""
        conv.note(f"{attr}: dropped {' '.join(dropped)}: host, domain and network names "
                  f"are not addresses and superd never resolves names.{warn}")
    return nets


def _xi_address(text: str) -> list[str] | None:
    """CIDR strings for one only_from/no_access entry, or None for a name."""
    factor = re.fullmatch(r"((?:\d{1,3}\.){1,3})\{([\d,]+)\}", text)
    if factor:
        parts = [f"{factor.group(1)}{p}" for p in factor.group(2).split(",") if p]
        found = [_partial_v4(p) for p in parts]
        return None if None in found else [f for f in found if f is not None]
    if re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}", text):
        return ["0.0.0.0/0", "::/0"] if text == "0.0.0.0" else [_partial_v4(text) or text]
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    whole = net.prefixlen == net.max_prefixlen
    return [str(net.network_address) if whole else str(net)]


def _partial_v4(text: str) -> str | None:
    """xinetd's IPv4 with trailing zero (or missing) parts as wildcards."""
    parts = text.split(".")
    while parts and parts[-1] == "0":
        parts.pop()
    if len(parts) > 4 or any(not p.isdigit() or int(p) > 255 for p in parts):
        return None
    prefix = 8 * len(parts)
    address = ".".join(parts + ["0"] * (4 - len(parts)))
    return address if prefix == 32 else f"{address}/{prefix}"


def _shadowed(allow: list[str], deny: list[str]) -> bool:
    a_nets = [ipaddress.ip_network(a) for a in allow]
    d_nets = [ipaddress.ip_network(d) for d in deny]
    return any(a.version == d.version and a != d and a.subnet_of(d)
               for a in a_nets for d in d_nets)


# --- naming, overlaps, output --------------------------------------------


def _name_services(services: list[_Service]) -> None:
    taken: set[str] = set()
    for conv in services:
        base = re.sub(r"[^A-Za-z0-9._-]", "-", conv.name).strip("-._") or "service"
        name = base
        if name in taken and conv.tag not in ("", "-"):
            name = f"{base}-{conv.tag}"
        number = 2
        while name in taken:
            name, number = f"{base}-{number}", number + 1
        if name != conv.name:
            conv.note(f"named '{name}': '{conv.name}' is taken or not a valid name")
        conv.name = name
        taken.add(name)


def _resolve_overlaps(services: list[_Service]) -> None:
    """Keep to superd's rule that no two listen addresses overlap.

    A service's own redundant addresses are dropped; a service whose address
    an earlier enabled one already takes is disabled.
    """
    taken: dict[tuple[str, int | str], list[tuple[str | None, str]]] = {}
    for conv in services:
        _own_overlaps(conv)
        if conv.skipped or conv.keys.get("enabled") is False:
            continue
        clash = next((name for host, where in conv.binds
                      for other, name in taken.get((conv.protocol, where), [])
                      if isinstance(where, str) or _overlap(host, other)), None)
        if clash is not None:
            conv.keys["enabled"] = False
            conv.note(f"listens where service '{clash}' does: disabled so that the file "
                      "loads")
            continue
        for host, where in conv.binds:
            taken.setdefault((conv.protocol, where), []).append((host, conv.name))


def _own_overlaps(conv: _Service) -> None:
    kept: list[tuple[str | None, int | str]] = []
    for host, where in conv.binds:
        if any(w == where and (isinstance(w, str) or _overlap(h, host)) for h, w in kept):
            conv.note(f"listen address {host or '*'} dropped: another address of this "
                      "service already covers it")
        else:
            kept.append((host, where))
    conv.binds = kept


def _overlap(a: str | None, b: str | None) -> bool:
    """superd's rule: a bare port overlaps all; 0.0.0.0 and :: their family."""
    if a is None or b is None or a == b:
        return True
    va, vb = ipaddress.ip_address(a), ipaddress.ip_address(b)
    return va.version == vb.version and (va.is_unspecified or vb.is_unspecified)


def _listen_value(binds: list[tuple[str | None, int | str]]) -> Any:
    values: list[Any] = []
    for host, where in binds:
        if isinstance(where, str) or host is None:
            values.append(where)
        else:
            values.append(f"[{host}]:{where}" if ":" in host else f"{host}:{where}")
    return values[0] if len(values) == 1 else values


def _yaml(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20,
                          allow_unicode=True, sort_keys=False)
    return text.removesuffix("...\n").strip()


def _comment(text: str, indent: str) -> str:
    return f"{indent}# {' '.join(text.split())}"


def _service_lines(conv: _Service) -> list[str]:
    keys = dict(conv.keys)
    if conv.binds:
        keys["listen"] = _listen_value(conv.binds)
    if conv.protocol == "udp":
        keys["protocol"] = "udp"
    order = sorted(keys, key=lambda k: _KEY_ORDER.index(k) if k in _KEY_ORDER else 99)
    body = [f"{_yaml(conv.name)}:"] + [f"  {k}: {_yaml(keys[k])}" for k in order]
    lines = ["", _comment(f"{conv.origin}: {conv.title}", "  ")]
    if conv.skipped:
        lines.append(_comment(f"NOT CONVERTED: {conv.skipped}", "  "))
    lines += [_comment(n, "  ") for n in conv.notes]
    prefix = "  # " if conv.skipped else "  "
    return lines + [prefix + line for line in body]


def _render(doc: _Doc) -> str:
    lines = ["# superd configuration converted by superd convert from:"]
    lines += [f"#   {path}" for path in doc.sources]
    lines += [_comment(text, "") for text in doc.header]
    lines.append(_comment(
        "Where the source set no limit, superd's defaults apply (max_connections 64 and "
        "per_source 16 a service, no rate limit); superd never turns a service off.", ""))
    lines.append("")
    if doc.defaults or doc.default_notes:
        lines.append("defaults:" if doc.defaults else "# defaults:")
        lines += [_comment(n, "  ") for n in doc.default_notes]
        lines += [f"  {k}: {_yaml(v)}" for k, v in doc.defaults.items()]
        lines.append("")
    live = [c for c in doc.services if not c.skipped]
    lines.append("services:" if live else "services: {}")
    for conv in doc.services:
        lines += _service_lines(conv)
    return "\n".join(lines) + "\n"
