"""``superd check``: good files, located errors in broken files, root's file checks.

Every broken file is run through the real ``superd check -c FILE`` command;
the expected ``FILE:LINE:COL`` is computed from the text the test wrote, by
finding the offending token in it.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, free_port, needs_root, run_superd, tcp_exchange

from superd import config as configmod
from superd import fields, yamlfile
from superd.errors import ConfigError

TRACEBACK = "Traceback"
# The user the test files name for exec services that are not about identity:
# as root superd requires user: (nobody is what such services used to get
# implicitly); otherwise superd's own user, which needs no switch.
DEFAULT_USER = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
ROOT_ONLY = pytest.mark.skipif(
    os.geteuid() != 0, reason="the file-ownership checks apply only when superd runs as root")
NOTE_SUFFIX = "parsed but not yet enforced by this version"


# --- helpers ------------------------------------------------------------------


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    """Write *text* (dedented) to *path*, root-safe permissions by default."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    os.chmod(path, mode)
    return path


def locate(text: str, needle: str, nth: int = 1, offset: int = 0) -> tuple[int, int]:
    """1-based (line, column) of the *nth* *needle* in *text*, plus *offset* chars."""
    index = -1
    for _ in range(nth):
        index = text.index(needle, index + 1)
    index += offset
    line = text.count("\n", 0, index) + 1
    col = index - text.rfind("\n", 0, index)
    return line, col


