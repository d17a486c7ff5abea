"""SPEC §9: every label set composer knows at load is on /metrics at 0 before its first event.

fragments × routes × versions (active and canary; "" for a plain `src`), × reasons for the
failures, × cache results for the lookups. Alerts need the series before the first event:
`rate(x[5m] offset 30m)` of a series born at the first fallback is empty, so "more than
twice what it was" can never hold (tests/test_deploy.py replays this through promtool).
Also here: the "circuit opened" log line names the owner and version(s) behind the circuit,
as the alerts about it do.

Everything is real: composer runs in process on 127.0.0.1, loaded as `composer serve` loads
(`composer.load`: the manifest file next to routes.yaml), reloading that file when it
changes; fragment services are aiohttp apps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, get_args

import aiohttp
import pytest
import yaml
from conftest import Composer, captured, eventually, html, replace_file, write_config
from prometheus_client.parser import text_string_to_metric_families

from composer import load
from composer.cache import Result
from composer.errors import Reason
from composer.server import ComposerServer

REASONS = tuple(r.value for r in Reason)
CACHE_RESULTS = get_args(Result)  # what FragmentCache.get can answer
SETTINGS = "settings:\n  reload_interval_ms: 50\n  manifest: manifest.yaml\n"
ROUTES = """
routes:
  - {name: home, match: {path: /}, template: home.html}
  - {name: product, match: {path: "/p/{sku}"}, template: product.html}
