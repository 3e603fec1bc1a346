"""The documentation says what the code does, and points only at what exists.

docs/configuration.md documents exactly the keys the configuration reader
knows (config.TOP_KEYS, config.LOG_KEYS, fields.SERVICE_KEYS).  Each key is a
heading whose whole text is the key in backticks, under the ``##`` section
"Top-level keys", "Log keys" or "Service keys", followed by three lines::

    - Default: `VALUE` (or: none ..., or a few words)
    - Accepts: what values it takes
    - Example: `KEY: VALUE`

A default in backticks is the code's value as a YAML file would write it;
``none`` means the code has no value; the few defaults that depend on who
runs superd or on other keys are stated in words (WORDED below).  Every
example is a line of YAML that superd's own configuration reader accepts.

README.md and every Markdown file under docs/ link only to files of the
repository that exist (and to headings that exist in them), and none of
them names the project's internal design notes.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pwd
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT

from superd import config, fields

DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
README = ROOT / "README.md"
SECTIONS = {
    "Top-level keys": config.TOP_KEYS,
    "Log keys": config.LOG_KEYS,
    "Service keys": fields.SERVICE_KEYS,
}
FORBIDDEN = ("../shared", "DESIGN.md", "/work/shared")

_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_KEY_HEADING = re.compile(r"^`([a-z][a-z0-9_]*)`$")
_FIELD = re.compile(r"^- (Default|Accepts|Example): (.*)$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_CODE_SPAN = re.compile(r"`[^`]*`")
_INLINE_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
_SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


# --- reading Markdown -----------------------------------------------------------


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of *text* outside fenced code blocks."""
    result = []
    fence: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        m = _FENCE.match(line)
        if m and (fence is None or m.group(1) == fence):
            fence = m.group(1) if fence is None else None
            continue
        if fence is None:
            result.append((number, line))
    return result


def slug(heading: str) -> str:
    """The anchor GitHub gives *heading*: lower case, punctuation dropped
    (backticks included), spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a Markdown text; a repeated one gets -1, -2 ..."""
    seen: collections.Counter[str] = collections.Counter()
    result = set()
    for _, line in prose_lines(text):
        m = _HEADING.match(line)
        if m is None:
            continue
        base = slug(m.group(2))
        result.add(base if not seen[base] else f"{base}-{seen[base]}")
        seen[base] += 1
    return result


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every inline and reference link outside code."""
    found = []
    for number, line in prose_lines(text):
        plain = _CODE_SPAN.sub("", line)
        found += [(number, m.group(1)) for m in _INLINE_LINK.finditer(plain)]
        ref = _REFERENCE_LINK.match(plain)
        if ref:
            found.append((number, ref.group(1)))
    return found


def link_problem(page: Path, target: str) -> str | None:
    """Why *target*, linked from *page*, points at nothing in the repository."""
    if _SCHEME.match(target) or target.startswith("//"):
        return None  # a web address: not checked here
    path_text, _, fragment = target.partition("#")
    dest = (page.parent / path_text).resolve() if path_text else page.resolve()
    if not dest.is_relative_to(ROOT.resolve()):
        return f"{target} leaves the repository"
    if not dest.exists():
        return f"{target}: {dest.relative_to(ROOT.resolve())} does not exist"
    if ignored_by_git(dest):
        return f"{target}: {dest.relative_to(ROOT.resolve())} is ignored by git (not in a clone)"
    if fragment and dest.suffix == ".md" and fragment not in anchors(dest.read_text()):
        return f"{target}: no heading '#{fragment}' in {dest.name}"
    return None


def ignored_by_git(path: Path) -> bool:
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        return False
    result = subprocess.run([git, "-C", str(ROOT), "check-ignore", "-q", str(path)],
                            capture_output=True, timeout=30)
    return result.returncode == 0


def pages() -> list[Path]:
    """README.md and every Markdown file under docs/."""
    return [README, *sorted(DOCS.rglob("*.md"))]


# --- reading docs/configuration.md ----------------------------------------------


@dataclass
class Entry:
    key: str
    line: int
    fields: dict[str, str] = field(default_factory=dict)


def entries(path: Path = CONFIGURATION) -> dict[str, dict[str, Entry]]:
    """Section title to its key entries (see the module docstring)."""
    result: dict[str, dict[str, Entry]] = {}
    section: dict[str, Entry] | None = None
    entry: Entry | None = None
    for number, line in prose_lines(path.read_text()):
        heading = _HEADING.match(line)
        if heading and len(heading.group(1)) == 2:
            title = heading.group(2)
            section = result.setdefault(title, {}) if title in SECTIONS else None
            entry = None
        elif heading:
            key = _KEY_HEADING.match(heading.group(2))
            entry = Entry(key.group(1), number) if key and section is not None else None
            if entry is not None and section is not None:
                assert entry.key not in section, f"{path.name}:{number}: {entry.key} twice"
                section[entry.key] = entry
        elif entry is not None and (m := _FIELD.match(line)):
            entry.fields.setdefault(m.group(1), m.group(2).strip())
    return result


def entry(section: str, key: str) -> Entry:
    found = entries().get(section, {}).get(key)
    assert found is not None, f"docs/configuration.md, {section}: no entry for `{key}`"
    return found


def stated(section: str, key: str) -> str:
    """The entry's default: the value in its first backticks, or its words."""
    e = entry(section, key)
    text = e.fields.get("Default")
    assert text, f"docs/configuration.md:{e.line}: `{key}` states no '- Default:'"
    return text[1:].split("`", 1)[0] if text.startswith("`") else text


