"""A fast fragment server for benchmarks: GET /f/<name>?delay=<ms>&size=<bytes>.

The same answers as bench/fragment_server.js: `<div class="NAME">xxx…</div>\\n` of `size` bytes
(default 1024) after `delay` ms, `text/html; charset=utf-8` with a Content-Length and a `Link`
header declaring one stylesheet and one fragment script, as real fragment services do;
anything else is a 404. Run: python bench/fragment_server.py PORT [PAGES_DIR]

With a PAGES_DIR it also answers GET /p/<name> with PAGES_DIR/<name>.html (read once): the page
templates Varnish (bench/run.py's ESI peer) fetches from its backend.

Why not aiohttp's web server: the load side shares one core with wrk, and at page20 c64 the
proxies ask 30,000 fragments a second of it. aiohttp costs 30 µs a request there and Node's
`http` 15-19; an `asyncio.Protocol` on uvloop with llhttp (httptools) parsing the requests and
each answer's bytes made once costs 6-7 (bench/run.py measures them and uses the cheaper): a fragment service that is not the bottleneck is what a proxy's figures need.
Keep-alive for as long as the client likes (no idle timeout), answers in request order on a
connection, a listen backlog of 4,096 (as the Node one, see there).
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections import deque
from email.utils import formatdate
from pathlib import Path
from urllib.parse import unquote

import httptools

_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\nnot found\n"
_BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
_PARAM = re.compile(r"(?:^|&)(delay|size)=(\d+)")
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_MOST = 10 * 1024 * 1024


class Answers:
    """Each distinct response's bytes, made once a second (a run asks for a few hundred), with
    the head Node's `http` sends: its `Date`, `Connection` and `Keep-Alive` lines too, so a
    proxy parses as many header lines from either server."""

    def __init__(self, pages: Path | None) -> None:
        self.pages = pages
        self.made: dict[str, tuple[float, bytes]] = {}
        self.second = 0
        self.tail = b""

    def __call__(self, url: bytes) -> tuple[float, bytes]:
        """(delay in seconds, the whole response) for a request target."""
        now = int(time.time())
        if now != self.second:
            self.second = now
            self.tail = (f"Date: {formatdate(now, usegmt=True)}\r\n"
                         "Connection: keep-alive\r\nKeep-Alive: timeout=75\r\n\r\n").encode()
            self.made.clear()
        key = url.decode("latin-1")
        found = self.made.get(key)
        if found is None:
            found = self._make(key)
            if len(self.made) < 10000:
                self.made[key] = found
        return found

    def _make(self, target: str) -> tuple[float, bytes]:
        path, _, query = target.partition("?")
        if self.pages is not None and path.startswith("/p/") and _NAME.match(path[3:]):
            file = self.pages / f"{path[3:]}.html"
            if file.is_file():
                return 0.0, self._response(file.read_bytes(), b"")
        if not path.startswith("/f/") or len(path) <= 3 or "/" in path[3:]:
            return 0.0, _NOT_FOUND
        name = re.sub(r"[^A-Za-z0-9_-]", "_", unquote(path[3:]))
        params = {key: int(value) for key, value in _PARAM.findall(query)}
        size = min(params.get("size", 1024), _MOST)
        body = f'<div class="{name}">{"x" * max(0, size - 30)}</div>\n'.encode()
        link = f'Link: </assets/{name}.css>; rel="stylesheet", </assets/{name}.js>; rel="fragment-script"\r\n'
        return params.get("delay", 0) / 1000, self._response(body, link.encode())

    def _response(self, body: bytes, link: bytes) -> bytes:
        return (b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: %d\r\n%s%s"
                % (len(body), link, self.tail)) + body


class Connection(asyncio.Protocol):
    """One client: requests parsed by llhttp, answered in order, each after its delay."""

    def __init__(self, answers: Answers) -> None:
        self.answers = answers
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.queue: deque[list[bytes | None]] = deque()  # answers in request order; None: not yet due

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.write(_BAD)
                self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        delay, answer = self.answers(self.url)
        self.url = b""
        slot: list[bytes | None] = [None]
        self.queue.append(slot)
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self._due, slot, answer)
        else:
            self._due(slot, answer)

    def _due(self, slot: list[bytes | None], answer: bytes) -> None:
        slot[0] = answer
        queue = self.queue
        while queue and queue[0][0] is not None:
            ready = queue.popleft()[0]
            if self.transport is not None:
                self.transport.write(ready)  # type: ignore[arg-type]


async def serve(port: int, pages: Path | None) -> None:
    answers = Answers(pages)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(answers), "127.0.0.1", port, backlog=4096)
    print(f"ready {port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(serve(int(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
