"""Security requirements end to end: the origin allowlist, request and resource limits, the
page deadline, fragment response headers, and validation of the settings that bound them.

Everything runs on 127.0.0.1: real fragment services (`fragments`), a real composer
(`start_composer`), raw sockets for requests no well-behaved client would send, and the
real `composer check` for config errors. An "evil" service listens beside the fragment
service in the origin tests, so a request that leaves its origin would be seen, not
assumed away by a DNS name that does not resolve.
"""

from __future__ import annotations

import asyncio
import gzip
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import FragmentServer, html
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from composer import load
from composer.breaker import DEFAULT_POLICY, BreakerPolicy
from composer.config import load_config
from composer.errors import ConfigError
from composer.routing import build_table
from composer.template import UrlTemplate

CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=8)  # a broken composer fails a test, never hangs it


# ----------------------------------------------------------------------------- helpers


async def exchange(port: int, request: bytes) -> tuple[int, bytes]:
    """Write `request` byte for byte (it should say `Connection: close`); (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        try:
            await writer.drain()
        except ConnectionError:
            pass  # refused before everything was read; the answer is still there
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.", b"HTTP/0.9 ")), data[:200]
    return int(head.split()[1]), body


def raw_get(target: bytes, *headers: bytes) -> bytes:
    return b"\r\n".join([b"GET " + target + b" HTTP/1.1", b"Host: 127.0.0.1", *headers,
                         b"Connection: close"]) + b"\r\n\r\n"


def samples(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called `name` whose labels include `labels` (0 when none)."""
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def config_problems(path: Path) -> list[str]:
    """Every problem of routes.yaml at `path`, its manifest and templates (loading must fail)."""
    with pytest.raises(ConfigError) as info:
        load(path)
    return info.value.problems


def one_problem(problems: list[str], label: Path | str, line: int, *words: str) -> str:
    """There is exactly one problem, it is `label:line: ...`, and it says each of `words`."""
    assert len(problems) == 1, problems
    problem = problems[0]
    assert problem.startswith(f"{label}:{line}: "), (problem, f"{label}:{line}: ")
    for word in words:
        assert word in problem, (word, problem)
    return problem


def write(tmp_path: Path, routes: str, templates: dict[str, str] | None = None,
          files: dict[str, str] | None = None) -> Path:
    """routes.yaml exactly as given (line numbers as written) plus templates and other files."""
    (tmp_path / "templates").mkdir(exist_ok=True)
    for name, text in (templates or {"page.html": "<p>page</p>\n"}).items():
        (tmp_path / "templates" / name).write_text(text, encoding="utf-8")
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    path = tmp_path / "routes.yaml"
    path.write_text(routes, encoding="utf-8")
    return path


PAGE_ROUTE = """\
routes:
  - name: page
    match: {path: "/p/{sku}"}
    template: page.html
"""


# ============================================================================ 1. allowed_origins at load

ALLOW_LOOPBACK = 'settings:\n  allowed_origins: ["http://127.0.0.1:*"]\n'


@pytest.mark.parametrize(("attrs", "word"), [
    ('src="http://localhost:8080/x"', "src"),                              # another host
    ('src="https://127.0.0.1:8443/x"', "src"),                             # another scheme
    ('src="http://127.0.0.10:8080/x"', "src"),                             # a longer address
    ('src="http://127.0.0.1.evil.example/x"', "src"),                      # the allowed host as a prefix
    ('src="http://127.0.0.1:80@evil.example/x"', "src"),                   # userinfo that looks like it
    ('src="http://127.0.0.1:1/ok" fallback-src="http://evil.example/fb"', "fallback-src"),
    ('src="http://evil.example/p/{sku}"', "src"),                           # a param does not excuse it
])
def test_fragment_url_outside_allowed_origins_is_a_template_error(tmp_path, attrs, word):
    template = "<html><body>\n<p>x</p>\n<fragment " + attrs + "></fragment>\n</body></html>\n"
    path = write(tmp_path, ALLOW_LOOPBACK + PAGE_ROUTE, {"page.html": template})
    one_problem(config_problems(path), tmp_path / "templates" / "page.html", 3, word,
                "outside settings.allowed_origins")


@pytest.mark.parametrize("src", [
    "http://{sku}.127.0.0.1:1/x", "http://127.0.0.1:{sku}/x", "http://{sku}@127.0.0.1:1/x", "{sku}",
])
def test_a_param_in_the_origin_is_a_template_error(tmp_path, src):
    template = f'<body>\n<fragment src="{src}"></fragment>\n</body>\n'
    path = write(tmp_path, ALLOW_LOOPBACK + PAGE_ROUTE, {"page.html": template})
    one_problem(config_problems(path), tmp_path / "templates" / "page.html", 2, "src")


def test_globs_allow_any_port_of_the_allowed_host(tmp_path):
    template = ('<body>\n<fragment src="http://127.0.0.1:1/a/{sku}"></fragment>\n'
                '<fragment src="http://127.0.0.1:65535/b?x={sku}" fallback-src="http://127.0.0.1/c"></fragment>\n'
                "</body>\n")
    path = write(tmp_path, ALLOW_LOOPBACK + PAGE_ROUTE, {"page.html": template})
    table = load(path)
    (route,) = table.routes
    assert route.template is not None
    assert [f.src.origin for f in route.template.fragments] == ["http://127.0.0.1:1", "http://127.0.0.1:65535"]


