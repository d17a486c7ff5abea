"""deploy/: the Prometheus rules load in promtool and fire as documented; the dashboard
queries only metrics composer exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from conftest import eventually, html, replace_file, write_config
from prometheus_client.parser import text_string_to_metric_families

from composer import load
from composer.metrics import Metrics
from composer.server import ComposerServer

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus-rules.yaml"


def promtool() -> str:
    tool = shutil.which("promtool")
    assert tool, "promtool is needed (Debian's prometheus package; .ci/run installs it)"
    return tool


def promtool_test(case: Path) -> None:
    """`promtool test rules` on a unit-test file: its alerts and samples must come out as written."""
    result = subprocess.run([promtool(), "test", "rules", str(case)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def exported_names() -> set[str]:
    """Every series name composer's registry can expose (labelled families have no samples yet)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    return {family.name + s for family in Metrics().registry.collect() for s in suffixes[family.type]}


def test_rules_pass_promtool_check():
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_names_fragment_and_the_page_alerts_name_owner_and_version():
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]
    names = {r["alert"] for r in rules}
    assert {"ComposerFragmentFailureRatioHigh", "ComposerFragmentFallbacksRisingAfterVersionChange",
            "ComposerFragmentLatencyOverBudget"} <= names
    for rule in rules:
        text = rule["annotations"]["summary"] + rule["annotations"]["description"]
        if "Fragment" in rule["alert"]:
            assert "$labels.fragment" in text
        if rule["alert"] in ("ComposerFragmentFailureRatioHigh", "ComposerFragmentLatencyOverBudget"):
            assert "$labels.owner" in text and "$labels.version" in text


def test_rules_use_only_exported_metrics():
    known = exported_names()
    text = RULES.read_text()
    used = set(re.findall(r"\b(composer_[a-z_]+)\b", text))
    assert used and used <= known, used - known


def test_failure_ratio_alert_fires_with_fragment_version_and_owner(tmp_path):
    """promtool's rule unit test: 10 % failures of footer 2.4.0 for 10 minutes pages its owner;
    2.3.0 at 1 % does not."""
    case = tmp_path / "test.yaml"
    case.write_text(textwrap.dedent(f"""\
        rule_files: [{RULES}]
        evaluation_interval: 1m
        tests:
          - interval: 1m
            input_series:
              - series: 'composer_fragment_request_duration_seconds_count{{fragment="footer",route="home",version="2.4.0"}}'
                values: '0+100x20'
              - series: 'composer_fragment_failures_total{{fragment="footer",route="home",version="2.4.0",reason="status"}}'
                values: '0+10x20'
              - series: 'composer_fragment_request_duration_seconds_count{{fragment="footer",route="home",version="2.3.0"}}'
                values: '0+100x20'
              - series: 'composer_fragment_failures_total{{fragment="footer",route="home",version="2.3.0",reason="status"}}'
                values: '0+1x20'
              - series: 'composer_fragment_info{{fragment="footer",version="2.4.0",owner="platform-team"}}'
                values: '1x20'
              - series: 'composer_fragment_info{{fragment="footer",version="2.3.0",owner="platform-team"}}'
                values: '1x20'
            alert_rule_test:
              - eval_time: 15m
                alertname: ComposerFragmentFailureRatioHigh
                exp_alerts:
                  - exp_labels: {{severity: page, fragment: footer, version: "2.4.0", owner: platform-team}}
                    exp_annotations:
                      summary: "Fragment footer 2.4.0 fails 10% of requests"
                      description: >-
                        More than 2 % of requests to fragment footer version 2.4.0
                        (owner platform-team) failed for 5 minutes; pages show its fallback. Check
                        composer's "fragment failed" log lines (error_type, status) and GET /manifest; if the
                        version is new, roll it back in the manifest.
        """), encoding="utf-8")
    promtool_test(case)


def test_dashboard_has_a_row_per_fragment_with_the_four_panels():
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    rows = [p for p in dash["panels"] if p["type"] == "row"]
    assert [r.get("repeat") for r in rows] == ["fragment"]
    titles = " | ".join(p["title"] for p in dash["panels"] if p["type"] != "row").lower()
    for what in ("failure", "fallback", "p50", "p99", "version"):
        assert what in titles
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", ())]
    used = {m for e in exprs for m in re.findall(r"\b(composer_[a-z_]+)\b", e)}
    assert used <= exported_names(), used - exported_names()
    assert any("by (version)" in e for e in exprs)


