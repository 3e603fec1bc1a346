"""``superd convert``: inetd.conf and xinetd configuration to superd YAML.

``convert(paths)`` reads each file, tells the format by its content (xinetd
``service NAME {`` / ``defaults`` / ``include(dir)``, or inetd.conf lines of
six or more fields), maps every entry to a superd service and returns one
YAML document. Whatever superd cannot carry over is written as a comment
beside the service, with the reason; an entry that cannot become a service
at all (RPC, TCPMUX, ``redirect``, an unknown port) is written commented
out. Nothing here prints; problems that stop the conversion raise
:class:`ConvertError` naming ``FILE:LINE``.

This module holds what both formats share: the :class:`Entry` each source
entry becomes, reading and telling the formats apart, the mappings common
to both (ports, addresses, user, program), and naming, overlap resolution
and rendering. :mod:`superd.convert_inetd` and :mod:`superd.convert_xinetd`
turn their format's entries into :class:`Entry` objects.

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
XINETD_HEAD = re.compile(r"^(?:service\s+(\S+)|(defaults))\s*(\{)?\s*$")
_OFF = "#<off>#"
# what YAML 1.1 accepts in a stream (PyYAML's reader and libyaml agree)
_UNPRINTABLE = re.compile("[^\t\n\r\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd"
                          "\U00010000-\U0010ffff]")
_KEY_ORDER = ("enabled", "listen", "protocol", "internal", "exec", "wait", "user", "group",
              "env", "pass_env", "umask", "nice", "rlimits", "max_connections",
              "per_source", "rate", "burst", "allow", "deny", "keepalive", "nodelay")


class ConvertError(Exception):
    """The conversion cannot go on: unreadable file, unknown format, bad syntax."""


class Skip(Exception):
    """This entry cannot become a superd service; the message says why."""


@dataclass
class Entry:
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
class Doc:
    """The output document: its sources, header notes, defaults and services."""

    sources: list[str] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    defaults: dict[str, Any] = field(default_factory=dict)
    default_notes: list[str] = field(default_factory=list)
    services: list[Entry] = field(default_factory=list)


def convert(paths: list[str]) -> str:
    """Read inetd.conf or xinetd configuration file(s), detect the format by content,
    and return an equivalent superd YAML document (a string) with a comment beside
    anything that could not be carried over and why."""
    # The format modules build on Entry and the helpers below: import them here.
    from superd import convert_inetd, convert_xinetd

    if not paths:
        raise ConvertError("no file given to convert")
    doc = Doc()
    xinetd: list[convert_xinetd.Block] = []
    for path in paths:
        text = read_source(path)
        if _detect(path, text) == "inetd":
            doc.sources.append(path)
            convert_inetd.convert_file(path, text, doc.services)
        else:
            xinetd.extend(convert_xinetd.parse(path, text, doc, set()))
    if xinetd:
        convert_xinetd.convert_blocks(xinetd, doc)
    _name_services(doc.services)
    _resolve_overlaps(doc.services)
    return _render(doc)


# --- reading and telling the format ------------------------------------


def read_source(path: str) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise ConvertError(f"{path}: cannot read: {e.strerror}") from e
    if len(data) > MAX_BYTES:
        raise ConvertError(f"{path}: larger than 4 MiB; not a configuration file")
    if b"\0" in data:  # no C reader sees past it; and pwd, socket and open() refuse it
        line = data.count(b"\n", 0, data.index(b"\0")) + 1
        raise ConvertError(f"{path}:{line}: a NUL byte; not a text configuration file")
    return data.decode("utf-8", errors="replace")


def meaningful_lines(text: str, off: bool = True) -> list[tuple[int, str, bool]]:
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
    lines = meaningful_lines(text)
    for _, line, enabled in lines:
        words = line.split()
        if enabled and (XINETD_HEAD.match(line) or words[0] in ("include", "includedir")):
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


# --- mappings both formats share ----------------------------------------


def no_port(what: str, conv: Entry) -> None:
    """Carry on converting, but leave the entry commented out."""
    conv.keys["listen"] = "PORT"
    conv.skipped = (f"{what} or a {conv.protocol} service in /etc/services on this "
                    "machine: write listen: PORT and uncomment it")


def service_port(name: str, protocol: str) -> int | None:
    if name.isdigit():
        return int(name) if 0 < int(name) < 65536 else None
    try:
        return socket.getservbyname(name, protocol)
    except OSError:
        return None


def ip_text(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def host_name(host: str, conv: Entry) -> None:
    conv.keys["enabled"] = False
    conv.note(f"listen address '{host}' is a host name and superd never resolves names: "
              "write its IP address and then enable the service (as converted it would "
              "listen on every address)")


def set_user(user: str, group: str, conv: Entry) -> None:
    """The source's user (inetd's user field, xinetd's user attribute) as user:.

    superd running as root refuses an exec service without one, so a source
    that names none gets a note saying what to write.
    """
    if user:
        conv.keys["user"] = user
        if not user.isdigit() and not _user_exists(user):
            conv.note(f"user '{user}' does not exist on this machine")
    else:
        conv.note("no user in the source: superd running as root refuses a service without "
                  "user: (without it every such service would share the uid 'nobody'); "
                  "write user: nobody to accept that, or a user of its own")
    if group:
        conv.keys["group"] = group


def _user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def set_exec(program: str, argv0: str, args: list[str], conv: Entry) -> None:
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


# --- naming, overlaps, output --------------------------------------------


def _name_services(services: list[Entry]) -> None:
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


def _resolve_overlaps(services: list[Entry]) -> None:
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


def _own_overlaps(conv: Entry) -> None:
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
    return f"{indent}# {_one_line(text)}"


def _one_line(text: str) -> str:
    """*text* on one line, each character YAML refuses even in a comment escaped.

    A source line may hold control characters (C0 but tab, DEL, C1): copied
    as they are into a comment, they made superd refuse the whole document
    ("control characters are not allowed").
    """
    return _UNPRINTABLE.sub(_escape, " ".join(text.split()))


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _service_lines(conv: Entry) -> list[str]:
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


def _render(doc: Doc) -> str:
    lines = ["# superd configuration converted by superd convert from:"]
    lines += [f"#   {_one_line(path)}" for path in doc.sources]
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
