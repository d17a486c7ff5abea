"""What nested fragments (SPEC §6) cost composer: CPU µs per nested fragment.

    python bench/nested.py [--quick] [--top 4] [--children 5] [--requests 2000] [--rounds 3] [--conns 16]

Three pages on one composer: `flat` has `--top` fragments, each a leaf; `nested` has `--top`
fragments too, each answering `x-composer-nested: 1` with `--children` leaves in it; `wide`
has as many leaves as `nested` fetches, all in its template. `nested` and `flat` fetch the
same top-level fragments, so the difference in composer's CPU per page (utime + stime from
/proc/<pid>/stat over a fixed number of requests), divided by top × children, is what one
nested fragment costs: its share of its parent's compiled body (found in the cache), its
fetch through the pipeline, its placing. (`wide` − `flat`) / (top × children), the cost of
one more fragment in the template, is the yardstick. Leaves answer ~1 KB with a stylesheet
and a script in `Link`, as bench/fragment_server.py does.

Same machinery as bench/run.py (its processes, pinning and /proc readings): composer on CPU 0,
the fragment server (this file, `--serve PORT`: aiohttp) and the load (this script, an
aiohttp client with `--conns` connections) on CPU 1. Rounds alternate which page goes first;
the median round of each is reported. Every page is checked first (200, every leaf in it,
no fragment failure). Every process started is stopped at the end. `--quick`: 300 requests,
1 round (well under a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run as bench  # bench/run.py

LEAF = "x" * 1000


# ------------------------------------------------------------------ the fragment server

def serve(port: int) -> None:
    """GET /leaf/<name>: ~1 KB and its assets; GET /parent/<name>?k=K: a nested body of K leaves."""
    from aiohttp import web

    async def leaf(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        return web.Response(text=f'<div class="{name}">{name} {LEAF}</div>', content_type="text/html", headers={
            "link": f'</assets/{name}.css>; rel="stylesheet", </assets/{name}.js>; rel="fragment-script"'})

    async def parent(request: web.Request) -> web.Response:
        name, k = request.match_info["name"], int(request.query.get("k", "0"))
        leaves = "".join(f'<li><fragment src="http://127.0.0.1:{port}/leaf/{name}-{i}"></fragment></li>'
                         for i in range(k))
        return web.Response(text=f'<ul class="{name}">{leaves}</ul>', content_type="text/html",
                            headers={"x-composer-nested": "1", "link": f'</assets/{name}.css>; rel="stylesheet"'})

    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    app = web.Application()
    app.router.add_get("/leaf/{name}", leaf)
    app.router.add_get("/parent/{name}", parent)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# ------------------------------------------------------------------ the pages

def write_config(folder: Path, port: int, top: int, children: int) -> Path:
    """routes.yaml with /flat and /nested, and their templates, in `folder`."""
    (folder / "templates").mkdir()
    origin = f"http://127.0.0.1:{port}"
    flat = "".join(f'<fragment id="t{i}" src="{origin}/leaf/t{i}"></fragment>' for i in range(top))
    nested = "".join(f'<fragment id="t{i}" src="{origin}/parent/t{i}?k={children}"></fragment>' for i in range(top))
    wide = flat + "".join(f'<fragment id="t{i}-{j}" src="{origin}/leaf/t{i}-{j}"></fragment>'
                          for i in range(top) for j in range(children))
    for name, body in (("flat", flat), ("nested", nested), ("wide", wide)):
        (folder / "templates" / f"{name}.html").write_text(
            f"<!DOCTYPE html><html><head><title>{name}</title></head><body>{body}</body></html>")
    routes = folder / "routes.yaml"
    routes.write_text("settings:\n  templates: templates\nroutes:\n"
                      "  - {name: flat, match: {path: /flat}, template: flat.html}\n"
                      "  - {name: nested, match: {path: /nested}, template: nested.html}\n"
                      "  - {name: wide, match: {path: /wide}, template: wide.html}\n")
    return routes


def check(base: str, admin: str, top: int, children: int) -> None:
    """Each page is a 200 with every leaf, and no fragment failed."""
    inner = [f"t{i}-{j}" for i in range(top) for j in range(children)]
    for page, leaves in (("flat", [f"t{i}" for i in range(top)]), ("nested", inner), ("wide", inner)):
        status, body = bench.http_get(f"{base}/{page}")
        text = body.decode()
        missing = [name for name in leaves if f'<div class="{name}">' not in text]
        if status != 200 or missing or "<fragment" in text:
            raise bench.BenchError(f"/{page}: status {status}, missing {missing[:5]}: {text[:300]!r}")
    metrics = bench.http_get(f"{admin}/metrics")[1].decode()
    failed = sum(float(v) for v in re.findall(r"^composer_fragment_failures_total\{.*\} (\S+)$", metrics, re.MULTILINE))
    if failed:
        raise bench.BenchError(f"{failed:.0f} fragment failures while checking the pages")


async def load(url: str, requests: int, conns: int) -> float:
    """GET `url` `requests` times over `conns` connections; the seconds it took."""
    import aiohttp

    left = requests

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            async with session.get(url) as resp:
                await resp.read()
                if resp.status != 200:
                    raise bench.BenchError(f"{url}: status {resp.status}")

    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conns)) as session:
        await asyncio.gather(*(worker(session) for _ in range(conns)))
    return time.perf_counter() - t0


def cpu_per_page(system: bench.System, page: str, requests: int, conns: int) -> tuple[float, float]:
    """composer's CPU ms per page over `requests` pages, and pages per second."""
    pids = bench.tree(system.proc.pid)
    cpu0 = bench.cpu_seconds(pids)
    seconds = asyncio.run(load(f"{system.base}/{page}", requests, conns))
    bench.check_alive(system.proc)
    return (bench.cpu_seconds(pids) - cpu0) / requests * 1000, requests / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # run as the fragment server
    parser.add_argument("--quick", action="store_true", help="300 requests, 1 round")
    parser.add_argument("--top", type=int, default=4, help="top-level fragments per page")
    parser.add_argument("--children", type=int, default=5, help="nested leaves per top-level fragment")
    parser.add_argument("--requests", type=int, default=2000, help="pages per measured run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--conns", type=int, default=16)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    if args.quick:
        args.requests, args.rounds = 300, 1
    os.sched_setaffinity(0, {bench.LOAD_CPU})  # the load shares a core with the fragment server, not composer
    bench.WORK.mkdir(exist_ok=True)
    procs = bench.Processes()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            port = bench.free_port()
            frag = procs.start("fragment server", bench.pinned(str(bench.LOAD_CPU), [
                sys.executable, __file__, "--serve", str(port)]), log=Path(tmp) / "fragments.log")
            bench.wait_ready(frag, f"http://127.0.0.1:{port}/leaf/x")
            routes = write_config(Path(tmp), port, args.top, args.children)
            system = bench.start_composer(procs, routes, workers=1, cpus=str(bench.PROXY_CPU), name="composer nested")
            check(system.base, system.admin, args.top, args.children)
            pages = ("flat", "nested", "wide")
            for page in pages:  # warm-up: connections, caches, the compiled bodies
                cpu_per_page(system, page, max(50, args.requests // 10), args.conns)
            runs: dict[str, list[float]] = {page: [] for page in pages}
            for rnd in range(args.rounds):
                for page in pages if rnd % 2 == 0 else pages[::-1]:
                    ms, rate = cpu_per_page(system, page, args.requests, args.conns)
                    runs[page].append(ms)
                    print(f"  r{rnd + 1} {page:6}  {ms:.3f} ms CPU/page  {rate:6,.0f} pages/s", flush=True)
            flat, nested, wide = (statistics.median(runs[page]) for page in pages)
            count = args.top * args.children
            print(f"flat {args.top} fragments: {flat:.3f} ms CPU/page; nested {args.top} × {args.children}: "
                  f"{nested:.3f}; wide {args.top + count} in the template: {wide:.3f} "
                  f"({args.requests} pages per run, c{args.conns}, median of {args.rounds} rounds)")
            print(f"{(nested - flat) / count * 1000:.0f} µs CPU per nested fragment; "
                  f"{(wide - flat) / count * 1000:.0f} µs per extra fragment in the template")
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
