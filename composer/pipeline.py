"""Resolving one fragment: every layer between a `<fragment>` and what the page shows.

Like httpx's send chain, each layer adds one concern and calls the next:

    resolve    chooses the version (canary bucket, QA override, `enabled` flag) and records
               the outcome, once: metrics, the failure log line, the timing mark, the span
    cache      (in `resolve`) a URL that left its origin, or a nested one that may not be
               fetched, is refused; then `FragmentCache` (fresh and stale copies, one fetch
               shared by pages that asked alike), or, for a URL it never caches, `_attempt`
               straight away: one coroutine fewer on the common path
    _attempt   the circuit breaker, then one GET (`fragments.fetch` on the lean `Client`),
               timed by the duration histogram: the only layer that talks to a service
    _fallback  when no content came: `fallback-src` (or its last good copy), the inline
               markup (never for a primary), or nothing
    nesting    a body (of `src` or `fallback-src`) saying `x-composer-nested: 1` is compiled
               and its fragments resolved through `resolve` again, one level deeper
               (composer.nesting)

The common fragment skips the task and the coroutines: `start` chooses its version and writes
its request on an idle pooled connection (or queues it for one) as the page begins, and its
`Flight` takes the answer from the connection's callbacks, where `_land` does what `resolve`,
the cache's pass and `_attempt` would (the same helpers). Whatever needs awaiting (a nested
body, a stale connection, a `fallback-src` after a failure) goes on in a task.

The answer is an `Outcome`, a value; nothing a service does raises. A `Pipeline` belongs to
one server and holds what outlives a page: circuit breakers, the cache, and the last good
copy of each manifest fallback, fetched when a route table is applied.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Coroutine, Generator, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .breaker import Breaker, Breakers, State
from .cache import FragmentCache, LastGood, Result
from .canary import Analysis
from .client import Connection, Head, Name, Response, Stale, Ticket
from .config import CACHE_BYTES, Settings
from .errors import Reason
from .fragments import SKIP, SKIP_BUT_REDIRECTS, Failed, Fetched, Session, answer, failed, fetch
from .links import Asset
from .links import preload as preload_header
from .metrics import Metrics
from .nesting import NESTED_HEADER, Nesting, Room
from .routing import RouteTable
from .tailor import Slot, capped
from .tailor import assets as tailor_assets
from .template import Fragment, Template, UrlTemplate
from .urls import origin_allowed

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from .tracing import Tracing

__all__ = ["Flight", "Mark", "Outcome", "Page", "Pipeline", "marks_script"]

log = logging.getLogger("composer.fragments")

# Final: compiled, each is a C static; an imported name is a lookup in the module's dict on every
# use (a few per fragment).
monotonic: Final = time.monotonic
perf_counter: Final = time.perf_counter
_NESTED: Final = Name(NESTED_HEADER)

_ACCEPT_ENCODING = "gzip, deflate, br"  # what every fragment request accepts (SPEC §3)
# A timing mark (settings.timing_marks): fragment, start and duration in ms from the page's
# start, version, source, error.
Mark = tuple[str, float, float, str, str, str]


@dataclass(slots=True)
class Outcome:
    """What a fragment ends up as on the page, and where that came from. A value: never
    changed once made (not `frozen`, whose `__init__` costs four times as much, per fragment;
    and with an `__init__` of its own: compiled, that is C, where the dataclass's runs as Python)."""

    source: Literal["src", "fallback-src", "inline", "none"]
    body: bytes = b""
    assets: tuple[Asset, ...] = ()
    status: int = 0
    # A primary's response header lines (they decide the page), else None: an outcome waits,
    # held, until the fragments before it are written. As llhttp gave them: the page reads two
    # names of them (`Head.get`), and a multidict of all would cost ~7 k instructions a page.
    # (Under compat: tailor any fragment's until its assets are read from them.)
    head: Head | None = None
    version: str = ""  # the version chosen for the page (its fallback shows for it)
    # A nested fragment (SPEC §6): its body's bytes and its fragments' outcomes, in order;
    # empty for any other, whose `body` is shown.
    parts: tuple[bytes | tuple[Fragment, Outcome], ...] = ()
    # Under compat: tailor a primary's assets for the page's `Link` header, its stylesheets then
    # its scripts (which load through the AMD loader: they are not among `assets`); else None.
    preload: tuple[Asset, ...] | None = None

    def __init__(self, source: Literal["src", "fallback-src", "inline", "none"], body: bytes = b"",
                 assets: tuple[Asset, ...] = (), status: int = 0, head: Head | None = None,
                 version: str = "", parts: tuple[bytes | tuple[Fragment, Outcome], ...] = (),
                 preload: tuple[Asset, ...] | None = None) -> None:
        self.source = source
        self.body = body
        self.assets = assets
        self.status = status
        self.head = head
        self.version = version
        self.parts = parts
        self.preload = preload

    @property
    def all_assets(self) -> tuple[Asset, ...]:
        """Its assets, then its nested fragments' (in document order, at every depth)."""
        if not self.parts:
            return self.assets
        return self.assets + tuple(a for part in self.parts if isinstance(part, tuple) for a in part[1].all_assets)

    def link(self, first: str, cors: bool) -> str:
        """The page's `Link` header when this is its primary's outcome: `first` (under compat:
        tailor the AMD loader's entry), then its assets as preloads; with `cors` (client
        signals) its scripts with `crossorigin`, as they are written. Under compat they load
        through the AMD loader, without CORS."""
        if self.preload is not None:
            return preload_header(self.preload, False, first)
        return preload_header(self.assets, cors, first)


_NONE = Outcome("none")
# Cache results that are no fetch of this page's: canary analysis does not count them.
_NOT_FETCHED = frozenset({"hit", "stale", "coalesced"})


@dataclass(slots=True)
class Page:
    """Per-request facts every fragment fetch of the page shares. A value, never changed once
    made (not `frozen`, with an `__init__` of its own: see `Outcome`)."""

    route: str
    params: dict[str, str]
    request_id: str
    headers: CIMultiDict[str]
    public_headers: CIMultiDict[str]
    max_bytes: int
    deadline: float  # time.monotonic() after which pending fragments render their fallback
    bucket: int  # the user's canary bucket, 0–99 (-1: the page has no manifest fragment)
    overrides: Mapping[str, str]  # QA: fragment name → version
    started: float  # time.perf_counter() when composing began
    marks: list[Mark] | None  # settings.timing_marks
    span: Span | None  # compose_page, when tracing is on (for a nested fragment: its parent's span)
    settings: Settings
    room: Room | None = None  # how many more nested fragments the page may fetch
    depth: int = 1  # SPEC §6: 1 in the page's template, 2 in a fragment of it, …
    ancestors: tuple[str, ...] = ()  # the URLs a nested fragment is inside of

    def __init__(self, route: str, params: dict[str, str], request_id: str, headers: CIMultiDict[str],
                 public_headers: CIMultiDict[str], max_bytes: int, deadline: float, bucket: int,
                 overrides: Mapping[str, str], started: float, marks: list[Mark] | None, span: Span | None,
                 settings: Settings, room: Room | None = None, depth: int = 1, ancestors: tuple[str, ...] = ()) -> None:
        self.route = route
        self.params = params
        self.request_id = request_id
        self.headers = headers
        self.public_headers = public_headers
        self.max_bytes = max_bytes
        self.deadline = deadline
        self.bucket = bucket
        self.overrides = overrides
        self.started = started
        self.marks = marks
        self.span = span
        self.settings = settings
        self.room = room
        self.depth = depth
        self.ancestors = ancestors

    @classmethod
    def of(cls, request: web.BaseRequest, route: str, params: dict[str, str], settings: Settings, *,
           request_id: str, bucket: int, started: float, span: Span | None, fragments: int = 0) -> Page:
        """The page's fragment requests: what they carry of `request` (SPEC §3), and when
        they must be done. `params` are the route's raw path captures; `fragments` is how
        many its template has (the rest of settings.max_fragments_per_page is for nested ones)."""
        public = CIMultiDict({"x-request-id": request_id, "accept-encoding": _ACCEPT_ENCODING})
        headers = CIMultiDict(public)
        incoming = request.headers
        for name in settings.forward_headers:
            for value in incoming.getall(name, ()):
                headers.add(name, value)
        headers["x-request-uri"] = request.raw_path
        headers["x-request-host"] = incoming.get("host", "")
        # `Page(...)` with its arguments in order, not `cls(name=...)`: compiled, that is a C call,
        # where a class object called with sixteen keywords parses them by name (~6 k instructions).
        return Page(route, {k: unquote(v) for k, v in params.items()}, request_id, headers, public,
                    settings.max_fragment_bytes, monotonic() + settings.page_timeout_ms / 1000, bucket,
                    _overrides(incoming.get(settings.version_override_header or "", "")), started,
                    [] if settings.timing_marks else None, span, settings,
                    Room(settings.max_fragments_per_page - fragments, fragments))


class Pipeline:
    """Resolves the fragments of one server's pages; holds the client session, metrics,
    circuit breakers, the fragment cache and the last good copy of each fallback."""

    def __init__(self, session: Session, metrics: Metrics, *,
                 cache_bytes: int = CACHE_BYTES, tracing: Tracing | None = None,
                 canary: Analysis | None = None) -> None:
        self.session = session
        self.metrics = metrics
        self.tracing = tracing
        self.canary = canary if canary is not None else Analysis()  # SPEC §8: counts and verdicts
        self.breakers = Breakers(self._circuit_changed)
        self.cache = FragmentCache(cache_bytes)
        self.last_good = LastGood()
        self.nesting = Nesting(self.resolve)
        self._tasks: set[asyncio.Task[None]] = set()

    def apply(self, table: RouteTable) -> None:
        """Take up a (re)loaded table: resize the cache, forget circuits no fragment goes
        through any more, refetch manifest fragments' fallbacks."""
        settings = table.settings
        if settings.cache_max_bytes != self.cache.max_bytes:
            old, self.cache = self.cache, FragmentCache(settings.cache_max_bytes)
            self._spawn(old.close())
        fallbacks: dict[str, Fragment] = {}
        origins: set[tuple[str, str]] = set()
        for _, template in table.templates():
            for fragment in template.fragments:
                # The circuits pages go through: src (the active version), the canary's. A version
                # reached only by a QA override gets a new circuit when it is next fetched.
                origins.add((fragment.id, fragment.src.origin))
                if fragment.canary is not None:
                    origins.add((fragment.id, fragment.versions[fragment.canary].origin))
                if fragment.name is not None and fragment.fallback_src is not None \
                        and fragment.fallback_src.static is not None:
                    fallbacks.setdefault(fragment.fallback_src.text, fragment)
        for fragment_id in self.breakers.retain(origins):
            self.metrics.circuit_state.labels(fragment_id).set(self.breakers.worst(fragment_id))
        self.last_good.track(frozenset(fallbacks))
        for url, fragment in fallbacks.items():
            self._spawn(self._prefetch(url, fragment, settings.max_fragment_bytes))

    async def close(self) -> None:
        """Stop background work: fallback prefetches and cache refreshes."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.cache.close()

    async def resolve(self, fragment: Fragment, page: Page) -> Outcome:
        """What `fragment` shows on `page` (SPEC §3). Its metrics, failure log line, timing
        mark and span are recorded here, each once."""
        started = perf_counter()
        version, src, analysed = self._version(fragment, page)
        headers = page.public_headers if fragment.public else page.headers
        span = None
        if page.span is not None and self.tracing is not None:
            span, headers = self._span(fragment, version, page.span, headers)
        answer: Fetched | Failed | None = None  # None: flagged off, nothing fetched
        how: Result | None = None
        failure: Failed | None = None
        url: URL | None = None
        nested: Template | Failed | None = None
        try:
            if fragment.enabled:
                url = src.render(page.params)
                key = src.text or str(url)
                refused = self._refusal(page, src, url)
                if refused is not None:
                    answer = failure = refused
                elif self.cache.passes(key):  # never cached: no cache coroutine, one level fewer per resumption
                    answer, how, failure = self.cache.passed(
                        key, headers, await self._attempt(fragment, page, version, url, headers, src, _budget(fragment, page)))
                else:
                    answer, how, failure = await self.cache.get(
                        key, headers, partial(self._attempt, fragment, page, version, url, headers, src),
                        timeout=_budget(fragment, page), refresh_timeout=fragment.timeout)
                if isinstance(nested := self._template(fragment, page, answer), Failed):
                    answer = failure = nested
                self._count(fragment, page, version, analysed, how, failure)
            if isinstance(answer, Fetched):  # a stale copy may stand in for a failure: the page is whole
                outcome = Outcome("src", answer.body, answer.assets, answer.status,
                                  answer.head if fragment.primary or fragment.pipe is not None else None, version)
                if isinstance(nested, Template):
                    assert url is not None
                    outcome = await self.nesting.compose(nested, fragment, page, outcome, url, started, span)
            else:
                outcome = _versioned(await self._fallback(fragment, page, headers), version)
        except BaseException as exc:
            if span is not None and self.tracing is not None:
                self.tracing.fail(span, type(exc).__name__,
                                  "the page went away" if isinstance(exc, asyncio.CancelledError) else str(exc))
                span.end()
            raise
        self._recorded(fragment, page, version, url, failure, outcome, started)
        if span is not None:
            self._end_span(span, outcome, failure)
        if fragment.pipe is not None:  # settings.compat: tailor
            outcome = _tailor(outcome, fragment.pipe, fragment.primary)
        return outcome

    def start(self, fragment: Fragment, page: Page) -> Flight | None:
        """`resolve` without a task, for the common fragment, or None (then `resolve`): one
        not cached, behind a closed circuit (if any), on an untraced page, not nested, not under
        compat: tailor; and only when its request is written now on an idle pooled connection,
        or waits its turn for one (the pool is full). (A `fallback-src`, should it fail, is
        fetched in a task.)
        A task per fragment, with its coroutines, was a quarter of such a fragment's
        instructions (bench/PROFILE.md, twenty-second pass)."""
        if not fragment.enabled or page.span is not None or page.depth > 1 or fragment.pipe is not None:
            return None
        version, src, analysed = self._version(fragment, page)
        url = src.render(page.params)
        key = src.text or str(url)
        if not self.cache.passes(key) or not src.keeps_origin(url):
            return None
        breaker = self.breakers.get(fragment.id, fragment.name, src.origin, fragment.breaker) \
            if fragment.breaker.enabled else None
        timeout = _budget(fragment, page)
        if breaker is not None and breaker.state is not State.CLOSED or timeout <= 0:
            return None
        headers = page.public_headers if fragment.public else page.headers
        flight = Flight(self, fragment, page, version, analysed, url, key, headers, breaker, timeout)
        sent = self.session.send(url, headers, flight, max_bytes=page.max_bytes, share=fragment.id,
                                 skip_body=SKIP_BUT_REDIRECTS if fragment.primary else SKIP)
        if sent is None:
            return None
        if isinstance(sent, Ticket):
            flight.ticket = sent
        else:
            flight.conn = sent
        flight.flying = True
        flight.deadline = self.session.deadlines.add(flight.expire, timeout)
        return flight

    def _land(self, flight: Flight, result: Fetched | Failed) -> None:
        """What a flight's fetch came to, as `resolve` and `_attempt` record and show it."""
        fragment, page, version = flight.fragment, flight.page, flight.version
        self._measured(fragment, page, version, flight.breaker, flight.started, result)
        got, how, failure = self.cache.passed(flight.key, flight.headers, result)
        if isinstance(nested := self._template(fragment, page, got), Failed):
            got = failure = nested
        self._count(fragment, page, version, flight.analysed, how, failure)
        if isinstance(got, Fetched):
            outcome = Outcome("src", got.body, got.assets, got.status, got.head if fragment.primary else None, version)
            if isinstance(nested, Template):
                flight.follow(self._nested(flight, nested, outcome))
                return
        elif fragment.fallback_src is not None:
            flight.follow(self._fell_back(flight, failure))
            return
        else:
            outcome = _versioned(_inline(fragment), version)
        self._recorded(fragment, page, version, flight.url, failure, outcome, flight.started)
        flight.settle(outcome)

    async def _nested(self, flight: Flight, nested: Template, outcome: Outcome) -> Outcome:
        """A flight's body said it is a template (SPEC §6): composed as `resolve` composes one."""
        fragment, page = flight.fragment, flight.page
        outcome = await self.nesting.compose(nested, fragment, page, outcome, flight.url, flight.started, None)
        self._recorded(fragment, page, flight.version, flight.url, None, outcome, flight.started)
        return outcome

    async def _fell_back(self, flight: Flight, failure: Failed | None) -> Outcome:
        """A flight's fetch failed and its fragment has a `fallback-src`: that, as `resolve` shows it."""
        fragment, page, version = flight.fragment, flight.page, flight.version
        outcome = _versioned(await self._fallback(fragment, page, flight.headers), version)
        self._recorded(fragment, page, version, flight.url, failure, outcome, flight.started)
        return outcome

    def _count(self, fragment: Fragment, page: Page, version: str, analysed: str | None, how: Result | None,
               failure: Failed | None) -> None:
        """A fetch's cache result, canary count and failure count."""
        if how is not None:
            self.metrics.series(self.metrics.fragment_cache, fragment.id, how).inc()
        if analysed is not None:
            self.canary.count(analysed, version, how not in _NOT_FETCHED, failure is not None)
        if failure is not None:
            self.metrics.series(self.metrics.fragment_failures, fragment.id, page.route, version,
                                failure.reason.value).inc()

    def _version(self, fragment: Fragment, page: Page) -> tuple[str, UrlTemplate, str | None]:
        """A fragment's version for this page, its URL, and its name when its fetch counts for
        canary analysis (a canaried fragment, its version chosen by bucket: SPEC §8). A fragment
        not from the manifest has one."""
        if fragment.name is None:
            return fragment.version, fragment.src, None
        version, analysed = fragment.version, None
        if fragment.canary is not None:
            analysed = fragment.name
            if page.bucket < fragment.canary_percent and self.canary.aborted.get(fragment.name) != fragment.canary:
                version = fragment.canary
        forced = page.overrides.get(fragment.name) if page.overrides else None
        if forced is not None and forced in fragment.versions:  # listed versions only: QA, not an open door
            version, analysed = forced, None
        return version, fragment.versions[version], analysed

    def _template(self, fragment: Fragment, page: Page, answer: Fetched | Failed | None) -> Template | Failed | None:
        """SPEC §6: the template a body saying `x-composer-nested: 1` is, compiled; Failed when it
        does not compile (the fetch failed); None for any other answer."""
        if isinstance(answer, Fetched) and answer.head.get(_NESTED) == "1":
            return self.nesting.compiled(fragment, page, answer.body)
        return None

    def _refusal(self, page: Page, src: UrlTemplate, url: URL) -> Failed | None:
        """Why `url` is not fetched at all: it left its origin, or (nested) it may not be."""
        if not src.keeps_origin(url):
            return Failed(Reason.INVALID, "the URL left its origin after {param} interpolation")
        if page.depth > 1:
            return self.nesting.refusal(page, url)
        return None

    async def _attempt(self, fragment: Fragment, page: Page, version: str, url: URL, headers: CIMultiDict[str],
                       src: UrlTemplate, timeout: float) -> Fetched | Failed:
        """The breaker and one upstream GET of `url` within `timeout`: what the cache calls."""
        breaker = self.breakers.get(fragment.id, fragment.name, src.origin, fragment.breaker) \
            if fragment.breaker.enabled else None
        if timeout <= 0:  # before the breaker: a half-open circuit's one probe must really go
            return Failed(Reason.TIMEOUT, "no time left: the page deadline (settings.page_timeout_ms) "
                                          "passed, or it went waiting for another page's fetch")
        if breaker is not None and not breaker.allow(monotonic()):
            return Failed(Reason.CIRCUIT_OPEN, f"circuit open for {breaker.origin}")
        started = perf_counter()
        try:
            # Under compat: tailor a non-primary 3xx is content, as any status below 500 is to Tailor.
            result = await fetch(self.session, url, headers, timeout=timeout, max_bytes=page.max_bytes,
                                 allow_redirect=fragment.primary, share=fragment.id,
                                 redirect_body=fragment.pipe is not None and not fragment.primary)
        except BaseException:
            if breaker is not None:
                breaker.release()
            raise
        self._measured(fragment, page, version, breaker, started, result)
        return result

    def _measured(self, fragment: Fragment, page: Page, version: str, breaker: Breaker | None, started: float,
                  result: Fetched | Failed) -> None:
        """An attempt's duration, and its verdict to the breaker."""
        self.metrics.series(self.metrics.fragment_duration, fragment.id, page.route, version).observe(
            perf_counter() - started)
        if breaker is not None:
            breaker.record(isinstance(result, Fetched), monotonic())

    async def _fallback(self, fragment: Fragment, page: Page, headers: CIMultiDict[str]) -> Outcome:
        """`fallback-src` (2xx only; its last good copy when it fails), else the inline markup
        (never for a primary), else nothing."""
        fallback_src = fragment.fallback_src
        if fallback_src is not None:
            url = fallback_src.render(page.params)
            started, timeout = perf_counter(), _budget(fragment, page)
            fallback: Fetched | Failed | None = None
            # A nested fallback-src outside allowed_origins is not fetched (SPEC §6), as its src.
            if timeout > 0 and fallback_src.keeps_origin(url) and \
                    (page.depth == 1 or origin_allowed(url, page.settings.allowed_origins)):
                fallback, _, _ = await self.cache.get(
                    fallback_src.text or str(url), headers, lambda t: fetch(self.session, url, headers, timeout=t, max_bytes=page.max_bytes,
                                                       allow_redirect=False, share=fragment.id),
                    timeout=timeout, refresh_timeout=fragment.timeout)
            key = fallback_src.text  # "" unless static: only a fixed URL has a last good copy
            if isinstance(fallback, Fetched) and fallback.status < 300:
                self.last_good.put(key, fallback)
            else:
                fallback = self.last_good.get(key)
            if fallback is not None:
                outcome = Outcome("fallback-src", fallback.body, fallback.assets, fallback.status)
                if fallback.head.get(_NESTED) != "1":
                    return outcome
                # Composed as a nested `src` is: the header says the body is a template, whoever serves it.
                nested = self.nesting.compiled(fragment, page, fallback.body)
                if isinstance(nested, Template):
                    return await self.nesting.compose(nested, fragment, page, outcome, url, started, None)
                log.warning("fragment fallback failed", extra={"fields": {
                    "fragment": fragment.id, "route": page.route, "url": str(url), "error_type": nested.reason.value,
                    "detail": nested.detail, "request_id": page.request_id}})
        return _inline(fragment)

    def _recorded(self, fragment: Fragment, page: Page, version: str, url: URL | None, failure: Failed | None,
                  outcome: Outcome, started: float) -> None:
        """A resolved fragment's failure (if it failed) and timing mark."""
        if failure is not None:
            self._failed(fragment, page, version, url, failure, outcome, started)
        if page.marks is not None:
            page.marks.append((fragment.id, (started - page.started) * 1000, (perf_counter() - started) * 1000,
                               version, outcome.source, failure.reason.value if failure is not None else ""))

    def _failed(self, fragment: Fragment, page: Page, version: str, url: URL | None, failure: Failed,
                outcome: Outcome, started: float) -> None:
        """A failed fetch's fallback count, recent failures and log line, by what the page shows."""
        stale = outcome.source == "src"
        shown = not stale and outcome is not _NONE
        if shown:
            self.metrics.series(self.metrics.fragment_fallbacks, fragment.id, page.route).inc()
        self.metrics.recent.record(fragment.name or fragment.id, fallback=shown)
        if stale or failure.reason is not Reason.CIRCUIT_OPEN:  # an open circuit logs its transitions, not each page
            log.warning("fragment failed", extra={"fields": {
                "fragment": fragment.id, "version": version, "owner": fragment.owner, "route": page.route,
                "error_type": failure.reason.value, "detail": failure.detail, "url": str(url),
                "status": failure.status, "duration_ms": round((perf_counter() - started) * 1000, 1),
                "request_id": page.request_id, "fallback": "stale" if stale else outcome.source}})

    def _span(self, fragment: Fragment, version: str, parent: Span,
              headers: CIMultiDict[str]) -> tuple[Span, CIMultiDict[str]]:
        """The fragment's span, and the headers that carry it (a public fragment gets no
        request context at all)."""
        assert self.tracing is not None
        span = self.tracing.child("fetch_fragment", parent, {
            "composer.fragment.id": fragment.id, "composer.fragment.version": version,
            "composer.fragment.owner": fragment.owner, "composer.fragment.primary": fragment.primary,
            "composer.fragment.async": fragment.is_async,
            "composer.fragment.timeout_ms": round(fragment.timeout * 1000)})
        if not fragment.public:
            headers = CIMultiDict(headers)
            self.tracing.inject(span, headers)
        return span, headers

    def _end_span(self, span: Span, outcome: Outcome, failure: Failed | None) -> None:
        assert self.tracing is not None
        span.set_attribute("composer.fragment.source", outcome.source)
        status = failure.status if failure is not None and failure.status else outcome.status
        if status:
            span.set_attribute("http.response.status_code", status)
        if failure is not None:
            self.tracing.fail(span, failure.reason.value, failure.detail)
        span.end()

    async def _prefetch(self, url: str, fragment: Fragment, max_bytes: int) -> None:
        """Fetch a manifest fallback ahead of need: its copy stands in while its service is down."""
        assert fragment.fallback_src is not None and fragment.fallback_src.static is not None
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


class Flight:
    """A fragment's fetch with no task of its own (`Pipeline.start`). Its request went out as
    the page began; the connection's parser callbacks hand it the answer (`set_result`, or
    `set_exception`: it is the client's `Waiter`), and its outcome is made there and then,
    as `resolve` would make it. To the page it is what a task is: awaitable, `done`, `result`,
    `cancel`, and `wait` for a future to await. Its deadline calls `expire`: a timeout, as `fetch`'s.
    A pooled connection found closed sends it on to `resolve` in a task, as `Client.get` would
    try again; a nested body is composed in one, and a failed fetch's `fallback-src` fetched
    in one (`follow`)."""

    def __init__(self, pipeline: Pipeline, fragment: Fragment, page: Page, version: str, analysed: str | None,
                 url: URL, key: str, headers: CIMultiDict[str], breaker: Breaker | None, timeout: float) -> None:
        self.pipeline = pipeline
        self.fragment = fragment
        self.page = page
        self.version = version
        self.analysed = analysed
        self.url = url
        self.key = key
        self.headers = headers
        self.breaker = breaker
        self.timeout = timeout
        self.started = perf_counter()
        self.flying = False  # its request is out (or waiting its turn): an answer is expected
        self.conn: Connection | None = None  # the connection it was written on at once, or
        self.ticket: Ticket | None = None  # its place in the pool's queue (`conn` set once written)
        self.opening: asyncio.Task[None] | None = None  # handed a free slot: its connection being opened
        self.deadline = 0
        self.outcome: Outcome | None = None
        self.error: BaseException | None = None  # a bug of composer's, raised to the page (as a task's)
        self.task: asyncio.Task[Outcome] | None = None
        self.waiter: asyncio.Future[None] | None = None

    # -------- the client's side (Waiter): called only while `flying`

    def set_result(self, response: Response | None, /) -> None:
        if not self.flying:
            return
        if response is None:  # waiting its turn, it was handed a free slot: a connection to open
            assert self.ticket is not None
            self.opening = self.pipeline.session.open_for(self.ticket)
            return
        self._answered(self._landed(), response)

    def set_exception(self, exception: BaseException, /) -> None:
        if self.flying:
            self._answered(self._landed(), exception)

    # -------- the deadline's

    def expire(self) -> None:
        if self.flying:
            self.flying = False  # (its deadline is gone: it is what called)
            self._answered(self._dropped(),
                           Failed(Reason.TIMEOUT, f"no complete response within {self.timeout * 1000:.0f} ms"))

    # -------- the page's side

    def done(self) -> bool:
        return self.outcome is not None or self.error is not None

    def result(self) -> Outcome:
        if self.error is not None:
            raise self.error
        assert self.outcome is not None
        return self.outcome

    def __await__(self) -> Generator[Any, None, Outcome]:
        """Awaited as a task is: its outcome, once in."""
        if not self.done():
            yield from self.wait()
        return self.result()

    def wait(self) -> asyncio.Future[None]:
        """A future done when `done()` is."""
        waiter = self.waiter
        if waiter is None:
            waiter = self.waiter = self.pipeline.session.loop.create_future()
            if self.done():
                waiter.set_result(None)
        return waiter

    def cancel(self) -> bool:
        """The page went away: the request, if still out (or waiting its turn), is dropped (its
        connection closed)."""
        if self.flying:
            conn = self._landed()
            self.error = asyncio.CancelledError()  # done: a waiting ticket is passed over
            if conn is not None:
                self.pipeline.session.drop(conn, self.fragment.id)
            if self.opening is not None:
                self.opening.cancel()
            return True
        if self.task is not None:
            return self.task.cancel()
        return False

    # -------- its own

    def _landed(self) -> Connection | None:
        """No longer flying, its deadline removed: the connection its request was written on."""
        self.pipeline.session.deadlines.remove(self.expire, self.deadline)
        self.flying = False
        return self._connection()

    def _dropped(self) -> Connection | None:
        """Its deadline passed: what is still opening for it is stopped; its connection, if any."""
        if self.opening is not None:
            self.opening.cancel()
        return self._connection()

    def _connection(self) -> Connection | None:
        """The connection its request went out on, if any; its ticket is let go. The ticket
        holds the flight (its waiter): both would be a cycle, freed only by the collector,
        which a serving composer runs rarely (server.tune_gc). A ticket given up, still queued,
        holds it until the pool passes it over."""
        ticket = self.ticket
        if ticket is None:
            return self.conn
        self.ticket = None
        return ticket.conn

    def _answered(self, conn: Connection | None, got: Response | Failed | BaseException | None) -> None:
        """The connection back to its pool (an answer read whole) or closed (an error, a timeout),
        and what the fetch came to, as `fetch` makes it, to the pipeline."""
        pipeline, share, max_bytes = self.pipeline, self.fragment.id, self.page.max_bytes
        try:
            if isinstance(got, Response):
                assert conn is not None
                pipeline.session.finish(conn, share)
                pipeline._land(self, answer(got, max_bytes))
                return
            if conn is not None:  # (None: it never had one; a failure to open one freed its slot)
                pipeline.session.drop(conn, share)
            if isinstance(got, Failed):
                pipeline._land(self, got)
            elif isinstance(got, Stale):  # the server had closed it: once more, on a new one (as `Client.get`)
                self.follow(pipeline.resolve(self.fragment, self.page))
            else:
                assert got is not None  # (None is a free slot: never for `Client.send`'s waiter)
                pipeline._land(self, failed(got, max_bytes))
        except Exception as exc:  # noqa: BLE001 - a bug of composer's: the page's, as it would be from a task
            self.error = exc
            self._wake()

    def follow(self, work: Coroutine[object, object, Outcome]) -> None:
        """Its outcome is what `work` comes to, in a task."""
        self.task = task = asyncio.ensure_future(work)
        task.add_done_callback(self._followed)

    def _followed(self, task: asyncio.Task[Outcome]) -> None:
        if task.cancelled():
            self.error = asyncio.CancelledError()
        elif (error := task.exception()) is not None:
            self.error = error
        else:
            self.outcome = task.result()
        self._wake()

    def settle(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def _inline(fragment: Fragment) -> Outcome:
    """A fragment's fallback when no `fallback-src` is shown: its inline markup (never a
    primary's), else nothing."""
    if not fragment.primary and fragment.fallback_html.strip():
        return Outcome("inline", fragment.fallback_html)
    return _NONE


def _versioned(outcome: Outcome, version: str) -> Outcome:
    """A fallback, shown for the version chosen for the page (nothing shown: nothing to say)."""
    return replace(outcome, version=version) if version and outcome.source != "none" else outcome


def _tailor(outcome: Outcome, pipe: Slot, primary: bool) -> Outcome:
    """What a fragment shows under settings.compat: tailor: its assets as Tailor reads them
    (`x-amz-meta-link` too, `max_asset_links` of each kind), its body inside Tailor's wrapper
    of `start`/`end` calls, which load and initialise its scripts (so the page does not write
    them), and nothing at all when it shows nothing, as in Tailor. A primary's assets are
    kept for the page's `Link` header: stylesheets, then scripts (Tailor's order)."""
    if outcome.source == "none":
        return outcome
    limit = pipe.limit
    found = tailor_assets(outcome.head.headers, limit) if outcome.head is not None else capped(outcome.assets, limit)
    start, end, kept = pipe.wrap(found)
    preload = tuple(sorted(found, key=lambda a: a.kind != "stylesheet")) if primary else None
    lines = outcome.head if primary else None  # read: only a primary's are needed now
    if outcome.parts:  # a nested fragment: its parts are shown, not its body
        return replace(outcome, assets=kept, parts=(start, *outcome.parts, end), preload=preload, head=lines)
    return replace(outcome, assets=kept, body=b"".join((start, outcome.body, end)), preload=preload, head=lines)


def _budget(fragment: Fragment, page: Page) -> float:
    """The fragment's timeout, cut short by the page's deadline."""
    return min(fragment.timeout, page.deadline - monotonic())


def _overrides(header: str) -> dict[str, str]:
    """`footer=2.4.0, header=1.0` → {"footer": "2.4.0", "header": "1.0"}; junk is ignored."""
    if not header:
        return {}
    pairs = (item.partition("=") for item in header.split(","))
    return {name.strip(): version.strip() for name, sep, version in pairs if sep and name.strip()}


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


def marks_script(marks: list[Mark]) -> bytes:
    """The page's per-fragment timing script (see _MARKS_SCRIPT); `<` escaped so no value can
    close the script."""
    data = json.dumps([[f, round(start, 1), round(dur, 1), v, source, error]
                       for f, start, dur, v, source, error in marks], separators=(",", ":"))
    return _MARKS_SCRIPT.format(data.replace("<", "\\u003c")).encode()
