"""Fuzz target: a configuration file and its include (``superd.config.load``).

An input is the main file, optionally followed by a line ``#--- include`` and
the content of one included file.  Both are written into the scratch
directory (the main file as ``superd.yaml``, the other as ``conf.d/extra.yaml``,
beside an executable ``hello.sh``) and loaded the way ``superd check`` and a
reload do.
Checked: only ConfigError escapes, each of its problems names one of the two
files at a line and column of 1 or more, and every service that loads has an
address to listen on, exactly one of ``exec:`` and ``internal:`` and no
number that is NaN or infinite.

``include:`` is confined to that directory: a pattern outside it matches
nothing.  A file root wrote that includes ``/proc/*`` or a FIFO is not a bug
in the parser, and the fuzzer must not go reading the machine.
"""

from __future__ import annotations

import dataclasses
import glob
import inspect
import math
import os
import types
from collections.abc import Callable

import atheris

from fuzz.target import main, scratch_dir

with atheris.instrument_imports(include=["superd"], exclude=["superd.yamlfile"]):
    from superd import config, fields, yamlfile
    from superd.errors import ConfigError
# All of superd.yamlfile but check_graph: its walk of up to 100,000 nodes (an
# alias loop or bomb, refused) takes 50 ms as it is, 0.4 s instrumented, which
# on a loaded machine reads as an input over 1 s.
for _name, _function in inspect.getmembers(yamlfile, inspect.isfunction):
    if _function.__module__ == yamlfile.__name__ and _name != "check_graph":
        atheris.instrument_func(_function)

SEPARATOR = b"\n#--- include\n"
TOKENS = (SEPARATOR, b"include: conf.d/*.yaml", b"services:", b"defaults:", b"hello.sh",
          b"127.0.0.1:", b"[::1]:", b"&a", b"*a", b"<<: ", b"!!str", b"!!binary", b"- ", b"{",
          b"}", b"[", b"]", b"? ", b"|", b">", b"'", b'"', b"\n  ", b"\n    ", b".nan", b".inf",
          b"-.inf", b"1e999", b"0x", b"0o", b"~", b"null",
          *(f"{key}: ".encode() for key in (*config.TOP_KEYS, *fields.SERVICE_KEYS)),
          *(f"{key}: ".encode() for key in config.LOG_KEYS),
          *(word.encode() for word in config.INTERNAL_SERVICES))


def sandbox(home: str) -> Callable[[bytes], None]:
    """The test of one input, with its files in *home* and includes confined there."""
    main_file = os.path.join(home, "superd.yaml")
    included = os.path.join(home, "conf.d", "extra.yaml")
    os.mkdir(os.path.dirname(included))
    hello = os.path.join(home, "hello.sh")
    with open(hello, "w") as f:
        f.write("#!/bin/sh\necho hello\n")
    os.chmod(hello, 0o755)

    def confined_glob(pattern: str) -> list[str]:
        real = os.path.realpath(os.path.dirname(pattern))
        inside = real == home or real.startswith(home + os.sep)
        return glob.glob(pattern) if inside else []

    config.glob = types.SimpleNamespace(glob=confined_glob)  # type: ignore[attr-defined]

    def test_one_input(data: bytes) -> None:
        head, sep, tail = data.partition(SEPARATOR)
        _write(main_file, head)
        _write(included, tail if sep else None)
        try:
            loaded = config.load(main_file)
        except ConfigError as e:
            for problem in e.problems:
                assert problem.file in (main_file, included), problem
                assert problem.line >= 1 and problem.col >= 1, problem
            assert str(e)
            return
        assert math.isfinite(loaded.stop_timeout), loaded
        for service in loaded.services:
            assert service.listen, service
            assert bool(service.exec) != bool(service.internal), service
            for field in dataclasses.fields(service):
                value = getattr(service, field.name)
                assert not isinstance(value, float) or math.isfinite(value), (field, service)

    return test_one_input


def _write(path: str, data: bytes | None) -> None:
    if data is not None:
        with open(path, "wb") as f:
            f.write(data)
    elif os.path.exists(path):
        os.unlink(path)


if __name__ == "__main__":
    main(sandbox(scratch_dir()), TOKENS)
