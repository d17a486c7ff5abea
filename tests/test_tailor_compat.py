"""`settings.compat: tailor` (README "Tailor compatibility") over real fragment servers and a real
composer: Tailor's exact wrapper markup (its own test suite's expected strings, with
`pipeInstanceName: 'p'` and `pipeAttributes: a => ({id: a.id})`, research §4), attributes as
Tailor reads them, its asset rules, a non-primary 3xx, the template lookup, and nothing of it
with compat off."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from aiohttp import web
from conftest import cli_env, eventually, html, write_config
from yarl import URL

from composer import load
from composer.errors import ConfigError
from composer.release import _targets
from composer.signals import Labels
from composer.tailor import DEFAULT_AMD_LOADER, TailorSettings, definition

# As Tailor's tests configure it: instance `p`, hook attributes `{id}` (+ range).
TAILOR_P = """
    settings:
      compat: tailor
      tailor:
        pipe_instance_name: p
        pipe_attributes: {}
"""
COMPAT = """
    settings:
      compat: tailor
"""
_DEFINITION = re.compile(r'<script src="[^"]*"></script>\n<script>var p=.*?</script>\n', re.DOTALL)


def page(body: str) -> dict[str, str]:
    return {"page.html": f"<html><head></head><body>{body}</body></html>"}


def without_pipe(body: str) -> str:
    """The page without its one pipe definition (Tailor's tests stub `pipeDefinition` to '')."""
    assert len(_DEFINITION.findall(body)) == 1, body[:300]
    return _DEFINITION.sub("", body)


def linked(body: str, link: str, header: str = "link", status: int = 200):
    return html(body, status=status, headers={header: link})


# ---------------------------------------------------------------- Tailor's expected markup

async def test_fragments_in_order(fragments, start_composer):
    svc = await fragments({"/1": html("hello"), "/2": html("world")})
    composer = await start_composer(page(f'<fragment src="{svc.url("/1")}"></fragment>'
                                         f'<fragment src="{svc.url("/2")}"></fragment>'), settings=TAILOR_P)
    resp, body = await composer.get("/page")
    assert resp.status == 200
    assert without_pipe(body) == (
        "<html><head></head><body>"
        "<script data-pipe>p.start(0)</script>hello<script data-pipe>p.end(0)</script>"
        "<script data-pipe>p.start(1)</script>world<script data-pipe>p.end(1)</script>"
        "</body></html>")


async def test_async_fragment(fragments, start_composer):
    svc = await fragments({"/1": html("hello")})
    composer = await start_composer(page(f'<fragment async src="{svc.url("/1")}"></fragment>'), settings=TAILOR_P)
    _, body = await composer.get("/page")
    assert without_pipe(body) == (
        "<html><head></head><body><script data-pipe>p.placeholder(0)</script>"
        "<script data-pipe>p.start(0)</script>hello<script data-pipe>p.end(0)</script></body></html>")


async def test_script_type_fragment_in_head(fragments, start_composer):
    svc = await fragments({"/1": html("yes")})
    composer = await start_composer(
        {"page.html": f'<html><head><script type="fragment" src="{svc.url("/1")}"></script></head><body></body></html>'},
        settings=TAILOR_P)
    _, body = await composer.get("/page")
    assert without_pipe(body) == (
        "<html><head><script data-pipe>p.start(0)</script>yes<script data-pipe>p.end(0)</script></head>"
        "<body></body></html>")


@pytest.mark.parametrize("header", ["Link", "X-AMZ-META-LINK"])
async def test_stylesheet_and_script_from_link_header(fragments, start_composer, header):
    svc = await fragments({"/1": linked("hello", '<http://link>; rel="stylesheet",<http://link2>; rel="fragment-script"',
                                        header)})
    composer = await start_composer(page(f'<fragment src="{svc.url("/1")}"></fragment>'), settings=TAILOR_P)
    _, body = await composer.get("/page")
    assert without_pipe(body) == (
        '<html><head></head><body><link rel="stylesheet" href="http://link">'
        '<script data-pipe>p.start(0, "http://link2", {"id":0,"range":[0,0]})</script>hello'
        '<script data-pipe>p.end(0, "http://link2", {"id":0,"range":[0,0]})</script></body></html>')


async def test_async_fragment_loads_its_css_with_load_css(fragments, start_composer):
    svc = await fragments({"/1": linked("hello", '<http://link>; rel="stylesheet",<http://link2>; rel="fragment-script"')})
    composer = await start_composer(page(f'<fragment async src="{svc.url("/1")}"></fragment>'), settings=TAILOR_P)
    _, body = await composer.get("/page")
    assert without_pipe(body) == (
        '<html><head></head><body><script data-pipe>p.placeholder(0)</script>'
        '<script>p.loadCSS("http://link")</script>'
        '<script data-pipe>p.start(0, "http://link2", {"id":0,"range":[0,0]})</script>hello'
        '<script data-pipe>p.end(0, "http://link2", {"id":0,"range":[0,0]})</script></body></html>')


async def test_id_attribute_names_the_fragment_for_the_hooks(fragments, start_composer):
    svc = await fragments({"/1": linked("hello", '<http://link2>; rel="fragment-script"')})
    composer = await start_composer(page(f'<fragment id="foo" src="{svc.url("/1")}"></fragment>'), settings=TAILOR_P)
    _, body = await composer.get("/page")
    assert '<script data-pipe>p.start(0, "http://link2", {"id":"foo","range":[0,0]})</script>hello' \
           '<script data-pipe>p.end(0, "http://link2", {"id":"foo","range":[0,0]})</script>' in body


async def test_max_asset_links_defaults_to_one_as_in_tailor(fragments, start_composer):
    svc = await fragments({"/1": linked("hello maxAssetLinks default",
                                        '<http://link1>; rel="fragment-script", <http://link2>; rel="fragment-script",'
                                        '<http://css1>; rel="stylesheet", <http://css2>; rel="stylesheet"')})
    composer = await start_composer(page(f'<fragment src="{svc.url("/1")}"></fragment>'), settings=TAILOR_P)
    _, body = await composer.get("/page")
    assert without_pipe(body) == (
        '<html><head></head><body><link rel="stylesheet" href="http://css1">'
        '<script data-pipe>p.start(0, "http://link1", {"id":0,"range":[0,0]})</script>hello maxAssetLinks default'
        '<script data-pipe>p.end(0, "http://link1", {"id":0,"range":[0,0]})</script></body></html>')


MAX_3 = TAILOR_P + "        max_asset_links: 3\n"


async def test_max_asset_links_three_indexes_sync_and_async_fragments(fragments, start_composer):
    svc = await fragments({
        "/1": linked("hello many", ", ".join(f'<http://link-a{i}>; rel="fragment-script"' for i in range(1, 5))),
        "/2": linked("hello single", '<http://link-b1>; rel="fragment-script"', ),
        "/3": html("hello exactly three async", delay=0.2, headers={"link": ", ".join(
            f'<http://link-c{i}>; rel="fragment-script"' for i in range(1, 4))}),
        "/4": linked("hello exactly three", ", ".join(f'<http://link-d{i}>; rel="fragment-script"' for i in range(1, 4))),
    })
    composer = await start_composer(page(
        f'<fragment src="{svc.url("/1")}"></fragment><fragment id="f-2" async src="{svc.url("/2")}"></fragment>'
        f'<fragment async src="{svc.url("/3")}"></fragment><fragment src="{svc.url("/4")}"></fragment>'),
        settings=MAX_3)
    _, body = await composer.get("/page")
    assert without_pipe(body) == (
        '<html><head></head><body>'
        '<script data-pipe>p.start(0, "http://link-a1", {"id":0,"range":[0,2]})</script>'
        '<script data-pipe>p.start(1, "http://link-a2", {"id":0,"range":[0,2]})</script>'
        '<script data-pipe>p.start(2, "http://link-a3", {"id":0,"range":[0,2]})</script>'
        'hello many'
        '<script data-pipe>p.end(2, "http://link-a3", {"id":0,"range":[0,2]})</script>'
        '<script data-pipe>p.end(1, "http://link-a2", {"id":0,"range":[0,2]})</script>'
        '<script data-pipe>p.end(0, "http://link-a1", {"id":0,"range":[0,2]})</script>'
        '<script data-pipe>p.placeholder(3)</script>'
        '<script data-pipe>p.placeholder(6)</script>'
        '<script data-pipe>p.start(9, "http://link-d1", {"id":9,"range":[9,11]})</script>'
        '<script data-pipe>p.start(10, "http://link-d2", {"id":9,"range":[9,11]})</script>'
        '<script data-pipe>p.start(11, "http://link-d3", {"id":9,"range":[9,11]})</script>'
        'hello exactly three'
        '<script data-pipe>p.end(11, "http://link-d3", {"id":9,"range":[9,11]})</script>'
        '<script data-pipe>p.end(10, "http://link-d2", {"id":9,"range":[9,11]})</script>'
        '<script data-pipe>p.end(9, "http://link-d1", {"id":9,"range":[9,11]})</script>'
        '<script data-pipe>p.start(3, "http://link-b1", {"id":"f-2","range":[3,3]})</script>'
        'hello single'
        '<script data-pipe>p.end(3, "http://link-b1", {"id":"f-2","range":[3,3]})</script>'
        '<script data-pipe>p.start(6, "http://link-c1", {"id":6,"range":[6,8]})</script>'
        '<script data-pipe>p.start(7, "http://link-c2", {"id":6,"range":[6,8]})</script>'
        '<script data-pipe>p.start(8, "http://link-c3", {"id":6,"range":[6,8]})</script>'
        'hello exactly three async'
        '<script data-pipe>p.end(8, "http://link-c3", {"id":6,"range":[6,8]})</script>'
        '<script data-pipe>p.end(7, "http://link-c2", {"id":6,"range":[6,8]})</script>'
        '<script data-pipe>p.end(6, "http://link-c1", {"id":6,"range":[6,8]})</script>'
        '</body></html>')


async def test_three_stylesheets_with_max_asset_links_three(fragments, start_composer):
    svc = await fragments({"/1": linked("hello multiple styles ", '<http://script-link>; rel="fragment-script",'
                                        '<http://css1>; rel="stylesheet",<http://css2>; rel="stylesheet",'
                                        '<http://css3>; rel="stylesheet"')})
    composer = await start_composer(page(f'<fragment src="{svc.url("/1")}"></fragment>'), settings=MAX_3)
    _, body = await composer.get("/page")
    assert without_pipe(body) == (
        '<html><head></head><body><link rel="stylesheet" href="http://css1"><link rel="stylesheet" href="http://css2">'
        '<link rel="stylesheet" href="http://css3">'
        '<script data-pipe>p.start(0, "http://script-link", {"id":0,"range":[0,0]})</script>hello multiple styles '
        '<script data-pipe>p.end(0, "http://script-link", {"id":0,"range":[0,0]})</script></body></html>')


async def test_failed_fragment_shows_nothing_not_even_its_pipe_calls(fragments, start_composer):
    svc = await fragments({"/1": html("down", status=500), "/2": html("up")})
    composer = await start_composer(page(f'<fragment src="{svc.url("/1")}"></fragment>'
                                         f'<fragment src="{svc.url("/2")}"></fragment>'), settings=TAILOR_P)
    _, body = await composer.get("/page")
    assert without_pipe(body) == ("<html><head></head><body><script data-pipe>p.start(1)</script>up"
                                  "<script data-pipe>p.end(1)</script></body></html>")


# ---------------------------------------------------------------- hook attributes, escaping

async def test_default_hook_attributes_are_tailors_primary_and_id(fragments, start_composer):
    svc = await fragments({"/1": linked("hello", '<http://x/a.js>; rel="fragment-script"')})
    composer = await start_composer(page(f'<fragment id="hdr" primary src="{svc.url("/1")}"></fragment>'),
                                    settings=COMPAT)
    _, body = await composer.get("/page")
    assert '<script data-pipe>Pipe.start(0, "http://x/a.js", {"primary":true,"id":"hdr","range":[0,0]})</script>' \
           in body


async def test_pipe_attributes_read_custom_tag_attributes(fragments, start_composer):
    svc = await fragments({"/1": linked("a", '<http://x/a.js>; rel="fragment-script"'),
                           "/2": linked("b", '<http://x/b.js>; rel="fragment-script"')})
    settings = COMPAT + """\
      tailor:
        pipe_instance_name: TailorPipe
        pipe_attributes:
          timingGroups: {attribute: timing-group, split: ","}
          primary: {attribute: primary, boolean: true}
          team: {attribute: data-team}
    """
    composer = await start_composer(page(
        f'<fragment timing-group="abovethefold,interactive" id="header" data-team="web" src="{svc.url("/1")}">'
        f'</fragment><fragment primary src="{svc.url("/2")}"></fragment>'), settings=settings)
    _, body = await composer.get("/page")
    assert ('TailorPipe.start(0, "http://x/a.js", {"timingGroups":["abovethefold","interactive"],"primary":false,'
            '"team":"web","id":"header","range":[0,0]})') in body
    assert 'TailorPipe.start(1, "http://x/b.js", {"timingGroups":[],"primary":true,"id":1,"range":[1,1]})' in body


async def test_urls_and_attributes_cannot_break_out_of_the_pipe_scripts(fragments, start_composer):
    """Tailor wrote them raw (research §7.6): here they are JSON with `<` escaped."""
    evil = 'http://x/a.js?"</script><script>alert(1)</script>'
    svc = await fragments({"/1": linked("hello", f'<{evil}>; rel="fragment-script", <http://x/"a.css>; rel="stylesheet"'),
                           "/2": linked("bye", '<http://x/"b.css</script>>; rel="stylesheet"')})
    composer = await start_composer(page(
        f'<fragment id="&lt;/script&gt;" src="{svc.url("/1")}"></fragment>'
        f'<fragment async src="{svc.url("/2")}"></fragment>'), settings=COMPAT)
    _, body = await composer.get("/page")
    assert "alert(1)</script>" not in body and "</script><script>alert" not in body
    assert r'"id":"\u003c/script>"' in body
    assert '<link rel="stylesheet" href="http://x/%22a.css">' in body
    assert 'Pipe.loadCSS("http://x/%22b.css%3C/script%3E")' in body


# ---------------------------------------------------------------- the pipe definition

async def test_pipe_definition_goes_before_the_first_script_once(fragments, start_composer):
    svc = await fragments({"/1": html("hello")})
    composer = await start_composer({"page.html": (
        '<!doctype html><!--<script>--><html><head><meta charset="utf-8"><script>var early = 1;</script>'
        f'<script>var late = 2;</script></head><body><fragment src="{svc.url("/1")}"></fragment></body></html>')},
        settings=COMPAT)
    _, body = await composer.get("/page")
    before, definition_, after = body.partition(f'<script src="{DEFAULT_AMD_LOADER}"></script>\n<script>var Pipe=')
    assert definition_ and before == '<!doctype html><!--<script>--><html><head><meta charset="utf-8">'
    assert after.count("var Pipe=") == 0 and "<script>var early = 1;</script>" in after


async def test_no_pipe_without_a_script_or_fragment(start_composer):
    composer = await start_composer({"page.html": "<html><body><p>static</p></body></html>"}, settings=COMPAT)
    _, body = await composer.get("/page")
    assert body == "<html><body><p>static</p></body></html>"


async def test_file_loader_is_inlined(fragments, start_composer, tmp_path):
    svc = await fragments({"/1": html("hello")})
    (tmp_path / "loader.js").write_text("var require = function () {};", encoding="utf-8")
    composer = await start_composer(page(f'<fragment src="{svc.url("/1")}"></fragment>'), settings=COMPAT + """\
      tailor: {amd_loader_url: "file://loader.js"}
    """)
    _, body = await composer.get("/page")
    assert "<script>var require = function () {};\nvar Pipe=(function (doc, perf)" in body
    assert "<script src=" not in body


def test_the_runtime_is_in_the_package() -> None:
    defined = definition(TailorSettings(amd_loader_url="/js/require.js", pipe_instance_name="P")).decode()
    assert defined.startswith('<script src="/js/require.js"></script>\n<script>var P=(function (doc, perf) {')
    assert defined.endswith("})(window.document, window.performance)</script>\n")
    assert "composer's runtime" not in defined  # its leading comment stays out of pages


# ---------------------------------------------------------------- attributes, primaries

async def test_unknown_attributes_and_primary_false_as_tailor_reads_them(fragments, start_composer):
    svc = await fragments({"/1": html("moved", status=404)})
    composer = await start_composer(page(f'<fragment primary="false" foo="bar" src="{svc.url("/1")}"></fragment>'),
                                    settings=COMPAT)
    resp, body = await composer.get("/page")
    assert resp.status == 404  # primary="false" is primary, as in Tailor
    assert "moved" in body


def test_check_warns_of_primary_false_and_a_second_primary(tmp_path: Path) -> None:
    config = write_config(tmp_path, page(
        '<fragment primary="false" src="http://127.0.0.1:1/a"></fragment>\n'
        '<fragment primary src="http://127.0.0.1:1/b"></fragment>'), settings=COMPAT)
    table = load(config)
    template = table.routes[0].template
    assert template is not None and template.primary is not None and template.primary.index == 0
    assert [f.primary for f in template.fragments] == [True, False]
    done = subprocess.run([sys.executable, "-m", "composer", "check", "--config", str(config)],
                          capture_output=True, text=True, env=cli_env(), timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    file = tmp_path / "templates" / "page.html"
    assert f"{file}:1: warning: primary=\"false\" sets 'primary' all the same" in done.stderr
    assert f"{file}:2: warning: a template has at most one primary fragment (first on line 1, which decides" \
           in done.stderr


def test_without_compat_unknown_attributes_and_two_primaries_are_problems(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(write_config(tmp_path, page('<fragment foo="bar" src="http://127.0.0.1:1/a"></fragment>'
                                         '<fragment primary src="http://127.0.0.1:1/b"></fragment>'
                                         '<fragment primary src="http://127.0.0.1:1/c"></fragment>')))
    text = "\n".join(caught.value.problems)
    assert "unknown attribute 'foo'" in text and "at most one primary" in text


@pytest.mark.parametrize(("settings", "problem"), [
    ("compat: tailr", "routes.yaml:3: settings.compat must be null or tailor, not 'tailr'"),
    ("compat: tailor\n  tailor: {pipe_instance_name: var}", "settings.tailor.pipe_instance_name must be a JavaScript"),
    ("compat: tailor\n  tailor: {pipe_instance_name: 1a}", "settings.tailor.pipe_instance_name"),
    ("compat: tailor\n  tailor: {amd_loader_url: javascript:x}", "settings.tailor.amd_loader_url must be an http(s)"),
    ("compat: tailor\n  tailor: {amd_loader_url: file://missing.js}", "settings.tailor.amd_loader_url: cannot read"),
    ("compat: tailor\n  tailor: {max_asset_links: 0}", "settings.tailor.max_asset_links must be between 1 and 100"),
    ("compat: tailor\n  tailor: {pipe_attributes: {id: {attribute: x}}}", "'id' is always set by composer"),
    ("compat: tailor\n  tailor: {pipe_attributes: {a: {split: x}}}", "pipe_attributes.a needs `attribute`"),
    ("compat: tailor\n  tailor: {colour: red}", "unknown key 'colour' in settings.tailor"),
])
def test_settings_problems_name_their_line(tmp_path: Path, settings: str, problem: str) -> None:
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "page.html").write_text("<p>x</p>", encoding="utf-8")
    (tmp_path / "routes.yaml").write_text(
        f"# Tailor\nsettings:\n  {settings}\nroutes:\n  - {{name: page, match: {{path: /page}}, template: page.html}}\n",
        encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load(tmp_path / "routes.yaml")
    line = 3 if "\n" not in settings else 4  # the line of the key at fault
    assert any(problem in p and re.match(rf".*routes\.yaml:{line}: ", p) for p in caught.value.problems), \
        caught.value.problems


def test_tailor_settings_without_compat_warn(tmp_path: Path) -> None:
    table = load(write_config(tmp_path, page("<p>x</p>"), settings="settings:\n  tailor: {max_asset_links: 2}\n"))
    assert any("settings.tailor changes nothing without settings.compat: tailor" in w for w in table.warnings)


# ---------------------------------------------------------------- status, compat off

async def test_non_primary_3xx_is_content_under_compat(fragments, start_composer):
    svc = await fragments({"/1": html("<p>moved body</p>", status=302, headers={"location": "/elsewhere"})})
    template = page(f'<fragment src="{svc.url("/1")}"></fragment>')
    composer = await start_composer(template, settings=COMPAT, folder="compat")
    resp, body = await composer.get("/page")
    assert resp.status == 200 and "<p>moved body</p>" in body
    plain = await start_composer(template, folder="plain")
    resp, body = await plain.get("/page")
    assert resp.status == 200 and "moved body" not in body  # SPEC §3: a failure (`status`)


async def test_compat_off_emits_nothing_of_it(fragments, start_composer):
    svc = await fragments({"/1": linked("hello", '<http://x/a.css>; rel="stylesheet", <http://x/a.js>; '
                                        'rel="fragment-script", <http://x/b.js>; rel="fragment-script"'),
                           "/2": linked("later", '<http://x/c.js>; rel="fragment-script"', header="x-amz-meta-link")})
    composer = await start_composer({"page.html": (
        f'<html><head><script>var x;</script></head><body><fragment src="{svc.url("/1")}"></fragment>'
        f'<fragment async src="{svc.url("/2")}"></fragment></body></html>')})
    _, body = await composer.get("/page")
    assert "Pipe" not in body and "data-pipe" not in body and "require" not in body
    assert '<script src="http://x/a.js" defer></script><script src="http://x/b.js" defer></script>' in body
    assert "http://x/c.js" not in body  # x-amz-meta-link is Tailor's, read under compat only
    assert '<template id="composer-async-1"></template>' in body


# ---------------------------------------------------------------- template lookup

LOOKUP = """
    routes:
      - name: pages
        match: {path_prefix: /}
        template_lookup: true
"""


async def test_template_lookup_serves_only_templates_compiled_at_load(fragments, start_composer, tmp_path):
    svc = await fragments({"/1": html("F")})
    (tmp_path / "secret.html").write_text("<p>secret</p>", encoding="utf-8")  # beside the templates folder
    (tmp_path / "templates" / "sub").mkdir(parents=True)
    composer = await start_composer({
        "index.html": "<h1>home</h1>", "x.html": f'<fragment src="{svc.url("/1")}"></fragment>',
        "sub/y.html": "<p>y</p>"}, routes=LOOKUP, settings=COMPAT, files={})
    for path, text in [("/", "<h1>home</h1>"), ("/index", "<h1>home</h1>"), ("/sub/y", "<p>y</p>"),
                       ("/x", "F<script data-pipe>Pipe.end(0)</script>")]:
        resp, body = await composer.get(path)
        assert resp.status == 200 and body.endswith(text), (path, body[-200:])
    for path in ("/nope", "/x.html", "/../secret", "/%2e%2e/secret", "/sub/../x", "/%2E%2E%2Fsecret", "/x/", "//x"):
        async with composer.session.get(URL(composer.url + path, encoded=True)) as resp:  # sent as written
            body = await resp.text()
        assert resp.status in (400, 404), path
        assert "<p>secret</p>" not in body and "<p>y</p>" not in body and "data-pipe" not in body


def test_template_lookup_needs_a_path_prefix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(write_config(tmp_path, {"x.html": "<p>x</p>"}, routes=textwrap.dedent("""
            routes:
              - {name: pages, match: {path: /x}, template_lookup: true}
              - {name: both, match: {path_prefix: /b}, template_lookup: true, template: x.html}
        """)))
    text = "\n".join(caught.value.problems)
    assert "template_lookup needs match.path_prefix" in text
    assert "exactly one of `template`, `template_lookup`, `backend`, `redirect` (it has template, template_lookup)" \
        in text


async def test_template_lookup_reloads_a_new_template(start_composer, tmp_path):
    composer = await start_composer({"index.html": "<h1>home</h1>"}, routes=LOOKUP)
    resp, _ = await composer.get("/new")
    assert resp.status == 404
    (tmp_path / "templates" / "new.html").write_text("<p>new</p>", encoding="utf-8")
    for _ in range(100):
        resp, body = await composer.get("/new")
        if resp.status == 200:
            break
        await asyncio.sleep(0.05)
    assert resp.status == 200 and body == "<p>new</p>"



# ---------------------------------------------------------------- nested fragments under compat

def nested(body: str, link: str = ""):
    """A nested fragment's handler: `body` (`{base}` is the service's own URL) as a template."""
    async def handler(request: web.Request) -> web.Response:
        headers = {"x-composer-nested": "1", **({"link": link} if link else {})}
        return web.Response(text=body.format(base=f"http://{request.host}"), content_type="text/html",
                            headers=headers)
    return handler


async def test_nested_fragments_are_wrapped_with_indices_after_the_templates(fragments, start_composer):
    """Tailor numbers every fragment of a request in one sequence (`nextIndex`), nested ones
    (custom tags + processTemplate) too: here after the template's two, stride max_asset_links."""
    svc = await fragments({"/outer": nested('<fragment src="{base}/a"></fragment>|<fragment id="b" src="{base}/b">'
                                            "</fragment>"),
                           "/a": linked("A", '<http://x/a.js>; rel="fragment-script"'),
                           "/b": linked("B", '<http://x/b.css>; rel="stylesheet"'), "/2": html("two")})
    composer = await start_composer(page(f'<fragment src="{svc.url("/outer")}"></fragment>'
                                         f'<fragment src="{svc.url("/2")}"></fragment>'),
                                    settings=TAILOR_P + "        max_asset_links: 2\n")
    _, body = await composer.get("/page")
    assert without_pipe(body) == (
        "<html><head></head><body>"
        "<script data-pipe>p.start(0)</script>"
        '<script data-pipe>p.start(4, "http://x/a.js", {"id":4,"range":[4,4]})</script>A'
        '<script data-pipe>p.end(4, "http://x/a.js", {"id":4,"range":[4,4]})</script>|'
        '<link rel="stylesheet" href="http://x/b.css">'
        "<script data-pipe>p.start(6)</script>B<script data-pipe>p.end(6)</script>"
        "<script data-pipe>p.end(0)</script>"
        "<script data-pipe>p.start(2)</script>two<script data-pipe>p.end(2)</script>"
        "</body></html>")
    _, again = await composer.get("/page")  # per page, not per server: the next page starts over
    assert again == body


async def test_nested_indices_never_collide_across_bodies_and_depths(fragments, start_composer):
    svc = await fragments({
        "/left": nested('<fragment src="{base}/deep"></fragment><fragment src="{base}/leaf"></fragment>'),
        "/right": nested('<fragment src="{base}/leaf"></fragment><fragment src="{base}/leaf"></fragment>'),
        "/deep": nested('<fragment src="{base}/leaf"></fragment>'),
        "/leaf": linked("leaf", '<http://x/leaf.js>; rel="fragment-script"')})
    composer = await start_composer(page(f'<fragment src="{svc.url("/left")}"></fragment>'
                                         f'<fragment src="{svc.url("/right")}"></fragment>'), settings=TAILOR_P)
    _, body = await composer.get("/page")
    starts = [int(i) for i in re.findall(r"p\.start\((\d+)", body)]
    ends = [int(i) for i in re.findall(r"p\.end\((\d+)", body)]
    # 2 in the template (0, 1), 5 nested (2–6, in the order their bodies arrive): each its own index
    assert sorted(starts) == sorted(ends) == list(range(7)), body
    assert starts[0] == 0 and body.count("leaf<script data-pipe>p.end(") == 4


async def test_nested_fragments_are_not_wrapped_without_compat(fragments, start_composer):
    svc = await fragments({"/outer": nested('<fragment src="{base}/a"></fragment>'),
                           "/a": linked("A", '<http://x/a.js>; rel="fragment-script"')})
    composer = await start_composer(page(f'<fragment src="{svc.url("/outer")}"></fragment>'))
    _, body = await composer.get("/page")
    assert "data-pipe" not in body and 'A<script src="http://x/a.js" defer></script>' in body


# ---------------------------------------------------------------- the page's Link header

LOADER = "/js/require.js"
WITH_LOADER = COMPAT + f"""\
      tailor: {{amd_loader_url: "{LOADER}", max_asset_links: 2}}
    """


async def test_link_header_is_the_loader_then_the_primarys_styles_then_its_scripts(fragments, start_composer):
    """Research §2.2: Tailor's order, in composer's form (no `nopush`; no `crossorigin`: the
    loader's tag has none, and RequireJS loads fragment scripts without CORS)."""
    svc = await fragments({"/p": linked("P", '<http://x/p1.js>; rel="fragment-script", <http://x/p.css>; rel='
                                        '"stylesheet", <http://x/p2.js>; rel="fragment-script", <http://x/p3.js>; '
                                        'rel="fragment-script", <http://x/q.css>; rel="stylesheet"'),
                           "/o": linked("O", '<http://x/o.js>; rel="fragment-script", <http://x/o.css>; rel="stylesheet"')})
    composer = await start_composer(page(f'<fragment src="{svc.url("/o")}"></fragment>'
                                         f'<fragment primary src="{svc.url("/p")}"></fragment>'), settings=WITH_LOADER)
    resp, _ = await composer.get("/page")
    assert resp.headers["link"] == (
        f'<{LOADER}>; rel="preload"; as="script", <http://x/p.css>; rel="preload"; as="style", '
        '<http://x/q.css>; rel="preload"; as="style", <http://x/p1.js>; rel="preload"; as="script", '
        '<http://x/p2.js>; rel="preload"; as="script"')  # max_asset_links: 2 of each; no other fragment's


async def test_link_header_without_a_primary_is_the_loader_alone(fragments, start_composer):
    svc = await fragments({"/o": linked("O", '<http://x/o.js>; rel="fragment-script"')})
    composer = await start_composer(page(f'<fragment src="{svc.url("/o")}"></fragment>'), settings=WITH_LOADER,
                                    folder="one")
    resp, _ = await composer.get("/page")
    assert resp.headers["link"] == f'<{LOADER}>; rel="preload"; as="script"'
    none = await start_composer(page("<script>var x;</script>"), settings=WITH_LOADER, folder="none")
    resp, body = await none.get("/page")
    assert "link" not in resp.headers and "var Pipe=" in body  # no fragment: no loader entry (Tailor's rule)


async def test_link_header_has_no_loader_entry_for_a_file_loader(fragments, start_composer, tmp_path):
    svc = await fragments({"/p": linked("P", '<http://x/p.js>; rel="fragment-script"')})
    composer = await start_composer(page(f'<fragment primary src="{svc.url("/p")}"></fragment>'),
                                    settings=COMPAT + '      tailor: {amd_loader_url: "file://loader.js"}\n',
                                    files={"loader.js": "var require = function () {};"})
    resp, _ = await composer.get("/page")
    assert resp.headers["link"] == '<http://x/p.js>; rel="preload"; as="script"'


async def test_link_header_escapes_the_loader_url(fragments, start_composer):
    svc = await fragments({"/o": html("O")})
    composer = await start_composer(page(f'<fragment src="{svc.url("/o")}"></fragment>'),
                                    settings=COMPAT + '      tailor: {amd_loader_url: "/js/re>q\\"ü.js?a=1,2"}\n')
    resp, _ = await composer.get("/page")
    assert resp.headers["link"] == '</js/re%3Eq%22%C3%BC.js?a=1,2>; rel="preload"; as="script"'


# ---------------------------------------------------------------- async stylesheets, once per page

async def test_load_css_is_not_repeated_for_a_stylesheet_already_on_the_page(fragments, start_composer):
    svc = await fragments({"/s": linked("S", '<http://x/shared.css>; rel="stylesheet"'),
                           "/a1": linked("A1", '<http://x/shared.css>; rel="stylesheet", <http://x/own.css>; '
                                         'rel="stylesheet"', ),
                           "/a2": html("A2", delay=0.2, headers={"link": '<http://x/own.css>; rel="stylesheet"'})})
    composer = await start_composer(page(f'<fragment src="{svc.url("/s")}"></fragment>'
                                         f'<fragment async src="{svc.url("/a1")}"></fragment>'
                                         f'<fragment async src="{svc.url("/a2")}"></fragment>'),
                                    settings=TAILOR_P + "        max_asset_links: 2\n")
    _, body = await composer.get("/page")
    assert body.count("http://x/shared.css") == 1 and '<link rel="stylesheet" href="http://x/shared.css">' in body
    assert body.count("http://x/own.css") == 1
    assert without_pipe(body).endswith(
        '<script>p.loadCSS("http://x/own.css")</script><script data-pipe>p.start(2)</script>A1'
        "<script data-pipe>p.end(2)</script><script data-pipe>p.start(4)</script>A2"
        "<script data-pipe>p.end(4)</script></body></html>")


# ---------------------------------------------------------------- lookup pages are enumerated as routes are

LOOKUP_MANIFEST = """
    settings:
      client_signals: true
    routes:
      - name: pages
        match: {{path_prefix: /}}
        template_lookup: true
    fragments:
      footer:
        owner: team-x
        versions: {{"1.0.0": "{svc}/footer"}}
        active: "1.0.0"
        fallback: "{svc}/static"
"""


async def test_template_lookup_pages_count_wherever_templates_are_enumerated(fragments, start_composer, tmp_path):
    """Circuits, the manifest fallback's prefetch, metrics and client-signal labels see a lookup
    route's pages (`RouteTable.templates`), not only routes with a `template`."""
    svc = await fragments({"/footer": html("F"), "/static": html("S"), "/h": html("H")})
    templates = {"index.html": '<html><head></head><body><fragment name="footer"></fragment></body></html>',
                 "a.html": f'<html><head></head><body><fragment id="hdr" src="{svc.url("/h")}"></fragment>'
                           '</body></html>'}
    routes = LOOKUP_MANIFEST.format(svc=svc.url("").rstrip("/"))
    (tmp_path / "table").mkdir()
    table = load(write_config(tmp_path / "table", templates, routes=routes))
    assert [(route.name, template.name) for route, template in table.templates()] == \
        [("pages", "a.html"), ("pages", "index.html")]  # `/` is `/index`: once
    assert set(Labels(table).routes["pages"].fragments) == {"hdr", "footer"}
    assert [path for _, _, path in _targets(table)] == ["/a", "/index"]  # `composer manifest smoke` composes them

    composer = await start_composer(templates, routes=routes)
    await eventually(lambda: asyncio.sleep(0, svc.hits.get("/static") == 1), "the fallback prefetched")
    metrics = await composer.metrics()
    for fragment in ("hdr", "footer"):
        assert f'composer_fragment_timeout_seconds{{fragment="{fragment}",route="pages"}}' in metrics, fragment
    resp, _ = await composer.get("/a")
    assert resp.status == 200
    pipeline = composer.server._composer.pipeline
    pipeline.apply(table)  # as a reload does: the circuit of a lookup page's fragment is kept
    assert [b.fragment for b in pipeline.breakers.all()] == ["hdr"]
