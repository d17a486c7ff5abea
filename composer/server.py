"""Wiring: the page listener, the admin listener, hot reload, and a graceful stop.

Pages are served by aiohttp's low-level `web.Server` (no router of its own: composer's
route table is the router). Each request reads `self.table` once, so a reload that swaps
it never changes a request midway. The admin listener is a small `web.Application` with
`/metrics`, `/healthz` and `/readyz`. `stop()` turns `/readyz` to 503, closes the page
listener, lets in-flight requests finish within the grace period, then closes the rest.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import socket
import time
from datetime import UTC, datetime
from typing import TypeVar

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import Gauge

from .access import REQUEST_ID, AccessLog, new_request_id
from .breaker import State
from .canary import Analysis
from .client import Client
from .collector import SCRIPT_PREFIX, bundle
from .compose import BARE_500, Composer
from .config import Settings
from .errors import error_page
from .filters import apply_response
from .fragments import new_session
from .guard import request_problem
from .listener import Limits, PageServer
from .logs import JsonFormatter, JsonHandler
from .metrics import CONTENT_TYPE_LATEST, Declared, Metrics
from .pipeline import Pipeline
from .proxy import Proxy, backend_session
from .reload import Reloader
from .routing import Route, RouteTable, split_target
from .signals import BEACON_PATH, Beacons, Labels
from .status import Status
from .tracing import Tracing, from_env

__all__ = ["GC_THRESHOLD", "GRACE_SECONDS", "LISTEN_BACKLOG", "MALLOC_MMAP_THRESHOLD", "MALLOC_TRIM_THRESHOLD",
           "ComposerServer", "stop_event", "tune_gc", "tune_malloc"]

log = logging.getLogger("composer.server")

GRACE_SECONDS = 10.0
# The page port's listen backlog (the kernel caps it at net.core.somaxconn, 4,096 by default):
# new clients beyond it are dropped and send their SYN again only after a second; aiohttp's
# default of 128 did that to a burst of a few hundred (nginx takes 511, Go somaxconn).
LISTEN_BACKLOG = 4096
GC_THRESHOLD = 20_000  # net allocations between the cyclic collector's young passes (tune_gc)
# glibc malloc (tune_malloc): blocks up to this size come from the heap, not a fresh mmap (glibc's
# ceiling for it: 32 MiB on 64-bit) ...
MALLOC_MMAP_THRESHOLD = 32 << 20
# ... and freed heap is handed back to the system only past this much at its top.
MALLOC_TRIM_THRESHOLD = 128 << 20
_M_TRIM_THRESHOLD = -1  # mallopt's parameters (glibc's malloc.h)
_M_MMAP_THRESHOLD = -3
# Request-line and header limits, set explicitly rather than inherited: anything longer is
# refused by aiohttp's parser with 400 before composer sees it.
MAX_LINE_SIZE = 8190
MAX_FIELD_SIZE = 8190
MAX_HEADERS = 128
_NOT_FOUND = error_page(404)
_NOT_ALLOWED = error_page(405)
_HTML = "text/html; charset=utf-8"
_OWN = "/_composer/"  # composer's own endpoints on the page port (client signals)
_OWN_ROUTE = "_composer"  # their `route` label
# The `method` label takes these values; anything else counts as "other" (bounded series).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class ComposerServer:
    """One composer process's listeners; `start()`, then `stop()` (graceful)."""

    def __init__(self, table: RouteTable, *, host: str = "0.0.0.0", port: int = 8080,
                 admin_host: str | None = None, admin_port: int = 9911,
                 grace: float = GRACE_SECONDS, sockets: list[socket.socket] | None = None,
                 tracing: Tracing | None = None) -> None:
        """Serve `table` (from `composer.load`); reloads follow the files it was loaded from."""
        self.table = table
        self.host, self.port = host, port
        self.admin_host, self.admin_port = admin_host or "127.0.0.1", admin_port
        self.grace = grace
        self.sockets = sockets  # pre-bound page sockets (gunicorn workers); the admin port is shared
        self.tracing = tracing  # None: from the environment (OTEL_EXPORTER_OTLP_ENDPOINT) at start()
        self._own_tracing = False
        self.metrics = Metrics()
        self.access = AccessLog(logging.getLogger("composer.access"), JsonHandler, JsonFormatter)
        self.ready = False
        self.reloader = Reloader(lambda: self.table, self._swap, self.metrics)
        self._sessions: list[aiohttp.ClientSession | Client] = []  # fragments, backends
        self._composer: Composer | None = None
        self._proxy: Proxy | None = None
        self._page_server: PageServer | None = None
        self._runners: list[web.BaseRunner] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._declared: set[tuple[str, str, str]] = set()
        self._timeouts: set[tuple[str, str]] = set()
        self._circuits: set[str] = set()
        self.status = Status(self.metrics)  # the admin status page's 5-minute figures
        self.labels = Labels(table)  # what beacons may name (SPEC §7)
        self._beacons = Beacons(self.metrics, self.labels, table.settings.client_signals_rate)
        self._declare_fragments(table)
        self.canary = Analysis(self.metrics)  # SPEC §8: verdicts shared through settings.state_dir
        self.canary.apply(table)

    def _declare_fragments(self, table: RouteTable) -> None:
        """composer_fragment_info = 1 for every active and canary version, and every plain `src`;
        a manifest fragment whose tag has its own `id` is declared under that id too.
        composer_fragment_timeout_seconds: every fragment's timeout on every route.
        Every fetch a route's enabled tag can make (its versions served) has its failures,
        fallbacks, durations and cache results at 0 from now on (SPEC §9; `Metrics.declare`).
        """
        declared: set[tuple[str, str, str]] = set()
        for entry in table.manifest.fragments.values() if table.manifest else ():
            declared.add((entry.name, entry.active, entry.owner))
            if entry.canary is not None:
                declared.add((entry.name, entry.canary.version, entry.owner))
        circuits = self.metrics.circuit_state
        timeouts: dict[tuple[str, str], float] = {}
        uses: list[Declared] = []
        for route, template in table.templates():
            for fragment in template.fragments:
                timeouts[fragment.id, route.name] = fragment.timeout
                if fragment.name is None:
                    declared.add((fragment.id, "", ""))
                    served = {"": fragment.src.origin}
                else:
                    served = {v: fragment.versions[v].origin for v in (fragment.version, fragment.canary)
                              if v is not None}
                    if fragment.id != fragment.name:  # its metrics carry the tag's id: so must the owner join
                        declared.update((fragment.id, version, fragment.owner) for version in served)
                if fragment.enabled:  # flagged off: nothing fetched, nothing to count until it is back on
                    uses.append(Declared(fragment.id, route.name, fragment.owner, served))
                if fragment.id not in self._circuits:  # every circuit shows from the start, closed
                    self._circuits.add(fragment.id)
                    circuits.labels(fragment.id).set(State.CLOSED)
        _replace(self.metrics.fragment_info, self._declared, dict.fromkeys(declared, 1.0))
        _replace(self.metrics.fragment_timeout, self._timeouts, timeouts)
        self.labels = Labels(table)
        self.metrics.declare(uses, self.labels.series())
        self._declared, self._timeouts = declared, set(timeouts)

    def _swap(self, table: RouteTable) -> None:
        """Serve a reloaded table from the next request on; pages in flight keep theirs."""
        old = self.table.settings
        self.table = table
        self._declare_fragments(table)
        self.canary.apply(table)
        self._beacons.apply(self.labels, table.settings.client_signals_rate)
        if self._composer is not None:
            self._composer.pipeline.apply(table)
        new = table.settings
        if self._page_server is not None:
            self._page_server.reconfigure(_limits(new), new.keepalive_timeout_ms / 1000)
        if old.max_connections_per_origin != new.max_connections_per_origin:
            log.warning("settings.max_connections_per_origin changed; it applies when composer restarts",
                        extra={"fields": {"running": old.max_connections_per_origin,
                                          "configured": new.max_connections_per_origin}})

    async def start(self) -> None:
        settings = self.table.settings
        fragments = new_session(limit_per_host=settings.max_connections_per_origin)
        backends = backend_session(max_connections=settings.max_connections_per_backend)
        self._sessions += (fragments, backends)
        if self.tracing is None:  # here, not in __init__: its export thread must start after a fork
            self.tracing = from_env()
            self._own_tracing = self.tracing is not None
        pipeline = Pipeline(fragments, self.metrics, cache_bytes=settings.cache_max_bytes, tracing=self.tracing,
                            canary=self.canary)
        pipeline.apply(self.table)
        self._composer = Composer(pipeline, tracing=self.tracing)
        self._proxy = Proxy(backends, self.tracing, max_ws_message_bytes=settings.max_ws_message_bytes)
        self._page_server = PageServer(
            self.handle, _limits(settings), self.access, handler_cancellation=True, auto_decompress=False,
            max_line_size=MAX_LINE_SIZE, max_field_size=MAX_FIELD_SIZE, max_headers=MAX_HEADERS,
            keepalive_timeout=settings.keepalive_timeout_ms / 1000)
        pages = web.ServerRunner(self._page_server, handle_signals=False, shutdown_timeout=self.grace)
        admin = web.AppRunner(self._admin_app(), handle_signals=False, access_log=None)
        await self.status.sample()  # the page's baseline, before a request can be counted and missed
        await pages.setup()
        self._runners.append(pages)
        if self.sockets is None:
            await web.TCPSite(pages, self.host, self.port, reuse_address=True, backlog=LISTEN_BACKLOG).start()
        else:
            for sock in self.sockets:
                await web.SockSite(pages, sock).start()
        await admin.setup()
        self._runners.append(admin)
        shared = self.sockets is not None
        await web.TCPSite(admin, self.admin_host, self.admin_port, reuse_address=True,
                          reuse_port=shared or None).start()
        self.port = _bound_port(pages)
        self.admin_port = _bound_port(admin)
        self._tasks.append(asyncio.create_task(self.reloader.run()))
        self._tasks.append(asyncio.create_task(self.status.run()))
        self._tasks.append(asyncio.create_task(self.reloader.poll_manifest()))
        self._tasks.append(asyncio.create_task(self.canary.run()))
        self.ready = True

    @property
    def url(self) -> str:
        return f"http://{_display(self.host)}:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://{_display(self.admin_host)}:{self.admin_port}"

    async def stop(self) -> None:
        """Drain: readyz → 503, stop accepting, finish in-flight pages (≤ grace), close."""
        self.ready = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        if self._composer is not None:
            await self._composer.close()
        for session in self._sessions:
            await session.close()
        self._sessions.clear()
        if self._own_tracing and self.tracing is not None:
            await self.tracing.close()
            self.tracing, self._own_tracing = None, False

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = request[REQUEST_ID] = new_request_id(request)  # (none was given before: no lookup)
        table = self.table  # one table for the whole request, whatever reloads meanwhile
        route_name = ""
        status = 500
        path, query = split_target(request.raw_path)
        try:
            problem = request_problem(request, path)
            response: web.StreamResponse
            if problem is not None:
                response = _page(problem[0], error_page(*problem))
            elif path.startswith(_OWN) and self.labels.routes:  # client signals (SPEC §7) are on
                route_name = _OWN_ROUTE
                response = await self._own(request, path)
            else:
                match = table.match(request, path)
                route = match.route
                if route is None:
                    response = _page(405, _NOT_ALLOWED, allow=", ".join(sorted(match.allow))) if match.allow \
                        else _page(404, _NOT_FOUND)
                else:
                    route_name = route.name
                    response = await self._dispatch(request, table, route, match.params, path, query, request_id)
            status = response.status
            return response
        except ConnectionResetError:
            status = 499  # the client went away while we wrote; nothing more can be sent
            transport = request.transport
            if transport is not None and not transport.is_closing():
                raise
            # Not an error of ours: aiohttp finishes this quietly (its write fails too) and logs
            # the access line, where re-raising would log a traceback per departed browser.
            return web.Response(status=499)
        except asyncio.CancelledError:
            status = 499  # the client went away; nothing more can be sent
            raise
        except Exception:
            if request.writer.output_size > 0:
                raise  # the head is out: aiohttp logs it and closes the connection
            log.exception("unhandled error", extra={"fields": {"route": route_name,
                                                               "request_id": request_id}})
            return web.Response(status=500, body=BARE_500, headers={"content-type": _HTML})
        finally:
            elapsed = time.perf_counter() - started
            method = request.method if request.method in _METHODS else "other"
            metrics = self.metrics
            metrics.series(metrics.requests, route_name, method, str(status)).inc()
            metrics.series(metrics.request_duration, route_name).observe(elapsed)
            # Here, not after aiohttp's last write (a Response's body leaves just after): a request
            # whose client left, cancelled, has its line too, with 499.
            self.access.write(request, path, status, elapsed, route_name, request_id)

    async def _dispatch(self, request: web.BaseRequest, table: RouteTable, route: Route, params: dict[str, str],
                        path: str, query: str, request_id: str) -> web.StreamResponse:
        if route.pages is not None:  # template_lookup: a page compiled at load, or none
            page = route.page(path)
            if page is None:
                return _page(404, _NOT_FOUND)
            route = page
        if route.template is not None:
            assert self._composer is not None
            return await self._composer.compose(request, route, params, table.settings, request_id)
        if route.backend is not None:
            assert self._proxy is not None
            return await self._proxy.forward(request, route, params, path, query)
        assert route.redirect is not None
        headers = CIMultiDict({"location": route.redirect.location(params, query)})
        return web.Response(status=apply_response(route.response_filters, route.redirect.status, headers),
                            headers=headers)

    async def _own(self, request: web.BaseRequest, path: str) -> web.StreamResponse:
        """composer's own endpoints on the page port: the collector script and the beacons."""
        if path == BEACON_PATH:
            return await self._beacons.receive(request)
        if path.startswith(SCRIPT_PREFIX) and path.endswith(".js") and request.method in ("GET", "HEAD"):
            return bundle().response(request)
        return _page(404, _NOT_FOUND)

    def _manifest_view(self) -> dict[str, object]:
        """GET /manifest: what runs now, per fragment, and how it fared in the last minutes.

        The source is shown `redact`ed: a manifest URL may carry credentials or a token.
        """
        from .urls import redact

        manifest = self.table.manifest
        recent = self.metrics.recent
        breakers = self._composer.pipeline.breakers if self._composer else None
        now = breakers.now() if breakers else 0.0
        fragments: dict[str, object] = {}
        for entry in manifest.fragments.values() if manifest else ():
            failures, fallbacks = recent.get(entry.name)
            circuits = breakers.of(entry.name) if breakers else []
            fragments[entry.name] = {
                "owner": entry.owner,
                "active": entry.active,
                "canary": {"version": entry.canary.version, "percent": entry.canary.percent,
                           **self.canary.view(entry.name, entry.canary.version)} if entry.canary else None,
                "rollback": entry.rollback,
                "enabled": entry.enabled,
                "versions": list(entry.versions),
                "recent": {"minutes": recent.minutes, "failures": failures, "fallbacks": fallbacks},
                "circuit": max((b.state for b in circuits), default=State.CLOSED).name.lower(),
            }
        return {
            "source": redact(manifest.source) if manifest else None,
            "loaded_at": _iso(manifest.loaded_at) if manifest else None,
            "fragments": fragments,
            # every circuit composer has opened a request through, manifest fragment or plain `src`
            "circuits": [b.view(now) for b in breakers.all()] if breakers else [],
        }

    def _admin_app(self) -> web.Application:
        app = web.Application()

        async def metrics(_: web.Request) -> web.Response:
            # In a worker thread, as prometheus_client's own server does: rendering every series
            # takes tens of ms (55 ms for bench/routes.yaml), which on the loop would hold every
            # page that long at each scrape (page0 p99 scraped at 5/s: 129 ms, 10 ms in a thread; bench/scrape.py).
            body = await asyncio.to_thread(self.metrics.render)
            return web.Response(body=body, headers={"content-type": CONTENT_TYPE_LATEST})

        async def healthz(_: web.Request) -> web.Response:
            return web.Response(text="ok\n")

        async def status(_: web.Request) -> web.Response:
            page = await self.status.page(self.table, self._manifest_view())
            return web.Response(body=page, headers={"content-type": _HTML, "cache-control": "no-store"})

        async def readyz(_: web.Request) -> web.Response:
            if self.ready:
                return web.Response(text="ready\n")
            return web.Response(status=503, text="draining\n" if self._runners else "starting\n")

        async def manifest(_: web.Request) -> web.Response:
            return web.json_response(self._manifest_view(), dumps=_pretty)

        app.router.add_get("/", status)
        app.router.add_get("/manifest", manifest)
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        return app


