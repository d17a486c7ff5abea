"""SPEC §7, the beacon endpoint over plain HTTP: `POST /_composer/signals` abused.

A body over 16 KB is refused with 413, one that is not a JSON object with 400, a client past
`client_signals_rate` beacons in a second with 429; entries naming what the route table does
not know are dropped. Each refusal and each dropped entry is counted in
`composer_client_signals_dropped_total{reason}`, and nothing a beacon says ever becomes a label
value: the set of label sets in /metrics is the same after the abuse as before it.
(What the browser sends is tests/test_signals_browser.py's.)
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from conftest import Composer, FragmentServer, captured, html
from prometheus_client.parser import text_string_to_metric_families

BEACON = "/_composer/signals"
Series = frozenset[tuple[str, frozenset[tuple[str, str]]]]

ROUTES = """\
settings:
  client_signals: true
  client_signals_rate: {rate}
fragments:
  footer:
    owner: team-footer
    versions: {{"1.0.0": "{url}", "2.0.0": "{url}"}}
    active: "1.0.0"
routes:
  - {{name: page, match: {{path: /page}}, template: page.html}}
  - {{name: quiet, match: {{path: /quiet}}, template: page.html, client_signals: false}}
"""
PAGE = '<html><head></head><body><fragment id="hero" src="{url}"></fragment><fragment name="footer"></fragment></body></html>'


async def signals_composer(start_composer: Callable[..., Awaitable[Composer]],
                           fragments: Callable[..., Awaitable[FragmentServer]], rate: int = 1000) -> Composer:
    svc = await fragments({"/f": html("<p>f</p>")})
    url = svc.url("/f")
    return await start_composer({"page.html": PAGE.format(url=url)}, routes=ROUTES.format(rate=rate, url=url))


async def post(composer: Composer, body: bytes | Any, **headers: str) -> int:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with composer.session.post(composer.url + BEACON, data=data, headers=headers) as resp:
        return resp.status


async def series(composer: Composer) -> tuple[Series, dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    """Every (sample name, label set) in /metrics, and their values."""
    values = {}
    for family in text_string_to_metric_families(await composer.metrics()):
        for sample in family.samples:
            values[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return frozenset(values), values


def value(values: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return values.get((name, frozenset(labels.items())), 0.0)


def new_label_sets(before: Series, after: Series) -> set[tuple[str, frozenset[tuple[str, str]]]]:
    """What appeared, apart from composer's own request counters for the beacon endpoint (route
    `_composer`, a bounded method and status: label values from composer, not the beacon)."""
    return {(name, labels) for name, labels in after - before
            if not (name.startswith(("composer_requests_", "composer_request_duration_seconds"))
                    and dict(labels).get("route") == "_composer"
                    and dict(labels).get("status", "204") in ("204", "400", "413", "429"))}


def dropped(values: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> dict[str, float]:
    return {reason: value(values, "composer_client_signals_dropped_total", reason=reason)
            for reason in ("too_large", "invalid", "rate", "unknown")}


async def test_abusive_beacons_are_refused_counted_and_create_no_label(start_composer, fragments) -> None:
    composer = await signals_composer(start_composer, fragments)
    before, values = await series(composer)
    assert dropped(values) == {"too_large": 0, "invalid": 0, "rate": 0, "unknown": 0}

    # too large: announced, and chunked (no length announced); 16 KB exactly is fine
    assert await post(composer, b" " * (16 * 1024 + 1)) == 413
    async def chunks() -> Any:
        for _ in range(5):
            yield b" " * 4096
    async with composer.session.post(composer.url + BEACON, data=chunks()) as resp:
        assert resp.status == 413 and "content-length" not in resp.request_info.headers
    exact = json.dumps({"route": "page", "pad": ""}).encode()
    assert await post(composer, exact[:-2] + b"x" * (16 * 1024 - len(exact)) + exact[-2:]) == 204

    # not a JSON object
    for junk in (b"not json", b"[1, 2]", b'"page"', b"\xff\xfe{}", b"[" * 5000, b""):
        assert await post(composer, junk) == 400, junk

    # entries naming what the route table does not know: each dropped, each counted
    evil = "evil-" + "x" * 50
    unknown = [
        {"route": evil, "e": [["footer", "1.0.0", "error", "m", "s"]], "v": [["LCP", 100, "page"]]},  # 2
        {"route": "quiet", "e": [["hero", "", "error", "m", "s"]]},  # 1: that route opted out of signals
        {"route": "page", "id": "\x00bad", "e": [
            [evil, "", "error", "m", "s"],            # unknown fragment
            ["footer", evil, "error", "m", "s"],      # unknown version
            ["footer", "", "error", "m", "s"],        # a manifest fragment has no version ""
            ["hero", "1.0.0", "error", "m", "s"],     # a plain fragment has only ""
            ["footer", "1.0.0", evil, "m", "s"],      # unknown kind
            ["footer", "1.0.0", "error", 1, "s"],     # not a string
            ["footer", "1.0.0", "error", "m"],        # too short
            "footer",                                 # not a list
            ["footer", "1.0.0", "error", "footer 1.0.0 broke", "https://cdn/f.js"],  # fine: counted
            ["page", evil, "error", "outside every fragment", ""],  # fine: counted as page, version ""
        ], "v": [
            [evil, 100, "page"],                      # unknown vital
            ["LCP", 100, evil],                       # unknown fragment
            ["FCP", 100, "hero"],                     # FCP and TTFB are the page's only
            ["LCP", -1, "page"], ["LCP", "100", "page"], ["LCP", True, "page"],
            ["LCP", 1e12, "page"], ["CLS", 1e6, "page"], ["INP", float("nan"), "hero"],
            ["LCP", 100],                             # too short
        ]},  # 8 + 10
        {"route": "page", "e": [["page", "", "error", "m", "s"]] * 60},  # 50 counted, 10 dropped
    ]
    with captured("composer.signals") as records:
        for beacon in unknown:
            assert await post(composer, beacon) == 204
    after, values = await series(composer)

    assert dropped(values) == {"too_large": 2, "invalid": 6, "rate": 0, "unknown": 2 + 1 + 18 + 10}
    assert not new_label_sets(before, after), new_label_sets(before, after)
    assert not [labels for _, labels in after if any(evil in v for _, v in labels)]
    moved = {dict(labels)["fragment"] + "@" + dict(labels)["version"]: v
             for (name, labels), v in values.items() if name == "composer_client_errors_total" and v}
    assert moved == {"footer@1.0.0": 1.0, "page@": 51.0}
    footer = [r.fields for r in records.records if r.fields["fragment"] == "footer"]
    assert footer == [{"fragment": "footer", "version": "1.0.0", "owner": "team-footer", "route": "page",
                       "kind": "error", "message": "footer 1.0.0 broke", "source": "https://cdn/f.js",
                       "request_id": ""}]


async def test_a_flood_past_the_rate_is_refused(start_composer, fragments) -> None:
    """`client_signals_rate: 5`: a sixth beacon within a second is refused with 429 (counted,
    read no further), in any second, not only in the one that began with the first beacon."""
    composer = await signals_composer(start_composer, fragments, rate=5)
    before, _ = await series(composer)
    beacon = {"route": "page", "e": [["footer", "1.0.0", "error", "m", "s"]]}
    start = time.monotonic()
    statuses = [await post(composer, beacon)]
    await asyncio.sleep(0.5)
    statuses += [await post(composer, beacon) for _ in range(6)]
    assert statuses == [204] * 5 + [429] * 2
    # a second after the first beacon: one more fits (the first left the window), not five
    await asyncio.sleep(max(0.0, start + 1.05 - time.monotonic()))
    statuses = [await post(composer, beacon) for _ in range(3)]
    assert time.monotonic() < start + 1.45, "too slow to test the window"
    assert statuses == [204, 429, 429]
    after, values = await series(composer)
    assert dropped(values) == {"too_large": 0, "invalid": 0, "rate": 4, "unknown": 0}
    assert value(values, "composer_client_errors_total", route="page", fragment="footer", version="1.0.0",
                 kind="error") == 6
    assert not new_label_sets(before, after), new_label_sets(before, after)
    await asyncio.sleep(1.05)
    assert await post(composer, beacon) == 204  # a quiet second later, welcome again


async def test_the_endpoint_exists_only_with_signals(start_composer, fragments) -> None:
    """Signals off: /_composer/signals is an unknown path (404), nothing counted. On: only POST."""
    svc = await fragments({"/f": html("<p>f</p>")})
    off = await start_composer({"page.html": PAGE.format(url=svc.url("/f")).replace(
        '<fragment name="footer"></fragment>', "")})
    assert await post(off, {"route": "page"}) == 404
    _, values = await series(off)
    assert sum(dropped(values).values()) == 0
    on = await signals_composer(start_composer, fragments)
    async with on.session.get(on.url + BEACON) as resp:
        assert resp.status == 405 and resp.headers["allow"] == "POST"
