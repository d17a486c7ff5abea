"""Route filters: small frozen types registered by their YAML key in `FILTERS`.

As in Skipper, each filter type is a spec that declares, in its own class, everything
config needs: its `key` in `filters:`, its kind (it is a `RequestFilter`, editing the
request a backend receives — backend routes only — or a `ResponseFilter`, editing the
status and headers of every response of the route) and what it `takes` (a `Param`).
`parse_filters` reads a route's `filters:` through the registry alone, so adding a filter
is one class here and its name in `FILTERS`.

A filter is created once per route and shared by every request of the route, so it holds
no per-request state. Filters run in file order: request filters through `on_request`,
response filters through `apply_response`, the one place a response's status and headers
pass through them.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Literal, Self
from urllib.parse import quote

import yaml
from multidict import CIMultiDict

from .headers import TOKEN
from .nodes import Reader, plain
from .predicates import Param, shown, within

__all__ = [
    "FILTERS",
    "Filter",
    "Outgoing",
    "PathTemplate",
    "RemoveRequestHeader",
    "RemoveResponseHeader",
    "RequestFilter",
    "ResponseFilter",
    "ResponseHead",
    "RewritePath",
    "SetPath",
    "SetRequestHeader",
    "SetResponseHeader",
    "Status",
    "StripPrefix",
    "apply_response",
    "parse_filters",
]

# Framing and connection headers belong to the server; a filter setting them would break
# the message on the wire.
_RESERVED = frozenset({"connection", "content-length", "keep-alive", "transfer-encoding", "trailer",
                       "upgrade", "proxy-connection", "te"})
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Characters a request path may carry as they are; anything else in a parameter is quoted.
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
# In a query, a parameter must not add parameters: `&`, `=`, `;` and `+` are quoted too.
_PARAM_IN_QUERY_SAFE = "/%:@!$'()*,-._~"
# Go/Skipper replacement syntax: $1, ${1}, ${name}, $$.
_GO_REF = re.compile(r"\$(?:\$|(\d+)|\{(\w+)\}|([A-Za-z_]\w*))")


@dataclass(slots=True)
class Outgoing:
    """The request a backend will receive, as the request filters edit it."""

    path: str  # raw (percent-encoded) path, without the query
    headers: CIMultiDict[str]
    params: Mapping[str, str]  # raw captures of the route's path


@dataclass(slots=True)
class ResponseHead:
    """A response's status and headers, as the response filters edit them before they are sent."""

    status: int
    headers: CIMultiDict[str]


FilterKind = Literal["request", "response"]


class Filter(ABC):
    """The spec every filter type declares: its YAML key, its kind, what it takes."""

    __slots__ = ()
    key: ClassVar[str]
    kind: ClassVar[FilterKind]
    takes: ClassVar[Param[Any]]

    @classmethod
    @abstractmethod
    def create(cls, value: object) -> Self:
        """Check the YAML value (ValueError names the problem) and build the filter once."""

    @property
    def path_params(self) -> tuple[str, ...]:
        """The route path's `{param}`s this filter fills in: each must be one the path defines."""
        return ()


class RequestFilter(Filter):
    """A filter that edits the request sent to the backend (backend routes only)."""

    __slots__ = ()
    kind: ClassVar[FilterKind] = "request"

    @abstractmethod
    def on_request(self, out: Outgoing) -> None: ...


class ResponseFilter(Filter):
    """A filter that edits the status and headers of every response of its route."""

    __slots__ = ()
    kind: ClassVar[FilterKind] = "response"

    @abstractmethod
    def on_response(self, head: ResponseHead) -> None: ...


def apply_response(filters: Sequence[ResponseFilter], status: int, headers: CIMultiDict[str]) -> int:
    """Run a route's response filters, in file order, over a response about to be sent.

    The one way out for every response of a route — page, proxied answer, error page,
    redirect — so each filter sees them all. `headers` is edited in place; the status to
    send is returned.
    """
    if not filters:
        return status
    head = ResponseHead(status, headers)
    for f in filters:
        f.on_response(head)
    return head.status


