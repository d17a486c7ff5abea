"""The compiled route table: files in (`load`), a first-match lookup out.

`load` is the one way from files to a table: routes.yaml (`config`), its external manifest
(a file, or a URL's body), the templates. Everything a request needs is prepared here once —
predicates, filters, templates, backend URLs — so matching is a dict walk and a short loop.

Routes are indexed by the literal leading segments of their path (as aiohttp's router
indexes resources by static prefix): a lookup walks the request's segments down a tree and
only tries the routes that could match there, in file order, so a table of a thousand
routes costs about what a table of ten does. A route whose path matches but whose method
does not is remembered, so the caller can answer 405 with `Allow` instead of 404.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import unquote

from aiohttp import web

from .collector import with_collector
from .config import Backend, Config, Redirect, RouteSpec, Settings, file_stamp, read_config
from .errors import ConfigError, Stamp
from .filters import RequestFilter, ResponseFilter
from .layouts import compile_layout
from .manifest import Manifest, ManifestBody, fetch_once, is_url, parse_manifest, read_manifest
from .predicates import Condition, PathPredicate, PathPrefixPredicate, compile_path
from .template import Template, compile_template
from .urls import redact

__all__ = ["ManifestNeeded", "Match", "Route", "RouteTable", "build_table", "compile_path", "load", "split_target"]

_GROUP_NAME = re.compile(r"\(\?P<\w+>")


@dataclass(frozen=True, slots=True)
class Route:
    """A compiled route: how to recognise a request, and what answers it (one of three)."""

    name: str
    line: int
    path: PathPredicate | PathPrefixPredicate
    methods: frozenset[str] | None  # None: any method
    conditions: tuple[Condition, ...] = ()
    template: Template | None = None
    backend: Backend | None = None
    redirect: Redirect | None = None
    request_filters: tuple[RequestFilter, ...] = ()
    response_filters: tuple[ResponseFilter, ...] = ()  # run by `apply_response`
    layout: str | None = None  # the layout its template is poured into (SPEC §6), as routes.yaml names it
    pages: Mapping[str, Route] | None = None  # template_lookup: `x` (for /x) → the route with x.html

    def page(self, path: str) -> Route | None:
        """template_lookup: the route whose template the raw `path` names, `/x` → x.html, `/` →
        index.html, None for any other (a 404). Only names compiled at load are served, so no
        path leaves the templates folder (Tailor's loader served `/../x` from outside it)."""
        assert self.pages is not None and isinstance(self.path, PathPrefixPredicate)
        return self.pages.get(unquote(path[len(self.path.prefix) + 1:]))

    def accepts(self, request: web.BaseRequest) -> bool:
        for condition in self.conditions:
            if not condition.match(request):
                return False
        return True


@dataclass(frozen=True, slots=True)
class Match:
    """A lookup result: `route` is None on a miss; `allow` is set when only the method was wrong.

    `params` are the raw (percent-encoded) captures of the route's path.
    """

    route: Route | None
    params: dict[str, str]
    allow: frozenset[str] = frozenset()

    def __init__(self, route: Route | None, params: dict[str, str], allow: frozenset[str] = frozenset()) -> None:
        # Its own `__init__`, once per request: compiled, it is C (a dataclass's runs as Python);
        # object.__setattr__ is how a frozen class sets its fields, and compiles to a store.
        object.__setattr__(self, "route", route)
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "allow", allow)


_MISS = Match(route=None, params={})


@dataclass(slots=True)
class _Node:
    children: dict[str, _Node] = field(default_factory=dict)
    own: list[Route] = field(default_factory=list)
    candidates: tuple[Route, ...] = ()  # own routes and every ancestor's, in file order


def split_target(raw: str) -> tuple[str, str]:
    """Raw request target → (raw path, raw query); the absolute form keeps only its path."""
    path, _, query = raw.partition("?")
    if not path.startswith("/") and "://" in path:
        path = "/" + path.partition("://")[2].partition("/")[2]
    return path, query


