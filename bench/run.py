"""composer against Tailor (npm node-tailor 3.9.2), side by side: same templates, same
fragment server, same run.

    python bench/run.py [--duration 15] [--rounds 3] [--quick] [--pages page0,page5,page20]
                        [--fragment-server auto|node|python] [--ttfb-samples 200] [--output PATH]

What it does, in order (every process it starts is stopped at the end, also on Ctrl-C,
SIGTERM or an error; each runs in its own process group):

1. Installs node-tailor@3.9.2 into bench/node_modules (git-ignored) with npm if missing.
2. Copies bench/routes.yaml and bench/templates/ into bench/.work/ (git-ignored), pointing the
   fragment URLs at the port picked for this run (the files in bench/ say 127.0.0.1:9800).
3. Fragment server: measures the CPU per request of bench/fragment_server.js (Node `http`)
   and bench/fragment_server.py (aiohttp + uvloop) under `wrk -c64` at /f/x?size=2048 (server
   on CPU 1, wrk on CPU 0), and uses the cheaper one (`--fragment-server auto`).
4. Starts the fragment server (CPU 1), Tailor (bench/tailor_server.js, templates parsed once
   and cached — its best case) and `python -m composer serve` (uvloop), both proxies on
   CPU 0; wrk and this script run on CPU 1. Checks that every page, through each proxy, is a
   200 holding every fragment's content (sync ones in document order).
5. For each page × concurrency (page0, page20: 16, 64; page5: 16, 64, 256): a warm-up, then
   `--rounds` rounds of `--duration` s of wrk per system, alternating which goes first. The
   median round (by req/s) of each system is reported; every round is in RESULTS.md. Per
   run: req/s, p50/p99 (wrk --latency), proxy CPU % and CPU ms per page (/proc/PID/stat),
   proxy RSS (max seen), non-2xx + socket errors, fragment failures (composer's
   composer_fragment_failures_total, Tailor's error events), composer log lines other than
   2xx/499 access lines, and how busy each core was, including load from other processes.
6. Time to first byte: a raw-socket client (one connection per sample, sequential, N samples)
   on page5np (no primary) and page5, while fragments are pending.
7. CPU per page for page5 and page20, and the cost per extra fragment = (page20 − page5) / 15.
8. The physical floor: wrk straight at page5's slowest synchronous fragment (50 ms) at c16.
9. composer --workers 2 (unpinned: wrk and the fragment server share a core with it) on
   page20 at c64, against the one-process figure.

Prints the markdown and writes it to bench/RESULTS.md (`--quick`: bench/.work/RESULTS.quick.md
unless --output is given) with the date, the machine, the load and the exact command.
`--quick` is a smoke run: 3 s per run, 1 round, 30 TTFB samples. Needs node + npm, wrk and
taskset, and a machine with at least 2 CPUs.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / ".work"
TAILOR = "node-tailor"
TAILOR_VERSION = "3.9.2"
CANON_ORIGIN = "127.0.0.1:9800"  # what bench/templates/*.html say
CONNS = {"page0": (16, 64), "page5": (16, 64, 256), "page20": (16, 64)}
PROXY_CPU, LOAD_CPU = 0, 1  # the proxy under test; wrk, the fragment server and this script
SYSTEMS = ("composer", "tailor")
TICK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """Something the benchmark cannot go on from; the message says what."""


# ---------------------------------------------------------------------------------- processes

def pinned(cpus: str | None, argv: list[str]) -> list[str]:
    """argv under taskset: `cpus` like "0" or "0,1" (None: every CPU, i.e. unpinned)."""
    return ["taskset", "-c", cpus if cpus is not None else f"0-{os.cpu_count() - 1}", *argv]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path | None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        if self.log is None or not self.log.exists():
            return ""
        with self.log.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))
            text = f.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])


class Processes:
    """Everything this script starts, each in its own session (process group)."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], *, log: Path | None = None, cwd: Path = ROOT,
              stdout: Any = None) -> Proc:
        out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            popen = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=stdout if stdout is not None else out, stderr=out,
                                     start_new_session=True)
        finally:
            if log is not None:
                out.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = 15.0) -> int | None:
        if proc in self.procs:
            self.procs.remove(proc)
        if proc.popen.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        try:  # stragglers in its group (gunicorn workers, npm children), then the leader
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            return proc.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return None

    def stop_all(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"connection": "close"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(proc: Proc, url: str, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited with status {proc.popen.returncode} while starting:\n"
                             f"{proc.tail()}")
        try:
            if http_get(url, timeout=1)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError(f"{proc.name}: {url} did not answer 200 within {deadline:.0f} s\n{proc.tail()}")


def check_alive(*procs: Proc) -> None:
    for proc in procs:
        if not proc.alive():
            raise BenchError(f"{proc.name} (pid {proc.pid}) died with status {proc.popen.returncode}; "
                             f"the end of its log:\n{proc.tail()}")


# ------------------------------------------------------------------------------------ /proc

def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    children, out, todo = _children_map(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICK


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
                    break
        except OSError:
            continue
    return total / 1024


def core_ticks() -> dict[str, tuple[int, ...]]:
    """Per CPU ("cpu0", "cpu1", and "cpu" for all), ticks from /proc/stat: (busy, total,
    process time = user + nice + system, steal). Busy includes irq/softirq (loopback TCP)."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if not line.startswith("cpu"):
            break
        name, *values = line.split()
        v = [int(x) for x in values[:8]]  # user nice system idle iowait irq softirq steal
        out[name] = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7], sum(v), v[0] + v[1] + v[2], v[7])
    return out


def own_cpu_seconds() -> float:
    """This script plus every child it has waited for (wrk runs)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class RssSampler(threading.Thread):
    """The highest RSS (summed over the process tree) seen while it runs, every 0.2 s."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.pids, self.peak, self._done = pids, rss_mb(pids), threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.2):
            self.peak = max(self.peak, rss_mb(self.pids))

    def finish(self) -> float:
        self._done.set()
        self.join()
        self.peak = max(self.peak, rss_mb(self.pids))
        return self.peak


def other_load() -> list[str]:
    """Processes of other people using CPU right now (pytest runs, ...), for the record."""
    seen = []
    mine = {os.getpid()}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if "pytest" in cmd or ("composer" in cmd and "serve" in cmd):
            seen.append(f"{entry.name}: {cmd[:110]}")
    return seen


# ------------------------------------------------------------------------------------ wrk

@dataclass
class Wrk:
    rps: float
    p50: float
    p99: float
    requests: int
    seconds: float
    non2xx: int
    socket_errors: int


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def parse_wrk(out: str) -> Wrk:
    def find(pattern: str) -> re.Match[str]:
        m = re.search(pattern, out)
        if m is None:
            raise BenchError(f"cannot read wrk's output ({pattern!r}):\n{out}")
        return m

    done = find(r"(\d+) requests in ([\d.]+)(ms|s|m)")
    seconds = float(done.group(2)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[done.group(3)]
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return Wrk(rps=float(find(r"Requests/sec:\s+([\d.]+)").group(1)),
               p50=_ms(find(r"\s50(?:\.000)?%\s+(\S+)").group(1)),
               p99=_ms(find(r"\s99(?:\.000)?%\s+(\S+)").group(1)),
               requests=int(done.group(1)), seconds=seconds,
               non2xx=int(non2xx.group(1)) if non2xx else 0,
               socket_errors=sum(int(g) for g in errors.groups()) if errors else 0)


def run_wrk(procs: Processes, url: str, conns: int, duration: float, cpu: int = LOAD_CPU) -> Wrk:
    argv = pinned(str(cpu), ["wrk", "-t1", f"-c{conns}", f"-d{duration:g}s", "--timeout", "10s", "--latency", url])
    proc = procs.start(f"wrk {url}", argv, stdout=subprocess.PIPE)
    try:
        out, _ = proc.popen.communicate(timeout=duration + 60)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk did not finish within {duration + 60:g} s on {url}") from None
    finally:
        procs.stop(proc)
    if proc.popen.returncode != 0:
        raise BenchError(f"wrk failed ({proc.popen.returncode}) on {url}:\n{out.decode(errors='replace')}")
    return parse_wrk(out.decode())


# ------------------------------------------------------------------------------- measuring

@dataclass
class Run:
    system: str
    page: str
    conns: int
    round: int
    wrk: Wrk
    cpu_s: float
    cpu_pct: float
    rss_mb: float
    fragment_failures: int
    core0: float
    core1: float
    other: float  # % of one core used by processes this script did not start
    steal: float  # % of one core taken by the hypervisor
    fragment_server_pct: float
    odd_log_lines: int = 0  # composer: log lines other than 2xx/499 access lines

    @property
    def cpu_ms_per_page(self) -> float:
        return self.cpu_s * 1000 / self.wrk.requests if self.wrk.requests else float("nan")

    @property
    def bad(self) -> int:
        return self.wrk.non2xx + self.wrk.socket_errors


@dataclass
class System:
    """One proxy under test and how to read its failures."""

    name: str
    proc: Proc
    base: str  # http://127.0.0.1:PORT
    kind: str  # "composer" or "tailor"
    admin: str = ""  # composer's admin listener
    notes: list[str] = field(default_factory=list)
    _failures: float = 0.0

    def failures(self) -> int:
        """Fragment failures since the last call: composer's composer_fragment_failures_total
        (summed), Tailor's error / fragment:error / fragment:warn / fragment:fallback events."""
        if self.kind == "tailor":
            total = float(sum(json.loads(http_get(f"{self.base}/__stats")[1]).values()))
        else:
            text = http_get(f"{self.admin}/metrics")[1].decode()
            total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                        if line.startswith("composer_fragment_failures_total{"))
        delta, self._failures = total - self._failures, total
        return round(delta)


_ACCESS = re.compile(rb'"msg": "access".*"status": (\d+)')


def _benign(line: bytes) -> bool:
    """A 2xx access line, a 499 (wrk closing its connections at the end of a run), another
    info line (starting, stopping, gunicorn booting workers), or the "serving" banner."""
    access = _ACCESS.search(line)
    if access is not None:
        return access.group(1).startswith(b"2") or access.group(1) == b"499"
    return b'"level": "info"' in line or b'"level": "debug"' in line or line.startswith(b"composer serving ")


def scan_composer_log(system: System) -> int:
    """composer's log lines that are not benign (other statuses, warnings, errors, tracebacks):
    count them, keep a few as notes, then empty the log."""
    log = system.proc.log
    assert log is not None
    odd = 0
    with log.open("rb") as f:
        for line in f:
            if not line.strip() or _benign(line):
                continue
            odd += 1
            text = line.decode("utf-8", "replace").strip()
            if len(system.notes) < 8 and text not in system.notes:
                system.notes.append(text[:400])
    os.truncate(log, 0)
    return odd


def measure(procs: Processes, system: System, fragment_server: Proc, page: str, conns: int,
            rnd: int, duration: float) -> Run:
    pids = tree(system.proc.pid)
    system.failures()  # reset the counters
    if system.kind == "composer":
        scan_composer_log(system)
    sampler = RssSampler(pids)
    sampler.start()
    ticks0, cpu0, frag0, own0 = core_ticks(), cpu_seconds(pids), cpu_seconds([fragment_server.pid]), own_cpu_seconds()
    t0 = time.monotonic()
    try:
        result = run_wrk(procs, f"{system.base}/{page}", conns, duration)
    finally:
        peak = sampler.finish()
    wall = time.monotonic() - t0
    ticks1, cpu1, frag1, own1 = core_ticks(), cpu_seconds(pids), cpu_seconds([fragment_server.pid]), own_cpu_seconds()
    check_alive(system.proc, fragment_server)
    cpu_s, frag_s = cpu1 - cpu0, frag1 - frag0

    def busy(name: str) -> float:
        return 100.0 * (ticks1[name][0] - ticks0[name][0]) / max(1, ticks1[name][1] - ticks0[name][1])

    process_s = (ticks1["cpu"][2] - ticks0["cpu"][2]) / TICK
    other = max(0.0, process_s - cpu_s - frag_s - (own1 - own0)) / wall * 100
    steal = (ticks1["cpu"][3] - ticks0["cpu"][3]) / TICK / wall * 100
    return Run(system.name, page, conns, rnd, result, cpu_s, cpu_s / wall * 100, peak, system.failures(),
               busy("cpu0"), busy("cpu1"), other, steal, frag_s / wall * 100,
               scan_composer_log(system) if system.kind == "composer" else 0)


def median_run(runs: list[Run]) -> Run:
    ordered = sorted(runs, key=lambda r: r.wrk.rps)
    return ordered[(len(ordered) - 1) // 2]


# ----------------------------------------------------------------------------- correctness

@dataclass
class Expected:
    content: str  # what the fragment server answers for it
    is_async: bool


def expected_fragments(template: Path) -> list[Expected]:
    out = []
    for tag in re.findall(r"<fragment\b[^>]*>", template.read_text()):
        src = html.unescape(re.search(r'\ssrc="([^"]*)"', tag).group(1))  # type: ignore[union-attr]
        url = urllib.parse.urlsplit(src)
        query = urllib.parse.parse_qs(url.query)
        name, size = url.path.rsplit("/", 1)[1], int(query.get("size", ["1024"])[0])
        out.append(Expected(f'<div class="{name}">' + "x" * max(0, size - 30) + "</div>",
                            re.search(r"\sasync[\s>=]", tag) is not None))
    return out


def verify(system: System, pages: list[str], templates: Path) -> dict[str, int]:
    """GET each page: a 200 holding every fragment's content, sync fragments in order."""
    sizes = {}
    for page in pages:
        status, body = http_get(f"{system.base}/{page}")
        text = body.decode("utf-8", "replace")
        if status != 200:
            raise BenchError(f"{system.name} /{page}: status {status}, expected 200:\n{text[:500]}")
        last = -1
        for frag in expected_fragments(templates / f"{page}.html"):
            at = text.find(frag.content)
            if at < 0:
                raise BenchError(f"{system.name} /{page}: the page lacks fragment content "
                                 f"{frag.content[:40]!r}… ({len(body)} bytes received)")
            if not frag.is_async:
                if at < last:
                    raise BenchError(f"{system.name} /{page}: {frag.content[:30]!r} is out of document order")
                last = at
        if "lorem ipsum" not in text:
            raise BenchError(f"{system.name} /{page}: the template's own markup is missing")
        sizes[page] = len(body)
    return sizes


# ------------------------------------------------------------------------------------ TTFB

def ttfb(port: int, path: str, samples: int) -> dict[str, float]:
    """Sequential GETs, each on a fresh connection (connect not timed): time from sending the
    request to the first response byte, to the first byte of markup (the first `<` after the
    response head), and to the last byte."""
    first_ms, markup_ms, last_ms = [], [], []
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
    for _ in range(samples):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t0 = time.perf_counter()
            s.sendall(request)
            got, t_first, t_markup = b"", 0.0, 0.0
            while chunk := s.recv(65536):
                now = time.perf_counter()
                got += chunk
                t_first = t_first or now
                if not t_markup:
                    head_end = got.find(b"\r\n\r\n")
                    if head_end >= 0 and got.find(b"<", head_end) >= 0:
                        t_markup = now
            t_last = time.perf_counter()
        if not got.startswith(b"HTTP/1.1 200") or b"</html>" not in got:
            raise BenchError(f"TTFB {path} on port {port}: not a whole 200 page: {got[:200]!r}…")
        first_ms.append((t_first - t0) * 1000)
        markup_ms.append((t_markup - t0) * 1000)
        last_ms.append((t_last - t0) * 1000)
    return {"p50": pct(first_ms, 50), "p99": pct(first_ms, 99), "markup_p50": pct(markup_ms, 50),
            "last_p50": pct(last_ms, 50), "n": samples}


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# ------------------------------------------------------------------------------------ setup

def ensure_tailor() -> None:
    """node-tailor@3.9.2 in bench/node_modules (git-ignored), installed with npm if missing."""
    manifest = HERE / "node_modules" / TAILOR / "package.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("version") == TAILOR_VERSION:
        return
    print(f"bench: npm install {TAILOR}@{TAILOR_VERSION} into {HERE / 'node_modules'}", flush=True)
    subprocess.run(["npm", "install", "--prefix", str(HERE), "--no-save", "--no-package-lock", "--no-audit",
                    "--no-fund", "--loglevel=error", f"{TAILOR}@{TAILOR_VERSION}"], cwd=HERE, check=True)
    if not manifest.exists():
        raise BenchError(f"npm did not install {TAILOR} into {manifest.parent}")


def prepare_work(fragment_port: int) -> Path:
    """bench/.work/routes.yaml and templates/, fragment URLs on this run's port."""
    WORK.mkdir(exist_ok=True)
    templates = WORK / "templates"
    if templates.exists():
        shutil.rmtree(templates)
    templates.mkdir()
    for source in sorted((HERE / "templates").glob("*.html")):
        text = source.read_text().replace(CANON_ORIGIN, f"127.0.0.1:{fragment_port}")
        (templates / source.name).write_text(text)
    routes = WORK / "routes.yaml"
    routes.write_text((HERE / "routes.yaml").read_text())
    return routes


def fragment_server_argv(kind: str, port: int) -> list[str]:
    if kind == "node":
        return ["node", str(HERE / "fragment_server.js"), str(port)]
    return [sys.executable, str(HERE / "fragment_server.py"), str(port)]


def compare_fragment_servers(procs: Processes, duration: float) -> dict[str, dict[str, float]]:
    """CPU seconds per request of each fragment server under wrk -c64 at /f/x?size=2048
    (server on CPU 1, wrk on CPU 0)."""
    out = {}
    for kind in ("node", "python"):
        port = free_port()
        proc = procs.start(f"fragment server ({kind})", pinned(str(LOAD_CPU), fragment_server_argv(kind, port)),
                           log=WORK / f"fragment_server_{kind}.log")
        try:
            url = f"http://127.0.0.1:{port}/f/x?size=2048"
            wait_ready(proc, url)
            run_wrk(procs, url, 64, 1, cpu=PROXY_CPU)  # warm-up
            cpu0 = cpu_seconds([proc.pid])
            result = run_wrk(procs, url, 64, duration, cpu=PROXY_CPU)
            cpu = cpu_seconds([proc.pid]) - cpu0
            out[kind] = {"rps": result.rps, "us_per_request": cpu / result.requests * 1e6,
                         "cpu_pct": cpu / result.seconds * 100, "bad": result.non2xx + result.socket_errors}
        finally:
            procs.stop(proc)
    return out


def start_composer(procs: Processes, routes: Path, *, workers: int, cpus: str | None, name: str) -> System:
    port, admin = free_port(), free_port()
    argv = [sys.executable, "-m", "composer", "serve", "--config", str(routes), "--host", "127.0.0.1",
            "--port", str(port), "--admin-port", str(admin)]
    if workers > 1:
        argv += ["--workers", str(workers)]
    log = WORK / f"{name.replace(' ', '_').replace(',', '')}.log"
    log.write_bytes(b"")
    proc = procs.start(name, pinned(cpus, argv), log=log)
    wait_ready(proc, f"http://127.0.0.1:{admin}/readyz")
    return System(name, proc, f"http://127.0.0.1:{port}", "composer", admin=f"http://127.0.0.1:{admin}")


def start_tailor(procs: Processes, templates: Path) -> System:
    port = free_port()
    proc = procs.start("tailor", pinned(str(PROXY_CPU), ["node", str(HERE / "tailor_server.js"), str(port),
                                                          str(templates)]),
                       log=WORK / "tailor.log", cwd=HERE)
    wait_ready(proc, f"http://127.0.0.1:{port}/__stats")
    return System("tailor", proc, f"http://127.0.0.1:{port}", "tailor")


# ----------------------------------------------------------------------------------- report

def f0(x: float) -> str:
    return f"{x:,.0f}"


def f1(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def f2(x: float) -> str:
    return f"{x:.2f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "–"


def composer_digest() -> str:
    """A digest of composer/*.py as they are now: the code a composer started now runs."""
    h = hashlib.sha1()
    for path in sorted((ROOT / "composer").glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def machine(start_digest: str) -> list[str]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    def command(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=False).stdout.strip()
        except OSError:
            return "?"

    wrk_version = command(["wrk", "-v"]).splitlines()[0:1] or ["?"]
    commit = command(["git", "rev-parse", "--short", "HEAD"])
    dirty = command(["git", "status", "--porcelain", "--", "composer"]).splitlines()
    return [
        (f"- CPU: {model}, {os.cpu_count()} cores; {round(os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30)} GiB; "
        f"Linux {platform.release()}"),
        (f"- Python {platform.python_version()}, aiohttp {version('aiohttp')}, uvloop {version('uvloop')}; "
        f"Node {command(['node', '-v'])}, {TAILOR} "
        f"{json.loads((HERE / 'node_modules' / TAILOR / 'package.json').read_text())['version']}; "
        f"{wrk_version[0].split(' Copyright')[0]}"),
        f"- composer at git {commit}" + (f" with uncommitted changes in {len(dirty)} file(s) of composer/"
                                         if dirty else "")
        + (f" (composer/*.py digest {start_digest})" if composer_digest() == start_digest else
           f" (composer/*.py digest {start_digest} at the start, {composer_digest()} at the end: **the code "
           "changed during the run**)"),
    ]


@dataclass
class Report:
    args: argparse.Namespace
    started: str = ""
    load_before: str = ""
    load_after: str = ""
    others: list[str] = field(default_factory=list)
    fragment_servers: dict[str, dict[str, float]] = field(default_factory=dict)
    fragment_server: str = ""
    page_bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    ttfb: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    floor: Wrk | None = None
    scaling: list[Run] = field(default_factory=list)
    scaling_error: str = ""
    notes: dict[str, list[str]] = field(default_factory=dict)
    aborted: str = ""
    digest: str = ""
    elapsed: float = 0.0

    def cells(self) -> list[tuple[str, int]]:
        seen: list[tuple[str, int]] = []
        for run in self.runs:
            if (run.page, run.conns) not in seen:
                seen.append((run.page, run.conns))
        return seen

    def median(self, system: str, page: str, conns: int) -> Run | None:
        runs = [r for r in self.runs if r.system == system and r.page == page and r.conns == conns]
        return median_run(runs) if runs else None

    @staticmethod
    def noisy(run: Run) -> bool:
        return run.other + run.steal > 20

    def main_table(self) -> list[str]:
        lines = [
            ("| page | conns | req/s composer | req/s Tailor | req/s C/T | p50 ms C | p50 ms T | p99 ms C | p99 ms T "
            "| CPU % C | CPU % T | CPU ms/page C | CPU ms/page T | CPU/page C/T | RSS MB C | RSS MB T "
            "| non-2xx+err C | non-2xx+err T |"),
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for page, conns in self.cells():
            c, t = self.median("composer", page, conns), self.median("tailor", page, conns)
            if c is None or t is None:
                continue
            mark = " †" if self.noisy(c) or self.noisy(t) else ""
            lines.append(
                f"| {page}{mark} | {conns} | {f0(c.wrk.rps)} | {f0(t.wrk.rps)} | **{ratio(c.wrk.rps, t.wrk.rps)}** "
                f"| {f1(c.wrk.p50)} | {f1(t.wrk.p50)} | {f1(c.wrk.p99)} | {f1(t.wrk.p99)} "
                f"| {c.cpu_pct:.0f} | {t.cpu_pct:.0f} | {f2(c.cpu_ms_per_page)} | {f2(t.cpu_ms_per_page)} "
                f"| {ratio(c.cpu_ms_per_page, t.cpu_ms_per_page)} | {c.rss_mb:.0f} | {t.rss_mb:.0f} "
                f"| {c.bad} | {t.bad} |")
        return lines

    def per_fragment(self) -> list[str]:
        lines = ["| CPU per page (ms) | composer | Tailor | C/T |", "|---|---:|---:|---:|"]
        for conns in (16, 64):
            got = {s: {p: self.median(s, p, conns) for p in ("page5", "page20")} for s in SYSTEMS}
            if any(r is None for per in got.values() for r in per.values()):
                continue
            cpp = {s: {p: got[s][p].cpu_ms_per_page for p in got[s]} for s in SYSTEMS}  # type: ignore[union-attr]
            extra = {s: (cpp[s]["page20"] - cpp[s]["page5"]) / 15 * 1000 for s in SYSTEMS}
            for p in ("page5", "page20"):
                lines.append(f"| {p} at c{conns} | {f2(cpp['composer'][p])} | {f2(cpp['tailor'][p])} "
                             f"| {ratio(cpp['composer'][p], cpp['tailor'][p])} |")
            lines.append(f"| **per extra fragment** at c{conns}, µs = (page20 − page5) / 15 "
                         f"| **{extra['composer']:.0f}** | **{extra['tailor']:.0f}** "
                         f"| {ratio(extra['composer'], extra['tailor'])} |")
        return lines if len(lines) > 2 else []

    def markdown(self) -> str:
        a = self.args
        out = [f"# composer vs Tailor {TAILOR_VERSION}: benchmark results", "",
               f"Run {self.started}, {self.elapsed / 60:.0f} min. Command: `{shlex.join(['python', *sys.argv])}`"
               + (" — **a `--quick` smoke run: numbers are for checking the harness only.**" if a.quick else ""),
               "", *machine(self.digest), "",
               *([f"**ABORTED:** {self.aborted}", ""] if self.aborted else []),
               (f"- {a.duration:g} s of `wrk -t1 --latency` per run, {a.rounds} round(s) per cell, the two systems "
               "alternating; each cell shows the **median round** (by req/s; the lower middle one for an even count) of each system; all rounds are in "
               "the appendix."),
               ("- Proxies (one process each) pinned to CPU 0; wrk, the fragment server and this script to CPU 1. "
               f"Fragment server: **{self.fragment_server}** (cheaper per request, see below). Fragment responses "
               "carry no Cache-Control, so composer's fragment cache stores nothing: every page fetches every "
               "fragment."),
               ("- Tailor: `bench/tailor_server.js`, templates parsed once and cached (its best case); otherwise "
               "defaults (Node's global keep-alive agent). composer: `python -m composer serve` as shipped "
               "(uvloop, one JSON access-log line per request to a file, Prometheus metrics)."),
               f"- Load average before / after: {self.load_before} / {self.load_after}. "
               + (f"Other CPU users seen at the start: {len(self.others)} (e.g. `{self.others[0]}`). "
                  if self.others else "No pytest or other composer process seen at the start. ")
               + "The `other %` column of the appendix is CPU used during each run by processes this script "
               "did not start (% of one core).", ""]
        others = [r.other + r.steal for r in self.runs]
        if others and statistics.median(others) > 10:
            out += [(f"**The machine was busy** (median other load + steal {statistics.median(others):.0f} % of a "
                    f"core during runs, max {max(others):.0f} %): treat the numbers as noisy."), ""]
        elif any(self.noisy(r) for r in self.runs):
            out += [(f"{sum(self.noisy(r) for r in self.runs)} of {len(self.runs)} runs were disturbed (other "
                     "processes + hypervisor steal > 20 % of a core; see the appendix)."), ""]
        saturated = [r for r in self.runs if r.core1 >= 95]
        if saturated:
            out += [(f"In {len(saturated)} of {len(self.runs)} runs CPU 1 (wrk + the fragment server) was "
                     "≥ 95 % busy: there the load side, not the proxy, may have set the pace (see core1 % in "
                     "the appendix)."), ""]
        out += ["## Throughput, latency, CPU, memory", "",
                ("C = composer, T = Tailor. CPU % is of one core (the proxy's). CPU ms/page = proxy CPU seconds "
                "/ pages served. non-2xx+err = wrk's non-2xx responses plus socket errors (timeouts at 10 s, "
                "resets). † = in a median round shown, other processes or the hypervisor (steal) took more than "
                "20 % of a core: a disturbed measurement."), "", *self.main_table(), ""]
        per_fragment = self.per_fragment()
        if per_fragment:
            out += ["## CPU per page and per extra fragment", "",
                    ("From the median rounds above. page5 and page20 also differ in body sizes and page5 has an "
                    "async fragment, so the per-fragment figure is the marginal cost of a 2 KB fragment plus "
                    "noise."), "", *per_fragment, ""]
        if self.ttfb:
            out += ["## Time to first byte while fragments are pending", "",
                    ("A raw-socket client, one fresh connection per sample (connect not timed), sequential, "
                    "nothing else of this script running. *first byte* = first response byte; *first markup* = first byte of the "
                    "page body; *last byte* = the whole page. page5np = page5 without a primary (the slowest "
                    "synchronous fragment answers after 50 ms, the async one after 30 ms)."), "",
                    ("| page | system | N | first byte p50 ms | first byte p99 ms | first markup p50 ms "
                    "| last byte p50 ms |"), "|---|---|---:|---:|---:|---:|---:|"]
            for (page, system), t in self.ttfb.items():
                out.append(f"| {page} | {system} | {t['n']:.0f} | {f1(t['p50'])} | {f1(t['p99'])} "
                           f"| {f1(t['markup_p50'])} | {f1(t['last_p50'])} |")
            out.append("")
        if self.floor is not None:
            fl = self.floor
            out += ["## The physical floor", "",
                    (f"wrk straight at page5's slowest synchronous fragment (`/f/recos?delay=50&size=5120`) at "
                    f"c16: **{f0(fl.rps)} req/s, p50 {f1(fl.p50)} ms, p99 {f1(fl.p99)} ms** (at most 16 / 0.05 s "
                    "= 320 req/s). No page5 at c16 can be faster than this."), ""]
        if self.scaling_error:
            out += ["## composer on 1 and 2 worker processes (page20, c64)", "",
                    "Not measured:", "", "```", *self.scaling_error.splitlines(), "```", ""]
        if self.scaling:
            out += ["## composer on 1 and 2 worker processes (page20, c64)", "",
                    ("2 workers: `composer serve --workers 2`, unpinned, so the workers share the cores with wrk "
                    "and the fragment server (CPU 1 is no longer free for the load generator). CPU % is summed "
                    "over the arbiter and its workers (of one core)."), "",
                    "| composer | req/s | p50 ms | p99 ms | CPU % | RSS MB | non-2xx+err | other % |",
                    "|---|---:|---:|---:|---:|---:|---:|---:|"]
            one = self.median("composer", "page20", 64)
            two = median_run(self.scaling)
            for label, r in (("1 process, CPU 0", one), ("2 workers, unpinned", two)):
                if r is not None:
                    out.append(f"| {label} | {f0(r.wrk.rps)} | {f1(r.wrk.p50)} | {f1(r.wrk.p99)} | {r.cpu_pct:.0f} "
                               f"| {r.rss_mb:.0f} | {r.bad} | {r.other:.0f} |")
            if two.core0 >= 95 and two.core1 >= 95:
                out.append(f"\nBoth cores were busy ({two.core0:.0f} % / {two.core1:.0f} %) in the median 2-worker "
                           "round: with wrk and the fragment server on the same two cores, the machine, not "
                           "composer, sets the limit; a real scaling figure needs a separate load machine.")
            if one is not None:
                out.append(f"\n2 workers / 1 process: **{ratio(two.wrk.rps, one.wrk.rps)}** req/s. "
                           f"Tailor at the same cell: {f0(self.median('tailor', 'page20', 64).wrk.rps)} req/s "  # type: ignore[union-attr]
                           "(Tailor is one process; it has no cluster mode of its own).")
            out.append("")
        if self.fragment_servers:
            out += ["## Which fragment server", "",
                    ("`wrk -t1 -c64` at `/f/x?size=2048` (no delay), server pinned to CPU 1 and wrk to CPU 0; "
                    "CPU seconds of the server process from /proc/PID/stat divided by requests."), "",
                    "| fragment server | req/s | server CPU % | CPU µs / request | errors |", "|---|---:|---:|---:|---:|"]
            for kind, fs in self.fragment_servers.items():
                label = "bench/fragment_server.js (Node http)" if kind == "node" else \
                    "bench/fragment_server.py (aiohttp + uvloop)"
                out.append(f"| {label} | {f0(fs['rps'])} | {fs['cpu_pct']:.0f} | **{fs['us_per_request']:.1f}** "
                           f"| {fs['bad']:.0f} |")
            out.append("")
        if self.page_bytes:
            out += ["## Page sizes (bytes, one GET each, checked before measuring)", "",
                    ("Every page was a 200 holding every fragment's content, sync fragments in document order. "
                    "Tailor's pages are larger: it inlines its client runtime (pipe.min.js) and wraps each "
                    "fragment in `Pipe.start/end` scripts."), "",
                    "| page | composer | Tailor |", "|---|---:|---:|"]
            for page in self.page_bytes.get("composer", {}):
                out.append(f"| {page} | {f0(self.page_bytes['composer'][page])} "
                           f"| {f0(self.page_bytes.get('tailor', {}).get(page, 0))} |")
            out.append("")
        notes = {k: v for k, v in self.notes.items() if v}
        if notes:
            out += ["## Log lines worth a look", ""]
            for name, lines in notes.items():
                out += [f"{name} (first {len(lines)}):", "", "```", *lines, "```", ""]
        out += ["## Appendix: every run", "",
                ("core0/core1 = how busy each CPU was (irq/softirq included); frag srv % = the fragment "
                 "server's CPU; frag fail = fragment failures (composer: composer_fragment_failures_total; "
                 "Tailor: error, fragment:error/warn/fallback events); odd log = composer log lines other than "
                 "2xx access lines and 499s (wrk closing connections at the end of a run); other % = CPU used by "
                 "processes this script did not start; steal % = taken by the hypervisor (all % of one core)."),
                "",
                ("| page | conns | round | system | req/s | p50 ms | p99 ms | pages | non-2xx | sock err | CPU % "
                 "| CPU ms/page | RSS MB | frag fail | odd log | core0 % | core1 % | frag srv % | other % | steal % |"),
                "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in [*self.runs, *self.scaling]:
            out.append(f"| {r.page} | {r.conns} | {r.round} | {r.system} | {f0(r.wrk.rps)} | {f1(r.wrk.p50)} "
                       f"| {f1(r.wrk.p99)} | {r.wrk.requests} | {r.wrk.non2xx} | {r.wrk.socket_errors} "
                       f"| {r.cpu_pct:.0f} | {f2(r.cpu_ms_per_page)} | {r.rss_mb:.0f} | {r.fragment_failures} "
                       f"| {r.odd_log_lines} | {r.core0:.0f} | {r.core1:.0f} | {r.fragment_server_pct:.0f} "
                       f"| {r.other:.0f} | {r.steal:.0f} |")
        return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------- main

def _terminate(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def scale(args: argparse.Namespace, procs: Processes, report: Report, routes: Path, templates: Path,
          fragment_server: Proc) -> None:
    """composer --workers 2, unpinned, on page20 at c64."""
    if composer_digest() != report.digest:
        report.notes.setdefault("composer, 2 workers", []).append(
            f"composer/*.py changed during the run (digest {report.digest} → {composer_digest()}): the 2-worker "
            "composer runs other code than the one-process composer")
    two = start_composer(procs, routes, workers=2, cpus=None, name="composer, 2 workers")
    two.notes[:0] = report.notes.get("composer, 2 workers", [])
    report.notes["composer, 2 workers"] = two.notes
    try:
        verify(two, ["page20"], templates)
        run_wrk(procs, f"{two.base}/page20", 64, args.warmup)
        for rnd in range(1, args.rounds + 1):
            run = measure(procs, two, fragment_server, "page20", 64, rnd, args.duration)
            report.scaling.append(run)
            print(f"  page20 c64 r{rnd} 2 workers {run.wrk.rps:8,.0f} req/s  p50 {run.wrk.p50:7.1f} ms  "
                  f"p99 {run.wrk.p99:7.1f} ms  cpu {run.cpu_pct:3.0f}%  bad {run.bad}  other {run.other:3.0f}%",
                  flush=True)
    finally:
        status = procs.stop(two.proc)
        scan_composer_log(two)
        if status not in (0, None):
            two.notes.append(f"composer --workers 2 exited with status {status} on SIGTERM (expected 0)")


def bench(args: argparse.Namespace, procs: Processes, report: Report) -> None:
    for tool in ("wrk", "taskset", "node", "npm"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed")
    if (os.cpu_count() or 1) < 2:
        raise BenchError("needs at least 2 CPUs (the proxy on CPU 0, the load on CPU 1)")
    os.sched_setaffinity(0, {LOAD_CPU})  # this script stays off the proxies' core
    ensure_tailor()
    WORK.mkdir(exist_ok=True)
    report.digest = composer_digest()
    pages = [p for p in args.pages.split(",") if p]
    for page in pages:
        if page not in CONNS:
            raise BenchError(f"unknown page {page!r} (known: {', '.join(CONNS)})")

    kind = args.fragment_server
    if kind == "auto":
        print("bench: comparing the fragment servers", flush=True)
        report.fragment_servers = compare_fragment_servers(procs, args.fs_duration)
        for k, fs in report.fragment_servers.items():
            print(f"  {k}: {fs['rps']:,.0f} req/s, {fs['us_per_request']:.1f} µs CPU/request", flush=True)
        kind = min(report.fragment_servers, key=lambda k: report.fragment_servers[k]["us_per_request"])
    report.fragment_server = {"node": "bench/fragment_server.js (Node http)",
                              "python": "bench/fragment_server.py (aiohttp)"}[kind]

    fport = free_port()
    routes = prepare_work(fport)
    templates = WORK / "templates"
    fragment_server = procs.start(f"fragment server ({kind})", pinned(str(LOAD_CPU), fragment_server_argv(kind, fport)),
                                  log=WORK / "fragment_server.log")
    wait_ready(fragment_server, f"http://127.0.0.1:{fport}/f/warm")
    composer = start_composer(procs, routes, workers=1, cpus=str(PROXY_CPU), name="composer")
    tailor = start_tailor(procs, templates)
    systems = {"composer": composer, "tailor": tailor}
    report.notes = {"composer": composer.notes}

    all_pages = [*pages, "page5np"] if "page5" in pages else pages
    for name, system in systems.items():
        report.page_bytes[name] = verify(system, all_pages, templates)
        system.failures()
    print("bench: every page verified through both proxies: " + ", ".join(
        f"{p} {report.page_bytes['composer'][p]:,}/{report.page_bytes['tailor'][p]:,} B" for p in all_pages),
        flush=True)

    cell = 0
    for page in pages:
        for system in systems.values():  # warm-up: connections, pools, caches, JIT
            run_wrk(procs, f"{system.base}/{page}", 16, args.warmup)
        for conns in CONNS[page]:
            for rnd in range(1, args.rounds + 1):
                order = SYSTEMS if (cell + rnd) % 2 else SYSTEMS[::-1]
                for name in order:
                    run = measure(procs, systems[name], fragment_server, page, conns, rnd, args.duration)
                    report.runs.append(run)
                    check_alive(composer.proc, tailor.proc)
                    print(f"  {page} c{conns} r{rnd} {name:8} {run.wrk.rps:8,.0f} req/s  p50 {run.wrk.p50:7.1f} ms"
                          f"  p99 {run.wrk.p99:7.1f} ms  cpu {run.cpu_pct:3.0f}%  {run.cpu_ms_per_page:.2f} ms/page"
                          f"  rss {run.rss_mb:4.0f} MB  bad {run.bad}  frag-fail {run.fragment_failures}"
                          f"  odd-log {run.odd_log_lines}  other {run.other:3.0f}%", flush=True)
                    time.sleep(0.3)
            cell += 1

    if "page5" in pages and args.ttfb_samples > 0:
        print(f"bench: time to first byte, {args.ttfb_samples} samples per system", flush=True)
        for page in ("page5np", "page5"):
            for name, system in systems.items():
                t = ttfb(int(system.base.rsplit(":", 1)[1]), f"/{page}", args.ttfb_samples)
                report.ttfb[(page, name)] = t
                print(f"  {page:8} {name:8} first byte p50 {t['p50']:6.1f} ms  p99 {t['p99']:6.1f} ms  "
                      f"first markup p50 {t['markup_p50']:6.1f} ms  last byte p50 {t['last_p50']:6.1f} ms",
                      flush=True)
        check_alive(composer.proc, tailor.proc)

    if "page5" in pages:
        url = f"http://127.0.0.1:{fport}/f/recos?delay=50&size=5120"
        run_wrk(procs, url, 16, args.warmup)
        report.floor = run_wrk(procs, url, 16, args.duration)
        print(f"bench: floor (the 50 ms fragment alone, c16): {report.floor.rps:,.0f} req/s, "
              f"p50 {report.floor.p50:.1f} ms, p99 {report.floor.p99:.1f} ms", flush=True)

    for system in systems.values():
        system.failures()
    if "page20" in pages:
        print("bench: composer --workers 2 (unpinned) on page20 at c64", flush=True)
        try:
            scale(args, procs, report, routes, templates, fragment_server)
        except BenchError as exc:
            report.scaling_error = str(exc)
            print(f"bench: composer --workers 2 not measured: {exc}", file=sys.stderr, flush=True)
    tailor_stats = json.loads(http_get(f"{tailor.base}/__stats")[1])
    if any(tailor_stats.values()):
        report.notes["tailor events over the whole run"] = [json.dumps(tailor_stats)] + \
            tailor.proc.tail(20).splitlines()
    status = procs.stop(composer.proc)
    scan_composer_log(composer)
    if status != 0:
        composer.notes.append(f"composer exited with status {status} on SIGTERM (expected 0)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=15, help="seconds of wrk per run (default 15)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per page × concurrency (default 3)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 s per run, 1 round, 30 TTFB samples; writes bench/.work/RESULTS.quick.md")
    parser.add_argument("--pages", default="page0,page5,page20", help="pages to drive (default all three)")
    parser.add_argument("--fragment-server", choices=("auto", "node", "python"), default="auto",
                        help="auto (default): measure both, use the cheaper per request")
    parser.add_argument("--ttfb-samples", type=int, default=200, help="TTFB samples per system and page")
    parser.add_argument("--output", help="where to write the markdown (default bench/RESULTS.md)")
    args = parser.parse_args(argv)
    explicit = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
    if args.quick:
        args.duration = args.duration if "--duration" in explicit else 3
        args.rounds = args.rounds if "--rounds" in explicit else 1
        args.ttfb_samples = args.ttfb_samples if "--ttfb-samples" in explicit else 30
    args.warmup = 1 if args.quick or args.duration < 5 else 2
    args.fs_duration = min(args.duration, 10)
    output = Path(args.output) if args.output else (WORK / "RESULTS.quick.md" if args.quick else HERE / "RESULTS.md")

    report = Report(args, started=time.strftime("%Y-%m-%d %H:%M %Z"),
                    load_before=" ".join(Path("/proc/loadavg").read_text().split()[:3]), others=other_load())
    t0 = time.monotonic()
    procs = Processes()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    status = 0
    try:
        bench(args, procs, report)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        report.aborted, status = str(exc), 1
    except KeyboardInterrupt:
        print("bench: interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
    report.elapsed = time.monotonic() - t0
    report.load_after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    if report.aborted:
        if not report.runs:
            return status
        output = WORK / "RESULTS.aborted.md"  # a partial run never replaces a whole one
    text = report.markdown()
    print("\n" + text)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    raw = WORK / (output.stem + ".json")
    raw.write_text(json.dumps({"runs": [asdict(r) for r in [*report.runs, *report.scaling]],
                               "ttfb": {f"{p} {s}": t for (p, s), t in report.ttfb.items()},
                               "floor": asdict(report.floor) if report.floor else None,
                               "fragment_servers": report.fragment_servers}, indent=1))
    print(f"bench: written to {output} (every run as JSON: {raw})")
    return status


if __name__ == "__main__":
    sys.exit(main())
