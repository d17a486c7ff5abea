"""The fetch layer: `fetch`, `parse_assets`, `new_session` against real sockets on 127.0.0.1.

aiohttp fragment servers (the `fragments` fixture) cover well-behaved services; raw asyncio
servers cover what aiohttp refuses to do: lying Content-Length, resets mid-body, garbage
status lines, silence before the headers.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import struct
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable

import brotli
import pytest
from aiohttp import web
from conftest import RawHandler, html, refused_origin
from multidict import CIMultiDict
from yarl import URL

from composer.errors import Reason
from composer.fragments import Failed, Fetched, fetch, new_session
from composer.links import Asset, parse_assets


@pytest.fixture
async def session() -> AsyncIterator:
    s = new_session()
    yield s
    await s.close()


@pytest.fixture
async def raw_server(raw_origin) -> Callable[[RawHandler], Awaitable[URL]]:
    """Factory: conftest's raw TCP server running `handler` per connection → its /frag URL."""

    async def start(handler: RawHandler) -> URL:
        return URL(await raw_origin(handler) + "/frag")

    return start


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def headers() -> CIMultiDict[str]:
    return CIMultiDict({"x-request-id": "rid-1", "accept-encoding": "gzip, deflate, br"})


async def get(session, url, *, timeout: float = 1.0, max_bytes: int = 1 << 20,
              allow_redirect: bool = False):
    async with asyncio.timeout(timeout + 5):  # fetch must return on its own; never hang the suite
        return await fetch(session, URL(url) if isinstance(url, str) else url, headers(),
                           timeout=timeout, max_bytes=max_bytes, allow_redirect=allow_redirect)


# ---------------------------------------------------------------- success

async def test_ok_body_status_headers_and_assets(session, fragments):
    svc = await fragments({"/a": html("<p>A</p>", headers={
        "Link": '<https://cdn.example/a.css>; rel="stylesheet", </a.js>; rel="fragment-script"',
        "X-Custom": "yes"})})
    result = await get(session, svc.url("/a"))
    assert isinstance(result, Fetched)
    assert result.status == 200
    assert result.body == b"<p>A</p>"
    assert result.headers["x-custom"] == "yes"
    assert result.assets == (Asset("stylesheet", "https://cdn.example/a.css"), Asset("script", "/a.js"))


async def test_request_carries_given_headers(session, fragments):
    svc = await fragments({"/a": html("ok")})
    await get(session, svc.url("/a"))
    seen = svc.requests[-1].headers
    assert seen["x-request-id"] == "rid-1"
    assert seen["accept-encoding"] == "gzip, deflate, br"
    assert svc.requests[-1].method == "GET"


async def test_4xx_is_fetched_with_its_body(session, fragments):
    svc = await fragments({"/a": html("<p>gone</p>", status=404)})
    result = await get(session, svc.url("/a"))
    assert isinstance(result, Fetched)
    assert (result.status, result.body) == (404, b"<p>gone</p>")


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
async def test_compressed_bodies_are_decoded(session, fragments, encoding):
    text = b"<p>" + b"compressed fragment " * 200 + b"</p>"
    packed = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress}[encoding](text)

    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=packed, headers={"Content-Encoding": encoding, "Content-Type": "text/html"})

    svc = await fragments({"/a": handler})
    result = await get(session, svc.url("/a"))
    assert isinstance(result, Fetched)
    assert result.body == text


# ---------------------------------------------------------------- failures

async def test_connection_refused(session):
    started = time.monotonic()
    result = await get(session, URL(refused_origin() + "/frag"))
    assert isinstance(result, Failed)
    assert result.reason is Reason.CONNECTION
    assert time.monotonic() - started < 0.5


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_5xx_is_status_failure(session, fragments, status):
    svc = await fragments({"/a": html("<p>broken</p>", status=status)})
    result = await get(session, svc.url("/a"))
    assert isinstance(result, Failed)
    assert result.reason is Reason.STATUS
    assert result.status == status


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_3xx_without_redirects_is_status_failure_and_not_followed(session, fragments, status):
    async def redirect(_: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": "/target"})

    svc = await fragments({"/a": redirect, "/target": html("<p>target</p>")})
    result = await get(session, svc.url("/a"), allow_redirect=False)
    assert isinstance(result, Failed)
    assert result.reason is Reason.STATUS
    assert result.status == status
    assert svc.hits.get("/target", 0) == 0


async def test_3xx_with_redirects_allowed_is_fetched_not_followed(session, fragments):
    async def redirect(_: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "/target"})

    svc = await fragments({"/a": redirect, "/target": html("<p>target</p>")})
    result = await get(session, svc.url("/a"), allow_redirect=True)
    assert isinstance(result, Fetched)
    assert result.status == 302
    assert result.headers["location"] == "/target"
    assert svc.hits.get("/target", 0) == 0


