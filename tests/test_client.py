"""composer.client on its own, against real servers on 127.0.0.1.

Raw asyncio servers where the bytes on the wire matter (pooling, stale connections, bytes
nobody asked for, chunked framing, truncated streams, limits); an aiohttp server for TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import gzip
import shutil
import socket
import ssl
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import brotli
import pytest
from aiohttp import web
from conftest import refused_origin
from multidict import CIMultiDict
from yarl import URL

from composer.client import (
    _URLS,
    MAX_OPENING,
    Client,
    ClientError,
    ConnectError,
    InvalidRequest,
    InvalidResponse,
    Name,
    Response,
    TooLarge,
    _Conn,
    _Pool,
    _Ticket,
)

MAX = 1 << 20
Handler = Callable[["Conn"], Awaitable[None]]


@dataclass
class Conn:
    """One accepted connection on a raw server: what it read, and how to answer."""

    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def request(self) -> bytes:
        """The next request head; b"" when the client closed the connection."""
        try:
            return await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return b""

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def closed_by_peer(self, within: float = 2.0) -> bool:
        """True once the client has closed (EOF or reset) within `within` seconds, with
        nothing unread left (whether or not the handler is reading)."""
        end = time.monotonic() + within
        while time.monotonic() < end:
            if self.reader.at_eof() or self.reader.exception() is not None:
                return True
            await asyncio.sleep(0.01)
        return False


@dataclass
class Raw:
    """A plain TCP server on 127.0.0.1; `handler(conn)` runs per connection."""

    server: asyncio.Server
    conns: list[Conn] = field(default_factory=list)
    requests: list[bytes] = field(default_factory=list)  # every request head, in arrival order
    open_now: int = 0
    open_max: int = 0

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    def url(self, path: str = "/frag") -> URL:
        return URL(f"http://127.0.0.1:{self.port}{path}")


@pytest.fixture
async def raw() -> AsyncIterator[Callable[[Handler], Awaitable[Raw]]]:
    servers: list[Raw] = []
    tasks: set[asyncio.Task] = set()

    async def start(handler: Handler) -> Raw:
        holder: list[Raw] = []

        async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            state = holder[0]
            conn = Conn(len(state.conns), reader, writer)
            state.conns.append(conn)
            state.open_now += 1
            state.open_max = max(state.open_max, state.open_now)
            try:
                await handler(conn)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                state.open_now -= 1
                writer.close()
                tasks.discard(task)

        server = await asyncio.start_server(connection, "127.0.0.1", 0)
        state = Raw(server)
        holder.append(state)
        servers.append(state)
        return state

    yield start
    for state in servers:
        state.server.close()
        for conn in state.conns:
            conn.writer.close()
    for task in list(tasks):
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for state in servers:
        await state.server.wait_closed()


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    c = Client()
    yield c
    await c.close()


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n%sContent-Length: %d\r\n\r\n%s" % (extra, len(body), body)


async def serve_forever(conn: Conn, raw_state: Raw | None = None, answer: bytes | None = None) -> None:
    """Keep-alive: answer every request on this connection with `answer` (default: the path)."""
    while head := await conn.request():
        if raw_state is not None:
            raw_state.requests.append(head)
        await conn.send(answer if answer is not None else ok(head.split(b" ", 2)[1]))


async def get(client: Client, url: URL, *, timeout: float = 2.0, **kwargs) -> Response:
    async with asyncio.timeout(timeout):
        return await client.get(url, CIMultiDict(kwargs.pop("headers", {})), max_bytes=kwargs.pop("max_bytes", MAX),
                                **kwargs)


def pool_of(client: Client, url: URL):
    return client._pools[(url.scheme, url.raw_host, url.port)]


def queued_in(pool) -> int:
    """Callers still waiting for a connection (a ticket given up stays queued, done)."""
    return sum(not t.fut.done() for queue in (pool.waiters, *pool.parked.values()) for t in queue)


# ---------------------------------------------------------------- the request

async def test_request_is_the_request_line_host_and_the_given_headers_only(client, raw):
    heads: list[bytes] = []

    async def handler(conn: Conn) -> None:
        heads.append(await conn.request())
        await conn.send(ok())

    srv = await raw(handler)
    await get(client, srv.url("/a/b%20c?x=1&y=a%26b"), headers={"X-Request-Id": "r1", "Accept-Encoding": "gzip"})
    assert heads == [b"GET /a/b%%20c?x=1&y=a%%26b HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                     b"X-Request-Id: r1\r\nAccept-Encoding: gzip\r\n\r\n" % srv.port]


async def test_given_host_header_replaces_ours(client, raw):
    heads: list[bytes] = []

    async def handler(conn: Conn) -> None:
        heads.append(await conn.request())
        await conn.send(ok())

    srv = await raw(handler)
    await get(client, srv.url("/"), headers={"host": "shop.example"})
    assert heads == [b"GET / HTTP/1.1\r\nhost: shop.example\r\n\r\n"]


@pytest.mark.parametrize("headers", [{"x-a": "1\r\nx-injected: 1"}, {"x-a": "1\nx-b: 2"}, {"x-a": "1\r"}])
async def test_cr_or_lf_in_a_header_is_refused_and_nothing_is_sent(client, raw, headers):
    srv = await raw(lambda conn: serve_forever(conn, None))
    with pytest.raises(InvalidRequest):
        await get(client, srv.url(), headers=headers)
    assert srv.conns == []


async def test_no_cookies_are_kept(client, raw):
    heads: list[bytes] = []

    async def handler(conn: Conn) -> None:
        while head := await conn.request():
            heads.append(head)
            await conn.send(ok(extra=b"Set-Cookie: secret=1; Path=/\r\n"))

    srv = await raw(handler)
    first = await get(client, srv.url())
    assert first.headers["set-cookie"] == "secret=1; Path=/"
    await get(client, srv.url())
    assert all(b"ookie" not in head for head in heads[1:])


# ---------------------------------------------------------------- pooling

async def test_sequential_requests_reuse_one_connection(client, raw):
    srv = await raw(lambda conn: serve_forever(conn, srv))
    for i in range(5):
        resp = await get(client, srv.url(f"/{i}"))
        assert (resp.status, resp.body) == (200, b"/%d" % i)
    assert len(srv.conns) == 1
    assert len(srv.requests) == 5
    assert pool_of(client, srv.url()).size == 1


async def test_urls_made_per_request_each_get_their_own_answer_and_are_not_all_kept(client, raw):
    # A URL object's pool and target are remembered by identity (a template's static src is the
    # same object page after page); a {param} src makes a new URL per page.
    srv = await raw(lambda conn: serve_forever(conn, srv))
    static = srv.url("/static")
    for i in range(_URLS + 50):
        assert (await get(client, srv.url(f"/p/{i}"))).body == b"/p/%d" % i
        if i % 100 == 0:
            assert (await get(client, static)).body == b"/static"
    assert len(client._urls) <= _URLS
    assert len(srv.conns) == 1


async def test_per_origin_limit_holds_and_waiters_are_served_in_order():
    client = Client(limit_per_host=2)
    order: list[bytes] = []
    release = asyncio.Event()

    async def slow(conn: Conn) -> None:
        while head := await conn.request():
            order.append(head.split(b" ", 2)[1])
            await release.wait()
            await conn.send(ok())

    async with _counting_server(slow) as (port, counter):
        try:
            tasks = []
            for i in range(8):
                tasks.append(asyncio.create_task(get(client, URL(f"http://127.0.0.1:{port}/{i}"), timeout=5)))
                await asyncio.sleep(0.01)  # issued in this order
            await asyncio.sleep(0.1)
            assert counter.open_max == 2
            assert order == [b"/0", b"/1"]  # the other six wait for a connection
            release.set()
            results = await asyncio.gather(*tasks)
            assert [r.status for r in results] == [200] * 8
            assert order == [b"/%d" % i for i in range(8)]  # first come, first served
            assert counter.open_max == 2 and counter.accepted == 2
        finally:
            await client.close()


async def test_a_waiting_request_goes_out_on_the_connection_as_it_comes_back(raw):
    # The caller giving a connection back writes the next waiter's request on it, there and
    # then: the connection idles for no loop turn, and the waiter wakes once, to its answer.
    client = Client(limit_per_host=1)
    try:
        srv = await raw(serve_forever)
        await get(client, srv.url("/warm"))  # one idle connection, the pool's only one
        pool = pool_of(client, srv.url())
        waiting = asyncio.create_task(get(client, srv.url("/second")))  # runs once we wait below
        first = await client.get(srv.url("/first"), None, max_bytes=MAX)  # takes the connection
        # Still in the step that gave the connection back, before any other task has run:
        [conn] = client._conns
        assert first.body == b"/first" and not waiting.done() and queued_in(pool) == 0
        assert conn.fut is not None and conn.requests == 3  # /warm, /first, and /second in flight
        assert (await waiting).body == b"/second"
        assert (pool.size, len(pool.idle), queued_in(pool), len(srv.conns)) == (1, 1, 0, 1)
    finally:
        await client.close()


@dataclass
class _Counter:
    open_now: int = 0
    open_max: int = 0
    accepted: int = 0


@contextlib.asynccontextmanager
async def _counting_server(handler: Handler, backlog: int = 100) -> AsyncIterator[tuple[int, _Counter]]:
    """A plain TCP server on 127.0.0.1 running `handler` per connection: (its port, what it
    counts of connections), closed on the way out."""
    counter = _Counter()
    server = await asyncio.start_server(lambda r, w: _run_conn(handler, r, w, counter), "127.0.0.1", 0,
                                        backlog=backlog)
    try:
        yield server.sockets[0].getsockname()[1], counter
    finally:
        server.close()
        await server.wait_closed()


async def _run_conn(handler: Handler, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    counter: _Counter) -> None:
    counter.accepted += 1
    counter.open_now += 1
    counter.open_max = max(counter.open_max, counter.open_now)
    try:
        await handler(Conn(counter.accepted - 1, reader, writer))
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        counter.open_now -= 1
        writer.close()


async def test_waiting_for_a_connection_counts_against_the_deadline_and_leaks_no_slot(raw):
    client = Client(limit_per_host=1)
    try:
        async def handler(conn: Conn) -> None:
            while head := await conn.request():
                if b"/slow" in head:
                    await asyncio.sleep(0.4)
                await conn.send(ok())

        srv = await raw(handler)
        slow = asyncio.create_task(get(client, srv.url("/slow")))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await get(client, srv.url("/fast"), timeout=0.1)  # waits for the only connection
        assert time.monotonic() - started < 0.3
        assert queued_in(pool_of(client, srv.url())) == 0  # it left the queue
        assert (await slow).status == 200
        assert (await get(client, srv.url("/fast"))).status == 200
        assert len(srv.conns) == 1  # the waiter that gave up took nothing with it
        pool = pool_of(client, srv.url())
        assert (pool.size, len(pool.idle), queued_in(pool)) == (1, 1, 0)
    finally:
        await client.close()


async def test_a_reused_connection_closed_before_any_byte_is_retried_once_on_a_new_one(client, raw):
    # Each connection answers its first request, then closes on the next without a byte —
    # what a server closing idle keep-alive connections looks like when the request wins
    # the race.
    async def one_per_connection(conn: Conn) -> None:
        srv.requests.append(await conn.request())
        await conn.send(ok(b"conn %d" % conn.index))
        srv.requests.append(await conn.request())  # then return: FIN, no answer

    srv = await raw(one_per_connection)
    assert (await get(client, srv.url())).body == b"conn 0"
    resp = await get(client, srv.url())
    assert resp.body == b"conn 1"  # sent on conn 0 (closed unanswered), then again on conn 1
    assert len(srv.conns) == 2
    assert len([r for r in srv.requests if r]) == 3


async def test_the_retry_leaves_no_exception_showing_to_other_tasks(client, raw):
    # While the retry opens its new connection, the loop runs other tasks: they must not see
    # the stale connection's error as the exception being handled (compiled, a coroutine
    # suspended inside an `except` clause left it in the thread's state, so an unrelated
    # error raised meanwhile was chained to it: "During handling of the above exception…").
    async def one_per_connection(conn: Conn) -> None:
        srv.requests.append(await conn.request())
        await conn.send(ok(b"conn %d" % conn.index))
        srv.requests.append(await conn.request())

    srv = await raw(one_per_connection)
    assert (await get(client, srv.url())).body == b"conn 0"
    seen: list[BaseException | None] = []
    retried = asyncio.ensure_future(get(client, srv.url()))
    while not retried.done():
        seen.append(sys.exc_info()[1])
        await asyncio.sleep(0)
    assert (await retried).body == b"conn 1"  # the retry happened, on conn 1
    assert len(seen) > 1 and not any(seen), seen


async def test_the_retry_is_once_and_never_for_a_fresh_connection(client, raw):
    answered: list[int] = []

    async def only_the_first_request_ever(conn: Conn) -> None:
        while head := await conn.request():
            srv.requests.append(head)
            if answered:
                return  # close without a byte
            answered.append(1)
            await conn.send(ok())

    srv = await raw(only_the_first_request_ever)
    assert (await get(client, srv.url())).status == 200
    with pytest.raises(ConnectError):
        await get(client, srv.url())  # reused conn 0: closed → retried on conn 1: closed → fails
    assert (len(srv.conns), len(srv.requests)) == (2, 3)
    with pytest.raises(ConnectError):
        await get(client, srv.url())  # a fresh connection (none pooled) closed: no retry
    assert (len(srv.conns), len(srv.requests)) == (3, 4)
    assert pool_of(client, srv.url()).size == 0


async def test_an_idle_connection_closed_by_the_server_is_dropped_not_retried(client, raw):
    async def close_when_idle(conn: Conn) -> None:
        srv.requests.append(await conn.request())
        await conn.send(ok())
        await asyncio.sleep(0.02)  # idle keep-alive timeout of the service

    srv = await raw(close_when_idle)
    await get(client, srv.url())
    await asyncio.sleep(0.15)
    pool = pool_of(client, srv.url())
    assert (pool.size, pool.idle) == (0, [])  # the EOF was seen while idle
    assert (await get(client, srv.url())).status == 200
    assert (len(srv.conns), len(srv.requests)) == (2, 2)


@pytest.mark.parametrize("late", [b"junk", ok(b"<p>EVIL</p>")], ids=["junk", "response"])
async def test_an_idle_connection_that_receives_bytes_is_never_reused(client, raw, late):
    async def lying(conn: Conn) -> None:
        while head := await conn.request():
            srv.requests.append(head)
            await conn.send(ok(head.split(b" ", 2)[1]))
            if b"/lie" in head:
                await asyncio.sleep(0.02)
                await conn.send(late)

    srv = await raw(lying)
    assert (await get(client, srv.url("/lie"))).body == b"/lie"
    await asyncio.sleep(0.1)
    for path in ("/a", "/b"):
        assert (await get(client, srv.url(path))).body == path.encode()
    assert len(srv.conns) == 2  # conn 0 was dropped, conn 1 reused
    assert await srv.conns[0].closed_by_peer()


async def test_bytes_after_the_response_in_the_same_read_keep_the_response_and_drop_the_connection(client, raw):
    async def smuggle(conn: Conn) -> None:
        while await conn.request():
            await conn.send(ok(b"mine") + ok(b"<p>EVIL</p>"))

    srv = await raw(smuggle)
    assert (await get(client, srv.url())).body == b"mine"
    assert (await get(client, srv.url())).body == b"mine"
    assert len(srv.conns) == 2


async def test_bytes_after_the_response_that_are_not_http_are_invalid(client, raw):
    srv = await raw(lambda conn: serve_forever(conn, None, ok(b"mine") + b"NOT-HTTP-AT-ALL"))
    with pytest.raises(InvalidResponse):
        await get(client, srv.url())


async def test_idle_connections_expire_after_keepalive(raw):
    client = Client(keepalive=0.1)
    try:
        srv = await raw(lambda conn: serve_forever(conn, None))
        await get(client, srv.url())
        assert await srv.conns[0].closed_by_peer(within=1.0)  # closed by the expiry timer, unused
        assert pool_of(client, srv.url()).size == 0
        await get(client, srv.url())
        assert len(srv.conns) == 2
    finally:
        await client.close()


@pytest.mark.parametrize("after", [b"", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc"],
                         ids=["before-headers", "mid-body"])
async def test_cancellation_closes_the_connection(client, raw, after):
    async def stall(conn: Conn) -> None:
        await conn.request()
        await conn.send(after)
        await asyncio.sleep(10)

    srv = await raw(stall)
    with pytest.raises(TimeoutError):
        await get(client, srv.url(), timeout=0.1)
    assert await srv.conns[0].closed_by_peer(within=1.0)
    pool = pool_of(client, srv.url())
    assert (pool.size, pool.idle) == (0, [])


async def test_close_closes_pooled_connections_and_refuses_more(raw):
    client = Client()
    srv = await raw(lambda conn: serve_forever(conn, None))
    await get(client, srv.url())
    await client.close()
    assert await srv.conns[0].closed_by_peer(within=1.0)
    with pytest.raises(ConnectError):
        await get(client, srv.url())


async def test_close_fails_requests_in_flight_and_waiting(raw):
    client = Client(limit_per_host=1)

    async def silent(conn: Conn) -> None:
        await conn.request()
        await asyncio.sleep(10)

    srv = await raw(silent)
    flying = asyncio.create_task(get(client, srv.url()))
    waiting = asyncio.create_task(get(client, srv.url()))
    await asyncio.sleep(0.1)
    started = time.monotonic()
    await client.close()
    for task in (flying, waiting):
        with pytest.raises(ConnectError, match="closed"):
            await task
    assert time.monotonic() - started < 0.5
    assert await srv.conns[0].closed_by_peer(within=1.0)


class _CountedShare(str):
    """A share name that counts how often the pool looks it up (each look at a waiter of it)."""

    looks = 0

    def __hash__(self) -> int:
        type(self).looks += 1
        return str.__hash__(self)


async def test_a_hanging_share_queued_in_front_costs_a_healthy_one_no_scan(raw):
    # A fragment that hangs fills three quarters of its origin's pool, and its fetches queue
    # behind by the thousand; each connection a healthy fragment gives back must not look at
    # every one of them (a scan per fetch: the pool's CPU grows with the queue, quadratically).
    client = Client(limit_per_host=16)  # the last quarter (4) only for shares holding < 1

    async def handler(conn: Conn) -> None:
        while head := await conn.request():
            if b"/hang" in head:
                await asyncio.sleep(30)
            await conn.send(ok())

    hang = _CountedShare("hang")
    queued = 2000
    tasks: list[asyncio.Task[Response]] = []
    try:
        srv = await raw(handler)
        for _ in range(12 + queued):
            tasks.append(asyncio.create_task(client.get(srv.url("/hang"), None, max_bytes=MAX, share=hang)))
        await asyncio.sleep(0)
        pool = pool_of(client, srv.url())
        while pool.opening or len(srv.conns) < 12:
            await asyncio.sleep(0.01)
        assert (pool.size, pool.held[hang], queued_in(pool)) == (12, 12, queued)
        _CountedShare.looks = 0
        for i in range(200):  # one healthy fragment, fetched 200 times on the same origin
            assert (await get(client, srv.url(f"/ok{i}"), share="ok")).status == 200
        # Before: every connection given back looked at all 2,000 (400,000 looks); now each
        # hanging ticket is parked once, and each wake looks at its share once.
        assert _CountedShare.looks < 3 * queued + 10 * 200, _CountedShare.looks
        assert (pool.held[hang], queued_in(pool)) == (12, queued)  # still hanging, still in order
        assert pool.size == 13 and "ok" not in pool.held
        # Twenty at once: past the first, each is parked (its share holds its one connection),
        # and each one given back goes to the next of them, not to the hanging share.
        results = await asyncio.gather(*(get(client, srv.url(f"/ok{i}"), share="ok") for i in range(20)))
        assert [r.status for r in results] == [200] * 20
        assert (pool.size, pool.held[hang], queued_in(pool)) == (13, 12, queued)
    finally:
        await client.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def test_parked_callers_of_two_shares_are_served_in_order_of_arrival():
    # Parked per share, callers still go first come, first served across shares: A's first
    # parked caller is served, leaving A's next (newer than B's) at the head of A's queue, which
    # was parked first; when both shares may have a slot at once, B's older caller goes first.
    loop = asyncio.new_event_loop()
    try:
        pool = _Pool(Client(limit_per_host=64), loop, "http", "127.0.0.1", 80, "127.0.0.1")
        assert (pool.limit - pool.reserve, pool.share) == (48, 4)  # last quarter: shares under 4

        def arrive(share: str | None) -> _Ticket:
            return pool.wait(_Ticket(loop.create_future(), share, b"", 0, None))

        for share in ["a"] * 4 + ["b"] * 4 + [None] * 8:  # 16 open connections
            assert arrive(share).fut.done()
            pool.opened()
        for _ in range(32):  # and 32 slots handed out, opening: no more may open at once
            assert arrive(None).fut.done()
        a1, b1, a2 = arrive("a"), arrive("b"), arrive("a")  # a and b hold 4 each: they wait
        pool.opened()  # a wake, with a and b full: all three parked
        assert ([t.fut.done() for t in (a1, b1, a2)], list(pool.parked)) == ([False] * 3, ["a", "b"])
        pool.unhold("a")
        pool.free_slot()  # one of a's connections ends: a1 (the oldest) takes its slot
        assert [t.fut.done() for t in (a1, b1, a2)] == [True, False, False] and pool.opening == 32
        for share in ("a", "b"):  # one of each ends while 32 are opening: no slot is handed out
            pool.unhold(share)
            pool.free_slot()
        assert [t.fut.done() for t in (b1, a2)] == [False, False]
        pool.opened()  # one slot to open in: b1 arrived before a2
        assert [t.fut.done() for t in (b1, a2)] == [True, False]
    finally:
        loop.close()


async def test_connection_refused_is_a_connect_error(client):
    url = URL(refused_origin() + "/")
    with pytest.raises(ConnectError):
        await get(client, url)
    assert (pool_of(client, url).size, pool_of(client, url).opening) == (0, 0)


async def test_a_burst_opens_connections_a_few_at_a_time_and_none_waits_a_syn_retransmit():
    # 300 requests at once to a service whose accept backlog holds 64: opened all at once,
    # most of the SYNs would be dropped and sent again a second later. At most MAX_OPENING are
    # opened at a time; the others wait for one of those, or for a connection coming back.
    client = Client()
    async with _counting_server(serve_forever, backlog=2 * MAX_OPENING) as (port, counter):
        try:
            url = URL(f"http://127.0.0.1:{port}/x")
            started = time.monotonic()
            tasks = [asyncio.create_task(get(client, url, timeout=5)) for _ in range(300)]
            await asyncio.sleep(0)  # each task has asked once
            pool = pool_of(client, url)
            assert (pool.opening, queued_in(pool)) == (MAX_OPENING, 300 - MAX_OPENING)
            results = await asyncio.gather(*tasks)
            elapsed = time.monotonic() - started
            assert [r.body for r in results] == [b"/x"] * 300
            assert elapsed < 0.9, elapsed  # Linux sends a dropped SYN again after 1 s
            assert (pool.opening, queued_in(pool), pool.size) == (0, 0, counter.accepted)
        finally:
            await client.close()


async def test_a_slot_to_open_in_given_up_before_opening_is_passed_on(raw):
    # A waiter handed a slot to open a connection in, cancelled before it ran: neither the
    # slot nor its place among the connections opening is lost.
    client = Client(limit_per_host=1)
    try:
        srv = await raw(serve_forever)
        first = asyncio.create_task(get(client, srv.url("/a")))
        second = asyncio.create_task(get(client, srv.url("/b")))
        await asyncio.sleep(0)  # /a holds the only slot (opening), /b waits
        pool = pool_of(client, srv.url())
        assert (pool.size, pool.opening, queued_in(pool)) == (1, 1, 1)
        first.cancel()
        second.cancel()
        for task in (first, second):
            with pytest.raises(asyncio.CancelledError):
                await task
        assert (pool.size, pool.opening, queued_in(pool)) == (0, 0, 0)
        assert (await get(client, srv.url("/c"))).body == b"/c"
        assert (pool.size, pool.opening, len(pool.idle)) == (1, 0, 1)
    finally:
        await client.close()


# ---------------------------------------------------------------- framing

async def test_chunked_body_with_trailers(client, raw):
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
               b"5\r\nhello\r\n1;ext=1\r\n \r\n5\r\nworld\r\n0\r\nX-Checksum: abc\r\n\r\n")
    srv = await raw(lambda conn: serve_forever(conn, None, chunked))
    for _ in range(2):
        resp = await get(client, srv.url())
        assert resp.body == b"hello world"
        assert "x-checksum" not in resp.headers  # trailers are read and dropped
        assert resp.head.get(Name("x-checksum")) is None and resp.head.get(Name("trailer")) == "X-Checksum"
    assert len(srv.conns) == 1  # the framing ended where it should: reused


async def test_chunked_body_in_pieces(client, raw):
    async def dribble(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"3\r\nabc\r", b"\n", b"2\r\n", b"de\r\n", b"0\r\n", b"\r\n"):
            await asyncio.sleep(0.01)
            await conn.send(piece)
        await conn.request()

    srv = await raw(dribble)
    assert (await get(client, srv.url())).body == b"abcde"


@pytest.mark.parametrize("version", [b"1.1", b"1.0"])
async def test_body_read_until_close(client, raw, version):
    async def until_close(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/%s 200 OK\r\nContent-Type: text/html\r\n\r\nevery" % version)
        await asyncio.sleep(0.02)
        await conn.send(b" byte until the end")

    srv = await raw(until_close)
    for _ in range(2):
        assert (await get(client, srv.url())).body == b"every byte until the end"
    assert len(srv.conns) == 2  # never reused


async def test_connection_close_response_is_not_reused(client, raw):
    srv = await raw(lambda conn: serve_forever(conn, None, ok(extra=b"Connection: close\r\n")))
    await get(client, srv.url())
    await get(client, srv.url())
    assert len(srv.conns) == 2


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n01234\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Le",
    b"",
], ids=["short-content-length", "unfinished-chunked", "mid-head", "nothing"])
async def test_connection_ending_early_is_a_connect_error(client, raw, response):
    async def cut(conn: Conn) -> None:
        await conn.request()
        await conn.send(response)

    srv = await raw(cut)
    with pytest.raises(ConnectError):
        await get(client, srv.url())


@pytest.mark.parametrize("response", [
    b"SSH-2.0-OpenSSH_9.6\r\n",
    b"HTTP/1.1 abc Nonsense\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nNo Colon\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
])
async def test_what_llhttp_refuses_is_invalid(client, raw, response):
    async def garbage(conn: Conn) -> None:
        await conn.request()
        await conn.send(response)
        await conn.request()

    srv = await raw(garbage)
    with pytest.raises(InvalidResponse):
        await get(client, srv.url())


async def test_informational_responses_are_skipped(client, raw):
    answer = (b"HTTP/1.1 100 Continue\r\n\r\n"
              b"HTTP/1.1 103 Early Hints\r\nLink: </hint.css>; rel=preload\r\n\r\n" + ok(b"final"))
    srv = await raw(lambda conn: serve_forever(conn, None, answer))
    resp = await get(client, srv.url())
    assert (resp.status, resp.body) == (200, b"final")
    assert "link" not in resp.headers
    await get(client, srv.url())
    assert len(srv.conns) == 1


async def test_headers_are_a_multidict_as_sent(client, raw):
    answer = (b"HTTP/1.1 404 Not Found\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\nX-Pad:  v  \r\n"
              b"X-Bytes: \xc3\xa9\xff\r\nContent-Length: 4\r\n\r\ngone")
    srv = await raw(lambda conn: serve_forever(conn, None, answer))
    resp = await get(client, srv.url())
    assert (resp.status, resp.body) == (404, b"gone")
    assert resp.headers.getall("SET-COOKIE") == ["a=1", "b=2"]
    assert resp.headers["x-pad"] == "v"
    assert resp.headers["x-bytes"] == b"\xc3\xa9\xff".decode("utf-8", "surrogateescape")


async def test_a_line_is_found_by_its_name_in_any_case_and_decoded_alone(client, raw):
    answer = (b"HTTP/1.1 200 OK\r\nCONTENT-TYPE: text/html\r\nlInK: </a.css>\r\nLink: </b.js>\r\n"
              b"X-Bytes: \xff\r\nContent-Typo: no\r\nContent-Length: 2\r\n\r\nok")
    srv = await raw(lambda conn: serve_forever(conn, None, answer))
    resp = await get(client, srv.url())
    head = resp.head
    assert head.get(Name("content-type")) == "text/html"
    assert head.getall(Name("link")) == ["</a.css>", "</b.js>"] and head.get(Name("link")) == "</a.css>"
    assert head.get(Name("x-bytes")) == b"\xff".decode("utf-8", "surrogateescape")
    assert (head.get(Name("x-missing")), head.getall(Name("x-missing")), head.get(Name("content-typ"))) == (None, [], None)
    # Every line, decoded, for whoever reads them all: made once.
    assert list(resp.headers.items())[:2] == [("CONTENT-TYPE", "text/html"), ("lInK", "</a.css>")]
    assert resp.headers is resp.headers is head.headers


async def test_each_response_on_a_connection_has_its_own_header_names(client, raw):
    # Responses on one connection, each with other names, or the same in another order or
    # case: each gets exactly its own, nothing carried over from the one before.
    heads = [b"Content-Length: 1\r\nX-A: 1\r\nX-B: 2\r\n", b"Content-Length: 1\r\nX-B: 3\r\nX-C: 4\r\n",
             b"Content-Length: 1\r\nx-b: 5\r\nX-A: 6\r\nX-D: 7\r\n", b"Content-Length: 1\r\n"]

    async def handler(conn: Conn) -> None:
        for head in heads:
            await conn.request()
            await conn.send(b"HTTP/1.1 200 OK\r\n" + head + b"\r\nx")
        await conn.request()

    srv = await raw(handler)
    responses = [await get(client, srv.url()) for _ in heads]
    seen = [list(resp.headers.items()) for resp in responses]
    assert seen == [[("Content-Length", "1"), ("X-A", "1"), ("X-B", "2")],
                    [("Content-Length", "1"), ("X-B", "3"), ("X-C", "4")],
                    [("Content-Length", "1"), ("x-b", "5"), ("X-A", "6"), ("X-D", "7")],
                    [("Content-Length", "1")]]
    assert [resp.headers.getall("x-b", None) for resp in responses] == [["2"], ["3"], ["5"], None]
    assert len(srv.conns) == 1


async def test_skip_body_returns_at_the_head_and_drops_the_connection(client, raw):
    async def error_page(conn: Conn) -> None:
        while await conn.request():
            await conn.send(b"HTTP/1.1 503 Busy\r\nContent-Length: 1000000\r\n\r\nstart of a long page")

    srv = await raw(error_page)
    started = time.monotonic()
    resp = await get(client, srv.url(), skip_body=lambda status: status >= 500)
    assert (resp.status, resp.body) == (503, None)
    assert time.monotonic() - started < 0.5
    assert await srv.conns[0].closed_by_peer(within=1.0)


# ---------------------------------------------------------------- limits

async def test_content_length_over_max_bytes_fails_at_the_head(client, raw):
    async def big(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n")
        await asyncio.sleep(10)

    srv = await raw(big)
    with pytest.raises(TooLarge) as caught:
        await get(client, srv.url(), max_bytes=4999)
    assert caught.value.declared == 5000


@pytest.mark.parametrize("chunked", [False, True])
async def test_body_over_max_bytes_is_too_large_and_exactly_max_is_fine(client, raw, chunked):
    body = b"y" * 1000
    answer = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"".join(
        b"64\r\n" + body[i:i + 100] + b"\r\n" for i in range(0, 1000, 100)) + b"0\r\n\r\n") if chunked else ok(body)
    srv = await raw(lambda conn: serve_forever(conn, None, answer))
    assert (await get(client, srv.url(), max_bytes=1000)).body == body
    with pytest.raises(TooLarge):
        await get(client, srv.url(), max_bytes=999)


async def test_header_line_over_max_field_size_is_invalid(raw):
    client = Client(max_field_size=100)
    try:
        fits = b"X-A: " + b"a" * 97 + b"\r\n"  # name + value = 100
        srv = await raw(lambda conn: serve_forever(conn, None, ok(extra=fits)))
        assert (await get(client, srv.url())).headers["x-a"] == "a" * 97
        srv2 = await raw(lambda conn: serve_forever(conn, None, ok(extra=b"X-A: " + b"a" * 98 + b"\r\n")))
        with pytest.raises(InvalidResponse, match="too long"):
            await get(client, srv2.url())
    finally:
        await client.close()


async def test_too_many_headers_is_invalid(client, raw):
    many = b"".join(b"X-%d: v\r\n" % i for i in range(126))  # + Content-Type, Content-Length = 128
    srv = await raw(lambda conn: serve_forever(conn, None, ok(extra=many)))
    assert len((await get(client, srv.url())).headers) == 128
    srv2 = await raw(lambda conn: serve_forever(conn, None, ok(extra=many + b"X-Last: v\r\n")))
    with pytest.raises(InvalidResponse, match="too many"):
        await get(client, srv2.url())


async def test_a_head_that_never_ends_is_cut_off(raw):
    client = Client(max_field_size=100)
    try:
        async def endless(conn: Conn) -> None:
            await conn.request()
            await conn.send(b"HTTP/1.1 200 OK\r\nX-Endless: ")
            for _ in range(100):
                await conn.send(b"z" * 1000)  # never a CRLF
            await conn.request()

        srv = await raw(endless)
        with pytest.raises(InvalidResponse, match="head too large"):
            await get(client, srv.url())
    finally:
        await client.close()


# ---------------------------------------------------------------- content codings

TEXT = b"<p>" + b"a compressible fragment " * 400 + b"</p>"


def raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


CODINGS = {
    "gzip": gzip.compress,
    "x-gzip": gzip.compress,
    "deflate": zlib.compress,
    "deflate-raw": raw_deflate,
    "br": brotli.compress,
}


def encoded(coding: str, data: bytes, *, chunked: bool = False) -> bytes:
    body = CODINGS[coding](data)
    name = coding.removesuffix("-raw").encode()
    if not chunked:
        return b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n%s" % (name, len(body), body)
    pieces = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7))
    return b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nTransfer-Encoding: chunked\r\n\r\n%s0\r\n\r\n" % (name, pieces)


@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked-7-bytes"])
@pytest.mark.parametrize("coding", list(CODINGS))
async def test_content_codings_are_decoded(client, raw, coding, chunked):
    srv = await raw(lambda conn: serve_forever(conn, None, encoded(coding, TEXT, chunked=chunked)))
    resp = await get(client, srv.url())
    assert resp.body == TEXT
    assert resp.headers["content-encoding"] == coding.removesuffix("-raw")  # as sent


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br"])
async def test_a_compressed_stream_cut_short_is_invalid(client, raw, coding):
    body = CODINGS[coding](TEXT)[:-8]  # the HTTP framing is complete; the stream is not
    answer = b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        coding.encode(), len(body), body)
    srv = await raw(lambda conn: serve_forever(conn, None, answer))
    with pytest.raises(InvalidResponse, match="cut short"):
        await get(client, srv.url())


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br"])
async def test_garbage_that_does_not_decompress_is_invalid(client, raw, coding):
    body = b"\x1f\x8b\x08\x00garbage garbage garbage" if coding == "gzip" else b"\xff" * 40
    answer = b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        coding.encode(), len(body), body)
    srv = await raw(lambda conn: serve_forever(conn, None, answer))
    with pytest.raises(InvalidResponse):
        await get(client, srv.url())


@functools.cache
def bomb(coding: str) -> bytes:
    """100 MB of zeros, about 100 KB (gzip, deflate) or 152 bytes (br) on the wire."""
    zeros = b"\0" * 100_000_000
    return brotli.compress(zeros, quality=5) if coding == "br" else CODINGS[coding](zeros)


@pytest.mark.parametrize("coding", ["gzip", "deflate", "br"])
async def test_a_compression_bomb_is_stopped_at_the_cap(client, raw, coding):
    bomb_ = bomb(coding)
    assert len(bomb_) < 100_000
    answer = b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        coding.encode(), len(bomb_), bomb_)
    srv = await raw(lambda conn: serve_forever(conn, None, answer))
    cpu = time.process_time()
    with pytest.raises(TooLarge):
        await get(client, srv.url(), max_bytes=100_000)
    assert time.process_time() - cpu < 0.1  # inflating it all takes 0.3 s or more


async def test_unknown_coding_is_kept_as_sent(client, raw):
    answer = b"HTTP/1.1 200 OK\r\nContent-Encoding: identity\r\nContent-Length: 5\r\n\r\nplain"
    srv = await raw(lambda conn: serve_forever(conn, None, answer))
    assert (await get(client, srv.url())).body == b"plain"


async def test_empty_compressed_body_is_fine(client, raw):
    answer = b"HTTP/1.1 204 No Content\r\nContent-Encoding: gzip\r\n\r\n"
    srv = await raw(lambda conn: serve_forever(conn, None, answer))
    resp = await get(client, srv.url())
    assert (resp.status, resp.body) == (204, b"")
    await get(client, srv.url())
    assert len(srv.conns) == 1


# ---------------------------------------------------------------- freed without the collector

# How a connection's last exchange ends, and what `get` raises (None: it answers). composer
# runs the cyclic collector rarely (server.tune_gc): a connection must be freed by reference
# counting once it is closed, whatever the service did.
ENDINGS = {
    "answered": (ok(b"fine"), None),
    "connection-close": (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", None),
    "cut-short": (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234", ConnectError),  # then closed
    "not-http": (b"SSH-2.0-OpenSSH_9.6\r\n", InvalidResponse),
    "bad-gzip": (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 27\r\n\r\n"
                 b"\x1f\x8bgarbage garbage garbage", InvalidResponse),
    "too-large": (ok(b"x" * 100), TooLarge),
    "5xx-unread": (b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\n\r\nbusy", None),
    "no-answer": (b"", TimeoutError),
}


@pytest.mark.parametrize("ending", list(ENDINGS))
async def test_a_closed_connection_is_freed_without_the_cyclic_collector(raw, ending):
    answer, expected = ENDINGS[ending]

    async def once(conn: Conn) -> None:
        await conn.request()
        await conn.send(answer)
        if ending != "cut-short":
            await asyncio.sleep(10)  # the client closes (or keeps) it; the fixture ends it

    srv = await raw(once)
    client = Client()
    gc.collect()
    gc.disable()
    try:
        raised = None
        try:
            await get(client, srv.url(), max_bytes=10, timeout=0.3, skip_body=lambda status: status >= 500)
        except (ClientError, TimeoutError) as exc:  # not kept: its traceback holds the frames
            raised = type(exc)
        assert raised is expected
        await client.close()
        for _ in range(5):  # connection_lost comes in a later loop turn
            await asyncio.sleep(0)
        left = [o for o in gc.get_objects() if isinstance(o, _Conn)]
    finally:
        gc.enable()
    assert left == [], f"{len(left)} connection(s) left for the cyclic collector"


# ---------------------------------------------------------------- DNS

async def test_dns_answers_are_cached(raw, monkeypatch):
    srv = await raw(lambda conn: serve_forever(conn, None, ok(extra=b"Connection: close\r\n")))
    loop = asyncio.get_running_loop()
    calls: list[str] = []
    real = loop.getaddrinfo

    async def counting(host, *args, **kwargs):
        calls.append(host)
        return [info for info in await real(host, *args, **kwargs) if info[0] == socket.AF_INET]

    monkeypatch.setattr(loop, "getaddrinfo", counting)
    url = URL(f"http://localhost:{srv.port}/")
    for ttl, expected in ((300.0, ["localhost"]), (0.0, ["localhost"] * 3)):
        calls.clear()
        client = Client(dns_ttl=ttl)
        try:
            for _ in range(3):  # Connection: close → a new connection, so a lookup, each time
                assert (await get(client, url)).status == 200
        finally:
            await client.close()
        assert calls == expected
    assert len(srv.conns) == 6


async def test_a_name_that_does_not_resolve_is_a_connect_error(client):
    host = "composer-test.invalid"  # RFC 6761: never resolves
    try:
        async with asyncio.timeout(2):
            await asyncio.get_running_loop().getaddrinfo(host, 80, type=socket.SOCK_STREAM)
        pytest.skip(f"this machine's resolver answers for {host}")
    except socket.gaierror:
        pass
    except TimeoutError:
        pytest.skip("this machine's resolver hangs")
    with pytest.raises(ConnectError, match="resolve"):
        await get(client, URL(f"http://{host}/"), timeout=5)


# ---------------------------------------------------------------- TLS

def _with_openssl(folder: Path) -> None:
    openssl = shutil.which("openssl")
    assert openssl is not None, "the TLS tests need the openssl command (Debian's openssl package)"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"), "-days", "1",
                    "-subj", "/CN=composer test", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,digitalSignature,keyCertSign"],
                   check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, (cert.pem, key.pem), made with
    the `openssl` command."""
    folder = tmp_path_factory.mktemp("tls")
    _with_openssl(folder)
    return folder / "cert.pem", folder / "key.pem"


