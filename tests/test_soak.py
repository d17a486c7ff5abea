"""A short soak (bench/soak.py): 2,000 pages against fault-injecting fragment services.

The script starts its own fault server and `composer serve`, checks every page, samples
composer's RSS, open fds and the objects its cyclic collector found at 500 pages (baseline)
and at 2,000, and stops everything.
"""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

from composer.errors import error_page

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"


def run_soak(*args: str, timeout: float = 90) -> tuple[int, dict, str]:
    proc = subprocess.Popen([sys.executable, str(SOAK), "--json", *args], cwd=SOAK.parent.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the script stops composer and its fault server
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        raise AssertionError(f"the soak ran over {timeout} s; its output:\n{err}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    try:
        result = json.loads(out)
    except ValueError:
        raise AssertionError(f"no JSON from the soak (exit {proc.returncode}):\n{out}\n{err}") from None
    return proc.returncode, result, err


def test_short_soak_keeps_memory_fds_and_pages_whole_under_faults():
    code, result, log = run_soak("--pages", "2000", "--baseline", "500", "--every", "0", "--concurrency", "50")

    assert result["ok"] and code == 0, f"soak failed:\n{log}"
    assert result["problems"] == []
    statuses = result["statuses"]
    assert set(statuses) <= {"200", "500"} and sum(statuses.values()) == 2000, statuses
    assert [c["pages"] for c in result["checkpoints"]] == [500, 2000]
    assert result["rss_growth_mb"] <= 20 and result["fd_growth"] <= 10
    # No reference cycle per page, whatever the faults (composer's collector runs rarely: tune_gc).
    assert result["garbage_per_page"] <= 1.0
    assert result["composer_exit"] == 0 and result["composer_error_lines"] == 0

    injected = result["faults_injected"]
    for mode in ("ok", "slow", "status500", "hang", "close", "reset", "overlong", "badgzip", "trickle"):
        assert injected.get(mode, 0) > 0, f"the fault server never answered {mode!r}: {injected}"
    failures = {reason for reason, n in result["failures_by_reason"].items() if n > 0}
    assert {"timeout", "status", "invalid"} <= failures, result["failures_by_reason"]
    assert len(failures) >= 4, result["failures_by_reason"]
    assert set(result["failures_by_fragment"]) >= {"header", "product", "recos", "reviews", "ads", "footer"}
    assert sum(result["fallbacks_by_fragment"].values()) > 0
    assert result["requests_by_status"].get("200", 0) == statuses.get("200", 0)


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_soak_page_check_refuses_incomplete_pages():
    soak = load_soak()
    origin = "http://127.0.0.1:1"
    # A page as composer renders it: fragments replaced, async placeholder, content before </body>.
    page = re.sub(r'<fragment id="(\w+)"[^>]*>.*?</fragment>',
                  lambda m: f'<div data-fragment="{m[1]}">x</div>', soak.TEMPLATE.format(f=origin))
    page = page.replace('<div data-fragment="recos">x</div>', '<template id="composer-async-3"></template>')
    page = page.replace("</body>", '<div hidden id="composer-async-3-content">r</div></body>').encode()
    assert soak.page_problem(200, page) is None
    assert soak.page_problem(200, page[:-1]) is not None                      # cut short
    assert soak.page_problem(200, page.replace(b"<main>", b"")) is not None    # a literal chunk lost
    assert soak.page_problem(200, page.replace(b'data-fragment="product"', b"")) is not None  # no primary
    assert soak.page_problem(502, page) is not None
    assert soak.page_problem(500, error_page(500)) is None
    assert soak.page_problem(500, page) is not None


def test_soak_reads_counters_by_label():
    soak = load_soak()
    text = ('# TYPE composer_fragment_failures_total counter\n'
            'composer_fragment_failures_total{fragment="a",reason="timeout",route="r",version=""} 3.0\n'
            'composer_fragment_failures_total{fragment="b",reason="timeout",route="r",version=""} 2.0\n'
            'composer_fragment_failures_total{fragment="b",reason="status",route="r",version=""} 1.0\n'
            'composer_fragment_failures_created{fragment="b",reason="status",route="r",version=""} 1.7e9\n')
    assert soak.parse_metric(text, "composer_fragment_failures_total", "reason") == {"timeout": 5.0, "status": 1.0}
    assert soak.parse_metric(text, "composer_fragment_failures_total", "fragment") == {"a": 3.0, "b": 3.0}


def test_soak_refuses_a_baseline_past_the_end():
    proc = subprocess.run([sys.executable, str(SOAK), "--pages", "100", "--baseline", "500"],
                          check=False, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "baseline" in proc.stdout + proc.stderr