async def test_hang_before_headers_times_out_within_deadline(session, raw_server):
    async def silent(reader, writer):
        await read_head(reader)
        await reader.read()  # until the client gives up

    url = await raw_server(silent)
    started = time.monotonic()
    result = await get(session, url, timeout=0.2)
    elapsed = time.monotonic() - started
    assert isinstance(result, Failed)
    assert result.reason is Reason.TIMEOUT
    assert 0.15 <= elapsed < 0.45


async def test_the_lines_a_fetch_reads_are_found_in_any_case(session, raw_server):
    # A fetch finds Content-Type, Link and Content-Length by name, without the multidict: in
    # whatever case the service writes them, as HTTP says (and as the multidict did).
    body = b"<p>\xfc</p>"

    async def shouting(reader, writer):
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nCONTENT-TYPE: text/html; charset=iso-8859-1\r\n"
                     b'link: </a.css>; rel="stylesheet"\r\nX-Other: 1\r\nLINK: </a.js>; rel="fragment-script"\r\n'
                     b"content-LENGTH: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()

    result = await get(session, await raw_server(shouting))
    assert isinstance(result, Fetched), result
    assert result.body == "<p>ü</p>".encode()
    assert result.assets == (Asset("stylesheet", "/a.css"), Asset("script", "/a.js"))
    assert result.headers.getall("Link") == ['</a.css>; rel="stylesheet"', '</a.js>; rel="fragment-script"']


async def test_trickling_body_is_cut_at_the_deadline(session, raw_server):
    sent: list[int] = []

    async def trickle(reader, writer):
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 100\r\n\r\n")
        for _ in range(100):
            writer.write(b"x")
            await writer.drain()
            sent.append(1)
            await asyncio.sleep(0.05)

    url = await raw_server(trickle)
    started = time.monotonic()
    result = await get(session, url, timeout=0.3)
    elapsed = time.monotonic() - started
    assert isinstance(result, Failed)
    assert result.reason is Reason.TIMEOUT
    assert elapsed < 0.55
    assert len(sent) >= 4  # bytes kept arriving: an idle timeout would never have fired


async def test_content_length_over_max_fails_without_reading_body(session, raw_server):
    async def big(reader, writer):
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 10000000\r\n\r\n")
        await writer.drain()
        await reader.read()  # never send the body

    url = await raw_server(big)
    started = time.monotonic()
    result = await get(session, url, timeout=2.0, max_bytes=1000)
    assert isinstance(result, Failed)
    assert result.reason is Reason.TOO_LARGE
    assert time.monotonic() - started < 0.5  # decided on the header, not by waiting for a body


async def test_chunked_body_over_max_is_too_large(session, fragments):
    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/html"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(20):
            await resp.write(b"y" * 100)
        await resp.write_eof()
        return resp

    svc = await fragments({"/a": stream})
    result = await get(session, svc.url("/a"), max_bytes=1000)
    assert isinstance(result, Failed)
    assert result.reason is Reason.TOO_LARGE
    ok = await get(session, svc.url("/a"), max_bytes=2000)
    assert isinstance(ok, Fetched) and ok.body == b"y" * 2000


async def test_body_exactly_max_is_fine_one_more_is_too_large(session, fragments):
    svc = await fragments({"/a": html("z" * 1000)})
    assert isinstance(await get(session, svc.url("/a"), max_bytes=1000), Fetched)
    result = await get(session, svc.url("/a"), max_bytes=999)
    assert isinstance(result, Failed) and result.reason is Reason.TOO_LARGE


