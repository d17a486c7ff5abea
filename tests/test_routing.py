"""Routing (SPEC §2): predicates, first-match order, 404/405, redirects, config errors,
shadowing warnings, the request guard, routing metrics and a large table.

Everything goes through real sockets on 127.0.0.1: composer from `start_composer`, backends
are real aiohttp servers, malformed requests are written byte for byte on a raw socket.
Redirect routes are the matching probe: route NAME answers `Location: /hit/NAME`, so the
Location of a response names the route that took the request.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from composer.config import read_config
from composer.errors import ConfigError
from composer.nodes import Reader
from composer.predicates import PREDICATES, Condition, PathPrefixPredicate, parse_match
from composer.routing import RouteTable, build_table

PAGE = "<!DOCTYPE html><html><body><p>page</p></body></html>\n"


# --------------------------------------------------------------------------- helpers


def probe_routes(*routes: tuple[str, str]) -> str:
    """routes.yaml in which route NAME (with `match: MATCH`) redirects to /hit/NAME."""
    lines = ["routes:"]
    for name, match in routes:
        lines += [f"  - name: {name}", f"    match: {match}", f"    redirect: {{to: /hit/{name}}}"]
    return "\n".join(lines) + "\n"


async def landed(composer, path: str, method: str = "GET", headers: dict[str, str] | None = None) -> str | int:
    """The route that took `method path` (from its /hit/NAME Location), else the status.

    `path` is sent exactly as given (no client normalisation or re-quoting).
    """
    url = URL(composer.url + path, encoded=True)
    async with composer.session.request(method, url, headers=headers, allow_redirects=False) as resp:
        await resp.read()
        location = resp.headers.get("location", "").partition("?")[0]
        if resp.status == 302 and location.startswith("/hit/"):
            return location.removeprefix("/hit/")
        return resp.status


async def fetch(composer, path: str, method: str = "GET",
                headers: dict[str, str] | None = None) -> tuple[int, CIMultiDict[str], bytes]:
    """(status, headers, body) of `method path`, redirects not followed, path sent raw."""
    url = URL(composer.url + path, encoded=True)
    async with composer.session.request(method, url, headers=headers, allow_redirects=False) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.read()


async def raw_exchange(port: int, request: bytes) -> int:
    """Write `request` byte for byte on a fresh connection; the status of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        try:
            await writer.drain()
        except ConnectionError:
            pass  # the server may refuse before reading everything; its answer is still there
        line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass
    assert line.startswith(b"HTTP/1."), line
    return int(line.split()[1])


