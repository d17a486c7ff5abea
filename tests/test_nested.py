"""SPEC §6, nested fragments, end to end: real fragment servers, a real composer, all on 127.0.0.1.

A fragment answering `x-composer-nested: 1` is a template: its fragments are fetched through
the same pipeline (metrics under `<parent id>/<n>`), bounded by depth, cycles, origins, the
page's fragment budget and its parent's deadline, and placed with page-wide asset dedupe.
"""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
from aiohttp import web
from conftest import captured, html, write_config
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from composer import ComposerServer, load
from composer.tracing import Tracing

CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=8)
NESTED = {"x-composer-nested": "1"}


def nested(body: str, *, link: str | None = None, delay: float = 0.0, status: int = 200):
    """A fragment answering `body` as a nested template; `ORIGIN` in it becomes this server's
    origin, `OUTSIDE` the same server named `localhost` (another origin to allowed_origins)."""

    async def handler(request: web.Request) -> web.Response:
        if delay:
            await asyncio.sleep(delay)
        headers = dict(NESTED)
        if link:
            headers["link"] = link
        text = body.replace("ORIGIN", f"http://{request.host}")
        text = text.replace("OUTSIDE", f"http://localhost:{request.host.rpartition(':')[2]}")
        return web.Response(text=text, status=status, content_type="text/html", headers=headers)

    return handler


def slow(body: str, delay: float):
    """Answers after `delay` s, or as soon as the caller hangs up (keeps teardown fast)."""

    async def handler(request: web.Request) -> web.Response:
        end = time.monotonic() + delay
        while time.monotonic() < end and request.transport is not None and not request.transport.is_closing():
            await asyncio.sleep(0.01)
        return web.Response(text=body, content_type="text/html")

    return handler


def samples(text: str, name: str, *labels: str) -> dict[tuple[str, ...], float]:
    return {tuple(s.labels[k] for k in labels): s.value
            for family in text_string_to_metric_families(text) for s in family.samples if s.name == name}


def failures(text: str) -> dict[tuple[str, str], float]:
    """(fragment, reason) → count, the non-zero ones of route `page`."""
    found = samples(text, "composer_fragment_failures_total", "fragment", "route", "reason")
    return {(f, r): v for (f, route, r), v in found.items() if v and route == "page"}


async def get(composer, path: str = "/page") -> tuple[int, str]:
    resp, text = await composer.get(path, timeout=CLIENT_TIMEOUT)
    return resp.status, text


def between(text: str, *markers: str) -> bool:
    """`markers` all appear in `text`, in this order."""
    at = -1
    for marker in markers:
        at = text.find(marker, at + 1)
        if at < 0:
            return False
    return True


def fields(records) -> list[dict]:
    return [getattr(r, "fields", {}) | {"msg": r.getMessage()} for r in records.records]


# ---------------------------------------------------------------- composing

async def test_two_and_three_levels_deep_compose_in_place(fragments, start_composer):
    svc = await fragments({
        "/p": nested('<section>P<fragment src="ORIGIN/c"></fragment>/P</section>'),
        "/c": nested('<div>C<fragment src="ORIGIN/g1"></fragment>+<fragment src="ORIGIN/g2"></fragment>/C</div>'),
        "/g1": html("<i>G1</i>"),
        "/g2": html("<i>G2</i>", headers=NESTED),  # nested, without fragments: placed as it is
        "/two": nested('<b>T</b><fragment src="ORIGIN/leaf"></fragment>'),
        "/leaf": html("<i>leaf</i>"),
    })
    composer = await start_composer({"page.html": (
        f'<body>[<fragment id="p" src="{svc.url("/p")}"></fragment>]'
        f'[<fragment id="two" src="{svc.url("/two")}"></fragment>]</body>')})
    status, text = await get(composer)
    assert status == 200
    assert "[<section>P<div>C<i>G1</i>+<i>G2</i>/C</div>/P</section>][<b>T</b><i>leaf</i>]" in text
    assert "<fragment" not in text
    assert svc.hits == {"/p": 1, "/c": 1, "/g1": 1, "/g2": 1, "/two": 1, "/leaf": 1}


