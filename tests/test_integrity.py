"""Config is read whole or not at all, and a manifest URL's secrets never show (SPEC §9).

Everything is real, on 127.0.0.1: manifest URLs are served by aiohttp apps that stream their
body in chunks with pauses (as a slow or far server does), composer runs in process, loaded
with `composer.load` like `composer serve`, or as `python -m composer check`. Files are
rewritten in place in two halves while pages are requested continuously: the half-written
version must never be served. The only fixed waits are the pause inside a write and the
proof that a SIGHUP does not wait for a long settle interval.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Self

import pytest
from aiohttp import web
from conftest import (
    Composer,
    Records,
    captured,
    cli_env,
    eventually,
    html,
    replace_file,
    write_config,
)

from composer import load
from composer.errors import ConfigError
from composer.manifest import fetch_once
from composer.reload import aload
from composer.urls import redact

MB = 1024 * 1024
PAGE_ROUTE = """\
routes:
  - name: page
    match: {path: /page}
    template: page.html
"""
FOOTER_PAGE = '<html><body><h1>page</h1>\n<fragment name="footer"><p>footer inline</p></fragment>\n</body></html>\n'


# --------------------------------------------------------------------------- helpers


def padded_manifest(version_url: str, *, comment_lines: int, enabled: bool) -> str:
    """A manifest whose last line, `enabled:`, sits after `comment_lines` comment lines: a
    reader that stops early sees a valid manifest with the fragment enabled."""
    head = textwrap.dedent(f"""\
        fragments:
          footer:
            owner: team-x
            versions: {{"1.0.0": "{version_url}"}}
            active: "1.0.0"
        """)
    padding = "".join(f"    # padding line {i:06d}, as long as a generated manifest's comments get\n"
                      for i in range(comment_lines))
    return head + padding + f"    enabled: {'true' if enabled else 'false'}\n"


async def stream_in_chunks(request: web.Request, body: bytes, *, chunks: int, pause: float,
                           length: bool = True) -> web.StreamResponse:
    """Answer `body` in `chunks` writes with `pause` seconds between them."""
    headers = {"content-type": "application/yaml"}
    if length:
        headers["content-length"] = str(len(body))
    resp = web.StreamResponse(headers=headers)
    await resp.prepare(request)
    step = -(-len(body) // chunks)
    for start in range(0, len(body), step):
        await resp.write(body[start:start + step])
        await asyncio.sleep(pause)
    await resp.write_eof()
    return resp


async def serve_manifest(aiohttp_server: Any, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                         path: str = "/m.yaml") -> str:
    """A real server answering `path` with `handler`; returns its URL."""
    app = web.Application()
    app.router.add_get(path, handler)
    server = await aiohttp_server(app, host="127.0.0.1")
    return str(server.make_url(path))


@pytest.fixture
def start_loaded(start_composer: Callable[..., Awaitable[Composer]]) -> Callable[..., Awaitable[Composer]]:
    """Factory: conftest's `start_composer`, each call in its own folder."""
    count = 0

    async def start(templates: dict[str, str], *, routes: str = PAGE_ROUTE, settings: str = "") -> Composer:
        nonlocal count
        count += 1
        return await start_composer(templates, routes, settings, folder=f"composer-{count}")

    return start