"""
Labels = tuple[str, ...]


def samples(text: str, name: str, *labels: str) -> dict[Labels, float]:
    """The samples called `name`, keyed by the values of `labels`."""
    return {tuple(s.labels[k] for k in labels): s.value
            for family in text_string_to_metric_families(text) for s in family.samples if s.name == name}


def reloads_ok(text: str) -> float:
    return samples(text, "composer_config_reloads_total", "result").get(("ok",), 0.0)


def manifest(**fragments: dict[str, Any]) -> str:
    return yaml.safe_dump({"fragments": fragments}, sort_keys=False)


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Composer]]]:
    """Factory: write templates, routes.yaml and manifest.yaml, then run composer on them."""
    started: list[Composer] = []

    async def run(templates: dict[str, str], manifest_text: str, *, routes: str = ROUTES,
                  settings: str = SETTINGS) -> Composer:
        (tmp_path / "manifest.yaml").write_text(manifest_text, encoding="utf-8")
        path = write_config(tmp_path, templates, routes, settings)
        server = ComposerServer(load(path), host="127.0.0.1", port=0, admin_port=0)
        composer = Composer(server=server, session=aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()))
        started.append(composer)
        await server.start()
        return composer

    yield run
    for composer in started:
        await composer.session.close()
        await composer.server.stop()


async def reload_to(composer: Composer, path: Path, text: str) -> str:
    """Rewrite the manifest and wait for composer to take it up; /metrics after the reload."""
    before = reloads_ok(await composer.metrics())
    replace_file(path, text)

    async def reloaded() -> str:
        now = await composer.metrics()
        return now if reloads_ok(now) > before else ""
    return await eventually(reloaded, "the manifest reload")


async def test_every_fragment_label_set_is_at_zero_before_the_first_page(fragments, start):
    svc = await fragments({"/x": html("<p>x</p>")})
    footer = {"owner": "team-x", "active": "1.0", "canary": {"version": "2.0", "percent": 10},
              "versions": {v: svc.url(f"/footer/{v}") for v in ("1.0", "2.0", "3.0")}}
    banner = {"owner": "team-y", "active": "1.0", "versions": {"1.0": svc.url("/banner")}, "enabled": False}
    header = f'<fragment id="header" src="{svc.url("/header")}"></fragment>'
    composer = await start({
        "home.html": f'<body>{header}<fragment name="footer"></fragment><fragment name="banner"></fragment></body>',
        "product.html": f'<body>{header}<fragment id="prod" src="{svc.url("/p/{sku}")}" primary></fragment>'
                        '<fragment name="footer" id="foot"></fragment></body>',
    }, manifest(footer=footer, banner=banner))
    text = await composer.metrics()

    # 3.0 is listed but neither active nor canary: only a QA override fetches it, and its
    # series appear with its first fetch. A `name` under its own `id` counts under that id.
    # banner is flagged off: no fetch, no lookup, no fallback counted until it is back on.
    fetches = {("header", "home", ""), ("footer", "home", "1.0"), ("footer", "home", "2.0"),
               ("header", "product", ""), ("prod", "product", ""), ("foot", "product", "1.0"),
               ("foot", "product", "2.0")}
    failures = samples(text, "composer_fragment_failures_total", "fragment", "route", "version", "reason")
    assert failures == {(*f, r): 0 for f in fetches for r in REASONS}
    durations = samples(text, "composer_fragment_request_duration_seconds_count", "fragment", "route", "version")
    assert durations == dict.fromkeys(fetches, 0)
    buckets = samples(text, "composer_fragment_request_duration_seconds_bucket", "fragment", "route", "version", "le")
    assert {k[:3] for k in buckets} == fetches and set(buckets.values()) == {0}
    fallbacks = samples(text, "composer_fragment_fallbacks_total", "fragment", "route")
    assert fallbacks == dict.fromkeys({f[:2] for f in fetches}, 0)
    cache = samples(text, "composer_fragment_cache_total", "fragment", "result")
    assert cache == {(f, r): 0 for f in ("header", "footer", "prod", "foot") for r in CACHE_RESULTS}


async def test_a_reload_declares_new_versions_and_drops_the_ones_gone(fragments, start, tmp_path):
    """A new canary is at 0 as soon as it is loaded; a dropped version's series leave (one
    process: nothing can still count them, and versions come and go for as long as
    composer runs); a version put back counts again from 0."""
    svc = await fragments({f"/footer/{v}": html(f"<p>footer {v}</p>") for v in ("1.0", "2.0")})
    footer = {"owner": "team-x", "active": "1.0", "versions": {v: svc.url(f"/footer/{v}") for v in ("1.0", "2.0")}}
    with_canary = manifest(footer={**footer, "canary": {"version": "2.0", "percent": 10}})
    composer = await start({"home.html": '<body><fragment name="footer"></fragment></body>'}, manifest(footer=footer),
                           routes="routes:\n  - {name: home, match: {path: /}, template: home.html}\n")
    key = ("footer", "home")

    families = ("composer_fragment_failures_total", "composer_fragment_request_duration_seconds_count")

    def versions(text: str) -> dict[str, set[str]]:
        """Which versions of footer on home each family has series for."""
        return {name: {k[2] for k in samples(text, name, "fragment", "route", "version") if k[:2] == key}
                for name in families}

    assert versions(await composer.metrics()) == {name: {"1.0"} for name in families}
    text = await reload_to(composer, tmp_path / "manifest.yaml", with_canary)
    assert versions(text) == {name: {"1.0", "2.0"} for name in families}

    resp, body = await composer.get("/", headers={"Cookie": "composer_bucket=0"})  # bucket 0 < 10: the canary
    assert resp.status == 200 and "footer 2.0" in body
    counted = samples(await composer.metrics(), "composer_fragment_request_duration_seconds_count",
                      "fragment", "route", "version")
    assert counted[(*key, "2.0")] == 1

    text = await reload_to(composer, tmp_path / "manifest.yaml", manifest(footer=footer))
    assert versions(text) == {name: {"1.0"} for name in families}
    assert ("footer", "home") in samples(text, "composer_fragment_fallbacks_total", "fragment", "route")

    await reload_to(composer, tmp_path / "manifest.yaml", with_canary)
    resp, body = await composer.get("/", headers={"Cookie": "composer_bucket=0"})
    assert resp.status == 200 and "footer 2.0" in body
    counted = samples(await composer.metrics(), "composer_fragment_request_duration_seconds_count",
                      "fragment", "route", "version")
    assert counted[(*key, "2.0")] == 1  # the series put back, and counting: not a leftover child


async def test_circuit_opened_line_names_owner_and_version(fragments, start):
    """A breaker is per fragment id and origin: the line names the fragment's owner and the
    versions served from that origin (several when they share it, "" for a plain `src`)."""
    good = await fragments({"/footer/1.0": html("<p>footer 1.0</p>")})
    bad = await fragments({path: html("down", status=500) for path in ("/footer/2.0", "/nav/1.0", "/nav/2.0", "/ads")})
    footer = {"owner": "team-x", "active": "1.0", "canary": {"version": "2.0", "percent": 50},
              "versions": {"1.0": good.url("/footer/1.0"), "2.0": bad.url("/footer/2.0")}}
    nav = {"owner": "team-nav", "active": "1.0", "canary": {"version": "2.0", "percent": 50},
           "versions": {v: bad.url(f"/nav/{v}") for v in ("1.0", "2.0")}}
    page = (f'<body><fragment name="footer"></fragment><fragment name="nav"></fragment>'
            f'<fragment id="ads" src="{bad.url("/ads")}"></fragment></body>')
    composer = await start({"home.html": page}, manifest(footer=footer, nav=nav),
                           routes="routes:\n  - {name: home, match: {path: /}, template: home.html}\n",
                           settings=SETTINGS + "  circuit_breaker: {failures: 2, cooldown_ms: 60000}\n")
    with captured("composer.fragments") as records:
        for _ in range(2):
            resp, _body = await composer.get("/", headers={"Cookie": "composer_bucket=0"})
            assert resp.status == 200
        await asyncio.sleep(0)
    opened = {f["fragment"]: f for r in records.records if r.getMessage() == "circuit opened"
              for f in [getattr(r, "fields", {})]}
    bad_origin = bad.url("/").rstrip("/")
    assert {k: (f["origin"], f["owner"], f["version"]) for k, f in opened.items()} == {
        "footer": (bad_origin, "team-x", "2.0"),
        "nav": (bad_origin, "team-nav", "1.0,2.0"),
        "ads": (bad_origin, "", ""),
    }