def test_circuit_open_alert_fires_after_five_minutes_open_and_names_the_owner(tmp_path):
    """Open (2) on one of two instances for 6 minutes pages the owner; open for 3 does not."""
    case = tmp_path / "test.yaml"
    case.write_text(textwrap.dedent(f"""\
        rule_files: [{RULES}]
        evaluation_interval: 1m
        tests:
          - interval: 1m
            input_series:
              - series: 'composer_fragment_circuit_state{{fragment="recos",instance="a"}}'
                values: '0 0 2 2 2 2 2 2 2 2'
              - series: 'composer_fragment_circuit_state{{fragment="recos",instance="b"}}'
                values: '0x9'
              - series: 'composer_fragment_circuit_state{{fragment="footer",instance="a"}}'
                values: '0 0 0 0 0 2 2 2 2 2'
              - series: 'composer_fragment_info{{fragment="recos",version="1.0",owner="recos-team"}}'
                values: '1x9'
              - series: 'composer_fragment_info{{fragment="footer",version="2.0",owner="platform-team"}}'
                values: '1x9'
            alert_rule_test:
              - eval_time: 8m
                alertname: ComposerFragmentCircuitOpen
                exp_alerts:
                  - exp_labels: {{severity: page, fragment: recos, owner: recos-team}}
                    exp_annotations:
                      summary: "Fragment recos: circuit open"
                      description: >-
                        composer stopped calling fragment recos (owner recos-team):
                        it kept failing and every probe since has failed too. GET /manifest shows which
                        origin; composer's "circuit opened" log line says when.
        """), encoding="utf-8")
    promtool_test(case)



def test_failure_ratio_counts_open_circuit_skips_as_attempts_so_it_stays_within_100_percent(tmp_path):
    """An open circuit counts a circuit_open failure per page but sends nothing (only a probe
    now and then): divided by requests sent, footer's ratio would read 10000 %. Divided by
    attempts (sent + circuit_open) it is exactly 100 %, and the alert still pages. header,
    which never had an open circuit (no circuit_open series), keeps its plain 10 %."""
    case = tmp_path / "test.yaml"
    case.write_text(textwrap.dedent(f"""\
        rule_files: [{RULES}]
        evaluation_interval: 1m
        tests:
          - interval: 1m
            input_series:
              # footer 2.4.0: circuit open all along; one probe a minute (it fails), 99 pages skip it
              - series: 'composer_fragment_request_duration_seconds_count{{fragment="footer",route="home",version="2.4.0"}}'
                values: '0+1x20'
              - series: 'composer_fragment_failures_total{{fragment="footer",route="home",version="2.4.0",reason="timeout"}}'
                values: '0+1x20'
              - series: 'composer_fragment_failures_total{{fragment="footer",route="home",version="2.4.0",reason="circuit_open"}}'
                values: '0+99x20'
              # header 1.0: 10 % of its requests fail, its circuit never opened
              - series: 'composer_fragment_request_duration_seconds_count{{fragment="header",route="home",version="1.0"}}'
                values: '0+100x20'
              - series: 'composer_fragment_failures_total{{fragment="header",route="home",version="1.0",reason="status"}}'
                values: '0+10x20'
              - series: 'composer_fragment_info{{fragment="footer",version="2.4.0",owner="platform-team"}}'
                values: '1x20'
              - series: 'composer_fragment_info{{fragment="header",version="1.0",owner="header-team"}}'
                values: '1x20'
            promql_expr_test:
              - expr: composer:fragment_failures:rate5m / composer:fragment_attempts:rate5m
                eval_time: 15m
                exp_samples:
                  - labels: '{{fragment="footer",version="2.4.0"}}'
                    value: 1
                  - labels: '{{fragment="header",version="1.0"}}'
                    value: 0.1
            alert_rule_test:
              - eval_time: 15m
                alertname: ComposerFragmentFailureRatioHigh
                exp_alerts:
                  - exp_labels: {{severity: page, fragment: footer, version: "2.4.0", owner: platform-team}}
                    exp_annotations:
                      summary: "Fragment footer 2.4.0 fails 100% of requests"
                      description: >-
                        More than 2 % of requests to fragment footer version 2.4.0
                        (owner platform-team) failed for 5 minutes; pages show its fallback. Check
                        composer's "fragment failed" log lines (error_type, status) and GET /manifest; if the
                        version is new, roll it back in the manifest.
                  - exp_labels: {{severity: page, fragment: header, version: "1.0", owner: header-team}}
                    exp_annotations:
                      summary: "Fragment header 1.0 fails 10% of requests"
                      description: >-
                        More than 2 % of requests to fragment header version 1.0
                        (owner header-team) failed for 5 minutes; pages show its fallback. Check
                        composer's "fragment failed" log lines (error_type, status) and GET /manifest; if the
                        version is new, roll it back in the manifest.
        """), encoding="utf-8")
    promtool_test(case)


