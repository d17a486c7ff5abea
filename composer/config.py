"""Loading routes.yaml into frozen dataclasses.

The file is read with PyYAML's `compose` so every node keeps its line: each problem is
reported as `routes.yaml:LINE: message`, and all problems of a file are collected before
`ConfigError` is raised, so one `composer check` shows everything that is wrong.

Everything that can be checked from routes.yaml alone is checked and built here: keys,
types and ranges, predicates and filters (through their registries), backend URLs and
redirect targets. What needs other files — the templates — is compiled when the route
table is built (`routing`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml
from yarl import URL

from .breaker import DEFAULT_POLICY, BreakerPolicy, merged, parse_policy
from .errors import ConfigError, Stamp
from .filters import FILTERS, PathTemplate, RequestFilter, ResponseFilter
from .manifest import Manifest, parse_fragments
from .nodes import MAX_TIMEOUT_MS, Reader, compose, file_stamp, is_null, plain
from .predicates import (
    PREDICATES,
    Condition,
    MethodsPredicate,
    PathPredicate,
    PathPrefixPredicate,
)
from .urls import origin_allowed

__all__ = [
    "CACHE_BYTES",
    "DEFAULT_FORWARD_HEADERS",
    "MAX_FRAGMENT_BYTES",
    "TEMPLATE_METHODS",
    "Backend",
    "Config",
    "Redirect",
    "RouteSpec",
    "Settings",
    "file_stamp",
    "load_config",
    "read_config",
]

MAX_FRAGMENT_BYTES = 5 * 1024 * 1024
CACHE_BYTES = 64 * 1024 * 1024
DEFAULT_FORWARD_HEADERS = (
    "accept-language",
    "cookie",
    "referer",
    "user-agent",
    "traceparent",
    "tracestate",
)
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
    max_fragment_bytes: int = MAX_FRAGMENT_BYTES
    reload_interval_ms: int = 1000  # how often routes.yaml and templates are checked; 0: only on SIGHUP
    manifest: str | None = None  # a manifest file (relative to routes.yaml) or http(s) URL
    manifest_poll_s: int = 10  # how often a URL manifest is polled
    version_override_header: str | None = None  # e.g. x-composer-versions: footer=2.4.0 (QA)
    circuit_breaker: BreakerPolicy = DEFAULT_POLICY  # per manifest fragment: its `circuit_breaker`
    cache_max_bytes: int = CACHE_BYTES  # `cache: {max_bytes}`; 0 turns caching off
    page_timeout_ms: int = 10_000  # then every fragment still pending renders its fallback
    max_fragments_per_template: int = 100
    max_connections_per_origin: int = 256  # read when the process starts
    server_timing: bool = True  # the Server-Timing header: the primary's wait, composer's own time
    # One inline script at </body> with a `performance.measure` per fragment: off by default,
    # since a strict Content-Security-Policy refuses inline scripts (a console error per page).
    timing_marks: bool = False
    # SPEC §9: limits on what one client, connection or backend may hold (read when the process starts).
    client_header_timeout_ms: int = 10_000  # a request head not complete by then: connection closed
    keepalive_timeout_ms: int = 75_000  # an idle keep-alive client connection is closed
    send_timeout_ms: int = 60_000  # a client that reads nothing this long is dropped
    max_connections: int = 10_000  # client connections held at once; more are refused
    max_ws_message_bytes: int = 4 * 1024 * 1024  # a larger WebSocket message closes that socket (1009)
    max_connections_per_backend: int = 256
    server_header: bool = True  # `Server: composer` (never a version); false: no Server header


@dataclass(frozen=True, slots=True)
class Backend:
    """Where a backend route forwards to, and how long it may stay silent."""

    origin: str  # scheme://host[:port], no trailing slash
    host: str  # the Host header the backend expects (its authority)
    preserve_host: bool = False
    timeout: float = 30.0  # seconds without a byte moving either way
    connect_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class Redirect:
    """A redirect route: `to` with `{param}`s filled in; the request's query string is kept."""

    to: PathTemplate
    status: int
    relative: bool

    def location(self, params: Mapping[str, str], query: str) -> str:
        location = self.to.render(params)
        if self.relative and location.startswith("//"):
            location = "/" + location.lstrip("/")  # a parameter must not turn it into another host
        if query:
            location += ("&" if "?" in self.to.text else "?") + quote(query, safe=_QUERY_SAFE)
        return location


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """One entry of `routes:`, checked and built except for its template (a separate file).

    Exactly one of `template`, `backend`, `redirect` is set. `methods` None means any.
    """

    name: str
    line: int
    path: PathPredicate | PathPrefixPredicate
    methods: frozenset[str] | None = None
    conditions: tuple[Condition, ...] = ()
    template: str | None = None
    template_line: int = 0
    backend: Backend | None = None
    redirect: Redirect | None = None
    request_filters: tuple[RequestFilter, ...] = ()
    filters: tuple[ResponseFilter, ...] = ()  # on the response


