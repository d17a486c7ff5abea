"""Backend routes: a streaming reverse proxy on aiohttp's client, WebSockets included.

Bodies are never held whole: the request body is read from the client as the backend
takes it, and the response body is written to the client as it arrives, so memory per
exchange is a few socket buffers whatever the size. What the backend answers — status,
reason, headers (every `Set-Cookie`), body bytes, compressed or not — reaches the client
unchanged, minus hop-by-hop headers (RFC 9110 §7.6.1).

`timeout` is about progress, not total time: the exchange fails when no byte has moved
in either direction for that long (an idle backend before its head → 504; later → the
connection is cut, as the status is already out). A 200 MB upload or download takes as
long as it takes.

SPEC §9 bounds what one exchange may hold: at most `max_connections_per_backend`
connections to one backend (more requests wait for one, within their timeout), WebSocket
messages up to `max_ws_message_bytes` each way (a larger one closes that socket with 1009,
unrelayed), and a pooled connection that received bytes while idle is never reused.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import WSCloseCode, WSMsgType, hdrs, web
from aiohttp.client_proto import ResponseHandler
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .access import REQUEST_ID
from .config import Backend
from .errors import error_page
from .filters import Outgoing, apply_response
from .headers import HOP_BY_HOP
from .routing import Route

if TYPE_CHECKING:
    from aiohttp.client_reqrep import ConnectionKey
    from aiohttp.connector import Connection
    from aiohttp.tracing import Trace
    from opentelemetry.trace import Span

    from .tracing import Tracing

__all__ = ["Proxy", "backend_session", "is_websocket"]

log = logging.getLogger("composer.proxy")

# The WebSocket handshake is negotiated again on each side.
_WS_HANDSHAKE = frozenset({"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
                           "sec-websocket-protocol", "sec-websocket-accept"})
_ERROR_PAGES = {502: error_page(502), 504: error_page(504)}
# A backend's answers that never carry a body, whatever their headers say (RFC 9110 §6.4.1).
_BODILESS = frozenset({204, 304})
_CHUNK = 256 * 1024


class _Handler(ResponseHandler):
    """aiohttp's client protocol, noting whether a byte arrived while it sat in the pool."""

    pooled = False
    stray = False

    def data_received(self, data: bytes) -> None:
        if self.pooled and data:
            self.stray = True
        super().data_received(data)


