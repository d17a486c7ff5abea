"""The page listener's connections: what one client may hold, and what it is told (SPEC §9).

aiohttp's low-level `web.Server` parses requests; composer's table is the router. What an
edge needs beyond it sits here, per connection, at no cost on the hot path but two timer
calls per request:

- a request head must be complete within `client_header_timeout_ms` of its first byte (or of
  the connection's start): a slowloris client holds a socket for seconds, not an hour;
- a client that reads nothing for `send_timeout_ms` while composer has bytes for it is
  dropped (the transport's own pause/resume-writing signals time it, so a slow but reading
  client is never cut);
- at most `max_connections` connections at once; one more gets a bare 503 and is closed;
- header names with `_` are dropped before routing (WSGI/CGI backends read `X_User` as
  `x-user`, which would slip past every filter), and an absolute-form target
  (`GET http://host/x`) routes by its authority, not by `Host` (RFC 9112 §3.2.2);
- a malformed request gets a fixed short body and one short log line: never a traceback,
  never its own bytes echoed back;
- every response says `Server: composer` (never a version), or nothing when turned off.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy

from .access import REQUEST_ID, AccessLog
from .errors import error_page
from .routing import split_target

__all__ = ["Limits", "PageServer", "raise_open_files"]

log = logging.getLogger("composer.listener")

_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_END_OF_HEAD = b"\r\n\r\n"


class Limits:
    """The §9 limits of one listener (a reload replaces them, for open connections too)."""

    __slots__ = ("header_timeout", "max_connections", "send_timeout", "server")

    def __init__(self, *, header_timeout: float, send_timeout: float, max_connections: int,
                 server_header: bool) -> None:
        self.header_timeout = header_timeout
        self.send_timeout = send_timeout
        self.max_connections = max_connections
        self.server = "composer" if server_header else None


class _Request(web.BaseRequest):
    """A page request whose responses carry composer's `Server` header, whoever built them."""

    @property
    def remote(self) -> str | None:
        """The client's address, worked out once per connection (aiohttp's, once per request, was
        a twentieth of a fragment-less page's own work: every access line has it)."""
        protocol = self._protocol
        return protocol.remote if isinstance(protocol, _Connection) else None

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        # aiohttp's one hook between the headers being final and being written: its own
        # `Server: Python/3.x aiohttp/3.y` (set by default) is replaced or removed here.
        protocol = self.protocol
        server = protocol.pages.limits.server if isinstance(protocol, _Connection) else None
        if server is None:
            response.headers.popall("server", None)
        else:
            response.headers["server"] = server


