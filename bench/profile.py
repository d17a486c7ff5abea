"""Where composer's CPU goes, per page: py-spy samples a loaded composer.

    python bench/profile.py [--pages page0,page20] [--duration 10] [--conns 16] [--top 15]
                            [--checkout DIR] [--output PATH] [--native]

For each page: composer (uvloop, one process, on CPU 0) serves the bench page under wrk
(CPU 1, with the fragment server, bench/fragment_server.py); `py-spy record --format raw` samples composer for
`--duration` s. The collapsed stacks give two tables: the top frames by own time (the leaf
frame of each sample, as `py-spy top` shows it) and own time per layer (the module of the
leaf frame: composer.<module>, aiohttp.<module>, asyncio, uvloop, ...). `--checkout` profiles
another checkout of composer (e.g. a `git worktree` of an older commit): the before/after of
a change, on the same machine and fragment server. `--native` samples C frames too: a module
compiled by scripts/compile is C, and without it py-spy gives its time to the Python frame
below it (its own frames read `CPyDef_<module>___<function>`); py-spy stops composer for each
such sample, so the ms per page it prints are inflated: compare shares. Every process it starts is stopped.

py-spy is the profiler the project chose (`pip install -e '.[profile]'`); it needs ptrace rights over
composer (root, or kernel.yama.ptrace_scope = 0).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ab
import run

_COMPILED = re.compile(r"^CPy(?:Py)?Def_([a-z]+)___")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def layer(path: str) -> str:
    """The module a frame's file belongs to, short: composer.compose, aiohttp.web_protocol, asyncio."""
    parts = Path(path).with_suffix("").parts
    for anchor in ("composer", "aiohttp", "multidict", "yarl", "prometheus_client", "httptools", "uvloop",
                   "selectolax", "asyncio"):
        if anchor in parts:
            i = len(parts) - 1 - parts[::-1].index(anchor)
            rest = parts[i + 1:i + 2]
            return anchor if anchor == "asyncio" or not rest else f"{anchor}.{rest[0]}"
    return parts[-1] if parts else path


def read_raw(path: Path) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    """Own samples per frame (`func (file)`) and per layer, and the number of samples."""
    frames: collections.Counter[str] = collections.Counter()
    layers: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.split(";")[-1]
        m = _FRAME.match(leaf)
        func, file = (m["func"], m["file"]) if m else (leaf, "")
        n = int(count)
        frames[f"{func} ({file.rsplit('site-packages/', 1)[-1]})"] += n
        compiled = _COMPILED.match(func)  # a function of a module scripts/compile built (--native)
        layers[f"composer.{compiled[1]}" if compiled else layer(file)] += n
        total += n
    return frames, layers, total


def profile_page(procs: run.Processes, pid: int, url: str, seconds: float, conns: int,
                 out: Path, native: bool = False) -> run.Wrk:
    """wrk on `url` while py-spy samples `pid`; the raw stacks land in `out`."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return run.under_load(procs, url, conns, seconds, [
        spy, "record", "--pid", str(pid), "--duration", f"{seconds:g}", "--rate", "400", "--format", "raw",
        "--output", str(out), *(["--native"] if native else ["--nonblocking"])])


def table(counter: collections.Counter[str], total: int, top: int, head: str) -> list[str]:
    lines = [f"| {head} | own % |", "|---|---:|"]
    lines += [f"| `{name}` | {n / total * 100:.1f} |" for name, n in counter.most_common(top)]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", default="page0,page20")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--conns", type=int, default=16)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--checkout", type=Path, default=run.ROOT, help="the composer checkout to profile")
    parser.add_argument("--output", type=Path, default=None, help="also write the markdown here")
    parser.add_argument("--keep", type=Path, default=None, help="keep py-spy's raw stacks in this folder")
    parser.add_argument("--native", action="store_true", help="sample C frames too (compiled modules are C)")
    args = parser.parse_args()
    procs = run.Processes()
    report: list[str] = [f"composer checkout: {args.checkout.resolve()}", ""]
    try:
        routes = ab.fragments(procs, "profile")
        composer, port = ab.start(procs, args.checkout, routes, "profile")
        with tempfile.TemporaryDirectory() as tmp:
            for page in args.pages.split(","):
                url = f"http://127.0.0.1:{port}/{page}"
                run.run_wrk(procs, url, args.conns, 2)  # warm-up
                cpu0 = run.cpu_seconds([composer.pid])
                raw = Path(tmp) / f"{page}.txt"
                result = profile_page(procs, composer.pid, url, args.duration, args.conns, raw, args.native)
                cpu = run.cpu_seconds([composer.pid]) - cpu0
                frames, layers, total = read_raw(raw)
                if args.keep is not None:
                    args.keep.mkdir(parents=True, exist_ok=True)
                    shutil.copy(raw, args.keep / raw.name)
                report += [(f"## {page} (c{args.conns}): {result.rps:.0f} req/s, "
                            f"{cpu / result.requests * 1000:.3f} ms CPU per page (py-spy attached), "
                            f"{total} samples"), ""]
                report += table(frames, total, args.top, "frame (own time)") + [""]
                report += table(layers, total, args.top, "layer (module of the leaf frame)") + [""]
    finally:
        procs.stop_all()
    text = "\n".join(report)
    print(text)
    if args.output is not None:
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
