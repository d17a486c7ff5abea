"""Backend routes (SPEC §2): composer as a streaming reverse proxy, end to end.

Everything is real and on 127.0.0.1: composer through the `start_composer` fixture (or as a
`python -m composer serve` subprocess for the memory test), aiohttp backends, and raw
asyncio socket servers and clients where a backend or client must misbehave in ways
aiohttp will not.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from conftest import captured, free_port, rss_kb, write_config
from multidict import CIMultiDict
from yarl import URL

from composer.logs import JsonFormatter

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# --- helpers ---------------------------------------------------------------------------

def routes(text: str, **backends: str) -> str:
    """routes.yaml text with each `<name>` replaced by the backend URL given as name=url."""
    for name, url in backends.items():
        text = text.replace(f"<{name}>", url)
    return text


def one_route(backend: str, *, name: str = "api", match: str = "{path_prefix: /}", extra: str = "") -> str:
    """A routes.yaml with a single backend route; `extra` is more route keys, 4-space indented."""
    return f"routes:\n  - name: {name}\n    match: {match}\n    backend: {backend}\n{extra}"


@pytest.fixture
def backend(aiohttp_server) -> Callable[[Handler], Awaitable[str]]:
    """Factory: `await backend(handler)` → the origin of an aiohttp app answering every path with it."""

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        server = await aiohttp_server(app, host="127.0.0.1")
        return f"http://127.0.0.1:{server.port}"

    return start


async def echo(request: web.Request) -> web.Response:
    """What the backend received: method, raw target, headers (in order), body."""
    body = await request.read()
    return web.json_response({
        "method": request.method,
        "raw_path": request.raw_path,
        "headers": list(request.headers.items()),
        "body": body.hex(),
    })


def seen_headers(data: dict) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in data["headers"])


@asynccontextmanager
async def raw_backend(handle: RawHandler) -> AsyncIterator[str]:
    """A plain asyncio socket server running `handle` per connection; yields its origin.

    On exit every connection still being handled is cancelled and closed.
    """
    tasks: set[asyncio.Task[None]] = set()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the peer went away, or this server is shutting down (below)
        finally:
            tasks.discard(task)
            writer.close()
            with suppress(Exception):
                await writer.wait_closed()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def read_head(reader: asyncio.StreamReader) -> tuple[str, CIMultiDict[str]]:
    """An HTTP message head off a raw socket: (start line, headers in order)."""
    raw = await reader.readuntil(b"\r\n\r\n")
    first, *lines = raw.decode("latin-1").split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
    return first, headers


async def raw_request(port: int, head: bytes, body: bytes = b"") -> tuple[str, CIMultiDict[str], bytes]:
    """Send raw bytes to composer; read one response framed by Content-Length."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        status, headers = await asyncio.wait_for(read_head(reader), 5)
        payload = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 5)
        return status, headers, payload
    finally:
        writer.close()
        with suppress(Exception):
            await writer.wait_closed()


def sample(metrics: str, name: str, **labels: str) -> float:
    """The sum of `name` samples whose labels include `labels`."""
    total = 0.0
    for line in metrics.splitlines():
        m = re.fullmatch(re.escape(name) + r"\{(.*)\} (\S+)", line)
        if m and labels.items() <= dict(re.findall(r'(\w+)="([^"]*)"', m.group(1))).items():
            total += float(m.group(2))
    return total


def raw_url(composer, target: str) -> URL:
    """An absolute URL whose path and query go on the wire exactly as written."""
    return URL(composer.url + target, encoded=True)


# --- pass-through ------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "body"), [
    ("GET", b""),
    ("POST", b"\x00\x01binary\xff body"),
    ("PUT", b'{"put": true}'),
    ("DELETE", b"gone"),
    ("PATCH", b"op=replace"),
    ("OPTIONS", b""),
])
async def test_method_raw_path_query_and_body_reach_the_backend_unchanged(backend, start_composer, method, body):
    origin = await backend(echo)
    composer = await start_composer({}, routes=one_route(origin))
    target = "/api/a%2Fb%20c/%7Euser?q=a%20b&x=1&x=2&slash=%2F&empty="
    async with composer.session.request(method, raw_url(composer, target), data=body or None) as resp:
        assert resp.status == 200
        data = await resp.json()
    assert data["method"] == method
    assert data["raw_path"] == target
    assert bytes.fromhex(data["body"]) == body
    if body:
        assert seen_headers(data)["content-length"] == str(len(body))


