"""SPEC §3 in a real browser: headless Chromium (Debian's, driven by Playwright) loads pages
from a real composer composing real fragment services, all on 127.0.0.1.

What only a browser can show: that the async fragment's inline move script puts its content
at the placeholder, that stylesheets emitted once still style every fragment declaring them,
that each fragment script runs once and after its markup, that a failing fragment's inline
fallback is what the user sees, and that the composed page logs no errors.

One browser per module (launching costs about a second); every test gets its own browser
context (fresh cache, cookies) and its own servers. The tests and their async fixtures all
run on the module's event loop, which is why this file starts its servers itself instead of
using conftest's function-loop fixtures (`aiohttp_server`, `start_composer`).
"""

from __future__ import annotations

import asyncio
import errno
import struct
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from conftest import write_config
from playwright.async_api import (
    Browser,
    ConsoleMessage,
    Error,
    Page,
    Request,
    async_playwright,
)

from composer import load
from composer.demo import demo_app, example_at
from composer.server import ComposerServer

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps trying to reach Google's services,
# which a closed network answers with errors and delays.
CHROMIUM_ARGS = ["--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
NAV_TIMEOUT_MS = 15_000  # a broken composer fails a test, never hangs it


# ---------------------------------------------------------------- browser

@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """Debian's chromium; never a downloaded browser (the other browser test modules use it too)."""
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    """One browser for the module."""
    async with chromium() as launched:
        yield launched


@dataclass
class Tab:
    """A page in its own browser context, with what the browser reported while it loaded."""

    page: Page
    console_errors: list[str] = field(default_factory=list)
    favicon_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def requested(self, url: str) -> int:
        """How many network requests the page made for `url`."""
        return self.requests.count(url)

    async def goto(self, url: str) -> str:
        """Load `url` until its `load` event (the document fully streamed, deferred scripts
        run, stylesheets applied); return the raw HTML as composer sent it."""
        response = await self.page.goto(url, wait_until="load", timeout=NAV_TIMEOUT_MS)
        assert response is not None and response.status == 200, response and response.status
        return await response.text()

    async def js(self, expression: str) -> object:
        return await self.page.evaluate(expression)


@dataclass
class World:
    """Starts servers, composers and tabs for one test; stops them, newest first, at its end."""

    browser: Browser
    stack: AsyncExitStack
    tmp_path: Path

    async def serve(self, app: web.Application, port: int = 0) -> str:
        """Run `app` on 127.0.0.1:`port` (0: any free port); its origin."""
        return await serve(self.stack, app, port)

    async def compose(self, templates: dict[str, str], routes: str | None = None, settings: str = "") -> str:
        """A composer on a free loopback port for these templates (conftest's `write_config`)."""
        table = load(write_config(self.tmp_path, templates, routes, settings))
        return await start_composer(self.stack, ComposerServer(
            table, host="127.0.0.1", port=0, admin_port=0, grace=2))

    async def tab(self) -> Tab:
        return await open_tab(self.stack, self.browser)


async def serve(stack: AsyncExitStack, app: web.Application, port: int = 0) -> str:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, "127.0.0.1", port)
    deadline = time.monotonic() + 10
    while True:  # a fixed port (the demo's) may still be held by another test's demo for a moment
        try:
            await site.start()
            break
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or port == 0 or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    sockets = runner.addresses
    return f"http://127.0.0.1:{sockets[0][1]}"


async def start_composer(stack: AsyncExitStack, server: ComposerServer) -> str:
    stack.push_async_callback(server.stop)
    await server.start()
    return server.url


async def open_tab(stack: AsyncExitStack, browser: Browser) -> Tab:
    context = await browser.new_context(viewport={"width": 1000, "height": 800})
    stack.push_async_callback(context.close)
    page = await context.new_page()
    tab = Tab(page)

    def on_console(message: ConsoleMessage) -> None:
        if message.type != "error":
            return
        # Chromium asks for /favicon.ico on its own (after `load`, so only sometimes before
        # a test's last assertion) and logs its 404: the browser's request, not the page's.
        where = message.location.get("url", "")
        errors = tab.favicon_errors if where.endswith("/favicon.ico") else tab.console_errors
        errors.append(f"{message.text} at {where}")

    def on_page_error(error: Error) -> None:
        tab.page_errors.append(str(error))

    def on_request(request: Request) -> None:
        tab.requests.append(request.url)

    page.on("console", on_console)
    page.on("pageerror", on_page_error)
    page.on("request", on_request)
    return tab


