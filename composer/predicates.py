"""Route predicates: small frozen types registered by their `match:` key in `PREDICATES`.

As in Skipper, each predicate type is a spec that declares, in its own class, everything
config needs: its `key` in `match:`, its `kind` (the route's one `path`, its `methods`, or a
yes/no `condition` on the request) and what it `takes` (a `Param`). `parse_match` reads a
route's `match:` through the registry alone, so adding a predicate is one class here and
its name in `PREDICATES`. A predicate is created once per route from its YAML value and
then only answers `match`: the per-request work is a dict lookup or one precompiled regex.

Paths are matched against the raw request path (still percent-encoded, never normalised):
what is matched is exactly what a backend would receive.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Generic, Literal, Self, TypeVar

import yaml
from aiohttp import web

from .headers import TOKEN
from .nodes import Reader, plain

__all__ = ["PREDICATES", "Condition", "CookiesPredicate", "HeadersPredicate", "HostPredicate",
           "MethodsPredicate", "Param", "PathPredicate", "PathPrefixPredicate", "Predicate", "compile_path",
           "host_of", "parse_match", "shown", "within"]

T = TypeVar("T")

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::([^{}]*(?:\{[^{}]*\}[^{}]*)*))?\}")
_METHOD = re.compile(r"[A-Z][A-Z0-9_-]*")


def shown(value: object, limit: int = 60) -> str:
    """`repr(value)`, cut short: a message quotes what it refuses without quoting a whole file."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True, slots=True)
class Param(Generic[T]):
    """What a predicate or a filter takes in YAML: in words, and as the check that reads it.

    `read` gets the plain YAML value (text, list or mapping; scalars as text) and returns
    what the type is built from, None when the value is not that kind of thing at all
    (then the message is `takes <text>, not <value>`), or raises ValueError naming a
    narrower problem. It runs once per route, at load.
    """

    text: str  # "a mapping of header names to values": for messages and docs
    read: Callable[[Any], T | None]

    def parse(self, value: object) -> T:
        result = self.read(value)
        if result is None:
            raise ValueError(f"takes {self.text}, not {shown(value)}")
        return result


PredicateKind = Literal["path", "methods", "condition"]


class Predicate(ABC):
    """The spec every predicate type declares: its `match:` key, its kind, what it takes."""

    __slots__ = ()
    key: ClassVar[str]
    kind: ClassVar[PredicateKind]
    takes: ClassVar[Param[Any]]

    @classmethod
    @abstractmethod
    def create(cls, value: object) -> Self:
        """Check the YAML value (ValueError names the problem) and build the predicate once."""


class Condition(Predicate):
    """A predicate that only says yes or no about a request (host, headers, cookies)."""

    __slots__ = ()
    kind: ClassVar[PredicateKind] = "condition"

    @abstractmethod
    def match(self, request: web.BaseRequest) -> bool: ...


def compile_path(pattern: str) -> tuple[re.Pattern[str], tuple[str, ...]]:
    """Turn a route path into a regex over the raw (still percent-encoded) request path.

    `/products/{sku}/{rest:.*}` → `^/products/(?P<sku>[^/]+)/(?P<rest>.*)$`, ("sku", "rest").
    `{name}` is one non-empty segment; `{name:regex}` uses the given regex. Raises
    ValueError naming the problem (bad regex, repeated name).
    """
    parts: list[str] = []
    names: list[str] = []
    pos = 0
    for m in _PARAM.finditer(pattern):
        parts.append(re.escape(pattern[pos:m.start()]))
        name, regex = m.group(1), m.group(2)
        if name in names:
            raise ValueError(f"path parameter {{{name}}} appears twice")
        names.append(name)
        if regex is not None:
            try:
                re.compile(regex)
            except re.error as exc:
                raise ValueError(f"invalid regex in {{{name}:{regex}}}: {exc}") from None
        parts.append(f"(?P<{name}>{regex if regex is not None else '[^/]+'})")
        pos = m.end()
    rest = pattern[pos:]
    if "{" in rest or "}" in rest:
        raise ValueError(f"malformed parameter in path {pattern!r}")
    parts.append(re.escape(rest))
    try:  # a regex valid alone can fail in place: `(?i)` mid-pattern, a named group clashing
        return re.compile("^" + "".join(parts) + "$"), tuple(names)
    except re.error as exc:
        raise ValueError(f"invalid regex in path {pattern!r}: {exc}") from None


def within(path: str, prefix: str) -> bool:
    """`path` is `prefix` or below it, in whole segments: /api/x is within /api, /apix is not.

    `prefix` has no trailing slash ("" is the root). Shared by path_prefix and strip_prefix,
    so what a route matches and what it strips can never disagree.
    """
    return path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/")


def _read_path(value: object) -> str | None:
    return value if isinstance(value, str) and value.startswith("/") else None