class RouteTable:
    """An immutable, fully compiled set of routes and everything they were built from: the
    settings, the manifest, the files (to watch for reloads). Swapped whole on reload."""

    __slots__ = ("_depth", "_root", "label", "manifest", "manifest_option", "path", "routes", "settings",
                 "sources", "warnings")

    def __init__(self, routes: tuple[Route, ...], *, settings: Settings, path: Path, label: str | None = None,
                 sources: tuple[tuple[Path, Stamp], ...] = (), manifest: Manifest | None = None,
                 manifest_option: str | None = None, warnings: tuple[str, ...] = ()) -> None:
        self.routes = routes
        self.settings = settings
        self.path = path  # routes.yaml
        self.label = os.fspath(path) if label is None else label  # routes.yaml as the user named it
        self.manifest = manifest
        self.manifest_option = manifest_option  # `load`'s `manifest` (--manifest): a reload passes it again
        self.sources = sources  # every file the table was built from, as it was when read
        self._root, self._depth = _index(routes)
        self.warnings = warnings + _shadowed(self.label, routes, self._root)  # `file:line: warning: …`

    def templates(self) -> Iterator[tuple[Route, Template]]:
        """Every template a page is composed from, with the route that serves it: what anything
        enumerating fragments (circuits, metrics, fallback prefetch, client-signal labels) walks."""
        return _templates(self.routes)

    def match(self, request: web.BaseRequest, path: str) -> Match:
        """First route, in file order, whose predicates all accept the request.

        `path` is the raw request path (see `split_target`).
        """
        node = self._root
        depth = self._depth
        if depth:
            for segment in path[1:].split("/", depth)[:depth]:
                child = node.children.get(segment)
                if child is None:
                    break
                node = child
        allow: set[str] | None = None
        method = request.method
        for route in node.candidates:
            params = route.path.match(path)
            if params is None or (route.conditions and not route.accepts(request)):
                continue
            if route.methods is None or method in route.methods:
                return Match(route=route, params=params)
            if allow is None:
                allow = set()
            allow |= route.methods
        return _MISS if allow is None else Match(route=None, params={}, allow=frozenset(allow))


def _index(routes: tuple[Route, ...]) -> tuple[_Node, int]:
    """The segment tree of `routes` and its depth; each node lists its candidates in file order."""
    root = _Node()
    depth = 0
    for route in routes:
        node = root
        for segment in route.path.literal:
            node = node.children.setdefault(segment, _Node())
        node.own.append(route)
        depth = max(depth, len(route.path.literal))
    order = {id(route): i for i, route in enumerate(routes)}

    def fill(node: _Node, inherited: tuple[Route, ...]) -> None:
        node.candidates = tuple(sorted((*inherited, *node.own), key=lambda r: order[id(r)]))
        for child in node.children.values():
            fill(child, node.candidates)

    fill(root, ())
    return root, depth


def build_table(config: Config, *, manifest_option: str | None = None) -> RouteTable:
    """Compile every route's template and index the routes; raise `ConfigError` listing every problem.

    `config` as it is: `load` first adds the external manifest it names.
    """
    problems: list[str] = list(config.problems)
    routes: list[Route] = []
    sources: dict[Path, Stamp] = {config.path: config.stamp, **dict(config.manifest_sources)}
    for spec in config.routes:
        template = _template(config, spec, problems, sources) if spec.template is not None else None
        if template is not None and config.settings.client_signals and spec.client_signals:
            template = with_collector(template)
        route = Route(
            name=spec.name, line=spec.line, path=spec.path, methods=spec.methods, conditions=spec.conditions,
            template=template, backend=spec.backend, redirect=spec.redirect,
            request_filters=spec.request_filters, response_filters=spec.filters,
            layout=spec.layout.name if spec.layout is not None and template is not None else None)
        routes.append(replace(route, pages=_lookup(config, spec, route, problems, sources))
                      if spec.template_lookup else route)
    if problems:
        raise ConfigError(problems, tuple(sources.items()))
    return RouteTable(tuple(routes), settings=config.settings, path=config.path, label=config.label,
                      sources=tuple(sources.items()), manifest=config.manifest, manifest_option=manifest_option,
                      warnings=config.warnings + _template_warnings(routes))


def _templates(routes: Iterable[Route]) -> Iterator[tuple[Route, Template]]:
    """Each route's template, and each page of a `template_lookup` route (once: `/` is
    `/index`'s), in file order."""
    for route in routes:
        if route.template is not None:
            yield route, route.template
        for name, page in (route.pages or {}).items():
            if name and page.template is not None:
                yield page, page.template