async def run_cli(*args: str, cwd: Path) -> tuple[int, str, str]:
    """`python -m composer ARGS` to completion: (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "composer", *args, cwd=cwd, env=cli_env(), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def log_lines(records: Records) -> list[str]:
    """Each captured record as the JSON line composer would write (message and fields)."""
    return [json.dumps({"message": r.getMessage(), **getattr(r, "fields", {})}, default=str)
            for r in records.records]


def reload_counts(metrics_text: str) -> dict[str, float]:
    counts = {"ok": 0.0, "error": 0.0}
    for line in metrics_text.splitlines():
        for result in counts:
            if line.startswith(f'composer_config_reloads_total{{result="{result}"}}'):
                counts[result] = float(line.rsplit(" ", 1)[1])
    return counts


# =========================================================================== 1. URL manifest read whole


async def test_url_manifest_sent_in_chunks_is_read_to_its_end(aiohttp_server, tmp_path):
    text = padded_manifest("http://127.0.0.1:1/footer", comment_lines=5000, enabled=False)
    body = text.encode()
    assert 350_000 < len(body) < 16 * MB

    async def slow(request: web.Request) -> web.StreamResponse:
        return await stream_in_chunks(request, body, chunks=8, pause=0.02)

    url = await serve_manifest(aiohttp_server, slow)
    fetched = await fetch_once(url)
    assert fetched.text == text

    # the loader `composer serve` uses: the flag at the very end is honoured
    config = write_config(tmp_path, {"page.html": FOOTER_PAGE}, PAGE_ROUTE, f"settings:\n  manifest: {url}\n")
    table = await aload(config)
    assert table.manifest is not None
    assert table.manifest.fragments["footer"].enabled is False


async def test_url_manifest_over_16_mb_is_refused_without_reading_all_of_it(aiohttp_server):
    sent = 0
    line = b"# " + b"x" * 1021 + b"\n"  # 1 KB comment lines: valid YAML however it is cut

    async def endless(request: web.Request) -> web.StreamResponse:
        """Up to 64 MB, without a content-length, until the client hangs up."""
        nonlocal sent
        resp = web.StreamResponse(headers={"content-type": "application/yaml"})
        await resp.prepare(request)
        chunk = b"fragments: {}\n" + line * 1024
        try:
            while sent < 64 * MB:
                await resp.write(chunk)
                sent += len(chunk)
        except ConnectionError:
            return resp
        await resp.write_eof()
        return resp

    url = await serve_manifest(aiohttp_server, endless)
    with pytest.raises(ConfigError) as info:
        await fetch_once(url)
    assert len(info.value.problems) == 1
    assert "larger than 16 MB" in info.value.problems[0], info.value.problems
    assert sent < 40 * MB, f"the whole body was read ({sent} bytes) before refusing it"


async def test_url_manifest_announcing_over_16_mb_is_refused_at_once(aiohttp_server):
    async def announced(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "application/yaml",
                                           "content-length": str(17 * MB)})
        await resp.prepare(request)
        await resp.write(b"fragments: {}\n")
        await asyncio.sleep(30)  # never sends the rest: the refusal must not wait for it
        return resp

    url = await serve_manifest(aiohttp_server, announced)
    with pytest.raises(ConfigError) as info:
        await asyncio.wait_for(fetch_once(url), 5)
    assert "larger than 16 MB" in info.value.problems[0], info.value.problems


# =========================================================================== 2. the manifest URL's secrets


async def test_manifest_url_userinfo_is_sent_as_basic_credentials_and_its_query_kept(aiohttp_server):
    seen: list[tuple[str | None, str]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append((request.headers.get("Authorization"), request.query_string))
        return web.Response(text="fragments: {}\n", headers={"ETag": '"v1"'})

    url = await serve_manifest(aiohttp_server, handle)
    fetched = await fetch_once(url.replace("http://", "http://user:s3cret@") + "?token=t0ken")
    assert (fetched.text, fetched.etag) == ("fragments: {}\n", '"v1"')
    assert seen == [("Basic " + base64.b64encode(b"user:s3cret").decode(), "token=t0ken")]


def test_redact_drops_userinfo_query_and_fragment_only():
    assert redact("http://user:s3cret@host/m.yaml?token=abc") == "http://host/m.yaml"
    assert redact("https://tok@host:8443/a/b.json#x") == "https://host:8443/a/b.json"
    assert redact("http://host/m.yaml") == "http://host/m.yaml"
    assert redact("HTTP://u:p@host") == "HTTP://host"
    assert redact("manifests/footer.yaml") == "manifests/footer.yaml"  # a path is shown as it is
    assert redact("/etc/composer/m.yaml") == "/etc/composer/m.yaml"


async def test_manifest_url_userinfo_and_query_never_show_in_admin_logs_or_errors(
        aiohttp_server, start_loaded, tmp_path):
    state: dict[str, Any] = {"status": 200, "body": padded_manifest("http://127.0.0.1:1/f", comment_lines=0,
                                                                     enabled=True)}

    async def handle(request: web.Request) -> web.Response:
        if state["status"] != 200:
            return web.Response(status=state["status"], text="oops")
        return web.Response(text=state["body"], content_type="application/yaml")

    url = await serve_manifest(aiohttp_server, handle)
    port = url.split(":")[2].split("/")[0]
    secret_url = f"http://user:s3cret@127.0.0.1:{port}/m.yaml?token=t0ken"
    shown = f"http://127.0.0.1:{port}/m.yaml"
    secrets = ("s3cret", "t0ken", "user:")

    def clean(text: str) -> bool:
        return not any(s in text for s in secrets)

    with captured("composer") as records:
        composer = await start_loaded({"page.html": FOOTER_PAGE},
                                      settings=f"settings:\n  manifest: '{secret_url}'\n  manifest_poll_s: 1\n")
        async with composer.session.get(composer.admin_url + "/manifest") as resp:
            assert resp.status == 200
            raw = await resp.text()
        assert json.loads(raw)["source"] == shown
        assert clean(raw), raw

        def logged(*words: str) -> Callable[[], Awaitable[bool]]:
            async def probe() -> bool:
                return any(all(w in line for w in words) for line in log_lines(records))
            return probe

        # a broken body, refused on SIGHUP (fetched by the loader), then by the poller
        state["body"] = "fragments:\n  footer: [\n"
        composer.server.reloader.trigger()
        await eventually(logged(shown, "invalid YAML"), "the broken manifest to be refused")
        # a server error, seen by the poller
        state["status"] = 500
        await eventually(logged(shown, "answered 500"), "the 500 to be logged")
        # a good body again
        state["status"], state["body"] = 200, padded_manifest("http://127.0.0.1:1/f", comment_lines=1, enabled=True)
        composer.server.reloader.trigger()

        async def reloaded() -> bool:
            return reload_counts(await composer.metrics())["ok"] >= 1
        await eventually(reloaded, "the good manifest to be reloaded")
        async with composer.session.get(composer.admin_url + "/manifest") as resp:
            again = await resp.text()
        assert json.loads(again)["source"] == shown and clean(again), again

    lines = log_lines(records)
    assert all(clean(line) for line in lines), [line for line in lines if not clean(line)]

    # errors raised by the loader (and printed by `composer check`)
    with pytest.raises(ConfigError) as info:
        inline = "fragments:\n  footer: {owner: t, versions: {'1': 'http://127.0.0.1:1/'}, active: '1'}\n"
        await aload(write_config(
            tmp_path, {"page.html": FOOTER_PAGE}, inline + PAGE_ROUTE, f"settings:\n  manifest: '{secret_url}'\n"))
    assert any("also declared" in p and p.startswith(shown) for p in info.value.problems), info.value.problems
    assert all(clean(p) for p in info.value.problems), info.value.problems

    dead = "http://user:s3cret@127.0.0.1:1/m.yaml?token=t0ken"
    write_config(tmp_path, {"page.html": FOOTER_PAGE}, PAGE_ROUTE, f"settings:\n  manifest: '{dead}'\n")
    status, out, err = await run_cli("check", cwd=tmp_path)
    assert status == 2, (out, err)
    assert "http://127.0.0.1:1/m.yaml" in err and "cannot fetch" in err, err
    assert clean(out + err), err

    state["body"] = "fragments:\n  footer: [\n"
    write_config(tmp_path, {"page.html": FOOTER_PAGE}, PAGE_ROUTE, f"settings:\n  manifest: '{secret_url}'\n")
    status, out, err = await run_cli("check", cwd=tmp_path)
    assert status == 2 and err.startswith(f"{shown}:"), err
    assert clean(out + err), err


# =========================================================================== 3. files read whole


INTERVAL_MS = 400  # the settle time; each half-write pauses for half of it
PAUSE = INTERVAL_MS / 1000 / 2


class Pages:
    """Requests `paths` continuously in the background and keeps every (path, status, body, location)."""

    def __init__(self, composer: Composer, *paths: str) -> None:
        self.composer, self.paths = composer, paths
        self.seen: list[tuple[str, int, str, str | None]] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def fetch(self) -> None:
        for path in self.paths:
            resp, body = await self.composer.get(path)
            self.seen.append((path, resp.status, body, resp.headers.get("Location")))

    async def _run(self) -> None:
        while not self._stop.is_set():
            await self.fetch()
            await asyncio.sleep(0.005)

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task


async def write_in_two_halves(composer: Composer, path: Path, text: str, cut: int,
                              pages: Pages) -> bool | None:
    """Rewrite `path` in place: `text[:cut]`, a pause of half the settle time, then the rest.

    Mid-pause the reloader is asked to check (as its poll would) and pages are fetched: a
    reloader that loads whatever it finds serves the half-written file right then. Returns
    what that check answered (None: nothing to load yet).
    """
    with open(path, "w", encoding="utf-8") as f:  # noqa: ASYNC230 - the loop must serve pages mid-write
        f.write(text[:cut])
        f.flush()
        await asyncio.sleep(PAUSE / 2)
        mid_write = await composer.server.reloader.check()
        await pages.fetch()
        await asyncio.sleep(PAUSE / 2)
        f.write(text[cut:])
    return mid_write


def page(title: str, fragment_url: str) -> str:
    return (f"<html><body><h1>{title}</h1>\n<fragment id=\"a\" src=\"{fragment_url}\"></fragment>\n"
            f"<p>{'lorem ipsum ' * 40}</p>\n</body></html>\n")


async def test_template_written_in_two_halves_is_served_only_once_complete(start_composer, fragments, tmp_path):
    svc = await fragments({"/a": html("<p>fragment A</p>")})
    composer = await start_composer({"page.html": page("v1", svc.url("/a"))},
                                    settings=f"settings: {{reload_interval_ms: {INTERVAL_MS}}}\n")
    complete = {page(v, svc.url("/a")).replace(f'<fragment id="a" src="{svc.url("/a")}"></fragment>',
                                               "<p>fragment A</p>") for v in ("v1", "v2")}
    v2 = page("v2", svc.url("/a"))
    async with Pages(composer, "/page") as pages:
        mid_write = await write_in_two_halves(composer, tmp_path / "templates" / "page.html", v2,
                                              v2.index("lorem") + 30, pages)

        async def served_v2() -> bool:
            return any("<h1>v2</h1>" in body for _, _, body, _ in pages.seen[-3:])
        await eventually(served_v2, "the complete template to be served")
    bad = [(status, body) for _, status, body, _ in pages.seen if status != 200 or body not in complete]
    assert not bad, f"{len(bad)} of {len(pages.seen)} pages were not a complete version, e.g. {bad[0]!r}"
    assert mid_write is None, "the check in the middle of the write loaded something"
    assert reload_counts(await composer.metrics()) == {"ok": 1, "error": 0}


ROUTES = """\
settings:
  reload_interval_ms: {interval}
