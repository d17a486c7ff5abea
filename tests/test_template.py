"""The template compiler (SPEC §3): literal bytes untouched, fragment tags found the way an
HTML parser sees them, and every problem reported as `file:LINE: message`."""

from __future__ import annotations

import re
from pathlib import Path

import hypothesis
import pytest
from conftest import html
from hypothesis import strategies as st
from selectolax.lexbor import LexborHTMLParser
from yarl import URL

from composer.config import Settings
from composer.errors import ConfigError
from composer.template import (
    ASYNC_SLOT,
    Fragment,
    Template,
    UrlTemplate,
    compile_template,
)


def _settings(tmp_path: Path, **kwargs) -> Settings:
    return Settings(templates=tmp_path, **kwargs)


def _write(tmp_path: Path, source: str | bytes, name: str = "page.html") -> Path:
    file = tmp_path / name
    file.write_bytes(source.encode("utf-8") if isinstance(source, str) else source)
    return file


def compile_source(tmp_path: Path, source: str | bytes, *, params: tuple[str, ...] = (),
                   name: str = "page.html", **settings) -> Template:
    file = _write(tmp_path, source, name)
    return compile_template(file, params=params, settings=_settings(tmp_path, **settings), name=name)


def problems_of(tmp_path: Path, source: str | bytes, *, params: tuple[str, ...] = (),
                **settings) -> tuple[str, list[str]]:
    """Compile a template that must fail; returns (file label, problems)."""
    file = _write(tmp_path, source)
    with pytest.raises(ConfigError) as info:
        compile_template(file, params=params, settings=_settings(tmp_path, **settings), name="page.html")
    assert info.value.problems, "ConfigError without problems"
    return str(file), info.value.problems


def assert_one_problem(label: str, problems: list[str], line: int, *words: str) -> str:
    """Exactly one problem, `label:line: message`, whose message mentions every word."""
    assert len(problems) == 1, problems
    m = re.fullmatch(re.escape(label) + r":(\d+): (.+)", problems[0])
    assert m is not None, problems[0]
    assert int(m.group(1)) == line, problems[0]
    for word in words:
        assert word.lower() in m.group(2).lower(), problems[0]
    return m.group(2)


def rebuild(template: Template, spans: list[bytes]) -> bytes:
    """Literal chunks with each fragment replaced by its original source span."""
    out: list[bytes] = []
    fragments = iter(spans)
    for chunk in template.chunks:
        if isinstance(chunk, bytes):
            out.append(chunk)
        elif isinstance(chunk, Fragment):
            out.append(next(fragments))
        else:
            assert chunk is ASYNC_SLOT
    assert next(fragments, None) is None, "fewer fragments in chunks than expected"
    return b"".join(out)


def fragments_of(template: Template) -> list[Fragment]:
    return [c for c in template.chunks if isinstance(c, Fragment)]


# --- literal bytes pass through untouched ------------------------------------------------

def test_literal_chunks_are_byte_identical_to_the_source(tmp_path):
    frag1 = '<fragment id="a" src="http://a.svc/x"></fragment>'
    frag2 = "<FRAGMENT src='http://b.svc/y' async>\r\n  <p class=fb>Grüße — 日本 🙂</p>\r\n</FRAGMENT>"
    frag3 = '<script type="fragment" id="meta" src="http://seo.svc/meta"></script>'
    source = (
        "<!doctype HTML>\r\n"
        "<HTML lang=de>\r\n<head>" + frag3 + "<meta charset=utf-8>"
        "<title>Grüße &amp; ünïcödé — 日本語 🙂</title></head>\r\n"
        "<Body  class=page data-x='a \"quoted\" value' title=\"it's\" data-empty=''  checked>\r\n"
        "<!-- a comment with <b>markup</b> --><p>before &nbsp; &lt;fragment&gt;</p>\r\n"
        + frag1 + "\r\n<br/><img src=x.png alt=unquoted>\r\n"
        + frag2 + "\r\n<p>after\ttab</p>\r\n"
        "</Body>\r\n</HTML>\r\n"
    )
    raw = source.encode("utf-8")
    template = compile_source(tmp_path, raw)
    assert len(template.fragments) == 3
    assert rebuild(template, [frag3.encode(), frag1.encode(), frag2.encode()]) == raw
    # the literal pieces are exactly the bytes between the fragment tags
    literals = [c for c in template.chunks if isinstance(c, bytes)]
    assert literals[0] == raw[: raw.index(frag3.encode())]
    assert b"\r\n" in literals[1] and b"\n\n" not in b"".join(literals)


