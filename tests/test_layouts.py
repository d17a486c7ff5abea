"""Layouts (SPEC §6, Tailor's base templates): a route's template poured into a layout's slots.

The slot cases are Tailor's own (tests/tailor.js "Slots::Tailor", "should include the child
templates after the lastchild of body", docs/Base-Templates.md), compared byte for byte: composer
passes both files through instead of re-serialising them, so where Tailor's parse5 adds
`<html><head></head><body>` around a fragment of a layout, composer keeps the layout as written.
Pages are also composed for real (fragment services and composer on 127.0.0.1), reloaded when
the layout changes, and listed by `composer check`.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import eventually, html, replace_file, write_config
from test_reload import reload_counts

from composer import load
from composer.config import LayoutRef, Settings, read_config
from composer.errors import ConfigError
from composer.layouts import compile_layout
from composer.template import ASYNC_SLOT, Fragment, Template

# --------------------------------------------------------------------------- helpers


def compiled(tmp_path: Path, layout: str | bytes, child: str | bytes, *, params: tuple[str, ...] = ()) -> Template:
    """base.html and page.html written as given (bytes untouched) and compiled together."""
    for name, text in (("base.html", layout), ("page.html", child)):
        (tmp_path / name).write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return compile_layout(tmp_path / "base.html", tmp_path / "page.html", params=params,
                          settings=Settings(templates=tmp_path), name="page.html")


def page(tmp_path: Path, layout: str | bytes, child: str | bytes) -> bytes:
    """The composed page's literal bytes, each fragment shown as `[id]` (the async slot as nothing)."""
    template = compiled(tmp_path, layout, child)
    return b"".join(c if isinstance(c, bytes) else f"[{c.id}]".encode() if isinstance(c, Fragment) else b""
                    for c in template.chunks)


def problems(tmp_path: Path, layout: str, child: str) -> list[str]:
    """The problems of a layout and child that must not compile, with tmp_path cut from the labels."""
    with pytest.raises(ConfigError) as info:
        compiled(tmp_path, layout, child)
    return [p.replace(f"{tmp_path}/", "") for p in info.value.problems]


# --------------------------------------------------------------------------- Tailor's slot cases


def test_head_slot_via_script_type_slot(tmp_path):
    """Tailor: "should support base templates using slots"."""
    out = page(tmp_path, '<head><script type="slot" name="head"></script></head>', '<meta slot="head" charset="utf-8">')
    assert out == b'<head><meta charset="utf-8"></head>'


def test_custom_slot_is_filled_and_unslotted_content_goes_to_the_end_of_body(tmp_path):
    """Tailor: "should support custom slots for shuffling the nodes"."""
    layout = '<head><script type="slot" name="head"></script></head><body><slot name="custom"></slot></body>'
    child = '<script slot="custom" src=""></script><meta slot="head" charset="utf-8"><h2>Last</h2>'
    assert page(tmp_path, layout, child) == \
        b'<head><meta charset="utf-8"></head><body><script src=""></script><h2>Last</h2></body>'


@pytest.mark.parametrize("slot", ["<slot></slot>", '<slot name="default"></slot>', "<slot/>"])
def test_unnamed_slot_takes_the_default_content(tmp_path, slot):
    """Tailor: "should insert default slots if unnamed slot / a slot named default is present"."""
    layout = f"<head></head><body>{slot}<h2>blah</h2></body>"
    assert page(tmp_path, layout, "<h1>hello</h1>") == b"<head></head><body><h1>hello</h1><h2>blah</h2></body>"


@pytest.mark.parametrize("second", ["<slot></slot>", '<slot name="default">x</slot>'])
def test_a_second_unnamed_slot_is_an_error_at_its_line_in_the_layout(tmp_path, second):
    """Tailor warns once and skips it; composer refuses the layout, at the second slot's line."""
    layout = f"<body>\n<slot></slot>\n<p>between</p>\n{second}\n</body>"
    assert problems(tmp_path, layout, "<p>child</p>") == [
        "base.html:4: a second unnamed slot (first on line 2); a layout has one slot per name"]


