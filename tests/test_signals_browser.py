"""SPEC §7 in a real browser: what each fragment does in Chromium, counted per fragment and version.

Real fragment services on 127.0.0.1 (one of them on a second origin), a real composer with
`client_signals: true`, Debian's chromium driven by Playwright (launched as test_browser does,
once for this module; its `World`, `Tab` and `open_tab`). The collector sends its beacon with `navigator.sendBeacon` when the page is hidden
or left: each test leaves the page (about:blank) and then polls composer's /metrics until the
counts are there. Every assertion is on the exact set of series that moved, so an error counted
under the wrong fragment, version or kind fails the test as surely as a missing one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

import aiohttp
import pytest
from aiohttp import web
from conftest import captured, write_config
from prometheus_client.parser import text_string_to_metric_families
from test_browser import Tab, World, browser, open_tab, start_composer, world  # noqa: F401  (fixtures)

from composer import load
from composer.server import ComposerServer

pytestmark = pytest.mark.asyncio(loop_scope="module")

SIGNALS_ON = "settings:\n  client_signals: true\n"
Labels = frozenset[tuple[str, str]]


# ---------------------------------------------------------------- browser, servers, metrics

async def tab_of(world: World) -> Tab:
    return await open_tab(world.stack, world.browser)


async def composer(world: World, templates: dict[str, str], routes: str | None = None,
                   settings: str = SIGNALS_ON) -> ComposerServer:
    """A composer (page and admin ports free) for these templates; routes.yaml may carry an
    inline `fragments:` manifest."""
    folder = world.tmp_path / f"composer-{time.monotonic_ns()}"
    folder.mkdir()
    server = ComposerServer(load(write_config(folder, templates, routes, settings)),
                            host="127.0.0.1", port=0, admin_port=0, grace=2)
    await start_composer(world.stack, server)
    return server


Assets = Mapping[str, tuple[str, str]]  # path → (content type, body)
Fragments = dict[str, tuple[str, str, float]]  # name → (markup, Link header, delay)


def fragment_service(fragments: Fragments, assets: Assets) -> web.Application:
    """`/f/<name>` → a fragment (`fragments` may be filled once the service knows its origin);
    `/static/<name>` and `/assets/<name>` → an asset (404 for any other). Every answer carries
    `Access-Control-Allow-Origin: *`: composer writes fragment scripts with `crossorigin`, so a
    script from another origin than the page's loads only with it."""

    @web.middleware
    async def cors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                   ) -> web.StreamResponse:
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers["access-control-allow-origin"] = "*"
            raise
        response.headers["access-control-allow-origin"] = "*"
        return response

    async def fragment(request: web.Request) -> web.Response:
        markup, link, delay = fragments[request.match_info["name"]]
        if delay:
            await asyncio.sleep(delay)
        return web.Response(text=markup, content_type="text/html", headers={"link": link} if link else None)

    async def asset(request: web.Request) -> web.Response:
        found = assets.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        kind, body = found
        return web.Response(text=body, content_type=kind)

    app = web.Application(middlewares=[cors])
    app.router.add_get("/f/{name}", fragment)
    app.router.add_get("/static/{name}", asset)
    app.router.add_get("/assets/{name}", asset)
    return app


def js(body: str) -> tuple[str, str]:
    return "application/javascript", body


async def scrape(admin: str) -> dict[str, dict[Labels, float]]:
    """composer's /metrics: sample name → {label set: value}."""
    async with aiohttp.ClientSession() as session, session.get(admin + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    out: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return out


def moved(samples: dict[str, dict[Labels, float]], name: str, *keys: str) -> dict[tuple[str, ...], float]:
    """The series of `name` with a non-zero value, keyed by the values of `keys`."""
    return {tuple(dict(labels).get(k, "") for k in keys): value
            for labels, value in samples.get(name, {}).items() if value}


async def wait_for(admin: str, probe: Callable[[dict[str, dict[Labels, float]]], bool], what: str,
                   deadline: float = 5.0) -> dict[str, dict[Labels, float]]:
    """Scrape `admin` every 50 ms until `probe(samples)` holds; fail after `deadline` s."""
    end = time.monotonic() + deadline
    while True:
        samples = await scrape(admin)
        if probe(samples):
            return samples
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}; client series: "
                        f"{moved(samples, 'composer_client_errors_total', 'fragment', 'version', 'kind')} "
                        f"{moved(samples, 'composer_client_vital_seconds_count', 'name', 'fragment')} "
                        f"dropped {moved(samples, 'composer_client_signals_dropped_total', 'reason')}")
        await asyncio.sleep(0.05)