def test_page_without_fragments_is_one_literal_and_the_async_slot(tmp_path):
    source = "<!DOCTYPE html>\n<html><head></head>\n<body><p>Ä</p></body>\n</html>\n"
    template = compile_source(tmp_path, source)
    assert template.fragments == ()
    assert template.primary is None
    assert rebuild(template, []) == source.encode()
    assert template.chunks.count(ASYNC_SLOT) == 1


def test_script_type_fragment_head_form(tmp_path):
    source = ('<html><head>\n<script type="fragment" id="meta" src="http://seo.svc/meta"></script>\n'
              '<script src="/app.js"></script><script type="text/javascript">var a = 1;</script>\n'
              '</head><body></body></html>')
    template = compile_source(tmp_path, source)
    assert [f.id for f in template.fragments] == ["meta"]
    meta = template.fragments[0]
    assert meta.line == 2
    assert meta.src.render({}) == URL("http://seo.svc/meta")
    assert rebuild(template, [b'<script type="fragment" id="meta" src="http://seo.svc/meta"></script>']) \
        == source.encode()


@pytest.mark.parametrize("hiding", [
    '<!-- <fragment src="http://a.svc/x"></fragment> -->',
    '<!-- <fragment></fragment> has no src but is only a comment -->',
    "<script>var s = '<fragment src=\"http://a.svc/x\"></fragment>';</script>",
    "<script>document.write('<fragment primary=\"nope\"></fragment>')</script>",
    '<div title=\'<fragment src="http://a.svc/x"></fragment>\'>text</div>',
    '<a href="#" data-tpl="<fragment src=http://a.svc/x></fragment>">x</a>',
    '<textarea><fragment src="http://a.svc/x"></fragment></textarea>',
], ids=["comment", "comment-invalid", "script", "script-invalid", "attribute-single", "attribute-double",
        "textarea"])
def test_fragment_as_text_is_not_a_fragment(tmp_path, hiding):
    source = f"<html><body>\n{hiding}\n<p>x</p>\n</body></html>"
    template = compile_source(tmp_path, source)
    assert template.fragments == ()
    assert rebuild(template, []) == source.encode()


def test_real_fragment_next_to_a_commented_one(tmp_path):
    real = '<fragment id="real" src="http://a.svc/real"></fragment>'
    source = f'<body>\n<!-- <fragment id="fake" src="http://a.svc/fake"></fragment> -->\n{real}\n</body>'
    template = compile_source(tmp_path, source)
    assert [f.id for f in template.fragments] == ["real"]
    assert template.fragments[0].line == 3
    assert rebuild(template, [real.encode()]) == source.encode()


def test_self_closing_fragment(tmp_path):
    tag = '<fragment src="http://a.svc/x"/>'
    source = f"<body>\n{tag}<p>after</p>\n</body>"
    template = compile_source(tmp_path, source)
    assert len(template.fragments) == 1
    fragment = template.fragments[0]
    assert fragment.src.render({}) == URL("http://a.svc/x")
    assert fragment.fallback_html == b""
    assert rebuild(template, [tag.encode()]) == source.encode()
    literals = [c for c in template.chunks if isinstance(c, bytes)]
    assert literals[1].startswith(b"<p>after</p>")


def test_self_closing_with_space_before_slash(tmp_path):
    tag = "<fragment src=http://a.svc/x />"
    source = f"<body>{tag}<p>after</p>\n<fragment src='http://a.svc/y'></fragment></body>"
    template = compile_source(tmp_path, source)
    assert [f.src.render({}) for f in template.fragments] == [URL("http://a.svc/x"), URL("http://a.svc/y")]


def test_unquoted_src_keeps_trailing_slash(tmp_path):
    tag = "<fragment src=http://a/b/></fragment>"
    source = f"<body>\n{tag}\n</body>"
    template = compile_source(tmp_path, source)
    assert len(template.fragments) == 1
    assert str(template.fragments[0].src.render({})) == "http://a/b/"
    assert rebuild(template, [tag.encode()]) == source.encode()


def test_inline_fallback_markup_is_captured_byte_exact(tmp_path):
    inner = "\r\n  <p class=fb data-x='1'>Recommendations are unavailable — 日本 &amp; <b>bold</B></p>\n  "
    tag = f'<fragment id="recos" src="http://r.svc/" async>{inner}</fragment >'
    source = f"<body>{tag}</body>"
    template = compile_source(tmp_path, source)
    assert template.fragments[0].fallback_html == inner.encode("utf-8")
    assert rebuild(template, [tag.encode()]) == source.encode()


