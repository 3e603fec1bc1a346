"""Fuzz target: ``superd convert`` of an inetd.conf file.

Seeds: fuzz/corpus/convert_inetd/ (Debian's inetd.conf and the hand-written
tricky one from tests/fixtures/convert).  Checks: :mod:`fuzz.convert_checks`.
"""

from __future__ import annotations

import atheris

from fuzz.target import main, scratch_dir

with atheris.instrument_imports(include=["superd"]):
    from fuzz.convert_checks import sandbox

TOKENS = (b"stream", b"dgram", b"raw", b"seqpacket", b"tcp", b"udp", b"tcp6", b"tcp46",
          b"udp6", b"unix", b"rpc/tcp", b"wait", b"nowait", b"nowait.", b"/", b"root",
          b"nobody:nogroup", b"nobody.nogroup", b"internal", b"/usr/sbin/tcpd", b"#<off># ",
          b"127.0.0.1:", b"[::1]:", b"*:", b"\t", b"\n", b",", b"echo", b"chargen", b"tcpmux",
          b"daytime", b"discard", b"time", b"rcvbuf=", b"sndbuf=")

if __name__ == "__main__":
    main(sandbox(scratch_dir(), "inetd.conf"), TOKENS)
