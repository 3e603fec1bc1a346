"""Fuzz target: a control-socket request (``superd.control.parse_request``).

Checked: only ValueError escapes, and what is returned is a dict.
"""

from __future__ import annotations

import atheris

from fuzz.target import expect, main

with atheris.instrument_imports(include=["superd"]):
    from superd.control import parse_request

TOKENS = (b'{"command": ', b'"status"', b'"reload"', b'"stop"', b"{", b"}", b"[", b"]",
          b'"', b"\\u0000", b"\\ud800", b"1e999", b"-0", b"NaN", b"Infinity", b"true",
          b"null", b"\n", b"\xef\xbb\xbf", b"\x00")


def test_one_input(data: bytes) -> None:
    request = expect((ValueError,), parse_request, data)
    assert request is None or isinstance(request, dict), request


if __name__ == "__main__":
    main(test_one_input, TOKENS)