def test_attributes_are_compiled(tmp_path):
    source = ('<body>\n'
              '<fragment id="p" src="http://a.svc/p" primary timeout="1500"></fragment>\n'
              '<fragment id="r" src="http://a.svc/r" fallback-src="http://b.svc/r" async public></fragment>\n'
              '<fragment id="f" src="http://a.svc/f" primary="" async="async"></fragment>\n'
              '</body>')
    with pytest.raises(ConfigError):  # two primaries (the empty value still means primary)
        compile_source(tmp_path, source)
    template = compile_source(tmp_path, source.replace('primary="" ', ""), fragment_timeout_ms=700)
    p, r, f = template.fragments
    assert (p.primary, p.is_async, p.public) == (True, False, False)
    assert p.timeout == pytest.approx(1.5)
    assert (r.primary, r.is_async, r.public) == (False, True, True)
    assert r.fallback_src is not None and r.fallback_src.render({}) == URL("http://b.svc/r")
    assert r.timeout == pytest.approx(0.7)
    assert (f.primary, f.is_async) == (False, True)
    assert template.primary is p
    assert template.async_fragments == (r, f)


# --- the async slot --------------------------------------------------------------------

def test_async_slot_is_right_before_the_real_closing_body(tmp_path):
    source = ("<html><body>\n<!-- </body> -->\n<script>var s = '</body>';</script>\n"
              '<fragment src="http://a.svc/x" async></fragment>\n<p>last</p>\n</BODY>\n</html>\n')
    template = compile_source(tmp_path, source)
    chunks = template.chunks
    assert chunks.count(ASYNC_SLOT) == 1
    i = chunks.index(ASYNC_SLOT)
    assert isinstance(chunks[i - 1], bytes) and chunks[i - 1].endswith(b"<p>last</p>\n")
    assert chunks[i + 1] == b"</BODY>\n</html>\n"


def test_async_slot_at_the_end_without_closing_body(tmp_path):
    source = '<p>no body tag</p>\n<fragment src="http://a.svc/x" async></fragment>\n<!-- </body> -->\n'
    template = compile_source(tmp_path, source)
    assert template.chunks[-1] is ASYNC_SLOT
    assert template.chunks.count(ASYNC_SLOT) == 1
    assert template.chunks[-2] == b"\n<!-- </body> -->\n"


def test_closing_body_inside_inline_fallback_is_not_the_slot(tmp_path):
    source = ('<body>\n<fragment src="http://a.svc/x">oops</body></fragment>\n<p>z</p>\n</body>\n')
    template = compile_source(tmp_path, source)
    i = template.chunks.index(ASYNC_SLOT)
    assert template.chunks[i - 1] == b"\n<p>z</p>\n"
    assert template.chunks[i + 1] == b"</body>\n"


# --- ids --------------------------------------------------------------------------------

def test_default_ids(tmp_path):
    source = ('<body>\n'
              '<fragment id="first" src="http://a.svc/1"></fragment>\n'
              '<fragment src="http://a.svc/2"></fragment>\n'
              '<fragment name="footer" src="http://a.svc/3"></fragment>\n'
              '<script type="fragment" src="http://a.svc/4"></script>\n'
              '<fragment src="http://a.svc/5"/>\n'
              '</body>')
    (tmp_path / "shop").mkdir()
    template = compile_source(tmp_path, source, name="shop/page.html")
    assert [f.id for f in template.fragments] == [
        "first", "shop/page.html#2", "footer", "shop/page.html#4", "shop/page.html#5"]
    assert [f.line for f in template.fragments] == [2, 3, 4, 5, 6]


# --- URL templates ----------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    ("42", "42"),
    ("a/b", "a%2Fb"),
    ("a?x=1", "a%3Fx%3D1"),
    ("a#frag", "a%23frag"),
    ("user@evil", "user%40evil"),
    ("a\r\nX-Injected: 1", "a%0D%0AX-Injected%3A%201"),
    (".", "%2E"),
    ("..", "%2E%2E"),
    ("100%", "100%25"),
    ("%2F", "%252F"),
    ("ü", "%C3%BC"),
])
def test_url_template_quotes_params(value, expected):
    url = UrlTemplate.parse("http://p.svc:8080/p/{sku}/x?sku={sku}").render({"sku": value})
    assert str(url) == f"http://p.svc:8080/p/{expected}/x?sku={expected}"
    assert url.raw_host == "p.svc" and url.port == 8080
    assert url.raw_path == f"/p/{expected}/x"