def raw_get(target: str | bytes, *headers: str | bytes, host: bytes | None = b"127.0.0.1") -> bytes:
    """An HTTP/1.1 request as bytes; `headers` are complete `Name: value` lines."""
    target = target.encode() if isinstance(target, str) else target
    lines = [b"GET " + target + b" HTTP/1.1"]
    if host is not None:
        lines.append(b"Host: " + host)
    lines += [h.encode() if isinstance(h, str) else h for h in headers]
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def requests_total(text: str) -> dict[tuple[str, str, str], float]:
    """composer_requests_total samples of a /metrics text, keyed by (route, method, status)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "composer_requests_total":
                labels = sample.labels
                out[labels["route"], labels["method"], labels["status"]] = sample.value
    return out


def write_routes(tmp_path: Path, text: str) -> Path:
    """routes.yaml (dedented) plus templates/page.html in `tmp_path`."""
    (tmp_path / "templates").mkdir(exist_ok=True)
    (tmp_path / "templates" / "page.html").write_text(PAGE, encoding="utf-8")
    path = tmp_path / "routes.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def config_problems(tmp_path: Path, text: str) -> list[tuple[int, str]]:
    """(line, message) of every problem of a routes.yaml; building its table must fail."""
    path = write_routes(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        build_table(read_config(path))
    out = []
    for problem in info.value.problems:
        m = re.fullmatch(re.escape(str(path)) + r":(\d+): (.+)", problem)
        assert m is not None, f"not `routes.yaml:LINE: message`: {problem!r}"
        out.append((int(m.group(1)), m.group(2)))
    assert out
    return out


def table_of(tmp_path: Path, text: str) -> RouteTable:
    return build_table(read_config(write_routes(tmp_path, text)))


def warning_lines(table: RouteTable) -> list[int]:
    """Lines of the shadowing warnings of a table (each `LABEL:LINE: warning: ...`)."""
    out = []
    for warning in table.warnings:
        m = re.fullmatch(r".*:(\d+): warning: .+", warning)
        assert m is not None, warning
        out.append(int(m.group(1)))
    return out


def run_check(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "composer", "check"], cwd=cwd, capture_output=True,
                          text=True, timeout=30, check=False)


@dataclass
class Backend:
    """A real aiohttp server that answers 200 to anything and records what it received."""

    url: str
    received: list[tuple[str, str]] = field(default_factory=list)  # (method, raw path with query)


@pytest.fixture
async def backend(aiohttp_server) -> Backend:
    received: list[tuple[str, str]] = []

    @web.middleware
    async def record(request: web.Request, handler) -> web.StreamResponse:
        # in a middleware, so a request the route below would not match (a decoded CR/LF
        # defeats `.*`) is recorded all the same
        received.append((request.method, request.raw_path))
        return await handler(request)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=f"backend {request.method} {request.raw_path}")

    app = web.Application(middlewares=[record])
    app.router.add_route("*", "/{tail:.*}", handler)
    server = await aiohttp_server(app, host="127.0.0.1")
    return Backend(url=str(server.make_url("")).rstrip("/"), received=received)


# --------------------------------------------------------------------------- the predicate registry


@pytest.mark.parametrize("key", PREDICATES)
def test_every_predicate_declares_its_key_kind_and_what_it_takes(key):
    spec = PREDICATES[key]
    assert spec.key == key
    assert spec.kind in ("path", "methods", "condition")
    assert (spec.kind == "condition") == issubclass(spec, Condition)
    assert spec.takes.text
    # shared by every request of its route: frozen, and no room for anything else
    assert spec.__dataclass_params__.frozen and "__slots__" in vars(spec)


def match_problems(text: str) -> list[str]:
    reader = Reader("routes.yaml")
    node = yaml.compose(textwrap.dedent(text))
    assert node is not None
    parse_match(reader, node)
    return reader.problems


@pytest.mark.parametrize(("text", "problem"), [
    ("{path: /a, tenant: x}", f"unknown predicate 'tenant' in match (known: {', '.join(PREDICATES)})"),
    ("{methods: [GET]}", "match needs a `path` or a `path_prefix`"),
    ("{path: /a, path_prefix: /a}", "match takes one of `path` and `path_prefix`, not both"),
    ("{path: a}", "match.path: takes a path starting with '/', not 'a'"),
    ("{path: /a, methods: {GET: x}}",
     "match.methods: takes a method or a list of methods, e.g. [GET, HEAD], not {'GET': 'x'}"),
    ("{path: /a, methods: [GET, G E T]}", "match.methods: 'G E T' is not an HTTP method"),
    ("{path: /a, cookies: []}", "match.cookies: takes a mapping of cookie names to values, not []"),
    ("{path: /a, headers: {bad name: x}}", "match.headers: 'bad name' is not a valid header name"),
    ("{path: /a, host: '" + "x" * 100 + " '}", "match.host: takes a host name or a glob such as "
     "'*.example.com', not '" + "x" * 56 + "..."),  # the value cut short
])
def test_match_problems_read_the_registry(text, problem):
    assert match_problems(text) == [f"routes.yaml:1: {problem}"]


def test_match_sorts_predicates_by_their_kind():
    reader = Reader("routes.yaml")
    node = yaml.compose("{host: '*.example.com', path_prefix: /api/, methods: get, cookies: {ab: b}}")
    assert node is not None
    path, methods, conditions = parse_match(reader, node)
    assert reader.problems == []
    assert path == PathPrefixPredicate(prefix="/api", literal=("api",))
    assert methods == frozenset({"GET"})
    assert [c.key for c in conditions] == ["host", "cookies"]


# --------------------------------------------------------------------------- path predicates


async def test_path_param_matches_exactly_one_non_empty_segment(start_composer):
    composer = await start_composer({}, routes=probe_routes(("product", '{path: "/products/{sku}"}')))
    assert await landed(composer, "/products/42") == "product"
    assert await landed(composer, "/products/a%2Fb") == "product"  # an encoded slash is not a separator
    for path in ("/products/", "/products", "/products/42/", "/products/42/x", "/xproducts/42"):
        assert await landed(composer, path) == 404, path


async def test_path_regex_param_spans_slashes_and_constrains(start_composer):
    composer = await start_composer({}, routes=probe_routes(
        ("static", '{path: "/static/{rest:.*}"}'),
        ("item", '{path: "/items/{id:[0-9]+}"}'),
        ("dated", '{path: "/news/{year:[0-9]{4}}/{slug}"}'),
    ))
    assert await landed(composer, "/static/a/b/c.css") == "static"
    assert await landed(composer, "/static/") == "static"
    assert await landed(composer, "/static") == 404
    assert await landed(composer, "/items/123") == "item"
    assert await landed(composer, "/items/12a") == 404
    assert await landed(composer, "/items/") == 404
    assert await landed(composer, "/news/2024/launch") == "dated"
    assert await landed(composer, "/news/24/launch") == 404


async def test_path_is_matched_raw_not_decoded(start_composer):
    composer = await start_composer({}, routes=probe_routes(("spaced", "{path: /a%20b}")))
    assert await landed(composer, "/a%20b") == "spaced"
    assert await landed(composer, "/a%2520b") == 404


async def test_path_prefix_takes_whole_segments(start_composer):
    composer = await start_composer({}, routes=probe_routes(("api", "{path_prefix: /api}")))
    for path in ("/api", "/api/", "/api/x", "/api/x/y?z=1"):
        assert await landed(composer, path) == "api", path
    for path in ("/apix", "/ap", "/", "/v1/api"):
        assert await landed(composer, path) == 404, path


async def test_path_prefix_with_trailing_slash_and_deeper_prefix(start_composer):
    composer = await start_composer({}, routes=probe_routes(
        ("cart", "{path_prefix: /api/cart/}"),
        ("api", "{path_prefix: /api}"),
    ))
    assert await landed(composer, "/api/cart") == "cart"
    assert await landed(composer, "/api/cart/items/1") == "cart"
    assert await landed(composer, "/api/carts") == "api"
    assert await landed(composer, "/api/other") == "api"


def test_path_prefix_predicate_alone_takes_whole_segments():
    """The predicate itself, not only the route index in front of it, refuses /apix."""
    api = PathPrefixPredicate.create("/api/")
    assert [p for p in ("/api", "/api/", "/api/x", "/apix", "/ap", "/x/api") if api.match(p) is not None] \
        == ["/api", "/api/", "/api/x"]
    root = PathPrefixPredicate.create("/")
    assert all(root.match(p) == {} for p in ("/", "/x", "/x/y"))


async def test_path_prefix_root_matches_everything(start_composer):
    composer = await start_composer({}, routes=probe_routes(("all", "{path_prefix: /}")))
    for path in ("/", "/x", "/a/b/c", "/apix?q=1", "/%41"):
        assert await landed(composer, path) == "all", path


# --------------------------------------------------------------------------- methods, 404 and 405


async def test_template_routes_default_to_get_and_head(start_composer):
    composer = await start_composer({"page.html": PAGE}, routes="""
        routes:
          - name: page
            match: {path: /page}
            template: page.html
    """)
    status, _, body = await fetch(composer, "/page")
    assert status == 200 and b"<p>page</p>" in body
    status, _, body = await fetch(composer, "/page", method="HEAD")
    assert status == 200 and body == b""
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
        status, headers, body = await fetch(composer, "/page", method=method)
        assert status == 405, method
        assert headers["Allow"] == "GET, HEAD"
        assert b"405" in body


async def test_redirect_routes_answer_any_method(start_composer):
    composer = await start_composer({}, routes=probe_routes(("moved", "{path: /old}")))
    for method in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PURGE"):
        assert await landed(composer, "/old", method=method) == "moved", method


async def test_backend_routes_answer_any_method(start_composer, backend):
    composer = await start_composer({}, routes=f"""
        routes:
          - name: api
            match: {{path_prefix: /api}}
            backend: {backend.url}
    """)
    for method in ("GET", "POST", "PUT", "DELETE", "PATCH"):
        status, _, body = await fetch(composer, "/api/x", method=method)
        assert status == 200, method
        assert body == f"backend {method} /api/x".encode()
    assert [m for m, _ in backend.received] == ["GET", "POST", "PUT", "DELETE", "PATCH"]


async def test_explicit_methods_and_405_allow_is_the_union_of_path_matching_routes(start_composer):
    composer = await start_composer({}, routes=probe_routes(
        ("create", "{path: /x, methods: [POST]}"),
        ("change", "{path: /x, methods: [put, Delete]}"),  # case-insensitive in the file
        ("any-x", '{path: "/x/{id}", methods: [GET]}'),
        ("read-y", "{path: /y, methods: GET}"),
    ))
    assert await landed(composer, "/x", method="POST") == "create"
    assert await landed(composer, "/x", method="PUT") == "change"
    assert await landed(composer, "/x", method="DELETE") == "change"
    status, headers, body = await fetch(composer, "/x")
    assert status == 405
    assert headers["Allow"] == "DELETE, POST, PUT"
    assert headers["Content-Type"].startswith("text/html")
    assert b"405 Method Not Allowed" in body
    assert await landed(composer, "/y") == "read-y"
    status, headers, _ = await fetch(composer, "/y", method="POST")
    assert status == 405 and headers["Allow"] == "GET"


async def test_no_route_is_404_html_page_without_allow(start_composer):
    composer = await start_composer({}, routes=probe_routes(("only", "{path: /only, methods: [POST]}")))
    status, headers, body = await fetch(composer, "/elsewhere")
    assert status == 404
    assert "Allow" not in headers
    assert headers["Content-Type"].startswith("text/html")
    assert b"404 Not Found" in body


async def test_wrong_method_falls_through_to_a_later_route(start_composer):
    composer = await start_composer({}, routes=probe_routes(
        ("post-only", "{path: /form, methods: [POST]}"),
        ("catch-all", "{path_prefix: /}"),
    ))
    assert await landed(composer, "/form", method="POST") == "post-only"
    assert await landed(composer, "/form") == "catch-all"


# --------------------------------------------------------------------------- host, headers, cookies


async def test_host_glob_ignores_port_and_case(start_composer):
    composer = await start_composer({}, routes=probe_routes(
        ("shop", '{path_prefix: /, host: "*.Example.com"}'),
        ("exact", '{path_prefix: /, host: "static.test"}'),
        ("other", "{path_prefix: /}"),
    ))
    for host in ("a.example.com", "a.example.com:8080", "A.EXAMPLE.COM", "b.a.example.com:1",
                 "a.example.com.", "a.example.com.:8080"):  # a trailing dot is the same host
        assert await landed(composer, "/", headers={"Host": host}) == "shop", host
    for host in ("example.com", "example.com:8080", "a.example.com.evil", "aexample.com"):
        assert await landed(composer, "/", headers={"Host": host}) == "other", host
    assert await landed(composer, "/", headers={"Host": "STATIC.test:9"}) == "exact"
    assert await landed(composer, "/", headers={"Host": "x.static.test"}) == "other"


async def test_host_predicate_on_an_ipv6_literal_host(start_composer):
    composer = await start_composer({}, routes=probe_routes(
        ("v6", '{path: /, host: "[::1]"}'),
        ("other", "{path_prefix: /}"),
    ))
    assert await landed(composer, "/", headers={"Host": "[::1]:8080"}) == "v6"
    assert await landed(composer, "/", headers={"Host": "[::2]:8080"}) == "other"


async def test_headers_exact_match(start_composer):
    composer = await start_composer({}, routes=probe_routes(
        ("beta", '{path: /, headers: {x-beta: "1"}}'),
        ("other", "{path: /}"),
    ))
    assert await landed(composer, "/", headers={"x-beta": "1"}) == "beta"
    assert await landed(composer, "/", headers={"X-BETA": "1"}) == "beta"  # names are case-insensitive
    for value in ("11", "0", " 1x", "true"):
        assert await landed(composer, "/", headers={"x-beta": value}) == "other", value
    assert await landed(composer, "/") == "other"


async def test_headers_regex_is_an_unanchored_search(start_composer):
    composer = await start_composer({}, routes=probe_routes(
        ("mobile", '{path: /, headers: {user-agent: "~Mobile|Android"}}'),
        ("json", '{path: /, headers: {accept: "~^application/json$"}}'),
        ("other", "{path: /}"),
    ))
    assert await landed(composer, "/", headers={"User-Agent": "Mozilla/5.0 (iPhone) Mobile Safari"}) == "mobile"
    assert await landed(composer, "/", headers={"User-Agent": "Linux; Android 14"}) == "mobile"
    assert await landed(composer, "/", headers={"User-Agent": "Mozilla/5.0 (X11) Firefox"}) == "other"
    assert await landed(composer, "/", headers={"Accept": "application/json"}) == "json"
    assert await landed(composer, "/", headers={"Accept": "application/json, text/html"}) == "other"
    assert await landed(composer, "/", headers={"User-Agent": "mobile"}) == "other"  # case-sensitive regex


async def test_cookies_exact_match(start_composer):
    composer = await start_composer({}, routes=probe_routes(
        ("variant-b", "{path: /, cookies: {ab: b}}"),
        ("other", "{path: /}"),
    ))
    assert await landed(composer, "/", headers={"Cookie": "ab=b"}) == "variant-b"
    assert await landed(composer, "/", headers={"Cookie": "session=1; ab=b; x=y"}) == "variant-b"
    for cookie in ("ab=bb", "ab=a", "xab=b", "AB=b", "session=1"):
        assert await landed(composer, "/", headers={"Cookie": cookie}) == "other", cookie
    assert await landed(composer, "/") == "other"


async def test_every_predicate_of_a_route_must_hold(start_composer):
    composer = await start_composer({}, routes=probe_routes(
        ("all", '{path: /x, methods: [POST], host: "*.example.com", headers: {x-beta: "1"}, cookies: {ab: b}}'),
        ("fallback", "{path_prefix: /}"),
    ))
    good = {"Host": "a.example.com", "x-beta": "1", "Cookie": "ab=b"}
    assert await landed(composer, "/x", method="POST", headers=good) == "all"
    assert await landed(composer, "/x", method="GET", headers=good) == "fallback"
    assert await landed(composer, "/y", method="POST", headers=good) == "fallback"
    for name, value in (("Host", "example.com"), ("x-beta", "2"), ("Cookie", "ab=a")):
        assert await landed(composer, "/x", method="POST", headers={**good, name: value}) == "fallback", name
    assert await landed(composer, "/x", method="POST", headers={"Host": "a.example.com", "x-beta": "1"}) \
        == "fallback"


# --------------------------------------------------------------------------- order


async def test_first_match_in_file_order_wins(start_composer):
    composer = await start_composer({}, routes=probe_routes(
        ("any-b", '{path: "/{x}/b"}'),     # indexed at the root, yet before the literal below
        ("a-b", "{path: /a/b}"),
        ("a-prefix", "{path_prefix: /a}"),
        ("a-c", "{path: /a/c}"),          # after a-prefix: never taken
        ("deep", "{path: /a/d/e}"),
        ("x-y", "{path: /x/y}"),          # deeper in the index than the prefix after it
        ("x-prefix", "{path_prefix: /x}"),
    ))
    assert await landed(composer, "/a/b") == "any-b"
    assert await landed(composer, "/z/b") == "any-b"
    assert await landed(composer, "/a/c") == "a-prefix"
    assert await landed(composer, "/a/d/e") == "a-prefix"
    assert await landed(composer, "/a") == "a-prefix"
    assert await landed(composer, "/b") == 404
    assert await landed(composer, "/x/y") == "x-y"
    assert await landed(composer, "/x/y/z") == "x-prefix"


async def test_failed_host_header_or_cookie_predicate_does_not_block_later_routes(start_composer):
    composer = await start_composer({}, routes=probe_routes(
        ("by-host", '{path: /p, host: "admin.test"}'),
        ("by-header", '{path: /p, headers: {x-team: "~^core"}}'),
        ("by-cookie", "{path: /p, cookies: {beta: '1'}}"),
        ("plain", "{path: /p}"),
    ))
    assert await landed(composer, "/p", headers={"Host": "admin.test", "x-team": "core", "Cookie": "beta=1"}) \
        == "by-host"
    assert await landed(composer, "/p", headers={"x-team": "core-web", "Cookie": "beta=1"}) == "by-header"
    assert await landed(composer, "/p", headers={"x-team": "web-core", "Cookie": "beta=1"}) == "by-cookie"
    assert await landed(composer, "/p") == "plain"


# --------------------------------------------------------------------------- redirects


OLD_NEW = """
    routes:
      - name: old
        match: {path: "/old/{rest:.*}"}
        redirect: {to: "/new/{rest}", status: 301}
      - name: search
        match: {path: "/find/{term}"}
        redirect: {to: "/search?src=old&q={term}"}
      - name: away
        match: {path: "/away/{rest:.*}"}
        redirect: {to: "https://example.com/x/{rest}", status: 308}
      - name: root
        match: {path: "/r/{rest:.*}"}
        redirect: {to: "/{rest}"}
