"""The compiled route table: config in, a first-match lookup out.

Everything a request needs is prepared here once — path regexes, compiled templates — so
matching is a short loop over precompiled predicates. Predicates are small frozen classes
registered by their YAML key in `PREDICATES`; adding one touches one class and one entry.
A route whose path matches but whose method does not is remembered, so the caller can
answer 405 with `Allow` instead of 404.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Mapping
from urllib.parse import unquote

from .config import Config
from .errors import ConfigError
from .filters import FILTERS, ResponseFilter
from .template import Template, compile_template

__all__ = ["compile_path", "PathPredicate", "PREDICATES", "Route", "RouteTable", "Match", "build_table"]

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::([^{}]*(?:\{[^{}]*\}[^{}]*)*))?\}")


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
    return re.compile("^" + "".join(parts) + "$"), tuple(names)


@dataclass(frozen=True, slots=True)
class PathPredicate:
    """`match.path`: the whole raw path must match; captures become the route's params."""

    key: ClassVar[str] = "path"
    regex: re.Pattern[str]
    params: tuple[str, ...]

    @classmethod
    def create(cls, value: str) -> "PathPredicate":
        regex, params = compile_path(value)
        return cls(regex=regex, params=params)

    def match(self, raw_path: str) -> dict[str, str] | None:
        m = self.regex.match(raw_path)
        if m is None:
            return None
        return {k: unquote(v) for k, v in m.groupdict().items()}


PREDICATES: Mapping[str, type[PathPredicate]] = {PathPredicate.key: PathPredicate}

TEMPLATE_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True, slots=True)
class Route:
    """A compiled route: how to recognise a request and the template that answers it."""

    name: str
    path: PathPredicate
    methods: frozenset[str]
    template: Template
    filters: tuple[ResponseFilter, ...] = ()


@dataclass(frozen=True, slots=True)
class Match:
    """A lookup result: `route` is None on a miss; `allow` is set when only the method was wrong."""

    route: Route | None
    params: dict[str, str]
    allow: frozenset[str] = frozenset()


_MISS = Match(route=None, params={})


@dataclass(frozen=True, slots=True)
class RouteTable:
    """An immutable, fully compiled set of routes; swapped whole on reload."""

    routes: tuple[Route, ...]

    def match(self, method: str, raw_path: str) -> Match:
        """First route, in file order, whose predicates all accept the request."""
        allow: set[str] = set()
        for route in self.routes:
            params = route.path.match(raw_path)
            if params is None:
                continue
            if method in route.methods:
                return Match(route=route, params=params)
            allow |= route.methods
        return Match(route=None, params={}, allow=frozenset(allow)) if allow else _MISS


def build_table(config: Config) -> RouteTable:
    """Compile every route and its template; raise `ConfigError` listing every problem."""
    problems: list[str] = []
    routes: list[Route] = []
    settings = config.settings
    for spec in config.routes:
        try:
            path = PathPredicate.create(spec.path)
        except ValueError as exc:
            problems.append(f"{config.where(spec.path_line)}: {exc}")
            continue
        filters: list[ResponseFilter] = []
        for f in spec.filters:
            kind = FILTERS.get(f.name)
            if kind is None:
                problems.append(f"{config.where(f.line)}: unknown filter {f.name!r} "
                                f"(known: {', '.join(FILTERS)})")
                continue
            try:
                filters.append(kind.create(f.value))
            except ValueError as exc:
                problems.append(f"{config.where(f.line)}: {f.name}: {exc}")
        file = settings.templates / spec.template
        if not file.is_file():
            problems.append(f"{config.where(spec.template_line)}: template {spec.template!r} not found "
                            f"(looked for {file})")
            continue
        try:
            template = compile_template(file, params=path.params, settings=settings,
                                        name=spec.template)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        routes.append(Route(name=spec.name, path=path, methods=TEMPLATE_METHODS, template=template,
                            filters=tuple(filters)))
    if problems:
        raise ConfigError(problems)
    return RouteTable(routes=tuple(routes))