@dataclass(frozen=True, slots=True)
class Config:
    """A loaded routes.yaml. `label` is the file name as the user gave it, for messages."""

    path: Path
    label: str
    settings: Settings
    routes: tuple[RouteSpec, ...] = field(default_factory=tuple)
    stamp: Stamp = None  # the file as it was just before it was read
    problems: tuple[str, ...] = ()  # set only by `read_config`; such a config is never served
    manifest: Manifest | None = None  # `fragments:` of routes.yaml, merged with an external manifest
    manifest_sources: tuple[tuple[Path, Stamp], ...] = ()  # a manifest file, for reloads

    def where(self, line: int) -> str:
        return f"{self.label}:{line}"


_SETTINGS_KEYS = ("templates", "fragment_timeout_ms", "forward_headers", "allowed_origins",
                  "max_fragment_bytes", "manifest", "manifest_poll_s", "version_override_header",
                  "reload_interval_ms", "circuit_breaker", "cache", "page_timeout_ms",
                  "max_fragments_per_template", "max_connections_per_origin", "server_timing",
                  "timing_marks", "client_header_timeout_ms", "keepalive_timeout_ms", "send_timeout_ms",
                  "max_connections", "max_ws_message_bytes", "max_connections_per_backend", "server_header")
_TOP_KEYS = ("settings", "fragments", "routes")
_TARGETS = ("template", "backend", "redirect")
_BACKEND_OPTIONS = ("preserve_host", "timeout_ms", "connect_timeout_ms")
_ROUTE_KEYS = ("name", "match", *_TARGETS, *_BACKEND_OPTIONS, "filters")
_REDIRECT_KEYS = ("to", "status")
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
TEMPLATE_METHODS = frozenset({"GET", "HEAD"})
_QUERY_SAFE = "/%:@!$&'()*+,;=-._~?"


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and check routes.yaml; raise `ConfigError` listing every problem found."""
    config = read_config(path)
    if config.problems:
        raise ConfigError(list(config.problems), ((config.path, config.stamp),))
    return config


def read_config(path: str | os.PathLike[str]) -> Config:
    """Like `load_config`, but a config whose settings are usable comes back with its good
    routes and its `problems`, so `build_table` can add the templates' and report all at once."""
    label = os.fspath(path)
    file = Path(path)
    stamp = file_stamp(file)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{label}:1: file not found"], ((file, stamp),)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{label}:1: cannot read: {exc}"], ((file, stamp),)) from None
    root, problem = compose(text, label)
    if problem is not None:
        raise ConfigError([problem], ((file, stamp),))

    reader = Reader(label)
    if root is None:
        raise ConfigError([f"{label}:1: the file is empty; it needs a `routes:` list"], ((file, stamp),))
    top = reader.mapping(root, "the top level", _TOP_KEYS)
    settings = _settings(reader, top.get("settings"), file.parent)
    routes = _routes(reader, top.get("routes"), root, settings)
    manifest = None
    if "fragments" in top and settings is not None:
        manifest = Manifest(fragments=parse_fragments(reader, top["fragments"], settings.allowed_origins),
                            source=label)
    if settings is None:
        raise ConfigError(reader.problems, ((file, stamp),))
    return Config(path=file, label=label, settings=settings, routes=routes, stamp=stamp,
                  problems=tuple(reader.problems), manifest=manifest)


