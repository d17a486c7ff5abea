"""SPEC §3 end to end: real fragment servers, a real composer, a real client, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gzip
import html as htmllib
import json
import logging
import re
import zlib
from dataclasses import dataclass, field

import aiohttp
import brotli
import pytest
from aiohttp import web
from conftest import Records, captured, html, refused_origin
from multidict import CIMultiDictProxy
from yarl import URL

PRODUCT_ROUTE = """
    routes:
      - name: product
        match: {path: "/p/{sku}"}
        template: page.html
"""

MAX_1000 = """
    settings:
      max_fragment_bytes: 1000
"""


# ---------------------------------------------------------------- helpers

def now() -> float:
    return asyncio.get_running_loop().time()


def gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


def slow(body: str, delay: float, *, status: int = 200, headers: dict[str, str] | None = None):
    """Like `html(...)` but stops waiting as soon as the caller hung up (keeps teardown fast)."""

    async def handler(request: web.Request) -> web.Response:
        end = now() + delay
        while now() < end and not gone(request):
            await asyncio.sleep(0.01)
        return web.Response(text=body, status=status, content_type="text/html", headers=headers)

    return handler


def encoded(body: bytes, encoding: str, status: int = 200):
    packed = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress}[encoding](body)

    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=packed, status=status,
                            headers={"Content-Encoding": encoding, "Content-Type": "text/html"})

    return handler


CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=8)  # a broken composer fails a test, never hangs it


async def get(composer, path: str, **kwargs):
    return await composer.get(path, timeout=CLIENT_TIMEOUT, **kwargs)


def page(body: str) -> dict[str, str]:
    return {"page.html": body}


@dataclass
class Timed:
    status: int
    headers: CIMultiDictProxy[str]
    t_headers: float
    chunks: list[tuple[float, bytes]] = field(default_factory=list)

    @property
    def body(self) -> bytes:
        return b"".join(c for _, c in self.chunks)

    def at(self, marker: bytes) -> float:
        """Seconds after the request when `marker` had fully arrived."""
        seen = b""
        for t, chunk in self.chunks:
            seen += chunk
            if marker in seen:
                return t
        raise AssertionError(f"{marker!r} never arrived in {self.body!r}")


async def timed(composer, path: str, method: str = "GET", **kwargs) -> Timed:
    t0 = now()
    async with composer.session.request(method, composer.url + path, allow_redirects=False,
                                        **kwargs, timeout=CLIENT_TIMEOUT) as resp:
        result = Timed(resp.status, resp.headers, now() - t0)
        async for data in resp.content.iter_any():
            result.chunks.append((now() - t0, data))
    return result


async def raw_get(composer, path: str, **kwargs):
    """GET with the path sent exactly as written (no client-side normalisation)."""
    async with composer.session.get(URL(composer.url + path, encoded=True), allow_redirects=False,
                                    **kwargs, timeout=CLIENT_TIMEOUT) as resp:
        return resp, await resp.read()


def link_entries(header: str) -> list[tuple[str, dict[str, str]]]:
    """A small RFC 8288 reader for the page's own `Link` header."""
    out = []
    for url, params in re.findall(r"<([^>]*)>([^,]*)", header):
        parsed = {}
        for param in params.split(";"):
            if "=" in param:
                k, v = param.split("=", 1)
                parsed[k.strip().lower()] = v.strip().strip('"').lower()
        out.append((url, parsed))
    return out


# ---------------------------------------------------------------- src and {param}

@pytest.mark.parametrize(("segment", "expected"), [
    ("plain-123", "plain-123"),
    ("a%2Fb", "a%2Fb"),
    ("a..b", "a..b"),
    ("a%3Fx%3D1", "a%3Fx%3D1"),
    ("a%23frag", "a%23frag"),
    ("user%40evil.example", "user%40evil.example"),
    ("a%20X-Injected:%201", "a%20X-Injected%3A%201"),
    ("caf%C3%A9", "caf%C3%A9"),
])
async def test_src_param_is_quoted_and_cannot_change_the_path(fragments, start_composer, segment, expected):
    svc = await fragments({r"/frag/{tail:[\s\S]*}": html("<p>F</p>")})
    composer = await start_composer(page(f"""\
        <body><fragment src="{svc.url('/frag/')}{{sku}}"></fragment></body>
    """), routes=PRODUCT_ROUTE)
    resp, body = await raw_get(composer, f"/p/{segment}")
    assert resp.status == 200
    assert b"<p>F</p>" in body
    seen = svc.requests[-1]
    assert seen.raw_path == f"/frag/{expected}"
    assert seen.query_string == ""
    assert "x-injected" not in seen.headers


@pytest.mark.parametrize("segment", [
    "a%2F..%2F..%2Fadmin", "%2E%2E", "..", ".", "a%5C..%5Cadmin", "a%0D%0AX-Injected:%201", "a%00b",
])
async def test_a_param_that_could_climb_or_inject_is_refused_before_any_fetch(fragments, start_composer, segment):
    svc = await fragments({r"/frag/{tail:[\s\S]*}": html("<p>F</p>")})
    composer = await start_composer(page(f"""\
        <body><fragment src="{svc.url('/frag/')}{{sku}}"></fragment></body>
    """), routes=PRODUCT_ROUTE)
    resp, _ = await raw_get(composer, f"/p/{segment}")
    assert resp.status == 400
    assert svc.requests == []


async def test_src_param_in_query_is_quoted(fragments, start_composer):
    svc = await fragments({"/frag": html("<p>F</p>")})
    composer = await start_composer(page(f"""\
        <body><fragment src="{svc.url('/frag')}?sku={{sku}}&v=1"></fragment></body>
    """), routes=PRODUCT_ROUTE)
    resp, body = await raw_get(composer, "/p/a%26v%3D2%23x")
    assert resp.status == 200 and b"<p>F</p>" in body
    seen = svc.requests[-1]
    assert seen.path == "/frag"
    assert seen.query.getall("sku") == ["a&v=2#x"]
    assert seen.query.getall("v") == ["1"]


async def test_script_type_fragment_in_head(fragments, start_composer):
    svc = await fragments({"/meta": html("<title>From fragment</title>")})
    composer = await start_composer(page(f"""\
        <html><head><script type="fragment" id="meta" src="{svc.url('/meta')}"></script></head>
        <body>x</body></html>
    """))
    resp, body = await get(composer, "/page")
    assert resp.status == 200
    assert "<head><title>From fragment</title></head>" in body
    assert 'type="fragment"' not in body


# ---------------------------------------------------------------- id

async def test_id_names_the_fragment_in_metrics_and_logs(fragments, start_composer):
    svc = await fragments({"/bad": html("boom", status=500), "/ok": html("<p>ok</p>")})
    composer = await start_composer(page(f"""\
        <body>
        <fragment id="header" src="{svc.url('/bad')}"></fragment>
        <fragment src="{svc.url('/ok')}"></fragment>
        </body>
    """))
    records = Records()
    logger = logging.getLogger("composer.fragments")
    logger.addHandler(records)
    try:
        resp, _ = await get(composer, "/page")
    finally:
        logger.removeHandler(records)
    assert resp.status == 200
    metrics = await composer.metrics()
    failures = [line for line in metrics.splitlines()
                if line.startswith("composer_fragment_failures_total{")]
    assert any('fragment="header"' in line and 'reason="status"' in line and line.endswith(" 1.0")
               for line in failures), failures
    durations = [line for line in metrics.splitlines()
                 if line.startswith("composer_fragment_request_duration_seconds_count{")]
    assert any('fragment="header"' in line for line in durations), durations
    # without id or name: `<template>#<n>`
    assert any(re.search(r'fragment="page(\.html)?#\d+"', line) for line in durations), durations
    fields = [getattr(r, "fields", {}) for r in records.records]
    assert any(f.get("fragment") == "header" for f in fields), fields


