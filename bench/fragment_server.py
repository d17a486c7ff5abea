"""A fast fragment server for benchmarks: GET /f/<name>?delay=<ms>&size=<bytes>.

Every answer declares one stylesheet and one script in its `Link` header, as real fragment
services do. Run: python bench/fragment_server.py PORT

bench/fragment_server.js answers the same on Node's `http` module and costs less CPU per
request; bench/run.py measures both and uses the cheaper one.
"""

from __future__ import annotations

import asyncio
import sys

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


def main() -> None:
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    app = web.Application()
    app.router.add_get("/f/{name}", fragment)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