@pytest.mark.parametrize("encoding", ["gzip", "br"])
async def test_compression_bomb_is_too_large(session, fragments, encoding):
    packed = {"gzip": gzip.compress, "br": brotli.compress}[encoding](b"\0" * 2_000_000)
    assert len(packed) < 10_000

    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=packed, headers={"Content-Encoding": encoding, "Content-Type": "text/html"})

    svc = await fragments({"/a": handler})
    result = await get(session, svc.url("/a"), max_bytes=100_000)
    assert isinstance(result, Failed)
    assert result.reason is Reason.TOO_LARGE


async def test_garbage_gzip_is_invalid(session, fragments):
    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=b"this is not gzip at all, not even close",
                            headers={"Content-Encoding": "gzip", "Content-Type": "text/html"})

    svc = await fragments({"/a": handler})
    result = await get(session, svc.url("/a"))
    assert isinstance(result, Failed)
    assert result.reason is Reason.INVALID


@pytest.mark.parametrize("response", [
    b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    b"HTTP/1.1 abc Nonsense\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Header Without Colon\r\n\r\n",
    b"\x00\x01\x02\x03garbage\r\n\r\n",
])
async def test_garbage_response_is_invalid_or_connection(session, raw_server, response):
    async def garbage(reader, writer):
        await read_head(reader)
        writer.write(response)
        await writer.drain()

    url = await raw_server(garbage)
    result = await get(session, url, timeout=1.0)
    assert isinstance(result, Failed)
    assert result.reason in (Reason.INVALID, Reason.CONNECTION)


async def test_close_mid_body_is_failure(session, raw_server):
    async def short(reader, writer):
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 1000\r\n\r\n0123456789")
        await writer.drain()
        await asyncio.sleep(0.05)
        # returning closes the connection (FIN) with 990 bytes missing

    url = await raw_server(short)
    result = await get(session, url, timeout=1.0)
    assert isinstance(result, Failed)
    assert result.reason in (Reason.CONNECTION, Reason.INVALID)


async def test_reset_mid_body_is_failure(session, raw_server):
    async def reset(reader, writer):
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"a\r\n0123456789\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # RST

    url = await raw_server(reset)
    result = await get(session, url, timeout=1.0)
    assert isinstance(result, Failed)
    assert result.reason in (Reason.CONNECTION, Reason.INVALID)


async def test_accept_then_close_without_response_is_failure(session, raw_server):
    async def hangup(reader, writer):
        await read_head(reader)

    url = await raw_server(hangup)
    result = await get(session, url, timeout=1.0)
    assert isinstance(result, Failed)
    assert result.reason in (Reason.CONNECTION, Reason.INVALID)


# ---------------------------------------------------------------- session

async def test_session_stores_no_cookies_and_sends_no_user_agent(session, fragments):
    async def set_cookie(_: web.Request) -> web.Response:
        resp = web.Response(text="ok")
        resp.set_cookie("secret", "user-a")
        return resp

    svc = await fragments({"/set": set_cookie, "/next": html("ok")})
    assert isinstance(await get(session, svc.url("/set")), Fetched)
    assert isinstance(await get(session, svc.url("/next")), Fetched)
    seen = svc.requests[-1].headers
    assert "cookie" not in seen
    assert "user-agent" not in seen


# ---------------------------------------------------------------- parse_assets

def assets(*lines: str) -> tuple[Asset, ...]:
    h: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        h.add("Link", line)
    return parse_assets(h)


CSS = "https://cdn.example/a.css"
JS = "https://cdn.example/a.js"