# ---------------------------------------------------------------- primary

@pytest.mark.parametrize("status", [200, 201, 203])
async def test_primary_2xx_status_is_the_page_status(fragments, start_composer, status):
    svc = await fragments({"/p": html("<main>P</main>", status=status), "/o": html("<nav>O</nav>")})
    composer = await start_composer(page(f"""\
        <body><fragment src="{svc.url('/o')}"></fragment><fragment src="{svc.url('/p')}" primary></fragment></body>
    """))
    resp, body = await get(composer, "/page")
    assert resp.status == status
    assert body.strip() == "<body><nav>O</nav><main>P</main></body>"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_primary_3xx_gives_same_status_location_and_empty_body(fragments, start_composer, status):
    svc = await fragments({"/p": html("<p>moved</p>", status=status, headers={"Location": "/login?next=%2Fx"}),
                           "/login": html("<p>login</p>"), "/o": html("<nav>O</nav>")})
    composer = await start_composer(page(f"""\
        <body>LITERAL<fragment src="{svc.url('/o')}"></fragment>
        <fragment src="{svc.url('/p')}" primary></fragment></body>
    """))
    resp, body = await get(composer, "/page")
    assert resp.status == status
    assert resp.headers["Location"] == "/login?next=%2Fx"
    assert body == ""
    assert svc.hits.get("/login", 0) == 0  # never followed


async def test_primary_4xx_renders_the_page_with_that_status(fragments, start_composer):
    svc = await fragments({"/p": html("<main>No such product</main>", status=404),
                           "/o": html("<nav>O</nav>")})
    composer = await start_composer(page(f"""\
        <body>LITERAL<fragment src="{svc.url('/o')}"></fragment><fragment src="{svc.url('/p')}" primary></fragment></body>
    """))
    resp, body = await get(composer, "/page")
    assert resp.status == 404
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert body.strip() == "<body>LITERAL<nav>O</nav><main>No such product</main></body>"


async def test_primary_410_renders_the_page_with_that_status(fragments, start_composer):
    svc = await fragments({"/p": html("<main>gone</main>", status=410)})
    composer = await start_composer(page(f'<b>x</b><fragment src="{svc.url("/p")}" primary></fragment>'))
    resp, body = await get(composer, "/page")
    assert (resp.status, body) == (410, "<b>x</b><main>gone</main>")


def failing(mode: str, svc_url) -> str:
    return {
        "status": svc_url("/500"),
        "timeout": svc_url("/slow"),
        "connection": refused_origin() + "/frag",
        "too_large": svc_url("/big"),
        "invalid": svc_url("/badgzip"),
    }[mode]


FAILING_ROUTES = {
    "/500": html("<p>error page</p>", status=500),
    "/slow": slow("<p>too late</p>", 1.0),
    "/big": html("<p>" + "b" * 2000 + "</p>"),
}


async def _bad_gzip(_: web.Request) -> web.Response:
    return web.Response(body=b"definitely not gzip", headers={"Content-Encoding": "gzip",
                                                              "Content-Type": "text/html"})


@pytest.mark.parametrize("mode", ["status", "timeout", "connection", "too_large"])
async def test_primary_failure_without_fallback_is_bare_500(fragments, start_composer, mode):
    svc = await fragments({**FAILING_ROUTES, "/o": html("<nav>OTHER</nav>")})
    composer = await start_composer(page(f"""\
        <body>LITERAL<fragment src="{svc.url('/o')}"></fragment>
        <fragment src="{failing(mode, svc.url)}" primary timeout="200"></fragment></body>
    """), settings=MAX_1000)
    t = await timed(composer, "/page")
    assert t.status == 500
    assert b"LITERAL" not in t.body and b"OTHER" not in t.body and b"too late" not in t.body
    assert b"error page" not in t.body and b"bbbb" not in t.body
    assert t.t_headers < 0.7


@pytest.mark.parametrize("mode", ["status", "timeout", "connection"])
async def test_primary_inline_fallback_does_not_apply(fragments, start_composer, mode):
    svc = await fragments({**FAILING_ROUTES, "/fb": html("fallback also broken", status=503)})
    composer = await start_composer(page(f"""\
        <body>LITERAL<fragment src="{failing(mode, svc.url)}" fallback-src="{svc.url('/fb')}" primary timeout="200">
        <p>INLINE FALLBACK</p>
        </fragment></body>
    """))
    resp, body = await get(composer, "/page")
    assert resp.status == 500
    assert "INLINE FALLBACK" not in body
    assert "LITERAL" not in body
    assert svc.hits.get("/fb") == 1


async def test_primary_served_by_fallback_src_is_200(fragments, start_composer):
    svc = await fragments({"/p": html("<p>error</p>", status=503), "/fb": html("<main>FROM FALLBACK</main>")})
    composer = await start_composer(page(f"""\
        <body>LITERAL<fragment src="{svc.url('/p')}" fallback-src="{svc.url('/fb')}" primary>
        <p>INLINE</p></fragment></body>
    """))
    resp, body = await get(composer, "/page")
    assert resp.status == 200
    assert body.strip() == "<body>LITERAL<main>FROM FALLBACK</main></body>"


async def test_primary_set_cookies_pass_to_the_page_others_do_not(fragments, start_composer):
    def with_cookies(body: str, *cookies: str):
        async def handler(_: web.Request) -> web.Response:
            resp = web.Response(text=body, content_type="text/html")
            for cookie in cookies:
                resp.headers.add("Set-Cookie", cookie)
            return resp
        return handler

    svc = await fragments({
        "/p": with_cookies("<main>P</main>", "session=abc; Path=/; HttpOnly", "theme=dark; Max-Age=60",
                           "ab=b; Path=/"),
        "/o": with_cookies("<nav>O</nav>", "tracker=evil; Path=/"),
    })
    composer = await start_composer(page(f"""\
        <body><fragment src="{svc.url('/o')}"></fragment><fragment src="{svc.url('/p')}" primary></fragment></body>
    """))
    resp, body = await get(composer, "/page")
    assert resp.status == 200
    cookies = resp.headers.getall("Set-Cookie")
    assert sorted(cookies) == sorted(["session=abc; Path=/; HttpOnly", "theme=dark; Max-Age=60", "ab=b; Path=/"])
    assert "<nav>O</nav>" in body


async def test_non_primary_set_cookie_never_reaches_the_page(fragments, start_composer):
    async def handler(_: web.Request) -> web.Response:
        resp = web.Response(text="<nav>O</nav>", content_type="text/html")
        resp.set_cookie("tracker", "evil")
        return resp

    svc = await fragments({"/o": handler})
    composer = await start_composer(page(f'<body><fragment src="{svc.url("/o")}"></fragment></body>'))
    resp, body = await get(composer, "/page")
    assert resp.status == 200 and "<nav>O</nav>" in body
    assert "Set-Cookie" not in resp.headers


async def test_primary_assets_are_announced_as_preload(fragments, start_composer):
    svc = await fragments({
        "/p": html("<main>P</main>", headers={
            "Link": '<https://cdn.example/p.css>; rel="stylesheet", </static/p.js>; rel="fragment-script"'}),
        "/o": html("<nav>O</nav>", headers={"Link": '<https://cdn.example/o.css>; rel="stylesheet"'}),
    })
    composer = await start_composer(page(f"""\
        <body><fragment src="{svc.url('/o')}"></fragment><fragment src="{svc.url('/p')}" primary></fragment></body>
    """))
    resp, body = await get(composer, "/page")
    assert resp.status == 200
    entries = link_entries(",".join(resp.headers.getall("Link", [])))
    preload = {url: params.get("as") for url, params in entries if "preload" in params.get("rel", "").split()}
    assert preload.get("https://cdn.example/p.css") == "style"
    assert preload.get("/static/p.js") == "script"
    assert ('<link rel="stylesheet" href="https://cdn.example/p.css"><main>P</main>'
            '<script src="/static/p.js" defer></script>') in body


