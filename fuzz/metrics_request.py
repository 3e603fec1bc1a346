"""Fuzz target: the metrics HTTP request (``superd.metrics.parse_request``).

Checked: only ValueError escapes, and the path returned is a non-empty str
on one line.
"""

from __future__ import annotations

import atheris

from fuzz.target import expect, main

with atheris.instrument_imports(include=["superd"]):
    from superd.metrics import parse_request

TOKENS = (b"GET ", b"HEAD ", b"POST ", b"/metrics", b" HTTP/1.1\r\n", b" HTTP/1.0\r\n",
          b"\r\n", b"\r\n\r\n", b"Host: ", b"%2F", b"?", b"#", b"\x00", b"\xff")


def test_one_input(data: bytes) -> None:
    path = expect((ValueError,), parse_request, data)
    if path is not None:
        assert isinstance(path, str) and path, path
        assert "\n" not in path and " " not in path, path


if __name__ == "__main__":
    main(test_one_input, TOKENS)