async def test_a_nested_body_on_a_pooled_connection_composes_the_same(fragments, start_composer):
    """The second page's fetch goes out on the first's connection, without a task of its own
    (`pipeline.Flight`); a nested body arriving there is composed as on the first."""
    svc = await fragments({"/p": nested('<section>P<fragment src="ORIGIN/c"></fragment>/P</section>'),
                           "/c": html("<i>C</i>"), "/bad": nested("<fragment src=")})
    composer = await start_composer({"page.html": (
        f'<body>[<fragment id="p" src="{svc.url("/p")}"></fragment>]'
        f'[<fragment id="bad" src="{svc.url("/bad")}">inline</fragment>]</body>')})
    for hits in (1, 2):
        status, text = await get(composer)
        assert status == 200 and "[<section>P<i>C</i>/P</section>][inline]" in text
        assert svc.hits == {"/p": hits, "/c": hits, "/bad": hits}
    assert failures(await composer.metrics()) == {("bad", "invalid"): 2.0}


async def test_route_params_fill_nested_urls(fragments, start_composer):
    async def item(request: web.Request) -> web.Response:
        return web.Response(text=f"<i>item {request.match_info['sku']}</i>", content_type="text/html")

    svc = await fragments({"/p/{sku}": nested('<fragment src="ORIGIN/item/{sku}"></fragment>'),
                           "/item/{sku}": item})
    composer = await start_composer({"page.html": f'<fragment id="p" src="{svc.url("/p/")}{{sku}}"></fragment>'},
                                    routes="routes:\n  - {name: page, match: {path: '/x/{sku}'}, template: page.html}\n")
    status, text = await get(composer, "/x/a%20b")
    assert status == 200 and "<i>item a b</i>" in text
    assert [r.raw_path for r in svc.requests] == ["/p/a%20b", "/item/a%20b"]


async def test_async_inside_a_nested_fragment_renders_in_place(fragments, start_composer):
    svc = await fragments({"/p": nested('<ul><fragment src="ORIGIN/c" async></fragment></ul>'),
                           "/c": html("<li>C</li>")})
    composer = await start_composer({"page.html": f'<body><fragment id="p" src="{svc.url("/p")}"></fragment></body>'})
    _, text = await get(composer)
    assert "<ul><li>C</li></ul>" in text and "composer-async" not in text


async def test_metrics_log_and_marks_under_parent_slash_n_ids(fragments, start_composer):
    svc = await fragments({
        "/hdr": nested('<fragment src="ORIGIN/a"></fragment><fragment id="promo" src="ORIGIN/b"></fragment>'
                       '<fragment src="ORIGIN/down">down inline</fragment>'),
        "/a": html("A"), "/b": html("B"), "/down": html("x", status=503),
    })
    composer = await start_composer({"page.html": f'<body><fragment id="hdr" src="{svc.url("/hdr")}"></fragment></body>'},
                                    settings="settings:\n  timing_marks: true\n")
    with captured("composer.fragments") as records:
        status, text = await get(composer)
    assert status == 200 and "ABdown inline" in text
    metrics = await composer.metrics()
    durations = samples(metrics, "composer_fragment_request_duration_seconds_count", "fragment", "route")
    assert {k: v for k, v in durations.items() if v} == {
        ("hdr", "page"): 1, ("hdr/1", "page"): 1, ("promo", "page"): 1, ("hdr/3", "page"): 1}
    assert failures(metrics) == {("hdr/3", "status"): 1}
    fallbacks = samples(metrics, "composer_fragment_fallbacks_total", "fragment", "route")
    assert fallbacks[("hdr/3", "page")] == 1
    failed = [f for f in fields(records) if f["msg"] == "fragment failed"]
    assert [(f["fragment"], f["route"], f["error_type"], f["fallback"]) for f in failed] == [
        ("hdr/3", "page", "status", "inline")]
    marks = re.search(r"\(\[(\[.*\])\]\)</script>", text)
    assert marks is not None and all(f'["{i}",' in marks.group(1) for i in ("hdr", "hdr/1", "promo", "hdr/3"))