async def test_response_headers_wait_for_the_primary(fragments, start_composer):
    svc = await fragments({"/p": slow("<main>P</main>", 0.4, status=201), "/o": html("<nav>O</nav>")})
    composer = await start_composer(page(f"""\
        <html><body><h1>EARLY</h1><fragment src="{svc.url('/o')}"></fragment>
        <fragment src="{svc.url('/p')}" primary timeout="2000"></fragment></body></html>
    """))
    t = await timed(composer, "/page")
    assert t.status == 201  # the status could only be known once the primary answered
    assert t.t_headers >= 0.38
    assert t.chunks and t.chunks[0][0] >= 0.38  # not a byte before the primary answered
    assert t.at(b"EARLY") >= 0.38
    assert b"<main>P</main>" in t.body


# ---------------------------------------------------------------- fallback-src

@pytest.mark.parametrize("mode", ["status", "timeout", "connection", "too_large"])
async def test_fallback_src_used_when_src_fails(fragments, start_composer, mode):
    svc = await fragments({**FAILING_ROUTES, "/fb": html("<aside>FALLBACK</aside>")})
    composer = await start_composer(page(f"""\
        <body><fragment src="{failing(mode, svc.url)}" fallback-src="{svc.url('/fb')}" timeout="200">
        <p>INLINE</p></fragment></body>
    """), settings=MAX_1000)
    resp, body = await get(composer, "/page")
    assert resp.status == 200
    assert "<aside>FALLBACK</aside>" in body
    assert "INLINE" not in body and "too late" not in body and "error page" not in body
    assert svc.hits.get("/fb") == 1


@pytest.mark.parametrize("status", [200, 404])
async def test_fallback_src_not_fetched_when_src_succeeds(fragments, start_composer, status):
    svc = await fragments({"/a": html("<p>A</p>", status=status), "/fb": html("<aside>FALLBACK</aside>")})
    composer = await start_composer(page(f"""\
        <body><fragment src="{svc.url('/a')}" fallback-src="{svc.url('/fb')}"><p>INLINE</p></fragment></body>
    """))
    resp, body = await get(composer, "/page")
    assert resp.status == 200
    assert body == "<body><p>A</p></body>\n"
    assert svc.hits.get("/fb", 0) == 0


async def test_fallback_src_has_its_own_timeout(fragments, start_composer):
    # src times out at 300 ms; the fallback answers 200 ms later: past the first deadline,
    # within its own.
    svc = await fragments({"/slow": slow("<p>too late</p>", 1.0), "/fb": slow("<aside>FALLBACK</aside>", 0.2)})
    composer = await start_composer(page(f"""\
        <body><fragment src="{svc.url('/slow')}" fallback-src="{svc.url('/fb')}" timeout="300">
        <p>INLINE</p></fragment></body>
    """))
    t = await timed(composer, "/page")
    assert t.status == 200
    assert b"<aside>FALLBACK</aside>" in t.body
    assert b"INLINE" not in t.body
    assert 0.45 <= t.at(b"FALLBACK") < 0.9


async def test_fallback_src_timing_out_gives_inline_fallback(fragments, start_composer):
    svc = await fragments({"/slow": slow("<p>too late</p>", 1.0), "/fb": slow("<aside>late fb</aside>", 1.0)})
    composer = await start_composer(page(f"""\
        <body>BEFORE<fragment src="{svc.url('/slow')}" fallback-src="{svc.url('/fb')}" timeout="200">
        <p>INLINE</p></fragment>AFTER</body>
    """))
    t = await timed(composer, "/page")
    assert t.status == 200
    assert b"<p>INLINE</p>" in t.body
    assert b"late fb" not in t.body and b"too late" not in t.body
    assert t.at(b"AFTER") < 0.75  # 200 ms + 200 ms, not the 1 s the services take
    assert svc.hits.get("/fb") == 1


@pytest.mark.parametrize("fallback_mode", ["status", "connection", "timeout"])
async def test_fallback_src_failing_without_inline_renders_nothing(fragments, start_composer, fallback_mode):
    svc = await fragments({**FAILING_ROUTES})
    composer = await start_composer(page(f"""\
        <body>BEFORE<fragment src="{svc.url('/500')}" fallback-src="{failing(fallback_mode, svc.url)}" timeout="200"></fragment>AFTER</body>
    """))
    resp, body = await get(composer, "/page")
    assert resp.status == 200
    assert body == "<body>BEFOREAFTER</body>\n"


# ---------------------------------------------------------------- timeout

async def test_timeout_is_a_deadline_not_an_idle_timeout(fragments, start_composer):
    written: list[float] = []

    async def trickle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/html"})
        await resp.prepare(request)
        for _ in range(30):
            if gone(request):
                break
            try:
                await resp.write(b"<i>t</i>")
            except ConnectionError:
                break
            written.append(now())
            await asyncio.sleep(0.1)
        return resp

    svc = await fragments({"/trickle": trickle})
    composer = await start_composer(page(f"""\
        <body>BEFORE<fragment src="{svc.url('/trickle')}" timeout="300"><p>INLINE</p></fragment>AFTER</body>
    """))
    t0 = now()
    t = await timed(composer, "/page")
    assert t.status == 200
    assert b"<i>t</i>" not in t.body
    assert b"<p>INLINE</p>" in t.body
    assert t.at(b"AFTER") < 0.6
    # bytes kept coming every 100 ms (an idle timeout of 300 ms would never fire), yet it was cut
    assert len(written) >= 3 and written[0] - t0 < 0.1
    assert all(b - a < 0.2 for a, b in zip(written, written[1:]))
    assert len(written) < 8


async def test_default_timeout_comes_from_settings(fragments, start_composer):
    svc = await fragments({"/slow": slow("<p>too late</p>", 1.0)})
    composer = await start_composer(page(f"""\
        <body><fragment src="{svc.url('/slow')}"><p>INLINE</p></fragment>END</body>
    """), settings="""
        settings:
          fragment_timeout_ms: 200
    """)
    t = await timed(composer, "/page")
    assert b"<p>INLINE</p>" in t.body and b"too late" not in t.body
    assert t.at(b"END") < 0.6


async def test_fragments_are_fetched_concurrently(fragments, start_composer):
    svc = await fragments({"/a": slow("<p>A</p>", 0.3), "/b": slow("<p>B</p>", 0.3), "/c": slow("<p>C</p>", 0.3)})
    composer = await start_composer(page(f"""\
        <body><fragment src="{svc.url('/a')}"></fragment><fragment src="{svc.url('/b')}"></fragment><fragment src="{svc.url('/c')}"></fragment></body>
    """))
    t = await timed(composer, "/page")
    assert t.body == b"<body><p>A</p><p>B</p><p>C</p></body>\n"
    assert t.at(b"</body>") < 0.6


# ---------------------------------------------------------------- async

ASYNC_PH = re.compile(rb'<template id="composer-async-(\d+)"></template>')


def async_block(n: bytes) -> re.Pattern[bytes]:
    return re.compile(rb'<div hidden id="composer-async-' + n + rb'-content">(.*?)</div>(<script>.*?</script>)',
                      re.DOTALL)


