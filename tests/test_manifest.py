"""The fragment manifest (SPEC §5): versions, canary, flags, rollback, URL manifests.

Everything is real: fragment versions are served by aiohttp apps on 127.0.0.1 (the
`fragments` fixture; `/<version>/<name>` answers `<p><name> <version></p>`), a URL manifest is
served by a small aiohttp app that counts its requests and answers 304 to a matching
`If-None-Match`, and composer runs either in process (`ComposerServer` loaded with
`composer.load`, the same loader `composer serve` uses) or as `python -m composer`
subprocesses. Reloads are awaited by polling what a client sees or the reload counter, with
a generous deadline; the only fixed waits prove something does NOT happen.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.cookies
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from conftest import (
    Composer,
    FragmentServer,
    Records,
    captured,
    cli_env,
    eventually,
    free_port,
    html,
    replace_file,
    stays,
    write_config,
)
from conftest import Serve as ServeBase
from prometheus_client.parser import text_string_to_metric_families

from composer import load
from composer.errors import ConfigError
from composer.routing import ManifestNeeded

VERSIONS = ("1.0.0", "2.0.0", "3.0.0")
PAGE = '<html><body><h1>page</h1>\n<fragment name="footer"></fragment>\n</body></html>\n'
PAGE_ROUTE = """\
routes:
  - name: page
    match: {path: /page}
    template: page.html
"""
BUCKET_SET_COOKIE = re.compile(r"composer_bucket=(\d+);")


# --------------------------------------------------------------------------- fragment services


async def versions_service(fragments: Callable[..., Awaitable[FragmentServer]], *,
                           names: tuple[str, ...] = ("footer",),
                           special: dict[str, Any] | None = None) -> FragmentServer:
    """Every version of every fragment: `/<v>/<name>` → `<p><name> <v></p>`; `/static/<name>` →
    `<p><name> static</p>` (the manifest fallback); `/tag/<name>` → `<p><name> tag-fallback</p>`.
    `special` replaces handlers by path (slow or failing versions)."""
    routes = {}
    for name in names:
        routes.update({f"/{v}/{name}": html(f"<p>{name} {v}</p>") for v in VERSIONS})
        routes[f"/static/{name}"] = html(f"<p>{name} static</p>")
        routes[f"/tag/{name}"] = html(f"<p>{name} tag-fallback</p>")
    routes.update(special or {})
    return await fragments(routes)


def entry(svc: FragmentServer, name: str = "footer", *, active: str = "1.0.0",
          versions: tuple[str, ...] = VERSIONS, owner: str = "team-x", **extra: Any) -> dict[str, Any]:
    """A manifest entry whose versions are `svc`'s `/<v>/<name>`; `extra` adds canary, enabled, …"""
    return {"owner": owner, "versions": {v: svc.url(f"/{v}/{name}") for v in versions}, "active": active,
            **extra}


def manifest_yaml(**fragments: dict[str, Any]) -> str:
    return yaml.safe_dump({"fragments": fragments}, sort_keys=False)


def shown(body: str, name: str = "footer") -> str | None:
    """What the page shows for fragment `name`: a version, "static", "tag-fallback", "inline" or None."""
    found = re.findall(rf"<p>{name} ([^<]+)</p>", body)
    assert len(found) <= 1, f"{name} rendered more than once: {body!r}"
    return found[0] if found else None


def new_bucket(resp: aiohttp.ClientResponse) -> int | None:
    """The bucket a `composer_bucket` Set-Cookie assigns, or None when none is set."""
    cookies = [c for c in resp.headers.getall("Set-Cookie", ()) if c.startswith("composer_bucket=")]
    assert len(cookies) <= 1, cookies
    if not cookies:
        return None
    m = BUCKET_SET_COOKIE.match(cookies[0])
    assert m is not None, cookies[0]
    return int(m.group(1))


def line_of(text: str, needle: str) -> int:
    """1-based number of the first line of `text` containing `needle`."""
    for number, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {text!r}")


# --------------------------------------------------------------------------- metrics and logs


class Scrape:
    """Parsed /metrics text."""

    def __init__(self, text: str) -> None:
        self.samples = [s for f in text_string_to_metric_families(text) for s in f.samples]

    def find(self, name: str, **labels: str) -> list[Any]:
        return [s for s in self.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]

    def value(self, name: str, **labels: str) -> float:
        """The one sample with these labels (0 when there is none)."""
        found = self.find(name, **labels)
        assert len(found) <= 1, found
        return found[0].value if found else 0.0

    def reloads(self) -> dict[str, float]:
        return {r: self.value("composer_config_reloads_total", result=r) for r in ("ok", "error")}