def check(path: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return run_superd("check", "-c", str(path), timeout=timeout)


def problems(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The ``FILE:LINE:COL: message`` lines of a refused check (all asserted)."""
    out = result.stdout + result.stderr
    assert TRACEBACK not in out, out
    assert result.returncode == 1, out
    assert "OK" not in result.stdout, out
    lines = result.stderr.splitlines()
    assert lines, out
    summary = lines[-1]
    m = re.fullmatch(r"superd: (\d+) problem\(s\) in the configuration", summary)
    assert m, out
    found = lines[:-1]
    assert len(found) == int(m.group(1)), out
    for line in found:
        assert re.match(r"^/.+:\d+:\d+: \S", line), f"not FILE:LINE:COL: message: {line!r}"
    return found


def assert_one(result: subprocess.CompletedProcess[str], file: Path,
               where: tuple[int, int], fragment: str) -> str:
    """Exactly one problem, at *file*:*where*, whose message holds *fragment*."""
    found = problems(result)
    line, col = where
    prefix = f"{file}:{line}:{col}: "
    assert len(found) == 1, "\n".join(found)
    assert found[0].startswith(prefix), f"expected {prefix!r}..., got {found[0]!r}"
    assert fragment in found[0][len(prefix):], found[0]
    return found[0]


def table(stdout: str) -> dict[str, list[str]]:
    """The service table of ``superd check``: name -> [listen, proto, wait, user, program]."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["SERVICE"])
    assert re.split(r"\s{2,}", lines[start].strip()) == [
        "SERVICE", "LISTEN", "PROTO", "WAIT", "USER", "PROGRAM"]
    rows: dict[str, list[str]] = {}
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[0]] = cells[1:]
    return rows


def script(path: Path, mode: int = 0o755) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\necho hi\n")
    os.chmod(path, mode)
    return path


# --- good files ---------------------------------------------------------------


GOOD = """\
    include: conf.d/*.yaml
    control: @TMP@/control.sock
    stop_timeout: 3
    max_connections: 99
    defaults:
      max_connections: 8
      per_source: 2
      umask: "027"
      user: @USER@
    services:
      echo:
        internal: echo
      daytime:
        protocol: udp
        internal: daytime
      ssh-alt:
        listen: 127.0.0.1:ssh
        exec: [/bin/cat]
      hello:
        listen: [127.0.0.1:2323, "[::1]:2323"]
        exec: "./bin/hello.sh 'a b' c"
        max_connections: 3
      tftp:
        protocol: udp
        listen: 127.0.0.1:6969
        exec: [bin/hello.sh, -s]
        user: root
      local:
        listen: @TMP@/local.sock
        mode: "0660"
        exec: /bin/cat
      guarded:
        listen: 127.0.0.1:2424
        exec: [/bin/cat]
        allow: [127.0.0.0/8]
        rate: 5
        proxy_protocol: v1
        proxy_from: [10.0.0.0/8]
      old:
        listen: 127.0.0.1:2323
        exec: [/bin/cat]
        enabled: false
    """

DROPIN = """\
    services:
      dropin:
        listen: 127.0.0.1:2525
        internal: discard
    """


def good_config(tmp_path: Path) -> Path:
    script(tmp_path / "bin" / "hello.sh")
    write(tmp_path / "conf.d" / "10-dropin.yaml", DROPIN)
    (tmp_path / "conf.d" / "README").write_text("not yaml, not included\n")
    text = GOOD.replace("@TMP@", str(tmp_path)).replace("@USER@", DEFAULT_USER)
    return write(tmp_path / "superd.yaml", text)


@needs_root("the file listens on ports below 1024 and runs tftp as user: root, "
            "which only root may (not as root, check refuses both)")
def test_good_file_lists_every_service(tmp_path: Path) -> None:
    path = good_config(tmp_path)
    result = check(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    assert TRACEBACK not in result.stdout
    lines = result.stdout.splitlines()
    assert lines[0] == f"configuration {path}: OK"
    assert f"  includes {tmp_path}/conf.d/10-dropin.yaml" in lines
    assert not any("README" in line for line in lines)
    assert (f"  control {tmp_path}/control.sock; max_connections 99; "
            "stop_timeout 3s") in lines
    hello = f"{tmp_path}/bin/hello.sh"
    tftp_user = "root"
    rows = table(result.stdout)
    assert rows == {
        "echo": ["*:7", "tcp", "no", "-", "internal echo"],
        "daytime": ["*:13", "udp", "no", "-", "internal daytime"],
        "ssh-alt": ["127.0.0.1:22", "tcp", "no", DEFAULT_USER, "/bin/cat"],
        "hello": ["127.0.0.1:2323,[::1]:2323", "tcp", "no", DEFAULT_USER,
                  f"{hello} 'a b' c"],
        "tftp": ["127.0.0.1:6969", "udp", "yes", tftp_user, f"{hello} -s"],
        "local": [f"{tmp_path}/local.sock", "unix/stream", "no", DEFAULT_USER,
                  "/bin/cat"],
        "guarded": ["127.0.0.1:2424", "tcp", "no", DEFAULT_USER, "/bin/cat"],
        "old": ["(disabled)", "tcp", "no", DEFAULT_USER, "/bin/cat"],
        "dropin": ["127.0.0.1:2525", "tcp", "no", "-", "internal discard"],
    }


@needs_root("the good file listens on ports below 1024 and runs tftp as user: root, "
            "which only root may")
def test_keys_not_yet_enforced_get_a_note(tmp_path: Path) -> None:
    """The note names exactly the keys this version parses but does not act on."""
    result = check(good_config(tmp_path))
    assert result.returncode == 0, result.stderr
    notes = [line for line in result.stdout.splitlines() if NOTE_SUFFIX in line]
    written = ("allow", "rate", "proxy_protocol", "proxy_from")
    pending = sorted(k for k in written if k in fields.NOT_ENFORCED)
    if pending:
        assert notes == [f"note: guarded: {', '.join(pending)} {NOTE_SUFFIX}"]
    else:
        assert notes == []
    # allow and rate are enforced (superd.limits): no note may claim otherwise
    for line in notes:
        assert "allow" not in line and "rate" not in line, line


def test_empty_services_is_valid(tmp_path: Path) -> None:
    path = write(tmp_path / "superd.yaml", "services: {}\n")
    result = check(path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"configuration {path}: OK"
    assert table(result.stdout) == {}


def test_include_glob_matching_nothing_is_valid(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    path = write(tmp_path / "superd.yaml", """\
        include: [conf.d/*.yaml]
        services:
          echo:
            listen: 127.0.0.1:7007
            internal: echo
        """)
    result = check(path)
    assert result.returncode == 0, result.stderr
    assert "includes" not in result.stdout
    assert list(table(result.stdout)) == ["echo"]


@needs_root("the good file listens on ports below 1024 and runs tftp as user: root, "
            "which only root may")
def test_defaults_merge_and_services_override(tmp_path: Path) -> None:
    cfg = configmod.load(str(good_config(tmp_path)))
    hello, echo, dropin = cfg.service("hello"), cfg.service("echo"), cfg.service("dropin")
    assert hello is not None and echo is not None and dropin is not None
    assert hello.max_connections == 3            # the service's own value wins
    assert echo.max_connections == 8             # from defaults:
    assert dropin.max_connections == 8           # defaults reach drop-in files too
    assert {s.per_source for s in cfg.services} == {2}
    assert {s.umask for s in cfg.services} == {0o027}
    assert cfg.files == (str(tmp_path / "superd.yaml"),
                         str(tmp_path / "conf.d" / "10-dropin.yaml"))


@needs_root("the good file listens on ports below 1024 and runs tftp as user: root, "
            "which only root may")
def test_exec_string_is_split_like_a_shell_and_relative_to_the_file(tmp_path: Path) -> None:
    cfg = configmod.load(str(good_config(tmp_path)))
    hello, tftp = cfg.service("hello"), cfg.service("tftp")
    assert hello is not None and tftp is not None
    program = str(tmp_path / "bin" / "hello.sh")
    assert hello.exec == (program, "a b", "c")
    assert tftp.exec == (program, "-s")
    assert tftp.wait is True                     # udp exec services wait by default


@needs_root("the good file listens on ports below 1024 and runs tftp as user: root, "
            "which only root may")
def test_port_from_etc_services(tmp_path: Path) -> None:
    cfg = configmod.load(str(good_config(tmp_path)))
    by_name = {s.name: [str(a) for a in s.listen] for s in cfg.services}
    assert by_name["echo"] == ["*:7"]
    assert by_name["daytime"] == ["*:13"]
    assert by_name["ssh-alt"] == ["127.0.0.1:22"]


def test_yaml_merge_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "superd.yaml", f"""\
        services:
          first: &base
            listen: 127.0.0.1:3000
            exec: [/bin/cat, -u]
            user: {DEFAULT_USER}
            max_connections: 4
            env: {{LANG: C.UTF-8}}
          second:
            <<: *base
            listen: 127.0.0.1:3001
        """)
    result = check(path)
    assert result.returncode == 0, result.stderr
    rows = table(result.stdout)
    assert rows["second"] == ["127.0.0.1:3001", "tcp", "no", DEFAULT_USER, "/bin/cat -u"]
    second = configmod.load(str(path)).service("second")
    assert second is not None
    assert second.max_connections == 4
    assert second.env == (("LANG", "C.UTF-8"),)


def test_file_of_exactly_4_mib_is_accepted(tmp_path: Path) -> None:
    head = b"services: {}\n#"
    path = tmp_path / "superd.yaml"
    path.write_bytes(head + b"x" * (4 * 1024 * 1024 - len(head)))
    os.chmod(path, 0o644)
    assert path.stat().st_size == 4 * 1024 * 1024
    result = check(path)
    assert result.returncode == 0, result.stderr


def test_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "superd.yaml"
    path.write_bytes(b"\xef\xbb\xbfservices:\n  echo:\n    listen: 7007\n    internal: echo\n")
    os.chmod(path, 0o644)
    result = check(path)
    assert result.returncode == 0, result.stderr
    assert list(table(result.stdout)) == ["echo"]


# --- broken files: one problem each, located -------------------------------------

# (id, file text, the token the error points at, which occurrence, chars past its
# start, a fragment of the message).  @TMP@ is the test's directory.
BROKEN = [
    ("yaml-syntax", """\
        services:
          cat:
            exec: /bin/cat: -u
        """, "/bin/cat: -u", 1, len("/bin/cat"), "YAML: mapping values are not allowed"),
    ("yaml-tab-indent", "services:\n\tcat:\n    exec: [/bin/cat]\n",
     "\tcat", 1, 0, "YAML: found character that cannot start any token"),
    ("yaml-control-character", "services:\n  cat:\n    env: {X: \"a\x01\"}\n"
     "    exec: [/bin/cat]\n", "\x01", 1, 0, "control characters are not allowed"),
    ("not-a-mapping", "- echo\n- daytime\n", "- echo", 1, 0,
     "the file must be a mapping with a services: key"),
    ("only-a-comment", "# nothing here yet\n", "#", 1, 0, "file is empty"),
    ("unknown-tag", """\
        services:
          cat:
            listen: 2000
            exec: !!python/object/apply:os.system ["true"]
        """, "!!python", 1, 0,
     "unknown tag tag:yaml.org,2002:python/object/apply:os.system"),
    ("unknown-key-did-you-mean", """\
        services:
          cat:
            listen: 2000
            exec: [/bin/cat]
            alow: [127.0.0.1]
        """, "alow", 1, 0, "unknown key 'alow' (did you mean 'allow'?)"),
    ("unknown-top-key", """\
        servcies:
          cat:
            listen: 2000
            exec: [/bin/cat]
        """, "servcies", 1, 0, "unknown key 'servcies' (did you mean 'services'?)"),
    ("duplicate-key", """\
        services:
          cat:
            listen: 2000
            exec: [/bin/cat]
            user: @USER@
            listen: 2001
        """, "listen", 2, 0, "duplicate key 'listen' (first at line 3)"),
    ("umask-unquoted", """\
        services:
          cat:
            listen: 2000
            exec: [/bin/cat]
            umask: 022
        """, "022", 1, 0, 'quoted octal string such as "022"'),
    ("mode-unquoted", """\
        services:
          cat:
            listen: @TMP@/cat.sock
            exec: [/bin/cat]
            mode: 0660
        """, "0660", 1, 0, 'quoted octal string such as "0660"'),
    ("port-out-of-range", """\
        services:
          cat:
            listen: [127.0.0.1:2000, 127.0.0.1:70000]
            exec: [/bin/cat]
        """, "127.0.0.1:70000", 1, 0, "port 70000 is out of range 1..65535"),
    ("host-name-not-ip", """\
        services:
          cat:
            listen: localhost:80
            exec: [/bin/cat]
        """, "localhost", 1, 0, "'localhost' is not an IP address"),
    ("ipv6-without-brackets", """\
        services:
          cat:
            listen: "::1:80"
            exec: [/bin/cat]
        """, '"::1:80"', 1, 0, "write an IPv6 address as [ADDR]:PORT"),
    ("unknown-port-name", """\
        services:
          cat:
            listen: 127.0.0.1:no-such-port
            exec: [/bin/cat]
        """, "127.0.0.1:no-such", 1, 0, "'no-such-port' is not a port number"),
    ("no-listen-and-name-not-in-etc-services", """\
        services:
          my-cat:
            exec: [/bin/cat]
        """, "my-cat", 1, 0, "no listen: given and 'my-cat' is not a tcp service"),
    ("neither-exec-nor-internal", """\
        services:
          cat:
            listen: 2000
        """, "cat", 1, 0, "needs exactly one of exec: or internal:"),
    ("both-exec-and-internal", """\
        services:
          cat:
            listen: 2000
            exec: [/bin/cat]
            internal: echo
        """, "cat", 1, 0, "needs exactly one of exec: or internal:"),
    ("unknown-internal", """\
        services:
          cat:
            listen: 2000
            internal: ekho
        """, "ekho", 1, 0, "internal: 'ekho' is not one of echo, discard"),
    ("exec-does-not-exist", """\
        services:
          cat:
            listen: 2000
            exec: [/nonexistent/superd-test-prog, -x]
        """, "[/nonexistent", 1, 0, "exec: /nonexistent/superd-test-prog does not exist"),
    ("exec-relative-does-not-exist", """\
        services:
          cat:
            listen: 2000
            exec: bin/missing.sh
        """, "bin/missing.sh", 1, 0, "exec: @TMP@/bin/missing.sh does not exist"),
    ("exec-not-in-path", """\
        services:
          cat:
            listen: 2000
            exec: superd-no-such-program
        """, "superd-no-such-program", 1, 0,
     "exec: 'superd-no-such-program' is not found in"),
    ("udp-exec-without-wait", """\
        services:
          tftp:
            protocol: udp
            listen: 127.0.0.1:6969
            wait: false
            exec: [/bin/cat]
        """, "tftp", 1, 0, "udp services run with wait: true"),
    ("same-address-twice", """\
        services:
          a:
            listen: 127.0.0.1:2000
            exec: [/bin/cat]
            user: @USER@
          b:
            listen: 127.0.0.1:2000
            exec: [/bin/cat]
            user: @USER@
        """, "b:", 1, 0, "service 'b' listens on 127.0.0.1:2000/tcp, which overlaps service 'a'"),
    ("wildcard-then-specific", """\
        services:
          a:
            listen: 2000
            exec: [/bin/cat]
            user: @USER@
          b:
            listen: "[::1]:2000"
            exec: [/bin/cat]
            user: @USER@
        """, "b:", 1, 0, "service 'b' listens on [::1]:2000/tcp, which overlaps service 'a'"),
    ("specific-then-wildcard", """\
        services:
          a:
            listen: 127.0.0.1:2000
            exec: [/bin/cat]
            user: @USER@
          b:
            listen: 2000
            exec: [/bin/cat]
            user: @USER@
        """, "b:", 1, 0, "service 'b' listens on *:2000/tcp, which overlaps service 'a'"),
    ("same-unix-path", """\
        services:
          a:
            listen: @TMP@/s.sock
            exec: [/bin/cat]
            user: @USER@
          b:
            listen: @TMP@/./s.sock
            exec: [/bin/cat]
            user: @USER@
        """, "b:", 1, 0, "service 'b' listens on @TMP@/s.sock/tcp, which overlaps service 'a'"),
    # bind(0.0.0.0:P) and bind(127.0.0.1:P) collide (EADDRINUSE) just like *:P does
    ("ipv4-any-address-then-specific", """\
        services:
          a:
            listen: 0.0.0.0:2000
            exec: [/bin/cat]
            user: @USER@
          b:
            listen: 127.0.0.1:2000
            exec: [/bin/cat]
            user: @USER@
        """, "b:", 1, 0, "overlaps service 'a'"),
    # one service binding the same port twice fails at run time too
    ("one-service-overlaps-itself", """\
        services:
          a:
            listen: [2000, 127.0.0.1:2000]
            exec: [/bin/cat]
            user: @USER@
        """, "a:", 1, 0, "2000"),
    ("unknown-user", """\
        services:
          cat:
            listen: 2000
            exec: [/bin/cat]
            user: superd-no-such-user
        """, "superd-no-such-user", 1, 0, "user: no user 'superd-no-such-user'"),
    ("unknown-group", """\
        services:
          cat:
            listen: 2000
            exec: [/bin/cat]
            user: @USER@
            group: superd-no-such-group
        """, "superd-no-such-group", 1, 0, "group: no group 'superd-no-such-group'"),
    ("bad-rlimit-value", """\
        services:
          cat:
            listen: 2000
            exec: [/bin/cat]
            rlimits: {nofile: lots, as: 512M}
        """, "lots", 1, 0, "rlimits.nofile: 'lots' is not a number or unlimited"),
    ("unknown-rlimit", """\
        services:
          cat:
            listen: 2000
            exec: [/bin/cat]
            rlimits: {nofiles: 10}
        """, "nofiles", 1, 0, "unknown key 'nofiles' (did you mean 'nofile'?)"),
    ("proxy-protocol-without-proxy-from", """\
        services:
          cat:
            listen: 2000
            exec: [/bin/cat]
            proxy_protocol: v2
        """, "proxy_protocol", 1, 0, "proxy_protocol: needs proxy_from:"),
    ("mode-on-tcp-address", """\
        services:
          cat:
            listen: 127.0.0.1:2000
            exec: [/bin/cat]
            mode: "0660"
        """, "mode", 1, 0, "mode: applies only to UNIX socket paths"),
    ("include-directory-missing", """\
        include: nodir/*.yaml
        services: {}
        """, "nodir", 1, 0, "include: directory @TMP@/nodir does not exist"),
    ("exec-in-defaults", """\
        defaults:
          exec: [/bin/cat]
        services: {}
        """, "exec", 1, 0, "'exec' belongs to a service, not to defaults:"),
    # non-ASCII digits: str.isdigit() is true for them but int() refuses them
    ("port-superscript-digit", """\
        services:
          cat:
            listen: "127.0.0.1:\u00b2"
            exec: [/bin/cat]
        """, '"127.0.0.1', 1, 0, "listen:"),
    ("user-superscript-digit", """\
        services:
          cat:
            listen: 2000
            exec: [/bin/cat]
            user: "\u00b2"
        """, '"\u00b2"', 1, 0, "user:"),
    # a NUL written as the escape \\0 in a double-quoted string
    ("port-name-with-nul", """\
        services:
          cat:
            listen: "127.0.0.1:a\\0b"
            exec: [/bin/cat]
        """, '"127.0.0.1', 1, 0, "listen:"),
    ("user-with-nul", """\
        services:
          cat:
            listen: 2000
            exec: [/bin/cat]
            user: "a\\0b"
        """, '"a\\0b"', 1, 0, "user:"),
]


@pytest.mark.parametrize(("text", "needle", "nth", "offset", "fragment"),
                         [case[1:] for case in BROKEN], ids=[case[0] for case in BROKEN])
def test_broken_file_is_refused_at_the_right_place(
    tmp_path: Path, text: str, needle: str, nth: int, offset: int, fragment: str
) -> None:
    text = textwrap.dedent(text).replace("@TMP@", str(tmp_path))
    text = text.replace("@USER@", DEFAULT_USER)
    path = tmp_path / "superd.yaml"
    path.write_text(text)
    os.chmod(path, 0o644)
    where = locate(text, needle, nth, offset)
    assert_one(check(path), path, where, fragment.replace("@TMP@", str(tmp_path)))


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path / "superd.yaml", "")
    assert_one(check(path), path, (1, 1), "file is empty")


def test_non_utf8_byte_is_located(tmp_path: Path) -> None:
    data = b"services:\n  cat:\n    listen: 2000\n    exec: [/bin/caf\xe9]\n"
    path = tmp_path / "superd.yaml"
    path.write_bytes(data)
    os.chmod(path, 0o644)
    bad = data.index(b"\xe9")
    line = data.count(b"\n", 0, bad) + 1
    col = bad - data.rfind(b"\n", 0, bad)
    assert (line, col) == (4, 20)
    assert_one(check(path), path, (line, col), "file is not valid UTF-8")


def test_file_over_4_mib(tmp_path: Path) -> None:
    path = tmp_path / "superd.yaml"
    path.write_bytes(b"services: {}\n#" + b"x" * (4 * 1024 * 1024))
    os.chmod(path, 0o644)
    assert_one(check(path), path, (1, 1), "file is larger than 4 MiB")


def test_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    lines = ["services: {}", 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    text = "# billion laughs\n" + "\n".join(lines) + "\n"
    path = write(tmp_path / "superd.yaml", text)
    # 9**9 strings once expanded: must be refused, not expanded (the timeout
    # is only a generous guard against hanging)
    result = check(path, timeout=20)
    assert_one(result, path, locate(text, "services"), "alias bomb")


def test_exec_not_executable(tmp_path: Path) -> None:
    script(tmp_path / "prog.sh", mode=0o644)
    text = textwrap.dedent(f"""\
        services:
          cat:
            listen: 2000
            exec: {tmp_path}/prog.sh --flag
        """)
    path = write(tmp_path / "superd.yaml", text)
    assert_one(check(path), path, locate(text, f"{tmp_path}/prog.sh"),
               f"exec: {tmp_path}/prog.sh is not executable")


def test_error_in_included_file_names_that_file(tmp_path: Path) -> None:
    main = write(tmp_path / "superd.yaml", """\
        include: conf.d/*.yaml
        services:
          echo:
            listen: 127.0.0.1:7007
            internal: echo
        """)
    text = textwrap.dedent("""\
        services:
          web:
            listen: 127.0.0.1:8080
            exec: [/bin/cat]
            timeout: -5
        """)
    inc = write(tmp_path / "conf.d" / "web.yaml", text)
    line = assert_one(check(main), inc, locate(text, "-5"), "timeout:")
    assert str(main) + ":" not in line


def test_yaml_error_in_included_file_names_that_file(tmp_path: Path) -> None:
    main = write(tmp_path / "superd.yaml", "include: conf.d/*.yaml\nservices: {}\n")
    text = "services:\n  web: [\n"
    inc = write(tmp_path / "conf.d" / "web.yaml", text)
    found = problems(check(main))
    assert len(found) == 1
    assert found[0].startswith(f"{inc}:3:1: YAML: "), found[0]


def test_include_may_hold_only_services(tmp_path: Path) -> None:
    main = write(tmp_path / "superd.yaml", "include: conf.d/*.yaml\nservices: {}\n")
    text = "services: {}\ncontrol: /run/x.sock\n"
    inc = write(tmp_path / "conf.d" / "x.yaml", text)
    assert_one(check(main), inc, locate(text, "control"), "unknown key 'control'")


def test_service_defined_in_main_file_and_include(tmp_path: Path) -> None:
    main_text = textwrap.dedent(f"""\
        include: conf.d/*.yaml
        defaults:
          user: {DEFAULT_USER}
        services:
          web:
            listen: 127.0.0.1:8080
            exec: [/bin/cat]
        """)
    main = write(tmp_path / "superd.yaml", main_text)
    inc_text = textwrap.dedent("""\
        services:
          other:
            listen: 127.0.0.1:8081
            exec: [/bin/cat]
          web:
            listen: 127.0.0.1:8082
            exec: [/bin/cat]
        """)
    inc = write(tmp_path / "conf.d" / "web.yaml", inc_text)
    first_line, first_col = locate(main_text, "web:")
    assert_one(check(main), inc, locate(inc_text, "web:"),
               f"service 'web' is already defined at {main}:{first_line}:{first_col}")


def test_all_errors_of_one_file_are_reported_together(tmp_path: Path) -> None:
    text = textwrap.dedent("""\
        stop_timeout: 0
        services:
          a:
            listen: 127.0.0.1:70000
            exec: [/bin/cat]
          b:
            listen: 2000
            internal: ekho
          c:
            listen: 2001
            exec: [/bin/cat]
            umask: 022
            alow: [10.0.0.0/8]
          d:
            listen: 2002
        """)
    path = write(tmp_path / "superd.yaml", text)
    found = problems(check(path))
    expected = [
        (locate(text, "0\n"), "stop_timeout:"),
        (locate(text, "127.0.0.1:70000"), "port 70000"),
        (locate(text, "ekho"), "internal:"),
        (locate(text, "022"), "quoted octal"),
        (locate(text, "alow"), "did you mean 'allow'"),
        (locate(text, "d:"), "needs exactly one of exec: or internal:"),
    ]
    assert len(found) == len(expected), "\n".join(found)
    for (line, col), fragment in expected:
        prefix = f"{path}:{line}:{col}: "
        assert any(p.startswith(prefix) and fragment in p for p in found), (
            f"{prefix}...{fragment} not in:\n" + "\n".join(found))


def test_errors_across_main_file_and_include_are_reported_together(tmp_path: Path) -> None:
    main_text = "include: conf.d/*.yaml\nservices:\n  a:\n    listen: 2000\n"
    main = write(tmp_path / "superd.yaml", main_text)
    inc_text = "services:\n  b:\n    listen: 2001\n    exec: [/bin/cat]\n    nice: 40\n"
    inc = write(tmp_path / "conf.d" / "b.yaml", inc_text)
    found = problems(check(main))
    assert len(found) == 2, "\n".join(found)
    line, col = locate(main_text, "a:")
    assert any(p.startswith(f"{main}:{line}:{col}: ") for p in found), found
    line, col = locate(inc_text, "40")
    assert any(p.startswith(f"{inc}:{line}:{col}: nice:") for p in found), found


# --- running as root: who may change the files -------------------------------------


def simple(tmp_path: Path, name: str = "superd.yaml", mode: int = 0o644) -> Path:
    return write(tmp_path / name, "services:\n  echo:\n    internal: echo\n", mode)


@ROOT_ONLY
def test_root_accepts_root_owned_private_file(tmp_path: Path) -> None:
    for mode in (0o600, 0o640, 0o644):
        path = simple(tmp_path, mode=mode)
        result = check(path)
        assert result.returncode == 0, f"{mode:o}: {result.stderr}"


@ROOT_ONLY
def test_root_refuses_file_owned_by_another_user(tmp_path: Path) -> None:
    path = simple(tmp_path)
    nobody = pwd.getpwnam("nobody").pw_uid
    os.chown(path, nobody, 0)
    assert_one(check(path), path, (1, 1),
               f"refused: superd runs as root and this file is owned by uid {nobody}")


@ROOT_ONLY
@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666, 0o620])
def test_root_refuses_file_writable_by_group_or_others(tmp_path: Path, mode: int) -> None:
    path = simple(tmp_path, mode=mode)
    assert_one(check(path), path, (1, 1),
               f"writable by its group or others (mode {mode:04o})")


@ROOT_ONLY
@pytest.mark.parametrize("how", ["owner", "mode"])
def test_root_refuses_included_file_likewise(tmp_path: Path, how: str) -> None:
    main = write(tmp_path / "superd.yaml", "include: conf.d/*.yaml\nservices: {}\n")
    inc = write(tmp_path / "conf.d" / "web.yaml",
                "services:\n  web:\n    listen: 2000\n    exec: [/bin/cat]\n",
                0o646 if how == "mode" else 0o644)
    if how == "owner":
        os.chown(inc, pwd.getpwnam("nobody").pw_uid, 0)
    # refused at the include: line that brought it in; its text is never parsed
    line = assert_one(check(main), main, (1, 10), f"refused: superd runs as root and {inc} ")
    assert ("owned by uid" if how == "owner" else "mode 0646") in line


@ROOT_ONLY
@pytest.mark.parametrize("mode", [0o757, 0o777])
def test_root_refuses_world_writable_program(tmp_path: Path, mode: int) -> None:
    prog = script(tmp_path / "prog.sh", mode=mode)
    text = f"services:\n  web:\n    listen: 2000\n    exec: [{prog}, -v]\n    user: nobody\n"
    path = write(tmp_path / "superd.yaml", text)
    assert_one(check(path), path, locate(text, "["),
               f"exec: refused: the program runs as nobody and {prog} is writable by its "
               f"group or others (mode {mode:04o})")


# --- files that cannot hurt: nesting depth, numbers out of range ---------------

DEEP = 200_000  # levels: 400 KB of "- ", the file that killed the daemon


def deep_list(levels: int) -> str:
    return "- " * levels + "x\n"


def nested_mappings(levels: int) -> str:
    return "".join(" " * i + "a:\n" for i in range(levels)) + " " * levels + "b\n"


def without_libyaml_limit(tmp_path: Path) -> dict[str, str] | None:
    """An environment whose PyYAML uses a libyaml with no nesting limit.

    The wheel's bundled libyaml stops at 1,000 levels, which hid the crash:
    PyYAML built on a distribution's libyaml 0.2.5 (Debian's python3-yaml)
    composes recursively in C until the stack overflows.  That PyYAML, found
    on this host, is put first on PYTHONPATH; None if there is none.
    """
    for site in ("/usr/lib/python3/dist-packages",
                 f"/usr/lib64/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"):
        if not glob.glob(f"{site}/yaml/_yaml.{sys.implementation.cache_tag}-*.so"):
            continue
        shim = tmp_path / "libyaml-0.2.5"
        shim.mkdir(exist_ok=True)
        for name in ("yaml", "_yaml"):
            if os.path.exists(f"{site}/{name}") and not (shim / name).exists():
                (shim / name).symlink_to(f"{site}/{name}")
        env = {**os.environ, "PYTHONPATH": f"{shim}{os.pathsep}{ROOT}"}
        probe = subprocess.run(
            [sys.executable, "-c", "import yaml; assert yaml.__with_libyaml__; "
             "t = '[' * 1100 + ']' * 1100; "
             "print(sum(1 for _ in yaml.parse(t, Loader=yaml.CSafeLoader)))"],
            env=env, capture_output=True, text=True, timeout=30)
        if probe.returncode == 0 and probe.stdout.strip() == "2204":
            return env
    return None


YAML_BUILDS = ["bundled libyaml", "libyaml without a nesting limit"]


def yaml_env(tmp_path: Path, build: str) -> dict[str, str] | None:
    if build == YAML_BUILDS[0]:
        return None
    env = without_libyaml_limit(tmp_path)
    if env is None:
        pytest.skip("no PyYAML on a libyaml without a nesting limit on this host")
    return env


@pytest.mark.parametrize("build", YAML_BUILDS)
def test_file_nested_200000_levels_is_refused_by_check(tmp_path: Path, build: str) -> None:
    env = yaml_env(tmp_path, build)
    path = write(tmp_path / "superd.yaml", deep_list(DEEP))
    result = subprocess.run([sys.executable, "-m", "superd", "check", "-c", str(path)],
                            capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])  # -11: SIGSEGV
    # the 65th "- " starts at column 129: refused before anything is built
    assert_one(result, path, (1, 129), "nested too deep (more than 64 levels)")


