"""Filters: the registry, argument checking at load, and response filters (headers, status)
on every response of the route — pages, proxied answers, error pages, redirects."""

from __future__ import annotations

import textwrap

import pytest
import yaml
from conftest import free_port, html, write_config
from multidict import CIMultiDict

from composer.config import load_config, read_config
from composer.errors import ConfigError
from composer.filters import (
    FILTERS,
    RemoveResponseHeader,
    RequestFilter,
    ResponseFilter,
    SetResponseHeader,
    Status,
    apply_response,
    parse_filters,
)
from composer.nodes import Reader
from composer.routing import build_table


@pytest.mark.parametrize("key", FILTERS)
def test_every_filter_declares_its_key_kind_and_what_it_takes(key):
    spec = FILTERS[key]
    assert spec.key == key
    assert spec.kind == ("request" if issubclass(spec, RequestFilter) else "response")
    assert issubclass(spec, RequestFilter) != issubclass(spec, ResponseFilter)
    assert spec.takes.text
    # shared by every request of its route: frozen, and no room for anything else
    assert spec.__dataclass_params__.frozen and "__slots__" in vars(spec)
    assert spec.__doc__ and f"`{key}" in spec.__doc__


@pytest.mark.parametrize("key, value, error", [
    ("set_response_header", "max-age=60", "takes a mapping"),
    ("set_response_header", {}, "takes a mapping"),
    ("set_response_header", {"bad header": "x"}, "not a valid header name"),
    ("set_response_header", {"x-a": "one\r\ntwo"}, "one-line string"),
    ("set_response_header", {"x-a": ["list"]}, "one-line string"),
    ("set_response_header", {"content-length": "5"}, "set by composer itself"),
    ("set_response_header", {"Transfer-Encoding": "gzip"}, "set by composer itself"),
    ("remove_response_header", {"x": "y"}, "header name or a list"),
    ("remove_response_header", [], "header name or a list"),
    ("remove_response_header", ["ok", "not ok"], "not a valid header name"),
    ("status", "teapot", "takes a status code from 200 to 599"),
    ("status", ["418"], "takes a status code"),
    ("status", None, "takes a status code"),
    ("status", "199", "takes a status code"),
    ("status", "600", "takes a status code"),
    ("status", "204", "other than 204, 205 and 304"),
    ("status", "205", "other than 204, 205 and 304"),
    ("status", "304", "other than 204, 205 and 304"),
    ("status", "0418", "takes a status code"),
    ("status", "٤١٨", "takes a status code"),  # Arabic-Indic digits: isdigit(), but not a status
])
def test_bad_arguments_are_refused(key, value, error):
    with pytest.raises(ValueError, match=error):
        FILTERS[key].create(value)


def test_set_replaces_and_remove_drops():
    headers = CIMultiDict({"cache-control": "no-store", "x-a": "1"})
    headers.add("x-a", "2")
    filters = (SetResponseHeader.create({"Cache-Control": "max-age=60"}), RemoveResponseHeader.create("x-a"))
    assert apply_response(filters, 200, headers) == 200
    assert list(headers.items()) == [("cache-control", "max-age=60")]
    assert apply_response((RemoveResponseHeader.create(["cache-control", "absent"]),), 404, headers) == 404
    assert not headers


def test_status_sets_the_status_in_file_order():
    headers: CIMultiDict[str] = CIMultiDict()
    assert Status.create("418") == Status(status=418)
    assert apply_response((Status.create("418"), SetResponseHeader.create({"x-a": "1"})), 200, headers) == 418
    assert apply_response((Status.create("418"), Status.create("503")), 302, headers) == 503
    assert apply_response((), 302, headers) == 302
    assert headers == {"x-a": "1"}


def routes_node(text: str) -> yaml.Node:
    node = yaml.compose(textwrap.dedent(text))
    assert node is not None
    return node


@pytest.mark.parametrize("target", ["template", "redirect"])
def test_request_filters_on_other_routes_are_named_with_the_response_filters(target):
    reader = Reader("routes.yaml")
    request, response = parse_filters(reader, routes_node("""        - set_response_header: {x-a: "1"}
        - strip_prefix: /api
        - status: 503
        - set_path: /v1/{id}
    """), params=("id",), target=target)
    assert request == ()
    assert [f.key for f in response] == ["set_response_header", "status"]
    known = ", ".join(k for k, spec in FILTERS.items() if spec.kind == "response")
    assert "status" in known and "strip_prefix" not in known
    assert reader.problems == [
        f"routes.yaml:{line}: {key} is a request filter, for backend routes only: a {target} route takes "
        f"response filters only ({known})" for line, key in ((2, "strip_prefix"), (4, "set_path"))]