async def leave(tab: Tab) -> None:
    """Navigate away: the page is hidden, then unloaded, and the collector sends its beacon."""
    await tab.page.goto("about:blank")


def errors(samples: dict[str, dict[Labels, float]]) -> dict[tuple[str, ...], float]:
    return moved(samples, "composer_client_errors_total", "route", "fragment", "version", "kind")


def link(*assets: tuple[str, str]) -> str:
    """A Link header declaring (url, rel) assets."""
    return ", ".join(f'<{url}>; rel="{rel}"' for url, rel in assets)


# ---------------------------------------------------------------- 1. errors, per fragment and version

def marked(name: str, body: str) -> str:
    """A script that notes it ran (window.ran) before `body`."""
    return f'window.ran = (window.ran || []).concat("{name}"); {body}'


ERROR_ASSETS = {
    "linked.js": js(marked("linked", 'throw new Error("linked boom");')),
    "same.js": js(marked("same", 'throw new Error("same boom");')),
    "reject.js": js(marked("reject", 'Promise.reject(new Error("reject boom"));')),
    "fine.js": js(marked("fine", "")),
}
OTHER_ASSETS = {"cross.js": js(marked("cross", 'throw new Error("cross boom");'))}

# Manifest fragments (inline in routes.yaml) with several versions each: the one served must be
# the one counted (linked: the canary, served to every bucket; the others: their active one).
ERRORS_ROUTES = """\
fragments:
  linked:
    owner: team-linked
    versions: {{"1.0.0": "{svc}/f/linked", "2.0.0": "{svc}/f/linked"}}
    active: "1.0.0"
    canary: {{version: "2.0.0", percent: 100}}
  cross:
    owner: team-cross
    versions: {{"3.1.0": "{svc}/f/cross", "3.2.0": "{svc}/f/cross"}}
    active: "3.1.0"
  inline:
    owner: team-inline
    versions: {{"4.0.0": "{svc}/f/inline"}}
    active: "4.0.0"
  reject:
    owner: team-reject
    versions: {{"5.0.0": "{svc}/f/reject"}}
    active: "5.0.0"
  late:
    owner: team-late
    versions: {{"6.0.0": "{svc}/f/late", "6.1.0": "{svc}/f/late"}}
    active: "6.1.0"
  css404:
    owner: team-css
    versions: {{"7.0.0": "{svc}/f/css404"}}
    active: "7.0.0"
  fine:
    owner: team-fine
    versions: {{"9.0.0": "{svc}/f/fine"}}
    active: "9.0.0"
routes:
  - name: shop
    match: {{path: /shop}}
    template: page.html
  - name: assets
    match: {{path_prefix: /assets}}
    backend: {svc}
"""

# The page's own inline script sits between fragments (after `inline`'s closing marker): its
# error is the page's, not the fragment's before it.
ERRORS_PAGE = """\
<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>errors</title></head>
<body>
<main>
  <div id="slot-linked"><fragment name="linked"></fragment></div>
  <div id="slot-cross"><fragment name="cross"></fragment></div>
  <div id="slot-same"><fragment id="same" src="{svc}/f/same"></fragment></div>
  <div id="slot-inline"><fragment name="inline"></fragment></div>
  <script>window.pageState = document.readyState; throw new Error("page boom");</script>
  <div id="slot-late"><fragment name="late" async></fragment></div>
  <div id="slot-reject"><fragment name="reject"></fragment></div>
  <div id="slot-css404"><fragment name="css404"></fragment></div>
  <div id="slot-img404"><fragment id="img404" src="{svc}/f/img404"></fragment></div>
  <div id="slot-js404"><fragment id="js404" src="{svc}/f/js404"></fragment></div>
  <div id="slot-fine"><fragment name="fine"></fragment></div>
</main>
</body></html>
"""


