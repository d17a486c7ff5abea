"""What Python's cyclic garbage collector costs a page, at each threshold, in alternating rounds.

    python bench/gc_cost.py [CHECKOUT] [--cells page20:16,page20:64,page100:16,page100:64]
                       [--thresholds 700,20000] [--rounds 3] [--duration 5] [--python PYTHON]

The collector makes a young pass every `threshold` net allocations of container objects, and
each pass walks what was allocated since and still lives: under load, the fetches in flight.
Nothing a page makes needs it (bench/soak.py holds composer to no reference cycle per page),
so composer sets 20,000 instead of Python's 700 (server.tune_gc). Per cell, each round starts
one composer per threshold (set after composer's own tune_gc), in turn, and reports its CPU
ms per page (utime + stime over `--duration` s of wrk), the CPU time its collector took
(gc.callbacks around each pass), its passes per generation, and the objects they found. The
fragment server and wrk run on CPU 1, composer on CPU 0, as in bench/run.py. Every process it
starts is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ab
import run

# `composer serve` with its collector watched: SIGUSR1 starts counting, SIGUSR2 writes the
# counts to $BENCH_GC_OUT; the threshold ($BENCH_GC_THRESHOLD) is set after tune_gc's.
_SERVE = """
import gc, json, os, signal, sys, time
import composer.cli
counts = {"passes": [0, 0, 0], "seconds": [0.0, 0.0, 0.0], "collected": [0, 0, 0]}
on, began = [False], [0.0]
def watch(phase, info):
    if not on[0]:
        return
    if phase == "start":
        began[0] = time.thread_time()
        return
    g = info["generation"]
    counts["passes"][g] += 1
    counts["seconds"][g] += time.thread_time() - began[0]
    counts["collected"][g] += info["collected"]
gc.callbacks.append(watch)
signal.signal(signal.SIGUSR1, lambda *_: on.__setitem__(0, True))
def dump(*_):
    with open(os.environ["BENCH_GC_OUT"], "w") as f:
        json.dump(counts, f)
signal.signal(signal.SIGUSR2, dump)
tune = composer.cli.tune_gc
def tune_then_set():
    tune()
    gc.set_threshold(int(os.environ["BENCH_GC_THRESHOLD"]), *gc.get_threshold()[1:])
composer.cli.tune_gc = tune_then_set
sys.exit(composer.cli.main(sys.argv[1:]))
"""


def measure(procs: run.Processes, checkout: Path, routes: Path, python: str, page: str, conns: int,
            threshold: int, duration: float, out: Path) -> dict[str, float]:
    port, admin = run.free_port(), run.free_port()
    env = dict(os.environ, PYTHONPATH=str(checkout.resolve()), BENCH_GC_OUT=str(out),
               BENCH_GC_THRESHOLD=str(threshold))
    argv = [python, "-c", _SERVE, "serve", "--config", str(routes), "--host", "127.0.0.1",
            "--port", str(port), "--admin-port", str(admin)]
    popen = subprocess.Popen(run.pinned(str(run.PROXY_CPU), argv), cwd=checkout, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=(run.WORK / f"gc_{threshold}.log").open("wb"),
                             start_new_session=True)
    proc = run.Proc(f"composer gc {threshold}", popen, run.WORK / f"gc_{threshold}.log")
    procs.procs.append(proc)
    try:
        run.wait_ready(proc, f"http://127.0.0.1:{admin}/readyz")
        url = f"http://127.0.0.1:{port}/{page}"
        run.run_wrk(procs, url, conns, 2)  # warm-up
        popen.send_signal(signal.SIGUSR1)
        before = run.cpu_seconds([popen.pid])
        wrk = run.run_wrk(procs, url, conns, duration)
        cpu = run.cpu_seconds([popen.pid]) - before
        popen.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        counts = json.loads(out.read_text())
        out.unlink()
    finally:
        procs.stop(proc)
    pages = max(wrk.requests, 1)
    return {"ms": cpu * 1000 / pages, "gc_ms": sum(counts["seconds"]) * 1000 / pages,
            "passes": sum(counts["passes"]), "collected": sum(counts["collected"]) / pages,
            "bad": wrk.non2xx + wrk.socket_errors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", type=Path, nargs="?", default=run.ROOT)
    parser.add_argument("--cells", default="page20:16,page20:64,page100:16,page100:64", help="page:connections, ...")
    parser.add_argument("--thresholds", default="700,20000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--python", default=sys.executable, help="composer's interpreter (a venv's python)")
    args = parser.parse_args()
    thresholds = [int(t) for t in args.thresholds.split(",")]
    procs = run.Processes()
    rows = [("| page | conns | threshold | CPU ms/page | collector ms/page | passes/s | objects found/page | "
             "÷ first |"), "|---|---:|---:|---:|---:|---:|---:|---:|"]
    try:
        routes = ab.fragments(procs, "gc")
        with tempfile.TemporaryDirectory(prefix="composer-gc-") as tmp:
            for cell in args.cells.split(","):
                page, conns = cell.split(":")
                got: dict[int, list[dict[str, float]]] = {t: [] for t in thresholds}
                for round_ in range(args.rounds):
                    order = thresholds if round_ % 2 == 0 else thresholds[::-1]
                    for t in order:
                        got[t].append(measure(procs, args.checkout, routes, args.python, page, int(conns), t,
                                              args.duration, Path(tmp) / "counts.json"))
                        r = got[t][-1]
                        print(f"  {page} c{conns} threshold {t} round {round_ + 1}: {r['ms']:.3f} ms/page, "
                              f"collector {r['gc_ms']:.3f}, {r['passes']:.0f} passes, {r['bad']:.0f} bad",
                              file=sys.stderr, flush=True)
                first = statistics.median(r["ms"] for r in got[thresholds[0]])
                for t in thresholds:
                    ms = statistics.median(r["ms"] for r in got[t])
                    rows.append(f"| {page} | {conns} | {t:,} | {ms:.3f} | "
                                f"{statistics.median(r['gc_ms'] for r in got[t]):.3f} | "
                                f"{statistics.median(r['passes'] for r in got[t]) / args.duration:.0f} | "
                                f"{statistics.median(r['collected'] for r in got[t]):.2f} | {ms / first:.3f} |")
                    print(rows[-1], flush=True)
    finally:
        procs.stop_all()
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
