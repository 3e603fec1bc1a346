"""What both ``superd convert`` targets check of one input (inetd.conf, xinetd).

The input is written as *name* into the scratch directory, which also holds
``xinetd.d/`` (Debian's xinetd.d files, from tests/fixtures/convert) and
converted as ``superd convert FILE`` would.  Checked: only ConvertError
escapes, and what convert returns is YAML that superd's own loader reads
(superd.yamlfile.load_nodes raises nothing) holding a ``services:`` mapping of
mappings, an optional ``defaults:`` mapping and nothing else (no text from
the source escapes its comment).

``include``/``includedir`` are confined to that directory: an input naming
anything outside it is not converted (a FIFO or ``/proc/kmsg`` named by the
admin's own file would block, by design).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import yaml

from superd.convert import ConvertError, convert, meaningful_lines
from superd.errors import ConfigError
from superd.yamlfile import load_nodes

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "convert"


def sandbox(home: str, name: str) -> Callable[[bytes], None]:
    """The test of one input, written as *home*/*name*."""
    shutil.copytree(FIXTURES / "debian-xinetd" / "xinetd.d", os.path.join(home, "xinetd.d"))
    source = os.path.join(home, name)

    def test_one_input(data: bytes) -> None:
        if not _confined(home, data.decode("utf-8", errors="replace")):
            return
        with open(source, "wb") as f:
            f.write(data)
        try:
            out = convert([source])
        except ConvertError:
            return
        try:
            load_nodes(source + ".yaml", out.encode())
        except ConfigError as e:
            raise AssertionError(f"convert wrote YAML superd cannot read: {e}\n{out}") from e
        _check_shape(yaml.safe_load(out), out)

    return test_one_input


def _check_shape(document: object, out: str) -> None:
    """``defaults:`` and ``services:`` mappings, and nothing else, at the top."""
    assert isinstance(document, dict) and set(document) <= {"defaults", "services"}, out
    assert isinstance(document["services"], dict), out
    assert isinstance(document.get("defaults", {}), dict), out
    for name, settings in document["services"].items():
        assert isinstance(name, str) and isinstance(settings, dict), (name, out)


def _confined(home: str, text: str) -> bool:
    """False if a line includes a file or directory outside *home*."""
    for _, line, _ in meaningful_lines(text, off=False):
        words = line.split()
        if words[0] in ("include", "includedir") and len(words) == 2 and "\0" not in line:
            real = os.path.realpath(os.path.join(home, words[1]))
            if real != home and not real.startswith(home + os.sep):
                return False
    return True
