"""Composing one page: SPEC §3 as a single coroutine.

`Composer.compose` starts every fragment at once, waits for the primary (if any) to decide
the status and headers, writes the head, then walks the compiled chunks in document order:
literal bytes go out as soon as nothing before them is pending, each fragment when it is
ready, and async fragments, in completion order, just before `</body>`. Outcomes are
values (`Outcome`), decided once per fragment in `_resolve`, which is also the one place
that records a fragment's metrics and failure log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .breaker import Breaker, Breakers, State
from .cache import FragmentCache, LastGood
from .client import Client
from .config import CACHE_BYTES, MAX_FRAGMENT_BYTES, Settings
from .errors import Reason, error_page
from .fragments import Asset, Failed, Fetched, fetch
from .logs import REQUEST_ID
from .metrics import Metrics
from .routing import Route, RouteTable
from .template import ASYNC_SLOT, Fragment, Template, UrlTemplate

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from .tracing import Tracing

__all__ = ["BARE_500", "Composer", "Outcome"]

log = logging.getLogger("composer.fragments")

BARE_500 = error_page(500)
_CACHE_CONTROL = "no-cache, no-store, must-revalidate"
BUCKET_COOKIE = "composer_bucket"
# A year: the bucket is the only canary state, so it must outlive the browser session.
_BUCKET_COOKIE = BUCKET_COOKIE + "={}; Max-Age=31536000; Path=/; HttpOnly; SameSite=Lax"
_CONTENT_TYPE = "text/html; charset=utf-8"
_ACCEPT_ENCODING = "gzip, deflate, br"
_SLICE = 64 * 1024  # the most written to a client at once
# A primary answering one of these says "no content": the page follows it, empty, like a 3xx.
_NO_BODY = frozenset({204, 205})
# Moves an async fragment's content from its hidden carrier to the placeholder, and removes
# both (the placeholder also when nothing came). Its stylesheets stay outside the carrier: a
# moved <link> is fetched again when it is not cacheable.
_MOVE_SCRIPT = (
    '<script>(function(p,c){{if(p){{if(c)while(c.firstChild)p.parentNode.insertBefore(c.firstChild,p);'
    'p.remove()}}if(c)c.remove()}})(document.getElementById("composer-async-{0}"),'
    'document.getElementById("composer-async-{0}-content"))</script>'
)
# One script per page (settings.timing_marks): a `performance.measure` per fragment, on a
# "composer" track of Chrome DevTools' Performance panel (its extensibility API reads
# `detail.devtools`); RUM reads them with performance.getEntriesByType("measure"). Times are
# ms from the navigation's requestStart, the browser's closest mark to composer's start.
_MARKS_SCRIPT = (
    '<script>(function(m){{var p=performance,n=p.getEntriesByType("navigation")[0],o=n?n.requestStart:0;'
    'm.forEach(function(f){{try{{p.measure("fragment "+f[0],{{start:o+f[1],duration:f[2],detail:{{'
    'version:f[3],source:f[4],error:f[5],devtools:{{dataType:"track-entry",track:"composer",'
    'color:f[5]?"error":"primary",properties:[["version",f[3]],["source",f[4]],["error",f[5]]],'
    'tooltipText:f[0]+": "+(f[5]||f[4])}}}}}})}}catch(e){{}}}})}})({0})</script>'
)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a fragment ends up as on the page, and where that came from."""

    source: Literal["src", "fallback-src", "inline", "none"]
    body: bytes = b""
    assets: tuple[Asset, ...] = ()
    status: int = 0
    headers: CIMultiDictProxy[str] | None = None


_NONE = Outcome("none")


@dataclass(frozen=True, slots=True)
class _Page:
    """Per-request facts every fragment fetch of the page shares."""

    route: str
    params: dict[str, str]
    request_id: str
    headers: CIMultiDict[str]
    public_headers: CIMultiDict[str]
    max_bytes: int
    deadline: float  # time.monotonic() after which pending fragments render their fallback
    bucket: int = -1  # the user's canary bucket, 0–99 (-1: the page has no manifest fragment)
    overrides: Mapping[str, str] = field(default_factory=dict)  # QA: fragment name → version
    started: float = 0.0  # time.perf_counter() when composing began
    marks: list[tuple[str, float, float, str, str, str]] | None = None  # settings.timing_marks
    span: Span | None = None  # compose_page, when tracing is on