def test_url_template_params_from_a_compiled_template(tmp_path):
    template = compile_source(
        tmp_path, '<fragment src="http://p.svc/p/{sku}/{rest}"></fragment>', params=("sku", "rest"))
    url = template.fragments[0].src.render({"sku": "..", "rest": "../../admin"})
    assert str(url) == "http://p.svc/p/%2E%2E/..%2F..%2Fadmin"
    assert template.fragments[0].src.params == ("sku", "rest")


# --- errors: `file:LINE: message` -------------------------------------------------------

def test_two_primaries(tmp_path):
    label, problems = problems_of(tmp_path, (
        '<body>\n<fragment src="http://a.svc/1" primary></fragment>\n\n'
        '<fragment src="http://a.svc/2" primary></fragment>\n</body>'))
    assert_one_problem(label, problems, 4, "primary")


def test_neither_src_nor_name(tmp_path):
    label, problems = problems_of(tmp_path, '<body>\n\n<fragment id="x"></fragment>\n</body>')
    assert_one_problem(label, problems, 3, "src")


def test_script_form_without_src(tmp_path):
    label, problems = problems_of(tmp_path, '<head>\n<script type="fragment" id="m"></script>\n</head>')
    assert_one_problem(label, problems, 2, "src")


def test_name_without_a_manifest(tmp_path):
    label, problems = problems_of(tmp_path, '<body>\n<fragment name="footer"></fragment>\n</body>')
    assert_one_problem(label, problems, 2, "manifest")


@pytest.mark.parametrize("timeout", ["0", "-1", "abc", "1.5", "", "99999999999"])
def test_bad_timeout(tmp_path, timeout):
    label, problems = problems_of(
        tmp_path, f'<body>\n\n<fragment src="http://a.svc/x" timeout="{timeout}"></fragment>\n</body>')
    assert_one_problem(label, problems, 3, "timeout")


@pytest.mark.parametrize("attr", ["src", "fallback-src"])
@pytest.mark.parametrize("url", ["ftp://a.svc/x", "javascript:alert(1)", "/relative/path", "relative.html",
                                 "//a.svc/scheme-relative", "file:///etc/passwd", "http://"])
def test_non_http_urls(tmp_path, attr, url):
    other = 'src="http://a.svc/ok"' if attr == "fallback-src" else ""
    label, problems = problems_of(
        tmp_path, f'<body>\n<p>\n</p><fragment {other} {attr}="{url}"></fragment>\n</body>')
    assert_one_problem(label, problems, 3, attr)


def test_https_is_fine(tmp_path):
    template = compile_source(tmp_path, '<fragment src="https://a.svc/x" fallback-src="HTTP://b.svc/y"></fragment>')
    assert template.fragments[0].src.render({}) == URL("https://a.svc/x")


@pytest.mark.parametrize("attr", ["src", "fallback-src"])
def test_unknown_param(tmp_path, attr):
    other = 'src="http://a.svc/ok"' if attr == "fallback-src" else ""
    label, problems = problems_of(
        tmp_path, f'<body>\n\n\n<fragment {other} {attr}="http://a.svc/p/{{nope}}"></fragment>\n</body>',
        params=("sku",))
    assert_one_problem(label, problems, 4, "nope")


@pytest.mark.parametrize("url", ["http://{sku}.svc/p", "http://{sku}/p", "http://a.svc{sku}/p",
                                 "http://{sku}@a.svc/p"])
def test_param_in_host(tmp_path, url):
    label, problems = problems_of(
        tmp_path, f'<body>\n<fragment src="{url}"></fragment>\n</body>', params=("sku",))
    assert_one_problem(label, problems, 2)


def test_unknown_attribute(tmp_path):
    label, problems = problems_of(
        tmp_path, '<body>\n<fragment src="http://a.svc/x"\n   tiemout="100"></fragment>\n</body>')
    assert_one_problem(label, problems, 2, "tiemout")


@pytest.mark.parametrize(("attr", "value"), [("primary", "false"), ("async", "no"), ("public", "1")])
def test_boolean_attribute_with_a_value(tmp_path, attr, value):
    label, problems = problems_of(
        tmp_path, f'<body>\n\n<fragment src="http://a.svc/x" {attr}="{value}"></fragment>\n</body>')
    assert_one_problem(label, problems, 3, attr)