@pytest.fixture
async def tls_server(certificate) -> AsyncIterator[tuple[int, list[web.Request]]]:
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    seen: list[web.Request] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request)
        return web.Response(body=gzip.compress(b"<p>secure</p>"), content_type="text/html",
                            headers={"Content-Encoding": "gzip"})

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    yield port, seen
    await runner.cleanup()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_https_with_a_trusted_certificate(certificate, tls_server, host):
    port, seen = tls_server
    client = Client(ssl_context=ssl.create_default_context(cafile=str(certificate[0])))
    try:
        for _ in range(3):
            resp = await get(client, URL(f"https://{host}:{port}/x"))
            assert (resp.status, resp.body) == (200, b"<p>secure</p>")
    finally:
        await client.close()
    assert len(seen) == 3
    assert len({r.transport.get_extra_info("peername") for r in seen}) == 1  # one pooled TLS connection
    assert seen[0].secure and seen[0].host == f"{host}:{port}"


async def test_https_with_an_untrusted_certificate_is_a_connect_error(tls_server):
    port, seen = tls_server
    client = Client()  # the system's trust store: the self-signed certificate is not in it
    try:
        with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            await get(client, URL(f"https://127.0.0.1:{port}/x"))
        assert pool_of(client, URL(f"https://127.0.0.1:{port}/x")).size == 0
    finally:
        await client.close()
    assert seen == []