@pytest.mark.parametrize("build", YAML_BUILDS)
def test_daemon_keeps_serving_after_sighup_with_a_200000_level_file(
        superd, tmp_path: Path, build: str) -> None:
    env = yaml_env(tmp_path, build)
    port = free_port()
    good = f"services:\n  echo:\n    listen: 127.0.0.1:{port}\n    internal: echo\n"
    d = superd(good, env=env)
    assert tcp_exchange(port, b"before") == b"before"
    d.config_path.write_text(deep_list(DEEP))
    d.reload(expect="reload refused")
    assert f"{d.config_path}:1:129: nested too deep (more than 64 levels)" in d.log()
    assert d.proc.poll() is None, d.log()
    assert tcp_exchange(port, b"after") == b"after"
    d.reload(good)  # and a good file is taken again
    assert tcp_exchange(port, b"again") == b"again"


@pytest.mark.parametrize("text", [
    "services: " + "[" * DEEP + "]" * DEEP + "\n",
    "services: " + "{a: " * DEEP + "b" + "}" * DEEP + "\n",
], ids=["flow-lists", "flow-mappings"])
def test_deep_flow_collections_are_refused(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "superd.yaml", text)
    found = problems(check(path))
    # the column is where the parser noticed: ours at level 65, or libyaml's
    # own limit while it looks ahead (a wheel's libyaml stops at 1,000)
    assert len(found) == 1 and found[0].startswith(f"{path}:1:"), found
    assert found[0].endswith(": nested too deep (more than 64 levels)"), found


