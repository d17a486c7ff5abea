"""What client signals (SPEC §7) cost: CPU per page20 page with them off and on, the collector's
gzipped size, and the CPU of one beacon at POST /_composer/signals.

    python bench/signals.py [--duration 10] [--rounds 3] [--conns 16]

Same machinery as bench/run.py (its processes, pinning, wrk and /proc readings): the
fragment server (Node) on CPU 1, composer on CPU 0, wrk on CPU 1; rounds alternate off and
on, and the median round of each is reported. Beacons are sent by wrk with a Lua body. Every
process started is stopped at the end.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run as bench  # bench/run.py

from composer.collector import bundle

BEACON = {"route": "page20", "id": "0123456789abcdef0123456789abcdef",
          "e": [["f1", "", "error", "TypeError: x is undefined", "http://127.0.0.1:9800/f/1.js"]],
          "v": [["LCP", 1234.5, "f1"], ["CLS", 0.02, "page"], ["FCP", 800.0, "page"], ["TTFB", 120.0, "page"]]}


def routes_with(routes: Path, signals: bool, folder: Path) -> Path:
    """bench/.work/routes.yaml, with client signals on or off (a beacon rate no load reaches)."""
    text = routes.read_text().replace("templates: templates", f"templates: {routes.parent / 'templates'}")
    if signals:
        text = text.replace("settings:\n", "settings:\n  client_signals: true\n  client_signals_rate: 10000\n", 1)
    out = folder / ("signals-on.yaml" if signals else "signals-off.yaml")
    out.write_text(text)
    return out


def page_rounds(procs: bench.Processes, frag: bench.Proc, files: dict[str, Path], args: argparse.Namespace
                ) -> dict[str, list[float]]:
    """CPU ms per page20 page, per round, with signals off and on (alternating who goes first)."""
    per_page: dict[str, list[float]] = {"off": [], "on": []}
    systems = {name: bench.start_composer(procs, file, workers=1, cpus=str(bench.PROXY_CPU), name=f"composer {name}")
               for name, file in files.items()}
    for system in systems.values():
        bench.run_wrk(procs, f"{system.base}/page20", args.conns, 2)  # warm-up
    for rnd in range(args.rounds):
        for name in (("off", "on") if rnd % 2 == 0 else ("on", "off")):
            run = bench.measure(procs, systems[name], frag, "page20", args.conns, rnd, args.duration)
            per_page[name].append(run.cpu_s / max(1, run.wrk.requests) * 1000)
            print(f"  page20 c{args.conns} r{rnd + 1} signals {name:3}  {run.wrk.rps:7,.0f} req/s  "
                  f"{per_page[name][-1]:.3f} ms CPU/page", flush=True)
    return per_page


def beacon_cost(procs: bench.Processes, system: bench.System, args: argparse.Namespace, folder: Path) -> float:
    """CPU µs of composer per accepted beacon (wrk POSTing the same body)."""
    script = folder / "beacon.lua"
    script.write_text('wrk.method = "POST"\nwrk.body = [==[' + json.dumps(BEACON) + ']==]\n'
                      'wrk.headers["Content-Type"] = "text/plain;charset=UTF-8"\n')
    url = f"{system.base}/_composer/signals"
    pids = bench.tree(system.proc.pid)
    cpu0 = bench.cpu_seconds(pids)
    argv = bench.pinned(str(bench.LOAD_CPU), ["wrk", "-t1", "-c16", f"-d{args.duration:g}s", "--latency", "-s", str(script),
                                                   url])
    proc = procs.start("wrk beacons", argv, stdout=subprocess.PIPE)
    out, _ = proc.popen.communicate(timeout=args.duration + 60)
    procs.stop(proc)
    result = bench.parse_wrk(out.decode())
    return (bench.cpu_seconds(pids) - cpu0) / max(1, result.requests) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--conns", type=int, default=16)
    args = parser.parse_args()
    collector = bundle()
    own = (Path(__file__).resolve().parent.parent / "composer" / "static" / "signals.js").read_bytes()
    print(f"collector: {len(collector.body):,} B, {len(collector.gzipped):,} B gzipped (web-vitals attribution "
          f"build + signals.js; signals.js alone {len(gzip.compress(own, 9)):,} B gzipped)", flush=True)
    procs = bench.Processes()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            port = bench.free_port()
            frag = procs.start("fragment server", bench.pinned(str(bench.LOAD_CPU), bench.fragment_server_argv(
                "python", port)), log=folder / "fragments.log")
            bench.wait_ready(frag, f"http://127.0.0.1:{port}/f/x?size=16")
            routes = bench.prepare_work(port)
            files = {name: routes_with(routes, name == "on", folder) for name in ("off", "on")}
            per_page = page_rounds(procs, frag, files, args)
            off, on = statistics.median(per_page["off"]), statistics.median(per_page["on"])
            print(f"page20 c{args.conns}: {off:.3f} ms CPU/page off, {on:.3f} on: {(on / off - 1) * 100:+.1f} %")
            system = bench.start_composer(procs, files["on"], workers=1, cpus=str(bench.PROXY_CPU), name="beacons")
            time.sleep(0.2)
            print(f"beacon: {beacon_cost(procs, system, args, folder):.1f} µs CPU per beacon "
                  f"({len(json.dumps(BEACON))} B, 1 error + 4 vitals)")
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
