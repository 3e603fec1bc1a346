"""Fuzz target: PROXY protocol v2 headers (superd.proxy), in modes v2 and any.

Seeds: fuzz/corpus/proxy_v2/.  The properties are in :mod:`fuzz.proxy_checks`.
"""

from __future__ import annotations

import atheris

from fuzz.target import main

with atheris.instrument_imports(include=["superd"]):
    from fuzz.proxy_checks import check
    from superd.proxy import V2_SIGNATURE

TOKENS = (V2_SIGNATURE, b"\x20\x00", b"\x21\x00", b"\x21\x11", b"\x21\x12", b"\x21\x21",
          b"\x21\x22", b"\x21\x31", b"\x21\x32", b"\x00\x0c", b"\x00\x24", b"\x00\xd8",
          b"\x10\x00", b"\x10\x01", b"\x01\x00\x02h2", b"\x04\x00\x00")


def test_one_input(data: bytes) -> None:
    for accept in ("v2", "any"):
        check(data, accept)


if __name__ == "__main__":
    main(test_one_input, TOKENS)