def _template_warnings(routes: list[Route]) -> tuple[str, ...]:
    """What compiling the templates warned of (under compat: tailor), each once."""
    return tuple(dict.fromkeys(w for _, t in _templates(routes) for w in t.warnings))


def _lookup(config: Config, spec: RouteSpec, route: Route, problems: list[str],
            sources: dict[Path, Stamp]) -> dict[str, Route]:
    """template_lookup: every `*.html` under the templates folder (subfolders too), compiled now
    as the route's page for the path naming it; the folder is stamped, so a new file reloads."""
    folder = config.settings.templates
    sources[folder] = file_stamp(folder)
    if not folder.is_dir():
        problems.append(f"{config.where(spec.line)}: template_lookup: the templates folder {folder} is not a folder")
        return {}
    pages: dict[str, Route] = {}
    for file in sorted(folder.rglob("*.html")):
        name = file.relative_to(folder).as_posix()
        sources[file] = file_stamp(file)
        try:
            template = compile_template(file, params=(), settings=config.settings, name=name,
                                        manifest=config.manifest)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        if config.settings.client_signals and spec.client_signals:
            template = with_collector(template)
        pages[name.removesuffix(".html")] = replace(route, template=template)
    if "index" in pages:
        pages[""] = pages["index"]
    return pages


class ManifestNeeded(Exception):
    """`load` needs a URL manifest's body and may not fetch it here (an event loop runs, or
    `fetch=False`): fetch `url` in the loop and call `load` again with it.

    `problems` and `sources` are routes.yaml's, for a `ConfigError` if the fetch fails.
    """

    def __init__(self, url: str, problems: tuple[str, ...], sources: tuple[tuple[Path, Stamp], ...]) -> None:
        super().__init__(f"the manifest {redact(url)} must be fetched first")
        self.url, self.problems, self.sources = url, problems, sources


def load(path: str | os.PathLike[str], manifest: str | None = None, *, fetched: ManifestBody | None = None,
         fetch: bool = True) -> RouteTable:
    """routes.yaml, its manifest and its templates → a route table: the one way from files to
    a table (`composer check`, `serve`, the reloader, the workers). Raises `ConfigError`
    listing every problem of every file.

    `manifest` (--manifest, COMPOSER_MANIFEST) replaces `settings.manifest`. A URL manifest's
    body is `fetched` when it is that URL's; else it is fetched now, on an event loop of its
    own, unless `fetch` is False or a loop runs in this thread: then `ManifestNeeded` is raised
    (`reload.aload` fetches in the running loop and calls again).
    """
    config = read_config(path)
    source = manifest or config.settings.manifest
    if source and is_url(source) and (fetched is None or fetched.url != source or fetched.text is None):
        if not fetch or _loop_running():
            raise ManifestNeeded(source, config.problems, ((config.path, config.stamp),))
        try:
            fetched = asyncio.run(fetch_once(source))
        except ConfigError as exc:
            raise ConfigError([*config.problems, *exc.problems], ((config.path, config.stamp),)) from None
    config = _with_manifest(config, source, fetched, from_option=bool(manifest))
    return build_table(config, manifest_option=manifest or None)


def _loop_running() -> bool:
    """Is an event loop running in this thread (where `asyncio.run` cannot)?"""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _with_manifest(config: Config, source: str | None, fetched: ManifestBody | None, *,
                   from_option: bool) -> Config:
    """`config` with its external manifest (a file, or `fetched` for a URL) merged in."""
    if not source:
        return config
    allowed = config.settings.allowed_origins
    sources: tuple[tuple[Path, Stamp], ...] = ()
    try:
        if is_url(source):
            assert fetched is not None and fetched.text is not None
            external = parse_manifest(fetched.text, redact(source), allowed, source=source, etag=fetched.etag,
                                      keep_text=True)
        else:
            file = Path(source) if from_option else config.path.parent / source
            external, stamp = read_manifest(file, str(file), allowed)
            sources = ((file, stamp),)
    except ConfigError as exc:
        # Templates naming its fragments would only add "not in the manifest" noise.
        raise ConfigError([*config.problems, *exc.problems],
                          ((config.path, config.stamp), *(exc.sources or sources))) from None
    problems = list(config.problems)
    merged = _merge(config, external, problems)
    return replace(config, manifest=merged, problems=tuple(problems), manifest_sources=sources)