@pytest.mark.parametrize(("lines", "expected"), [
    ((), ()),
    ((f'<{CSS}>; rel="stylesheet"',), (Asset("stylesheet", CSS),)),
    ((f'<{CSS}>; rel=stylesheet',), (Asset("stylesheet", CSS),)),
    ((f'<{JS}>; rel="fragment-script"',), (Asset("script", JS),)),
    ((f'<{JS}>; rel=fragment-script',), (Asset("script", JS),)),
    # several entries in one header, in order
    ((f'<{CSS}>; rel="stylesheet", <{JS}>; rel="fragment-script"',),
     (Asset("stylesheet", CSS), Asset("script", JS))),
    # several Link header lines
    ((f'<{CSS}>; rel="stylesheet"', f'<{JS}>; rel="fragment-script"'),
     (Asset("stylesheet", CSS), Asset("script", JS))),
    # rel lists
    ((f'<{CSS}>; rel="preload stylesheet"',), (Asset("stylesheet", CSS),)),
    ((f'<{JS}>; rel="preload fragment-script"',), (Asset("script", JS),)),
    # params in any order, extra params, no spaces
    ((f'<{CSS}>; title="a, b"; rel="stylesheet"',), (Asset("stylesheet", CSS),)),
    ((f'<{JS}>;crossorigin=anonymous;rel=fragment-script;as=script',), (Asset("script", JS),)),
    # rel values are case-insensitive
    ((f'<{CSS}>; rel="StyleSheet"',), (Asset("stylesheet", CSS),)),
    # other rels are ignored
    ((f'<{CSS}>; rel="preload"; as="style"', f'<{JS}>; rel="next"', f'<{JS}>'), ()),
    # only http(s) and root-relative
    (('</static/a.css>; rel="stylesheet"', '<http://h.example/a.js>; rel="fragment-script"'),
     (Asset("stylesheet", "/static/a.css"), Asset("script", "http://h.example/a.js"))),
    (('<javascript:alert(1)>; rel="stylesheet"', '<a.css>; rel="stylesheet"',
      '<//evil.example/a.css>; rel="stylesheet"', '<ftp://h.example/a.js>; rel="fragment-script"',
      '<data:text/css,body{}>; rel="stylesheet"', '<../a.css>; rel="stylesheet"'), ()),
    # garbage lines are skipped, good lines kept
    (("garbage", "<<<>>>", ";;;", "", ",", f'<{CSS}>; rel="stylesheet"', '<unterminated; rel=stylesheet',
      f'<{JS}>; rel="fragment-script"'),
     (Asset("stylesheet", CSS), Asset("script", JS))),
    ((f'garbage, <{CSS}>; rel="stylesheet"',), (Asset("stylesheet", CSS),)),
])
def test_parse_assets_table(lines, expected):
    assert assets(*lines) == expected


def test_parse_assets_garbage_entry_never_spreads_past_the_next_entry():
    # composer's Link parser (links.py, as aiohttp's did) splits entries only at ", <";
    # text glued to an entry spoils that entry's parameters and nothing else.
    got = assets(f'<{CSS}>; rel="stylesheet", garbage, <{JS}>; rel="fragment-script"')
    assert got == (Asset("script", JS),)
    got = assets(f'<{CSS}>; rel="stylesheet", <{JS}>; rel="fragment-script", garbage')
    assert got == (Asset("stylesheet", CSS),)


@pytest.mark.parametrize("line", [
    "<", ">", "<>", "<>; rel=stylesheet", '<http://[::1/x.css>; rel="stylesheet"',
    '<https://h.example:99999/x.css>; rel="stylesheet"', "<\x00>; rel=stylesheet",
    '<https://h.example/x.css>; rel', '<https://h.example/x.css>; =stylesheet', "\u2028<x>",
])
def test_parse_assets_never_raises(line):
    for asset in assets(line):
        assert asset.url.startswith(("http://", "https://", "/"))
        assert not asset.url.startswith("//")


# ---------------------------------------------------------------- reasons, strictly

@pytest.mark.parametrize(("response", "then"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789", "close"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789", "reset"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n", "close"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n", "reset"),
    (b"", "close"),
    (b"", "reset"),
    (b"HTTP/1.1 200 OK\r\nContent-Le", "close"),
], ids=["length-fin", "length-rst", "chunked-fin", "chunked-rst", "no-response-fin", "no-response-rst",
        "mid-headers-fin"])
async def test_connection_ending_early_is_connection_not_invalid(session, raw_server, response, then):
    async def cut(reader, writer):
        await read_head(reader)
        writer.write(response)
        await writer.drain()
        await asyncio.sleep(0.02)
        if then == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()

    result = await get(session, await raw_server(cut))
    assert isinstance(result, Failed)
    assert result.reason is Reason.CONNECTION, result


@pytest.mark.parametrize("body", [
    b"this is not gzip at all",
    gzip.compress(b"<p>x</p>")[:10] + b"\x07" + b"\0" * 20,  # valid header, reserved deflate block type
])
async def test_body_that_does_not_decompress_is_invalid(session, fragments, body):
    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=body, headers={"Content-Encoding": "gzip", "Content-Type": "text/html"})

    result = await get(session, (await fragments({"/a": handler})).url("/a"))
    assert isinstance(result, Failed) and result.reason is Reason.INVALID, result


