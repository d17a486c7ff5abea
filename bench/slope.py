"""How a page's CPU grows with its fragments: page20's first N, the same markup around them.

    python bench/slope.py [CHECKOUT] [--fragments 0,1,2,5,10,20] [--conns 16,64] [--duration 4]
                          [--rounds 3] [--python PYTHON]

bench/run.py's per-fragment figure, (cpu(pageN) − cpu(page0)) / N, charges each fragment a
share of what any page with a fragment pays (its Page, a streamed response, the wait for the
primary and the wake-up after it). Here every page is page20's template with only its first N
`<fragment>`s kept, so the pages differ by fragments alone: the slope between them is what one
more fragment costs, the step from 0 to 1 what a page pays to have fragments at all, and the
points show whether the growth is linear. Pages are driven in turn, `--rounds` times, and the
median round of each is reported; composer (one process, uvloop) on CPU 0, the fragment server
(bench/fragment_server.py) and wrk on CPU 1. Every process it starts is stopped.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ab
import run


def first(template: str, n: int) -> str:
    """`template` with only its first `n` fragments (the markup around the others kept)."""
    seen = itertools.count()
    return run.FRAGMENT.sub(lambda tag: tag[0] if next(seen) < n else "", template)


def pages(routes: Path, counts: list[int]) -> None:
    """Add `/slopeN` to the work copy of the routes: page20 with its first N fragments."""
    templates = routes.parent / "templates"
    page20 = (templates / "page20.html").read_text()
    lines = []
    for n in counts:
        (templates / f"slope{n}.html").write_text(first(page20, n))
        lines.append(f"  - {{name: slope{n}, match: {{path: /slope{n}}}, template: slope{n}.html}}\n")
    text = routes.read_text()
    routes.write_text(text.replace("routes:\n", "routes:\n" + "".join(lines), 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkout", nargs="?", default=str(run.ROOT))
    parser.add_argument("--fragments", default="0,1,2,5,10,20")
    parser.add_argument("--conns", default="16,64")
    parser.add_argument("--duration", type=float, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args()
    counts = sorted({int(n) for n in args.fragments.split(",")})
    if not counts or counts[0] < 0 or counts[-1] > 20 or len(counts) < 2:
        parser.error("--fragments: at least two counts from 0 to 20 (page20's)")
    procs = run.Processes()
    try:
        routes = ab.fragments(procs, "slope")
        pages(routes, counts)
        composer, port = ab.start(procs, Path(args.checkout), routes, "slope", args.python)
        pids = run.tree(composer.pid)
        print(f"composer checkout: {args.checkout}\nCPU µs a page, by its number of fragments N\n\n| conns | "
              + " | ".join(f"N={n}" for n in counts)
              + " | µs per fragment (fit over 1–20) | first fragment, µs over none |\n"
              + "|---:|" + "---:|" * (len(counts) + 2), flush=True)
        for conns in (int(c) for c in args.conns.split(",")):
            cpu: dict[int, list[float]] = {n: [] for n in counts}
            for _ in range(args.rounds):
                for n in counts:
                    url = f"http://127.0.0.1:{port}/slope{n}"
                    run.run_wrk(procs, url, conns, 1)  # settle
                    before = run.cpu_seconds(pids)
                    wrk = run.run_wrk(procs, url, conns, args.duration)
                    after = run.cpu_seconds(pids)
                    if wrk.non2xx or wrk.socket_errors:
                        raise run.BenchError(f"{url}: {wrk.non2xx} non-2xx, {wrk.socket_errors} socket errors")
                    cpu[n].append((after - before) / wrk.requests * 1e6)
            us = {n: statistics.median(cpu[n]) for n in counts}
            some = [n for n in counts if n >= 1]
            slope = statistics.linear_regression(some, [us[n] for n in some]).slope if len(some) >= 2 \
                else float("nan")
            first = us[1] - us[0] if 0 in us and 1 in us else float("nan")
            print(f"| {conns} | " + " | ".join(f"{us[n]:.0f}" for n in counts) + f" | **{slope:.1f}** | {first:.0f} |",
                  flush=True)
    except run.BenchError as exc:
        print(f"slope: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
