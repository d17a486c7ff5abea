"""Loading routes.yaml into frozen dataclasses.

The file is read with `parse_yaml` (PyYAML's nodes, not values) so every node keeps its line:
each problem is reported as `routes.yaml:LINE: message`, and all problems of a file are
collected before `ConfigError` is raised, so one `composer check` shows everything that is
wrong. A setting that loads but changes nothing is a warning, printed by `check` and logged
at start.

Everything that can be checked from routes.yaml alone is checked and built here: keys,
types and ranges (the settings table: `Settings`), predicates and filters (through their
registries), backend URLs and redirect targets. What needs other files — the templates, an
external manifest — is added when the route table is built (`routing.load`).
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping
from dataclasses import Field, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeAlias, TypeVar
from urllib.parse import quote

import yaml
from yarl import URL

from .breaker import DEFAULT_POLICY, BreakerPolicy, merged, parse_policy
from .client import LIMIT_PER_HOST
from .errors import ConfigError, Stamp
from .filters import PathTemplate, RequestFilter, ResponseFilter, parse_filters
from .headers import HOP_BY_HOP
from .manifest import Manifest, parse_fragments
from .nodes import MAX_TIMEOUT_MS, Reader, file_stamp, is_null, parse_yaml
from .predicates import Condition, PathPredicate, PathPrefixPredicate, parse_match
from .tailor import DEFAULT_TAILOR, TailorSettings, read_tailor
from .urls import origin_allowed

__all__ = [
    "CACHE_BYTES",
    "DEFAULT_ANALYSIS",
    "DEFAULT_FORWARD_HEADERS",
    "MAX_FRAGMENT_BYTES",
    "SETTINGS",
    "TEMPLATE_METHODS",
    "AnalysisPolicy",
    "Backend",
    "Config",
    "LayoutRef",
    "Redirect",
    "RouteSpec",
    "Settings",
    "file_stamp",
    "load_config",
    "read_config",
    "setting",
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
# Request headers a fragment never gets from the user, and why: forwarding them would corrupt
# the request composer sends (RFC 9110 §7.6.1), so listing one is a config error.
_NOT_FORWARDABLE = {
    **dict.fromkeys(HOP_BY_HOP, "it is hop-by-hop: it describes one connection, not the user"),
    "host": "the fragment's URL decides it",
    "content-length": "fragment requests have no body",
}
# Request headers composer sends every fragment itself (pipeline.Page.of): listing one changes
# nothing, so it is dropped with a warning. Tailor forwards x-request-id by default, so
# configs written for Tailor list it.
_SENT_BY_COMPOSER = frozenset({"accept-encoding", "x-request-id", "x-request-uri", "x-request-host"})


# ---------------------------------------------------------------- the settings table

class _Skip(enum.Enum):
    """What a setting's reader returns instead of a value."""

    INVALID = "the node is unusable; its problem is recorded"
    DEFAULT = "the node leaves the default (`manifest: null`, `cache: {}`)"


T = TypeVar("T")
# A setting's reader: (reader, its node, "settings.key" for messages) → its value or a _Skip.
Read: TypeAlias = Callable[[Reader, yaml.Node, str], "T | _Skip"]


def setting(default: T, read: Read[T], *, key: str | None = None) -> T:
    """A row of the settings table, declared as a field of `Settings`: its type is the field's,
    `default` applies when routes.yaml leaves it out, `read` checks and converts its node,
    and `key` is its name under `settings:` when that differs from the field's."""
    return field(default=default, metadata={"read": read, "key": key})


def _integer(low: int, high: int) -> Read[int]:
    def read(reader: Reader, node: yaml.Node, what: str) -> int | _Skip:
        value = reader.integer(node, what, low, high)
        return _Skip.INVALID if value is None else value
    return read


def _boolean(reader: Reader, node: yaml.Node, what: str) -> bool | _Skip:
    value = reader.boolean(node, what)
    return _Skip.INVALID if value is None else value


def _fraction(reader: Reader, node: yaml.Node, what: str) -> float | _Skip:
    value = reader.fraction(node, what)
    return _Skip.INVALID if value is None else value


def _path(reader: Reader, node: yaml.Node, what: str) -> Path | _Skip:
    """A folder, still relative: `_settings` resolves it against routes.yaml's folder."""
    value = reader.string(node, what)
    return _Skip.INVALID if value is None else Path(value)