"""


async def test_redirect_inserts_raw_captures(start_composer):
    composer = await start_composer({}, routes=OLD_NEW)
    status, headers, body = await fetch(composer, "/old/a%2Fb/c%20d/%C3%A9")
    assert status == 301
    assert headers["Location"] == "/new/a%2Fb/c%20d/%C3%A9"
    assert body == b""
    status, headers, _ = await fetch(composer, "/old/")
    assert (status, headers["Location"]) == (301, "/new/")


async def test_redirect_keeps_the_query_string(start_composer):
    composer = await start_composer({}, routes=OLD_NEW)
    _, headers, _ = await fetch(composer, "/old/a?x=1&y=%20z")
    assert headers["Location"] == "/new/a?x=1&y=%20z"
    _, headers, _ = await fetch(composer, "/find/shoes?page=2")
    assert headers["Location"] == "/search?src=old&q=shoes&page=2"
    _, headers, _ = await fetch(composer, "/find/shoes")
    assert headers["Location"] == "/search?src=old&q=shoes"


async def test_redirect_to_an_absolute_url(start_composer):
    composer = await start_composer({}, routes=OLD_NEW)
    status, headers, _ = await fetch(composer, "/away/p/q?z=9")
    assert status == 308
    assert headers["Location"] == "https://example.com/x/p/q?z=9"
    status, headers, _ = await fetch(composer, "/away//evil.com")
    assert URL(headers["Location"]).host == "example.com"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308, None])
async def test_redirect_status(start_composer, status):
    to = "{to: /there}" if status is None else f"{{to: /there, status: {status}}}"
    composer = await start_composer({}, routes=f"""
        routes:
          - name: here
            match: {{path: /here}}
            redirect: {to}
    """)
    got, headers, _ = await fetch(composer, "/here", method="POST")
    assert got == (302 if status is None else status)
    assert headers["Location"] == "/there"


@pytest.mark.parametrize("path", [
    "/r//evil.com", "/r///evil.com", "/r//evil.com/x?y=1", "/r/%2F%2Fevil.com", "/r/\\evil.com",
    "/r//\\evil.com", "/r/\\\\evil.com",
])
async def test_redirect_parameter_cannot_make_an_open_redirect(start_composer, path):
    composer = await start_composer({}, routes=OLD_NEW)
    status, headers, _ = await fetch(composer, path)
    assert status == 302
    location = headers["Location"]
    assert location.startswith("/"), location
    assert not location.startswith(("//", "/\\")), location
    # what a browser would do with it: stay on composer's host
    resolved = URL(composer.url).join(URL(location.replace("\\", "/"), encoded=True))
    assert resolved.host == "127.0.0.1", location


async def test_response_filters_apply_to_redirects(start_composer):
    composer = await start_composer({}, routes="""
        routes:
          - name: moved
            match: {path: /moved}
            redirect: {to: /here, status: 301}
            filters:
              - set_response_header: {cache-control: "max-age=60", x-from: composer}
              - set_response_header: {x-from: twice}
              - status: 308
    """)
    status, headers, _ = await fetch(composer, "/moved")
    assert status == 308  # the status filter: the redirect's own status is only its default
    assert headers["Location"] == "/here"
    assert headers["Cache-Control"] == "max-age=60"
    assert headers["X-From"] == "twice"


# --------------------------------------------------------------------------- config errors

# Each case: a route (YAML lines under `routes:`), the problem's line within it, words of the message.
CONFIG_CASES = {
    "unknown-predicate": ("""\
  - name: a
    match:
      path: /a
      query: {x: "1"}
    redirect: {to: /b}
