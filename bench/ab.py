"""Two checkouts of composer, A and B, side by side: CPU per page, interleaved.

    python bench/ab.py A_DIR [B_DIR] [--pages page0,page20] [--conns 16] [--duration 5] [--rounds 5]
                       [--python-a PYTHON] [--python-b PYTHON]

For judging one change on a noisy machine: both composers (each on CPU 0, one loaded at a
time) serve the same bench pages from the same fragment server (CPU 1, with wrk); rounds
alternate which goes first, and the report gives each one's median CPU µs per page and B/A.
A change is worth keeping when B/A holds across rounds, not when one run looks good: an A/A
run (one checkout on both sides) reads 0.97–1.03 here, two processes of the same code
differing by that much (hash seeds, address layout) whatever the rounds' order, so a B/A
inside that band from one run is not a result — run it again with the sides swapped. B
defaults to this checkout; A is typically `git worktree add /tmp/base <commit>`. With
`--python-a`/`--python-b` (each a venv's python with composer's dependencies) one checkout
compares interpreters.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run


def fragments(procs: run.Processes, label: str) -> Path:
    """The fragment server (bench/fragment_server.py, the cheaper) on CPU 1, and
    bench/.work/routes.yaml pointing at it."""
    port = run.free_port()
    routes = run.prepare_work(port)
    server = procs.start(f"{label} fragments", run.pinned(str(run.LOAD_CPU), run.fragment_server_argv("python", port)),
                         log=run.WORK / f"{label}_fragments.log")
    run.wait_ready(server, f"http://127.0.0.1:{port}/f/x?size=16")
    return routes


def start(procs: run.Processes, checkout: Path, routes: Path, label: str,
          python: str = sys.executable) -> tuple[run.Proc, int]:
    """`checkout`'s composer serving `routes` on CPU 0, ready: (process, page port)."""
    proc, port, _ = serve(procs, checkout, routes, label, python)
    return proc, port


def serve(procs: run.Processes, checkout: Path, routes: Path, label: str,
          python: str = sys.executable) -> tuple[run.Proc, int, int]:
    """`start`, with the admin port too."""
    port, admin = run.free_port(), run.free_port()
    env = dict(os.environ, PYTHONPATH=str(checkout.resolve()))
    argv = [python, "-m", "composer", "serve", "--config", str(routes), "--host", "127.0.0.1",
            "--port", str(port), "--admin-port", str(admin)]
    log = run.WORK / f"ab_{label}.log"
    popen = subprocess.Popen(run.pinned(str(run.PROXY_CPU), argv), cwd=checkout, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=log.open("wb"), start_new_session=True)
    proc = run.Proc(label, popen, log)
    procs.procs.append(proc)
    run.wait_ready(proc, f"http://127.0.0.1:{admin}/readyz")
    return proc, port, admin


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path, nargs="?", default=run.ROOT)
    parser.add_argument("--pages", default="page0,page20")
    parser.add_argument("--conns", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--python-a", default=sys.executable, help="A's interpreter (a venv's python)")
    parser.add_argument("--python-b", default=sys.executable, help="B's interpreter")
    args = parser.parse_args()
    procs = run.Processes()
    try:
        routes = fragments(procs, "ab")
        systems = {"A": start(procs, args.a, routes, "A", args.python_a),
                   "B": start(procs, args.b, routes, "B", args.python_b)}
        for page in args.pages.split(","):
            cpu: dict[str, list[float]] = {"A": [], "B": []}
            kernel: dict[str, list[float]] = {"A": [], "B": []}  # the kernel's share of each round's CPU
            calls: dict[str, list[float]] = {"A": [], "B": []}  # read + write system calls per page
            bad = 0
            for label, (_, port) in systems.items():
                run.run_wrk(procs, f"http://127.0.0.1:{port}/{page}", args.conns, 2)  # warm-up
            for i in range(args.rounds):
                order = ("A", "B") if i % 2 == 0 else ("B", "A")
                for label in order:
                    proc, port = systems[label]
                    user, system = run.cpu_split([proc.pid])
                    io = run.syscalls(proc.pid)
                    result = run.run_wrk(procs, f"http://127.0.0.1:{port}/{page}", args.conns, args.duration)
                    user2, system2 = run.cpu_split([proc.pid])
                    calls[label].append((run.syscalls(proc.pid) - io) / result.requests)
                    used = user2 - user + system2 - system
                    cpu[label].append(used / result.requests * 1e6)
                    kernel[label].append((system2 - system) / used if used else 0.0)
                    bad += result.non2xx + result.socket_errors
            a, b = statistics.median(cpu["A"]), statistics.median(cpu["B"])
            rounds = " ".join(f"{x:.0f}/{y:.0f}" for x, y in zip(cpu["A"], cpu["B"], strict=True))
            print(f"{page} c{args.conns}: A {a:.0f} µs  B {b:.0f} µs  B/A {b / a:.3f}  (rounds A/B: {rounds})"
                  f"  kernel share A {statistics.median(kernel['A']):.0%} B {statistics.median(kernel['B']):.0%}"
                  f"  syscalls/page A {statistics.median(calls['A']):.1f} B {statistics.median(calls['B']):.1f}"
                  f"{f'  BAD {bad}' if bad else ''}", flush=True)
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