async def test_page_wide_asset_dedupe_across_levels(fragments, start_composer):
    svc = await fragments({
        "/top": html("TOP", headers={"link": '</shared.css>; rel="stylesheet", </shared.js>; rel="fragment-script"'}),
        "/p": nested('<div>P<fragment src="ORIGIN/c1"></fragment><fragment src="ORIGIN/c2"></fragment></div>',
                     link='</p.css>; rel="stylesheet", </shared.js>; rel="fragment-script"'),
        "/c1": nested('C1<fragment src="ORIGIN/g"></fragment>',
                      link='</shared.css>; rel="stylesheet", </c.css>; rel="stylesheet", </c.js>; rel="fragment-script"'),
        "/c2": html("C2", headers={"link": '</c.css>; rel="stylesheet", </c2.css>; rel="stylesheet", '
                                           '</c.js>; rel="fragment-script"'}),
        "/g": html("G", headers={"link": '</c2.css>; rel="stylesheet", </g.js>; rel="fragment-script"'}),
    })
    composer = await start_composer({"page.html": (
        f'<body><fragment id="top" src="{svc.url("/top")}"></fragment>'
        f'<fragment id="p" src="{svc.url("/p")}"></fragment></body>')})
    _, text = await get(composer)
    for url in ("/shared.css", "/shared.js", "/p.css", "/c.css", "/c.js", "/c2.css", "/g.js"):
        assert text.count(f'"{url}"') == 1, (url, text)
    assert between(text, "/shared.css", "TOP", "/shared.js", "/p.css", "<div>P", "/c.css", "C1",
                   "/c2.css", "G", "/g.js", "/c.js", "C2", "</div>")


async def test_an_async_nested_fragment_keeps_every_stylesheet_outside_its_carrier(fragments, start_composer):
    svc = await fragments({
        "/p": nested('P<fragment src="ORIGIN/c"></fragment>', link='</p.css>; rel="stylesheet"'),
        "/c": html("C", headers={"link": '</c.css>; rel="stylesheet", </c.js>; rel="fragment-script"'}),
    })
    composer = await start_composer({"page.html": f'<body><fragment id="p" src="{svc.url("/p")}" async></fragment></body>'})
    _, text = await get(composer)
    assert between(text, "/p.css", "/c.css", 'id="composer-async-0-content">', "PC", "/c.js", "</div>")
    assert text.count("/c.css") == 1


# ---------------------------------------------------------------- bounds

async def test_beyond_max_nesting_depth_renders_the_fallback(fragments, start_composer):
    svc = await fragments({
        "/a": nested('A<fragment src="ORIGIN/b"></fragment>'),
        "/b": nested('B<fragment src="ORIGIN/c" fallback-src="ORIGIN/cfb">c inline</fragment>'
                     '<fragment src="ORIGIN/d">d inline</fragment>'),
        "/c": html("C"), "/cfb": html("C-FALLBACK"), "/d": html("D"),
    })
    composer = await start_composer({"page.html": f'<fragment id="a" src="{svc.url("/a")}"></fragment>'},
                                    settings="settings:\n  max_nesting_depth: 2\n")
    status, text = await get(composer)
    assert status == 200 and "ABC-FALLBACKd inline" in text
    assert "/c" not in svc.hits and "/d" not in svc.hits  # depth 3: never fetched; its fallback-src is
    assert failures(await composer.metrics()) == {("a/1/1", "nesting"): 1, ("a/1/2", "nesting"): 1}


async def test_a_cycle_is_not_fetched(fragments, start_composer):
    svc = await fragments({
        "/self": nested('S<fragment src="ORIGIN/self">self again</fragment>'),
        "/a": nested('A<fragment src="ORIGIN/b"></fragment>'),
        "/b": nested('B<fragment src="ORIGIN/a">a again</fragment>'),
    })
    composer = await start_composer({"page.html": (
        f'<fragment id="self" src="{svc.url("/self")}"></fragment>|'
        f'<fragment id="a" src="{svc.url("/a")}"></fragment>')})
    with captured("composer.fragments") as records:
        status, text = await get(composer)
    assert status == 200 and "Sself again|ABa again" in text
    assert svc.hits == {"/self": 1, "/a": 1, "/b": 1}
    assert failures(await composer.metrics()) == {("self/1", "nesting"): 1, ("a/1/1", "nesting"): 1}
    details = {f["fragment"]: f["detail"] for f in fields(records) if f["msg"] == "fragment failed"}
    assert "cycle" in details["self/1"] and "cycle" in details["a/1/1"]