def test_fallbacks_alert_takes_a_new_version_for_a_version_change_but_not_a_new_pod(tmp_path):
    """Fallbacks of footer go from 1/min to 60/min at minute 40. When what appears then is a
    second pod serving the same 2.0 (a rollout, a restart, a scale-up), nothing fires; when it
    is version 2.1, the alert pages. So does a version that was dropped (0, as with --workers)
    and comes back at 1."""
    case = tmp_path / "test.yaml"
    case.write_text(textwrap.dedent(f"""\
        rule_files: [{RULES}]
        evaluation_interval: 1m
        tests:
          # pod b appears at minute 40 serving the same 2.0: no version change
          - interval: 1m
            input_series:
              - series: 'composer_fragment_fallbacks_total{{fragment="footer",route="home",instance="a"}}'
                values: '0+1x40 100+60x20'
              - series: 'composer_fragment_info{{fragment="footer",version="2.0",owner="platform-team",instance="a"}}'
                values: '1x60'
              - series: 'composer_fragment_info{{fragment="footer",version="2.0",owner="platform-team",instance="b"}}'
                values: '_x40 1x20'
            alert_rule_test:
              - eval_time: 55m
                alertname: ComposerFragmentFallbacksRisingAfterVersionChange
                exp_alerts: []
          # 2.1 replaces 2.0 at minute 40: a version change
          - interval: 1m
            input_series:
              - series: 'composer_fragment_fallbacks_total{{fragment="footer",route="home",instance="a"}}'
                values: '0+1x40 100+60x20'
              - series: 'composer_fragment_info{{fragment="footer",version="2.0",owner="platform-team",instance="a"}}'
                values: '1x40'
              - series: 'composer_fragment_info{{fragment="footer",version="2.1",owner="platform-team",instance="a"}}'
                values: '_x40 1x20'
            alert_rule_test:
              - eval_time: 55m
                alertname: ComposerFragmentFallbacksRisingAfterVersionChange
                exp_alerts:
                  - exp_labels: {{severity: page, fragment: footer}}
                    exp_annotations: &footer
                      summary: "Fragment footer: fallbacks rising since a new version went out"
                      description: >-
                        Fallbacks of footer more than doubled after a version change in the last
                        30 minutes. Compare versions with
                        sum by (version) (rate(composer_fragment_failures_total{{fragment="footer"}}[5m]))
                        and roll the new version back in the manifest.
          # --workers: 2.1, declared once and dropped (0), comes back as the canary at minute 40
          - interval: 1m
            input_series:
              - series: 'composer_fragment_fallbacks_total{{fragment="footer",route="home",instance="a"}}'
                values: '0+1x40 100+60x20'
              - series: 'composer_fragment_info{{fragment="footer",version="2.0",owner="platform-team",instance="a"}}'
                values: '1x60'
              - series: 'composer_fragment_info{{fragment="footer",version="2.1",owner="platform-team",instance="a"}}'
                values: '0x40 1x20'
            alert_rule_test:
              - eval_time: 55m
                alertname: ComposerFragmentFallbacksRisingAfterVersionChange
                exp_alerts:
                  - exp_labels: {{severity: page, fragment: footer}}
                    exp_annotations: *footer
        """), encoding="utf-8")
    promtool_test(case)


def latency_annotations(fragment: str, version: str, owner: str, route: str, p99: str) -> dict[str, str]:
    return {"summary": f"Fragment {fragment} {version} on {route}: p99 {p99}",
            "description": f"p99 latency of {fragment} version {version} (owner {owner}) on route {route} has "
                           "been over 80 % of its timeout for 10 minutes; pages are starting to show its fallback."}


