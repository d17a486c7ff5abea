"""The fragment cache (composer/cache.py), end to end: HTTP caching, single flight, last-good.

Everything runs for real: a composer in process (`start_composer`, or `composer.load`
for a manifest) and aiohttp fragment services on 127.0.0.1 that count what reaches them
(`FragmentServer.hits`). Each test says how many upstream requests a sequence of pages
costs, what the pages show and what `composer_fragment_cache_total{result}` says about it.

Lifetimes are 1 s. Waiting for an entry to go stale polls the cache itself (`until_stale`,
the one place a test looks inside composer besides `cache.size`), so no test sleeps or
guesses at timing; the two time limits asserted (a stale page served at once, uncacheable
fetches side by side) are well clear of the slow service's delay they are measured against.
"""

from __future__ import annotations

import asyncio
import os
import re
import textwrap
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web
from conftest import Composer, FragmentServer, captured, eventually
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client.parser import text_string_to_metric_families

import composer.cache
from composer.cache import FragmentCache, Freshness, freshness

# Circuit breakers off: a test that makes a service fail wants to see each failure, not an
# open circuit (that is test_faults' subject).
SETTINGS = """\
settings:
  circuit_breaker: {failures: 0, failure_percent: 0}
"""
PAGE = """\
<html><body>
<fragment id="f" src="{src}" timeout="{timeout}"><i>inline</i></fragment>
<p>END</p>
</body></html>
"""


# --------------------------------------------------------------------------- helpers


class Origin:
    """One fragment endpoint the test reconfigures as it goes.

    Answers `<b>TEXT[ ID][ ECHO] #N</b>`: N counts the requests it has answered (so a page
    shows which upstream answer it got), ID is the route's `{id}` if it has one, ECHO the
    value of request header `echo` when set; `pad` bytes of "x" follow.
    """

    def __init__(self, text: str = "v1", headers: dict[str, str] | None = None, *, echo: str | None = None,
                 pad: int = 0) -> None:
        self.text = text
        self.headers = dict(headers or {})
        self.echo = echo
        self.pad = pad
        self.status = 200
        self.delay = 0.0
        self.hang = False
        self.served = 0
        self.seen: list[CIMultiDictProxy[str]] = []
        self._release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.served += 1
        n = self.served
        self.seen.append(request.headers)
        if self.hang:
            try:
                await asyncio.wait_for(self._release.wait(), 10)
            except TimeoutError:
                pass
        if self.delay:
            await asyncio.sleep(self.delay)
        echo = f" {request.headers.get(self.echo, '-')}" if self.echo else ""
        param = f" {request.match_info['id']}" if "id" in request.match_info else ""
        body = f"<b>{self.text}{param}{echo} #{n}</b>" + "x" * self.pad
        return web.Response(text=body, status=self.status, content_type="text/html", headers=self.headers)

    def release(self) -> None:
        """Let every hanging request answer (so the service can stop)."""
        self._release.set()


def shown(body: str) -> str:
    """What the page shows for fragment f: the origin's text, or "inline"."""
    assert "<p>END</p>" in body, body
    found = re.findall(r"<b>(.*?)</b>|<i>(inline)</i>", body)
    assert len(found) == 1, body
    return found[0][0] or found[0][1]


async def page(composer: Composer, path: str = "/page", **headers: str) -> str:
    """GET a page (header names: underscores become dashes); what fragment f shows."""
    resp, body = await composer.get(path, headers={k.replace("_", "-"): v for k, v in headers.items()})
    assert resp.status == 200, body
    return shown(body)


async def pages(composer: Composer, *header_sets: dict[str, str], path: str = "/page") -> list[str]:
    """Pages requested all at once, one per header set."""
    return list(await asyncio.gather(*(page(composer, path, **h) for h in header_sets)))


@dataclass
class Counts:
    cache: dict[str, float]  # composer_fragment_cache_total by result
    failures: dict[str, float]  # composer_fragment_failures_total by reason
    fallbacks: float  # composer_fragment_fallbacks_total


async def counts(composer: Composer, fragment: str = "f") -> Counts:
    samples = [s for family in text_string_to_metric_families(await composer.metrics()) for s in family.samples
               if s.labels.get("fragment") == fragment and s.value]
    return Counts(
        cache={s.labels["result"]: s.value for s in samples if s.name == "composer_fragment_cache_total"},
        failures={s.labels["reason"]: s.value for s in samples if s.name == "composer_fragment_failures_total"},
        fallbacks=sum(s.value for s in samples if s.name == "composer_fragment_fallbacks_total"))