class _Connector(aiohttp.TCPConnector):
    """A connector that never hands out a pooled connection which received bytes while idle.

    aiohttp (3.14.5; aio-libs/aiohttp#13656) re-issues a pooled connection if it is still
    open, without looking at what the backend wrote on it meanwhile: an unsolicited response
    sent while idle became the answer to the next request, another user's. Such a connection
    is closed when taken from the pool, and the next one (or a new one) is taken instead.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._factory = functools.partial(_Handler, loop=self._loop)  # type: ignore[assignment]

    def _release(self, key: ConnectionKey, protocol: ResponseHandler, *, should_close: bool = False) -> None:
        super()._release(key, protocol, should_close=should_close)
        if isinstance(protocol, _Handler):
            protocol.pooled = True  # idle from now on (or closed, where it no longer matters)

    async def _get(self, key: ConnectionKey, traces: list[Trace]) -> Connection | None:
        while (conn := await super()._get(key, traces)) is not None:
            protocol = conn.protocol
            if isinstance(protocol, _Handler):
                protocol.pooled = False
                if not (protocol.stray or protocol.should_close):
                    return conn
            conn.close()
        return None


def backend_session(*, max_connections: int = 256) -> aiohttp.ClientSession:
    """The client session for backends: pooled (at most `max_connections` per backend),
    cookie-less, and never decoding bodies."""
    return aiohttp.ClientSession(
        connector=_Connector(limit=0, limit_per_host=max_connections, ttl_dns_cache=300, keepalive_timeout=30),
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        auto_decompress=False,
        trust_env=False,
        max_field_size=32768,
        read_bufsize=_CHUNK,
    )


def is_websocket(request: web.BaseRequest) -> bool:
    headers = request.headers
    return (headers.get("upgrade", "").lower() == "websocket"
            and "upgrade" in _tokens(headers.getall("connection", ())))


def _tokens(values: list[str] | tuple[str, ...]) -> set[str]:
    return {t.strip().lower() for v in values for t in v.split(",")}


class _Progress:
    """One deadline for an exchange, pushed back whenever a chunk moves either way."""

    __slots__ = ("_cm", "_loop", "_timeout")

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._loop = asyncio.get_running_loop()
        self._cm: asyncio.Timeout | None = None

    def start(self, cm: asyncio.Timeout) -> None:
        self._cm = cm

    def stop(self) -> None:
        self._cm = None

    def tick(self) -> None:
        if self._cm is not None:
            self._cm.reschedule(self._loop.time() + self._timeout)


class _Relayed(web.StreamResponse):
    """A backend's response: aiohttp gives a body without a Content-Type
    `application/octet-stream`, but a proxy must not invent one (RFC 9110 §8.3)."""

    async def _prepare_headers(self) -> None:
        untyped = hdrs.CONTENT_TYPE not in self.headers
        await super()._prepare_headers()
        if untyped:
            self.headers.popall(hdrs.CONTENT_TYPE, None)


class _ClientLeg(web.WebSocketResponse):
    """The client's side of a relayed WebSocket, remembering the first code composer closed it with.

    aiohttp closes it by itself on a message it refuses (1009: too big), then waits for the
    client's answer; a client that hangs up right after answering gets the handler cancelled
    before a pump has passed the code on, so the backend is closed with it on the way out.
    """

    first_close: int | None = None

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True) -> bool:
        if self.first_close is None:
            self.first_close = code
        return await super().close(code=code, message=message, drain=drain)


class Proxy:
    """Forwards backend routes' requests; holds the backend session."""

    def __init__(self, session: aiohttp.ClientSession, tracing: Tracing | None = None, *,
                 max_ws_message_bytes: int = 4 * 1024 * 1024) -> None:
        self.session = session
        self.tracing = tracing
        # aiohttp refuses a message of max_msg_size bytes itself: one more lets exactly the limit pass.
        self._max_msg_size = max_ws_message_bytes + 1

    def _outgoing(self, request: web.BaseRequest, route: Route, params: dict[str, str], path: str,
                  span: Span | None, handshake: bool = False) -> Outgoing:
        backend = route.backend
        assert backend is not None
        incoming = request.headers
        drop = HOP_BY_HOP | _tokens(incoming.getall("connection", ()))
        if handshake:
            drop |= _WS_HANDSHAKE
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in incoming.items():
            if name.lower() not in drop:
                headers.add(name, value)
        host = incoming.get("host", "")
        headers["host"] = host if backend.preserve_host and host else backend.host
        headers["x-forwarded-for"] = _append(incoming.getall("x-forwarded-for", ()), request.remote or "")
        headers["x-forwarded-proto"] = _append(incoming.getall("x-forwarded-proto", ()), request.scheme)
        headers["x-forwarded-host"] = _append(incoming.getall("x-forwarded-host", ()), host)
        # The id composer logs under (the incoming one when sane), so both sides' logs correlate.
        headers["x-request-id"] = request[REQUEST_ID]
        if span is not None and self.tracing is not None:
            self.tracing.inject(span, headers)  # the backend's spans hang under proxy_request
        out = Outgoing(path=path, headers=headers, params=params)
        for f in route.request_filters:
            f.on_request(out)
        return out

    async def forward(self, request: web.BaseRequest, route: Route, params: dict[str, str], path: str,
                      query: str) -> web.StreamResponse:
        """Send `request` to the route's backend and stream the answer back."""
        tracing = self.tracing
        if tracing is None:
            return await self._forward(request, route, params, path, query, None)
        assert route.backend is not None
        span = tracing.page("proxy_request", request.headers, {
            "http.request.method": request.method, "http.route": route.name, "url.path": request.path,
            "server.address": route.backend.origin})
        status = 0
        try:
            response = await self._forward(request, route, params, path, query, span)
            status = response.status
            if status >= 500:
                tracing.fail(span, str(status), f"status {status}")
            return response
        except BaseException as exc:
            tracing.fail(span, type(exc).__name__, str(exc))
            raise
        finally:
            span.set_attribute("http.response.status_code", status)
            span.end()

    async def _forward(self, request: web.BaseRequest, route: Route, params: dict[str, str], path: str,
                       query: str, span: Span | None) -> web.StreamResponse:
        backend = route.backend
        assert backend is not None
        if is_websocket(request):
            return await self._websocket(request, route, backend, params, path, query, span)
        out = self._outgoing(request, route, params, path, span)
        url = URL(backend.origin + out.path + ("?" + query if query else ""), encoded=True)
        progress = _Progress(backend.timeout)
        body = _upload(request, progress) if request.body_exists else None
        started = time.perf_counter()
        response: web.StreamResponse | None = None
        try:
            async with asyncio.timeout(backend.timeout) as deadline:
                progress.start(deadline)
                async with self.session.request(
                        request.method, url, headers=out.headers, data=body, allow_redirects=False,
                        timeout=aiohttp.ClientTimeout(total=None, sock_connect=backend.connect_timeout),
                ) as upstream:
                    response = _relayed(route, upstream)
                    await response.prepare(request)
                    content = upstream.content
                    while True:
                        progress.tick()
                        chunk = await content.readany()
                        if not chunk:
                            break
                        progress.tick()
                        await response.write(chunk)
                    progress.stop()
            await response.write_eof()
            return response
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            progress.stop()
            if response is not None and (request.transport is None or request.transport.is_closing()):
                raise  # the client went away mid-body, not the backend: nothing to log or answer
            timed_out = isinstance(exc, TimeoutError)
            status = 504 if timed_out else 502
            _log_failure(request, route, backend, url, exc, time.perf_counter() - started,
                         sent=response is not None)
            if response is not None:
                # The status is out; cut the connection so a truncated body (chunked, it
                # would end cleanly) can never pass for a complete one.
                if request.transport is not None:
                    request.transport.abort()
                return response
            return _error(status, route)

    async def _websocket(self, request: web.BaseRequest, route: Route, backend: Backend,
                         params: dict[str, str], path: str, query: str, span: Span | None) -> web.StreamResponse:
        """Relay a WebSocket: handshake with the backend first, then with the client."""
        out = self._outgoing(request, route, params, path, span, handshake=True)
        out.headers.popall("host", None)  # ws_connect sets its own from the URL unless told
        if backend.preserve_host and request.headers.get("host"):
            out.headers["host"] = request.headers["host"]
        url = URL(backend.origin + out.path + ("?" + query if query else ""), encoded=True)
        offered = tuple(p.strip() for p in request.headers.get("sec-websocket-protocol", "").split(",")
                        if p.strip())
        max_msg_size = self._max_msg_size
        started = time.perf_counter()
        try:
            async with asyncio.timeout(backend.timeout):
                upstream = await self.session.ws_connect(url, headers=out.headers, protocols=offered,
                                                         autoping=False, max_msg_size=max_msg_size)
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            _log_failure(request, route, backend, url, exc, time.perf_counter() - started, sent=False)
            return _error(504 if isinstance(exc, TimeoutError) else 502, route)
        async with upstream:
            # No autoclose: answering the client's close would drop its connection, and aiohttp
            # then cancels this handler before the close (and its code) has reached the backend.
            client = _ClientLeg(protocols=(upstream.protocol,) if upstream.protocol else (),
                                autoping=False, autoclose=False, max_msg_size=max_msg_size)
            await client.prepare(request)
            pumps = [asyncio.create_task(_relay(client, upstream)), asyncio.create_task(_relay(upstream, client))]
            try:
                _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
                if pending:
                    # A close ends the other pump first (its receive returns CLOSING) while
                    # this one is still handing the close and its code on: let it finish.
                    await asyncio.wait(pending, timeout=backend.timeout)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
                await upstream.close(code=client.first_close or 1000)  # a no-op if a pump closed it
                await client.close()
        return client