async def test_a_slow_grandchild_falls_back_within_the_parents_timeout(fragments, start_composer):
    svc = await fragments({
        "/p": nested('P<fragment src="ORIGIN/c"></fragment>'),  # children: the default 3 s timeout
        "/c": nested('C<fragment src="ORIGIN/g">grandchild late</fragment>'),
        "/g": slow("G", 5.0),
    })
    composer = await start_composer({"page.html": f'<fragment id="p" src="{svc.url("/p")}" timeout="600"></fragment>'})
    t0 = time.monotonic()
    status, text = await get(composer)
    elapsed = time.monotonic() - t0
    assert status == 200 and "PCgrandchild late" in text
    assert 0.5 < elapsed < 1.5, elapsed
    assert failures(await composer.metrics()) == {("p/1/1", "timeout"): 1}


async def test_a_nested_url_outside_allowed_origins_is_not_fetched(fragments, start_composer):
    svc = await fragments({"/x": html("X"), "/fb": html("FB"), "/ok": html("OK"), "/q": nested(
        '<fragment src="OUTSIDE/x" fallback-src="OUTSIDE/fb">outside</fragment>'
        '<fragment src="ORIGIN/ok" fallback-src="OUTSIDE/fb">unused</fragment>')})
    composer = await start_composer({"page.html": f'<fragment id="q" src="{svc.url("/q")}"></fragment>'},
                                    settings='settings:\n  allowed_origins: ["http://127.0.0.1:*"]\n')
    with captured("composer.fragments") as records:
        status, text = await get(composer)
    assert status == 200 and "outsideOK" in text
    assert svc.hits == {"/q": 1, "/ok": 1}  # neither /x nor its fallback-src (both on localhost)
    assert failures(await composer.metrics()) == {("q/1", "origin"): 1}
    assert [f["error_type"] for f in fields(records) if f["msg"] == "fragment failed"] == ["origin"]


async def test_max_fragments_per_page_counts_every_level(fragments, start_composer):
    svc = await fragments({
        "/a": nested('<fragment src="ORIGIN/x">ax</fragment><fragment src="ORIGIN/y">ay</fragment>'),
        "/b": nested('<fragment src="ORIGIN/x">bx</fragment><fragment src="ORIGIN/y">by</fragment>', delay=0.3),
        "/x": html("X"), "/y": html("Y"),
    })
    composer = await start_composer({"page.html": (
        f'<fragment id="a" src="{svc.url("/a")}"></fragment>|<fragment id="b" src="{svc.url("/b")}"></fragment>')},
        settings="settings:\n  max_fragments_per_page: 5\n")
    status, text = await get(composer)
    # 2 in the template, then a's two, then b's first; b's second is one too many.
    assert status == 200 and "XY|Xby" in text.replace("\n", "")
    assert failures(await composer.metrics()) == {("b/2", "limit"): 1}


# ---------------------------------------------------------------- what a nested body may say

async def test_primary_inside_a_nested_fragment_is_ignored_and_logged_once(fragments, start_composer):
    svc = await fragments({
        "/p": nested('<fragment src="ORIGIN/bad" primary>bad inline</fragment>'
                     '<fragment src="ORIGIN/ok" primary></fragment>'),
        "/bad": html("x", status=500), "/ok": html("OK"),
    })
    composer = await start_composer({"page.html": f'<body><fragment id="p" src="{svc.url("/p")}"></fragment></body>'})
    with captured("composer.fragments") as records:
        for _ in range(3):
            status, text = await get(composer)
            assert status == 200 and "bad inlineOK" in text  # not the bare 500 of a failed primary
    ignored = [f for f in fields(records) if f["msg"] == "primary ignored in a nested fragment"]
    assert [(f["fragment"], f["line"]) for f in ignored] == [("p", 1), ("p", 1)]  # two tags, one compile