def cache_of(composer: Composer) -> FragmentCache:
    cache = composer.server._composer.pipeline.cache
    assert isinstance(cache, FragmentCache)
    return cache


async def until_stale(composer: Composer, url: str) -> None:
    """Wait until no cached entry of `url` is fresh any more (entries are keyed (url, ...))."""
    entries = cache_of(composer)._entries

    async def stale() -> bool:
        now = time.monotonic()
        kept = [entries.get(key) for key in list(entries) if key[0] == url]
        return all(entry is None or entry.fresh_until <= now for entry in kept)
    await eventually(stale, f"the cached {url} to go stale", deadline=5)


async def start(start_composer, src: str, *, timeout: int = 1000, settings: str = "") -> Composer:
    return await start_composer({"page.html": PAGE.format(src=src, timeout=timeout)}, settings=SETTINGS + settings)


async def one_origin(fragments, start_composer, origin: Origin, *, timeout: int = 1000,
                     settings: str = "") -> tuple[FragmentServer, Composer, str]:
    svc = await fragments({"/f": origin.handle})
    url = svc.url("/f")
    return svc, await start(start_composer, url, timeout=timeout, settings=settings), url


def fields(records) -> list[dict]:
    return [getattr(r, "fields", {}) for r in records.records]


# =========================================================================== 1. freshness


async def test_max_age_serves_from_the_cache_until_it_expires_then_fetches_once(fragments, start_composer):
    origin = Origin(headers={"Cache-Control": "max-age=1"})
    svc, composer, _ = await one_origin(fragments, start_composer, origin)
    assert [await page(composer) for _ in range(5)] == ["v1 #1"] * 5
    assert svc.hits == {"/f": 1}
    assert (await counts(composer)).cache == {"miss": 1, "hit": 4}

    origin.text = "v2"
    polled = 0

    async def renewed() -> bool:
        nonlocal polled
        polled += 1
        return await page(composer) == "v2 #2"
    await eventually(renewed, "the expired entry to be fetched again", deadline=5)
    assert svc.hits == {"/f": 2}, "one upstream request when the entry expired, none while it was fresh"
    assert (await counts(composer)).cache == {"miss": 2, "hit": 4 + polled - 1}
    assert await page(composer) == "v2 #2"  # and the new answer is cached in turn
    assert svc.hits == {"/f": 2}


@pytest.mark.parametrize("cache_control, cached", [
    ("max-age=0, s-maxage=30", True),
    ("s-maxage=30, max-age=0", True),
    ("max-age=30, s-maxage=0", False),
])
async def test_s_maxage_wins_over_max_age(fragments, start_composer, cache_control, cached):
    origin = Origin(headers={"Cache-Control": cache_control})
    svc, composer, _ = await one_origin(fragments, start_composer, origin)
    shown_ = [await page(composer) for _ in range(3)]
    if cached:
        assert (shown_, svc.hits) == (["v1 #1"] * 3, {"/f": 1})
        assert (await counts(composer)).cache == {"miss": 1, "hit": 2}
    else:
        assert (shown_, svc.hits) == (["v1 #1", "v1 #2", "v1 #3"], {"/f": 3})
        assert (await counts(composer)).cache == {"miss": 3}


@pytest.mark.parametrize("headers", [
    {"Cache-Control": "no-store, max-age=60"},
    {"Cache-Control": "max-age=60, private"},
    {"Cache-Control": "max-age=60, no-cache"},
    {"Cache-Control": 'max-age=60, no-cache="set-cookie"'},
    {"Cache-Control": "max-age=60, NO-STORE"},
    {},
    {"Expires": "Thu, 01 Jan 2099 00:00:00 GMT"},  # composer honours Cache-Control only
    {"Cache-Control": "max-age=60", "Set-Cookie": "session=abc; Path=/"},
    {"Cache-Control": "max-age=60", "Vary": "*"},
    {"Cache-Control": "max-age=60", "Vary": "Accept-Language, *"},
    {"Cache-Control": "max-age=60", "Age": "61"},  # already expired when it arrives
    {"Cache-Control": "max-age=soon"},
    {"Cache-Control": "max-age=-1"},
    {"Cache-Control": "max-age=\u00b2"},  # a digit to str.isdigit(), not a number
    {"Cache-Control": "max-age=0"},
], ids=lambda h: ";".join(f"{k}={v}" for k, v in h.items()).encode("ascii", "backslashreplace").decode() or "none")
async def test_responses_that_do_not_allow_caching_are_fetched_for_every_page(fragments, start_composer, headers):
    origin = Origin(headers=headers)
    svc, composer, _ = await one_origin(fragments, start_composer, origin)
    assert [await page(composer) for _ in range(3)] == ["v1 #1", "v1 #2", "v1 #3"]
    assert svc.hits == {"/f": 3}
    assert (await counts(composer)).cache == {"miss": 3}
    assert cache_of(composer).size == 0