def _name(lower: bool) -> Read[str | None]:
    """A string that may be null (unset); header names are compared lowercased."""
    def read(reader: Reader, node: yaml.Node, what: str) -> str | None | _Skip:
        if is_null(node):
            return _Skip.DEFAULT
        value = reader.string(node, what)
        if value is None:
            return _Skip.INVALID
        return value.lower() if lower else value
    return read


def _forward_headers(reader: Reader, node: yaml.Node, what: str) -> tuple[str, ...] | _Skip:
    """Lowercased names; one composer may not forward is a problem, one it sends anyway a warning."""
    names = reader.strings(node, what)
    if names is None:
        return _Skip.INVALID
    assert isinstance(node, yaml.SequenceNode)  # `strings` accepts nothing else
    kept: list[str] = []
    told: set[str] = set()
    for item, name in zip(node.value, (n.lower() for n in names), strict=True):
        if name in _NOT_FORWARDABLE or name in _SENT_BY_COMPOSER:
            if name in _NOT_FORWARDABLE and name not in told:
                reader.error(item, f"{what} cannot include {name!r}: {_NOT_FORWARDABLE[name]}")
            elif name not in told:
                reader.warn(item, f"{what}: {name!r} is sent by composer itself; listing it changes nothing")
            told.add(name)
        else:
            kept.append(name)
    return tuple(kept)


def _origins(reader: Reader, node: yaml.Node, what: str) -> tuple[str, ...] | _Skip:
    """`scheme://host[:port]` globs; each must name http or https."""
    origins = reader.strings(node, what)
    if origins is None:
        return _Skip.INVALID
    for origin in origins:
        if not origin.startswith(("http://", "https://")):
            reader.error(node, f"allowed origin {origin!r} must start with http:// or https://")
    return origins


def _breaker(reader: Reader, node: yaml.Node, what: str) -> BreakerPolicy | _Skip:
    """Keys given override the defaults, one by one."""
    override = parse_policy(reader, node, what)
    return _Skip.INVALID if override is None else merged(DEFAULT_POLICY, override)


def _cache_max_bytes(reader: Reader, node: yaml.Node, what: str) -> int | _Skip:
    """`cache: {max_bytes}`: a mapping, so cache options can join it later."""
    keys = reader.mapping(node, what, ("max_bytes",))
    if "max_bytes" not in keys:
        return _Skip.DEFAULT
    value = reader.integer(keys["max_bytes"], f"{what}.max_bytes", 0, 1 << 40)
    return _Skip.INVALID if value is None else value


@dataclass(frozen=True, slots=True)
class LayoutRef:
    """A layout as routes.yaml names it (SPEC §6): a file in the templates folder, and the line
    naming it, where a missing file is reported."""

    name: str
    line: int


def _layout(reader: Reader, node: yaml.Node, what: str) -> LayoutRef | None | _Skip:
    """`settings.layout`: the layout of every template route that names none; null: none."""
    if is_null(node):
        return _Skip.DEFAULT
    name = reader.string(node, what)
    return _Skip.INVALID if name is None else LayoutRef(name, node.start_mark.line + 1)


@dataclass(frozen=True, slots=True)
class AnalysisPolicy:
    """`settings.canary_analysis` (SPEC §8; composer.canary runs it)."""

    window_s: int = 60  # the last window_s seconds are judged
    min_requests: int = 50  # canary fetches in the window below which nothing is judged
    enabled: bool = True


DEFAULT_ANALYSIS = AnalysisPolicy()


def _canary_analysis(reader: Reader, node: yaml.Node, what: str) -> AnalysisPolicy | _Skip:
    """`canary_analysis: {window_s, min_requests, enabled}`: keys given override the defaults."""
    keys = reader.mapping(node, what, ("window_s", "min_requests", "enabled"))
    before = len(reader.problems)
    values: dict[str, Any] = {}
    if "window_s" in keys:
        values["window_s"] = reader.integer(keys["window_s"], f"{what}.window_s", 1, 3600)
    if "min_requests" in keys:
        values["min_requests"] = reader.integer(keys["min_requests"], f"{what}.min_requests", 1, 1_000_000)
    if "enabled" in keys:
        values["enabled"] = reader.boolean(keys["enabled"], f"{what}.enabled")
    if len(reader.problems) > before:
        return _Skip.INVALID
    return replace(DEFAULT_ANALYSIS, **values)


def _compat(reader: Reader, node: yaml.Node, what: str) -> str | None | _Skip:
    """null, or `tailor`: Tailor's templates and fragment services work unchanged (composer.tailor)."""
    if is_null(node):
        return _Skip.DEFAULT
    value = reader.string(node, what)
    if value is not None and value != "tailor":
        reader.error(node, f"{what} must be null or tailor, not {value!r}")
        return _Skip.INVALID
    return _Skip.INVALID if value is None else value


