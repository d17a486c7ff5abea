"""composer against Tailor (npm node-tailor 3.9.2), nginx SSI and Varnish ESI, side by side: same
pages, same fragment server, same run.

    python bench/run.py [--duration 15] [--rounds 3] [--quick] [--systems composer,tailor,nginx,varnish]
                        [--pages page0,page5,page20,page100,page1mb] [--fragment-server auto|node|python]
                        [--ttfb-samples 200] [--no-curve] [--no-scaling] [--no-memory] [--output PATH]
                        [--python PYTHON]

What it does, in order (every process it starts is stopped at the end, also on Ctrl-C,
SIGTERM or an error; each runs in its own process group, which is what gets killed):

1. Installs node-tailor@3.9.2 into bench/node_modules (git-ignored) with npm if missing. Tailor,
   nginx and Varnish are peers: one that cannot run here (no node/npm, no /usr/sbin/nginx or
   /usr/sbin/varnishd — Debian's nginx-light and varnish —, it does not start or fails the page
   check) is skipped with a printed note, also in the report; the run goes on without it.
2. Copies bench/routes.yaml and bench/templates/ into bench/.work/ (git-ignored), pointing the
   fragment URLs at the port picked for this run (the files in bench/ say 127.0.0.1:9800). For
   the peers the same templates are rewritten, each <fragment> to `<!--# include virtual=… -->`
   (nginx) or `<esi:include src=…/>` (Varnish), into a temp dir removed at the end.
3. Fragment server: measures the CPU per request of bench/fragment_server.js (Node `http`)
   and bench/fragment_server.py (uvloop + httptools) under `wrk -c64` at /f/x?size=2048 (server
   on CPU 1, wrk on CPU 0), and uses the cheaper one (`--fragment-server auto`). It also serves
   the ESI pages at /p/NAME: Varnish's origin.
4. Starts the fragment server (CPU 1) and the systems, each pinned to CPU 0 with all its
   processes: Tailor (bench/tailor_server.js, templates parsed once and cached — its best
   case), `python -m composer serve` (uvloop), nginx (generated config: one worker, SSI, an
   upstream with keep-alive) and varnishd (generated VCL: page templates cached and ESI-parsed
   once, includes passed). wrk and this script run on CPU 1. Checks that every page, through
   each system, is a 200 holding every fragment's content (sync ones in document order), and
   that the warm-up wrk run of each page had no non-2xx responses or socket errors.
5. For each page × concurrency (page0, page1, page20, page100, page1mb: 16, 64; page5: 16, 64, 256): a
   warm-up, then `--rounds` rounds of `--duration` s of wrk per system, rotating which goes
   first, each run after `--settle` s of the same load, unmeasured. The median round (by req/s)
   of each system is reported; every round is in RESULTS.md. Per run: req/s, p50/p99 (wrk
   --latency), CPU % and CPU ms per page (utime + stime from /proc/PID/stat summed over the
   system's process tree — nginx master + worker, varnishd manager + cache child —, taken at
   both ends of the run), RSS (max seen, summed over the tree), non-2xx + socket errors,
   fragment failures (composer's composer_fragment_failures_total, Tailor's error events,
   nginx's error.log at [error] or worse, Varnish's
   fetch_failed/esi_errors/backend_fail/backend_unhealthy), composer log lines other than
   2xx/499 access lines, how busy each core was, including other processes' load, and what the
   kernel dropped or sent again from the start of its settle (listen overflows, loopback packets past a CPU's
   input queue, TCP retransmits: `kernel_drops`).
6. page20 at c4, c8 and c32 too (`CURVE`), one round each, composer and nginx: CPU per page
   against how busy the proxy is (not with --no-curve).
7. Time to first byte: a raw-socket client (one connection per sample, sequential, N samples)
   on page5np (no primary) and page5, while fragments are pending.
8. CPU per page for every page, and per fragment = (cpu(pageN) − cpu(page0)) / N, also against
   page20's; what each extra fragment costs, (cpu(page20) − cpu(page1)) / 19 (page1 is page20
   with its first fragment only), and what the first one costs over page0; and composer's CPU per
   page over each peer's round by round (median and range: a round measures every system back to
   back, so the machine's drift between rounds cancels).
9. The physical floor: wrk straight at page5's slowest synchronous fragment (50 ms) at c16.
10. composer's memory per load: for each page × concurrency a composer started for it, its RSS
   once ready and its high-water mark after `--duration` s of wrk (not with --no-memory); the
   table of step 5 reads one process's high-water mark over every cell before.
11. composer --workers 2 (unpinned: wrk and the fragment server share a core with it) on
   page20 at c64, against the one-process figure (not with --no-scaling).

Prints the markdown and writes it to bench/RESULTS.md (`--quick`: bench/.work/RESULTS.quick.md
unless --output is given) with the date, the machine, the load and the exact command.
`--quick` is a smoke run: 3 s per run, 1 round, 30 TTFB samples. Needs wrk and taskset and a
machine with at least 2 CPUs; node + npm for Tailor and bench/fragment_server.js.
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
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / ".work"
TAILOR = "node-tailor"
TAILOR_VERSION = "3.9.2"
CANON_ORIGIN = "127.0.0.1:9800"  # what bench/templates/*.html say
CONNS = {"page0": (16, 64), "page1": (16, 64), "page5": (16, 64, 256), "page20": (16, 64), "page100": (16, 64),
         "page1mb": (16, 64)}
# page20 at these too, one round each, for composer and nginx: CPU per page against how busy the
# proxy is (with page20's own 16 and 64, the curve; see Report.curve_table).
CURVE = (4, 8, 32)
# What each fragment server is, as the report names it.
FRAGMENT_SERVERS = {"node": "bench/fragment_server.js (Node http)",
                    "python": "bench/fragment_server.py (uvloop + httptools)"}
PROXY_CPU, LOAD_CPU = 0, 1  # the proxy under test; wrk, the fragment server and this script
SYSTEMS = ("composer", "tailor", "nginx", "varnish")
TICK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """Something the benchmark cannot go on from; the message says what."""


# ---------------------------------------------------------------------------------- processes

def pinned(cpus: str | None, argv: list[str]) -> list[str]:
    """argv under taskset: `cpus` like "0" or "0,1" (None: every CPU, i.e. unpinned)."""
    return ["taskset", "-c", cpus if cpus is not None else f"0-{(os.cpu_count() or 1) - 1}", *argv]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path | None
    term_leader_only: bool = False  # SIGTERM the leader alone (it stops its children: varnishd)

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
              stdout: Any = None, env: dict[str, str] | None = None) -> Proc:
        out = open(log, "ab") if log is not None else None  # noqa: SIM115
        sink: Any = out if out is not None else subprocess.DEVNULL
        try:
            popen = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=stdout if stdout is not None else sink, stderr=sink,
                                     start_new_session=True)
        finally:
            if out is not None:
                out.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace: float = 15.0) -> int | None:
        if proc in self.procs:
            self.procs.remove(proc)
        if proc.popen.poll() is None:
            try:
                if proc.term_leader_only:
                    os.kill(proc.pid, signal.SIGTERM)
                else:
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


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """CPU seconds in user space and in the kernel (system calls, loopback TCP) of `pids`."""
    user = system = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])
        system += int(fields[12])
    return user / TICK, system / TICK


def syscalls(pid: int) -> int:
    """Read and write system calls `pid` made so far (/proc/PID/io: libuv reads and writes
    sockets with read(2) and write(2)/writev(2)); 0 when unreadable."""
    try:
        fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    except (OSError, ValueError):
        return 0
    return int(fields.get("syscr", 0)) + int(fields.get("syscw", 0))


def cpu_seconds(pids: list[int]) -> float:
    return sum(cpu_split(pids))


def rss_mb(pids: list[int]) -> float:
    """The RSS of a process tree, in MB (a process gone, or a zombie without memory, counts 0)."""
    total = 0.0
    for pid in pids:
        try:
            total += status_mb(pid, "VmRSS")
        except (OSError, BenchError):
            continue
    return total


def status_mb(pid: int, field: str) -> float:
    """One process's `/proc/PID/status` figure in MB: VmRSS now, VmHWM its high-water mark."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no {field} for process {pid}")