def _settings(reader: Reader, node: yaml.Node | None, base: Path) -> Settings | None:
    values: dict[str, Any] = {}
    keys = reader.mapping(node, "settings", _SETTINGS_KEYS) if node is not None else {}
    if "templates" in keys:
        values["templates"] = reader.string(keys["templates"], "settings.templates")
    if "fragment_timeout_ms" in keys:
        values["fragment_timeout_ms"] = reader.integer(
            keys["fragment_timeout_ms"], "settings.fragment_timeout_ms", 1, MAX_TIMEOUT_MS)
    if "reload_interval_ms" in keys:
        values["reload_interval_ms"] = reader.integer(
            keys["reload_interval_ms"], "settings.reload_interval_ms", 0, MAX_TIMEOUT_MS)
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
    if "manifest" in keys and not is_null(keys["manifest"]):
        values["manifest"] = reader.string(keys["manifest"], "settings.manifest")
    if "manifest_poll_s" in keys:
        values["manifest_poll_s"] = reader.integer(keys["manifest_poll_s"], "settings.manifest_poll_s", 1, 86400)
    if "version_override_header" in keys and not is_null(keys["version_override_header"]):
        header = reader.string(keys["version_override_header"], "settings.version_override_header")
        values["version_override_header"] = header.lower() if header else None
    if "circuit_breaker" in keys:
        override = parse_policy(reader, keys["circuit_breaker"], "settings.circuit_breaker")
        values["circuit_breaker"] = None if override is None else merged(DEFAULT_POLICY, override)
    if "cache" in keys:
        cache = reader.mapping(keys["cache"], "settings.cache", ("max_bytes",))
        if "max_bytes" in cache:
            values["cache_max_bytes"] = reader.integer(cache["max_bytes"], "settings.cache.max_bytes", 0, 1 << 40)
    for key, low, high in (("page_timeout_ms", 1, MAX_TIMEOUT_MS), ("max_fragments_per_template", 1, 10_000),
                           ("max_connections_per_origin", 1, 100_000),
                           ("client_header_timeout_ms", 1, MAX_TIMEOUT_MS), ("keepalive_timeout_ms", 0, 3_600_000),
                           ("send_timeout_ms", 1, MAX_TIMEOUT_MS), ("max_connections", 1, 1_000_000),
                           ("max_ws_message_bytes", 1, 1 << 30), ("max_connections_per_backend", 1, 100_000)):
        if key in keys:
            values[key] = reader.integer(keys[key], f"settings.{key}", low, high)
    for key in ("server_timing", "timing_marks", "server_header"):
        if key in keys:
            values[key] = reader.boolean(keys[key], f"settings.{key}")
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


def _routes(reader: Reader, node: yaml.Node | None, root: yaml.Node,
            settings: Settings | None) -> tuple[RouteSpec, ...]:
    if node is None:
        reader.error(root, "`routes:` is missing; it lists the routes, first match wins")
        return ()
    if not isinstance(node, yaml.SequenceNode):
        reader.error(node, "routes must be a list")
        return ()
    routes: list[RouteSpec] = []
    seen: dict[str, int] = {}
    for item in node.value:
        route = _route(reader, item, settings)
        name = _name_of(item)  # checked even when the route is broken: every problem at once
        if name is not None and name in seen:
            reader.error(item, f"duplicate route name {name!r} (first on line {seen[name]})")
            continue
        if name is not None:
            seen[name] = item.start_mark.line + 1
        if route is not None:
            routes.append(route)
    return tuple(routes)


def _name_of(node: yaml.Node) -> str | None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == "name" and isinstance(value, yaml.ScalarNode):
                return str(value.value)
    return None


