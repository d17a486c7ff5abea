"""`composer demo`: the shipped example, with its fragment services, on loopback.

The fragment services are one small aiohttp app on a free loopback port: a header, a
primary product fragment declaring CSS and JS in `Link`, slow async recommendations, a
footer, and a reviews service that always fails so its fallback shows. The example itself
is the repository's `routes.yaml` + `templates/` + `manifests/`, shipped inside the wheel
as `composer/example/`; they name the services `127.0.0.1:9101`, which the demo rewrites
to the port it got in a temporary copy (so a second demo, or the test suite, never finds
the port taken).
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from .errors import ConfigError
from .routing import load
from .server import ComposerServer, stop_event

__all__ = ["EXAMPLE_ORIGIN", "demo_app", "example_at", "example_config", "run_demo"]

EXAMPLE_ORIGIN = "http://127.0.0.1:9101"  # where the shipped example's files say the services are

_CSS = b"""
.product{border:1px solid #ccc;border-radius:8px;padding:1em;margin:1em 0}
.product h1{margin-top:0}
.recos{background:#f6f6ff;padding:1em}
"""
_JS = b"""
document.addEventListener("DOMContentLoaded", function () {
  var el = document.querySelector(".product");
  if (el) el.setAttribute("data-enhanced", "true");
});
"""
_BROKEN_JS = b"""
throw new Error("footer 2.4.0: a bug shipped on purpose (composer demo): see composer_client_errors_total");
"""
_SITE_CSS = b"body{font-family:system-ui,sans-serif;margin:0 auto;max-width:48em;padding:0 1em}"
_PRODUCTS = {"42": ("Espresso machine", "199.00"), "7": ("Coffee grinder", "89.00")}


def demo_app(recommendation_delay: float = 1.5) -> web.Application:
    """The demo fragment services (also used by the tests of the shipped example)."""

    async def header(request: web.Request) -> web.Response:
        return web.Response(
            text='<header><a href="/">composer demo shop</a> · <a href="/products/42">espresso</a>'
                 ' · <a href="/products/7">grinder</a></header>',
            content_type="text/html", headers={"link": f'<{_origin(request)}/static/site.css>; rel="stylesheet"'})

    async def product(request: web.Request) -> web.Response:
        sku = request.match_info["sku"]
        base = _origin(request)
        links = (f'<{base}/static/product.css>; rel="stylesheet", '
                 f'<{base}/static/product.js>; rel="fragment-script"')
        if sku not in _PRODUCTS:
            return web.Response(status=404, text=f"<h1>No product {sku!r}</h1>", content_type="text/html")
        name, price = _PRODUCTS[sku]
        return web.Response(
            text=f'<article class="product"><h1>{name}</h1><p>{price} EUR</p></article>',
            content_type="text/html", headers={"link": links})

    async def recommendations(_: web.Request) -> web.Response:
        await asyncio.sleep(recommendation_delay)
        return web.Response(text='<aside class="recos"><h2>You may also like</h2>'
                                 '<a href="/products/7">Coffee grinder</a></aside>', content_type="text/html")

    async def reviews(_: web.Request) -> web.Response:
        return web.Response(status=503, text="reviews are down")

    async def footer(request: web.Request) -> web.Response:
        version = request.match_info.get("version", "")
        style = ' style="border-top:3px solid #36c"' if version == "2.4.0" else ""
        # 2.4.0 ships a script that throws (SPEC §7): composer_client_errors_total{fragment="footer",
        # version="2.4.0"} moves as soon as a browser leaves a demo page.
        links = {"link": f'<{_origin(request)}/static/footer-2.4.0.js>; rel="fragment-script"'} \
            if version == "2.4.0" else None
        return web.Response(text=f"<footer{style}>composer demo · footer {version or 'static'} · "
                                 f"fragments from {request.host}</footer>", content_type="text/html", headers=links)

    async def stock(request: web.Request) -> web.Response:
        sku = request.match_info["sku"]
        if sku not in _PRODUCTS:
            return web.json_response({"error": f"no product {sku!r}"}, status=404)
        return web.json_response({"sku": sku, "in_stock": sku == "42"})

    app = web.Application()
    app.router.add_get("/header", header)
    app.router.add_get("/product/{sku}", product)
    app.router.add_get("/recommendations", recommendations)
    app.router.add_get("/reviews", reviews)
    app.router.add_get("/footer", footer)  # the manifest's fallback for the footer
    app.router.add_get("/footer/{version}", footer)  # one URL per deployed version
    app.router.add_get("/stock/{sku}", stock)
    app.router.add_get("/static/site.css", _static(_SITE_CSS, "text/css"))
    app.router.add_get("/static/product.css", _static(_CSS, "text/css"))
    app.router.add_get("/static/product.js", _static(_JS, "application/javascript"))
    app.router.add_get("/static/footer-2.4.0.js", _static(_BROKEN_JS, "application/javascript"))
    return app


def _static(body: bytes, content_type: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(_: web.Request) -> web.Response:
        # CORS: with client signals composer loads fragment scripts with `crossorigin`, and a
        # script on another origin then needs this to run (and to report its errors).
        return web.Response(body=body, content_type=content_type, headers={"access-control-allow-origin": "*"})
    return handler


def _origin(request: web.Request) -> str:
    """The services' own origin, as composer addressed them (assets are fetched from it)."""
    return f"http://{request.host}"


def example_at(origin: str, folder: Path) -> Path:
    """A copy of the shipped example in `folder` whose fragment URLs point at `origin`; its
    routes.yaml."""
    source = example_config().parent
    for name in ("routes.yaml", "templates", "manifests"):
        if (source / name).is_dir():
            shutil.copytree(source / name, folder / name, dirs_exist_ok=True)
        elif (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    for file in folder.rglob("*"):
        if file.is_file() and file.suffix in (".yaml", ".yml", ".html", ".json"):
            text = file.read_text(encoding="utf-8")
            if EXAMPLE_ORIGIN in text:
                file.write_text(text.replace(EXAMPLE_ORIGIN, origin), encoding="utf-8")
    return folder / "routes.yaml"


def example_config() -> Path:
    """routes.yaml of the shipped example: inside the wheel, else the source checkout's."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "example" / "routes.yaml", here.parent / "routes.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("the example routes.yaml is not installed")


async def run_demo(*, port: int = 8080, admin_port: int = 9911, fragments_port: int = 0) -> int:
    """Start the fragment services and the example; run until SIGINT/SIGTERM."""
    stop = stop_event()
    services = web.AppRunner(demo_app(), access_log=None)
    await services.setup()
    server: ComposerServer | None = None
    with tempfile.TemporaryDirectory(prefix="composer-demo-") as folder:
        try:
            await web.TCPSite(services, "127.0.0.1", fragments_port).start()
            origin = f"http://127.0.0.1:{services.addresses[0][1]}"
            table = load(example_at(origin, Path(folder)))  # its manifest is a file: nothing to fetch
            server = ComposerServer(table, host="127.0.0.1", port=port, admin_port=admin_port)
            await server.start()
        except (ConfigError, FileNotFoundError) as exc:
            print(f"composer demo: the shipped example is broken: {exc}", file=sys.stderr)
            return await _stopped(services, server, 2)
        except OSError as exc:
            print(f"composer demo: cannot listen: {exc.strerror or exc} (choose other ports with --port, "
                  "--admin-port; 0 takes a free one)", file=sys.stderr)
            return await _stopped(services, server, 1)
        print(f"composer demo: open {server.url}/products/42 (fragment services: {origin}, "
              f"metrics: {server.admin_url}/metrics)", flush=True)
        await stop.wait()
        return await _stopped(services, server, 0)


async def _stopped(services: web.AppRunner, server: ComposerServer | None, status: int) -> int:
    """Stop composer (if it started) and the services; `status` is the exit status."""
    if server is not None:
        await server.stop()
    await services.cleanup()
    return status
