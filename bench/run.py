"""The workloads (W1–W4, 1,000 children, no-leak) and how each is measured.

Servers taking part in one workload run at the same time on their own
ports, and the repetitions go round them in turn (rotating the order), so
that a change in the machine's load during the run falls on all of them
alike.  Each measurement reads, around one load-generator run:

- the server's CPU (its cgroup's ``usage_usec``: the daemon and every
  program it started, exited ones included; without a cgroup,
  utime+stime+cutime+cstime of the server's processes from /proc),
- the daemon's own CPU (utime+stime of its processes: the loop's cost),
- the load generator's CPU, and how busy the whole machine was.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import system
from bench.client import Client, Load
from bench.report import Table, median, num, pct, ratio, ratio_value, spread
from bench.servers import Peer, Server, Spec, StartError, make_server

ECHO = ("/bin/echo", "hello")
CAT = ("/bin/cat",)
HOLD = ("/bin/sleep", "600")


@dataclass
class Settings:
    reps: int = 5
    seconds: float = 3.0
    w1_clients: tuple[int, ...] = (1, 16)
    w3_clients: int = 16
    bulk_bytes: int = 64 * 1024 * 1024
    bulk_reps: int = 5
    w4_services: int = 500
    w4_reps: int = 3
    children: int = 1000
    leak_echo: int = 100_000
    leak_exec: int = 20_000
    leak_batches: int = 5
    w1_users: tuple[str, ...] = ("root", "nobody")
    extra_superd: bool = True  # also run superd with stderr: null in W1


@dataclass
class Sample:
    load: Load
    server_cpu: float  # seconds
    daemon_cpu: float  # seconds
    busy: float  # fraction of all CPUs busy during the run

    @property
    def rate(self) -> float:
        return self.load.rate

    @property
    def cpu_per(self) -> float:
        """µs of server CPU per successful connection (or round trip)."""
        return 1e6 * self.server_cpu / self.load.ok if self.load.ok else float("nan")

    @property
    def daemon_per(self) -> float:
        return 1e6 * self.daemon_cpu / self.load.ok if self.load.ok else float("nan")

    @property
    def loadgen_cores(self) -> float:
        return self.load.cpu / self.load.wall if self.load.wall else 0.0

    @property
    def background_cores(self) -> float:
        """Cores used during the run by anything but the server (with its
        programs) and the load generator: other work on the machine."""
        if not self.load.wall:
            return 0.0
        ncpu = os.cpu_count() or 1
        server = self.server_cpu / self.load.wall
        return max(0.0, self.busy * ncpu - server - self.loadgen_cores)


NOISE_CORES = 0.2  # more background than this in any run: the table is not a result


Cell = Callable[[Server], Load]


@dataclass
class Goal:
    text: str
    measured: str
    passed: bool | None


@dataclass
class Bench:
    workdir: Path
    client: Client
    peers: dict[str, Peer]
    floor_bin: str | None
    cgroups: system.CGroupParent
    settings: Settings
    server_keys: list[str]
    log: Callable[[str], None] = print
    tables: list[Table] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    noisy: list[str] = field(default_factory=list)  # tables taken on a busy machine
    problems: dict[str, list[str]] = field(default_factory=dict)
    raw: dict[str, object] = field(default_factory=dict)
    _tag: int = 0

    # --- servers ----------------------------------------------------------------

    def available(self, keys: list[str]) -> list[str]:
        out = []
        for key in keys:
            if key not in self.server_keys:
                continue
            if key == "floor" and not self.floor_bin:
                continue
            if key in self.peers and not self.peers[key].path:
                continue
            out.append(key)
        return out

    def launch(self, key: str, make_specs: Callable[[], list[Spec]],
               notes: list[str]) -> Server | None:
        """Start one server (fresh ports each try; another process may take one)."""
        last = ""
        for _ in range(3):
            self._tag += 1
            server = make_server(key, self.workdir, self.cgroups, self.peers, self.floor_bin)
            specs = make_specs()
            why = next((w for s in specs if (w := server.unsupported(s))), None)
            if why:
                notes.append(f"{server.label}: not run ({why}).")
                return None
            try:
                server.start(specs, f"-{self._tag}")
                return server
            except StartError as e:
                last = str(e)
        notes.append(f"{key}: failed to start: {last.splitlines()[0] if last else '?'}")
        self.log(f"  {key} failed to start:\n{last}")
        return None

    def finish(self, servers: list[Server]) -> None:
        for server in servers:
            server.stop()
            found = server.problems()
            if found:
                self.problems.setdefault(server.label, []).extend(found[:50])

    # --- measuring ----------------------------------------------------------------

    def sample(self, server: Server, cell: Cell) -> Sample:
        cpu0, own0, (busy0, total0) = server.cpu(), server.daemon_cpu(), system.machine_cpu()
        load = cell(server)
        cpu1, own1, (busy1, total1) = server.cpu(), server.daemon_cpu(), system.machine_cpu()
        busy = (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0
        return Sample(load, cpu1 - cpu0, own1 - own0, busy)

    def side_by_side(self, servers: list[Server], cells: dict[str, Cell], reps: int,
                     warm: Cell | None = None) -> dict[tuple[str, str], list[Sample]]:
        """Every (server, cell) *reps* times; servers in rotating order."""
        out: dict[tuple[str, str], list[Sample]] = {}
        if warm is not None:
            for server in servers:
                warm(server)
        for rep in range(reps):
            order = servers[rep % len(servers):] + servers[:rep % len(servers)]
            for name, cell in cells.items():
                for server in order:
                    s = self.sample(server, cell)
                    out.setdefault((server.key, name), []).append(s)
                    self.log(f"  rep {rep + 1}/{reps} {name:>6} {server.label:<24} "
                             f"{s.rate:10,.0f}/s  {s.cpu_per:8,.0f} µs/conn  "
                             f"errors {s.load.failed}")
        return out

    def note_loadgen(self, table: Table, samples: list[Sample]) -> None:
        cores = [s.loadgen_cores for s in samples]
        busy = [s.busy for s in samples]
        ncpu = os.cpu_count() or 1
        if cores:
            table.notes.append(
                f"Load generator ({self.client.kind}): {median(cores):.2f} of {ncpu} cores "
                f"(median; max {max(cores):.2f}); the whole machine was "
                f"{pct(median(busy))} busy (median; max {pct(max(busy))}).")
            background = [s.background_cores for s in samples]
            worst = max(background)
            table.notes.append(
                f"Background (other work on the machine during the runs): "
                f"{median(background):.2f} cores median, {worst:.2f} max.")
            if worst > NOISE_CORES:
                self.noisy.append(f"{table.title}: up to {worst:.2f} cores of background")
                table.notes.append(f"**NOISY**: over {NOISE_CORES} of a core of background "
                                   "in at least one run; these figures are not a result.")

    def goal(self, text: str, value: float | None, limit: float, kind: str,
             fmt: str = "×{:.2f}") -> None:
        if value is None or value != value:
            self.goals.append(Goal(text, "not measured", None))
            return
        passed = value <= limit if kind == "max" else value >= limit
        self.goals.append(Goal(text, fmt.format(value), passed))

    def _conn(self, service: str, clients: int, seconds: float, send: str = "",
              expect: str = "") -> Cell:
        def cell(server: Server) -> Load:
            return self.client.conn(server.port(service), clients, seconds, send, expect)
        return cell

    # --- W1: exec /bin/echo hello -------------------------------------------------------

    def w1(self) -> None:
        st = self.settings
        for user in st.w1_users:
            keys = ["floor", "superd"]
            if user == "root" and st.extra_superd:
                keys.append("superd-nolog")
            keys += ["xinetd", "inetd", "tcpserver"]
            if user == "root":
                keys.append("socket-activate")
            keys = self.available(keys)
            title = (f"W1 — `exec: [/bin/echo, hello]`, user {user}"
                     + (" (identity switch per connection)" if user == "nobody" else
                        " (no identity switch)"))
            self.log(f"{title}: {', '.join(keys)}")
            notes: list[str] = []
            servers: list[Server] = []
            try:
                for key in keys:
                    server = self.launch(key, _one("w1", "exec", ECHO, user), notes)
                    if server:
                        servers.append(server)
                cells = {f"c{n}": self._conn("w1", n, st.seconds, expect="hello")
                         for n in st.w1_clients}
                data = self.side_by_side(servers, cells, st.reps,
                                         warm=self._conn("w1", 4, 0.3, expect="hello"))
            finally:
                self.finish(servers)
            self._w1_table(title, user, servers, data if servers else {}, notes)

    def _w1_table(self, title: str, user: str, servers: list[Server],
                  data: dict[tuple[str, str], list[Sample]], notes: list[str]) -> None:
        st = self.settings
        hi = f"c{max(st.w1_clients)}"
        cols = ["server"]
        for n in st.w1_clients:
            cols += [f"conn/s, {n} client{'s' if n > 1 else ''}", "× floor"]
        cols += [f"CPU µs/conn ({max(st.w1_clients)})", "× floor",
                 f"daemon µs/conn ({max(st.w1_clients)})", "failed"]
        table = Table(title, cols, notes=list(notes))

        def med(key: str, cell: str, attr: str) -> float | None:
            samples = data.get((key, cell), [])
            return median([getattr(s, attr) for s in samples]) if samples else None

        for server in servers:
            row: list[object] = [server.label]
            for n in st.w1_clients:
                rates = [s.rate for s in data.get((server.key, f"c{n}"), [])]
                row += [spread(rates), ratio(median(rates) if rates else None,
                                             med("floor", f"c{n}", "rate"))]
            row += [num(med(server.key, hi, "cpu_per")),
                    ratio(med(server.key, hi, "cpu_per"), med("floor", hi, "cpu_per")),
                    num(med(server.key, hi, "daemon_per")),
                    sum(s.load.failed for c in st.w1_clients
                        for s in data.get((server.key, f"c{c}"), []))]
            table.add(*row)
        self.note_loadgen(table, [s for v in data.values() for s in v])
        table.notes.append("CPU µs/conn: everything the server and its programs used, "
                           "per connection; daemon µs/conn: the server process(es) alone.")
        self.tables.append(table)
        self._versus(table, servers, data)
        self.raw[f"W1-{user}"] = _raw(data)
        if any(s.key == "superd" for s in servers) and any(s.key == "floor" for s in servers):
            tag = f"W1 user {user}"
            self.goal(f"{tag}: superd CPU per connection ≤ 1.15 × floor",
                      ratio_value(med("superd", hi, "cpu_per"), med("floor", hi, "cpu_per")),
                      1.15, "max")
            if 16 in st.w1_clients:
                self.goal(f"{tag}: conn/s at 16 concurrent ≥ 0.95 × floor",
                          ratio_value(med("superd", "c16", "rate"), med("floor", "c16", "rate")),
                          0.95, "min")
            if 1 in st.w1_clients:
                self.goal(f"{tag}: conn/s one client at a time ≥ 0.9 × floor",
                          ratio_value(med("superd", "c1", "rate"), med("floor", "c1", "rate")),
                          0.9, "min")

    def _versus(self, table: Table, servers: list[Server],
                data: dict[tuple[str, str], list[Sample]]) -> None:
        """superd ÷ each other server, per column (conn/s: higher is better for
        superd; CPU: lower is better)."""
        if not any(s.key == "superd" for s in servers):
            return
        st = self.settings
        hi = f"c{max(st.w1_clients)}"
        cols = ["superd ÷"] + [f"conn/s {n}" for n in st.w1_clients] + ["CPU/conn"]
        vs = Table(f"{table.title}: superd relative to each", cols)

        def med(key: str, cell: str, attr: str) -> float | None:
            samples = data.get((key, cell), [])
            return median([getattr(s, attr) for s in samples]) if samples else None

        for other in servers:
            if other.key == "superd":
                continue
            vs.add(other.label,
                   *[ratio(med("superd", f"c{n}", "rate"), med(other.key, f"c{n}", "rate"))
                     for n in st.w1_clients],
                   ratio(med("superd", hi, "cpu_per"), med(other.key, hi, "cpu_per")))
        self.tables.append(vs)

    # --- W2: /bin/cat, bulk -------------------------------------------------------------

    def w2(self) -> None:
        st = self.settings
        keys = self.available(["floor", "superd", "xinetd", "inetd", "tcpserver",
                               "socket-activate"])
        mib = st.bulk_bytes / (1024 * 1024)
        title = f"W2 — `exec: [/bin/cat]`, {mib:.0f} MiB up and back on one connection"
        self.log(f"{title}: {', '.join(keys)}")
        notes: list[str] = []
        servers: list[Server] = []
        try:
            for key in keys:
                server = self.launch(key, _one("w2", "exec", CAT), notes)
                if server:
                    servers.append(server)
            data = self.side_by_side(
                servers, {"bulk": lambda s: self.client.bulk(s.port("w2"), st.bulk_bytes)},
                st.bulk_reps)
        finally:
            self.finish(servers)
        table = Table(title, ["server", "MB/s", "× floor", "server CPU s/transfer", "failed"],
                      notes=notes)

        def mbs(samples: list[Sample]) -> list[float]:
            return [st.bulk_bytes / 1e6 / s.load.wall for s in samples if s.load.ok]

        floor = median(mbs(data.get(("floor", "bulk"), []))) if "floor" in keys else None
        superd = None
        for server in servers:
            samples = data.get((server.key, "bulk"), [])
            rates = mbs(samples)
            if server.key == "superd":
                superd = median(rates) if rates else None
            table.add(server.label, spread(rates), ratio(median(rates) if rates else None, floor),
                      num(median([s.server_cpu for s in samples]), 3),
                      sum(s.load.failed for s in samples))
        table.notes.append(f"MB/s = {mib:.0f} MiB (payload, one direction) ÷ wall time of the "
                           "transfer; median of the repetitions (min–max).")
        self.note_loadgen(table, [s for v in data.values() for s in v])
        self.tables.append(table)
        self.raw["W2"] = _raw(data)
        if floor is not None and superd is not None:
            self.goal("W2: /bin/cat throughput ≥ 0.95 × floor", ratio_value(superd, floor),
                      0.95, "min")

    # --- W3: built-in echo --------------------------------------------------------------

    def w3(self) -> None:
        st = self.settings
        keys = self.available(["floor", "superd", "xinetd", "inetd"])
        title = "W3 — built-in echo"
        self.log(f"{title}: {', '.join(keys)}")
        notes: list[str] = []
        servers: list[Server] = []
        n = st.w3_clients
        try:
            for key in keys:
                server = self.launch(key, _one("echo", "echo"), notes)
                if server:
                    servers.append(server)
            cells: dict[str, Cell] = {
                "short": self._conn("echo", n, st.seconds, "hello\n", "hello"),
                "rtt": lambda s: self.client.rtt(s.port("echo"), 1, st.seconds, 64),
                "rtt16": lambda s: self.client.rtt(s.port("echo"), n, st.seconds, 64),
            }
            data = self.side_by_side(servers, cells, st.reps,
                                     warm=self._conn("echo", 4, 0.3, "hello\n", "hello"))
        finally:
            self.finish(servers)
        table = Table(title, ["server", f"short conn/s ({n} clients)", "× floor", "CPU µs/conn",
                              "round trips/s (1 conn)", "× floor",
                              f"round trips/s ({n} conns)", "× floor", "CPU µs/round trip",
                              "failed"], notes=notes)

        def med(key: str, cell: str, attr: str) -> float | None:
            samples = data.get((key, cell), [])
            return median([getattr(s, attr) for s in samples]) if samples else None

        for server in servers:
            row: list[object] = [server.label]
            for cell in ("short", "rtt", "rtt16"):
                rates = [s.rate for s in data.get((server.key, cell), [])]
                row += [spread(rates),
                        ratio(med(server.key, cell, "rate"), med("floor", cell, "rate"))]
                if cell == "short":
                    row.append(num(med(server.key, "short", "cpu_per")))
            row += [num(med(server.key, "rtt16", "cpu_per"), 1),
                    sum(s.load.failed for c in cells for s in data.get((server.key, c), []))]
            table.add(*row)
        table.notes.append("short: connect, send `hello\\n`, shut down writing, read the echo "
                           "to EOF, close. Round trips: 64 bytes written, 64 read back, on "
                           f"one connection, or on each of {n} at once (CPU µs/round trip is "
                           f"from the {n}-connection runs). floor: an in-process epoll echo "
                           "server in C; xinetd "
                           "and openbsd-inetd fork a process per connection for their "
                           "built-in stream echo; superd serves it in its event loop.")
        table.notes.append("Round trips on one connection are latency-bound: they measure how "
                           "fast the kernel wakes the server as much as the server's work, and "
                           "vary widely between runs. Here servers that wait in epoll (the "
                           "floor, superd) are woken more slowly than a forked child blocked "
                           "in read() (xinetd's and inetd's echo); the 16-connection runs and "
                           "CPU µs/round trip compare the work itself.")
        self.note_loadgen(table, [s for v in data.values() for s in v])
        self.tables.append(table)
        self.raw["W3"] = _raw(data)
        superd_short = med("superd", "short", "rate")
        if superd_short is not None:
            self.goal(f"W3: built-in echo, short connections at {n} concurrent ≥ 10,000/s",
                      superd_short, 10_000, "min", "{:,.0f}/s")
            self.goal("W3: round trips over one connection ≥ 0.9 × floor",
                      ratio_value(med("superd", "rtt", "rate"), med("floor", "rtt", "rate")),
                      0.9, "min")

    # --- W4: 500 services ----------------------------------------------------------------

    def w4(self) -> None:
        st = self.settings
        keys = self.available(["floor", "superd", "xinetd", "inetd", "tcpserver",
                               "socket-activate"])
        n = st.w4_services
        title = f"W4 — {n} exec services on {n} ports: memory and start-up"
        self.log(f"{title}: {', '.join(keys)}")
        notes: list[str] = []
        table = Table(title, ["server", "processes", "ready ms (all ports listening)",
                              "RSS MB", "PSS MB", "fds", "serves"], notes=notes)
        superd_rss = superd_ready = None
        for key in keys:
            readies: list[float] = []
            notifies: list[float] = []
            rss: list[float] = []
            pss: list[float] = []
            fds: list[int] = []
            procs = 0
            served = "–"
            for _ in range(st.w4_reps):
                server = self.launch(key, lambda: [
                    Spec(f"s{i}", p, "exec", ECHO, "root")
                    for i, p in enumerate(system.free_ports(n))], notes)
                if server is None:
                    break
                try:
                    time.sleep(0.5)  # let start-up garbage settle before reading memory
                    readies.append(server.ready_s * 1000)
                    if server.notify_s is not None:
                        notifies.append(server.notify_s * 1000)
                    rss.append(server.rss_kb() / 1024)
                    pss.append(server.pss_kb() / 1024)
                    fds.append(server.fds())
                    procs = len(server.pids)
                    ports = list(server.ports.values())
                    probe = self.client.conn(ports[len(ports) // 2], 1, 5, expect="hello",
                                             per_client=3)
                    served = "yes" if probe.ok == 3 else f"NO ({probe.errors})"
                finally:
                    self.finish([server])
                self.log(f"  {key}: ready {readies[-1]:.0f} ms, RSS {rss[-1]:.1f} MB")
            if not readies:
                continue
            label = make_server(key, self.workdir, None, self.peers, self.floor_bin).label
            ready = spread(readies)
            if notifies:
                ready += f"; READY=1 at {num(median(notifies))}"
            table.add(label, procs, ready, spread(rss, 1), spread(pss, 1), num(median(fds)),
                      served)
            if key == "superd":
                superd_rss, superd_ready = median(rss), median(readies)
        table.notes.append("ready: from starting the process to every port in LISTEN "
                           "(/proc/net/tcp, polled every 2 ms; no connection is made). RSS: "
                           "VmRSS of the server process(es), summed where a server runs one "
                           "process per port; PSS shares the common pages out. superd's "
                           "READY=1 is its sd_notify message.")
        if "tcpserver" in keys:
            table.notes.append("tcpserver serves one port per process: the benchmark starts "
                               f"its {n} processes one after another, so its ready time is "
                               "mostly the benchmark's own process start-up.")
        self.tables.append(table)
        if superd_rss is not None:
            self.goal(f"W4: superd RSS with {n} services ≤ 25 MB", superd_rss, 25, "max",
                      "{:.1f} MB")
            self.goal(f"W4: superd binds {n} services in ≤ 200 ms", superd_ready, 200, "max",
                      "{:.0f} ms")

    # --- 1,000 children alive -------------------------------------------------------------

    def children(self) -> None:
        st = self.settings
        k = st.children
        keys = self.available(["floor", "superd"]
                              + (["superd-nolog"] if st.extra_superd else [])
                              + ["xinetd", "inetd", "tcpserver", "socket-activate"])
        title = f"W1 with {k:,} children alive — the cost of one more connection"
        self.log(f"{title}: {', '.join(keys)}")
        notes: list[str] = []
        cols = ["server", "conn/s, none alive", f"conn/s, {k:,} alive", "ratio",
                "CPU µs/conn, none", f"CPU µs/conn, {k:,}", "ratio",
                "daemon µs/conn, none", f"daemon µs/conn, {k:,}", "ratio", "left after stop",
                "failed"]
        table = Table(title, cols, notes=notes)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = k + 256
        if soft < want:
            if hard != resource.RLIM_INFINITY and hard < want:
                notes.append(f"not run: RLIMIT_NOFILE hard limit {hard} < {want}")
                self.tables.append(table)
                return
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        n = max(st.w1_clients)
        superd_ratio: float | None = None
        total_ratio: float | None = None
        for key in keys:
            def specs(hold: int = k) -> list[Spec]:
                a, b = system.free_ports(2)
                return [Spec("w1", a, "exec", ECHO, "root"),
                        Spec("hold", b, "exec", HOLD, "root", max_connections=hold + 100)]
            idle = self.launch(key, specs, notes)
            busy = self.launch(key, specs, notes) if idle else None
            if idle is None or busy is None:
                if idle:
                    self.finish([idle])
                continue
            held: list[socket.socket] = []
            try:
                held, alive = self._hold(busy, k)
                if alive < k:
                    notes.append(f"{busy.label}: only {alive} of {k} held connections got a "
                                 "program within 60 s")
                cell = self._conn("w1", n, st.seconds, expect="hello")
                data: dict[tuple[str, str], list[Sample]] = {}
                self.client.conn(idle.port("w1"), 4, 0.3, expect="hello")
                self.client.conn(busy.port("w1"), 4, 0.3, expect="hello")
                pair = [("none", idle), ("held", busy)]
                for rep in range(st.reps):
                    for name, server in (pair if rep % 2 == 0 else pair[::-1]):
                        s = self.sample(server, cell)
                        data.setdefault((key, name), []).append(s)
                        self.log(f"  rep {rep + 1}/{st.reps} {name:>5} {server.label:<24} "
                                 f"{s.rate:10,.0f}/s  {s.cpu_per:8,.0f} µs/conn  daemon "
                                 f"{s.daemon_per:6,.0f} µs/conn  errors {s.load.failed}")
            finally:
                for sock in held:
                    sock.close()
                self.finish([idle, busy])
            left = busy.left_behind

            def med(name: str, attr: str) -> float | None:
                samples = data.get((key, name), [])  # noqa: B023
                return median([getattr(s, attr) for s in samples]) if samples else None

            table.add(idle.label, num(med("none", "rate")), num(med("held", "rate")),
                      ratio(med("held", "rate"), med("none", "rate")),
                      num(med("none", "cpu_per")), num(med("held", "cpu_per")),
                      ratio(med("held", "cpu_per"), med("none", "cpu_per")),
                      num(med("none", "daemon_per")), num(med("held", "daemon_per")),
                      ratio(med("held", "daemon_per"), med("none", "daemon_per")),
                      left, sum(s.load.failed for v in data.values() for s in v))
            self.raw[f"children-{key}"] = _raw(data)
            if key == "superd":
                superd_ratio = ratio_value(med("held", "daemon_per"), med("none", "daemon_per"))
                total_ratio = ratio_value(med("held", "cpu_per"), med("none", "cpu_per"))
                notes.append(f"superd: {left} of its {k:,} `sleep 600` programs were still "
                             "alive once it had stopped (stop_timeout: 1); any left are "
                             "killed by pid.")
                if total_ratio is not None:
                    notes.append(f"superd: total CPU per connection with {k:,} alive is "
                                 f"×{total_ratio:.2f} the cost with none.")
        table.notes.append(
            f"Two instances of each server run side by side, each with a `w1` service "
            f"(`/bin/echo hello`, {n} clients) and a `hold` service (`/bin/sleep 600`, which "
            f"keeps the socket as fds 0/1); the second has {k:,} connections open to `hold`, "
            "each with its program alive. Repetitions alternate between the two. ratio = "
            f"with {k:,} ÷ with none. left after stop: programs still alive once the server "
            "had exited (stopped with SIGTERM; superd's stop_timeout is 1 s), then killed by "
            "pid.")
        self.tables.append(table)
        # the performance issue: within 1.1 × of the cost with none alive
        self.goal(f"superd's own CPU per connection with {k:,} children alive ≤ 1.1 × with "
                  "none", superd_ratio, 1.1, "max")
        self.goal(f"total CPU per connection (superd and its programs) with {k:,} children "
                  "alive ≤ 1.1 × with none", total_ratio, 1.1, "max")

    def _hold(self, server: Server, count: int) -> tuple[list[socket.socket], int]:
        """Open *count* connections to the hold service; wait until each has its
        program.  Returns the sockets and how many programs are alive."""
        held: list[socket.socket] = []
        port = server.port("hold")
        deadline = time.monotonic() + 60
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(10)
            try:
                s.connect(("127.0.0.1", port))
            except OSError:
                s.close()
                time.sleep(0.01)
                continue
            held.append(s)
        alive = 0
        while time.monotonic() < deadline:
            alive = server.count_programs("sleep")
            if alive >= count:
                break
            time.sleep(0.1)
        return held, alive

    # --- no leak ----------------------------------------------------------------------------

    def leak(self) -> None:
        st = self.settings
        if not self.available(["superd"]):
            return
        title = (f"No leak — superd after {st.leak_echo:,} built-in echo connections and "
                 f"{st.leak_exec:,} exec connections")
        self.log(title)
        notes: list[str] = []
        table = Table(title, ["stage", "connections", "conn/s", "VmRSS KB", "fds",
                              "programs alive", "failed"], notes=notes)
        server = self.launch("superd", lambda: [
            Spec("echo", system.free_ports(1)[0], "echo"),
            Spec("w1", system.free_ports(1)[0], "exec", ECHO, "root")], notes)
        if server is None:
            self.tables.append(table)
            return
        pid = server.pids[0]
        n = st.w3_clients
        rows: list[tuple[str, int, int, int]] = []
        try:
            self.client.conn(server.port("echo"), n, 30, "hello\n", "hello", 2000 // n)
            self.client.conn(server.port("w1"), n, 30, expect="hello", per_client=500 // n)
            self._settle(server)
            base_rss, base_fds = system.status_kb(pid), system.fd_count(pid)
            table.add("after warm-up", "2,500", "–", f"{base_rss:,}", base_fds,
                      len(server.descendants()), 0)
            done = 0
            for label, port, send, total in (("echo", server.port("echo"), "hello\n",
                                              st.leak_echo),
                                             ("exec", server.port("w1"), "", st.leak_exec)):
                batch = total // st.leak_batches
                for b in range(st.leak_batches):
                    load = self.client.conn(port, n, 600, send, "hello", max(1, batch // n))
                    done += load.ok
                    self._settle(server)
                    rss, fds = system.status_kb(pid), system.fd_count(pid)
                    rows.append((label, done, rss, fds))
                    table.add(f"{label} batch {b + 1}", f"{done:,}", num(load.rate),
                              f"{rss:,}", fds, len(server.descendants()), load.failed)
                    self.log(f"  {label} batch {b + 1}: {done:,} connections, RSS {rss:,} KB, "
                             f"{fds} fds")
        finally:
            self.finish([server])
        if rows:
            last_rss, last_fds = rows[-1][2], rows[-1][3]
            peak = max(r[2] for r in rows)
            notes.append(f"VmRSS {base_rss:,} KB after warm-up, {last_rss:,} KB at the end "
                         f"({last_rss - base_rss:+,} KB; peak {peak:,} KB); descriptors "
                         f"{base_fds} → {last_fds}.")
            self.goal(f"no leak: superd's fd count flat after {done:,} connections",
                      float(last_fds - base_fds), 0, "max", "{:+.0f} fds")
            self.goal(f"no leak: superd's RSS flat after {done:,} connections "
                      "(within 1 MiB of the warmed-up figure)",
                      float(last_rss - base_rss), 1024, "max", "{:+,.0f} KB")
        self.tables.append(table)

    def _settle(self, server: Server) -> None:
        """Wait (≤ 5 s) until the server has reaped every program (no child left,
        zombies included) and its descriptor count holds still."""
        deadline = time.monotonic() + 5
        last = -1
        while time.monotonic() < deadline:
            fds = server.fds()
            if not any(system.children_of(p) for p in server.pids) and fds == last:
                return
            last = fds
            time.sleep(0.1)


def _one(name: str, kind: str, argv: tuple[str, ...] = (),
         user: str = "root") -> Callable[[], list[Spec]]:
    """Specs of one service on a fresh free port."""
    return lambda: [Spec(name, system.free_ports(1)[0], kind, argv, user)]


def _raw(data: dict[tuple[str, str], list[Sample]]) -> dict[str, list[dict[str, object]]]:
    out: dict[str, list[dict[str, object]]] = {}
    for (key, cell), samples in data.items():
        out[f"{key}/{cell}"] = [
            {"ok": s.load.ok, "wall": round(s.load.wall, 4), "rate": round(s.rate, 1),
             "server_cpu": round(s.server_cpu, 4), "daemon_cpu": round(s.daemon_cpu, 4),
             "loadgen_cpu": round(s.load.cpu, 4), "busy": round(s.busy, 3),
             "errors": s.load.errors}
            for s in samples]
    return out