async def _relay(source: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                 sink: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> None:
    """Copy messages one way, pings and pongs included; a close is passed on with its code.

    CLOSING means the other pump is closing `source` itself, passing on the other side's
    close: closing `sink` here too would race it (and send 1000 instead of that code).
    A message `source` may not send (1009: too big) closed it; `sink` is told that code, not
    the one `source` answered the close with.
    """
    while True:
        msg = await source.receive()
        if msg.type is WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        elif msg.type is WSMsgType.PING:
            await sink.ping(msg.data)
        elif msg.type is WSMsgType.PONG:
            await sink.pong(msg.data)
        elif msg.type is WSMsgType.CLOSING:
            return
        else:
            break
    code = msg.data.code if isinstance(msg.data, aiohttp.WebSocketError) else source.close_code
    await sink.close(code=code if code and code not in (1005, 1006) else 1000)


async def _upload(request: web.BaseRequest, progress: _Progress) -> AsyncIterator[bytes]:
    """The client's body, chunk by chunk as the backend takes it."""
    if request.headers.get("expect", "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    content = request.content
    while True:
        chunk = await content.readany()
        if not chunk:
            return
        progress.tick()
        yield chunk


def _append(previous: list[str] | tuple[str, ...], value: str) -> str:
    return ", ".join((*previous, value)) if previous else value


def _response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    drop = HOP_BY_HOP | _tokens(upstream.getall("connection", ()))
    return CIMultiDict((k, v) for k, v in upstream.items() if k.lower() not in drop)


def _relayed(route: Route, upstream: aiohttp.ClientResponse) -> _Relayed:
    """The backend's status and headers, through the route's response filters."""
    headers = _response_headers(upstream.headers)
    status = apply_response(route.response_filters, upstream.status, headers)
    if status == upstream.status:
        return _Relayed(status=status, reason=upstream.reason, headers=headers)
    if upstream.status in _BODILESS:
        # Its Content-Length (a 304's) describes a body that is not coming: the new status has one, empty.
        headers.popall(hdrs.CONTENT_LENGTH, None)
    return _Relayed(status=status, headers=headers)  # the backend's reason phrase was for its own status


def _error(status: int, route: Route) -> web.Response:
    headers = CIMultiDict({"content-type": "text/html; charset=utf-8", "cache-control": "no-store"})
    body = _ERROR_PAGES[status]  # the page says what happened, whatever status a filter sends it with
    return web.Response(status=apply_response(route.response_filters, status, headers), body=body, headers=headers)


def _log_failure(request: web.BaseRequest, route: Route, backend: Backend, url: URL, exc: BaseException,
                 duration: float, *, sent: bool) -> None:
    log.warning("backend failed", extra={"fields": {
        "route": route.name,
        "backend": backend.origin,
        "url": str(url),
        "error_type": "timeout" if isinstance(exc, TimeoutError) else "connection",
        "detail": str(exc) or type(exc).__name__,
        "status": None if sent else 504 if isinstance(exc, TimeoutError) else 502,
        "duration_ms": round(duration * 1000, 1),
        "request_id": request[REQUEST_ID],
    }})
