"""inetd.conf entries to :class:`~superd.convert.Entry` objects.

Reads the classic six-field lines (``service socktype proto wait user
program argv...``) with the extensions of the inetds in use: Debian's
``#<off>#`` disabled entries, OpenBSD/FreeBSD ``host:service`` and ``host:``
default-address lines, ``tcp6``/``tcp46`` protocols, ``nowait.MAX`` and
FreeBSD's ``/max-child/max-connections/max-child-per-ip``, ``user:group``
and ``user/login-class``, and UNIX sockets (``unix`` protocol).
"""

from __future__ import annotations

import os
import re
import socket

from superd.convert import (
    INTERNAL,
    ConvertError,
    Entry,
    Skip,
    host_name,
    ip_text,
    meaningful_lines,
    no_port,
    service_port,
    set_exec,
    set_user,
)

_WAIT = re.compile(r"^(wait|nowait)(?:\.(\d+))?((?:/\d+){0,3})$")


def convert_file(path: str, text: str, out: list[Entry]) -> None:
    """Append an Entry to *out* for each entry of the inetd.conf *text*."""
    default_hosts: list[str | None] = [None]
    for n, line, enabled in meaningful_lines(text):
        words = line.split()
        if len(words) == 1 and words[0].endswith(":"):
            if enabled:
                default_hosts = _split_hosts(words[0][:-1])
        elif len(words) >= 6:
            out.append(_inetd_entry(words, f"{path}:{n}", default_hosts, enabled))


def _split_hosts(text: str) -> list[str | None]:
    return [None if h in ("*", "") else h.strip("[]") for h in text.split(",")]


def _inetd_entry(words: list[str], origin: str, default_hosts: list[str | None],
                 enabled: bool) -> Entry:
    service, socktype, proto, waitf, userf, program = words[:6]
    conv = Entry(name=service, origin=origin, title=" ".join(words))
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
    except Skip as e:
        conv.skipped = str(e)
    return conv


def _inetd_socket(service: str, socktype: str, proto: str,
                  default_hosts: list[str | None], conv: Entry) -> None:
    base, *options = proto.split(",")
    if options:
        conv.note(f"{','.join(options)}: superd does not set socket buffer sizes")
    _tcpmux(service.rpartition(":")[2], conv)
    if base.startswith("rpc/") or ("/" in service and base != "unix"):
        raise Skip("Sun RPC services are not supported by superd")
    kinds = {"stream": "tcp", "dgram": "udp"}
    if socktype not in kinds:
        raise Skip(f"socket type '{socktype}': superd serves stream and dgram only")
    conv.protocol = kinds[socktype]
    conv.tag = base
    if base == "unix":
        if not service.startswith("/"):
            raise Skip(f"UNIX socket '{service}' is not an absolute path")
        conv.name = os.path.basename(service.rstrip("/")) or "unix"
        conv.binds = [(None, os.path.normpath(service))]
        return
    if not re.fullmatch(rf"{conv.protocol}(4|6|46)?", base):
        raise Skip(f"protocol '{base}' does not fit socket type '{socktype}'")
    hosts_text, sep, name = service.rpartition(":")
    hosts = _split_hosts(hosts_text) if sep else default_hosts
    conv.name = name
    port = service_port(name, conv.protocol)
    if port is None:
        no_port(f"'{name}' is not a port number", conv)
    else:
        conv.binds = _inetd_binds(hosts, port, base[3:], conv)


def _tcpmux(service: str, conv: Entry) -> None:
    """FreeBSD's ``tcpmux/NAME`` (``+NAME``: inetd sends the "+" reply itself)."""
    head, sep, name = service.partition("/")
    if head != "tcpmux" or not sep:
        return
    conv.name = name.lstrip("+") or "tcpmux"
    raise Skip(f"TCPMUX (RFC 1078) service '{conv.name}': clients reach it by name "
               "through the tcpmux service on port 1, and superd has no TCPMUX "
               "multiplexer; to keep the program, give it a port of its own (listen:) "
               "and point its clients there")


def _inetd_binds(hosts: list[str | None], port: int, family: str,
                 conv: Entry) -> list[tuple[str | None, int | str]]:
    wildcard = {"4": "0.0.0.0", "6": "::"}.get(family)
    if family == "46":
        conv.note("tcp46/udp46: superd's dual-stack socket shows IPv4 clients as plain "
                  "IPv4 addresses, not v4-mapped IPv6 ones")
    binds: list[tuple[str | None, int | str]] = []
    for host in hosts:
        if host is None:
            binds.append((wildcard, port))
        elif ip_text(host) is not None:
            binds.append((ip_text(host), port))
        else:
            host_name(host, conv)
    if not binds:
        binds.append((wildcard, port))
    return binds


def _inetd_wait(text: str, origin: str, conv: Entry) -> tuple[bool, int]:
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


def _per_minute(count: int, conv: Entry) -> None:
    """inetd's nowait.N: at most N starts within a minute, N of them at once."""
    conv.keys["rate"] = f"{count}/min"
    conv.keys["burst"] = count
    conv.note(f"at most {count} starts a minute (inetd stopped the service for ten "
              f"minutes past that): {count} clients are served at once, then one every "
              f"{60 / count:g}s; past that superd queues new clients instead")


def _inetd_wait_mode(wait: bool, conv: Entry) -> None:
    if conv.protocol == "tcp" and wait:
        conv.keys["wait"] = True
    elif conv.protocol == "udp" and not wait:
        conv.note("nowait on a datagram service: superd hands a udp socket to one "
                  "program at a time (wait: true)")


def _inetd_user(text: str, conv: Entry) -> None:
    text, _, login_class = text.partition("/")
    if login_class:
        conv.note(f"login class '{login_class}': superd has no login classes")
    sep = ":" if ":" in text else "."
    user, _, group = text.partition(sep)
    set_user(user, group, conv)


def _internal_name(service: str, protocol: str, argv: list[str]) -> str:
    if service.isdigit():
        if argv and argv[0] in INTERNAL:
            return argv[0]
        raise Skip("an internal service on a numeric port: inetd finds built-ins by "
                    "name (write the name as argv[0]: 'internal echo')")
    official = service
    port = service_port(service, protocol)
    if port is not None:
        try:
            official = socket.getservbyport(port, protocol)
        except OSError:
            official = service
    for name in (official, service):
        if name in INTERNAL:
            return name
    raise Skip(f"internal service '{service}' has no superd equivalent (superd "
                f"serves {', '.join(INTERNAL)})")


def _inetd_exec(program: str, argv: list[str], conv: Entry) -> None:
    argv0 = argv[0] if argv else os.path.basename(program)
    set_exec(program, argv0, argv[1:], conv)


