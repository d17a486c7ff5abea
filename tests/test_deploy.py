"""deploy/: the Prometheus rules load in promtool and fire as documented; the dashboard
queries only metrics composer exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import yaml

from composer.metrics import Metrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
RULES = DEPLOY / "prometheus-rules.yaml"


def promtool() -> str:
    tool = shutil.which("promtool")
    assert tool, "promtool is needed (Debian's prometheus package; .ci/run installs it)"
    return tool


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
    result = subprocess.run([promtool(), "test", "rules", str(case)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


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
    result = subprocess.run([promtool(), "test", "rules", str(case)], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
