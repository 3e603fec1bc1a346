"""Run the fuzz targets: ``python -m fuzz [--seconds N] [--jobs J] [-k] [--work DIR] [TARGET...]``.

Each target runs as its own process (``python -m fuzz.TARGET``) under
libFuzzer flags: ``-max_total_time`` (``--seconds``, default 60), ``-timeout=1``
and ``-report_slow_units=1`` (an input taking 1 s or more is a finding),
``-rss_limit_mb=2048`` and the target's ``-max_len``.  Its corpus is the seeds
in ``fuzz/corpus/TARGET/`` (read, never written) plus ``WORK/TARGET/corpus/``,
where libFuzzer keeps what it finds; artifacts (``crash-*``, ``timeout-*``,
``slow-unit-*``, ``oom-*``) and the log go to ``WORK/TARGET/``.  The files a
target writes (a configuration to load, a file to convert) go to a scratch
directory under the system temporary directory, removed when it ends.  ``WORK`` is a
new directory under the system temporary directory unless ``--work`` names
one; reusing a work directory resumes from its corpus.  With ``-k`` a target
does not stop at its first finding: each distinct exception (type and
innermost superd line) is written as ``finding-N`` with its traceback in
``finding-N.txt``, and fuzzing goes on.

Prints one line per target (runs, corpus, coverage, slowest input, result)
and exits 1 if any target found something, 0 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fuzz.target import KEEP_GOING, SCRATCH

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fuzz" / "corpus"
# target name: -max_len (the largest input libFuzzer makes)
TARGETS = {
    "proxy_v1": 512,
    "proxy_v2": 4608,
    "control_request": 4096,
    "metrics_request": 2048,
    "udp_internal": 2048,
    "yaml_config": 8192,
    "convert_inetd": 8192,
    "convert_xinetd": 8192,
}
ARTIFACTS = ("crash-", "timeout-", "slow-unit-", "oom-", "leak-", "finding-")
_DONE = re.compile(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)/")
_STAT = re.compile(r"stat::(\w+):\s+(\d+)")


@dataclass
class Result:
    target: str
    returncode: int
    log: Path
    artifacts: list[Path]
    stats: dict[str, int]

    @property
    def found(self) -> bool:
        return self.returncode != 0 or bool(self.artifacts)

    def summary(self) -> str:
        s = self.stats
        runs = s.get("number_of_executed_units", s.get("runs", 0))
        text = (f"{self.target}: {runs} runs, {s.get('average_exec_per_sec', 0)}/s, "
                f"corpus {s.get('corpus', '?')}, cov {s.get('cov', '?')} "
                f"ft {s.get('ft', '?')}, slowest {s.get('slowest_unit_time_sec', '?')} s")
        if not self.found:
            return text + ": nothing found"
        found = ", ".join(str(p) for p in self.artifacts) or "no artifact"
        return f"{text}: FOUND (exit {self.returncode}): {found}; log {self.log}"


def command(target: str, seconds: int, work: Path) -> list[str]:
    """The libFuzzer command line of *target*, corpus and artifacts under *work*."""
    out = work / target
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    return [
        sys.executable, "-m", f"fuzz.{target}",
        str(out / "corpus"), str(SEEDS / target),
        f"-max_total_time={seconds}", "-timeout=1", "-report_slow_units=1",
        "-rss_limit_mb=2048", f"-max_len={TARGETS[target]}",
        f"-artifact_prefix={out}/", "-print_final_stats=1",
    ]


def run(target: str, seconds: int, work: Path, keep_going: bool = False) -> Result:
    out = work / target
    cmd = command(target, seconds, work)
    log = out / "log"
    scratch = tempfile.mkdtemp(prefix=f"superd-fuzz-{target}-")
    env = {**os.environ, SCRATCH: scratch, **({KEEP_GOING: "1"} if keep_going else {})}
    try:
        with open(log, "wb") as f:
            proc = subprocess.run(cmd, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=f,
                                  stderr=subprocess.STDOUT, env=env, check=False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    text = log.read_text(errors="replace")
    artifacts = sorted(p for p in out.iterdir()
                       if p.name.startswith(ARTIFACTS) and p.suffix != ".txt")
    return Result(target, proc.returncode, log, artifacts, _stats(text))


def _stats(text: str) -> dict[str, int]:
    stats = {name: int(value) for name, value in _STAT.findall(text)}
    done = _DONE.findall(text)
    if done:
        runs, cov, ft, corpus = (int(v) for v in done[-1])
        stats.update(runs=runs, cov=cov, ft=ft, corpus=corpus)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz",
                                     description="Run superd's atheris fuzz targets.")
    parser.add_argument("targets", nargs="*", metavar="TARGET",
                        help=f"targets to run (default: all): {', '.join(TARGETS)}")
    parser.add_argument("--seconds", type=int, default=60, help="time per target")
    parser.add_argument("--jobs", type=int, default=1, help="targets run at once")
    parser.add_argument("-k", "--keep-going", action="store_true",
                        help="record each distinct exception as WORK/TARGET/finding-N "
                        "(traceback in finding-N.txt) and go on fuzzing")
    parser.add_argument("--work", type=Path, help="corpus, artifacts and logs (default: new "
                        "temporary directory)")
    args = parser.parse_args(argv)
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="superd-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"fuzz: {args.seconds} s per target, work directory {work}", flush=True)
    found = False
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run, t, args.seconds, work, args.keep_going)
                   for t in args.targets or TARGETS]
        for future in futures:
            result = future.result()
            found |= result.found
            print(result.summary(), flush=True)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
