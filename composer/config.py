"""Loading routes.yaml into frozen dataclasses.

The file is read with PyYAML's `compose` so every node keeps its line: each problem is
reported as `routes.yaml:LINE: message`, and all problems of a file are collected before
`ConfigError` is raised, so one `composer check` shows everything that is wrong.

This module only checks the *shape* of the file (keys, types, ranges). What needs other
files — templates, path patterns — is checked when the route table is built (`routing`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

__all__ = ["Config", "FilterSpec", "RouteSpec", "Settings", "load_config", "DEFAULT_FORWARD_HEADERS"]

DEFAULT_FORWARD_HEADERS = (
    "accept-language",
    "cookie",
    "referer",
    "user-agent",
    "traceparent",
    "tracestate",
)
MAX_TIMEOUT_MS = 600_000  # ten minutes: longer is a typo, not a fragment budget
# Headers that describe one connection or one message, never the user: forwarding them
# to a fragment would corrupt its request (RFC 9110 §7.6.1), so they are refused at load.
_NOT_FORWARDABLE = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                              "transfer-encoding", "upgrade", "host", "content-length",
                              "accept-encoding", "x-request-id", "x-request-uri", "x-request-host"})


@dataclass(frozen=True, slots=True)
class Settings:
    """`settings:` of routes.yaml; `templates` is already resolved against the file's folder."""

    templates: Path
    fragment_timeout_ms: int = 3000
    forward_headers: tuple[str, ...] = DEFAULT_FORWARD_HEADERS
    allowed_origins: tuple[str, ...] = ()
    max_fragment_bytes: int = 5 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class FilterSpec:
    """One `filters:` entry as written: `{name: value}`; checked by the filter's `create`."""

    name: str
    value: Any
    line: int


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """One entry of `routes:` as written; `line` points at the entry for later error messages."""

    name: str
    line: int
    path: str
    path_line: int
    template: str
    template_line: int
    filters: tuple[FilterSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    """A loaded routes.yaml. `label` is the file name as the user gave it, for messages."""

    path: Path
    label: str
    settings: Settings
    routes: tuple[RouteSpec, ...] = field(default_factory=tuple)

    def where(self, line: int) -> str:
        return f"{self.label}:{line}"


_SETTINGS_KEYS = ("templates", "fragment_timeout_ms", "forward_headers", "allowed_origins",
                  "max_fragment_bytes", "manifest")
_TOP_KEYS = ("settings", "routes")
_ROUTE_KEYS = ("name", "match", "template", "filters")
_REQUIRED_ROUTE_KEYS = ("name", "match", "template")
_MATCH_KEYS = ("path",)


class _Reader:
    """Walks composed YAML nodes, collecting `file:line: message` problems."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.problems: list[str] = []

    def error(self, node: yaml.Node | None, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.problems.append(f"{self.label}:{line}: {message}")

    def mapping(self, node: yaml.Node, what: str, known: tuple[str, ...]) -> dict[str, yaml.Node]:
        """Keys of a mapping node; unknown and duplicate keys are problems."""
        if _is_null(node):
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
        if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:str":
            self.error(node, f"{what} must be a string")
            return None
        if not node.value:
            self.error(node, f"{what} must not be empty")
            return None
        return node.value

    def integer(self, node: yaml.Node, what: str, low: int, high: int) -> int | None:
        if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:int":
            self.error(node, f"{what} must be an integer")
            return None
        value = int(yaml.safe_load(node.value))
        if not low <= value <= high:
            self.error(node, f"{what} must be between {low} and {high}, not {value}")
            return None
        return value

    def strings(self, node: yaml.Node, what: str) -> tuple[str, ...] | None:
        if not isinstance(node, yaml.SequenceNode):
            self.error(node, f"{what} must be a list of strings")
            return None
        values = [self.string(item, f"each entry of {what}") for item in node.value]
        if None in values:
            return None
        return tuple(v for v in values if v is not None)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and check routes.yaml; raise `ConfigError` listing every problem found."""
    label = os.fspath(path)
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{label}:1: file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{label}:1: cannot read: {exc}"]) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise ConfigError([f"{label}:{line}: invalid YAML: {exc.problem or exc.context}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{label}:1: invalid YAML: {exc}"]) from None

    reader = _Reader(label)
    if root is None:
        raise ConfigError([f"{label}:1: the file is empty; it needs a `routes:` list"])
    top = reader.mapping(root, "the top level", _TOP_KEYS)
    settings = _settings(reader, top.get("settings"), file.parent)
    routes = _routes(reader, top.get("routes"), root)
    if reader.problems:
        raise ConfigError(reader.problems)
    assert settings is not None
    return Config(path=file, label=label, settings=settings, routes=routes)


def _settings(reader: _Reader, node: yaml.Node | None, base: Path) -> Settings | None:
    values: dict[str, Any] = {}
    keys = reader.mapping(node, "settings", _SETTINGS_KEYS) if node is not None else {}
    if "templates" in keys:
        values["templates"] = reader.string(keys["templates"], "settings.templates")
    if "fragment_timeout_ms" in keys:
        values["fragment_timeout_ms"] = reader.integer(
            keys["fragment_timeout_ms"], "settings.fragment_timeout_ms", 1, MAX_TIMEOUT_MS)
    if "max_fragment_bytes" in keys:
        values["max_fragment_bytes"] = reader.integer(
            keys["max_fragment_bytes"], "settings.max_fragment_bytes", 1, 1 << 30)
    if "forward_headers" in keys:
        headers = reader.strings(keys["forward_headers"], "settings.forward_headers")
        if headers is not None:
            headers = tuple(h.lower() for h in headers)
            for bad in sorted(set(headers) & _NOT_FORWARDABLE):
                reader.error(keys["forward_headers"], f"settings.forward_headers cannot include {bad!r}: "
                                                      "composer sets it itself or it is hop-by-hop")
        values["forward_headers"] = headers
    if "manifest" in keys and not _is_null(keys["manifest"]):
        reader.error(keys["manifest"], "settings.manifest: fragment manifests are not supported by this "
                                       "version of composer; leave it null")
    if "allowed_origins" in keys:
        origins = reader.strings(keys["allowed_origins"], "settings.allowed_origins")
        if origins is not None:
            for origin in origins:
                if not origin.startswith(("http://", "https://")):
                    reader.error(keys["allowed_origins"],
                                 f"allowed origin {origin!r} must start with http:// or https://")
        values["allowed_origins"] = origins
    if any(v is None for v in values.values()):
        return None
    values["templates"] = base / values.get("templates", "templates")
    return Settings(**values)


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _routes(reader: _Reader, node: yaml.Node | None, root: yaml.Node) -> tuple[RouteSpec, ...]:
    if node is None:
        reader.error(root, "`routes:` is missing; it lists the routes, first match wins")
        return ()
    if not isinstance(node, yaml.SequenceNode):
        reader.error(node, "routes must be a list")
        return ()
    routes: list[RouteSpec] = []
    seen: dict[str, int] = {}
    for item in node.value:
        route = _route(reader, item)
        if route is None:
            continue
        if route.name in seen:
            reader.error(item, f"duplicate route name {route.name!r} (first on line {seen[route.name]})")
            continue
        seen[route.name] = route.line
        routes.append(route)
    return tuple(routes)


def _route(reader: _Reader, node: yaml.Node) -> RouteSpec | None:
    keys = reader.mapping(node, "a route", _ROUTE_KEYS)
    if not isinstance(node, yaml.MappingNode):
        return None
    for required in _REQUIRED_ROUTE_KEYS:
        if required not in keys:
            reader.error(node, f"route is missing {required!r}")
    name = reader.string(keys["name"], "route name") if "name" in keys else None
    template = reader.string(keys["template"], "template") if "template" in keys else None
    path = None
    if "match" in keys:
        match = reader.mapping(keys["match"], "match", _MATCH_KEYS)
        if "path" in match:
            path = reader.string(match["path"], "match.path")
            if path is not None and not path.startswith("/"):
                reader.error(match["path"], f"match.path must start with '/', not {path!r}")
                path = None
        elif isinstance(keys["match"], yaml.MappingNode):
            reader.error(keys["match"], "match needs a `path`")
    filters = _filters(reader, keys["filters"]) if "filters" in keys else ()
    if name is None or template is None or path is None or filters is None:
        return None
    return RouteSpec(
        name=name,
        line=node.start_mark.line + 1,
        path=path,
        path_line=match["path"].start_mark.line + 1,
        template=template,
        template_line=keys["template"].start_mark.line + 1,
        filters=filters,
    )


def _filters(reader: _Reader, node: yaml.Node) -> tuple[FilterSpec, ...] | None:
    if not isinstance(node, yaml.SequenceNode):
        reader.error(node, "filters must be a list of one-key mappings, e.g. - set_response_header: {...}")
        return None
    specs: list[FilterSpec] = []
    for item in node.value:
        if not isinstance(item, yaml.MappingNode) or len(item.value) != 1:
            reader.error(item, "each filter is a mapping with exactly one key: the filter's name")
            continue
        key, value = item.value[0]
        specs.append(FilterSpec(name=str(key.value), value=_plain(value), line=key.start_mark.line + 1))
    return tuple(specs) if len(specs) == len(node.value) else None


def _plain(node: yaml.Node) -> Any:
    """Node → str / list / dict, every scalar as its text (filter arguments are strings)."""
    if isinstance(node, yaml.MappingNode):
        return {str(k.value): _plain(v) for k, v in node.value}
    if isinstance(node, yaml.SequenceNode):
        return [_plain(v) for v in node.value]
    return None if _is_null(node) else str(node.value)
