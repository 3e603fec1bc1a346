"""What ``superd status`` shows: the report built in the daemon, and its table.

``report()`` runs inside the daemon (from a control request) and reads the
loop's state; ``render()`` runs in the ``superd status`` client.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from superd.listeners import State, key_for

if TYPE_CHECKING:
    from superd.loop import Daemon


def report(daemon: Daemon) -> dict[str, Any]:
    cfg = daemon.config
    now = time.monotonic()
    services = []
    for svc in cfg.services:
        stats = daemon.stats.get(svc.name)
        if stats is None:
            continue
        listeners = [lst for lst in daemon.listeners.values() if lst.service.name == svc.name]
        wanted = {key_for(a, svc.protocol) for a in svc.listen}
        services.append({
            "name": svc.name,
            "protocol": svc.protocol,
            "program": f"internal {svc.internal}" if svc.internal else " ".join(svc.exec),
            "state": _state(svc.enabled, listeners, wanted, daemon),
            "listeners": [{"address": lst.describe(), "state": lst.state.value}
                          for lst in listeners],
            "accepted": stats.accepted,
            "active": stats.active,
            "rejected": dict(stats.rejected),
            "spawn_failures": stats.spawn_failures,
            "health_checks": stats.health_checks,
            "exits": dict(stats.exits),
            "connections": _connections(daemon, svc.name, now),
        })
    return {"ok": True, "pid": daemon.pid, "config": daemon.config_path,
            "uptime": round(now - daemon.started, 3), "active": daemon.total_active,
            "max_connections": cfg.max_connections, "reloads": dict(daemon.reloads),
            "services": services}


def _state(enabled: bool, listeners: list, wanted: set, daemon: Daemon) -> str:  # type: ignore[type-arg]
    if not enabled:
        return "disabled"
    if daemon.stopping:
        return "stopping"
    keys = {lst.key for lst in listeners}
    if not listeners or (not daemon.handed and wanted - keys):
        return "failed to bind"
    states = [lst.state for lst in listeners]
    if all(s == State.LISTENING for s in states):
        return "listening"
    return next(s.value for s in states if s != State.LISTENING)


def _connections(daemon: Daemon, name: str, now: float) -> list[dict[str, Any]]:
    rows = []
    for child in daemon.children:
        if child.service.name == name:
            cpu, rss = _usage(child.pid)
            rows.append({"pid": child.pid, "client": child.peer,
                         "age": round(now - child.started, 3), "cpu": cpu, "rss": rss})
    for session in daemon.sessions:
        if session.service.name == name:
            rows.append({"pid": daemon.pid, "client": session.peer,
                         "age": round(now - session.started, 3), "cpu": None, "rss": None})
    return rows


def _usage(pid: int) -> tuple[float | None, int | None]:
    """CPU seconds and RSS bytes of a program and all its descendants."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return None, None
    cpu, rss = 0.0, 0
    for p in procs:
        try:
            times = p.cpu_times()
            cpu += times.user + times.system + times.children_user + times.children_system
            rss += p.memory_info().rss
        except psutil.Error:
            continue
    return round(cpu, 3), rss


def render(rep: dict[str, Any]) -> str:
    lines = [f"superd {rep['pid']}: up {_age(rep['uptime'])}, {rep['active']} of "
             f"{rep['max_connections']} connections, config {rep['config']}"]
    rows = [("SERVICE", "STATE", "LISTEN", "ACTIVE", "ACCEPTED", "REFUSED", "FAILED", "EXITS")]
    for s in rep["services"]:
        refused = ",".join(f"{k}={v}" for k, v in sorted(s["rejected"].items())) or "0"
        exits = ",".join(f"{k}={v}" for k, v in sorted(s["exits"].items())) or "-"
        listen = ",".join(x["address"] for x in s["listeners"]) or "-"
        rows.append((s["name"], s["state"], listen, str(s["active"]), str(s["accepted"]),
                     refused, str(s["spawn_failures"]), exits))
    lines += _table(rows)
    conns = [(s["name"], c) for s in rep["services"] for c in s["connections"]]
    if conns:
        lines.append("")
        crow = [("SERVICE", "PID", "CLIENT", "AGE", "CPU", "RSS")]
        for name, c in conns:
            crow.append((name, str(c["pid"]), c["client"], _age(c["age"]),
                         "-" if c["cpu"] is None else f"{c['cpu']:.2f}s",
                         "-" if c["rss"] is None else f"{c['rss'] / 1048576:.1f}M"))
        lines += _table(crow)
    return "\n".join(lines)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows]


def _age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
