"""A fast fragment server for benchmarks: GET /f/<name>?delay=<ms>&size=<bytes>.

Every answer declares one stylesheet and one script in its `Link` header, as real fragment
services do. Run: python bench/fragment_server.py PORT [PAGES_DIR]

With a PAGES_DIR it also answers GET /p/<name> with PAGES_DIR/<name>.html (read once): the page
templates Varnish (bench/run.py's ESI peer) fetches from its backend.

bench/fragment_server.js answers the same on Node's `http` module and costs less CPU per
request; bench/run.py measures both and uses the cheaper one.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web


async def fragment(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    delay = int(request.query.get("delay", "0"))
    size = int(request.query.get("size", "1024"))
    if delay:
        await asyncio.sleep(delay / 1000)
    body = (f"<div class=\"{name}\">" + "x" * max(0, size - 30) + "</div>\n").encode()
    return web.Response(body=body, content_type="text/html", headers={
        "link": f'</assets/{name}.css>; rel="stylesheet", </assets/{name}.js>; rel="fragment-script"'})


def pages(directory: Path) -> Callable[[web.Request], Awaitable[web.Response]]:
    cache: dict[str, bytes | None] = {}

    async def page(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in cache:
            file = directory / f"{name}.html"
            cache[name] = file.read_bytes() if name.replace("_", "").replace("-", "").isalnum() and file.is_file() \
                else None
        body = cache[name]
        if body is None:
            raise web.HTTPNotFound()
        return web.Response(body=body, content_type="text/html", charset="utf-8")

    return page


def main() -> None:
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    app = web.Application()
    app.router.add_get("/f/{name}", fragment)
    if len(sys.argv) > 2:
        app.router.add_get("/p/{name}", pages(Path(sys.argv[2])))
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None,
                backlog=4096)  # as bench/fragment_server.js (see there)


if __name__ == "__main__":
    main()