async def scrape(admin_url: str) -> Scrape:
    async with aiohttp.ClientSession() as session, \
            session.get(admin_url + "/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
        assert resp.status == 200
        return Scrape(await resp.text())


async def admin_json(admin_url: str, path: str = "/manifest") -> Any:
    async with aiohttp.ClientSession() as session, \
            session.get(admin_url + path, timeout=aiohttp.ClientTimeout(total=10)) as resp:
        assert resp.status == 200
        return await resp.json()


async def status_of(url: str) -> int:
    async with aiohttp.ClientSession() as session, \
            session.get(url, timeout=aiohttp.ClientTimeout(total=10)) as resp:
        return resp.status


def fields_of(records: Records) -> list[dict[str, Any]]:
    return [getattr(r, "fields", {}) for r in records.records]


# --------------------------------------------------------------------------- composer in process


async def visit(composer: Composer, path: str = "/page", *, bucket: int | str | None = None,
                headers: dict[str, str] | None = None, name: str = "footer") -> tuple[str | None, int | None]:
    """GET `path` (with `composer_bucket=bucket` when given): what `name` shows, and a newly set bucket."""
    headers = dict(headers or {})
    if bucket is not None:
        headers["Cookie"] = f"composer_bucket={bucket}"
    resp, body = await composer.get(path, headers=headers)
    assert resp.status == 200, body
    return shown(body, name), new_bucket(resp)


@pytest.fixture
def start_with_manifest(start_composer: Callable[..., Awaitable[Composer]]) -> Callable[..., Awaitable[Composer]]:
    """Factory: conftest's `start_composer`, each call in its own folder and with a cookie-less
    client; `files` are extra files written next to routes.yaml first."""
    count = 0

    async def start(templates: dict[str, str], *, routes: str = PAGE_ROUTE, settings: str = "",
                    files: dict[str, str] | None = None, manifest: str | None = None) -> Composer:
        nonlocal count
        count += 1
        return await start_composer(templates, routes, settings, folder=f"composer-{count}", files=files,
                                    manifest=manifest, cookies=False)

    return start


# --------------------------------------------------------------------------- URL manifest server


class ManifestServer:
    """Serves one mutable manifest body with a content-derived ETag; 304 when it matches.

    `seen` holds each request's If-None-Match (None when absent), `answers` each status sent.
    """

    def __init__(self, body: str) -> None:
        self.body = body
        self.status = 200
        self.with_etag = True  # False: a server that knows nothing of ETags (always 200, full body)
        self.seen: list[str | None] = []
        self.answers: list[int] = []
        self.url = ""

    @property
    def etag(self) -> str:
        return '"' + hashlib.sha256(self.body.encode()).hexdigest()[:16] + '"'

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(request.headers.get("If-None-Match"))
        if self.status != 200:
            response = web.Response(status=self.status, text="oops")
        elif self.with_etag and request.headers.get("If-None-Match") == self.etag:
            response = web.Response(status=304, headers={"ETag": self.etag})
        else:
            headers = {"ETag": self.etag} if self.with_etag else {}
            response = web.Response(text=self.body, content_type="application/yaml", headers=headers)
        self.answers.append(response.status)
        return response


@pytest.fixture
async def manifest_server(aiohttp_server) -> Callable[[str], Awaitable[ManifestServer]]:
    async def start(body: str) -> ManifestServer:
        served = ManifestServer(body)
        app = web.Application()
        app.router.add_get("/manifest.yaml", served.handle)
        server = await aiohttp_server(app, host="127.0.0.1")
        served.url = str(server.make_url("/manifest.yaml"))
        return served

    return start


# --------------------------------------------------------------------------- composer subprocesses


async def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
                  timeout: float = 30) -> tuple[int, str, str]:
    """`python -m composer ARGS` to completion: (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "composer", *args, cwd=cwd, env=env or cli_env(),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Serve(ServeBase):
    """A composer subprocess (conftest's) that can ask which footer version a bucket sees."""

    async def version(self, bucket: int) -> str | None:
        """What /page shows for the footer to a user in `bucket` (fresh connection each time)."""
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session, \
                session.get(self.base + "/page", headers={"Cookie": f"composer_bucket={bucket}"},
                            timeout=aiohttp.ClientTimeout(total=10)) as resp:
            body = await resp.text()
            assert resp.status == 200, body
            assert new_bucket(resp) is None  # a valid bucket is never re-set
            return shown(body)


def serve_routes(*, interval_ms: int = 200, manifest: str | None = "manifest.yaml", extra: str = "") -> str:
    """routes.yaml for subprocesses: quick reloads, the manifest file, /page → page.html."""
    lines = ["settings:", f"  reload_interval_ms: {interval_ms}"]
    if manifest is not None:
        lines.append(f"  manifest: {manifest}")
    return "\n".join(lines) + "\n" + extra + PAGE_ROUTE


# =========================================================================== 1. name resolution


async def test_name_fetches_the_active_version_url_and_nothing_else(fragments, start_with_manifest):
    svc = await versions_service(fragments)
    composer = await start_with_manifest(
        {"page.html": PAGE}, settings="settings:\n  manifest: manifest.yaml\n",
        files={"manifest.yaml": manifest_yaml(footer=entry(svc, active="2.0.0"))})
    for _ in range(3):
        assert (await visit(composer))[0] == "2.0.0"
    assert svc.hits == {"/2.0.0/footer": 3}


async def test_manifest_timeout_and_fallback_apply_and_tag_attributes_override_them(fragments, start_with_manifest):
    # 1.0.0 answers after 1 s: well past the manifest's 100 ms, well within the tag's 5000 ms.
    svc = await versions_service(fragments, special={"/1.0.0/footer": html("<p>footer 1.0.0</p>", delay=1.0)})
    routes = PAGE_ROUTE + "".join(
        f"  - name: {name}\n    match: {{path: /{name}}}\n    template: {name}.html\n" for name in ("patient", "tagfb"))
    composer = await start_with_manifest({
        "page.html": PAGE,
        "patient.html": '<fragment name="footer" timeout="5000"></fragment>',
        "tagfb.html": f'<fragment name="footer" fallback-src="{svc.url("/tag/footer")}"></fragment>',
    }, routes=routes, settings="settings:\n  manifest: manifest.yaml\n", files={
        "manifest.yaml": manifest_yaml(footer=entry(svc, timeout_ms=100, fallback=svc.url("/static/footer")))})

    with captured("composer.fragments") as records:
        assert (await visit(composer, "/page"))[0] == "static"  # manifest timeout_ms, then manifest fallback
        assert (await visit(composer, "/tagfb"))[0] == "tag-fallback"  # the tag's fallback-src wins
    assert [(f["error_type"], f["fallback"]) for f in fields_of(records)] == \
        [("timeout", "fallback-src"), ("timeout", "fallback-src")]
    # Each once when the page needed it, and once when the manifest loaded (last-good prefetch).
    assert svc.hits.get("/tag/footer") == 2 and svc.hits.get("/static/footer") == 2

    assert (await visit(composer, "/patient"))[0] == "1.0.0"  # the tag's timeout wins over timeout_ms
    metrics = await scrape(composer.admin_url)
    assert metrics.value("composer_fragment_failures_total", route="patient", reason="timeout") == 0
    assert metrics.value("composer_fragment_failures_total", route="page", version="1.0.0", reason="timeout") == 1


async def test_owner_flows_into_fragment_info_and_failure_logs(fragments, start_with_manifest):
    svc = await versions_service(fragments, special={"/1.0.0/footer": html("down", status=503)})
    composer = await start_with_manifest({"page.html": PAGE}, routes=PAGE_ROUTE + manifest_yaml(
        footer=entry(svc, owner="checkout-team")))
    with captured("composer.fragments") as records:
        assert (await visit(composer))[0] is None
    assert [f["owner"] for f in fields_of(records)] == ["checkout-team"]
    info = (await scrape(composer.admin_url)).find("composer_fragment_info", fragment="footer")
    assert [(s.labels["version"], s.labels["owner"], s.value) for s in info] == [("1.0.0", "checkout-team", 1.0)]


def _config(tmp_path: Path, template: str, *, manifest: str | None = None, inline: str = "",
            settings: str = "") -> Path:
    """routes.yaml (+ manifest.yaml when given) for load() tests; returns the routes.yaml path."""
    head = "settings:\n" + settings + ("  manifest: manifest.yaml\n" if manifest is not None else "")
    if manifest is not None:
        (tmp_path / "manifest.yaml").write_text(manifest, encoding="utf-8")
    return write_config(tmp_path, {"page.html": template}, routes=PAGE_ROUTE + inline, settings=head)


GOOD_MANIFEST = """\
fragments:
  footer:
    owner: team-x
    versions:
      "1.0.0": http://127.0.0.1:1/1.0.0/footer
      "2.0.0": http://127.0.0.1:1/2.0.0/footer
    active: "1.0.0"
    canary: {version: "2.0.0", percent: 5}
"""


def test_unknown_name_is_a_config_error_at_the_template_line(tmp_path):
    config = _config(tmp_path, '<html>\n<body>\n<fragment name="header"></fragment>\n</body></html>\n',
                     manifest=GOOD_MANIFEST)
    with pytest.raises(ConfigError) as info:
        load(config)
    label = str(tmp_path / "templates" / "page.html")
    assert info.value.problems == [
        f"{label}:3: fragment name 'header' is not in the manifest (known: footer); give it a `src`"]


def test_src_together_with_a_manifest_name_is_an_error(tmp_path):
    config = _config(tmp_path, '<html><body>\n\n<fragment name="footer" src="http://127.0.0.1:1/x"></fragment>\n',
                     manifest=GOOD_MANIFEST)
    with pytest.raises(ConfigError) as info:
        load(config)
    (problem,) = info.value.problems
    assert problem.startswith(f"{tmp_path / 'templates' / 'page.html'}:3: fragment 'footer' comes from the manifest")


def test_good_manifest_file_loads_with_every_field(tmp_path):
    table = load(_config(tmp_path, PAGE, manifest=GOOD_MANIFEST))
    footer = table.manifest.fragments["footer"]
    assert (footer.owner, footer.active, footer.canary.version, footer.canary.percent, footer.enabled) == \
        ("team-x", "1.0.0", "2.0.0", 5, True)
    assert table.manifest.source == str(tmp_path / "manifest.yaml")
    (fragment,) = table.routes[0].template.fragments
    assert (fragment.name, fragment.version, fragment.canary, fragment.canary_percent) == \
        ("footer", "1.0.0", "2.0.0", 5)


# Each bad manifest: (text, line, words the problem must contain). Lines are the real ones.
BAD_MANIFESTS = {
    "active-not-in-versions": (GOOD_MANIFEST.replace('active: "1.0.0"', 'active: "9.9.9"'), 7,
                               "active version '9.9.9' is not in versions"),
    "canary-not-in-versions": (GOOD_MANIFEST.replace('version: "2.0.0"', 'version: "3.0.0"'), 8,
                               "canary version '3.0.0' is not in versions"),
    "percent-101": (GOOD_MANIFEST.replace("percent: 5", "percent: 101"), 8,
                    "canary percent must be between 0 and 100, not 101"),
    "missing-versions": ("fragments:\n  footer:\n    owner: team-x\n    active: \"1.0.0\"\n", 3, "needs `versions`"),
    "outside-allowed-origins": (GOOD_MANIFEST.replace("http://127.0.0.1:1/2.0.0/footer", "https://evil.example/f"),
                                6, "outside settings.allowed_origins"),
    "bad-yaml": (GOOD_MANIFEST.replace('active: "1.0.0"', 'active: "1.0.0": nope'), 7, "invalid YAML"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_bad_manifest_file_is_refused_with_file_and_line(tmp_path, case):
    text, line, words = BAD_MANIFESTS[case]
    config = _config(tmp_path, PAGE, manifest=text, settings='  allowed_origins: ["http://127.0.0.1:*"]\n')
    with pytest.raises(ConfigError) as info:
        load(config)
    label = str(tmp_path / "manifest.yaml")
    mine = [p for p in info.value.problems if p.startswith(label + ":")]
    assert len(mine) == 1 and mine[0].startswith(f"{label}:{line}: ") and words in mine[0], info.value.problems


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_bad_inline_fragments_are_refused_with_routes_yaml_line(tmp_path, case):
    text, line, words = BAD_MANIFESTS[case]
    settings = '  allowed_origins: ["http://127.0.0.1:*"]\n'
    config = _config(tmp_path, PAGE, inline=text, settings=settings)
    offset = len(("settings:\n" + settings + PAGE_ROUTE).splitlines())  # fragments: starts after these
    with pytest.raises(ConfigError) as info:
        load(config)
    label = str(config)
    mine = [p for p in info.value.problems if p.startswith(label + ":")]
    assert len(mine) == 1 and mine[0].startswith(f"{label}:{offset + line}: ") and words in mine[0], \
        info.value.problems


def test_a_name_in_both_inline_fragments_and_the_manifest_file_is_an_error(tmp_path):
    inline = "fragments:\n  footer:\n    versions: {\"0.1\": http://127.0.0.1:1/0.1}\n    active: \"0.1\"\n"
    config = _config(tmp_path, PAGE, manifest=GOOD_MANIFEST, inline=inline)
    with pytest.raises(ConfigError) as info:
        load(config)
    inline_line = len(("settings:\n  manifest: manifest.yaml\n" + PAGE_ROUTE).splitlines()) + 2
    assert info.value.problems == [
        f"{tmp_path / 'manifest.yaml'}:2: fragment 'footer' is also declared in {config} (line {inline_line})"]


def test_inline_fragments_and_a_manifest_file_with_other_names_are_merged(tmp_path):
    inline = "fragments:\n  header:\n    versions: {\"0.1\": http://127.0.0.1:1/0.1}\n    active: \"0.1\"\n"
    template = '<fragment name="header"></fragment><fragment name="footer"></fragment>'
    table = load(_config(tmp_path, template, manifest=GOOD_MANIFEST, inline=inline))
    assert sorted(table.manifest.fragments) == ["footer", "header"]
    assert [f.version for f in table.routes[0].template.fragments] == ["0.1", "1.0.0"]


async def test_json_manifest_file_works_compact_tab_indented_and_with_escapes(fragments, start_with_manifest):
    svc = await versions_service(fragments)
    doc = {"fragments": {"footer": entry(svc, owner="équipe ☕ 😀", active="2.0.0",
                                         canary={"version": "3.0.0", "percent": 50}, enabled=True)}}
    # json.dumps escapes non-ASCII (😀 as a surrogate pair) and tabs are JSON whitespace, not YAML's
    for number, text in enumerate([json.dumps(doc, separators=(",", ":")), json.dumps(doc, indent="\t")]):
        composer = await start_with_manifest({"page.html": PAGE}, files={f"m{number}.json": text},
                                             settings=f"settings:\n  manifest: m{number}.json\n")
        assert (await visit(composer, bucket=90))[0] == "2.0.0"
        assert (await visit(composer, bucket=10))[0] == "3.0.0"
        view = await admin_json(composer.admin_url)
        assert view["fragments"]["footer"]["owner"] == "équipe ☕ 😀"
        info = (await scrape(composer.admin_url)).find("composer_fragment_info", fragment="footer")
        assert {(s.labels["version"], s.labels["owner"]) for s in info} == \
            {("2.0.0", "équipe ☕ 😀"), ("3.0.0", "équipe ☕ 😀")}


def test_json_manifest_with_half_a_surrogate_pair_is_refused_with_its_line(tmp_path):
    text = '{\n "fragments": {\n  "footer": {\n   "owner": "team \\ud83d",\n' \
           '   "versions": {"1.0.0": "http://127.0.0.1:1/f"},\n   "active": "1.0.0"\n  }\n }\n}\n'
    (tmp_path / "m.json").write_text(text, encoding="utf-8")
    config = write_config(tmp_path, {"page.html": PAGE}, routes=PAGE_ROUTE, settings="settings:\n  manifest: m.json\n")
    with pytest.raises(ConfigError) as info:
        load(config)
    label = str(tmp_path / "m.json")
    assert [p for p in info.value.problems if p.startswith(label)] == [
        f"{label}:4: not valid Unicode: a \\u escape is half of a surrogate pair"]


def _check_tree(tmp_path: Path) -> None:
    """routes.yaml with settings.manifest → broken.yaml, plus good.yaml beside it."""
    (tmp_path / "broken.yaml").write_text(BAD_MANIFESTS["active-not-in-versions"][0], encoding="utf-8")
    (tmp_path / "good.yaml").write_text(GOOD_MANIFEST, encoding="utf-8")
    write_config(tmp_path, {"page.html": PAGE}, routes=serve_routes(manifest="broken.yaml"))


async def test_check_uses_settings_manifest_unless_manifest_option_or_env_overrides_it(tmp_path):
    _check_tree(tmp_path)
    status, out, err = await run_cli("check", cwd=tmp_path)
    assert (status, out) == (2, "")
    # the manifest's own problem comes first (the template's unresolved name may follow)
    assert err.startswith("broken.yaml:7: fragment 'footer': active version '9.9.9' is not in versions"), err

    status, out, err = await run_cli("check", "--manifest", "good.yaml", cwd=tmp_path)
    assert (status, err) == (0, ""), err
    assert out.startswith("routes.yaml: ok")

    status, out, err = await run_cli("check", cwd=tmp_path, env=cli_env(COMPOSER_MANIFEST="good.yaml"))
    assert (status, err) == (0, ""), err

    # the option beats the environment, and a broken override is refused like any manifest
    (tmp_path / "routes.yaml").write_text(serve_routes(manifest="good.yaml"), encoding="utf-8")
    status, _, err = await run_cli("check", cwd=tmp_path, env=cli_env(COMPOSER_MANIFEST="broken.yaml"))
    assert status == 2 and err.startswith("broken.yaml:7: "), err
    status, _, err = await run_cli("check", "--manifest", "broken.yaml", cwd=tmp_path)
    assert status == 2 and err.startswith("broken.yaml:7: "), err
    status, _, err = await run_cli("check", "--manifest", "good.yaml", cwd=tmp_path,
                                   env=cli_env(COMPOSER_MANIFEST="broken.yaml"))
    assert status == 0, err


async def test_serve_uses_the_manifest_option_over_settings(tmp_path, fragments):
    svc = await versions_service(fragments)
    write_config(tmp_path, {"page.html": PAGE}, routes=serve_routes(manifest="broken.yaml"))
    (tmp_path / "broken.yaml").write_text("fragments: [\n", encoding="utf-8")
    (tmp_path / "override.yaml").write_text(manifest_yaml(footer=entry(svc, active="3.0.0")), encoding="utf-8")
    async with Serve(tmp_path, "--manifest", "override.yaml") as serve:
        assert await serve.version(bucket=50) == "3.0.0"
        assert (await admin_json(serve.admin))["source"] == "override.yaml"


async def test_serve_exits_2_with_the_reason_when_no_good_manifest_at_start(tmp_path, manifest_server):
    _check_tree(tmp_path)
    port, admin = free_port(), free_port()
    args = ("serve", "--host", "127.0.0.1", "--port", str(port), "--admin-port", str(admin))
    status, out, err = await run_cli(*args, cwd=tmp_path)
    assert (status, out) == (2, "")
    assert err.startswith("broken.yaml:7: fragment 'footer': active version '9.9.9' is not in versions"), err

    down = await manifest_server(GOOD_MANIFEST)
    down.status = 500
    status, out, err = await run_cli(*args, "--manifest", down.url, cwd=tmp_path)
    assert (status, out) == (2, "")
    assert f"{down.url}: manifest answered 500" in err.splitlines(), err
    assert down.seen == [None]

    status, out, err = await run_cli(*args, "--manifest", "nowhere.yaml", cwd=tmp_path)
    assert (status, out) == (2, "")
    assert "nowhere.yaml:1: manifest not found" in err.splitlines(), err


# =========================================================================== 2. canary


async def _canary_composer(start_with_manifest, svc: FragmentServer, percent: int, **settings: Any) -> Composer:
    """active 1.0.0, canary 3.0.0 at `percent` (2.0.0 listed, neither), inline in routes.yaml."""
    settings_text = yaml.safe_dump({"settings": settings}) if settings else ""
    return await start_with_manifest({"page.html": PAGE}, settings=settings_text, routes=PAGE_ROUTE + manifest_yaml(
        footer=entry(svc, canary={"version": "3.0.0", "percent": percent})))


@pytest.mark.parametrize("percent", [0, 5, 50, 100])
async def test_canary_split_over_400_new_users_follows_their_buckets(fragments, start_with_manifest, percent):
    svc = await versions_service(fragments)
    composer = await _canary_composer(start_with_manifest, svc, percent)
    users: list[tuple[str | None, int | None]] = []
    for _ in range(8):
        users += await asyncio.gather(*(visit(composer) for _ in range(50)))
    assert all(bucket is not None and 0 <= bucket <= 99 for _, bucket in users)
    canary = [bucket for version, bucket in users if version == "3.0.0"]
    active = [bucket for version, bucket in users if version == "1.0.0"]
    assert len(canary) + len(active) == 400
    assert all(b < percent for b in canary) and all(b >= percent for b in active)  # type: ignore[operator]
    if 0 < percent < 100:  # 400 random buckets: P(no user on one side) < 1e-8 at 5 %
        assert canary and active
    assert svc.hits.get("/2.0.0/footer") is None
    assert len({b for _, b in users}) > 50  # buckets are drawn at random, not one per process


async def test_canary_is_sticky_per_bucket_cookie(fragments, start_with_manifest):
    svc = await versions_service(fragments)
    composer = await _canary_composer(start_with_manifest, svc, 30)
    for bucket in range(100):
        seen = [await visit(composer, bucket=bucket) for _ in range(2)]
        want = "3.0.0" if bucket < 30 else "1.0.0"
        assert seen == [(want, None), (want, None)], bucket  # same version, cookie not re-set


@pytest.mark.parametrize("value", ["abc", "100", "-1", "", "1.5", "7x", "²", "٣"])
async def test_invalid_bucket_cookie_is_replaced(fragments, start_with_manifest, value):
    svc = await versions_service(fragments)
    composer = await _canary_composer(start_with_manifest, svc, 50)
    version, bucket = await visit(composer, bucket=value)
    assert bucket is not None and 0 <= bucket <= 99
    assert version == ("3.0.0" if bucket < 50 else "1.0.0")  # the new bucket decides already


async def test_bucket_cookie_attributes_and_other_cookies_do_not_count(fragments, start_with_manifest):
    svc = await versions_service(fragments)
    composer = await _canary_composer(start_with_manifest, svc, 50)
    resp, _ = await composer.get("/page", headers={"Cookie": "session=abc; bucket=3"})
    (header,) = resp.headers.getall("Set-Cookie")
    cookie = http.cookies.SimpleCookie()
    cookie.load(header)
    morsel = cookie["composer_bucket"]
    assert 0 <= int(morsel.value) <= 99
    assert (morsel["path"], morsel["max-age"], morsel["httponly"], morsel["samesite"]) == \
        ("/", "31536000", True, "Lax")
    # valid buckets at both ends are kept, among other cookies
    for value in ("0", "99"):
        resp, _ = await composer.get("/page", headers={"Cookie": f"session=abc; composer_bucket={value}; x=1"})
        assert resp.headers.getall("Set-Cookie", []) == []


# =========================================================================== 3. rollback without restart


def _rollback_manifest(svc: FragmentServer, active: str, canary: bool) -> str:
    extra = {"canary": {"version": "3.0.0", "percent": 50}} if canary else {}
    return manifest_yaml(footer=entry(svc, active=active, **extra))


async def test_rollback_and_dropping_the_canary_apply_without_restart(tmp_path, fragments):
    svc = await versions_service(fragments)
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(_rollback_manifest(svc, "2.0.0", canary=True), encoding="utf-8")
    write_config(tmp_path, {"page.html": PAGE}, routes=serve_routes())
    async with Serve(tmp_path) as serve:
        pid = serve.pid
        assert (await serve.version(90), await serve.version(10)) == ("2.0.0", "3.0.0")
        assert (await scrape(serve.admin)).reloads() == {"ok": 0, "error": 0}

        # roll back: active 2.0.0 → 1.0.0; the canary stays
        replace_file(manifest, _rollback_manifest(svc, "1.0.0", canary=True))

        async def rolled_back() -> bool:
            return await serve.version(90) == "1.0.0"
        await eventually(rolled_back, "active 1.0.0 to be served")
        assert await serve.version(10) == "3.0.0"
        assert (await scrape(serve.admin)).reloads() == {"ok": 1, "error": 0}

        # drop the canary: everybody on 1.0.0
        replace_file(manifest, _rollback_manifest(svc, "1.0.0", canary=False))

        async def no_canary() -> bool:
            return await serve.version(10) == "1.0.0"
        await eventually(no_canary, "the canary to be dropped")
        metrics = await scrape(serve.admin)
        assert metrics.reloads() == {"ok": 2, "error": 0}
        info = metrics.find("composer_fragment_info", fragment="footer")
        assert [(s.labels["version"], s.value) for s in info] == [("1.0.0", 1.0)]

        # a broken edit is refused, counted and logged with its line; 1.0.0 keeps serving
        broken = _rollback_manifest(svc, "1.0.0", canary=False).replace("active: 1.0.0", "active: 9.9.9")
        replace_file(manifest, broken)

        async def refused() -> bool:
            return (await scrape(serve.admin)).reloads() == {"ok": 2, "error": 1}
        await eventually(refused, "the broken manifest to be refused")

        async def still_serving() -> bool:
            return await serve.version(10) == "1.0.0" and await serve.version(90) == "1.0.0" \
                and await status_of(serve.admin + "/readyz") == 200
        await stays(still_serving, "the previous manifest to keep serving")
        assert (await scrape(serve.admin)).reloads() == {"ok": 2, "error": 1}  # not retried until it changes
        line = line_of(broken, "active:")
        assert any(p.startswith(f"manifest.yaml:{line}: fragment 'footer': active version '9.9.9'")
                   for p in serve.reload_problems()), serve.stderr()

        # fixing it applies again
        replace_file(manifest, _rollback_manifest(svc, "2.0.0", canary=False))

        async def fixed() -> bool:
            return await serve.version(10) == "2.0.0"
        await eventually(fixed, "the fixed manifest to apply")
        assert (await scrape(serve.admin)).reloads() == {"ok": 3, "error": 1}
        assert serve.alive() and serve.pid == pid


# =========================================================================== 4. URL manifest


def _url_manifest(svc: FragmentServer, active: str, **extra: Any) -> str:
    return manifest_yaml(footer=entry(svc, active=active, **extra))


async def test_url_manifest_is_loaded_at_start_and_polled_with_etags(fragments, start_with_manifest,
                                                                    manifest_server):
    svc = await versions_service(fragments)
    served = await manifest_server(_url_manifest(svc, "1.0.0"))
    composer = await start_with_manifest({"page.html": PAGE},
                                         settings=f"settings:\n  manifest: {served.url}\n  manifest_poll_s: 1\n")
    assert served.seen == [None]  # loaded at start, before any poll, unconditionally
    assert (await visit(composer, bucket=5))[0] == "1.0.0"
    view = await admin_json(composer.admin_url)
    assert view["source"] == served.url
    first_etag = served.etag

    # unchanged: polls ask If-None-Match, get 304, and nothing is reloaded
    async def three_polls() -> bool:
        return len(served.seen) >= 4
    await eventually(three_polls, "three polls")
    assert served.seen[1:] == [first_etag] * (len(served.seen) - 1)
    assert set(served.answers[1:]) == {304}
    assert (await scrape(composer.admin_url)).reloads() == {"ok": 0, "error": 0}
    assert (await admin_json(composer.admin_url))["loaded_at"] == view["loaded_at"]

    # a new body (new ETag) is applied within a few polls, and its ETag sent from then on
    served.body = _url_manifest(svc, "2.0.0", canary={"version": "3.0.0", "percent": 10})

    async def applied() -> bool:
        return (await visit(composer, bucket=50))[0] == "2.0.0"
    await eventually(applied, "the new URL manifest to apply")
    assert (await visit(composer, bucket=5))[0] == "3.0.0"
    assert (await scrape(composer.admin_url)).reloads() == {"ok": 1, "error": 0}
    polls = len(served.seen)

    async def sends_new_etag() -> bool:
        return len(served.seen) > polls and served.seen[-1] == served.etag and served.answers[-1] == 304
    await eventually(sends_new_etag, "a poll with the new ETag, answered 304")


async def test_url_manifest_without_etags_is_applied_only_when_the_body_changes(
        fragments, start_with_manifest, manifest_server):
    svc = await versions_service(fragments)
    served = await manifest_server(_url_manifest(svc, "1.0.0"))
    served.with_etag = False
    composer = await start_with_manifest({"page.html": PAGE},
                                         settings=f"settings:\n  manifest: {served.url}\n  manifest_poll_s: 1\n")

    async def three_polls() -> bool:
        return len(served.seen) >= 4
    await eventually(three_polls, "three polls")
    assert served.seen == [None] * len(served.seen) and set(served.answers) == {200}
    assert (await scrape(composer.admin_url)).reloads() == {"ok": 0, "error": 0}  # same body: nothing to do

    served.body = _url_manifest(svc, "3.0.0")

    async def applied() -> bool:
        return (await visit(composer, bucket=50))[0] == "3.0.0"
    await eventually(applied, "the new body to apply")
    polls = len(served.seen)

    async def three_more_polls() -> bool:
        return len(served.seen) >= polls + 3
    await eventually(three_more_polls, "three more polls")
    assert (await scrape(composer.admin_url)).reloads() == {"ok": 1, "error": 0}


async def test_url_manifest_broken_body_and_server_errors_never_replace_the_good_one(
        fragments, start_with_manifest, manifest_server):
    svc = await versions_service(fragments)
    served = await manifest_server(_url_manifest(svc, "2.0.0"))
    composer = await start_with_manifest({"page.html": PAGE},
                                         settings=f"settings:\n  manifest: {served.url}\n  manifest_poll_s: 1\n")
    good_etag = served.etag

    def reloads_reach(ok: int, error: int) -> Callable[[], Awaitable[bool]]:
        async def probe() -> bool:
            counts = (await scrape(composer.admin_url)).reloads()
            return counts["ok"] == ok and counts["error"] >= error
        return probe

    async def serves(version: str) -> bool:
        return (await visit(composer, bucket=50))[0] == version

    # invalid YAML: refused once, counted once, and not re-applied on the following polls
    served.body = "fragments:\n  footer: [\n"
    await eventually(reloads_reach(0, 1), "the broken body to be refused")
    polls = len(served.seen)

    async def three_more_polls() -> bool:
        return len(served.seen) >= polls + 3
    await eventually(three_more_polls, "three more polls of the broken body")
    assert (await scrape(composer.admin_url)).reloads() == {"ok": 0, "error": 1}
    assert await serves("2.0.0")
    assert served.seen[-1] == good_etag  # still asking with the ETag of what it serves

    # a server error: counted, ignored
    served.status = 500
    await eventually(reloads_reach(0, 2), "the 500 to be counted")
    assert await serves("2.0.0")
    assert await status_of(composer.admin_url + "/readyz") == 200
    assert (await admin_json(composer.admin_url))["source"] == served.url

    # a good body again is applied
    served.status = 200
    served.body = _url_manifest(svc, "1.0.0")

    async def recovered() -> bool:
        return await serves("1.0.0")
    await eventually(recovered, "the good body to apply after the errors")
    assert (await scrape(composer.admin_url)).reloads()["ok"] == 1


async def test_url_manifest_refused_for_a_broken_routes_yaml_is_applied_once_routes_are_fixed(
        fragments, start_with_manifest, manifest_server):
    svc = await versions_service(fragments)
    served = await manifest_server(_url_manifest(svc, "1.0.0"))
    settings = f"settings:\n  manifest: {served.url}\n  manifest_poll_s: 1\n  reload_interval_ms: 100\n"
    composer = await start_with_manifest({"page.html": PAGE}, settings=settings)
    routes_file = composer.server.table.path
    good_routes = routes_file.read_text(encoding="utf-8")

    async def reloads(ok: int, error: int) -> bool:
        return (await scrape(composer.admin_url)).reloads() == {"ok": ok, "error": error}

    replace_file(routes_file, good_routes.replace("{path: /page}", "{path: /page, tenant: blue}"))
    await eventually(lambda: reloads(0, 1), "the broken routes.yaml to be refused")
    served.body = _url_manifest(svc, "2.0.0")  # a rollback published while routes.yaml is broken
    await eventually(lambda: reloads(0, 2), "the new manifest to be refused with the broken routes.yaml")
    assert (await visit(composer, bucket=50))[0] == "1.0.0"

    replace_file(routes_file, good_routes)

    async def rolled() -> bool:
        return (await visit(composer, bucket=50))[0] == "2.0.0"
    await eventually(rolled, "the published manifest to apply once routes.yaml is fixed")


# =========================================================================== 5. flags


FLAG_ROUTES = PAGE_ROUTE + """\
  - name: bare
    match: {path: /bare}
    template: bare.html
"""
FLAG_PAGE = """\
<html><body>
<fragment name="footer"><p>footer inline</p></fragment>
<fragment name="banner"><p>banner inline</p></fragment>
</body></html>
"""
BARE_PAGE = '<html><body><p>bare</p><fragment name="banner"></fragment></body></html>'


def _flag_manifest(svc: FragmentServer, enabled: bool) -> str:
    return manifest_yaml(footer=entry(svc, enabled=enabled, fallback=svc.url("/static/footer")),
                         banner=entry(svc, "banner", enabled=enabled, active="2.0.0"))


async def test_disabled_fragment_renders_its_fallback_without_fetching_and_reenabling_fetches(
        fragments, start_with_manifest):
    svc = await versions_service(fragments, names=("footer", "banner"))
    composer = await start_with_manifest(
        {"page.html": FLAG_PAGE, "bare.html": BARE_PAGE}, routes=FLAG_ROUTES,
        settings="settings:\n  manifest: manifest.yaml\n  reload_interval_ms: 100\n",
        files={"manifest.yaml": _flag_manifest(svc, enabled=False)})
    with captured("composer.fragments") as records:
        for _ in range(2):
            resp, body = await composer.get("/page", headers={"Cookie": "composer_bucket=3"})
            assert resp.status == 200
            assert (shown(body, "footer"), shown(body, "banner")) == ("static", "inline")
            resp, body = await composer.get("/bare", headers={"Cookie": "composer_bucket=3"})
            assert resp.status == 200 and "<p>bare</p>" in body
            assert shown(body, "banner") is None  # no fallback at all: nothing
    # No version of either fragment was asked; the fallback twice, and once when the manifest loaded.
    assert svc.hits == {"/static/footer": 3}
    assert records.records == []  # flagged off is not a failure
    metrics = await scrape(composer.admin_url)
    assert metrics.find("composer_fragment_request_duration_seconds_count") == []
    view = await admin_json(composer.admin_url)
    assert (view["fragments"]["footer"]["enabled"], view["fragments"]["banner"]["enabled"]) == (False, False)

    replace_file(composer.server.table.path.parent / "manifest.yaml", _flag_manifest(svc, enabled=True))

    async def enabled() -> bool:
        _, body = await composer.get("/page")
        return (shown(body, "footer"), shown(body, "banner")) == ("1.0.0", "2.0.0")
    await eventually(enabled, "the fragments to be fetched again")
    static = svc.hits["/static/footer"]
    _, body = await composer.get("/bare")
    assert shown(body, "banner") == "2.0.0"
    _, body = await composer.get("/page")
    assert (shown(body, "footer"), shown(body, "banner")) == ("1.0.0", "2.0.0")
    assert svc.hits["/1.0.0/footer"] >= 2 and svc.hits["/2.0.0/banner"] >= 3
    assert svc.hits["/static/footer"] == static  # enabled and answering: no fallback fetched


# =========================================================================== 6. override header


async def test_override_header_forces_a_listed_version_only(fragments, start_with_manifest):
    svc = await versions_service(fragments)
    composer = await _canary_composer(start_with_manifest, svc, 50, version_override_header="X-Composer-Versions")

    async def version(bucket: int, header: str | None) -> str | None:
        headers = {"x-composer-versions": header} if header is not None else {}
        found, new = await visit(composer, bucket=bucket, headers=headers)
        assert new is None
        return found

    assert await version(90, "footer=2.0.0") == "2.0.0"
    assert await version(10, "footer=2.0.0") == "2.0.0"  # beats the canary too
    assert await version(90, "header=3.0.0, footer = 2.0.0") == "2.0.0"
    # an unlisted version, another fragment, junk: the canary and active rules apply
    for header in ("footer=9.9.9", "banner=2.0.0", "footer", "=2.0.0", "", "footer=http://evil/"):
        assert (await version(90, header), await version(10, header)) == ("1.0.0", "3.0.0"), header
    metrics = await scrape(composer.admin_url)
    assert metrics.value("composer_fragment_request_duration_seconds_count", fragment="footer",
                         version="2.0.0") == 3


async def test_override_header_does_nothing_without_the_setting(fragments, start_with_manifest):
    svc = await versions_service(fragments)
    composer = await _canary_composer(start_with_manifest, svc, 50)
    for name in ("x-composer-versions", "x-versions"):
        assert await visit(composer, bucket=90, headers={name: "footer=2.0.0"}) == ("1.0.0", None)
        assert await visit(composer, bucket=10, headers={name: "footer=2.0.0"}) == ("3.0.0", None)
    assert "/2.0.0/footer" not in svc.hits


# =========================================================================== 7. metrics


async def test_metrics_label_the_version_actually_fetched_and_declare_active_and_canary(
        fragments, start_with_manifest):
    svc = await versions_service(fragments, special={"/3.0.0/footer": html("canary broke", status=503)})
    composer = await _canary_composer(start_with_manifest, svc, 50)
    for bucket in (10, 20, 30, 60, 70):
        await visit(composer, bucket=bucket)
    metrics = await scrape(composer.admin_url)
    count = "composer_fragment_request_duration_seconds_count"
    assert metrics.value(count, fragment="footer", route="page", version="3.0.0") == 3
    assert metrics.value(count, fragment="footer", route="page", version="1.0.0") == 2
    assert metrics.find(count, version="2.0.0") == []
    failures = [s for s in metrics.find("composer_fragment_failures_total", fragment="footer") if s.value]
    assert [(s.labels["version"], s.labels["reason"], s.value) for s in failures] == [("3.0.0", "status", 3.0)]
    info = metrics.find("composer_fragment_info", fragment="footer")
    assert sorted((s.labels["version"], s.labels["owner"], s.value) for s in info) == \
        [("1.0.0", "team-x", 1.0), ("3.0.0", "team-x", 1.0)]


async def test_a_named_fragment_with_its_own_id_is_declared_under_that_id(fragments, start_with_manifest):
    """Its metrics are labelled with the tag's id; the alerts join the owner from
    composer_fragment_info on that label, so the info must carry the id too."""
    svc = await versions_service(fragments)
    composer = await start_with_manifest(
        {"page.html": '<html><body><fragment name="footer" id="shop-footer"></fragment></body></html>'},
        routes=PAGE_ROUTE + manifest_yaml(footer=entry(svc, canary={"version": "3.0.0", "percent": 50})))
    await visit(composer, bucket=90)
    metrics = await scrape(composer.admin_url)
    assert metrics.value("composer_fragment_request_duration_seconds_count", fragment="shop-footer",
                         version="1.0.0") == 1
    info = metrics.find("composer_fragment_info", fragment="shop-footer")
    assert sorted((s.labels["version"], s.labels["owner"]) for s in info) == [("1.0.0", "team-x"), ("3.0.0", "team-x")]
    assert len(metrics.find("composer_fragment_info", fragment="footer")) == 2  # the manifest's own name stays


# =========================================================================== 8. logs


async def test_failure_log_record_names_version_owner_and_fallback_and_access_log_has_the_request(
        fragments, start_with_manifest):
    svc = await versions_service(fragments, names=("footer", "banner"), special={
        "/1.0.0/footer": html("down", status=503), "/2.0.0/banner": html("down", status=503)})
    page = ('<html><body><fragment name="footer"></fragment>\n'
            '<fragment name="banner"><p>banner inline</p></fragment></body></html>')
    composer = await start_with_manifest({"page.html": page}, routes=PAGE_ROUTE + manifest_yaml(
        footer=entry(svc, fallback=svc.url("/static/footer")),
        banner=entry(svc, "banner", owner="team-y", active="2.0.0")))
    with captured("composer.fragments") as failures, captured("composer.access") as access:
        resp, body = await composer.get("/page", headers={"x-request-id": "rid-42",
                                                          "Cookie": "composer_bucket=12"})
        assert resp.status == 200
        assert (shown(body, "footer"), shown(body, "banner")) == ("static", "inline")

        async def logged() -> bool:
            return len(access.records) >= 1
        await eventually(logged, "the access log record")

    by_fragment = {f["fragment"]: f for f in fields_of(failures)}
    assert sorted(by_fragment) == ["banner", "footer"] and len(failures.records) == 2
    footer = by_fragment["footer"]
    assert {k: footer[k] for k in ("fragment", "version", "owner", "route", "error_type", "url", "status",
                                   "request_id", "fallback")} == {
        "fragment": "footer", "version": "1.0.0", "owner": "team-x", "route": "page", "error_type": "status",
        "url": svc.url("/1.0.0/footer"), "status": 503, "request_id": "rid-42", "fallback": "fallback-src"}
    assert isinstance(footer["duration_ms"], float) and footer["duration_ms"] >= 0
    banner = by_fragment["banner"]
    assert (banner["version"], banner["owner"], banner["fallback"], banner["url"]) == \
        ("2.0.0", "team-y", "inline", svc.url("/2.0.0/banner"))
    assert all(r.levelno == logging.WARNING for r in failures.records)

    (line,) = fields_of(access)
    assert (line["request_id"], line["route"], line["status"]) == ("rid-42", "page", 200)
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0


# =========================================================================== 9. /manifest


async def test_manifest_endpoint_shows_each_fragment_and_recent_failures(fragments, start_with_manifest):
    svc = await versions_service(fragments, names=("footer", "banner", "promo"), special={
        "/1.0.0/footer": html("down", status=503), "/1.0.0/promo": html("down", status=503)})
    page = ('<fragment name="footer"></fragment><fragment name="banner"></fragment>'
            '<fragment name="promo"></fragment>')
    manifest = manifest_yaml(
        footer=entry(svc, fallback=svc.url("/static/footer"), canary={"version": "2.0.0", "percent": 10}),
        banner=entry(svc, "banner", owner="team-y", active="3.0.0", versions=("3.0.0",), enabled=False),
        promo=entry(svc, "promo", owner="team-z", versions=("1.0.0", "2.0.0")))
    before = time.time()
    composer = await start_with_manifest({"page.html": page}, settings="settings:\n  manifest: m.yaml\n",
                                         files={"m.yaml": manifest})
    after = time.time()
    for _ in range(3):
        resp, _ = await composer.get("/page", headers={"Cookie": "composer_bucket=50"})
        assert resp.status == 200

    async with composer.session.get(composer.admin_url + "/manifest") as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        view = await resp.json()
    assert view["source"] == str(composer.server.table.path.parent / "m.yaml")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", view["loaded_at"]), view["loaded_at"]
    loaded = datetime.strptime(view["loaded_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    assert before - 1 <= loaded <= after + 1
    minutes = view["fragments"]["footer"]["recent"]["minutes"]
    assert isinstance(minutes, int) and minutes > 0
    assert view["fragments"] == {
        "footer": {"owner": "team-x", "active": "1.0.0", "canary": {"version": "2.0.0", "percent": 10, "state": "running"},
                   "rollback": None, "enabled": True, "versions": list(VERSIONS),
                   "recent": {"minutes": minutes, "failures": 3, "fallbacks": 3}, "circuit": "closed"},
        "banner": {"owner": "team-y", "active": "3.0.0", "canary": None, "rollback": None, "enabled": False,
                   "versions": ["3.0.0"], "recent": {"minutes": minutes, "failures": 0, "fallbacks": 0},
                   "circuit": "closed"},
        "promo": {"owner": "team-z", "active": "1.0.0", "canary": None, "rollback": None, "enabled": True,
                  "versions": ["1.0.0", "2.0.0"], "recent": {"minutes": minutes, "failures": 3, "fallbacks": 0},
                  "circuit": "closed"},
    }


async def test_manifest_endpoint_for_inline_fragments_names_routes_yaml(fragments, start_with_manifest):
    svc = await versions_service(fragments)
    composer = await start_with_manifest({"page.html": PAGE}, routes=PAGE_ROUTE + manifest_yaml(footer=entry(svc)))
    view = await admin_json(composer.admin_url)
    assert view["source"] == str(composer.server.table.path)
    assert list(view["fragments"]) == ["footer"] and view["fragments"]["footer"]["active"] == "1.0.0"


# --------------------------------------------------------------------------- failed manifests, SIGHUP


def test_a_manifest_that_fails_to_load_is_the_only_problem_reported(tmp_path):
    """Templates naming its fragments would only add "not in the manifest" noise."""
    config = _config(tmp_path, '<html><body>\n<fragment name="footer"></fragment>\n</body></html>\n',
                     manifest="fragments: [\n")
    with pytest.raises(ConfigError) as info:
        load(config)
    assert len(info.value.problems) == 1
    assert "manifest.yaml:2: invalid YAML" in info.value.problems[0]
    assert "not in the manifest" not in info.value.problems[0]


async def test_sighup_fetches_a_url_manifest_afresh(fragments, start_with_manifest, manifest_server):
    svc = await versions_service(fragments)
    served = await manifest_server(_url_manifest(svc, "1.0.0"))
    composer = await start_with_manifest({"page.html": PAGE},
                                         settings=f"settings:\n  manifest: {served.url}\n  manifest_poll_s: 3600\n")
    assert (await visit(composer, bucket=50))[0] == "1.0.0"
    served.body = _url_manifest(svc, "2.0.0")
    await asyncio.sleep(0.3)
    assert (await visit(composer, bucket=50))[0] == "1.0.0"  # no poll for an hour
    composer.server.reloader.trigger()  # what SIGHUP does

    async def applied() -> bool:
        return (await visit(composer, bucket=50))[0] == "2.0.0"
    await eventually(applied, "SIGHUP to refetch the URL manifest")


async def test_reloads_fetch_a_url_manifest_in_the_event_loop_never_with_a_loop_of_their_own(
        fragments, start_with_manifest, manifest_server, monkeypatch):
    """Files are read in a worker thread; the manifest is fetched in the running loop and its
    body handed to `load`, also when a routes.yaml edit names another URL."""
    svc = await versions_service(fragments)
    first = await manifest_server(_url_manifest(svc, "1.0.0"))
    second = await manifest_server(_url_manifest(svc, "2.0.0"))
    settings = "settings:\n  manifest: {url}\n  manifest_poll_s: 3600\n  reload_interval_ms: 0\n"
    composer = await start_with_manifest({"page.html": PAGE}, settings=settings.format(url=first.url))
    runs: list[str] = []

    def no_run(coro: Any, **_: Any) -> None:
        coro.close()
        runs.append(threading.current_thread().name)
        raise AssertionError("asyncio.run during a reload")

    monkeypatch.setattr(asyncio, "run", no_run)
    composer.server.reloader.trigger()  # SIGHUP: the same URL, fetched afresh
    assert await composer.server.reloader.check(force=True) is True
    routes = composer.server.table.path
    replace_file(routes, routes.read_text(encoding="utf-8").replace(first.url, second.url))
    assert await composer.server.reloader.check(force=True) is True
    assert (await visit(composer, bucket=50))[0] == "2.0.0"
    assert runs == [] and len(first.seen) == 2 and second.seen == [None]


def test_load_asks_for_a_url_manifest_it_may_not_fetch(tmp_path):
    path = _config(tmp_path, PAGE, settings="  manifest: http://127.0.0.1:1/m.yaml\n")
    with pytest.raises(ManifestNeeded) as info:
        load(path, fetch=False)
    assert info.value.url == "http://127.0.0.1:1/m.yaml" and info.value.problems == ()

    async def in_a_loop() -> None:
        load(path)  # a loop runs here: no asyncio.run inside it

    with pytest.raises(ManifestNeeded):
        asyncio.run(in_a_loop())