def request_id_of(request: web.BaseRequest) -> str:
    """The incoming `x-request-id` when it is sane (printable, ≤128 chars), else a new one."""
    rid = request.headers.get("x-request-id", "")
    if 0 < len(rid) <= 128 and rid.isascii() and rid.isprintable():
        return rid
    return f"{random.getrandbits(128):032x}"  # an id, not a secret: no urandom syscall per page


class Composer:
    """Composes pages for one server; holds what outlives a page: the client session, metrics,
    circuit breakers, the fragment cache and the last good copy of each fallback."""

    def __init__(self, session: Client, metrics: Metrics, *,
                 cache_bytes: int = CACHE_BYTES, tracing: Tracing | None = None) -> None:
        self.session = session
        self.metrics = metrics
        self.tracing = tracing
        self.breakers = Breakers(self._circuit_changed)
        self.cache = FragmentCache(cache_bytes)
        self.last_good = LastGood()
        self._tasks: set[asyncio.Task[None]] = set()

    def apply(self, table: RouteTable) -> None:
        """Take up a (re)loaded table: resize the cache, refetch manifest fragments' fallbacks."""
        settings = table.settings
        if settings is not None and settings.cache_max_bytes != self.cache.max_bytes:
            old, self.cache = self.cache, FragmentCache(settings.cache_max_bytes)
            self._spawn(old.close())
        fallbacks: dict[str, Fragment] = {}
        origins: set[tuple[str, str]] = set()
        for route in table.routes:
            for fragment in route.template.fragments if route.template else ():
                # The circuits pages go through: src (the active version), the canary's. A version
                # reached only by a QA override gets a new circuit when it is next fetched.
                origins.add((fragment.id, fragment.src.origin))
                if fragment.canary is not None:
                    origins.add((fragment.id, fragment.versions[fragment.canary].origin))
                if fragment.name is not None and fragment.fallback_src is not None \
                        and fragment.fallback_src.static is not None:
                    fallbacks.setdefault(str(fragment.fallback_src.static), fragment)
        for fragment_id in self.breakers.retain(origins):
            self.metrics.circuit_state.labels(fragment_id).set(self.breakers.worst(fragment_id))
        self.last_good.track(frozenset(fallbacks))
        for url, fragment in fallbacks.items():
            self._spawn(self._prefetch(url, fragment, table.settings))

    async def _prefetch(self, url: str, fragment: Fragment, settings: Settings | None) -> None:
        assert fragment.fallback_src is not None and fragment.fallback_src.static is not None
        max_bytes = settings.max_fragment_bytes if settings else MAX_FRAGMENT_BYTES
        headers = CIMultiDict({"accept-encoding": _ACCEPT_ENCODING})
        answer = await fetch(self.session, fragment.fallback_src.static, headers, timeout=fragment.timeout,
                             max_bytes=max_bytes, allow_redirect=False)
        if isinstance(answer, Fetched) and answer.status < 300:
            self.last_good.put(url, answer)
        else:
            log.warning("fallback prefetch failed", extra={"fields": {
                "fragment": fragment.id, "url": url, "owner": fragment.owner,
                "error_type": answer.reason.value if isinstance(answer, Failed) else "status",
                "detail": answer.detail if isinstance(answer, Failed) else f"status {answer.status}"}})

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop background work: fallback prefetches and cache refreshes."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.cache.close()

    def _circuit_changed(self, breaker: Breaker) -> None:
        """Gauge and log line of a transition. The line names the owner and the version(s)
        served from the breaker's origin (the labels of its metrics, joined by "," when
        versions share the origin): whoever is paged can tell whose version to roll back."""
        self.metrics.circuit_state.labels(breaker.fragment).set(self.breakers.worst(breaker.fragment))
        owner, version = self.metrics.served_at(breaker.fragment, breaker.origin)
        fields = {"fragment": breaker.fragment, "origin": breaker.origin, "owner": owner, "version": version,
                  "state": breaker.state.name.lower(), "consecutive_failures": breaker.consecutive,
                  "cooldown_ms": breaker.policy.cooldown_ms}
        if breaker.state is State.CLOSED:
            log.info("circuit closed", extra={"fields": fields})
        else:
            log.warning("circuit opened" if breaker.state is State.OPEN else "circuit half-open",
                        extra={"fields": fields})

    def _page(self, request: web.BaseRequest, route: Route, params: dict[str, str], settings: Settings,
              bucket: int, started: float) -> _Page:
        rid = request.get(REQUEST_ID) or request_id_of(request)
        public = CIMultiDict({"x-request-id": rid, "accept-encoding": _ACCEPT_ENCODING})
        headers = CIMultiDict(public)
        incoming = request.headers
        for name in settings.forward_headers:
            for value in incoming.getall(name, ()):
                headers.add(name, value)
        headers["x-request-uri"] = request.raw_path
        headers["x-request-host"] = incoming.get("host", "")
        overrides = _overrides(incoming.get(settings.version_override_header or "", ""))
        span = None
        if self.tracing is not None:
            span = self.tracing.page("compose_page", incoming, {
                "http.request.method": request.method, "http.route": route.name, "url.path": request.path,
                "composer.template": route.template.name if route.template else ""})
        return _Page(route=route.name, params={k: unquote(v) for k, v in params.items()}, request_id=rid,
                     headers=headers, public_headers=public, max_bytes=settings.max_fragment_bytes,
                     deadline=time.monotonic() + settings.page_timeout_ms / 1000, bucket=bucket,
                     overrides=overrides, started=started, marks=[] if settings.timing_marks else None,
                     span=span)

    async def compose(self, request: web.BaseRequest, route: Route, params: dict[str, str],
                      settings: Settings) -> web.StreamResponse:
        """Answer `request` with the route's template; fragment tasks never outlive this call.

        `params` are the route's raw path captures; `settings` those of the route's table.
        """
        template = route.template
        assert template is not None
        bucket, new_bucket = -1, False
        if template.versioned:
            bucket = bucket_of(request)
            if bucket < 0:
                bucket, new_bucket = random.randrange(100), True
        started = time.perf_counter()
        page = self._page(request, route, params, settings, bucket, started)
        head_only = request.method == "HEAD"
        # HEAD needs only what decides the status and headers: the primary, if any.
        wanted = template.fragments if not head_only else (template.primary,) if template.primary else ()
        tasks: dict[int, asyncio.Task[Outcome]] = {
            f.index: asyncio.create_task(self._resolve(f, page)) for f in wanted}
        status = 0
        try:
            headers = CIMultiDict({"content-type": _CONTENT_TYPE, "cache-control": _CACHE_CONTROL})
            if new_bucket:
                headers.add("set-cookie", _BUCKET_COOKIE.format(bucket))
            status = 200
            waited = 0.0 if settings.server_timing else None  # None: no Server-Timing
            if template.primary is not None:
                outcome = await tasks[template.primary.index]
                if waited is not None:
                    waited = time.perf_counter() - started
                if outcome.source == "none":
                    status = 500
                    return web.Response(status=500, body=BARE_500,
                                        headers=_head(route, headers, template.primary, waited, started))
                if outcome.source == "src":
                    status = outcome.status
                    assert outcome.headers is not None
                    for cookie in outcome.headers.getall("set-cookie", ()):
                        headers.add("set-cookie", cookie)
                    if 300 <= status < 400 or status in _NO_BODY:
                        if "location" in outcome.headers:
                            headers["location"] = outcome.headers["location"]
                        del headers["content-type"]
                        return web.Response(status=status,
                                            headers=_head(route, headers, template.primary, waited, started))
                if outcome.assets:
                    headers["link"] = _preload(outcome.assets)
            response = web.StreamResponse(status=status,
                                          headers=_head(route, headers, template.primary, waited, started))
            await response.prepare(request)
            if not head_only:
                # The page's last bytes go out with the chunked terminator: one write, not two.
                await response.write_eof(await self._stream(response, template, tasks, page.marks))
            else:
                await response.write_eof()
            return response
        except BaseException as exc:
            if page.span is not None and self.tracing is not None:
                self.tracing.fail(page.span, type(exc).__name__, str(exc))
            raise
        finally:
            for task in tasks.values():
                task.cancel()
            if page.span is not None:
                page.span.set_attribute("http.response.status_code", status)
                page.span.end()

    async def _stream(self, response: web.StreamResponse, template: Template,
                      tasks: dict[int, asyncio.Task[Outcome]],
                      marks: list[tuple[str, float, float, str, str, str]] | None) -> bytes:
        """Write the page in order as fragments get ready; return the bytes still to write."""
        seen: set[str] = set()
        out: list[bytes] = []
        for chunk in template.chunks:
            if type(chunk) is bytes:
                out.append(chunk)
            elif chunk is ASYNC_SLOT:
                if template.async_fragments:
                    await _flush(response, out)
                    await self._stream_async(response, template, tasks, seen)
                if marks:  # every fragment before </body> has finished by now
                    out.append(_marks(marks))
            else:
                assert isinstance(chunk, Fragment)
                if chunk.is_async:
                    out.append(b'<template id="composer-async-%d"></template>' % chunk.index)
                    continue
                task = tasks[chunk.index]
                if not task.done():
                    await _flush(response, out)
                _render(await task, seen, out)
                del tasks[chunk.index]  # its outcome (and body) is freed once written
        if len(out) > 1 and sum(map(len, out)) > _SLICE:
            await _flush(response, out)  # a large tail goes out in slices, like the rest
        return b"".join(out)

    async def _stream_async(self, response: web.StreamResponse, template: Template,
                            tasks: dict[int, asyncio.Task[Outcome]], seen: set[str]) -> None:
        pending = {tasks[f.index]: f for f in template.async_fragments}
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            out: list[bytes] = []
            for task in sorted(done, key=lambda t: pending[t].index):
                fragment = pending.pop(task)
                outcome = task.result()
                if outcome.source != "none":
                    _styles(outcome.assets, seen, out)
                    out.append(b'<div hidden id="composer-async-%d-content">' % fragment.index)
                    _render(outcome, seen, out)
                    out.append(b"</div>")
                out.append(_MOVE_SCRIPT.format(fragment.index).encode())
            await _flush(response, out)

    async def _resolve(self, fragment: Fragment, page: _Page) -> Outcome:
        """Fetch `fragment`, falling back as SPEC §3 says; record its metrics, failure log line,
        timing mark and span, each once."""
        started = time.perf_counter()
        headers = page.public_headers if fragment.public else page.headers
        src, version = fragment.src, fragment.version
        if fragment.name is not None:
            if fragment.canary is not None and page.bucket < fragment.canary_percent:
                version = fragment.canary
            forced = page.overrides.get(fragment.name) if page.overrides else None
            if forced in fragment.versions:  # only versions the manifest lists: QA, not an open door
                version = forced
            src = fragment.versions[version]
        span, tracing = None, self.tracing
        if page.span is not None and tracing is not None:
            span = tracing.child("fetch_fragment", page.span, {
                "composer.fragment.id": fragment.id, "composer.fragment.version": version,
                "composer.fragment.owner": fragment.owner, "composer.fragment.primary": fragment.primary,
                "composer.fragment.async": fragment.is_async,
                "composer.fragment.timeout_ms": round(fragment.timeout * 1000)})
            if not fragment.public:  # a public fragment gets no request context at all
                headers = CIMultiDict(headers)
                tracing.inject(span, headers)
        try:
            if fragment.enabled:
                outcome, failure = await self._fetch(fragment, page, src, version, headers, started)
            else:  # flagged off: the fallback, and nothing fetched
                outcome, failure = await self._fallback(fragment, page, headers), None
        except BaseException as exc:
            if span is not None and tracing is not None:
                tracing.fail(span, type(exc).__name__,
                             "the page went away" if isinstance(exc, asyncio.CancelledError) else str(exc))
                span.end()
            raise
        error = failure.reason.value if failure is not None else ""
        if page.marks is not None:
            page.marks.append((fragment.id, (started - page.started) * 1000, (time.perf_counter() - started) * 1000,
                               version, outcome.source, error))
        if span is not None and tracing is not None:
            span.set_attribute("composer.fragment.source", outcome.source)
            status = failure.status if failure is not None and failure.status else outcome.status
            if status:
                span.set_attribute("http.response.status_code", status)
            if failure is not None:
                tracing.fail(span, error, failure.detail)
            span.end()
        return outcome

    async def _fetch(self, fragment: Fragment, page: _Page, src: UrlTemplate, version: str,
                     headers: CIMultiDict[str], started: float) -> tuple[Outcome, Failed | None]:
        """The fragment's outcome, and its failure if any (with a stale copy, both)."""
        url = src.render(page.params)
        failure: Failed | None
        if src.keeps_origin(url):
            load = self._loader(fragment, page, src, url, headers, version)
            answer, how, failure = await self.cache.get(
                str(url), headers, load, timeout=_budget(fragment, page), refresh_timeout=fragment.timeout)
            self.metrics.child(self.metrics.fragment_cache, fragment.id, how).inc()
        else:
            answer = failure = Failed(Reason.INVALID, "the URL left its origin after {param} interpolation")
        if failure is not None:
            self.metrics.child(self.metrics.fragment_failures, fragment.id, page.route, version,
                               failure.reason.value).inc()
        if isinstance(answer, Fetched):
            if failure is not None:  # a stale copy stands in: the page is whole, the failure is still logged
                self.metrics.recent.record(fragment.name or fragment.id, fallback=False)
                _log_failure(fragment, page, version, url, failure, time.perf_counter() - started, "stale")
            return Outcome("src", answer.body, answer.assets, answer.status, answer.headers), failure
        assert failure is not None
        outcome = await self._fallback(fragment, page, headers)
        if outcome is not _NONE:
            self.metrics.child(self.metrics.fragment_fallbacks, fragment.id, page.route).inc()
        self.metrics.recent.record(fragment.name or fragment.id, fallback=outcome is not _NONE)
        if failure.reason is not Reason.CIRCUIT_OPEN:  # an open circuit logs its transitions, not each page
            _log_failure(fragment, page, version, url, failure, time.perf_counter() - started, outcome.source)
        return outcome, failure

    def _loader(self, fragment: Fragment, page: _Page, src: UrlTemplate, url: URL, headers: CIMultiDict[str],
                version: str) -> Callable[[float], Awaitable[Fetched | Failed]]:
        """The upstream fetch of `url` for the cache to call: through the breaker, timed."""
        breaker = self.breakers.get(fragment.id, fragment.name, src.origin, fragment.breaker) \
            if fragment.breaker.enabled else None

        async def load(timeout: float) -> Fetched | Failed:
            if timeout <= 0:  # before the breaker: a half-open circuit's one probe must really go
                return Failed(Reason.TIMEOUT, "no time left: the page deadline (settings.page_timeout_ms) "
                                              "passed, or it went waiting for another page's fetch")
            if breaker is not None and not breaker.allow(time.monotonic()):
                return Failed(Reason.CIRCUIT_OPEN, f"circuit open for {breaker.origin}")
            started = time.perf_counter()
            try:
                result = await fetch(self.session, url, headers, timeout=timeout, max_bytes=page.max_bytes,
                                     allow_redirect=fragment.primary, share=fragment.id)
            except BaseException:
                if breaker is not None:
                    breaker.release()
                raise
            self.metrics.child(self.metrics.fragment_duration, fragment.id, page.route, version).observe(
                time.perf_counter() - started)
            if breaker is not None:
                breaker.record(isinstance(result, Fetched), time.monotonic())
            return result

        return load

    async def _fallback(self, fragment: Fragment, page: _Page, headers: CIMultiDict[str]) -> Outcome:
        """`fallback-src` (2xx only; its last good copy when it fails), else the inline markup
        (never for a primary), else nothing."""
        fallback_src = fragment.fallback_src
        if fallback_src is not None:
            url = fallback_src.render(page.params)
            timeout = _budget(fragment, page)
            fallback: Fetched | Failed | None = None
            if timeout > 0 and fallback_src.keeps_origin(url):
                fallback, _, _ = await self.cache.get(
                    str(url), headers, lambda t: fetch(self.session, url, headers, timeout=t, max_bytes=page.max_bytes,
                                                       allow_redirect=False, share=fragment.id),
                    timeout=timeout, refresh_timeout=fragment.timeout)
            key = str(url) if fallback_src.static is not None else ""
            if isinstance(fallback, Fetched) and fallback.status < 300:
                self.last_good.put(key, fallback)
            else:
                fallback = self.last_good.get(key)
            if fallback is not None:
                return Outcome("fallback-src", fallback.body, fallback.assets, fallback.status)
        if not fragment.primary and fragment.fallback_html.strip():
            return Outcome("inline", fragment.fallback_html)
        return _NONE