@dataclass(frozen=True, slots=True)
class PathTemplate:
    """`/v1/{rest}`: literal text with `{param}` holes filled from the request's raw captures.

    Captures are inserted still percent-encoded, so `%2F` stays `%2F` and nothing a user
    sends can add a query, a fragment or an authority to the result.
    """

    text: str
    parts: tuple[str, ...]  # literal, name, literal, name, ..., literal
    safe: tuple[str, ...]  # per name: what may stay unquoted where it lands (path or query)

    @classmethod
    def parse(cls, text: str) -> PathTemplate:
        pieces = _PLACEHOLDER.split(text)
        if any("{" in p or "}" in p for p in pieces[::2]):
            raise ValueError(f"malformed {{param}} in {text!r}")
        safe = tuple(_PARAM_IN_QUERY_SAFE if "?" in "".join(pieces[:i:2]) else _PATH_SAFE
                     for i in range(1, len(pieces), 2))
        return cls(text=text, parts=tuple(pieces), safe=safe)

    @property
    def params(self) -> tuple[str, ...]:
        return self.parts[1::2]

    def render(self, params: Mapping[str, str]) -> str:
        parts = self.parts
        if len(parts) == 1:
            return parts[0]
        out = [parts[0]]
        for i in range(1, len(parts), 2):
            out.append(quote(params.get(parts[i], ""), safe=self.safe[i // 2]))
            out.append(parts[i + 1])
        return "".join(out)


# --------------------------------------------------------------------------- what filters take

def _header_name(name: object) -> str:
    if not isinstance(name, str) or not TOKEN.fullmatch(name):
        raise ValueError(f"{shown(name)} is not a valid header name")
    if name.lower() in _RESERVED:
        raise ValueError(f"header {name!r} is set by composer itself and cannot be changed by a filter")
    return name.lower()


def _read_header_values(value: object) -> tuple[tuple[str, str], ...] | None:
    if not isinstance(value, dict) or not value:
        return None
    pairs = []
    for name, text in value.items():
        if not isinstance(text, str) or "\r" in text or "\n" in text or "\x00" in text:
            raise ValueError(f"the value of {shown(name)} must be a one-line string")
        pairs.append((_header_name(name), text))
    return tuple(pairs)


def _read_header_names(value: object) -> tuple[str, ...] | None:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names:
        return None
    return tuple(_header_name(n) for n in names)


def _read_path(value: object) -> str | None:
    if not isinstance(value, str) or not value.startswith("/"):
        return None
    if any(c in value for c in "?#\\ \t\r\n\x00"):
        raise ValueError(f"{shown(value)} must be a plain path (no query, fragment or spaces)")
    return value


def _read_rewrite(value: object) -> tuple[re.Pattern[str], str] | None:
    """{pattern, replacement} → the compiled regex and the replacement in Python's syntax."""
    if not isinstance(value, dict) or set(value) != {"pattern", "replacement"}:
        return None
    pattern, replacement = value["pattern"], value["replacement"]
    if not isinstance(pattern, str) or not pattern:
        raise ValueError("pattern must be a non-empty regex")
    if not isinstance(replacement, str):
        replacement = "" if replacement is None else str(replacement)
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"invalid regex {shown(pattern)}: {exc}") from None
    python = _GO_REF.sub(_to_python_ref, replacement.replace("\\", "\\\\"))
    try:
        regex.sub(python, "")  # Python checks the group references here, once
    except (re.error, IndexError) as exc:
        raise ValueError(f"replacement {shown(replacement)} refers to a missing group ({exc})") from None
    return regex, python


def _to_python_ref(m: re.Match[str]) -> str:
    group = m.group(1) or m.group(2) or m.group(3)
    return "$" if group is None else f"\\g<{group}>"


# Statuses whose message has no body (RFC 9110 §15): composer always sends one (a page, an
# error page, a backend's bytes), so a filter setting them would break the framing.
_BODILESS = frozenset({204, 205, 304})


def _read_status(value: object) -> int | None:
    if not isinstance(value, str) or not value.isascii() or not value.isdigit() or len(value) != 3:
        return None
    status = int(value)
    return status if 200 <= status <= 599 and status not in _BODILESS else None


_HEADER_VALUES = Param("a mapping of header names to one-line values", _read_header_values)
_HEADER_NAMES = Param("a header name or a list of them", _read_header_names)
_PATH = Param("a path starting with '/'", _read_path)


# --------------------------------------------------------------------------- response filters

@dataclass(frozen=True, slots=True)
class SetResponseHeader(ResponseFilter):
    """`set_response_header: {name: value, ...}` replaces those headers on every response."""

    key: ClassVar[str] = "set_response_header"
    takes: ClassVar[Param[tuple[tuple[str, str], ...]]] = _HEADER_VALUES
    headers: tuple[tuple[str, str], ...]

    @classmethod
    def create(cls, value: object) -> Self:
        return cls(headers=cls.takes.parse(value))

    def on_response(self, head: ResponseHead) -> None:
        for name, value in self.headers:
            head.headers[name] = value


@dataclass(frozen=True, slots=True)
class RemoveResponseHeader(ResponseFilter):
    """`remove_response_header: name` (or a list of names) drops those headers."""

    key: ClassVar[str] = "remove_response_header"
    takes: ClassVar[Param[tuple[str, ...]]] = _HEADER_NAMES
    names: tuple[str, ...]

    @classmethod
    def create(cls, value: object) -> Self:
        return cls(names=cls.takes.parse(value))

    def on_response(self, head: ResponseHead) -> None:
        for name in self.names:
            head.headers.popall(name, None)


@dataclass(frozen=True, slots=True)
class Status(ResponseFilter):
    """`status: 418` sets the status of every response of the route (as Skipper's `status`),
    error pages included: a maintenance page answers 503, a retired API 410."""

    key: ClassVar[str] = "status"
    takes: ClassVar[Param[int]] = Param("a status code from 200 to 599 other than 204, 205 and 304 "
                                        "(they have no body)", _read_status)
    status: int

    @classmethod
    def create(cls, value: object) -> Self:
        return cls(status=cls.takes.parse(value))

    def on_response(self, head: ResponseHead) -> None:
        head.status = self.status


# --------------------------------------------------------------------------- request filters

@dataclass(frozen=True, slots=True)
class SetRequestHeader(RequestFilter):
    """`set_request_header: {name: value, ...}` replaces those headers on the backend request."""

    key: ClassVar[str] = "set_request_header"
    takes: ClassVar[Param[tuple[tuple[str, str], ...]]] = _HEADER_VALUES
    headers: tuple[tuple[str, str], ...]

    @classmethod
    def create(cls, value: object) -> Self:
        return cls(headers=cls.takes.parse(value))

    def on_request(self, out: Outgoing) -> None:
        for name, value in self.headers:
            out.headers[name] = value


@dataclass(frozen=True, slots=True)
class RemoveRequestHeader(RequestFilter):
    """`remove_request_header: name` (or a list) keeps those headers from the backend."""

    key: ClassVar[str] = "remove_request_header"
    takes: ClassVar[Param[tuple[str, ...]]] = _HEADER_NAMES
    names: tuple[str, ...]

    @classmethod
    def create(cls, value: object) -> Self:
        return cls(names=cls.takes.parse(value))

    def on_request(self, out: Outgoing) -> None:
        for name in self.names:
            out.headers.popall(name, None)


@dataclass(frozen=True, slots=True)
class StripPrefix(RequestFilter):
    """`strip_prefix: /api` turns /api/cart into /cart (whole segments; other paths unchanged)."""

    key: ClassVar[str] = "strip_prefix"
    takes: ClassVar[Param[str]] = _PATH
    prefix: str

    @classmethod
    def create(cls, value: object) -> Self:
        prefix = cls.takes.parse(value).rstrip("/")
        if not prefix:
            raise ValueError("'/' strips nothing")
        return cls(prefix=prefix)

    def on_request(self, out: Outgoing) -> None:
        if within(out.path, self.prefix):
            out.path = out.path[len(self.prefix):] or "/"


@dataclass(frozen=True, slots=True)
class SetPath(RequestFilter):
    """`set_path: /v1/items/{id}` replaces the path; `{param}`s come from the route's path."""

    key: ClassVar[str] = "set_path"
    takes: ClassVar[Param[str]] = _PATH
    template: PathTemplate

    @classmethod
    def create(cls, value: object) -> Self:
        return cls(template=PathTemplate.parse(cls.takes.parse(value)))

    @property
    def path_params(self) -> tuple[str, ...]:
        return self.template.params

    def on_request(self, out: Outgoing) -> None:
        path = self.template.render(out.params)
        out.path = path if path.startswith("/") else "/" + path


@dataclass(frozen=True, slots=True)
class RewritePath(RequestFilter):
    """`rewrite_path: {pattern, replacement}`: regex substitution on the raw path.

    The replacement uses Skipper's (Go's) syntax — `$1`, `${1}`, `${name}`, `$$` — so
    routes move over from Skipper unchanged.
    """

    key: ClassVar[str] = "rewrite_path"
    takes: ClassVar[Param[tuple[re.Pattern[str], str]]] = Param(
        "{pattern: <regex>, replacement: <text>}", _read_rewrite)
    regex: re.Pattern[str]
    replacement: str  # translated to Python's \\g<…> syntax

    @classmethod
    def create(cls, value: object) -> Self:
        regex, replacement = cls.takes.parse(value)
        return cls(regex=regex, replacement=replacement)

    def on_request(self, out: Outgoing) -> None:
        path = self.regex.sub(self.replacement, out.path)
        out.path = path if path.startswith("/") else "/" + path


FILTERS: Mapping[str, type[Filter]] = MappingProxyType({f.key: f for f in (
    StripPrefix, SetPath, RewritePath, SetRequestHeader, RemoveRequestHeader,
    SetResponseHeader, RemoveResponseHeader, Status)})
"""Every filter type by its YAML key, in the order `known:` lists them."""


def _keys(kind: FilterKind) -> str:
    return ", ".join(key for key, spec in FILTERS.items() if spec.kind == kind)


def parse_filters(reader: Reader, node: yaml.Node, params: tuple[str, ...], target: str | None = None,
                  ) -> tuple[tuple[RequestFilter, ...], tuple[ResponseFilter, ...]]:
    """A route's `filters:` → its request filters and its response filters, each in file order.

    `params` are the `{param}`s the route's path defines; `target` is what the route is
    (`template`, `backend`, `redirect`; None: the caller checks): only a backend route takes
    request filters. Every problem is reported through `reader` at its line, and the broken
    filter left out.
    """
    if not isinstance(node, yaml.SequenceNode):
        reader.error(node, "filters must be a list of one-key mappings, e.g. - set_response_header: {...}")
        return (), ()
    request: list[RequestFilter] = []
    response: list[ResponseFilter] = []
    for item in node.value:
        if not isinstance(item, yaml.MappingNode) or len(item.value) != 1:
            reader.error(item, "each filter is a mapping with exactly one key: the filter's name")
            continue
        key_node, value_node = item.value[0]
        key = str(key_node.value)
        spec = FILTERS.get(key)
        if spec is None:
            reader.error(key_node, f"unknown filter {key!r} (known: {', '.join(FILTERS)})")
            continue
        try:
            made = spec.create(plain(value_node))
        except ValueError as exc:
            reader.error(key_node, f"{key}: {exc}")
            continue
        unknown = [p for p in made.path_params if p not in params]
        if unknown:
            reader.error(key_node, f"{key}: {{{unknown[0]}}} is not a parameter of the route's path")
        elif isinstance(made, ResponseFilter):
            response.append(made)
        elif target not in (None, "backend"):
            reader.error(key_node, f"{key} is a {made.kind} filter, for backend routes only: a {target} route "
                                   f"takes response filters only ({_keys('response')})")
        elif isinstance(made, RequestFilter):
            request.append(made)
    return tuple(request), tuple(response)