MANIFEST_ROUTES = """\
settings:
  allowed_origins: ["http://127.0.0.1:*"]
fragments:
  footer:
    owner: web
    versions:
      "1.0.0": "http://127.0.0.1:9101/footer/1"
      "2.0.0": "http://footer.evil.example/2"
    active: "1.0.0"
    fallback: "http://127.0.0.1:9101/fallback"
  header:
    versions: {"1.0.0": "http://127.0.0.1:9101/header"}
    active: "1.0.0"
    fallback: "https://127.0.0.1:9101/static"
""" + PAGE_ROUTE


def test_manifest_versions_and_fallbacks_in_routes_yaml_outside_allowed_origins(tmp_path):
    path = write(tmp_path, MANIFEST_ROUTES)
    problems = config_problems(path)
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"{path}:8: fragment 'footer' version '2.0.0': ")
    assert problems[1].startswith(f"{path}:14: fragment 'header' fallback: ")
    assert all("outside settings.allowed_origins" in p for p in problems)


def test_manifest_file_urls_outside_allowed_origins(tmp_path):
    manifest = ("fragments:\n"                                             # 1
                "  footer:\n"                                              # 2
                "    versions:\n"                                          # 3
                '      "1.0.0": "http://127.0.0.1:9101/footer"\n'          # 4
                '      "1.1.0": "http://localhost:9101/footer"\n'          # 5
                '    active: "1.0.0"\n'                                    # 6
                '    fallback: "http://evil.example/footer"\n')           # 7
    path = write(tmp_path, ALLOW_LOOPBACK + "  manifest: manifest.yaml\n" + PAGE_ROUTE,
                 files={"manifest.yaml": manifest})
    problems = config_problems(path)
    label = tmp_path / "manifest.yaml"
    assert [p.partition(": ")[0] for p in problems] == [f"{label}:5", f"{label}:7"], problems
    assert all("outside settings.allowed_origins" in p for p in problems)


@pytest.mark.parametrize("backend", [
    "http://localhost:9001", "https://127.0.0.1:9001", "http://127.0.0.2:9001", "http://127.0.0.1.nip.io:9001",
])
def test_backend_outside_allowed_origins(tmp_path, backend):
    routes = (ALLOW_LOOPBACK + "routes:\n"
              "  - name: api\n"                        # 4
              "    match: {path_prefix: /api}\n"       # 5
              f"    backend: {backend}\n")             # 6
    path = write(tmp_path, routes)
    one_problem(config_problems(path), path, 6, "backend", "allowed_origins")


