"""Soak composer against misbehaving fragment services; fail on leaks, crashes or broken pages.

    python bench/soak.py [--pages 20000] [--concurrency 50] [--baseline 2000] [--every 5000]
                         [--seed 1] [--json]

It starts a fault-injecting fragment server (a subprocess of this script, on 127.0.0.1)
whose `/f/<name>` answers, drawn per request from a seeded RNG: normally (~2 KB, sometimes
gzip, sometimes with a `Link: </s.css>; rel="stylesheet"`), slowly (0–80 ms), 500, not at
all until composer gives up, by closing before the headers, by a reset mid-body, with more
body than its Content-Length, with invalid gzip, or by trickling the body. `/ok/<name>`
always answers normally (the fallbacks); `/f/ads?profile=sick` fails most of the time. A
routes.yaml and a six-fragment template go into a temporary folder, and `python -m composer
serve` runs on them. Its circuit breakers are set to open after 8 failures in a row (not 5)
and to probe after 1 s (not 5 s): with the defaults, ~28 % random faults keep every circuit
open most of the time and the faults would hardly reach composer's fetch code; this way they
do, and the sick fragment's circuit still opens, half-opens and closes all along.

N pages are then driven at C concurrent connections, each body read fully and checked: a
200 must be the whole template (first to last byte, in order), a 500 composer's own error
page. The composer process's RSS and open fds are taken at checkpoints — at `--baseline`
pages (after the warm-up), every `--every` pages, and at the end — each time with no page in
flight and every idle connection gone, so the figures are comparable — with the objects its
cyclic collector has found (`python_gc_objects_collected_total`). It exits 1 (naming the
reason) when RSS grew more than 20 MB or fds by more than 10 from the baseline to the end,
when the collector found more than one object a page in that time (a reference cycle per
page: composer runs its collector rarely, trusting that it has none), when any page was
not a complete 200/500 page, when composer logged an error, died, or did not exit 0 on
SIGTERM at the end. Everything it starts is stopped when it ends.

Importable: `await soak(...)` returns the figures (also `--json`), `main(argv)` the exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import gzip
import json
import os
import random
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

RSS_LIMIT_MB = 20.0
FD_LIMIT = 10
# Objects the cyclic collector found unreachable, per page after the baseline: composer frees
# what a page made by reference counting, whatever the fragment services do (a closed
# connection was a cycle of protocol and parser: 34 objects a page here, until freed).
GARBAGE_LIMIT = 1.0
IDLE_S = 1.0  # the fault server closes a keep-alive connection idle this long
HANG_S = 2.0  # a hanging answer waits this long (longer than any fragment timeout) for composer to give up
PAGE_TIMEOUT_S = 15.0

# How /f/<name> answers, with weights (percent).
MODES: tuple[tuple[str, int], ...] = (
    ("ok", 58),
    ("slow", 14),
    ("status500", 5),
    ("hang", 3),
    ("close", 4),
    ("reset", 4),
    ("overlong", 4),
    ("badgzip", 4),
    ("trickle", 4),
)
# `?profile=sick` (the `ads` fragment): mostly failing, so its circuit breaker opens and half-opens.
SICK: dict[str, int] = {"ok": 25, "slow": 10, "status500": 20, "hang": 5, "close": 8, "reset": 8, "overlong": 8,
                        "badgzip": 8, "trickle": 8}

# The template: six fragments (one primary with a healthy fallback-src, one async, inline
# fallbacks), timeouts 150–300 ms. `{f}` is the fault server's origin.
TEMPLATE = """\
<!DOCTYPE html>
<html><head><title>soak</title></head>
<body>
<p id="top">soak page start</p>
<fragment id="header" src="{f}/f/header" timeout="200"><p>header unavailable</p></fragment>
<main>
<fragment id="product" src="{f}/f/product" fallback-src="{f}/ok/product" primary timeout="300"></fragment>
</main>
<fragment id="recos" src="{f}/f/recos" async timeout="250"><p>no recommendations</p></fragment>
<fragment id="reviews" src="{f}/f/reviews" timeout="150"><p>reviews unavailable</p></fragment>
<fragment id="ads" src="{f}/f/ads?profile=sick" public timeout="200"></fragment>
<fragment id="footer" src="{f}/f/footer" fallback-src="{f}/ok/footer" timeout="250"><p>footer unavailable</p></fragment>
<p id="bottom">soak page end</p>
</body>
</html>
"""
ROUTES = """\
settings:
  templates: templates
  fragment_timeout_ms: 250
  circuit_breaker:    # opens for the sick `ads` fragment; seldom for the others (~28 % faults each)
    failures: 8
    cooldown_ms: 1000
