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
CLIENT_FRAGMENT_ALERTS = ("ComposerFragmentClientErrorRatioHigh",
                          "ComposerFragmentClientErrorsRisingAfterVersionChange",
                          "ComposerFragmentVitalsRegressedAfterVersionChange")
CLIENT_ROUTE_ALERTS = ("ComposerRouteLCPOverBudget", "ComposerRouteINPOverBudget", "ComposerRouteCLSOverBudget")


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
            "ComposerFragmentLatencyOverBudget", *CLIENT_FRAGMENT_ALERTS, *CLIENT_ROUTE_ALERTS} <= names
    for rule in rules:
        text = rule["annotations"]["summary"] + rule["annotations"]["description"]
        if "Fragment" in rule["alert"]:
            assert "$labels.fragment" in text
        if rule["alert"] in ("ComposerFragmentFailureRatioHigh", "ComposerFragmentLatencyOverBudget",
                             *CLIENT_FRAGMENT_ALERTS):
            assert "$labels.owner" in text and "$labels.version" in text
        if rule["alert"] in CLIENT_ROUTE_ALERTS:
            assert "$labels.route" in text


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
    assert [(r["title"], r.get("repeat")) for r in rows] == [("Client signals", None), ("$fragment", "fragment")]
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


def test_failure_ratio_counts_refused_nested_fragments_as_attempts(tmp_path):
    """A nested fragment refused before any request (too deep, a cycle, outside
    allowed_origins, over the page's fragment limit: SPEC §6) counts a failure and no
    duration. Its ratio is 100 %, not absent (no attempts) nor infinite."""
    case = tmp_path / "test.yaml"
    case.write_text(textwrap.dedent(f"""\
        rule_files: [{RULES}]
        evaluation_interval: 1m
        tests:
          - interval: 1m
            input_series:
              - series: 'composer_fragment_failures_total{{fragment="hdr/1",route="home",version="",reason="nesting"}}'
                values: '0+10x20'
              - series: 'composer_fragment_failures_total{{fragment="hdr/2",route="home",version="",reason="origin"}}'
                values: '0+5x20'
              - series: 'composer_fragment_request_duration_seconds_count{{fragment="hdr/3",route="home",version=""}}'
                values: '0+10x20'
              - series: 'composer_fragment_failures_total{{fragment="hdr/3",route="home",version="",reason="limit"}}'
                values: '0+10x20'
            promql_expr_test:
              - expr: composer:fragment_failures:rate5m / composer:fragment_attempts:rate5m
                eval_time: 15m
                exp_samples:
                  - labels: '{{fragment="hdr/1"}}'
                    value: 1
                  - labels: '{{fragment="hdr/2"}}'
                    value: 1
                  - labels: '{{fragment="hdr/3"}}'
                    value: 0.5
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


# ---------------------------------------------------------------- client signals (SPEC §7)

def promtool_cases(tmp_path: Path, tests: list[dict[str, Any]], rule_files: tuple[Path, ...] = (RULES,)) -> None:
    """`promtool test rules` on `tests` (promtool's test groups, 1-minute samples) against `rule_files`."""
    case = tmp_path / "test.yaml"
    case.write_text(yaml.safe_dump({"rule_files": [str(f) for f in rule_files], "evaluation_interval": "1m",
                                    "tests": [{"interval": "1m", **test} for test in tests]}), encoding="utf-8")
    promtool_test(case)


def series(metric: str, values: str, /, **labels: str) -> dict[str, str]:
    """One promtool input series (`values` in promtool's notation, one a minute)."""
    return {"series": _series(metric, labels), "values": values}


def views(route: str, values: str) -> dict[str, str]:
    """Page views of `route`: GET answered 200."""
    return series("composer_requests_total", values, route=route, method="GET", status="200")


def client_errors(route: str, fragment: str, version: str, **by_kind: str) -> list[dict[str, str]]:
    """A fragment version's client error counters on `route`, one per kind: at 0 all along
    (as composer exports them from load) unless `by_kind` says otherwise."""
    return [series("composer_client_errors_total", by_kind.get(kind, by_kind.get("default", "0x70")), route=route,
                   fragment=fragment, version=version, kind=kind) for kind in ("error", "rejection", "asset")]


def info(fragment: str, version: str, owner: str, values: str = "1x70") -> dict[str, str]:
    return series("composer_fragment_info", values, fragment=fragment, version=version, owner=owner)


def vital(name: str, route: str, fragment: str, buckets: dict[str, str]) -> list[dict[str, str]]:
    """A client vital histogram's series: `buckets` maps `le` to values; +Inf is `_count` too."""
    metric, labels = (("composer_client_cls", {"route": route, "fragment": fragment}) if name == "CLS" else
                      ("composer_client_vital_seconds", {"route": route, "name": name, "fragment": fragment}))
    return [series(metric + "_bucket", values, le=le, **labels) for le, values in buckets.items()] + \
        [series(metric + "_count", buckets["+Inf"], **labels)]


def test_client_error_ratio_alert_names_version_and_owner_and_ignores_head_beacons_and_little_traffic(tmp_path):
    """footer is on home and checkout (one page view a second each; HEAD requests and beacon
    POSTs are no page views). Its 2.4.0 throws 6 errors a minute on home and fails 3 assets a
    minute on checkout: 0.15 errors/s over 2 views/s = 7.5 % > 5 %, which pages platform-team
    once it has lasted 5 minutes. 2.3.0 (0.8 %) does not; nor do errors no fragment is blamed
    for (fragment="page": no owner), nor widget at 40 % on a route with 5 views a minute (50 in
    10 minutes, under the 100 needed)."""
    inputs = [
        views("home", "0+60x30"), views("checkout", "0+60x30"), views("about", "0+5x30"),
        series("composer_requests_total", "0+600x30", route="home", method="HEAD", status="200"),
        series("composer_requests_total", "0+100x30", route="_composer", method="POST", status="204"),
        *client_errors("home", "footer", "2.4.0", error="0+6x30"),
        *client_errors("checkout", "footer", "2.4.0", asset="0+3x30"),
        *client_errors("home", "footer", "2.3.0", error="0+1x30"),
        *client_errors("checkout", "footer", "2.3.0"),
        *client_errors("home", "page", "", error="0+30x30"), *client_errors("checkout", "page", ""),
        *client_errors("about", "widget", "1.0", error="0+2x30"), *client_errors("about", "page", ""),
        info("footer", "2.4.0", "platform-team"), info("footer", "2.3.0", "platform-team"),
        info("widget", "1.0", "widget-team"),
    ]
    alert = "ComposerFragmentClientErrorRatioHigh"
    promtool_cases(tmp_path, [{"input_series": inputs, "alert_rule_test": [
        {"eval_time": "4m", "alertname": alert, "exp_alerts": []},  # pending: not 5 minutes yet
        {"eval_time": "20m", "alertname": alert, "exp_alerts": [{
            "exp_labels": {"severity": "page", "fragment": "footer", "version": "2.4.0", "owner": "platform-team"},
            "exp_annotations": {
                "summary": "Fragment footer 2.4.0: client errors on 7.5% of page views",
                "description": "Fragment footer version 2.4.0 (owner platform-team) has thrown, rejected or failed "
                               "to load assets in the browser at more than 5 errors per 100 page views for 5 "
                               "minutes. By kind: sum by (kind, route) (rate(composer_client_errors_total"
                               '{fragment="footer", version="2.4.0"}[10m])); composer\'s "client error" log lines '
                               "(logger composer.signals) carry message, source and request_id. If the version is "
                               "new, roll it back in the manifest."}}]},
    ]}])


RISING_AFTER_CHANGE = {
    "summary": "Fragment footer 2.1: client errors up to 2.5% of page views since it went out",
    "description": "Client errors of fragment footer rose from 0.5% to 2.5% of page views after version 2.1 (owner "
                   "platform-team) went out in the last 30 minutes, and at least half of the rise is its own. Compare "
                   'versions with sum by (version, kind) (rate(composer_client_errors_total{fragment="footer"}[10m])) '
                   "and roll the new version back in the manifest."}


def test_client_errors_rising_alert_names_the_new_version_when_the_rise_is_its_own(tmp_path):
    """footer 2.0 has run at 0.5 % client errors per page view (one view a second on home).
    At minute 40 canary 2.1 goes out and throws 1.2 errors a minute (2 % of all page views:
    under the ratio alert's 5 %): footer as a whole goes to 2.5 % > 2 × 0.5 % and > 0.5 % + 1
    point, and 2.1's own errors are all of the rise; the alert names 2.1 and its owner, not
    2.0. Not when the errors rise without a new version, nor when the new version is clean and
    the old one's errors rise, nor when they triple from 0.2 % (not 1 point more), nor with 5
    page views a minute."""
    before_after = "0+0.3x40 13.5+1.5x19"  # 2.0: 0.5 %, then 2.5 % from minute 40
    canary = info("footer", "2.1", "platform-team", "_x40 1x20")

    def case(v20: str, v21: str | None, page_views: str = "0+60x60", new: bool = True,
             expect: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        inputs = [views("home", page_views), *client_errors("home", "footer", "2.0", error=v20),
                  *client_errors("home", "page", ""), info("footer", "2.0", "platform-team", "1x60")]
        if v21 is not None:
            inputs += client_errors("home", "footer", "2.1", error=v21, default="_x40 0x20")
        if new:
            inputs.append(canary)
        return {"input_series": inputs, "alert_rule_test": [
            {"eval_time": "35m", "alertname": "ComposerFragmentClientErrorsRisingAfterVersionChange", "exp_alerts": []},
            {"eval_time": "55m", "alertname": "ComposerFragmentClientErrorsRisingAfterVersionChange",
             "exp_alerts": expect or []}]}

    fired = [{"exp_labels": {"severity": "page", "fragment": "footer", "version": "2.1", "owner": "platform-team"},
              "exp_annotations": RISING_AFTER_CHANGE}]
    promtool_cases(tmp_path, [
        case("0+0.3x60", "_x40 0+1.2x20", expect=fired),
        case(before_after, None, new=False),  # no version change: a ticket for the ratio, not this
        case(before_after, "_x40 0x20"),  # 2.1 throws nothing: the rise is 2.0's
        case("0+0.12x60", "_x40 0+0.24x20"),  # 0.2 % → 0.6 %: tripled, but not 1 point up
        case("0+0.3x60", "_x40 0+1.2x20", page_views="0+5x60"),  # 50 page views in 10 minutes
    ])
    # The ratio alert stays quiet at 2 %: this is the one that names the canary.
    promtool_cases(tmp_path, [{**case("0+0.3x60", "_x40 0+1.2x20"), "alert_rule_test": [
        {"eval_time": "55m", "alertname": "ComposerFragmentClientErrorRatioHigh", "exp_alerts": []}]}])


def test_vitals_regressed_alert_names_the_version_whose_fragment_became_the_slow_lcp(tmp_path):
    """One page view a second on home; LCPs have been good and outside every fragment. At
    minute 40 footer 2.1 replaces 2.0 and its element becomes the LCP element on half the
    pages, slow (over 2.5 s) on half of those: 25 % of page views now have a poor LCP blamed
    on footer, where there were none (no series at all) before. A ticket for 2.1, naming its
    owner. Not without a version change, nor for a fragment whose share only grows from 20 %
    to 26 % (not 1.5 times)."""
    page_lcp = vital("LCP", "home", "page", {"2.5": "0+60x70", "+Inf": "0+60x70"})
    footer_inp = vital("INP", "home", "footer", {"0.2": "0+10x70", "+Inf": "0+10x70"})
    slow = vital("LCP", "home", "footer", {"2.5": "_x40 0+15x30", "+Inf": "_x40 0+30x30"})
    slower = vital("LCP", "home", "footer", {"2.5": "0+18x40 734.4+14.4x29", "+Inf": "0+30x70"})  # 20 % → 26 %

    def case(lcp: list[dict[str, str]], new: bool, expect: list[dict[str, Any]]) -> dict[str, Any]:
        inputs = [views("home", "0+60x70"), *client_errors("home", "footer", "2.0"), *client_errors("home", "page", ""),
                  *page_lcp, *footer_inp, *lcp,
                  info("footer", "2.0", "platform-team", "1x40" if new else "1x70")]
        if new:
            inputs.append(info("footer", "2.1", "platform-team", "_x40 1x30"))
        return {"input_series": inputs, "alert_rule_test": [
            {"eval_time": "60m", "alertname": "ComposerFragmentVitalsRegressedAfterVersionChange",
             "exp_alerts": expect}]}

    fired = [{"exp_labels": {"severity": "ticket", "fragment": "footer", "version": "2.1", "owner": "platform-team"},
              "exp_annotations": {
                  "summary": "Fragment footer 2.1: Web Vitals blamed on it regressed since it went out",
                  "description": "Since version 2.1 of fragment footer (owner platform-team) went out in the last 30 "
                                 "minutes, more page views have an LCP, INP or CLS worse than Google's \"good\" that "
                                 "is blamed on it. Share of page views now: INP 0%, LCP 25%; 30 minutes earlier: "
                                 "INP 0%. Check the dashboard's Client signals row and roll the new version back in "
                                 "the manifest."}}]
    promtool_cases(tmp_path, [case(slow, True, fired), case(slow, False, []), case(slower, True, [])])


def route_vital_annotations(name: str, route: str, p75: str, limit: str, by_fragment: str) -> dict[str, str]:
    what = {"LCP": ("Largest Contentful Paint", "2.5 s", "holding the LCP element", "slowest"),
            "INP": ("Interaction to Next Paint", "200 ms", "holding the interaction target", "slowest"),
            "CLS": ("Cumulative Layout Shift", "0.1", "of the largest shift", "shifting")}[name]
    return {"summary": f"Route {route}: p75 {name} {p75} (good: {limit})",
            "description": f"p75 {what[0]} of route {route} has been over {what[1]} for 15 minutes. p75 by the "
                           f"fragment {what[2]} (\"page\": none): {by_fragment}. The {what[3]} fragment's owner "
                           "(composer_fragment_info) has the first look."}


def test_route_vitals_alerts_compare_p75_with_googles_limits_given_enough_samples(tmp_path):
    """home, 100 samples a minute: p75 LCP 2.58 s (footer's element: 2.83 s, outside every
    fragment: 1.62 s), p75 INP 237.5 ms, p75 CLS 0.13: each over Google's "good" (2.5 s,
    200 ms, 0.1), a ticket each after 15 minutes. checkout: 80 % within each limit, quiet.
    search: every sample over the limit, but 5 a minute (50 in 10 minutes) are too few."""
    inputs = [
        *vital("LCP", "home", "footer", {"1.8": "0+10x30", "2.5": "0+10x30", "3": "0+40x30", "+Inf": "0+40x30"}),
        *vital("LCP", "home", "page", {"1.8": "0+50x30", "2.5": "0+60x30", "3": "0+60x30", "+Inf": "0+60x30"}),
        *vital("INP", "home", "page", {"0.2": "0+60x30", "0.3": "0+100x30", "+Inf": "0+100x30"}),
        *vital("CLS", "home", "footer", {"0.1": "0+40x30", "0.15": "0+100x30", "+Inf": "0+100x30"}),
        *vital("LCP", "checkout", "page", {"2.5": "0+80x30", "+Inf": "0+100x30"}),
        *vital("INP", "checkout", "page", {"0.2": "0+80x30", "+Inf": "0+100x30"}),
        *vital("CLS", "checkout", "page", {"0.1": "0+80x30", "+Inf": "0+100x30"}),
        *vital("LCP", "search", "page", {"2.5": "0x30", "4": "0+5x30", "+Inf": "0+5x30"}),
        *vital("INP", "search", "page", {"0.2": "0x30", "0.5": "0+5x30", "+Inf": "0+5x30"}),
        *vital("CLS", "search", "page", {"0.1": "0x30", "0.25": "0+5x30", "+Inf": "0+5x30"}),
    ]
    expected = {
        "ComposerRouteLCPOverBudget": route_vital_annotations("LCP", "home", "2.583s", "2.5s",
                                                              "footer 2.833s, page 1.62s"),
        "ComposerRouteINPOverBudget": route_vital_annotations("INP", "home", "237.5ms", "200ms", "page 237.5ms"),
        "ComposerRouteCLSOverBudget": route_vital_annotations("CLS", "home", "0.13", "0.1", "footer 0.13"),
    }
    promtool_cases(tmp_path, [{"input_series": inputs, "alert_rule_test": [
        test for alert, annotations in expected.items() for test in (
            {"eval_time": "10m", "alertname": alert, "exp_alerts": []},  # pending: not 15 minutes yet
            {"eval_time": "25m", "alertname": alert, "exp_alerts": [
                {"exp_labels": {"severity": "ticket", "route": "home"}, "exp_annotations": annotations}]})]}])


def client_signals_panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """The panels of the "Client signals" row: below it, above the next row."""
    panels = dash["panels"]
    start = next(i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == "Client signals")
    end = next(i for i, p in enumerate(panels) if i > start and p["type"] == "row")
    return panels[start + 1:end]


def test_dashboard_client_signals_row_shows_errors_vitals_and_dropped_beacons_and_its_queries_parse(tmp_path):
    """A "Client signals" row (once, not per fragment): errors per page view by fragment and
    version, errors by fragment, version and kind, dropped beacons by reason, p75 LCP, INP and
    CLS by the fragment they are blamed on, and by route. In each fragment's repeated row: its
    client errors by version and kind. Every one of their queries is valid PromQL."""
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    row = client_signals_panels(dash)
    exprs = [t["expr"] for p in row for t in p["targets"]]

    def has(*parts: str) -> bool:
        return any(all(part in e for part in parts) for e in exprs)

    assert has("sum by (fragment, version, kind)", "rate(composer_client_errors_total")
    assert has("sum by (fragment, version)", "composer_client_errors_total", " / ", "composer_requests_total")
    assert has("sum by (reason)", "composer_client_signals_dropped_total")
    for by in ("fragment", "route"):
        assert has("histogram_quantile(0.75", f"sum by ({by}, le)", 'composer_client_vital_seconds_bucket{name="LCP"')
        assert has("histogram_quantile(0.75", f"sum by ({by}, le)", 'composer_client_vital_seconds_bucket{name="INP"')
        assert has("histogram_quantile(0.75", f"sum by ({by}, le)", "composer_client_cls_bucket")
    row_y = next(p["gridPos"]["y"] for p in dash["panels"] if p.get("repeat") == "fragment")
    in_row = [t["expr"] for p in dash["panels"] if p["type"] != "row" and p["gridPos"]["y"] > row_y
              for t in p["targets"]]
    assert 'sum by (version, kind) (rate(composer_client_errors_total{fragment="$fragment"}[5m]))' in in_row

    queries = [e for e in exprs + in_row if "composer_client" in e]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:client{i}", "expr": e.replace("$fragment", "footer")} for i, e in enumerate(queries)]}]}
    file = tmp_path / "client-queries.yaml"
    file.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = subprocess.run([promtool(), "check", "rules", str(file)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_client_signals_panels_read_zero_when_nothing_happened_and_the_values_when_it_did(tmp_path):
    """Client signals on, footer 2.0 on home, pages viewed, but no browser reported anything:
    every panel draws 0 for footer and "page" (and home), not "no data"; also with no page
    view at all (the ratio has no denominator). Then with reports: footer 2.0 throws 3 errors
    a minute over 60 page views (5 %), its element is the LCP element of 30 pages a minute,
    all between 2.5 and 3.5 s: p75 3.25 s (histogram_quantile interpolates in the bucket)."""
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    panels = {p["title"]: [t["expr"].replace("$fragment", ".*") for t in p["targets"]]
              for p in client_signals_panels(dash)}
    [per_fragment] = [t["expr"].replace("$fragment", "footer") for p in dash["panels"]
                      if p["title"] == "Client errors by version and kind" for t in p["targets"]]
    quiet = [*client_errors("home", "footer", "2.0", default="0x10"),
             *client_errors("home", "page", "", default="0x10"),
             *[series("composer_client_signals_dropped_total", "0x10", reason=r)
               for r in ("too_large", "invalid", "rate", "unknown")]]
    fragments, kinds = ('{fragment="footer",version="2.0"}', '{fragment="page"}'), ("error", "rejection", "asset")
    zeros = {
        "Client errors per page view by fragment and version": fragments,
        "Client errors by fragment, version and kind": [f'{f[:-1]},kind="{k}"}}' for f in fragments for k in kinds],
        "Dropped beacons by reason": [f'{{reason="{r}"}}' for r in ("too_large", "invalid", "rate", "unknown")],
        **{title: ('{fragment="footer"}', '{fragment="page"}') for title in panels
           if title.startswith("p75") and not title.endswith("by route")},
        **{title: ('{route="home"}',) for title in panels if title.endswith("by route")},
    }
    assert set(zeros) == set(panels), set(panels) ^ set(zeros)

    def zero(expr: str, labels: tuple[str, ...] | list[str]) -> dict[str, Any]:
        return {"expr": expr, "eval_time": "9m", "exp_samples": [{"labels": x, "value": 0} for x in labels]}

    tests = [zero(e, labels) for title, labels in zeros.items() for e in panels[title]]
    tests.append(zero(per_fragment, [f'{{kind="{k}",version="2.0"}}' for k in kinds]))
    ratio = panels["Client errors per page view by fragment and version"]
    lcp = panels["p75 LCP by fragment holding the element"]
    busy = [views("home", "0+60x10"), *client_errors("home", "footer", "2.0", error="0+3x10"),
            *client_errors("home", "page", ""),
            *vital("LCP", "home", "footer", {"2.5": "0x10", "3.5": "0+30x10", "+Inf": "0+30x10"})]
    promtool_cases(tmp_path, [
        {"input_series": [views("home", "0+60x10"), *quiet], "promql_expr_test": tests},
        {"input_series": quiet, "promql_expr_test": [zero(e, fragments) for e in ratio]},
        {"input_series": busy, "promql_expr_test": [
            {"expr": ratio[0], "eval_time": "9m", "exp_samples": [
                {"labels": fragments[0], "value": 0.05}, {"labels": fragments[1], "value": 0}]},
            {"expr": lcp[0], "eval_time": "9m", "exp_samples": [
                {"labels": '{fragment="footer"}', "value": 3.25}, {"labels": '{fragment="page"}', "value": 0}]}]},
    ], rule_files=())


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


async def test_client_rules_fire_on_what_a_real_composer_exports(fragments, tmp_path):
    """A real composer with client signals on, scraped once a minute for 26 minutes: 12 views
    a minute of /page, each page's beacon with an LCP of 3 s held by footer 2.0's element,
    an INP of 100 ms and a CLS of 0.3 shifted by footer, and one page a minute whose footer
    threw. The rules read composer's own label values (status, method, `le` as composer
    writes them, the client error series at 0 from load): the ratio alert pages footer 2.0's
    owner (1 error in 12 views), LCP and CLS are over Google's limits on route page (INP is
    not), and every page view has a poor LCP and CLS blamed on footer, none a poor INP."""
    svc = await fragments({"/footer/2.0": html("<p>footer 2.0</p>")})
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({"fragments": {"footer": {
        "owner": "platform-team", "active": "2.0", "versions": {"2.0": svc.url("/footer/2.0")}}}}), encoding="utf-8")
    page_html = '<html><head></head><body><fragment name="footer"></fragment></body></html>'
    path = write_config(tmp_path, {"page.html": page_html},
                        settings="settings:\n  manifest: manifest.yaml\n  client_signals: true\n"
                                 "  client_signals_rate: 1000\n")
    server = ComposerServer(load(path), host="127.0.0.1", port=0, admin_port=0)
    await server.start()
    scrapes: list[dict[str, float]] = []
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            for _ in range(27):
                for page in range(12):
                    async with session.get(server.url + "/page") as resp:
                        assert resp.status == 200
                        await resp.read()
                    beacon = {"route": "page", "id": f"r{page}",
                              "v": [["LCP", 3000, "footer"], ["INP", 100, "page"], ["CLS", 0.3, "footer"]],
                              "e": [["footer", "2.0", "error", "boom", "http://x/f.js"]] if page == 0 else []}
                    async with session.post(server.url + "/_composer/signals", data=json.dumps(beacon)) as resp:
                        assert resp.status == 204
                async with session.get(server.admin_url + "/metrics") as resp:
                    scrapes.append({_series(s.name, s.labels): s.value
                                    for family in text_string_to_metric_families(await resp.text())
                                    for s in family.samples if not s.name.endswith("_created")})
    finally:
        await server.stop()
    names = dict.fromkeys(name for scrape in scrapes for name in scrape)
    inputs = [{"series": name, "values": " ".join(_value(s.get(name)) for s in scrapes)} for name in names]
    assert not any(scrape['composer_client_signals_dropped_total{reason="unknown"}'] for scrape in scrapes)
    page = {"description": "p75 {} of route page has been over {} for 15 minutes. p75 by the fragment {} "
                           "(\"page\": none): {}. The {} fragment's owner (composer_fragment_info) has the first look."}
    promtool_cases(tmp_path, [{"input_series": inputs, "alert_rule_test": [
        {"eval_time": "26m", "alertname": "ComposerFragmentClientErrorRatioHigh", "exp_alerts": [{
            "exp_labels": {"severity": "page", "fragment": "footer", "version": "2.0", "owner": "platform-team"},
            "exp_annotations": {
                "summary": "Fragment footer 2.0: client errors on 8.333% of page views",
                "description": "Fragment footer version 2.0 (owner platform-team) has thrown, rejected or failed "
                               "to load assets in the browser at more than 5 errors per 100 page views for 5 "
                               "minutes. By kind: sum by (kind, route) (rate(composer_client_errors_total"
                               '{fragment="footer", version="2.0"}[10m])); composer\'s "client error" log lines '
                               "(logger composer.signals) carry message, source and request_id. If the version is "
                               "new, roll it back in the manifest."}}]},
        {"eval_time": "26m", "alertname": "ComposerRouteLCPOverBudget", "exp_alerts": [{
            "exp_labels": {"severity": "ticket", "route": "page"},
            "exp_annotations": {"summary": "Route page: p75 LCP 2.875s (good: 2.5s)", "description": page[
                "description"].format("Largest Contentful Paint", "2.5 s", "holding the LCP element", "footer 2.875s",
                                      "slowest")}}]},
        {"eval_time": "26m", "alertname": "ComposerRouteCLSOverBudget", "exp_alerts": [{
            "exp_labels": {"severity": "ticket", "route": "page"},
            "exp_annotations": {"summary": "Route page: p75 CLS 0.44 (good: 0.1)", "description": page[
                "description"].format("Cumulative Layout Shift", "0.1", "of the largest shift", "footer 0.44",
                                      "shifting")}}]},
        {"eval_time": "26m", "alertname": "ComposerRouteINPOverBudget", "exp_alerts": []},
    ], "promql_expr_test": [
        {"expr": "composer:client_vitals_not_good:ratio10m", "eval_time": "26m", "exp_samples": [
            {"labels": 'composer:client_vitals_not_good:ratio10m{fragment="footer",name="LCP"}', "value": 1},
            {"labels": 'composer:client_vitals_not_good:ratio10m{fragment="footer",name="CLS"}', "value": 1},
            {"labels": 'composer:client_vitals_not_good:ratio10m{fragment="page",name="INP"}', "value": 0}]},
    ]}])


def test_canary_aborted_alert_names_fragment_version_owner_and_the_rollback_command(tmp_path):
    """composer_canary_aborted (SPEC §8) from two pods, one of which took the abort up: one
    alert with the owner from composer_fragment_info; nothing while every canary runs."""
    case = tmp_path / "test.yaml"
    info = 'composer_fragment_info{{fragment="footer",version="{v}",owner="team-x",instance="{i}"}}'
    aborted = 'composer_canary_aborted{{fragment="footer",version="2.4.0",instance="{i}"}}'
    case.write_text(yaml.safe_dump({
        "rule_files": [str(RULES)], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": [
            {"series": info.format(v="2.3.0", i="a"), "values": "1x10"},
            {"series": info.format(v="2.4.0", i="a"), "values": "1x10"},
            {"series": info.format(v="2.4.0", i="b"), "values": "1x10"},
            {"series": aborted.format(i="a"), "values": "0 0 0 1x7"},
            {"series": aborted.format(i="b"), "values": "0x10"},
        ], "alert_rule_test": [
            {"eval_time": "2m", "alertname": "ComposerCanaryAborted", "exp_alerts": []},
            {"eval_time": "5m", "alertname": "ComposerCanaryAborted", "exp_alerts": [{
                "exp_labels": {"severity": "ticket", "fragment": "footer", "version": "2.4.0", "owner": "team-x"},
                "exp_annotations": {
                    "summary": "Canary footer 2.4.0 aborted by composer",
                    "description": (
                        "composer's canary analysis aborted version 2.4.0 of fragment footer (owner team-x): "
                        "its failure ratio was over twice the active version's and one point above it. Every "
                        "user gets the active version already. See the \"canary aborted\" log line (both "
                        "ratios) and GET /manifest (canary.reason), then take the canary out of the manifest: "
                        "`composer manifest rollback footer --manifest <manifest file>` (or name another canary "
                        "with `composer manifest promote`)."),
                }}]},
        ]}]}), encoding="utf-8")
    promtool_test(case)
