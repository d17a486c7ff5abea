"""Canary analysis (SPEC §8): a canary clearly worse than its active version is aborted for
every user, every worker and every restart; a healthy one, or one with too few fetches, is kept.

Real composer servers and processes, real fragment services: the active version and the
canary are two services (two origins, so the canary's circuit is its own), with windows of
2 s and min_requests of 20 to keep the tests short.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from conftest import Serve, captured, children, eventually, replace_file, stays, write_config
from prometheus_client.parser import text_string_to_metric_families

from composer.reload import aload
from composer.server import ComposerServer

PAGE = '<body><fragment name="footer"></fragment></body>'
ANALYSIS = "  canary_analysis: {window_s: 2, min_requests: 20}\n"


def handler(version: str, fail_every: int = 0) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The footer at `version`; with `fail_every` n, every n-th request answers 500."""
    counter = itertools.count(1)

    async def answer(_: web.Request) -> web.Response:
        if fail_every and next(counter) % fail_every == 0:
            return web.Response(status=500, text="boom")
        return web.Response(text=f"<p>footer {version}</p>", content_type="text/html")
    return answer


async def services(fragments, *, active_fails: int = 0, canary_fails: int = 0) -> dict[str, str]:
    """Two fragment services: version → URL."""
    active = await fragments({"/footer": handler("1.0", active_fails)})
    canary = await fragments({"/footer": handler("2.0", canary_fails)})
    return {"1.0": active.url("/footer"), "2.0": canary.url("/footer")}


def manifest_text(urls: dict[str, str], canary: str = "2.0", percent: int = 50) -> str:
    entry: dict[str, Any] = {"owner": "team-footer", "versions": urls, "active": "1.0"}
    if canary:
        entry["canary"] = {"version": canary, "percent": percent}
    return yaml.safe_dump({"fragments": {"footer": entry}})


def setup(tmp_path: Path, urls: dict[str, str], *, analysis: str = ANALYSIS, **canary: Any) -> Path:
    (tmp_path / "manifest.yaml").write_text(manifest_text(urls, **canary), encoding="utf-8")
    return write_config(tmp_path, {"page.html": PAGE},
                        settings="settings:\n  manifest: manifest.yaml\n  reload_interval_ms: 100\n" + analysis)


async def page(session: aiohttp.ClientSession, base: str, bucket: int) -> str:
    """The footer version `bucket`'s user sees ("" for none)."""
    async with session.get(base + "/page", headers={"Cookie": f"composer_bucket={bucket}"}) as resp:
        text = await resp.text()
    for version in ("1.0", "2.0", "3.0"):
        if f"footer {version}" in text:
            return version
    return ""


async def load(base: str, pages: int, *, fresh: bool = False) -> list[tuple[int, str]]:
    """`pages` page views, alternately canary (bucket < 50) and active users, 10 at a time;
    `fresh`: a new connection for each (so every worker takes some)."""
    seen: list[tuple[int, str]] = []
    connector = aiohttp.TCPConnector(force_close=fresh)
    async with aiohttp.ClientSession(connector=connector) as session:
        for start in range(0, pages, 10):
            buckets = [(start + i) % 50 + (50 if i % 2 else 0) for i in range(10)]
            versions = await asyncio.gather(*(page(session, base, b) for b in buckets))
            seen += zip(buckets, versions, strict=True)
    return seen


