"""Circuit breakers: the state machine on its own, then end to end through a real composer."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from composer.breaker import Breaker, BreakerPolicy, Breakers, State
from tests.conftest import captured, eventually, html

# --------------------------------------------------------------------------- the state machine


def breaker(**policy: int) -> tuple[Breaker, list[State]]:
    seen: list[State] = []
    return Breaker("f", None, "http://a:80", BreakerPolicy(**policy), lambda b: seen.append(b.state)), seen


def test_consecutive_failures_open_and_a_success_in_between_resets_the_count():
    b, seen = breaker(failures=3, failure_percent=0)
    for ok in (False, False, True, False, False):
        assert b.allow(100.0)
        b.record(ok, 100.0)
    assert b.state is State.CLOSED and b.consecutive == 2
    b.record(False, 100.0)
    assert b.state is State.OPEN and seen == [State.OPEN]
    assert not b.allow(100.0) and not b.allow(104.9)


def test_after_the_cooldown_exactly_one_probe_goes_and_its_answer_decides():
    b, seen = breaker(failures=1, failure_percent=0, cooldown_ms=5000)
    b.record(False, 100.0)
    assert not b.allow(104.9)
    assert b.allow(105.0) and b.state is State.HALF_OPEN
    assert not b.allow(105.1) and not b.allow(109.9)  # the probe is out: nobody else
    b.record(False, 106.0)  # the probe failed: open again, a new cooldown from now
    assert b.state is State.OPEN and not b.allow(110.9)
    assert b.allow(111.0)
    b.record(True, 111.2)
    assert b.state is State.CLOSED and b.allow(111.3)
    assert seen == [State.OPEN, State.HALF_OPEN, State.OPEN, State.HALF_OPEN, State.CLOSED]


def test_a_lost_probe_is_replaced_after_a_cooldown_and_a_released_one_at_once():
    b, _ = breaker(failures=1, failure_percent=0, cooldown_ms=1000)
    b.record(False, 10.0)
    assert b.allow(11.0)  # the probe's page goes away without a verdict...
    assert not b.allow(11.5)
    assert b.allow(12.0)  # ...so another is let through a cooldown later
    b.release()
    assert b.allow(12.1)  # a release frees the slot at once


def test_failure_share_over_the_window_opens_only_with_enough_requests():
    b, _ = breaker(failures=0, failure_percent=50, min_requests=10, window_s=10)
    for i in range(9):  # 9 requests, 5 failed: over 50 % but under min_requests
        b.record(i % 2 == 0 and i < 8, 100.0 + i * 0.1)
    assert b.state is State.CLOSED
    b.record(False, 101.0)  # 10 requests, 5 failures (50 %)
    assert b.state is State.OPEN


def test_old_requests_leave_the_window():
    b, _ = breaker(failures=0, failure_percent=50, min_requests=4, window_s=10)
    for t in (100.0, 100.5, 101.0):
        b.record(False, t)  # 3 failures: under min_requests
    for t in (112.0, 112.1, 112.2):
        b.record(True, t)  # the failures are over 10 s old now
    b.record(False, 112.3)  # 4 requests in the window, 1 failure
    assert b.state is State.CLOSED


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.floats(min_value=0, max_value=4)), max_size=80),
       st.integers(min_value=1, max_value=5), st.integers(min_value=1, max_value=100),
       st.integers(min_value=1, max_value=12))
def test_the_failure_share_is_the_share_of_the_requests_still_in_the_window(
        events: list[tuple[bool, float]], window_s: int, percent: int, min_requests: int) -> None:
    """The breaker keeps running sums over its one-second buckets; it opens exactly when a
    plain count of the requests recorded in the last `window_s` whole seconds says so."""
    b, _ = breaker(failures=0, failure_percent=percent, min_requests=min_requests, window_s=window_s)
    now, seen = 1000.0, []
    for ok, gap in events:
        now += gap
        b.record(ok, now)
        seen.append((int(now), ok))
        horizon = int(now) - window_s
        kept = [ok for second, ok in seen if second > horizon]
        should = len(kept) >= min_requests and kept.count(False) * 100 >= percent * len(kept)
        assert (b.state is State.OPEN) == should
        if should:
            return  # open: what follows is the cool-down's business


def test_both_rules_off_means_no_breaker_and_worst_state_per_fragment():
    assert not BreakerPolicy(failures=0, failure_percent=0).enabled
    breakers = Breakers(lambda _: None)
    policy = BreakerPolicy(failures=1, failure_percent=0)
    a = breakers.get("f", "f", "http://a:80", policy)
    breakers.get("f", "f", "http://b:80", policy)
    assert breakers.get("f", "f", "http://a:80", policy) is a
    a.record(False, 1.0)
    assert breakers.worst("f") is State.OPEN and breakers.worst("other") is State.CLOSED
    assert [x.origin for x in breakers.of("f")] == ["http://a:80", "http://b:80"]


# --------------------------------------------------------------------------- end to end


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


class Switch:
    """A fragment service that can be turned broken (500) or healthy while the test runs."""

    def __init__(self, body: str = "<p>live</p>") -> None:
        self.broken = True
        self.body = body

    async def handle(self, _: web.Request) -> web.Response:
        if self.broken:
            return web.Response(status=500, text="down")
        return web.Response(text=self.body, content_type="text/html")


PAGE = '<html><body><fragment id="recos" src="{src}"><p>inline</p></fragment>{rest}</body></html>'


async def test_circuit_opens_after_failures_then_no_request_is_sent_and_a_probe_closes_it(
        fragments, start_composer):
    switch = Switch()
    svc = await fragments({"/recos": switch.handle, "/ok": html("<p>ok</p>")})
    composer = await start_composer(
        {"page.html": PAGE.format(src=svc.url("/recos"), rest=f'<fragment src="{svc.url("/ok")}"></fragment>')},
        settings="settings:\n  circuit_breaker: {failures: 3, cooldown_ms: 600}\n")
    metrics = await composer.metrics()
    assert metric(metrics, "composer_fragment_circuit_state", fragment="recos") == 0  # present from the start

    with captured("composer.fragments") as records:
        for _ in range(3):
            _, body = await composer.get("/page")
            assert "<p>inline</p>" in body
        assert svc.hits["/recos"] == 3
        started = time.perf_counter()
        for _ in range(5):  # open: straight to the fallback, nothing sent
            resp, body = await composer.get("/page")
            assert resp.status == 200 and "<p>inline</p>" in body and "<p>ok</p>" in body
        assert time.perf_counter() - started < 1.0
        assert svc.hits["/recos"] == 3
    messages = [r.getMessage() for r in records.records]
    assert messages.count("fragment failed") == 3  # open-circuit pages are not logged one by one
    assert messages.count("circuit opened") == 1
    opened = next(r for r in records.records if r.getMessage() == "circuit opened")
    assert opened.fields["fragment"] == "recos" and opened.fields["origin"].startswith("http://127.0.0.1:")

    metrics = await composer.metrics()
    assert metric(metrics, "composer_fragment_circuit_state", fragment="recos") == 2
    assert metric(metrics, "composer_fragment_failures_total", fragment="recos", reason="status") == 3
    assert metric(metrics, "composer_fragment_failures_total", fragment="recos", reason="circuit_open") == 5
    assert metric(metrics, "composer_fragment_fallbacks_total", fragment="recos") == 8
    async with composer.session.get(composer.admin_url + "/manifest") as resp:
        circuits = (await resp.json())["circuits"]
    assert sorted((c["fragment"], c["state"]) for c in circuits) == [("page.html#2", "closed"), ("recos", "open")]

    switch.broken = False
    await asyncio.sleep(0.65)  # the cooldown: the next page's request is the probe
    _, body = await composer.get("/page")
    assert "<p>live</p>" in body and svc.hits["/recos"] == 4
    metrics = await composer.metrics()
    assert metric(metrics, "composer_fragment_circuit_state", fragment="recos") == 0
    for _ in range(2):
        assert "<p>live</p>" in (await composer.get("/page"))[1]
    assert svc.hits["/recos"] == 6


async def test_a_failed_probe_opens_it_again_and_concurrent_pages_send_one_probe(fragments, start_composer):
    release = asyncio.Event()
    calls = 0

    async def slow_failure(_: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls > 2:  # the probe: hold it, so the other pages arrive while it is out
            await release.wait()
        return web.Response(status=503)

    svc = await fragments({"/recos": slow_failure})
    composer = await start_composer(
        {"page.html": PAGE.format(src=svc.url("/recos"), rest="")},
        settings="settings:\n  circuit_breaker: {failures: 2, cooldown_ms: 300}\n")
    for _ in range(2):
        await composer.get("/page")
    await asyncio.sleep(0.35)
    pages = [asyncio.create_task(composer.get("/page")) for _ in range(10)]
    async def probed() -> bool:
        return calls == 3

    await eventually(probed, "the probe to arrive")
    await asyncio.sleep(0.1)
    assert calls == 3  # one probe; the other nine pages went straight to the fallback
    assert sum(t.done() for t in pages) == 9
    release.set()
    for resp, body in await asyncio.gather(*pages):
        assert resp.status == 200 and "<p>inline</p>" in body
    metrics = await composer.metrics()
    assert metric(metrics, "composer_fragment_circuit_state", fragment="recos") == 2
    assert metric(metrics, "composer_fragment_failures_total", fragment="recos", reason="circuit_open") == 9


async def test_failure_share_opens_the_circuit(fragments, start_composer):
    count = 0

    async def every_other(_: web.Request) -> web.Response:
        nonlocal count
        count += 1
        return web.Response(status=500) if count % 2 else web.Response(text="<p>fine</p>", content_type="text/html")

    svc = await fragments({"/recos": every_other})
    composer = await start_composer(
        {"page.html": PAGE.format(src=svc.url("/recos"), rest="")},
        settings="settings:\n  circuit_breaker: {failures: 0, failure_percent: 50, min_requests: 6}\n")
    for _ in range(6):
        await composer.get("/page")
    assert count == 6
    await composer.get("/page")
    assert count == 6  # 3 of 6 failed: open
    assert metric(await composer.metrics(), "composer_fragment_circuit_state", fragment="recos") == 2


async def test_a_primary_with_an_open_circuit_uses_its_fallback_src_or_answers_500(fragments, start_composer):
    svc = await fragments({"/main": html("down", status=500), "/static": html("<p>static main</p>")})
    composer = await start_composer({
        "page.html": f'<fragment src="{svc.url("/main")}" primary fallback-src="{svc.url("/static")}"></fragment>',
        "bare.html": f'<fragment id="bare" src="{svc.url("/main")}" primary></fragment>'},
        routes="routes:\n  - {name: page, match: {path: /page}, template: page.html}\n"
               "  - {name: bare, match: {path: /bare}, template: bare.html}\n",
        settings="settings:\n  circuit_breaker: {failures: 1}\n")
    for _ in range(3):
        resp, body = await composer.get("/page")
        assert (resp.status, body) == (200, "<p>static main</p>")
    assert svc.hits["/main"] == 1
    for _ in range(2):
        assert (await composer.get("/bare"))[0].status == 500
    assert svc.hits["/main"] == 2  # "bare" has its own circuit (another fragment id)


async def test_manifest_override_and_separate_circuits_per_origin(fragments, start_composer):
    bad = await fragments({"/footer": html("down", status=500)})
    good = await fragments({"/footer": html("<p>canary footer</p>")})
    routes = f"""\