def _tailor(reader: Reader, node: yaml.Node, what: str) -> TailorSettings | _Skip:
    """`tailor: {amd_loader_url, max_asset_links, pipe_instance_name, pipe_attributes}`."""
    value = read_tailor(reader, node, what)
    return _Skip.INVALID if value is None else value


def _state_dir(reader: Reader, node: yaml.Node, what: str) -> Path | None | _Skip:
    """A folder (relative: to routes.yaml's folder, resolved by composer.canary); null: the default."""
    if is_null(node):
        return _Skip.DEFAULT
    return _path(reader, node, what)


@dataclass(frozen=True, slots=True)
class Settings:
    """`settings:` of routes.yaml, and the table that reads it: one field per setting, with its
    type, default and check (`setting`). Adding a setting is adding a field here; the fields'
    order is the order `unknown key` messages list them in.

    `templates` is resolved against routes.yaml's folder. Some settings are read only when
    the process starts (noted); a reload changing them is logged.
    """

    # (RUF009 cannot see that `setting` is `field`, nor that Path and BreakerPolicy are immutable.)
    templates: Path = setting(Path("templates"), _path)  # noqa: RUF009  # folder of the page templates
    layout: LayoutRef | None = setting(None, _layout)  # noqa: RUF009  # SPEC §6: a route's `layout:` wins
    fragment_timeout_ms: int = setting(3000, _integer(1, MAX_TIMEOUT_MS))
    forward_headers: tuple[str, ...] = setting(DEFAULT_FORWARD_HEADERS, _forward_headers)
    allowed_origins: tuple[str, ...] = setting((), _origins)  # empty: any
    max_fragment_bytes: int = setting(MAX_FRAGMENT_BYTES, _integer(1, 1 << 30))
    manifest: str | None = setting(None, _name(lower=False))  # a file (relative to routes.yaml) or http(s) URL
    manifest_poll_s: int = setting(10, _integer(1, 86400))  # how often a URL manifest is polled
    version_override_header: str | None = setting(None, _name(lower=True))  # e.g. x-composer-versions (QA)
    reload_interval_ms: int = setting(1000, _integer(0, MAX_TIMEOUT_MS))  # file checks; 0: only on SIGHUP
    circuit_breaker: BreakerPolicy = setting(DEFAULT_POLICY, _breaker)  # noqa: RUF009  # per fragment: its own
    cache_max_bytes: int = setting(CACHE_BYTES, _cache_max_bytes, key="cache")  # 0 turns caching off
    page_timeout_ms: int = setting(10_000, _integer(1, MAX_TIMEOUT_MS))  # then pending fragments fall back
    max_fragments_per_template: int = setting(100, _integer(1, 10_000))
    # SPEC §6: nested fragments. Depth 1 is the page's template (ESI's default bound is 5);
    # the page's budget counts its template's fragments and every nested one.
    max_nesting_depth: int = setting(5, _integer(1, 64))
    max_fragments_per_page: int = setting(100, _integer(1, 100_000))
    max_connections_per_origin: int = setting(LIMIT_PER_HOST, _integer(1, 100_000))  # read when the process starts
    server_timing: bool = setting(True, _boolean)  # Server-Timing: the primary's wait, composer's own time
    # One inline script at </body> with a `performance.measure` per fragment: off by default,
    # since a strict Content-Security-Policy refuses inline scripts (a console error per page).
    timing_marks: bool = setting(False, _boolean)
    # SPEC §9: limits on what one client, connection or backend may hold.
    client_header_timeout_ms: int = setting(10_000, _integer(1, MAX_TIMEOUT_MS))  # head not complete: closed
    keepalive_timeout_ms: int = setting(75_000, _integer(0, 3_600_000))  # an idle client connection is closed
    send_timeout_ms: int = setting(60_000, _integer(1, MAX_TIMEOUT_MS))  # a client reading nothing is dropped
    max_connections: int = setting(10_000, _integer(1, 1_000_000))  # client connections at once; more refused
    max_ws_message_bytes: int = setting(4 * 1024 * 1024, _integer(1, 1 << 30))  # larger: that socket closes
    max_connections_per_backend: int = setting(256, _integer(1, 100_000))  # read when the process starts
    server_header: bool = setting(True, _boolean)  # `Server: composer` (never a version); false: none
    # SPEC §7: what each fragment does in the browser (a route's `client_signals: false` opts out)
    client_signals: bool = setting(False, _boolean)
    client_signals_sample: float = setting(1.0, _fraction)  # share of pages whose browser reports
    client_signals_rate: int = setting(10, _integer(1, 10_000))  # beacons per second from one address
    # SPEC §8: canaries compared with their active version, aborted when clearly worse
    canary_analysis: AnalysisPolicy = setting(DEFAULT_ANALYSIS, _canary_analysis)  # noqa: RUF009
    # where verdicts outlive the process (default: .composer-state beside the manifest file or routes.yaml)
    state_dir: Path | None = setting(None, _state_dir)  # noqa: RUF009
    # README "Tailor compatibility": Tailor's client protocol, attribute and asset rules
    compat: str | None = setting(None, _compat)
    tailor: TailorSettings = setting(DEFAULT_TAILOR, _tailor)  # noqa: RUF009  # read with compat: tailor


