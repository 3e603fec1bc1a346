"""What hostile load costs superd: ``python -m bench.overload [--seconds N]``.

Four overloads, each against a real superd on 127.0.0.1 for N seconds
(default 10), while a probe asks an unaffected service every 50 ms:

  descriptors   superd limited to 64 descriptors, all taken by idle clients,
                with control and metrics clients queued behind them
  metrics       200 idle connections to the metrics endpoint
  udp           a flood of datagrams to a UDP echo and chargen from one
                source, and a forged datagram looping between two superds
  proxy         a storm of connections from a proxy_from address sending
                malformed PROXY headers

For each it prints the daemon's CPU (share of one core, from
/proc/PID/stat), its log lines per minute, and the probe's p50/p99 round
trip.  The goal (issue 12): under 20% of a core, under 100 lines a minute,
probe p99 under 100 ms.  Run it with nothing else on the machine.  Every
process it starts is stopped by its pid; all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.system import free_ports, proc_stat_cpu

Probe = Callable[[], None]


class Daemon:
    """One superd with its log in a file, stopped by pid."""

    def __init__(self, workdir: Path, name: str, config: str,
                 prefix: tuple[str, ...] = ()) -> None:
        self.path = workdir / f"{name}.yaml"
        self.path.write_text(f"control: {workdir}/{name}.sock\n{config}")
        os.chmod(self.path, 0o644)
        self.log = workdir / f"{name}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "superd", "run", "-c", str(self.path)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        deadline = time.monotonic() + 15
        while "ready:" not in self.log.read_text() and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.log.read_text())
            time.sleep(0.05)

    def lines(self) -> int:
        return len(self.log.read_text(errors="replace").splitlines())

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


def tcp_echo_probe(port: int) -> Probe:
    def probe() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"probe")
            s.shutdown(socket.SHUT_WR)
            assert s.recv(16) == b"probe"
    return probe


def measure(name: str, daemon: Daemon, probe: Probe, seconds: float) -> dict[str, float]:
    """Probe every 50 ms for *seconds* while the overload runs (already started)."""
    cpu0, lines0, t0 = proc_stat_cpu(daemon.proc.pid)[0], daemon.lines(), time.monotonic()
    rtts, failures = [], 0
    while time.monotonic() - t0 < seconds:
        start = time.monotonic()
        try:
            probe()
            rtts.append(time.monotonic() - start)
        except (OSError, AssertionError):
            failures += 1
        time.sleep(max(0.0, 0.05 - (time.monotonic() - start)))
    wall = time.monotonic() - t0
    cpu = proc_stat_cpu(daemon.proc.pid)[0] - cpu0
    q = statistics.quantiles(rtts, n=100) if len(rtts) >= 2 else [float("nan")] * 99
    result = {"cpu": cpu / wall, "lines_per_min": (daemon.lines() - lines0) * 60 / wall,
              "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000, "probes": len(rtts),
              "failed": failures}
    print(f"{name:12} cpu {result['cpu']:6.1%} of a core   log {result['lines_per_min']:6.0f} "
          f"lines/min   probe p50 {result['p50_ms']:6.1f} ms  p99 {result['p99_ms']:6.1f} ms  "
          f"({len(rtts)} probes, {failures} failed)", flush=True)
    return result


@contextlib.contextmanager
def running(target: Callable[[threading.Event], None], threads: int = 1) -> Iterator[None]:
    halt = threading.Event()
    workers = [threading.Thread(target=target, args=(halt,), daemon=True)
               for _ in range(threads)]
    for w in workers:
        w.start()
    try:
        yield
    finally:
        halt.set()
        for w in workers:
            w.join(15)


def descriptors(workdir: Path, seconds: float) -> dict[str, float]:
    echo, udp, metrics = free_ports(3)
    d = Daemon(workdir, "fds", f"metrics: 127.0.0.1:{metrics}\nservices:\n"
               f"  echo: {{listen: '127.0.0.1:{echo}', internal: echo}}\n"
               f"  udp: {{listen: '127.0.0.1:{udp}', protocol: udp, internal: echo,"
               f" reply_rate: 1000}}\n", prefix=("prlimit", "--nofile=64:64", "--"))
    held: list[socket.socket] = []
    try:
        for _ in range(80):  # more than the daemon has descriptors for
            with contextlib.suppress(OSError):
                held.append(socket.create_connection(("127.0.0.1", echo), timeout=2))
        for _ in range(3):
            for path_or_port in (str(d.path.with_suffix(".sock")), metrics):
                with contextlib.suppress(OSError):
                    if isinstance(path_or_port, str):
                        s = socket.socket(socket.AF_UNIX)
                        s.connect(path_or_port)
                    else:
                        s = socket.create_connection(("127.0.0.1", path_or_port), 2)
                    held.append(s)
        probe_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        probe_sock.settimeout(2)

        def probe() -> None:
            probe_sock.sendto(b"probe", ("127.0.0.1", udp))
            assert probe_sock.recv(16) == b"probe"
        return measure("descriptors", d, probe, seconds)
    finally:
        for s in held:
            s.close()
        d.stop()


def metrics_flood(workdir: Path, seconds: float) -> dict[str, float]:
    echo, metrics = free_ports(2)
    d = Daemon(workdir, "metrics", f"metrics: 127.0.0.1:{metrics}\nservices:\n"
               f"  echo: {{listen: '127.0.0.1:{echo}', internal: echo}}\n")
    held = []
    try:
        for _ in range(200):
            with contextlib.suppress(OSError):
                held.append(socket.create_connection(("127.0.0.1", metrics), timeout=2))
        return measure("metrics", d, tcp_echo_probe(echo), seconds)
    finally:
        for s in held:
            s.close()
        d.stop()


def udp_flood(workdir: Path, seconds: float) -> dict[str, float]:
    echo, uecho, chargen, other = free_ports(4)
    d = Daemon(workdir, "udp", "services:\n"
               f"  echo: {{listen: '127.0.0.1:{echo}', internal: echo}}\n"
               f"  uecho: {{listen: '127.0.0.1:{uecho}', protocol: udp, internal: echo}}\n"
               f"  chargen: {{listen: '127.0.0.1:{chargen}', protocol: udp,"
               f" internal: chargen}}\n")

    def flood(halt: threading.Event) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i in range(5_000_000):
                if halt.is_set():
                    return
                with contextlib.suppress(OSError):
                    s.sendto(b"x" * 64, ("127.0.0.1", uecho if i % 2 else chargen))

    # the loop: while d is paused, a datagram "from" the port a second superd
    # is about to listen on; d answers it, and the two echo each other
    peer: Daemon | None = None
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", other))
            s.sendto(b"loop", ("127.0.0.1", uecho))
        peer = Daemon(workdir, "udp-peer", "services:\n"
                      f"  uecho: {{listen: '127.0.0.1:{other}', protocol: udp,"
                      " internal: echo}\n")
    finally:
        os.kill(d.proc.pid, signal.SIGCONT)
    try:
        with running(flood):
            return measure("udp", d, tcp_echo_probe(echo), seconds)
    finally:
        d.stop()
        if peer is not None:
            peer.stop()


def proxy_storm(workdir: Path, seconds: float) -> dict[str, float]:
    echo, web = free_ports(2)
    d = Daemon(workdir, "proxy", "services:\n"
               f"  echo: {{listen: '127.0.0.1:{echo}', internal: echo}}\n"
               f"  web: {{listen: '127.0.0.1:{web}', exec: [/bin/echo, hi], user: nobody,"
               f" proxy_protocol: any, proxy_from: [127.0.0.1]}}\n")
    bad = [b"PROXY\r\n", b"PROXY TCP4 1.2.3.4\r\n", b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff",
           b"GET / HTTP/1.0\r\n\r\n", b"PROXY TCP4 999.1.1.1 1.1.1.1 1 2\r\n"]

    def storm(halt: threading.Event) -> None:
        for i in range(1_000_000):
            if halt.is_set():
                return
            with contextlib.suppress(OSError), \
                    socket.create_connection(("127.0.0.1", web), timeout=2) as s:
                s.sendall(bad[i % len(bad)])
                s.recv(16)

    try:
        with running(storm, threads=4):
            return measure("proxy", d, tcp_echo_probe(echo), seconds)
    finally:
        d.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overload", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="superd-overload-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        results = {f.__name__: f(workdir, args.seconds)
                   for f in (descriptors, metrics_flood, udp_flood, proxy_storm)}
    ok = all(r["cpu"] < 0.2 and r["lines_per_min"] < 100 and r["p99_ms"] < 100
             and r["failed"] == 0 for r in results.values())
    print("goal (cpu < 20%, < 100 lines/min, p99 < 100 ms, no failed probe):",
          "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