@pytest.mark.parametrize("cache_control, cached", [
    ("max-age=60", False),  # RFC 9111 §3.5: an authorised answer is not shared unless it says so
    ("public, max-age=60", True),
    ("s-maxage=60", True),
    ("must-revalidate, max-age=60", True),
])
async def test_answers_to_forwarded_authorization_are_kept_only_when_marked_shareable(
        fragments, start_composer, cache_control, cached):
    origin = Origin(headers={"Cache-Control": cache_control})
    svc, composer, _ = await one_origin(fragments, start_composer, origin,
                                        settings="  forward_headers: [authorization]\n")
    shown_ = [await page(composer, authorization=f"Bearer {n}") for n in range(3)]
    assert [r.get("authorization") for r in origin.seen] == [f"Bearer {n}" for n in range(len(origin.seen))]
    assert svc.hits == {"/f": 1 if cached else 3}
    assert shown_ == (["v1 #1"] * 3 if cached else ["v1 #1", "v1 #2", "v1 #3"])


# =========================================================================== 2. Vary


async def test_vary_on_a_forwarded_header_keeps_one_entry_per_value(fragments, start_composer):
    origin = Origin(headers={"Cache-Control": "max-age=60", "Vary": "Accept-Language"}, echo="accept-language")
    svc, composer, _ = await one_origin(fragments, start_composer, origin)
    assert await page(composer, accept_language="de") == "v1 de #1"
    assert await page(composer, accept_language="en") == "v1 en #2"
    assert await page(composer, accept_language="de") == "v1 de #1"
    assert await page(composer, accept_language="en") == "v1 en #2"
    assert await page(composer) == "v1 - #3"  # no Accept-Language is a value of its own
    assert await page(composer) == "v1 - #3"
    assert svc.hits == {"/f": 3}
    assert (await counts(composer)).cache == {"miss": 3, "hit": 3}


async def test_vary_on_a_header_composer_does_not_forward_is_one_shared_entry(fragments, start_composer):
    origin = Origin(headers={"Cache-Control": "max-age=60", "Vary": "X-Foo"}, echo="x-foo")
    svc, composer, _ = await one_origin(fragments, start_composer, origin)
    assert [await page(composer, x_foo=v) for v in ("a", "b", "a", "c")] == ["v1 - #1"] * 4
    assert await page(composer) == "v1 - #1"
    assert svc.hits == {"/f": 1}
    assert all("x-foo" not in r for r in origin.seen), "composer never sends it, so it cannot differ"
    assert (await counts(composer)).cache == {"miss": 1, "hit": 4}


async def test_entries_are_keyed_by_the_varied_header_names_not_only_their_values(fragments, start_composer):
    # The service first varies on Accept-Language, then on Cookie. An answer kept for
    # "Accept-Language: de" must not be found for "Cookie: de".
    origin = Origin(headers={"Cache-Control": "max-age=60", "Vary": "Accept-Language"}, echo="cookie")
    svc, composer, _ = await one_origin(fragments, start_composer, origin)
    assert await page(composer, accept_language="de") == "v1 - #1"
    origin.headers["Vary"] = "Cookie"
    assert await page(composer, accept_language="en") == "v1 - #2"
    assert await page(composer, cookie="de") == "v1 de #3"
    assert svc.hits == {"/f": 3}