def test_a_second_slot_of_one_name_is_an_error_too(tmp_path):
    layout = '<head><script type="slot" name="head"></script></head>\n<body><slot name="head"></slot></body>'
    assert problems(tmp_path, layout, "") == [
        "base.html:2: a second slot named 'head' (first on line 1); a layout has one slot per name"]


def test_slot_fallback_is_used_when_the_child_fills_nothing(tmp_path):
    """Tailor: "should use the fallback slot nodes if present in the template"."""
    assert page(tmp_path, '<slot name="custom"><h2>hello</h2></slot>', "") == b"<h2>hello</h2>"


def test_slot_fallback_is_overridden_by_slotted_child_content(tmp_path):
    """Tailor: "should override the fallback slot nodes with slotted nodes from child template",
    with its `</h1>` typo: the unclosed `<h2>` takes the rest of the child to its slot."""
    assert page(tmp_path, '<slot name="custom"><h2>hello</h2></slot>', '<h2 slot="custom">child</h1>') == \
        b"<h2>child</h1>"


def test_white_space_alone_does_not_replace_a_fallback(tmp_path):
    layout = '<body><slot><p>nothing here</p></slot><slot name="x">fallback</slot></body>'
    child = '\n<script type="slot" name="x">\n</script>\n'
    assert page(tmp_path, layout, child) == b"<body>\n<p>nothing here</p>\n\nfallback</body>"


def test_text_after_a_slotted_element_stays_with_it(tmp_path):
    """Tailor groups a text node with the element before it (tests/transform.js)."""
    layout = "<head>\n<slot name=head></slot></head>\n<body><slot></slot></body>"
    child = 'lead <meta slot="head" charset="utf-8">\n  <title slot=head>T</title> after title <p>p</p> tail'
    assert page(tmp_path, layout, child) == \
        (b'<head>\n<meta charset="utf-8">\n  <title>T</title> after title </head>\n'
         b"<body>lead <p>p</p> tail</body>")


def test_comments_go_to_the_default_slot(tmp_path):
    """Tailor: "should put comment tags in default slot"."""
    layout = '<head><slot name="head"></slot></head><body><slot></slot></body>'
    assert page(tmp_path, layout, '<!-- nice comment --><meta slot="head">') == \
        b'<head><meta></head><body><!-- nice comment --></body>'


def test_child_is_appended_before_body_end_when_the_layout_has_no_default_slot(tmp_path):
    """Tailor: "should include the child templates after the lastchild of body"."""
    assert page(tmp_path, "<body><h1></h1></body>", "<div><h2></h2></div>") == \
        b"<body><h1></h1><div><h2></h2></div></body>"


def test_child_is_appended_at_the_end_when_the_layout_has_no_body_end(tmp_path):
    assert page(tmp_path, "<h1>layout</h1>\n", "<p>child</p>") == b"<h1>layout</h1>\n<p>child</p>"


def test_body_end_in_a_script_or_comment_is_not_the_body_end(tmp_path):
    layout = "<body><script>var s = '</body>';</script><!-- </body> --><p>x</p></body>\n</html>"
    assert page(tmp_path, layout, "<p>child</p>") == \
        b"<body><script>var s = '</body>';</script><!-- </body> --><p>x</p><p>child</p></body>\n</html>"


def test_async_fragments_come_after_the_child_content_before_body_end(tmp_path):
    template = compiled(tmp_path, "<body><h1>layout</h1></body>",
                        '<fragment id="late" src="http://a.svc/x" async></fragment><p>child</p>')
    assert template.chunks == (b"<body><h1>layout</h1>", template.fragments[0], b"<p>child</p>", ASYNC_SLOT,
                               b"</body>")