def test_latency_budget_is_each_fragments_own_timeout(tmp_path):
    """The budget is 80 % of composer_fragment_timeout_seconds per fragment and route: header
    (800 ms timeout) at p99 ≈ 0.99 s fires; footer (3 s) at p99 ≈ 1.99 s stays quiet, but the
    same footer on a route where its timeout is 2 s fires."""
    series = []
    for fragment, route, version, low, high in (("header", "home", "1.0", "0.75", "1.0"),
                                                ("footer", "home", "2.4.0", "1.0", "2.0"),
                                                ("footer", "checkout", "2.4.0", "1.0", "2.0")):
        for le, values in ((low, "0x20"), (high, "0+100x20"), ("+Inf", "0+100x20")):
            series.append({"series": f'composer_fragment_request_duration_seconds_bucket{{fragment="{fragment}",'
                                     f'route="{route}",version="{version}",le="{le}"}}', "values": values})
    for fragment, route, timeout in (("header", "home", "0.8"), ("footer", "home", "3"), ("footer", "checkout", "2")):
        series.append({"series": f'composer_fragment_timeout_seconds{{fragment="{fragment}",route="{route}"}}',
                       "values": f"{timeout}x20"})
    for fragment, version, owner in (("footer", "2.4.0", "platform-team"), ("header", "1.0", "header-team")):
        series.append({"series": f'composer_fragment_info{{fragment="{fragment}",version="{version}",owner="{owner}"}}',
                       "values": "1x20"})
    case = tmp_path / "test.yaml"
    case.write_text(yaml.safe_dump({
        "rule_files": [str(RULES)], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": [{
            "eval_time": "15m", "alertname": "ComposerFragmentLatencyOverBudget", "exp_alerts": [
                {"exp_labels": {"severity": "ticket", "fragment": "header", "route": "home", "version": "1.0",
                                "owner": "header-team"},
                 "exp_annotations": latency_annotations("header", "1.0", "header-team", "home", "997.5ms")},
                {"exp_labels": {"severity": "ticket", "fragment": "footer", "route": "checkout",
                                "version": "2.4.0", "owner": "platform-team"},
                 "exp_annotations": latency_annotations("footer", "2.4.0", "platform-team", "checkout", "1.99s")},
            ]}]}]}), encoding="utf-8")
    promtool_test(case)


def test_dashboard_shows_pages_reloads_circuits_and_cache_and_its_queries_parse(tmp_path):
    """Above the per-fragment rows (so not repeated): requests by route and status, page
    latency, config reloads, circuit state and cache hit ratio per fragment; in each row the
    fragment's cache results by result. Every query is valid PromQL (promtool parses it)."""
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    row_y = next(p["gridPos"]["y"] for p in dash["panels"] if p.get("repeat") == "fragment")
    overview = [t["expr"] for p in dash["panels"] if p["type"] != "row" and p["gridPos"]["y"] < row_y
                for t in p["targets"]]
    in_row = [t["expr"] for p in dash["panels"] if p["type"] != "row" and p["gridPos"]["y"] > row_y
              for t in p["targets"]]

    def has(exprs: list[str], *parts: str) -> bool:
        return any(all(part in e for part in parts) for e in exprs)

    assert has(overview, "sum by (route, status)", "composer_requests_total")
    assert has(overview, "histogram_quantile(0.99", "by (route, le)", "composer_request_duration_seconds_bucket")
    assert has(overview, "by (result)", "composer_config_reloads_total")
    assert has(overview, "composer_fragment_circuit_state", 'fragment=~"$fragment"')
    assert has(overview, "composer_fragment_cache_total", 'result=~"hit|stale|coalesced"', " / ")
    assert has(in_row, "sum by (result)", 'composer_fragment_cache_total{fragment="$fragment"}')

    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", ())]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": e.replace("$fragment", "footer")} for i, e in enumerate(exprs)]}]}
    file = tmp_path / "dashboard-queries.yaml"
    file.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = subprocess.run([promtool(), "check", "rules", str(file)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- replayed from composer's /metrics

FOOTER_FALLBACKS = {
    "summary": "Fragment footer: fallbacks rising since a new version went out",
    "description": "Fallbacks of footer more than doubled after a version change in the last 30 minutes. Compare "
                   "versions with sum by (version) (rate(composer_fragment_failures_total{fragment=\"footer\"}[5m])) "
                   "and roll the new version back in the manifest."}


async def replay(fragments: Any, tmp_path: Path) -> list[dict[str, str]]:
    """promtool input series made of a real composer's scrapes, one a minute: 40 quiet
    minutes on footer 2.0 (two pages a minute, never a fallback), then canary 2.1 at 100 %,
    which answers 500: six pages a minute for 20 minutes, each showing the inline fallback.
    A series is in a minute when that scrape has it ("_" before it appears)."""
    svc = await fragments({"/footer/2.0": html("<p>footer 2.0</p>"), "/footer/2.1": html("down", status=500)})
    footer = {"owner": "platform-team", "active": "2.0",
              "versions": {v: svc.url(f"/footer/{v}") for v in ("2.0", "2.1")}}
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({"fragments": {"footer": footer}}), encoding="utf-8")
    path = write_config(tmp_path, {"page.html": '<body><fragment name="footer"><p>no footer</p></fragment></body>'},
                        settings="settings:\n  reload_interval_ms: 50\n  manifest: manifest.yaml\n")
    server = ComposerServer(load(path), host="127.0.0.1", port=0, admin_port=0)
    await server.start()
    scrapes: list[dict[str, float]] = []
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            async def minute(pages: int) -> dict[str, float]:
                for _ in range(pages):
                    async with session.get(server.url + "/page", headers={"Cookie": "composer_bucket=7"}) as resp:
                        assert resp.status == 200
                        await resp.read()
                async with session.get(server.admin_url + "/metrics") as resp:
                    scrape = {_series(s.name, s.labels): s.value
                              for family in text_string_to_metric_families(await resp.text())
                              for s in family.samples if not s.name.endswith("_created")}
                scrapes.append(scrape)
                return scrape

            for _ in range(40):
                await minute(2)
            before = (await minute(0))['composer_config_reloads_total{result="ok"}']
            replace_file(manifest, yaml.safe_dump({"fragments": {
                "footer": {**footer, "canary": {"version": "2.1", "percent": 100}}}}))
            async def reloaded() -> bool:
                return (await minute(0))['composer_config_reloads_total{result="ok"}'] > before
            await eventually(reloaded, "the manifest with the canary")
            del scrapes[40:]  # the minutes spent waiting for the reload were not minutes
            for _ in range(20):
                await minute(6)
    finally:
        await server.stop()
    names = dict.fromkeys(name for scrape in scrapes for name in scrape)
    return [{"series": name, "values": " ".join(_value(s.get(name)) for s in scrapes)} for name in names]


def _series(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items())) + "}"