async def errors_page(world: World) -> tuple[ComposerServer, str, str]:
    """A composer serving ERRORS_PAGE at /shop; the fragment service's origin and the other one's."""
    other = await world.serve(fragment_service({}, OTHER_ASSETS))
    fragments: Fragments = {}
    svc = await world.serve(fragment_service(fragments, ERROR_ASSETS))
    fragments.update({
        "linked": ('<p id="linked">linked</p>', link((f"{svc}/static/linked.js", "fragment-script")), 0.0),
        # its script on another origin (answering Access-Control-Allow-Origin: *)
        "cross": ('<p id="cross">cross</p>', link((f"{other}/static/cross.js", "fragment-script")), 0.0),
        # root-relative: the page's own origin serves it (the `assets` backend route)
        "same": ('<p id="same">same</p>', link(("/assets/same.js", "fragment-script")), 0.0),
        # an inline script throwing while the page is still being parsed
        "inline": (('<p id="inline">inline</p><script>window.inlineState = document.readyState;'
                    'throw new Error("inline boom");</script><p>after</p>'), "", 0.0),
        "reject": ('<p id="reject">reject</p>', link((f"{svc}/static/reject.js", "fragment-script")), 0.0),
        # async (streamed last, moved to its placeholder by the collector); its inline script
        # throws, its stylesheet (written before its carrier, outside its markers) is a 404
        "late": ('<p id="late">late</p><script>throw new Error("late boom");</script>',
                 link((f"{svc}/static/late-missing.css", "stylesheet")), 0.3),
        "css404": ('<p id="css404">css</p>', link((f"{svc}/static/missing.css", "stylesheet")), 0.0),
        "img404": (f'<p id="img404">img</p><img src="{svc}/static/missing.png" alt="">', "", 0.0),
        "js404": ('<p id="js404">js</p>', link((f"{svc}/static/missing.js", "fragment-script")), 0.0),
        "fine": ('<p id="fine">fine</p>', link((f"{svc}/static/fine.js", "fragment-script")), 0.0),
    })
    server = await composer(world, {"page.html": ERRORS_PAGE.format(svc=svc)},
                            SIGNALS_ON + ERRORS_ROUTES.format(svc=svc), settings="")
    return server, svc, other