async def test_gzip_stream_cut_short_inside_complete_framing_is_invalid(session, fragments):
    packed = gzip.compress(b"<p>" + b"whole fragment " * 100 + b"</p>")[:-30]

    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=packed, headers={"Content-Encoding": "gzip", "Content-Type": "text/html"})

    result = await get(session, (await fragments({"/a": handler})).url("/a"))
    assert isinstance(result, Failed) and result.reason is Reason.INVALID, result


# ---------------------------------------------------------------- charsets: bodies are UTF-8

def body_with(content_type: str | None, body: bytes, status: int = 200):
    async def handler(_: web.Request) -> web.Response:
        headers = {"Content-Type": content_type} if content_type else {}
        resp = web.Response(body=body, status=status, headers=headers)
        if content_type is None:
            resp.content_type = "text/html"  # aiohttp would add application/octet-stream otherwise
        return resp

    return handler


@pytest.mark.parametrize(("content_type", "body", "expected"), [
    (None, "<p>ü</p>".encode(), "<p>ü</p>"),
    ("text/html", b"<p>ascii</p>", "<p>ascii</p>"),
    ("text/html; charset=utf-8", "<p>ü</p>".encode(), "<p>ü</p>"),
    ("text/html; charset=UTF8", "<p>ü</p>".encode(), "<p>ü</p>"),
    ("text/html; charset=utf-8-sig", b"\xef\xbb\xbf<p>\xc3\xbc</p>", "<p>ü</p>"),
    ("text/html; charset=iso-8859-1", b"<p>\xfc \x80</p>", "<p>ü €</p>"),  # WHATWG: windows-1252
    ("text/html; charset=latin1", b"<p>\x81</p>", "<p>\x81</p>"),  # unassigned in cp1252: the C1 control
    ("text/html; charset=ascii", b"<p>\x93x\x94</p>", "<p>“x”</p>"),
    ("text/html; charset=windows-1252", b"<p>\x80</p>", "<p>€</p>"),
    ("text/html; charset=iso-8859-15", b"<p>\xa4</p>", "<p>€</p>"),
    ("text/html; charset=iso-8859-2", b"<p>\xb1</p>", "<p>ą</p>"),
    ("text/html; charset=shift_jis", "<p>日本</p>".encode("cp932"), "<p>日本</p>"),
    ("text/html; charset=x-sjis", "<p>①</p>".encode("cp932"), "<p>①</p>"),  # a Windows-only character
    ("text/html; charset=euc-jp", "<p>日本</p>".encode("euc_jp"), "<p>日本</p>"),
    ("text/html; charset=gb2312", "<p>中文</p>".encode("gbk"), "<p>中文</p>"),
    ("text/html; charset=big5", "<p>中文</p>".encode("big5"), "<p>中文</p>"),
    ("text/html; charset=euc-kr", "<p>한국어</p>".encode("euc_kr"), "<p>한국어</p>"),
    ("text/html; charset=koi8-r", "<p>Да</p>".encode("koi8-r"), "<p>Да</p>"),
    ("text/html; charset=utf-16le", "<p>ü</p>".encode("utf-16-le"), "<p>ü</p>"),
    ("text/html; charset=unicode-1-1-utf-8", "<p>ü</p>".encode(), "<p>ü</p>"),
    ('text/html; charset="windows-874"', "<p>ไทย</p>".encode("cp874"), "<p>ไทย</p>"),
])
async def test_body_is_utf8_transcoded_from_its_declared_charset(session, fragments, content_type, body, expected):
    result = await get(session, (await fragments({"/a": body_with(content_type, body)})).url("/a"))
    assert isinstance(result, Fetched), result
    assert result.body == expected.encode("utf-8")
    if content_type:
        assert result.headers["content-type"] == content_type  # headers stay as the service sent them