def test_nesting_is_counted_across_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "superd.yaml", nested_mappings(100))
    # the 65th mapping starts on line 65, after 64 spaces
    assert_one(check(path), path, (65, 65), "nested too deep (more than 64 levels)")


@pytest.mark.parametrize("loader", ["C", "pure Python"])
def test_depth_limit_in_both_loaders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     loader: str) -> None:
    if loader == "pure Python":  # PyYAML without libyaml: its composer recursed
        monkeypatch.setattr(yamlfile, "_Loader", yaml.SafeLoader)
    elif not getattr(yaml, "__with_libyaml__", False):
        pytest.skip("PyYAML is built without libyaml")
    path = str(tmp_path / "x.yaml")
    assert yamlfile.load_nodes(path, nested_mappings(63).encode()) is not None  # 64 levels
    with pytest.raises(ConfigError) as e:
        yamlfile.load_nodes(path, deep_list(DEEP).encode())
    assert [str(p) for p in e.value.problems] == [
        f"{path}:1:129: nested too deep (more than 64 levels)"]


@pytest.mark.parametrize("error", [RecursionError, MemoryError])
def test_load_turns_exhaustion_into_a_config_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: type[Exception]) -> None:
    # whatever still exhausts the stack or the memory is the file's problem,
    # never the daemon's end (a reload catches ConfigError only)
    def exhausted(root: yaml.Node, path: str) -> list[object]:
        raise error()

    monkeypatch.setattr(yamlfile, "check_graph", exhausted)
    path = write(tmp_path / "superd.yaml", "services: {}\n")
    with pytest.raises(ConfigError) as e:
        configmod.load(str(path))
    [problem] = e.value.problems
    assert (problem.file, problem.line, problem.col) == (str(path), 1, 1)
    assert "refused" in problem.message