def test_a_backend_route_takes_both_kinds_each_in_file_order():
    reader = Reader("routes.yaml")
    request, response = parse_filters(reader, routes_node("""        - status: 503
        - set_path: /v1/{id}
        - remove_response_header: x-a
        - strip_prefix: /api
    """), params=("id",), target="backend")
    assert reader.problems == []
    assert [f.key for f in request] == ["set_path", "strip_prefix"]
    assert [f.key for f in response] == ["status", "remove_response_header"]


def test_config_errors_name_the_filter_and_line(tmp_path):
    config = read_config(write_config(tmp_path, {"page.html": "<p>x</p>"}, routes="""\
        routes:
          - name: page
            match: {path: /page}
            template: page.html
            filters:
              - set_response_header: {cache-control: "max-age=60"}
              - strip_prefx: /api
              - remove_response_header: ["bad name"]
    """))
    with pytest.raises(ConfigError) as info:
        build_table(config)
    label = config.label
    assert info.value.problems == [
        f"{label}:7: unknown filter 'strip_prefx' (known: {', '.join(FILTERS)})",
        f"{label}:8: remove_response_header: 'bad name' is not a valid header name",
    ]
    assert list(FILTERS)[:7] == ["strip_prefix", "set_path", "rewrite_path", "set_request_header",
                                 "remove_request_header", "set_response_header", "remove_response_header"]


def test_filters_must_be_a_list_of_one_key_mappings(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, {"page.html": "<p>x</p>"}, routes="""\
            routes:
              - name: page
                match: {path: /page}
                template: page.html
                filters:
                  - {set_response_header: {a: b}, remove_response_header: c}
        """))
    assert [p.split(": ", 1)[1] for p in info.value.problems] == [
        "each filter is a mapping with exactly one key: the filter's name"]


async def test_filters_apply_in_order_to_pages_and_to_the_bare_500(fragments, start_composer):
    svc = await fragments({"/ok": html("<p>ok</p>"), "/down": html("down", status=503)})
    composer = await start_composer({
        "page.html": f'<body><fragment src="{svc.url("/ok")}"></fragment></body>',
        "broken.html": f'<body><fragment src="{svc.url("/down")}" primary></fragment></body>',
    }, routes="""
        routes:
          - name: page
            match: {path: /page}
            template: page.html
            filters:
              - set_response_header: {cache-control: "max-age=60", x-team: checkout}
              - remove_response_header: x-team
          - name: broken
            match: {path: /broken}
            template: broken.html
            filters:
              - set_response_header: {x-served-by: composer}
    """)
    resp, body = await composer.get("/page")
    assert resp.status == 200 and "<p>ok</p>" in body
    assert resp.headers.getall("cache-control") == ["max-age=60"]
    assert "x-team" not in resp.headers
    resp, _ = await composer.get("/broken")
    assert resp.status == 500
    assert resp.headers["x-served-by"] == "composer"
    assert resp.headers["cache-control"] == "no-cache, no-store, must-revalidate"


# --------------------------------------------------------------------------- the status filter

async def test_status_on_a_template_route(fragments, start_composer):
    svc = await fragments({"/ok": html("<p>we are back soon</p>")})
    composer = await start_composer({"page.html": f'<body><fragment src="{svc.url("/ok")}"></fragment></body>'},
                                    routes="""
        routes:
          - name: maintenance
            match: {path: /page}
            template: page.html
            filters:
              - status: 503
              - set_response_header: {retry-after: "120"}
    """)
    resp, body = await composer.get("/page")
    assert (resp.status, resp.headers["retry-after"]) == (503, "120")
    assert "<p>we are back soon</p>" in body


async def test_status_on_a_backend_route_and_its_error_page(fragments, start_composer):
    svc = await fragments({"/gone": html("<p>moved to v2</p>", headers={"x-b": "1"})})
    composer = await start_composer({}, routes=f"""
        routes:
          - name: retired
            match: {{path: /gone}}
            backend: {svc.url("/")}
            filters:
              - status: 410
          - name: down
            match: {{path: /down}}
            backend: http://127.0.0.1:{free_port()}
            filters:
              - status: 503
    """)
    resp, body = await composer.get("/gone")
    assert (resp.status, resp.reason, resp.headers["x-b"], body) == (410, "Gone", "1", "<p>moved to v2</p>")
    resp, body = await composer.get("/down")
    assert resp.status == 503 and "502" in body  # the page still says what failed


async def test_status_on_a_redirect_route(start_composer):
    composer = await start_composer({}, routes="""
        routes:
          - name: moved
            match: {path: /moved}
            redirect: {to: /here, status: 301}
            filters:
              - status: 308
    """)
    resp, _ = await composer.get("/moved")
    assert (resp.status, resp.headers["location"]) == (308, "/here")