""", 4, ("unknown predicate", "query")),
    "bad-regex-in-path": ("""\
  - name: a
    match:
      path: "/a/{x:[a-}"
    redirect: {to: /b}
""", 3, ("regex",)),
    "regex-flags-mid-path": ("""\
  - name: a
    match:
      path: "/a/{x:(?i)abc}"
    redirect: {to: /b}
""", 3, ("regex",)),
    "bad-regex-in-headers": ("""\
  - name: a
    match:
      path: /a
      headers: {x: "~("}
    redirect: {to: /b}
""", 4, ("regex", "'x'")),
    "path-and-prefix": ("""\
  - name: a
    match:
      path: /a
      path_prefix: /a
    redirect: {to: /b}
""", 4, ("path_prefix", "not both")),
    "missing-path": ("""\
  - name: a
    match: {methods: [GET]}
    redirect: {to: /b}
""", 2, ("path",)),
    "template-and-redirect": ("""\
  - name: a
    match: {path: /a}
    template: page.html
    redirect: {to: /b}
""", 1, ("exactly one", "template", "redirect")),
    "backend-with-path": ("""\
  - name: a
    match: {path_prefix: /a}
    backend: http://127.0.0.1:9001/api
""", 3, ("origin",)),
    "backend-not-http": ("""\
  - name: a
    match: {path_prefix: /a}
    backend: ftp://127.0.0.1:9001