LONG_DIGITS = "1" * 5000  # int() refuses more than 4,300 digits
SEXAGESIMAL = "1" + ":0" * 20_000  # YAML 1.1 base 60: a number of 35,000 digits

# Every integer and duration is range-checked at load, FILE:LINE:COL.
OUT_OF_RANGE = [
    ("rlimit-nofile-huge", "rlimits: {nofile: 999999999999999999999999999}",
     "999999999999999999999999999",
     "rlimits.nofile: 999999999999999999999999999 is out of range 0..@NR_OPEN@ "
     "(the kernel's fs.nr_open)"),
    ("rlimit-nofile-above-nr-open", "rlimits: {nofile: [1024, @NR_OPEN_PLUS@]}",
     "@NR_OPEN_PLUS@", "rlimits.nofile: @NR_OPEN_PLUS@ is out of range 0..@NR_OPEN@"),
    ("rlimit-size-huge", "rlimits: {as: 99999999999T}", "99999999999T",
     f"rlimits.as: {99999999999 * 1024**4} is out of range 0..9223372036854775807"),
    ("rlimit-cpu-64-bits", "rlimits: {cpu: 18446744073709551615}", "18446744073709551615",
     "rlimits.cpu: 18446744073709551615 is out of range 0..9223372036854775807"),
    ("rlimit-size-long-digits", f"rlimits: {{fsize: {LONG_DIGITS}K}}", LONG_DIGITS[:20],
     "rlimits.fsize: '11111111111111111111... (5001 characters)' is not a number"),
    ("timeout-infinite", "timeout: .inf", ".inf", "timeout: inf is not a finite number"),
    ("timeout-overflows-to-inf", "timeout: 1.0e+400", "1.0e+400",
     "timeout: inf is not a finite number"),
    ("kill-grace-nan", "kill_grace: .nan", ".nan", "kill_grace: nan is not a finite number"),
    ("timeout-over-a-year", "timeout: 31536001", "31536001",
     "timeout: 31536001 is out of range: at most 31536000 seconds (365 days)"),
    ("rate-infinite", "rate: .inf", ".inf", "rate: inf is out of range"),
    ("rate-nan", "rate: .nan", ".nan", "rate: nan is out of range"),
    ("rate-tiny", "rate: 1.0e-320", "1.0e-320", "rate: 1e-320 is out of range: at least"),
    ("max-connections-long-digits", f"max_connections: {LONG_DIGITS}", LONG_DIGITS[:20],
     "max_connections: 11111111111111111111... (5000 characters) is out of range"),
    ("nice-base-60", f"nice: {SEXAGESIMAL}", SEXAGESIMAL[:20], "nice: 1:0:0:0:0:0:0:0:0:0"),
    ("umask-long-octal", f"umask: 0{'7' * 5000}", "07777", "umask: 07777777777777777777..."),
]