@pytest_asyncio.fixture(loop_scope="module")
async def world(browser: Browser, tmp_path: Path) -> AsyncIterator[World]:
    async with AsyncExitStack() as stack:
        yield World(browser, stack, tmp_path)


# ---------------------------------------------------------------- composer demo

@dataclass
class Demo:
    url: str
    async_index: int  # the recommendations fragment's N in composer-async-N
    services: str  # the demo fragment services' origin
    admin: str  # composer's admin listener


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def demo(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Demo]:
    """What `composer demo` runs, in process: the demo fragment services on a free port and a
    copy of the repository's routes.yaml, templates and manifest pointing at it.
    Recommendations come after 0.4 s instead of 1.5 s: still last, so still streamed async."""
    async with AsyncExitStack() as stack:
        origin = await serve(stack, demo_app(recommendation_delay=0.4))
        table = load(example_at(origin, tmp_path_factory.mktemp("demo")))
        product = next(r for r in table.routes if r.name == "product")
        assert product.template is not None
        recos = next(f for f in product.template.fragments if f.id == "recommendations")
        server = ComposerServer(table, host="127.0.0.1", port=0, admin_port=0, grace=2)
        url = await start_composer(stack, server)
        yield Demo(url, recos.index, origin, server.admin_url)


async def test_demo_async_fragment_lands_at_its_placeholder(demo: Demo, world: World) -> None:
    """The streamed-last recommendations end up between the product and the reviews, where
    the template has them, and the placeholder and hidden carrier are gone."""
    tab = await world.tab()
    raw = await tab.goto(demo.url + "/products/42")
    n = demo.async_index
    # As sent: a placeholder in place, the content near the end in a hidden carrier.
    placeholder = f'<template id="composer-async-{n}"></template>'
    carrier = f'<div hidden id="composer-async-{n}-content">'
    assert placeholder in raw and carrier in raw, raw
    assert raw.index(placeholder) < raw.index("Reviews are taking a break") < raw.index(carrier)

    # As the browser has it: moved into place.
    order = await tab.js("""[...document.querySelector("main").children]
        .filter(e => !["SCRIPT", "LINK"].includes(e.tagName))
        .map(e => e.tagName.toLowerCase() + (e.className ? "." + e.className : ""))""")
    assert order == ["article.product", "aside.recos", "section.reviews"], order
    assert await tab.js("document.querySelectorAll('[id^=\"composer-async\"]').length") == 0
    assert await tab.js("document.querySelectorAll('template').length") == 0
    assert await tab.page.locator("aside.recos").is_visible()
    assert await tab.page.get_by_text("You may also like").is_visible()
    assert await tab.page.get_by_text("No recommendations right now").count() == 0
    assert await tab.js("document.querySelectorAll('footer').length") == 1
    assert await tab.js("!!(document.querySelector('main').compareDocumentPosition("
                        "document.querySelector('footer')) & Node.DOCUMENT_POSITION_FOLLOWING)")


async def test_the_demo_footers_deliberate_error_shows_in_metrics_once_the_page_is_left(
        demo: Demo, world: World) -> None:
    """What a newcomer sees: open a demo page, leave it, and the footer 2.4.0's client error
    is counted under its fragment, version and owner's route."""
    series = 'composer_client_errors_total{fragment="footer",kind="error",route="product",version="2.4.0"}'

    async def count() -> float:
        async with aiohttp.ClientSession() as session, session.get(demo.admin + "/metrics") as resp:
            text = await resp.text()
        return next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series)), -1.0)

    before = await count()
    assert before >= 0  # declared at 0 from the start
    tab = await world.tab()
    await tab.goto(demo.url + "/products/42")
    await tab.page.goto("about:blank")  # leaving the page sends its beacon
    deadline = time.monotonic() + 10
    while await count() < before + 1:
        assert time.monotonic() < deadline, "the footer's client error was never counted"
        await asyncio.sleep(0.1)


