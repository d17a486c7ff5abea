"""What composer keeps of fragment responses: an HTTP cache, single flight, last-good fallbacks.

The cache is off for every response that does not allow it: only a response with
`max-age` / `s-maxage` (and no `no-store`, `private`, `no-cache`, `Set-Cookie`, `Vary: *`) is
stored, keyed by URL and the values of the request headers it `Vary`s on — headers composer
sends, so two users can only share an entry when composer asked both the same way.
RFC 5861: within `stale-while-revalidate` a stale entry is served while one background
request refreshes it; within `stale-if-error` it is served when the fetch fails, so a page
stays whole while a fragment service is down.

Fetches of one URL in flight at once are coalesced once the URL has answered cacheably
before (so an expired popular fragment costs one request, not one per page): later callers
wait for the first one and take its answer only if it is still cacheable and varies on
nothing they differ in; otherwise they fetch for themselves. A URL never seen cacheable is
never waited for, so a response meant for one user cannot reach another, and uncacheable
fragments are never serialised behind each other.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, Literal

from cachetools import TLRUCache
from multidict import CIMultiDict, CIMultiDictProxy

from .client import Name
from .errors import Reason
from .fragments import Failed, Fetched

__all__ = ["FragmentCache", "Freshness", "LastGood", "Result", "freshness"]

Result = Literal["hit", "miss", "stale", "stale_if_error", "coalesced"]
Load = Callable[[float], Awaitable[Fetched | Failed]]

_CACHE_CONTROL: Final = Name("cache-control")
_PASS: Final = "pass"  # for a URL whose last answer was not cacheable (else: the names it varies on)
_OVERHEAD = 512  # bytes an entry costs beyond its body: headers, the entry, the key
_KNOWN_URLS = 50_000
_Values = tuple[tuple[str, str], ...]  # (header name, the request's value) for each name varied on
_Key = tuple[str, _Values]  # url and values


@dataclass(frozen=True, slots=True)
class Freshness:
    """How long a response may be served, from its Cache-Control (seconds)."""

    fresh: float
    stale_while_revalidate: float = 0.0
    stale_if_error: float = 0.0


def freshness(headers: CIMultiDictProxy[str], request: CIMultiDict[str]) -> Freshness | None:
    """The response's freshness for a shared cache, or None when it must not be stored."""
    lines = headers.getall("cache-control", ())
    if not lines or "set-cookie" in headers:
        return None
    seconds: dict[str, float] = {}
    public = False
    for part in ",".join(lines).split(","):
        name, _, value = part.partition("=")
        name = name.strip().lower()
        if name in ("no-store", "private", "no-cache"):
            return None
        if name == "public" or name == "must-revalidate":
            public = True
            continue
        if name not in ("max-age", "s-maxage", "stale-while-revalidate", "stale-if-error"):
            continue
        value = value.strip().strip('"')
        if not (value.isascii() and value.isdigit()):  # "²".isdigit(), "٣".isdigit() are true
            return None  # RFC 9111 §4.2.1: an invalid freshness directive makes the response stale
        seconds.setdefault(name, float(value))  # §4.2.1: of duplicates, the first one counts
    max_age, s_maxage = seconds.get("max-age"), seconds.get("s-maxage")
    swr, sie = seconds.get("stale-while-revalidate", 0.0), seconds.get("stale-if-error", 0.0)
    lifetime = s_maxage if s_maxage is not None else max_age
    if lifetime is None:
        return None
    if "authorization" in request and not (public or s_maxage is not None):
        return None  # RFC 9111 §3.5: a shared cache keeps authorised answers only when told to
    if any(v.strip() == "*" for line in headers.getall("vary", ()) for v in line.split(",")):
        return None
    age = headers.get("age", "")
    if age.isascii() and age.isdigit():
        lifetime -= float(age)
    if lifetime < 0:  # stale already: that long of the stale windows has passed too
        swr, sie = max(swr + lifetime, 0.0), max(sie + lifetime, 0.0)
    if lifetime <= 0 and not swr and not sie:
        return None
    return Freshness(max(lifetime, 0.0), swr, sie)


