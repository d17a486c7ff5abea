"""Wiring: the page listener, the admin listener, and a graceful stop.

Pages are served by aiohttp's low-level `web.Server` (no router of its own: composer's
route table is the router). The admin listener is a small `web.Application` with
`/metrics`, `/healthz` and `/readyz`. `stop()` turns `/readyz` to 503, closes the page
listener, lets in-flight pages finish within the grace period, then closes the rest.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time

import aiohttp
from aiohttp import web

from .compose import BARE_500, Composer, request_id_of
from .config import Config
from .fragments import new_session
from .logs import REQUEST_ID, ROUTE, AccessLogger
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .routing import RouteTable

__all__ = ["ComposerServer", "GRACE_SECONDS", "stop_event"]

log = logging.getLogger("composer.server")

GRACE_SECONDS = 10.0
_NOT_FOUND = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body><h1>404 Not Found</h1></body></html>"
_NOT_ALLOWED = (b"<!DOCTYPE html><html><head><title>405 Method Not Allowed</title></head>"
                b"<body><h1>405 Method Not Allowed</h1></body></html>")
_HTML = "text/html; charset=utf-8"
# The `method` label takes these values; anything else counts as "other" (bounded series).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class ComposerServer:
    """One composer process's listeners; `start()`, then `stop()` (graceful)."""

    def __init__(self, config: Config, table: RouteTable, *, host: str = "0.0.0.0", port: int = 8080,
                 admin_host: str | None = None, admin_port: int = 9911,
                 grace: float = GRACE_SECONDS, sockets: list[socket.socket] | None = None) -> None:
        self.config = config
        self.table = table
        self.host, self.port = host, port
        self.admin_host, self.admin_port = admin_host or host, admin_port
        self.grace = grace
        self.sockets = sockets  # pre-bound page sockets (gunicorn workers); the admin port is shared
        self.metrics = Metrics()
        self.ready = False
        self._session: aiohttp.ClientSession | None = None
        self._composer: Composer | None = None
        self._runners: list[web.BaseRunner] = []
        self._declare_fragments(table)

    def _declare_fragments(self, table: RouteTable) -> None:
        for route in table.routes:
            for fragment in route.template.fragments:
                self.metrics.fragment_info.labels(fragment.id, "", "").set(1)

    async def start(self) -> None:
        self._session = new_session()
        self._composer = Composer(self._session, self.config.settings, self.metrics)
        pages = web.ServerRunner(
            web.Server(self.handle, access_log_class=AccessLogger, handler_cancellation=True,
                       access_log=logging.getLogger("composer.access")),
            handle_signals=False, shutdown_timeout=self.grace)
        admin = web.AppRunner(self._admin_app(), handle_signals=False, access_log=None)
        await pages.setup()
        self._runners.append(pages)
        if self.sockets is None:
            await web.TCPSite(pages, self.host, self.port, reuse_address=True).start()
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
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        if self._session is not None:
            await self._session.close()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()
        request[REQUEST_ID] = request_id_of(request)
        route_name = ""
        status = 500
        try:
            match = self.table.match(request.method, request.rel_url.raw_path)
            route = match.route
            if route is None:
                if match.allow:
                    response: web.StreamResponse = web.Response(
                        status=405, body=_NOT_ALLOWED, content_type="text/html", charset="utf-8",
                        headers={"allow": ", ".join(sorted(match.allow))})
                else:
                    response = web.Response(status=404, body=_NOT_FOUND, content_type="text/html",
                                            charset="utf-8")
            else:
                route_name = request[ROUTE] = route.name
                assert self._composer is not None
                response = await self._composer.compose(request, route, match.params)
            status = response.status
            return response
        except (ConnectionResetError, asyncio.CancelledError):
            status = 499  # the client went away; nothing more can be sent
            raise
        except Exception:
            if request.writer.output_size > 0:
                raise  # the head is out: aiohttp logs it and closes the connection
            log.exception("unhandled error", extra={"fields": {"route": route_name,
                                                               "request_id": request[REQUEST_ID]}})
            return web.Response(status=500, body=BARE_500, headers={"content-type": _HTML})
        finally:
            method = request.method if request.method in _METHODS else "other"
            self.metrics.requests.labels(route_name, method, str(status)).inc()
            self.metrics.request_duration.labels(route_name).observe(time.perf_counter() - started)

    def _admin_app(self) -> web.Application:
        app = web.Application()

        async def metrics(_: web.Request) -> web.Response:
            return web.Response(body=self.metrics.render(), headers={"content-type": CONTENT_TYPE_LATEST})

        async def healthz(_: web.Request) -> web.Response:
            return web.Response(text="ok\n")

        async def readyz(_: web.Request) -> web.Response:
            if self.ready:
                return web.Response(text="ready\n")
            return web.Response(status=503, text="draining\n" if self._runners else "starting\n")

        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        return app


def _bound_port(runner: web.BaseRunner) -> int:
    for address in runner.addresses:
        return int(address[1])
    raise RuntimeError("listener has no address")


def _display(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def stop_event() -> asyncio.Event:
    """An event set by the first SIGTERM or SIGINT: the cue for a graceful stop.

    Install it before announcing readiness, so a signal can never find the default handler.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