# --- the keys -------------------------------------------------------------------


def differences(documented: set[str], code: set[str], where: str) -> str:
    return (f"{where}: in the code but not in docs/configuration.md: "
            f"{sorted(code - documented)}; in docs/configuration.md but not in the "
            f"code: {sorted(documented - code)}")


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_key_the_code_accepts_is_documented(section: str) -> None:
    documented = set(entries().get(section, {}))
    code = set(SECTIONS[section])
    assert documented == code, differences(documented, code, section)


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_every_entry_has_a_default_values_and_an_example(section: str) -> None:
    incomplete = {key: sorted({"Default", "Accepts", "Example"} - set(e.fields))
                  for key, e in entries()[section].items()
                  if len(e.fields) < 3}
    assert not incomplete, f"{section}: entries missing lines: {incomplete}"


def test_the_entry_parser_finds_what_it_should() -> None:
    """A guard for the parser itself: the entries it must see, with their
    defaults; the top-level and the service max_connections kept apart."""
    found = entries()
    assert list(found["Service keys"])[:3] == ["listen", "protocol", "exec"]
    assert stated("Service keys", "max_connections") == "64"
    assert stated("Top-level keys", "max_connections") == "1024"
    assert stated("Service keys", "umask") == '"022"'
    assert stated("Service keys", "timeout").startswith("none")
    assert entry("Log keys", "level").fields["Example"] == "`log: {level: warning}`"


# --- defaults -------------------------------------------------------------------


# Defaults that depend on other keys or on who runs superd, or that the code
# keeps as None for "leave it to the kernel or to superd": stated in words.
WORDED = {
    "listen": "the service's name looked up in `/etc/services`",
    "wait": "false for tcp and internal services, true for udp",
    "user": "none: required for exec services when superd runs as root",
    "group": "the user's primary group",
    "rlimits": "inherited from superd",
    "owner": "superd's own user and group",
    "burst": "one second's worth of `rate`",
}