@pytest.mark.parametrize(("status", "reason"), [
    (200, "Fine Thanks"),
    (201, "Created Just Now"),
    (404, "Nothing Here"),
    (500, "Backend Broke"),
])
async def test_status_reason_headers_and_body_come_back_unchanged(backend, start_composer, status, reason):
    body = f"backend body for {status}\n".encode() + bytes(range(256))

    async def handler(_: web.Request) -> web.Response:
        resp = web.Response(status=status, reason=reason, body=body,
                            headers={"content-type": "application/x-backend", "x-backend": "yes",
                                     "cache-control": "private, max-age=5", "etag": '"v1"'})
        resp.headers.add("Set-Cookie", "a=1; Path=/; HttpOnly")
        resp.headers.add("Set-Cookie", "b=2; Max-Age=60")
        resp.headers.add("Set-Cookie", "c=3")
        return resp

    origin = await backend(handler)
    composer = await start_composer({}, routes=one_route(origin))
    async with composer.session.get(composer.url + "/thing") as resp:
        assert resp.status == status
        assert resp.reason == reason
        assert resp.headers["content-type"] == "application/x-backend"
        assert resp.headers["x-backend"] == "yes"
        assert resp.headers["cache-control"] == "private, max-age=5"
        assert resp.headers["etag"] == '"v1"'
        assert resp.headers.getall("set-cookie") == ["a=1; Path=/; HttpOnly", "b=2; Max-Age=60", "c=3"]
        assert resp.headers["content-length"] == str(len(body))
        assert await resp.read() == body


async def test_gzip_response_passes_through_still_compressed(backend, start_composer):
    plain = b"compress me " * 500
    packed = gzip.compress(plain)
    accept: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        accept.append(request.headers.get("accept-encoding", ""))
        return web.Response(body=packed, headers={"content-encoding": "gzip", "content-type": "text/plain",
                                                  "vary": "accept-encoding"})

    origin = await backend(handler)
    composer = await start_composer({}, routes=one_route(origin))
    async with aiohttp.ClientSession(auto_decompress=False) as session, \
            session.get(composer.url + "/z", headers={"accept-encoding": "gzip"}) as resp:
        assert resp.status == 200
        assert resp.headers["content-encoding"] == "gzip"
        assert resp.headers["content-length"] == str(len(packed))
        assert await resp.read() == packed
    assert accept == ["gzip"]
    # and a decoding client gets the original text back
    resp, text = await composer.get("/z")
    assert text.encode() == plain


async def test_head_204_and_304_keep_the_connection_usable(backend, start_composer):
    async def handler(request: web.Request) -> web.Response:
        if request.path == "/empty":
            return web.Response(status=204, headers={"x-kind": "no-content"})
        if request.path == "/cached":
            if request.headers.get("if-none-match") == '"abc"':
                return web.Response(status=304, headers={"etag": '"abc"', "x-kind": "not-modified"})
            return web.Response(text="fresh", headers={"etag": '"abc"'})
        return web.Response(body=b"x" * 1234, headers={"content-type": "application/octet-stream"})

    origin = await backend(handler)
    composer = await start_composer({}, routes=one_route(origin))
    # one connection for everything: a stray body byte after HEAD/204/304 would corrupt the next answer
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        async with session.head(composer.url + "/file") as resp:
            assert resp.status == 200
            assert resp.headers["content-length"] == "1234"
            assert resp.headers["content-type"] == "application/octet-stream"
            assert await resp.read() == b""
        async with session.get(composer.url + "/empty") as resp:
            assert resp.status == 204
            assert resp.headers["x-kind"] == "no-content"
            assert await resp.read() == b""
        async with session.get(composer.url + "/cached", headers={"if-none-match": '"abc"'}) as resp:
            assert resp.status == 304
            assert resp.headers["etag"] == '"abc"'
            assert resp.headers["x-kind"] == "not-modified"
            assert await resp.read() == b""
        async with session.get(composer.url + "/file") as resp:
            assert resp.status == 200
            assert await resp.read() == b"x" * 1234
        async with session.get(composer.url + "/cached") as resp:
            assert resp.status == 200
            assert await resp.text() == "fresh"


# --- headers: hop-by-hop, forwarding, Host, request id ------------------------------