fragments:
  footer:
    owner: team-a
    circuit_breaker: {{failures: 1, cooldown_ms: 60000}}
    versions:
      "1": {bad.url("/footer")}
      "2": {good.url("/footer")}
    active: "1"
    canary: {{version: "2", percent: 50}}
routes:
  - {{name: page, match: {{path: /page}}, template: page.html}}
"""
    composer = await start_composer({"page.html": '<fragment name="footer"><p>inline</p></fragment>'},
                                    routes=routes, settings="settings:\n  circuit_breaker: {failures: 50}\n")
    stable = {"Cookie": "composer_bucket=99"}
    canary = {"Cookie": "composer_bucket=0"}
    for _ in range(3):
        assert "<p>inline</p>" in (await composer.get("/page", headers=stable))[1]
    assert bad.hits["/footer"] == 1  # the manifest's failures: 1 beats settings' 50
    for _ in range(3):
        assert "<p>canary footer</p>" in (await composer.get("/page", headers=canary))[1]
    assert good.hits["/footer"] == 3  # another origin, another circuit: closed
    async with composer.session.get(composer.admin_url + "/manifest") as resp:
        view = await resp.json()
    assert view["fragments"]["footer"]["circuit"] == "open"
    assert sorted((c["origin"] == f"http://127.0.0.1:{bad.server.port}", c["state"]) for c in view["circuits"]) \
        == [(False, "closed"), (True, "open")]


async def test_a_rolled_back_canarys_circuit_is_forgotten(fragments, start_composer, tmp_path):
    """Nothing probes the origin of a dropped canary again: kept, its circuit would stay open
    (gauge 2, ComposerFragmentCircuitOpen paging) forever."""
    stable = await fragments({"/footer": html("<p>stable</p>")})
    bad = await fragments({"/footer": html("down", status=500)})
    routes = """\
