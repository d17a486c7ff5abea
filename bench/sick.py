"""A fragment that never answers, or is refused, under many clients: what it costs every page.

    python bench/sick.py [A_DIR] [--conns 1500] [--duration 12] [--python PYTHON]

page20 with one fragment (f19) whose service holds every request for 60 s, served to
`--conns` clients at once (wrk: each client asks again as soon as its page ends). Every page
waits out f19's 3 s timeout until its breaker opens (the default policy: ten failures in a
row); with the breaker off, every page pays it, and thousands of f19's fetches are in flight
or queued for its origin's pool at once, beside the healthy fragments' on the same origin.
A fragment whose service refuses connections (breaker off) costs a connect attempt per
page. The healthy page20 at the same load is the baseline. Each row is a fresh composer
(CPU 0), the fragment server and wrk on CPU 1; with A_DIR, a checkout of composer (its own
`scripts/compile`) is measured beside this one, row by row.

Reports pages/s, CPU µs per page, p50 and p99, the healthy fragments' failures (any is a
bug: a sick fragment must cost only itself) and f19's failures by reason. At this many
clients wrk's own start shows in p99 (its 1,500 connections made at once: a healthy run's
access lines peak at 1.4 s where wrk's p99 reads 3-8 s, and 30 s runs read 1.4 s). Every
process it starts is stopped.
"""

from __future__ import annotations

import argparse
import re
import resource
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ab
import run

SICK = "f19"
NO_BREAKER = "  circuit_breaker: {failures: 0, failure_percent: 0}\n"
CASES = {  # name → (page, settings)
    "healthy": ("page20", ""),
    "hanging, breaker": ("page20hang", ""),
    "hanging, no breaker": ("page20hang", NO_BREAKER),
    "refused, no breaker": ("page20refused", NO_BREAKER),
}


def write_routes(routes: Path, name: str, settings: str) -> Path:
    """routes.yaml (from run.prepare_work) plus the sick pages, with `settings` added: f19
    hanging (60 s), or on a port nothing listens on (each fetch refused)."""
    templates = routes.parent / "templates"
    page20 = (templates / "page20.html").read_text()
    hang = page20.replace(f"/f/{SICK}?delay=10", f"/f/{SICK}?delay=60000")
    assert hang != page20, "page20.html no longer has the fragment this bench makes sick"
    (templates / "page20hang.html").write_text(hang)
    refused = re.sub(rf'src="http://127\.0\.0\.1:\d+/f/{SICK}\?', f'src="http://127.0.0.1:{run.free_port()}/f/{SICK}?',
                     page20)
    assert refused != page20
    (templates / "page20refused.html").write_text(refused)
    text = routes.read_text().replace("settings:\n", "settings:\n" + settings, 1)
    for page in ("page20hang", "page20refused"):
        text += f"  - {{name: {page}, match: {{path: /{page}}}, template: {page}.html}}\n"
    out = routes.parent / f"sick_{name.replace(' ', '_').replace(',', '')}.yaml"
    out.write_text(text)
    return out


def failures(admin: int) -> tuple[int, dict[str, int]]:
    """(the healthy fragments' failures, the sick one's by reason) from composer's /metrics."""
    healthy = 0
    sick: dict[str, int] = {}
    text = run.http_get(f"http://127.0.0.1:{admin}/metrics")[1].decode()
    for family in text_string_to_metric_families(text):
        if family.name != "composer_fragment_failures":
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total") or not sample.value:
                continue
            if sample.labels["fragment"] == SICK:
                sick[sample.labels["reason"]] = sick.get(sample.labels["reason"], 0) + int(sample.value)
            else:
                healthy += int(sample.value)
    return healthy, sick


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, nargs="?", help="another checkout, measured beside this one")
    parser.add_argument("--conns", type=int, default=1500)
    parser.add_argument("--duration", type=float, default=12.0)
    parser.add_argument("--python", default=sys.executable, help="the interpreter (a venv's python)")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # wrk's clients
    checkouts = {"A": args.a, "B": run.ROOT} if args.a else {"this": run.ROOT}
    procs = run.Processes()
    try:
        routes = ab.fragments(procs, "sick")
        print(f"page20, {SICK} hanging (60 s, its timeout 3 s) or refused, wrk -c{args.conns} -d{args.duration:g}s; "
              f"composer on CPU {run.PROXY_CPU}", flush=True)
        print("| case | composer | pages/s | CPU µs/page | p50 ms | p99 ms | healthy failed | "
              f"{SICK} failed |\n|---|---|---:|---:|---:|---:|---:|---|", flush=True)
        for case, (page, settings) in CASES.items():
            case_routes = write_routes(routes, case, settings)
            for label, checkout in checkouts.items():
                proc, port, admin = ab.serve(procs, checkout, case_routes, f"sick_{label}", args.python)
                try:
                    run.run_wrk(procs, f"http://127.0.0.1:{port}/page20", 16, 2)  # warm-up, healthy
                    cpu = run.cpu_seconds([proc.pid])
                    result = run.run_wrk(procs, f"http://127.0.0.1:{port}/{page}", args.conns, args.duration)
                    cpu = run.cpu_seconds([proc.pid]) - cpu
                    run.check_alive(proc)
                    healthy, sick = failures(admin)
                finally:
                    procs.stop(proc)
                why = ", ".join(f"{reason} {n}" for reason, n in sorted(sick.items())) or "none"
                bad = f" ({result.non2xx} non-2xx, {result.socket_errors} socket errors)" \
                    if result.non2xx or result.socket_errors else ""
                print(f"| {case} | {label} | {result.rps:.0f} | {cpu / result.requests * 1e6:.0f} | "
                      f"{result.p50:.0f} | {result.p99:.0f} | {healthy}{bad} | {why} |", flush=True)
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