@dataclass
class Memory:
    """A composer started for one load: its RSS once ready (nothing fetched yet), and its
    high-water mark after `--duration` s of wrk."""

    page: str
    conns: int
    idle_mb: float
    high_mb: float
    wrk: Wrk


def memory_of(procs: Processes, proc: Proc, base: str, page: str, conns: int, duration: float) -> Memory:
    """`proc` (a composer just started, serving at `base`) under `page` at `conns` connections."""
    idle = status_mb(proc.popen.pid, "VmRSS")
    wrk = run_wrk(procs, f"{base}/{page}", conns, duration)
    return Memory(page, conns, idle, status_mb(proc.popen.pid, "VmHWM"), wrk)


def core_ticks() -> dict[str, tuple[int, ...]]:
    """Per CPU ("cpu0", "cpu1", and "cpu" for all), ticks from /proc/stat: (busy, total,
    process time = user + nice + system, steal). Busy includes irq/softirq (loopback TCP)."""
    out: dict[str, tuple[int, ...]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if not line.startswith("cpu"):
            break
        name, *values = line.split()
        v = [int(x) for x in values[:8]]  # user nice system idle iowait irq softirq steal
        out[name] = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7], sum(v), v[0] + v[1] + v[2], v[7])
    return out


def kernel_drops() -> tuple[int, int, int]:
    """Machine-wide counts of what the kernel dropped or sent again: connections past a listen
    backlog (TcpExt ListenOverflows), packets past a CPU's input queue (the second column of
    /proc/net/softnet_stat: loopback traffic sent faster than the CPU's softirq takes it), and
    TCP segments retransmitted (Tcp RetransSegs). Loopback loses nothing else, so a run where
    one of them grew can owe its p99 to a retransmit (a SYN's or SYN-ACK's is 1 s)."""
    def counter(path: str, prefix: str, name: str) -> int:
        lines = [line.split() for line in Path(path).read_text().splitlines() if line.startswith(prefix)]
        for names, values in zip(lines[::2], lines[1::2]):
            if name in names:
                return int(values[names.index(name)])
        return 0

    backlog = sum(int(line.split()[1], 16) for line in Path("/proc/net/softnet_stat").read_text().splitlines())
    return (counter("/proc/net/netstat", "TcpExt:", "ListenOverflows"), backlog,
            counter("/proc/net/snmp", "Tcp:", "RetransSegs"))


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


def under_load(procs: Processes, url: str, conns: int, seconds: float, argv: list[str]) -> Wrk:
    """Run the profiler `argv` (which samples for `seconds`) while wrk loads `url` a little longer."""
    result: list[Wrk] = []
    load = threading.Thread(target=lambda: result.append(run_wrk(procs, url, conns, seconds + 3)))
    load.start()
    try:
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=seconds + 120)
    finally:
        load.join()
    return result[0]


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
    dropped: tuple[int, int, int] = (0, 0, 0)  # kernel_drops() from the settle's start to the run's end (the whole machine)

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
    kind: str  # "composer", "tailor", "nginx" or "varnish"
    admin: str = ""  # composer's admin listener
    state: Path | None = None  # nginx: its directory (error.log); varnish: its -n working directory
    notes: list[str] = field(default_factory=list)
    _failures: float = 0.0
    _log_offset: int = 0

    def failures(self) -> int:
        """Fragment failures since the last call: composer's composer_fragment_failures_total
        (summed), Tailor's error / fragment:error / fragment:warn / fragment:fallback events,
        nginx's error.log lines at [error] or worse (a failed include leaves the page a 200),
        Varnish's fetch_failed + esi_errors + backend_fail + backend_unhealthy counters."""
        if self.kind == "tailor":
            total = float(sum(json.loads(http_get(f"{self.base}/__stats")[1]).values()))
        elif self.kind == "nginx":
            total = self._failures + self._nginx_errors()
        elif self.kind == "varnish":
            total = float(sum(varnish_counters(self.state, VARNISH_FAILURES).values()))  # type: ignore[arg-type]
        else:
            text = http_get(f"{self.admin}/metrics")[1].decode()
            total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                        if line.startswith("composer_fragment_failures_total{"))
        delta, self._failures = total - self._failures, total
        return round(delta)

    def _nginx_errors(self) -> int:
        """error.log lines since the last look: [error] and worse are counted, the first few
        of any level are kept as notes."""
        assert self.state is not None
        log = self.state / "error.log"
        if not log.exists():
            return 0
        with log.open("rb") as f:
            f.seek(self._log_offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._log_offset += end
        errors = 0
        for line in data[:end].decode("utf-8", "replace").splitlines():
            if any(level in line for level in ("[error]", "[crit]", "[alert]", "[emerg]")):
                errors += 1
            if line.strip() and len(self.notes) < 8:
                self.notes.append(line.strip()[:400])
        return errors


def varnish_counters(workdir: Path, names: tuple[str, ...]) -> dict[str, int]:
    """Counters from `varnishstat -1 -j` (Varnish 6.5+ nests them under "counters")."""
    argv = ["varnishstat", "-n", str(workdir), "-1", "-j"]
    for name in names:
        argv += ["-f", name]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if out.returncode != 0:
        raise BenchError(f"varnishstat failed ({out.returncode}): {out.stderr.strip()}")
    data = json.loads(out.stdout)
    counters = data.get("counters", data)
    return {k: int(v["value"]) for k, v in counters.items() if isinstance(v, dict) and k in names}


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
            rnd: int, duration: float, settle: float = 0.0) -> Run:
    # From the settle's start: a fetch that fails in the run may have started in it.
    drops0 = kernel_drops()
    if settle > 0:  # the same load, unmeasured: pools grown to what it needs (see --settle)
        run_wrk(procs, f"{system.base}/{page}", conns, settle)
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
    # the whole process tree at both ends (nginx master + worker, varnishd manager + cache child,
    # gunicorn arbiter + workers): a process that appeared during the run counts from 0; one that
    # ended took its CPU with it (only waited-for children reach a parent's counters), so say so
    after = tree(system.proc.pid)
    ticks1, frag1, own1 = core_ticks(), cpu_seconds([fragment_server.pid]), own_cpu_seconds()
    drops1 = kernel_drops()
    dropped = (drops1[0] - drops0[0], drops1[1] - drops0[1], drops1[2] - drops0[2])
    cpu1 = cpu_seconds(sorted(set(pids) | set(after)))
    check_alive(system.proc, fragment_server)
    if set(after) != set(pids) and len(system.notes) < 8:
        system.notes.append(f"{page} c{conns} r{rnd}: the process tree changed during the run "
                            f"({sorted(pids)} → {sorted(after)}); CPU of processes that ended is not counted")
    cpu_s, frag_s = cpu1 - cpu0, frag1 - frag0

    def busy(name: str) -> float:
        return 100.0 * (ticks1[name][0] - ticks0[name][0]) / max(1, ticks1[name][1] - ticks0[name][1])

    process_s = (ticks1["cpu"][2] - ticks0["cpu"][2]) / TICK
    other = max(0.0, process_s - cpu_s - frag_s - (own1 - own0)) / wall * 100
    steal = (ticks1["cpu"][3] - ticks0["cpu"][3]) / TICK / wall * 100
    return Run(system.name, page, conns, rnd, result, cpu_s, cpu_s / wall * 100, peak, system.failures(),
               busy("cpu0"), busy("cpu1"), other, steal, frag_s / wall * 100,
               scan_composer_log(system) if system.kind == "composer" else 0, dropped)


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