def _budget(fragment: Fragment, page: _Page) -> float:
    """The fragment's timeout, cut short by the page's deadline."""
    return min(fragment.timeout, page.deadline - time.monotonic())


def bucket_of(request: web.BaseRequest) -> int:
    """The user's canary bucket from the `composer_bucket` cookie; -1 when absent or not 0–99."""
    if "cookie" not in request.headers:
        return -1
    value = request.cookies.get(BUCKET_COOKIE, "")
    # ASCII only: str.isdigit() also accepts "²" (int() raises: a 500 the cookie would cause
    # on every page) and "٣" (not a bucket composer ever sets).
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 2 else -1


def _overrides(header: str) -> dict[str, str]:
    """`footer=2.4.0, header=1.0` → {"footer": "2.4.0", "header": "1.0"}; junk is ignored."""
    if not header:
        return {}
    pairs = (item.partition("=") for item in header.split(","))
    return {name.strip(): version.strip() for name, sep, version in pairs if sep and name.strip()}


def _head(route: Route, headers: CIMultiDict[str], primary: Fragment | None, waited: float | None,
          started: float) -> CIMultiDict[str]:
    """The page's headers as they leave: with Server-Timing, through the route's filters."""
    if waited is not None:
        headers["server-timing"] = _timing(primary, waited, time.perf_counter() - started)
    for f in route.filters:
        f.on_response(headers)
    return headers


