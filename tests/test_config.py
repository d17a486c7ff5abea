"""routes.yaml loading (SPEC §2) and the compiled route table: `routes.yaml:LINE: message`
problems, all collected in one ConfigError."""

from __future__ import annotations

import dataclasses
import re
import textwrap
import types
import typing
from pathlib import Path

import pytest

from composer import load
from composer.config import DEFAULT_FORWARD_HEADERS, SETTINGS, Settings, load_config, read_config
from composer.errors import ConfigError
from composer.routing import build_table, compile_path

PAGE = "<html><body><p>page</p></body></html>\n"

MINIMAL = """\
routes:
  - name: page
    match: {path: /page}
    template: page.html
"""


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    """Run in tmp_path with a templates/ folder holding page.html, so labels are `routes.yaml`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "page.html").write_text(PAGE, encoding="utf-8")
    return tmp_path


def write(here: Path, text: str) -> str:
    (here / "routes.yaml").write_text(textwrap.dedent(text), encoding="utf-8")
    return "routes.yaml"


def config_problems(here: Path, text: str) -> list[tuple[int, str]]:
    """(line, message) of each problem; loading and building the table must fail."""
    with pytest.raises(ConfigError) as info:
        build_table(load_config(write(here, text)))
    out = []
    for problem in info.value.problems:
        m = re.fullmatch(r"routes\.yaml:(\d+): (.+)", problem)
        assert m is not None, f"not `routes.yaml:LINE: message`: {problem!r}"
        out.append((int(m.group(1)), m.group(2)))
    assert out
    return out


def one_problem(here: Path, text: str, line: int, *words: str) -> str:
    problems = config_problems(here, text)
    assert len(problems) == 1, problems
    assert problems[0][0] == line, problems
    for word in words:
        assert word.lower() in problems[0][1].lower(), problems
    return problems[0][1]


# --- loading ---------------------------------------------------------------------------

def test_defaults(here):
    config = load_config(write(here, MINIMAL))
    s = config.settings
    assert s.templates.resolve() == here / "templates"
    assert s.fragment_timeout_ms == 3000
    assert tuple(s.forward_headers) == ("accept-language", "cookie", "referer", "user-agent",
                                        "traceparent", "tracestate")
    assert tuple(DEFAULT_FORWARD_HEADERS) == tuple(s.forward_headers)
    assert tuple(s.allowed_origins) == ()
    assert s.max_fragment_bytes == 5242880
    assert getattr(s, "manifest", None) is None
    assert [r.name for r in config.routes] == ["page"]
    assert config.label == "routes.yaml"


def test_every_settings_key(here):
    (here / "pages").mkdir()
    (here / "pages" / "page.html").write_text(PAGE, encoding="utf-8")
    config = load_config(write(here, textwrap.dedent("""\
        settings:
          templates: pages
          fragment_timeout_ms: 1500
          forward_headers: [Accept-Language, x-tenant]
          allowed_origins: ["http://127.0.0.1:*", "https://*.example.com"]
          max_fragment_bytes: 1024
        """) + MINIMAL))
    s = config.settings
    assert s.templates.resolve() == here / "pages"
    assert s.fragment_timeout_ms == 1500
    assert [h.lower() for h in s.forward_headers] == ["accept-language", "x-tenant"]
    assert tuple(s.allowed_origins) == ("http://127.0.0.1:*", "https://*.example.com")
    assert s.max_fragment_bytes == 1024
    table = build_table(config)
    assert [r.name for r in table.routes] == ["page"]


def test_settings_manifest_null_is_accepted(here):
    # SPEC §2 lists `manifest: null` among the settings, every key optional
    config = load_config(write(here, "settings:\n  manifest: null\n" + MINIMAL))
    assert getattr(config.settings, "manifest", None) is None


def test_settings_manifest_that_is_missing_is_an_error_naming_it(here):
    with pytest.raises(ConfigError) as info:
        load(write(here, "settings:\n  manifest: manifests/dev.yaml\n" + MINIMAL))
    assert info.value.problems == [f"{Path('manifests') / 'dev.yaml'}:1: manifest not found"]


def test_empty_settings_mapping_is_fine(here):
    config = load_config(write(here, "settings:\n" + MINIMAL))
    assert config.settings.fragment_timeout_ms == 3000


def test_relative_paths_are_relative_to_the_file(here, tmp_path_factory, monkeypatch):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    write(here, MINIMAL)
    monkeypatch.chdir(elsewhere)
    config = load_config(here / "routes.yaml")
    assert config.settings.templates == here / "templates"
    assert [r.name for r in build_table(config).routes] == ["page"]


def test_routes_keep_file_order(here):
    config = load_config(write(here, """\
        routes:
          - {name: b, match: {path: /b}, template: page.html}
          - {name: a, match: {path: /a}, template: page.html}
          - {name: c, match: {path: /c}, template: page.html}
        """))
    assert [r.name for r in config.routes] == ["b", "a", "c"]
    assert [r.name for r in build_table(config).routes] == ["b", "a", "c"]


# --- errors ----------------------------------------------------------------------------

def test_invalid_yaml_syntax(here):
    one_problem(here, """\
        routes:
          - name: page
            match: {path: /page}: x
            template: page.html
        """, 3, "yaml")


def test_invalid_yaml_bad_indentation(here):
    one_problem(here, """\
        settings:
          fragment_timeout_ms: 100
         templates: x
        routes: []
        """, 3, "yaml")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(here, text):
    one_problem(here, text, 1)


def test_missing_file(here):
    with pytest.raises(ConfigError) as info:
        load_config("nope.yaml")
    assert len(info.value.problems) == 1
    assert re.fullmatch(r"nope\.yaml:1: .+", info.value.problems[0]), info.value.problems


def test_unknown_top_level_key(here):
    one_problem(here, MINIMAL + "\nrutes: []\n", 6, "rutes")


def test_unknown_settings_key(here):
    one_problem(here, "settings:\n  fragment_timeout_ms: 100\n  timeout_ms: 5\n" + MINIMAL, 3, "timeout_ms")


def test_unknown_route_key(here):
    one_problem(here, """\
        routes:
          - name: page
            match: {path: /page}
            template: page.html
            tempalte: other.html
        """, 5, "tempalte")


def test_unknown_match_key(here):
    one_problem(here, """\
        routes:
          - name: page
            match:
              path: /page
              pathh: /other
            template: page.html
        """, 5, "pathh")


@pytest.mark.parametrize(("text", "line"), [
    ("settings:\n  fragment_timeout_ms: 100\n  fragment_timeout_ms: 200\n" + MINIMAL, 3),
    ("routes:\n  - name: page\n    name: other\n    match: {path: /page}\n    template: page.html\n", 3),
    (MINIMAL + "routes:\n  - {name: b, match: {path: /b}, template: page.html}\n", 5),
    ("routes:\n  - name: page\n    match:\n      path: /page\n      path: /p2\n    template: page.html\n", 5),
], ids=["settings", "route", "top", "match"])
def test_duplicate_keys(here, text, line):
    one_problem(here, text, line, "duplicate")


@pytest.mark.parametrize(("setting", "value"), [
    ("fragment_timeout_ms", '"100"'),     # string where int
    ("fragment_timeout_ms", "true"),      # bool where int
    ("fragment_timeout_ms", "1.5"),
    ("fragment_timeout_ms", "[100]"),
    ("max_fragment_bytes", "yes"),
    ("max_fragment_bytes", "big"),
    ("forward_headers", "cookie"),        # string where list
    ("forward_headers", "[cookie, 5]"),
    ("forward_headers", "{cookie: 1}"),
    ("allowed_origins", '"http://127.0.0.1:*"'),
    ("allowed_origins", "[1]"),
    ("allowed_origins", '["ftp://files.example.com"]'),
    ("templates", "[a, b]"),
    ("templates", '""'),
])
def test_wrong_types(here, setting, value):
    one_problem(here, f"settings:\n  max_fragment_bytes: 100\n  {setting}: {value}\n" + MINIMAL, 3)


def test_settings_not_a_mapping(here):
    one_problem(here, "settings: [a, b]\n" + MINIMAL, 1, "settings")


@pytest.mark.parametrize("header", ["x-request-id", "X-Request-URI", "x-request-host", "accept-encoding"])
def test_forward_headers_composer_sends_itself_load_with_a_warning_and_are_dropped(here, header):
    table = load(write(here, f"settings:\n  forward_headers:\n    - cookie\n    - {header}\n" + MINIMAL))
    assert table.settings.forward_headers == ("cookie",)  # composer's own value goes out, once
    assert table.warnings == ((f"routes.yaml:4: warning: settings.forward_headers: {header.lower()!r} is sent "
                               "by composer itself; listing it changes nothing"),)


@pytest.mark.parametrize("header", ["connection", "Transfer-Encoding", "te", "upgrade", "keep-alive",
                                    "proxy-authorization", "host", "content-length"])
def test_forward_headers_that_describe_a_connection_or_message_are_refused(here, header):
    one_problem(here, f"settings:\n  forward_headers: [cookie, {header}]\n" + MINIMAL, 2,
                "cannot include", repr(header.lower()))


def test_settings_table_is_the_settings_dataclass():
    """Each `Settings` field is one row (a key, a reader, a default of the field's type): the
    dataclass and what routes.yaml accepts cannot drift apart."""
    hints = typing.get_type_hints(Settings)
    assert [row.name for row in SETTINGS.values()] == [f.name for f in dataclasses.fields(Settings)]
    for key, row in SETTINGS.items():
        assert callable(row.metadata["read"]), key
        kind = typing.get_origin(hints[row.name]) or hints[row.name]
        if kind not in (typing.Union, types.UnionType):  # `str | None`: None, checked by mypy
            assert isinstance(row.default, kind), (key, row.default, hints[row.name])
    assert "cache" in SETTINGS and SETTINGS["cache"].name == "cache_max_bytes"  # `cache: {max_bytes}`
    assert Settings().fragment_timeout_ms == 3000  # every field has a default: no key is required


def test_unknown_settings_key_lists_every_key_of_the_table(here):
    message = one_problem(here, "settings:\n  timeout_ms: 5\n" + MINIMAL, 2, "timeout_ms")
    assert message.endswith(f"(known: {', '.join(SETTINGS)})"), message


def test_load_builds_the_shipped_example_with_its_manifest():
    """`composer.load` reads settings.manifest (manifests/dev.yaml) like `composer serve` does."""
    table = load(Path(__file__).parent.parent / "routes.yaml")
    assert table.manifest is not None and "footer" in table.manifest.fragments
    assert {r.name for r in table.routes} >= {"home", "product", "stock-api", "old-product-urls"}
    assert table.settings.allowed_origins == ("http://127.0.0.1:9101",)


@pytest.mark.parametrize(("setting", "value"), [
    ("fragment_timeout_ms", "0"),
    ("fragment_timeout_ms", "-5"),
    ("max_fragment_bytes", "0"),
    ("max_fragment_bytes", "-1"),
])
def test_out_of_range(here, setting, value):
    one_problem(here, f"settings:\n  templates: templates\n\n  {setting}: {value}\n" + MINIMAL, 4, setting)


def test_missing_routes(here):
    one_problem(here, "settings:\n  fragment_timeout_ms: 100\n", 1, "routes")


def test_routes_not_a_list(here):
    one_problem(here, "settings: {}\nroutes:\n  page: {}\n", 3, "routes")


@pytest.mark.parametrize("missing", ["name", "match", "template"])
def test_route_missing_a_key(here, missing):
    lines = {
        "name": "    name: second",
        "match": "    match: {path: /second}",
        "template": "    template: page.html",
    }
    body = "\n".join(v for k, v in lines.items() if k != missing)
    text = MINIMAL + "  -\n" + body + "\n"
    problems = config_problems(here, text)
    assert len(problems) == 1, problems
    assert problems[0][0] in (5, 6), problems    # the `-` of the entry, or its first key
    assert missing in problems[0][1], problems


def test_duplicate_route_names(here):
    one_problem(here, MINIMAL + """\
  - name: other
    match: {path: /other}
    template: page.html
  - name: page
    match: {path: /again}
    template: page.html
""", 8, "page")


@pytest.mark.parametrize("path", ["page", "'*'", "'{sku}'", "''"])
def test_path_must_start_with_slash(here, path):
    one_problem(here, f"""\
        routes:
          - name: page
            match:
              path: {path}
            template: page.html
        """, 4)


@pytest.mark.parametrize("path", ["/items/{id:[0-9}", "/items/{id:(}", "/a/{x}/{x}", "/a/{x"])
def test_bad_path_pattern(here, path):
    one_problem(here, f"""\
        routes:
          - name: page
            match: {{path: /page}}
            template: page.html
          - name: items
            match:
              path: "{path}"
            template: page.html
        """, 7)


def test_template_file_not_found(here):
    one_problem(here, """\
        routes:
          - name: page
            match: {path: /page}
            template: page.html
          - name: other
            match: {path: /other}

            template: missing.html
        """, 8, "missing.html")


def test_all_problems_are_collected(here):
    problems = config_problems(here, """\
        settings:
          fragment_timeout_ms: 0
          colour: blue
        routes:
          - name: a
            match: {path: /a}
            template: page.html
          - name: b
            match: {path: b}
            template: page.html
          - name: c
            match: {path: /c}
          - name: a
            match: {path: /d}
            template: page.html
        """)
    assert sorted(line for line, _ in problems) == [2, 3, 9, 11, 13], problems


def test_all_table_problems_are_collected(here):
    (here / "templates" / "bad.html").write_text(
        '<body>\n<fragment src="ftp://x/"></fragment>\n<fragment primary="no" src="http://a/"></fragment>\n',
        encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        build_table(read_config(write(here, """\
            routes:
              - name: a
                match: {path: "/a/{x:[}"}
                template: page.html
              - name: b
                match: {path: /b}
                template: nothing.html
              - name: c
                match: {path: /c}
                template: bad.html
            """)))
    problems = info.value.problems
    assert len(problems) == 4, problems
    assert problems[0].startswith("routes.yaml:3: ")
    assert problems[1].startswith("routes.yaml:7: ")
    bad = str(Path("templates") / "bad.html")
    assert sorted(p.split(": ")[0] for p in problems[2:]) == [f"{bad}:2", f"{bad}:3"]


# --- paths and the route table ---------------------------------------------------------

def test_compile_path_param_is_one_segment():
    regex, names = compile_path("/products/{sku}")
    assert names == ("sku",)
    assert regex.match("/products/42").groupdict() == {"sku": "42"}
    for path in ("/products/", "/products/42/x", "/products", "/products/42/", "/xproducts/42"):
        assert regex.match(path) is None, path


def test_compile_path_regex_param():
    regex, names = compile_path("/static/{rest:.*}")
    assert names == ("rest",)
    assert regex.match("/static/a/b/c.css").group("rest") == "a/b/c.css"
    assert regex.match("/static/").group("rest") == ""
    assert regex.match("/staticx") is None


def test_compile_path_regex_with_braces():
    regex, names = compile_path("/items/{id:[0-9]{3}}/{slug}")
    assert names == ("id", "slug")
    assert regex.match("/items/123/x").groupdict() == {"id": "123", "slug": "x"}
    for path in ("/items/12/x", "/items/1234/x", "/items/abc/x"):
        assert regex.match(path) is None, path


def test_compile_path_literals_are_literal():
    regex, names = compile_path("/a.b/c+d/(x)")
    assert names == ()
    assert regex.match("/a.b/c+d/(x)")
    assert regex.match("/aXb/c+d/(x)") is None
    assert regex.match("/a.b/ccd/(x)") is None


@pytest.mark.parametrize("pattern", ["/a/{x:[}", "/a/{x}/{x}", "/a/{x", "/a/x}"])
def test_compile_path_errors(pattern):
    with pytest.raises(ValueError):
        compile_path(pattern)


def table(here: Path, routes: str):
    return build_table(load_config(write(here, routes)))


