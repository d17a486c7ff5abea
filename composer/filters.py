"""Route filters: small frozen types registered by their YAML key in `FILTERS`.

As in Skipper, a filter is created once per route from its YAML value (`create` checks
the arguments and raises ValueError naming the problem) and is then shared by every
request of the route, so it holds no per-request state. A filter edits either the request
a backend receives (`on_request`: backend routes only) or the headers of the route's
responses (`on_response`: every kind of route). Filters run in file order. Adding one is
a class and a `FILTERS` entry.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol
from urllib.parse import quote

from multidict import CIMultiDict

from .predicates import within

__all__ = [
    "FILTERS",
    "Outgoing",
    "PathTemplate",
    "RemoveRequestHeader",
    "RemoveResponseHeader",
    "RequestFilter",
    "ResponseFilter",
    "RewritePath",
    "SetPath",
    "SetRequestHeader",
    "SetResponseHeader",
    "StripPrefix",
]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Framing and connection headers belong to the server; a filter setting them would break
# the message on the wire.
_RESERVED = frozenset({"connection", "content-length", "keep-alive", "transfer-encoding", "trailer",
                       "upgrade", "proxy-connection", "te"})
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Characters a request path may carry as they are; anything else in a parameter is quoted.
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"
# In a query, a parameter must not add parameters: `&`, `=`, `;` and `+` are quoted too.
_QUERY_SAFE = "/%:@!$'()*,-._~"
# Go/Skipper replacement syntax: $1, ${1}, ${name}, $$.
_GO_REF = re.compile(r"\$(?:\$|(\d+)|\{(\w+)\}|([A-Za-z_]\w*))")


@dataclass(slots=True)
class Outgoing:
    """The request a backend will receive, as the request filters edit it."""

    path: str  # raw (percent-encoded) path, without the query
    headers: CIMultiDict[str]
    params: Mapping[str, str]  # raw captures of the route's path


class RequestFilter(Protocol):
    """A filter that edits the request sent to the backend."""

    def on_request(self, out: Outgoing) -> None: ...


class ResponseFilter(Protocol):
    """A filter that edits the headers of the route's responses."""

    def on_response(self, headers: CIMultiDict[str]) -> None: ...


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
        safe = tuple(_QUERY_SAFE if "?" in "".join(pieces[:i:2]) else _PATH_SAFE
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


def _header_name(name: Any) -> str:
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        raise ValueError(f"{name!r} is not a valid header name")
    if name.lower() in _RESERVED:
        raise ValueError(f"header {name!r} is set by composer itself and cannot be changed by a filter")
    return name.lower()


def _header_pairs(value: Any, key: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{key} takes a mapping of header names to values")
    pairs = []
    for name, text in value.items():
        if not isinstance(text, str) or "\r" in text or "\n" in text or "\x00" in text:
            raise ValueError(f"the value of {name!r} must be a one-line string")
        pairs.append((_header_name(name), text))
    return tuple(pairs)


def _header_names(value: Any, key: str) -> tuple[str, ...]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names:
        raise ValueError(f"{key} takes a header name or a list of them")
    return tuple(_header_name(n) for n in names)


def _path(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"{key} takes a path starting with '/', not {value!r}")
    if any(c in value for c in "?#\\ \t\r\n\x00"):
        raise ValueError(f"{key}: {value!r} must be a plain path (no query, fragment or spaces)")
    return value


@dataclass(frozen=True, slots=True)
class SetResponseHeader:
    """`set_response_header: {name: value, ...}` replaces those headers on every response."""

    key: ClassVar[str] = "set_response_header"
    headers: tuple[tuple[str, str], ...]

    @classmethod
    def create(cls, value: Any) -> SetResponseHeader:
        return cls(headers=_header_pairs(value, cls.key))

    def on_response(self, headers: CIMultiDict[str]) -> None:
        for name, value in self.headers:
            headers[name] = value


@dataclass(frozen=True, slots=True)
class RemoveResponseHeader:
    """`remove_response_header: name` (or a list of names) drops those headers."""

    key: ClassVar[str] = "remove_response_header"
    names: tuple[str, ...]

    @classmethod
    def create(cls, value: Any) -> RemoveResponseHeader:
        return cls(names=_header_names(value, cls.key))

    def on_response(self, headers: CIMultiDict[str]) -> None:
        for name in self.names:
            headers.popall(name, None)


@dataclass(frozen=True, slots=True)
class SetRequestHeader:
    """`set_request_header: {name: value, ...}` replaces those headers on the backend request."""

    key: ClassVar[str] = "set_request_header"
    headers: tuple[tuple[str, str], ...]

    @classmethod
    def create(cls, value: Any) -> SetRequestHeader:
        return cls(headers=_header_pairs(value, cls.key))

    def on_request(self, out: Outgoing) -> None:
        for name, value in self.headers:
            out.headers[name] = value


@dataclass(frozen=True, slots=True)
class RemoveRequestHeader:
    """`remove_request_header: name` (or a list) keeps those headers from the backend."""

    key: ClassVar[str] = "remove_request_header"
    names: tuple[str, ...]

    @classmethod
    def create(cls, value: Any) -> RemoveRequestHeader:
        return cls(names=_header_names(value, cls.key))

    def on_request(self, out: Outgoing) -> None:
        for name in self.names:
            out.headers.popall(name, None)


@dataclass(frozen=True, slots=True)
class StripPrefix:
    """`strip_prefix: /api` turns /api/cart into /cart (whole segments; other paths unchanged)."""

    key: ClassVar[str] = "strip_prefix"
    prefix: str

    @classmethod
    def create(cls, value: Any) -> StripPrefix:
        prefix = _path(value, cls.key).rstrip("/")
        if not prefix:
            raise ValueError("strip_prefix: '/' strips nothing")
        return cls(prefix=prefix)

    def on_request(self, out: Outgoing) -> None:
        if within(out.path, self.prefix):
            out.path = out.path[len(self.prefix):] or "/"


@dataclass(frozen=True, slots=True)
class SetPath:
    """`set_path: /v1/items/{id}` replaces the path; `{param}`s come from the route's path."""

    key: ClassVar[str] = "set_path"
    template: PathTemplate

    @classmethod
    def create(cls, value: Any) -> SetPath:
        return cls(template=PathTemplate.parse(_path(value, cls.key)))

    @property
    def params(self) -> tuple[str, ...]:
        return self.template.params

    def on_request(self, out: Outgoing) -> None:
        path = self.template.render(out.params)
        out.path = path if path.startswith("/") else "/" + path


@dataclass(frozen=True, slots=True)
class RewritePath:
    """`rewrite_path: {pattern, replacement}`: regex substitution on the raw path.

    The replacement uses Skipper's (Go's) syntax — `$1`, `${1}`, `${name}`, `$$` — so
    routes move over from Skipper unchanged.
    """

    key: ClassVar[str] = "rewrite_path"
    regex: re.Pattern[str]
    replacement: str  # translated to Python's \\g<…> syntax

    @classmethod
    def create(cls, value: Any) -> RewritePath:
        if not isinstance(value, dict) or set(value) != {"pattern", "replacement"}:
            raise ValueError("rewrite_path takes {pattern: <regex>, replacement: <text>}")
        pattern, replacement = value["pattern"], value["replacement"]
        if not isinstance(pattern, str) or not pattern:
            raise ValueError("rewrite_path: pattern must be a non-empty regex")
        if not isinstance(replacement, str):
            replacement = "" if replacement is None else str(replacement)
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"rewrite_path: invalid regex {pattern!r}: {exc}") from None
        python = _GO_REF.sub(_to_python_ref, replacement.replace("\\", "\\\\"))
        try:
            regex.sub(python, "")  # Python checks the group references here, once
        except (re.error, IndexError) as exc:
            raise ValueError(f"rewrite_path: replacement {replacement!r} refers to a missing group ({exc})") \
                from None
        return cls(regex=regex, replacement=python)

    def on_request(self, out: Outgoing) -> None:
        path = self.regex.sub(self.replacement, out.path)
        out.path = path if path.startswith("/") else "/" + path


def _to_python_ref(m: re.Match[str]) -> str:
    group = m.group(1) or m.group(2) or m.group(3)
    return "$" if group is None else f"\\g<{group}>"


FILTERS: Mapping[str, type[Any]] = {f.key: f for f in (
    StripPrefix, SetPath, RewritePath, SetRequestHeader, RemoveRequestHeader,
    SetResponseHeader, RemoveResponseHeader)}
