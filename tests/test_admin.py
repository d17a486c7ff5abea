"""The admin listener (SPEC §4), graceful stop, access/fragment logs and x-request-id.

Everything runs through real sockets on 127.0.0.1: fragment services from the `fragments`
fixture, composer from `start_composer`, and `/metrics` parsed with prometheus_client's own
text parser (never regexes).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator

import aiohttp
import pytest
from aiohttp import web
from conftest import html
from prometheus_client.parser import text_string_to_metric_families

from composer.logs import JsonFormatter, JsonHandler, setup_logging

FAILURE_FIELDS = ("fragment", "version", "route", "error_type", "url", "status", "duration_ms",
                  "request_id", "fallback")
ACCESS_FIELDS = ("method", "path", "status", "duration_ms", "route", "request_id")


# --------------------------------------------------------------------------- helpers


class Scrape:
    """One parsed /metrics answer."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def family(self, name: str):
        assert name in self.families, f"metric family {name!r} missing; have {sorted(self.families)}"
        return self.families[name]

    def samples(self, name: str) -> list:
        return [s for f in self.families.values() for s in f.samples if s.name == name]

    def value(self, name: str, **labels: str) -> float | None:
        """The value of sample `name` with exactly `labels`, or None when it is absent."""
        found = [s.value for s in self.samples(name) if s.labels == labels]
        assert len(found) <= 1, f"{name}{labels} appears {len(found)} times"
        return found[0] if found else None

    def count(self, name: str, **labels: str) -> float:
        """Like `value`, but an absent counter sample counts as 0."""
        value = self.value(name, **labels)
        return 0.0 if value is None else value


async def scrape(composer) -> Scrape:
    async with composer.session.get(composer.admin_url + "/metrics") as resp:
        assert resp.status == 200
        return Scrape(await resp.text())