def test_the_base_templates_doc_example(tmp_path):
    """docs/Base-Templates.md: the layout as written, the child's nodes in its slots; the
    fragment (no default slot) before `</body>`."""
    layout = textwrap.dedent("""\
        <!doctype html>
        <html>
        <head>
            <meta name="viewport" content="width=device-width,initial-scale=1">
            <link rel="dns-prefetch" href="https://example.com" />
            <script type="slot" name="head"></script>
        </head>
        <body>
            <slot name="body-start"></slot>
            <div>Hello</div>
        </body>
        </html>
        """)
    child = textwrap.dedent("""\
        <meta slot="head" charset="utf-8">
        <script slot="body-start" src="http://blah"></script>
        <fragment id="f" src="http://localhost" async primary ></fragment>
        <title slot="head">Test Template</title>
        """)
    assert page(tmp_path, layout, child).decode() == textwrap.dedent("""\
        <!doctype html>
        <html>
        <head>
            <meta name="viewport" content="width=device-width,initial-scale=1">
            <link rel="dns-prefetch" href="https://example.com" />
            <meta charset="utf-8">
        <title>Test Template</title>

        </head>
        <body>
            <script src="http://blah"></script>

            <div>Hello</div>
        [f]
        </body>
        </html>
        """)


def test_the_custom_amd_example_compiles(tmp_path):
    """Tailor's examples/multiple-fragments-with-custom-amd: fragments in both files, the
    child's fragment in the layout's `body-start` slot, before the layout's own."""
    layout = ('<!doctype html>\n<html>\n<head>\n    <meta charset="utf-8">\n'
              '    <script type="slot" name="head"></script>\n    <script>\n        var log = {};\n'
              '    </script>\n</head>\n<body>\n    <slot name="body-start"></slot>\n    <div>\n'
              '        <h2>Fragment 1:</h2>\n'
              '        <fragment src="http://localhost:8081" primary id="custom-id"></fragment>\n'
              '        <h2>Fragment 2:</h2>\n        <fragment async src="http://localhost:8082"></fragment>\n'
              "    </div>\n</body>\n</html>\n")
    child = ('<title slot="head">Test Page</title>\n<h2 slot="body-start">Fragment 3</h2>\n'
             '<fragment slot="body-start" src="http://localhost:8083" timeout="1000"></fragment>\n')
    template = compiled(tmp_path, layout, child)
    assert [(f.id, f.line, f.primary, f.is_async) for f in template.fragments] == [
        ("page.html#1", 3, False, False), ("custom-id", 14, True, False), ("page.html#3", 16, False, True)]
    assert template.fragments[0].timeout == 1.0
    assert b'<title>Test Page</title>\n' in template.chunks[0]
    assert template.chunks[0].endswith(b'<body>\n    <h2>Fragment 3</h2>\n')


# --------------------------------------------------------------------------- the child's own slot script


def test_script_type_slot_in_the_child_puts_its_raw_content_in_the_slot(tmp_path):
    layout = '<html><head>\n<script type="slot" name="head"></script>\n</head><body><slot></slot></body></html>'
    child = ('<script type="slot" name="head"><meta name="a" content="b">\n'
             '<fragment id="meta" src="http://seo.svc/meta"></fragment></script>\n'
             "<p>body</p>")
    template = compiled(tmp_path, layout, child)
    assert [(f.id, f.line) for f in template.fragments] == [("meta", 2)]
    assert template.chunks[:3] == (b'<html><head>\n<meta name="a" content="b">\n', template.fragments[0],
                                   b"\n\n</head><body><p>body</p>")


def test_a_script_inside_a_script_slot_is_an_error(tmp_path):
    """Its `</script>` would end the slot script: the head form for a fragment in the child is
    `<script type="fragment" slot="head">` (docs/Base-Templates.md)."""
    child = ('<p>x</p>\n<script type="slot" name="head">\n'
             '  <SCRIPT type="fragment" src="http://seo.svc/meta"></script></script>\n')
    assert problems(tmp_path, '<head><script type="slot" name="head"></script></head>', child) == [
        ('page.html:3: a <script type="slot"> cannot hold a <script> (its </script> would end the slot): '
        'give that script slot="..." instead')]
    child = '<script type="fragment" slot="head" id="meta" src="http://seo.svc/meta"></script>\n<p>body</p>'
    template = compiled(tmp_path, '<head><script type="slot" name="head"></script></head><body></body>', child)
    assert template.chunks[:3] == (b"<head>", template.fragments[0], b"\n</head><body><p>body</p>")