def test_nested_fragments(tmp_path):
    label, problems = problems_of(tmp_path, (
        '<body>\n<fragment src="http://a.svc/outer">\n  <p>\n'
        '  <fragment src="http://a.svc/inner"></fragment>\n</fragment>\n</body>'))
    lines = []
    for problem in problems:
        m = re.fullmatch(re.escape(label) + r":(\d+): (.+)", problem)
        assert m is not None, problem
        lines.append(int(m.group(1)))
        assert "nest" in m.group(2).lower(), problem
    assert set(lines) <= {2, 4}, problems


def test_unclosed_fragment(tmp_path):
    label, problems = problems_of(
        tmp_path, '<body>\n<p>x</p>\n<fragment src="http://a.svc/x">\n<p>tail</p>\n</body>\n</html>\n')
    assert_one_problem(label, problems, 3, "close")


def test_duplicate_ids(tmp_path):
    label, problems = problems_of(tmp_path, (
        '<body>\n<fragment id="x" src="http://a.svc/1"></fragment>\n'
        '<fragment id="y" src="http://a.svc/2"></fragment>\n'
        '<fragment id="x" src="http://a.svc/3"></fragment>\n</body>'))
    assert_one_problem(label, problems, 4, "x")


def test_duplicate_ids_via_default_name(tmp_path):
    label, problems = problems_of(tmp_path, (
        '<body>\n<fragment name="footer" src="http://a.svc/1"></fragment>\n'
        '<fragment id="footer" src="http://a.svc/2"></fragment>\n</body>'))
    assert_one_problem(label, problems, 3, "footer")


def test_not_utf8(tmp_path):
    label, problems = problems_of(tmp_path, b"<p>caf\xe9</p>\n<body></body>\n")
    assert_one_problem(label, problems, 1, "utf-8")


@pytest.mark.parametrize("attr", ["src", "fallback-src"])
def test_allowed_origins_violation(tmp_path, attr):
    other = 'src="http://127.0.0.1:9101/ok"' if attr == "fallback-src" else ""
    label, problems = problems_of(
        tmp_path, f'<body>\n\n<fragment {other} {attr}="http://evil.example/x"></fragment>\n</body>',
        allowed_origins=("http://127.0.0.1:*", "https://*.example.com"))
    assert_one_problem(label, problems, 3, "allowed_origins")


@pytest.mark.parametrize(("url", "ok"), [
    ("http://127.0.0.1:9101/x", True),
    ("http://127.0.0.1:1/x", True),
    ("https://a.example.com/x", True),
    ("https://a.b.example.com:8443/x", True),
    ("http://a.example.com/x", False),       # wrong scheme
    ("https://example.com.evil.net/x", False),
    ("https://evil.net/a.example.com", False),
    ("http://localhost:9101/x", False),
])
def test_allowed_origins_globs(tmp_path, url, ok):
    source = f'<fragment src="{url}"></fragment>'
    allowed = ("http://127.0.0.1:*", "https://*.example.com")
    if ok:
        assert len(compile_source(tmp_path, source, allowed_origins=allowed).fragments) == 1
    else:
        label, problems = problems_of(tmp_path, source, allowed_origins=allowed)
        assert_one_problem(label, problems, 1)


def test_every_problem_of_a_file_is_reported(tmp_path):
    label, problems = problems_of(tmp_path, (
        "<html><body>\n"                                                        # 1
        '<fragment src="http://a.svc/1" primary></fragment>\n'                  # 2
        '<fragment src="ftp://a.svc/2"></fragment>\n'                           # 3
        "<p>ok</p>\n"                                                           # 4
        '<fragment src="http://a.svc/4" timeout="soon"></fragment>\n'           # 5
        '<fragment src="http://a.svc/{nope}"></fragment>\n'                     # 6
        '<fragment src="http://a.svc/6" primary></fragment>\n'                  # 7
        '<fragment id="dup" src="http://a.svc/7"></fragment>\n'                 # 8
        '<fragment id="dup" src="http://a.svc/8"></fragment>\n'                 # 9
        '<fragment src="http://a.svc/9" async="yes"></fragment>\n'              # 10
        "</body></html>\n"), params=("sku",))
    lines = []
    for problem in problems:
        m = re.fullmatch(re.escape(label) + r":(\d+): .+", problem)
        assert m is not None, problem
        lines.append(int(m.group(1)))
    assert sorted(lines) == [3, 5, 6, 7, 9, 10], problems


def test_error_lines_in_a_crlf_file(tmp_path):
    label, problems = problems_of(
        tmp_path, '<html>\r\n<body>\r\n\r\n<fragment src="http://a.svc/x" timeout="0"></fragment>\r\n</body>\r\n')
    assert_one_problem(label, problems, 4, "timeout")


