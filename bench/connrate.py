"""Connections per second against a TCP service on loopback.

    python bench/connrate.py PORT [--clients 16] [--seconds 5] [--expect hello]

Each client process connects, reads until EOF, closes, and repeats until
the time is up (bounded by --max-per-client).  Prints the rate and the
load generator's own CPU share, so it can be seen not to be the bottleneck.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import time


def client(port: int, host: str, seconds: float, limit: int, expect: bytes,
           out: mp.Queue) -> None:
    ok = errors = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and ok + errors < limit:
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            if expect and expect not in data:
                errors += 1
            else:
                ok += 1
        except OSError:
            errors += 1
    out.put((ok, errors))


def measure(port: int, host: str = "127.0.0.1", clients: int = 16, seconds: float = 5.0,
            limit: int = 200_000, expect: bytes = b"") -> dict[str, float]:
    out: mp.Queue = mp.Queue()
    before = os.times()
    start = time.monotonic()
    procs = [mp.Process(target=client, args=(port, host, seconds, limit, expect, out))
             for _ in range(clients)]
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 60) for _ in procs]
    for p in procs:
        p.join(10)
    wall = time.monotonic() - start
    after = os.times()
    cpu = (after.children_user - before.children_user
           + after.children_system - before.children_system)
    ok = sum(r[0] for r in results)
    return {"conn_per_s": ok / wall, "ok": ok, "errors": sum(r[1] for r in results),
            "wall_s": wall, "loadgen_cpu_share": cpu / wall}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--expect", default="")
    args = parser.parse_args()
    r = measure(args.port, args.host, args.clients, args.seconds, expect=args.expect.encode())
    print(f"{r['conn_per_s']:.0f} conn/s  ok={r['ok']} errors={r['errors']}  "
          f"loadgen CPU {r['loadgen_cpu_share']:.2f} cores over {r['wall_s']:.1f}s")


if __name__ == "__main__":
    main()