@pytest.mark.parametrize(("content_type", "body"), [
    (None, b"<p>\xfc</p>"),  # latin-1 bytes, no charset: not UTF-8
    ("text/html", b"<p>\xc3</p>"),  # truncated UTF-8 sequence
    ("text/html; charset=utf-8", b"<p>\xed\xa0\x80</p>"),  # an encoded surrogate
    ("text/html; charset=utf-8", b"<p>\xc0\xaf</p>"),  # overlong
    ("text/html; charset=shift_jis", b"<p>\x81</p>"),  # lead byte without its trail
    ("text/html; charset=x-no-such-charset", b"<p>x</p>"),
    ("text/html; charset=utf-7", b"<p>+AGEAYgBj-</p>"),  # decodes in Python; no browser reads it
    ("text/html; charset=unicode_escape", b"<p>\\u0041</p>"),
    ("text/html; charset=base64", b"PHA+eDwvcD4="),  # a Python codec, not a text encoding
    ("text/html; charset=iso-2022-kr", b"<p>x</p>"),  # WHATWG: the replacement encoding
])
async def test_body_not_in_its_charset_is_invalid(session, fragments, content_type, body):
    result = await get(session, (await fragments({"/a": body_with(content_type, body)})).url("/a"))
    assert isinstance(result, Failed), result
    assert result.reason is Reason.INVALID


async def test_4xx_body_is_transcoded_and_checked_too(session, fragments):
    svc = await fragments({"/latin": body_with("text/html; charset=latin1", b"<p>\xe9</p>", status=404),
                           "/bad": body_with("text/html", b"<p>\xe9</p>", status=404)})
    ok = await get(session, svc.url("/latin"))
    assert isinstance(ok, Fetched) and (ok.status, ok.body) == (404, "<p>é</p>".encode())
    bad = await get(session, svc.url("/bad"))
    assert isinstance(bad, Failed) and bad.reason is Reason.INVALID


async def test_redirect_body_is_not_checked(session, fragments):
    async def redirect(_: web.Request) -> web.Response:
        return web.Response(body=b"\xff\xfe not text", status=302,
                            headers={"Location": "/elsewhere", "Content-Type": "text/html"})

    result = await get(session, (await fragments({"/a": redirect})).url("/a"), allow_redirect=True)
    assert isinstance(result, Fetched)
    assert (result.status, result.headers["location"]) == (302, "/elsewhere")


async def test_body_that_grows_past_max_bytes_as_utf8_is_too_large(session, fragments):
    svc = await fragments({"/a": body_with("text/html; charset=latin1", b"\xe9" * 600)})  # 1200 bytes as UTF-8
    assert isinstance(await get(session, svc.url("/a"), max_bytes=1200), Fetched)
    result = await get(session, svc.url("/a"), max_bytes=1000)
    assert isinstance(result, Failed) and result.reason is Reason.TOO_LARGE


# ---------------------------------------------------------------- pooled connections

async def test_keep_alive_connections_are_reused(session, raw_server):
    connections: list[int] = []

    async def keep_alive(reader, writer):
        connections.append(1)
        while True:
            await read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()

    url = await raw_server(keep_alive)
    for _ in range(5):
        result = await get(session, url)
        assert isinstance(result, Fetched) and result.body == b"ok"
    assert len(connections) == 1


async def test_response_arriving_on_an_idle_pooled_connection_never_answers_the_next_request(session, raw_server):
    # The service declares 10 bytes, sends them, and 20 ms later (the connection is back in
    # the pool by then) a whole extra response: aiohttp queues it as the next answer
    # (aio-libs/aiohttp#13656). The next fetch on that origin must get its own response.
    connections: list[int] = []
    evil = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n<p>EVIL</p>"

    async def lying(reader, writer):
        connections.append(1)
        while True:
            head = await read_head(reader)
            path = head.split(b" ", 2)[1]
            body = b"<p>" + path + b"</p>"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            if path == b"/lie":
                await asyncio.sleep(0.02)
                writer.write(evil)
                await writer.drain()

    base = str(await raw_server(lying)).removesuffix("/frag")
    first = await get(session, base + "/lie")
    assert isinstance(first, Fetched) and first.body == b"<p>/lie</p>"
    await asyncio.sleep(0.1)
    for path in ("/a", "/b", "/c"):
        result = await get(session, base + path)
        assert isinstance(result, Fetched) and result.body == b"<p>%s</p>" % path.encode(), result
    assert len(connections) == 2  # the poisoned connection was dropped; the new one is reused
