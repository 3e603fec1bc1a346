"""The README's example configuration works end to end."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import ROOT, tcp_exchange


def test_example_config_serves_hello_and_echo(superd, tmp_path: Path) -> None:
    shutil.copy(ROOT / "etc" / "hello.sh", tmp_path / "hello.sh")
    d = superd((ROOT / "etc" / "superd.yaml").read_text())
    reply = tcp_exchange(2323, b"ping\nquit\n")
    assert reply.startswith(b"hello 127.0.0.1, this is hello")
    assert b"you said: ping\n" in reply
    assert tcp_exchange(7007, b"echo me") == b"echo me"
    d.wait_log(r"hello\[\d+\]: hello: client 127\.0\.0\.1:\d+ connected")
    assert d.stop() == 0


def test_the_readme_one_liner_prints_all_of_hellos_lines(superd, tmp_path: Path) -> None:
    """Issue 16, finding 6: the README's Python one-liner read once and so
    printed only the first of hello's lines.  This runs the README's own
    command against the example configuration."""
    import re
    import subprocess

    command = re.search(r"^(python3 -c '.*2323.*')$", (ROOT / "README.md").read_text(),
                        re.MULTILINE)
    assert command, "the README's quick start has no python3 -c one-liner for hello"
    shutil.copy(ROOT / "etc" / "hello.sh", tmp_path / "hello.sh")
    d = superd((ROOT / "etc" / "superd.yaml").read_text())
    result = subprocess.run(["sh", "-c", command.group(1)], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith("hello 127.0.0.1, this is hello"), lines
    assert lines[1:] == ["you said: hi", "bye"], lines
    assert d.stop() == 0
