"""Backend routes under SPEC §9 "Limits and exposure" (issue 13): what the proxy refuses to
carry over, and what it bounds.

Everything is real and on 127.0.0.1: composer through `start_composer`, raw asyncio backends
(`raw_origin`) where a backend must misbehave, aiohttp backends where it must speak WebSocket.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from conftest import RawHandler, eventually
from test_proxy import one_route, read_head

# --- a pooled connection that received bytes while idle is never reused --------------------

POISON = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nSet-Cookie: session=victim\r\n\r\nPOISONED!"


def poisoner(split: int) -> RawHandler:
    """A keep-alive backend answering each request with its own path, then, 50 ms later,
    writing an unsolicited response on the idle connection: its first `split` bytes while
    idle, the rest only once the next request has come (0: the whole response while idle).
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        rest = b""
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            body = b"for " + head.split(b" ", 2)[1]
            writer.write(rest + b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            await asyncio.sleep(0.05)
            idle, rest = (POISON, b"") if split == 0 else (POISON[:split], POISON[split:])
            writer.write(idle)
            await writer.drain()

    return handle


@pytest.mark.parametrize("split", [0, 20, len(POISON) - 3], ids=["whole", "half-head", "half-body"])
async def test_bytes_received_on_an_idle_backend_connection_never_reach_the_next_user(
        raw_origin, start_composer, split):
    origin = await raw_origin(poisoner(split))
    composer = await start_composer({}, routes=one_route(origin, name="api"))
    for user in range(5):
        resp, body = await composer.get(f"/user/{user}", timeout=aiohttp.ClientTimeout(total=5))
        assert (resp.status, body) == (200, f"for /user/{user}"), f"user {user}"
        assert "set-cookie" not in resp.headers
        await asyncio.sleep(0.25)  # the backend has written to the idle connection by now


async def test_a_clean_idle_backend_connection_is_reused(raw_origin, start_composer):
    connections = 0

    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    composer = await start_composer({}, routes=one_route(await raw_origin(keep_alive)))
    for _ in range(3):
        resp, body = await composer.get("/again")
        assert (resp.status, body) == (200, "ok")
        await asyncio.sleep(0.05)
    assert connections == 1  # the fix must not cost pooling


# --- WebSocket messages are bounded both ways ------------------------------------------------

LIMIT = 64 * 1024
LIMIT_SETTINGS = f"settings:\n  max_ws_message_bytes: {LIMIT}\n"


@pytest.fixture
async def sized_ws_backend(aiohttp_server) -> tuple[str, list[int], list[int | None]]:
    """A WebSocket backend: "send N" makes it send N bytes; binary messages are recorded by size."""
    received: list[int] = []
    closes: list[int | None] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT and msg.data.startswith("send "):
                await ws.send_bytes(b"b" * int(msg.data[5:]))
            elif msg.type is WSMsgType.BINARY:
                received.append(len(msg.data))
                await ws.send_str(f"got {len(msg.data)}")
        closes.append(ws.close_code)
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = await aiohttp_server(app, host="127.0.0.1")
    return f"http://127.0.0.1:{server.port}", received, closes


async def test_websocket_message_over_the_limit_from_the_client_closes_with_1009(
        sized_ws_backend, start_composer):
    origin, received, closes = sized_ws_backend
    composer = await start_composer({}, routes=one_route(origin, name="ws"), settings=LIMIT_SETTINGS)
    async with composer.session.ws_connect(composer.url + "/ws", max_msg_size=0) as ws:
        await ws.send_bytes(b"a" * LIMIT)
        assert await asyncio.wait_for(ws.receive_str(), 5) == f"got {LIMIT}"
        await ws.send_bytes(b"a" * (LIMIT + 1024))
        msg = await asyncio.wait_for(ws.receive(), 5)
        assert msg.type is WSMsgType.CLOSE, msg
        assert msg.data == 1009
    await eventually(backend_closed(closes), "the backend's close")
    assert received == [LIMIT]  # the big one never reached the backend
    assert closes == [1009]


async def test_websocket_message_over_the_limit_from_the_backend_closes_with_1009(
        sized_ws_backend, start_composer):
    origin, _, closes = sized_ws_backend
    composer = await start_composer({}, routes=one_route(origin, name="ws"), settings=LIMIT_SETTINGS)
    async with composer.session.ws_connect(composer.url + "/ws", max_msg_size=0) as ws:
        await ws.send_str(f"send {LIMIT}")
        assert len(await asyncio.wait_for(ws.receive_bytes(), 5)) == LIMIT
        await ws.send_str(f"send {LIMIT + 1024}")
        msg = await asyncio.wait_for(ws.receive(), 5)  # never the big message itself
        assert msg.type is WSMsgType.CLOSE, msg
        assert msg.data == 1009
    await eventually(backend_closed(closes), "the backend's close")
    assert closes == [1009]


def backend_closed(closes: list[int | None]) -> Callable[[], Awaitable[list[int | None]]]:
    """A probe for `eventually`: the close codes the backend has seen so far."""

    async def probe() -> list[int | None]:
        return closes

    return probe


# --- at most max_connections_per_backend connections to one backend --------------------------

async def test_backend_connections_are_capped_and_requests_beyond_wait(raw_origin, start_composer):
    open_now = peak = 0

    async def counting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now, peak
        open_now += 1
        peak = max(peak, open_now)
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                await reader.readuntil(b"0\r\n\r\n")  # the chunked body's end (the body is all "x")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        finally:
            open_now -= 1

    origin = await raw_origin(counting)
    composer = await start_composer({}, routes=one_route(origin, name="slow"),
                                    settings="settings:\n  max_connections_per_backend: 2\n")

    async def slow_upload() -> int:
        async def body() -> AsyncIterator[bytes]:
            for _ in range(3):
                yield b"x" * 100
                await asyncio.sleep(0.1)

        async with composer.session.post(composer.url + "/up", data=body(),
                                         timeout=aiohttp.ClientTimeout(total=10)) as resp:
            await resp.read()
            return resp.status

    assert await asyncio.gather(*(slow_upload() for _ in range(6))) == [200] * 6
    assert peak == 2


# --- no Content-Type the backend did not send -------------------------------------------------

@pytest.mark.parametrize("framing", [
    b"Content-Length: 5\r\n\r\nhello",
    b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
], ids=["length", "chunked"])
async def test_no_content_type_is_added_when_the_backend_sent_none(raw_origin, start_composer, framing):
    async def untyped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\n" + framing)
            await writer.drain()

    composer = await start_composer({}, routes=one_route(await raw_origin(untyped)))
    reader, writer = await asyncio.open_connection("127.0.0.1", composer.server.port)
    try:
        writer.write(b"GET /bytes HTTP/1.1\r\nHost: composer.test\r\n\r\n")
        await writer.drain()
        status, headers = await asyncio.wait_for(read_head(reader), 5)
    finally:
        writer.close()
        with suppress(Exception):
            await writer.wait_closed()
    assert status == "HTTP/1.1 200 OK"
    assert "content-type" not in headers, headers