async def test_a_nested_body_that_does_not_compile_is_a_failure_with_reason_invalid(fragments, start_composer):
    svc = await fragments({
        "/open": nested('<div>\n<fragment src="ORIGIN/c">never closed'),
        "/typo": nested('<fragment src="ORIGIN/c" tiemout="5"></fragment>'),
        "/scheme": nested('<fragment src="ftp://example.com/x"></fragment>'),
        "/c": html("C"),
    })
    composer = await start_composer({"page.html": (
        f'<body><fragment id="open" src="{svc.url("/open")}">open inline</fragment>|'
        f'<fragment id="typo" src="{svc.url("/typo")}">typo inline</fragment>|'
        f'<fragment id="scheme" src="{svc.url("/scheme")}"></fragment></body>')})
    with captured("composer.fragments") as records:
        status, text = await get(composer)
    assert status == 200 and "open inline|typo inline|</body>" in text
    assert "/c" not in svc.hits
    assert failures(await composer.metrics()) == {("open", "invalid"): 1, ("typo", "invalid"): 1,
                                                  ("scheme", "invalid"): 1}
    details = {f["fragment"]: f["detail"] for f in fields(records) if f["msg"] == "fragment failed"}
    assert "open nested body:2: <fragment> is never closed" in details["open"]
    assert "typo nested body:1: unknown attribute 'tiemout'" in details["typo"]
    assert "scheme nested body:1: src must be an absolute http(s) URL" in details["scheme"]
    assert not any(r.exc_info for r in records.records)


async def test_the_compiled_form_is_cached_per_body(fragments, start_composer):
    svc = await fragments({"/p": nested('<fragment src="ORIGIN/c"></fragment>'),
                           "/c": nested('<fragment src="ORIGIN/leaf"></fragment>'), "/leaf": html("L")})
    composer = await start_composer({"page.html": f'<fragment id="p" src="{svc.url("/p")}"></fragment>'})
    nesting = composer.server._composer.pipeline.nesting
    for _ in range(5):
        status, text = await get(composer)
        assert status == 200 and "L" in text
    assert nesting.compiles == 2  # /p and /c, once each, for five pages
    assert nesting.size > 0
    assert svc.hits == {"/p": 5, "/c": 5, "/leaf": 5}


async def test_a_fallback_src_answer_saying_nested_is_composed_too(fragments, start_composer):
    """Decided: the header says the body is a template, whoever serves it. Its children are
    at the fragment's depth + 1, within the fallback's own deadline; a fallback body that does
    not compile gives way to the inline markup."""
    svc = await fragments({
        "/down": html("x", status=503),
        "/fb": nested('<p>FB</p><fragment src="ORIGIN/c"></fragment>'),
        "/fb-broken": nested('<fragment src="ORIGIN/c">'),
        "/c": html("<i>C</i>"),
    })
    composer = await start_composer({"page.html": (
        f'<body><fragment id="p" src="{svc.url("/down")}" fallback-src="{svc.url("/fb")}"></fragment>|'
        f'<fragment id="q" src="{svc.url("/down")}" fallback-src="{svc.url("/fb-broken")}">q inline</fragment>'
        '</body>')})
    with captured("composer.fragments") as records:
        status, text = await get(composer)
    assert status == 200 and "<p>FB</p><i>C</i>|q inline" in text and "<fragment" not in text
    metrics = await composer.metrics()
    assert failures(metrics) == {("p", "status"): 1, ("q", "status"): 1}
    durations = samples(metrics, "composer_fragment_request_duration_seconds_count", "fragment", "route")
    assert durations[("p/1", "page")] == 1
    broken = [f for f in fields(records) if f["msg"] == "fragment fallback failed"]
    assert [(f["fragment"], f["error_type"]) for f in broken] == [("q", "invalid")]


async def test_nested_spans_hang_under_their_parents_span(fragments, tmp_path):
    svc = await fragments({"/p": nested('<fragment src="ORIGIN/c"></fragment>'), "/c": html("C")})
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    table = load(write_config(tmp_path, {"page.html": f'<fragment id="p" src="{svc.url("/p")}"></fragment>'}))
    server = ComposerServer(table, host="127.0.0.1", port=0, admin_port=0, tracing=Tracing(provider))
    await server.start()
    try:
        async with aiohttp.ClientSession() as session, \
                session.get(server.url + "/page", timeout=CLIENT_TIMEOUT) as resp:
            assert resp.status == 200 and "C" in await resp.text()
    finally:
        await server.stop()
    spans = {s.attributes["composer.fragment.id"]: s for s in exporter.get_finished_spans()
             if s.name == "fetch_fragment"}
    assert set(spans) == {"p", "p/1"}
    assert spans["p/1"].parent.span_id == spans["p"].context.span_id
    traceparent = svc.requests[1].headers["traceparent"]  # /c carries its own span's context
    assert traceparent.split("-")[2] == f"{spans['p/1'].context.span_id:016x}"