def test_nested_slot_attributes_are_html_not_slots(tmp_path):
    """Only top-level child nodes are slotted; `slot` inside them is the web components' attribute."""
    child = '<my-card><span slot="title">T</span></my-card>'
    assert page(tmp_path, '<body><slot name="title">x</slot></body>', child) == \
        b'<body>x<my-card><span slot="title">T</span></my-card></body>'


# --------------------------------------------------------------------------- bytes pass through


def test_every_byte_of_both_files_passes_through_but_slot_tags_and_slot_attributes(tmp_path):
    layout = ("<!DOCTYPE html>\r\n<HTML lang=de>\r\n<head>\r\n<meta charset=utf-8>"
              "<title>Grüße — 日本語 🙂</title>\r\n<SCRIPT type=\"slot\" NAME=\"head\"></SCRIPT>\r\n"
              "<!-- <slot name=\"nope\"></slot> is only a comment -->\r\n"
              "<script>var s = '<slot></slot>';</script>\r\n</head>\r\n"
              "<Body  class=page data-x='a \"q\" v' checked>\r\n<slot name=main>\r\n  fallback\r\n</slot>\r\n"
              "<p>after &nbsp; &lt;slot&gt;</p>\r\n</Body>\r\n</HTML>\r\n")
    child = ("<meta slot=head name=x content='ä'>\r\n"
             "<div\r\n  data-x='1'\r\n  SLOT=\"main\"\r\n  class=y>Grüße &amp; <b>bold</B></div >\r\n"
             "<p>rest 🙂</p>\r\n")
    out = page(tmp_path, layout.encode(), child.encode())
    assert out == ("<!DOCTYPE html>\r\n<HTML lang=de>\r\n<head>\r\n<meta charset=utf-8>"
                   "<title>Grüße — 日本語 🙂</title>\r\n<meta name=x content='ä'>\r\n\r\n"
                   "<!-- <slot name=\"nope\"></slot> is only a comment -->\r\n"
                   "<script>var s = '<slot></slot>';</script>\r\n</head>\r\n"
                   "<Body  class=page data-x='a \"q\" v' checked>\r\n"
                   "<div\r\n  data-x='1'\r\n  class=y>Grüße &amp; <b>bold</B></div >\r\n\r\n"
                   "<p>after &nbsp; &lt;slot&gt;</p>\r\n<p>rest 🙂</p>\r\n</Body>\r\n</HTML>\r\n").encode()


def test_a_byte_order_mark_opening_the_child_is_not_content(tmp_path):
    layout = "\ufeff<body><slot><p>fallback</p></slot></body>"
    assert page(tmp_path, layout, "\ufeff") == "\ufeff<body><p>fallback</p></body>".encode()
    assert page(tmp_path, layout, "\ufeff<p>x</p>") == "\ufeff<body><p>x</p></body>".encode()
    assert page(tmp_path, layout, "\ufeffx") == "\ufeff<body>x</body>".encode()


@pytest.mark.parametrize(("tag", "kept"), [
    ('<h2 slot="x">', "<h2>"),
    ("<h2 slot=x class=a>", "<h2 class=a>"),
    ("<h2 class=a slot='x'>", "<h2 class=a>"),
    ('<h2\n  id="a"\n  slot="x"\n  class="b">', '<h2\n  id="a"\n  class="b">'),
    ('<h2 data-slot="y" title="slot=x" slot="x">', '<h2 data-slot="y" title="slot=x">'),
], ids=["only", "first", "last", "lines", "look-alikes"])
def test_only_the_slot_attribute_is_cut_from_the_start_tag(tmp_path, tag, kept):
    assert page(tmp_path, '<slot name="x"></slot>', f"{tag}t</h2>") == f"{kept}t</h2>".encode()


# --------------------------------------------------------------------------- errors at file:line


def test_child_content_for_a_slot_the_layout_lacks_is_an_error_at_its_line(tmp_path):
    layout = '<head><script type="slot" name="head"></script></head><body><slot name="main"></slot></body>'
    child = '<title slot="head">t</title>\n<p>default</p>\n<div slot="mian">typo</div>\n' \
            '<script type="slot" name="foot">x</script>\n'
    assert problems(tmp_path, layout, child) == [
        "page.html:3: the layout base.html has no slot 'mian' (its named slots: head, main)",
        "page.html:4: the layout base.html has no slot 'foot' (its named slots: head, main)"]


