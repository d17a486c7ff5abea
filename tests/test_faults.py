"""Fault injection: real misbehaving fragment services on 127.0.0.1, a real composer.

Each faulty service sits on a page next to a healthy fragment and carries an inline
fallback. Whatever the fault, the page must end (last body byte at the client) within the
fragment's timeout + 200 ms, the failure must be counted under the right `reason` in
`composer_fragment_failures_total`, the fallback and the healthy fragment must be on the
page, and composer must go on serving (a following page works).

aiohttp handlers play the faults aiohttp can produce; raw `asyncio.start_server`
connections write the bytes aiohttp never would (lying Content-Length, resets, garbage).
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import re
import socket
import struct
import time
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from conftest import RawHandler, html, refused_origin
from multidict import CIMultiDict

from composer.errors import error_page
from composer.pipeline import Flight

TIMEOUT_MS = 400
BUDGET = TIMEOUT_MS / 1000 + 0.2  # the page's whole answer, request sent → last body byte
MB10 = 10 * 1024 * 1024  # twice the default max_fragment_bytes (5 MB)
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=8)  # a broken composer fails a test, never hangs it

ROUTES = """
    routes:
      - name: page
        match: {path: /page}
        template: page.html
      - name: next
        match: {path: /next}
        template: next.html
"""


# ---------------------------------------------------------------- servers

def reset(writer: asyncio.StreamWriter) -> None:
    """Abort with SO_LINGER 0: the peer gets an RST, not a FIN."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def respond(data: bytes, then: str = "hang") -> RawHandler:
    """A raw handler: read the request head, write `data`, then hang, close (FIN) or reset (RST)."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if data:
            writer.write(data)
            await writer.drain()
        if then == "hang":
            await reader.read()  # until composer gives up
        elif then == "reset":
            await asyncio.sleep(0.02)  # let the bytes arrive first
            reset(writer)
        else:
            await asyncio.sleep(0.02)
            writer.close()

    return handler


def gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


async def until_gone(request: web.Request, limit: float = 5.0) -> None:
    """Wait until composer hangs up (keeps teardown fast); never longer than `limit`."""
    end = time.monotonic() + limit
    while not gone(request) and time.monotonic() < end:
        await asyncio.sleep(0.01)


async def hang_before_headers(request: web.Request) -> web.StreamResponse:
    await until_gone(request)
    return web.Response(text="<p>too late</p>", content_type="text/html")


async def hang_mid_body(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/html", "Content-Length": "1000"})
    await resp.prepare(request)
    await resp.write(b"<p>half" + b"." * 100)
    await until_gone(request)
    return resp


async def trickle(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/html", "Content-Length": "100"})
    await resp.prepare(request)
    for _ in range(100):
        if gone(request):
            break
        try:
            await resp.write(b"t")
        except ConnectionError:
            break
        await asyncio.sleep(0.1)
    return resp


def compressed(body: bytes, content_encoding: str = "gzip", content_type: str = "text/html"):
    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=body, headers={"Content-Encoding": content_encoding, "Content-Type": content_type})

    return handler


def raw_bytes(body: bytes, content_type: str = "text/html"):
    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=body, headers={"Content-Type": content_type})

    return handler


async def big_chunked(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/html"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    block = b"c" * 65536
    try:
        for _ in range(MB10 // len(block)):
            if gone(request):
                break
            await resp.write(block)
        await resp.write_eof()
    except ConnectionError:
        pass
    return resp


async def endless_chunked(request: web.Request) -> web.StreamResponse:
    """A body that never ends: only the size cap (not the deadline) can stop it in time."""
    resp = web.StreamResponse(headers={"Content-Type": "text/html"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    block = b"e" * 65536
    try:
        while not gone(request):
            await resp.write(block)
    except ConnectionError:
        pass
    return resp


async def redirect_to_self(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": str(request.url)})


GZIP_BOMB = gzip.compress(b"\0" * MB10, compresslevel=9)
assert len(GZIP_BOMB) < 20_000  # small on the wire, 10 MB decoded


# ---------------------------------------------------------------- composer side

@dataclass
class Timed:
    status: int
    elapsed: float  # request sent → last body byte
    body: str
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)


async def timed(composer, path: str) -> Timed:
    started = time.monotonic()
    async with composer.session.get(composer.url + path, allow_redirects=False, timeout=CLIENT_TIMEOUT) as resp:
        data = await resp.read()
        return Timed(resp.status, time.monotonic() - started, data.decode("utf-8"), CIMultiDict(resp.headers))


_SAMPLE = re.compile(r'^(\w+)\{(.*)\} (\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


async def counted(composer, metric: str) -> dict[tuple[str, str], float]:
    """{(fragment, reason): value} of a per-fragment counter (reason "" when it has none);
    the label sets declared at 0 (SPEC §9) are left out: only what happened counts here."""
    out: dict[tuple[str, str], float] = {}
    for line in (await composer.metrics()).splitlines():
        m = _SAMPLE.match(line)
        if m and m[1] == metric and float(m[3]):
            labels = dict(_LABEL.findall(m[2]))
            out[(labels["fragment"], labels.get("reason", ""))] = float(m[3])
    return out


async def failures(composer) -> dict[tuple[str, str], float]:
    return await counted(composer, "composer_fragment_failures_total")


HEALTHY = "<p>HEALTHY</p>"
INLINE = "<p>INLINE FALLBACK</p>"


async def start_page(fragments, start_composer, faulty_url: str, *, extra: str = "", settings: str = ""):
    """The page under test: [faulty fragment with inline fallback][healthy fragment]; /next: healthy only."""
    svc = await fragments({"/healthy": html(HEALTHY)})
    composer = await start_composer({
        "page.html": (f'<body>[<fragment id="faulty" src="{faulty_url}" timeout="{TIMEOUT_MS}" {extra}>'
                      f'{INLINE}</fragment>][<fragment id="healthy" src="{svc.url("/healthy")}"></fragment>]</body>'),
        "next.html": f'<body><fragment id="next" src="{svc.url("/healthy")}"></fragment></body>',
    }, routes=ROUTES, settings=settings)
    return composer, svc


async def still_serving(composer) -> None:
    t = await timed(composer, "/next")
    assert (t.status, t.body) == (200, f"<body>{HEALTHY}</body>")
    async with composer.session.get(composer.admin_url + "/healthz", timeout=CLIENT_TIMEOUT) as resp:
        assert resp.status == 200


async def check_faulty_page(composer, reason: str) -> Timed:
    t = await timed(composer, "/page")
    assert t.status == 200
    assert t.body == f"<body>[{INLINE}][{HEALTHY}]</body>", t.body
    assert t.elapsed < BUDGET, f"page took {t.elapsed * 1000:.0f} ms, budget {BUDGET * 1000:.0f} ms"
    assert await failures(composer) == {("faulty", reason): 1.0}
    assert (await counted(composer, "composer_fragment_fallbacks_total")).get(("faulty", "")) == 1.0
    await still_serving(composer)
    return t


# ---------------------------------------------------------------- one fault per case

# name → (where the fault lives: "aiohttp" handler or "raw" handler, the handler, reason)
AIOHTTP_FAULTS = {
    "hang_before_headers": (hang_before_headers, "timeout"),
    "hang_mid_body": (hang_mid_body, "timeout"),
    "trickle_1_byte_per_100ms": (trickle, "timeout"),
    "invalid_gzip": (compressed(b"this is not gzip, not even close " * 10), "invalid"),
    # a valid gzip header, then a deflate block of the reserved type 11: zlib refuses it
    "corrupt_deflate_after_gzip_header": (compressed(gzip.compress(b"<p>ok</p>")[:10] + b"\x07" + b"\0" * 40),
                                          "invalid"),
    "body_10mb_content_length": (raw_bytes(b"x" * MB10), "too_large"),
    "body_10mb_chunked_no_length": (big_chunked, "too_large"),
    "gzip_bomb": (compressed(GZIP_BOMB), "too_large"),
    "endless_chunked_body": (endless_chunked, "too_large"),  # not timeout: cut at 5 MB, not at the deadline
    "not_utf8_no_charset": (raw_bytes("<p>café</p>".encode("latin-1")), "invalid"),
    "not_utf8_declared_utf8": (raw_bytes(b"<p>\xff\xfe</p>", "text/html; charset=utf-8"), "invalid"),
    "unknown_charset": (raw_bytes(b"<p>x</p>", "text/html; charset=x-no-such-charset"), "invalid"),
    "utf7_charset_refused": (raw_bytes(b"+ADw-script+AD4-", "text/html; charset=utf-7"), "invalid"),
    "redirect_loop": (redirect_to_self, "status"),
    "status_503": (html("<p>error page</p>", status=503), "status"),
}

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n"
RAW_FAULTS = {
    "close_before_headers": (respond(b"", then="close"), "connection"),
    "reset_before_headers": (respond(b"", then="reset"), "connection"),
    "close_mid_headers": (respond(b"HTTP/1.1 200 OK\r\nContent-Ty", then="close"), "connection"),
    "reset_mid_body_content_length": (
        respond(HEAD + b"Content-Length: 1000\r\n\r\n<p>part", then="reset"), "connection"),
    "reset_mid_body_chunked": (
        respond(HEAD + b"Transfer-Encoding: chunked\r\n\r\n7\r\n<p>part\r\n", then="reset"), "connection"),
    "content_length_more_than_sent_then_close": (
        respond(HEAD + b"Content-Length: 1000\r\n\r\n<p>short</p>", then="close"), "connection"),
    "chunked_unfinished_then_close": (
        respond(HEAD + b"Transfer-Encoding: chunked\r\n\r\n7\r\n<p>part\r\n", then="close"), "connection"),
    "content_length_more_than_sent_then_hang": (
        respond(HEAD + b"Content-Length: 1000\r\n\r\n<p>short</p>", then="hang"), "timeout"),
    # decided on the header: not timeout, which waiting for the body would give
    "content_length_10mb_body_never_sent": (respond(HEAD + b"Content-Length: %d\r\n\r\n" % MB10), "too_large"),
    "garbage_status_line": (respond(b"HTTP/1.1 abc Nonsense\r\n\r\n"), "invalid"),
    "not_http_at_all": (respond(b"SSH-2.0-OpenSSH_9.6\r\n"), "invalid"),
    "header_without_colon": (respond(b"HTTP/1.1 200 OK\r\nBad Header Line\r\n\r\n"), "invalid"),
    "bad_chunk_size": (respond(HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"), "invalid"),
    "content_length_and_chunked": (
        respond(HEAD + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"), "invalid"),
}


@pytest.mark.parametrize("case", list(AIOHTTP_FAULTS))
async def test_aiohttp_fault(fragments, start_composer, case):
    handler, reason = AIOHTTP_FAULTS[case]
    bad = await fragments({"/frag": handler})
    composer, _ = await start_page(fragments, start_composer, bad.url("/frag"))
    await check_faulty_page(composer, reason)


@pytest.mark.parametrize("case", list(RAW_FAULTS))
async def test_raw_fault(fragments, start_composer, raw_origin, case):
    handler, reason = RAW_FAULTS[case]
    origin = await raw_origin(handler)
    composer, _ = await start_page(fragments, start_composer, origin + "/frag")
    await check_faulty_page(composer, reason)


# ---------------------------------------------------------------- the same faults on a pooled connection

WARM = "<p>warm</p>"
WARM_RAW = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 11\r\n\r\n" + WARM.encode()


def after_a_good_answer(handler):
    """An aiohttp handler: its first request answered well (the connection goes back to
    composer's pool), every later one by `handler`."""
    hits = []

    async def first_good(request: web.Request) -> web.StreamResponse:
        hits.append(request)
        if len(hits) == 1:
            return web.Response(text=WARM, content_type="text/html")
        return await handler(request)

    return first_good


def pooled(handler: RawHandler) -> RawHandler:
    """A raw handler: each connection's first request answered well, with keep-alive, its
    second by `handler`."""

    async def first_good(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(WARM_RAW)
        await writer.drain()
        await handler(reader, writer)

    return first_good


async def warm_page(composer) -> None:
    """The first page: the faulty fragment's connection answers well and is pooled, so the
    next page's fetch goes out on it (as a `pipeline.Flight`, with no task of its own)."""
    t = await timed(composer, "/page")
    assert (t.status, t.body) == (200, f"<body>[{WARM}][{HEALTHY}]</body>")


@pytest.mark.parametrize("case", list(AIOHTTP_FAULTS))
async def test_aiohttp_fault_on_a_pooled_connection(fragments, start_composer, case):
    handler, reason = AIOHTTP_FAULTS[case]
    bad = await fragments({"/frag": after_a_good_answer(handler)})
    composer, _ = await start_page(fragments, start_composer, bad.url("/frag"))
    await warm_page(composer)
    await check_faulty_page(composer, reason)


# Closed or reset before any byte of the answer, on a reused connection, the request goes
# again on a new one (the server had closed the idle connection): answered well there.
STALE = {"close_before_headers", "reset_before_headers"}


@pytest.mark.parametrize("case", [c for c in RAW_FAULTS if c not in STALE])
async def test_raw_fault_on_a_pooled_connection(fragments, start_composer, raw_origin, case):
    handler, reason = RAW_FAULTS[case]
    origin = await raw_origin(pooled(handler))
    composer, _ = await start_page(fragments, start_composer, origin + "/frag")
    await warm_page(composer)
    await check_faulty_page(composer, reason)


@pytest.mark.parametrize("case", sorted(STALE))
async def test_a_pooled_connection_closed_under_the_request_is_tried_again_on_a_new_one(
        fragments, start_composer, raw_origin, case):
    connections = []

    async def counting(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)
        await pooled(RAW_FAULTS[case][0])(reader, writer)

    origin = await raw_origin(counting)
    composer, _ = await start_page(fragments, start_composer, origin + "/frag")
    await warm_page(composer)
    await warm_page(composer)  # the same answer, from a second connection
    assert len(connections) == 2
    assert await failures(composer) == {}


async def test_a_pooled_fragment_is_fetched_without_a_task_of_its_own(fragments, start_composer):
    """The point of `pipeline.Flight`: a fragment whose request can go out on a pooled
    connection has no task (a task is named by its fragment's id)."""
    names: list[set[str]] = []

    async def looking(_: web.Request) -> web.Response:
        names.append({task.get_name() for task in asyncio.all_tasks()})
        return web.Response(text=WARM, content_type="text/html")

    svc = await fragments({"/look": looking})
    composer, _ = await start_page(fragments, start_composer, svc.url("/look"))
    for _ in range(2):
        t = await timed(composer, "/page")
        assert (t.status, t.body) == (200, f"<body>[{WARM}][{HEALTHY}]</body>")
    assert "faulty" in names[0] and "faulty" not in names[1]


async def test_a_page_that_goes_away_drops_its_pooled_fetches(fragments, start_composer):
    """The client hangs up while a pooled fetch is out: its connection is closed (the service
    sees it go), and the next page is served on a new one."""
    seen: list[web.Request] = []

    async def hanging(request: web.Request) -> web.StreamResponse:
        seen.append(request)
        if len(seen) == 2:
            await until_gone(request)
        return web.Response(text=WARM, content_type="text/html")

    svc = await fragments({"/hang": hanging})
    composer, _ = await start_page(fragments, start_composer, svc.url("/hang"))
    await warm_page(composer)
    resp = await composer.session.get(composer.url + "/page", timeout=CLIENT_TIMEOUT)
    assert (await resp.content.readany()).startswith(b"<body>[")  # the page is under way
    while len(seen) < 2:
        await asyncio.sleep(0.01)
    resp.close()  # the client leaves
    left = time.monotonic()
    while not gone(seen[1]) and time.monotonic() < left + 2:
        await asyncio.sleep(0.01)
    # Dropped as the page went (well before the fragment's own deadline, 400 ms from its start).
    assert gone(seen[1]) and time.monotonic() - left < 0.25
    await warm_page(composer)
    assert await failures(composer) == {}  # no timeout: nobody was waiting for it any more


def three(svc, *, timeout: int = 2000) -> dict[str, str]:
    return {"page.html": "<body>" + "".join(
        f'[<fragment id="f{n}" src="{svc.url(f"/f/{n}")}" timeout="{timeout}">{INLINE}</fragment>]'
        for n in range(3)) + "</body>"}


ONE_CONNECTION = "settings:\n  max_connections_per_origin: 1\n"


async def test_fetches_waiting_for_a_full_pool_go_without_tasks_in_turn(fragments, start_composer):
    """One connection per origin, three fragments: on the second page the first goes out on the
    pooled connection and the other two wait their turn for it, none with a task of its own."""
    names: list[set[str]] = []
    ports: set[int] = set()

    async def frag(request: web.Request) -> web.Response:
        names.append({task.get_name() for task in asyncio.all_tasks()})
        ports.add(request.transport.get_extra_info("peername")[1])
        return web.Response(text=f"<p>{request.match_info['n']}</p>", content_type="text/html")

    svc = await fragments({"/f/{n}": frag})
    composer = await start_composer(three(svc), settings=ONE_CONNECTION)
    for _ in range(2):
        t = await timed(composer, "/page")
        assert (t.status, t.body) == (200, "<body>[<p>0</p>][<p>1</p>][<p>2</p>]</body>")
    assert len(ports) == 1
    assert all(f"f{n}" not in seen for seen in names[3:] for n in range(3)), names[3:]
    assert await failures(composer) == {}


async def test_fetches_that_waited_their_turn_leave_nothing_for_the_collector(fragments, start_composer):
    """A page's `Flight`s are freed with the page, by reference counting: the collector runs
    rarely in a serving composer (server.tune_gc), so a cycle per fetch held a page100 at 64
    connections' bodies by the hundred MB."""
    async def frag(request: web.Request) -> web.Response:
        return web.Response(text=f"<p>{request.match_info['n']}</p>", content_type="text/html")

    svc = await fragments({"/f/{n}": frag})
    composer = await start_composer(three(svc), settings=ONE_CONNECTION)
    await timed(composer, "/page")
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            t = await timed(composer, "/page")
            assert (t.status, t.body) == (200, "<body>[<p>0</p>][<p>1</p>][<p>2</p>]</body>")
        left = [o for o in gc.get_objects() if isinstance(o, Flight)]
    finally:
        gc.enable()
    assert left == []


async def test_a_waiting_fetch_handed_a_free_slot_opens_a_connection_in_it(fragments, start_composer):
    """The pooled connection closes after the second page's first answer (`Connection: close`):
    its slot goes to the next fetch waiting its turn, which opens a connection there."""
    ports: list[int] = []

    async def frag(request: web.Request) -> web.Response:
        ports.append(request.transport.get_extra_info("peername")[1])
        close = {"Connection": "close"} if len(ports) == 4 else None
        return web.Response(text=f"<p>{request.match_info['n']}</p>", content_type="text/html", headers=close)

    svc = await fragments({"/f/{n}": frag})
    composer = await start_composer(three(svc), settings=ONE_CONNECTION)
    for _ in range(2):
        t = await timed(composer, "/page")
        assert (t.status, t.body) == (200, "<body>[<p>0</p>][<p>1</p>][<p>2</p>]</body>")
    assert len(set(ports[:4])) == 1 and ports[4] == ports[5] != ports[3]
    assert await failures(composer) == {}


async def test_a_fetch_whose_deadline_passes_while_it_waits_its_turn_times_out(fragments, start_composer):
    hits: list[web.Request] = []

    async def frag(request: web.Request) -> web.StreamResponse:
        hits.append(request)
        if len(hits) == 4:  # the second page's first fragment holds the one connection
            await until_gone(request, 1.0)
        return web.Response(text=f"<p>{request.match_info['n']}</p>", content_type="text/html")

    svc = await fragments({"/f/{n}": frag})
    composer = await start_composer(three(svc, timeout=300), settings=ONE_CONNECTION)
    await timed(composer, "/page")
    t = await timed(composer, "/page")
    assert (t.status, t.body) == (200, f"<body>[{INLINE}][{INLINE}][{INLINE}]</body>")
    assert t.elapsed < 0.3 + 0.2
    assert await failures(composer) == {(f"f{n}", "timeout"): 1.0 for n in range(3)}
    assert len(hits) == 4  # the two waiting never went out
    t = await timed(composer, "/page")  # and the pool is whole again
    assert (t.status, t.body) == (200, "<body>[<p>0</p>][<p>1</p>][<p>2</p>]</body>")


async def test_a_page_that_goes_away_gives_up_its_fetches_waiting_their_turn(fragments, start_composer):
    hits: list[web.Request] = []

    async def frag(request: web.Request) -> web.StreamResponse:
        hits.append(request)
        if len(hits) == 4:
            await until_gone(request)
        return web.Response(text=f"<p>{request.match_info['n']}</p>", content_type="text/html")

    svc = await fragments({"/f/{n}": frag})
    composer = await start_composer(three(svc), settings=ONE_CONNECTION)
    await timed(composer, "/page")
    resp = await composer.session.get(composer.url + "/page", timeout=CLIENT_TIMEOUT)
    assert (await resp.content.readany()).startswith(b"<body>[")
    while len(hits) < 4:
        await asyncio.sleep(0.01)
    resp.close()
    left = time.monotonic()
    while not gone(hits[3]) and time.monotonic() < left + 2:
        await asyncio.sleep(0.01)
    assert gone(hits[3]) and time.monotonic() - left < 1.0  # (its deadline: 2 s)
    t = await timed(composer, "/page")  # the given-up fetches are passed over: this page's go out
    assert (t.status, t.body) == (200, "<body>[<p>0</p>][<p>1</p>][<p>2</p>]</body>")
    assert len(hits) == 7 and await failures(composer) == {}


async def test_connection_refused(fragments, start_composer):
    composer, _ = await start_page(fragments, start_composer, refused_origin() + "/frag")
    await check_faulty_page(composer, "connection")


async def test_dns_name_that_does_not_resolve(fragments, start_composer):
    host = "composer-fault.invalid"  # RFC 6761: never resolves (no internet needed to fail)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(TIMEOUT_MS / 1000):
            await loop.getaddrinfo(host, 80, type=socket.SOCK_STREAM)
        pytest.skip(f"this machine's resolver answers for {host}")
    except socket.gaierror:
        reason = "connection"  # the usual: NXDOMAIN (or no resolver) comes back at once
    except TimeoutError:
        reason = "timeout"  # a resolver that hangs: the fragment's deadline still holds
    composer, _ = await start_page(fragments, start_composer, f"http://{host}/frag")
    await check_faulty_page(composer, reason)


# ---------------------------------------------------------------- not failures

async def test_invalid_link_header_is_ignored_not_a_failure(fragments, start_composer):
    links = [
        "garbage",
        '<https://cdn.example/a.css>; rel="stylesheet"',
        "<<<>>>; rel=stylesheet",
        '<https://cdn.example/broken.css; rel="stylesheet',
        "<javascript:alert(1)>; rel=fragment-script",
        "<http://[::1/x.js>; rel=fragment-script",
        '</static/a.js>; rel="fragment-script"',
    ]

    async def handler(_: web.Request) -> web.Response:
        headers = CIMultiDict([("Content-Type", "text/html")] + [("Link", line) for line in links])
        return web.Response(text="<p>CONTENT</p>", headers=headers)

    bad = await fragments({"/frag": handler})
    composer, _ = await start_page(fragments, start_composer, bad.url("/frag"))
    t = await timed(composer, "/page")
    assert t.status == 200
    assert t.body == ('<body>[<link rel="stylesheet" href="https://cdn.example/a.css"><p>CONTENT</p>'
                      f'<script src="/static/a.js" defer></script>][{HEALTHY}]</body>')
    assert await failures(composer) == {}
    await still_serving(composer)


async def test_raw_link_header_with_non_ascii_bytes_is_ignored(fragments, start_composer, raw_origin):
    origin = await raw_origin(respond(
        HEAD + b"Link: <https://cdn.example/\xff\xfe.css>; rel=stylesheet\r\n"
               b"Link: \xc3\x28 garbage \x80\r\n"
               b'Link: <https://cdn.example/ok.css>; rel="stylesheet"\r\n'
               b"Content-Length: 14\r\n\r\n<p>CONTENT</p>"))
    composer, _ = await start_page(fragments, start_composer, origin + "/frag")
    t = await timed(composer, "/page")
    assert t.status == 200
    assert '<link rel="stylesheet" href="https://cdn.example/ok.css"><p>CONTENT</p>' in t.body
    assert HEALTHY in t.body
    assert await failures(composer) == {}
    await still_serving(composer)


@pytest.mark.parametrize(("content_type", "body", "shown"), [
    ("text/html; charset=iso-8859-1", "<p>café</p>".encode("latin-1"), "<p>café</p>"),
    # WHATWG: ISO-8859-1 and US-ASCII labels are read as windows-1252, as a browser would
    ("text/html; charset=ISO-8859-1", b"<p>\x80 \x93q\x94</p>", "<p>€ “q”</p>"),
    ("text/html; charset=us-ascii", b"<p>\x80</p>", "<p>€</p>"),
    ("text/html; charset=windows-1252", "<p>„Grüße“ – €</p>".encode("cp1252"), "<p>„Grüße“ – €</p>"),
    ('text/html; charset="Shift_JIS"', "<p>日本語のテキスト</p>".encode("shift_jis"), "<p>日本語のテキスト</p>"),
    ("text/html; charset=koi8-r", "<p>Привет</p>".encode("koi8-r"), "<p>Привет</p>"),
    ("text/html; charset=utf-16", "<p>ünï</p>".encode("utf-16"), "<p>ünï</p>"),
    ("text/html; charset=UTF-8", "<p>ünï €</p>".encode(), "<p>ünï €</p>"),
    ("text/html", "<p>ünï €</p>".encode(), "<p>ünï €</p>"),
], ids=["iso-8859-1", "iso-8859-1-is-windows-1252", "us-ascii-is-windows-1252", "windows-1252", "shift_jis",
        "koi8-r", "utf-16", "utf-8-declared", "utf-8-undeclared"])
async def test_declared_charset_is_transcoded_to_utf8(fragments, start_composer, content_type, body, shown):
    ok = await fragments({"/frag": raw_bytes(body, content_type)})
    composer, _ = await start_page(fragments, start_composer, ok.url("/frag"))
    t = await timed(composer, "/page")
    assert t.status == 200
    assert t.headers["content-type"] == "text/html; charset=utf-8"
    assert t.body == f"<body>[{shown}][{HEALTHY}]</body>"
    assert await failures(composer) == {}


async def test_gzip_with_declared_charset_is_decoded_then_transcoded(fragments, start_composer):
    ok = await fragments({"/frag": compressed(gzip.compress("<p>Größe</p>".encode("latin-1")),
                                              content_type="text/html; charset=latin1")})
    composer, _ = await start_page(fragments, start_composer, ok.url("/frag"))
    t = await timed(composer, "/page")
    assert t.body == f"<body>[<p>Größe</p>][{HEALTHY}]</body>"
    assert await failures(composer) == {}


# ---------------------------------------------------------------- the pooled connection

EVIL = b"<p>EVIL</p>"
SMUGGLED = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n%s" % (len(EVIL), EVIL)


@pytest.mark.parametrize(("extra", "late", "lie_shown", "lie_reason"), [
    # The extra bytes arrive with the response: aiohttp's parser sees them at once.
    (b"EXTRA-JUNK-NOT-HTTP", False, INLINE, "invalid"),
    (SMUGGLED, False, "<p>LIE</p>", None),
    # The extra bytes arrive later, on the idle pooled connection.
    (b"EXTRA-JUNK-NOT-HTTP", True, "<p>LIE</p>", None),
    (SMUGGLED, True, "<p>LIE</p>", None),  # queued by aiohttp as the next answer: aio-libs/aiohttp#13656
], ids=["junk-at-once", "response-at-once", "junk-late", "response-late"])
async def test_content_length_less_than_sent_never_poisons_the_next_fetch(
        start_composer, raw_origin, extra, late, lie_shown, lie_reason):
    connections: list[int] = []
    requests: list[bytes] = []

    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1]
            requests.append(path)
            if path == b"/lie":  # declares 10 bytes, sends 10 + extra
                writer.write(HEAD + b"Content-Length: 10\r\n\r\n<p>LIE</p>" + (b"" if late else extra))
                await writer.drain()
                if late:
                    await asyncio.sleep(0.03)  # composer has the whole response and pooled the connection
                    writer.write(extra)
                    await writer.drain()
            else:
                body = b"<p>" + path[1:].upper() + b"</p>"
                writer.write(HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()

    origin = await raw_origin(keep_alive)
    composer = await start_composer({"page.html": (
        f'<body>[<fragment id="lie" src="{origin}/lie" timeout="{TIMEOUT_MS}">{INLINE}</fragment>]'
        f'[<fragment id="a" src="{origin}/a" timeout="{TIMEOUT_MS}">A-FALLBACK</fragment>]'
        f'[<fragment id="b" src="{origin}/b" timeout="{TIMEOUT_MS}">B-FALLBACK</fragment>]</body>'),
        "next.html": "<body>next</body>"}, routes=ROUTES)
    for _ in range(3):
        t = await timed(composer, "/page")
        assert t.status == 200
        assert t.body == f"<body>[{lie_shown}][<p>A</p>][<p>B</p>]</body>", t.body
        assert t.elapsed < BUDGET
        await asyncio.sleep(0.1)  # late bytes have arrived on the pooled connection by now
    assert await failures(composer) == ({("lie", lie_reason): 3.0} if lie_reason else {})
    assert len(requests) == 9
    assert len(connections) < len(requests)  # connections were pooled and reused (what is at stake)


# ---------------------------------------------------------------- the primary

PRIMARY_FAULTS = {
    "hang_before_headers": ("aiohttp", hang_before_headers, "timeout"),
    "reset_mid_body": ("raw", respond(HEAD + b"Content-Length: 1000\r\n\r\n<p>part", then="reset"), "connection"),
    "content_length_more_than_sent_then_close": (
        "raw", respond(HEAD + b"Content-Length: 1000\r\n\r\n<p>short</p>", then="close"), "connection"),
    "invalid_gzip": ("aiohttp", compressed(b"junk junk junk junk junk"), "invalid"),
    "gzip_bomb": ("aiohttp", compressed(GZIP_BOMB), "too_large"),
    "not_utf8": ("aiohttp", raw_bytes(b"<main>\xff</main>"), "invalid"),
    "garbage_status_line": ("raw", respond(b"HTTP/1.1 abc Nonsense\r\n\r\n"), "invalid"),
}


async def primary_page(start_composer, fragments, url: str, with_fallback_src: bool = False):
    """[primary `main` at `url`, inline fallback (never shown), maybe a `fallback-src`][healthy]."""
    svc = await fragments({"/healthy": html(HEALTHY), "/fallback": html("<main>FALLBACK MAIN</main>")})
    fallback = f'fallback-src="{svc.url("/fallback")}"' if with_fallback_src else ""
    return await start_composer({
        "page.html": (f'<body>LITERAL<fragment id="main" src="{url}" primary timeout="{TIMEOUT_MS}" {fallback}>'
                      f'{INLINE}</fragment>[<fragment id="healthy" src="{svc.url("/healthy")}"></fragment>]</body>'),
        "next.html": f'<body><fragment id="next" src="{svc.url("/healthy")}"></fragment></body>',
    }, routes=ROUTES)


@pytest.mark.parametrize("with_fallback_src", [False, True], ids=["bare-500", "fallback-src"])
@pytest.mark.parametrize("case", list(PRIMARY_FAULTS))
async def test_primary_fault(fragments, start_composer, raw_origin, case, with_fallback_src):
    kind, handler, reason = PRIMARY_FAULTS[case]
    if kind == "raw":
        url = await raw_origin(handler) + "/main"
    else:
        url = (await fragments({"/main": handler})).url("/main")
    composer = await primary_page(start_composer, fragments, url, with_fallback_src)
    t = await timed(composer, "/page")
    assert t.elapsed < BUDGET, f"page took {t.elapsed * 1000:.0f} ms, budget {BUDGET * 1000:.0f} ms"
    if with_fallback_src:
        assert t.status == 200
        assert t.body == f"<body>LITERAL<main>FALLBACK MAIN</main>[{HEALTHY}]</body>"
    else:
        assert t.status == 500
        assert t.body.encode() == error_page(500)
    assert await failures(composer) == {("main", reason): 1.0}
    await still_serving(composer)


@pytest.mark.parametrize("with_fallback_src", [False, True], ids=["bare-500", "fallback-src"])
@pytest.mark.parametrize("case", list(PRIMARY_FAULTS))
async def test_primary_fault_on_a_pooled_connection(fragments, start_composer, raw_origin, case, with_fallback_src):
    """The primary's fetch on a pooled connection (a `Flight`, no task): its faults decide the
    page as they do on a new connection; its `fallback-src` is fetched then."""
    kind, handler, reason = PRIMARY_FAULTS[case]
    if kind == "raw":
        url = await raw_origin(pooled(handler)) + "/main"
    else:
        url = (await fragments({"/main": after_a_good_answer(handler)})).url("/main")
    composer = await primary_page(start_composer, fragments, url, with_fallback_src)
    t = await timed(composer, "/page")
    assert (t.status, t.body) == (200, f"<body>LITERAL{WARM}[{HEALTHY}]</body>")
    t = await timed(composer, "/page")
    assert t.elapsed < BUDGET, f"page took {t.elapsed * 1000:.0f} ms, budget {BUDGET * 1000:.0f} ms"
    if with_fallback_src:
        assert (t.status, t.body) == (200, f"<body>LITERAL<main>FALLBACK MAIN</main>[{HEALTHY}]</body>")
    else:
        assert (t.status, t.body.encode()) == (500, error_page(500))
    assert await failures(composer) == {("main", reason): 1.0}
    await still_serving(composer)


CSS = "https://cdn.example/a.css"
PRIMARY_ANSWERS = {
    "ok": (200, {"Set-Cookie": "sid=1; Path=/", "Link": f'<{CSS}>; rel="stylesheet"'}),
    "redirect": (302, {"Location": "/elsewhere", "Set-Cookie": "moved=1"}),
    "not_found": (404, {}),
    "no_content": (204, {}),
}


@pytest.mark.parametrize("case", list(PRIMARY_ANSWERS))
async def test_a_pooled_primary_decides_the_page_as_one_on_a_new_connection(fragments, start_composer, case):
    """The first page's primary goes out on a new connection (in a task), the second's on the
    pooled one (a `Flight`): status, headers and body are the same."""
    status, headers = PRIMARY_ANSWERS[case]
    names: list[set[str]] = []

    async def main(_: web.Request) -> web.Response:
        names.append({task.get_name() for task in asyncio.all_tasks()})
        body = None if status == 204 else "<main>M</main>"
        return web.Response(status=status, body=body, content_type="text/html", headers=headers)

    composer = await primary_page(start_composer, fragments, (await fragments({"/main": main})).url("/main"))
    first, second = await timed(composer, "/page"), await timed(composer, "/page")
    assert "main" in names[0] and "main" not in names[1]  # the second primary had no task
    assert (second.status, second.body) == (first.status, first.body)
    for name in ("set-cookie", "location", "link", "content-type"):
        assert second.headers.getall(name, []) == first.headers.getall(name, []), name
    assert first.status == status
    if status == 200:
        assert first.body == f'<body>LITERAL<link rel="stylesheet" href="{CSS}"><main>M</main>[{HEALTHY}]</body>'
        assert "sid=1" in first.headers["set-cookie"] and CSS in first.headers["link"]
    assert await failures(composer) == {}


def async_page(faulty_url: str, healthy_url: str, fallback_url: str) -> str:
    return (f'<body>[<fragment id="late" src="{faulty_url}" async timeout="{TIMEOUT_MS}" fallback-src="{fallback_url}">'
            f'{INLINE}</fragment>][<fragment id="healthy" src="{healthy_url}"></fragment>]</body>')


@pytest.mark.parametrize("fault", ["none", "status_500", "hang_before_headers"])
async def test_a_pooled_async_fragment_with_a_fallback_src_shows_what_one_on_a_new_connection_does(
        fragments, start_composer, fault):
    """An async fragment with a `fallback-src`, its fetch on a pooled connection (a `Flight`):
    the page is the one its first fetch, on a new connection (in a task), gave; failed, its
    `fallback-src` is shown, its failure and fallback counted once."""
    names: list[set[str]] = []
    faults = {"status_500": html("down", status=500), "hang_before_headers": hang_before_headers}

    async def late(request: web.Request) -> web.StreamResponse:
        names.append({task.get_name() for task in asyncio.all_tasks()})
        if len(names) > 1 and fault in faults:
            return await faults[fault](request)
        return web.Response(text="<p>LATE</p>", content_type="text/html")

    svc = await fragments({"/late": late, "/healthy": html(HEALTHY), "/fallback": html("<p>FALLBACK</p>")})
    composer = await start_composer({
        "page.html": async_page(svc.url("/late"), svc.url("/healthy"), svc.url("/fallback")),
        "next.html": f'<body><fragment id="next" src="{svc.url("/healthy")}"></fragment></body>'}, routes=ROUTES)
    first = await timed(composer, "/page")
    assert "<p>LATE</p>" in first.body and first.status == 200
    second = await timed(composer, "/page")
    assert "late" in names[0] and "late" not in names[1]  # the second fetch had no task
    assert second.status == 200 and second.elapsed < BUDGET
    if fault == "none":
        assert second.body == first.body
        assert await failures(composer) == {}
    else:
        assert second.body == first.body.replace("<p>LATE</p>", "<p>FALLBACK</p>")
        reason = "timeout" if fault == "hang_before_headers" else "status"
        assert await failures(composer) == {("late", reason): 1.0}
        assert await counted(composer, "composer_fragment_fallbacks_total") == {("late", ""): 1.0}
    await still_serving(composer)