# --- markup inside attribute values, comments and tags is text; `<template>` content is markup ----
#
# The compiler marks candidate tags before asking the HTML parser about them. A mark must not
# change how its surroundings parse, wherever it lands: in a quoted or unquoted attribute
# value, a tag or attribute name, a comment or processing instruction, script or RCDATA text.

BUTTON = ("<button onclick=\"w('<script src=x></script>')\" "
          "title='<fragment src=\"http://a.svc/fake\"></fragment>'>b</button>")
BODY_IN_ATTRIBUTE = '<a title="<script >" data-x="</body>">'


def test_a_fragment_in_an_attribute_value_is_text_whatever_the_other_attributes_hold(tmp_path):
    real = '<fragment src="http://a.svc/real"></fragment>'
    source = f"<html><body>\n{BUTTON}\n{real}\n</body></html>\n"
    template = compile_source(tmp_path, source)
    assert [str(f.src.render({})) for f in template.fragments] == ["http://a.svc/real"]
    assert template.fragments[0].line == 3
    assert rebuild(template, [real.encode()]) == source.encode()
    assert template.chunks[0] == f"<html><body>\n{BUTTON}\n".encode()


def test_the_async_slot_is_the_real_closing_body_not_one_in_an_attribute_value(tmp_path):
    source = (f'<html><body>\n<fragment src="http://a.svc/x" async></fragment>\n<p>last</p>\n'
              f"</body>{BODY_IN_ATTRIBUTE}\n</html>\n")
    template = compile_source(tmp_path, source)
    i = template.chunks.index(ASYNC_SLOT)
    assert template.chunks[i - 1] == b"\n<p>last</p>\n"
    assert template.chunks[i + 1] == f"</body>{BODY_IN_ATTRIBUTE}\n</html>\n".encode()


@pytest.mark.parametrize("inner", [
    "<a title=</fragment>x</a>",                      # unquoted attribute value
    "<a </fragment>x</a>",                            # attribute name
    '<?php echo "</fragment>" ?>',                    # processing instruction (a bogus comment)
    "<!x </fragment>",                                # bogus comment
    "<a title=<fragment/>x</a>",                      # `<fragment/` as an unquoted value
    "<a title=<fragment/src=http://a.svc/z>x</a>",
    "<a title='</fragment>' data-y=\"</fragment>\">x</a>",
    "<script>w('<fragment src=x>', \"</fragment>\")</script>",
    "<textarea></fragment></textarea>",
], ids=["unquoted", "attribute-name", "processing-instruction", "bogus-comment", "unquoted-self-closing",
        "unquoted-slash", "quoted", "script", "textarea"])
def test_a_closing_fragment_tag_that_is_text_does_not_close_the_fragment(tmp_path, inner):
    tag = f'<fragment src="http://a.svc/x">{inner}</fragment>'
    source = f"<body>\n{tag}\n<p>after</p>\n</body>\n"
    template = compile_source(tmp_path, source)
    assert len(template.fragments) == 1
    assert template.fragments[0].fallback_html == inner.encode()
    assert rebuild(template, [tag.encode()]) == source.encode()


def test_an_unquoted_value_after_a_fragment_in_an_attribute_keeps_its_tag_attributes(tmp_path):
    # `title=<fragment/async>` is one unquoted value: the fragment tag around it is not async
    tag = '<fragment src="http://a.svc/x" data-t=<fragment/async></fragment>'
    template = compile_source(tmp_path, f"<body>{tag}</body>")
    assert len(template.fragments) == 1
    assert template.fragments[0].is_async is False
    assert template.fragments[0].fallback_html == b""


def test_a_fragment_in_a_template_element_is_a_fragment(tmp_path):
    first = '<fragment id="a" src="http://a.svc/a"></fragment>'
    inner = '<fragment id="b" src="http://a.svc/b"><p>fallback</p></fragment>'
    deeper = '<fragment id="c" src="http://a.svc/c"/>'
    last = '<script type="fragment" id="d" src="http://a.svc/d"></script>'
    source = (f'<html><head><template id="h">{last}</template></head><body>\n{first}\n'
              f'<template id="t"><div>{inner}</div>\n<template>{deeper}</template></template>\n'
              "</body></html>\n")
    template = compile_source(tmp_path, source)
    assert [f.id for f in template.fragments] == ["d", "a", "b", "c"]
    assert [f.line for f in template.fragments] == [1, 2, 3, 4]
    assert template.fragments[2].fallback_html == b"<p>fallback</p>"
    assert rebuild(template, [last.encode(), first.encode(), inner.encode(), deeper.encode()]) == source.encode()