def test_fragment_error_in_the_child_is_reported_at_its_line_in_the_child(tmp_path):
    layout = "<html>\n<head></head>\n<body>\n<header>h</header>\n<slot name=main></slot>\n<slot></slot>\n</body>\n</html>"
    child = ('<div\n  slot="main"\n  class="a">\n  <fragment src="ftp://a.svc/x"></fragment>\n</div>\n'
             "<p>default</p>\n"
             '<fragment id="t" src="http://a.svc/t" timeout="soon"></fragment>\n')
    found = problems(tmp_path, layout, child)
    assert [p.split(": ")[0] for p in found] == ["page.html:4", "page.html:7"], found
    assert "ftp://a.svc/x" in found[0] and "timeout" in found[1]


def test_fragment_error_in_the_layout_is_reported_at_its_line_in_the_layout(tmp_path):
    layout = ('<html><head>\n<script type="fragment" src="http://seo.svc/meta" tiemout="1"></script>\n'
              "</head><body>\n<slot></slot>\n<footer>\n"
              '<fragment id="foot" src="http://a.svc/{nope}"></fragment>\n</footer></body></html>')
    child = "<p>one</p>\n<p>two</p>\n<p>three</p>\n"
    found = problems(tmp_path, layout, child)
    assert [p.split(": ")[0] for p in found] == ["base.html:2", "base.html:6"], found
    assert "tiemout" in found[0] and "{nope}" in found[1]


def test_fragment_lines_name_the_line_in_their_own_file(tmp_path):
    layout = '<body>\n<fragment id="top" src="http://a.svc/top"></fragment>\n<slot></slot>\n' \
             '<fragment id="bottom" src="http://a.svc/bottom"></fragment>\n</body>'
    child = '\n\n\n\n<fragment id="mine" src="http://a.svc/mine"></fragment>\n'
    template = compiled(tmp_path, layout, child)
    assert [(f.id, f.line) for f in template.fragments] == [("top", 2), ("mine", 5), ("bottom", 4)]


def test_one_primary_per_page_counts_both_files(tmp_path):
    layout = '<body>\n<fragment id="a" src="http://a.svc/a" primary></fragment>\n<slot></slot></body>'
    child = '<p>x</p>\n<fragment id="b" src="http://a.svc/b" primary></fragment>\n'
    found = problems(tmp_path, layout, child)
    assert len(found) == 1 and found[0].startswith("page.html:2: a template has at most one primary"), found


@pytest.mark.parametrize(("layout", "child", "expected"), [
    ("<body>\n<slot name=a>\n<p>no end</p>\n</body>", "",
     "base.html:2: <slot> is never closed (add </slot>)"),
    ("<body>\n<slot name=a>\n<slot name=b></slot></slot></body>", "",
     "base.html:3: slots cannot be nested (this one is in the slot on line 2)"),
    ('<head>\n<script type="slot" name="head">\n', "",
     'base.html:2: <script type="slot"> is never closed'),
    ("<body><slot name=head></slot><slot></slot></body>", "<div>\n<p>open</p>\n<meta slot=head>",
     ("page.html:3: this is not at the top level of the child template: the <div> on line 1 is never closed "
     "(close it)")),
    ("<body><slot name=head></slot></body>", '<p>x</p>\n<script type="slot" name="head"><meta>',
     'page.html:2: <script type="slot"> is never closed'),
], ids=["unclosed-slot", "nested-slots", "unclosed-slot-script", "child-unclosed-element",
        "child-unclosed-slot-script"])
def test_structure_problems(tmp_path, layout, child, expected):
    assert problems(tmp_path, layout, child) == [expected]


# --------------------------------------------------------------------------- routes.yaml


LAYOUT = "<html><head><slot name=head></slot></head><body><header>site</header><slot></slot></body></html>\n"
ROUTES = """\
settings:
  layout: base.html
routes:
  - name: home
    match: {path: /}
    template: home.html
  - name: product
    match: {path: "/p/{sku}"}
    template: product.html
  - name: bare
    match: {path: /bare}
    template: home.html
    layout: null
  - name: special
    match: {path: /special}
    template: home.html
    layout: other.html
"""
TEMPLATES = {"base.html": LAYOUT, "other.html": "<main><slot></slot></main>\n<slot name=head></slot>",
             "home.html": "<title slot=head>Home</title><p>home</p>",
             "product.html": '<title slot=head>P</title><fragment id="p" src="http://a.svc/{sku}"></fragment>'}


