"""The load generator: the compiled C one, or a Python fallback.

Both give the same :class:`Load`: connections (or round trips) that
succeeded, failures by kind, wall seconds, and the generator's own CPU
seconds, so that a table can show it was not the bottleneck.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import selectors
import socket
import subprocess
import time
from dataclasses import dataclass, field
from multiprocessing.queues import Queue

ERROR_KINDS = ("refused", "reset", "timeout", "short", "addrnotavail", "other")
PER_CLIENT_MAX = 50_000_000


@dataclass
class Load:
    ok: int
    wall: float
    cpu: float
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    @property
    def rate(self) -> float:
        return self.ok / self.wall if self.wall > 0 else 0.0


class Client:
    """``kind`` is "C" (compiled loadgen) or "Python" (the fallback)."""

    def __init__(self, loadgen: str | None) -> None:
        self.loadgen = loadgen
        self.kind = "C" if loadgen else "Python"

    def conn(self, port: int, clients: int, seconds: float, send: str = "",
             expect: str = "", per_client: int = PER_CLIENT_MAX) -> Load:
        """Each client: connect, send (then shut down writing), read to EOF, close."""
        if self.loadgen:
            return self._run(["conn", str(port), str(clients), f"{seconds:.3f}", send, expect,
                              str(per_client)], seconds)
        return _py_workers(_py_conn, port, clients, seconds, (send.encode(), expect.encode(),
                                                              per_client))

    def rtt(self, port: int, clients: int, seconds: float, size: int = 64) -> Load:
        """Each client: one connection, *size*-byte round trips until the time is up."""
        if self.loadgen:
            return self._run(["rtt", str(port), str(clients), f"{seconds:.3f}", str(size)],
                             seconds)
        return _py_workers(_py_rtt, port, clients, seconds, (size,))

    def bulk(self, port: int, nbytes: int) -> Load:
        """One connection: send *nbytes* while reading them back; ok=1 if all came back."""
        if self.loadgen:
            return self._run(["bulk", str(port), str(nbytes)], 120)
        return _py_bulk(port, nbytes)

    def _run(self, args: list[str], seconds: float) -> Load:
        assert self.loadgen is not None
        try:
            proc = subprocess.run([self.loadgen, *args], capture_output=True, text=True,
                                  timeout=seconds + 90)
        except subprocess.TimeoutExpired:
            return Load(0, seconds, 0.0, {"timeout": 1})
        try:
            data = json.loads(proc.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return Load(0, seconds, 0.0, {"other": 1})
        return Load(int(data["ok"]), float(data["wall"]), float(data["cpu"]),
                    {k: int(v) for k, v in data["errors"].items() if v})


# --- the Python fallback ------------------------------------------------------------

def _kind(e: OSError) -> str:
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, ConnectionResetError | BrokenPipeError):
        return "reset"
    if isinstance(e, TimeoutError):
        return "timeout"
    return "other"


def _py_conn(port: int, deadline: float, args: tuple[object, ...],
             errors: dict[str, int]) -> int:
    send, expect, per_client = args
    assert isinstance(send, bytes) and isinstance(expect, bytes)
    assert isinstance(per_client, int)
    ok = 0
    for _ in range(per_client):
        if time.monotonic() >= deadline:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                if send:
                    s.sendall(send)
                    s.shutdown(socket.SHUT_WR)
                data = b""
                while chunk := s.recv(4096):
                    if len(data) < 4096:
                        data += chunk
        except OSError as e:
            errors[_kind(e)] = errors.get(_kind(e), 0) + 1
            continue
        if expect and expect not in data:
            errors["short"] = errors.get("short", 0) + 1
        else:
            ok += 1
    return ok


def _py_rtt(port: int, deadline: float, args: tuple[object, ...],
            errors: dict[str, int]) -> int:
    (size,) = args
    assert isinstance(size, int)
    out = b"x" * size
    ok = 0
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for _ in range(PER_CLIENT_MAX):
                if time.monotonic() >= deadline:
                    break
                s.sendall(out)
                got = 0
                while got < size:
                    chunk = s.recv(size - got)
                    if not chunk:
                        errors["short"] = errors.get("short", 0) + 1
                        return ok
                    got += len(chunk)
                ok += 1
    except OSError as e:
        errors[_kind(e)] = errors.get(_kind(e), 0) + 1
    return ok


def _py_worker(fn: object, port: int, deadline: float, args: tuple[object, ...],
               out: Queue[tuple[int, dict[str, int], float]]) -> None:
    errors: dict[str, int] = {}
    assert callable(fn)
    ok = fn(port, deadline, args, errors)
    out.put((ok, errors, time.monotonic()))


def _py_workers(fn: object, port: int, clients: int, seconds: float,
                args: tuple[object, ...]) -> Load:
    ctx = mp.get_context("fork")
    out: Queue[tuple[int, dict[str, int], float]] = ctx.Queue()
    before = os.times()
    start = time.monotonic()
    deadline = start + seconds
    procs = [ctx.Process(target=_py_worker, args=(fn, port, deadline, args, out))
             for _ in range(clients)]
    for p in procs:
        p.start()
    ok, end = 0, start
    errors: dict[str, int] = {}
    for _ in procs:
        n, errs, t = out.get(timeout=seconds + 60)
        ok += n
        end = max(end, t)
        for k, v in errs.items():
            errors[k] = errors.get(k, 0) + v
    for p in procs:
        p.join(10)
    after = os.times()
    cpu = (after.children_user - before.children_user
           + after.children_system - before.children_system)
    return Load(ok, end - start, cpu, errors)


def _py_bulk(port: int, nbytes: int) -> Load:
    block = bytes((i * 7 + 13) & 0xFF for i in range(65536))
    before = os.times()
    start = time.monotonic()
    sent = recvd = 0
    errors: dict[str, int] = {}
    bad = False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.setblocking(False)
            sel = selectors.DefaultSelector()
            sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
            deadline = start + 120
            while time.monotonic() < deadline:
                events = sel.select(10)
                if not events:
                    errors["timeout"] = 1
                    break
                mask = events[0][1]
                if mask & selectors.EVENT_READ:
                    try:
                        data = s.recv(65536)
                    except BlockingIOError:
                        data = None
                    if data == b"":
                        break
                    if data:
                        off = recvd % 65536
                        expect = (block[off:] + block)[:len(data)] if len(data) <= 65536 else None
                        if expect is not None and data != expect:
                            bad = True
                        recvd += len(data)
                if mask & selectors.EVENT_WRITE and sent < nbytes:
                    off = sent % 65536
                    try:
                        sent += s.send(block[off:off + min(65536 - off, nbytes - sent)])
                    except BlockingIOError:
                        pass
                    if sent >= nbytes:
                        s.shutdown(socket.SHUT_WR)
                        sel.modify(s, selectors.EVENT_READ)
    except OSError as e:
        errors[_kind(e)] = 1
    wall = time.monotonic() - start
    after = os.times()
    ok = int(recvd == nbytes and not bad)
    if not ok:
        errors["short"] = errors.get("short", 0) + 1
    return Load(ok, wall, (after.user - before.user) + (after.system - before.system), errors)