""", 3, ("http://",)),
    "backend-not-allowed": ("""\
  - name: a
    match: {path_prefix: /a}
    backend: http://10.1.2.3:9001
""", 3, ("allowed_origins",)),
    "redirect-bad-status": ("""\
  - name: a
    match: {path: /a}
    redirect:
      to: /b
      status: 304
""", 5, ("redirect.status", "304")),
    "redirect-unknown-param": ("""\
  - name: a
    match: {path: "/a/{id}"}
    redirect:
      to: "/b/{sku}"
""", 4, ("{sku}",)),
    "request-filter-on-template": ("""\
  - name: a
    match: {path: /a}
    template: page.html
    filters:
      - strip_prefix: /a
""", 5, ("backend routes only",)),
    "timeout-on-redirect": ("""\
  - name: a
    match: {path: /a}
    redirect: {to: /b}
    timeout_ms: 100
""", 4, ("timeout_ms", "backend routes only")),
    "host-with-port": ("""\
  - name: a
    match:
      path: /a
      host: "*.example.com:8080"
    redirect: {to: /b}
""", 4, ("port",)),
    "template-post": ("""\
  - name: a
    match: {path: /a, methods: [GET, POST]}
    template: page.html
""", 2, ("GET and HEAD", "POST")),
}
SETTINGS = 'settings:\n  allowed_origins: ["http://127.0.0.1:*"]\nroutes:\n'
FIRST_ROUTE_LINE = 4  # line of the first route under SETTINGS


def every_config_case() -> tuple[str, list[int]]:
    """All CONFIG_CASES in one file (renamed r0, r1, ...), then a valid route and a duplicate
    of its name; with the line of each problem."""
    text, expected = SETTINGS, []
    for i, (route, line, _) in enumerate(CONFIG_CASES.values()):
        first = text.count("\n") + 1
        text += route.replace("name: a", f"name: r{i}", 1)
        expected.append(first - 1 + line)
    text += "  - {name: fine, match: {path: /fine}, redirect: {to: /b}}\n"
    text += "  - {name: fine, match: {path: /dup}, redirect: {to: /b}}\n"
    expected.append(text.count("\n"))
    return text, expected


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_error_names_its_line(tmp_path, case):
    route, line, words = CONFIG_CASES[case]
    problems = config_problems(tmp_path, SETTINGS + route)
    assert len(problems) == 1, problems
    assert problems[0][0] == FIRST_ROUTE_LINE - 1 + line, problems
    for word in words:
        assert word.lower() in problems[0][1].lower(), problems


def test_duplicate_route_names_name_both_lines(tmp_path):
    problems = config_problems(tmp_path, """\
        routes:
          - name: twin
            match: {path: /a}
            redirect: {to: /b}
          - name: twin
            match: {path: /c}
            redirect: {to: /d}
    """)
    assert len(problems) == 1, problems
    line, message = problems[0]
    assert line == 5
    assert "twin" in message and "line 2" in message


def test_every_config_problem_is_reported_in_one_run(tmp_path):
    text, expected = every_config_case()
    problems = config_problems(tmp_path, text)
    assert sorted(line for line, _ in problems) == sorted(expected), problems


def test_composer_check_reports_every_problem_and_exits_2(tmp_path):
    text, expected = every_config_case()
    write_routes(tmp_path, text)
    result = run_check(tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = []
    for out in result.stderr.splitlines():
        m = re.fullmatch(r"routes\.yaml:(\d+): \S.*", out)
        assert m is not None, f"not `routes.yaml:LINE: message`: {out!r}\n{result.stderr}"
        lines.append(int(m.group(1)))
    assert sorted(lines) == sorted(expected), result.stderr


# --------------------------------------------------------------------------- shadowing warnings

# (routes, lines that must be warned about); every route redirects, so any method matches
# unless `methods` says otherwise.
SHADOW_CASES = {
    "same-path": ("""\