def _route(reader: Reader, node: yaml.Node, settings: Settings | None) -> RouteSpec | None:
    keys = reader.mapping(node, "a route", _ROUTE_KEYS)
    if not isinstance(node, yaml.MappingNode):
        return None
    before = len(reader.problems)
    for required in ("name", "match"):
        if required not in keys:
            reader.error(node, f"route is missing {required!r}")
    targets = [k for k in _TARGETS if k in keys]
    if len(targets) != 1:
        reader.error(node, "a route needs exactly one of `template`, `backend`, `redirect`"
                           + (f" (it has {', '.join(targets)})" if targets else ""))
    if "backend" not in keys:
        for option in _BACKEND_OPTIONS:
            if option in keys:
                reader.error(keys[option], f"{option} applies to backend routes only")
    name = reader.string(keys["name"], "route name") if "name" in keys else None
    path, methods, conditions = _match(reader, keys["match"]) if "match" in keys else (None, None, ())
    params = path.params if path is not None else ()
    request_filters, filters = _filters(reader, keys["filters"], params) if "filters" in keys else ((), ())
    template = backend = redirect = None
    if "template" in keys:
        template = reader.string(keys["template"], "template")
        if methods is None:
            methods = TEMPLATE_METHODS
        elif not methods <= TEMPLATE_METHODS:
            reader.error(keys["match"], "template routes answer GET and HEAD only, not "
                                        + ", ".join(sorted(methods - TEMPLATE_METHODS)))
    elif "backend" in keys and settings is not None:
        backend = _backend(reader, keys, settings)
    elif "redirect" in keys:
        redirect = _redirect(reader, keys["redirect"], params)
    if request_filters and backend is None:
        reader.error(keys["filters"], "request filters (strip_prefix, set_path, rewrite_path, "
                                      "set_request_header, remove_request_header) apply to backend routes only")
    if len(reader.problems) > before or name is None or path is None:
        return None
    return RouteSpec(
        name=name,
        line=node.start_mark.line + 1,
        path=path,
        methods=methods,
        conditions=conditions,
        template=template,
        template_line=keys["template"].start_mark.line + 1 if "template" in keys else 0,
        backend=backend,
        redirect=redirect,
        request_filters=request_filters,
        filters=filters,
    )


def _match(reader: Reader, node: yaml.Node) -> tuple[PathPredicate | PathPrefixPredicate | None,
                                                      frozenset[str] | None, tuple[Condition, ...]]:
    """`match:` through the predicate registry: the path one, the methods, the rest."""
    path: PathPredicate | PathPrefixPredicate | None = None
    methods: frozenset[str] | None = None
    conditions: list[Condition] = []
    if not isinstance(node, yaml.MappingNode) or not node.value:
        reader.error(node, "match must be a mapping of predicates, e.g. {path: /products/{sku}}")
        return None, None, ()
    seen: set[str] = set()
    for key_node, value_node in node.value:
        key = str(key_node.value)
        kind = PREDICATES.get(key)
        if kind is None:
            reader.error(key_node, f"unknown predicate {key!r} in match (known: {', '.join(PREDICATES)})")
            continue
        if key in seen:
            reader.error(key_node, f"duplicate key {key!r} in match")
            continue
        seen.add(key)
        try:
            predicate = kind.create(plain(value_node))
        except ValueError as exc:
            reader.error(key_node, str(exc))
            continue
        if isinstance(predicate, (PathPredicate, PathPrefixPredicate)):
            if path is not None:
                reader.error(key_node, "match takes one of `path` and `path_prefix`, not both")
            path = predicate
        elif isinstance(predicate, MethodsPredicate):
            methods = predicate.methods
        else:
            conditions.append(predicate)
    if path is None and not ({"path", "path_prefix"} & seen):
        reader.error(node, "match needs a `path` or a `path_prefix`")
    return path, methods, tuple(conditions)