async def test_async_placeholder_and_content_before_body_end_in_completion_order(fragments, start_composer):
    svc = await fragments({"/slow": slow("<p>SLOW</p>", 0.4), "/fast": slow("<p>FAST</p>", 0.1)})
    composer = await start_composer(page(f"""\
        <html><body><h1>TOP</h1>
        <fragment id="slow" src="{svc.url('/slow')}" async timeout="2000"></fragment>
        <fragment id="fast" src="{svc.url('/fast')}" async></fragment>
        <p>END</p>
        </body></html>
    """))
    t = await timed(composer, "/page")
    body = t.body
    assert t.status == 200
    ids = ASYNC_PH.findall(body)
    assert len(ids) == 2 and ids[0] != ids[1]
    slow_n, fast_n = ids
    # placeholders stand where the fragments were
    top, ph1, ph2, end = (body.index(b"<h1>TOP</h1>"), body.index(b'composer-async-' + slow_n + b'"'),
                          body.index(b'composer-async-' + fast_n + b'"'), body.index(b"<p>END</p>"))
    assert top < ph1 < ph2 < end
    # contents: after the rest of the body, before </body>, in completion order
    fast_m, slow_m = async_block(fast_n).search(body), async_block(slow_n).search(body)
    assert fast_m and slow_m
    assert fast_m.group(1) == b"<p>FAST</p>" and slow_m.group(1) == b"<p>SLOW</p>"
    assert end < fast_m.start() < slow_m.start() < body.index(b"</body>")
    for n, m in ((fast_n, fast_m), (slow_n, slow_m)):
        script = m.group(2)
        assert b"composer-async-" + n in script
    assert body.count(b"<p>SLOW</p>") == 1 and body.count(b"<p>FAST</p>") == 1
    # async does not hold the stream
    assert t.at(b"<p>END</p>") < 0.25
    assert t.at(b"<p>FAST</p>") < t.at(b"<p>SLOW</p>")
    assert t.at(b"<p>SLOW</p>") >= 0.38


async def test_async_failure_inline_fallback_lands_at_its_placeholder(fragments, start_composer):
    svc = await fragments({"/bad": html("<p>error</p>", status=500), "/ok": html("<p>OK</p>")})
    composer = await start_composer(page(f"""\
        <body><fragment src="{svc.url('/bad')}" async><p>UNAVAILABLE</p></fragment><p>END</p>
        <fragment src="{svc.url('/ok')}" async><p>unused inline</p></fragment></body>
    """))
    resp, raw = await raw_get(composer, "/page")
    assert resp.status == 200
    ids = ASYNC_PH.findall(raw)
    assert len(ids) == 2
    bad = async_block(ids[0]).search(raw)
    ok = async_block(ids[1]).search(raw)
    assert bad and bad.group(1) == b"<p>UNAVAILABLE</p>"
    assert ok and ok.group(1) == b"<p>OK</p>"
    assert raw.count(b"UNAVAILABLE") == 1 and b"unused inline" not in raw and b"<p>error</p>" not in raw
    assert raw.index(b"<p>END</p>") < bad.start()


async def test_async_fallback_src_lands_at_its_placeholder(fragments, start_composer):
    svc = await fragments({"/bad": html("x", status=502), "/fb": html("<p>FB</p>")})
    composer = await start_composer(page(f"""\
        <body><fragment src="{svc.url('/bad')}" fallback-src="{svc.url('/fb')}" async></fragment><p>END</p></body>
    """))
    resp, raw = await raw_get(composer, "/page")
    (n,) = ASYNC_PH.findall(raw)
    m = async_block(n).search(raw)
    assert m and m.group(1) == b"<p>FB</p>"


async def test_async_failure_without_inline_leaves_nothing(fragments, start_composer):
    """No content and no carrier; only the script that removes the placeholder (the browser
    test checks no element remains)."""
    svc = await fragments({"/bad": html("<p>error</p>", status=500)})
    composer = await start_composer(page(f"""\
        <body><fragment src="{svc.url('/bad')}" async></fragment><p>END</p></body>
    """))
    resp, raw = await raw_get(composer, "/page")
    assert resp.status == 200
    assert b"<p>error</p>" not in raw and b"-content\">" not in raw
    (n,) = ASYNC_PH.findall(raw)
    script = raw[raw.index(b"<p>END</p>") + len(b"<p>END</p>"):-len(b"</body>\n")]
    assert script.startswith(b"<script>") and script.endswith(b"</script>") and script.count(b"<script>") == 1
    assert b'getElementById("composer-async-' + n + b'")' in script


async def test_async_content_with_assets(fragments, start_composer):
    svc = await fragments({"/a": html("<p>ASYNC</p>", headers={
        "Link": '<https://cdn.example/r.css>; rel="stylesheet", <https://cdn.example/r.js>; rel="fragment-script"'})})
    composer = await start_composer(page(f"""\
        <html><head></head><body><fragment src="{svc.url('/a')}" async></fragment><p>END</p></body></html>
    """))
    resp, raw = await raw_get(composer, "/page")
    (n,) = ASYNC_PH.findall(raw)
    m = async_block(n).search(raw)
    assert m
    # The stylesheet stays outside the carrier: moving a <link> makes browsers fetch it again.
    assert raw[:m.start()].endswith(b'<link rel="stylesheet" href="https://cdn.example/r.css">')
    assert m.group(1) == b'<p>ASYNC</p><script src="https://cdn.example/r.js" defer></script>'


async def test_async_without_body_tag_goes_at_the_end(fragments, start_composer):
    svc = await fragments({"/a": html("<p>ASYNC</p>")})
    composer = await start_composer(page(f'<main><fragment src="{svc.url("/a")}" async></fragment></main>'))
    resp, raw = await raw_get(composer, "/page")
    (n,) = ASYNC_PH.findall(raw)
    m = async_block(n).search(raw)
    assert m and m.group(1) == b"<p>ASYNC</p>"
    assert raw.index(b"</main>") < m.start()


# ---------------------------------------------------------------- public, forwarding, request id

FORWARDED = {
    "Accept-Language": "de-DE,de;q=0.9",
    "Cookie": "session=abc; ab=b",
    "Referer": "https://shop.example/start",
    "User-Agent": "TestBrowser/1.0",
    "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "tracestate": "vendor=opaque",
}
NOT_FORWARDED = {"Authorization": "Bearer secret", "X-Secret": "1", "X-Forwarded-For": "10.0.0.1"}


async def test_forwarded_headers_and_request_context(fragments, start_composer):
    svc = await fragments({"/a": html("<p>A</p>")})
    composer = await start_composer(page(f'<body><fragment src="{svc.url("/a")}"></fragment></body>'))
    resp, _ = await raw_get(composer, "/page?q=1&r=a%20b", headers={**FORWARDED, **NOT_FORWARDED})
    assert resp.status == 200
    seen = svc.requests[-1].headers
    for name, value in FORWARDED.items():
        assert seen.get(name) == value, name
    for name in NOT_FORWARDED:
        assert name not in seen, name
    assert seen["x-request-uri"] == "/page?q=1&r=a%20b"
    assert seen["x-request-host"] == URL(composer.url).raw_authority
    assert seen["accept-encoding"] == "gzip, deflate, br"
    assert seen.get("x-request-id")


async def test_forward_headers_setting_replaces_the_default_list(fragments, start_composer):
    svc = await fragments({"/a": html("<p>A</p>")})
    composer = await start_composer(page(f'<body><fragment src="{svc.url("/a")}"></fragment></body>'),
                                    settings="""
        settings:
          forward_headers: [x-team, Accept-Language]
    """)
    resp, _ = await raw_get(composer, "/page", headers={**FORWARDED, "X-Team": "checkout"})
    seen = svc.requests[-1].headers
    assert seen["x-team"] == "checkout"
    assert seen["accept-language"] == FORWARDED["Accept-Language"]
    for name in ("cookie", "referer", "user-agent", "traceparent"):
        assert name not in seen, name
    assert seen["x-request-uri"] == "/page"