async def test_each_error_kind_counts_for_its_fragment_and_version(world: World) -> None:
    """Uncaught errors from a fragment's Link script (on the fragment service's origin, on a
    second origin, root-relative on the page's own), from an inline script while the page is
    parsing, from an async fragment's inline script; an unhandled rejection; a 404 stylesheet
    (also an async fragment's), a 404 image and a 404 script; an error outside every fragment:
    each counted once, under its own fragment, the version served and its kind — and nothing
    else counted (a healthy fragment stays at 0). Each is also a `client error` log line with owner and the page's request id."""
    server, svc, other = await errors_page(world)
    tab = await tab_of(world)
    with captured("composer.signals") as records:
        raw = await tab.goto(server.url + "/shop")
        assert 'crossorigin' in raw and "<!--composer:" in raw
        assert sorted(await tab.js("window.ran") or []) == ["cross", "fine", "linked", "reject", "same"]
        assert await tab.js("[window.inlineState, window.pageState]") == ["loading", "loading"]
        # the async fragment is at its placeholder, its carrier and the move marker are gone
        assert await tab.js("document.getElementById('late').parentElement.id") == "slot-late"
        assert await tab.js("document.querySelectorAll('[id^=\"composer-async\"], template').length") == 0
        data = await tab.js("JSON.parse(document.getElementById('composer-signals').textContent)")
        assert isinstance(data, dict)
        await leave(tab)

        expected = {
            ("shop", "linked", "2.0.0", "error"): 1.0,
            ("shop", "cross", "3.1.0", "error"): 1.0,
            ("shop", "same", "", "error"): 1.0,
            ("shop", "inline", "4.0.0", "error"): 1.0,
            ("shop", "late", "6.1.0", "error"): 1.0,
            ("shop", "late", "6.1.0", "asset"): 1.0,
            ("shop", "reject", "5.0.0", "rejection"): 1.0,
            ("shop", "css404", "7.0.0", "asset"): 1.0,
            ("shop", "img404", "", "asset"): 1.0,
            ("shop", "js404", "", "asset"): 1.0,
            ("shop", "page", "", "error"): 1.0,
        }
        samples = await wait_for(server.admin_url, lambda s: set(errors(s)) >= set(expected), "every error")
        await asyncio.sleep(0.2)  # a second beacon (pagehide after visibilitychange) must add nothing
        samples = await scrape(server.admin_url)
        assert errors(samples) == expected
        # the versions not served, and the healthy fragment, are there at 0
        zero = samples["composer_client_errors_total"]
        for fragment, version in (("linked", "1.0.0"), ("cross", "3.2.0"), ("late", "6.0.0"), ("fine", "9.0.0")):
            labels = frozenset({"route": "shop", "fragment": fragment, "version": version, "kind": "error"}.items())
            assert zero.get(labels) == 0.0, (fragment, version)
        assert not moved(samples, "composer_client_signals_dropped_total", "reason")

    by_kind = {(r.fields["fragment"], r.fields["kind"]): r.fields for r in records.records
               if r.getMessage() == "client error"}
    assert set(by_kind) == {(f, kind) for _, f, _, kind in expected}
    assert by_kind["late", "asset"]["source"] == f"{svc}/static/late-missing.css"
    lines = {f: fields for (f, kind), fields in by_kind.items() if (f, kind) != ("late", "asset")}
    assert "late boom" in lines["late"]["message"] and lines["late"]["version"] == "6.1.0"
    assert lines["cross"] == {"fragment": "cross", "version": "3.1.0", "owner": "team-cross", "route": "shop",
                              "kind": "error", "message": "Uncaught Error: cross boom",
                              "source": f"{other}/static/cross.js", "request_id": data["id"]}
    assert lines["css404"]["source"] == f"{svc}/static/missing.css" and lines["css404"]["owner"] == "team-css"
    assert lines["img404"]["source"] == f"{svc}/static/missing.png"
    assert lines["js404"]["source"] == f"{svc}/static/missing.js"
    assert "reject boom" in lines["reject"]["message"]
    assert "inline boom" in lines["inline"]["message"] and lines["inline"]["owner"] == "team-inline"
    assert "page boom" in lines["page"]["message"] and lines["page"]["owner"] == ""
    assert all(r.levelno == logging.WARNING for r in records.records)


# ---------------------------------------------------------------- 2. Web Vitals, per fragment

VITALS_PAGE = """\
<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>vitals</title>
<style>body {{ margin: 0; font: 14px sans-serif; }} p {{ margin: 0; }}</style></head>
<body>
<p>the page's own small line</p>
<fragment id="hero" src="{svc}/f/hero"></fragment>
<fragment id="widget" src="{svc}/f/widget"></fragment>
<fragment id="banner" src="{svc}/f/banner" async></fragment>
<fragment id="below" src="{svc}/f/below"></fragment>
</body></html>
"""

# A click handler busy for 120 ms: an interaction INP must see.
WIDGET_JS = """\
document.getElementById("slow-button").addEventListener("click", function () {
  var end = performance.now() + 120; while (performance.now() < end) {}
});
"""


