"""CPU per 20-fragment page: aiohttp's ClientSession against composer's own client.

    python bench/client.py [--pages 1000] [--in-flight 16] [--fragments 20] [--size 2048]
                           [--repeat 3] [--warmup 100] [--server python|node]
                           [--kinds aiohttp,client,fetch,minimal] [--loops asyncio,uvloop]

A "page" is `--fragments` concurrent GETs of `--size`-byte fragments (all different paths on
one origin, keep-alive connections reused), `--in-flight` pages at a time, `--pages` pages.
The fragment server is bench/fragment_server.py (uvloop + httptools, the cheaper; `--server
node`: bench/fragment_server.js), started here on a free 127.0.0.1 port and pinned to CPU 1; each measurement runs in its own process pinned to CPU 0
(when `taskset` exists) and reports the CPU time (user + system) it spent on the measured
pages, after a warm-up. Rows:

- aiohttp: `ClientSession.get()` + `read()`, with the session options composer used.
- client: `composer.client.Client.get()` (the body read whole, as above).
- fetch(): `composer.fragments.fetch()` on that client: the whole fragment fetch composer
  makes (deadline, status rules, UTF-8 check, `Link` parsing — the server sends one).

each on the asyncio loop and on uvloop. The median of `--repeat` runs is printed; every
process this starts is stopped at the end, also on an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from yarl import URL

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KINDS = ("aiohttp", "client", "fetch", "minimal")
LOOPS = ("asyncio", "uvloop")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pinned(cpu: str, argv: list[str]) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", cpu, *argv]
    return argv


def wait_listening(port: int, proc: subprocess.Popen[bytes], deadline: float = 20.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"fragment server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("fragment server did not start listening")


# ---------------------------------------------------------------- one measurement (child process)

async def measure(kind: str, port: int, pages: int, in_flight: int, fragments: int, size: int,
                  warmup: int) -> dict[str, float]:
    from multidict import CIMultiDict
    from yarl import URL

    urls = [URL(f"http://127.0.0.1:{port}/f/frag{i}?size={size}") for i in range(fragments)]
    headers = CIMultiDict({"x-request-id": "0123456789abcdef", "accept-encoding": "gzip, deflate, br"})
    max_bytes = 5 * 1024 * 1024

    if kind == "minimal":
        one, close = minimal_client(port, headers)
    elif kind == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=256, ttl_dns_cache=300, keepalive_timeout=30),
            cookie_jar=aiohttp.DummyCookieJar(), timeout=aiohttp.ClientTimeout(total=None),
            skip_auto_headers=("User-Agent",), trust_env=False)

        async def one(url: URL) -> int:
            async with session.get(url, headers=headers, allow_redirects=False) as resp:
                return len(await resp.read())

        close = session.close
    elif kind == "client":
        from composer.client import Client

        client = Client(limit_per_host=256)

        async def one(url: URL) -> int:
            body = (await client.get(url, headers, max_bytes=max_bytes)).body
            assert body is not None
            return len(body)

        close = client.close
    else:
        from composer.fragments import Fetched, fetch, new_session

        client = new_session(limit_per_host=256)

        async def one(url: URL) -> int:
            result = await fetch(client, url, headers, timeout=3.0, max_bytes=max_bytes, allow_redirect=False)
            assert isinstance(result, Fetched), result
            assert len(result.assets) == 2
            return len(result.body)

        close = client.close

    async def page() -> None:
        sizes = await asyncio.gather(*[one(url) for url in urls])
        assert all(s >= size - 30 for s in sizes), sizes

    async def run(n: int) -> None:
        todo = iter(range(n))

        async def worker() -> None:
            for _ in todo:
                await page()

        await asyncio.gather(*[worker() for _ in range(in_flight)])

    try:
        await run(warmup)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await run(pages)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        await close()
    return {"cpu_s": cpu, "wall_s": wall}


def minimal_client(port: int, headers: Any) -> tuple[Callable[[URL], Coroutine[Any, Any, int]],
                                                    Callable[[], Coroutine[Any, Any, None]]]:
    """The floor: PERF-NOTES' "minimal asyncio.Protocol keep-alive client + httptools" — one
    origin, no limits, no decoding, no error handling. Not a client to use: a yardstick."""
    import httptools

    loop = asyncio.get_running_loop()
    idle: list[Proto] = []
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())

    class Proto(asyncio.Protocol):
        transport: asyncio.Transport

        def __init__(self) -> None:
            self.parser = httptools.HttpResponseParser(self)
            self.fut: asyncio.Future[bytes] | None = None
            self.chunks: list[bytes] = []

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_body(self, body: bytes) -> None:
            self.chunks.append(body)

        def on_message_complete(self) -> None:
            body, self.chunks = b"".join(self.chunks), []
            assert self.fut is not None
            self.fut.set_result(body)

    async def one(url: URL) -> int:
        if idle:
            proto = idle.pop()
        else:
            _, proto = await loop.create_connection(Proto, "127.0.0.1", port)
        proto.fut = loop.create_future()
        proto.transport.write(f"GET {url.raw_path_qs} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())
        body = await proto.fut
        idle.append(proto)
        return len(body)

    async def close() -> None:
        for proto in idle:
            proto.transport.close()
        await asyncio.sleep(0)

    return one, close


def child(args: argparse.Namespace) -> None:
    kind, loop = args.child
    coro = measure(kind, args.port, args.pages, args.in_flight, args.fragments, args.size, args.warmup)
    if loop == "uvloop":
        import uvloop

        result = uvloop.run(coro)
    else:
        result = asyncio.run(coro)
    print(json.dumps(result))


# ---------------------------------------------------------------- the parent

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=16)
    parser.add_argument("--fragments", type=int, default=20)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--server", choices=("python", "node"), default="python",
                        help="bench/fragment_server.py (default) or bench/fragment_server.js (needs node)")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--loops", default=",".join(LOOPS))
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    serve = [shutil.which("node") or "node", str(HERE / "fragment_server.js")] if args.server == "node" \
        else [sys.executable, str(HERE / "fragment_server.py")]
    server = subprocess.Popen(pinned("1", [*serve, str(port)]),
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        wait_listening(port, server)
        for rep in range(args.repeat):
            for kind in args.kinds.split(","):
                for loop in args.loops.split(","):
                    argv = [sys.executable, __file__, "--child", kind, loop, "--port", str(port),
                            "--pages", str(args.pages), "--in-flight", str(args.in_flight),
                            "--fragments", str(args.fragments), "--size", str(args.size),
                            "--warmup", str(args.warmup)]
                    out = subprocess.run(pinned("0", argv), env=env, capture_output=True, text=True, timeout=600,
                                         check=False)
                    if out.returncode != 0:
                        raise SystemExit(f"{kind}/{loop} failed:\n{out.stderr}")
                    result = json.loads(out.stdout.strip().splitlines()[-1])
                    results.setdefault((kind, loop), []).append(result)
                    print(f"  run {rep + 1}: {kind:8} {loop:8} {result['cpu_s'] * 1000 / args.pages:.3f} ms/page",
                          file=sys.stderr)
    finally:
        try:
            os.killpg(server.pid, 15)
        except ProcessLookupError:
            pass
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait()

    names = {"aiohttp": "aiohttp `ClientSession.get` + `read()`", "client": "composer `Client.get`",
             "fetch": "composer `fragments.fetch()` (whole fetch)",
             "minimal": "floor: minimal Protocol + httptools"}
    print(f"\nfragment server: bench/fragment_server.{'js' if args.server == 'node' else 'py'}; "
          f"{args.pages} pages of {args.fragments} concurrent GETs of {args.size} B, {args.in_flight} pages in "
          f"flight, keep-alive; CPU of the fetching process, median of {args.repeat}"
          f"{' (taskset: client CPU 0, server CPU 1)' if shutil.which('taskset') else ''}\n")
    print("| fetch path | loop | CPU per page | per fetch | pages/s (wall) |")
    print("|---|---|---:|---:|---:|")
    for (kind, loop), runs in results.items():
        cpu = statistics.median(r["cpu_s"] for r in runs)
        wall = statistics.median(r["wall_s"] for r in runs)
        per_page = cpu * 1000 / args.pages
        print(f"| {names[kind]} | {loop} | {per_page:.2f} ms | {per_page * 1000 / args.fragments:.0f} µs "
              f"| {args.pages / wall:.0f} |")


if __name__ == "__main__":
    main()