async def test_public_fragment_gets_no_forwarded_headers(fragments, start_composer):
    svc = await fragments({"/private": html("<p>PRIV</p>"), "/public": html("<p>PUB</p>")})
    composer = await start_composer(page(f"""\
        <body><fragment src="{svc.url('/private')}"></fragment><fragment src="{svc.url('/public')}" public></fragment></body>
    """))
    resp, body = await raw_get(composer, "/page?x=1", headers={**FORWARDED, "X-Request-Id": "req-42"})
    assert resp.status == 200 and b"<p>PRIV</p><p>PUB</p>" in body
    by_path = {r.path: r.headers for r in svc.requests}
    public = by_path["/public"]
    for name in (*FORWARDED, "x-request-uri", "x-request-host"):
        assert name not in public, name
    assert public["x-request-id"] == "req-42"
    assert public["accept-encoding"] == "gzip, deflate, br"
    private = by_path["/private"]
    assert private["cookie"] == FORWARDED["Cookie"] and private["x-request-uri"] == "/page?x=1"


async def test_request_id_taken_from_request_and_shared(fragments, start_composer):
    svc = await fragments({"/a": html("a"), "/b": html("b"), "/c": html("c")})
    composer = await start_composer(page(f"""\
        <body><fragment src="{svc.url('/a')}"></fragment><fragment src="{svc.url('/b')}" public></fragment>
        <fragment src="{svc.url('/c')}" async></fragment></body>
    """))
    await raw_get(composer, "/page", headers={"X-Request-Id": "trace-me-123"})
    assert sorted(r.path for r in svc.requests) == ["/a", "/b", "/c"]
    assert {r.headers.get("x-request-id") for r in svc.requests} == {"trace-me-123"}


async def test_request_id_generated_once_per_page(fragments, start_composer):
    svc = await fragments({"/a": html("a"), "/b": html("b"), "/c": html("c")})
    composer = await start_composer(page(f"""\
        <body><fragment src="{svc.url('/a')}"></fragment><fragment src="{svc.url('/b')}" public></fragment>
        <fragment src="{svc.url('/c')}" async></fragment></body>
    """))
    await raw_get(composer, "/page")
    first = {r.headers.get("x-request-id") for r in svc.requests}
    await raw_get(composer, "/page")
    second = {r.headers.get("x-request-id") for r in svc.requests[3:]}
    assert len(first) == 1 and len(second) == 1
    (a,), (b,) = first, second
    assert a and b and a != b


# ---------------------------------------------------------------- inline fallback, failures, status

@pytest.mark.parametrize("mode", ["status", "timeout", "connection", "too_large", "invalid"])
async def test_failing_non_primary_renders_nothing_page_200(fragments, start_composer, mode):
    svc = await fragments({**FAILING_ROUTES, "/badgzip": _bad_gzip, "/ok": html("<p>OK</p>")})
    composer = await start_composer(page(f"""\
        <body>BEFORE<fragment src="{failing(mode, svc.url)}" timeout="200"></fragment><fragment src="{svc.url('/ok')}"></fragment>AFTER</body>
    """), settings=MAX_1000)
    resp, body = await get(composer, "/page")
    assert resp.status == 200
    assert body == "<body>BEFORE<p>OK</p>AFTER</body>\n"


@pytest.mark.parametrize("mode", ["status", "timeout", "connection", "too_large", "invalid"])
async def test_inline_fallback_rendered_on_failure(fragments, start_composer, mode):
    svc = await fragments({**FAILING_ROUTES, "/badgzip": _bad_gzip})
    composer = await start_composer(page(f"""\
        <body><fragment src="{failing(mode, svc.url)}" timeout="200">
          <p>Recommendations are unavailable.</p>
        </fragment></body>
    """), settings=MAX_1000)
    resp, body = await get(composer, "/page")
    assert resp.status == 200
    assert body == "<body>\n  <p>Recommendations are unavailable.</p>\n</body>\n"


async def test_inline_fallback_not_rendered_on_success(fragments, start_composer):
    svc = await fragments({"/a": html("<p>A</p>")})
    composer = await start_composer(page(f"""\
        <body><fragment src="{svc.url('/a')}"><p>Recommendations are unavailable.</p></fragment></body>
    """))
    resp, body = await get(composer, "/page")
    assert body == "<body><p>A</p></body>\n"


@pytest.mark.parametrize("status", [400, 403, 404, 410, 429])
async def test_non_primary_4xx_body_is_rendered(fragments, start_composer, status):
    svc = await fragments({"/a": html("<p>fragment says no</p>", status=status)})
    composer = await start_composer(page(f"""\
        <body><fragment src="{svc.url('/a')}"><p>INLINE</p></fragment></body>
    """))
    resp, body = await get(composer, "/page")
    assert resp.status == 200
    assert body == "<body><p>fragment says no</p></body>\n"


@pytest.mark.parametrize("status", [200, 201, 204, 206])
async def test_non_primary_2xx_body_is_rendered(fragments, start_composer, status):
    text = "" if status == 204 else "<p>two-xx</p>"
    svc = await fragments({"/a": html(text, status=status)})
    composer = await start_composer(page(f'<body><fragment src="{svc.url("/a")}"><p>INLINE</p></fragment></body>'))
    resp, body = await get(composer, "/page")
    assert resp.status == 200
    assert body == f"<body>{text}</body>"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_non_primary_3xx_is_a_failure_and_not_followed(fragments, start_composer, status):
    svc = await fragments({"/a": html("<p>redirect body</p>", status=status, headers={"Location": "/target"}),
                           "/b": html("<p>redirect body</p>", status=status, headers={"Location": "/target"}),
                           "/target": html("<p>TARGET</p>")})
    composer = await start_composer(page(f"""\
        <body>[<fragment src="{svc.url('/a')}"></fragment>]
        [<fragment src="{svc.url('/b')}"><p>INLINE</p></fragment>]</body>
    """))
    resp, body = await get(composer, "/page")
    assert resp.status == 200
    assert body == "<body>[]\n[<p>INLINE</p>]</body>\n"
    assert svc.hits.get("/target", 0) == 0
    assert "Location" not in resp.headers


# ---------------------------------------------------------------- client disconnect

async def test_client_disconnect_cancels_fragment_requests(fragments, start_composer):
    started: list[str] = []
    hung_up: list[float] = []

    async def sleepy(request: web.Request) -> web.Response:
        started.append(request.path)
        end = now() + 5
        try:
            while now() < end:
                if gone(request):
                    hung_up.append(now())
                    break
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            hung_up.append(now())
            raise
        return web.Response(text="<p>late</p>", content_type="text/html")

    svc = await fragments({"/sleepy": sleepy, "/async": sleepy})
    composer = await start_composer(page(f"""\
        <body><h1>EARLY</h1><fragment src="{svc.url('/sleepy')}" timeout="10000"></fragment>
        <fragment src="{svc.url('/async')}" async timeout="10000"></fragment></body>
    """))
    resp = await composer.session.get(composer.url + "/page", timeout=CLIENT_TIMEOUT)
    try:
        first = await resp.content.readany()
        assert b"EARLY" in first
        # Both requests in their handlers before the client leaves: one sent on a pooled
        # connection the service had closed is sent again on a new one, a little later.
        deadline = now() + 2
        while len(started) < 2 and now() < deadline:
            await asyncio.sleep(0.01)
        assert sorted(started) == ["/async", "/sleepy"]
    finally:
        closed_at = now()
        resp.close()  # drop the connection
    deadline = now() + 1.5
    while len(hung_up) < 2 and now() < deadline:
        await asyncio.sleep(0.02)
    assert len(hung_up) == 2, "fragment requests were not cancelled when the client left"
    assert max(hung_up) - closed_at < 1.0


# ---------------------------------------------------------------- Link header assets