def _backend(reader: Reader, keys: dict[str, yaml.Node], settings: Settings) -> Backend | None:
    node = keys["backend"]
    text = reader.string(node, "backend")
    if text is None:
        return None
    try:
        url = URL(text)
    except ValueError as exc:
        reader.error(node, f"backend {text!r} is not a URL: {exc}")
        return None
    if url.scheme not in ("http", "https") or not url.raw_host:
        reader.error(node, f"backend must be an http:// or https:// URL with a host, not {text!r}")
        return None
    if url.raw_user or url.raw_password or url.raw_path not in ("", "/") or url.raw_query_string \
            or url.raw_fragment:
        reader.error(node, f"backend must be an origin (scheme://host[:port]), not {text!r}; "
                           "change the path with strip_prefix, set_path or rewrite_path")
        return None
    if not origin_allowed(url, settings.allowed_origins):
        reader.error(node, f"backend {text!r} is not in settings.allowed_origins")
        return None
    preserve_host = False
    if "preserve_host" in keys:
        flag = reader.boolean(keys["preserve_host"], "preserve_host")
        if flag is None:
            return None
        preserve_host = flag
    timeout_ms = reader.integer(keys["timeout_ms"], "timeout_ms", 1, MAX_TIMEOUT_MS) \
        if "timeout_ms" in keys else 30_000
    connect_ms = reader.integer(keys["connect_timeout_ms"], "connect_timeout_ms", 1, MAX_TIMEOUT_MS) \
        if "connect_timeout_ms" in keys else timeout_ms
    if timeout_ms is None or connect_ms is None:
        return None
    origin = str(url.origin())
    return Backend(origin=origin, host=origin.partition("://")[2], preserve_host=preserve_host,
                   timeout=timeout_ms / 1000, connect_timeout=min(connect_ms, timeout_ms) / 1000)


def _redirect(reader: Reader, node: yaml.Node, params: tuple[str, ...]) -> Redirect | None:
    keys = reader.mapping(node, "redirect", _REDIRECT_KEYS)
    if not isinstance(node, yaml.MappingNode):
        return None
    if "to" not in keys:
        reader.error(node, "redirect needs `to`, e.g. {to: /new/{id}, status: 301}")
        return None
    status = 302
    if "status" in keys:
        value = reader.integer(keys["status"], "redirect.status", 100, 999)
        if value is None:
            return None
        if value not in REDIRECT_STATUSES:
            reader.error(keys["status"], f"redirect.status must be one of "
                                         f"{', '.join(map(str, REDIRECT_STATUSES))}, not {value}")
            return None
        status = value
    to = reader.string(keys["to"], "redirect.to")
    if to is None:
        return None
    if to.startswith("/") and not to.startswith("//"):
        relative, origin = True, ""
    elif to.startswith(("http://", "https://")):
        relative = False
        scheme, _, rest = to.partition("://")
        origin = scheme + "://" + rest.partition("/")[0].partition("?")[0]
    else:
        reader.error(keys["to"], f"redirect.to must be a path (/new) or an http(s) URL, not {to!r}")
        return None
    if "{" in origin or any(c in to for c in " \t\r\n\x00#"):
        reader.error(keys["to"], f"redirect.to {to!r}: parameters may appear only in the path or query, "
                                 "and it may not hold spaces or a fragment")
        return None
    try:
        template = PathTemplate.parse(to)
    except ValueError as exc:
        reader.error(keys["to"], f"redirect.to: {exc}")
        return None
    unknown = [p for p in template.params if p not in params]
    if unknown:
        reader.error(keys["to"], f"redirect.to: {{{unknown[0]}}} is not a parameter of the route's path")
        return None
    return Redirect(to=template, status=status, relative=relative)


def _filters(reader: Reader, node: yaml.Node, params: tuple[str, ...]
             ) -> tuple[tuple[RequestFilter, ...], tuple[ResponseFilter, ...]]:
    """`filters:` through the filter registry, split into request and response filters."""
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
        kind = FILTERS.get(key)
        if kind is None:
            reader.error(key_node, f"unknown filter {key!r} (known: {', '.join(FILTERS)})")
            continue
        try:
            made = kind.create(plain(value_node))
        except ValueError as exc:
            reader.error(key_node, f"{key}: {exc}")
            continue
        unknown = [p for p in getattr(made, "params", ()) if p not in params]
        if unknown:
            reader.error(key_node, f"{key}: {{{unknown[0]}}} is not a parameter of the route's path")
            continue
        (request if hasattr(made, "on_request") else response).append(made)
    return tuple(request), tuple(response)