async def wait_until(predicate: Callable[[], object], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def closed_port() -> int:
    """A loopback port nobody listens on (connecting to it is refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def records(caplog: pytest.LogCaptureFixture, logger: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger]


def fields(record: logging.LogRecord) -> dict:
    out = getattr(record, "fields", None)
    assert isinstance(out, dict), f"record {record.getMessage()!r} carries no `fields`"
    return out


def as_json_line(record: logging.LogRecord) -> dict:
    line = JsonFormatter().format(record)
    assert "\n" not in line
    return json.loads(line)


def redirect(location: str, status: int = 302):
    async def handler(_: web.Request) -> web.Response:
        return web.Response(status=status, headers={"location": location})

    return handler


def raw(body: bytes, headers: dict[str, str]):
    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=body, headers={"content-type": "text/html", **headers})

    return handler


async def chunked_big(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"content-type": "text/html"})
    await resp.prepare(request)
    for _ in range(10):
        await resp.write(b"x" * 1000)
    await resp.write_eof()
    return resp


TWO_ROUTES = """
    routes:
      - name: page
        match: {path: /page}
        template: page.html
      - name: prim
        match: {path: /prim}
        template: prim.html
"""


# --------------------------------------------------------------------------- /metrics basics


async def test_metrics_is_prometheus_text_with_every_family(fragments, start_composer):
    svc = await fragments({"/a": html("<p>A</p>"), "/bad": html("no", status=500)})
    composer = await start_composer({"page.html": f"""\
        <html><body>
        <fragment id="a" src="{svc.url('/a')}"></fragment>
        <fragment id="bad" src="{svc.url('/bad')}"><p>sorry</p></fragment>
        </body></html>
    """})
    resp, _ = await composer.get("/page")
    assert resp.status == 200

    async with composer.session.get(composer.admin_url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        assert "version" in resp.headers["content-type"]
        text = await resp.text()
    metrics = Scrape(text)
    assert metrics.family("composer_fragment_request_duration_seconds").type == "histogram"
    assert metrics.family("composer_request_duration_seconds").type == "histogram"
    assert metrics.family("composer_fragment_failures").type == "counter"
    assert metrics.family("composer_fragment_fallbacks").type == "counter"
    assert metrics.family("composer_requests").type == "counter"
    assert metrics.family("composer_fragment_info").type == "gauge"
    # As with --workers (the multiprocess collector makes none): no `_created` series.
    assert [s.name for f in metrics.families.values() for s in f.samples if s.name.endswith("_created")] == []


async def test_fragment_request_duration_histogram_counts_each_fetch(fragments, start_composer):
    svc = await fragments({"/fast": html("<p>F</p>"), "/slow": html("<p>S</p>", delay=0.2)})
    composer = await start_composer({"page.html": f"""\
        <html><body>
        <fragment id="fast" src="{svc.url('/fast')}"></fragment>
        <fragment id="slow" src="{svc.url('/slow')}"></fragment>
        </body></html>
    """})
    name = "composer_fragment_request_duration_seconds"
    labels = {"fragment": "fast", "route": "page", "version": ""}
    before = await scrape(composer)
    assert before.count(name + "_count", **labels) == 0

    for n in (1, 2):
        resp, body = await composer.get("/page")
        assert resp.status == 200 and "<p>F</p>" in body and "<p>S</p>" in body
        metrics = await scrape(composer)
        assert metrics.value(name + "_count", **labels) == n
        assert metrics.value(name + "_count", fragment="slow", route="page", version="") == n

    buckets = [s for s in metrics.samples(name + "_bucket")
               if {k: v for k, v in s.labels.items() if k != "le"} == labels]
    assert buckets, "histogram has no buckets for the fragment"
    assert {s.labels["le"] for s in buckets} >= {"+Inf"}
    assert max(s.value for s in buckets) == 2
    slow_sum = metrics.value(name + "_sum", fragment="slow", route="page", version="")
    assert slow_sum is not None and slow_sum >= 2 * 0.2  # two fetches of a 0.2 s fragment
    fast_sum = metrics.value(name + "_sum", **labels)
    assert fast_sum is not None and 0 < fast_sum < slow_sum


# --------------------------------------------------------------------------- failures by reason


FAILURE_CASES = {
    # id: (reason, handler or None for a refused port, extra attributes, settings)
    "timeout": ("timeout", html("<p>late</p>", delay=1.0), 'timeout="100"', ""),
    "connection": ("connection", None, "", ""),
    "status-500": ("status", html("<p>boom</p>", status=500), "", ""),
    "status-503": ("status", html("<p>busy</p>", status=503), "", ""),
    "status-302": ("status", redirect("/elsewhere"), "", ""),
    "status-301": ("status", redirect("/elsewhere", 301), "", ""),
    "too_large-content-length": ("too_large", html("x" * 5000),
                                 "", "settings:\n  max_fragment_bytes: 1000\n"),
    "too_large-chunked": ("too_large", chunked_big, "", "settings:\n  max_fragment_bytes: 1000\n"),
    "too_large-gzip": ("too_large", raw(gzip.compress(b"x" * 100_000), {"content-encoding": "gzip"}),
                       "", "settings:\n  max_fragment_bytes: 1000\n"),
    "invalid-gzip": ("invalid", raw(b"this is certainly not gzip data" * 4, {"content-encoding": "gzip"}),
                     "", ""),
}


@pytest.mark.parametrize("case", list(FAILURE_CASES))
async def test_fragment_failures_total_by_reason(case, fragments, start_composer):
    reason, handler, attrs, settings = FAILURE_CASES[case]
    svc = await fragments({"/ok": html("<p>OK</p>"), **({"/f": handler} if handler else {})})
    src = svc.url("/f") if handler else f"http://127.0.0.1:{closed_port()}/f"
    composer = await start_composer({"page.html": f"""\
        <html><body>
        <fragment id="ok" src="{svc.url('/ok')}"></fragment>
        <fragment id="broken" src="{src}" {attrs}></fragment>
        <p>END</p>
        </body></html>
    """}, settings=settings)

    for n in (1, 2):
        resp, body = await composer.get("/page")
        assert resp.status == 200, "a failing non-primary fragment keeps the page 200"
        assert "<p>OK</p>" in body and "<p>END</p>" in body
        assert "xxxxxxxxxx" not in body and "late" not in body and "boom" not in body

        metrics = await scrape(composer)
        failures = {s.labels["reason"]: s.value for s in metrics.samples("composer_fragment_failures_total")
                    if s.labels.get("fragment") == "broken" and s.value}  # every other reason is there at 0
        assert failures == {reason: n}, f"expected only reason={reason}, got {failures}"
        sample = [s for s in metrics.samples("composer_fragment_failures_total")
                  if s.labels.get("fragment") == "broken" and s.value][0]
        assert sample.labels == {"fragment": "broken", "route": "page", "version": "", "reason": reason}
        assert metrics.count("composer_fragment_failures_total", fragment="ok", route="page",
                             version="", reason=reason) == 0
        # a failed fetch is still a fetch: its duration is observed
        assert metrics.value("composer_fragment_request_duration_seconds_count",
                             fragment="broken", route="page", version="") == n


# --------------------------------------------------------------------------- fallbacks


async def test_fragment_fallbacks_total_counts_only_shown_fallbacks(fragments, start_composer):
    svc = await fragments({
        "/ok": html("<p>OK</p>"),
        "/down": html("down", status=500),
        "/static": html("<p>STATIC</p>"),
        "/static-prim": html("<p>PRIM-STATIC</p>"),
    })
    down, static = svc.url("/down"), svc.url("/static")
    composer = await start_composer({"page.html": f"""\
        <html><body>
        <fragment id="prim" src="{down}" fallback-src="{svc.url('/static-prim')}" primary></fragment>
        <fragment id="by-src" src="{down}" fallback-src="{static}"></fragment>
        <fragment id="by-inline" src="{down}"><p>INLINE</p></fragment>
        <fragment id="nothing" src="{down}"></fragment>
        <fragment id="both-fail" src="{down}" fallback-src="{down}"></fragment>
        <fragment id="healthy" src="{svc.url('/ok')}"><p>UNUSED</p></fragment>
        </body></html>
    """})
    for n in (1, 2):
        resp, body = await composer.get("/page")
        assert resp.status == 200
        assert "<p>PRIM-STATIC</p>" in body and "<p>STATIC</p>" in body and "<p>INLINE</p>" in body
        assert "<p>OK</p>" in body and "<p>UNUSED</p>" not in body

        metrics = await scrape(composer)
        name = "composer_fragment_fallbacks_total"
        assert metrics.value(name, fragment="prim", route="page") == n
        assert metrics.value(name, fragment="by-src", route="page") == n
        assert metrics.value(name, fragment="by-inline", route="page") == n
        assert metrics.count(name, fragment="nothing", route="page") == 0
        assert metrics.count(name, fragment="both-fail", route="page") == 0
        assert metrics.count(name, fragment="healthy", route="page") == 0
        for sample in metrics.samples(name):
            assert set(sample.labels) == {"fragment", "route"}


# --------------------------------------------------------------------------- page requests


async def test_requests_total_and_request_duration_by_route(fragments, start_composer):
    svc = await fragments({"/a": html("<p>A</p>", delay=0.05), "/down": html("down", status=500)})
    composer = await start_composer({
        "page.html": f'<html><body><fragment id="a" src="{svc.url("/a")}"></fragment></body></html>',
        "prim.html": f'<html><body><fragment id="p" src="{svc.url("/down")}" primary></fragment></body></html>',
    }, routes=TWO_ROUTES)

    resp, _ = await composer.get("/page")
    assert resp.status == 200
    async with composer.session.head(composer.url + "/page") as resp:
        assert resp.status == 200
    resp, _ = await composer.get("/nowhere")
    assert resp.status == 404
    async with composer.session.post(composer.url + "/page") as resp:
        assert resp.status == 405
    resp, _ = await composer.get("/prim")
    assert resp.status == 500
    resp, _ = await composer.get("/page")
    assert resp.status == 200

    metrics = await scrape(composer)
    name = "composer_requests_total"
    assert metrics.value(name, route="page", method="GET", status="200") == 2
    assert metrics.value(name, route="page", method="HEAD", status="200") == 1
    assert metrics.value(name, route="", method="GET", status="404") == 1
    assert metrics.value(name, route="", method="POST", status="405") == 1
    assert metrics.value(name, route="prim", method="GET", status="500") == 1
    assert sum(s.value for s in metrics.samples(name)) == 6

    duration = "composer_request_duration_seconds"
    assert metrics.value(duration + "_count", route="page") == 3
    assert metrics.value(duration + "_count", route="") == 2
    assert metrics.value(duration + "_count", route="prim") == 1
    page_sum = metrics.value(duration + "_sum", route="page")
    assert page_sum is not None and page_sum >= 2 * 0.05  # the two GETs waited for fragment a
    for sample in metrics.samples(duration + "_bucket"):
        assert set(sample.labels) == {"route", "le"}


async def test_fragment_info_is_one_per_declared_fragment(fragments, start_composer):
    svc = await fragments({"/a": html("<p>A</p>")})
    composer = await start_composer({
        "page.html": f"""\
            <html><head><script type="fragment" id="meta" src="{svc.url('/a')}"></script></head><body>
            <fragment id="header" src="{svc.url('/a')}"></fragment>
            <fragment src="{svc.url('/a')}"></fragment>
            </body></html>
        """,
        "prim.html": f'<html><body><fragment id="main" src="{svc.url("/a")}" primary></fragment></body></html>',
    }, routes=TWO_ROUTES)

    # declared fragments are listed before any page was requested
    metrics = await scrape(composer)
    info = metrics.samples("composer_fragment_info")
    assert {s.labels["fragment"] for s in info} == {"meta", "header", "page.html#3", "main"}
    for sample in info:
        assert sample.labels == {"fragment": sample.labels["fragment"], "version": "", "owner": ""}
        assert sample.value == 1


async def test_fragment_timeouts_are_exported_per_fragment_and_route(start_composer, fragments, tmp_path):
    """composer_fragment_timeout_seconds: the latency alert's budget is 80 % of it. A reload
    that drops a fragment drops its series."""
    svc = await fragments({"/a": html("<p>A</p>")})
    composer = await start_composer({
        "page.html": f'<fragment id="header" src="{svc.url("/a")}" timeout="800"></fragment>'
                     f'<fragment id="footer" src="{svc.url("/a")}"></fragment>'},
        settings="settings:\n  fragment_timeout_ms: 1500\n")
    metrics = await scrape(composer)
    assert metrics.value("composer_fragment_timeout_seconds", fragment="header", route="page") == 0.8
    assert metrics.value("composer_fragment_timeout_seconds", fragment="footer", route="page") == 1.5

    (tmp_path / "templates" / "page.html").write_text(f'<fragment id="header" src="{svc.url("/a")}"></fragment>')
    assert await composer.server.reloader.check(force=True)
    metrics = await scrape(composer)
    assert metrics.value("composer_fragment_timeout_seconds", fragment="header", route="page") == 1.5
    assert metrics.value("composer_fragment_timeout_seconds", fragment="footer", route="page") is None


async def test_a_slow_scrape_does_not_hold_pages(start_composer):
    """Rendering every series takes tens of ms on a large config (55 ms for bench/'s); it runs
    beside the pages, not in their way: a page asked for while a slow scrape renders is
    answered before the scrape's first byte."""
    composer = await start_composer({"page.html": "<html><body><p>hi</p></body></html>"})
    failures = composer.server.metrics.fragment_failures
    for i in range(40_000):  # 40,000 samples: a render of a few hundred ms
        failures.labels(f"f{i}", "page", "", "status")
    started = time.perf_counter()
    composer.server.metrics.render()
    assert time.perf_counter() - started > 0.1  # slow enough for the order below to mean something
    done: list[str] = []

    async def metrics() -> None:
        async with composer.session.get(composer.admin_url + "/metrics") as resp:
            done.append("metrics head")
            assert resp.status == 200
            await resp.read()

    scraping = asyncio.create_task(metrics())
    await asyncio.sleep(0.02)  # the render is under way
    resp, body = await composer.get("/page")
    done.append("page")
    await scraping
    assert resp.status == 200 and "<p>hi</p>" in body
    assert done == ["page", "metrics head"]


# --------------------------------------------------------------------------- health


async def test_healthz_and_readyz(start_composer, fragments):
    svc = await fragments({"/a": html("<p>A</p>")})
    composer = await start_composer({"page.html": f'<fragment src="{svc.url("/a")}"></fragment>'})
    async with composer.session.get(composer.admin_url + "/healthz") as resp:
        assert resp.status == 200
    async with composer.session.get(composer.admin_url + "/readyz") as resp:
        assert resp.status == 200
    # the admin port is not the page port: pages are not served there
    async with composer.session.get(composer.admin_url + "/page") as resp:
        assert resp.status == 404


# --------------------------------------------------------------------------- graceful stop


async def _fetch_page(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


async def _refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def test_graceful_stop_drains_in_flight_page(fragments, start_composer):
    svc = await fragments({"/slow": html("<p>SLOW</p>", delay=1.0)})
    composer = await start_composer({"page.html": f"""\
        <html><body><p>START</p>
        <fragment id="slow" src="{svc.url('/slow')}"></fragment>
        <p>END</p></body></html>
    """})
    server = composer.server
    page_port, admin_url = server.port, server.admin_url
    page = asyncio.create_task(_fetch_page(composer.url + "/page"))
    await wait_until(lambda: svc.hits.get("/slow"))

    started = time.monotonic()
    stop = asyncio.create_task(server.stop())
    await asyncio.sleep(0)  # stop() begins

    readyz: list[int] = []
    refused = None
    async with aiohttp.ClientSession() as admin:
        while not page.done():
            async with admin.get(admin_url + "/readyz") as resp:
                readyz.append(resp.status)
            if refused is None:
                refused = await _refused(page_port)
            await asyncio.sleep(0.05)

    status, body = await page
    assert status == 200
    assert "<p>START</p>" in body and "<p>SLOW</p>" in body and body.rstrip().endswith("</html>")
    assert readyz and set(readyz) == {503}, f"/readyz while draining answered {readyz}"
    assert refused, "a new connection to the page port was accepted after stop() began"

    await asyncio.wait_for(stop, timeout=server.grace)
    assert time.monotonic() - started < 3.0


async def test_graceful_stop_cuts_pages_running_past_the_grace(fragments, start_composer):
    svc = await fragments({"/stuck": html("<p>STUCK</p>", delay=3.0)})
    composer = await start_composer({"page.html": f"""\
        <html><body><p>START</p>
        <fragment id="stuck" src="{svc.url('/stuck')}" timeout="5000"></fragment>
        <p>END</p></body></html>
    """}, grace=0.5)
    page = asyncio.create_task(_fetch_page(composer.url + "/page"))
    await wait_until(lambda: svc.hits.get("/stuck"))

    started = time.monotonic()
    await asyncio.wait_for(composer.server.stop(), timeout=2.5)
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 1.5, f"stop() took {elapsed:.2f}s with grace 0.5s"

    try:
        status, body = await asyncio.wait_for(page, timeout=2.0)
    except aiohttp.ClientError:
        return  # the cut connection surfaced as a client error: expected
    assert not (status == 200 and "<p>STUCK</p>" in body and "<p>END</p>" in body), \
        "the page ran to completion although the grace had passed"


# --------------------------------------------------------------------------- logs


async def test_access_log_one_json_record_per_request(fragments, start_composer, caplog):
    caplog.set_level(logging.INFO, logger="composer")
    svc = await fragments({"/a": html("<p>A</p>", delay=0.1)})
    composer = await start_composer({"page.html": f'<html><body><fragment src="{svc.url("/a")}"></fragment></body></html>'})

    resp, _ = await composer.get("/page?x=1", headers={"x-request-id": "req-42"})
    assert resp.status == 200
    await wait_until(lambda: len(records(caplog, "composer.access")) >= 1)
    resp, _ = await composer.get("/missing")
    assert resp.status == 404
    await wait_until(lambda: len(records(caplog, "composer.access")) >= 2)
    await asyncio.sleep(0.05)

    access = records(caplog, "composer.access")
    assert len(access) == 2, [r.getMessage() for r in access]
    page, missing = (fields(r) for r in access)
    for f in (page, missing):
        assert set(ACCESS_FIELDS) <= set(f)
        json.dumps(f)
    assert page["method"] == "GET" and page["path"] == "/page" and page["status"] == 200
    assert page["route"] == "page" and page["request_id"] == "req-42"
    assert isinstance(page["duration_ms"], (int, float)) and page["duration_ms"] >= 100
    assert missing["path"] == "/missing" and missing["status"] == 404 and missing["route"] == ""
    assert missing["request_id"] and missing["request_id"] != "req-42"

    line = as_json_line(access[0])
    assert line["logger"] == "composer.access"
    for key in ACCESS_FIELDS:
        assert line[key] == page[key]


async def test_a_client_that_leaves_mid_page_has_an_access_line_with_499(fragments, start_composer, caplog):
    # Written where composer answers, not after aiohttp's last write: a page whose client left
    # (its handler cancelled) has its line too, with nginx's 499, its route and request id.
    caplog.set_level(logging.INFO, logger="composer")
    svc = await fragments({"/slow": html("<p>late</p>", delay=2.0)})
    composer = await start_composer({"page.html": f'<html><body><fragment src="{svc.url("/slow")}"></fragment></body></html>'})
    _, writer = await asyncio.open_connection("127.0.0.1", composer.server.port)
    writer.write(b"GET /page HTTP/1.1\r\nHost: x\r\nX-Request-Id: gone-1\r\n\r\n")
    await writer.drain()
    await wait_until(lambda: svc.requests)  # the page is being composed
    writer.close()
    await wait_until(lambda: records(caplog, "composer.access"))
    (access,) = records(caplog, "composer.access")
    line = fields(access)
    assert (line["status"], line["route"], line["request_id"], line["path"]) == (499, "page", "gone-1", "/page")
    assert line["duration_ms"] < 2000


async def test_a_request_that_does_not_parse_has_one_access_line_naming_the_error(start_composer, caplog):
    caplog.set_level(logging.INFO, logger="composer")
    composer = await start_composer({"page.html": "<html><body><p>hello</p></body></html>"})
    reader, writer = await asyncio.open_connection("127.0.0.1", composer.server.port)
    writer.write(b"GET /page HTTP/1.1\r\nHost: x\r\nContent-Length: abc123\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.split(b" ", 2)[1] == b"400", answer[:40]
    await wait_until(lambda: records(caplog, "composer.access"))
    await asyncio.sleep(0.05)
    (access,) = records(caplog, "composer.access")
    line = fields(access)
    assert line["status"] == 400 and line["route"] == "" and line["error"] and "abc123" not in json.dumps(line)


async def test_fragment_failure_logs_one_structured_record(fragments, start_composer, caplog):
    caplog.set_level(logging.INFO, logger="composer")
    svc = await fragments({
        "/ok": html("<p>OK</p>"),
        "/down": html("down", status=500),
        "/slow": html("late", delay=1.0),
    })
    down, slow = svc.url("/down"), svc.url("/slow")
    composer = await start_composer({"page.html": f"""\
        <html><body>
        <fragment id="fine" src="{svc.url('/ok')}"></fragment>
        <fragment id="down" src="{down}"><p>INLINE</p></fragment>
        <fragment id="slow" src="{slow}" timeout="100"></fragment>
        </body></html>
    """})
    resp, body = await composer.get("/page", headers={"x-request-id": "rid-7"})
    assert resp.status == 200 and "<p>INLINE</p>" in body

    failures = records(caplog, "composer.fragments")
    by_id = {fields(r)["fragment"]: r for r in failures}
    assert len(failures) == 2 and set(by_id) == {"down", "slow"}, [fields(r) for r in failures]

    down_fields, slow_fields = fields(by_id["down"]), fields(by_id["slow"])
    for f in (down_fields, slow_fields):
        assert set(FAILURE_FIELDS) <= set(f), f"missing {set(FAILURE_FIELDS) - set(f)}"
        json.dumps(f)  # JSON-able as is
        assert f["version"] == "" and f["route"] == "page" and f["request_id"] == "rid-7"
        assert isinstance(f["duration_ms"], (int, float)) and f["duration_ms"] >= 0
    assert down_fields["error_type"] == "status" and down_fields["status"] == 500
    assert down_fields["url"] == down
    assert slow_fields["error_type"] == "timeout" and slow_fields["url"] == slow
    assert slow_fields["status"] is None
    assert 90 <= slow_fields["duration_ms"] < 1000
    # what was shown differs: inline markup for `down`, nothing for `slow`
    assert down_fields["fallback"] != slow_fields["fallback"]

    line = as_json_line(by_id["down"])
    assert line["logger"] == "composer.fragments"
    assert line["fragment"] == "down" and line["error_type"] == "status" and line["request_id"] == "rid-7"


class _Stderr(io.StringIO):
    """A stderr for one test: what was written, and in how many writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@contextlib.contextmanager
def _serve_logging(stream: _Stderr) -> Iterator[JsonHandler]:
    """`setup_logging` on `stream`, as `serve` sets it up; the test process's logging restored after."""
    loggers = [logging.getLogger(name) for name in ("composer", "aiohttp", "opentelemetry")]
    saved = [(logger.handlers[:], logger.level, logger.propagate) for logger in loggers]
    switches = (logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
    try:
        yield setup_logging(stream=stream)
    finally:
        for logger, (handlers, level, propagate) in zip(loggers, saved, strict=True):
            logger.handlers[:], logger.propagate = handlers, propagate
            logger.setLevel(level)
        logging._srcfile, logging.logThreads, logging.logProcesses, logging.logMultiprocessing = switches


async def test_access_lines_of_a_loop_turn_share_one_write_and_keep_their_order(fragments, start_composer):
    # serve's access lines are written without a record, at the end of the loop's turn that
    # made them, together; a record (a fragment's failure) is written at once, after them.
    svc = await fragments({"/down": html("down", status=500)})
    composer = await start_composer(
        {"page.html": "<html><body><p>static</p></body></html>",
         "broken.html": f'<html><body><fragment id="down" src="{svc.url("/down")}"></fragment></body></html>'},
        routes="""
            routes:
              - {name: page, match: {path: /page}, template: page.html}
              - {name: broken, match: {path: /broken}, template: broken.html}
        """)
    stream = _Stderr()
    with _serve_logging(stream):
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def get(path: str) -> int:
                async with session.get(composer.server.url + path) as resp:
                    await resp.read()
                    return resp.status

            assert await asyncio.gather(*(get(f"/page?n={n}") for n in range(40))) == [200] * 40
            await wait_until(lambda: stream.getvalue().count('"msg": "access"') == 40)
            burst = stream.writes
            assert await get("/broken") == 200
            assert await get("/page?n=last") == 200
            await wait_until(lambda: stream.getvalue().count('"msg": "access"') == 42)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    lines = [r for r in lines if r["logger"].startswith("composer.")]  # (not the fragment service's)
    assert burst <= 10, f"{burst} writes for 40 access lines"
    assert [(r["msg"], r.get("path"), r.get("fragment")) for r in lines[40:]] == [
        ("fragment failed", None, "down"), ("access", "/broken", None), ("access", "/page", None)]
    assert sorted(r["request_id"] for r in lines[:40]) == sorted({r["request_id"] for r in lines[:40]})


async def test_a_record_is_written_after_the_access_lines_waiting_before_it():
    stream = _Stderr()
    with _serve_logging(stream) as handler:
        handler.pending.add('{"n": 1}')
        handler.pending.add('{"n": 2}')
        assert (stream.getvalue(), stream.writes) == ("", 0)  # waiting for the loop's turn to end
        logging.getLogger("composer.fragments").warning("fragment failed")
        assert [json.loads(line).get("n", "record") for line in stream.getvalue().splitlines()] == [1, 2, "record"]
        handler.pending.add('{"n": 3}')
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert stream.getvalue().splitlines()[-1] == '{"n": 3}'
        assert stream.writes == 2


# --------------------------------------------------------------------------- x-request-id


async def _page_with_two_fragments(fragments, start_composer):
    svc = await fragments({"/a": html("<p>A</p>"), "/b": html("<p>B</p>")})
    composer = await start_composer({"page.html": f"""\
        <html><body>
        <fragment src="{svc.url('/a')}"></fragment>
        <fragment src="{svc.url('/b')}" public></fragment>
        </body></html>
    """})
    return svc, composer


async def test_incoming_request_id_reaches_fragments_and_access_log(fragments, start_composer, caplog):
    caplog.set_level(logging.INFO, logger="composer")
    svc, composer = await _page_with_two_fragments(fragments, start_composer)
    resp, _ = await composer.get("/page", headers={"x-request-id": "abc-123_XYZ"})
    assert resp.status == 200
    await wait_until(lambda: records(caplog, "composer.access"))

    assert [r.headers.get("x-request-id") for r in svc.requests] == ["abc-123_XYZ"] * 2
    (access,) = records(caplog, "composer.access")
    assert fields(access)["request_id"] == "abc-123_XYZ"


@pytest.mark.parametrize("incoming", [None, "r" * 1000, "abc\tdef"], ids=["absent", "too-long", "tab"])
async def test_absurd_or_missing_request_id_is_replaced(incoming, fragments, start_composer, caplog):
    caplog.set_level(logging.INFO, logger="composer")
    svc, composer = await _page_with_two_fragments(fragments, start_composer)
    headers = {} if incoming is None else {"x-request-id": incoming}

    ids = []
    for n in (1, 2):
        resp, _ = await composer.get("/page", headers=headers)
        assert resp.status == 200
        await wait_until(lambda: len(records(caplog, "composer.access")) >= n)
        sent = {r.headers.get("x-request-id") for r in svc.requests[-2:]}
        assert len(sent) == 1, f"fragments of one page got different ids: {sent}"
        rid = sent.pop()
        assert rid and rid != incoming
        assert len(rid) <= 128 and rid.isascii() and rid.isprintable()
        assert fields(records(caplog, "composer.access")[-1])["request_id"] == rid
        ids.append(rid)
    assert ids[0] != ids[1], "a generated request id must be new per page"