async def test_fragment_assets_wrap_its_content(fragments, start_composer):
    svc = await fragments({"/a": html("<p>A</p>", headers={
        "Link": '<https://cdn.example/a.css>; rel="stylesheet", <https://cdn.example/a.js>; rel="fragment-script", '
                '</static/a2.css>; rel=stylesheet'})})
    composer = await start_composer(page(f'<body><fragment src="{svc.url("/a")}"></fragment></body>'))
    resp, body = await get(composer, "/page")
    assert body == ('<body><link rel="stylesheet" href="https://cdn.example/a.css">'
                    '<link rel="stylesheet" href="/static/a2.css"><p>A</p>'
                    '<script src="https://cdn.example/a.js" defer></script></body>')


async def test_asset_urls_are_html_escaped(fragments, start_composer):
    svc = await fragments({"/a": html("<p>A</p>", headers={
        "Link": "<https://cdn.example/a.css?x=1&y='q'>; rel=stylesheet, "
                '<https://cdn.example/b.css?x="><img src=x onerror=alert(1)>; rel=stylesheet, '
                "<https://cdn.example/a.js?x=<b>&y=1>; rel=fragment-script"})})
    composer = await start_composer(page(f'<body><fragment src="{svc.url("/a")}"></fragment></body>'))
    resp, body = await get(composer, "/page")
    assert resp.status == 200
    assert "<img" not in body
    tags = re.findall(r"<(link|script)\b([^<>]*)>", body)
    hrefs = [re.fullmatch(r' (?:rel="stylesheet" href|src)="([^"<>]*)"(?: defer)?', attrs) for _, attrs in tags]
    assert all(hrefs), tags
    values = [htmllib.unescape(m.group(1)) for m in hrefs]
    assert "https://cdn.example/a.css?x=1&y='q'" in values
    assert '<link rel="stylesheet" href="https://cdn.example/a.css?x=1&amp;y=&#x27;q&#x27;">' in body
    assert any(v.startswith("https://cdn.example/b.css?x=") for v in values)
    assert any(v.startswith("https://cdn.example/a.js?x=") for v in values)


async def test_only_http_and_root_relative_assets_are_used(fragments, start_composer):
    svc = await fragments({"/a": html("<p>A</p>", headers={"Link": ", ".join([
        '<javascript:alert(1)>; rel="stylesheet"',
        '<x.css>; rel="stylesheet"',
        '<//evil.example/x.css>; rel="stylesheet"',
        '<data:text/javascript,alert(1)>; rel="fragment-script"',
        '<ftp://cdn.example/x.js>; rel="fragment-script"',
        '<http://cdn.example/ok.css>; rel="stylesheet"',
        '</ok.js>; rel="fragment-script"',
    ])})})
    composer = await start_composer(page(f'<body><fragment src="{svc.url("/a")}"></fragment></body>'))
    resp, body = await get(composer, "/page")
    assert body == ('<body><link rel="stylesheet" href="http://cdn.example/ok.css"><p>A</p>'
                    '<script src="/ok.js" defer></script></body>')


async def test_asset_emitted_once_per_page(fragments, start_composer):
    link = '<https://cdn.example/shared.css>; rel="stylesheet", <https://cdn.example/shared.js>; rel="fragment-script"'
    svc = await fragments({"/a": html("<p>A</p>", headers={"Link": link}),
                           "/b": html("<p>B</p>", headers={"Link": link + ', <https://cdn.example/b.css>; rel=stylesheet'})})
    composer = await start_composer(page(f"""\
        <body><fragment src="{svc.url('/a')}"></fragment><fragment src="{svc.url('/b')}"></fragment></body>
    """))
    resp, body = await get(composer, "/page")
    assert body.count("https://cdn.example/shared.css") == 1
    assert body.count("https://cdn.example/shared.js") == 1
    assert body == ('<body><link rel="stylesheet" href="https://cdn.example/shared.css"><p>A</p>'
                    '<script src="https://cdn.example/shared.js" defer></script>'
                    '<link rel="stylesheet" href="https://cdn.example/b.css"><p>B</p></body>\n')


@pytest.mark.parametrize("link", [
    "garbage", "<<<", "<>; rel=stylesheet", ";;;,,,", '<https://cdn.example/x.css>; rel="stylesheet',
    "<http://[::1/x.css>; rel=stylesheet", "<https://h.example:99999/x.css>; rel=stylesheet",
])
async def test_invalid_link_header_still_renders_fragment(fragments, start_composer, link):
    svc = await fragments({"/a": html("<p>A</p>", headers={"Link": link})})
    composer = await start_composer(page(f'<body><fragment src="{svc.url("/a")}"><p>INLINE</p></fragment></body>'))
    resp, body = await get(composer, "/page")
    assert resp.status == 200
    assert body == "<body><p>A</p></body>"


# ---------------------------------------------------------------- encodings and size

@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
async def test_compressed_fragment_bodies_are_decoded(fragments, start_composer, encoding):
    text = "<p>" + "zusammengesetzt " * 50 + "ü</p>"
    svc = await fragments({"/a": encoded(text.encode(), encoding)})
    composer = await start_composer(page(f'<body><fragment src="{svc.url("/a")}"></fragment></body>'))
    resp, body = await get(composer, "/page")
    assert resp.status == 200
    assert body == f"<body>{text}</body>"


async def test_body_over_max_fragment_bytes_is_a_failure(fragments, start_composer):
    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/html"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(12):
            await resp.write(b"c" * 100)
        await resp.write_eof()
        return resp

    svc = await fragments({"/fits": html("f" * 1000), "/big": html("b" * 1001), "/chunked": chunked,
                           "/bomb": encoded(b"z" * 200_000, "gzip"), "/brbomb": encoded(b"z" * 200_000, "br")})
    composer = await start_composer(page(f"""\
        <body>
        1<fragment src="{svc.url('/fits')}">I1</fragment>
        2<fragment src="{svc.url('/big')}">I2</fragment>
        3<fragment src="{svc.url('/chunked')}">I3</fragment>
        4<fragment src="{svc.url('/bomb')}">I4</fragment>
        5<fragment src="{svc.url('/brbomb')}">I5</fragment>
        </body>
    """), settings=MAX_1000)
    resp, body = await get(composer, "/page")
    assert resp.status == 200
    assert body == f"<body>\n1{'f' * 1000}\n2I2\n3I3\n4I4\n5I5\n</body>\n"


# ---------------------------------------------------------------- the composed response

async def test_response_headers(fragments, start_composer):
    svc = await fragments({"/a": html("<p>A</p>", headers={"Cache-Control": "max-age=3600",
                                                             "Content-Type": "text/plain"})})
    composer = await start_composer(page(f'<body><fragment src="{svc.url("/a")}"></fragment></body>'))
    resp, _ = await get(composer, "/page")
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert resp.headers["Transfer-Encoding"] == "chunked"
    assert "Content-Length" not in resp.headers
    assert resp.headers["Cache-Control"] == "no-cache, no-store, must-revalidate"


async def test_a_page_without_fragments_is_answered_whole(start_composer):
    """Nothing to wait for (answered whole, in one write): chunked as every page, with the
    headers a streamed page gets; HEAD gets them with no body."""
    text = "<html><head><title>t</title></head><body><p>static</p></body></html>"
    composer = await start_composer({"page.html": text}, routes="""
        settings: {server_timing: true}
        routes:
          - name: page
            match: {path: /page}
            template: page.html
            filters:
              - set_response_header: {x-route: page}
    """)
    resp, body = await get(composer, "/page")
    assert resp.status == 200 and body == text
    assert resp.headers["Transfer-Encoding"] == "chunked" and "Content-Length" not in resp.headers
    assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
    assert resp.headers["Cache-Control"] == "no-cache, no-store, must-revalidate"
    assert resp.headers["x-route"] == "page" and resp.headers["Server-Timing"].startswith("composer;dur=")
    async with composer.session.head(composer.url + "/page", timeout=CLIENT_TIMEOUT) as head:
        assert head.status == 200 and await head.read() == b""
        for name in ("Content-Type", "Cache-Control", "x-route"):
            assert head.headers.getall(name, []) == resp.headers.getall(name, []), name