@pytest.mark.parametrize(("line", "needle", "fragment"), [c[1:] for c in OUT_OF_RANGE],
                         ids=[c[0] for c in OUT_OF_RANGE])
def test_number_out_of_range_is_refused_at_its_place(
        tmp_path: Path, line: str, needle: str, fragment: str) -> None:
    high = str(fields.nr_open())
    subst = {"@NR_OPEN@": high, "@NR_OPEN_PLUS@": str(int(high) + 1)}
    for mark, value in subst.items():
        line, needle, fragment = (s.replace(mark, value) for s in (line, needle, fragment))
    text = ("services:\n  cat:\n    listen: 2000\n    exec: [/bin/cat]\n"
            f"    user: {DEFAULT_USER}\n    {line}\n")
    path = write(tmp_path / "superd.yaml", text)
    assert_one(check(path), path, locate(text, needle), fragment)


@pytest.mark.parametrize(("text", "needle", "fragment"), [
    (f"listen: 127.0.0.1:{LONG_DIGITS}", "127.0.0.1",
     "port 11111111111111111111... (5000 characters) is out of range 1..65535"),
    (f"user: {LONG_DIGITS}", LONG_DIGITS[:20], "user: no user"),
], ids=["port-long-digits", "user-long-digits"])
def test_number_in_a_string_key_is_never_computed(
        tmp_path: Path, text: str, needle: str, fragment: str) -> None:
    body = f"    {text}\n" + ("    listen: 2000\n" if "listen" not in text else "")
    text = f"services:\n  cat:\n{body}    exec: [/bin/cat]\n"
    if "user:" not in body:
        text += f"    user: {DEFAULT_USER}\n"
    path = write(tmp_path / "superd.yaml", text)
    assert_one(check(path), path, locate(text, needle), fragment)