def test_a_closing_body_in_a_template_element_is_not_the_async_slot(tmp_path):
    source = '<body><fragment src="http://a.svc/x" async></fragment><template></body></template>\n</body>\n'
    template = compile_source(tmp_path, source)
    i = template.chunks.index(ASYNC_SLOT)
    assert template.chunks[i - 1] == b"<template></body></template>\n"
    assert template.chunks[i + 1] == b"</body>\n"


def test_problems_in_a_template_element_are_reported_with_their_line(tmp_path):
    label, problems = problems_of(tmp_path, '<body>\n<template>\n<fragment src="ftp://a.svc/x"></fragment>\n'
                                            "</template>\n</body>")
    assert_one_problem(label, problems, 3, "src")
    label, problems = problems_of(tmp_path, '<body>\n<template>\n<fragment id="x" src="http://a.svc/x')
    assert_one_problem(label, problems, 3, "unterminated")


@pytest.mark.parametrize("value", ["a <fragment b", "<fragment/x", "<script>", "x <fragment"])
def test_fragment_text_in_the_fragments_own_attribute_values_is_kept_as_written(tmp_path, value):
    template = compile_source(tmp_path, f'<body><fragment id="{value}" src="http://a.svc/x"></fragment></body>')
    assert [f.id for f in template.fragments] == [value]


def test_a_fragment_script_whose_tag_end_the_scanner_cannot_find_is_an_error(tmp_path):
    label, problems = problems_of(tmp_path, '<head>\n<script type="fragment" src="http://a.svc/x" x"y></script>\n'
                                            '</head><body><fragment src="http://a.svc/y"></fragment></body>')
    assert_one_problem(label, problems, 2, "cannot tell", "script")


def test_fragment_followed_by_a_space_html_does_not_know_is_reported(tmp_path):
    label, problems = problems_of(tmp_path, '<body>\n<fragment\xa0src="http://a.svc/x"></fragment>\n</body>')
    assert_one_problem(label, problems, 2, "U+00A0", "plain space")
    source = '<body>\n<!-- <fragment\xa0src="http://a.svc/x"></fragment> -->\n</body>'  # text: fine
    assert compile_source(tmp_path, source).fragments == ()


# End to end: the bytes a browser gets from a real composer.

async def test_composed_page_keeps_a_fragment_in_an_attribute_value_as_text(fragments, start_composer):
    svc = await fragments({"/real": html("<p>REAL</p>"), "/fake": html("<p>FAKE</p>")})
    button = BUTTON.replace("http://a.svc/fake", svc.url("/fake"))
    composer = await start_composer({"page.html": (
        f'<html><body>\n{button}\n<fragment src="{svc.url("/real")}"></fragment>\n</body></html>\n')})
    resp, body = await composer.get("/page")
    assert resp.status == 200
    assert body == f"<html><body>\n{button}\n<p>REAL</p>\n</body></html>\n"
    assert "/fake" not in svc.hits


async def test_composed_page_streams_async_fragments_before_the_real_closing_body(fragments, start_composer):
    svc = await fragments({"/late": html("<p>LATE</p>")})
    composer = await start_composer({"page.html": (
        f'<html><body>\n<fragment src="{svc.url("/late")}" async></fragment>\n<p>last</p>\n'
        f"</body>{BODY_IN_ATTRIBUTE}\n</html>\n")})
    resp, body = await composer.get("/page")
    assert resp.status == 200
    m = re.fullmatch(r'<html><body>\n<template id="composer-async-0"></template>\n<p>last</p>\n'
                     r'<div hidden id="composer-async-0-content"><p>LATE</p></div><script>[^<]*</script>'
                     r"(.*)", body, re.DOTALL)
    assert m is not None, body
    assert m.group(1) == f"</body>{BODY_IN_ATTRIBUTE}\n</html>\n"


async def test_composed_page_fills_fragments_in_template_elements_in_document_order(fragments, start_composer):
    svc = await fragments({"/a": html("<p>A</p>"), "/b": html("<p>B</p>"), "/c": html("<p>C</p>")})
    composer = await start_composer({"page.html": (
        f'<body><fragment src="{svc.url("/a")}"></fragment>'
        f'<template id="t"><div><fragment src="{svc.url("/b")}"></fragment></div></template>'
        f'<fragment src="{svc.url("/c")}"></fragment></body>\n')})
    resp, body = await composer.get("/page")
    assert resp.status == 200
    assert body == '<body><p>A</p><template id="t"><div><p>B</p></div></template><p>C</p></body>\n'
    assert svc.hits == {"/a": 1, "/b": 1, "/c": 1}