routes:
  - {name: a, match: {path: /x}, redirect: {to: /1}}
  - {name: b, match: {path: /x}, redirect: {to: /2}}
""", [3]),
    "prefix-covers-path": ("""\
routes:
  - {name: api, match: {path_prefix: /api}, redirect: {to: /1}}
  - {name: users, match: {path: /api/users}, redirect: {to: /2}}
  - {name: deep, match: {path_prefix: /api/v1/x}, redirect: {to: /3}}
  - {name: param, match: {path: "/api/{x}"}, redirect: {to: /4}}
""", [3, 4, 5]),
    "root-prefix-covers-all": ("""\
routes:
  - {name: all, match: {path_prefix: /}, redirect: {to: /1}}
  - {name: later, match: {path: /z}, redirect: {to: /2}}
""", [3]),
    "param-covers-literal": ("""\
routes:
  - {name: product, match: {path: "/p/{id}"}, redirect: {to: /1}}
  - {name: new, match: {path: /p/new}, redirect: {to: /2}}
  - {name: same, match: {path: "/p/{sku}"}, redirect: {to: /3}}
""", [3, 4]),
    "broader-methods-cover": ("""\
routes:
  - {name: a, match: {path: /x, methods: [GET, POST]}, redirect: {to: /1}}
  - {name: b, match: {path: /x, methods: [POST]}, redirect: {to: /2}}