async def _flush(response: web.StreamResponse, out: list[bytes]) -> None:
    """Write `out` and empty it. Large output goes in slices, each waiting for the client to
    take the one before (aiohttp drains past 64 KiB): a client that reads slowly holds its
    page's fragments, never a second copy of them in the socket's buffer."""
    if not out:
        return
    if len(out) == 1 or sum(map(len, out)) <= _SLICE:
        data = b"".join(out)
        out.clear()
        if len(data) <= _SLICE:
            await response.write(data)
            return
        pieces = [data]
    else:
        pieces = out[:]
        out.clear()
    for piece in pieces:
        view = memoryview(piece)
        for start in range(0, len(view), _SLICE):
            await response.write(view[start:start + _SLICE])


def _styles(assets: tuple[Asset, ...], seen: set[str], out: list[bytes]) -> None:
    for asset in assets:
        if asset.kind == "stylesheet" and asset.url not in seen:
            seen.add(asset.url)
            out.append(asset.tag)


def _render(outcome: Outcome, seen: set[str], out: list[bytes]) -> None:
    """Append a fragment's stylesheets, body and scripts; each asset URL once per page."""
    assets = outcome.assets
    _styles(assets, seen, out)
    out.append(outcome.body)
    for asset in assets:
        if asset.kind == "script" and asset.url not in seen:
            seen.add(asset.url)
            out.append(asset.tag)