_PATH = Param("a path starting with '/'", _read_path)


def _literal(pattern: str) -> tuple[str, ...]:
    """The leading segments of a path pattern that hold no parameter, for the route index."""
    literal: list[str] = []
    for segment in pattern[1:].split("/"):
        if "{" in segment:
            break
        literal.append(segment)
    return tuple(literal)


@dataclass(frozen=True, slots=True)
class PathPredicate(Predicate):
    """`path`: the whole raw path must match; captures (raw) become the route's params."""

    key: ClassVar[str] = "path"
    kind: ClassVar[PredicateKind] = "path"
    takes: ClassVar[Param[str]] = _PATH
    pattern: str
    regex: re.Pattern[str]
    params: tuple[str, ...]
    literal: tuple[str, ...]  # leading segments without parameters, for the route index

    @classmethod
    def create(cls, value: object) -> Self:
        pattern = cls.takes.parse(value)
        regex, params = compile_path(pattern)
        return cls(pattern=pattern, regex=regex, params=params, literal=_literal(pattern))

    def match(self, path: str) -> dict[str, str] | None:
        m = self.regex.match(path)
        return None if m is None else m.groupdict()


@dataclass(frozen=True, slots=True)
class PathPrefixPredicate(Predicate):
    """`path_prefix`: whole leading segments — `/api` matches /api and /api/x, not /apix."""

    key: ClassVar[str] = "path_prefix"
    kind: ClassVar[PredicateKind] = "path"
    takes: ClassVar[Param[str]] = _PATH
    prefix: str  # without a trailing slash; "" for "/"
    literal: tuple[str, ...]
    params: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def create(cls, value: object) -> Self:
        prefix = cls.takes.parse(value).rstrip("/")
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"{shown(value)}: a prefix is literal; use match.path with {{name:regex}} for parameters")
        return cls(prefix=prefix, literal=tuple(prefix[1:].split("/")) if prefix else ())

    def match(self, path: str) -> dict[str, str] | None:
        return {} if within(path, self.prefix) else None


def _read_methods(value: object) -> frozenset[str] | None:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names:
        return None
    methods = set()
    for name in names:
        if not isinstance(name, str) or not _METHOD.fullmatch(name.upper()):
            raise ValueError(f"{shown(name)} is not an HTTP method")
        methods.add(name.upper())
    return frozenset(methods)


@dataclass(frozen=True, slots=True)
class MethodsPredicate(Predicate):
    """`methods`: the request methods a route answers; any other gets 405 with `Allow`."""

    key: ClassVar[str] = "methods"
    kind: ClassVar[PredicateKind] = "methods"
    takes: ClassVar[Param[frozenset[str]]] = Param("a method or a list of methods, e.g. [GET, HEAD]",
                                                   _read_methods)
    methods: frozenset[str]

    @classmethod
    def create(cls, value: object) -> Self:
        return cls(methods=cls.takes.parse(value))


def host_of(request: web.BaseRequest) -> str:
    """The Host header without its port, lower-cased ("" when absent).

    A fully qualified name's trailing dot is dropped: `a.example.com.` is the same host as
    `a.example.com`, and must not slip past a route meant for it.
    """
    host = request.headers.get("host", "")
    if host.startswith("["):
        return host[: host.find("]") + 1].lower()
    return host.partition(":")[0].lower().removesuffix(".")


def _read_host(value: object) -> str | None:
    if not isinstance(value, str) or not value or any(c in value for c in "/@ \t"):
        return None
    glob = value.lower()
    if ":" in (glob.rpartition("]")[2] if glob.startswith("[") else glob):
        # the port is stripped before matching, so a glob with one could never match
        raise ValueError(f"{shown(value)}: leave the port out, it is ignored")
    return glob


@dataclass(frozen=True, slots=True)
class HostPredicate(Condition):
    """`host`: a glob (`*.example.com`) on the Host header, port ignored, case-insensitive.

    Only `*` and `?` are wildcards: `[` and `]` are literal, so an IPv6 literal such as
    `[::1]` matches itself instead of being read as a character class.
    """

    key: ClassVar[str] = "host"
    takes: ClassVar[Param[str]] = Param("a host name or a glob such as '*.example.com'", _read_host)
    glob: str
    regex: re.Pattern[str]

    @classmethod
    def create(cls, value: object) -> Self:
        glob = cls.takes.parse(value)
        regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in glob)
        return cls(glob=glob, regex=re.compile(f"(?s:{regex})"))

    def match(self, request: web.BaseRequest) -> bool:
        return self.regex.fullmatch(host_of(request)) is not None


