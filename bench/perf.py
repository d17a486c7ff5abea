"""Where composer's CPU goes, the kernel's share included: `perf record` of a loaded composer.

    python bench/perf.py [--pages page20] [--conns 16] [--duration 8] [--top 25] [--checkout DIR]
                         [--python PYTHON] [--keep DIR]

bench/profile.py (py-spy) sees Python frames, and gives a compiled module's time to the
Python frame below it; callgrind (bench/instructions.py) counts instructions, not time, and
no kernel work. This one samples time on the CPU, user and kernel: composer (uvloop, one
process, CPU 0) serves the page under wrk (CPU 1, with the fragment server, bench/fragment_server.py) while
`perf record -e cpu-clock --call-graph dwarf` samples it. Each sample is charged to the
innermost of composer's compiled functions on its stack (`CPyDef_<module>___<function>`,
mypyc's name for it; a coroutine's body is its `..._gen_____mypyc_generator_helper__`):
what that function costs with everything it calls that is not composer's — CPython's object
machinery, uvloop, httptools, multidict, the system calls it makes. A sample with no composer
function on its stack is charged to the first uvloop or aiohttp frame, or to its leaf.

Needs `perf` (Debian's linux-perf) and the right to profile (root, or
kernel.perf_event_paranoid <= 1); composer compiled (scripts/compile) for the names to mean
anything. Every process it starts is stopped.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ab
import run

_HELPERS = ("CPy_", "CPyPy_", "CPyIter", "CPyDict", "CPyList", "CPyStr", "CPyObject", "CPyTagged", "CPyStatics",
            "CPyGen", "CPyBytes", "CPyTuple", "CPySequence", "CPyDunder")

Stack = list[tuple[str, str]]  # (symbol, shared object), leaf first


def stacks(data: Path) -> list[Stack]:
    """The samples of a perf.data file, each a stack of (symbol, object), leaf first."""
    text = subprocess.run(["perf", "script", "-i", str(data), "-F", "ip,sym,dso"], check=True,
                          capture_output=True, text=True).stdout
    found: list[Stack] = []
    current: Stack = []
    for line in text.splitlines():
        if not line.strip():
            if current:
                found.append(current)
            current = []
            continue
        rest = line.split(None, 1)[1] if len(line.split(None, 1)) == 2 else ""
        symbol, _, dso = rest.rpartition(" (")
        current.append((symbol or rest, dso.rstrip(")")))
    if current:
        found.append(current)
    return found


def owner(stack: Stack) -> str:
    """The composer function a sample is charged to (see the module docstring)."""
    for symbol, dso in stack:
        if "_native__mypyc" in dso and symbol.startswith("CPyDef_") and not symbol.startswith(_HELPERS):
            return symbol.removeprefix("CPyDef_").replace("_____mypyc_generator_helper__", " (coroutine)")
    for symbol, dso in stack:
        if "uvloop" in dso or "aiohttp" in dso:
            return f"[{Path(dso).name.split('.')[0]}] {symbol}"
    return f"[{Path(stack[0][1]).name}] {stack[0][0]}" if stack else "[none]"


def report(samples: list[Stack], top: int) -> list[str]:
    total = len(samples) or 1
    charged: collections.Counter[str] = collections.Counter()
    kernel: collections.Counter[str] = collections.Counter()
    for stack in samples:
        who = owner(stack)
        charged[who] += 1
        if stack and "kernel" in stack[0][1]:
            kernel[who] += 1
    in_kernel = sum(kernel.values())
    lines = [f"{len(samples)} samples, {in_kernel / total:.0%} in the kernel", "",
             "| charged to | % of CPU | of which kernel |", "|---|---:|---:|"]
    lines += [f"| `{who}` | {n / total * 100:.1f} | {kernel[who] / total * 100:.1f} |"
              for who, n in charged.most_common(top)]
    return lines


def record(procs: run.Processes, pid: int, url: str, seconds: float, conns: int, out: Path) -> run.Wrk:
    return run.under_load(procs, url, conns, seconds, [
        "perf", "record", "-e", "cpu-clock", "-F", "400", "--call-graph", "dwarf,32768", "-p", str(pid),
        "-o", str(out), "--", "sleep", f"{seconds:g}"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", default="page20")
    parser.add_argument("--conns", type=int, default=16)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--checkout", type=Path, default=run.ROOT, help="the composer checkout to profile")
    parser.add_argument("--python", default=sys.executable, help="the interpreter composer runs on")
    parser.add_argument("--keep", type=Path, default=None, help="keep perf.data files in this folder")
    args = parser.parse_args()
    if shutil.which("perf") is None:
        print("bench/perf.py: no `perf` here (Debian: apt-get install linux-perf)", file=sys.stderr)
        return 2
    procs = run.Processes()
    out: list[str] = [f"composer checkout: {args.checkout.resolve()}", ""]
    try:
        routes = ab.fragments(procs, "perf")
        composer, port = ab.start(procs, args.checkout, routes, "perf", args.python)
        with tempfile.TemporaryDirectory() as tmp:
            for page in args.pages.split(","):
                url = f"http://127.0.0.1:{port}/{page}"
                run.run_wrk(procs, url, args.conns, 2)  # warm-up
                data = Path(tmp) / f"{page}.data"
                result = record(procs, composer.pid, url, args.duration, args.conns, data)
                if args.keep is not None:
                    args.keep.mkdir(parents=True, exist_ok=True)
                    shutil.copy(data, args.keep / data.name)
                out += [f"## {page} (c{args.conns}): {result.rps:.0f} req/s under perf", ""]
                out += report(stacks(data), args.top) + [""]
    finally:
        procs.stop_all()
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