def test_stop_timeout_and_limits_at_their_bounds_are_accepted(tmp_path: Path) -> None:
    text = f"""\
        stop_timeout: 31536000
        services:
          cat:
            listen: 2000
            exec: [/bin/cat]
            user: {DEFAULT_USER}
            rate: 1000000
            timeout: 0.001
            rlimits: {{nofile: {fields.nr_open()}, as: unlimited, cpu: 9223372036854775807}}
        """
    result = check(write(tmp_path / "superd.yaml", text))
    assert result.returncode == 0, result.stderr


# --- review of the privilege boundary: ids at the kernel's edge, NUL ----------


@needs_root("the services name user: nobody and groups, which only root may give")
def test_ids_past_the_kernels_range_and_nul_characters_are_refused(tmp_path: Path) -> None:
    """A gid of 2**32 crashed check with OverflowError; 2**32-1 is the kernel's
    "no change" and passed, then every start failed; a NUL inside a string
    was cut short or raised at the first connection."""
    text = (f"control: {tmp_path}/c.sock\nservices:\n"
            "  a: {exec: [/bin/true], user: nobody, group: '4294967296', listen: 127.0.0.1:1}\n"
            "  b: {exec: [/bin/true], user: nobody, group: '4294967295', listen: 127.0.0.1:2}\n"
            "  c: {exec: [/bin/true], user: nobody, env: {A: \"x\\0y\"}, listen: 127.0.0.1:3}\n"
            "  d: {exec: [/bin/echo, \"x\\0y\"], user: nobody, listen: 127.0.0.1:4}\n"
            "  e: {exec: [/bin/true], user: nobody, cwd: \"/tmp\\0x\", listen: 127.0.0.1:5}\n")
    cfg = write(tmp_path / "superd.yaml", text)
    found = problems(check(cfg))
    assert [line.split(": ", 1)[1] for line in found] == [
        "group: no group '4294967296'",
        "group: no group '4294967295'",
        "env.A: a NUL character is not allowed here",
        "exec: a NUL character is not allowed here",
        "cwd: a NUL character is not allowed here",
    ], found