async def test_https_checks_the_host_name(certificate, tls_server):
    port, seen = tls_server
    client = Client(ssl_context=ssl.create_default_context(cafile=str(certificate[0])))
    try:
        # A name the certificate does not hold, resolving (through the DNS cache) to the server.
        infos = await asyncio.get_running_loop().getaddrinfo("127.0.0.1", port, type=socket.SOCK_STREAM)
        client._dns[("elsewhere.example", port)] = (time.monotonic() + 300, infos)
        with pytest.raises(ConnectError, match="mismatch|match"):
            await get(client, URL(f"https://elsewhere.example:{port}/x"))
    finally:
        await client.close()
    assert seen == []


# ---------------------------------------------------------------- uvloop

def test_the_same_on_uvloop():
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        answers = [ok(b"plain"), encoded("gzip", TEXT, chunked=True), encoded("br", TEXT)]

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            index = 0
            try:
                while await reader.readuntil(b"\r\n\r\n"):
                    writer.write(answers[index % 3])
                    index += 1
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        client = Client(limit_per_host=1)
        try:
            url = URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
            bodies = [r.body for r in await asyncio.gather(*[get(client, url) for _ in range(6)])]
            assert bodies == [b"plain", TEXT, TEXT] * 2
            assert pool_of(client, url).size == 1
        finally:
            await client.close()
            server.close()
            await server.wait_closed()

    uvloop.run(scenario())


@pytest.mark.parametrize("use_uvloop", [False, True], ids=["asyncio", "uvloop"])
def test_a_pooled_connection_closing_under_us_is_replaced(use_uvloop):
    # Its transport is closing but connection_lost has not run yet when the next request
    # takes it from the pool: the request goes again, on a new connection.
    async def scenario() -> None:
        accepted: list[int] = []

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(1)
            try:
                while await reader.readuntil(b"\r\n\r\n"):
                    writer.write(ok())
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        client = Client()
        try:
            url = URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
            await get(client, url)
            pool_of(client, url).idle[0].transport.close()
            assert (await get(client, url)).status == 200
            assert len(accepted) == 2
        finally:
            await client.close()
            server.close()
            await server.wait_closed()

    if use_uvloop:
        pytest.importorskip("uvloop").run(scenario())
    else:
        asyncio.run(scenario())