_Labels = TypeVar("_Labels", bound=tuple[str, ...])


def _replace(gauge: Gauge, old: set[_Labels], new: dict[_Labels, float]) -> None:
    """Set a declaration gauge to `new`; series no longer declared drop out (with several
    workers, multiprocess mode cannot remove series: they go to 0)."""
    for labels in old - new.keys():
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            gauge.labels(*labels).set(0)
        else:
            gauge.remove(*labels)
    for labels, value in new.items():
        gauge.labels(*labels).set(value)


def _limits(settings: Settings) -> Limits:
    return Limits(header_timeout=settings.client_header_timeout_ms / 1000,
                  send_timeout=settings.send_timeout_ms / 1000, max_connections=settings.max_connections,
                  server_header=settings.server_header)


def _pretty(value: object) -> str:
    return json.dumps(value, indent=2) + "\n"


def _page(status: int, body: bytes, allow: str | None = None) -> web.Response:
    headers = {"content-type": _HTML, "cache-control": "no-store"}
    if allow is not None:
        headers["allow"] = allow
    return web.Response(status=status, body=body, headers=headers)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _bound_port(runner: web.BaseRunner) -> int:
    for address in runner.addresses:
        return int(address[1])
    raise RuntimeError("listener has no address")


def _display(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def tune_gc() -> None:
    """Once a serving process is up. What is loaded by now (modules, the route table, compiled
    templates) lives as long as the process, so the collector's full passes need not walk it
    again and again (`gc.freeze`).

    A page frees what it made by reference counting: composer leaves no reference cycles per
    page, whatever its fragments do (bench/soak.py counts what the collector finds). At
    Python's default (a pass every 700 net allocations) the collector still ran hundreds of
    times a second, each pass walking the objects of every fetch in flight and finding
    nothing: 19 % of page20's CPU at 64 connections, 25 % of page100's (bench/PROFILE.md,
    seventh pass). A pass every 20,000 keeps it for what it is for: cycles, which would then
    wait for up to 20,000 allocations (a few ms of pages) before being freed."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, older, oldest)


def tune_malloc() -> bool:
    """Once, in a serving process: large blocks (a fragment body, a page's bytes, uvloop's reads
    of up to 250 KiB) reuse freed heap instead of fresh pages. By default glibc maps each block
    over 128 KiB anew (or trims the heap's free top past 2× the largest freed so far), and the
    kernel faults in and zeroes every page of it again: a third of a page's CPU with one 1 MiB
    fragment went there (bench/PROFILE.md, twelfth pass). The cost: after a burst of large
    pages RSS stays near that burst's high-water mark (up to MALLOC_TRIM_THRESHOLD of it free,
    ready for the next) instead of shrinking back. False where the C library is not glibc."""
    import ctypes  # here: a serving process needs it for this call only

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # 1: taken. A C library that refuses (0), or has no mallopt, keeps its own behaviour.
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD))


def stop_event() -> asyncio.Event:
    """An event set by the first SIGTERM or SIGINT: the cue for a graceful stop.

    Install it before announcing readiness, so a signal can never find the default handler.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
