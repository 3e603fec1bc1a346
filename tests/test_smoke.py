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