routes:
  - name: soak
    match: {path: /page}
    template: page.html
"""
# What every complete 200 page holds, in this order, and how it ends.
PAGE_MARKERS = (b"<!DOCTYPE html>", b'<p id="top">soak page start</p>', b"<main>", b'data-fragment="product"',
                b"</main>", b'<template id="composer-async-', b'<p id="bottom">soak page end</p>')
PAGE_END = b"</body>\n</html>\n"


# --------------------------------------------------------------------------- fault server

def _fragment_body(name: str) -> bytes:
    words = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do",
             "eiusmod", "tempor", "incididunt", "ut", "labore", "et", "dolore", "magna", "aliqua")
    paragraphs, size = [], 0
    rng = random.Random(name)
    while size < 1950:
        text = " ".join(rng.choice(words) for _ in range(24))
        paragraphs.append(f"<p>{text}</p>\n")
        size += len(paragraphs[-1])
    return (f'<div class="fragment" data-fragment="{name}">\n<h2>{name}</h2>\n'
            + "".join(paragraphs) + "</div>\n").encode()


class FaultServer:
    """A raw HTTP/1.1 server (keep-alive, GET only): faults need control of every byte."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.modes = [m for m, _ in MODES]
        self.weights = [w for _, w in MODES]
        self.sick = [SICK[m] for m in self.modes]
        self.counts: Counter[str] = Counter()
        self.bodies: dict[str, tuple[bytes, bytes]] = {}

    def body(self, name: str) -> tuple[bytes, bytes]:
        if name not in self.bodies:
            plain = _fragment_body(name)
            self.bodies[name] = (plain, gzip.compress(plain, 6))
        return self.bodies[name]

    @staticmethod
    def head(status: int, length: int, *extra: str) -> bytes:
        reason = {200: "OK", 404: "Not Found", 500: "Internal Server Error"}[status]
        lines = [f"HTTP/1.1 {status} {reason}", "Content-Type: text/html; charset=utf-8",
                 f"Content-Length: {length}", "Cache-Control: no-store", *extra, "", ""]
        return "\r\n".join(lines).encode()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_S)
                except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                target = request.split(b" ", 2)[1].decode("latin-1")
                if not await self.respond(target, reader, writer):
                    return
        except (ConnectionError, OSError, IndexError):
            pass
        finally:
            writer.close()

    async def respond(self, target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False: the connection is finished."""
        path, _, query = target.partition("?")
        if path == "/stats":
            data = json.dumps(self.counts).encode()
            writer.write(self.head(200, len(data)) + data)
            await writer.drain()
            return True
        if path.startswith("/ok/"):
            name, mode = path[4:], "ok"
            self.counts["healthy"] += 1
        elif path.startswith("/f/"):
            name = path[3:]
            params = dict(p.partition("=")[::2] for p in query.split("&") if p)
            weights = self.sick if params.get("profile") == "sick" else self.weights
            forced = params.get("mode")
            mode = forced if forced in self.modes else self.rng.choices(self.modes, weights)[0]
            self.counts[mode] += 1
        else:
            writer.write(self.head(404, 0))
            await writer.drain()
            return True
        plain, zipped = self.body(name)
        rng = self.rng
        if mode == "slow":
            await asyncio.sleep(rng.uniform(0, 0.08))
            mode = "ok"
        if mode == "ok":
            extra = ['Link: </s.css>; rel="stylesheet"'] if rng.random() < 0.3 else []
            body = plain
            if rng.random() < 0.2:
                body = zipped
                extra.append("Content-Encoding: gzip")
            writer.write(self.head(200, len(body), *extra) + body)
            await writer.drain()
            return True
        if mode == "status500":
            body = b"<p>internal error</p>"
            writer.write(self.head(500, len(body)) + body)
            await writer.drain()
            return True
        if mode == "hang":  # until composer gives up (EOF) or HANG_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.read(1), HANG_S)
            return False
        if mode == "close":  # nothing at all, not even a status line
            return False
        if mode == "reset":  # headers and half the body, then RST
            writer.write(self.head(200, len(plain)) + plain[:len(plain) // 2])
            await writer.drain()
            await asyncio.sleep(0.005)
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if mode == "overlong":  # declares 512 bytes, sends the whole body: junk on a keep-alive connection
            writer.write(self.head(200, 512) + plain)
            await writer.drain()
            return True
        if mode == "badgzip":
            body = b"\x1f\x8b\x08\x00" + rng.randbytes(1020)
            writer.write(self.head(200, len(body), "Content-Encoding: gzip") + body)
            await writer.drain()
            return True
        assert mode == "trickle", mode  # 64-byte pieces, 2–12 ms apart: 60–400 ms in all
        writer.write(self.head(200, len(plain)))
        for at in range(0, len(plain), 64):
            if writer.transport.is_closing() or reader.at_eof():
                return False
            writer.write(plain[at:at + 64])
            await writer.drain()
            await asyncio.sleep(rng.uniform(0.002, 0.012))
        return True


async def _run_fault_server(seed: int) -> None:
    server = FaultServer(seed)
    listener = await asyncio.start_server(server.handle, "127.0.0.1", 0, backlog=1024)
    port = listener.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def watch_stdin() -> None:  # the parent went away (even by SIGKILL): stop too
        sys.stdin.buffer.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    print(f"fault server ready on 127.0.0.1:{port}", flush=True)
    await stop.wait()
    listener.close()


# --------------------------------------------------------------------------- processes

def _die_with_parent() -> None:
    """In a child, before exec: SIGTERM it when this script dies (Linux prctl PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)


async def _start(argv: list[str], cwd: Path, stderr: Path, ready: bytes,
                 stdin: int = asyncio.subprocess.DEVNULL) -> tuple[asyncio.subprocess.Process, str]:
    with open(stderr, "wb") as err:  # noqa: ASYNC230 (handed to the child at once)
        proc = await asyncio.create_subprocess_exec(*argv, cwd=cwd, stdin=stdin, stdout=asyncio.subprocess.PIPE,
                                                    stderr=err, preexec_fn=_die_with_parent)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        if ready not in line:
            raise RuntimeError(f"{argv[1:4]} did not start (stdout {line!r}); stderr:\n{_tail(stderr)}")
    except BaseException:
        await _stop(proc)
        raise
    return proc, line.decode().strip()


async def _stop(proc: asyncio.subprocess.Process | None, timeout: float = 15.0) -> int | None:
    """SIGTERM, then SIGKILL if it lingers; the exit code it chose (None when killed)."""
    if proc is None:
        return None
    code: int | None = proc.returncode
    try:
        if proc.returncode is None:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), timeout)
            code = proc.returncode
    except (TimeoutError, ProcessLookupError):
        pass
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
            code = None
    return code


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# --------------------------------------------------------------------------- driving