def literal(template: Template | None) -> bytes:
    assert template is not None
    return b"".join(c for c in template.chunks if isinstance(c, bytes))


def test_settings_layout_applies_to_every_template_route_unless_it_opts_out_or_names_its_own(tmp_path):
    config = read_config(write_config(tmp_path, TEMPLATES, routes=ROUTES))
    assert config.problems == ()
    assert config.settings.layout == LayoutRef("base.html", 2)
    assert {r.name: r.layout for r in config.routes} == {
        "home": LayoutRef("base.html", 2), "product": LayoutRef("base.html", 2), "bare": None,
        "special": LayoutRef("other.html", 17)}
    table = load(tmp_path / "routes.yaml")
    routes = {r.name: r for r in table.routes}
    assert {name: r.layout for name, r in routes.items()} == {
        "home": "base.html", "product": "base.html", "bare": None, "special": "other.html"}
    assert literal(routes["home"].template) == \
        b"<html><head><title>Home</title></head><body><header>site</header><p>home</p></body></html>\n"
    assert literal(routes["bare"].template) == b"<title slot=head>Home</title><p>home</p>"
    assert literal(routes["special"].template) == b"<main><p>home</p></main>\n<title>Home</title>"
    assert (tmp_path / "templates" / "base.html") in dict(table.sources)
    assert (tmp_path / "templates" / "other.html") in dict(table.sources)


def test_layout_errors_in_routes_yaml(tmp_path):
    routes = """\
        settings:
          layout: missing.html
        routes:
          - name: one
            match: {path: /one}
            template: page.html
          - name: two
            match: {path: /two}
            template: page.html
          - name: three
            match: {path: /three}
            template: page.html
            layout: gone.html
          - name: api
            match: {path_prefix: /api}
            backend: http://127.0.0.1:9
            layout: base.html
          - name: four
            match: {path: /four}
            template: page.html
            layout: 3
        """
    write_config(tmp_path, {"page.html": "<p>x</p>"}, routes=routes)
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "routes.yaml")
    label, folder = tmp_path / "routes.yaml", tmp_path / "templates"
    assert info.value.problems == [
        f"{label}:17: layout applies to template routes only",
        f"{label}:21: layout must be a string",
        f"{label}:2: layout 'missing.html' not found (looked for {folder / 'missing.html'})",
        f"{label}:13: layout 'gone.html' not found (looked for {folder / 'gone.html'})"]
    # watched while missing: creating it retries the refused config
    assert {(folder / "missing.html", None), (folder / "gone.html", None)} <= set(info.value.sources)


def test_a_problem_of_a_shared_layout_is_reported_once(tmp_path):
    templates = {**TEMPLATES, "base.html": "<head><slot name=head></slot></head><body>\n<slot></slot>\n<slot></slot>\n</body>"}
    write_config(tmp_path, templates, routes=ROUTES)
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "routes.yaml")
    assert info.value.problems == [
        (f"{tmp_path / 'templates' / 'base.html'}:3: a second unnamed slot (first on line 2); a layout has one slot "
        "per name")]


# --------------------------------------------------------------------------- served for real


