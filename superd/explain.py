"""``superd explain SERVICE ADDRESS``: what would happen to that client.

Works on the configuration, with the same functions the daemon uses
(``limits.access``, ``limits.source_group``, ``spawn.base_env``), so the
answer cannot drift from the behaviour.  It first asks whether the client
can connect at all, from the addresses the service listens on: one of
another address family cannot, and neither can one outside this host when
the service listens on a loopback address (the one thing asked of the host
itself: whether the client's address is one of its own).
"""

from __future__ import annotations

import grp
import ipaddress
import shlex
import socket

from superd.config import Config, ListenAddr, Service
from superd.limits import IPAddress, access, source_group
from superd.spawn import base_env


def parse_client(text: str) -> tuple[IPAddress, int | None]:
    """``ADDR``, ``ADDR:PORT`` or ``[V6]:PORT``; raise ValueError."""
    port: int | None = None
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest.startswith(":"):
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, p = text.partition(":")
        port = int(p)
    else:
        host = text
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return ip, port


def explain(cfg: Config, svc: Service, ip: IPAddress, port: int | None) -> list[str]:
    lines = [f"service {svc.name} ({svc.where})"]
    reached, why = reach(svc, ip)
    if reached is None:
        lines.append(f"client {ip}: UNREACHABLE ({why})")
        lines.append("the client cannot connect: allow/deny and the limits never see it, "
                     "and no program starts")
        return lines
    allowed, rule = access(svc, ip)
    lines.append(f"client {ip}: {'ALLOWED' if allowed else 'DENIED'} ({rule})")
    if not svc.enabled:
        lines.append("the service is disabled (enabled: false): nothing listens")
    if not allowed:
        lines.append("the connection is accepted and closed at once; no program starts")
        return lines
    lines += _limits(cfg, svc, ip)
    if svc.internal:
        lines.append(f"served inside superd: internal {svc.internal}")
        return lines
    lines += _program(svc)
    lines.append("environment:")
    env = base_env(svc)
    env.update(_connection_env(svc, reached, ip, port))
    lines += [f"  {k}={v}" for k, v in env.items()]
    return lines


def _limits(cfg: Config, svc: Service, ip: IPAddress) -> list[str]:
    v4, v6 = svc.source_prefix
    group = source_group(svc, ip)
    lines = [
        f"per_source: counts in group {group} (IPv4 /{v4}, IPv6 /{v6}); "
        f"at most {svc.per_source} at once, more are refused",
        f"max_connections: {svc.max_connections} for this service, "
        f"{cfg.max_connections} for all services",
    ]
    if svc.rate:
        burst = max(1.0, svc.rate) if svc.burst is None else svc.burst
        lines.append(f"rate: {svc.rate:g} new connections/s, burst {burst:g} (up to "
                     f"{burst:g} at once after a quiet spell, then one every "
                     f"{1 / svc.rate:g}s)")
    if svc.on_limit == "queue":
        lines.append("on_limit: queue (at max_connections or rate, clients wait in "
                     "the listen queue)")
    else:
        msg = f", after sending {svc.reject_message!r}" if svc.reject_message else ""
        lines.append(f"on_limit: reject (over a limit the connection is closed{msg})")
    return lines


def _program(svc: Service) -> list[str]:
    ident = svc.identity
    lines = [f"program: {' '.join(shlex.quote(a) for a in svc.exec)}"]
    if ident is not None:
        try:
            gname = grp.getgrgid(ident.gid).gr_name
        except KeyError:
            gname = str(ident.gid)
        switch = "" if ident.switch else " (superd's own identity)"
        lines.append(f"runs as: {ident.user} (uid {ident.uid}), group {gname} "
                     f"({ident.gid}){switch}")
    lines.append(f"cwd {svc.cwd}, umask {svc.umask:03o}, nice {svc.nice}, "
                 f"stderr {svc.stderr}")
    if svc.rlimits:
        lines.append("rlimits: " + ", ".join(f"{n} {s}/{h}" for n, s, h in svc.rlimits))
    if svc.timeout:
        lines.append(f"timeout: {svc.timeout:g}s, then SIGTERM; SIGKILL {svc.kill_grace:g}s "
                     "later")
    return lines


def reach(svc: Service, ip: IPAddress) -> tuple[ListenAddr | None, str]:
    """The listen address *ip* can connect to (the first of them), or None
    and why none.  A bare port is a dual-stack socket; ``[::]`` is IPv6 only."""
    addrs = [a for a in svc.listen if a.path is None]
    if not addrs:
        return None, "the service listens only on UNIX socket paths: an IP client cannot " \
                     "connect to it"
    same = [a for a in addrs if a.host is None or _version(a.host) == ip.version]
    if not same:
        family = "IPv6" if ip.version == 6 else "IPv4"
        theirs = "IPv4" if ip.version == 6 else "IPv6"
        return None, (f"the service listens only on {_listing(addrs)}, {theirs}: an "
                      f"{family} client cannot connect to it")
    for addr in same:
        if addr.host is None or not ipaddress.ip_address(addr.host).is_loopback:
            return addr, ""
        if ip.is_loopback or is_local(ip):
            return addr, ""
    return None, (f"the service listens only on {_listing(same)}, a loopback address: "
                  f"only programs on this host can connect, and {ip} is not one of this "
                  "host's addresses")


def _version(host: str) -> int:
    return ipaddress.ip_address(host).version


def _listing(addrs: list[ListenAddr]) -> str:
    return ", ".join(str(a) for a in addrs)


def is_local(ip: IPAddress) -> bool:
    """True if *ip* is one of this host's addresses: a socket can be bound to
    it (False too where its family is unavailable)."""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((str(ip), 0))
    except OSError:
        return False
    return True


def _connection_env(svc: Service, addr: ListenAddr, ip: IPAddress,
                    port: int | None) -> dict[str, str]:
    """What a program started for *ip*, connected to *addr*, finds in its
    environment besides the service's own variables."""
    v6 = ip.version == 6
    base = "UDP" if svc.datagram else "TCP"
    proto = base + ("6" if v6 else "")
    if svc.wait:
        return {"PROTO": proto}
    local = addr.host or "<the address the client connected to>"
    rport = str(port) if port is not None else "<client port>"
    return {"PROTO": proto, "REMOTE_ADDR": str(ip), "REMOTE_PORT": rport,
            "REMOTE_HOST": str(ip), "TCPREMOTEIP": str(ip), "TCPREMOTEPORT": rport,
            "TCPLOCALIP": local, "TCPLOCALPORT": str(addr.port)}
