"""Tracing: W3C trace context to every fragment and backend; OpenTelemetry spans when on.

Spans are read from the SDK's in-memory exporter; the OTLP test runs `composer serve` with
OTEL_EXPORTER_OTLP_ENDPOINT pointing at a real collector stand-in on 127.0.0.1 and decodes
what arrives with the OTLP protobuf schema.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import Serve, cli_env, free_port, html, write_config
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from composer import ComposerServer, load
from composer.tracing import Tracing, from_env

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
TIMEOUT = aiohttp.ClientTimeout(total=10)

PAGE = """
    <html><head></head><body>
      <fragment src="{main}" primary></fragment>
      <fragment id="nav" src="{nav}"></fragment>
      <fragment id="broken" src="{broken}"><p>broken fallback</p></fragment>
      <fragment id="later" src="{later}" async></fragment>
      <fragment id="ads" src="{ads}" public></fragment>
      <fragment name="footer"></fragment>
    </body></html>
"""


class Traced:
    """A composer whose spans land in memory, and the services it talks to."""

    def __init__(self, server: ComposerServer, exporter: InMemorySpanExporter,
                 seen: dict[str, list[web.Request]]) -> None:
        self.server, self.exporter, self.seen = server, exporter, seen

    def spans(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]

    async def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        async with aiohttp.ClientSession() as session, \
                session.get(self.server.url + path, headers=headers or {}, timeout=TIMEOUT) as resp:
            return resp.status, await resp.text()


@pytest.fixture
async def traced(tmp_path: Path, aiohttp_server) -> AsyncIterator[Callable[..., Awaitable[Traced]]]:
    """Factory: a composer with in-memory tracing in front of one fragment service + backend."""
    servers: list[ComposerServer] = []

    async def start(tracing_on: bool = True, later: float = 0.05) -> Traced:
        seen: dict[str, list[web.Request]] = {}

        def record(path: str, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
            async def wrapped(request: web.Request) -> web.StreamResponse:
                seen.setdefault(path, []).append(request)
                return await handler(request)
            return wrapped

        async def slow(request: web.Request) -> web.Response:
            end = time.monotonic() + later
            while time.monotonic() < end and request.transport is not None and not request.transport.is_closing():
                await asyncio.sleep(0.005)  # gives up as soon as composer hangs up: teardown stays fast
            return web.Response(text="<p>later</p>", content_type="text/html")

        app = web.Application()
        for path, handler in {"/main": html("<main>M</main>"), "/nav": html("<nav>N</nav>"),
                              "/broken": html("no", status=500), "/later": slow,
                              "/ads": html("<p>ad</p>"), "/footer/2.0": html("<footer>F</footer>"),
                              "/api/x": html("api")}.items():
            app.router.add_get(path, record(path, handler))
        service = await aiohttp_server(app, host="127.0.0.1")
        url = str(service.make_url("/")).rstrip("/")
        settings = f"""
            fragments:
              footer:
                owner: team-footer
                versions: {{"2.0": "{url}/footer/2.0"}}
                active: "2.0"
        """
        routes = f"""
            routes:
              - name: page
                match: {{path: /page}}
                template: page.html
              - name: api
                match: {{path: "/api/{{rest}}"}}
                backend: {url}
        """
        page = PAGE.format(main=url + "/main", nav=url + "/nav", broken=url + "/broken", later=url + "/later",
                           ads=url + "/ads")
        table = load(write_config(tmp_path, {"page.html": page}, routes, settings))
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        server = ComposerServer(table, host="127.0.0.1", port=0, admin_port=0,
                                tracing=Tracing(provider) if tracing_on else None)
        await server.start()
        servers.append(server)
        return Traced(server, exporter, seen)

    yield start
    for server in servers:
        await server.stop()


def traceparent_of(request: web.Request) -> tuple[str, str, str]:
    version, trace_id, span_id, flags = request.headers["traceparent"].split("-")
    assert version == "00" and int(flags, 16) & 1  # sampled (0x02: a random trace id, W3C level 2)
    return trace_id, span_id, request.headers.get("tracestate", "")


async def test_a_page_is_a_server_span_with_one_client_span_per_fragment(traced) -> None:
    t = await traced()
    status, body = await t.get("/page", {"traceparent": TRACEPARENT, "tracestate": "vendor=abc"})
    assert status == 200 and "broken fallback" in body and "<p>later</p>" in body
    [page] = t.spans("compose_page")
    assert page.kind is SpanKind.SERVER
    assert f"{page.context.trace_id:032x}" == TRACE_ID
    assert page.parent is not None and f"{page.parent.span_id:016x}" == PARENT_ID
    assert page.attributes["http.route"] == "page" and page.attributes["url.path"] == "/page"
    assert page.attributes["http.request.method"] == "GET"
    assert page.attributes["http.response.status_code"] == 200

    fragments = {s.attributes["composer.fragment.id"]: s for s in t.spans("fetch_fragment")}
    assert set(fragments) == {"page.html#1", "nav", "broken", "later", "ads", "footer"}
    for span in fragments.values():
        assert span.kind is SpanKind.CLIENT
        assert span.parent is not None and span.parent.span_id == page.context.span_id
        assert span.context.trace_id == page.context.trace_id
        assert page.start_time <= span.start_time <= span.end_time <= page.end_time
    main, broken, later, footer = fragments["page.html#1"], fragments["broken"], fragments["later"], fragments["footer"]
    assert main.attributes["composer.fragment.primary"] is True and main.attributes["composer.fragment.async"] is False
    assert main.attributes["http.response.status_code"] == 200
    assert main.attributes["composer.fragment.source"] == "src"
    assert main.attributes["composer.fragment.timeout_ms"] == 3000
    assert main.status.status_code is StatusCode.UNSET
    assert later.attributes["composer.fragment.async"] is True
    assert later.end_time - later.start_time >= 50_000_000  # ns: its service waits 50 ms
    assert footer.attributes["composer.fragment.version"] == "2.0"
    assert footer.attributes["composer.fragment.owner"] == "team-footer"
    assert broken.status.status_code is StatusCode.ERROR
    assert broken.attributes["error.type"] == "status" and broken.attributes["http.response.status_code"] == 500
    assert broken.attributes["composer.fragment.source"] == "inline"

    # Upstream, each fragment request carries its own span as the parent: same trace, one span each.
    for path, ident in (("/main", "page.html#1"), ("/nav", "nav"), ("/broken", "broken"), ("/later", "later"),
                        ("/footer/2.0", "footer")):
        [request] = t.seen[path]
        trace_id, span_id, state = traceparent_of(request)
        assert trace_id == TRACE_ID
        assert span_id == f"{fragments[ident].context.span_id:016x}", path
        assert state == "vendor=abc"
    # A public fragment is a third party: no request context reaches it.
    [ads] = t.seen["/ads"]
    assert "traceparent" not in ads.headers and "tracestate" not in ads.headers


async def test_a_page_without_traceparent_starts_a_trace(traced) -> None:
    t = await traced()
    status, _ = await t.get("/page")
    assert status == 200
    [page] = t.spans("compose_page")
    assert page.parent is None
    trace_id, span_id, _ = traceparent_of(t.seen["/nav"][0])
    assert trace_id == f"{page.context.trace_id:032x}"
    assert span_id != f"{page.context.span_id:016x}"


async def test_a_backend_request_is_a_proxy_span_and_carries_it(traced) -> None:
    t = await traced()
    status, body = await t.get("/api/x", {"traceparent": TRACEPARENT})
    assert (status, body) == (200, "api")
    [span] = t.spans("proxy_request")
    assert span.parent is not None and f"{span.parent.span_id:016x}" == PARENT_ID
    assert span.attributes["http.route"] == "api" and span.attributes["http.response.status_code"] == 200
    trace_id, span_id, _ = traceparent_of(t.seen["/api/x"][0])
    assert (trace_id, span_id) == (TRACE_ID, f"{span.context.span_id:016x}")


async def test_without_tracing_the_incoming_context_is_forwarded_unchanged(traced) -> None:
    t = await traced(tracing_on=False)
    status, _ = await t.get("/page", {"traceparent": TRACEPARENT, "tracestate": "vendor=abc"})
    assert status == 200
    for path in ("/main", "/nav", "/footer/2.0"):
        assert t.seen[path][0].headers["traceparent"] == TRACEPARENT
        assert t.seen[path][0].headers["tracestate"] == "vendor=abc"
    assert "traceparent" not in t.seen["/ads"][0].headers
    assert t.exporter.get_finished_spans() == ()


async def test_a_page_whose_browser_leaves_still_ends_its_spans(traced) -> None:
    t = await traced(later=10.0)
    # The browser leaves once the page is under way (the async fragment is being fetched).
    async with aiohttp.ClientSession() as session:
        async def visit() -> None:
            async with session.get(t.server.url + "/page", timeout=TIMEOUT) as resp:
                await resp.read()
        page = asyncio.ensure_future(visit())
        for _ in range(500):
            if t.seen.get("/later"):
                break
            await asyncio.sleep(0.01)
        assert t.seen.get("/later"), "the page never got under way"
        page.cancel()
        with pytest.raises(asyncio.CancelledError):
            await page
    for _ in range(100):
        if t.spans("compose_page"):
            break
        await asyncio.sleep(0.02)
    [page] = t.spans("compose_page")
    assert page.status.status_code is StatusCode.ERROR
    later = [s for s in t.spans("fetch_fragment") if s.attributes["composer.fragment.id"] == "later"]
    assert len(later) == 1 and later[0].status.status_code is StatusCode.ERROR


# ---------------------------------------------------------------- from the environment

@pytest.fixture
async def collector(aiohttp_server) -> tuple[str, list[ExportTraceServiceRequest]]:
    """An OTLP/HTTP collector stand-in: POST /v1/traces with protobuf, decoded and kept."""
    received: list[ExportTraceServiceRequest] = []

    async def traces(request: web.Request) -> web.Response:
        assert request.headers["content-type"] == "application/x-protobuf"
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        received.append(message)
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    server = await aiohttp_server(app, host="127.0.0.1")
    return str(server.make_url("")).rstrip("/"), received


def otlp_spans(received: list[ExportTraceServiceRequest]) -> list[tuple[str, str, Any]]:
    """(service.name, span name, span) of every span received."""
    spans = []
    for message in received:
        for resource_spans in message.resource_spans:
            service = next(a.value.string_value for a in resource_spans.resource.attributes
                           if a.key == "service.name")
            for scope in resource_spans.scope_spans:
                spans += [(service, span.name, span) for span in scope.spans]
    return spans


async def test_serve_exports_spans_over_otlp_when_the_endpoint_is_set(tmp_path: Path, collector, fragments) -> None:
    endpoint, received = collector
    service = await fragments({"/nav": html("<nav>N</nav>")})
    write_config(tmp_path, {"page.html": f'<body><fragment id="nav" src="{service.url("/nav")}"></fragment></body>'})
    async with Serve(tmp_path, env=cli_env(OTEL_EXPORTER_OTLP_ENDPOINT=endpoint)) as serve, \
            aiohttp.ClientSession() as session:
        async with session.get(serve.base + "/page", headers={"traceparent": TRACEPARENT}, timeout=TIMEOUT) as resp:
            assert resp.status == 200 and "<nav>N</nav>" in await resp.text()
        await serve.stop()  # the batch still queued is flushed on the way out
        assert serve.proc is not None and serve.proc.returncode == 0, serve.stderr()
    spans = otlp_spans(received)
    assert {(svc, name) for svc, name, _ in spans} == {("composer", "compose_page"), ("composer", "fetch_fragment")}
    page = next(span for _, name, span in spans if name == "compose_page")
    fragment = next(span for _, name, span in spans if name == "fetch_fragment")
    assert page.trace_id.hex() == TRACE_ID and page.parent_span_id.hex() == PARENT_ID
    assert fragment.parent_span_id == page.span_id
    assert service.requests[0].headers["traceparent"] == f"00-{TRACE_ID}-{fragment.span_id.hex()}-01"


async def test_a_dead_collector_costs_pages_nothing(tmp_path: Path, fragments) -> None:
    """The collector is down: pages are served as ever; the exporter's failure is logged, and
    the process still stops promptly."""
    service = await fragments({"/nav": html("<nav>N</nav>")})
    write_config(tmp_path, {"page.html": f'<body><fragment id="nav" src="{service.url("/nav")}"></fragment></body>'})
    env = cli_env(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{free_port()}", OTEL_BSP_SCHEDULE_DELAY="50")
    async with Serve(tmp_path, env=env) as serve, aiohttp.ClientSession() as session:
        for _ in range(5):
            async with session.get(serve.base + "/page", timeout=TIMEOUT) as resp:
                assert resp.status == 200 and "<nav>N</nav>" in await resp.text()
        began = time.monotonic()
        await serve.stop()
        assert serve.proc is not None and serve.proc.returncode == 0, serve.stderr()
        # Not the SDK's 10 s export timeout: composer waits CLOSE_SECONDS (2) for the flush.
        assert time.monotonic() - began < 5, serve.stderr()
    failures = [r for r in serve.records() if r["logger"].startswith("opentelemetry")]
    assert failures and all(r["level"] in ("warning", "error") for r in failures), serve.stderr()
    assert any("/v1/traces" in r["msg"] for r in failures)


def test_tracing_is_off_without_an_endpoint_or_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    assert from_env() is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert from_env() is None
    monkeypatch.delenv("OTEL_SDK_DISABLED")
    tracing = from_env()
    assert tracing is not None
    tracing.provider.shutdown()


def test_an_endpoint_without_the_sdk_installed_says_so_and_serves_on() -> None:
    """fragment-composer[otel] not installed (the import is made to fail): one warning, tracing off."""
    code = textwrap.dedent("""
        import logging, os, sys
        sys.modules["opentelemetry.sdk"] = None  # as if `pip install fragment-composer` without [otel]
        logging.basicConfig(level=logging.WARNING, format="%(name)s %(message)s")
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://127.0.0.1:4318"
        from composer.tracing import from_env
        print(from_env())
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert done.stdout.strip() == "None"
    assert "pip install 'fragment-composer[otel]'" in done.stderr and "tracing stays off" in done.stderr
