"""Nested fragments (SPEC §6): a fragment whose response says `x-composer-nested: 1` is a
template itself, composed before it is placed.

This is a layer of `pipeline.Pipeline`, not a second way to fetch: a nested body is compiled
(`template.compile_nested`, once per distinct body: the compiled forms live here, in an LRU
cache bounded by size), its fragments are resolved concurrently by the same
`Pipeline.resolve` as the page's own (cache, breaker, fallbacks, metrics, log line, span),
and the result is an `Outcome` whose `parts` are the body's bytes and its children's
outcomes, which compose.py walks with the page's one set of emitted assets.

A nested fragment resolves on a child `Page`: one level deeper, its parent's URL added to
its ancestors, its deadline the parent's (its timeout from when it started, and never past
the page's). `refusal` is asked before each nested fetch: beyond `max_nesting_depth`, a URL
already among the ancestors (a cycle), outside `allowed_origins`, or over the page's
`max_fragments_per_page` (its template's fragments count first; nested ones take from what
is left in the order they start): not fetched, and the fragment shows its fallback.

`async` inside a nested body renders in place, synchronously: the nested body is buffered
until all its children are done anyway, and its parent may itself be placed anywhere (async
or not), so streaming a child later would need page-wide placeholder ids and a second path
through compose.py, for a child whose timeout already bounds the wait.

Under settings.compat: tailor a nested body's fragments are wrapped as the template's are, and
numbered when the body is placed (`Room.number`): after the template's and every body placed
before, as Tailor numbers all of a request's fragments in one sequence.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from cachetools import LRUCache
from yarl import URL

from .errors import ConfigError, Reason
from .fragments import Failed
from .tailor import TailorSettings, slot
from .template import Fragment, Template, compile_nested
from .urls import origin_allowed

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from .config import Settings
    from .pipeline import Outcome, Page

__all__ = ["COMPILED_BYTES", "NESTED_HEADER", "Nesting", "Room"]

NESTED_HEADER = "x-composer-nested"  # "1": the body is a template (SPEC §6)
COMPILED_BYTES = 16 * 1024 * 1024  # the compiled forms kept, by the size of their bodies
_ENTRY_BYTES = 512  # what one cache entry or compiled fragment costs besides the body's bytes

log = logging.getLogger("composer.fragments")

Resolve = Callable[[Fragment, "Page"], Awaitable["Outcome"]]
_Key = tuple[str, tuple[str, ...], bytes]  # parent id, the route's param names, the body


class Room:
    """How many more nested fragments a page may fetch (settings.max_fragments_per_page), and
    how many fragments it has placed (its template's, then nested bodies'), shared by all its
    levels: mutable, so it lives outside the frozen `Page`."""

    __slots__ = ("left", "placed")

    def __init__(self, left: int, placed: int = 0) -> None:
        self.left = left
        self.placed = placed

    def take(self) -> bool:
        self.left -= 1
        return self.left >= 0

    def number(self, fragments: tuple[Fragment, ...], settings: TailorSettings) -> tuple[Fragment, ...]:
        """settings.compat: tailor: a nested body's `fragments` with their `Slot`s at the page's
        next positions, after its template's and those of every body placed before: Tailor
        numbers all of a request's fragments in one sequence, so no two share an index."""
        first = self.placed
        self.placed += len(fragments)
        return tuple(replace(f, pipe=slot(dict(f.attributes), first + i, False, settings))
                     for i, f in enumerate(fragments))


@dataclass(frozen=True, slots=True)
class _Compiled:
    """A body compiled under `settings` (a reload may change what it compiles to)."""

    settings: Settings
    result: Template | Failed
    size: int