def as_yaml(key: str, value: Any) -> str | None:
    """The code's default as the entry writes it in backticks; None: no value."""
    if value is None or value == ():
        return None
    if key == "umask":
        return f'"{value:03o}"'
    if key == "mode":
        return f'"{value:04o}"'
    if key == "source_prefix":
        return "{{v4: {}, v6: {}}}".format(*value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def check_default(section: str, key: str, value: Any) -> None:
    text = stated(section, key)
    expected = as_yaml(key, value)
    if expected is None:
        assert text.startswith("none"), f"{key}: the code has no default, the page says {text!r}"
    else:
        assert text == expected, f"{key}: the code's default is {expected}, the page says {text!r}"


def service_default(key: str) -> Any:
    found = {f.name: f.default for f in dataclasses.fields(config.Service)}
    assert key in found and found[key] is not dataclasses.MISSING, (
        f"{key}: not a field of config.Service with a default; state it in words "
        "and add it to WORDED in this test")
    return found[key]


@pytest.mark.parametrize("key", fields.SERVICE_KEYS)
def test_service_default_matches_the_code(key: str) -> None:
    if key in WORDED:
        assert stated("Service keys", key).startswith(WORDED[key])
    elif key == "backlog":
        assert service_default(key) is None  # superd passes socket.SOMAXCONN to listen()
        assert stated("Service keys", key) == "SOMAXCONN"
    else:
        check_default("Service keys", key, service_default(key))


@pytest.mark.parametrize("key", config.LOG_KEYS)
def test_log_default_matches_the_code(key: str) -> None:
    check_default("Log keys", key, getattr(config.LogSettings(), key))


def test_top_level_defaults_match_the_code(tmp_path: Path) -> None:
    """The defaults of a file that sets nothing, as config.load() gives them."""
    path = tmp_path / "superd.yaml"
    path.write_text("services: {}\n")
    os.chmod(path, 0o644)
    cfg = config.load(str(path))
    assert (cfg.stop_timeout, cfg.max_connections) == (10.0, 1024)
    check_default("Top-level keys", "stop_timeout", cfg.stop_timeout)
    check_default("Top-level keys", "max_connections", cfg.max_connections)
    check_default("Top-level keys", "metrics", cfg.metrics)
    check_default("Top-level keys", "include", cfg.files[1:])
    check_default("Top-level keys", "services", cfg.services)
    check_default("Top-level keys", "defaults", None)
    assert stated("Top-level keys", "log").startswith("each log key's own default")
    assert cfg.log == config.LogSettings()
    assert stated("Top-level keys", "control") == config.DEFAULT_CONTROL_ROOT
    if os.geteuid() == 0:
        assert cfg.control == config.DEFAULT_CONTROL_ROOT


def test_every_key_with_a_default_is_checked() -> None:
    """No service key escapes the default checks above."""
    for key in fields.SERVICE_KEYS:
        if key not in WORDED and key != "backlog":
            service_default(key)


# --- examples -------------------------------------------------------------------


def example(section: str, key: str) -> dict[str, Any]:
    e = entry(section, key)
    text = e.fields.get("Example", "")
    assert text.startswith("`") and text.endswith("`"), (
        f"docs/configuration.md:{e.line}: `{key}`: the example must be one line of YAML "
        f"in backticks, got {text!r}")
    parsed = yaml.safe_load(text[1:-1])
    assert isinstance(parsed, dict), f"{key}: the example is not a YAML mapping: {text}"
    inner = parsed.get("log") if section == "Log keys" else parsed
    assert isinstance(inner, dict) and key in inner, f"{key}: the example does not set it: {text}"
    return parsed


def service_for(key: str, written: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """A service around an example, with what the example needs beside it."""
    service: dict[str, Any] = {"listen": "127.0.0.1:7070", "exec": "/bin/cat", "user": "nobody"}
    if "internal" in written:
        del service["exec"], service["user"]
    if key in ("mode", "owner"):
        service["listen"] = str(tmp_path / "example.sock")
    if "proxy_protocol" in written:
        service["proxy_from"] = ["127.0.0.1"]
    if "burst" in written:
        service["rate"] = 5
    return {**service, **written}


def as_this_user(document: dict[str, Any]) -> dict[str, Any]:
    """*document* with its services' ``user:`` made the user running the test
    when that is not root: superd not running as root starts programs only
    as itself, and refuses another user."""
    if os.geteuid() == 0:
        return document
    me = pwd.getpwuid(os.geteuid()).pw_name
    services = {name: {**svc, "user": me} if "user" in svc else svc
                for name, svc in (document.get("services") or {}).items()}
    return {**document, "services": services}


def load_example(document: dict[str, Any], tmp_path: Path) -> config.Config:
    document = as_this_user(document)
    (tmp_path / "conf.d").mkdir(exist_ok=True)
    path = tmp_path / "superd.yaml"
    path.write_text(yaml.safe_dump(document, default_flow_style=False))
    os.chmod(path, 0o644)
    return config.load(str(path))


@pytest.mark.parametrize(("section", "key"), [
    (section, key) for section, keys in SECTIONS.items() for key in keys])
def test_example_is_accepted(section: str, key: str, tmp_path: Path) -> None:
    written = example(section, key)
    if key in ("user", "group", "owner") and os.geteuid() != 0:
        pytest.skip("needs root: superd not running as root refuses another user, group "
                    "or socket owner, as the example names")
    if section == "Service keys":
        document: dict[str, Any] = {
            "services": {"example": service_for(key, written, tmp_path)}}
    else:
        document = {"services": {}, **written}
    try:
        load_example(document, tmp_path)
    except config.ConfigError as e:
        pytest.fail(f"the example of `{key}` is refused: {e.problems}")


def test_a_wrong_example_is_refused(tmp_path: Path) -> None:
    """A guard for the example check: a value superd refuses fails it."""
    with pytest.raises(config.ConfigError):
        load_example({"services": {"example": service_for(
            "nice", {"nice": 40}, tmp_path)}}, tmp_path)


# --- links and references -------------------------------------------------------


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_into_the_repository(page: Path) -> None:
    text = page.read_text()
    broken = [f"{page.relative_to(ROOT)}:{number}: {problem}"
              for number, target in links(text)
              if (problem := link_problem(page, target)) is not None]
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("page", [README, *sorted(p for p in DOCS.rglob("*") if p.is_file())],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_names_files_outside_the_repository(page: Path) -> None:
    text = page.read_text(errors="replace")
    named = [f"{page.relative_to(ROOT)}:{n}: {word}"
             for n, line in enumerate(text.splitlines(), 1)
             for word in FORBIDDEN if word in line]
    assert not named, "\n".join(named)


def test_the_index_lists_every_page() -> None:
    index = DOCS / "README.md"
    linked = {(DOCS / target.partition("#")[0]).resolve()
              for _, target in links(index.read_text()) if not _SCHEME.match(target)}
    missing = [p.name for p in sorted(DOCS.glob("*.md"))
               if p != index and p.resolve() not in linked]
    assert not missing, f"docs/README.md does not link to {missing}"


def test_the_readme_links_to_the_docs() -> None:
    targets = {target.partition("#")[0] for _, target in links(README.read_text())}
    assert "docs/README.md" in targets
    assert {"docs/configuration.md", "docs/running-as-root.md"} <= targets


def test_the_link_checker_finds_broken_links(tmp_path: Path) -> None:
    """A guard for the checker: what it must see and what it must not."""
    text = ("# Top\n## `max_connections`\n## `max_connections`\n"
            "[a](missing.md) [b](#max_connections-1) `[c](inside-code.md)`\n"
            "```\n[d](in-a-fence.md)\n```\n[e]: https://example.org/\n")
    assert anchors(text) == {"top", "max_connections", "max_connections-1"}
    assert [t for _, t in links(text)] == ["missing.md", "#max_connections-1",
                                           "https://example.org/"]
    page = DOCS / "README.md"
    assert link_problem(page, "missing.md") is not None
    assert link_problem(page, "../../etc/passwd") is not None
    assert link_problem(page, "configuration.md#no-such-heading") is not None
    assert link_problem(page, "configuration.md#top-level-keys") is None
    assert link_problem(page, "../.venv") is not None  # absent, or ignored by git