async def test_route_can_override_cache_control(fragments, start_composer):
    svc = await fragments({"/a": html("<p>A</p>")})
    composer = await start_composer(page(f'<body><fragment src="{svc.url("/a")}"></fragment></body>'),
                                    routes="""
        routes:
          - name: page
            match: {path: /page}
            template: page.html
            filters:
              - set_response_header: {cache-control: "max-age=60"}
    """)
    resp, body = await get(composer, "/page")
    assert resp.status == 200 and "<p>A</p>" in body
    assert resp.headers.getall("Cache-Control") == ["max-age=60"]


@pytest.mark.parametrize("primary_status", [None, 200, 201, 404])
async def test_head_same_status_and_headers_no_body(fragments, start_composer, primary_status):
    frag = ('<fragment src="{url}" primary></fragment>' if primary_status else "")
    svc = await fragments({"/p": html("<main>P</main>", status=primary_status or 200, headers={
        "Link": '<https://cdn.example/p.css>; rel="stylesheet"', "Set-Cookie": "s=1; Path=/"}),
        "/o": html("<nav>O</nav>")})
    composer = await start_composer(page(
        f'<body><fragment src="{svc.url("/o")}"></fragment>{frag.format(url=svc.url("/p"))}</body>'))
    async with composer.session.get(composer.url + "/page", timeout=CLIENT_TIMEOUT) as get_resp:
        get_body = await get_resp.read()
    async with composer.session.head(composer.url + "/page", timeout=CLIENT_TIMEOUT) as head_resp:
        head_body = await head_resp.read()
    assert get_body
    assert head_body == b""
    assert head_resp.status == get_resp.status == (primary_status or 200)
    for name in ("Content-Type", "Cache-Control", "Link", "Set-Cookie"):
        assert head_resp.headers.getall(name, []) == get_resp.headers.getall(name, []), name


async def test_head_with_primary_redirect(fragments, start_composer):
    svc = await fragments({"/p": html("", status=302, headers={"Location": "/elsewhere"})})
    composer = await start_composer(page(f'<body><fragment src="{svc.url("/p")}" primary></fragment></body>'))
    async with composer.session.head(composer.url + "/page", allow_redirects=False, timeout=CLIENT_TIMEOUT) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/elsewhere"
        assert await resp.read() == b""


async def test_literal_template_bytes_pass_through_byte_for_byte(fragments, start_composer):
    svc = await fragments({"/a": html("<b>F</b>")})
    tag = f'<fragment src="{svc.url("/a")}" id="f1"><p>inline</p></fragment>'
    before = ("<!DOCTYPE html>\r\n<HTML lang=en><Head><meta charset=utf-8>\r\n"
              '<!-- a comment with <fragment src="http://nope.invalid/"></fragment> in it -->\n'
              "<script>if (a < b && c > d) { document.write('<fragment src=x></fragment>') }</script>\n"
              "<style>p > a { content: \"</fragment>\" }</style>\n"
              "</Head><BODY class='x'   data-a=\"1\">\n"
              "<p>unclosed &amp; &nbsp;&#160; &lt;raw&gt; caf\u00e9 \u2713 \U0001F600 <br/><img src=x alt='a\"b'>\n"
              "\t<DIV\tclass = y >")
    after = ("</DIV><textarea><fragment src=x></fragment></textarea>\n"
             "<p>after</p><![CDATA[ <fragment> ]]>\n</BODY>\n</HTML>\n")
    composer = await start_composer(page(before + tag + after))
    resp, raw = await raw_get(composer, "/page")
    assert resp.status == 200
    assert raw == (before + "<b>F</b>" + after).encode("utf-8")
    assert svc.hits == {"/a": 1}


# ---------------------------------------------------------------- streaming

async def test_bytes_before_a_slow_fragment_are_streamed_first(fragments, start_composer):
    svc = await fragments({"/slow": slow("<p>SLOW</p>", 1.0)})
    composer = await start_composer(page(f"""\
        <html><head><title>T</title></head><body><h1>EARLY</h1>
        <fragment src="{svc.url('/slow')}" timeout="3000"></fragment>
        <p>LATE</p></body></html>
    """))
    t = await timed(composer, "/page")
    assert t.status == 200
    assert t.t_headers < 0.3
    assert t.at(b"<h1>EARLY</h1>") < 0.3
    assert t.at(b"<p>SLOW</p>") >= 0.9
    assert t.at(b"<p>LATE</p>") >= 0.9


async def test_fast_fragment_after_slow_one_waits_for_document_order(fragments, start_composer):
    hit: dict[str, float] = {}

    def timed_handler(name: str, body: str, delay: float):
        inner = slow(body, delay)

        async def handler(request: web.Request) -> web.Response:
            hit[name] = now()
            return await inner(request)
        return handler

    svc = await fragments({"/slow": timed_handler("slow", "<p>SLOW</p>", 0.5),
                           "/fast": timed_handler("fast", "<p>FAST</p>", 0.0)})
    composer = await start_composer(page(f"""\
        <body><h1>EARLY</h1><fragment src="{svc.url('/slow')}"></fragment><hr><fragment src="{svc.url('/fast')}"></fragment></body>
    """))
    t0 = now()
    t = await timed(composer, "/page")
    assert t.body == b"<body><h1>EARLY</h1><p>SLOW</p><hr><p>FAST</p></body>\n"
    assert t.at(b"<p>FAST</p>") >= t.at(b"<p>SLOW</p>") >= 0.45
    assert b"<hr>" not in b"".join(c for at, c in t.chunks if at < 0.4)
    assert hit["fast"] - t0 < 0.25  # fetched at once, only written in order
    assert t.at(b"</body>") < 0.8


async def test_nothing_arrives_before_a_delayed_primary(fragments, start_composer):
    svc = await fragments({"/p": slow("<main>P</main>", 0.5), "/o": html("<nav>O</nav>")})
    composer = await start_composer(page(f"""\
        <html><head><title>early bytes</title></head><body><fragment src="{svc.url('/o')}"></fragment>
        <fragment src="{svc.url('/p')}" primary timeout="2000"></fragment><footer>F</footer></body></html>
    """))
    t = await timed(composer, "/page")
    assert t.status == 200
    assert t.t_headers >= 0.45
    assert min(at for at, _ in t.chunks) >= 0.45
    assert t.body.index(b"<nav>O</nav>") < t.body.index(b"<main>P</main>") < t.body.index(b"<footer>")


# ---------------------------------------------------------------- 404 / 405

async def test_unmatched_path_is_404_small_html(start_composer):
    composer = await start_composer(page("<body>x</body>"))
    resp, body = await get(composer, "/nope")
    assert resp.status == 404
    assert resp.headers["Content-Type"].startswith("text/html")
    assert 0 < len(body) < 1024
    assert "404" in body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
async def test_wrong_method_is_405_with_allow(start_composer, method):
    composer = await start_composer(page("<body>x</body>"))
    async with composer.session.request(method, composer.url + "/page", timeout=CLIENT_TIMEOUT) as resp:
        body = await resp.text()
    assert resp.status == 405
    assert resp.headers["Allow"] == "GET, HEAD"
    assert "<body>x</body>" not in body


