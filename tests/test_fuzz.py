"""The fuzz targets (fuzz/): each runs for a short, bounded time and finds nothing.

Every target goes through the documented command, ``python -m fuzz``, for
SECONDS: an exception other than the parser's own error type, a failed
property, an input taking 1 s or more, or running out of memory fails the
test, with the runner's line (artifact and log paths) as the message.
The long runs (10 minutes a target) are done by hand: ``python -m fuzz
--seconds 600 --jobs 2``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris (test extra) has no wheel for this Python")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fuzz.__main__ import SEEDS, TARGETS  # noqa: E402

SECONDS = 10


@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz_target_finds_nothing(target: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fuzz", "--seconds", str(SECONDS), "--work", str(tmp_path),
         target],
        cwd=ROOT, capture_output=True, text=True, timeout=SECONDS + 120, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith(f"{target}:")]
    report = result.stdout + result.stderr + _evidence(tmp_path / target)
    assert result.returncode == 0, report
    assert len(lines) == 1 and lines[0].endswith(": nothing found"), report
    assert " 0 runs" not in lines[0], report


def _evidence(out: Path) -> str:
    """The end of the target's log and each artifact's bytes: tmp_path does not outlive
    the test, so this is all that is left to reproduce a finding with."""
    if not out.is_dir():
        return ""
    log = out / "log"
    text = "\n".join(log.read_text(errors="replace").splitlines()[-60:]) if log.exists() else ""
    for path in sorted(out.iterdir()):
        if path.name.startswith(("crash-", "timeout-", "slow-unit-", "oom-", "finding-")):
            text += f"\n{path.name}: {path.read_bytes()[:2000]!r}"
    return "\n" + text


def test_every_target_is_run_and_has_seeds() -> None:
    modules = {p.stem for p in (ROOT / "fuzz").glob("*.py")}
    helpers = {"__init__", "__main__", "target", "proxy_checks", "convert_checks"}
    assert modules - helpers == set(TARGETS)
    for target in TARGETS:
        assert any((SEEDS / target).iterdir()), f"no seed corpus for {target}"
