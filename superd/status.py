"""What ``superd status`` shows: the report built in the daemon, and its table.

``report()`` runs inside the daemon (from a control request) and reads only
the loop's own state: which daemon it is (pid, the absolute path of its
file, its control socket), each program's pid, client and age, never
``/proc``.
``add_usage()`` and ``render()`` run in the ``superd status`` client, outside
the loop: one pass over ``/proc`` adds each program's CPU and RSS (with its
descendants'), however many programs run.
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
            "control": cfg.control, "stop_timeout": cfg.stop_timeout,
            "uptime": round(now - daemon.started, 3), "active": daemon.total_active,
            "max_connections": cfg.max_connections, "reloads": dict(daemon.reloads),
            "services": services}


def _state(enabled: bool, listeners: list, wanted: set, daemon: Daemon) -> str:  # type: ignore[type-arg]
    if not enabled:
        return "disabled"
    if daemon.stopping:
        return "stopping"
    keys = {lst.key for lst in listeners}
    if wanted & daemon.unbound.keys():
        return "failed to bind, retrying"
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
            rows.append({"pid": child.pid, "client": child.peer,
                         "age": round(now - child.started, 3), "internal": False})
    for session in daemon.sessions:
        if session.service.name == name:
            rows.append({"pid": daemon.pid, "client": session.peer,
                         "age": round(now - session.started, 3), "internal": True})
    return rows


def add_usage(rep: dict[str, Any]) -> None:
    """Add ``cpu`` (seconds) and ``rss`` (bytes) of each program and all its
    descendants to the report's connections (None where unknown, and for
    internal services, which run in the daemon)."""
    rows = [c for s in rep.get("services", []) for c in s.get("connections", [])]
    for c in rows:  # a daemon from before "internal" marked its sessions with its own pid
        c.setdefault("internal", c["pid"] == rep.get("pid"))
    pids = {c["pid"] for c in rows if not c["internal"]}
    usage = _tree_usage(pids) if pids else {}
    for c in rows:
        c["cpu"], c["rss"] = (None, None) if c["internal"] else usage.get(c["pid"], (None, None))


def _tree_usage(roots: set[int]) -> dict[int, tuple[float, int]]:
    """CPU seconds and RSS bytes of each of *roots* with all its descendants,
    from one pass over /proc (not one pass per program)."""
    import psutil

    kids: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    for proc in psutil.process_iter(["ppid", "cpu_times"]):
        ppid, times = proc.info["ppid"], proc.info["cpu_times"]
        if ppid is None or times is None:
            continue
        kids.setdefault(ppid, []).append(proc.pid)
        cpu[proc.pid] = (times.user + times.system
                         + times.children_user + times.children_system)
    result = {}
    for root in roots & cpu.keys():
        tree = _descendants(root, kids)
        rss = sum(_rss(pid) for pid in tree)
        result[root] = (round(sum(cpu.get(pid, 0.0) for pid in tree), 3), rss)
    return result


def _descendants(root: int, kids: dict[int, list[int]]) -> list[int]:
    tree, todo, seen = [], [root], {root}
    while todo:
        pid = todo.pop()
        tree.append(pid)
        for kid in kids.get(pid, ()):
            if kid not in seen:
                seen.add(kid)
                todo.append(kid)
    return tree


def _rss(pid: int) -> int:
    import psutil

    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


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
