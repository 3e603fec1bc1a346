"""Read a YAML file into located nodes, safely.

The configuration is validated from the node graph rather than from plain
Python values so that every error can name ``FILE:LINE:COL``.  Only the
YAML 1.1 core tags are accepted; aliases are allowed but the walk over the
graph is bounded, so an alias bomb is reported instead of expanded.

Nesting is bounded too, before anything is built: the parser's event
stream (iterative, in libyaml as in PyYAML's pure-Python parser) is
counted first, and only a file at most MAX_DEPTH levels deep is composed.
Composing is recursive (in C in the C loader: a file 200,000 levels deep
overflowed its stack and killed the process).  Scalars are constructed
with no cache: a constructor kept for the process would hold every node of
every file it had read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from superd.errors import ConfigProblem

MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_NODES = 100_000
MAX_DEPTH = 64  # mappings and lists inside one another; superd's own files use 5

try:
    _Loader: type = yaml.CSafeLoader
except AttributeError:  # PyYAML built without libyaml
    _Loader = yaml.SafeLoader

_TAG = "tag:yaml.org,2002:"
SCALAR_TAGS = frozenset(
    _TAG + t for t in ("null", "bool", "int", "float", "str", "timestamp")
)
_OPEN = (yaml.MappingStartEvent, yaml.SequenceStartEvent)
_CLOSE = (yaml.MappingEndEvent, yaml.SequenceEndEvent)
_TOO_DEEP = f"nested too deep (more than {MAX_DEPTH} levels)"
_LIBYAML_TOO_DEEP = "exceeded maximum nesting depth"  # libyaml's own limit (1000)


@dataclass(frozen=True)
class Where:
    """A position in a file, 1-based, as editors count."""

    file: str
    line: int
    col: int

    def problem(self, message: str) -> ConfigProblem:
        return ConfigProblem(self.file, self.line, self.col, message)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


def where(node: yaml.Node, file: str) -> Where:
    mark = node.start_mark
    return Where(file, mark.line + 1, mark.column + 1)


def load_nodes(path: str, data: bytes | None = None) -> yaml.Node:
    """Return the root node of *path*; raise ConfigError on any problem.

    *data*, when given, is the file's content as already read (from the
    descriptor superd.trust judged, the only way superd reads as root); at
    most MAX_FILE_BYTES + 1 bytes of it are needed to tell a file too large.
    """
    from superd.errors import ConfigError

    if data is None:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            raise ConfigError([ConfigProblem(path, 1, 1, f"cannot read: {e.strerror}")]) from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError([ConfigProblem(path, 1, 1, "file is larger than 4 MiB")])
    text = _decode(path, data)
    try:
        too_deep = _too_deep(text)
        if too_deep is not None:
            raise ConfigError([ConfigProblem(path, too_deep.line + 1, too_deep.column + 1,
                                             _TOO_DEEP)])
        root = yaml.compose(text, Loader=_Loader)
    except yaml.reader.ReaderError as e:
        line, col = _position(text, e.position)
        raise ConfigError([ConfigProblem(
            path, line, col, f"YAML: unacceptable character #x{e.character:04x}: "
            f"{e.reason}")]) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        message = _TOO_DEEP if e.problem == _LIBYAML_TOO_DEEP else f"YAML: {e.problem}"
        raise ConfigError([ConfigProblem(path, line, col, message)]) from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError([ConfigProblem(path, 1, 1, f"YAML: {first}")]) from None
    if root is None:
        raise ConfigError([ConfigProblem(path, 1, 1, "file is empty")])
    problems = check_graph(root, path)
    if problems:
        raise ConfigError(problems)
    return root


def _too_deep(text: str) -> yaml.Mark | None:
    """Where *text* first nests more than MAX_DEPTH levels, or None.

    Only the parser runs: it keeps its nesting in a list (libyaml: an array),
    never on the C or Python stack, and it is stopped at the first level too
    many, so a 4 MiB file of brackets costs no more than the thousand or so
    characters the scanner looks ahead.  A wheel's libyaml may refuse first,
    at 1,000 levels: load_nodes reports that in the same words.
    """
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, _OPEN):
            depth += 1
            if depth > MAX_DEPTH:
                return event.start_mark
        elif isinstance(event, _CLOSE):
            depth -= 1
    return None


def _position(text: str, index: int) -> tuple[int, int]:
    before = text[:index]
    return before.count("\n") + 1, index - (before.rfind("\n") + 1) + 1


def _decode(path: str, data: bytes) -> str:
    from superd.errors import ConfigError

    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[: e.start]
        line = before.count(b"\n") + 1
        col = e.start - (before.rfind(b"\n") + 1) + 1
        raise ConfigError(
            [ConfigProblem(path, line, col, "file is not valid UTF-8")]
        ) from None


def check_graph(root: yaml.Node, path: str) -> list[ConfigProblem]:
    """Bound the expanded size of the graph and refuse unknown tags."""
    problems: list[ConfigProblem] = []
    stack = [root]
    seen = 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            return [
                where(root, path).problem(
                    f"document expands to more than {MAX_NODES} nodes "
                    "(an alias bomb?); refused"
                )
            ]
        if isinstance(node, yaml.ScalarNode):
            if node.tag not in SCALAR_TAGS and node.tag != _TAG + "merge":
                problems.append(where(node, path).problem(f"unknown tag {node.tag}"))
        elif isinstance(node, yaml.SequenceNode):
            if node.tag != _TAG + "seq":
                problems.append(where(node, path).problem(f"unknown tag {node.tag}"))
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            if node.tag != _TAG + "map":
                problems.append(where(node, path).problem(f"unknown tag {node.tag}"))
            for k, v in node.value:
                stack.extend((k, v))
    return problems


def scalar(node: yaml.ScalarNode) -> Any:
    """The Python value of a scalar node (str, int, float, bool, None...).

    A fresh constructor each time: SafeConstructor caches every node it has
    built, and one kept for the process grew with every reload.
    """
    return yaml.constructor.SafeConstructor().construct_object(node, deep=True)


def kind(node: yaml.Node) -> str:
    """A word for the type of value a node holds, for messages."""
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    name = node.tag.rsplit(":", 1)[-1]
    return {"str": "a string", "int": "a number", "float": "a number",
            "bool": "true/false", "null": "empty"}.get(name, name)


def mapping_items(
    node: yaml.MappingNode, path: str, problems: list[ConfigProblem]
) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """Keys (as strings) to (key node, value node), merges applied.

    A ``<<`` merge key copies the keys of the mapping(s) it names where not
    given here; a key written twice is an error.
    """
    items: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    merged: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for knode, vnode in node.value:
        if knode.tag == _TAG + "merge":
            for source in _merge_sources(vnode, path, problems):
                for key, pair in mapping_items(source, path, problems).items():
                    merged.setdefault(key, pair)
            continue
        if not isinstance(knode, yaml.ScalarNode):
            problems.append(where(knode, path).problem("a key must be a plain word"))
            continue
        key = str(knode.value)  # as written: YAML 1.1 would read `off:` as false
        if key in items:
            first = where(items[key][0], path)
            problems.append(
                where(knode, path).problem(
                    f"duplicate key '{key}' (first at line {first.line})"
                )
            )
            continue
        items[key] = (knode, vnode)
    for key, pair in merged.items():
        items.setdefault(key, pair)
    return items


def _merge_sources(
    vnode: yaml.Node, path: str, problems: list[ConfigProblem]
) -> list[yaml.MappingNode]:
    if isinstance(vnode, yaml.MappingNode):
        return [vnode]
    if isinstance(vnode, yaml.SequenceNode) and all(
        isinstance(n, yaml.MappingNode) for n in vnode.value
    ):
        return list(vnode.value)
    problems.append(where(vnode, path).problem("'<<' must name a mapping"))
    return []
