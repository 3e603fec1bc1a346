"""Fuzz target: ``superd convert`` of an xinetd configuration file.

Seeds: fuzz/corpus/convert_xinetd/ (the fixtures of tests/fixtures/convert,
with ``includedir xinetd.d`` relative).  Checks: :mod:`fuzz.convert_checks`.
"""

from __future__ import annotations

import atheris

from fuzz.target import main, scratch_dir

with atheris.instrument_imports(include=["superd"]):
    from fuzz.convert_checks import sandbox

TOKENS = (b"service ", b"defaults", b"{", b"}", b" = ", b" += ", b" -= ", b"include ",
          b"includedir xinetd.d", b"socket_type", b"stream", b"dgram", b"protocol", b"wait",
          b"yes", b"no", b"user", b"group", b"server", b"server_args", b"port", b"type",
          b"INTERNAL", b"UNLISTED", b"RPC", b"TCPMUX", b"interface", b"bind", b"only_from",
          b"no_access", b"instances", b"per_source", b"cps", b"disable", b"disabled",
          b"enabled", b"flags", b"IPv4", b"IPv6", b"KEEPALIVE", b"NODELAY", b"NAMEINARGS",
          b"REUSE", b"env", b"passenv", b"umask", b"nice", b"rlimit_as", b"redirect",
          b"access_times", b"log_type", b"banner", b"UNLIMITED", b"127.0.0.1", b"::1",
          b"0.0.0.0/0", b"\t", b"\n")

if __name__ == "__main__":
    main(sandbox(scratch_dir(), "xinetd.conf"), TOKENS)
