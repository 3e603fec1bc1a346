"""The benchmark runs: `python -m bench --smoke` measures superd on W1 and W3.

No timing threshold: only that it produces positive figures and its tables.
"""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT


def test_bench_smoke_produces_figures() -> None:
    result = subprocess.run([sys.executable, "-m", "bench", "--smoke"], cwd=ROOT,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "### W1" in out and "### W3" in out, out[-3000:]
    row = re.search(r"^\| superd \|\s+([\d,]+) \|", out, re.MULTILINE)
    assert row is not None, out[-3000:]
    assert int(row.group(1).replace(",", "")) > 0
    w3 = out[out.index("### W3"):]
    short = re.search(r"^\| superd \|\s+([\d,]+) \|", w3, re.MULTILINE)
    assert short is not None and int(short.group(1).replace(",", "")) > 0
