"""Instructions per page: composer's user-space work, counted (not timed) by callgrind.

    python bench/instructions.py [CHECKOUT ...] [--pages page0,page20] [--requests 200] [--conns 1]
                                 [--keep DIR]

CPU seconds on a shared 2-vCPU VM move ±10–20 % between identical runs (bench/ab.py); the
instructions a page costs do not. Each checkout (default: this one) runs under
`valgrind --tool=callgrind` with instrumentation off until warmed up; then, per page, a
client in another process makes `--requests` keep-alive GETs (`--conns` at a time: 1 keeps
the loop's batching, and so the count, repeatable to about 0.2 %), and callgrind's count
for exactly those requests is divided by their number. composer's clock-driven work (the
status page's sampling, the reloader's file checks) is switched off: under callgrind a
second is a few pages, and it would be counted as theirs. Kernel work (system calls, loopback
TCP) is not counted: bench/ab.py reports its share of the CPU and the calls per page.

Use it to judge a change (`git worktree add /tmp/base HEAD` and pass both), then confirm
with bench/ab.py. The fragment server is bench/fragment_server.py, on another CPU. Every process it
starts is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ab
import run


class _Sink:
    """httptools' callbacks for one response: only its end matters."""

    def __init__(self) -> None:
        self.done = False

    def on_message_complete(self) -> None:
        self.done = True


async def _load(port: int, path: str, requests: int, conns: int) -> int:
    """`requests` GETs of `path`, `conns` keep-alive connections at a time; the non-200 count."""
    import httptools

    async def one_connection(n: int) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
        bad = 0
        for _ in range(n):
            sink = _Sink()
            parser = httptools.HttpResponseParser(sink)
            writer.write(request)
            while not sink.done:
                data = await reader.read(65536)
                if not data:
                    raise run.BenchError(f"composer closed the connection on {path}")
                parser.feed_data(data)
            bad += parser.get_status_code() != 200
        writer.close()
        return bad

    per = [requests // conns + (i < requests % conns) for i in range(conns)]
    return sum(await asyncio.gather(*(one_connection(n) for n in per if n)))


# `composer serve` without its clock-driven work. Under callgrind a second of wall time is only
# a few pages, so the status page's sampling of every metric (every 10 s: as much as a
# hundred pages' worth of instructions in one go, in a thread beside the pages) would land
# in some runs and not in others. The sampler does not run (the status page still samples
# when asked for).
_SERVE = "import asyncio, sys, composer.status, composer.cli; " \
         "composer.status.Status.run = lambda self: asyncio.sleep(1e9); sys.exit(composer.cli.main(sys.argv[1:]))"


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


def measure(procs: run.Processes, checkout: Path, routes: Path, pages: list[str], requests: int,
            conns: int, out: Path, keep: Path | None = None) -> dict[str, float]:
    """Instructions per request of each page, for composer from `checkout`."""
    port, admin = run.free_port(), run.free_port()
    env = dict(os.environ, PYTHONPATH=str(checkout.resolve()))
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}/callgrind.%p",
            sys.executable, "-c", _SERVE, "serve", "--config", str(routes), "--host", "127.0.0.1",
            "--port", str(port), "--admin-port", str(admin)]
    proc = procs.start(f"composer {checkout}", run.pinned(str(run.PROXY_CPU), argv), log=out / "composer.log",
                       cwd=checkout, env=env)
    popen = proc.popen
    run.wait_ready(proc, f"http://127.0.0.1:{admin}/readyz", deadline=300)
    counts: dict[str, float] = {}
    for page in pages:
        asyncio.run(_load(port, f"/{page}", max(20, requests // 5), conns))  # warm-up, not counted
        _control("--zero", str(popen.pid))
        _control("--instr=on", str(popen.pid))
        bad = asyncio.run(_load(port, f"/{page}", requests, conns))
        _control("--instr=off", str(popen.pid))
        _control("--dump", page, str(popen.pid))
        if bad:  # counted all the same: say so
            print(f"  {checkout} {page}: {bad} of {requests} answers were not 200 (see {out}/composer.log)",
                  file=sys.stderr, flush=True)
        dump = max(out.glob(f"callgrind.{popen.pid}.*"), key=lambda p: p.stat().st_mtime)
        totals = re.search(r"^totals: (\d+)", dump.read_text(errors="replace"), re.MULTILINE)
        if totals is None:
            raise run.BenchError(f"no totals in {dump}")
        counts[page] = int(totals.group(1)) / requests
        if keep is not None:  # for callgrind_annotate
            keep.mkdir(parents=True, exist_ok=True)
            shutil.move(dump, keep / f"callgrind.{checkout.resolve().name}.{page}")
        else:
            dump.unlink()
    procs.stop(proc)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkouts", type=Path, nargs="*", default=[run.ROOT])
    parser.add_argument("--pages", default="page0,page20")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--conns", type=int, default=1)
    parser.add_argument("--keep", type=Path, default=None, help="keep callgrind's files here (callgrind_annotate)")
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (Debian: apt-get install valgrind)", file=sys.stderr)
            return 1
    pages = args.pages.split(",")
    procs = run.Processes()
    results: dict[Path, dict[str, float]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="composer-callgrind-") as tmp:
            for checkout in args.checkouts:
                started = time.monotonic()
                # A fragment server of its own: one that earlier composers left connections and
                # garbage in answers with other timing, and the count follows the timing.
                before = list(procs.procs)
                routes = ab.fragments(procs, "instructions")
                # No file checks: under callgrind a second of wall time is a few pages, and a
                # once-a-second stat of every file would be counted as theirs.
                routes.write_text(routes.read_text().replace("settings:\n", "settings:\n  reload_interval_ms: 0\n", 1))
                results[checkout] = measure(procs, checkout, routes, pages, args.requests, args.conns, Path(tmp),
                                            args.keep)
                for proc in [p for p in procs.procs if p not in before]:
                    procs.stop(proc)
                print(f"{checkout}: " + "  ".join(f"{page} {n / 1000:,.0f} k" for page, n in results[checkout].items())
                      + f"  ({time.monotonic() - started:.0f} s)", flush=True)
    finally:
        procs.stop_all()
    first = results[args.checkouts[0]]
    print(f"\ninstructions per request (user space, callgrind), {args.requests} requests, c{args.conns}")
    print("| checkout | " + " | ".join(pages) + " |")
    print("|---|" + "---:|" * len(pages))
    for checkout, counts in results.items():
        cells = [f"{counts[p] / 1000:,.0f} k ({counts[p] / first[p]:.3f})" for p in pages]
        print(f"| {checkout} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