def _value(value: float | None) -> str:
    return "_" if value is None else repr(value)


async def test_fallbacks_alert_fires_for_a_fragment_with_no_fallback_history(fragments, tmp_path):
    """footer never showed a fallback before 2.1 went out. Its fallback counter must still be
    on /metrics (at 0) 30 minutes before: a counter born at the first fallback has no rate
    `offset 30m`, and "twice what it was, plus a floor" can never hold (SPEC §9)."""
    series = await replay(fragments, tmp_path)
    fallbacks = [s for s in series if s["series"].startswith("composer_fragment_fallbacks_total")]
    assert len(fallbacks) == 1 and fallbacks[0]["values"].startswith("0.0 0.0"), fallbacks
    case = tmp_path / "test.yaml"
    case.write_text(yaml.safe_dump({
        "rule_files": [str(RULES)], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": [
            {"eval_time": "39m", "alertname": "ComposerFragmentFallbacksRisingAfterVersionChange", "exp_alerts": []},
            {"eval_time": "55m", "alertname": "ComposerFragmentFallbacksRisingAfterVersionChange", "exp_alerts": [
                {"exp_labels": {"severity": "page", "fragment": "footer"}, "exp_annotations": FOOTER_FALLBACKS}]},
        ]}]}), encoding="utf-8")
    promtool_test(case)


async def test_dashboard_cache_hit_ratio_reads_zero_when_nothing_was_a_hit(fragments, tmp_path):
    """The replayed footer: every lookup a miss (it has no cache), never a hit. The overview's
    cache-hit panel must draw 0 for it, not leave it out: with the hit series at 0 as
    exported, and without them (a fragment not known at load, such as a nested one)."""
    series = await replay(fragments, tmp_path)
    no_hits = [s for s in series if not re.match(r'composer_fragment_cache_total\{.*result="(hit|stale|coalesced)"',
                                                 s["series"])]
    assert len(no_hits) < len(series)
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    [query] = [t["expr"] for p in dash["panels"] if p["type"] != "row" for t in p.get("targets", ())
               if 'result=~"hit|stale|coalesced"' in t["expr"]]
    expect = {"expr": query.replace("$fragment", ".*"), "eval_time": "55m",
              "exp_samples": [{"labels": '{fragment="footer"}', "value": 0}]}
    case = tmp_path / "test.yaml"
    case.write_text(yaml.safe_dump({
        "rule_files": [str(RULES)], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": inputs, "promql_expr_test": [expect]}
                  for inputs in (series, no_hits)]}), encoding="utf-8")
    promtool_test(case)