# Generated pages: real fragments (some in `<template>`), with text that looks like markup around
# and inside them; the compiler must find exactly the real ones, their fallback and `</body>`.

_LOOKS_LIKE_MARKUP = ['<fragment src="http://h.svc/fake"></fragment>', "<fragment src=http://h.svc/fake>",
                      "</fragment>", "</fragment >", "</body>", "<script src=x></script>", "<script >",
                      "<fragment/>", "<script/>", "<fragment/async>", "</body", "</fragment", "<fragment",
                      "<template>", "</template>"]


@st.composite
def _text_markup(draw: st.DrawFn) -> str:
    """Markup-looking text where an HTML parser sees no tag: values, names, comments, raw text."""
    inner = draw(st.lists(st.sampled_from(_LOOKS_LIKE_MARKUP), min_size=1, max_size=3).map("".join))
    bare = "".join(c for c in inner if c not in " \t\n>")  # an unquoted value or a name
    single, double = inner.replace("'", ""), inner.replace('"', "")
    script, closed = single.replace("</script", "<\\/script"), inner.replace(">", "")
    return draw(st.sampled_from([
        f"<a title=\"{double}\" data-x='{single}'>x</a>", f"<a title='{single}'>x</a>", f"<a title={bare}>x</a>",
        f'<a data-x="{double}" title={bare} data-y=\'{single}\'>x</a>', f"<a {bare}>x</a>",
        f"<!-- {inner} -->", f"<?php {closed} ?>", f"<!x {closed}>", f"<![CDATA[{closed}]]>",
        f"<script>w('{script}')</script>", f"<textarea>{inner}</textarea>", f"<title>{inner}</title>",
        f"<style>{inner}</style>", f"<svg><![CDATA[{inner}]]></svg>",
        f"<button onclick=\"w('<script src=x></script>')\" title='{single}'>b</button>",
    ]))


@st.composite
def _generated_page(draw: st.DrawFn) -> tuple[str, list[str], list[bytes], int]:
    """(source, each fragment's tag in order, its fallback, byte offset of the real `</body>`)."""
    parts, tags, fallbacks = ["<!DOCTYPE html>\n<html><head></head><body>\n"], [], []
    for n in range(draw(st.integers(0, 4))):
        parts.extend(draw(st.lists(_text_markup() | st.sampled_from(["<p>x</p>", "\n"]), max_size=2)))
        fallback = "".join(draw(st.lists(_text_markup(), max_size=2)))
        kind = draw(st.sampled_from(["element", "element", "self-closing", "script"]))
        src = f'id="f{n}" src="http://h.svc/{n}"' + draw(st.sampled_from(["", " async"]))
        tag = {"element": f"<fragment {src}>{fallback}</fragment>", "self-closing": f"<fragment {src} />",
               "script": f'<script type="fragment" {src}></script>'}[kind]
        fallbacks.append(fallback.encode() if kind == "element" else b"")
        parts.append(f"<template><div>{tag}</div></template>" if draw(st.booleans()) else tag)
        tags.append(tag)
    parts.extend(draw(st.lists(_text_markup(), max_size=2)))
    body_at = len("".join(parts).encode())
    parts.append("</body>")
    parts.extend(draw(st.lists(_text_markup(), max_size=2)))
    return "".join(parts) + "</html>\n", tags, fallbacks, body_at


@hypothesis.settings(max_examples=300, deadline=None, database=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(page=_generated_page())
def test_generated_pages_compile_to_their_real_fragments_and_closing_body(tmp_path, page):
    source, tags, fallbacks, body_at = page
    parsed = LexborHTMLParser(source)  # the generator's claim: an HTML parser sees these fragments only
    trees = [parsed.root]
    for tree in trees:
        trees.extend(tree.template_fragments())
    assert sorted(e.attributes["id"] for t in trees for e in t.css("fragment, script[type=fragment]")) \
        == [f"f{n}" for n in range(len(tags))]
    template = compile_source(tmp_path, source)
    assert [f.id for f in template.fragments] == [f"f{n}" for n in range(len(tags))]
    assert [f.fallback_html for f in template.fragments] == fallbacks
    assert rebuild(template, [tag.encode() for tag in tags]) == source.encode()
    before_slot = template.chunks[:template.chunks.index(ASYNC_SLOT)]
    spans = iter(tags)
    assert sum(len(c) if isinstance(c, bytes) else len(next(spans).encode()) for c in before_slot) == body_at
