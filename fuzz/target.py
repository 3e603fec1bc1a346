"""What every fuzz target shares: run one parser under atheris, let only its errors pass.

A target module imports the code it fuzzes inside
``atheris.instrument_imports(include=["superd"])`` (coverage comes from that
instrumentation), defines ``test_one_input(data: bytes)`` and ends with
``main(test_one_input, TOKENS)``.  Inside ``test_one_input`` each call goes
through :func:`expect`, which swallows the parser's own error types and lets
anything else escape: atheris reports an escaped exception as a crash and
libFuzzer writes the input to its ``-artifact_prefix``.  A failed ``assert``
(a property of the result) is such an escape too.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import atheris

T = TypeVar("T")
Errors = tuple[type[BaseException], ...]
KEEP_GOING = "SUPERD_FUZZ_KEEP_GOING"  # set: record findings and go on (python -m fuzz -k)
SCRATCH = "SUPERD_FUZZ_SCRATCH"  # the directory scratch_dir() returns


def expect(errors: Errors, func: Callable[..., T], *args: Any) -> T | None:
    """``func(*args)``, or None if it raised one of *errors*; anything else escapes."""
    try:
        return func(*args)
    except errors:
        return None


def main(test_one_input: Callable[[bytes], None], tokens: Iterable[bytes] = ()) -> None:
    """Hand *test_one_input* to atheris with this process's libFuzzer flags.

    *tokens* become a libFuzzer dictionary (words the mutator splices in, such
    as the keys of a configuration file), written next to the artifacts.
    """
    argv = list(sys.argv)
    words = list(tokens)
    if words and not any(arg.startswith("-dict=") for arg in argv):
        argv.append("-dict=" + _write_dict(words, _artifact_dir(argv)))
    if os.environ.get(KEEP_GOING):
        test_one_input = _keep_going(test_one_input, _artifact_dir(argv))
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


def _keep_going(test: Callable[[bytes], None], directory: str) -> Callable[[bytes], None]:
    """*test*, recording each distinct escape as ``finding-N`` (+ ``.txt``) and going on.

    Distinct: by exception type and the innermost superd frame, so one bug
    reached a thousand ways is written once.
    """
    seen: set[tuple[str, str]] = set()

    def recording(data: bytes) -> None:
        try:
            test(data)
        except Exception as e:  # every escape is what we look for
            frames = traceback.extract_tb(e.__traceback__)
            ours = [f for f in frames if f"{os.sep}superd{os.sep}" in f.filename] or frames
            key = (type(e).__name__, f"{ours[-1].filename}:{ours[-1].lineno}")
            if key in seen:
                return
            seen.add(key)
            path = os.path.join(directory, f"finding-{len(seen)}")
            with open(path, "wb") as f:
                f.write(data)
            with open(path + ".txt", "w") as f:
                f.write("".join(traceback.format_exception(e)))

    return recording


def scratch_dir() -> str:
    """The directory for the files a target writes, one every user may search.

    (superd's check refuses a program its service's user could not reach.)
    ``python -m fuzz`` makes it and removes it afterwards; a target run by
    hand leaves a new one under the system temporary directory.
    """
    path = os.environ.get(SCRATCH) or tempfile.mkdtemp(prefix="superd-fuzz-")
    os.chmod(path, 0o755)
    return path


def _artifact_dir(argv: list[str]) -> str:
    for arg in argv:
        if arg.startswith("-artifact_prefix="):
            directory = os.path.dirname(arg.split("=", 1)[1])
            if directory:
                return directory
    return tempfile.mkdtemp(prefix="superd-fuzz-")


def _write_dict(words: list[bytes], directory: str) -> str:
    path = os.path.join(directory, "tokens.dict")
    with open(path, "w", encoding="ascii") as f:
        for word in words:
            escaped = "".join(
                chr(b) if 32 <= b < 127 and b not in b'"\\' else f"\\x{b:02x}" for b in word
            )
            f.write(f'"{escaped}"\n')
    return path