# The table, keyed by the name under `settings:`. Built at import, so a field declared without
# `setting()` fails at once (KeyError), not at the first load.
SETTINGS: Mapping[str, Field[Any]] = {f.metadata["key"] or f.name: f for f in fields(Settings)}


def _settings(reader: Reader, node: yaml.Node | None, base: Path) -> Settings | None:
    """`settings:` through the table; None when a value is unusable (its problem is recorded).

    Keys are read in file order, so problems come in line order.
    """
    keys = reader.mapping(node, "settings", tuple(SETTINGS)) if node is not None else {}
    values: dict[str, Any] = {}
    usable = True
    for key, value_node in keys.items():
        row = SETTINGS[key]
        value = row.metadata["read"](reader, value_node, f"settings.{key}")
        if value is _Skip.INVALID:
            usable = False
        elif value is not _Skip.DEFAULT:
            values[row.name] = value
    if not usable:
        return None
    if "tailor" in keys and values.get("compat") is None:
        reader.warn(keys["tailor"], "settings.tailor changes nothing without settings.compat: tailor")
    settings = Settings(**values)
    return replace(settings, templates=base / settings.templates)


# ---------------------------------------------------------------- routes

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
        """The `Location` for a request with these path captures and raw query string."""
        location = self.to.render(params)
        if self.relative and location.startswith("//"):
            location = "/" + location.lstrip("/")  # a parameter must not turn it into another host
        if query:
            location += ("&" if "?" in self.to.text else "?") + quote(query, safe=_REDIRECT_QUERY_SAFE)
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
    client_signals: bool = True  # False: this route opts out of settings.client_signals
    layout: LayoutRef | None = None  # the template goes into this layout's slots (SPEC §6)
    template_lookup: bool = False  # Tailor's lookup: /x → x.html of the templates folder (composer.routing)


@dataclass(frozen=True, slots=True)
class Config:
    """A loaded routes.yaml. `label` is the file name as the user gave it, for messages."""

    path: Path
    label: str
    settings: Settings
    routes: tuple[RouteSpec, ...] = field(default_factory=tuple)
    stamp: Stamp = None  # the file as it was just before it was read
    problems: tuple[str, ...] = ()  # set only by `read_config`; such a config is never served
    warnings: tuple[str, ...] = ()  # `file:line: warning: …`: loads, but something in it changes nothing
    manifest: Manifest | None = None  # `fragments:` of routes.yaml, merged with an external manifest
    manifest_sources: tuple[tuple[Path, Stamp], ...] = ()  # a manifest file, for reloads

    def where(self, line: int) -> str:
        """`file:line` for a message about that line of routes.yaml."""
        return f"{self.label}:{line}"


_TOP_KEYS = ("settings", "fragments", "routes")
_TARGETS = ("template", "template_lookup", "backend", "redirect")
_BACKEND_OPTIONS = ("preserve_host", "timeout_ms", "connect_timeout_ms")
_ROUTE_KEYS = ("name", "match", *_TARGETS, *_BACKEND_OPTIONS, "client_signals", "layout", "filters")
_REDIRECT_KEYS = ("to", "status")
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
TEMPLATE_METHODS = frozenset({"GET", "HEAD"})
# The request's query string, appended to a redirect's `to` as the client sent it: only what
# cannot stand in a query is escaped (its `&`, `=`, `+` and `?` keep their meaning).
_REDIRECT_QUERY_SAFE = "/%:@!$&'()*+,;=-._~?"


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and check routes.yaml; raise `ConfigError` listing every problem found.

    routes.yaml alone: `composer.load` adds its templates and external manifest.
    """
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
    root, problem = parse_yaml(text, label)
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
                  problems=tuple(reader.problems), warnings=tuple(reader.warnings), manifest=manifest)


def _routes(reader: Reader, node: yaml.Node | None, root: yaml.Node,
            settings: Settings | None) -> tuple[RouteSpec, ...]:
    """`routes:` in file order; a broken route is left out, its problems recorded."""
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
    """A route's name, read even from a broken route, to report duplicates."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == "name" and isinstance(value, yaml.ScalarNode):
                return str(value.value)
    return None