async def manifest_view(admin: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(admin + "/manifest") as resp:
        return (await resp.json())["fragments"]["footer"]["canary"]


def aborted_gauge(text: str) -> dict[tuple[str, str], float]:
    return {(s.labels["fragment"], s.labels["version"]): s.value
            for family in text_string_to_metric_families(text) if family.name == "composer_canary_aborted"
            for s in family.samples}


async def metrics(admin: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(admin + "/metrics") as resp:
        return await resp.text()


async def start(tmp_path: Path) -> ComposerServer:
    server = ComposerServer(await aload(tmp_path / "routes.yaml"), host="127.0.0.1", port=0, admin_port=0)
    await server.start()
    return server


async def until_aborted(base: str, admin: str, *, fresh: bool = False) -> dict[str, Any]:
    async def aborted() -> dict[str, Any] | None:
        await load(base, 40, fresh=fresh)
        view = await manifest_view(admin)
        return view if view["state"] == "aborted" else None
    return await eventually(aborted, "the canary to be aborted", deadline=20)


async def test_a_failing_canary_is_aborted_under_load_for_every_user(fragments, tmp_path):
    urls = await services(fragments, canary_fails=2)  # the canary fails half its fetches, the active none
    setup(tmp_path, urls)
    server = await start(tmp_path)
    try:
        assert (await manifest_view(server.admin_url))["state"] == "running"
        assert aborted_gauge(await metrics(server.admin_url)) == {("footer", "2.0"): 0}
        with captured("composer.canary") as records:
            view = await until_aborted(server.url, server.admin_url)
        assert view["version"] == "2.0" and view["percent"] == 50
        assert "failure ratio" in view["reason"] and view["requests"] >= 20
        assert view["failure_ratio"] > 0.3 and view["active_failure_ratio"] == 0
        # every user gets the active version from now on, the canary's buckets too
        assert {version for _, version in await load(server.url, 100)} == {"1.0"}
        assert aborted_gauge(await metrics(server.admin_url)) == {("footer", "2.0"): 1}
        (line,) = [r for r in records.records if r.getMessage() == "canary aborted"]
        fields = line.fields  # type: ignore[attr-defined]
        assert (fields["fragment"], fields["version"], fields["owner"], fields["active_version"]) == \
            ("footer", "2.0", "team-footer", "1.0")
        assert fields["failure_ratio"] > 0.3 and fields["active_failure_ratio"] == 0 and fields["requests"] >= 20
        (state,) = (tmp_path / ".composer-state").iterdir()  # beside the manifest file
        assert json.loads(state.read_text())["version"] == "2.0"
        await asyncio.sleep(2.5)  # it never flaps back, whatever the counts do now
        assert (await manifest_view(server.admin_url))["state"] == "aborted"
    finally:
        await server.stop()


async def test_a_healthy_canary_is_kept_over_several_windows(fragments, tmp_path):
    # active fails 1 in 10, canary 1 in 7 (14 %): worse by more than a point, but not twice as bad
    urls = await services(fragments, active_fails=10, canary_fails=7)
    setup(tmp_path, urls)
    server = await start(tmp_path)
    try:
        for _ in range(4):  # 4 windows of 2 s, each with ~100 canary fetches
            seen = await load(server.url, 200)
            assert {v for b, v in seen if b < 50} <= {"2.0", ""}
            await asyncio.sleep(1.5)
            assert (await manifest_view(server.admin_url)) == {"version": "2.0", "percent": 50, "state": "running"}
        assert aborted_gauge(await metrics(server.admin_url)) == {("footer", "2.0"): 0}
        assert not (tmp_path / ".composer-state").exists()
    finally:
        await server.stop()


async def test_a_canary_under_min_requests_is_not_judged(fragments, tmp_path):
    urls = await services(fragments, canary_fails=1)  # every canary fetch fails
    setup(tmp_path, urls)
    server = await start(tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            for bucket in range(15):  # 15 canary fetches: under min_requests (20)
                assert await page(session, server.url, bucket) == ""
            for bucket in range(50, 100):
                assert await page(session, server.url, bucket) == "1.0"

        async def running() -> bool:
            return (await manifest_view(server.admin_url))["state"] == "running"
        await stays(running, "the canary running", seconds=2.5)
        assert aborted_gauge(await metrics(server.admin_url)) == {("footer", "2.0"): 0}
    finally:
        await server.stop()


async def test_the_abort_survives_a_restart_and_clears_when_another_canary_is_named(fragments, tmp_path):
    urls = await services(fragments, canary_fails=1)
    three = await fragments({"/footer": handler("3.0")})
    setup(tmp_path, urls)
    async with Serve(tmp_path) as serve:
        await until_aborted(serve.base, serve.admin)
    async with Serve(tmp_path) as serve:
        view = await manifest_view(serve.admin)  # at once: read from the state folder at start
        assert view["state"] == "aborted" and "failure ratio" in view["reason"]
        assert {v for _, v in await load(serve.base, 40)} == {"1.0"}
        assert aborted_gauge(await serve.metrics()) == {("footer", "2.0"): 1}
        assert not [r for r in serve.records() if r["msg"] == "canary aborted"]  # decided before, logged before
        # the manifest names another canary: a fresh start, and the stale verdict goes
        replace_file(tmp_path / "manifest.yaml", manifest_text({**urls, "3.0": three.url("/footer")}, canary="3.0"))

        async def three_running() -> bool:
            view = await manifest_view(serve.admin)
            return view["version"] == "3.0" and view["state"] == "running"
        await eventually(three_running, "the new canary running")
        assert not list((tmp_path / ".composer-state").glob("*.json"))
        assert {v for b, v in await load(serve.base, 40) if b < 50} == {"3.0"}


async def test_with_two_workers_both_stop_serving_an_aborted_canary(fragments, tmp_path):
    urls = await services(fragments, canary_fails=1)
    setup(tmp_path, urls)
    async with Serve(tmp_path, "--workers", "2") as serve:
        async def two() -> set[int]:
            found = children(serve.pid)
            serve.seen_workers |= found
            return found if len(found) == 2 else set()
        workers = await eventually(two, "two workers")
        await until_aborted(serve.base, serve.admin, fresh=True)

        async def nobody_gets_it() -> bool:  # the other worker takes it up from the state folder
            return {v for _, v in await load(serve.base, 100, fresh=True)} == {"1.0"}
        await eventually(nobody_gets_it, "both workers to stop serving the canary", deadline=5)
        # new connections, so both workers answer: none serves the canary any more
        await stays(nobody_gets_it, "no worker serving the canary", seconds=2)
        assert aborted_gauge(await serve.metrics()) == {("footer", "2.0"): 1}
        assert children(serve.pid) == workers
        lines = [r for r in serve.records() if r["msg"] == "canary aborted"]
        assert len(lines) == 1, lines  # one worker decided and logged; the other read its verdict
    assert list((tmp_path / ".composer-state").glob("*.json"))


async def test_client_errors_per_page_view_count_when_client_signals_are_on(fragments, tmp_path):
    urls = await services(fragments)  # every fetch succeeds: only the browser sees the canary fail
    setup(tmp_path, urls, analysis=ANALYSIS + "  client_signals: true\n")
    server = await start(tmp_path)
    try:
        seen = await load(server.url, 60)  # 30 canary page views, 30 active
        assert {v for b, v in seen if b < 50} == {"2.0"}
        beacon = {"route": "page", "id": "r1", "e": [["footer", "2.0", "error", "boom", "http://x/f.js"]] * 10}
        async with aiohttp.ClientSession() as session, \
                session.post(server.url + "/_composer/signals", data=json.dumps(beacon)) as resp:
            assert resp.status == 204

        async def aborted() -> dict[str, Any] | None:
            view = await manifest_view(server.admin_url)
            return view if view["state"] == "aborted" else None
        view = await eventually(aborted, "the canary to be aborted on client errors", deadline=5)
        assert "10 client errors" in view["reason"] and view["active_failure_ratio"] == 0
        assert view["failure_ratio"] == round(10 / 30, 4)  # 10 errors in 30 canary page views
        assert {v for _, v in await load(server.url, 40)} == {"1.0"}
    finally:
        await server.stop()


def test_settings_are_checked_and_the_state_folder_follows_the_operator(tmp_path, monkeypatch):
    from composer import load
    from composer.canary import STATE_DIR_ENV, state_dir_of
    from composer.errors import ConfigError

    urls = {"1.0": "http://a.test/", "2.0": "http://b.test/"}
    setup(tmp_path, urls, analysis="  canary_analysis: {window_s: 0, min_requests: x, enabled: 3, pace: 1}\n")
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "routes.yaml")
    problems = "\n".join(info.value.problems)
    for word in ("window_s", "min_requests", "enabled", "pace"):
        assert "routes.yaml:4: settings.canary_analysis" in problems and word in problems, problems
    setup(tmp_path, urls, analysis="  canary_analysis: {min_requests: 5}\n")
    table = load(tmp_path / "routes.yaml")
    policy = table.settings.canary_analysis
    assert (policy.window_s, policy.min_requests, policy.enabled) == (60, 5, True)
    monkeypatch.delenv(STATE_DIR_ENV, raising=False)
    assert state_dir_of(table) == tmp_path / ".composer-state"  # beside the manifest file
    setup(tmp_path, urls, analysis="  state_dir: state\n")
    table = load(tmp_path / "routes.yaml")
    assert state_dir_of(table) == tmp_path / "state"  # relative to routes.yaml
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "elsewhere"))
    assert state_dir_of(table) == tmp_path / "elsewhere"  # the environment wins (the Deployment sets it)


async def test_analysis_switched_off_judges_nothing(fragments, tmp_path):
    urls = await services(fragments, canary_fails=1)
    setup(tmp_path, urls, analysis="  canary_analysis: {window_s: 2, min_requests: 20, enabled: false}\n")
    server = await start(tmp_path)
    try:
        await load(server.url, 100)
        await asyncio.sleep(1.5)
        assert (await manifest_view(server.admin_url))["state"] == "off"
        assert {v for b, v in await load(server.url, 20) if b < 50} == {""}  # still the (failing) canary
        assert aborted_gauge(await metrics(server.admin_url)) == {}
    finally:
        await server.stop()
