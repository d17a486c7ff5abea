"""Page latency while /metrics is scraped: does a scrape hold the pages?

    python bench/scrape.py [CHECKOUT ...] [--page page0] [--seconds 6] [--every 0.2]

Each checkout (default: this one) serves the bench pages from the fragment server (bench/fragment_server.py).
One client asks for `--page` over and over (c1, 2 ms apart) for `--seconds`, first alone,
then beside a second client that GETs /metrics every `--every` seconds; the report is each
run's p50, p99 and max. Rendering every series of bench/routes.yaml (6,500 samples) takes
tens of ms: done on the event loop, every page asked for meanwhile waits it out.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ab
import aiohttp
import run


async def _latencies(port: int, admin: int, page: str, seconds: float, every: float | None) -> list[float]:
    async with aiohttp.ClientSession() as session:

        async def scrape() -> None:
            assert every is not None
            while True:
                async with session.get(f"http://127.0.0.1:{admin}/metrics") as resp:
                    await resp.read()
                await asyncio.sleep(every)

        scraper = asyncio.create_task(scrape()) if every else None
        out: list[float] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            async with session.get(f"http://127.0.0.1:{port}/{page}") as resp:
                await resp.read()
                if resp.status != 200:
                    raise run.BenchError(f"/{page} answered {resp.status}")
            out.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.002)
        if scraper is not None:
            scraper.cancel()
        return sorted(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkouts", type=Path, nargs="*", default=[run.ROOT])
    parser.add_argument("--page", default="page0")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--every", type=float, default=0.2)
    args = parser.parse_args()
    procs = run.Processes()
    try:
        routes = ab.fragments(procs, "scrape")
        print(f"/{args.page} at c1, ms | p50 | p99 | max | pages")
        for checkout in args.checkouts:
            proc, port, admin = ab.serve(procs, checkout, routes, "scrape")
            for every in (None, args.every):
                got = asyncio.run(_latencies(port, admin, args.page, args.seconds, every))
                what = f"scraped every {every} s" if every else "no scrape"
                print(f"{checkout} {what} | {got[len(got) // 2]:.2f} | {got[int(len(got) * 0.99)]:.2f} "
                      f"| {got[-1]:.1f} | {len(got)}", flush=True)
            procs.stop(proc)
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