async def test_a_per_user_fragment_never_reaches_another_user(fragments, start_composer):
    origin = Origin(headers={"Cache-Control": "max-age=1", "Vary": "Cookie"}, echo="cookie")
    svc, composer, url = await one_origin(fragments, start_composer, origin)
    assert await page(composer, cookie="user=alice") == "v1 user=alice #1"
    assert await page(composer, cookie="user=bob") == "v1 user=bob #2"
    assert await page(composer, cookie="user=alice") == "v1 user=alice #1"
    assert await page(composer, cookie="user=bob") == "v1 user=bob #2"
    assert await page(composer) == "v1 - #3"
    assert svc.hits == {"/f": 3}

    # Expired, slow, and 20 pages at once: one request per user, shared only by that user.
    await until_stale(composer, url)
    origin.delay, origin.text = 0.4, "v2"
    users = [{"cookie": f"user={'alice' if n % 2 else 'bob'}"} for n in range(20)]
    shown_ = await pages(composer, *users)
    for headers, text in zip(users, shown_, strict=True):
        assert re.fullmatch(rf"v2 {headers['cookie']} #[45]", text), (headers, text)
    assert svc.hits == {"/f": 5}
    assert sorted(r["cookie"] for r in origin.seen[3:]) == ["user=alice", "user=bob"]
    assert (await counts(composer)).cache == {"miss": 5, "hit": 2, "coalesced": 18}


async def test_an_answer_that_starts_to_vary_is_shared_only_by_pages_that_asked_alike(fragments, start_composer):
    # Known to vary on nothing, so 20 expired pages wait for one fetch; its answer now varies
    # on Cookie: only the pages with the leader's cookie may take it, the others fetch.
    origin = Origin(headers={"Cache-Control": "max-age=1"}, echo="cookie")
    svc, composer, url = await one_origin(fragments, start_composer, origin)
    assert await page(composer, cookie="user=alice") == "v1 user=alice #1"
    await until_stale(composer, url)
    origin.headers["Vary"] = "Cookie"
    origin.delay = 0.4
    users = [{"cookie": f"user={'alice' if n % 2 else 'bob'}"} for n in range(20)]
    for headers, text in zip(users, await pages(composer, *users), strict=True):
        assert re.fullmatch(rf"v1 {headers['cookie']} #\d+", text), (headers, text)
    assert svc.hits == {"/f": 12}  # the leader, and each page of the other user
    assert (await counts(composer)).cache == {"miss": 12, "coalesced": 9}


# =========================================================================== 3. RFC 5861


async def test_stale_while_revalidate_serves_stale_at_once_and_refreshes_once_in_the_background(
        fragments, start_composer):
    origin = Origin(headers={"Cache-Control": "max-age=1, stale-while-revalidate=30"})
    svc, composer, url = await one_origin(fragments, start_composer, origin, timeout=3000)
    assert await page(composer) == "v1 #1"
    origin.text, origin.delay = "v2", 1.0  # the service is slow now
    await until_stale(composer, url)

    seen: list[str] = []

    async def refreshed() -> bool:
        started = time.monotonic()
        text = await page(composer)
        assert time.monotonic() - started < 0.5, "a stale page must not wait for the slow service"
        seen.append(text)
        return text == "v2 #2"
    await eventually(refreshed, "the background refresh to land", deadline=5)
    stale = seen.count("v1 #1")
    assert stale >= 5 and seen == ["v1 #1"] * stale + ["v2 #2"], seen  # many stale pages meanwhile ...
    assert svc.hits == {"/f": 2}  # ... and exactly one refresh
    assert [await page(composer) for _ in range(3)] == ["v2 #2"] * 3
    assert svc.hits == {"/f": 2}
    c = await counts(composer)
    assert c.cache == {"miss": 1, "stale": stale, "hit": 4}
    assert (c.failures, c.fallbacks) == ({}, 0)


@pytest.mark.parametrize("trouble", ["status", "timeout", "connection"])
async def test_stale_if_error_keeps_the_page_whole_while_the_service_is_down(fragments, start_composer, trouble):
    origin = Origin(headers={"Cache-Control": "max-age=1, stale-if-error=1"})
    svc, composer, url = await one_origin(fragments, start_composer, origin, timeout=300)
    try:
        assert await page(composer) == "v1 #1"
        if trouble == "status":
            origin.status = 503
        elif trouble == "timeout":
            origin.hang = True
        else:
            await svc.server.close()
        await until_stale(composer, url)
        with captured("composer.fragments") as records:
            assert await page(composer) == "v1 #1"  # stale, in place of the failure
        c = await counts(composer)
        assert c.cache == {"miss": 1, "stale_if_error": 1}
        assert c.failures == {trouble: 1}, "the failure still counts"
        assert c.fallbacks == 0, "no fallback was shown"
        [logged] = fields(records)
        assert (logged["error_type"], logged["fallback"], logged["url"]) == (trouble, "stale", url)

        # After the stale-if-error window: the inline fallback, counted as such.
        await eventually(lambda: page_is(composer, "inline"), "the stale-if-error window to end", deadline=5)
        c = await counts(composer)
        assert c.fallbacks == 1
        assert c.cache == {"miss": 2, "stale_if_error": c.cache["stale_if_error"]}
        assert c.failures == {trouble: c.cache["stale_if_error"] + 1}, "every failed fetch counts"
    finally:
        origin.release()