""", [3]),
    "fewer-conditions-cover": ("""\
routes:
  - {name: a, match: {path: /x, host: "*.example.com"}, redirect: {to: /1}}
  - {name: b, match: {path: /x, host: "*.example.com", cookies: {ab: b}}, redirect: {to: /2}}
""", [3]),
    "earlier-host-is-stricter": ("""\
routes:
  - {name: a, match: {path: /x, host: "*.example.com"}, redirect: {to: /1}}
  - {name: b, match: {path: /x}, redirect: {to: /2}}
""", []),
    "earlier-header-is-stricter": ("""\
routes:
  - {name: a, match: {path_prefix: /, headers: {x-beta: "1"}}, redirect: {to: /1}}
  - {name: b, match: {path: /x}, redirect: {to: /2}}
""", []),
    "earlier-cookie-is-stricter": ("""\
routes:
  - {name: a, match: {path: /x, cookies: {ab: b}}, redirect: {to: /1}}
  - {name: b, match: {path: /x}, redirect: {to: /2}}
""", []),
    "earlier-methods-are-a-subset": ("""\
routes:
  - {name: a, match: {path: /x, methods: [GET]}, redirect: {to: /1}}
  - {name: b, match: {path: /x, methods: [GET, POST]}, redirect: {to: /2}}
  - {name: c, match: {path: /x}, redirect: {to: /3}}
""", []),
    "different-prefix": ("""\
routes:
  - {name: a, match: {path_prefix: /api}, redirect: {to: /1}}
  - {name: b, match: {path: /apix}, redirect: {to: /2}}
  - {name: c, match: {path_prefix: /apiv2}, redirect: {to: /3}}
  - {name: d, match: {path_prefix: /ap}, redirect: {to: /4}}
""", []),
    "earlier-path-is-narrower": ("""\
routes:
  - {name: a, match: {path: /api}, redirect: {to: /1}}
  - {name: b, match: {path_prefix: /api}, redirect: {to: /2}}
  - {name: c, match: {path: "/p/{id:[0-9]+}"}, redirect: {to: /3}}
  - {name: d, match: {path: /p/new}, redirect: {to: /4}}
  - {name: e, match: {path: "/q/{id}"}, redirect: {to: /5}}
  - {name: f, match: {path: "/q/{rest:.*}"}, redirect: {to: /6}}
""", []),
}


@pytest.mark.parametrize("case", SHADOW_CASES)
def test_shadowed_route_warnings(tmp_path, case):
    text, lines = SHADOW_CASES[case]
    table = table_of(tmp_path, text)
    assert warning_lines(table) == lines, table.warnings


def test_composer_check_prints_shadowing_warnings_and_exits_0(tmp_path):
    write_routes(tmp_path, """\
        routes:
          - name: api
            match: {path_prefix: /api}
            redirect: {to: /1}
          - name: users
            match: {path: /api/users}
            redirect: {to: /2}
          - name: beta
            match: {path: /b, headers: {x-beta: "1"}}
            redirect: {to: /3}
          - name: b
            match: {path: /b}
            redirect: {to: /4}
    """)
    result = run_check(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("routes.yaml: ok (4 routes")
    warnings = result.stderr.splitlines()
    assert len(warnings) == 1, result.stderr
    assert re.fullmatch(r"routes\.yaml:5: warning: .*'users'.*'api'.*", warnings[0]), warnings[0]


# --------------------------------------------------------------------------- bad input never reaches a backend


BACKEND_ROUTES = """
    routes:
      - name: all
        match: {{path_prefix: /}}
        backend: {url}