routes:
  - name: home
    match: {{path: /home}}
    redirect: {{to: {home}, status: 302}}
  - name: page
    match: {{path: /page}}
    template: page.html
"""


async def test_routes_yaml_written_in_two_halves_is_loaded_only_once_complete(start_composer, tmp_path):
    composer = await start_composer({"page.html": "<p>page</p>\n"},
                                    routes=ROUTES.format(interval=INTERVAL_MS, home="/v1"))
    v2 = ROUTES.format(interval=INTERVAL_MS, home="/v2")
    async with Pages(composer, "/page", "/home") as pages:
        # the first half is a valid routes.yaml without /page
        mid_write = await write_in_two_halves(composer, tmp_path / "routes.yaml", v2, v2.index("  - name: page"),
                                              pages)

        async def moved() -> bool:
            return any(path == "/home" and location == "/v2" for path, _, _, location in pages.seen[-4:])
        await eventually(moved, "the complete routes.yaml to be loaded")
    for path, status, body, location in pages.seen:
        if path == "/page":
            assert (status, body) == (200, "<p>page</p>\n"), "the half-written routes.yaml was loaded"
        else:
            assert status == 302 and location in ("/v1", "/v2")
    assert mid_write is None, "the check in the middle of the write loaded something"
    assert reload_counts(await composer.metrics()) == {"ok": 1, "error": 0}


async def test_sighup_loads_a_changed_file_at_once_without_waiting_for_it_to_settle(start_composer, tmp_path):
    composer = await start_composer({"page.html": "<p>page</p>\n"},
                                    routes=ROUTES.format(interval=20_000, home="/v1"))
    replace_file(tmp_path / "routes.yaml", ROUTES.format(interval=20_000, home="/v2"))
    composer.server.reloader.trigger()  # what SIGHUP does: an operator's "load it now"

    async def moved() -> bool:
        return (await composer.get("/home"))[0].headers["Location"] == "/v2"
    await eventually(moved, "SIGHUP to load the edit", deadline=3)


# --------------------------------------------------------------------------- unterminated <fragment


async def test_unterminated_fragment_tag_is_a_config_error_in_check_load_and_reload(start_composer, tmp_path):
    cut = '<html><body>\n<p>header</p>\n<fragment id="b" src="http://1'
    write_config(tmp_path, {"page.html": cut})
    template = tmp_path / "templates" / "page.html"
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "routes.yaml")
    assert len(info.value.problems) == 1, info.value.problems
    assert info.value.problems[0].startswith(f"{template}:3: "), info.value.problems
    assert "<fragment" in info.value.problems[0]

    status, out, err = await run_cli("check", cwd=tmp_path)
    assert status == 2, (out, err)
    message = info.value.problems[0].removeprefix(f"{template}:3: ")
    assert err.splitlines() == [f"templates/page.html:3: {message}"], err

    # a running composer refuses it and keeps serving the complete template
    composer = await start_composer({"page.html": "<p>complete</p>\n"}, settings="settings: {reload_interval_ms: 0}\n")
    replace_file(template, cut)
    assert await composer.server.reloader.check() is False
    resp, body = await composer.get("/page")
    assert (resp.status, body) == (200, "<p>complete</p>\n")


@pytest.mark.parametrize("text", [
    '<p>a</p>\n<!-- <fragment src="http://1 -->\n<p>b</p>\n',
    '<script>var s = \'<fragment src="\';</script>\n<p>b</p>\n',
    '<p title=\'<fragment src="x\'>b</p>\n',
    '<textarea><fragment src="http://1</textarea>\n',
])
def test_fragment_text_that_is_not_markup_is_not_an_unterminated_tag(tmp_path, text):
    write_config(tmp_path, {"page.html": text})
    table = load(tmp_path / "routes.yaml")
    template = table.routes[0].template
    assert template is not None and template.fragments == ()


def test_a_tag_whose_end_cannot_be_found_is_an_error_not_text(tmp_path):
    """A quote inside an attribute name: HTML ends the tag at `>`, the scanner cannot: refuse it."""
    text = '<p>a</p>\n<fragment src="http://127.0.0.1:1/" x"y></fragment>\n'
    write_config(tmp_path, {"page.html": text})
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "routes.yaml")
    assert info.value.problems[0].startswith(f"{tmp_path / 'templates' / 'page.html'}:2: "), info.value.problems