async def page_is(composer: Composer, text: str) -> bool:
    return await page(composer) == text


# =========================================================================== 4. single flight


async def test_concurrent_pages_for_an_expired_url_share_one_upstream_request(fragments, start_composer):
    origin = Origin(headers={"Cache-Control": "max-age=1"})
    svc, composer, url = await one_origin(fragments, start_composer, origin)
    assert await page(composer) == "v1 #1"
    await until_stale(composer, url)
    origin.delay, origin.text = 0.4, "v2"
    assert await pages(composer, *[{}] * 20) == ["v2 #2"] * 20
    assert svc.hits == {"/f": 2}
    assert (await counts(composer)).cache == {"miss": 2, "coalesced": 19}
    assert await page(composer) == "v2 #2"
    assert (await counts(composer)).cache == {"miss": 2, "coalesced": 19, "hit": 1}


async def test_a_failed_shared_fetch_is_shared_too_sparing_the_sick_service(fragments, start_composer):
    origin = Origin(headers={"Cache-Control": "max-age=1"})
    svc, composer, url = await one_origin(fragments, start_composer, origin)
    assert await page(composer) == "v1 #1"
    await until_stale(composer, url)
    origin.delay, origin.status = 0.3, 503
    assert await pages(composer, *[{}] * 10) == ["inline"] * 10
    assert svc.hits == {"/f": 2}  # one request for ten pages, not one each after the first failed
    got = await counts(composer)
    assert got.cache == {"miss": 2, "coalesced": 9}
    assert got.failures == {"status": 10} and got.fallbacks == 10


async def test_a_url_never_seen_cacheable_is_not_coalesced(fragments, start_composer):
    # Nothing is known of the URL yet: each page fetches for itself (the answer could be per user).
    origin = Origin(headers={"Cache-Control": "max-age=60"})
    origin.delay = 0.3
    svc, composer, _ = await one_origin(fragments, start_composer, origin)
    shown_ = await pages(composer, *[{}] * 20)
    assert sorted(shown_) == sorted(f"v1 #{n}" for n in range(1, 21))
    assert svc.hits == {"/f": 20}
    assert (await counts(composer)).cache == {"miss": 20}
    assert (await page(composer)).startswith("v1 #")
    assert svc.hits == {"/f": 20}


async def test_a_url_known_uncacheable_is_cached_once_it_answers_cacheably(fragments, start_composer):
    origin = Origin(headers={"Cache-Control": "no-store"})
    svc, composer, _ = await one_origin(fragments, start_composer, origin)
    assert [await page(composer), await page(composer)] == ["v1 #1", "v1 #2"]  # known uncacheable by now
    origin.headers["Cache-Control"] = "max-age=60"
    assert [await page(composer), await page(composer), await page(composer)] == ["v1 #3", "v1 #3", "v1 #3"]
    assert svc.hits == {"/f": 3}
    assert (await counts(composer)).cache == {"miss": 3, "hit": 2}


@pytest.mark.parametrize("before", ["uncacheable", "cacheable"])
async def test_an_uncacheable_answer_is_never_shared_between_concurrent_pages(fragments, start_composer, before):
    origin = Origin(headers={"Cache-Control": "no-store" if before == "uncacheable" else "max-age=1"})
    svc, composer, url = await one_origin(fragments, start_composer, origin, timeout=3000)
    assert await page(composer) == "v1 #1"
    await until_stale(composer, url)
    origin.headers["Cache-Control"] = "no-store"  # (still, or now)
    origin.delay = 0.5
    shown_ = await pages(composer, *[{}] * 20)
    assert sorted(shown_) == sorted(f"v1 #{n}" for n in range(2, 22)), "every page its own answer"
    assert svc.hits == {"/f": 21}
    # Known uncacheable now: pages fetch side by side, none waits for another's fetch.
    started = time.monotonic()
    shown_ = await pages(composer, *[{}] * 20)
    assert time.monotonic() - started < 0.85, "uncacheable fetches must not queue behind each other"
    assert sorted(shown_) == sorted(f"v1 #{n}" for n in range(22, 42))
    assert svc.hits == {"/f": 41}
    assert (await counts(composer)).cache == {"miss": 41}


# =========================================================================== 5. size bound