def start_composer(procs: Processes, routes: Path, *, workers: int, cpus: str | None, name: str,
                   python: str = sys.executable) -> System:
    port, admin = free_port(), free_port()
    argv = [python, "-m", "composer", "serve", "--config", str(routes), "--host", "127.0.0.1",
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


# ------------------------------------------------------------------------ nginx SSI, Varnish ESI

FRAGMENT = re.compile(r"<fragment\b([^>]*)>\s*</fragment>")


def peer_page(template: str, kind: str) -> str:
    """A composer template with each `<fragment src="http://HOST/f/NAME?Q">…</fragment>` as the
    peer's include of the same fragment: nginx SSI `<!--# include virtual="/frag/NAME?Q" -->`
    (an internal location proxying to the fragment server) or ESI `<esi:include src="/f/NAME?Q"/>`
    (Varnish passes /f/ to the fragment server). primary / async have no equivalent and are
    dropped: every include is synchronous, in document order."""
    def include(m: re.Match[str]) -> str:
        src = html.unescape(re.search(r'\ssrc="([^"]*)"', m.group(1)).group(1))  # type: ignore[union-attr]
        url = urllib.parse.urlsplit(src)
        if not url.path.startswith("/f/"):
            raise BenchError(f"fragment {src!r}: only the fragment server's /f/ URLs are mapped for the peers")
        target = url.path + (f"?{url.query}" if url.query else "")
        if kind == "ssi":
            return f'<!--# include virtual="/frag/{target[3:]}" -->'
        return f'<esi:include src="{target}"/>'
    return FRAGMENT.sub(include, template)


def write_peer_pages(templates: Path, dest: Path, kind: str, suffix: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for source in sorted(templates.glob("*.html")):
        (dest / f"{source.stem}{suffix}").write_text(peer_page(source.read_text(), kind))
        (dest / f"{source.stem}{suffix}").chmod(0o644)


NGINX_CONF = """\
# generated by bench/run.py for one run; every path is in this directory
daemon off;
master_process on;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
worker_rlimit_nofile {nofile};
events {{
    worker_connections {connections};
}}
http {{
    access_log off;
    server_tokens off;
    types {{ }}
    default_type text/html;
    client_body_temp_path {root}/tmp/body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    upstream fragments {{
        server 127.0.0.1:{fragment_port};
        keepalive 1024;
        keepalive_requests 1000000;
        keepalive_timeout 75s;
    }}
    server {{
        listen 127.0.0.1:{port};
        location /page {{
            root {root}/pages;
            ssi on;
        }}
        location /frag/ {{
            internal;
            proxy_pass http://fragments/f/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_connect_timeout 5s;
            proxy_read_timeout 10s;
            proxy_buffers 32 64k;
            proxy_busy_buffers_size 256k;
        }}
    }}
}}
"""

VARNISH_VCL = """\
vcl 4.1;
# generated by bench/run.py for one run

backend origin {{
    .host = "127.0.0.1";
    .port = "{fragment_port}";
    .connect_timeout = 5s;
    .first_byte_timeout = 10s;
    .between_bytes_timeout = 10s;
}}

sub vcl_recv {{
    if (req.url ~ "^/f/") {{
        return (pass);  # fragments: fetched per request, never cached
    }}
    if (req.url ~ "^/[A-Za-z0-9_]+$") {{
        set req.url = "/p" + req.url;  # the page template (with its esi:include tags) on the origin
        return (hash);
    }}
    return (synth(404));
}}

sub vcl_backend_response {{
    if (bereq.url ~ "^/p/") {{
        # the template is fetched and ESI-parsed once and then cached (like composer's compiled
        # templates); every delivery still fetches every include
        set beresp.do_esi = true;
        set beresp.ttl = 1d;
        set beresp.grace = 0s;
    }}
    return (deliver);
}}
"""

PEER_METHOD = {
    "nginx": (
        "- nginx SSI ({version}, Debian's nginx-light): a config generated per run in a temp dir "
        "(`NGINX_CONF` in bench/run.py): `daemon off`, one master + one worker (`worker_processes 1`), "
        "access log off, `ssi on` on the pages, which are files with each fragment as "
        "`<!--# include virtual=\"/frag/NAME?…\" -->`; /frag/ is an internal location proxying to the "
        "fragment server through an `upstream` with `keepalive 1024` (HTTP/1.1, `Connection \"\"`), "
        "buffers big enough to keep the 1 MiB fragment in memory. The SSI filter parses the page on every "
        "request (nginx has no compiled-template cache); a page's includes run as parallel subrequests, "
        "written out in document order. It does **not**: take the status from a primary fragment (the page "
        "is always a 200; a failed include becomes the text `[an error occurred while processing the "
        "directive]`, counted here from error.log), defer async fragments, inject the fragments' Link-header "
        "assets, apply a timeout or fallback per fragment (one `proxy_read_timeout` for all), count or log "
        "anything per fragment."),
    "varnish": (
        "- Varnish ESI ({version}, Debian's varnish, open source): `varnishd -F -j none` with `-n` in a temp "
        "dir (manager + cache child, both counted), `thread_pools=1`, `-s malloc,256m`, a VCL generated per "
        "run (`VARNISH_VCL`): pages come from the fragment server's /p/NAME (the same templates with "
        "`<esi:include src=\"/f/NAME?…\"/>`), `beresp.do_esi = true`, and the page object **is cached** "
        "(ttl 1 d): ESI-parsed once, like composer's compiled templates, while every include is "
        "`return (pass)`: fetched from the fragment server on every page, never cached (backend "
        "connections pooled). It does **not**: fetch a page's includes in parallel (open-source Varnish "
        "fetches them one after another as delivery reaches each, so a page takes the *sum* of its "
        "fragments' latencies — page20 ≥ 20 × 10 ms — and at a given concurrency its req/s is bounded by "
        "that, not by CPU; CPU per page stays comparable), take the status from a primary (a failed "
        "include is silently left out, counted here from varnishstat), defer async fragments, inject "
        "assets, time out per fragment other than the backend's timeouts. Its shared-memory log records "
        "every request and include (left on: that is how Varnish runs)."),
}


VARNISH_FAILURES = ("MAIN.fetch_failed", "MAIN.esi_errors", "MAIN.backend_fail", "MAIN.backend_unhealthy")


PEER_BINARIES = {"nginx": ("nginx", "/usr/sbin/nginx"), "varnish": ("varnishd", "/usr/sbin/varnishd")}
VARNISH_COUNTERS = ("MAIN.client_req", "MAIN.cache_hit", "MAIN.cache_miss", "MAIN.s_pass", "MAIN.backend_req",
                    "MAIN.backend_conn", "MAIN.backend_reuse", "MAIN.fetch_failed", "MAIN.esi_errors",
                    "MAIN.esi_warnings", "MAIN.threads", "MAIN.threads_limited")


def peer_binary(name: str, path: str) -> str | None:
    """The peer's binary (Debian's package puts it in /usr/sbin, not always on PATH), or None."""
    return shutil.which(name) or shutil.which(name, path=os.path.dirname(path))


def start_nginx(procs: Processes, binary: str, tmp: Path, templates: Path, fragment_port: int) -> System:
    """nginx, one worker, SSI on the pages; includes go to an internal location proxying to the
    fragment server through an `upstream` with keep-alive connections (HTTP/1.1)."""
    root = tmp / "nginx"
    for sub in ("tmp", "pages"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    write_peer_pages(templates, root / "pages", "ssi", "")
    for d in (tmp, root, root / "pages"):  # a root-started nginx runs its worker as nobody
        d.chmod(0o755)
    port = free_port()
    conf = root / "nginx.conf"
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # the hard limit: no raising it in a container
    nofile = 65536 if nofile == resource.RLIM_INFINITY else min(nofile, 65536)
    conf.write_text(NGINX_CONF.format(root=root, port=port, fragment_port=fragment_port, nofile=nofile,
                                      connections=max(1024, nofile // 2 - 64)))
    argv = [binary, "-p", f"{root}/", "-c", str(conf), "-e", str(root / "error.log")]
    proc = procs.start("nginx", pinned(str(PROXY_CPU), argv), log=root / "stderr.log")
    wait_ready(proc, f"http://127.0.0.1:{port}/page0")
    return System("nginx", proc, f"http://127.0.0.1:{port}", "nginx", state=root)


def start_varnish(procs: Processes, binary: str, tmp: Path, fragment_port: int) -> System:
    """varnishd in the foreground (manager + cache child), ESI on the page templates it fetches
    from the fragment server's /p/ (cached), fragments passed (never cached)."""
    root = tmp / "varnish"
    root.mkdir(parents=True, exist_ok=True)
    vcl = root / "bench.vcl"
    vcl.write_text(VARNISH_VCL.format(fragment_port=fragment_port))
    port = free_port()
    argv = [binary, "-F", "-j", "none", "-n", str(root / "work"), "-a", f"127.0.0.1:{port}", "-T", "none",
            "-f", str(vcl), "-s", "malloc,256m", "-p", "thread_pools=1"]
    proc = procs.start("varnish", pinned(str(PROXY_CPU), argv), log=root / "varnishd.log")
    proc.term_leader_only = True  # a SIGTERM to the cache child too makes the manager exit 64
    wait_ready(proc, f"http://127.0.0.1:{port}/page0", deadline=60)
    return System("varnish", proc, f"http://127.0.0.1:{port}", "varnish", state=root / "work")


def start_peer(procs: Processes, name: str, tmp: Path, templates: Path, fragment_port: int) -> System | str:
    """nginx or Varnish if Debian's package is installed: the System, or why it is skipped."""
    binary = peer_binary(*PEER_BINARIES[name])
    if binary is None:
        return (f"{'nginx' if name == 'nginx' else 'varnishd'} is not installed "
                f"(Debian: apt-get install {'nginx-light' if name == 'nginx' else 'varnish'})")
    try:
        if name == "nginx":
            return start_nginx(procs, binary, tmp, templates, fragment_port)
        if shutil.which("varnishstat") is None:
            return "varnishstat (package varnish) is missing: fragment failures could not be counted"
        return start_varnish(procs, binary, tmp, fragment_port)
    except (BenchError, OSError) as exc:
        for proc in [p for p in procs.procs if p.name == name]:
            procs.stop(proc)
        return f"did not start: {exc}"


def peer_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "-V"] if binary.endswith("varnishd") else [binary, "-v"],
                             capture_output=True, text=True, check=False)
    except OSError:
        return "?"
    first = (out.stderr or out.stdout).splitlines()[:1]
    return first[0].strip() if first else "?"


# ----------------------------------------------------------------------------------- report

def f0(x: float) -> str:
    return f"{x:,.0f}"


def f1(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def f2(x: float) -> str:
    return f"{x:.2f}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b else "–"


def tailor_version() -> str:
    manifest = HERE / "node_modules" / TAILOR / "package.json"
    return json.loads(manifest.read_text())["version"] if manifest.exists() else "not installed"


def composer_digest() -> str:
    """A digest of composer/*.py as they are now: the code a composer started now runs."""
    h = hashlib.sha1()
    for path in sorted((ROOT / "composer").glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def interpreter(python: str) -> str:
    """What composer runs on: the interpreter's version and path, its aiohttp and uvloop, and
    whether composer's request path is compiled (scripts/compile)."""
    code = ("import platform, sys, aiohttp, uvloop, composer.client as c; "
            "print(f'Python {platform.python_version()} ({sys.executable}), aiohttp {aiohttp.__version__}, "
            "uvloop {uvloop.__version__}; composer\\'s request path ' "
            "+ ('compiled (scripts/compile)' if c.__file__.endswith('.so') else 'from source (not compiled)'))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False)
    return out.stdout.strip() or f"{python}: {out.stderr.strip()[-200:]}"


def machine(start_digest: str, python: str = sys.executable) -> list[str]:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break

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
        (f"- composer on {interpreter(python)}; "
        f"Node {command(['node', '-v']) if shutil.which('node') else 'not installed'}, {TAILOR} "
        f"{tailor_version()}; "
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
    curve: list[Run] = field(default_factory=list)  # page20 at CURVE's concurrencies
    scaling_error: str = ""
    notes: dict[str, list[str]] = field(default_factory=dict)
    aborted: str = ""
    digest: str = ""
    elapsed: float = 0.0
    systems: list[str] = field(default_factory=list)  # measured, in SYSTEMS order
    skipped: dict[str, str] = field(default_factory=dict)  # system -> why
    versions: dict[str, str] = field(default_factory=dict)  # nginx / varnish -> version line
    fragment_counts: dict[str, int] = field(default_factory=dict)  # page -> <fragment> tags
    varnish_stats: dict[str, int] = field(default_factory=dict)
    memory: list[Memory] = field(default_factory=list)  # composer, a fresh process per load

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

    def label(self, system: str) -> str:
        return {"composer": "composer", "tailor": "Tailor", "nginx": "nginx SSI", "varnish": "Varnish ESI"}.get(
            system, system)

    def main_table(self) -> list[str]:
        lines = [
            ("| page | conns | system | req/s | req/s ÷ composer | p50 ms | p99 ms | CPU % | CPU ms/page "
             "| CPU/page ÷ composer | RSS MB | non-2xx+err | frag fail |"),
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for page, conns in self.cells():
            base = self.median("composer", page, conns)
            for system in self.systems:
                r = self.median(system, page, conns)
                if r is None:
                    continue
                mark = " †" if self.noisy(r) else ""
                vs_rps = ratio(r.wrk.rps, base.wrk.rps) if base is not None else "–"
                vs_cpu = ratio(r.cpu_ms_per_page, base.cpu_ms_per_page) if base is not None else "–"
                lines.append(
                    f"| {page}{mark} | {conns} | {self.label(system)} | {f0(r.wrk.rps)} | **{vs_rps}** "
                    f"| {f1(r.wrk.p50)} | {f1(r.wrk.p99)} | {r.cpu_pct:.0f} | {f2(r.cpu_ms_per_page)} | {vs_cpu} "
                    f"| {r.rss_mb:.0f} | {r.bad} | {r.fragment_failures} |")
        return lines

    def curve_table(self) -> list[str]:
        """page20's CPU per page at each concurrency measured, composer's and nginx's."""
        names = [n for n in ("composer", "nginx") if n in self.systems]
        levels = sorted({r.conns for r in self.curve} | {c for p, c in self.cells() if p == "page20"})
        lines = ["| conns | " + " | ".join(f"{self.label(n)} CPU % | {self.label(n)} CPU ms/page" for n in names)
                 + (" | composer ÷ nginx |" if len(names) == 2 else " |"),
                 "|---:|" + "---:|---:|" * len(names) + ("---:|" if len(names) == 2 else "")]
        for conns in levels:
            cells: list[str] = []
            found: list[Run | None] = []
            for name in names:
                runs = [r for r in self.curve if r.system == name and r.conns == conns]
                r = median_run(runs) if runs else self.median(name, "page20", conns)
                found.append(r)
                cells += [f"{r.cpu_pct:.0f}", f2(r.cpu_ms_per_page)] if r is not None else ["–", "–"]
            both = len(found) == 2 and found[0] is not None and found[1] is not None
            tail = (f" | {ratio(found[0].cpu_ms_per_page, found[1].cpu_ms_per_page)} |"  # type: ignore[union-attr]
                    if both else " | – |" if len(names) == 2 else " |")
            lines.append(f"| {conns} | " + " | ".join(cells) + tail)
        return lines

    def paired(self) -> list[str]:
        """composer's CPU per page over each peer's, round by round: a round measures every system
        of a cell back to back, so the machine's speed, which drifts between rounds (and runs),
        mostly cancels out of each round's ratio. Median and range over the rounds."""
        peers = [s for s in self.systems if s != "composer"]
        lines = ["| page | conns | " + " | ".join(f"composer ÷ {self.label(s)}" for s in peers) + " |",
                 "|---|---:|" + "---:|" * len(peers)]
        for page, conns in self.cells():
            ours = {r.round: r.cpu_ms_per_page for r in self.runs
                    if r.system == "composer" and r.page == page and r.conns == conns
                    and r.cpu_ms_per_page > 0}  # (a round that served nothing is NaN: left out)
            cells = []
            for peer in peers:
                found = sorted(ours[r.round] / r.cpu_ms_per_page for r in self.runs
                               if r.system == peer and r.page == page and r.conns == conns and r.round in ours
                               and r.cpu_ms_per_page > 0)
                cells.append(f"**{statistics.median(found):.2f}×** ({found[0]:.2f}–{found[-1]:.2f})"
                             if found else "–")
            if any(c != "–" for c in cells):
                lines.append(f"| {page} | {conns} | " + " | ".join(cells) + " |")
        return lines if peers and len(lines) > 2 else []

    def per_fragment(self) -> list[str]:
        """CPU ms per page and µs per fragment = (cpu(pageN) − cpu(page0)) / N, N = the page's
        fragments, at each concurrency where page0 was measured; ÷ p20 = that per-fragment cost
        against page20's."""
        head = "| page (fragments) | " + " | ".join(
            f"{self.label(s)} ms/page | {self.label(s)} µs/fragment | ÷ p20" for s in self.systems) + " |"
        lines = [head, "|---|" + "---:|---:|---:|" * len(self.systems)]
        for conns in (16, 64):
            if all(self.median(s, "page0", conns) is None for s in self.systems):
                continue
            for page in CONNS:
                n = self.fragment_counts.get(page, 0)
                cells = []
                for s in self.systems:
                    r, r0, r20 = (self.median(s, p, conns) for p in (page, "page0", "page20"))
                    if r is None:
                        cells.append("– | – | –")
                        continue
                    if n == 0 or r0 is None:
                        cells.append(f"{f2(r.cpu_ms_per_page)} | – | –")
                        continue
                    per = (r.cpu_ms_per_page - r0.cpu_ms_per_page) / n * 1000
                    per20 = ((r20.cpu_ms_per_page - r0.cpu_ms_per_page) / self.fragment_counts.get("page20", 20)
                             * 1000 if r20 is not None else 0.0)
                    cells.append(f"{f2(r.cpu_ms_per_page)} | **{per:.0f}** | {ratio(per, per20) if per20 else '–'}")
                if any(c != "– | – | –" for c in cells):
                    lines.append(f"| {page} ({n}) at c{conns} | " + " | ".join(cells) + " |")
        return lines if len(lines) > 2 else []

    def extra_fragment(self) -> list[str]:
        """What the 2nd to 20th fragments of page20 cost each, (cpu(page20) − cpu(page1)) / 19: the same
        markup, the same fragments, so the difference is fragments only; and page1 − page0, the first
        fragment with all a page pays to have one (its `Page`, its stream, its extra writes), which
        (pageN − page0) / N shares out over every fragment."""
        lines = ["| conns | " + " | ".join(f"{self.label(s)} µs per extra fragment | {self.label(s)} first fragment, "
                                           "µs over page0" for s in self.systems) + " |",
                 "|---:|" + "---:|---:|" * len(self.systems)]
        for conns in (16, 64):
            cells = []
            for s in self.systems:
                r0, r1, r20 = (self.median(s, p, conns) for p in ("page0", "page1", "page20"))
                if r1 is None or r20 is None:
                    cells.append("– | –")
                    continue
                n = self.fragment_counts.get("page20", 20) - self.fragment_counts.get("page1", 1)
                extra = (r20.cpu_ms_per_page - r1.cpu_ms_per_page) / n * 1000
                first = f"{(r1.cpu_ms_per_page - r0.cpu_ms_per_page) * 1000:.0f}" if r0 is not None else "–"
                cells.append(f"**{extra:.1f}** | {first}")
            if any(c != "– | –" for c in cells):
                lines.append(f"| {conns} | " + " | ".join(cells) + " |")
        return lines if len(lines) > 2 else []

    def method(self) -> list[str]:
        """What each system is and what it does and does not do (also in bench/RESULTS.md)."""
        out = []
        if "composer" in self.systems:
            out.append("- composer: `python -m composer serve` as shipped (uvloop, one JSON access-log line per "
                       "request to a file, Prometheus metrics); templates compiled once; fragments fetched in "
                       "parallel per page, the page streamed in document order, primary fragment sets the status, "
                       "async fragments at the end, fragments' Link-header assets injected.")
        if "tailor" in self.systems:
            out.append(f"- Tailor {TAILOR_VERSION}: `bench/tailor_server.js`, templates parsed once and cached (its "
                       "best case); otherwise defaults (Node's global keep-alive agent). It inlines its client "
                       "runtime and wraps each fragment in `Pipe.start/end` scripts (larger pages).")
        for name in ("nginx", "varnish"):
            if name in self.systems:
                out.append(PEER_METHOD[name].format(version=self.versions.get(name, "?")))
        for name, why in self.skipped.items():
            out.append(f"- **{self.label(name)} not measured:** {why}")
        return out

    def markdown(self) -> str:
        a = self.args
        peers = [self.label(s) + (f" {TAILOR_VERSION}" if s == "tailor" else "") for s in self.systems if s != "composer"]
        title = "composer vs " + (", ".join(peers) if peers else "nothing") if "composer" in self.systems \
            else ", ".join(peers)
        out = [f"# {title}: benchmark results", "",
               f"Run {self.started}, {self.elapsed / 60:.0f} min. Command: `{shlex.join(['python', *sys.argv])}`"
               + (" — **a `--quick` smoke run: numbers are for checking the harness only.**" if a.quick else ""),
               "", *machine(self.digest, self.args.python), "",
               *([f"**ABORTED:** {self.aborted}", ""] if self.aborted else []),
               (f"- {a.duration:g} s of `wrk -t1 --latency` per run, each after {a.settle:g} s of the same load "
               "not measured (connections a system let go while the others ran are opened again there, not "
               f"inside the run's p99), {a.rounds} round(s) per cell, the systems "
               "taking turns to go first; each cell shows the **median round** (by req/s; the lower middle one for an even count) of each system; all rounds are in "
               "the appendix."),
               ("- Proxies pinned to CPU 0 (with all their processes: nginx's master and worker, varnishd's "
               "manager and cache child); wrk, the fragment server and this script to CPU 1. CPU of a proxy = "
               "utime + stime from /proc/PID/stat summed over its whole process tree (read at the start and the "
               f"end of each run). Fragment server: **{self.fragment_server}** (cheaper per request, see below; it "
               "listens with a backlog of 4,096, where Node's default 511 overflowed under connection bursts: "
               "what still overflows is in the appendix's listen ovf column). "
               "Fragment responses carry no Cache-Control, so composer's fragment cache stores nothing: every "
               "page fetches every fragment; nginx and Varnish do not cache them either."),
               ("- Pages: page0 = 2.5 KB of markup, no fragment; page5 = 5 fragments (2–10 KB, 5–50 ms, one "
               "primary, one async); page20 = 20 × 2 KB after 10 ms; page1 = page20 with its first (primary) "
               "fragment only, the same markup around it; page100 = the same layout with 100 × 2 KB; "
               "page1mb = page0's markup around one 1 MiB fragment (10 ms). nginx and Varnish get the same "
               "templates with each `<fragment>` rewritten to their include tag (primary/async dropped)."),
               *self.method(),
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
        dropping = [r for r in self.runs if r.dropped[0] or r.dropped[1]]
        if dropping:
            out += [(f"In {len(dropping)} of {len(self.runs)} runs the kernel dropped connections or packets "
                     "(listen ovf / in-queue drops in the appendix; a few retransmits a run are usual here): a "
                     "p99 there can be a retransmit's wait (1 s for a SYN or SYN-ACK), not the proxy's."), ""]
        out += ["## Throughput, latency, CPU, memory", "",
                ("÷ composer = this system's figure over composer's in the same cell. CPU % is of one core (the "
                "proxy's). CPU ms/page = proxy CPU seconds "
                "/ pages served. non-2xx+err = wrk's non-2xx responses plus socket errors (timeouts at 10 s, "
                "resets). RSS MB = the highest RSS seen during the run; each system is one process tree "
                "serving every cell in turn (page0, page5 up to c256, page20, ...), and memory it took in an "
                "earlier cell is rarely given back, so a cell's figure is at least every earlier cell's. "
                "† = in a median round shown, other processes or the hypervisor (steal) took more than "
                "20 % of a core: a disturbed measurement."), "", *self.main_table(), ""]
        paired = self.paired()
        if paired:
            out += ["## composer's CPU per page against each peer's, round by round", "",
                    ("In each round every system serves the cell back to back; its ratio is composer's CPU ms "
                     "per page over the peer's in that round. Shown: the median over the rounds (the range in "
                     "brackets). The machine's speed drifts by tens of per cent over minutes, which a ratio of "
                     "two median rounds (the table above) can catch between them; within one round it mostly "
                     "cancels."), "", *paired, ""]
        per_fragment = self.per_fragment()
        if per_fragment:
            out += ["## CPU per page and per fragment", "",
                    ("From the median rounds above. µs/fragment = (CPU ms/page of the page − that of page0) / "
                    "its fragments; ÷ p20 = that figure over page20's (1.00× = each fragment costs what a "
                    "page20 fragment does). page5's fragments are 2–10 KB and one is async; page1mb's one "
                    "fragment is 1 MiB, so its figure is the cost of moving 1 MiB through the proxy."), "",
                    *per_fragment, ""]
        extra = self.extra_fragment()
        if extra:
            out += ["## What each extra fragment costs (page1 → page20)", "",
                    ("From the median rounds above. page1 is page20 with only its first fragment (the "
                     "primary), around the same markup: per extra fragment = (CPU ms/page of page20 − that "
                     "of page1) / 19, the cost of the 2nd to 20th fragments; first fragment = page1 − page0, "
                     "what a page pays to fetch and stream any fragment at all (its own fetch included). "
                     "The table above spreads that first cost over all N. page1 leaves a proxy's core idle "
                     "more of the time than page20 does, and a partly idle core costs more per page (bench/"
                     "PROFILE.md, eighteenth pass): if anything, the extra fragment reads low and the first "
                     "one high."), "", *extra, ""]
        if self.curve:
            out += ["## CPU per page against load (page20)", "",
                    ("page20 at more concurrencies, one round each (c16 and c64: the median rounds above). "
                     "A proxy that is partly idle can pay more per page than a saturated one: where an idle "
                     "core halts (a VM whose guest does not poll, as the one of bench/PROFILE.md's eighteenth "
                     "pass), the work after each wake-up runs slower, and a Python process, with its larger "
                     "working set, pays more of that than nginx. The saturated figure is the cost of the "
                     "work; the gap to the others is what the machine charges for waking up."), "",
                    *self.curve_table(), ""]
        if self.memory:
            out += ["## composer's memory per load", "",
                    ("Each load in a composer of its own, started for it: its RSS once ready (nothing fetched "
                     "yet), then its high-water mark (VmHWM) after the load's wrk run. The RSS column above "
                     "is one process's high-water mark over every cell before it, so it mixes loads. *pages "
                     "in flight* = connections × the page's bytes: what a load can hold at once, as every "
                     "fragment's body is held whole until it is written in order (SPEC §3)."), "",
                    "| page | conns | idle MB | high-water MB | pages in flight MB | req/s | non-2xx+err |",
                    "|---|---:|---:|---:|---:|---:|---:|"]
            sizes = self.page_bytes.get("composer", {})
            for m in self.memory:
                flight = f1(m.conns * sizes[m.page] / 1e6) if m.page in sizes else "?"
                out.append(f"| {m.page} | {m.conns} | {f1(m.idle_mb)} | **{f1(m.high_mb)}** | {flight} "
                           f"| {f0(m.wrk.rps)} | {m.wrk.non2xx + m.wrk.socket_errors} |")
            out.append("")
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
            tailor = self.median("tailor", "page20", 64)
            if one is not None:
                out.append(f"\n2 workers / 1 process: **{ratio(two.wrk.rps, one.wrk.rps)}** req/s."
                           + (f" Tailor at the same cell: {f0(tailor.wrk.rps)} req/s (Tailor is one process; it "
                              "has no cluster mode of its own)." if tailor is not None else ""))
            out.append("")
        if self.fragment_servers:
            out += ["## Which fragment server", "",
                    ("`wrk -t1 -c64` at `/f/x?size=2048` (no delay), server pinned to CPU 1 and wrk to CPU 0; "
                    "CPU seconds of the server process from /proc/PID/stat divided by requests."), "",
                    "| fragment server | req/s | server CPU % | CPU µs / request | errors |", "|---|---:|---:|---:|---:|"]
            for kind, fs in self.fragment_servers.items():
                out.append(f"| {FRAGMENT_SERVERS[kind]} | {f0(fs['rps'])} | {fs['cpu_pct']:.0f} | **{fs['us_per_request']:.1f}** "
                           f"| {fs['bad']:.0f} |")
            out.append("")
        if self.page_bytes:
            measured = [s for s in self.systems if s in self.page_bytes]
            out += ["## Page sizes (bytes, one GET each, checked before measuring)", "",
                    ("Every page was a 200 holding every fragment's content, sync fragments in document order. "
                    "Tailor's pages are larger: it inlines its client runtime (pipe.min.js) and wraps each "
                    "fragment in `Pipe.start/end` scripts. nginx and Varnish insert the fragments' bodies "
                    "as they are (no assets, no wrappers)."), "",
                    "| page | " + " | ".join(self.label(s) for s in measured) + " |",
                    "|---|" + "---:|" * len(measured)]
            for page in (self.page_bytes[measured[0]] if measured else {}):
                out.append(f"| {page} | " + " | ".join(f0(self.page_bytes[s].get(page, 0)) for s in measured) + " |")
            out.append("")
        if self.varnish_stats:
            out += ["## Varnish counters over the whole run (varnishstat)", "",
                    ("cache_hit ≈ pages delivered from the cached template, s_pass ≈ includes fetched; "
                    "backend_reuse / backend_conn = pooled connections reused / opened."), "",
                    "| counter | value |", "|---|---:|",
                    *(f"| {k} | {v:,} |" for k, v in self.varnish_stats.items()), ""]
        notes = {k: v for k, v in self.notes.items() if v}
        if notes:
            out += ["## Log lines worth a look", ""]
            for name, lines in notes.items():
                out += [f"{name} (first {len(lines)}):", "", "```", *lines, "```", ""]
        out += ["## Appendix: every run", "",
                ("core0/core1 = how busy each CPU was (irq/softirq included); frag srv % = the fragment "
                 "server's CPU; frag fail = fragment failures (composer: composer_fragment_failures_total; "
                 "Tailor: error, fragment:error/warn/fallback events; nginx: error.log lines at [error] or worse; "
                 "Varnish: fetch_failed + esi_errors + backend_fail + backend_unhealthy); odd log = composer log lines other than "
                 "2xx access lines and 499s (wrk closing connections at the end of a run); other % = CPU used by "
                 "processes this script did not start; steal % = taken by the hypervisor (all % of one core); "
                 "listen ovf / in-queue drops / retrans = connections the kernel dropped past a listen backlog, "
                 "packets past a CPU's input queue, TCP segments sent again, machine-wide from the start of the run's settle to its end (a fetch failing in the run may have started there)."),
                "",
                ("| page | conns | round | system | req/s | p50 ms | p99 ms | pages | non-2xx | sock err | CPU % "
                 "| CPU ms/page | RSS MB | frag fail | odd log | core0 % | core1 % | frag srv % | other % | steal % "
                 "| listen ovf | in-queue drops | retrans |"),
                "|---|---:|---:|---|" + "---:|" * 19]
        for r in [*self.runs, *self.curve, *self.scaling]:
            out.append(f"| {r.page} | {r.conns} | {r.round} | {r.system} | {f0(r.wrk.rps)} | {f1(r.wrk.p50)} "
                       f"| {f1(r.wrk.p99)} | {r.wrk.requests} | {r.wrk.non2xx} | {r.wrk.socket_errors} "
                       f"| {r.cpu_pct:.0f} | {f2(r.cpu_ms_per_page)} | {r.rss_mb:.0f} | {r.fragment_failures} "
                       f"| {r.odd_log_lines} | {r.core0:.0f} | {r.core1:.0f} | {r.fragment_server_pct:.0f} "
                       f"| {r.other:.0f} | {r.steal:.0f} | {r.dropped[0]} | {r.dropped[1]} | {r.dropped[2]} |")
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
    two = start_composer(procs, routes, workers=2, cpus=None, name="composer, 2 workers", python=args.python)
    two.notes[:0] = report.notes.get("composer, 2 workers", [])
    report.notes["composer, 2 workers"] = two.notes
    try:
        verify(two, ["page20"], templates)
        run_wrk(procs, f"{two.base}/page20", 64, args.warmup)
        for rnd in range(1, args.rounds + 1):
            run = measure(procs, two, fragment_server, "page20", 64, rnd, args.duration, args.settle)
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
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed")
    if (os.cpu_count() or 1) < 2:
        raise BenchError("needs at least 2 CPUs (the proxy on CPU 0, the load on CPU 1)")
    os.sched_setaffinity(0, {LOAD_CPU})  # this script stays off the proxies' core
    wanted = [s for s in args.systems.split(",") if s]
    for name in wanted:
        if name not in SYSTEMS:
            raise BenchError(f"unknown system {name!r} (known: {', '.join(SYSTEMS)})")
    if not wanted:
        raise BenchError("--systems names no system")
    wanted = [s for s in SYSTEMS if s in wanted]  # one fixed order
    have_node = shutil.which("node") is not None
    if "tailor" in wanted:  # a peer: skipped with a note when it cannot run, like nginx and Varnish
        why = None if have_node and shutil.which("npm") else "node and npm are needed for Tailor"
        if why is None:
            try:
                ensure_tailor()
            except (BenchError, OSError, subprocess.CalledProcessError) as exc:
                why = f"npm could not install {TAILOR}@{TAILOR_VERSION}: {exc}"
        if why is not None:
            report.skipped["tailor"] = why
            wanted.remove("tailor")
            print(f"bench: Tailor skipped: {why}", flush=True)
    WORK.mkdir(exist_ok=True)
    report.digest = composer_digest()
    pages = [p for p in args.pages.split(",") if p]
    for page in pages:
        if page not in CONNS:
            raise BenchError(f"unknown page {page!r} (known: {', '.join(CONNS)})")

    kind = args.fragment_server
    if kind == "node" and not have_node:
        raise BenchError("--fragment-server node: node is not installed")
    if kind == "auto" and not have_node:
        kind = "python"
        print("bench: node is not installed: using bench/fragment_server.py", flush=True)
    if kind == "auto":
        print("bench: comparing the fragment servers", flush=True)
        report.fragment_servers = compare_fragment_servers(procs, args.fs_duration)
        for k, fs in report.fragment_servers.items():
            print(f"  {k}: {fs['rps']:,.0f} req/s, {fs['us_per_request']:.1f} µs CPU/request", flush=True)
        kind = min(report.fragment_servers, key=lambda k: report.fragment_servers[k]["us_per_request"])
    report.fragment_server = FRAGMENT_SERVERS[kind]

    fport = free_port()
    routes = prepare_work(fport)
    templates = WORK / "templates"
    report.fragment_counts = {p.stem: len(FRAGMENT.findall(p.read_text())) for p in templates.glob("*.html")}
    esi_pages = args.tmp / "esi-pages"  # served at /p/NAME for Varnish
    write_peer_pages(templates, esi_pages, "esi", ".html")
    fragment_server = procs.start(f"fragment server ({kind})",
                                  pinned(str(LOAD_CPU), [*fragment_server_argv(kind, fport), str(esi_pages)]),
                                  log=WORK / "fragment_server.log")
    wait_ready(fragment_server, f"http://127.0.0.1:{fport}/f/warm")
    systems: dict[str, System] = {}
    for name in wanted:
        if name == "composer":
            systems[name] = start_composer(procs, routes, workers=1, cpus=str(PROXY_CPU), name="composer",
                                           python=args.python)
        elif name == "tailor":
            systems[name] = start_tailor(procs, templates)
        else:
            got = start_peer(procs, name, args.tmp, templates, fport)
            if isinstance(got, str):
                report.skipped[name] = got
                print(f"bench: {name} skipped: {got}", flush=True)
                continue
            systems[name] = got
            report.versions[name] = peer_version(peer_binary(*PEER_BINARIES[name]) or "?")
    if not systems:
        raise BenchError("no system to measure: " + "; ".join(f"{k}: {v}" for k, v in report.skipped.items()))
    report.systems = list(systems)
    report.notes = {name: system.notes for name, system in systems.items() if name != "tailor"}

    all_pages = [*pages, "page5np"] if "page5" in pages else pages
    for name, system in list(systems.items()):
        try:
            report.page_bytes[name] = verify(system, all_pages, templates)
        except BenchError as exc:
            if name == "composer":
                raise
            report.skipped[name] = f"failed the page check: {exc}"  # a peer never fails the run
            print(f"bench: {name} skipped: {exc}", flush=True)
            procs.stop(system.proc)
            del systems[name]
            report.systems.remove(name)
            continue
        system.failures()
    print("bench: every page verified (200, every fragment's content, sync ones in order) through "
          + ", ".join(systems) + ": " + "; ".join(
              f"{p} " + "/".join(f"{report.page_bytes[s][p]:,}" for s in systems) + " B" for p in all_pages),
          flush=True)

    def check_all() -> None:
        check_alive(fragment_server, *(s.proc for s in systems.values()))

    cell = 0
    order = list(systems)
    for page in pages:
        for name, system in systems.items():  # warm-up: connections, pools, caches, JIT; and a clean run
            warm = run_wrk(procs, f"{system.base}/{page}", 16, args.warmup)
            if warm.non2xx + warm.socket_errors:
                message = (f"warm-up of /{page}: {warm.non2xx} non-2xx responses, {warm.socket_errors} socket "
                           f"errors in {warm.requests} requests")
                print(f"bench: {name}: {message}", flush=True)
                report.notes.setdefault(name, system.notes).append(message)
        for conns in CONNS[page]:
            for rnd in range(1, args.rounds + 1):
                shift = (cell + rnd) % len(order)  # rotate who goes first
                for name in order[shift:] + order[:shift]:
                    run = measure(procs, systems[name], fragment_server, page, conns, rnd, args.duration,
                                  args.settle)
                    report.runs.append(run)
                    check_all()
                    print(f"  {page} c{conns} r{rnd} {name:8} {run.wrk.rps:8,.0f} req/s  p50 {run.wrk.p50:7.1f} ms"
                          f"  p99 {run.wrk.p99:7.1f} ms  cpu {run.cpu_pct:3.0f}%  {run.cpu_ms_per_page:.2f} ms/page"
                          f"  rss {run.rss_mb:4.0f} MB  bad {run.bad}  frag-fail {run.fragment_failures}"
                          f"  odd-log {run.odd_log_lines}  other {run.other:3.0f}%", flush=True)
                    time.sleep(0.3)
            cell += 1

    if "page20" in pages and args.curve:
        print("bench: page20 at c" + ", c".join(map(str, CURVE)) + " (composer, nginx)", flush=True)
        for conns in CURVE:
            for name in ("composer", "nginx"):
                if name in systems:
                    run = measure(procs, systems[name], fragment_server, "page20", conns, 1, args.duration,
                                  args.settle)
                    report.curve.append(run)
                    check_all()
                    print(f"  page20 c{conns} {name:8} {run.wrk.rps:8,.0f} req/s  cpu {run.cpu_pct:3.0f}%  "
                          f"{run.cpu_ms_per_page:.2f} ms/page  bad {run.bad}", flush=True)

    if "page5" in pages and args.ttfb_samples > 0:
        print(f"bench: time to first byte, {args.ttfb_samples} samples per system", flush=True)
        for page in ("page5np", "page5"):
            for name, system in systems.items():
                t = ttfb(int(system.base.rsplit(":", 1)[1]), f"/{page}", args.ttfb_samples)
                report.ttfb[(page, name)] = t
                print(f"  {page:8} {name:8} first byte p50 {t['p50']:6.1f} ms  p99 {t['p99']:6.1f} ms  "
                      f"first markup p50 {t['markup_p50']:6.1f} ms  last byte p50 {t['last_p50']:6.1f} ms",
                      flush=True)
        check_all()

    if "page5" in pages:
        url = f"http://127.0.0.1:{fport}/f/recos?delay=50&size=5120"
        run_wrk(procs, url, 16, args.warmup)
        report.floor = run_wrk(procs, url, 16, args.duration)
        print(f"bench: floor (the 50 ms fragment alone, c16): {report.floor.rps:,.0f} req/s, "
              f"p50 {report.floor.p50:.1f} ms, p99 {report.floor.p99:.1f} ms", flush=True)

    if "composer" in systems and args.memory:
        print("bench: composer's memory per load, a fresh process each", flush=True)
        for page in pages:
            for conns in CONNS[page]:
                fresh = start_composer(procs, routes, workers=1, cpus=str(PROXY_CPU), name=f"composer {page} c{conns}",
                                       python=args.python)
                try:
                    memory = memory_of(procs, fresh.proc, fresh.base, page, conns, args.duration)
                finally:
                    procs.stop(fresh.proc)
                report.memory.append(memory)
                if scan_composer_log(fresh):  # (a clean run leaves nothing worth a look)
                    report.notes[fresh.name] = fresh.notes
                print(f"  {page} c{conns} idle {memory.idle_mb:5.1f} MB  high-water {memory.high_mb:5.1f} MB  "
                      f"{memory.wrk.rps:8,.0f} req/s  bad {memory.wrk.non2xx + memory.wrk.socket_errors}", flush=True)

    for system in systems.values():
        system.failures()
    if "page20" in pages and "composer" in systems and args.scaling:
        print("bench: composer --workers 2 (unpinned) on page20 at c64", flush=True)
        try:
            scale(args, procs, report, routes, templates, fragment_server)
        except BenchError as exc:
            report.scaling_error = str(exc)
            print(f"bench: composer --workers 2 not measured: {exc}", file=sys.stderr, flush=True)
    if "tailor" in systems:
        tailor = systems["tailor"]
        tailor_stats = json.loads(http_get(f"{tailor.base}/__stats")[1])
        if any(tailor_stats.values()):
            report.notes["tailor events over the whole run"] = [json.dumps(tailor_stats)] + \
                tailor.proc.tail(20).splitlines()
    if "varnish" in systems:
        varnish = systems["varnish"]
        assert varnish.state is not None
        report.varnish_stats = varnish_counters(varnish.state, VARNISH_COUNTERS)
    for name in ("nginx", "varnish"):
        if name in systems:
            status = procs.stop(systems[name].proc)
            if name == "nginx":
                systems[name].failures()  # the last error.log lines into the notes
            if status not in (0, None):
                systems[name].notes.append(f"{name} exited with status {status} on SIGTERM (expected 0)")
    if "composer" in systems:
        composer = systems["composer"]
        status = procs.stop(composer.proc)
        scan_composer_log(composer)
        if status != 0:
            composer.notes.append(f"composer exited with status {status} on SIGTERM (expected 0)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=15, help="seconds of wrk per run (default 15)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per page × concurrency (default 3)")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds of the same load, unmeasured, before each run (default 2): idle "
                             "connections a system dropped while the others ran (composer's client keeps "
                             "them 30 s, nginx's upstream 60 s) are opened again there, not in the run's p99")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 3 s per run, 1 round, 30 TTFB samples; writes bench/.work/RESULTS.quick.md")
    parser.add_argument("--pages", default=",".join(CONNS),
                        help=f"pages to drive (default all: {','.join(CONNS)})")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"systems to measure (default all: {','.join(SYSTEMS)}); a peer that is not "
                             "installed or does not start is skipped with a note")
    parser.add_argument("--no-curve", dest="curve", action="store_false",
                        help="skip page20 at c" + ", c".join(map(str, CURVE)) + " (CPU per page against load)")
    parser.add_argument("--no-scaling", dest="scaling", action="store_false",
                        help="skip the composer --workers 2 runs")
    parser.add_argument("--no-memory", dest="memory", action="store_false",
                        help="skip composer's memory per load (a fresh composer for each page × connections)")
    parser.add_argument("--fragment-server", choices=("auto", "node", "python"), default="auto",
                        help="auto (default): measure both, use the cheaper per request")
    parser.add_argument("--ttfb-samples", type=int, default=200, help="TTFB samples per system and page")
    parser.add_argument("--output", help="where to write the markdown (default bench/RESULTS.md)")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter composer runs on: a venv's python with composer installed "
                             "(default: this one). Use an optimised CPython build, as the Docker image's is: "
                             "pyenv's default builds cost 8-26 %% more CPU per page (bench/PROFILE.md)")
    args = parser.parse_args(argv)
    explicit = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
    if args.quick:
        args.settle = args.settle if "--settle" in explicit else 1  # (wrk takes whole seconds)
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
    args.tmp = Path(tempfile.mkdtemp(prefix="composer-bench-"))  # nginx's and Varnish's files
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
        shutil.rmtree(args.tmp, ignore_errors=True)
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
    raw.write_text(json.dumps({"runs": [asdict(r) for r in [*report.runs, *report.curve, *report.scaling]],
                               "ttfb": {f"{p} {s}": t for (p, s), t in report.ttfb.items()},
                               "floor": asdict(report.floor) if report.floor else None,
                               "fragment_servers": report.fragment_servers,
                               "skipped": report.skipped, "varnish_stats": report.varnish_stats,
                               "memory": [asdict(m) for m in report.memory]}, indent=1))
    print(f"bench: written to {output} (every run as JSON: {raw})")
    return status


if __name__ == "__main__":
    sys.exit(main())