async def test_demo_pages_are_clean_and_screenshot(demo: Demo, world: World, tmp_path: Path) -> None:
    """The demo as a user sees it: styled, enhanced by its script, the failing reviews
    fragment replaced by its inline fallback, no console errors but the footer 2.4.0's
    deliberate one (client signals, SPEC §7); a screenshot is kept."""
    tab = await world.tab()
    await tab.goto(demo.url + "/")
    assert await tab.page.locator("footer").is_visible()
    tab.requests.clear()
    await tab.goto(demo.url + "/products/42")

    on_purpose = "footer 2.4.0: a bug shipped on purpose"
    assert all(on_purpose in e for e in tab.console_errors + tab.page_errors), (tab.console_errors, tab.page_errors)
    product = tab.page.locator("article.product")
    assert await product.get_attribute("data-enhanced") == "true"          # product.js ran
    assert await product.evaluate("e => getComputedStyle(e).borderTopLeftRadius") == "8px"  # product.css
    assert "system-ui" in await tab.js("getComputedStyle(document.body).fontFamily")     # site.css
    assert await tab.page.get_by_text("Reviews are taking a break").is_visible()
    assert await tab.page.get_by_text("reviews are down").count() == 0     # the 503 body is not shown
    # The primary product's assets are preloaded (the page's Link header) and then used by
    # the <link>/<script> composer emits: one request each, not two.
    for asset in ("product.css", "product.js"):
        assert tab.requested(f"{demo.services}/static/{asset}") == 1, (asset, tab.requests)

    shot = tmp_path / "demo.png"
    await tab.page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 800 and height >= 300, (width, height)
    assert len(data) > 10_000, len(data)  # a blank page compresses to far less
    print(f"\ndemo screenshot: {shot}")


# ---------------------------------------------------------------- misbehaving fragments

# A fragment script that records, for the test to read back: how often it ran, whether its
# fragment's element exists, precedes the script tag and sits in its template slot (so is
# already moved, for an async one), and how many composer-async placeholders/carriers remain.
SCRIPT = """\
(function () {
  var el = document.getElementById(%(id)r), me = document.currentScript;
  window.runs = window.runs || {};
  window.runs[%(name)r] = (window.runs[%(name)r] || 0) + 1;
  window.seen = window.seen || {};
  window.seen[%(name)r] = {
    markup: !!el,
    after: !!el && !!(me.compareDocumentPosition(el) & Node.DOCUMENT_POSITION_PRECEDING),
    parent: el && el.parentElement ? el.parentElement.id : null,
    carriers: document.querySelectorAll('[id^="composer-async"]').length
  };
})();
"""

# Cacheable, as fragment teams' assets on a CDN are; nc.css is not (no-store), which shows
# whether a stylesheet is fetched again when the async move script moves its <link>.
ASSET_CACHE_CONTROL = "max-age=3600"
STATIC = {
    "shared.css": ".frag { color: rgb(1, 2, 3); }",
    "a.css": "#a { padding-left: 17px; }",
    "b.css": "#b { padding-left: 23px; }",
    "c.css": "#c { padding-left: 29px; }",
    "nc.css": "#d { padding-left: 31px; }",
    "shared.js": SCRIPT % {"id": "a", "name": "shared"},
    "a.js": SCRIPT % {"id": "a", "name": "a"},
    "b.js": SCRIPT % {"id": "b", "name": "b"},
    "c.js": SCRIPT % {"id": "c", "name": "c"},
    "x.js": SCRIPT % {"id": "x", "name": "x"},
}


@dataclass
class Services:
    """The fragment services' origin and how often each path was requested."""

    origin: str
    hits: dict[str, int]

    def url(self, path: str) -> str:
        return self.origin + path


