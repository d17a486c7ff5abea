"""Composing one page: SPEC §3 as a single coroutine.

`Composer.compose` starts every fragment at once, waits for the primary (if any) to decide
the status and headers, writes the head, then walks the compiled chunks in document order:
literal bytes go out as soon as nothing before them is pending, each fragment when it is
ready, and async fragments, in completion order, just before `</body>`. What a fragment
shows is an `Outcome`, a value decided by `pipeline.Pipeline.resolve` (in a task) or by a
`pipeline.Flight` (the common fragment, without one): this module streams pages and knows
nothing of fetching, caches, breakers or fallbacks. A template without fragments or client
signals has nothing to stream: it is answered whole, in one write.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Final

from aiohttp import web
from multidict import CIMultiDict

from .canary import BUCKET_SET_COOKIE, user_bucket
from .client import Name
from .config import Settings
from .errors import error_page
from .filters import apply_response
from .links import Asset
from .pipeline import Flight, Mark, Outcome, Page, Pipeline, marks_script
from .routing import Route
from .signals import PageSignals
from .template import ASYNC_SLOT, Fragment, Template

if TYPE_CHECKING:
    from .tracing import Tracing

__all__ = ["BARE_500", "Composer"]

BARE_500 = error_page(500)
_CACHE_CONTROL = "no-cache, no-store, must-revalidate"
_CONTENT_TYPE = "text/html; charset=utf-8"
_SLICE = 64 * 1024  # the most written to a client at once
_SET_COOKIE: Final = Name("set-cookie")  # what a page reads of its primary's header lines
_LOCATION: Final = Name("location")
_NO_BODY = frozenset({204, 205})  # a primary's "no content": the page follows it, empty, like a 3xx
# Moves an async fragment's content from its hidden carrier to the placeholder, and removes both (the
# placeholder also when nothing came). Its stylesheets stay outside: a moved <link> is fetched again.
_MOVE_SCRIPT = (
    '<script>(function(p,c){{if(p){{if(c)while(c.firstChild)p.parentNode.insertBefore(c.firstChild,p);'
    'p.remove()}}if(c)c.remove()}})(document.getElementById("composer-async-{0}"),'
    'document.getElementById("composer-async-{0}-content"))</script>'
)


class Composer:
    """Composes pages for one server, with the `Pipeline` that resolves their fragments (and
    which it closes)."""

    def __init__(self, pipeline: Pipeline, *, tracing: Tracing | None = None) -> None:
        self.pipeline = pipeline
        self.tracing = tracing

    async def close(self) -> None:
        """Stop background work (the pipeline's fallback prefetches and cache refreshes)."""
        await self.pipeline.close()

    def _page(self, request: web.BaseRequest, route: Route, params: dict[str, str], settings: Settings,
              bucket: int, started: float, request_id: str) -> Page:
        span = None
        if self.tracing is not None:
            span = self.tracing.page("compose_page", request.headers, {
                "http.request.method": request.method, "http.route": route.name, "url.path": request.path,
                "composer.template": route.template.name if route.template else ""})
        return Page.of(request, route.name, params, settings, request_id=request_id, bucket=bucket, started=started,
                       span=span, fragments=len(route.template.fragments) if route.template else 0)

    async def compose(self, request: web.BaseRequest, route: Route, params: dict[str, str],
                      settings: Settings, request_id: str) -> web.StreamResponse:
        """Answer `request` (`request_id`) with the route's template, given its raw path captures
        (`params`) and its table's `settings`; no fragment's fetch outlives this call."""
        template = route.template
        assert template is not None
        bucket, new_bucket = user_bucket(request) if template.versioned else (-1, False)
        started = time.perf_counter()
        head_only = request.method == "HEAD"
        # HEAD needs only what decides the status and headers: the primary, if any.
        wanted = template.fragments if not head_only else (template.primary,) if template.primary else ()
        # A page that fetches nothing (and is not traced) needs no fragment context.
        page = self._page(request, route, params, settings, bucket, started, request_id) \
            if wanted or self.tracing is not None else None
        tasks: dict[int, asyncio.Task[Outcome] | Flight] = {}
        if page is not None:
            loop = asyncio.get_running_loop()  # once: on Python 3.11 each lookup is a getpid() call
            pipeline = self.pipeline  # a `Flight` where it can, else a task (named: not a made-up "Task-N")
            tasks = {f.index: pipeline.start(f, page) or asyncio.Task(pipeline.resolve(f, page), loop=loop, name=f.id)
                     for f in wanted}
        span = page.span if page is not None else None
        status = 0
        try:
            headers = CIMultiDict({"content-type": _CONTENT_TYPE, "cache-control": _CACHE_CONTROL})
            if new_bucket:
                headers.add("set-cookie", BUCKET_SET_COOKIE.format(bucket))
            status = 200  # the span's, should the page go away while its primary is awaited
            primary = await tasks[template.primary.index] if template.primary is not None else None
            status, body = _head(route, template, primary, headers, settings.server_timing, started)
            if body is not None:  # the head is the whole answer
                return web.Response(status=status, body=body or None, headers=headers)
            if not template.fragments and page is None and not template.client_signals:  # its bytes are the page
                whole = web.Response(status=status, body=b"".join([c for c in template.chunks if type(c) is bytes]),
                                     headers=headers)
                whole.enable_chunked_encoding()  # as every page (SPEC §3), in the head's write
                return whole
            response = _Streamed(status=status, headers=headers)
            await response.prepare(request)
            signals = PageSignals(route.name, request_id, settings.client_signals_sample) \
                if template.client_signals and not head_only else None
            # The page's last bytes go out with the chunked terminator: one write, not two. (HEAD: none.)
            await response.write_eof(b"" if head_only else await self._stream(
                response, template, tasks, page.marks if page else None, signals))
            return response
        except BaseException as exc:
            if span is not None and self.tracing is not None:
                self.tracing.fail(span, type(exc).__name__, str(exc))
            raise
        finally:
            for task in tasks.values():
                task.cancel()
            if span is not None:
                span.set_attribute("http.response.status_code", status)
                span.end()

    async def _stream(self, response: web.StreamResponse, template: Template,
                      tasks: dict[int, asyncio.Task[Outcome] | Flight],
                      marks: list[Mark] | None, signals: PageSignals | None) -> bytes:
        """Write the page in order as fragments get ready; return the bytes still to write.
        With `signals`, each fragment's markup sits between its marker comments."""
        seen: set[str] = set()
        out: list[bytes] = []
        for chunk in template.chunks:
            if type(chunk) is bytes:
                out.append(chunk)
            elif chunk is ASYNC_SLOT:
                if template.async_fragments:
                    await _flush(response, out)
                    await self._stream_async(response, template, tasks, seen, signals)
                if marks:  # every fragment before </body> has finished by now
                    out.append(marks_script(marks))
                if signals is not None:
                    out.append(signals.block())
            else:
                assert isinstance(chunk, Fragment)
                if chunk.is_async:
                    out.append(b'<template id="composer-async-%d"></template>' % chunk.index)
                    continue
                task = tasks[chunk.index]
                if not task.done():
                    await _flush(response, out)
                    await task
                _render(task.result(), seen, out, chunk, signals)
                del tasks[chunk.index]  # its outcome (and body) is freed once written
        if signals is not None and not signals.written:  # a template without </body>
            out.append(signals.block())
        if len(out) > 1 and sum(map(len, out)) > _SLICE:
            await _flush(response, out)  # a large tail goes out in slices, like the rest
        return b"".join(out)

    async def _stream_async(self, response: web.StreamResponse, template: Template,
                            tasks: dict[int, asyncio.Task[Outcome] | Flight], seen: set[str],
                            signals: PageSignals | None) -> None:
        pending: dict[asyncio.Future[Any], Fragment] = {  # (a flight is waited for by its `wait()` future)
            (t.wait() if isinstance(t := tasks[f.index], Flight) else t): f for f in template.async_fragments}
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            out: list[bytes] = []
            for waited in sorted(done, key=lambda t: pending[t].index):
                fragment = pending.pop(waited)
                outcome = tasks[fragment.index].result()
                if fragment.pipe is not None:  # settings.compat: tailor: its `end` call moves it into place
                    _render(outcome, seen, out, fragment, signals)
                    continue
                if outcome.source != "none":
                    _styles(outcome.all_assets, seen, out)
                    out.append(b'<div hidden id="composer-async-%d-content">' % fragment.index)
                    _render(outcome, seen, out, fragment, signals)
                    out.append(b"</div>")
                # With signals no inline script (a strict CSP): the collector moves it.
                out.append(_MOVE_SCRIPT.format(fragment.index).encode() if signals is None
                           else b'<template data-composer-move="%d"></template>' % fragment.index)
            await _flush(response, out)


class _Streamed(web.StreamResponse):
    """A page whose head leaves with its first bytes, in one write (StreamResponse's: alone, at once)."""

    _send_headers_immediately = False


def _head(route: Route, template: Template, outcome: Outcome | None, headers: CIMultiDict[str], server_timing: bool,
          started: float) -> tuple[int, bytes | None]:
    """The page's status and `headers`, decided once: by its primary's `outcome` if it has one (SPEC
    §3), then by the route's response filters. The body comes with them when the head is the whole
    answer (a failed primary: BARE_500; a redirect or no content: b""); None when it is streamed."""
    status, body = 200, None
    waited = 0.0  # the wait for the primary (its fetch, or its fallback's)
    links = template.preload  # under compat: tailor the AMD loader's entry, first
    if outcome is not None:
        waited = time.perf_counter() - started
        if outcome.source == "none":
            status, body = 500, BARE_500
        elif outcome.source == "src":
            status = outcome.status
            assert outcome.head is not None
            for cookie in outcome.head.getall(_SET_COOKIE):
                headers.add("set-cookie", cookie)
            if 300 <= status < 400 or status in _NO_BODY:
                if (location := outcome.head.get(_LOCATION)) is not None:
                    headers["location"] = location
                del headers["content-type"]
                body = b""
        if body is None and (outcome.assets or outcome.preload):
            links = outcome.link(links, template.client_signals)
    if body is None and links:
        headers["link"] = links
    if server_timing:
        headers["server-timing"] = _timing(template.primary, waited, time.perf_counter() - started)
    return apply_response(route.response_filters, status, headers), body


async def _flush(response: web.StreamResponse, out: list[bytes]) -> None:
    """Write `out` and empty it, in as few writes as slices of `_SLICE`: a piece that size or
    larger goes out in slices of its own (never copied), smaller ones joined. Each slice waits
    for the client to take the one before (aiohttp drains past 64 KiB): a client that reads
    slowly holds its page's fragments, never a second copy of them in the socket's buffer."""
    if not out:  # nothing to add, but the head must go now (it waits for the first bytes)
        await response.write(b"")
        return
    pieces = out[:]
    out.clear()
    if sum(map(len, pieces)) <= _SLICE:  # the common case: one write
        await response.write(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        return
    batch: list[bytes] = []
    size = 0
    for piece in pieces:
        if batch and size + len(piece) > _SLICE:
            await response.write(b"".join(batch))
            batch, size = [], 0
        if len(piece) >= _SLICE:
            view = memoryview(piece)
            for start in range(0, len(view), _SLICE):
                await response.write(view[start:start + _SLICE])
        else:
            batch.append(piece)
            size += len(piece)
    if batch:
        await response.write(batch[0] if len(batch) == 1 else b"".join(batch))


def _styles(assets: tuple[Asset, ...], seen: set[str], out: list[bytes]) -> None:
    for asset in assets:
        if asset.kind == "stylesheet" and asset.url not in seen:
            seen.add(asset.url)
            out.append(asset.tag)


def _render(outcome: Outcome, seen: set[str], out: list[bytes], fragment: Fragment,
            signals: PageSignals | None) -> None:
    """Append a fragment's stylesheets, body and scripts; each asset URL once per page. With
    client signals, between its two marker comments, scripts with `crossorigin`."""
    assets = outcome.assets
    if signals is not None:
        out.append(signals.open(fragment.index, fragment.id, outcome.version, assets))
    _styles(assets, seen, out)
    if not outcome.parts:
        out.append(outcome.body)
    for part in outcome.parts:  # a nested fragment (SPEC §6); its own fragments carry no signal markers
        if isinstance(part, bytes):
            out.append(part)
        else:
            _render(part[1], seen, out, part[0], None)
    for asset in assets:
        if asset.kind == "script" and asset.url not in seen:
            seen.add(asset.url)
            out.append(asset.tag if signals is None else asset.cors_tag)
    if signals is not None:
        out.append(signals.close(fragment.index))


def _timing(primary: Fragment | None, waited: float, elapsed: float) -> str:
    """`Server-Timing` as the head leaves: the wait for the primary fragment (its fetch, or its
    fallback's) and composer's own time around it, in ms (browsers' devtools show both)."""
    own = "composer;dur=" + _tenths(elapsed - waited)
    if primary is None:
        return own
    desc = pid.replace("\\", "\\\\").replace('"', '\\"') if (pid := primary.id).isascii() and pid.isprintable() else ""
    return "".join(('primary;dur=', _tenths(waited), ';desc="', desc, '", ', own))


def _tenths(seconds: float) -> str:
    """`seconds` in ms, to a tenth: "%.1f"'s form at a third of its cost (no float formatting)."""
    return str((tenths := int(seconds * 10_000 + 0.5)) // 10) + "." + str(tenths % 10)