@pytest.mark.parametrize("status", [204, 205, 304])
async def test_primary_status_without_body_gives_an_empty_page_of_that_status(
        fragments, start_composer, status):
    # A composed body after a 204 head would corrupt the HTTP stream: the page follows the
    # primary and stays empty, and the connection stays usable for the next request.
    svc = await fragments({"/p": html("", status=status, headers={"Set-Cookie": "a=1"}),
                           "/o": html("<p>other</p>")})
    composer = await start_composer(page(
        f'<body><fragment src="{svc.url("/o")}"></fragment>'
        f'<fragment src="{svc.url("/p")}" primary></fragment></body>'))
    for _ in range(2):
        resp, body = await get(composer, "/page")
        assert resp.status == status
        assert body == ""
        assert resp.headers.getall("set-cookie") == ["a=1"]


async def test_browsers_leaving_mid_page_log_no_errors(fragments, start_composer):
    """50 browsers dropping their connections at once while pages stream: no traceback per
    departed browser (aiohttp logs one at ERROR when a handler raises a write failure)."""
    import random

    async def frag(_: web.Request) -> web.Response:
        await asyncio.sleep(random.uniform(0, 0.03))
        return web.Response(text="<p>x</p>" * 200, content_type="text/html")

    svc = await fragments({"/f": frag})
    frags = "".join(f'<fragment id="f{i}" src="{svc.url("/f")}"></fragment><p>between</p>' for i in range(6))
    composer = await start_composer({"page.html": f"<html><body><p>start</p>{frags}<p>end</p></body></html>"})
    with captured("aiohttp.server") as records:
        for _ in range(3):
            async with aiohttp.ClientSession() as session:
                async def browse() -> None:
                    while True:
                        async with session.get(composer.url + "/page") as resp:
                            await resp.read()

                tasks = [asyncio.create_task(browse()) for _ in range(50)]
                await asyncio.sleep(0.6)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.3)
    assert [r.getMessage() for r in records.records if r.levelno >= logging.ERROR] == []
    assert (await composer.get("/page"))[0].status == 200


async def test_server_timing_reports_the_primary_wait_and_composers_own_time(fragments, start_composer):
    svc = await fragments({"/main": html("<main>M</main>", delay=0.12), "/side": html("<p>S</p>")})
    composer = await start_composer({
        "page.html": f'<fragment id=\'pro"duct\' src="{svc.url("/main")}" primary></fragment>'
                     f'<fragment src="{svc.url("/side")}"></fragment>',
        "plain.html": f'<p>plain</p><fragment src="{svc.url("/side")}"></fragment>'},
        routes="routes:\n  - {name: page, match: {path: /page}, template: page.html}\n"
               "  - {name: plain, match: {path: /plain}, template: plain.html}\n")
    resp, body = await composer.get("/page")
    assert resp.status == 200 and "<main>M</main>" in body
    timing = resp.headers["server-timing"]
    match = re.fullmatch(r'primary;dur=([\d.]+);desc="pro\\"duct", composer;dur=([\d.]+)', timing)
    assert match, timing
    primary, own = float(match[1]), float(match[2])
    assert 115 <= primary < 2000 and 0 <= own < 50
    resp, _ = await composer.get("/plain")
    assert re.fullmatch(r"composer;dur=[\d.]+", resp.headers["server-timing"]), resp.headers["server-timing"]


async def test_server_timing_false_sends_no_header(fragments, start_composer):
    svc = await fragments({"/main": html("<main>M</main>")})
    composer = await start_composer({"page.html": f'<fragment src="{svc.url("/main")}" primary></fragment>'},
                                    settings="settings:\n  server_timing: false\n")
    resp, body = await composer.get("/page")
    assert resp.status == 200 and body == "<main>M</main>" and "server-timing" not in resp.headers


TIMING_MARKS = re.compile(r'<script>\(function\(m\)\{.*\}\)\((\[.*\])\)</script></body>')


async def test_timing_marks_write_one_script_with_every_fragments_time(fragments, start_composer):
    """settings.timing_marks: one script before </body> listing each fragment's start, duration,
    version, source and error (browsers run it: tests/test_browser.py); off, not a byte."""
    svc = await fragments({"/a": html("<p>A</p>", delay=0.1), "/bad": html("no", status=503),
                           "/late": html("<p>L</p>", delay=0.05)})
    page = (f'<body><fragment id="a" src="{svc.url("/a")}"></fragment>'
            f'<fragment id="b</script>" src="{svc.url("/bad")}"><i>fb</i></fragment>'
            f'<fragment id="late" src="{svc.url("/late")}" async></fragment></body>')
    composer = await start_composer({"page.html": page}, settings="settings:\n  timing_marks: true\n")
    resp, body = await composer.get("/page")
    assert resp.status == 200
    match = TIMING_MARKS.search(body)
    assert match, body
    assert "</script>\"" not in body and body.count("</script>") == 2  # the async move, the marks
    marks = {m[0]: m[1:] for m in json.loads(match[1])}
    assert set(marks) == {"a", "b</script>", "late"}
    start, duration, version, source, error = marks["a"]
    assert 0 <= start < 500 and 95 <= duration < 2000 and (version, source, error) == ("", "src", "")
    assert marks["b</script>"][2:] == ["", "inline", "status"]
    assert marks["late"][3:] == ["src", ""] and marks["late"][1] >= 45
    # The marks come after the async fragment's content: every fragment has finished by then.
    assert body.index("<p>L</p>") < match.start()

    plain = await start_composer({"page.html": page})
    resp, body = await plain.get("/page")
    assert resp.status == 200 and "performance" not in body


# ---------------------------------------------------------------- writes to the browser

async def _chunks(url: URL) -> tuple[list[int], bytes]:
    """GET `url` over a raw socket: the sizes of the chunks of its chunked body (one per write
    composer made), and the body."""
    import httptools

    sizes: list[int] = []
    body: list[bytes] = []
    done = asyncio.Event()

    class Sink:
        def on_chunk_header(self) -> None:
            sizes.append(0)

        def on_body(self, data: bytes) -> None:
            sizes[-1] += len(data)
            body.append(data)

        def on_message_complete(self) -> None:
            done.set()

    parser = httptools.HttpResponseParser(Sink())
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(f"GET {url.raw_path} HTTP/1.1\r\nHost: {url.host}\r\nConnection: close\r\n\r\n".encode())
    while not done.is_set() and (data := await reader.read(65536)):
        parser.feed_data(data)
    writer.close()
    return [s for s in sizes if s], b"".join(body)


async def test_fragments_ready_together_leave_in_few_writes_and_big_ones_in_slices(fragments, start_composer):
    """Fragments that are all ready when the stream reaches them go out joined, in writes of
    up to 64 KiB (not a write per piece: a 100-fragment page made ~400 system calls), and a
    fragment larger than that goes in 64 KiB slices of its own."""
    small = "<p>" + "s" * 2000 + "</p>"
    big = "<div>" + "b" * 200_000 + "</div>"
    routes = {"/first": slow("<h1>FIRST</h1>", 0.3), "/big": html(big)}
    routes.update({f"/f{i}": html(small) for i in range(60)})
    svc = await fragments(routes)
    tags = "\n".join(f'<fragment src="{svc.url(f"/f{i}")}"></fragment>' for i in range(60))
    c = await start_composer({"page.html": f"""
        <html><body>TOP<fragment src="{svc.url('/first')}"></fragment>
        {tags}
        <fragment src="{svc.url('/big')}"></fragment>END</body></html>"""})
    sizes, body = await _chunks(URL(c.url + "/page"))
    text = body.decode()
    assert text.count(small) == 60 and big in text and text.index("FIRST") < text.index(big) < text.index("END")
    assert max(sizes) <= 64 * 1024
    # TOP (before any fragment answers), then 60 × 2 KB + 200 KB ≈ 320 KB: five or six slices.
    assert sizes[0] < 100 and len(sizes) <= 9, sizes