class _Connection(RequestHandler):
    """One client connection, with the head, send and connection-count limits."""

    __slots__ = ("_busy", "_counted", "_head_timer", "_send_timer", "pages", "remote")

    def __init__(self, manager: PageServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.pages = manager
        self._busy = False  # a request's head is in; its body and response may take long
        self._counted = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self.remote: str | None = None  # the client's address, as aiohttp's `BaseRequest.remote` gives it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pages = self.pages
        if pages.open >= pages.limits.max_connections:
            # Refused before aiohttp sees it: no task, no parser, one write.
            transport.write(_BUSY)  # type: ignore[attr-defined]
            transport.close()
            return
        pages.open += 1
        self._counted = True
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.remote = None if peer is None else str(peer[0]) if isinstance(peer, (list, tuple)) else str(peer)
        self._arm_head()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._counted:
            return
        self._counted = False
        self.pages.open -= 1
        for timer in (self._head_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._send_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._busy and self._head_timer is None and _END_OF_HEAD not in data:
            self._arm_head()  # the first bytes of a head that did not come whole
        super().data_received(data)

    def head_done(self) -> None:
        """A request's head is in (called as its request object is made)."""
        self._busy = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def request_done(self) -> None:
        """composer has answered the request; what comes next is a new head."""
        self._busy = False

    def _arm_head(self) -> None:
        self._head_timer = self._loop.call_later(self.pages.limits.header_timeout, self._head_expired)

    def _head_expired(self) -> None:
        self._head_timer = None
        if not self._busy:
            self.force_close()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._send_timer = self._loop.call_later(self.pages.limits.send_timeout, self._send_expired)

    def resume_writing(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        super().resume_writing()

    def _send_expired(self) -> None:
        self._send_timer = None
        transport = self.transport
        if transport is not None:
            log.info("client dropped: it read nothing for send_timeout_ms",
                     extra={"fields": {"send_timeout_ms": round(self.pages.limits.send_timeout * 1000)}})
            transport.abort()  # the pending drain fails, which ends the request's handler

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse or handle, made boring: a fixed body
        and one short line, where aiohttp would log a traceback and echo the request's bytes."""
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started; the connection is closed instead")
        status = status if status in (400, 413, 414, 431, 501) else 500 if status >= 500 else 400
        error = None
        if status >= 500 and exc is not None:
            log.error("request failed", exc_info=exc)  # a bug of composer's: its traceback helps
        else:  # the client's mistake: its access line says which, in a word
            error = type(exc).__name__ if exc is not None else "bad request"
        if REQUEST_ID not in request:  # else composer's handler ran, and wrote the line
            self.pages.access.write(request, split_target(request.raw_path)[0], status, 0.0, "", "", error)
        response = web.Response(status=status, body=error_page(status),
                                headers={"content-type": "text/html; charset=utf-8", "cache-control": "no-store"})
        response.force_close()
        return response


class PageServer(web.Server):
    """`web.Server` making `_Connection`s and `_Request`s."""

    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], limits: Limits,
                 access: AccessLog, handler_cancellation: bool = False, **kwargs: Any) -> None:
        # aiohttp's access logger is off: composer's handler writes each line (access.AccessLog),
        # and `handle_error` those of requests that never reached it.
        kwargs["access_log"] = None
        super().__init__(self._handle, request_factory=self._request, handler_cancellation=handler_cancellation,
                         **kwargs)
        self.limits = limits
        self.access = access
        self.open = 0  # connections held now
        self._handler = handler
        self._handler_kwargs = kwargs
        self._event_loop = asyncio.get_running_loop()

    def reconfigure(self, limits: Limits, keepalive_timeout: float) -> None:
        """New limits from a reloaded config (keep-alive: for connections made from now on)."""
        self.limits = limits
        self._handler_kwargs["keepalive_timeout"] = keepalive_timeout

    def __call__(self) -> RequestHandler:
        return _Connection(self, loop=self._event_loop, **self._handler_kwargs)

    def _request(self, message: RawRequestMessage, payload: StreamReader, protocol: RequestHandler,
                 writer: AbstractStreamWriter, task: asyncio.Task[None]) -> web.BaseRequest:
        if isinstance(protocol, _Connection):
            protocol.head_done()
        path = message.path
        # (the names joined, not a generator over them: this runs for every request, interpreted)
        if not path.startswith("/") and "://" in path or "_" in "".join(message.headers.keys()):
            message = _sanitised(message)
        return _Request(message, payload, protocol, writer, task, self._event_loop)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await self._handler(request)
        finally:
            protocol = request.protocol
            if isinstance(protocol, _Connection):
                protocol.request_done()


def _sanitised(message: RawRequestMessage) -> RawRequestMessage:
    """`message` without `_` header names, and with an absolute-form target's authority as
    its only Host."""
    raw = [(name, value) for name, value in message.raw_headers if b"_" not in name]
    path = message.path
    if not path.startswith("/") and "://" in path:
        authority = path.partition("://")[2].partition("/")[0].partition("?")[0].rpartition("@")[2]
        raw = [(name, value) for name, value in raw if name.lower() != b"host"]
        raw.insert(0, (b"Host", authority.encode("utf-8", "surrogateescape")))
    headers: CIMultiDict[str] = CIMultiDict(
        (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")) for name, value in raw)
    return message._replace(headers=CIMultiDictProxy(headers), raw_headers=tuple(raw))


def raise_open_files(connections: int) -> None:
    """Lift the soft open-files limit to the hard one: the common default of 1,024 would let
    a thousand idle clients take every descriptor, and fragment fetches then fail with EMFILE
    long before `max_connections` is reached. Says so when even the hard limit is short."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    # Each page may hold fragment connections beside its client's: leave them room.
    if soft != resource.RLIM_INFINITY and soft < connections + 1024:
        log.warning("the open-files limit is below settings.max_connections plus room for fragment "
                    "connections; raise it (ulimit -n) or lower max_connections",
                    extra={"fields": {"open_files": soft, "max_connections": connections}})
