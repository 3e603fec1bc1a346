"""xinetd configuration to :class:`~superd.convert.Entry` objects.

:func:`parse` reads ``service NAME { ... }`` and ``defaults { ... }``
blocks, following ``include FILE`` and ``includedir DIR`` (skipping names
with a dot or ending in ``~``, as xinetd does). :func:`convert_blocks`
applies ``defaults`` (``=``, ``+=``, ``-=``; list attributes accumulate)
and maps each service: socket, listen address, program, flags, access
lists, limits and process settings. Attributes superd has no equivalent
for are noted with the reason.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from superd.convert import (
    INTERNAL,
    XINETD_HEAD,
    ConvertError,
    Doc,
    Entry,
    Skip,
    host_name,
    ip_text,
    meaningful_lines,
    no_port,
    read_source,
    service_port,
    set_exec,
    set_user,
)

_XI_ATTR = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*(\+=|-=|=)\s*(.*)$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PRIVATE_ENV = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                "WATCHDOG_USEC", "WATCHDOG_PID")
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


# --- xinetd: parsing -----------------------------------------------------


@dataclass
class _Attr:
    name: str
    op: str
    values: list[str]
    line: int


@dataclass
class Block:
    kind: str
    name: str
    file: str
    line: int
    attrs: list[_Attr] = field(default_factory=list)


def parse(path: str, text: str, doc: Doc, seen: set[str]) -> list[Block]:
    """The blocks of *text* and of the files it includes (*seen*: real paths read)."""
    real = os.path.realpath(path)
    if real in seen:
        raise ConvertError(f"{path}: included twice (an include loop?)")
    seen.add(real)
    doc.sources.append(path)
    blocks: list[Block] = []
    block: Block | None = None
    opened = True
    for n, line, _ in meaningful_lines(text, off=False):
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


def _xi_top(path: str, n: int, line: str, doc: Doc, seen: set[str],
            blocks: list[Block]) -> tuple[Block | None, bool]:
    head = XINETD_HEAD.match(line)
    if head:
        block = Block("service" if head.group(1) else "defaults", head.group(1) or "",
                       path, n)
        blocks.append(block)
        return block, head.group(3) is not None
    words = line.split()
    if words[0] in ("include", "includedir") and len(words) == 2:
        target = os.path.join(os.path.dirname(path), words[1])
        if os.path.realpath(target) in seen:
            raise ConvertError(f"{path}:{n}: {line}: already read (an include loop?)")
        try:
            text = read_source(target) if words[0] == "include" else ""
            names = sorted(os.listdir(target)) if words[0] == "includedir" else []
        except (ConvertError, OSError) as e:
            reason = e.strerror if isinstance(e, OSError) else str(e)
            raise ConvertError(f"{path}:{n}: {line}: {reason}") from e
        if words[0] == "include":
            blocks.extend(parse(target, text, doc, seen))
        else:
            blocks.extend(_xi_includedir(target, names, doc, seen))
        return None, True
    raise ConvertError(f"{path}:{n}: expected 'service NAME', 'defaults', 'include' or "
                       f"'includedir', got {line!r}")


def _xi_includedir(directory: str, names: list[str], doc: Doc,
                   seen: set[str]) -> list[Block]:
    skipped = [n for n in names if "." in n or n.endswith("~")]
    if skipped:
        doc.header.append(f"includedir {directory}: skipped {', '.join(skipped)} "
                          "(xinetd ignores names that contain '.' or end in '~')")
    blocks = []
    for name in names:
        path = os.path.join(directory, name)
        if name not in skipped and os.path.isfile(path):
            blocks.extend(parse(path, read_source(path), doc, seen))
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


def convert_blocks(blocks: list[Block], doc: Doc) -> None:
    """Apply the first defaults block and add each service to *doc*."""
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


def _xi_defaults(block: Block, doc: Doc) -> _XDefaults:
    dfl = _XDefaults()
    for attr in block.attrs:
        op = "+=" if attr.name in _XI_LISTS and attr.op == "=" else attr.op
        dfl.values[attr.name] = _apply(dfl.values.get(attr.name), op, attr.values)
    probe = Entry(name="defaults", origin="", title="")
    for name, values in dfl.values.items():
        _xi_default_value(name, values, dfl, probe, doc)
    _unlimited(probe, None)
    doc.defaults.update(probe.keys)
    doc.default_notes.extend(f"defaults: {n}" for n in probe.notes)
    return dfl


def _xi_default_value(name: str, values: list[str], dfl: _XDefaults, probe: Entry,
                      doc: Doc) -> None:
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


def _xi_effective(block: Block, dfl: _XDefaults,
                  conv: Entry) -> tuple[dict[str, list[str]], set[str]]:
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


def _xi_service(block: Block, dfl: _XDefaults, defaults: dict[str, Any]) -> Entry:
    conv = Entry(name=block.name, origin=f"{block.file}:{block.line}",
                     title=f"service {block.name}")
    eff, own = _xi_effective(block, dfl, conv)
    ident = _first(eff, "id")
    if ident:
        conv.name = ident
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
    except Skip as e:
        conv.skipped = str(e)
    return conv


def _first(eff: dict[str, list[str]], name: str) -> str:
    values = eff.get(name) or [""]
    return values[0]


def _xi_enabled(eff: dict[str, list[str]], dfl: _XDefaults, conv: Entry) -> None:
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
        raise Skip("Sun RPC services are not supported by superd")
    if types & {"TCPMUX", "TCPMUXPLUS"}:
        raise Skip("TCPMUX (RFC 1078) services are not supported by superd")
    if "SENSOR" in flags:
        raise Skip("flags = SENSOR: superd has no port-scan trap (deny_time)")


def _xi_program(name: str, eff: dict[str, list[str]], flags: set[str],
                conv: Entry) -> None:
    types = set(eff.get("type", []))
    if "UNLISTED" in types and "port" in eff:
        conv.note("type = UNLISTED: superd takes the port from listen:")
    if "INTERNAL" in types:
        if name not in INTERNAL:
            raise Skip(f"xinetd internal service '{name}' has no superd equivalent "
                        f"(superd serves {', '.join(INTERNAL)})")
        conv.keys["internal"] = name
        return
    if "redirect" in eff:
        target = " ".join(eff["redirect"])
        raise Skip(f"redirect = {target}: superd does not forward connections itself; "
                    "use exec: a forwarder such as [socat, '-', 'TCP:HOST:PORT']")
    if not _first(eff, "server"):
        raise Skip("no server given")
    _xi_wait(eff, conv)
    set_user(_first(eff, "user"), _first(eff, "group"), conv)
    args = eff.get("server_args", [])
    if "NAMEINARGS" in flags and args:
        set_exec(eff["server"][0], args[0], args[1:], conv)
    else:
        set_exec(eff["server"][0], os.path.basename(eff["server"][0]), args, conv)


def _xi_socket(eff: dict[str, list[str]], conv: Entry) -> None:
    kinds = {"stream": "tcp", "dgram": "udp"}
    socktype = _first(eff, "socket_type")
    protocol = _first(eff, "protocol") or kinds.get(socktype, "")
    if socktype and socktype not in kinds:
        raise Skip(f"socket_type = {socktype}: superd serves stream and dgram only")
    if protocol not in ("tcp", "udp"):
        raise Skip(f"protocol = {protocol or '(none)'}: superd serves tcp and udp only")
    if socktype and kinds[socktype] != protocol:
        raise Skip(f"socket_type = {socktype} does not fit protocol = {protocol}")
    conv.protocol = protocol
    conv.tag = conv.tag or protocol


def _xi_wait(eff: dict[str, list[str]], conv: Entry) -> None:
    wait = _first(eff, "wait").lower() == "yes"
    if conv.protocol == "tcp" and wait:
        conv.keys["wait"] = True
    elif conv.protocol == "udp" and not wait:
        conv.note("wait = no on a udp service: superd hands a udp socket to one program "
                  "at a time (wait: true)")


def _xi_listen(name: str, eff: dict[str, list[str]], flags: set[str],
               conv: Entry) -> None:
    port = service_port(_first(eff, "port") or name, conv.protocol)
    host: str | None = None
    if "bind" in eff:
        host = ip_text(_first(eff, "bind"))
        if host is None:
            host_name(_first(eff, "bind"), conv)
    if host is None and "IPv4" in flags and "IPv6" not in flags:
        host = "0.0.0.0"
    elif host is None and "IPv6" in flags and _first(eff, "v6only").lower() == "yes":
        host = "::"
    if port is None:
        no_port(f"no port given and '{name}' is not a port number", conv)
    else:
        conv.binds = [(host, port)]


def _xi_flags(flags: set[str], conv: Entry) -> None:
    for flag in sorted(flags):
        if flag in ("KEEPALIVE", "NODELAY") and conv.protocol == "tcp":
            conv.keys[flag.lower()] = True
        elif flag in ("KEEPALIVE", "NODELAY"):
            conv.note(f"flags {flag}: applies to tcp only")
        elif flag in _FLAG_NOTES:
            conv.note(f"flags {flag}: not carried over: {_FLAG_NOTES[flag]}")
        elif flag not in ("IPv4", "IPv6", "REUSE", "NOLIBWRAP", "NAMEINARGS", "DISABLE"):
            conv.note(f"flags {flag}: unknown to superd convert; not carried over")


def _xi_access(eff: dict[str, list[str]], dfl: _XDefaults, conv: Entry) -> None:
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


def _xi_value(name: str, values: list[str], conv: Entry) -> None:
    if name in _XI_SETTERS:
        _XI_SETTERS[name](values, conv)
    elif name in _DROPPED:
        conv.note(f"{name} = {' '.join(values)}: not carried over: {_DROPPED[name]}")
    elif name not in ("user", "group", "passenv"):
        conv.note(f"{name} = {' '.join(values)}: unknown xinetd attribute; not carried "
                  "over (xinetd ignores it too)")


# --- xinetd: value converters --------------------------------------------


def _limit(key: str) -> Any:
    def setter(values: list[str], conv: Entry) -> None:
        text = values[0] if values else ""
        if text.isdigit() and 0 < int(text) <= 1_000_000:
            conv.keys[key] = int(text)
        elif text.upper() == "UNLIMITED":
            conv.keys[key] = _UNLIMITED
        else:
            conv.note(f"'{text}' is not a usable {key}; not carried over")
    return setter


def _unlimited(conv: Entry, fallback: Any) -> None:
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


def _cps(values: list[str], conv: Entry) -> None:
    try:
        rate = float(values[0])
    except (IndexError, ValueError):
        conv.note(f"cps = {' '.join(values)}: not a rate; not carried over")
        return
    if not (math.isfinite(rate) and rate > 0):  # nor are nan and inf
        conv.note(f"cps = {' '.join(values)}: not a rate; not carried over")
        return
    conv.keys["rate"] = int(rate) if rate.is_integer() else rate
    off = values[1] if len(values) > 1 else "10"
    conv.note(f"cps = {' '.join(values)}: rate: {values[0]} a second; past it xinetd "
              f"turned the service off for {off} s, superd pauses accepting instead")


def _umask(values: list[str], conv: Entry) -> None:
    text = values[0] if values else ""
    if re.fullmatch(r"[0-7]{1,4}", text) and int(text, 8) <= 0o777:
        conv.keys["umask"] = f"{int(text, 8):03o}"
    else:
        conv.note(f"umask = {text}: not an octal mask; not carried over")


def _nice(values: list[str], conv: Entry) -> None:
    text = values[0] if values else ""
    if re.fullmatch(r"-?\d+", text) and -20 <= int(text) <= 19:
        conv.keys["nice"] = int(text)
    else:
        conv.note(f"nice = {text}: not in -20..19; not carried over")


def _env(values: list[str], conv: Entry) -> None:
    env: dict[str, str] = {}
    for item in values:
        name, sep, value = item.partition("=")
        if sep and _ENV_NAME.match(name):
            env[name] = value
        else:
            conv.note(f"env {item}: not NAME=value; not carried over")
    if env:
        conv.keys["env"] = env


def _xi_passenv(values: list[str], conv: Entry, force: bool = False) -> None:
    names = [v for v in values if _ENV_NAME.match(v) and v not in _PRIVATE_ENV]
    for bad in (v for v in values if v not in names):
        conv.note(f"passenv {bad}: not passed on (not a name, or superd's own)")
    if names or force:
        conv.keys["pass_env"] = names


def _rlimit(attr: str) -> Any:
    key = _RLIMITS[attr]

    def setter(values: list[str], conv: Entry) -> None:
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


def _networks(values: list[str], attr: str, conv: Entry,
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
        if text == "0.0.0.0":
            return ["0.0.0.0/0", "::/0"]
        found = _partial_v4(text)
        return None if found is None else [found]
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None
    whole = net.prefixlen == net.max_prefixlen
    return [str(net.network_address) if whole else str(net)]


def _partial_v4(text: str) -> str | None:
    """xinetd's IPv4 with trailing zero (or missing) parts as wildcards.

    None if a part is not 0..255 in plain ASCII decimal (``300.1.2.3``,
    ``09.1.2.3``): that is no address superd can write, so the entry is
    dropped with a note, as names are.
    """
    parts = text.split(".")
    while parts and parts[-1] == "0":
        parts.pop()
    if len(parts) > 4 or any(not _octet(p) for p in parts):
        return None
    prefix = 8 * len(parts)
    address = ".".join(parts + ["0"] * (4 - len(parts)))
    return address if prefix == 32 else f"{address}/{prefix}"


def _octet(text: str) -> bool:
    return text.isascii() and text.isdigit() and int(text) <= 255 and text == str(int(text))


def _shadowed(allow: list[str], deny: list[str]) -> bool:
    a_nets = [ipaddress.ip_network(a) for a in allow]
    d_nets = [ipaddress.ip_network(d) for d in deny]
    return any(a.version == d.version and a != d and a.subnet_of(d)
               for a in a_nets for d in d_nets)

