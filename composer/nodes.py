"""Reading config files: YAML nodes with their lines (for `file:LINE` problems), file stamps.

`parse_yaml` keeps PyYAML's mark on every node (it composes, never constructs); `Reader` walks
them and collects every problem as `file:line: message`, so one run reports everything wrong
with a file, and every warning (a setting that changes nothing) the same way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from .errors import Stamp

__all__ = ["MAX_TIMEOUT_MS", "Reader", "file_stamp", "is_null", "parse_yaml", "plain"]

MAX_TIMEOUT_MS = 600_000  # ten minutes: longer is a typo, not a fragment budget


def file_stamp(path: Path) -> Stamp:
    """(mtime, size, inode) of `path`, None if it cannot be stat'ed: what a reload compares."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # ValueError: a NUL or a lone surrogate in the name
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing deep nesting before Python's recursion limit (and the
    scanner's time, quadratic in the depth) is reached."""

    max_depth = 100
    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        """PyYAML's, counting the depth."""
        if self._depth >= self.max_depth:
            event = self.peek_event()  # type: ignore[no-untyped-call]  # unannotated in types-PyYAML
            raise yaml.composer.ComposerError(None, None, f"nested more than {self.max_depth} deep",
                                              event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def parse_yaml(text: str, label: str) -> tuple[yaml.Node | None, str | None]:
    """The root node of `text`, or None and a `file:line: invalid YAML` problem.

    Nodes, not Python values: each keeps its line for the messages about it.
    """
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        return None, f"{label}:{line}: invalid YAML: {exc.problem or exc.context}"
    except yaml.reader.ReaderError as exc:  # its str() spans two lines
        line = text.count("\n", 0, exc.position) + 1
        return None, f"{label}:{line}: invalid YAML: character U+{exc.character:04X} is not allowed"
    except yaml.YAMLError as exc:
        return None, f"{label}:1: invalid YAML: {' '.join(str(exc).split())}"
    except RecursionError:
        return None, f"{label}:1: invalid YAML: nested too deeply"
    return _check_aliases(root, label)


_MAX_ALIASED = 100_000  # nodes that aliases may add: a "billion laughs" document adds 10**9


def _check_aliases(root: yaml.Node | None, label: str) -> tuple[yaml.Node | None, str | None]:
    """`root`, unless an alias (`*name`) is inside its own anchor or aliases expand past reason.

    Composed nodes are shared, not copied, so either would make walking the tree endless.
    """
    sizes: dict[int, int] = {}  # id → nodes under it, aliases expanded
    open_: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise _Cycle(node)
        open_.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                total += size(k) + size(v)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                total += size(item)
        open_.discard(key)
        sizes[key] = total
        return total

    if root is None:
        return None, None
    try:
        if size(root) - len(sizes) > _MAX_ALIASED:
            return None, f"{label}:1: invalid YAML: aliases expand to more than {_MAX_ALIASED} nodes"
    except _Cycle as cycle:
        return None, (f"{label}:{cycle.node.start_mark.line + 1}: invalid YAML: "
                      "an alias refers to the node that contains it")
    return root, None


class _Cycle(Exception):
    def __init__(self, node: yaml.Node) -> None:
        self.node = node


class Reader:
    """Walks composed YAML nodes, collecting `file:line: message` problems and warnings."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.problems: list[str] = []
        self.warnings: list[str] = []  # the file loads; `composer check` prints these

    def error(self, node: yaml.Node | None, message: str) -> None:
        self.problems.append(f"{self.where(node)}: {message}")

    def warn(self, node: yaml.Node | None, message: str) -> None:
        self.warnings.append(f"{self.where(node)}: warning: {message}")

    def where(self, node: yaml.Node | None) -> str:
        """`file:line` of `node` (line 1 without one)."""
        return f"{self.label}:{node.start_mark.line + 1 if node is not None else 1}"

    def mapping(self, node: yaml.Node, what: str, known: tuple[str, ...]) -> dict[str, yaml.Node]:
        """Keys of a mapping node; unknown and duplicate keys are problems."""
        if is_null(node):
            return {}
        if not isinstance(node, yaml.MappingNode):
            self.error(node, f"{what} must be a mapping")
            return {}
        out: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key not in known:
                self.error(key_node, f"unknown key {key!r} in {what} (known: {', '.join(known)})")
            elif key in out:
                self.error(key_node, f"duplicate key {key!r} in {what}")
            else:
                out[key] = value_node
        return out

    def string(self, node: yaml.Node, what: str) -> str | None:
        """A non-empty string scalar (a quoted number is one; a bare one is not)."""
        if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:str":
            self.error(node, f"{what} must be a string")
            return None
        if not node.value:
            self.error(node, f"{what} must not be empty")
            return None
        return str(node.value)

    def integer(self, node: yaml.Node, what: str, low: int, high: int) -> int | None:
        """An integer scalar within [low, high]."""
        if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:int":
            self.error(node, f"{what} must be an integer")
            return None
        try:
            value = yaml.constructor.SafeConstructor().construct_yaml_int(node)
        except (ValueError, IndexError):  # `!!int` on text that is no integer; more than 4300 digits
            self.error(node, f"{what} must be an integer between {low} and {high}")
            return None
        if not low <= value <= high:
            self.error(node, f"{what} must be between {low} and {high}, not {node.value}")
            return None
        return value

    def fraction(self, node: yaml.Node, what: str) -> float | None:
        """A number within [0, 1] (a share: `0.25`, `1`)."""
        tag = getattr(node, "tag", "")
        if not isinstance(node, yaml.ScalarNode) or tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
            self.error(node, f"{what} must be a number between 0 and 1")
            return None
        try:
            value = float(node.value.replace("_", ""))
        except ValueError:
            value = -1.0
        if not 0.0 <= value <= 1.0:  # also NaN, .inf and what float() refused
            self.error(node, f"{what} must be a number between 0 and 1, not {node.value}")
            return None
        return value

    def strings(self, node: yaml.Node, what: str) -> tuple[str, ...] | None:
        """A list of non-empty strings; None if any entry is not one."""
        if not isinstance(node, yaml.SequenceNode):
            self.error(node, f"{what} must be a list of strings")
            return None
        values = [self.string(item, f"each entry of {what}") for item in node.value]
        if None in values:
            return None
        return tuple(v for v in values if v is not None)

    def boolean(self, node: yaml.Node, what: str) -> bool | None:
        """true or false (YAML 1.1 spellings: yes, on, ...)."""
        value = yaml.constructor.SafeConstructor.bool_values.get(str(node.value).lower()) \
            if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:bool" else None
        if value is None:  # also `!!bool` on text that is no boolean
            self.error(node, f"{what} must be true or false")
            return None
        return value


def is_null(node: yaml.Node) -> bool:
    """`~`, `null` or nothing: "not set" where a key allows it."""
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def plain(node: yaml.Node) -> Any:
    """Node → str / list / dict, every scalar as its text (filter arguments are strings)."""
    if isinstance(node, yaml.MappingNode):
        return {str(k.value): plain(v) for k, v in node.value}
    if isinstance(node, yaml.SequenceNode):
        return [plain(v) for v in node.value]
    return None if is_null(node) else str(node.value)