def services_app(hits: dict[str, int]) -> web.Application:
    """Fragments a, b (sharing a stylesheet and a script), c (slower, used async), x (its first
    script 404s), down (500) and slow (answers after the page gave up), plus their assets."""

    def link(request: web.Request, *assets: tuple[str, str]) -> str:
        return ", ".join(f'<http://{request.host}/static/{name}>; rel="{rel}"' for name, rel in assets)

    def fragment(markup: str, *assets: tuple[str, str], delay: float = 0.0, status: int = 200) -> Callable[
            [web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            await asyncio.sleep(delay)
            return web.Response(text=markup, status=status, content_type="text/html",
                                headers={"link": link(request, *assets)} if assets else None)
        return handler

    async def slow(request: web.Request) -> web.Response:
        end = time.monotonic() + 5
        while time.monotonic() < end and request.transport is not None and not request.transport.is_closing():
            await asyncio.sleep(0.02)  # returns as soon as composer hangs up: teardown stays fast
        return web.Response(text='<p id="slow-content">too late</p>', content_type="text/html")

    async def static(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        kind = "text/css" if name.endswith(".css") else "application/javascript"
        cache = "no-store" if name == "nc.css" else ASSET_CACHE_CONTROL
        return web.Response(text=STATIC[name], content_type=kind, headers={"cache-control": cache})

    @web.middleware
    async def count(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        hits[request.path] = hits.get(request.path, 0) + 1
        return await handler(request)

    css, js = "stylesheet", "fragment-script"
    app = web.Application(middlewares=[count])
    app.router.add_get("/a", fragment('<div id="a" class="frag">A</div>',
                                      ("shared.css", css), ("a.css", css), ("shared.js", js), ("a.js", js)))
    app.router.add_get("/b", fragment('<div id="b" class="frag">B</div>',
                                      ("shared.css", css), ("b.css", css), ("shared.js", js), ("b.js", js)))
    app.router.add_get("/c", fragment('<div id="c" class="frag">C</div>',
                                      ("c.css", css), ("shared.css", css), ("c.js", js), delay=0.2))
    app.router.add_get("/d", fragment('<div id="d" class="frag">D</div>', ("nc.css", css), delay=0.1))
    app.router.add_get("/x", fragment('<div id="x">X</div>', ("missing.js", js), ("x.js", js)))
    app.router.add_get("/down", fragment("<p>boom</p>", status=500))
    app.router.add_get("/slow", slow)
    app.router.add_get("/static/{name}", static)
    return app


async def start_services(world: World) -> Services:
    hits: dict[str, int] = {}
    return Services(await world.serve(services_app(hits)), hits)


def shop_page(svc: Services) -> str:
    """a is primary (its assets are also preloaded via the page's Link header), c async
    between a and b; every fragment sits in a slot so its final position is checkable."""
    return textwrap.dedent(f"""\
        <!DOCTYPE html>
        <html lang="en"><head><meta charset="utf-8"><title>shop</title></head>
        <body>
          <div id="slot-a"><fragment id="a" src="{svc.url('/a')}" primary></fragment></div>
          <div id="slot-c"><fragment id="c" src="{svc.url('/c')}" async><p id="c-fallback">no C</p></fragment></div>
          <div id="slot-b"><fragment id="b" src="{svc.url('/b')}"></fragment></div>
          <div id="slot-d"><fragment id="d" src="{svc.url('/d')}" async></fragment></div>
        </body></html>
    """)


async def test_stylesheets_apply_and_load_once(world: World) -> None:
    """Two fragments (one of them async) declaring the same stylesheet: one <link>, one
    request, and it still styles all of them; each fragment's own stylesheet applies."""
    svc = await start_services(world)
    url = await world.compose({"page.html": shop_page(svc)})
    tab = await world.tab()
    await tab.goto(url + "/page")

    style = "id => { const s = getComputedStyle(document.getElementById(id)); return [s.color, s.paddingLeft]; }"
    assert await tab.page.evaluate(style, "a") == ["rgb(1, 2, 3)", "17px"]
    assert await tab.page.evaluate(style, "b") == ["rgb(1, 2, 3)", "23px"]
    assert await tab.page.evaluate(style, "c") == ["rgb(1, 2, 3)", "29px"]
    assert await tab.page.evaluate(style, "d") == ["rgb(1, 2, 3)", "31px"]

    for name in ("shared.css", "a.css", "b.css", "c.css", "nc.css"):
        href = svc.url(f"/static/{name}")
        links = await tab.page.evaluate(
            "href => [...document.querySelectorAll('link[rel=stylesheet]')].filter(l => l.href === href).length",
            href)
        assert links == 1, (name, links)
        assert tab.requested(href) == 1, (name, tab.requests)
        entries = await tab.page.evaluate(
            "href => performance.getEntriesByType('resource').filter(e => e.name === href).length", href)
        assert entries == 1, (name, entries)
        assert svc.hits.get(f"/static/{name}") == 1, (name, svc.hits)
    assert tab.console_errors == [] and tab.page_errors == [], (tab.console_errors, tab.page_errors)


async def test_scripts_run_once_after_their_markup(world: World) -> None:
    """Every fragment script runs exactly once (the one both a and b declare too), placed
    after its fragment's markup; the async fragment's script runs once its content is at
    the placeholder. The healthy page logs no errors."""
    svc = await start_services(world)
    url = await world.compose({"page.html": shop_page(svc)})
    tab = await world.tab()
    await tab.goto(url + "/page")

    assert await tab.js("window.runs") == {"shared": 1, "a": 1, "b": 1, "c": 1}
    seen = await tab.js("window.seen")
    assert isinstance(seen, dict)
    for name, slot in (("shared", "slot-a"), ("a", "slot-a"), ("b", "slot-b"), ("c", "slot-c")):
        assert seen[name] == {"markup": True, "after": True, "parent": slot, "carriers": 0}, (name, seen[name])
    assert await tab.js("document.getElementById('c-fallback')") is None
    order = await tab.js("[...document.querySelectorAll('.frag')].map(e => e.id)")
    assert order == ["a", "c", "b", "d"], order
    for name in ("shared.js", "a.js", "b.js", "c.js"):
        assert tab.requested(svc.url(f"/static/{name}")) == 1, (name, tab.requests)
    assert tab.console_errors == [] and tab.page_errors == [], (tab.console_errors, tab.page_errors)


BROKEN_PAGE = """\
    <!DOCTYPE html>
    <html lang="en"><head><meta charset="utf-8"><title>broken</title></head>
    <body>
      <div id="slot-x"><fragment id="x" src="{x}"></fragment></div>
      <div id="slot-down"><fragment id="down" src="{down}"><p id="down-fallback">down fallback</p></fragment></div>
      <div id="slot-slow"><fragment id="slow" src="{slow}" timeout="300"><p id="slow-fallback">slow fallback</p></fragment></div>
      <div id="slot-adown"><fragment id="adown" src="{down}" async><p id="adown-fallback">async fallback</p></fragment></div>
      <div id="slot-c"><fragment id="c" src="{c}" async></fragment></div>
      <div id="slot-b"><fragment id="b" src="{b}"></fragment></div>
      <div id="slot-anone"><fragment id="anone" src="{down}" async></fragment></div>
    </body></html>
"""


async def broken_page(world: World) -> tuple[Services, Tab]:
    svc = await start_services(world)
    url = await world.compose({"page.html": BROKEN_PAGE.format(
        **{name: svc.url("/" + name) for name in ("x", "down", "slow", "c", "b")})})
    tab = await world.tab()
    await tab.goto(url + "/page")
    return svc, tab


async def test_a_404_script_does_not_stop_other_scripts(world: World) -> None:
    """The first fragment's first script 404s: its next script, and every later fragment's
    scripts (sync and async), still run, once each."""
    svc, tab = await broken_page(world)
    assert svc.hits.get("/static/missing.js"), svc.hits  # the browser really asked, and got a 404
    assert await tab.js("window.runs") == {"x": 1, "b": 1, "c": 1, "shared": 1}
    seen = await tab.js("window.seen")
    assert isinstance(seen, dict)
    for name, slot in (("x", "slot-x"), ("b", "slot-b"), ("c", "slot-c")):
        assert seen[name] == {"markup": True, "after": True, "parent": slot, "carriers": 0}, (name, seen[name])
    assert tab.page_errors == [], tab.page_errors
    assert tab.console_errors and all("404" in e and "/static/missing.js" in e for e in tab.console_errors), \
        tab.console_errors


async def test_failed_fragments_show_their_inline_fallback(world: World) -> None:
    """A fragment answering 500 and one timing out show the markup inside their <fragment>
    element, in place; so does a failing async one, at its placeholder."""
    _, tab = await broken_page(world)
    for fallback, slot in (("down-fallback", "slot-down"), ("slow-fallback", "slot-slow"),
                           ("adown-fallback", "slot-adown")):
        locator = tab.page.locator(f"#{fallback}")
        assert await locator.is_visible(), fallback
        assert await locator.evaluate("e => e.parentElement.id") == slot, fallback
    assert await tab.page.get_by_text("boom").count() == 0
    assert await tab.js("document.getElementById('slow-content')") is None
    assert await tab.js("document.querySelectorAll('[id^=\"composer-async\"]').length") == 0
    # An async fragment that failed with no fallback leaves nothing, not even its placeholder.
    assert await tab.js("document.getElementById('slot-anone').childNodes.length") == 0
    assert await tab.js("document.querySelectorAll('template').length") == 0
    order = await tab.js("[...document.body.querySelectorAll('[id]')].map(e => e.id)"
                         ".filter(id => !id.startsWith('slot-'))")
    assert order == ["x", "down-fallback", "slow-fallback", "adown-fallback", "c", "b"], order
    assert tab.page_errors == [], tab.page_errors


async def test_fragment_timings_reach_devtools(world: World) -> None:
    """Server-Timing (the primary's wait, composer's own time) as the browser's navigation
    entry reports it, and with settings.timing_marks one `performance.measure` per fragment on
    DevTools' "composer" track, each as long as its fetch, with version, source and error."""
    svc = await start_services(world)
    page = textwrap.dedent(f"""\
        <!DOCTYPE html><html><head><title>t</title></head><body>
        <fragment id="a" src="{svc.url('/a')}" primary></fragment>
        <fragment id="c" src="{svc.url('/c')}" async></fragment>
        <fragment id="down" src="{svc.url('/down')}"><p>fb</p></fragment>
        </body></html>
    """)
    url = await world.compose({"page.html": page}, settings="settings:\n  timing_marks: true\n")
    tab = await world.tab()
    await tab.goto(url + "/page")
    timing = await tab.js("performance.getEntriesByType('navigation')[0].serverTiming"
                          ".map(t => [t.name, t.duration, t.description])")
    assert isinstance(timing, list) and [t[0] for t in timing] == ["primary", "composer"], timing
    assert timing[0][2] == "a" and timing[0][1] >= 0 and timing[1][1] >= 0
    measures = await tab.js("""Object.fromEntries(performance.getEntriesByType('measure').map(m =>
        [m.name, {start: m.startTime, duration: m.duration, version: m.detail.version, source: m.detail.source,
                  error: m.detail.error, track: m.detail.devtools.track, color: m.detail.devtools.color}]))""")
    assert isinstance(measures, dict) and set(measures) == {"fragment a", "fragment c", "fragment down"}, measures
    c, down = measures["fragment c"], measures["fragment down"]
    assert 195 <= c["duration"] < 3000 and (c["source"], c["error"], c["color"]) == ("src", "", "primary")
    assert (down["source"], down["error"], down["color"]) == ("inline", "status", "error")
    assert all(m["track"] == "composer" and m["version"] == "" and m["start"] > 0 for m in measures.values())
    request_start = await tab.js("performance.getEntriesByType('navigation')[0].requestStart")
    assert isinstance(request_start, float | int)
    assert all(request_start <= m["start"] < request_start + 1000 for m in measures.values()), measures
    assert tab.console_errors == [] and tab.page_errors == [], (tab.console_errors, tab.page_errors)
