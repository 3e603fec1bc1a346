"""superd's benchmark: ``python -m bench`` from the repository root.

    python -m bench [--quick] [--out bench/RESULTS.md] [--only W1,W3]
                    [--servers superd,floor,xinetd,...] [--json FILE]

Starts superd, a C floor server and whichever peers are installed (xinetd,
openbsd-inetd, ucspi-tcp's tcpserver, systemd-socket-activate) on
127.0.0.1 with equivalent configurations, runs the workloads and prints
one table per workload, with ratios to the floor and to each peer; writes
the same as Markdown to --out.  It installs nothing: missing peers are
named with the command that gets them.  Workloads:

  W1        exec /bin/echo hello, 1 and 16 clients, as root and as nobody
  W2        exec /bin/cat, 64 MiB up and back
  W3        built-in echo: short connections, round trips on one connection
  W4        500 exec services: RSS and time to listen on every port
  children  W1 with 1,000 programs alive vs none
  leak      100,000 echo + 20,000 exec connections: RSS and fds before/after
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import system
from bench.client import Client
from bench.report import Table
from bench.run import NOISE_CORES, Bench, Settings
from bench.servers import Peer, find_peers

WORKLOADS = ("W1", "W2", "W3", "W4", "children", "leak")
SERVERS = ("floor", "superd", "superd-nolog", "xinetd", "inetd", "tcpserver",
           "socket-activate")
ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="1 repetition of 1 s per cell, smaller W2/W4/leak runs")
    p.add_argument("--smoke", action="store_true",
                   help="superd only, W1 (1 s, 2 clients) and W3: checks the benchmark runs")
    p.add_argument("--out", default=None,
                   help="write the Markdown report here (default: bench/RESULTS.md for a "
                        "full run; none for --quick/--smoke)")
    p.add_argument("--json", default=None, help="also write the raw figures as JSON here")
    p.add_argument("--only", default=",".join(WORKLOADS),
                   help=f"workloads, comma-separated: {','.join(WORKLOADS)}")
    p.add_argument("--servers", default=",".join(SERVERS),
                   help=f"servers, comma-separated: {','.join(SERVERS)}")
    p.add_argument("--inetd", default=None, help="path of an openbsd-inetd binary")
    p.add_argument("--reps", type=int, default=None, help="repetitions per cell")
    p.add_argument("--seconds", type=float, default=None, help="seconds per repetition")
    p.add_argument("--python-client", action="store_true",
                   help="use the Python load generator even if cc is there")
    args = p.parse_args(argv)
    args.only = _choices(p, args.only, WORKLOADS, "--only")
    args.servers = _choices(p, args.servers, SERVERS, "--servers")
    return args


def _choices(p: argparse.ArgumentParser, text: str, allowed: tuple[str, ...],
             flag: str) -> list[str]:
    lower = {a.lower(): a for a in allowed}
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        if item.lower() not in lower:
            p.error(f"{flag}: unknown {item!r} (choose from {', '.join(allowed)})")
        out.append(lower[item.lower()])
    return out


def settings_for(args: argparse.Namespace) -> Settings:
    st = Settings()
    if args.quick or args.smoke:
        st = Settings(reps=1, seconds=1.0, bulk_bytes=16 * 1024 * 1024, bulk_reps=1,
                      w4_reps=1, leak_echo=10_000, leak_exec=2_000, leak_batches=2,
                      extra_superd=False)
    if args.smoke:
        st.w1_clients = (2,)
        st.w1_users = ("root",)
    if os.geteuid() != 0:
        st.w1_users = ("own",)
    if args.reps:
        st.reps = st.bulk_reps = st.w4_reps = args.reps
    if args.seconds:
        st.seconds = args.seconds
    return st


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.servers = ["superd"]
        if args.only == list(WORKLOADS):
            args.only = ["W1", "W3"]
    out = args.out or (None if args.quick or args.smoke else str(ROOT / "bench" / "RESULTS.md"))
    st = settings_for(args)
    started = time.time()
    load_before = system.loadavg()
    workdir = system.make_workdir()
    cgroups = system.CGroupParent()
    try:
        bins = (system.Binaries(None, None, None, "--python-client given")
                if args.python_client else system.compile_c(workdir))
        peers = {p.key: p for p in find_peers(args.inetd)}
        header = _header(bins, peers, cgroups, args)
        print(header, flush=True)
        bench = Bench(workdir=workdir, client=Client(bins.loadgen), peers=peers,
                      floor_bin=bins.floor, cgroups=cgroups, settings=st,
                      server_keys=args.servers,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
        steps = {"W1": bench.w1, "W2": bench.w2, "W3": bench.w3, "W4": bench.w4,
                 "children": bench.children, "leak": bench.leak}
        for name in args.only:
            steps[name]()
        text = _document(bench, header, args, st, started, load_before)
        analysis = ROOT / "bench" / "ANALYSIS.md"
        if out and analysis.exists():  # the hand-written reading of the gaps
            text = text.rstrip() + "\n\n" + analysis.read_text()
        print(text)
        if out:
            Path(out).write_text(text)
            print(f"wrote {out}", file=sys.stderr)
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"raw": bench.raw,
                 "goals": [g.__dict__ for g in bench.goals], "noisy": bench.noisy,
                 "tables": [{"title": t.title, "columns": t.columns, "rows": t.rows}
                            for t in bench.tables]}, indent=1))
        return 0
    finally:
        cgroups.remove()
        shutil.rmtree(workdir, ignore_errors=True)


def _header(bins: system.Binaries, peers: dict[str, Peer], cgroups: system.CGroupParent,
            args: argparse.Namespace) -> str:
    lines = []
    if bins.loadgen is None:
        lines.append(f"! {bins.error}. Using the Python load generator (slower: its figures "
                     "are marked) and no C floor, so no ratios to the floor.")
    for peer in peers.values():
        if peer.path is None and peer.key in args.servers:
            lines.append(f"! {peer.label} not found: {peer.how}")
    if cgroups.path is None:
        lines.append("! no cgroup v2 group could be made (needs root and a cgroup2 mount): "
                     "server CPU comes from /proc/PID/stat (utime+stime+cutime+cstime).")
    return "\n".join(lines)


def _document(bench: Bench, header: str, args: argparse.Namespace, st: Settings,
              started: float, load_before: str) -> str:
    facts = system.host_facts()
    command = "python -m bench" + (" --quick" if args.quick else "") + (
        " --smoke" if args.smoke else "")
    if args.only != list(WORKLOADS) and not args.smoke:
        command += f" --only {','.join(args.only)}"
    peers = [f"{p.label} {p.version or ''} ({p.path})".replace("  ", " ")
             for p in bench.peers.values() if p.path]
    missing = [f"{p.label} — {p.how}" for p in bench.peers.values() if not p.path]
    method = ("cgroup v2: each server runs in its own group; `cpu.stat` usage_usec before "
              "and after each run (the daemon and every program it started, exited ones "
              "included)" if bench.cgroups.path else
              "/proc/PID/stat utime+stime+cutime+cstime of the server process(es) before and "
              "after each run (cutime/cstime count the programs it has reaped)")
    client = ("a C load generator compiled at run time (`bench/loadgen.c`), one process per "
              "client" if bench.client.kind == "C" else
              "**the Python load generator** (no C compiler): figures are lower-bounded by "
              "the client, not the servers")
    out = [
        "# superd benchmark results",
        "",
        f"Generated by `{command}` from the repository root "
        f"({time.strftime('%Y-%m-%d %H:%M %Z', time.localtime(started))}, "
        f"{(time.time() - started) / 60:.1f} min). Re-run the same command to regenerate "
        "this file.",
        "",
        "## Machine",
        "",
        f"- {facts['nproc']} CPUs ({facts['cpu']}), {facts['memory']}; kernel {facts['kernel']}; "
        f"Python {facts['python']}; {facts['glibc']}; RLIMIT_NOFILE {facts['nofile']} "
        "(inherited by every server).",
        f"- Load average {load_before} at the start, {system.loadavg()} at the end (the "
        "benchmark's own load included). What else used the machine is measured in every "
        "run: see each table's Background line"
        + (f"; over {NOISE_CORES} of a core in some run, so this is no result (see NOISY)."
           if bench.noisy else f"; at most {NOISE_CORES} of a core in every run."),
        f"- superd {_git_describe()}; peers: {'; '.join(peers) or 'none'}.",
    ]
    if missing:
        out.append(f"- Not installed (not measured): {'; '.join(missing)}.")
    out += [
        "",
        "## Method",
        "",
        f"- Every server listens on 127.0.0.1 on free ports, started by the benchmark and "
        f"stopped by pid afterwards. Each cell is the median of {st.reps} run(s) of "
        f"{st.seconds:g} s (W2: {st.bulk_reps} transfers; W4: {st.w4_reps} start(s)), with "
        "the min–max range in brackets; the servers of a workload run side by side and the "
        "repetitions rotate through them.",
        f"- Server CPU: {method}. daemon µs/conn: the server process(es) alone "
        "(utime+stime in /proc/PID/stat), i.e. the cost of the loop that accepts and spawns.",
        f"- Load generator: {client}; its own CPU share and how busy the machine was are noted "
        "under each table.",
        "- floor: `bench/floor.c`, the least work an exec-per-connection server can do: "
        "accept4 + posix_spawn with the socket dup2'd onto 0/1, reaping with waitpid after "
        "SIGCHLD; for `user: nobody` it sets its real ids once and spawns with "
        "POSIX_SPAWN_RESETIDS; for W3 it is an in-process epoll echo server.",
        "- Configurations: superd `log: {level: warning}`, `stop_timeout: 1`, "
        "`defaults: {max_connections: 256, per_source: 10000}` (limits active, set high "
        "enough not to refuse the benchmark's clients), `user: root` or `user: nobody`; "
        "xinetd `instances = UNLIMITED`, `cps = 100000 1`, `per_source = UNLIMITED`, no "
        "success/failure logging, `user = root|nobody`; openbsd-inetd `-i -R 1000000`, "
        "`nowait.1000000`, user field root|nobody; tcpserver `-c 256 -H -R -l0` "
        "(`-u 65534 -g 65534` for nobody); `systemd-socket-activate --inetd -a -l ...` "
        "(root only: it cannot switch users).",
    ]
    if header:
        out += ["", "## Warnings", "", *[f"- {line.lstrip('! ')}" for line in
                                          header.splitlines()]]
    if bench.noisy:
        out += ["", "## NOISY: not a result", "",
                "Something else used the machine during these runs (more than "
                f"{NOISE_CORES} of a core beyond the servers and the load generator), so no "
                "verdict is given. Re-run with nothing else running.", "",
                *[f"- {line}" for line in bench.noisy]]
    if bench.goals:
        goals = Table("Goals (from the performance issue)", ["goal", "measured", "met"])
        for g in bench.goals:
            verdict = "–" if g.passed is None else ("yes" if g.passed else "**no**")
            goals.add(g.text, g.measured, "noisy" if bench.noisy else verdict)
        out += ["", "## Summary", "", goals.render()]
    out += ["", "## Results", ""]
    for table in bench.tables:
        out += [table.render(), ""]
    if bench.problems:
        out += ["## What the servers logged", "",
                "Warnings and errors from the servers' own logs during the run "
                "(first lines of each):", ""]
        for label, lines in bench.problems.items():
            out.append(f"- {label}: {len(lines)} line(s)")
            for line in lines[:8]:
                out.append(f"  - `{line[:200]}`")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _git_describe() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h (%cs)"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "superd"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    if not head:
        return ""
    return f"at commit {head}" + (" with uncommitted changes in superd/" if dirty else "")


if __name__ == "__main__":
    sys.exit(main())