async def test_vitals_name_the_fragment_holding_their_element(world: World) -> None:
    """LCP names the fragment holding the largest element (a big text block), INP the one
    holding the clicked button, CLS the one holding the element a late async banner pushed
    down; FCP and TTFB count under `page`. No vital is counted under any other fragment."""
    fragments: Fragments = {}
    svc = await world.serve(fragment_service(fragments, {"widget.js": js(WIDGET_JS)}))
    fragments.update({
        "hero": ('<p id="hero" style="font-size:40px; height:320px">' + "A big hero block of text. " * 12 + "</p>",
                 "", 0.0),
        "widget": ('<button id="slow-button" style="font-size:12px">go</button>',
                   link((f"{svc}/static/widget.js", "fragment-script")), 0.0),
        "banner": ('<div id="banner" style="height:200px; background:#fc0">late banner</div>', "", 0.6),
        "below": ('<p id="below" style="height:150px; background:#ccc">below the banner</p>', "", 0.0),
    })
    server = await composer(world, {"page.html": VITALS_PAGE.format(svc=svc)})
    tab = await tab_of(world)
    await tab.goto(server.url + "/page")
    assert await tab.js("document.getElementById('banner').nextElementSibling.id") == "below"
    await tab.page.click("#slow-button")
    await tab.page.wait_for_timeout(100)  # the interaction's event timing entry is delivered
    await leave(tab)

    def vitals(samples: dict[str, dict[Labels, float]]) -> dict[tuple[str, ...], float]:
        found = moved(samples, "composer_client_vital_seconds_count", "route", "name", "fragment")
        found.update({("page", "CLS", fragment): n for (fragment,), n in
                      moved(samples, "composer_client_cls_count", "fragment").items()})
        return found

    expected = {("page", "LCP", "hero"), ("page", "INP", "widget"), ("page", "CLS", "below"),
                ("page", "FCP", "page"), ("page", "TTFB", "page")}
    samples = await wait_for(server.admin_url, lambda s: set(vitals(s)) >= expected, "every vital")
    await asyncio.sleep(0.2)
    samples = await scrape(server.admin_url)
    assert vitals(samples) == dict.fromkeys(expected, 1.0)
    assert not errors(samples) and not moved(samples, "composer_client_signals_dropped_total", "reason")
    lcp = samples["composer_client_vital_seconds_sum"][
        frozenset({"route": "page", "name": "LCP", "fragment": "hero"}.items())]
    inp = samples["composer_client_vital_seconds_sum"][
        frozenset({"route": "page", "name": "INP", "fragment": "widget"}.items())]
    assert 0 < lcp < 5 and 0.1 <= inp < 5, (lcp, inp)  # seconds, not ms


# ---------------------------------------------------------------- 3. a strict Content-Security-Policy

CSP_ROUTES = """\
routes:
  - name: strict
    match: {{path: /strict}}
    template: page.html
    filters:
      - set_response_header: {{content-security-policy: "{csp}"}}
  - name: plain
    match: {{path: /plain}}
    template: page.html
    client_signals: false
    filters:
      - set_response_header: {{content-security-policy: "{csp}"}}
"""

CSP_PAGE = """\
<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>csp</title></head>
<body>
<div id="slot-a"><fragment id="a" src="{svc}/f/a"></fragment></div>
<div id="slot-late"><fragment id="late" src="{svc}/f/late" async></fragment></div>
<div id="slot-b"><fragment id="b" src="{svc}/f/b"></fragment></div>
</body></html>
"""

# Every securitypolicyviolation the document sees, from its first byte (Playwright's init
# scripts are not subject to the page's CSP).
WATCH_CSP = """\
window.violations = [];
document.addEventListener("securitypolicyviolation", function (e) {
  window.violations.push(e.violatedDirective + " " + (e.blockedURI || "inline"));
});
"""