ITEM_PAGE = '<html><body><fragment id="f" src="{src}"><i>inline</i></fragment><p>END</p></body></html>'
ITEM_ROUTES = """\
routes:
  - name: item
    match: {path: "/p/{id}"}
    template: page.html
"""


async def test_the_cache_stays_within_max_bytes_and_evicts_old_entries(fragments, start_composer):
    origin = Origin(headers={"Cache-Control": "max-age=60"}, pad=1000)
    svc = await fragments({"/item/{id}": origin.handle})
    bound = 4000  # two ~1.5 kB entries (body and overhead), not three
    composer = await start_composer({"page.html": ITEM_PAGE.format(src=svc.url("/item/") + "{id}")},
                                    routes=ITEM_ROUTES, settings=SETTINGS + f"  cache: {{max_bytes: {bound}}}\n")
    cache = cache_of(composer)
    sizes = []
    for n in range(8):
        assert (await page(composer, f"/p/{n}")).startswith(f"v1 {n} #")
        sizes.append(cache.size)
    assert 0 < max(sizes) <= bound, sizes
    assert sizes[0] < sizes[1] == sizes[-1], sizes
    assert (await page(composer, "/p/7")) == "v1 7 #8"  # the newest entry is still there
    assert svc.hits["/item/7"] == 1
    assert (await page(composer, "/p/0")) == "v1 0 #9"  # the oldest was evicted
    assert svc.hits["/item/0"] == 2
    assert cache.size <= bound


async def test_the_urls_the_cache_knows_are_bounded_and_a_forgotten_one_is_learnt_again(
        fragments, start_composer, monkeypatch):
    monkeypatch.setattr(composer.cache, "_KNOWN_URLS", 3)
    origin = Origin(headers={"Cache-Control": "max-age=60"})
    svc = await fragments({"/item/{id}": origin.handle})
    composer_ = await start_composer({"page.html": ITEM_PAGE.format(src=svc.url("/item/") + "{id}")},
                                     routes=ITEM_ROUTES, settings=SETTINGS)
    known = cache_of(composer_)._names
    for n in range(5):
        assert (await page(composer_, f"/p/{n}")).startswith(f"v1 {n} #")
        assert len(known) <= 3
    assert (await page(composer_, "/p/4")) == "v1 4 #5"  # still known: served from the cache
    assert svc.hits["/item/4"] == 1
    # /item/0's hint was the oldest, dropped: fetched once more, then known (and cached) again.
    assert (await page(composer_, "/p/0")) == "v1 0 #6"
    assert (await page(composer_, "/p/0")) == "v1 0 #6"
    assert svc.hits["/item/0"] == 2
    assert len(known) == 3


async def test_an_answer_larger_than_max_bytes_is_served_but_not_kept(fragments, start_composer):
    origin = Origin(headers={"Cache-Control": "max-age=60"}, pad=5000)
    svc, composer, _ = await one_origin(fragments, start_composer, origin, settings="  cache: {max_bytes: 4000}\n")
    assert [await page(composer) for _ in range(3)] == ["v1 #1", "v1 #2", "v1 #3"]
    assert svc.hits == {"/f": 3}
    assert cache_of(composer).size == 0


async def test_a_refresh_too_large_to_keep_drops_the_older_copy(fragments, start_composer):
    origin = Origin(headers={"Cache-Control": "max-age=1, stale-while-revalidate=30"})
    svc, composer, url = await one_origin(fragments, start_composer, origin, settings="  cache: {max_bytes: 4000}\n")
    assert await page(composer) == "v1 #1"
    origin.text, origin.pad = "v2", 5000
    await until_stale(composer, url)
    assert await page(composer) == "v1 #1"  # stale; the refresh answers, too large to keep ...
    await eventually(lambda: page_is(composer, "v2 #3"), "the old copy to be gone", deadline=5)  # ... so: fetched
    assert svc.hits == {"/f": 3}
    assert cache_of(composer).size == 0


async def test_max_bytes_zero_turns_the_cache_off(fragments, start_composer):
    origin = Origin(headers={"Cache-Control": "max-age=60"})
    svc, composer, _ = await one_origin(fragments, start_composer, origin, settings="  cache: {max_bytes: 0}\n")
    assert [await page(composer) for _ in range(3)] == ["v1 #1", "v1 #2", "v1 #3"]
    origin.delay = 0.3
    assert sorted(await pages(composer, *[{}] * 5)) == [f"v1 #{n}" for n in range(4, 9)]  # no single flight
    assert svc.hits == {"/f": 8}
    assert (await counts(composer)).cache == {"miss": 8}
    assert cache_of(composer).size == 0


