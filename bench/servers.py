"""The servers under test, each given an equivalent configuration.

A :class:`Spec` says what one service is (a port, a program or the
built-in echo, root or nobody); each :class:`Server` turns a list of specs
into its own configuration and command lines, starts the processes in a
cgroup of their own (when the machine allows), waits until every port
listens, and stops every process it started, by pid, in ``stop()``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from bench import system

NOBODY_UID = 65534
NOBODY_GID = 65534
INETD_CACHE = Path.home() / ".cache" / "superd-bench" / "openbsd-inetd" / "usr" / "sbin" / "inetd"
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class Spec:
    """One service: ``kind`` "exec" (``argv``) or "echo" (built in)."""

    name: str
    port: int
    kind: str = "exec"
    argv: tuple[str, ...] = ()
    user: str = "root"  # "root" (no identity switch) or "nobody"
    max_connections: int = 256


class StartError(RuntimeError):
    pass


@dataclass
class Server:
    """Base class: one server program and the processes it runs as."""

    key: str = "server"
    label: str = "server"
    workdir: Path = Path("/tmp")
    cgroups: system.CGroupParent | None = None
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    cgroup: system.CGroup | None = None
    ports: dict[str, int] = field(default_factory=dict)
    ready_s: float = 0.0
    notify_s: float | None = None
    log_paths: list[Path] = field(default_factory=list)
    left_behind: int = 0  # processes still alive after the server itself stopped

    # --- what a subclass provides ----------------------------------------

    def unsupported(self, spec: Spec) -> str | None:
        """Why this server cannot run *spec*, or None."""
        if spec.kind == "echo":
            return "no built-in echo"
        return None

    def port_for(self, spec: Spec) -> int:
        return spec.port

    def commands(self, specs: list[Spec], tag: str) -> list[list[str]]:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None

    # --- running ---------------------------------------------------------------

    def start(self, specs: list[Spec], tag: str = "") -> None:
        for spec in specs:
            why = self.unsupported(spec)
            if why:
                raise StartError(f"{self.label}: {why}")
        self.ports = {s.name: self.port_for(s) for s in specs}
        self.cgroup = self.cgroups.child(self.key) if self.cgroups else None
        cmds = self.commands(specs, tag)
        preexec: Callable[[], None] | None = self.cgroup.join_self if self.cgroup else None
        t0 = time.monotonic()
        try:
            for i, cmd in enumerate(cmds):
                log_path = self.workdir / f"{self.key}{tag}-{i}.log"
                self.log_paths.append(log_path)
                with open(log_path, "ab") as logf:
                    self.procs.append(subprocess.Popen(
                        cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                        env=self.env(), cwd=str(self.workdir), preexec_fn=preexec,
                        start_new_session=True))
            self._await_notify(t0)
            ok = system.wait_listening(list(self.ports.values()), START_TIMEOUT,
                                       lambda: all(p.poll() is None for p in self.procs))
            self.ready_s = time.monotonic() - t0
            if not ok:
                raise StartError(f"{self.label} did not listen on every port within "
                                 f"{START_TIMEOUT:.0f}s:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _await_notify(self, t0: float) -> None:
        pass

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def port(self, name: str) -> int:
        return self.ports[name]

    def cpu(self) -> float:
        """CPU seconds of the server and everything it started, so far."""
        if self.cgroup is not None:
            return self.cgroup.usage()
        return sum(system.proc_stat_cpu(pid)[1] for pid in self.pids)

    def daemon_cpu(self) -> float:
        """CPU seconds of the server's own processes (not its programs)."""
        return sum(system.proc_stat_cpu(pid)[0] for pid in self.pids)

    def rss_kb(self) -> int:
        return sum(system.status_kb(pid) for pid in self.pids)

    def pss_kb(self) -> int:
        return sum(system.pss_kb(pid) for pid in self.pids)

    def fds(self) -> int:
        return sum(system.fd_count(pid) for pid in self.pids)

    def descendants(self) -> list[int]:
        """Every live process the server started (not the server itself)."""
        mine = set(self.pids)
        if self.cgroup is not None:
            return [p for p in self.cgroup.pids() if p not in mine and system.alive(p)]
        out: list[int] = []
        todo = list(self.pids)
        while todo and len(out) < 100_000:
            kids = system.children_of(todo.pop())
            out.extend(kids)
            todo.extend(kids)
        return [p for p in out if system.alive(p)]

    def count_programs(self, comm: str) -> int:
        n = 0
        for pid in self.descendants():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                    n += 1
        return n

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM each server process by pid, SIGKILL if it lingers, then
        SIGKILL (by pid) whatever it started that is still alive."""
        before = [] if self.cgroup is not None else self.descendants()
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        time.sleep(0.05)
        left = self.cgroup.pids() if self.cgroup is not None else before
        left = [p for p in left if system.alive(p)]
        self.left_behind = len(left)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while left and time.monotonic() < deadline:
            left = [p for p in left if system.alive(p)]
            time.sleep(0.02)
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None
        self.procs = []

    def log_tail(self, lines: int = 20) -> str:
        out: list[str] = []
        for path in self.log_paths:
            with contextlib.suppress(OSError):
                out.extend(path.read_text(errors="replace").splitlines()[-lines:])
        return "\n".join(out[-lines:])

    def problems(self) -> list[str]:
        """Log lines that say something went wrong (warnings, errors, tracebacks)."""
        found: list[str] = []
        for path in self.log_paths:
            with contextlib.suppress(OSError):
                for line in path.read_text(errors="replace").splitlines():
                    low = line.lower()
                    if any(w in low for w in ("warning", "error", "traceback", "refused",
                                              "cannot", "failed")):
                        found.append(line.strip())
        return found


# --- the floor ------------------------------------------------------------------

@dataclass
class Floor(Server):
    key: str = "floor"
    label: str = "floor (C)"
    binary: str = ""

    def unsupported(self, spec: Spec) -> str | None:
        return None

    def commands(self, specs: list[Spec], tag: str) -> list[list[str]]:
        cmds: list[list[str]] = []
        for spec in (s for s in specs if s.kind == "echo"):
            cmds.append([self.binary, "echo", str(spec.port)])
        for user in ("root", "nobody"):
            groups: dict[tuple[str, ...], list[int]] = {}
            for spec in (s for s in specs if s.kind == "exec" and s.user == user):
                groups.setdefault(spec.argv, []).append(spec.port)
            if not groups:
                continue
            cmd = [self.binary]
            if user == "nobody":
                cmd += ["-u", str(NOBODY_UID), "-g", str(NOBODY_GID)]
            cmd.append("exec")
            for i, (argv, ports) in enumerate(groups.items()):
                if i:
                    cmd.append("---")
                cmd += [",".join(map(str, ports)), *argv]
            cmds.append(cmd)
        return cmds


# --- superd ---------------------------------------------------------------------

@dataclass
class Superd(Server):
    key: str = "superd"
    label: str = "superd"
    stderr: str | None = None  # a service's stderr: key, None for the default (log)
    _notify: socket.socket | None = None
    _notify_path: str = ""

    def unsupported(self, spec: Spec) -> str | None:
        return None

    def config(self, specs: list[Spec], tag: str) -> dict[str, object]:
        services: dict[str, object] = {}
        for spec in specs:
            svc: dict[str, object] = {"listen": f"127.0.0.1:{spec.port}"}
            if spec.kind == "echo":
                svc["internal"] = "echo"
            else:
                svc["exec"] = list(spec.argv)
                if os.geteuid() == 0:
                    svc["user"] = spec.user
                if self.stderr is not None:
                    svc["stderr"] = self.stderr
            if spec.max_connections != 256:
                svc["max_connections"] = spec.max_connections
            services[spec.name] = svc
        total = max(1024, sum(s.max_connections for s in specs) + 64)
        return {
            "control": str(self.workdir / f"control{tag}-{self.key}.sock"),
            "log": {"level": "warning"},
            "stop_timeout": 1,
            "max_connections": total,
            "defaults": {"max_connections": 256, "per_source": 10000},
            "services": services,
        }

    def commands(self, specs: list[Spec], tag: str) -> list[list[str]]:
        path = self.workdir / f"{self.key}{tag}.yaml"
        path.write_text(yaml.safe_dump(self.config(specs, tag), sort_keys=False))
        os.chmod(path, 0o644)
        notify = self.workdir / f"notify{tag}-{self.key}.sock"
        with contextlib.suppress(FileNotFoundError):
            notify.unlink()
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(notify))
        self._notify_path = str(notify)
        return [[sys.executable, "-m", "superd", "run", "-c", str(path)]]

    def env(self) -> dict[str, str] | None:
        env = dict(os.environ)
        for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC"):
            env.pop(name, None)
        env["NOTIFY_SOCKET"] = self._notify_path
        return env

    def _await_notify(self, t0: float) -> None:
        """superd says READY=1 (sd_notify) once every listener is bound."""
        sock = self._notify
        if sock is None:
            return
        sock.settimeout(0.05)
        deadline = t0 + START_TIMEOUT
        try:
            while time.monotonic() < deadline:
                try:
                    data = sock.recv(4096)
                except TimeoutError:
                    if any(p.poll() is not None for p in self.procs):
                        return
                    continue
                if b"READY=1" in data.split(b"\n"):
                    self.notify_s = time.monotonic() - t0
                    return
        finally:
            sock.setblocking(False)  # kept bound until stop(): superd sends STOPPING=1

    def stop(self, timeout: float = 15.0) -> None:
        super().stop(timeout)
        if self._notify is not None:
            self._notify.close()
            self._notify = None
            with contextlib.suppress(OSError):
                os.unlink(self._notify_path)


# --- xinetd ----------------------------------------------------------------------

@dataclass
class Xinetd(Server):
    key: str = "xinetd"
    label: str = "xinetd"
    binary: str = "xinetd"

    def unsupported(self, spec: Spec) -> str | None:
        return None

    def commands(self, specs: list[Spec], tag: str) -> list[list[str]]:
        lines = ["defaults", "{",
                 "\tinstances = UNLIMITED", "\tcps = 100000 1", "\tper_source = UNLIMITED",
                 f"\tlog_type = FILE {self.workdir / f'xinetd{tag}-service.log'}",
                 "\tlog_on_success =", "\tlog_on_failure =", "}"]
        for spec in specs:
            body = ["\tsocket_type = stream", "\tprotocol = tcp", "\twait = no",
                    f"\tuser = {spec.user}", "\tbind = 127.0.0.1", f"\tport = {spec.port}"]
            if spec.kind == "echo":
                lines += ["service echo", "{", "\ttype = INTERNAL UNLISTED",
                          "\tid = echo-stream", *body, "}"]
            else:
                lines += [f"service bench-{spec.name}", "{", "\ttype = UNLISTED", *body,
                          f"\tserver = {spec.argv[0]}"]
                if len(spec.argv) > 1:
                    lines.append(f"\tserver_args = {' '.join(spec.argv[1:])}")
                lines.append("}")
        path = self.workdir / f"xinetd{tag}.conf"
        path.write_text("\n".join(lines) + "\n")
        return [[self.binary, "-f", str(path), "-dontfork"]]


# --- OpenBSD inetd -----------------------------------------------------------------

@dataclass
class Inetd(Server):
    key: str = "inetd"
    label: str = "openbsd-inetd"
    binary: str = "inetd"

    def unsupported(self, spec: Spec) -> str | None:
        if spec.kind == "echo" and not system.port_free(7):
            return "its built-in echo must listen on port 7, which is taken"
        return None

    def port_for(self, spec: Spec) -> int:
        return 7 if spec.kind == "echo" else spec.port

    def commands(self, specs: list[Spec], tag: str) -> list[list[str]]:
        lines = []
        for spec in specs:
            if spec.kind == "echo":  # built-ins are found by their /etc/services name
                lines.append("127.0.0.1:echo stream tcp4 nowait.1000000 root internal")
            else:
                lines.append(f"127.0.0.1:{spec.port} stream tcp4 nowait.1000000 {spec.user} "
                             f"{spec.argv[0]} {os.path.basename(spec.argv[0])} "
                             + " ".join(spec.argv[1:]))
        path = self.workdir / f"inetd{tag}.conf"
        path.write_text("\n".join(lines) + "\n")
        return [[self.binary, "-i", "-R", "1000000", str(path)]]


# --- ucspi-tcp tcpserver ---------------------------------------------------------------

@dataclass
class Tcpserver(Server):
    key: str = "tcpserver"
    label: str = "tcpserver"
    binary: str = "tcpserver"

    def commands(self, specs: list[Spec], tag: str) -> list[list[str]]:
        cmds = []
        for spec in specs:
            cmd = [self.binary, "-c", str(spec.max_connections), "-H", "-R", "-l0"]
            if spec.user == "nobody":
                cmd += ["-u", str(NOBODY_UID), "-g", str(NOBODY_GID)]
            cmds.append([*cmd, "127.0.0.1", str(spec.port), *spec.argv])
        return cmds


# --- systemd-socket-activate ---------------------------------------------------------------

@dataclass
class SocketActivate(Server):
    key: str = "socket-activate"
    label: str = "systemd-socket-activate"
    binary: str = "systemd-socket-activate"

    def unsupported(self, spec: Spec) -> str | None:
        if spec.kind == "echo":
            return "no built-in echo"
        if spec.user != "root":
            return "cannot switch users"
        return None

    def commands(self, specs: list[Spec], tag: str) -> list[list[str]]:
        groups: dict[tuple[str, ...], list[int]] = {}
        for spec in specs:
            groups.setdefault(spec.argv, []).append(spec.port)
        cmds = []
        for argv, ports in groups.items():
            listen = [a for p in ports for a in ("-l", f"127.0.0.1:{p}")]
            cmds.append([self.binary, "--inetd", "-a", *listen, *argv])
        return cmds

    def start(self, specs: list[Spec], tag: str = "") -> None:
        super().start(specs, tag)
        for path in self.log_paths:  # it logs three lines a connection: not kept
            with contextlib.suppress(OSError):
                path.unlink()
        self.log_paths = []


# --- finding the peers ----------------------------------------------------------------------

@dataclass
class Peer:
    key: str
    label: str
    path: str | None
    how: str  # how to get it when missing
    version: str = ""


def _dpkg_version(package: str) -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _missing_libs(path: str) -> list[str]:
    try:
        out = subprocess.run(["ldd", path], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.split()[0] for line in out.splitlines() if "not found" in line]


def find_peers(inetd_path: str | None = None) -> list[Peer]:
    def which(name: str) -> str | None:
        return shutil.which(name) or next(
            (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}", f"/sbin/{name}")
             if os.access(p, os.X_OK)), None)

    peers = [
        Peer("xinetd", "xinetd", which("xinetd"), "apt-get install xinetd",
             _dpkg_version("xinetd")),
        Peer("tcpserver", "tcpserver", which("tcpserver"), "apt-get install ucspi-tcp",
             _dpkg_version("ucspi-tcp")),
        Peer("socket-activate", "systemd-socket-activate", which("systemd-socket-activate"),
             "apt-get install systemd", _dpkg_version("systemd")),
    ]
    inetd = inetd_path or os.environ.get("SUPERD_BENCH_INETD")
    version = ""
    if not inetd and os.access(INETD_CACHE, os.X_OK):
        inetd = str(INETD_CACHE)
        debs = sorted(INETD_CACHE.parents[2].glob("openbsd-inetd_*.deb"))
        version = debs[-1].name.split("_")[1] if debs else "unpacked"
    if not inetd and _dpkg_version("openbsd-inetd") and os.access("/usr/sbin/inetd", os.X_OK):
        inetd, version = "/usr/sbin/inetd", _dpkg_version("openbsd-inetd")
    how = ("it conflicts with xinetd as a Debian package, so unpack it: "
           f"mkdir -p {INETD_CACHE.parents[2]} && cd {INETD_CACHE.parents[2]} && "
           "apt-get download openbsd-inetd && dpkg -x openbsd-inetd_*.deb openbsd-inetd "
           "(it needs libevent-2.1-7, libwrap0, libbsd0); or pass --inetd PATH")
    if inetd and _missing_libs(inetd):
        how = f"{inetd} lacks libraries {', '.join(_missing_libs(inetd))}; " + how
        inetd = None
    peers.insert(1, Peer("inetd", "openbsd-inetd", inetd, how, version))
    return peers


def make_server(key: str, workdir: Path, cgroups: system.CGroupParent | None,
                peers: dict[str, Peer], floor_bin: str | None) -> Server:
    common = {"workdir": workdir, "cgroups": cgroups}
    if key == "floor":
        assert floor_bin is not None
        return Floor(binary=floor_bin, **common)  # type: ignore[arg-type]
    if key == "superd":
        return Superd(**common)  # type: ignore[arg-type]
    if key == "superd-nolog":
        return Superd(key="superd-nolog", label="superd (stderr: null)", stderr="null",
                      **common)  # type: ignore[arg-type]
    path = peers[key].path
    assert path is not None
    classes: dict[str, type[Server]] = {"xinetd": Xinetd, "inetd": Inetd,
                                        "tcpserver": Tcpserver,
                                        "socket-activate": SocketActivate}
    return classes[key](binary=path, **common)  # type: ignore[call-arg, arg-type]