fragments:
  footer:
    owner: team-a
    circuit_breaker: {{failures: 1, cooldown_ms: 60000}}
    versions:
      "1": {stable}
      "2": {bad}
    active: "1"
{canary}routes:
  - {{name: page, match: {{path: /page}}, template: page.html}}
"""
    text = routes.format(stable=stable.url("/footer"), bad=bad.url("/footer"),
                         canary='    canary: {version: "2", percent: 50}\n')
    composer = await start_composer({"page.html": '<fragment name="footer"><p>inline</p></fragment>'},
                                    routes=text, settings="settings:\n  reload_interval_ms: 0\n")
    await composer.get("/page", headers={"Cookie": "composer_bucket=0"})
    assert 'composer_fragment_circuit_state{fragment="footer"} 2.0' in await composer.metrics()
    (tmp_path / "routes.yaml").write_text("settings:\n  reload_interval_ms: 0\n" + routes.format(
        stable=stable.url("/footer"), bad=bad.url("/footer"), canary=""), encoding="utf-8")
    assert await composer.server.reloader.check() is True
    assert 'composer_fragment_circuit_state{fragment="footer"} 0.0' in await composer.metrics()
    async with composer.session.get(composer.admin_url + "/manifest") as resp:
        view = await resp.json()
    assert view["fragments"]["footer"]["circuit"] == "closed"
    assert all(c["origin"] != f"http://127.0.0.1:{bad.server.port}" for c in view["circuits"])


async def test_breaker_state_survives_a_reload(fragments, start_composer, tmp_path):
    svc = await fragments({"/recos": html("down", status=500)})
    composer = await start_composer({"page.html": PAGE.format(src=svc.url("/recos"), rest="")},
                                    settings="settings:\n  reload_interval_ms: 0\n  circuit_breaker: {failures: 2}\n")
    for _ in range(3):
        await composer.get("/page")
    assert svc.hits["/recos"] == 2
    page = tmp_path / "templates" / "page.html"
    page.write_text(PAGE.format(src=svc.url("/recos"), rest="<p>v2</p>"), encoding="utf-8")
    assert await composer.server.reloader.check() is True
    _, body = await composer.get("/page")
    assert "<p>v2</p>" in body and svc.hits["/recos"] == 2  # still open: no burst at a known-down service


async def test_breaker_off_sends_every_request(fragments, start_composer):
    svc = await fragments({"/recos": html("down", status=500)})
    composer = await start_composer({"page.html": PAGE.format(src=svc.url("/recos"), rest="")},
                                    settings="settings:\n  circuit_breaker: {failures: 0, failure_percent: 0}\n")
    for _ in range(8):
        await composer.get("/page")
    assert svc.hits["/recos"] == 8


@pytest.mark.parametrize("yaml_text, problem", [
    ("settings:\n  circuit_breaker: {failures: -1}\n", "routes.yaml:2: settings.circuit_breaker.failures must be"),
    ("settings:\n  circuit_breaker: {failure_percent: 101}\n",
     "routes.yaml:2: settings.circuit_breaker.failure_percent must be"),
    ("settings:\n  circuit_breaker: {cooldown: 5}\n", "routes.yaml:2: unknown key 'cooldown' in settings.circuit_breaker"),
    ("settings:\n  circuit_breaker: 5\n", "routes.yaml:2: settings.circuit_breaker must be a mapping"),
    ("fragments:\n  f:\n    versions: {'1': 'http://127.0.0.1:1/'}\n    active: '1'\n"
     "    circuit_breaker: {window_s: 0}\n", "routes.yaml:5: fragment 'f': circuit_breaker.window_s must be"),
])
def test_bad_circuit_breaker_settings_are_config_errors(tmp_path, yaml_text, problem):
    from composer.config import load_config
    from composer.errors import ConfigError

    config = tmp_path / "routes.yaml"
    config.write_text(yaml_text + "routes:\n  - {name: r, match: {path: /}, redirect: {to: /x}}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as error:
        load_config(config)
    assert any(problem in p for p in error.value.problems), error.value.problems


async def test_circuit_gauge_is_exported_without_traffic(fragments, start_composer):
    svc = await fragments({"/recos": html("<p>x</p>")})
    composer = await start_composer({"page.html": PAGE.format(src=svc.url("/recos"), rest="")})
    async with aiohttp.ClientSession() as session, session.get(composer.admin_url + "/metrics") as resp:
        text = await resp.text()
    assert 'composer_fragment_circuit_state{fragment="recos"} 0.0' in text
