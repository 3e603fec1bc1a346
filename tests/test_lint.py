"""The code stays ruff-clean: lint is part of the test command."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_ruff_check_is_clean() -> None:
    """ruff is a test dependency (pip install -e '.[test]'): missing, it fails."""
    beside = Path(sys.executable).parent / "ruff"  # the venv's, even when not activated
    ruff = str(beside) if beside.exists() else shutil.which("ruff")
    assert ruff is not None, "ruff is not installed (pip install -e '.[test]' installs it)"
    result = subprocess.run([ruff, "check", "superd", "tests", "bench"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
