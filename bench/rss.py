"""composer's memory per load, each load in a new process: bench/run.py's step 10 alone, for
any checkout.

    python bench/rss.py [CHECKOUT] [--cells page0:64,page5:256,page20:16,page20:64,...] [--duration 10]
                        [--python PYTHON]

bench/run.py's main table reports one process's high-water mark over every cell before the one
shown (a process rarely gives memory back), which mixes loads. Here each cell gets a composer of
its own: its RSS once ready (idle, nothing fetched yet), then its high-water mark (VmHWM) after
`--duration` s of wrk. The fragment server (bench/fragment_server.py) and wrk run on CPU 1,
composer on CPU 0, as in bench/run.py. Every process it starts is stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ab
import run

CELLS = "page0:64,page5:64,page5:256,page20:16,page20:64,page100:16,page100:64,page1mb:16,page1mb:64"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", type=Path, nargs="?", default=run.ROOT)
    parser.add_argument("--cells", default=CELLS, help="page:connections, comma-separated")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--python", default=sys.executable, help="composer's interpreter (a venv's python)")
    args = parser.parse_args()
    procs = run.Processes()
    rows = ["| page | conns | idle MB | high-water MB | req/s | non-2xx+err |", "|---|---:|---:|---:|---:|---:|"]
    try:
        routes = ab.fragments(procs, "rss")
        for cell in args.cells.split(","):
            page, conns = cell.split(":")
            proc, port = ab.start(procs, args.checkout, routes, f"rss_{page}_{conns}", args.python)
            try:
                m = run.memory_of(procs, proc, f"http://127.0.0.1:{port}", page, int(conns), args.duration)
            finally:
                procs.stop(proc)
            rows.append(f"| {page} | {conns} | {m.idle_mb:.1f} | {m.high_mb:.1f} | {m.wrk.rps:,.0f} "
                        f"| {m.wrk.non2xx + m.wrk.socket_errors} |")
            print(rows[-1], flush=True)
    finally:
        procs.stop_all()
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