def _timing(primary: Fragment | None, waited: float, elapsed: float) -> str:
    """`Server-Timing` as the head leaves: the wait for the primary fragment (its fetch, or its
    fallback's) and composer's own time around it, in ms (browsers' devtools show both)."""
    own = f"composer;dur={(elapsed - waited) * 1000:.1f}"
    if primary is None:
        return own
    ident = primary.id
    desc = ident.replace("\\", "\\\\").replace('"', '\\"') if ident.isascii() and ident.isprintable() else ""
    return f'primary;dur={waited * 1000:.1f};desc="{desc}", {own}'


def _marks(marks: list[tuple[str, float, float, str, str, str]]) -> bytes:
    """The page's per-fragment timing script (see _MARKS_SCRIPT); `<` escaped so no value can
    close the script."""
    data = json.dumps([[f, round(start, 1), round(dur, 1), v, source, error]
                       for f, start, dur, v, source, error in marks], separators=(",", ":"))
    return _MARKS_SCRIPT.format(data.replace("<", "\\u003c")).encode()


def _preload(assets: tuple[Asset, ...]) -> str:
    kinds = {"stylesheet": "style", "script": "script"}
    return ", ".join(f'<{a.url}>; rel="preload"; as="{kinds[a.kind]}"' for a in assets)


def _log_failure(fragment: Fragment, page: _Page, version: str, url: object, failed: Failed, duration: float,
                 shown: str) -> None:
    log.warning("fragment failed", extra={"fields": {
        "fragment": fragment.id,
        "version": version,
        "owner": fragment.owner,
        "route": page.route,
        "error_type": failed.reason.value,
        "detail": failed.detail,
        "url": str(url),
        "status": failed.status,
        "duration_ms": round(duration * 1000, 1),
        "request_id": page.request_id,
        "fallback": shown,
    }})