"""

BAD_REQUESTS = {
    "dotdot-raw": raw_get("/../../etc/passwd"),
    "dotdot-inside-raw": raw_get("/a/../../etc/passwd"),
    "dot-raw": raw_get("/a/./b"),
    "dotdot-encoded": raw_get("/a/%2e%2e/b"),
    "dotdot-encoded-slash": raw_get("/a/..%2Fb"),
    "dotdot-encoded-backslash": raw_get("/a/%2E%2E%5Cb"),
    "dotdot-raw-backslash": raw_get("/a/..\\b"),
    "dotdot-at-end": raw_get("/a/%2e%2E"),
    "nul-encoded": raw_get("/a%00b"),
    "newline-encoded": raw_get("/a%0d%0aSet-Cookie:x=1"),
    "nul-raw": raw_get(b"/a\x00b"),
    "path-16k": raw_get("/" + "a" * 16384),
    "host-with-space": raw_get("/ok", host=b"exa mple.com"),
    "host-with-slash": raw_get("/ok", host=b"a/b"),
    "host-with-at": raw_get("/ok", host=b"user@evil.com"),
    "host-empty": raw_get("/ok", host=b""),
    "host-missing": raw_get("/ok", host=None),
    "two-hosts": raw_get("/ok", "Host: evil.com"),
    "header-20k": raw_get("/ok", "X-Big: " + "a" * 20 * 1024),
    "headers-200": raw_get("/ok", *(f"X-H{i}: v" for i in range(200))),
    "absolute-form-dotdot": raw_get("http://127.0.0.1/a/%2e%2e/b"),
    "asterisk": raw_get("*"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
async def test_bad_request_gets_4xx_and_never_reaches_the_backend(start_composer, backend, case):
    composer = await start_composer({}, routes=BACKEND_ROUTES.format(url=backend.url))
    status = await raw_exchange(composer.server.port, BAD_REQUESTS[case])
    assert 400 <= status < 500, status
    assert backend.received == []
    # the process survives and still serves
    status = await raw_exchange(composer.server.port, raw_get("/ok?x=1"))
    assert status == 200
    assert backend.received == [("GET", "/ok?x=1")]


async def test_http10_without_host_is_served(start_composer, backend):
    composer = await start_composer({}, routes=BACKEND_ROUTES.format(url=backend.url))
    status = await raw_exchange(composer.server.port, b"GET /ok HTTP/1.0\r\n\r\n")
    assert status == 200
    assert backend.received == [("GET", "/ok")]


async def test_many_bad_requests_in_a_row_then_a_good_one(start_composer, backend):
    composer = await start_composer({}, routes=BACKEND_ROUTES.format(url=backend.url))
    for request in BAD_REQUESTS.values():
        assert 400 <= await raw_exchange(composer.server.port, request) < 500
    assert backend.received == []
    status, _, body = await fetch(composer, "/fine/path")
    assert status == 200 and body == b"backend GET /fine/path"
    assert backend.received == [("GET", "/fine/path")]


# --------------------------------------------------------------------------- metrics


async def test_requests_total_labels_misses_redirects_and_guard_refusals(start_composer):
    composer = await start_composer({}, routes="""
        routes:
          - name: moved
            match: {path: /moved}
            redirect: {to: /here, status: 301}
          - name: posted
            match: {path: /form, methods: [POST]}
            redirect: {to: /thanks, status: 303}
    """)
    assert (await fetch(composer, "/nope"))[0] == 404
    assert (await fetch(composer, "/nope/again"))[0] == 404
    assert (await fetch(composer, "/moved"))[0] == 301
    assert (await fetch(composer, "/form"))[0] == 405
    assert (await fetch(composer, "/form", method="POST"))[0] == 303
    assert await raw_exchange(composer.server.port, raw_get("/a/%2e%2e/moved")) == 400
    counts = requests_total(await composer.metrics())
    assert counts == {
        ("", "GET", "404"): 2,
        ("moved", "GET", "301"): 1,
        ("", "GET", "405"): 1,
        ("posted", "POST", "303"): 1,
        ("", "GET", "400"): 1,
    }


# --------------------------------------------------------------------------- a large table


def large_table(n: int) -> str:
    """n redirect routes of three shapes, spread over shared and distinct leading segments."""
    lines = ["routes:"]
    for i in range(n):
        if i % 3 == 0:
            match = f"{{path: /s{i % 7}/i{i}}}"
        elif i % 3 == 1:
            match = f'{{path: "/s{i % 7}/i{i}/{{slug}}"}}'
        else:
            match = f"{{path_prefix: /p{i}}}"
        lines.append(f"  - {{name: r{i}, match: {match}, redirect: {{to: /hit/r{i}}}}}")
    return "\n".join(lines) + "\n"


def large_probe(i: int) -> str:
    return (f"/s{i % 7}/i{i}", f"/s{i % 7}/i{i}/some-slug", f"/p{i}/x/y")[i % 3]


async def test_large_table_resolves_first_middle_last_and_miss(start_composer):
    composer = await start_composer({}, routes=large_table(1000))
    assert len(composer.server.table.routes) == 1000
    for i in (0, 1, 2, 499, 500, 501, 997, 998, 999):
        assert await landed(composer, large_probe(i)) == f"r{i}", i
    for path in ("/s0/i1", "/s1/i1", "/p1000", "/p99x", "/s0/i0/extra", "/s1/i1/", "/"):
        assert await landed(composer, path) == 404, path


async def test_large_table_every_route_resolves_and_nothing_is_shadowed(start_composer):
    composer = await start_composer({}, routes=large_table(1000))
    assert composer.server.table.warnings == ()
    limit = asyncio.Semaphore(20)

    async def probe(i: int) -> str | int:
        async with limit:
            return await landed(composer, large_probe(i))

    got = await asyncio.gather(*(probe(i) for i in range(1000)))
    assert [i for i, name in enumerate(got) if name != f"r{i}"] == []