async def test_hop_by_hop_request_headers_are_dropped_end_to_end_kept(backend, start_composer):
    origin = await backend(echo)
    composer = await start_composer({}, routes=one_route(origin))
    head = (b"GET /hop HTTP/1.1\r\n"
            b"Host: shop.example:8080\r\n"
            b"Connection: keep-alive, X-Hop-Req\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"TE: trailers\r\n"
            b"Trailer: X-Checksum\r\n"
            b"Upgrade: h2c\r\n"
            b"X-Hop-Req: secret\r\n"
            b"X-End: kept\r\n"
            b"Cookie: sid=1\r\n"
            b"Accept: text/plain\r\n"
            b"\r\n")
    status, _, payload = await raw_request(composer.server.port, head)
    assert status.startswith("HTTP/1.1 200"), status
    seen = seen_headers(json.loads(payload))
    for name in ("connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "x-hop-req"):
        assert name not in seen, (name, seen)
    assert seen["x-end"] == "kept"
    assert seen["cookie"] == "sid=1"
    assert seen["accept"] == "text/plain"


async def test_hop_by_hop_response_headers_are_dropped_end_to_end_kept(start_composer):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n"
                     b"Connection: close, X-Hop-Resp\r\n"
                     b"Keep-Alive: timeout=5, max=100\r\n"
                     b"Proxy-Connection: keep-alive\r\n"
                     b"TE: trailers\r\n"
                     b"Trailer: X-Checksum\r\n"
                     b"Upgrade: h2c\r\n"
                     b"X-Hop-Resp: secret\r\n"
                     b"X-End: kept\r\n"
                     b"Cache-Control: no-cache\r\n"
                     b"Content-Type: text/plain\r\n"
                     b"Transfer-Encoding: chunked\r\n"
                     b"\r\n"
                     b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n")
        await writer.drain()

    async with raw_backend(handle) as origin:
        composer = await start_composer({}, routes=one_route(origin))
        async with composer.session.get(composer.url + "/hop") as resp:
            assert resp.status == 200
            for name in ("connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade",
                         "x-hop-resp"):
                assert name not in resp.headers, (name, resp.headers)
            # re-framed by composer, never duplicated
            assert resp.headers.getall("transfer-encoding", []) in ([], ["chunked"])
            assert resp.headers["x-end"] == "kept"
            assert resp.headers["cache-control"] == "no-cache"
            assert await resp.read() == b"hello world"


async def test_forwarding_headers_and_backend_host(backend, start_composer):
    origin = await backend(echo)
    composer = await start_composer({}, routes=one_route(origin))
    async with composer.session.get(composer.url + "/fwd", headers={
            "host": "shop.example.com:8443", "x-forwarded-for": "1.2.3.4"}) as resp:
        seen = seen_headers(await resp.json())
    assert seen.getall("x-forwarded-for") == ["1.2.3.4, 127.0.0.1"]
    assert seen.getall("x-forwarded-proto") == ["http"]
    assert seen.getall("x-forwarded-host") == ["shop.example.com:8443"]
    assert seen.getall("host") == [origin.removeprefix("http://")]
    # without an incoming X-Forwarded-For, the client's address alone
    async with composer.session.get(composer.url + "/fwd") as resp:
        seen = seen_headers(await resp.json())
    assert seen.getall("x-forwarded-for") == ["127.0.0.1"]
    assert seen["x-forwarded-host"] == composer.url.removeprefix("http://")


async def test_preserve_host_sends_the_clients_host(backend, start_composer):
    origin = await backend(echo)
    composer = await start_composer({}, routes=one_route(origin, extra="    preserve_host: true\n"))
    async with composer.session.get(composer.url + "/h", headers={"host": "shop.example.com:8443"}) as resp:
        seen = seen_headers(await resp.json())
    assert seen.getall("host") == ["shop.example.com:8443"]
    assert seen["x-forwarded-host"] == "shop.example.com:8443"


async def test_request_id_is_passed_to_the_backend(backend, start_composer):
    origin = await backend(echo)
    composer = await start_composer({}, routes=one_route(origin))
    async with composer.session.get(composer.url + "/r", headers={"x-request-id": "req-123"}) as resp:
        seen = seen_headers(await resp.json())
    assert seen.getall("x-request-id") == ["req-123"]
    generated = []
    for _ in range(2):
        async with composer.session.get(composer.url + "/r") as resp:
            generated.append(seen_headers(await resp.json()).getall("x-request-id"))
    for ids in generated:
        assert len(ids) == 1 and re.fullmatch(r"[0-9a-f]{32}", ids[0]), ids
    assert generated[0] != generated[1]


async def test_backend_gets_the_request_id_composer_logs(start_composer):
    """An incoming id composer will not use (too long) must not reach the backend either:
    the id in composer's log lines is the one the backend sees."""
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, headers = await read_head(reader)
        seen.extend(headers.getall("x-request-id", []))
        await asyncio.sleep(30)  # never answers: composer times out and logs

    async with raw_backend(handle) as origin:
        # 1 s: with 300 ms a full-suite run once timed out before the backend had read the head
        # (seen empty; not reproduced alone in 18 runs): room for a loaded test process.
        composer = await start_composer({}, routes=one_route(origin, extra="    timeout_ms: 1000\n"))
        with captured("composer.proxy") as log:
            resp, _ = await composer.get("/r", headers={"x-request-id": "x" * 200})
        assert resp.status == 504
    [record] = [r for r in log.records if r.getMessage() == "backend failed"]
    assert len(seen) == 1
    assert seen[0] == record.fields["request_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", seen[0])


# --- filters -----------------------------------------------------------------------------

FILTER_ROUTES = """
routes:
  - name: strip
    match: {path_prefix: /api}
    backend: <b>
    filters:
      - strip_prefix: /api
  - name: partial
    match: {path_prefix: /svc}
    backend: <b>
    filters:
      - strip_prefix: /sv
  - name: set-path
    match: {path: "/items/{id}"}
    backend: <b>
    filters:
      - set_path: /v1/things/{id}
  - name: rewrite
    match: {path_prefix: /old}
    backend: <b>
    filters:
      - rewrite_path:
          pattern: '^/old/(\\d+)/(?P<slug>[a-z]+)$'
          replacement: '/new/${slug}/$1'
  - name: headers
    match: {path_prefix: /headers}
    backend: <b>
    filters:
      - set_request_header: {x-from: composer, x-extra: added}
      - remove_request_header: [cookie, x-secret]
      - set_response_header: {access-control-allow-origin: "*", x-powered-by: composer}
      - remove_response_header: x-internal
  - name: order-a
    match: {path_prefix: /order-a}
    backend: <b>
    filters:
      - strip_prefix: /order-a
      - rewrite_path: {pattern: '^/v1/', replacement: '/v2/'}
      - set_request_header: {x-step: one}
      - remove_request_header: x-step
      - set_response_header: {x-r: one}
      - remove_response_header: x-r
  - name: order-b
    match: {path_prefix: /order-b}
    backend: <b>
    filters:
      - rewrite_path: {pattern: '^/v1/', replacement: '/v2/'}
      - strip_prefix: /order-b
      - remove_request_header: x-step
      - set_request_header: {x-step: two}
      - remove_response_header: x-r
      - set_response_header: {x-r: two}
"""


async def filter_backend(request: web.Request) -> web.Response:
    resp = await echo(request)
    resp.headers["x-powered-by"] = "backend"
    resp.headers["x-internal"] = "secret"
    resp.headers["x-r"] = "backend"
    resp.headers["x-kept"] = "yes"
    return resp


@pytest.mark.parametrize(("target", "expected"), [
    ("/api", "/"),
    ("/api/", "/"),
    ("/api/cart/1?x=1&y=%2F", "/cart/1?x=1&y=%2F"),
    ("/api/a%2Fb%20c", "/a%2Fb%20c"),
    ("/svc/x", "/svc/x"),  # strip_prefix takes whole segments: /sv is not a prefix of /svc/x
    ("/items/a%20b?q=1", "/v1/things/a%20b?q=1"),
    ("/items/42", "/v1/things/42"),
    ("/old/42/shoes?q=1", "/new/shoes/42?q=1"),
    ("/old/42/Shoes", "/old/42/Shoes"),  # no match: path unchanged
    ("/order-a/v1/x", "/v2/x"),  # strip, then rewrite
    ("/order-b/v1/x", "/v1/x"),  # rewrite (no match yet), then strip
])
async def test_path_filters(backend, start_composer, target, expected):
    origin = await backend(filter_backend)
    composer = await start_composer({}, routes=routes(FILTER_ROUTES, b=origin))
    async with composer.session.get(raw_url(composer, target)) as resp:
        assert resp.status == 200
        data = await resp.json()
    assert data["raw_path"] == expected


async def test_header_filters_on_request_and_response(backend, start_composer):
    origin = await backend(filter_backend)
    composer = await start_composer({}, routes=routes(FILTER_ROUTES, b=origin))
    async with composer.session.get(composer.url + "/headers/x", headers={
            "x-from": "client", "cookie": "sid=1", "x-secret": "s", "x-other": "o"}) as resp:
        assert resp.status == 200
        seen = seen_headers(await resp.json())
        assert resp.headers.getall("access-control-allow-origin") == ["*"]
        assert resp.headers.getall("x-powered-by") == ["composer"]
        assert "x-internal" not in resp.headers
        assert resp.headers["x-kept"] == "yes"
        assert resp.headers["x-r"] == "backend"
    assert seen.getall("x-from") == ["composer"]
    assert seen["x-extra"] == "added"
    assert "cookie" not in seen and "x-secret" not in seen
    assert seen["x-other"] == "o"


async def test_header_filters_apply_in_file_order(backend, start_composer):
    origin = await backend(filter_backend)
    composer = await start_composer({}, routes=routes(FILTER_ROUTES, b=origin))
    async with composer.session.get(composer.url + "/order-a/v1/x", headers={"x-step": "client"}) as resp:
        seen = seen_headers(await resp.json())
        assert "x-r" not in resp.headers  # set, then removed
    assert "x-step" not in seen
    async with composer.session.get(composer.url + "/order-b/v1/x", headers={"x-step": "client"}) as resp:
        seen = seen_headers(await resp.json())
        assert resp.headers.getall("x-r") == ["two"]  # backend's removed, then set
    assert seen.getall("x-step") == ["two"]


async def test_a_status_filter_on_a_bodiless_answer_drops_its_content_length(start_composer):
    """A 304's Content-Length is the representation's, not its own (RFC 9110 §8.6): relayed
    as a 200 it would promise bytes that never come, and the client would wait for them."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\nETag: \"v1\"\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(30)  # keeps the connection: only the framing can end the answer

    async with raw_backend(handle) as origin:
        composer = await start_composer({}, routes=one_route(origin, extra="    filters:\n      - status: 200\n"))
        async with asyncio.timeout(5), composer.session.get(composer.url + "/cached") as resp:
            assert (resp.status, resp.reason, resp.headers["etag"]) == (200, "OK", '"v1"')
            assert "content-length" not in resp.headers or resp.headers["content-length"] == "0"
            assert await resp.read() == b""


# --- errors: refused, silent, broken mid-body ------------------------------------------

async def test_connection_refused_is_502_with_a_small_page_and_a_log_line(start_composer):
    dead = f"http://127.0.0.1:{free_port()}"
    composer = await start_composer({}, routes=one_route(
        dead, name="down", extra="    filters:\n      - set_response_header: {x-route: down}\n"))
    with captured("composer.proxy") as log:
        resp, body = await composer.get("/anything?x=1")
    assert resp.status == 502
    assert resp.headers["content-type"].startswith("text/html")
    assert resp.headers["x-route"] == "down"  # response filters apply to the error page too
    assert "502" in body and len(body.encode()) < 1024
    [record] = [r for r in log.records if r.getMessage() == "backend failed"]
    assert record.levelno == logging.WARNING
    assert record.fields["route"] == "down"
    assert record.fields["backend"] == dead
    assert record.fields["status"] == 502
    line = json.loads(JsonFormatter().format(record))
    assert line["logger"] == "composer.proxy"
    assert line["route"] == "down" and line["backend"] == dead
    assert sample(await composer.metrics(), "composer_requests_total", route="down", status="502") == 1


async def test_silent_backend_is_504_promptly(start_composer):
    connected = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        connected.set()
        await asyncio.sleep(10)

    async with raw_backend(handle) as origin:
        composer = await start_composer({}, routes=one_route(origin, name="silent", extra="    timeout_ms: 300\n"))
        with captured("composer.proxy") as log:
            started = time.monotonic()
            resp, body = await composer.get("/slow")
            elapsed = time.monotonic() - started
        assert connected.is_set()
        assert resp.status == 504
        assert elapsed < 2, elapsed
        assert "504" in body and len(body.encode()) < 1024
        [record] = [r for r in log.records if r.getMessage() == "backend failed"]
        assert record.fields["route"] == "silent"
        assert record.fields["backend"] == origin
        assert record.fields["error_type"] == "timeout"
        assert record.fields["status"] == 504
        json.loads(JsonFormatter().format(record))
        assert sample(await composer.metrics(), "composer_requests_total", route="silent", status="504") == 1


async def test_slow_but_steady_download_is_not_timed_out(backend, start_composer):
    """timeout_ms bounds silence, not the whole exchange: 1 s of trickling with timeout_ms 300."""
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for i in range(10):
            await asyncio.sleep(0.1)
            await resp.write(b"%d;" % i)
        return resp

    origin = await backend(handler)
    composer = await start_composer({}, routes=one_route(origin, extra="    timeout_ms: 300\n"))
    resp, body = await composer.get("/trickle")
    assert resp.status == 200
    assert body == "".join(f"{i};" for i in range(10))


async def test_slow_but_steady_upload_is_not_timed_out(backend, start_composer):
    origin = await backend(echo)
    composer = await start_composer({}, routes=one_route(origin, extra="    timeout_ms: 300\n"))

    async def trickle() -> AsyncIterator[bytes]:
        for i in range(10):
            await asyncio.sleep(0.1)
            yield b"%d;" % i

    async with composer.session.post(composer.url + "/up", data=trickle()) as resp:
        assert resp.status == 200
        data = await resp.json()
    assert bytes.fromhex(data["body"]) == b"".join(b"%d;" % i for i in range(10))


async def broken_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """/die: head with Content-Length 1000, 10 bytes, close. /stall: same, then silence. Else: ok."""
    while True:
        start, _ = await read_head(reader)
        if " /chunked-die " in start:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n"
                         b"\r\na\r\n0123456789\r\n")
            await writer.drain()
            return
        if " /die " in start or " /stall " in start:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: application/octet-stream\r\n"
                         b"\r\n0123456789")
            await writer.drain()
            if " /stall " in start:
                await asyncio.sleep(30)
            return
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Type: text/plain\r\n\r\nfine")
        await writer.drain()


async def test_backend_dying_mid_body_breaks_the_response_and_composer_carries_on(start_composer):
    async with raw_backend(broken_backend) as origin:
        composer = await start_composer({}, routes=one_route(origin, name="broken"))
        with captured("composer.proxy") as log:
            async with composer.session.get(composer.url + "/die") as resp:
                assert resp.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
        [record] = [r for r in log.records if r.getMessage() == "backend failed"]
        assert record.fields["route"] == "broken"
        for _ in range(3):
            resp, body = await composer.get("/ok")
            assert (resp.status, body) == (200, "fine")


async def test_chunked_body_cut_short_never_looks_complete(start_composer):
    """Relayed chunked, a clean end would be a lie: the client must see the connection cut,
    the failure is one `backend failed` line (no traceback), and the sent status is counted."""
    async with raw_backend(broken_backend) as origin:
        composer = await start_composer({}, routes=one_route(origin, name="broken"))
        with captured("composer.proxy") as log, captured("aiohttp.server") as server_log:
            async with composer.session.get(composer.url + "/chunked-die") as resp:
                assert resp.status == 200
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
            resp, body = await composer.get("/ok")
            assert (resp.status, body) == (200, "fine")
        assert [r.getMessage() for r in log.records] == ["backend failed"]
        assert [r for r in server_log.records if r.levelno >= logging.ERROR] == []
        metrics = await composer.metrics()
        assert sample(metrics, "composer_requests_total", route="broken", status="200") == 2
        assert sample(metrics, "composer_requests_total", route="broken", status="499") == 0


async def test_client_leaving_mid_download_is_not_blamed_on_the_backend(backend, start_composer):
    stopped = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            for _ in range(200):
                await response.write(b"x" * 65536)
                await asyncio.sleep(0.02)
        finally:
            stopped.set()  # cancelled or failed once composer lets go of the backend
        return response

    composer = await start_composer({}, routes=one_route(await backend(endless), name="dl"))
    with captured("composer.proxy") as log:
        async with aiohttp.ClientSession() as client:
            async with client.get(composer.url + "/big") as resp:
                await resp.content.readexactly(65536)
        await asyncio.wait_for(stopped.wait(), 5)
        await asyncio.sleep(0.1)  # let composer's handler finish its bookkeeping
    assert [r.getMessage() for r in log.records] == []
    metrics = await composer.metrics()
    assert sample(metrics, "composer_requests_total", route="dl", status="499") == 1


async def test_backend_stalling_mid_body_is_cut_after_timeout(start_composer):
    async with raw_backend(broken_backend) as origin:
        composer = await start_composer({}, routes=one_route(origin, name="stall", extra="    timeout_ms: 300\n"))
        with captured("composer.proxy") as log:
            async with composer.session.get(composer.url + "/stall",
                                            timeout=aiohttp.ClientTimeout(total=10)) as resp:
                assert resp.status == 200
                started = time.monotonic()
                with pytest.raises(aiohttp.ClientPayloadError):
                    await resp.read()
                assert time.monotonic() - started < 2
        [record] = [r for r in log.records if r.getMessage() == "backend failed"]
        assert record.fields["route"] == "stall"
        assert record.fields["error_type"] == "timeout"
        resp, body = await composer.get("/ok")
        assert (resp.status, body) == (200, "fine")


# --- streaming ---------------------------------------------------------------------------

async def test_request_body_is_streamed_to_the_backend(backend, start_composer):
    first = b"first chunk of the upload;"
    got_first = asyncio.Event()
    framing: list[tuple[str | None, str | None]] = []

    async def handler(request: web.Request) -> web.Response:
        framing.append((request.headers.get("transfer-encoding"), request.headers.get("content-length")))
        received = bytearray()
        while len(received) < len(first):
            chunk = await request.content.readany()
            if not chunk:
                break
            received += chunk
        got_first.set()
        received += await request.content.read()
        return web.Response(body=bytes(received))

    async def upload() -> AsyncIterator[bytes]:
        yield first
        # the backend must hold the first chunk before the client sends anything more
        await asyncio.wait_for(got_first.wait(), 5)
        yield b"second;"
        yield b"third"

    origin = await backend(handler)
    composer = await start_composer({}, routes=one_route(origin))
    async with composer.session.post(composer.url + "/up", data=upload()) as resp:
        assert resp.status == 200
        assert await resp.read() == first + b"second;third"
    # a chunked upload (no Content-Length) goes on chunked
    assert framing == [("chunked", None)]


async def test_response_body_is_streamed_to_the_client(backend, start_composer):
    first = b"first chunk of the download;"
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "application/octet-stream"})
        await resp.prepare(request)
        await resp.write(first)
        await asyncio.wait_for(release.wait(), 10)  # the rest only once the client has the first part
        await resp.write(b"the rest")
        return resp

    origin = await backend(handler)
    composer = await start_composer({}, routes=one_route(origin))
    try:
        async with composer.session.get(composer.url + "/down") as resp:
            assert resp.status == 200
            assert await asyncio.wait_for(resp.content.readexactly(len(first)), 5) == first
            release.set()
            assert await resp.read() == b"the rest"
    finally:
        release.set()


async def test_expect_100_continue_upload(backend, start_composer):
    origin = await backend(echo)
    composer = await start_composer({}, routes=one_route(origin))
    body = b"y" * 5000
    reader, writer = await asyncio.open_connection("127.0.0.1", composer.server.port)
    try:
        writer.write(b"PUT /upload HTTP/1.1\r\nHost: composer.test\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        await writer.drain()
        # composer must say "go on" before the client sends a byte of the body
        interim, _ = await asyncio.wait_for(read_head(reader), 5)
        assert interim == "HTTP/1.1 100 Continue"
        writer.write(body)
        await writer.drain()
        status, headers = await asyncio.wait_for(read_head(reader), 5)
        payload = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
    finally:
        writer.close()
        with suppress(Exception):
            await writer.wait_closed()
    assert status.startswith("HTTP/1.1 200"), status
    data = json.loads(payload)
    assert data["method"] == "PUT"
    assert bytes.fromhex(data["body"]) == body
    assert "expect" not in seen_headers(data)


async def test_expect_100_continue_upload_with_aiohttp_client(backend, start_composer):
    origin = await backend(echo)
    composer = await start_composer({}, routes=one_route(origin))
    async with composer.session.post(composer.url + "/upload", data=b"z" * 100_000, expect100=True,
                                     timeout=aiohttp.ClientTimeout(total=10)) as resp:
        assert resp.status == 200
        data = await resp.json()
    assert bytes.fromhex(data["body"]) == b"z" * 100_000


# --- WebSocket ---------------------------------------------------------------------------

@pytest.fixture
async def ws_backend(backend):
    """An echo WebSocket backend speaking subprotocol "b"; records the close codes it receives."""
    closes: list[int | None] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.path == "/refuse":
            return web.Response(status=404, text="no websockets here")
        ws = web.WebSocketResponse(protocols=("b",))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT and msg.data == "close-4001":
                await ws.close(code=4001, message=b"bye")
            elif msg.type is WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(b"echo:" + msg.data)
        closes.append(ws.close_code)
        return ws

    origin = await backend(handler)
    return origin, closes


async def test_websocket_echo_and_subprotocol(ws_backend, start_composer):
    origin, _ = ws_backend
    composer = await start_composer({}, routes=one_route(origin, name="ws"))
    async with composer.session.ws_connect(composer.url + "/ws?room=1", protocols=["a", "b"]) as ws:
        assert ws.protocol == "b"
        await ws.send_str("hello")
        assert await asyncio.wait_for(ws.receive_str(), 5) == "echo:hello"
        await ws.send_bytes(b"\x00\x01\xff")
        assert await asyncio.wait_for(ws.receive_bytes(), 5) == b"echo:\x00\x01\xff"
        big = os.urandom(1 << 20)
        await ws.send_bytes(big)
        assert await asyncio.wait_for(ws.receive_bytes(), 5) == b"echo:" + big


async def test_websocket_backend_close_code_reaches_the_client(ws_backend, start_composer):
    origin, _ = ws_backend
    composer = await start_composer({}, routes=one_route(origin, name="ws"))
    async with composer.session.ws_connect(composer.url + "/ws") as ws:
        await ws.send_str("close-4001")
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type is WSMsgType.CLOSE, msg
        assert msg.data == 4001
        assert ws.close_code == 4001


async def test_websocket_client_close_reaches_the_backend(ws_backend, start_composer):
    origin, closes = ws_backend
    composer = await start_composer({}, routes=one_route(origin, name="ws"))
    async with composer.session.ws_connect(composer.url + "/ws") as ws:
        await ws.send_str("ping")
        assert await asyncio.wait_for(ws.receive_str(), 5) == "echo:ping"
        await asyncio.wait_for(ws.close(code=4002), 5)

    async def backend_saw_close() -> None:
        while not closes:
            await asyncio.sleep(0.02)

    await asyncio.wait_for(backend_saw_close(), 5)
    assert closes == [4002]


async def test_websocket_upgrade_refused_by_backend_is_502(ws_backend, start_composer):
    origin, _ = ws_backend
    composer = await start_composer({}, routes=one_route(origin, name="ws"))
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await composer.session.ws_connect(composer.url + "/refuse")
    assert info.value.status == 502
    text = await composer.metrics()
    assert sample(text, "composer_requests_total", route="ws", status="502") == 1


# --- big bodies, bounded memory (composer as a subprocess) ----------------------------

BIG = 200 * 1024 * 1024
CHUNK = 64 * 1024
RSS_LIMIT_KB = 30 * 1024


@asynccontextmanager
async def peak_rss(pid: int) -> AsyncIterator[list[int]]:
    """Samples the process's RSS every 50 ms while the block runs; yields the samples (KB)."""
    samples = [rss_kb(pid)]

    async def sampler() -> None:
        while True:
            await asyncio.sleep(0.05)
            samples.append(rss_kb(pid))

    task = asyncio.create_task(sampler())
    try:
        yield samples
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        samples.append(rss_kb(pid))


async def test_200mb_upload_and_download_stream_with_bounded_memory(backend, tmp_path):
    block = b"\xa5" * CHUNK

    async def handler(request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            count = 0
            async for chunk in request.content.iter_chunked(CHUNK):
                count += len(chunk)
            return web.Response(text=str(count))
        size = int(request.query["size"])
        resp = web.StreamResponse(headers={"content-type": "application/octet-stream"})
        resp.content_length = size
        await resp.prepare(request)
        for _ in range(size // CHUNK):
            await resp.write(block)
        return resp

    origin = await backend(handler)
    config = write_config(tmp_path, {}, routes=one_route(origin, name="big"))
    port, admin = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"

    async def upload(size: int) -> int:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(size // CHUNK):
                yield block

        async with session.post(base + "/upload", data=body()) as resp:
            assert resp.status == 200
            return int(await resp.text())

    async def download(size: int) -> int:
        count = 0
        async with session.get(base + f"/download?size={size}") as resp:
            assert resp.status == 200
            assert resp.headers["content-length"] == str(size)
            async for chunk in resp.content.iter_chunked(CHUNK):
                count += len(chunk)
        return count

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "composer", "serve", "--config", str(config), "--host", "127.0.0.1",
        "--port", str(port), "--admin-port", str(admin),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stderr is not None
    stderr = asyncio.create_task(proc.stderr.read())  # drained all along; shown if the test fails
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert b"composer serving" in line, line
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            # warm up both directions so the baseline includes what any transfer needs
            assert await upload(4 * 1024 * 1024) == 4 * 1024 * 1024
            assert await download(4 * 1024 * 1024) == 4 * 1024 * 1024
            await asyncio.sleep(0.2)

            baseline = rss_kb(proc.pid)
            async with peak_rss(proc.pid) as up_samples:
                assert await upload(BIG) == BIG
            up_growth = max(up_samples) - baseline

            baseline_down = rss_kb(proc.pid)
            async with peak_rss(proc.pid) as down_samples:
                assert await download(BIG) == BIG
            down_growth = max(down_samples) - baseline_down

        print(f"\nRSS growth: upload {up_growth / 1024:.1f} MB over {baseline / 1024:.1f} MB "
              f"({len(up_samples)} samples); download {down_growth / 1024:.1f} MB over "
              f"{baseline_down / 1024:.1f} MB ({len(down_samples)} samples)")
        assert len(up_samples) > 2 and len(down_samples) > 2  # sampled during each transfer
        assert up_growth < RSS_LIMIT_KB, f"upload grew RSS by {up_growth} KB"
        assert down_growth < RSS_LIMIT_KB, f"download grew RSS by {down_growth} KB"

        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 15)
        assert proc.returncode == 0
    finally:
        if proc.returncode is None:
            proc.kill()
        print("composer stderr:\n" + (await stderr).decode(errors="replace"))
        await proc.communicate()
