"""Load-test composer with wrk against real fragment servers on loopback.

    python bench/run.py [--duration 10] [--pages page0,page5,page20] [--conns 16,64]

composer is pinned to CPU 0, the fragment server and wrk to CPU 1 (taskset), so the
numbers are one composer process on one core. Prints one markdown table: req/s, p50,
p99, composer CPU % and RSS. Needs `wrk` (Debian package) and `taskset` (util-linux).
Every process it starts is stopped when it ends.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
FRAGMENT_PORT, PAGE_PORT, ADMIN_PORT = 9800, 8090, 9912


def _pinned(cpu: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv] if shutil.which("taskset") and os.cpu_count() > 1 else argv


def _wait(url: str, deadline: float = 15.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"bench: {url} did not come up")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def wrk(url: str, conns: int, duration: int) -> dict[str, float]:
    out = subprocess.run(
        _pinned(1, ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", url]),
        capture_output=True, text=True, check=True).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        result[f"p{pct}"] = _ms(re.search(rf"\s{pct}(?:\.000)?%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    result["non2xx"] = float(errors.group(1)) if errors else 0.0
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--pages", default="page0,page5,page20")
    parser.add_argument("--conns", default="16,64")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("bench: wrk is not installed (apt-get install wrk)")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen(_pinned(1, [sys.executable, str(HERE / "fragment_server.py"),
                                                  str(FRAGMENT_PORT)])))
        composer = subprocess.Popen(
            _pinned(0, [sys.executable, "-m", "composer", "serve", "--config", str(HERE / "routes.yaml"),
                        "--host", "127.0.0.1", "--port", str(PAGE_PORT), "--admin-port", str(ADMIN_PORT)]),
            stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        procs.append(composer)
        _wait(f"http://127.0.0.1:{ADMIN_PORT}/readyz")
        _wait(f"http://127.0.0.1:{FRAGMENT_PORT}/f/warm")
        rows = []
        for page in args.pages.split(","):
            url = f"http://127.0.0.1:{PAGE_PORT}/{page}"
            wrk(url, 16, 2)  # warm-up: connections, caches, JIT-free but allocator-warm
            for conns in (int(c) for c in args.conns.split(",")):
                cpu0, t0 = _cpu_seconds(composer.pid), time.monotonic()
                r = wrk(url, conns, args.duration)
                cpu = (_cpu_seconds(composer.pid) - cpu0) / (time.monotonic() - t0) * 100
                rows.append((page, conns, r, cpu, _rss_mb(composer.pid)))
        print(f"\ncomposer, one process on one core; {args.duration}s per row; {time.strftime('%Y-%m-%d')}\n")
        print("| page | conns | req/s | p50 ms | p99 ms | composer CPU % | RSS MB | non-2xx |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for page, conns, r, cpu, rss in rows:
            print(f"| {page} | {conns} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {cpu:.0f} | "
                  f"{rss:.0f} | {r['non2xx']:.0f} |")
        return 0
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