def _route(reader: Reader, node: yaml.Node, settings: Settings | None) -> RouteSpec | None:
    """One route; None when it has a problem (recorded)."""
    keys = reader.mapping(node, "a route", _ROUTE_KEYS)
    if not isinstance(node, yaml.MappingNode):
        return None
    before = len(reader.problems)
    for required in ("name", "match"):
        if required not in keys:
            reader.error(node, f"route is missing {required!r}")
    targets = [k for k in _TARGETS if k in keys]
    if len(targets) != 1:
        reader.error(node, "a route needs exactly one of `template`, `template_lookup`, `backend`, `redirect`"
                           + (f" (it has {', '.join(targets)})" if targets else ""))
    if "backend" not in keys:
        for option in _BACKEND_OPTIONS:
            if option in keys:
                reader.error(keys[option], f"{option} applies to backend routes only")
    name = reader.string(keys["name"], "route name") if "name" in keys else None
    path, methods, conditions = _match(reader, keys["match"]) if "match" in keys else (None, None, ())
    params = path.params if path is not None else ()
    target = targets[0] if len(targets) == 1 else None
    request_filters, filters = parse_filters(reader, keys["filters"], params, target) if "filters" in keys \
        else ((), ())
    template = backend = redirect = None
    lookup = "template_lookup" in keys and _template_lookup(reader, keys["template_lookup"], path)
    if "template" in keys or lookup:
        template = reader.string(keys["template"], "template") if "template" in keys else None
        if methods is None:
            methods = TEMPLATE_METHODS
        elif not methods <= TEMPLATE_METHODS:
            reader.error(keys["match"], "template routes answer GET and HEAD only, not "
                                        + ", ".join(sorted(methods - TEMPLATE_METHODS)))
    elif "backend" in keys and settings is not None:
        backend = _backend(reader, keys, settings)
    elif "redirect" in keys:
        redirect = _redirect(reader, keys["redirect"], params)
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
        client_signals=_client_signals(reader, keys),
        layout=_route_layout(reader, keys, settings),
        template_lookup=lookup,
    )


def _template_lookup(reader: Reader, node: yaml.Node, path: PathPredicate | PathPrefixPredicate | None) -> bool:
    """`template_lookup: true` (Tailor's template loader): a path under the route's
    `path_prefix` names a template, `/x` → `x.html`, `/` → `index.html`."""
    value = reader.boolean(node, "template_lookup")
    if value is False:
        reader.error(node, "template_lookup: false is no route; leave the key out")
    if value and path is not None and not isinstance(path, PathPrefixPredicate):
        reader.error(node, "template_lookup needs match.path_prefix (the templates' names follow it)")
    return bool(value)


def _route_layout(reader: Reader, keys: dict[str, yaml.Node], settings: Settings | None) -> LayoutRef | None:
    """A template route's `layout:` (null: none), else settings.layout."""
    node = keys.get("layout")
    if node is None:
        return settings.layout if settings is not None and "template" in keys else None
    if "template" not in keys:
        reader.error(node, "layout applies to template routes only")
        return None
    if is_null(node):
        return None
    layout = _layout(reader, node, "layout")
    return layout if isinstance(layout, LayoutRef) else None


def _client_signals(reader: Reader, keys: dict[str, yaml.Node]) -> bool:
    """A template route's `client_signals: false` opts it out of settings.client_signals."""
    node = keys.get("client_signals")
    if node is None:
        return True
    if "template" not in keys:
        reader.error(node, "client_signals applies to template routes only")
    return reader.boolean(node, "client_signals") is not False


def _match(reader: Reader, node: yaml.Node) -> tuple[PathPredicate | PathPrefixPredicate | None,
                                                      frozenset[str] | None, tuple[Condition, ...]]:
    """`match:` through the predicate registry: the path one, the methods, the rest."""
    return parse_match(reader, node)


def _backend(reader: Reader, keys: dict[str, yaml.Node], settings: Settings) -> Backend | None:
    """A backend route's origin and timeouts; None when one is wrong (recorded)."""
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
    """`redirect: {to, status}`; parameters of `to` must be the route path's."""
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