def _vary_names(headers: CIMultiDictProxy[str]) -> tuple[str, ...]:
    names = {v.strip().lower() for line in headers.getall("vary", ()) for v in line.split(",")}
    names.discard("")
    return tuple(sorted(names))


def _values(names: tuple[str, ...], request: CIMultiDict[str]) -> _Values:
    """The request's values of `names`, with the names: a key must not match across Vary changes."""
    return tuple((n, ",".join(request.getall(n, ()))) for n in names)


def _missed(result: Fetched | Failed) -> tuple[Fetched | Failed, Result, Failed | None]:
    return result, "miss", result if isinstance(result, Failed) else None


@dataclass(slots=True)
class _Entry:
    response: Fetched
    names: tuple[str, ...]
    fresh_until: float
    stale_until: float  # end of stale-while-revalidate
    error_until: float  # end of stale-if-error
    size: int

    @property
    def until(self) -> float:
        return max(self.fresh_until, self.stale_until, self.error_until)


@dataclass(slots=True)
class _Flight:
    """One upstream fetch others may wait for; `done` carries its answer (None: fetch yourself)."""

    done: asyncio.Future[tuple[Fetched | Failed, tuple[str, ...], _Values, bool] | None]


class FragmentCache:
    """Cache and single flight for fragment GETs, bounded by `max_bytes` of bodies (0: off)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: TLRUCache[_Key, _Entry] = TLRUCache(
            maxsize=max(max_bytes, 1), ttu=lambda _k, e, _now: e.until, timer=time.monotonic,
            getsizeof=lambda e: e.size)
        # url → the names it varies on, or _PASS: a hint, read on every fetch. A plain dict, its
        # oldest entry dropped when full (cachetools' LRU bookkeeping ran as Python per fetch:
        # 3 % of a fragment's instructions); a URL whose hint was dropped is fetched once
        # uncoalesced and learnt again, its cached copies untouched.
        self._names: dict[str, tuple[str, ...] | str] = {}
        self._flights: dict[_Key, _Flight] = {}
        self._background: set[asyncio.Task[Fetched | Failed]] = set()

    @property
    def size(self) -> int:
        return int(self._entries.currsize)

    def passes(self, url: str) -> bool:
        """Whether `url` is fetched straight through, not by `get`: the cache is off, or the
        URL's last answer was not cacheable (nothing to serve, nobody to wait for). Such a
        fetch's answer goes to `passed`."""
        return not self.max_bytes or self._names.get(url) is _PASS

    def passed(self, url: str, request: CIMultiDict[str],
               result: Fetched | Failed) -> tuple[Fetched | Failed, Result, Failed | None]:
        """A fetch that went straight through, as `get` answers it. A URL that now answers
        cacheably is cached from here on."""
        if self.max_bytes and isinstance(result, Fetched) and result.head.get(_CACHE_CONTROL) is not None:
            self._store(url, request, result, known=_PASS)
        return _missed(result)

    async def get(self, url: str, request: CIMultiDict[str], load: Load, *, timeout: float,
                  refresh_timeout: float) -> tuple[Fetched | Failed, Result, Failed | None]:
        """The response for `url`: from the cache, another caller's fetch, or `load(timeout)`.

        Returns what to show, where it came from, and the failure of the fetch if one failed
        (a stale copy may still stand in for it). `refresh_timeout` bounds a background
        stale-while-revalidate fetch, which no page waits for.
        """
        if self.passes(url):
            return self.passed(url, request, await load(timeout))
        names = self._names.get(url)
        if names is None:
            # Never seen cacheable: nobody waits for this fetch, so an answer meant for one
            # user cannot reach another, and uncacheable fragments are never serialised.
            result = await load(timeout)
            self._store(url, request, result)  # learnt either way
            return _missed(result)
        assert isinstance(names, tuple)
        key = (url, _values(names, request))
        entry = self._entries.get(key)
        if entry is not None:
            now = time.monotonic()
            if now < entry.fresh_until:
                return entry.response, "hit", None
            if now < entry.stale_until:
                self._refresh(url, request, load, refresh_timeout)
                return entry.response, "stale", None
        flight = self._flights.get(key)
        if flight is not None:
            started = time.monotonic()
            try:
                async with asyncio.timeout(timeout):
                    shared = await asyncio.shield(flight.done)
            except TimeoutError:
                return self._or_stale(entry, Failed(
                    Reason.TIMEOUT, f"no complete response within {timeout * 1000:.0f} ms "
                                    "(waiting for the same fetch by another page)"))
            if shared is not None:
                answer, vary, values, cacheable = shared
                if isinstance(answer, Failed):  # a failure is nobody's content: spare the sick service
                    shown, how, failure = self._or_stale(entry, answer)
                    return shown, "coalesced" if how == "miss" else how, failure
                if cacheable and _values(vary, request) == values:
                    return answer, "coalesced", None
            timeout -= time.monotonic() - started  # not shareable: fetch in the time that is left
        result = await self._lead(url, request, key, load, timeout)
        return self._or_stale(entry, result)

    @staticmethod
    def _or_stale(entry: _Entry | None, result: Fetched | Failed) -> tuple[Fetched | Failed, Result, Failed | None]:
        if isinstance(result, Failed) and entry is not None and time.monotonic() < entry.error_until:
            return entry.response, "stale_if_error", result
        return _missed(result)

    async def _lead(self, url: str, request: CIMultiDict[str], flight_key: _Key,
                    load: Load, timeout: float) -> Fetched | Failed:
        flight = _Flight(asyncio.get_running_loop().create_future())
        self._flights[flight_key] = flight
        shared = None
        try:
            result = await load(timeout)
            stored = self._store(url, request, result)
            shared = (result, *stored) if stored is not None else (result, (), (), False)
            return result
        finally:
            if self._flights.get(flight_key) is flight:
                del self._flights[flight_key]
            flight.done.set_result(shared)

    def _store(self, url: str, request: CIMultiDict[str], result: Fetched | Failed,
               known: tuple[str, ...] | str | None = None) -> tuple[tuple[str, ...], _Values, bool] | None:
        """Keep `result` if it may be kept; return (vary names, their values, cacheable).

        `known` is what `_names` held for `url` (saves re-marking an uncacheable URL per fetch).
        """
        if not isinstance(result, Fetched):
            return None
        policy = freshness(result.headers, request)
        if policy is None:
            if known is not _PASS:
                self._learn(url, _PASS)
            return None
        names = _vary_names(result.headers)
        values = _values(names, request)
        now = time.monotonic()
        fresh_until = now + policy.fresh
        entry = _Entry(result, names, fresh_until, fresh_until + policy.stale_while_revalidate,
                       fresh_until + policy.stale_if_error, len(result.body) + _OVERHEAD)
        self._learn(url, names)
        if entry.size <= self.max_bytes:
            self._entries[(url, values)] = entry
        else:  # too large to keep: an older copy must not stand in for it
            self._entries.pop((url, values), None)
        return names, values, True

    def _learn(self, url: str, names: tuple[str, ...] | str) -> None:
        known = self._names
        if len(known) >= _KNOWN_URLS and url not in known:
            del known[next(iter(known))]
        known[url] = names

    def _refresh(self, url: str, request: CIMultiDict[str], load: Load, timeout: float) -> None:
        """One background fetch renews a stale entry (unless one is already in flight)."""
        names = self._names.get(url)
        key = (url, _values(names, request)) if isinstance(names, tuple) else None
        if key is None or key in self._flights:
            return
        task = asyncio.create_task(self._lead(url, request.copy(), key, load, timeout))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Cancel background refreshes (at shutdown)."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)


class LastGood:
    """The last good answer of each fallback URL, fetched when the config loads (as Podium does).

    A fallback is what a page shows when a fragment service is down; keeping its last good
    copy means it shows even while the fallback's own service is down too.
    """

    def __init__(self) -> None:
        self._answers: dict[str, Fetched] = {}
        self.urls: frozenset[str] = frozenset()

    def track(self, urls: frozenset[str]) -> None:
        """Keep answers for `urls` only (the fallbacks the running config names)."""
        self.urls = urls
        for url in [u for u in self._answers if u not in urls]:
            del self._answers[url]

    def put(self, url: str, answer: Fetched) -> None:
        if url in self.urls:
            self._answers[url] = answer

    def get(self, url: str) -> Fetched | None:
        return self._answers.get(url)