def page_problem(status: int, body: bytes) -> str | None:
    """Why this is not a complete page, or None."""
    if status == 500:
        return None if body.startswith(b"<!DOCTYPE html>") and b"500 Internal Server Error" in body \
            and body.endswith(b"</html>") else f"500 without composer's error page: {body[:120]!r}"
    if status != 200:
        return f"status {status}"
    at = 0
    for marker in PAGE_MARKERS:
        found = body.find(marker, at)
        if found < 0:
            return f"200 page without {marker.decode()!r} (in order) ({len(body)} bytes)"
        at = found + len(marker)
    if not body.endswith(PAGE_END):
        return f"200 page not ending with </body></html>: ...{body[-80:]!r}"
    return None


class Tally:
    def __init__(self) -> None:
        self.statuses: Counter[str] = Counter()
        self.bad = 0
        self.examples: list[str] = []

    def problem(self, what: str) -> None:
        self.bad += 1
        if len(self.examples) < 5:
            self.examples.append(what)


async def _drive(url: str, pages: int, concurrency: int, tally: Tally) -> None:
    """`pages` GETs of `url` over `concurrency` keep-alive connections, then close them all."""
    numbers = iter(range(pages))
    timeout = aiohttp.ClientTimeout(total=PAGE_TIMEOUT_S)

    async def worker(session: aiohttp.ClientSession) -> None:
        for _ in numbers:
            try:
                async with session.get(url, timeout=timeout) as resp:
                    body = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                tally.statuses[f"error:{type(exc).__name__}"] += 1
                tally.problem(f"{type(exc).__name__}: {exc}")
                continue
            tally.statuses[str(status)] += 1
            problem = page_problem(status, body)
            if problem is not None:
                tally.problem(problem)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))


async def _quiet_sample(pid: int) -> tuple[float, int]:
    """RSS (MB) and fds once idle connections are gone: after IDLE_S, when two counts agree."""
    await asyncio.sleep(IDLE_S + 0.3)
    last, end = fd_count(pid), time.monotonic() + 3.0
    while time.monotonic() < end:
        await asyncio.sleep(0.25)
        now = fd_count(pid)
        if now == last:
            break
        last = now
    return rss_mb(pid), last


async def _get(url: str) -> str:
    async with aiohttp.ClientSession() as session, \
            session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
        return await resp.text()


