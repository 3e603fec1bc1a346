"""The man pages say what the code does.

superd.yaml(5) documents exactly the keys the configuration reader knows
(config.TOP_KEYS, config.LOG_KEYS, fields.SERVICE_KEYS), each with the
default the code uses; superd(8) documents exactly the commands and options
of superd.cli._parser(); and groff renders both without a warning.

The key lists are the ``.TP`` entries whose tag is ``.B KEY`` in the
sections TOP-LEVEL KEYS, LOG KEYS and SERVICE KEYS (and COMMANDS in
superd(8)); an entry's default is its sentence ``Default: VALUE.``
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT

from superd import cli, config, fields

MAN = ROOT / "man"
SUPERD_8 = MAN / "superd.8"
SUPERD_YAML_5 = MAN / "superd.yaml.5"
_FONT = re.compile(r"\\f(?:[BIRP]|\[[A-Z]*\])")
_ALTERNATING = {".BR", ".RB", ".IR", ".RI", ".BI", ".IB"}


# --- reading roff -------------------------------------------------------------


def plain(line: str) -> str:
    """The text a man macro line or text line shows, without fonts."""
    if line.startswith((".B ", ".I ")) or line.split(" ", 1)[0] in _ALTERNATING:
        macro, _, rest = line.partition(" ")
        words = shlex.split(rest.replace("\\", "\\\\"))
        line = ("" if macro in _ALTERNATING else " ").join(words)
    elif line.startswith("."):
        return ""
    for roff, text in (("\\-", "-"), ("\\(dq", '"'), ("\\(bu", "*"), ("\\e", "\\"),
                       ("\\c", ""), ("\\&", "")):
        line = line.replace(roff, text)
    return _FONT.sub("", line)


def sections(page: Path) -> dict[str, list[str]]:
    """The source lines of each .SH section, by title."""
    result: dict[str, list[str]] = {}
    current: list[str] = []
    for line in page.read_text().splitlines():
        if line.startswith(".SH "):
            current = result.setdefault(line[4:].strip().strip('"'), [])
        elif not line.startswith('.\\"'):
            current.append(line)
    return result


def entries(page: Path, section: str) -> dict[str, str]:
    """The ``.TP`` / ``.B KEY`` entries of *section*: key to plain body text."""
    lines = sections(page)[section]
    result: dict[str, str] = {}
    body: list[str] | None = None
    for i, line in enumerate(lines):
        if line in (".TP", ".PP") or line.startswith((".SS", ".SH")):
            body = None
        if line == ".TP" and i + 1 < len(lines) and lines[i + 1].startswith(".B "):
            key = plain(lines[i + 1])
            assert key not in result, f"{page.name} {section}: {key} listed twice"
            body = []
            result[key] = ""
        elif body is not None and (body or not lines[i - 1] == ".TP"):
            body.append(plain(line))
            result[list(result)[-1]] = " ".join(t for t in body if t)
    return result


def stated_default(page: Path, section: str, key: str) -> str:
    """The value of the entry's ``Default: VALUE.`` sentence, up to ' (' or ';'."""
    text = entries(page, section)[key]
    m = re.search(r"Default:\s*(.*?)\.(?:\s|$)", text)
    assert m, f"{page.name} {section}: {key} states no default: {text!r}"
    return re.split(r" \(|;", m.group(1))[0].strip()


def differences(documented: set[str], code: set[str], where: str) -> str:
    missing = sorted(code - documented)
    extra = sorted(documented - code)
    return (f"{where}: in the code but not in the man page: {missing}; "
            f"in the man page but not in the code: {extra}")


# --- superd.yaml(5): keys -----------------------------------------------------


@pytest.mark.parametrize(("section", "code"), [
    ("TOP-LEVEL KEYS", config.TOP_KEYS),
    ("LOG KEYS", config.LOG_KEYS),
    ("SERVICE KEYS", fields.SERVICE_KEYS),
])
def test_config_keys_match_the_code(section: str, code: tuple[str, ...]) -> None:
    documented = set(entries(SUPERD_YAML_5, section))
    assert documented == set(code), differences(documented, set(code), section)


def test_the_key_parser_sees_every_entry() -> None:
    """A guard for the test itself: it finds the entries it should."""
    service = entries(SUPERD_YAML_5, "SERVICE KEYS")
    assert list(service)[:3] == ["listen", "protocol", "exec"]
    assert "Default: 64." in service["max_connections"]
    assert entries(SUPERD_YAML_5, "TOP-LEVEL KEYS")["max_connections"].endswith(
        "Default: 1024.")


# --- superd.yaml(5): defaults -------------------------------------------------


# Defaults that depend on other keys or on who runs superd: stated in words.
WORDED_DEFAULTS = frozenset({"listen", "wait", "user", "group"})


def as_stated(value: Any) -> str:
    """A default as the man page writes it."""
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def service_defaults() -> dict[str, str]:
    """Each service key's default in the Service dataclass, as the man page
    should state it.  Keys whose default depends on other keys or on who runs
    superd (listen, wait, user, group) are described in words instead."""
    found = {f.name: f.default for f in dataclasses.fields(config.Service)
             if f.default is not dataclasses.MISSING}
    expected = {key: as_stated(found[key]) for key in fields.SERVICE_KEYS
                if key in found and key not in WORDED_DEFAULTS}
    expected.update({
        "umask": f'"{found["umask"]:03o}"',
        "mode": f'"{found["mode"]:04o}"',
        "source_prefix": "{{v4: {}, v6: {}}}".format(*found["source_prefix"]),
        "rlimits": "inherited from superd",
        "backlog": "SOMAXCONN",  # None: superd passes socket.SOMAXCONN to listen()
        "owner": "superd's own user and group",  # None: the socket stays superd's
    })
    return expected


def test_every_service_key_with_a_fixed_default_is_checked() -> None:
    assert set(service_defaults()) | WORDED_DEFAULTS == set(fields.SERVICE_KEYS)


@pytest.mark.parametrize(("key", "words"), [
    ("listen", "the service's name looked up in /etc/services"),
    ("wait", "false for tcp and internal services, true for udp"),
    ("user", "none: required for exec services when superd runs as root"),
    ("group", "the user's primary group"),
])
def test_worded_defaults(key: str, words: str) -> None:
    assert stated_default(SUPERD_YAML_5, "SERVICE KEYS", key).startswith(words)


@pytest.mark.parametrize("key", sorted(service_defaults()))
def test_service_default_matches_the_code(key: str) -> None:
    assert stated_default(SUPERD_YAML_5, "SERVICE KEYS", key) == service_defaults()[key]


@pytest.mark.parametrize(("key", "code"), [
    ("max_connections", 64), ("per_source", 16), ("kill_grace", 5.0),
    ("proxy_timeout", 5.0), ("umask", 0o022), ("mode", 0o666),
])
def test_the_defaults_sysadmins_ask_about(key: str, code: int | float) -> None:
    """The code's defaults are the documented ones (DESIGN.md's table)."""
    default = next(f.default for f in dataclasses.fields(config.Service) if f.name == key)
    assert default == code
    stated = stated_default(SUPERD_YAML_5, "SERVICE KEYS", key).strip('"')
    assert int(stated, 8 if key in ("umask", "mode") else 10) == code


def test_log_defaults_match_the_code() -> None:
    settings = config.LogSettings()
    for key in config.LOG_KEYS:
        stated = stated_default(SUPERD_YAML_5, "LOG KEYS", key)
        assert stated == as_stated(getattr(settings, key)), key


def test_top_level_defaults_match_the_code(tmp_path: Path) -> None:
    """The defaults of a file that sets nothing, as config.load() gives them."""
    path = tmp_path / "superd.yaml"
    path.write_text("services: {}\n")
    os.chmod(path, 0o644)
    cfg = config.load(str(path))
    expected = {
        "stop_timeout": as_stated(cfg.stop_timeout),
        "max_connections": as_stated(cfg.max_connections),
        "metrics": as_stated(cfg.metrics),
        "include": as_stated(cfg.files[1:]),
        "services": as_stated(cfg.services),
        "defaults": "none",
    }
    assert (expected["stop_timeout"], expected["max_connections"]) == ("10", "1024")
    for key, value in expected.items():
        assert stated_default(SUPERD_YAML_5, "TOP-LEVEL KEYS", key) == value, key


# --- superd(8): commands and options ------------------------------------------


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli._parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_commands_match_the_parser() -> None:
    documented = set(entries(SUPERD_8, "COMMANDS"))
    code = set(subparsers())
    assert documented == code, differences(documented, code, "COMMANDS")
    synopsis = " ".join(plain(line) for line in sections(SUPERD_8)["SYNOPSIS"])
    for command in code:
        assert f"superd {command}" in synopsis, command


def test_options_match_the_parser() -> None:
    """Every option of every command is in OPTIONS (and in the command's
    synopsis line), and OPTIONS names no option the parser lacks."""
    documented = {word.rstrip(",") for tag in entries_tags(SUPERD_8, "OPTIONS")
                  for word in tag.split() if word.startswith("-")}
    code = {"-h", "--help"}
    code.update(o for a in cli._parser()._actions for o in a.option_strings)  # --version
    synopsis = {plain(line) for line in sections(SUPERD_8)["SYNOPSIS"]}
    for name, sub in subparsers().items():
        for action in sub._actions:
            code.update(action.option_strings)
            short = [o for o in action.option_strings if o != "-h" and len(o) == 2]
            shown = short or [o for o in action.option_strings if o != "--help"]
            if shown and "[" + shown[0] not in " ".join(synopsis):
                pytest.fail(f"superd {name}: {shown[0]} is not in the SYNOPSIS")
    assert documented == code, differences(documented, code, "OPTIONS")


def entries_tags(page: Path, section: str) -> list[str]:
    """The plain tags of every .TP entry in *section*."""
    lines = sections(page)[section]
    return [plain(lines[i + 1]) for i, line in enumerate(lines[:-1]) if line == ".TP"]


# --- both pages render --------------------------------------------------------


@pytest.mark.parametrize("page", [SUPERD_8, SUPERD_YAML_5], ids=lambda p: p.name)
@pytest.mark.parametrize("device", [[], ["-Tutf8"]], ids=["ps", "utf8"])
def test_groff_gives_no_warnings(page: Path, device: list[str]) -> None:
    groff = shutil.which("groff")
    if groff is None:
        pytest.skip("groff is not installed (Debian: groff-base)")
    result = subprocess.run([groff, "-man", *device, "-ww", "-z", str(page)],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, "")


@pytest.mark.parametrize("page", [SUPERD_8, SUPERD_YAML_5], ids=lambda p: p.name)
def test_man_renders_the_page(page: Path) -> None:
    man = shutil.which("man")
    if man is None:
        pytest.skip("man is not installed (Debian: man-db)")
    result = subprocess.run([man, "-l", str(page)], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "MANWIDTH": "80",
                                             "MANPAGER": "cat", "PAGER": "cat"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[0] == page.name.rsplit(".", 1)[0].upper() + f"({page.suffix[1:]})"
    assert "NAME" in lines and "SEE ALSO" in lines
    assert max(len(line) for line in lines) <= 80
