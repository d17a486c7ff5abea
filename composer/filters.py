"""Route filters: small frozen types registered by their YAML key in `FILTERS`.

As in Skipper, a filter is created once per route from its YAML value (`create` checks
the arguments and raises ValueError naming the problem) and is then shared by every
request of the route, so it holds no per-request state. Filters run in file order.
Adding one is a class and a `FILTERS` entry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Protocol

from multidict import CIMultiDict

__all__ = ["FILTERS", "ResponseFilter", "RemoveResponseHeader", "SetResponseHeader"]

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Framing and connection headers belong to the server; a filter setting them would break
# the response on the wire.
_RESERVED = frozenset({"connection", "content-length", "keep-alive", "transfer-encoding", "trailer",
                       "upgrade", "proxy-connection", "te"})


class ResponseFilter(Protocol):
    """A filter that edits the headers of the route's responses."""

    def on_response(self, headers: CIMultiDict[str]) -> None: ...


def _header_name(name: Any) -> str:
    if not isinstance(name, str) or not _TOKEN.fullmatch(name):
        raise ValueError(f"{name!r} is not a valid header name")
    if name.lower() in _RESERVED:
        raise ValueError(f"header {name!r} is set by composer itself and cannot be changed by a filter")
    return name.lower()


@dataclass(frozen=True, slots=True)
class SetResponseHeader:
    """`set_response_header: {name: value, ...}` replaces those headers on every response."""

    key: ClassVar[str] = "set_response_header"
    headers: tuple[tuple[str, str], ...]

    @classmethod
    def create(cls, value: Any) -> "SetResponseHeader":
        if not isinstance(value, dict) or not value:
            raise ValueError("set_response_header takes a mapping of header names to values")
        pairs = []
        for name, text in value.items():
            if not isinstance(text, str) or "\r" in text or "\n" in text or "\x00" in text:
                raise ValueError(f"the value of {name!r} must be a one-line string")
            pairs.append((_header_name(name), text))
        return cls(headers=tuple(pairs))

    def on_response(self, headers: CIMultiDict[str]) -> None:
        for name, value in self.headers:
            headers[name] = value


@dataclass(frozen=True, slots=True)
class RemoveResponseHeader:
    """`remove_response_header: name` (or a list of names) drops those headers."""

    key: ClassVar[str] = "remove_response_header"
    names: tuple[str, ...]

    @classmethod
    def create(cls, value: Any) -> "RemoveResponseHeader":
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, list) or not names:
            raise ValueError("remove_response_header takes a header name or a list of them")
        return cls(names=tuple(_header_name(n) for n in names))

    def on_response(self, headers: CIMultiDict[str]) -> None:
        for name in self.names:
            headers.popall(name, None)


FILTERS: Mapping[str, type[SetResponseHeader] | type[RemoveResponseHeader]] = {
    f.key: f for f in (SetResponseHeader, RemoveResponseHeader)
}