# =========================================================================== 6. last-good fallback


FOOTER_PAGE = '<html><body><fragment name="footer"><i>inline</i></fragment><p>END</p></body></html>'
FOOTER_ROUTES = """\
settings:
  reload_interval_ms: 100
  circuit_breaker: {{failures: 0, failure_percent: 0}}
routes:
  - name: page
    match: {{path: /page}}
    template: page.html
fragments:
  footer:
    owner: team-x
    timeout_ms: 300
    fallback: {fallback}
    versions: {{"1.0.0": {src}}}
    active: "1.0.0"
"""


@pytest.fixture
def start_loaded(start_composer: Callable[..., Awaitable[Composer]]) -> Callable[..., Awaitable[Composer]]:
    """A composer of FOOTER_PAGE with these routes (conftest's `start_composer`: loaded as
    `composer serve` and the reloader load it)."""

    async def start_(routes: str) -> Composer:
        return await start_composer({"page.html": FOOTER_PAGE}, routes)

    return start_


def rewrite(path: Path, text: str) -> None:
    """Replace `path` atomically with a strictly later mtime, so the reloader sees it."""
    before = path.stat().st_mtime_ns
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(textwrap.dedent(text), encoding="utf-8")
    mtime = max(tmp.stat().st_mtime_ns, before + 1_000_000)
    os.utime(tmp, ns=(mtime, mtime))
    os.replace(tmp, path)


async def test_manifest_fallback_is_fetched_at_load_and_shows_while_its_service_is_down(
        fragments, start_loaded):
    footer = Origin("footer")
    statics = [Origin("static-1"), Origin("static-2")]
    src = await fragments({"/footer": footer.handle})
    fallback_1 = await fragments({"/static": statics[0].handle})
    fallback_2 = await fragments({"/static2": statics[1].handle})
    src_url, fallback_1_url, fallback_2_url = src.url("/footer"), fallback_1.url("/static"), fallback_2.url("/static2")
    composer = await start_loaded(FOOTER_ROUTES.format(src=src_url, fallback=fallback_1_url))
    await eventually(lambda: _hit(fallback_1, "/static"), "the fallback to be fetched when the manifest loads")
    assert await page(composer) == "footer #1"
    assert fallback_1.hits == {"/static": 1}

    # A reload fetches it again (a manifest change can be a new fallback at the same URL).
    statics[0].text = "static-1b"
    reloads = await reloads_ok(composer)
    rewrite(composer.server.table.path, FOOTER_ROUTES.format(src=src_url, fallback=fallback_1_url) + "# touched\n")
    await eventually(lambda: reloaded(composer, reloads), "the reload")
    await eventually(lambda: _hit(fallback_1, "/static", 2), "the fallback to be fetched again on reload")

    await src.server.close()
    await fallback_1.server.close()  # both down: the fallback's last good copy stands in
    with captured("composer.fragments") as records:
        assert await page(composer) == "static-1b #2"
        assert await page(composer) == "static-1b #2"
    c = await counts(composer, "footer")
    assert (c.failures, c.fallbacks) == ({"connection": 2}, 2)
    assert [(f["error_type"], f["fallback"]) for f in fields(records)] == [("connection", "fallback-src")] * 2

    # A reload while the fallback is down keeps its last good copy (the refetch fails).
    reloads = await reloads_ok(composer)
    rewrite(composer.server.table.path,
            FOOTER_ROUTES.format(src=src_url, fallback=fallback_1_url).replace("timeout_ms: 300", "timeout_ms: 250"))
    await eventually(lambda: reloaded(composer, reloads), "the reload")
    assert await page(composer) == "static-1b #2"

    # A reload naming another fallback fetches that one at once, before any page needs it.
    rewrite(composer.server.table.path,
            FOOTER_ROUTES.format(src=src_url, fallback=fallback_2_url))
    await eventually(lambda: _hit(fallback_2, "/static2"), "the new fallback to be fetched on reload")
    await fallback_2.server.close()
    assert await page(composer) == "static-2 #1"
    assert fallback_2.hits == {"/static2": 1}


async def _hit(svc: FragmentServer, path: str, times: int = 1) -> bool:
    return svc.hits.get(path, 0) >= times