async def test_a_strict_csp_sees_no_violation(world: World) -> None:
    """Under `Content-Security-Policy: script-src 'self' <fragment origins>` a page with signals
    on reports no violation and logs no CSP error, while the collector runs (its beacon counts
    the error of a fragment script on a second origin), the async fragment is moved into place
    without an inline script, and every fragment script runs. The same page with signals off
    (composer's inline move script) does see a violation: the check can fail."""
    other_fragments: Fragments = {}
    other = await world.serve(fragment_service(other_fragments, {
        "b.js": js(marked("b", 'throw new Error("b boom");'))}))
    fragments: Fragments = {}
    svc = await world.serve(fragment_service(fragments, {
        "a.js": js(marked("a", "")),
        "late.js": js(marked("late", 'window.lateParent = document.getElementById("late").parentElement.id;')),
    }))
    fragments.update({
        "a": ('<p id="a">a</p>', link((f"{svc}/static/a.js", "fragment-script")), 0.0),
        "late": ('<p id="late">late</p>', link((f"{svc}/static/late.js", "fragment-script")), 0.3),
        "b": ('<p id="b">b</p>', link((f"{other}/static/b.js", "fragment-script")), 0.0),
    })
    csp = f"script-src 'self' {svc} {other}"
    server = await composer(world, {"page.html": CSP_PAGE.format(svc=svc)},
                            SIGNALS_ON + CSP_ROUTES.format(csp=csp), settings="")

    tab = await tab_of(world)
    await tab.page.add_init_script(WATCH_CSP)
    response = await tab.page.goto(server.url + "/strict", wait_until="load")
    assert response is not None and response.headers["content-security-policy"] == csp
    raw = await response.text()
    assert '<template data-composer-move="' in raw and "composer-signals" in raw
    assert await tab.js("window.violations") == []
    assert sorted(await tab.js("window.ran") or []) == ["a", "b", "late"]
    assert await tab.js("window.lateParent") == "slot-late"
    assert await tab.js("document.querySelectorAll('[id^=\"composer-async\"], template').length") == 0
    assert not [e for e in tab.console_errors if "Content Security Policy" in e], tab.console_errors
    await leave(tab)
    samples = await wait_for(server.admin_url, lambda s: bool(errors(s)), "the beacon")
    assert errors(samples) == {("strict", "b", "", "error"): 1.0}

    control = await tab_of(world)
    await control.page.add_init_script(WATCH_CSP)
    await control.goto(server.url + "/plain")
    assert await control.js("window.violations.length") > 0
    assert await control.js("document.getElementById('late').parentElement.id") != "slot-late"


# ---------------------------------------------------------------- 4. child selectors across fragment boundaries

SELECTORS_PAGE = """\
<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>selectors</title>
<style>
  main > p {{ color: rgb(10, 20, 30); }}
  main > p:first-child {{ font-weight: 700; }}
  h2 + p {{ margin-left: 11px; }}
  ul > li {{ padding-left: 13px; }}
  #async-slot > p:only-child {{ color: rgb(40, 50, 60); }}
</style></head>
<body>
<main><fragment id="lead" src="{svc}/f/lead"></fragment><h2>title</h2><fragment id="next" src="{svc}/f/next"></fragment></main>
<ul><li id="page-item">page</li><fragment id="items" src="{svc}/f/items"></fragment></ul>
<section id="async-slot"><fragment id="late" src="{svc}/f/late" async></fragment></section>
</body></html>
"""


async def test_child_selectors_match_across_fragment_boundaries(world: World) -> None:
    """With signals on, fragment markup is marked with comments, not wrapped: `main > p` (main
    the template's, p the fragment's), `:first-child`, `h2 + p`, `ul > li` and, once the async
    fragment is moved, `#slot > p:only-child` all match the fragments' elements."""
    fragments: Fragments = {}
    svc = await world.serve(fragment_service(fragments, {}))
    fragments.update({
        "lead": ('<p id="lead">lead</p>', "", 0.0),
        "next": ('<p id="next">next</p>', "", 0.0),
        "items": ('<li id="item-1">one</li><li id="item-2">two</li>', "", 0.0),
        "late": ('<p id="late">late</p>', "", 0.3),
    })
    server = await composer(world, {"page.html": SELECTORS_PAGE.format(svc=svc)})
    tab = await tab_of(world)
    raw = await tab.goto(server.url + "/page")
    assert "<!--composer:" in raw and "<!--/composer:" in raw  # signals are on: the markers are there

    def style(selector: str, *props: str) -> Awaitable[object]:
        return tab.page.evaluate("([sel, props]) => { const s = getComputedStyle(document.querySelector(sel));"
                                 " return props.map(p => s[p]); }", [selector, list(props)])

    assert await tab.js("[...document.querySelector('main').children].map(e => e.id || e.tagName)") == \
        ["lead", "H2", "next"]
    assert await style("#lead", "color", "fontWeight") == ["rgb(10, 20, 30)", "700"]
    assert await style("#next", "color", "fontWeight", "marginLeft") == ["rgb(10, 20, 30)", "400", "11px"]
    assert await style("#item-1", "paddingLeft") == ["13px"]
    assert await style("#item-2", "paddingLeft") == ["13px"]
    assert await tab.js("document.getElementById('late').parentElement.id") == "async-slot"
    assert await style("#late", "color") == ["rgb(40, 50, 60)"]
    assert tab.console_errors == [] and tab.page_errors == [], (tab.console_errors, tab.page_errors)


