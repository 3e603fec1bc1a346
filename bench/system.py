"""What the benchmark reads from the machine: /proc, cgroup v2, free ports,
the C compiler, and facts about the host for RESULTS.md."""

from __future__ import annotations

import contextlib
import errno
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TICKS = os.sysconf("SC_CLK_TCK")


# --- processes ------------------------------------------------------------

def proc_stat_cpu(pid: int) -> tuple[float, float]:
    """(own, own + reaped children) CPU seconds of *pid* from /proc/PID/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0, 0.0
    fields = text[text.rindex(")") + 2:].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / TICKS, (utime + stime + cutime + cstime) / TICKS


def status_kb(pid: int, key: str = "VmRSS") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return 0


def children_of(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            out.extend(int(p) for p in text.split())
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def alive(pid: int) -> bool:
    """True while *pid* exists and is not a zombie."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return text[text.rindex(")") + 2] != "Z"


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    total = sum(fields[:8])
    return total - idle, total


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


# --- cgroup v2 --------------------------------------------------------------

def cgroup2_root() -> Path | None:
    """Where cgroup v2 is mounted (pure or hybrid), if we may create groups in it."""
    if os.geteuid() != 0:
        return None
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            root = Path(parts[1])
            if (root / "cgroup.procs").exists():
                return root
    return None


class CGroup:
    """A cgroup v2 group for one server: it and everything it starts.

    ``cpu.stat``'s ``usage_usec`` counts every process that ever ran in
    the group, exited ones included, so the delta around a run is the
    server's and its programs' CPU, exactly.
    """

    def __init__(self, parent: Path, name: str) -> None:
        self.path = parent / name
        self.path.mkdir()

    def usage(self) -> float:
        for line in (self.path / "cpu.stat").read_text().splitlines():
            if line.startswith("usage_usec "):
                return int(line.split()[1]) / 1e6
        return 0.0

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def join_self(self) -> None:
        """For preexec_fn: move the calling (child) process into the group."""
        with open(self.path / "cgroup.procs", "w") as f:
            f.write("0\n")

    def remove(self) -> None:
        for _ in range(100):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno != errno.EBUSY:
                    return
                time.sleep(0.05)


class CGroupParent:
    """The benchmark's own group under the cgroup2 root, removed at the end."""

    def __init__(self) -> None:
        root = cgroup2_root()
        self.path: Path | None = None
        if root is None:
            return
        try:
            path = root / f"superd-bench-{os.getpid()}"
            path.mkdir()
            self.path = path
        except OSError:
            self.path = None
        self._count = 0

    def child(self, name: str) -> CGroup | None:
        if self.path is None:
            return None
        self._count += 1
        try:
            return CGroup(self.path, f"{self._count:03d}-{name}")
        except OSError:
            return None

    def remove(self) -> None:
        if self.path is None:
            return
        for sub in self.path.iterdir():
            if sub.is_dir():
                with contextlib.suppress(OSError):
                    sub.rmdir()
        with contextlib.suppress(OSError):
            self.path.rmdir()


# --- ports ------------------------------------------------------------------

def free_ports(count: int) -> list[int]:
    """*count* distinct free TCP ports on 127.0.0.1 (all held while choosing)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def listening_ports(want: set[int] | None = None) -> set[int]:
    """Ports with a TCP socket in LISTEN (any local address).

    The kernel lists listening sockets before all others in /proc/net/tcp,
    so reading stops at the first line in another state: the tens of
    thousands of TIME_WAIT entries a benchmark leaves are never generated.
    tcp6 (slow to read even when empty) is read only if *want* is not met.
    """
    ports: set[int] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        if want is not None and want <= ports:
            break
        try:
            with open(name, "rb", buffering=0) as f:
                rest, header, done = b"", True, False
                while not done and (chunk := f.read(65536)):
                    lines = (rest + chunk).split(b"\n")
                    rest = lines.pop()
                    for line in lines:
                        if header:
                            header = False
                            continue
                        parts = line.split(None, 4)
                        if len(parts) < 4 or parts[3] != b"0A":
                            done = True
                            break
                        ports.add(int(parts[1].rsplit(b":", 1)[1], 16))
        except OSError:
            continue
    return ports


def wait_listening(ports: list[int], timeout: float, alive_check: object = None) -> bool:
    """Poll /proc/net/tcp until every port listens (no connection is made)."""
    want = set(ports)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if want <= listening_ports(want):
            return True
        if callable(alive_check) and not alive_check():
            return False
        time.sleep(0.002)
    return want <= listening_ports(want)


# --- the C programs -----------------------------------------------------------

@dataclass
class Binaries:
    loadgen: str | None
    floor: str | None
    cc: str | None
    error: str = ""


def compile_c(workdir: Path) -> Binaries:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        return Binaries(None, None, None, "no C compiler (cc) found: apt-get install gcc")
    out: dict[str, str] = {}
    for name in ("loadgen", "floor"):
        exe = workdir / name
        proc = subprocess.run([cc, "-O2", "-o", str(exe), str(HERE / f"{name}.c")],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            return Binaries(None, None, cc, f"{cc} failed on {name}.c:\n{proc.stderr}")
        out[name] = str(exe)
    return Binaries(out["loadgen"], out["floor"], cc)


# --- host facts -----------------------------------------------------------------

def host_facts() -> dict[str, str]:
    libc = " ".join(platform.libc_ver())
    try:
        ldd = subprocess.run(["ldd", "--version"], capture_output=True, text=True,
                             timeout=10).stdout.splitlines()[0]
        libc = ldd
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = status_kb_meminfo()
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": f"{mem / 1024 / 1024:.1f} GiB" if mem else "",
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "glibc": libc,
        "nofile": str(_nofile()),
    }


def status_kb_meminfo() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    return 0


def _nofile() -> int:
    import resource
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def make_workdir() -> Path:
    """A temporary directory that programs running as nobody can enter."""
    path = Path(tempfile.mkdtemp(prefix="superd-bench-"))
    os.chmod(path, 0o755)
    return path