async def reloads_ok(composer: Composer) -> float:
    return sum(s.value for family in text_string_to_metric_families(await composer.metrics())
               for s in family.samples
               if s.name == "composer_config_reloads_total" and s.labels.get("result") == "ok")


async def reloaded(composer: Composer, before: float) -> bool:
    return await reloads_ok(composer) > before


# =========================================================================== 7. freshness() itself


def _headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


CC = "Cache-Control"


@pytest.mark.parametrize("pairs, expected", [
    (((CC, "max-age=60"),), Freshness(60)),
    (((CC, "MAX-AGE=60"),), Freshness(60)),
    (((CC, "Max-Age=60, Stale-While-Revalidate=5, STALE-IF-ERROR=7"),), Freshness(60, 5, 7)),
    (((CC, 'max-age="60"'),), Freshness(60)),  # the quoted form (RFC 9111 §5.2: accepted)
    (((CC, " max-age=60 ,  public "),), Freshness(60)),
    (((CC, 'community="UCI", max-age=5, x-ext="a,b"'),), Freshness(5)),  # unknown directives ignored
    (((CC, "max-age=10, s-maxage=20"),), Freshness(20)),
    (((CC, "s-maxage=0, max-age=100"),), None),
    # duplicates: RFC 9111 §4.2.1 — use the first (or treat as stale), never a later one
    (((CC, "max-age=10, max-age=3600"),), Freshness(10)),
    (((CC, "max-age=10"), (CC, "max-age=3600")), Freshness(10)),
    (((CC, "stale-if-error=5, stale-if-error=500, max-age=1"),), Freshness(1, 0, 5)),
    # several header lines make one list
    (((CC, "public"), (CC, "max-age=60")), Freshness(60)),
    (((CC, "max-age=60"), (CC, "no-store")), None),
    (((CC, "max-age=60"), (CC, "Private")), None),
    (((CC, 'max-age=60, private="set-cookie"'),), None),
    (((CC, "max-age=60, No-Cache"),), None),
    # invalid numbers: not stored
    (((CC, "max-age=abc"),), None),
    (((CC, "max-age="),), None),
    (((CC, "max-age"),), None),
    (((CC, "max-age=-5"),), None),
    (((CC, "max-age=1.5"),), None),
    (((CC, "max-age=1e3"),), None),
    (((CC, "max-age=\u00b2"),), None),  # "²".isdigit() is True
    (((CC, "max-age=\u0663"),), None),  # ARABIC-INDIC DIGIT THREE: not a delta-seconds
    (((CC, "max-age=60, stale-if-error=soon"),), None),
    (((CC, "max-age=99999999999999999999"),), Freshness(99999999999999999999.0)),
    # no freshness at all
    ((), None),
    (((CC, "public"),), None),
    (((CC, "max-age=0"),), None),
    (((CC, "max-age=0, stale-if-error=60"),), Freshness(0, 0, 60)),
    # Age is subtracted, also from the stale windows once it passes max-age
    (((CC, "max-age=60"), ("Age", "10")), Freshness(50)),
    (((CC, "max-age=60"), ("Age", "60")), None),
    (((CC, "max-age=60"), ("Age", "600")), None),
    (((CC, "max-age=60, stale-while-revalidate=30, stale-if-error=100"), ("Age", "80")), Freshness(0, 10, 80)),
    (((CC, "max-age=60, stale-while-revalidate=30"), ("Age", "200")), None),
    (((CC, "max-age=60"), ("Age", "junk")), Freshness(60)),
    (((CC, "max-age=60"), ("Age", "\u00b2")), Freshness(60)),
    # never shared
    (((CC, "max-age=60"), ("Set-Cookie", "a=b")), None),
    (((CC, "max-age=60"), ("Vary", "*")), None),
    (((CC, "max-age=60"), ("Vary", "Accept-Language"), ("Vary", " * ")), None),
    (((CC, "max-age=60"), ("Vary", "Accept-Language, Cookie")), Freshness(60)),
], ids=repr)
def test_freshness(pairs, expected):
    assert freshness(_headers(*pairs), CIMultiDict()) == expected


@pytest.mark.parametrize("cache_control, expected", [
    ("max-age=60", None),
    ("public, max-age=60", Freshness(60)),
    ("s-maxage=60", Freshness(60)),
    ("must-revalidate, max-age=60", Freshness(60)),
])
def test_freshness_of_an_answer_to_an_authorized_request(cache_control, expected):
    request = CIMultiDict({"Authorization": "Bearer x"})
    assert freshness(_headers((CC, cache_control)), request) == expected
