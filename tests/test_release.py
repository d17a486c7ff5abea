"""Releasing a fragment (SPEC §8): `composer manifest smoke|promote|rollback`, as real
processes against real fragment servers and real manifest files."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import Serve, eventually, html, write_config

from composer.manifest import parse_manifest


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "composer", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=30, check=False)


async def run_async(*args: str, cwd: Path) -> tuple[int, str, str]:
    """The CLI as a subprocess while this test's event loop keeps serving fragments."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "composer", *args, cwd=cwd,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# --- the manifest's rollback field ------------------------------------------------------

def test_rollback_field_parsed_and_checked() -> None:
    text = textwrap.dedent("""\
        fragments:
          footer:
            versions: {"1": "http://a.svc/1", "2": "http://a.svc/2"}
            active: "2"
            rollback: "1"
        """)
    entry = parse_manifest(text, "m.yaml", (), source="m.yaml").fragments["footer"]
    assert entry.rollback == "1"
    assert entry.version_lines == {"1": 3, "2": 3}
    with pytest.raises(Exception, match=r"m.yaml:5: fragment 'footer': rollback version '9' is not in versions"):
        parse_manifest(text.replace('rollback: "1"', 'rollback: "9"'), "m.yaml", (), source="m.yaml")


# --- promote and rollback ---------------------------------------------------------------

ODD_YAML = """\
# production manifest: edited by hand and by `composer manifest`   
fragments:

   footer:    # the footer team
        owner:   platform-team
        timeout_ms:   800
        versions:
            "2.3.0": http://footer.svc/2.3.0/   # old
            '2.4.0':     http://footer.svc/2.4.0/
            2.5.0-rc1: http://footer.svc/2.5.0/
        active:   '2.3.0'    # keep the quotes!
        # a comment between
        canary:
          version: "2.4.0"   # trying it
          percent: 5
        enabled: yes
   header: {owner: web, versions: {"1": "http://h.svc/1", "2": "http://h.svc/2"}, active: "1", canary: {version: "2", percent: 10}}
   search:
     owner: s
     versions:
       "7": http://s.svc/7
     active: "7"
"""


