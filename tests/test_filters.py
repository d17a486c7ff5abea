"""Response-header filters: argument checking at load, effect on every response of the route."""

from __future__ import annotations

import pytest
from conftest import html, write_config
from multidict import CIMultiDict

from composer.config import load_config, read_config
from composer.errors import ConfigError
from composer.filters import FILTERS, RemoveResponseHeader, SetResponseHeader
from composer.routing import build_table


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
])
def test_bad_arguments_are_refused(key, value, error):
    with pytest.raises(ValueError, match=error):
        FILTERS[key].create(value)


def test_set_replaces_and_remove_drops():
    headers = CIMultiDict({"cache-control": "no-store", "x-a": "1"})
    headers.add("x-a", "2")
    SetResponseHeader.create({"Cache-Control": "max-age=60"}).on_response(headers)
    RemoveResponseHeader.create("x-a").on_response(headers)
    assert list(headers.items()) == [("cache-control", "max-age=60")]
    RemoveResponseHeader.create(["cache-control", "absent"]).on_response(headers)
    assert not headers


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
        f"{label}:7: unknown filter 'strip_prefx' (known: strip_prefix, set_path, rewrite_path, "
        "set_request_header, remove_request_header, set_response_header, remove_response_header)",
        f"{label}:8: remove_response_header: 'bad name' is not a valid header name",
    ]


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