# ---------------------------------------------------------------- 5. sampling

async def test_a_page_not_sampled_sends_nothing(world: World) -> None:
    """`client_signals_sample: 0`: the browser sends no beacon at all, errors or vitals. The
    same page with sample 1, visited after it, does (so the first had every chance to)."""
    fragments: Fragments = {}
    svc = await world.serve(fragment_service(fragments, {"boom.js": js('throw new Error("boom");')}))
    fragments["boom"] = ('<p id="boom">boom</p>', link((f"{svc}/static/boom.js", "fragment-script")), 0.0)
    page = {"page.html": f'<html><head></head><body><fragment id="boom" src="{svc}/f/boom"></fragment></body></html>'}
    never = await composer(world, page, settings=SIGNALS_ON + "  client_signals_sample: 0\n")
    always = await composer(world, page, settings=SIGNALS_ON + "  client_signals_sample: 1\n")

    tab = await tab_of(world)
    await tab.goto(never.url + "/page")
    assert await tab.js("JSON.parse(document.getElementById('composer-signals').textContent).sample") == 0
    await leave(tab)
    await tab.goto(always.url + "/page")
    await leave(tab)
    await wait_for(always.admin_url, lambda s: errors(s) == {("page", "boom", "", "error"): 1.0}, "the beacon")

    samples = await scrape(never.admin_url)
    assert not errors(samples)
    assert not moved(samples, "composer_client_vital_seconds_count", "name")
    assert not moved(samples, "composer_requests_total", "route", "method", "status").keys() & {
        ("_composer", "POST", status) for status in ("204", "400", "413", "429")}
    assert ("_composer", "POST", "204") in moved(await scrape(always.admin_url), "composer_requests_total",
                                                 "route", "method", "status")


# ---------------------------------------------------------------- hidden while loading

HIDE_AND_SHOW = """\
Object.defineProperty(document, "visibilityState", {value: "hidden", configurable: true});
document.dispatchEvent(new Event("visibilitychange", {bubbles: true}));
delete document.visibilityState;
document.dispatchEvent(new Event("visibilitychange", {bubbles: true}));
"""


async def test_a_page_hidden_while_loading_still_reports(world: World) -> None:
    """The user switches tabs and back while the page still streams (its JSON block not there
    yet): the error seen so far is kept, and sent with the beacon when the page is left.
    (Headless Chromium's tabs stay visible: the switch is a visibilitychange with
    `document.visibilityState` shadowed to "hidden" for its duration.)"""
    fragments: Fragments = {}
    svc = await world.serve(fragment_service(fragments, {}))
    fragments.update({
        "early": ('<p id="early">early</p><script>throw new Error("early boom");</script>', "", 0.0),
        "late": ('<p id="late">late</p>', "", 1.0),
    })
    page = {"page.html": f"""<html><head></head><body>
        <fragment id="early" src="{svc}/f/early"></fragment>
        <fragment id="late" src="{svc}/f/late" async></fragment></body></html>"""}
    server = await composer(world, page)
    tab = await tab_of(world)
    await tab.page.goto(server.url + "/page", wait_until="commit")
    await tab.page.wait_for_selector("#early", state="attached")
    assert await tab.js("document.getElementById('composer-signals')") is None  # still loading
    await tab.js(HIDE_AND_SHOW)
    await tab.page.wait_for_load_state("load")
    assert await tab.js("document.getElementById('late').parentElement.tagName") == "BODY"
    await leave(tab)
    samples = await wait_for(server.admin_url, lambda s: bool(errors(s)), "the beacon")
    assert errors(samples) == {("page", "early", "", "error"): 1.0}