def test_promote_canary_percent_edits_only_those_bytes(tmp_path: Path) -> None:
    file = tmp_path / "manifest.yaml"
    file.write_bytes(ODD_YAML.encode())
    file.chmod(0o640)
    done = run_cli("manifest", "promote", "footer", "2.5.0-rc1", "--percent", "25", "--manifest", "manifest.yaml",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1 and "canary 2.5.0-rc1 at 25%" in done.stdout
    new = file.read_text()
    assert new == ODD_YAML.replace('version: "2.4.0"   # trying it', 'version: "2.5.0-rc1"   # trying it') \
        .replace("percent: 5\n", "percent: 25\n")
    assert stat.S_IMODE(file.stat().st_mode) == 0o640
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left


def test_promote_active_keeps_rollback_and_drops_canary(tmp_path: Path) -> None:
    file = tmp_path / "manifest.yaml"
    file.write_bytes(ODD_YAML.encode())
    done = run_cli("manifest", "promote", "footer", "2.4.0", "--manifest", "manifest.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    new = file.read_text()
    old_lines = ODD_YAML.splitlines(keepends=True)
    expected = old_lines[:10] + ["        active:   '2.4.0'    # keep the quotes!\n",
                                 '        rollback: "2.3.0"\n', "        # a comment between\n"] + old_lines[15:]
    assert new == "".join(expected)
    entry = parse_manifest(new, "m", (), source="m").fragments["footer"]
    assert (entry.active, entry.rollback, entry.canary) == ("2.4.0", "2.3.0", None)
    # and back: rollback makes 2.3.0 active again; only the active line differs from the promoted file
    done = run_cli("manifest", "rollback", "footer", "--manifest", "manifest.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "rolled back" in done.stdout and "2.4.0 -> 2.3.0" in done.stdout
    assert file.read_text() == new.replace("active:   '2.4.0'", "active:   '2.3.0'")


def test_promote_and_rollback_in_a_flow_mapping(tmp_path: Path) -> None:
    file = tmp_path / "manifest.yaml"
    file.write_bytes(ODD_YAML.encode())
    assert run_cli("manifest", "promote", "header", "2", "--manifest", "manifest.yaml", cwd=tmp_path).returncode == 0
    flow = '   header: {owner: web, versions: {"1": "http://h.svc/1", "2": "http://h.svc/2"}, active: "2", rollback: "1"}\n'
    assert file.read_text() == ODD_YAML.replace(ODD_YAML.splitlines(keepends=True)[16], flow)
    assert run_cli("manifest", "rollback", "header", "--manifest", "manifest.yaml", cwd=tmp_path).returncode == 0
    assert file.read_text() == ODD_YAML.replace(ODD_YAML.splitlines(keepends=True)[16],
                                                flow.replace('active: "2"', 'active: "1"'))


def test_promote_new_canary_is_one_inserted_line(tmp_path: Path) -> None:
    file = tmp_path / "manifest.yaml"
    file.write_bytes(ODD_YAML.replace("\n", "\r\n").encode())  # CRLF kept too
    assert run_cli("manifest", "promote", "search", "7", "--manifest", "manifest.yaml", cwd=tmp_path).returncode == 0
    assert file.read_bytes() == ODD_YAML.replace("\n", "\r\n").encode()  # already active: nothing written
    text = ODD_YAML.replace('       "7": http://s.svc/7\n', '       "7": http://s.svc/7\n       "8": http://s.svc/8\n')
    file.write_bytes(text.encode())
    done = run_cli("manifest", "promote", "search", "8", "--percent", "0", "--manifest", "manifest.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert file.read_text() == text + '     canary: {version: "8", percent: 0}\n'


JSON_MANIFEST = {"fragments": {
    "footer": {"owner": "platform-team", "versions": {"2.3.0": "http://footer.svc/2.3.0/",
                                                      "2.4.0": "http://footer.svc/2.4.0/"},
               "active": "2.3.0", "canary": {"version": "2.4.0", "percent": 5}, "enabled": True},
    "header": {"owner": "web", "versions": {"1": "http://h.svc/1"}, "active": "1"}}}


@pytest.mark.parametrize("indent", [2, 4])
def test_json_manifest_keeps_order_and_indentation(tmp_path: Path, indent: int) -> None:
    file = tmp_path / "manifest.json"
    original = json.dumps(JSON_MANIFEST, indent=indent) + "\n"
    file.write_text(original)
    done = run_cli("manifest", "promote", "footer", "2.4.0", "--percent", "50", "--manifest", "manifest.json",
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert file.read_text() == original.replace('"percent": 5', '"percent": 50')
    assert run_cli("manifest", "promote", "footer", "2.4.0", "--manifest", "manifest.json",
                   cwd=tmp_path).returncode == 0
    want = json.loads(original)
    footer = want["fragments"]["footer"]
    del footer["canary"]
    footer["active"] = "2.4.0"
    items = list(footer.items())
    footer.clear()
    footer.update(items[:3] + [("rollback", "2.3.0")] + items[3:])
    assert file.read_text() == json.dumps(want, indent=indent) + "\n"
    assert run_cli("manifest", "rollback", "footer", "--manifest", "manifest.json", cwd=tmp_path).returncode == 0
    footer["active"] = "2.3.0"
    assert file.read_text() == json.dumps(want, indent=indent) + "\n"


@pytest.mark.parametrize("args, message", [
    (("promote", "nope", "1.0"), "no fragment 'nope'"),
    (("promote", "footer", "9.9.9"), "has no version '9.9.9'"),
    (("promote", "footer", "9.9.9", "--percent", "5"), "has no version '9.9.9'"),
    (("promote", "footer", "2.3.0", "--percent", "5"), "already active"),
    (("rollback", "footer"), "has no rollback version"),
    (("rollback", "nope"), "no fragment 'nope'"),
    (("promote", "footer", "2.4.0", "--percent", "101"), "must be 0 to 100"),
])
def test_refusals_leave_the_file_untouched(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    file = tmp_path / "manifest.yaml"
    file.write_bytes(ODD_YAML.encode())
    os.utime(file, ns=(1_000_000_000, 1_000_000_000))
    done = run_cli("manifest", *args, "--manifest", "manifest.yaml", cwd=tmp_path)
    assert done.returncode == 2
    assert message in done.stderr
    assert file.read_bytes() == ODD_YAML.encode() and file.stat().st_mtime_ns == 1_000_000_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.yaml"]


def test_an_invalid_manifest_is_refused_untouched(tmp_path: Path) -> None:
    file = tmp_path / "manifest.yaml"
    bad = ODD_YAML.replace("active:   '2.3.0'", "active:   '7.7.7'")
    file.write_text(bad)
    os.utime(file, ns=(1_000_000_000, 1_000_000_000))
    done = run_cli("manifest", "promote", "footer", "2.4.0", "--manifest", "manifest.yaml", cwd=tmp_path)
    assert done.returncode == 2
    assert "manifest.yaml:11: fragment 'footer': active version '7.7.7' is not in versions" in done.stderr
    assert file.read_text() == bad and file.stat().st_mtime_ns == 1_000_000_000


# --- a running composer follows promote and rollback --------------------------------------

async def test_running_composer_follows_promote_and_rollback(tmp_path: Path, fragments) -> None:
    fs = await fragments({"/1": html("<p>one</p>"), "/2": html("<p>two</p>")})
    (tmp_path / "manifest.yaml").write_text(textwrap.dedent(f"""\
        # the footer
        fragments:
          footer:
            owner: me
            versions:
              "1": {fs.url('/1')}   # stable
              "2": {fs.url('/2')}
            active: "1"
        """))
    write_config(tmp_path, {"page.html": '<html><body><fragment name="footer"></fragment></body></html>'},
                 settings="settings:\n  reload_interval_ms: 50\n")
    async with Serve(tmp_path, "--manifest", "manifest.yaml") as serve, aiohttp.ClientSession() as session:
        async def page() -> str:
            async with session.get(serve.base + "/page", cookies={"composer_bucket": "50"}) as resp:
                return await resp.text()

        async def manifest_view() -> dict:
            async with session.get(serve.admin + "/manifest") as resp:
                return (await resp.json())["fragments"]["footer"]

        assert "<p>one</p>" in await page()
        code, _, err = await run_async("manifest", "promote", "footer", "2", "--percent", "60",
                                       "--manifest", "manifest.yaml", cwd=tmp_path)
        assert code == 0, err
        await eventually(lambda: _contains(page, "<p>two</p>"), "the canary served to bucket 50")
        assert (await manifest_view())["canary"]["version"] == "2"
        code, _, err = await run_async("manifest", "promote", "footer", "2", "--manifest", "manifest.yaml",
                                       cwd=tmp_path)
        assert code == 0, err
        async def promoted() -> bool:
            view = await manifest_view()
            return (view["active"], view["rollback"], view["canary"]) == ("2", "1", None)

        await eventually(promoted, "the promotion reloaded")
        assert "<p>two</p>" in await page()
        code, _, err = await run_async("manifest", "rollback", "footer", "--manifest", "manifest.yaml",
                                       cwd=tmp_path)
        assert code == 0, err
        await eventually(lambda: _contains(page, "<p>one</p>"), "the rolled-back version served")
        assert serve.alive()


async def _contains(page, text: str) -> bool:
    return text in await page()


# --- smoke ------------------------------------------------------------------------------

SMOKE_ROUTES = """\
routes:
  - name: home
    match: {path: /}
    template: home.html
  - name: item
    match: {path: "/items/{id}"}
    template: item.html
"""


def _with_asset(path: str, body: str) -> web.Handler:
    """An HTML fragment whose `Link` names a stylesheet at `path` on its own server (absolute)."""
    async def handler(request: web.Request) -> web.Response:
        link = f'<{request.url.origin()}{path}>; rel="stylesheet"'
        return web.Response(text=body, content_type="text/html", headers={"Link": link})

    return handler


async def _smoke_service(fragments):
    async def json_body(_: web.Request) -> web.Response:
        return web.Response(text="{}", content_type="application/json")

    async def css(_: web.Request) -> web.Response:
        return web.Response(text="p{}", content_type="text/css")

    async def big(_: web.Request) -> web.Response:
        return web.Response(text="<p>" + "x" * 5000 + "</p>", content_type="text/html")

    async def item(request: web.Request) -> web.Response:
        if request.match_info["id"] == "13":
            return web.Response(status=503)
        return web.Response(text="<p>item</p>", content_type="text/html")

    return await fragments({
        "/good": _with_asset("/ok.css", "<p>good</p>"), "/ok.css": css, "/other": html("<p>other</p>"),
        "/boom": html("oops", status=500), "/slow": html("<p>slow</p>", delay=1.5),
        "/json": json_body, "/big": big, "/item/{id}": item,
        "/badasset": _with_asset("/missing.css", "<p>asset</p>"),
    })


def _smoke_files(tmp_path: Path, fs, versions: dict[str, tuple[str, str | None]], home: str) -> None:
    """manifest.yaml (fragment → (active path, canary path)) and routes.yaml with home and item."""
    lines = ["# candidate manifest", "fragments:"]
    for name, (active, canary) in versions.items():
        lines += [f"  {name}:", "    owner: team", "    timeout_ms: 500", "    versions:"]
        for path in dict.fromkeys([active, canary] if canary else [active]):
            lines.append(f'      "{path.strip("/")}": {fs.url(path)}')
        lines.append(f'    active: "{active.strip("/")}"')
        if canary:
            lines.append(f'    canary: {{version: "{canary.strip("/")}", percent: 10}}')
    (tmp_path / "manifest.yaml").write_text("\n".join(lines) + "\n")
    item = fs.url("/item/") + "{id}"
    write_config(tmp_path, {"home.html": f"<html><body>{home}</body></html>",
                            "item.html": f'<html><body><fragment src="{item}"></fragment></body></html>'},
                 routes=SMOKE_ROUTES, settings="settings:\n  max_fragment_bytes: 1000\n")


async def test_smoke_passes_a_good_manifest(tmp_path: Path, fragments) -> None:
    fs = await _smoke_service(fragments)
    _smoke_files(tmp_path, fs, {"footer": ("/good", "/other")},
                 '<fragment name="footer"></fragment>')
    code, out, err = await run_async("manifest", "smoke", "--manifest", "manifest.yaml", "--path", "/items/42",
                                     cwd=tmp_path)
    assert (code, err) == (0, ""), out
    assert out == "manifest.yaml: ok (2 versions, 4 pages)\n"
    # the fragment server really served them:
    assert {r.path for r in fs.requests} >= {"/good", "/other", "/ok.css", "/item/42"}
    code, out, _ = await run_async("manifest", "smoke", "--manifest", "manifest.yaml", "--json", cwd=tmp_path)
    assert code == 0
    assert json.loads(out) == {"ok": True, "checked": {"versions": 2, "pages": 2}, "problems": []}


async def test_smoke_catches_each_kind_of_bad_version(tmp_path: Path, fragments) -> None:
    fs = await _smoke_service(fragments)
    _smoke_files(tmp_path, fs, {"footer": ("/good", "/boom"), "header": ("/slow", None), "api": ("/json", None),
                                "huge": ("/big", None), "styled": ("/other", "/badasset")},
                 '<fragment name="footer"></fragment><fragment name="styled"></fragment>')
    started = time.monotonic()
    code, out, err = await run_async("manifest", "smoke", "--manifest", "manifest.yaml", "--path", "/items/13",
                                     cwd=tmp_path)
    assert code == 1, err
    assert time.monotonic() - started < 15  # concurrent, each check within its deadline (the slow one: 1.5 s)
    lines = out.splitlines()
    assert f"manifest.yaml:8: footer boom: status 500 from {fs.url('/boom')}" in lines
    assert any(line.startswith("manifest.yaml:15: header slow: timeout: no complete response within 500 ms")
               for line in lines), lines
    assert f"manifest.yaml:21: api json: content-type application/json, not text/html, from {fs.url('/json')}" \
        in lines
    assert any(line.startswith("manifest.yaml:27: huge big: too_large") for line in lines), lines
    assert f"manifest.yaml:34: styled badasset: asset {fs.url('/missing.css')}: status 404" in lines
    # composing: the canary users' home page has footer 2.4.0 failing; the path's fragment 503s
    assert "routes.yaml:4: route home: GET / for canary users (bucket 0): fragment footer boom failed (status)" \
        in lines
    assert "--path: path /items/13: GET /items/13 for active users (bucket 99): fragment item.html#1 " \
           "(src) failed (status)" in lines
    assert not [line for line in lines if "bucket 99" in line and "route home" in line]
    code, out, _ = await run_async("manifest", "smoke", "--manifest", "manifest.yaml", "--json", cwd=tmp_path)
    report = json.loads(out)
    assert code == 1 and report["ok"] is False
    assert {"where": "manifest.yaml:8", "subject": "footer boom",
            "what": f"status 500 from {fs.url('/boom')}",
            "line": f"manifest.yaml:8: footer boom: status 500 from {fs.url('/boom')}"} in report["problems"]


def test_smoke_refuses_an_invalid_manifest(tmp_path: Path) -> None:
    (tmp_path / "manifest.yaml").write_text('fragments:\n  f:\n    versions: {"1": "http://a.svc/"}\n'
                                            '    active: "2"\n')
    write_config(tmp_path, {"page.html": "<html></html>"})
    done = run_cli("manifest", "smoke", "--manifest", "manifest.yaml", cwd=tmp_path)
    assert done.returncode == 2
    assert "manifest.yaml:4: fragment 'f': active version '2' is not in versions" in done.stderr