class Nesting:
    """The compiled nested bodies of one pipeline, and the composing of their children."""

    def __init__(self, resolve: Resolve, max_bytes: int = COMPILED_BYTES) -> None:
        self._resolve = resolve
        self._compiled: LRUCache[_Key, _Compiled] = LRUCache(maxsize=max_bytes, getsizeof=lambda c: c.size)
        self.compiles = 0  # bodies compiled, i.e. not found in the cache (tests and bench/nested.py read it)

    @property
    def size(self) -> int:
        """Bytes the cache holds, as its entries are counted."""
        return int(self._compiled.currsize)

    def refusal(self, page: Page, url: URL) -> Failed | None:
        """Why a nested fragment on `page` must not fetch `url`, or None (then it has taken
        its place in the page's budget)."""
        settings = page.settings
        if page.depth > settings.max_nesting_depth:
            return Failed(Reason.NESTING, f"nested {page.depth} deep, beyond settings.max_nesting_depth "
                                          f"({settings.max_nesting_depth})")
        if str(url) in page.ancestors:
            return Failed(Reason.NESTING, "a cycle: this URL is already among the fragment's ancestors")
        if not origin_allowed(url, settings.allowed_origins):
            return Failed(Reason.ORIGIN, "outside settings.allowed_origins")
        if page.room is not None and not page.room.take():
            return Failed(Reason.LIMIT, f"the page already has settings.max_fragments_per_page "
                                        f"({settings.max_fragments_per_page}) fragments")
        return None

    def compiled(self, fragment: Fragment, page: Page, body: bytes) -> Template | Failed:
        """`body` of `fragment` compiled (from the cache when it was before), or why it does
        not compile: Failed(INVALID), which the pipeline treats as a failed fetch."""
        key = (fragment.id, tuple(page.params), body)
        found = self._compiled.get(key)
        if found is not None and found.settings is page.settings:
            return found.result
        self.compiles += 1
        result = self._compile(fragment, page, body)
        size = 3 * len(body) + _ENTRY_BYTES * (1 + (len(result.fragments) if isinstance(result, Template) else 0))
        if size <= self._compiled.maxsize:  # cachetools refuses (raises for) a larger one
            self._compiled[key] = _Compiled(page.settings, result, size)
        return result

    @staticmethod
    def _compile(fragment: Fragment, page: Page, body: bytes) -> Template | Failed:
        try:
            template, ignored = compile_nested(body.decode("utf-8", "replace"), parent=fragment.id,
                                               params=tuple(page.params), settings=page.settings)
        except ConfigError as exc:
            more = f" (and {len(exc.problems) - 1} more)" if len(exc.problems) > 1 else ""
            return Failed(Reason.INVALID, f"nested body does not compile: {exc.problems[0]}{more}")
        except Exception as exc:  # noqa: BLE001  a service's markup must never become a 500 (nor a traceback)
            return Failed(Reason.INVALID, f"nested body does not compile: {type(exc).__name__}: {exc}")
        for line in ignored:  # logged once per compiled body: the cache keeps it from repeating
            log.warning("primary ignored in a nested fragment", extra={"fields": {
                "fragment": fragment.id, "route": page.route, "line": line,
                "detail": "a nested fragment cannot set the page's status; it is fetched as any other"}})
        return template

    async def compose(self, template: Template, fragment: Fragment, page: Page, outcome: Outcome, url: URL,
                      started: float, span: Span | None) -> Outcome:
        """`outcome` (a body that compiled to `template`) with its fragments resolved on a
        child page and placed: its `parts`. `started` (perf_counter) is when `fragment`'s
        own deadline began; `url` is the URL its body came from."""
        if not template.fragments:
            return outcome
        begun = time.monotonic() - (time.perf_counter() - started)
        child = replace(page, deadline=min(page.deadline, begun + fragment.timeout), depth=page.depth + 1,
                        ancestors=(*page.ancestors, str(url)), span=span if span is not None else page.span)
        fragments = template.fragments
        if fragments[0].pipe is not None and page.room is not None:  # settings.compat: tailor
            fragments = page.room.number(fragments, page.settings.tailor)
        tasks = [asyncio.ensure_future(self._resolve(f, child)) for f in fragments]
        try:
            shown = zip(fragments, await asyncio.gather(*tasks), strict=True)
        finally:
            for task in tasks:  # only if the page went away: resolve never raises otherwise
                task.cancel()
        parts = tuple(next(shown) if isinstance(chunk, Fragment) else chunk
                      for chunk in template.chunks if isinstance(chunk, (bytes, Fragment)))
        return replace(outcome, parts=parts)