def parse_metric(text: str, name: str, label: str) -> dict[str, float]:
    """Sum the samples of counter `name` by the value of `label`."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        labels, _, value = line[len(name) + 1:].rpartition("} ")
        for pair in labels.split('",'):
            key, _, val = pair.partition("=")
            if key.strip() == label:
                sums[val.strip('"')] = sums.get(val.strip('"'), 0.0) + float(value)
    return sums


async def soak(pages: int = 20_000, concurrency: int = 50, baseline: int = 2_000, every: int = 5_000,
               seed: int = 1, rss_limit_mb: float = RSS_LIMIT_MB, fd_limit: int = FD_LIMIT,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the soak; the figures, with `ok` and the `problems` that made it fail."""
    if not 0 < baseline < pages:
        raise ValueError("need 0 < baseline < pages")
    marks = sorted({baseline, pages, *(range(every, pages, every) if every > 0 else ())} - {0})
    marks = [m for m in marks if m >= baseline]
    tmp = Path(tempfile.mkdtemp(prefix="composer-soak-"))
    try:
        return await _soak(tmp, pages, concurrency, marks, seed, rss_limit_mb, fd_limit, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def _soak(tmp: Path, pages: int, concurrency: int, marks: list[int], seed: int, rss_limit_mb: float,
                fd_limit: int, log: Callable[[str], None]) -> dict[str, Any]:
    baseline = marks[0]
    fault = composer = None
    result: dict[str, Any] = {"pages": pages, "concurrency": concurrency, "seed": seed, "checkpoints": [],
                              "problems": []}
    problems: list[str] = result["problems"]
    tally = Tally()
    try:
        fault, line = await _start([sys.executable, str(Path(__file__).resolve()), "--fault-server",
                                    "--seed", str(seed)], tmp, tmp / "faults.log", b"fault server ready",
                                   stdin=asyncio.subprocess.PIPE)
        origin = "http://" + line.rsplit(" ", 1)[1]
        (tmp / "templates").mkdir()
        (tmp / "templates" / "page.html").write_text(TEMPLATE.format(f=origin), encoding="utf-8")
        (tmp / "routes.yaml").write_text(ROUTES, encoding="utf-8")
        port, admin = _free_port(), _free_port()
        composer_log = tmp / "composer.log"
        composer, _ = await _start([sys.executable, "-m", "composer", "serve", "--config", "routes.yaml",
                                    "--host", "127.0.0.1", "--port", str(port), "--admin-port", str(admin)],
                                   tmp, composer_log, b"composer serving")
        pid, url = composer.pid, f"http://127.0.0.1:{port}/page"
        log(f"soak: {pages} pages at concurrency {concurrency}, seed {seed}; composer pid {pid}, faults at {origin}")
        log(f"{'pages':>8} {'RSS MB':>8} {'fds':>5}")
        done, driving = 0, 0.0
        for mark in marks:
            started = time.perf_counter()
            await _drive(url, mark - done, concurrency, tally)
            driving += time.perf_counter() - started
            done = mark
            if composer.returncode is not None:
                problems.append(f"composer died (exit {composer.returncode}) after about {done} pages:\n"
                                + _tail(composer_log))
                break
            rss, fds = await _quiet_sample(pid)
            garbage = sum(parse_metric(await _get(f"http://127.0.0.1:{admin}/metrics"),
                                       "python_gc_objects_collected_total", "generation").values())
            result["checkpoints"].append({"pages": done, "rss_mb": round(rss, 1), "fds": fds, "garbage": garbage})
            log(f"{done:>8} {rss:>8.1f} {fds:>5}" + ("   (baseline)" if mark == baseline else ""))
        result["seconds_driving"] = round(driving, 2)
        result["pages_per_s"] = round(done / driving, 1) if driving else 0.0
        result["statuses"] = dict(tally.statuses)
        if composer.returncode is None:
            metrics = await _get(f"http://127.0.0.1:{admin}/metrics")
            result["failures_by_reason"] = parse_metric(metrics, "composer_fragment_failures_total", "reason")
            result["failures_by_fragment"] = parse_metric(metrics, "composer_fragment_failures_total", "fragment")
            result["fallbacks_by_fragment"] = parse_metric(metrics, "composer_fragment_fallbacks_total", "fragment")
            result["requests_by_status"] = parse_metric(metrics, "composer_requests_total", "status")
        result["faults_injected"] = json.loads(await _get(origin + "/stats"))
    finally:
        try:
            code = await _stop(composer)
        finally:
            await _stop(fault)
    result["composer_exit"] = code
    if composer is not None and code != 0 and not any("composer died" in p for p in problems):
        problems.append(f"composer did not exit 0 on SIGTERM (exit {code}):\n{_tail(composer_log)}")
    errors = _error_lines(composer_log)
    result["composer_error_lines"] = len(errors)
    if errors:
        problems.append(f"composer logged {len(errors)} error line(s), e.g.:\n" + "\n".join(errors[:3]))
    if tally.bad:
        problems.append(f"{tally.bad} page(s) not complete 200/500 pages, e.g.:\n  " + "\n  ".join(tally.examples))
    points = result["checkpoints"]
    if len(points) >= 2 and points[-1]["pages"] == pages:
        first, last = points[0], points[-1]
        result["rss_growth_mb"] = round(last["rss_mb"] - first["rss_mb"], 1)
        result["fd_growth"] = last["fds"] - first["fds"]
        result["garbage_per_page"] = round((last["garbage"] - first["garbage"]) / (pages - first["pages"]), 2)
        if result["garbage_per_page"] > GARBAGE_LIMIT:
            problems.append(f"the cyclic collector found {result['garbage_per_page']} objects a page from "
                            f"{first['pages']} to {pages} pages (limit {GARBAGE_LIMIT}): a reference cycle per page")
        if result["rss_growth_mb"] > rss_limit_mb:
            problems.append(f"RSS grew {result['rss_growth_mb']} MB from {first['pages']} to {pages} pages "
                            f"(limit {rss_limit_mb} MB)")
        if result["fd_growth"] > fd_limit:
            problems.append(f"open fds grew by {result['fd_growth']} from {first['pages']} to {pages} pages "
                            f"(limit {fd_limit})")
    elif not problems:
        problems.append("the run did not reach its last checkpoint")
    result["ok"] = not problems
    return result


def _error_lines(path: Path) -> list[str]:
    found = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if '"level": "error"' in line or '"level": "critical"' in line or not line.startswith("{"):
                    found.append(line.rstrip()[:400])
    except OSError:
        pass
    return found


def report(result: dict[str, Any], log: Callable[[str], None] = print) -> None:
    if "pages_per_s" in result:
        log(f"pages/s: {result['pages_per_s']} ({result['seconds_driving']} s driving)")
    if "statuses" in result:
        log("statuses: " + ", ".join(f"{k}={v}" for k, v in sorted(result["statuses"].items())))
    if "faults_injected" in result:
        log("faults injected: " + ", ".join(f"{k}={v}" for k, v in sorted(result["faults_injected"].items())))
    if "failures_by_reason" in result:
        log("fragment failures (composer /metrics): "
            + ", ".join(f"{k}={v:.0f}" for k, v in sorted(result["failures_by_reason"].items())))
    if "rss_growth_mb" in result:
        log(f"growth from baseline to end: RSS {result['rss_growth_mb']:+.1f} MB (limit {RSS_LIMIT_MB:.0f}), "
            f"fds {result['fd_growth']:+d} (limit {FD_LIMIT}); cyclic garbage {result['garbage_per_page']} "
            f"objects a page (limit {GARBAGE_LIMIT})")
    for problem in result["problems"]:
        log(f"FAIL: {problem}")
    log("PASS" if result["ok"] else "soak FAILED")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=20_000, help="pages to drive in all (default 20000)")
    parser.add_argument("--concurrency", type=int, default=50, help="concurrent connections (default 50)")
    parser.add_argument("--baseline", type=int, default=2_000,
                        help="pages before the baseline RSS/fd sample, the warm-up (default 2000)")
    parser.add_argument("--every", type=int, default=5_000,
                        help="also sample every this many pages; 0: only baseline and end (default 5000)")
    parser.add_argument("--seed", type=int, default=1, help="fault RNG seed (default 1)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON on stdout (text on stderr)")
    parser.add_argument("--fault-server", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fault_server:
        with contextlib.suppress(ImportError):
            import uvloop
            uvloop.install()
        asyncio.run(_run_fault_server(args.seed))
        return 0

    def log(text: str) -> None:
        print(text, file=sys.stderr if args.json else sys.stdout, flush=True)

    async def run() -> dict[str, Any]:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # cancel, so every `finally` stops its processes
            loop.add_signal_handler(sig, task.cancel)
        return await soak(args.pages, args.concurrency, args.baseline, args.every, args.seed, log=log)

    try:
        result = asyncio.run(run())
    except asyncio.CancelledError:
        log("soak: interrupted")
        return 130
    except (RuntimeError, ValueError, OSError) as exc:
        log(f"soak FAILED: {exc}")
        return 1
    report(result, log)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
