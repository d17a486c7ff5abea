"""SPEC §9 on the page listener: what one client may hold, and what it is told.

Each test reproduces an attack or an operations finding of issue 13 with raw sockets on
127.0.0.1 and small limits, so the slow ones stay short.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from conftest import Composer, FragmentServer, Serve, captured, eventually, html, write_config

Start = Callable[..., Awaitable[Composer]]


async def _connect(composer: Composer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", composer.server.port)


async def _closed(reader: asyncio.StreamReader, within: float) -> bytes:
    """Everything the server sends until it closes the connection (fails after `within` s)."""
    try:
        return await asyncio.wait_for(reader.read(), within)
    except ConnectionResetError:  # closed with our last bytes unread: a reset, as good as a close
        return b""


async def _exchange(composer: Composer, raw: bytes, within: float = 5.0) -> bytes:
    reader, writer = await _connect(composer)
    writer.write(raw)
    await writer.drain()
    try:
        return await _closed(reader, within)
    finally:
        writer.close()


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


PAGE = {"page.html": "<html><body><p>hello</p></body></html>"}


async def test_a_head_not_complete_in_time_closes_its_connection_and_others_are_served(start_composer: Start) -> None:
    composer = await start_composer(PAGE, settings="settings: {client_header_timeout_ms: 300}\n")
    slow = [await _connect(composer) for _ in range(50)]
    for _, writer in slow:  # slowloris: a head that never ends
        writer.write(b"GET /page HTTP/1.1\r\nHost: x\r\nX-A: ")
        await writer.drain()
    resp, body = await composer.get("/page")  # the server still answers others at once
    assert resp.status == 200 and "hello" in body
    started = time.monotonic()
    for reader, writer in slow:
        writer.write(b"a")  # still trickling: that must not extend the deadline
        assert await _closed(reader, 3.0) == b""
        writer.close()
    assert time.monotonic() - started < 2.0


async def test_the_head_deadline_applies_to_each_request_of_a_keep_alive_connection(start_composer: Start) -> None:
    composer = await start_composer(PAGE, settings="settings: {client_header_timeout_ms: 300}\n")
    reader, writer = await _connect(composer)
    writer.write(b"GET /page HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert _status(head) == 200
    await reader.readuntil(b"0\r\n\r\n")
    await asyncio.sleep(0.5)  # idle (keep-alive) longer than the head deadline: still open
    writer.write(b"GET /page HTTP/1.1\r\n")  # then a head that stalls
    started = time.monotonic()
    assert await _closed(reader, 3.0) == b""
    assert 0.2 < time.monotonic() - started < 2.0
    writer.close()


async def test_a_slow_page_is_not_cut_by_the_head_deadline(start_composer: Start, fragments) -> None:
    service = await fragments({"/slow": html("<b>slow</b>", delay=0.6)})
    composer = await start_composer(
        {"page.html": f'<html><body><fragment src="{service.url("/slow")}"></fragment></body></html>'},
        settings="settings: {client_header_timeout_ms: 200}\n")
    resp, body = await composer.get("/page")
    assert resp.status == 200 and "<b>slow</b>" in body


async def test_an_idle_keep_alive_connection_is_closed_after_keepalive_timeout(start_composer: Start) -> None:
    composer = await start_composer(PAGE, settings="settings: {keepalive_timeout_ms: 300}\n")
    reader, writer = await _connect(composer)
    writer.write(b"GET /page HTTP/1.1\r\nHost: x\r\n\r\n")
    await reader.readuntil(b"0\r\n\r\n")
    started = time.monotonic()
    assert await _closed(reader, 3.0) == b""
    assert time.monotonic() - started < 2.0
    writer.close()


async def test_connections_beyond_max_connections_are_refused_with_503(start_composer: Start) -> None:
    composer = await start_composer(PAGE, settings="settings: {max_connections: 3}\n")
    held = [await _connect(composer) for _ in range(3)]
    await asyncio.sleep(0.1)
    refused = await _exchange(composer, b"GET /page HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _status(refused) == 503
    for _, writer in held:
        writer.close()
    await eventually(lambda: _page_ok(composer), "a freed slot is taken again", deadline=5)


async def _page_ok(composer: Composer) -> bool:
    raw = await _exchange(composer, b"GET /page HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    return _status(raw) == 200


async def test_serve_lifts_the_open_files_limit(tmp_path: Path) -> None:
    write_config(tmp_path, PAGE)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))  # the child inherits it
        async with Serve(tmp_path) as serve:
            limits = Path(f"/proc/{serve.pid}/limits").read_text()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
    assert line.split()[3] == str(hard)


async def test_a_burst_of_new_clients_waits_in_the_listen_queue_not_for_a_syn_retransmit(tmp_path: Path) -> None:
    # 400 clients connect while composer cannot accept (stopped): the kernel completes their
    # handshakes into the listen queue. With aiohttp's default backlog (128) it would drop the
    # others' SYNs, and each would try again only a second later. (The kernel caps a backlog
    # at net.core.somaxconn: 4,096 since Linux 5.4, 128 before.)
    clients = min(400, int(Path("/proc/sys/net/core/somaxconn").read_text()))
    write_config(tmp_path, PAGE)
    async with Serve(tmp_path) as serve:
        os.kill(serve.pid, signal.SIGSTOP)
        try:
            tasks = [asyncio.create_task(asyncio.open_connection("127.0.0.1", serve.port)) for _ in range(clients)]
            _, pending = await asyncio.wait(tasks, timeout=0.8)
        finally:
            os.kill(serve.pid, signal.SIGCONT)
        try:
            assert not pending, f"{len(pending)} of {clients} connections not made within 0.8 s"
            streams = [task.result() for task in tasks]
            for reader, writer in streams[::100]:  # and they are served once composer runs again
                writer.write(b"GET /page HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert _status(await asyncio.wait_for(reader.read(), 10)) == 200
        finally:
            for task in tasks:
                task.cancel()
            for made in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(made, tuple):
                    made[1].close()


# ---- slow readers: back-pressure and send_timeout_ms -------------------------------------

BIG = 2 * 1024 * 1024


@pytest.fixture
async def big_page(start_composer: Start, fragments) -> Callable[[str], Awaitable[tuple[Composer, FragmentServer]]]:
    async def start(settings: str = "") -> tuple[Composer, FragmentServer]:
        service = await fragments({f"/f{i}": html(chr(97 + i) * BIG) for i in range(4)})
        tags = "".join(f'<fragment src="{service.url(f"/f{i}")}"></fragment>' for i in range(4))
        composer = await start_composer({"page.html": f"<html><body>{tags}</body></html>"},
                                        settings="settings: {max_fragment_bytes: 4000000" + settings + "}\n")
        return composer, service
    return start


def _buffered(composer: Composer) -> list[int]:
    """Bytes waiting in each client connection's transport (composer's side)."""
    pages = composer.server._page_server
    assert pages is not None
    return [t.get_write_buffer_size() for t in pages._connections.values() if not t.is_closing()]


async def _stuck_client(composer: Composer) -> asyncio.StreamWriter:
    """A client that asks for the page and never reads (a tiny receive window, soon full)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", composer.server.port))
    _, writer = await asyncio.open_connection(sock=sock)
    writer.write(b"GET /page HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    return writer


async def test_a_client_that_does_not_read_holds_no_copy_of_its_page(big_page) -> None:
    composer, service = await big_page()
    stuck = [await _stuck_client(composer) for _ in range(5)]
    await eventually(lambda: _fetched(service, 20), "every page's fragments are in")
    await asyncio.sleep(0.3)  # time to write what composer would write
    buffered = _buffered(composer)
    assert len(buffered) == 5
    assert max(buffered) < 512 * 1024, buffered  # back-pressure: not the 8 MB page
    reader, writer = await _connect(composer)  # and a client that reads gets the whole page
    writer.write(b"GET /page HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    page = await asyncio.wait_for(reader.read(), 10)
    assert page.count(b"a") >= BIG and page.rstrip().endswith(b"0")
    for client in (writer, *stuck):
        client.close()


async def _fetched(service: FragmentServer, count: int) -> bool:
    return sum(service.hits.values()) >= count


async def test_a_client_that_reads_nothing_is_dropped_after_send_timeout(big_page) -> None:
    composer, _ = await big_page(", send_timeout_ms: 400")
    writer = await _stuck_client(composer)
    with captured("composer.listener") as records:
        await eventually(lambda: _no_connection(composer), "the stuck client is dropped", deadline=5)
    assert any("send_timeout_ms" in r.getMessage() for r in records.records)
    writer.close()


async def _no_connection(composer: Composer) -> bool:
    pages = composer.server._page_server
    assert pages is not None
    return pages.open == 0


# ---- what a request may carry ------------------------------------------------------------

@pytest.fixture
async def echo_backend(aiohttp_server) -> str:
    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"headers": [[k, v] for k, v in request.headers.items()],
                                  "path": request.path}, headers={"server": "Apache/2.4.1 (secret)"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    server = await aiohttp_server(app, host="127.0.0.1")
    return str(server.make_url("")).rstrip("/")


def _backend_routes(origin: str) -> str:
    return f"""
        routes:
          - name: b-host
            match: {{path_prefix: /api, host: b.example}}
            backend: {origin}
            filters:
              - set_request_header: {{x-route: b}}
          - name: api
            match: {{path_prefix: /api}}
            backend: {origin}
            filters:
              - remove_request_header: x-user
              - set_request_header: {{x-route: any}}
    """


async def test_header_names_with_underscores_never_reach_a_backend(start_composer: Start, echo_backend: str) -> None:
    composer = await start_composer({}, routes=_backend_routes(echo_backend))
    raw = await _exchange(composer, b"GET /api/x HTTP/1.1\r\nHost: a.example\r\nX_User: admin\r\n"
                                    b"X-User: admin\r\nConnection: close\r\n\r\n")
    assert _status(raw) == 200
    seen = json.loads(raw.partition(b"\r\n\r\n")[2])
    names = {k.lower() for k, _ in seen["headers"]}
    assert "x_user" not in names and "x-user" not in names


async def test_an_absolute_form_target_routes_by_its_authority(start_composer: Start, echo_backend: str) -> None:
    composer = await start_composer({}, routes=_backend_routes(echo_backend))
    raw = await _exchange(composer, b"GET http://b.example/api/x HTTP/1.1\r\nHost: a.example\r\n"
                                    b"Connection: close\r\n\r\n")
    assert _status(raw) == 200
    seen = {k.lower(): v for k, v in json.loads(raw.partition(b"\r\n\r\n")[2])["headers"]}
    assert seen["x-route"] == "b" and seen["x-forwarded-host"] == "b.example"
    raw = await _exchange(composer, b"GET http://a.example/api/x HTTP/1.1\r\nHost: b.example\r\n"
                                    b"Connection: close\r\n\r\n")
    assert {k.lower(): v for k, v in json.loads(raw.partition(b"\r\n\r\n")[2])["headers"]}["x-route"] == "any"


async def test_a_transfer_coding_other_than_chunked_gets_501(start_composer: Start, echo_backend: str) -> None:
    composer = await start_composer({}, routes=_backend_routes(echo_backend))
    for coding in (b"gzip, chunked", b"chunked, chunked", b"identity"):
        raw = await _exchange(composer, b"POST /api/x HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: " + coding
                                        + b"\r\nConnection: close\r\n\r\n0\r\n\r\n")
        assert _status(raw) in (400, 501), coding  # aiohttp's parser refuses some itself
    raw = await _exchange(composer, b"POST /api/x HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: gzip, chunked"
                                    b"\r\nConnection: close\r\n\r\n0\r\n\r\n")
    assert _status(raw) == 501


async def test_every_answer_says_server_composer_without_a_version(start_composer: Start, echo_backend: str) -> None:
    composer = await start_composer(PAGE, routes=_backend_routes(echo_backend) + """
          - name: page
            match: {path: /page}
            template: page.html
    """)
    for raw in (b"GET /page HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",  # a page
                b"GET /api/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",  # a backend's answer
                b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",  # a 404
                b"GET /page HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n"):  # a parse error
        head = (await _exchange(composer, raw)).partition(b"\r\n\r\n")[0].lower()
        servers = [line for line in head.split(b"\r\n") if line.startswith(b"server:")]
        assert servers == [b"server: composer"], (raw, head)


async def test_server_header_false_sends_none(start_composer: Start) -> None:
    composer = await start_composer(PAGE, settings="settings: {server_header: false}\n")
    head = (await _exchange(composer, b"GET /page HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")).lower()
    assert _status(head) == 200 and b"\r\nserver:" not in head.partition(b"\r\n\r\n")[0]


@pytest.mark.parametrize("raw", [
    b"GET /page HTTP/1.1\r\nHost: x\r\nSecret\x01Token: abc123\r\n\r\n",
    b"GE\x00T /secret-abc123 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /page HTTP/1.1\r\nHost: x\r\nContent-Length: abc123\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03abc123" + b"\x00" * 40,  # TLS to the plain port
])
async def test_a_malformed_request_gets_a_fixed_body_and_one_short_line(start_composer: Start, raw: bytes) -> None:
    composer = await start_composer(PAGE)
    with captured("composer") as records, captured("aiohttp") as aiohttp_records:
        answer = await _exchange(composer, raw)
        await asyncio.sleep(0.05)
    assert 400 <= _status(answer) < 500
    assert b"abc123" not in answer and b"Secret" not in answer
    lines = records.records + aiohttp_records.records
    assert len(lines) <= 1, [r.getMessage() for r in lines]
    for record in lines:
        assert record.exc_info is None
        assert "abc123" not in json.dumps(getattr(record, "fields", {}), default=str)


async def test_the_admin_listener_binds_loopback_whatever_the_page_host(tmp_path: Path) -> None:
    from composer import load
    from composer.server import ComposerServer

    server = ComposerServer(load(write_config(tmp_path, PAGE)), host="127.0.0.2", port=0, admin_port=0)
    await server.start()
    try:
        assert server._runners[1].addresses[0][0] == "127.0.0.1"
        assert server._runners[0].addresses[0][0] == "127.0.0.2"
        async with aiohttp.ClientSession() as session, session.get(server.admin_url + "/healthz") as resp:
            assert resp.status == 200
    finally:
        await server.stop()


def test_serve_takes_admin_host() -> None:
    from composer.cli import _parser

    assert _parser().parse_args(["serve"]).admin_host == "127.0.0.1"
    assert _parser().parse_args(["serve", "--admin-host", "::1"]).admin_host == "::1"


# ---- fragment connections: hanging fragments do not starve healthy ones -------------------

async def test_hanging_fragments_do_not_starve_a_healthy_one_on_the_same_origin(start_composer: Start,
                                                                                 fragments) -> None:
    async def hang(_: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response(text="never")

    service = await fragments({"/hang1": hang, "/hang2": hang, "/product": html("<p>product</p>")})
    composer = await start_composer(
        {"page.html": f"""<html><body>
            <fragment id="h1" src="{service.url('/hang1')}" timeout="2000"></fragment>
            <fragment id="h2" src="{service.url('/hang2')}" timeout="2000"></fragment>
            <fragment id="product" src="{service.url('/product')}" primary timeout="1000"></fragment>
            </body></html>"""},
        settings="settings: {max_connections_per_origin: 16}\n")
    pages = await asyncio.gather(*(composer.get("/page") for _ in range(20)))
    statuses = [resp.status for resp, _ in pages]
    assert statuses == [200] * 20, statuses
    assert all("<p>product</p>" in body for _, body in pages)