def _read_pairs(value: object) -> tuple[tuple[str, str], ...] | None:
    """A non-empty mapping of names to strings, in file order."""
    if not isinstance(value, dict) or not value:
        return None
    for name, text in value.items():
        if not isinstance(text, str):
            raise ValueError(f"the value of {shown(name)} must be a string")  # noqa: TRY004 - a config error
    return tuple(value.items())


def _read_header_pairs(value: object) -> tuple[tuple[str, str], ...] | None:
    pairs = _read_pairs(value)
    for name, _ in pairs or ():
        if not TOKEN.fullmatch(name):
            raise ValueError(f"{shown(name)} is not a valid header name")
    return pairs


@dataclass(frozen=True, slots=True)
class HeadersPredicate(Condition):
    """`headers`: each header equals its value, or, for `~regex`, contains a match (like Skipper's HeaderRegexp)."""

    key: ClassVar[str] = "headers"
    takes: ClassVar[Param[tuple[tuple[str, str], ...]]] = Param(
        "a mapping of header names to values ('~regex' for a regex)", _read_header_pairs)
    exact: tuple[tuple[str, str], ...]
    regexes: tuple[tuple[str, re.Pattern[str]], ...]

    @classmethod
    def create(cls, value: object) -> Self:
        exact, regexes = [], []
        for name, text in cls.takes.parse(value):
            if text.startswith("~"):
                try:
                    regexes.append((name, re.compile(text[1:])))
                except re.error as exc:
                    raise ValueError(f"invalid regex for {name!r}: {exc}") from None
            else:
                exact.append((name, text))
        return cls(exact=tuple(exact), regexes=tuple(regexes))

    def match(self, request: web.BaseRequest) -> bool:
        headers = request.headers
        for name, text in self.exact:
            if headers.get(name) != text:
                return False
        for name, regex in self.regexes:
            found = headers.get(name)
            if found is None or regex.search(found) is None:
                return False
        return True


@dataclass(frozen=True, slots=True)
class CookiesPredicate(Condition):
    """`cookies`: each named cookie is present with exactly this value."""

    key: ClassVar[str] = "cookies"
    takes: ClassVar[Param[tuple[tuple[str, str], ...]]] = Param("a mapping of cookie names to values", _read_pairs)
    cookies: tuple[tuple[str, str], ...]

    @classmethod
    def create(cls, value: object) -> Self:
        return cls(cookies=cls.takes.parse(value))

    def match(self, request: web.BaseRequest) -> bool:
        if "cookie" not in request.headers:
            return False
        jar = request.cookies
        return all(jar.get(name) == text for name, text in self.cookies)


PREDICATES: Mapping[str, type[Predicate]] = MappingProxyType({p.key: p for p in (
    PathPredicate, PathPrefixPredicate, MethodsPredicate, HostPredicate, HeadersPredicate, CookiesPredicate)})
"""Every predicate type by its `match:` key, in the order `known:` lists them."""


def _keys(kind: PredicateKind) -> list[str]:
    return [f"`{key}`" for key, spec in PREDICATES.items() if spec.kind == kind]


def parse_match(reader: Reader, node: yaml.Node) -> tuple[PathPredicate | PathPrefixPredicate | None,
                                                          frozenset[str] | None, tuple[Condition, ...]]:
    """A route's `match:` → (its path predicate, its methods or None for any, its conditions).

    Every problem is reported through `reader` at its line; whatever is broken comes back
    as None (or left out), so the rest of the route is still checked.
    """
    path: PathPredicate | PathPrefixPredicate | None = None
    methods: frozenset[str] | None = None
    conditions: list[Condition] = []
    if not isinstance(node, yaml.MappingNode) or not node.value:
        reader.error(node, "match must be a mapping of predicates, e.g. {path: /products/{sku}}")
        return None, None, ()
    seen: set[str] = set()
    for key_node, value_node in node.value:
        key = str(key_node.value)
        spec = PREDICATES.get(key)
        if spec is None:
            reader.error(key_node, f"unknown predicate {key!r} in match (known: {', '.join(PREDICATES)})")
            continue
        if key in seen:
            reader.error(key_node, f"duplicate key {key!r} in match")
            continue
        seen.add(key)
        try:
            predicate = spec.create(plain(value_node))
        except ValueError as exc:
            reader.error(key_node, f"match.{key}: {exc}")
            continue
        if isinstance(predicate, (PathPredicate, PathPrefixPredicate)):
            if path is not None:
                reader.error(key_node, f"match takes one of {' and '.join(_keys('path'))}, not both")
            path = predicate
        elif isinstance(predicate, MethodsPredicate):
            methods = predicate.methods
        elif isinstance(predicate, Condition):
            conditions.append(predicate)
    if path is None and not any(PREDICATES[key].kind == "path" for key in seen):
        reader.error(node, f"match needs a {' or a '.join(_keys('path'))}")
    return path, methods, tuple(conditions)
