"""Fuzz target: PROXY protocol v1 headers (superd.proxy), in modes v1 and any.

Seeds: fuzz/corpus/proxy_v1/.  The properties are in :mod:`fuzz.proxy_checks`.
"""

from __future__ import annotations

import atheris

from fuzz.target import main

with atheris.instrument_imports(include=["superd"]):
    from fuzz.proxy_checks import check

TOKENS = (b"PROXY ", b"TCP4 ", b"TCP6 ", b"UNKNOWN", b"\r\n", b"255.255.255.255",
          b"::ffff:", b"65535", b"65536", b"00", b"%eth0", b"::", b"  ")


def test_one_input(data: bytes) -> None:
    for accept in ("v1", "any"):
        check(data, accept)


if __name__ == "__main__":
    main(test_one_input, TOKENS)