@pytest.mark.skipif(os.geteuid() != 0, reason="as root only: superd cannot switch users otherwise")
def test_a_program_its_user_cannot_reach_is_refused_at_check(tmp_path: Path) -> None:
    """As root from a checkout in /root (mode 0700), `user: nobody` used to pass
    check and then close every client in silence: exec failed with EACCES."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    prog = script(private / "hello.sh")
    text = (f"control: {tmp_path}/c.sock\nservices:\n"
            f"  hello: {{exec: [{prog}], user: nobody, listen: 127.0.0.1:1}}\n"
            f"  mine: {{exec: [{prog}], user: root, listen: 127.0.0.1:2}}\n")
    cfg = write(tmp_path / "superd.yaml", text)
    assert_one(check(cfg), cfg, locate(text, f"[{prog}]"),
               f"exec: nobody may not search {private} (mode 0700, owner uid 0")


def test_a_key_written_with_no_value_is_not_given(tmp_path: Path) -> None:
    """Found by the fuzz target: `listen:` with no value crashed check with a
    TypeError, and `exec:` with no value loaded a service with no program."""
    text = (f"control: {tmp_path}/c.sock\nservices:\n"
            "  x: {internal: echo, listen: }\n"
            "  y: {internal: }\n"
            "  z: {exec: , user: nobody, listen: 127.0.0.1:1234}\n")
    cfg = write(tmp_path / "superd.yaml", text)
    assert [line.split(": ", 1)[1] for line in problems(check(cfg))] == [
        "no listen: given and 'x' is not a tcp service in /etc/services",
        "service 'y' needs exactly one of exec: or internal:",
        "service 'z' needs exactly one of exec: or internal:",
    ]