def test_composer_check_reports_every_origin_problem_with_its_line(tmp_path):
    routes = (ALLOW_LOOPBACK +                                          # 1-2
              "fragments:\n"                                            # 3
              "  footer:\n"                                             # 4
              '    versions: {"1.0.0": "http://evil.example/f"}\n'      # 5
              '    active: "1.0.0"\n'                                   # 6
              "routes:\n"                                               # 7
              "  - name: api\n"                                         # 8
              "    match: {path_prefix: /api}\n"                        # 9
              "    backend: http://evil.example\n"                      # 10
              "  - name: page\n"                                        # 11
              "    match: {path: /page}\n"                              # 12
              "    template: page.html\n")                              # 13
    template = ('<body>\n<fragment src="http://127.0.0.1:9/ok"></fragment>\n'
                '<fragment src="http://evil.example/x"></fragment>\n'
                '<fragment src="http://127.0.0.1:9/y" fallback-src="https://127.0.0.1:9/fb"></fragment>\n</body>\n')
    write(tmp_path, routes, {"page.html": template})
    result = subprocess.run([sys.executable, "-m", "composer", "check", "--config", "routes.yaml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    where = [line.split(": ", 1)[0] for line in lines]
    page = str(Path("templates") / "page.html")
    assert sorted(where) == sorted(["routes.yaml:5", "routes.yaml:10", f"{page}:3", f"{page}:4"]), result.stderr
    assert all("allowed_origins" in line for line in lines), result.stderr


# ============================================================================ 1. origins at run time

async def catch_all(svc_factory) -> FragmentServer:
    """A service answering every GET with `<p>F</p>` (and recording it)."""
    async def handler(_: web.Request) -> web.Response:
        return web.Response(text="<p>F</p>", content_type="text/html")
    return await svc_factory({r"/{tail:[\s\S]*}": handler})


async def origin_composer(fragments, start_composer):
    """A fragment service, an evil service, and composer allowed only the first.

    /p/{sku} (one segment) and /r/{rest:.*} (any path) put the param in the path and query.
    """
    svc, evil = await catch_all(fragments), await catch_all(fragments)
    base = f"http://127.0.0.1:{svc.server.port}"
    composer = await start_composer(
        {"p.html": f'<body><fragment src="{base}/f/{{sku}}?q={{sku}}"><i>inline</i></fragment></body>',
         "r.html": f'<body><fragment src="{base}/g/{{rest}}?q={{rest}}&v=1"></fragment></body>'},
        routes="""
            routes:
              - name: p
                match: {path: "/p/{sku}"}
                template: p.html
              - name: r
                match: {path: "/r/{rest:.*}"}
                template: r.html
        """,
        settings=f'settings:\n  allowed_origins: ["{base}"]\n')
    return composer, svc, evil


EVIL = "127.0.0.1:EVILPORT"  # replaced by the evil service's address in each case

# (raw request target, the raw path + query the fragment service must receive; None: 400, nothing fetched)
PARAM_CASES = [
    ("/p/plain-1", "/f/plain-1?q=plain-1"),
    ("/p/a..b", "/f/a..b?q=a..b"),
    ("/p/a%2Fb", "/f/a%2Fb?q=a%2Fb"),
    ("/p/a%2fb", "/f/a%2Fb?q=a%2Fb"),
    ("/p/%252F", "/f/%252F?q=%252F"),                                     # decoded once, never twice
    ("/p/%25", "/f/%25?q=%25"),
    ("/p/a%3Fx=1", "/f/a%3Fx%3D1?q=a%3Fx%3D1"),
    ("/p/a?x=1", "/f/a?q=a"),                                              # the page's own query stays out
    ("/p/a%26v%3D2", "/f/a%26v%3D2?q=a%26v%3D2"),
    ("/p/a%23b", "/f/a%23b?q=a%23b"),
    ("/p/a#b", "/f/a%23b?q=a%23b"),
    (f"/p/@{EVIL}", "/f/%40127.0.0.1%3AEVILPORT?q=%40127.0.0.1%3AEVILPORT"),
    (f"/p/user:pw@{EVIL}", "/f/user%3Apw%40127.0.0.1%3AEVILPORT?q=user%3Apw%40127.0.0.1%3AEVILPORT"),
    (f"/p/%2F%2F{EVIL}%2Fx", "/f/%2F%2F127.0.0.1%3AEVILPORT%2Fx?q=%2F%2F127.0.0.1%3AEVILPORT%2Fx"),
    (f"/p/http:%2F%2F{EVIL}%2F", "/f/http%3A%2F%2F127.0.0.1%3AEVILPORT%2F?q=http%3A%2F%2F127.0.0.1%3AEVILPORT%2F"),
    (f"/p/%5C%5C{EVIL}", "/f/%5C%5C127.0.0.1%3AEVILPORT?q=%5C%5C127.0.0.1%3AEVILPORT"),
    ("/p/a%20X-Injected:%201", "/f/a%20X-Injected%3A%201?q=a%20X-Injected%3A%201"),
    ("/p/caf%C3%A9", "/f/caf%C3%A9?q=caf%C3%A9"),
    ("/p/%EF%BC%8E%EF%BC%8E", "/f/%EF%BC%8E%EF%BC%8E?q=%EF%BC%8E%EF%BC%8E"),  # fullwidth dots stay text
    ("/p/%E2%80%AEevil", "/f/%E2%80%AEevil?q=%E2%80%AEevil"),
    ("/p/%ff", "/f/%EF%BF%BD?q=%EF%BF%BD"),                                # not UTF-8: replaced, still quoted
    (f"/r//{EVIL}/x", "/g/%2F127.0.0.1%3AEVILPORT%2Fx?q=%2F127.0.0.1%3AEVILPORT%2Fx&v=1"),
    (f"/r/http://{EVIL}/", "/g/http%3A%2F%2F127.0.0.1%3AEVILPORT%2F?q=http%3A%2F%2F127.0.0.1%3AEVILPORT%2F&v=1"),
    ("/r/a/b", "/g/a%2Fb?q=a%2Fb&v=1"),
    ("/r/a%2Fb?x#y", "/g/a%2Fb?q=a%2Fb&v=1"),
    # Dot segments and control characters: the request guard answers 400 before anything is fetched.
    ("/p/..", None), ("/p/.", None), ("/p/%2e", None), ("/p/%2E%2E", None), ("/p/..%2F", None),
    ("/p/%2f..%2f", None), ("/p/a%2F..%2F..%2Fadmin", None), ("/p/..%5C", None), ("/r/a/../b", None),
    ("/r/../x", None), ("/r/a/..%2fb", None), ("/r/..\\x", None), ("/p/a%0d%0aX-Injected:%201", None),
    ("/p/a%0D%0A", None), ("/p/a%00b", None), ("/p/a%09b", None), ("/p/..;x", None), ("/r/a/..;/b", None),
    ("/p/a;x", "/f/a%3Bx?q=a%3Bx"),
]


@pytest.mark.parametrize(("target", "expected"), PARAM_CASES, ids=[c[0] for c in PARAM_CASES])
async def test_a_param_value_never_changes_the_origin(fragments, start_composer, target, expected):
    composer, svc, evil = await origin_composer(fragments, start_composer)
    port = str(evil.server.port)
    status, body = await exchange(composer.server.port, raw_get(target.replace("EVILPORT", port).encode()))
    assert evil.requests == []
    if expected is None:
        assert status == 400
        assert svc.requests == []
    else:
        assert status == 200
        assert b"<p>F</p>" in body
        assert [r.raw_path for r in svc.requests] == [expected.replace("EVILPORT", port)]
        assert all(r.host == f"127.0.0.1:{svc.server.port}" for r in svc.requests)


@pytest.mark.parametrize("request_bytes", [
    b"GET /p/a\r\n\r\n",                                                      # HTTP/0.9
    b"GET /p/a\r\nHost: 127.0.0.1:EVILPORT\r\n\r\n",                        # raw CR LF in the target
    b"GET /p/a\r\nX-Injected: 1 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    b"GET /p/caf\xc3\xa9 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",   # raw UTF-8 bytes
    b"GET /p/a b HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    b"GET http://127.0.0.1:EVILPORT/x HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
], ids=["http-0.9", "crlf", "crlf-header", "raw-utf8", "space", "absolute-form"])
async def test_malformed_targets_are_refused_and_fetch_nothing(fragments, start_composer, request_bytes):
    composer, svc, evil = await origin_composer(fragments, start_composer)
    request_bytes = request_bytes.replace(b"EVILPORT", str(evil.server.port).encode())
    status, _ = await exchange(composer.server.port, request_bytes)
    assert 400 <= status < 500
    await asyncio.sleep(0.05)
    assert svc.requests == [] and evil.requests == []


def test_keeps_origin_refuses_a_rendered_url_on_another_origin():
    template = UrlTemplate.parse("http://127.0.0.1:8001/p/{sku}?q={sku}")
    assert template.origin == "http://127.0.0.1:8001"
    assert template.keeps_origin(URL("http://127.0.0.1:8001/p/x?q=x"))
    for other in ("http://evil.example/p/x", "http://127.0.0.1:8002/p/x", "https://127.0.0.1:8001/p/x",
                  "http://127.0.0.2:8001/p/x", "http://127.0.0.1/p/x", "http://user@evil.example:8001/p/x"):
        assert not template.keeps_origin(URL(other)), other
    # What `render` makes of hostile values always keeps the origin (the check is defence in depth).
    for value in ("../x", "..", ".", "%2F", "%2f..%2f", "?a=b", "#x", "@evil.example", "\r\nX: 1", "%0d%0a",
                  "//evil", "http://evil/", "\\\\evil", "évil", "ｅｖｉｌ．ｅｘａｍｐｌｅ", ":8002", "[::1]"):
        url = template.render({"sku": value})
        assert template.keeps_origin(url), (value, url)
        assert url.raw_path.startswith("/p/") and url.raw_path.count("/") == 2, (value, url)
        assert url.query.getall("q") == [value], (value, url)
    default_port = UrlTemplate.parse("https://a.example.com/{x}")
    assert default_port.keeps_origin(URL("https://a.example.com:443/y"))
    assert not default_port.keeps_origin(URL("https://a.example.com:8443/y"))


async def test_a_rendered_url_off_its_origin_fails_closed(fragments, start_composer):
    """Were quoting ever broken, compose's own check refuses the URL: reason `invalid`, nothing
    fetched, the inline fallback shown. (Simulated by making the loaded template render
    elsewhere while its origin stays the allowed one: `template` is compiled, so its class
    cannot be monkeypatched, but a frozen instance can still be changed by force.)"""
    composer, svc, evil = await origin_composer(fragments, start_composer)
    (src,) = [f.src for _, t in composer.server.table.templates() for f in t.fragments if "/f/" in f.src.parts[0]]
    object.__setattr__(src, "parts", (f"http://127.0.0.1:{evil.server.port}/stolen",))
    assert str(src.render({"sku": "x"})) == f"http://127.0.0.1:{evil.server.port}/stolen"
    status, body = await exchange(composer.server.port, raw_get(b"/p/x"))
    assert status == 200
    assert b"<i>inline</i>" in body
    assert evil.requests == [] and svc.requests == []
    metrics = await composer.metrics()
    assert samples(metrics, "composer_fragment_failures_total", route="p", reason="invalid") == 1


# ============================================================================ 2. limits

async def test_request_line_and_header_limits(fragments, start_composer):
    svc = await catch_all(fragments)
    composer = await start_composer({"p.html": f'<body><fragment src="{svc.url("/f")}"></fragment></body>'},
                                    routes="routes:\n  - {name: ok, match: {path: /ok}, template: p.html}\n")
    port = composer.server.port
    # Under the limits: answered normally (404 off-route, 200 on it).
    assert (await exchange(port, raw_get(b"/x/" + b"a" * 8000)))[0] == 404
    assert (await exchange(port, raw_get(b"/ok", b"X-Big: " + b"a" * 8000)))[0] == 200
    assert (await exchange(port, raw_get(b"/ok", *(b"X-H%d: 1" % i for i in range(100)))))[0] == 200
    svc.requests.clear()
    # Over: refused by the parser, before routing, and nothing is fetched.
    for request in (raw_get(b"/ok/" + b"a" * 9000), raw_get(b"/ok?" + b"q" * 9000),
                    raw_get(b"/ok", b"X-Big: " + b"a" * 9000), raw_get(b"/ok", b"X-" + b"n" * 9000 + b": 1"),
                    raw_get(b"/ok", *(b"X-H%d: 1" % i for i in range(200)))):
        status, _ = await exchange(port, request)
        assert status in (400, 414, 431), request[:60]
        resp, body = await composer.get("/ok", timeout=CLIENT_TIMEOUT)  # still up
        assert resp.status == 200 and "<p>F</p>" in body
    assert [r.path for r in svc.requests] == ["/f"] * 5


def fragment_lines(count: int) -> str:
    return "<html><body>\n" + "".join(f'<fragment src="http://127.0.0.1:9/f{i}"></fragment>\n'
                                      for i in range(count)) + "</body></html>\n"


@pytest.mark.parametrize(("settings", "limit"), [("", 100), ("settings:\n  max_fragments_per_template: 3\n", 3)])
def test_max_fragments_per_template(tmp_path, settings, limit):
    page = tmp_path / "templates" / "page.html"
    path = write(tmp_path, settings + PAGE_ROUTE, {"page.html": fragment_lines(limit)})
    table = build_table(load_config(path))
    assert len(table.routes[0].template.fragments) == limit
    for count in (limit + 1, limit + 4):
        write(tmp_path, settings + PAGE_ROUTE, {"page.html": fragment_lines(count)})
        with pytest.raises(ConfigError) as info:
            build_table(load_config(path))
        # line 1 is <html><body>: fragment n (1-based) is on line n + 1; the first extra is limit + 1
        one_problem(info.value.problems, page, limit + 2, "max_fragments_per_template", str(limit))


async def test_max_connections_per_origin(fragments, start_composer):
    active, most_active, most_open = 0, 0, 0
    transports: set[asyncio.BaseTransport] = set()

    async def slow(request: web.Request) -> web.Response:
        nonlocal active, most_active, most_open
        assert request.transport is not None
        transports.add(request.transport)
        active += 1
        most_active = max(most_active, active)
        most_open = max(most_open, sum(1 for t in transports if not t.is_closing()))
        try:
            await asyncio.sleep(0.25)
        finally:
            active -= 1
        return web.Response(text=f"<p>{request.match_info['n']}</p>", content_type="text/html")

    svc = await fragments({"/f/{n}": slow})
    composer = await start_composer(
        {"page.html": f'<body><fragment src="{svc.url("/f/")}{{sku}}"></fragment></body>'},
        routes=PAGE_ROUTE, settings="settings:\n  max_connections_per_origin: 2\n")
    started = time.monotonic()
    pages = await asyncio.gather(*(composer.get(f"/p/{n}", timeout=CLIENT_TIMEOUT) for n in range(6)))
    elapsed = time.monotonic() - started
    for n, (resp, body) in enumerate(pages):
        assert resp.status == 200 and f"<p>{n}</p>" in body, body
    assert len(svc.requests) == 6
    assert most_active == 2 and most_open <= 2, (most_active, most_open)
    assert elapsed >= 0.7  # three rounds of two, not one round of six


async def test_default_origin_limit_lets_a_burst_of_pages_fetch_at_once(fragments, start_composer):
    # Sixteen pages of twenty fragments want 320 fetches of one origin at once; the old default
    # of 256 queued 64 of them behind the others. Each fragment answers only once all 320 are in
    # (or after 5 s, past the 3 s fragment timeout: a limit below 320 fails the pages' bodies).
    wanted = 16 * 20
    active, most_active = 0, 0
    everyone = asyncio.Event()

    async def gathered(request: web.Request) -> web.Response:
        nonlocal active, most_active
        active += 1
        most_active = max(most_active, active)
        if active == wanted:
            everyone.set()
        try:
            await asyncio.wait_for(everyone.wait(), 5)
        except TimeoutError:
            pass
        finally:
            active -= 1
        return web.Response(text=f"<p>{request.match_info['n']}</p>", content_type="text/html")

    svc = await fragments({"/f/{n}": gathered})
    tags = "".join(f'<fragment id="f{i}" src="{svc.url(f"/f/{i}")}"><i>late</i></fragment>' for i in range(20))
    composer = await start_composer({"page.html": f"<body>{tags}</body>"}, routes=PAGE_ROUTE)
    pages = await asyncio.gather(*(composer.get(f"/p/{n}", timeout=CLIENT_TIMEOUT) for n in range(16)))
    assert most_active == wanted, most_active
    for resp, body in pages:
        assert resp.status == 200 and "late" not in body and "<p>19</p>" in body, body


async def test_page_timeout_cuts_every_fragment_at_the_deadline(fragments, start_composer):
    def stalling(body: str):
        async def handler(request: web.Request) -> web.Response:
            for _ in range(300):  # 3 s, unless composer hangs up first (keeps teardown quick)
                if request.transport is None or request.transport.is_closing():
                    break
                await asyncio.sleep(0.01)
            return web.Response(text=body, content_type="text/html")
        return handler

    async def broken(_: web.Request) -> web.Response:
        return web.Response(status=503, text="down")

    svc = await fragments({"/a": stalling("<p>A</p>"), "/b": stalling("<p>B</p>"), "/c": stalling("<p>C</p>"),
                           "/fb": stalling("<p>FB</p>"), "/e": broken, "/fe": stalling("<p>FE</p>"),
                           "/ok": html("<p>OK</p>")})
    composer = await start_composer({"page.html": f"""\
        <html><body>
        <fragment id="a" src="{svc.url('/a')}" timeout="5000"><i>inline-a</i></fragment>
        <fragment id="b" src="{svc.url('/b')}" fallback-src="{svc.url('/fb')}" timeout="4000"><i>inline-b</i></fragment>
        <fragment id="c" src="{svc.url('/c')}" async><i>inline-c</i></fragment>
        <fragment id="e" src="{svc.url('/e')}" fallback-src="{svc.url('/fe')}" timeout="4000"><i>inline-e</i></fragment>
        <fragment id="ok" src="{svc.url('/ok')}"></fragment>
        </body></html>
    """}, routes=PAGE_ROUTE, settings="settings:\n  page_timeout_ms: 500\n  fragment_timeout_ms: 3000\n")
    started = time.monotonic()
    resp, body = await composer.get("/p/1", timeout=CLIENT_TIMEOUT)
    elapsed = time.monotonic() - started
    assert resp.status == 200
    assert 0.45 <= elapsed < 0.5 + 0.3, elapsed
    for marker in ("<i>inline-a</i>", "<i>inline-b</i>", "<i>inline-c</i>", "<i>inline-e</i>", "<p>OK</p>"):
        assert marker in body, (marker, body)
    for marker in ("<p>A</p>", "<p>B</p>", "<p>C</p>", "<p>FB</p>", "<p>FE</p>"):
        assert marker not in body
    # b's src ran into the deadline: its fallback-src would start after it, so it is never asked for.
    # e failed at once: its fallback-src was asked for, and cut at the deadline.
    assert svc.hits.get("/fb", 0) == 0
    assert svc.hits.get("/fe") == 1
    metrics = await composer.metrics()
    for fragment in ("a", "b", "c"):
        assert samples(metrics, "composer_fragment_failures_total", fragment=fragment, reason="timeout") == 1
    assert samples(metrics, "composer_fragment_failures_total", fragment="e", reason="status") == 1
    assert samples(metrics, "composer_fragment_failures_total", fragment="ok") == 0


# ============================================================================ 3. fragment response headers

JUNK_HEADERS = {
    "Cache-Control": "public, max-age=600",
    "Content-Security-Policy": "default-src 'none'; script-src https://evil.example",
    "X-Frame-Options": "ALLOW-FROM https://evil.example",
    "Access-Control-Allow-Origin": "https://evil.example",
    "Access-Control-Allow-Credentials": "true",
    "Strict-Transport-Security": "max-age=0",
    "X-Whatever": "from-the-fragment",
    "Server": "fragment-server/1.0",
    "Vary": "X-Fragment",
    "ETag": '"fragment-etag"',
    "Last-Modified": "Wed, 21 Oct 2015 07:28:00 GMT",
    "Expires": "Thu, 01 Jan 2099 00:00:00 GMT",
    "Content-Language": "x-fragment",
    "Content-Disposition": "attachment; filename=fragment.html",
    "Refresh": "0; url=https://evil.example/",
    "Link": '<https://evil.example/>; rel="preconnect"',
    "X-Request-Id": "fragment-request-id",
    "Connection": "keep-alive, X-Whatever",
}
PAGE_HEADERS = {"content-type": "text/html; charset=utf-8",
                "cache-control": "no-cache, no-store, must-revalidate"}


def junk(body: str, *, status: int = 200, cookie: str, location: str | None = None, gzipped: bool = False,
         chunked: bool = False):
    async def handler(_: web.Request) -> web.StreamResponse:
        data = gzip.compress(body.encode()) if gzipped else body.encode()
        resp = web.StreamResponse(status=status, headers=JUNK_HEADERS)
        resp.content_type = "text/html"
        resp.headers.add("Set-Cookie", cookie)
        if location is not None:
            resp.headers["Location"] = location
        if gzipped:
            resp.headers["Content-Encoding"] = "gzip"
        if chunked:
            resp.enable_chunked_encoding()
        else:
            resp.content_length = len(data)
        await resp.prepare(_)
        await resp.write(data)
        await resp.write_eof()
        return resp
    return handler


def page_header_names(resp: aiohttp.ClientResponse) -> set[str]:
    return {name.lower() for name in resp.headers}


async def test_fragment_response_headers_never_reach_the_page(fragments, start_composer):
    svc = await fragments({
        "/primary": junk("<main>P</main>", cookie="session=primary; Path=/", gzipped=True),
        "/other": junk("<nav>O</nav>", cookie="tracker=other; Path=/", location="https://evil.example/o",
                       chunked=True),
        "/async": junk("<aside>A</aside>", cookie="tracker=async", location="https://evil.example/a"),
        "/moved": junk("", status=301, cookie="tracker=moved", location="https://evil.example/m"),
    })
    composer = await start_composer({"page.html": f"""\
        <html><body>
        <fragment src="{svc.url('/other')}"></fragment>
        <fragment src="{svc.url('/primary')}" primary></fragment>
        <fragment src="{svc.url('/moved')}"><i>moved-inline</i></fragment>
        <fragment src="{svc.url('/async')}" async></fragment>
        </body></html>
    """}, routes=PAGE_ROUTE)
    for method in ("GET", "HEAD"):
        async with composer.session.request(method, composer.url + "/p/1", allow_redirects=False,
                                            timeout=CLIENT_TIMEOUT) as resp:
            body = await resp.text()
        assert resp.status == 200
        assert page_header_names(resp) <= {"content-type", "cache-control", "transfer-encoding", "date", "server",
                                           "set-cookie", "server-timing"}, dict(resp.headers)
        assert resp.headers["server-timing"].startswith('primary;dur=')  # composer's own, not a fragment's
        for name, value in PAGE_HEADERS.items():
            assert resp.headers.getall(name) == [value]
        assert resp.headers.getall("set-cookie") == ["session=primary; Path=/"]
        assert resp.headers.get("server", "").lower() != "fragment-server/1.0"
        assert "content-encoding" not in resp.headers and "content-length" not in resp.headers
        if method == "GET":
            assert resp.headers["transfer-encoding"] == "chunked"
            for marker in ("<main>P</main>", "<nav>O</nav>", "<aside>A</aside>", "<i>moved-inline</i>"):
                assert marker in body


async def test_a_primary_redirect_passes_only_location_and_set_cookie(fragments, start_composer):
    svc = await fragments({
        "/primary": junk("moved", status=302, cookie="session=primary; Path=/", location="/elsewhere"),
        "/other": junk("<nav>O</nav>", cookie="tracker=other", location="https://evil.example/o"),
    })
    composer = await start_composer({"page.html": f"""\
        <html><body>
        <fragment src="{svc.url('/other')}"></fragment>
        <fragment src="{svc.url('/primary')}" primary></fragment>
        </body></html>
    """}, routes=PAGE_ROUTE)
    resp, body = await composer.get("/p/1", timeout=CLIENT_TIMEOUT)
    assert resp.status == 302 and body == ""
    assert page_header_names(resp) <= {"cache-control", "content-length", "date", "server", "location",
                                       "set-cookie", "server-timing"}, dict(resp.headers)
    assert resp.headers.getall("location") == ["/elsewhere"]
    assert resp.headers.getall("set-cookie") == ["session=primary; Path=/"]
    assert resp.headers.getall("cache-control") == [PAGE_HEADERS["cache-control"]]
    assert resp.headers.get("content-length", "0") == "0"


# ============================================================================ 4. validating the new settings

SETTINGS_HEAD = 'settings:\n  allowed_origins: ["http://127.0.0.1:*"]\n'   # lines 1-2; the case starts on line 3

SETTINGS_CASES = [
    ("page_timeout_ms: 0", 3, "settings.page_timeout_ms must be between 1 and 600000"),
    ("page_timeout_ms: -5", 3, "settings.page_timeout_ms must be between"),
    ("page_timeout_ms: 600001", 3, "settings.page_timeout_ms must be between"),
    ("page_timeout_ms: fast", 3, "settings.page_timeout_ms must be an integer"),
    ("page_timeout_ms: '500'", 3, "settings.page_timeout_ms must be an integer"),
    ("page_timeout_ms: 1.5", 3, "settings.page_timeout_ms must be an integer"),
    ("page_timeout_ms: true", 3, "settings.page_timeout_ms must be an integer"),
    ("page_timeout_ms: [500]", 3, "settings.page_timeout_ms must be an integer"),
    ("page_timeout_ms:", 3, "settings.page_timeout_ms must be an integer"),
    ("max_fragments_per_template: 0", 3, "settings.max_fragments_per_template must be between 1 and 10000"),
    ("max_fragments_per_template: 10001", 3, "settings.max_fragments_per_template must be between"),
    ("max_fragments_per_template: many", 3, "settings.max_fragments_per_template must be an integer"),
    ("max_connections_per_origin: 0", 3, "settings.max_connections_per_origin must be between 1 and 100000"),
    ("max_connections_per_origin: 100001", 3, "settings.max_connections_per_origin must be between"),
    ("max_connections_per_origin: {n: 2}", 3, "settings.max_connections_per_origin must be an integer"),
    ("max_connections_per_origin: yes", 3, "settings.max_connections_per_origin must be an integer"),
    ("cache: {max_bytes: -1}", 3, "settings.cache.max_bytes must be between 0 and"),
    ("cache: {max_bytes: 2000000000000}", 3, "settings.cache.max_bytes must be between 0 and"),
    ("cache: {max_bytes: 64MB}", 3, "settings.cache.max_bytes must be an integer"),
    ("cache: {max_bytes: 1.5}", 3, "settings.cache.max_bytes must be an integer"),
    ("cache: {max_entries: 5}", 3, "unknown key 'max_entries' in settings.cache"),
    ("cache: 64", 3, "settings.cache must be a mapping"),
    ("cache:\n    max_bytes: 10\n    ttl_s: 5", 5, "unknown key 'ttl_s' in settings.cache"),
    ("cache:\n    max_bytes: 10\n    max_bytes: 20", 5, "duplicate key 'max_bytes'"),
    ("circuit_breaker: {failures: -1}", 3, "settings.circuit_breaker.failures must be between 0 and 10000"),
    ("circuit_breaker: {failures: 10001}", 3, "settings.circuit_breaker.failures must be between"),
    ("circuit_breaker: {failures: 2.5}", 3, "settings.circuit_breaker.failures must be an integer"),
    ("circuit_breaker: {failure_percent: 101}", 3, "settings.circuit_breaker.failure_percent must be between 0 and 100"),
    ("circuit_breaker: {min_requests: 0}", 3, "settings.circuit_breaker.min_requests must be between 1"),
    ("circuit_breaker: {window_s: 0}", 3, "settings.circuit_breaker.window_s must be between 1 and 3600"),
    ("circuit_breaker: {window_s: 3601}", 3, "settings.circuit_breaker.window_s must be between"),
    ("circuit_breaker: {cooldown_ms: 0}", 3, "settings.circuit_breaker.cooldown_ms must be between 1"),
    ("circuit_breaker: {cooldown_ms: soon}", 3, "settings.circuit_breaker.cooldown_ms must be an integer"),
    ("circuit_breaker: {threshold: 3}", 3, "unknown key 'threshold' in settings.circuit_breaker"),
    ("circuit_breaker: on", 3, "settings.circuit_breaker must be a mapping"),
    ("circuit_breaker: [5]", 3, "settings.circuit_breaker must be a mapping"),
    ("circuit_breaker:\n    failures: 3\n    window_s: -1", 5, "settings.circuit_breaker.window_s must be between"),
    ("circuit_breaker:\n    failures: 3\n    Failures: 4", 5, "unknown key 'Failures' in settings.circuit_breaker"),
    ("circuit_breaker:\n    failures: 3\n    failures: 4", 5, "duplicate key 'failures'"),
    ("server_timing: sometimes", 3, "settings.server_timing must be true or false"),
    ("server_timing: 1", 3, "settings.server_timing must be true or false"),
    ("timing_marks: 'true'", 3, "settings.timing_marks must be true or false"),
    ("timing_marks: [true]", 3, "settings.timing_marks must be true or false"),
    ("timing_marks:", 3, "settings.timing_marks must be true or false"),
]


@pytest.mark.parametrize(("snippet", "line", "message"), SETTINGS_CASES, ids=[c[0] for c in SETTINGS_CASES])
def test_new_settings_are_validated_with_their_line(tmp_path, snippet, line, message):
    path = write(tmp_path, SETTINGS_HEAD + "  " + snippet + "\n" + PAGE_ROUTE)
    with pytest.raises(ConfigError) as info:
        build_table(load_config(path))
    one_problem(info.value.problems, path, line, message)


def test_new_settings_at_their_bounds_load(tmp_path):
    path = write(tmp_path, SETTINGS_HEAD +
                 "  page_timeout_ms: 600000\n  max_fragments_per_template: 10000\n"
                 "  max_connections_per_origin: 1\n  cache: {max_bytes: 0}\n"
                 "  circuit_breaker: {failures: 0, failure_percent: 100, min_requests: 1, window_s: 3600}\n"
                 + PAGE_ROUTE)
    settings = load_config(path).settings
    assert settings.page_timeout_ms == 600_000
    assert settings.max_fragments_per_template == 10_000
    assert settings.max_connections_per_origin == 1
    assert settings.cache_max_bytes == 0
    assert settings.circuit_breaker == BreakerPolicy(failures=0, failure_percent=100, min_requests=1, window_s=3600,
                                                     cooldown_ms=DEFAULT_POLICY.cooldown_ms)
    defaults = load_config(write(tmp_path, PAGE_ROUTE)).settings
    assert (defaults.page_timeout_ms, defaults.max_fragments_per_template, defaults.max_connections_per_origin,
            defaults.cache_max_bytes, defaults.circuit_breaker) == (10_000, 100, 1024, 64 * 1024 * 1024,
                                                                    DEFAULT_POLICY)


ENTRY_HEAD = ("settings:\n"                                          # 1
              '  allowed_origins: ["http://127.0.0.1:*"]\n'          # 2
              "fragments:\n"                                         # 3
              "  footer:\n"                                          # 4
              '    versions: {"1.0.0": "http://127.0.0.1:9/f"}\n'    # 5
              '    active: "1.0.0"\n')                               # 6; the case starts on line 7
ENTRY_CASES = [
    ("circuit_breaker: {failures: -1}", 7, "fragment 'footer': circuit_breaker.failures must be between 0 and 10000"),
    ("circuit_breaker: {failure_percent: 150}", 7, "fragment 'footer': circuit_breaker.failure_percent must be"),
    ("circuit_breaker: {min_requests: x}", 7, "fragment 'footer': circuit_breaker.min_requests must be an integer"),
    ("circuit_breaker: {cooldown_ms: 3600001}", 7, "fragment 'footer': circuit_breaker.cooldown_ms must be between"),
    ("circuit_breaker: {retries: 3}", 7, "unknown key 'retries' in fragment 'footer': circuit_breaker"),
    ("circuit_breaker: 5", 7, "fragment 'footer': circuit_breaker must be a mapping"),
    ("circuit_breaker:\n      failures: 3\n      window_s: 0", 9, "fragment 'footer': circuit_breaker.window_s"),
]


@pytest.mark.parametrize(("snippet", "line", "message"), ENTRY_CASES, ids=[c[0] for c in ENTRY_CASES])
def test_manifest_circuit_breaker_override_in_routes_yaml_is_validated(tmp_path, snippet, line, message):
    path = write(tmp_path, ENTRY_HEAD + "    " + snippet + "\n" + PAGE_ROUTE)
    one_problem(config_problems(path), path, line, message)


@pytest.mark.parametrize(("snippet", "line", "message"), ENTRY_CASES, ids=[c[0] for c in ENTRY_CASES])
def test_manifest_circuit_breaker_override_in_a_manifest_file_is_validated(tmp_path, snippet, line, message):
    manifest = "\n" * 2 + ENTRY_HEAD.partition("fragments:\n")[1] + ENTRY_HEAD.partition("fragments:\n")[2]
    path = write(tmp_path, SETTINGS_HEAD + "  manifest: manifest.yaml\n" + PAGE_ROUTE,
                 files={"manifest.yaml": manifest + "    " + snippet + "\n"})
    one_problem(config_problems(path), tmp_path / "manifest.yaml", line, message)


def test_manifest_circuit_breaker_override_merges_over_the_settings_policy(tmp_path):
    path = write(tmp_path,
                 SETTINGS_HEAD + "  circuit_breaker: {failures: 3, cooldown_ms: 100}\n"
                 + "fragments:\n  footer:\n    versions: {\"1.0.0\": \"http://127.0.0.1:9/f\"}\n"
                 + '    active: "1.0.0"\n    circuit_breaker: {failures: 7, window_s: 30}\n' + PAGE_ROUTE,
                 {"page.html": '<body><fragment name="footer"></fragment>'
                               '<fragment src="http://127.0.0.1:9/plain"></fragment></body>'})
    table = load(path)
    footer, plain = table.routes[0].template.fragments
    base = BreakerPolicy(failures=3, cooldown_ms=100)
    assert plain.breaker == base
    assert footer.breaker == BreakerPolicy(failures=7, window_s=30, cooldown_ms=100)


# ============================================================================ the request guard and backends

@pytest.mark.parametrize("target", ["/api/..;/admin", "/api/..;x=1/admin", "/api/.;/admin", "/api/%2e%2e;/admin",
                                    "/api/a/..;/..;/admin", "/api/..%3B/admin"])
async def test_dot_segments_with_path_parameters_are_refused(fragments, start_composer, target):
    """Servlet containers drop `;params` before normalising, so `/api/..;/admin` is `/admin` to
    a Tomcat backend: a prefix route must not forward it."""
    backend = await catch_all(fragments)
    composer = await start_composer({}, routes=f"""
        routes:
          - name: api
            match: {{path_prefix: /api}}
            backend: http://127.0.0.1:{backend.server.port}
    """)
    status, _ = await exchange(composer.server.port, raw_get(target.encode()))
    assert status == 400
    assert backend.requests == []
    status, _ = await exchange(composer.server.port, raw_get(b"/api/a;b=1/ok"))  # a plain ;param is fine
    assert status == 200
    assert [r.raw_path for r in backend.requests] == ["/api/a;b=1/ok"]