def _merge(config: Config, external: Manifest, problems: list[str]) -> Manifest:
    """routes.yaml's `fragments:` and the external manifest; a name in both is a problem."""
    inline = config.manifest
    if inline is None:
        return external
    for name in inline.fragments.keys() & external.fragments.keys():
        problems.append(f"{redact(external.source)}:{external.fragments[name].line}: fragment {name!r} is also "
                        f"declared in {config.label} (line {inline.fragments[name].line})")
    return replace(external, fragments={**inline.fragments, **external.fragments})


def _template(config: Config, spec: RouteSpec, problems: list[str], sources: dict[Path, Stamp]) -> Template | None:
    """`spec`'s template compiled, its file stamped in `sources`; None and a problem if it fails."""
    assert spec.template is not None
    file = config.settings.templates / spec.template
    stamp = sources[file] = file_stamp(file)  # before reading: a write racing the read shows up as a change
    if stamp is None or not file.is_file():
        problems.append(f"{config.where(spec.template_line)}: template {spec.template!r} not found "
                        f"(looked for {file})")
        return None
    if spec.layout is not None:
        return _with_layout(config, spec, file, problems, sources)
    try:
        return compile_template(file, params=spec.path.params, settings=config.settings, name=spec.template,
                                manifest=config.manifest)
    except ConfigError as exc:
        problems.extend(exc.problems)
        return None


def _with_layout(config: Config, spec: RouteSpec, child: Path, problems: list[str],
                 sources: dict[Path, Stamp]) -> Template | None:
    """`spec`'s template poured into its layout and compiled, the layout stamped in `sources`
    (a change to it reloads every route using it). Routes sharing a layout would repeat its
    problems: each is reported once."""
    assert spec.template is not None and spec.layout is not None
    file = config.settings.templates / spec.layout.name
    stamp = sources.setdefault(file, file_stamp(file))  # the first stamp: from before the first read
    found: list[str] = []
    if stamp is None or not file.is_file():
        found.append(f"{config.where(spec.layout.line)}: layout {spec.layout.name!r} not found (looked for {file})")
    else:
        try:
            return compile_layout(file, child, params=spec.path.params, settings=config.settings,
                                  name=spec.template, manifest=config.manifest)
        except ConfigError as exc:
            found = exc.problems
    problems.extend(p for p in found if p not in problems)
    return None


def _shadowed(label: str, routes: tuple[Route, ...], root: _Node) -> tuple[str, ...]:
    """Warnings for routes an earlier route always wins over (conservative: no false alarms).

    Only routes indexed at the same node or above can cover a route, so this stays cheap.
    """
    warnings: list[str] = []
    # Path regexes with the parameter names removed: equal shapes match the same paths.
    shape = {id(r): _GROUP_NAME.sub("(", r.path.regex.pattern) for r in routes if isinstance(r.path, PathPredicate)}
    for route in routes:
        node = root
        for segment in route.path.literal:
            node = node.children[segment]
        for earlier in node.candidates:
            if earlier is route:
                break
            if _covers(earlier, route, shape):
                warnings.append(f"{label}:{route.line}: warning: route {route.name!r} can never match: "
                                f"route {earlier.name!r} (line {earlier.line}) takes every request it would")
                break
    return tuple(warnings)


def _covers(a: Route, b: Route, shape: dict[int, str]) -> bool:
    """True when every request `b` matches is also matched by `a`."""
    if not all(c in b.conditions for c in a.conditions):
        return False
    if a.methods is not None and (b.methods is None or not b.methods <= a.methods):
        return False
    if isinstance(a.path, PathPrefixPredicate):
        return b.path.literal[:len(a.path.literal)] == a.path.literal
    if isinstance(b.path, PathPrefixPredicate):
        return False
    if not b.path.params:
        return a.path.match(b.path.pattern) is not None
    return shape[id(a)] == shape[id(b)]

