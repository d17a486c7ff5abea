"""Route predicates: small frozen types registered by their `match:` key in `PREDICATES`.

As in Skipper, each is created once per route from its YAML value (`create` checks the
value and raises ValueError naming the problem) and then only answers `match`, so the
per-request work is a dict lookup or one precompiled regex. Adding a predicate is a class
and a `PREDICATES` entry; `routing` treats every predicate that is not about the path or
the method as a plain yes/no `Condition`.

Paths are matched against the raw request path (still percent-encoded, never normalised):
what is matched is exactly what a backend would receive.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from aiohttp import web

__all__ = ["PREDICATES", "Condition", "CookiesPredicate", "HeadersPredicate", "HostPredicate",
           "MethodsPredicate", "PathPredicate", "PathPrefixPredicate", "compile_path", "host_of", "within"]

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::([^{}]*(?:\{[^{}]*\}[^{}]*)*))?\}")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_METHOD = re.compile(r"[A-Z][A-Z0-9_-]*")


class Condition(Protocol):
    """A predicate that only says yes or no about a request (host, headers, cookies)."""

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


def _path_value(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"{key} must be a string starting with '/', not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class PathPredicate:
    """`path`: the whole raw path must match; captures (raw) become the route's params."""

    key: ClassVar[str] = "path"
    pattern: str
    regex: re.Pattern[str]
    params: tuple[str, ...]
    literal: tuple[str, ...]  # leading segments without parameters, for the route index

    @classmethod
    def create(cls, value: Any) -> PathPredicate:
        pattern = _path_value(value, "match.path")
        regex, params = compile_path(pattern)
        literal: list[str] = []
        for segment in pattern[1:].split("/"):
            if "{" in segment:
                break
            literal.append(segment)
        return cls(pattern=pattern, regex=regex, params=params, literal=tuple(literal))

    def match(self, path: str) -> dict[str, str] | None:
        m = self.regex.match(path)
        return None if m is None else m.groupdict()


@dataclass(frozen=True, slots=True)
class PathPrefixPredicate:
    """`path_prefix`: whole leading segments — `/api` matches /api and /api/x, not /apix."""

    key: ClassVar[str] = "path_prefix"
    prefix: str  # without a trailing slash; "" for "/"
    literal: tuple[str, ...]
    params: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def create(cls, value: Any) -> PathPrefixPredicate:
        prefix = _path_value(value, "match.path_prefix").rstrip("/")
        if "{" in prefix or "}" in prefix:
            raise ValueError("match.path_prefix is literal; use match.path with {name:regex} for parameters")
        return cls(prefix=prefix, literal=tuple(prefix[1:].split("/")) if prefix else ())

    def match(self, path: str) -> dict[str, str] | None:
        return {} if within(path, self.prefix) else None


@dataclass(frozen=True, slots=True)
class MethodsPredicate:
    """`methods`: the request methods a route answers; any other gets 405 with `Allow`."""

    key: ClassVar[str] = "methods"
    methods: frozenset[str]

    @classmethod
    def create(cls, value: Any) -> MethodsPredicate:
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not names:
            raise ValueError("match.methods takes a list of methods, e.g. [GET, HEAD]")
        methods = set()
        for name in names:
            if not isinstance(name, str) or not _METHOD.fullmatch(name.upper()):
                raise ValueError(f"{name!r} is not an HTTP method")
            methods.add(name.upper())
        return cls(methods=frozenset(methods))


def host_of(request: web.BaseRequest) -> str:
    """The Host header without its port, lower-cased ("" when absent).

    A fully qualified name's trailing dot is dropped: `a.example.com.` is the same host as
    `a.example.com`, and must not slip past a route meant for it.
    """
    host = request.headers.get("host", "")
    if host.startswith("["):
        return host[: host.find("]") + 1].lower()
    return host.partition(":")[0].lower().removesuffix(".")


@dataclass(frozen=True, slots=True)
class HostPredicate:
    """`host`: a glob (`*.example.com`) on the Host header, port ignored, case-insensitive.

    Only `*` and `?` are wildcards: `[` and `]` are literal, so an IPv6 literal such as
    `[::1]` matches itself instead of being read as a character class.
    """

    key: ClassVar[str] = "host"
    glob: str
    regex: re.Pattern[str]

    @classmethod
    def create(cls, value: Any) -> HostPredicate:
        if not isinstance(value, str) or not value or any(c in value for c in "/@ \t"):
            raise ValueError(f"match.host must be a host name or glob such as '*.example.com', not {value!r}")
        glob = value.lower()
        if ":" in (glob.rpartition("]")[2] if glob.startswith("[") else glob):
            # the port is stripped before matching, so a glob with one could never match
            raise ValueError(f"match.host {value!r}: leave the port out, it is ignored")
        regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in glob)
        return cls(glob=glob, regex=re.compile(f"(?s:{regex})"))

    def match(self, request: web.BaseRequest) -> bool:
        return self.regex.fullmatch(host_of(request)) is not None


def _pairs(value: Any, key: str) -> dict[str, str]:
    if not isinstance(value, dict) or not value:
        raise ValueError(f"match.{key} takes a mapping of names to values")
    for name, text in value.items():
        if not isinstance(text, str):
            raise ValueError(f"match.{key}: the value of {name!r} must be a string")  # noqa: TRY004 - a config error
    return value


@dataclass(frozen=True, slots=True)
class HeadersPredicate:
    """`headers`: each header equals its value, or, for `~regex`, contains a match (like Skipper's HeaderRegexp)."""

    key: ClassVar[str] = "headers"
    exact: tuple[tuple[str, str], ...]
    regexes: tuple[tuple[str, re.Pattern[str]], ...]

    @classmethod
    def create(cls, value: Any) -> HeadersPredicate:
        exact, regexes = [], []
        for name, text in _pairs(value, "headers").items():
            if not _TOKEN.fullmatch(name):
                raise ValueError(f"match.headers: {name!r} is not a valid header name")
            if text.startswith("~"):
                try:
                    regexes.append((name, re.compile(text[1:])))
                except re.error as exc:
                    raise ValueError(f"match.headers: invalid regex for {name!r}: {exc}") from None
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
class CookiesPredicate:
    """`cookies`: each named cookie is present with exactly this value."""

    key: ClassVar[str] = "cookies"
    cookies: tuple[tuple[str, str], ...]

    @classmethod
    def create(cls, value: Any) -> CookiesPredicate:
        return cls(cookies=tuple(_pairs(value, "cookies").items()))

    def match(self, request: web.BaseRequest) -> bool:
        if "cookie" not in request.headers:
            return False
        jar = request.cookies
        return all(jar.get(name) == text for name, text in self.cookies)


PREDICATES: Mapping[str, type[Any]] = {p.key: p for p in (
    PathPredicate, PathPrefixPredicate, MethodsPredicate, HostPredicate, HeadersPredicate, CookiesPredicate)}