async def test_fragments_in_both_files_are_fetched_and_composed_in_place(start_composer, fragments):
    svc = await fragments({"/meta": html('<meta name="seo" content="1">'), "/header": html("<nav>header</nav>"),
                           "/product/42": html("<p>product 42</p>"), "/recos": html("<p>recos</p>")})
    layout = (f'<!doctype html>\n<html><head>\n<script type="fragment" id="meta" src="{svc.url("/meta")}">'
              '</script>\n<script type="slot" name="head"></script>\n</head>\n<body>\n'
              f'<fragment id="header" src="{svc.url("/header")}"></fragment>\n'
              "<main><slot name=main><p>no main</p></slot></main>\n</body>\n</html>\n")
    child = ('<title slot="head">Product {sku}</title>\n'
             f'<fragment slot="main" id="product" src="{svc.url("/product/") + "{sku}"}" primary></fragment>\n'
             f'<aside><fragment id="recos" src="{svc.url("/recos")}"></fragment></aside>\n')
    composer = await start_composer({"base.html": layout, "product.html": child}, routes="""\
        routes:
          - name: product
            match: {path: "/p/{sku}"}
            template: product.html
            layout: base.html
        """)
    resp, body = await composer.get("/p/42")
    assert resp.status == 200
    assert body == ('<!doctype html>\n<html><head>\n<meta name="seo" content="1">\n'
                    "<title>Product {sku}</title>\n\n</head>\n<body>\n<nav>header</nav>\n"
                    "<main><p>product 42</p>\n</main>\n<aside><p>recos</p></aside>\n</body>\n</html>\n")
    assert {path: svc.hits.get(path) for path in ("/meta", "/header", "/product/42", "/recos")} == \
        dict.fromkeys(("/meta", "/header", "/product/42", "/recos"), 1)


async def test_a_layout_change_reloads_every_route_using_it(start_composer, fragments, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="composer.reload")
    svc = await fragments({"/header": html("<nav>header</nav>")})
    layout = (f'<head><slot name="head"></slot></head><body>\n<fragment src="{svc.url("/header")}"></fragment>\n'
              "<h1>v1</h1>\n<slot></slot>\n</body>\n")
    composer = await start_composer(TEMPLATES | {"base.html": layout},
                                    routes=ROUTES.replace("layout: base.html\n", "layout: base.html\n"
                                                          "  reload_interval_ms: 200\n", 1))
    assert (await composer.get("/"))[1] == \
        "<head><title>Home</title></head><body>\n<nav>header</nav>\n<h1>v1</h1>\n<p>home</p>\n</body>\n"
    base = tmp_path / "templates" / "base.html"

    replace_file(base, layout.replace("v1", "v2"))

    async def both_reloaded() -> bool:
        home, product = (await composer.get("/"))[1], (await composer.get("/p/7"))[1]
        return "<h1>v2</h1>" in home and "<h1>v2</h1>" in product
    await eventually(both_reloaded, "both routes using the layout to show its new version")
    assert (await composer.get("/bare"))[1] == "<title slot=head>Home</title><p>home</p>"
    assert reload_counts(await composer.metrics()) == {"ok": 1, "error": 0}

    replace_file(base, "<head><slot name=head></slot></head>\n<body>\n<fragment src=\"ftp://x\"></fragment>\n</body>\n")

    async def refused() -> bool:
        return reload_counts(await composer.metrics())["error"] == 1
    await eventually(refused, "the broken layout to be refused")
    assert "<h1>v2</h1>" in (await composer.get("/"))[1]
    errors = [r.fields["problem"] for r in caplog.records  # type: ignore[attr-defined]
              if r.name == "composer.reload" and r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(f"{base}:3: src must be"), errors


# --------------------------------------------------------------------------- composer check


def run_check(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "composer", "check"], cwd=cwd, capture_output=True, text=True,
                          timeout=30, check=False)


def test_check_lists_which_routes_use_which_layout(tmp_path):
    write_config(tmp_path, TEMPLATES, routes=ROUTES)
    result = run_check(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.splitlines() == [
        "routes.yaml: ok (4 routes, 1 fragments)",
        "layout base.html: home, product",
        "layout other.html: special"]


def test_check_reports_layout_problems_at_their_file_and_line(tmp_path):
    write_config(tmp_path, {**TEMPLATES, "home.html": "<p>home</p>\n<p slot=nav>nav</p>\n"}, routes=ROUTES)
    result = run_check(tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        (f"{Path('templates') / 'home.html'}:2: the layout {Path('templates') / 'base.html'} has no slot 'nav' "
        "(its named slots: head)"),
        (f"{Path('templates') / 'home.html'}:2: the layout {Path('templates') / 'other.html'} has no slot 'nav' "
        "(its named slots: head)")]
    assert not re.search(r"\d+: .*\d+: ", result.stderr)
