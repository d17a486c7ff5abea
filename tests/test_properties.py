"""Property tests: arbitrary templates, routes.yaml files, manifests and Link headers.

Whatever the input, the template compiler and the config loaders either return their
result or raise `ConfigError` whose every problem is one line of the form
`file:LINE: message` (LINE within the file); never another exception, never a hang.
`parse_assets` never raises and keeps only absolute http(s) or root-relative asset URLs.
Every example runs under a time limit (`_time_limit`), so a hang fails instead of waiting.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from yarl import URL

from composer import load
from composer.config import Config, Settings, load_config, read_config
from composer.errors import ConfigError
from composer.filters import FILTERS
from composer.links import Asset, parse_assets
from composer.manifest import Manifest, parse_manifest
from composer.predicates import PREDICATES
from composer.routing import RouteTable, build_table
from composer.template import ASYNC_SLOT, Fragment, Template, compile_template

LIMIT_S = 2.0  # a single call taking longer is a hang


def _examples(n: int) -> int:
    """`n`, times PROPERTY_EXAMPLES_SCALE from the environment (e.g. 20 for a long bug hunt)."""
    return max(1, round(n * float(os.environ.get("PROPERTY_EXAMPLES_SCALE", "1"))))


T = TypeVar("T")
R = TypeVar("R")

PROPERTY = settings(database=None, deadline=None, max_examples=_examples(100),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Hang(Exception):
    """Raised into the code under test by `_time_limit`."""


@contextlib.contextmanager
def _time_limit(seconds: float = LIMIT_S) -> Iterator[None]:
    """Raise `Hang` in the code under test when it uses more than `seconds` of CPU.

    CPU time (ITIMER_PROF), not wall time: a loaded CI machine must not fail the test.
    """
    fired = []

    def on_alarm(_signum: int, _frame: object) -> None:
        fired.append(True)
        raise Hang(f"still running after {seconds} s of CPU")

    previous = signal.signal(signal.SIGPROF, on_alarm)
    signal.setitimer(signal.ITIMER_PROF, seconds)
    start = time.process_time()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)
    elapsed = time.process_time() - start
    assert not fired and elapsed < seconds, f"took {elapsed:.2f} s of CPU"  # also if `Hang` was swallowed


def _check_problems(exc: ConfigError, lines: dict[str, int] | Callable[[str], int | None]) -> None:
    """Every problem is one line `label:LINE: message`, 1 <= LINE <= the lines of `label`.

    `lines` maps each label a problem may name to its line count, or is a function giving
    it (None for a label that may not appear).
    """
    assert exc.problems, "ConfigError without problems"
    for problem in exc.problems:
        assert "\n" not in problem and "\r" not in problem, f"problem spans lines: {problem!r}"
        m = re.match(r"(.*?):(\d+): \S", problem, re.DOTALL)
        assert m, f"problem without file:LINE: {problem!r}"
        label, line = m[1], int(m[2])
        max_line = lines.get(label) if isinstance(lines, dict) else lines(label)
        assert max_line is not None, f"problem names an unexpected file: {problem!r}"
        assert 1 <= line <= max_line, f"line out of range (max {max_line}): {problem!r}"


def _max_line_text(text: str) -> int:
    """Lines of a text read as YAML: PyYAML also breaks lines at NEL, LS and PS, like splitlines."""
    return max(text.count("\n"), len(text.splitlines())) + 1


def _max_line_bytes(data: bytes) -> int:
    return data.count(b"\n") + 1


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """routes.yaml's folder: good and bad templates, a manifest file, a folder in a file's place."""
    root = tmp_path_factory.mktemp("props")
    templates = root / "templates"
    templates.mkdir()
    (templates / "ok.html").write_text(
        '<html><body><fragment src="http://127.0.0.1:9101/{sku}" primary></fragment></body></html>')
    (templates / "plain.html").write_text("<p>hi</p>\n")
    (templates / "bad.html").write_bytes(b'<p>\n<fragment src="ftp://x" timeout=0>\n')
    (templates / "latin1.html").write_bytes(b"caf\xe9\n")
    (templates / "named.html").write_text('<fragment name="header"></fragment>\n')
    (templates / "sub").mkdir()
    (root / "m.yaml").write_text("fragments:\n  header:\n    versions: {'1': 'http://127.0.0.1:9101/h'}\n"
                                 "    active: '1'\n")
    (root / "bad.json").write_text('{"fragments": {"header": {"versions": {}, "active": 1}}}')
    return root


# ---------------------------------------------------------------------------------------
# 1. Templates
# ---------------------------------------------------------------------------------------

_URLS = [
    "http://127.0.0.1:9101/x", "https://a.example.com/{sku}", "http://h/{sku}?q={id}", "http://{sku}/",
    "http://h:{id}/", "http://u:{id}@h/", "/relative", "", " ", "http://h/{unknown}", "http://h/{",
    "http://h/}", "http://h/{{sku}}", "http://[::1]:80/", "http://[::1/", "http://h:99999/", "http://h:x/",
    "javascript:alert(1)", "http://u:p@h/", "http://h/%zz", "http://h/é", "http://é.example/",
    "http://h/\x00", "http://h/\t\n", "http://", "https:///x", "//h/x", "http://h/" + "a" * 300,
    "data:text/html,<p>", "http://h#{sku}", "http://h/{sku:.*}", "http://xn--/", "http://h:0/",
]
_TIMEOUTS = ["1", "3000", "600000", "600001", "0", "-1", "abc", " 5 ", "1.5", "²", "１２", "٣", "0x10",
             "1" * 5000, "000000000001", "", "5ms", "+5", "1_000"]
_ATTR_NAMES = ["src", "fallback-src", "timeout", "primary", "async", "public", "id", "name", "type",
               "data-x", "foo", "SRC", "Primary", "data-composer-at", "composer-mark", "on", "href", "x:y"]
_BODY = st.text(max_size=12)


@st.composite
def _attribute(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(_ATTR_NAMES) | st.text(st.characters(blacklist_categories=("Cs",)),
                                                       min_size=1, max_size=6))
    value = draw(st.sampled_from(_URLS) | st.sampled_from(_TIMEOUTS)
                 | st.sampled_from(["fragment", "header", "primary", "true", "x", "0", "-5"]) | _BODY)
    form = draw(st.sampled_from(["bare", "eq", "dq", "sq", "dq", "sq"]))
    space = draw(st.sampled_from([" ", " ", "\n", "\t", "", "  \r\n"]))
    if form == "bare":
        return f"{space}{name}"
    if form == "eq":
        return f"{space}{name}={value}"
    quote = '"' if form == "dq" else "'"
    return f"{space}{name}={quote}{value}{quote}"


@st.composite
def _open_tag(draw: st.DrawFn) -> str:
    tag = draw(st.sampled_from(["fragment", "FRAGMENT", "Fragment", "script", 'script type="fragment"',
                                "script type=fragment", "SCRIPT TYPE=' Fragment '", "fragment:x", "fragments"]))
    attrs = "".join(draw(st.lists(_attribute(), max_size=5)))
    end = draw(st.sampled_from([">", ">", "/>", " />", "", " >", "\n>", "/ >"]))
    return f"<{tag}{attrs}{end}"


_TOKENS = st.sampled_from([
    "</fragment>", "</fragment >", "</FRAGMENT\n>", "</fragment", "</script>", "</SCRIPT >", "</script ",
    "</script/", "<!--", "-->", "<!-- <fragment src='http://h/'></fragment> -->", "</body>", "</BODY >",
    "<body>", "<html>", "<head>", "</head>", ">", "/>", '"', "'", "\n", "\r\n", "\r", "\x00", "<", "&amp;",
    "<![CDATA[", "]]>", "<textarea>", "</textarea>", "<template>", "</template>", "<style>", "</style>",
    "<svg>", "</svg>", "<math>", "<title>", "</title>", "<plaintext>", "<noscript>", "</noscript>",
    "<iframe>", "<xmp>", "<noembed>", "<table>", "<select>", "<p>", "</p>", "<!DOCTYPE html>", "<?xml?>",
    "\ud800", "\udfff", "é", "\u2028", "\ufeff", "😀", "<composer-mark data-composer-at=0></composer-mark>",
    "<fragment data-composer-at=0 src='", "data-composer-at=1", '<a title="<fragment src=x>">',
    '<fragment src="http://127.0.0.1:9101/a"></fragment>', "<fragment src=http://h/x/>",
    '<script type="fragment" src="http://h/a"></script>', "<fragment src='http://h/{sku}' primary/>",
])

_NEAR_HTML = st.lists(_TOKENS | _open_tag() | _attribute() | _BODY, max_size=30).map("".join)


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate becomes invalid UTF-8, as on disk


_GOOD_SRC = ["http://127.0.0.1:9101/a", "https://a.example.com/{sku}", "http://127.0.0.1:9101/p?x={id}&y=1"]
_LITERAL = st.text(st.characters(blacklist_characters="<&", blacklist_categories=("Cs",)), max_size=12)
_MARKUP = st.sampled_from([
    "<div>", "</div>", "<p class='a'>", "</p>", "\n", "\r\n", "<br/>", "<img src=x>", "&amp;",
    "<!-- <fragment src='http://h/'></fragment> -->", "<script>var a = '<fragment src=x>';</script>",
    "<textarea><fragment src=x></fragment></textarea>", "<style>fragment { }</style>", "<a title='</body>'>",
    "<template><fragment src=x></fragment></template>", "<!-- </body> -->",
])


@st.composite
def _good_fragment(draw: st.DrawFn) -> str:
    """A fragment element as a template would have it (now and then one detail wrong)."""
    attrs = []
    if draw(_rarely(6)):
        attrs.append(("name", draw(st.sampled_from(["header", "footer", "nope"]))))
    else:
        attrs.append(("src", draw(_pick(_GOOD_SRC, _URLS, quote=False))))
    for flag, n in (("primary", 6), ("async", 3), ("public", 4)):
        if draw(_rarely(n)):
            attrs.append((flag, None))
    if draw(_rarely(3)):
        attrs.append(("timeout", draw(_pick(["50", "3000", " 7 "], _TIMEOUTS, quote=False))))
    if draw(_rarely(3)):
        attrs.append(("id", draw(st.sampled_from(["a", "b", "c", "d", "e"]))))
    if draw(_rarely(5)):
        attrs.append(("fallback-src", draw(_pick(_GOOD_SRC, _URLS, quote=False))))
    if draw(_rarely(8)):
        attrs.append((draw(st.sampled_from(["data-x", "class", "Src"])), "v"))
    text = ""
    for name, value in draw(st.permutations(attrs)):
        quote = draw(st.sampled_from(['"', "'", ""])) if value and not any(c in value for c in " '\"=<>`") \
            else '"'
        text += f" {name}" if value is None else f" {name}={quote}{value}{quote}"
    fallback = draw(_LITERAL | _MARKUP)
    kind = draw(st.sampled_from(["fragment", "fragment", "FRAGMENT", "self", "script"]))
    if kind == "self":
        return f"<fragment{text} />"
    if kind == "script":
        return f'<script type="fragment"{text}>{fallback}</script>'
    return f"<{kind}{text}>{fallback}</{kind}>"


@st.composite
def _page(draw: st.DrawFn) -> str:
    parts = draw(st.lists(_good_fragment() | _LITERAL | _MARKUP, max_size=8))
    head = "".join(draw(st.lists(_good_fragment(), max_size=1)))
    page = f"<!DOCTYPE html><html><head>{head}</head><body>{''.join(parts)}</body></html>\n"
    return page if draw(st.booleans()) else "".join(parts)


_TEMPLATE_BYTES = (
    _page().map(_encode)
    | _page().map(_encode)
    | _page().map(_encode)
    | _NEAR_HTML.map(_encode)
    | st.text().map(_encode)
    | st.binary(max_size=200)
    | st.tuples(_NEAR_HTML.map(_encode), st.binary(max_size=4), st.integers(0, 1000)).map(
        lambda t: t[0][:t[2]] + t[1] + t[0][t[2]:])  # invalid bytes somewhere in markup
)

_MANIFEST = parse_manifest(
    "fragments:\n"
    "  header: {versions: {'1': 'http://127.0.0.1:9101/h', '2': 'http://127.0.0.1:9101/h2/{sku}'},\n"
    "           active: '1', canary: {version: '2', percent: 10}, fallback: 'http://127.0.0.1:9101/fb'}\n"
    "  footer: {versions: {'1': 'http://127.0.0.1:9101/f'}, active: '1', enabled: false, timeout_ms: 50}\n",
    "m.yaml", (), source="m.yaml")

_ORIGINS = st.sampled_from([(), ("http://127.0.0.1:*",), ("https://*.example.com", "http://h")])


def _check_template(template: Template, source: bytes) -> None:
    """The chunks are the file: literal bytes, each fragment's source text and one slot."""
    chunks = template.chunks
    assert tuple(c for c in chunks if isinstance(c, Fragment)) == template.fragments
    assert sum(c is ASYNC_SLOT for c in chunks) == 1
    assert all(c for c in chunks if isinstance(c, bytes)), "empty literal chunk"
    assert not any(isinstance(a, bytes) and isinstance(b, bytes) for a, b in itertools.pairwise(chunks))
    assert sum(f.primary for f in template.fragments) <= 1
    assert template.primary is None or template.primary.primary
    assert template.async_fragments == tuple(f for f in template.fragments if f.is_async)
    assert len({f.id for f in template.fragments}) == len(template.fragments)
    lower = source.lower()

    @functools.cache
    def fits(i: int, pos: int) -> bool:
        """Chunks i.. are exactly source[pos:]."""
        if i == len(chunks):
            return pos == len(source)
        chunk = chunks[i]
        if chunk is ASYNC_SLOT:
            return (i + 1 == len(chunks) or lower.startswith(b"</body", pos)) and fits(i + 1, pos)
        if isinstance(chunk, bytes):
            return source.startswith(chunk, pos) and fits(i + 1, pos + len(chunk))
        assert isinstance(chunk, Fragment)
        if not (lower.startswith(b"<fragment", pos) or lower.startswith(b"<script", pos)):
            return False
        if chunk.line != source.count(b"\n", 0, pos) + 1:
            return False
        end = pos
        while (end := source.find(b">", end) + 1) > 0:
            if chunk.fallback_html in source[pos:end] and fits(i + 1, end):
                return True
        return False

    assert fits(0, 0), f"chunks are not the file: {chunks!r}"


@settings(PROPERTY, max_examples=_examples(300))
@given(data=_TEMPLATE_BYTES, params=st.sets(st.sampled_from(["sku", "id", "rest"])).map(tuple),
       origins=_ORIGINS, manifest=st.none() | st.just(_MANIFEST))
@example(data=b'<fragment src="http://h/" timeout="\xc2\xb2"></fragment>', params=(), origins=(), manifest=None)
@example(data=b'<fragment src="http://h/" timeout="' + b"1" * 5000 + b'"></fragment>', params=(), origins=(),
         manifest=None)
@example(data=b'<fragment src="http://h:99999/"></fragment>', params=(), origins=(), manifest=None)
@example(data=b'<fragment src="http://[::1/"></fragment>', params=(), origins=(), manifest=None)
@example(data=b"<fragment data-composer-at=0 src='", params=(), origins=(), manifest=None)
@example(data=b"<composer-mark data-composer-at=9></composer-mark></body>", params=(), origins=(), manifest=None)
@example(data=b"<fragment src=http://h/></fragment><script type=fragment src=http://h/></script ",
         params=(), origins=(), manifest=None)
def test_any_template_compiles_or_fails_with_lines(workdir: Path, data: bytes, params: tuple[str, ...],
                                                   origins: tuple[str, ...], manifest: Manifest | None) -> None:
    file = workdir / "page.html"
    file.write_bytes(data)
    template_settings = Settings(templates=workdir, allowed_origins=origins)
    try:
        with _time_limit():
            template = compile_template(file, params=params, settings=template_settings, name="page.html",
                                        manifest=manifest)
    except ConfigError as exc:
        _check_problems(exc, {str(file): _max_line_bytes(data)})
        return
    assert isinstance(template, Template)
    _check_template(template, data)


# ---------------------------------------------------------------------------------------
# 2. routes.yaml and manifests
# ---------------------------------------------------------------------------------------


class Pairs(list):  # a YAML mapping as (raw key, value) pairs: keys may repeat
    pass


_RAW_SCALARS = [
    "0", "1", "3000", "600000", "600001", "-1", "0x1F", "0o17", "017", "1_000", "1:30", "+5", "0b101",
    "1" * 5000, "!!int abc", "!!int ''", "!!int '['", "!!int '[' ", "!!int 1.5", "!!bool '['", "!!bool maybe",
    "!!bool yes", "!!str 5", "!!float x", "!!binary x", "!!timestamp x", "!!null x", "!!python/object:os.system x",
    "!custom x", "~", "null", "true", "false", "yes", "off", ".inf", ".nan", "1.5", "2001-12-14", "*undefined",
    "<<", "''", '""', "'it''s'", "\"\\ud800\"", "\"\\ud83d\\ude00\"", "\"\\x00\"", "\"a\\nb\"", "|", ">-",
    "&a x", "*a", "[]", "{}", "[a, [b, {c: d}]]", "{a: 1, a: 2}", "- x", "? x", "%YAML 1.1", "---", "...",
    "@x", "`x", "!", "!!", "\t", "\x00", "\x85", "\u2028", "\ufeff",
]
_STRINGS = [
    "/", "/products/{sku}", "/{rest:.*}", "/{a}/{a}", "/{x:(}", "/{x:(?i)a}", "/a{", "/{1}", "/a/{b:[0-9]+}/c",
    "/{x:a{2}}", "/{p:(?P<q>x)}", "no-slash", "//double", "/api/cart/", "GET", "POST", "get", "G E T", "",
    "*.example.com", "[::1]", "h:80", "a/b", "http://127.0.0.1:9101", "https://a.example.com:8443",
    "http://h/path", "http://u@h", "http://h:99999", "ftp://h", "http://h?x", "ok.html", "plain.html",
    "bad.html", "latin1.html", "missing.html", "named.html", "sub", "../routes.yaml", "/etc/hostname", "a\x00b",
    "\ud800", "~Mobile", "~(", "~.*", "x-beta", "cache-control", "content-length", "Host", "max-age=60",
    "a\r\nb", "{", "}", "{sku}", "{sku}{id}", ".*", "(?P<x>a)", "$1", "${1}", "${name}", "$$", "\\1", "$x",
    "m.yaml", "bad.json", "nothing.yaml", "http://127.0.0.1:1/m.json", "1.0.0", "2", "header", "footer", "é",
    "😀", "x" * 300,
]
_KEYS = ["settings", "routes", "fragments", "name", "match", "path", "path_prefix", "methods", "host",
         "headers", "cookies", "template", "backend", "redirect", "to", "status", "filters", "preserve_host",
         "timeout_ms", "connect_timeout_ms", "templates", "fragment_timeout_ms", "forward_headers",
         "allowed_origins", "max_fragment_bytes", "reload_interval_ms", "manifest", "manifest_poll_s",
         "version_override_header", "owner", "versions", "active", "canary", "enabled", "fallback", "version",
         "percent", "pattern", "replacement", "x-beta", "user-agent", "unknown", *FILTERS, *PREDICATES]


def _quoted(text: str) -> str:
    return json.dumps(text)  # a JSON string is a YAML double-quoted scalar; \ud800 stays a lone surrogate


_SCALAR = (
    st.sampled_from(_RAW_SCALARS)
    | st.integers(-(2**70), 2**70).map(str)
    | st.sampled_from(_STRINGS).map(_quoted)
    | st.sampled_from([s for s in _STRINGS if s and s.isprintable() and s[0] not in "[{*&!|>%@`'\""
                       and ": " not in s and " #" not in s])
    | st.text(max_size=15).map(_quoted)
)
_KEY = st.sampled_from(_KEYS) | st.sampled_from(_STRINGS).map(_quoted) | st.sampled_from(["? [a]", "~", "1", "*a"])


def _pairs(key: st.SearchStrategy[str], value: st.SearchStrategy[object], max_size: int = 4, min_size: int = 0
           ) -> st.SearchStrategy[Pairs]:
    return st.lists(st.tuples(key, value), min_size=min_size, max_size=max_size).map(Pairs)


_ANY = st.recursive(_SCALAR, lambda inner: st.lists(inner, max_size=4) | _pairs(_KEY, inner), max_leaves=12)


def _rarely(n: int = 25) -> st.SearchStrategy[bool]:
    """True about once in `n` (a middle value: Hypothesis favours the bounds of a range)."""
    return st.integers(0, n - 1).map(lambda i: i == n // 2)


def _noisy(strategy: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """Mostly `strategy`, rarely any YAML value at all."""
    return st.one_of(*[strategy] * 49, _ANY)


def _entry(keys: dict[str, st.SearchStrategy[object]], required: tuple[str, ...] = ()) -> st.SearchStrategy[Pairs]:
    """A mapping: `required` keys (rarely missing), some of the others, their values mostly
    plausible; rarely a repeated or unknown key."""
    values = {k: _noisy(v) for k, v in keys.items()}
    optional = [k for k in keys if k not in required]

    @st.composite
    def build(draw: st.DrawFn) -> Pairs:
        chosen = [k for k in required if not draw(_rarely())]
        chosen += [k for k in optional if draw(st.booleans())]
        chosen = draw(st.permutations(chosen))
        if chosen and draw(_rarely(10)):
            chosen.append(draw(st.sampled_from(chosen)))
        out = Pairs((k, draw(values[k])) for k in chosen)
        if draw(_rarely()):
            out.insert(draw(st.integers(0, len(out))), (draw(_KEY), draw(_ANY)))
        return out

    return build()


def _pick(valid: list[str], invalid: list[str], quote: bool = True) -> st.SearchStrategy[str]:
    """One of `valid` nine times out of ten, else one of `invalid`; as YAML strings if `quote`."""
    good, bad = st.sampled_from(valid), st.sampled_from(invalid)
    picked = st.one_of(*[good] * 9, bad)
    return picked.map(_quoted) if quote else picked


_MATCH_KEYS = {
    "methods": st.lists(_pick(["GET", "HEAD", "get"], ["POST", "G E T", ""]), min_size=1, max_size=3)
               | _pick(["GET"], ["[]"], quote=False),
    "host": _pick(["*.example.com", "h", "[::1]"], ["h:80", "[::1]:80", "", "a b"]),
    "headers": _pairs(_pick(["x-beta", "user-agent"], ["bad name", ""]), _pick(["1", "~Mobile"], ["~(", "[1]"]),
                      min_size=1),
    "cookies": _pairs(_pick(["session", "a"], [""]), _pick(["1"], [""]), min_size=1),
}
_PATHS = _pick(["/", "/products/{sku}", "/{rest:.*}", "/a/{b:[0-9]+}", "/p/{sku}/{id}"],
               ["/{x:(}", "/{a}/{a}", "/a{", "x", "/{x:(?i)a}", "/{1}"])
_PREFIXES = _pick(["/", "/api", "/api/"], ["/{x}", "api", ""])


@st.composite
def _match(draw: st.DrawFn) -> Pairs:
    out = draw(_entry(_MATCH_KEYS))
    kinds = draw(st.sampled_from([["path"]] * 6 + [["path_prefix"]] * 3 + [[], ["path", "path_prefix"]]))
    for kind in kinds:
        out.insert(draw(st.integers(0, len(out))), (kind, draw(_noisy(_PATHS if kind == "path" else _PREFIXES))))
    return out


_FILTER_ARGS = {
    "set_response_header": _pairs(_pick(["cache-control", "x-a"], ["content-length", "bad name"]),
                                  _pick(["max-age=60", "x"], ["a\r\nb", ""])),
    "remove_response_header": _pick(["x-a"], ["connection"]) | st.lists(_pick(["x-a"], ["b c"]), max_size=2),
    "set_request_header": _pairs(_pick(["x-a"], ["host"]), _pick(["1"], ["\x00"])),
    "remove_request_header": _pick(["cookie"], ["[]"]),
    "strip_prefix": _pick(["/api"], ["/", "api", "/a?b", "/{x}"]),
    "set_path": _pick(["/v1/{sku}", "/v1"], ["/v1/{nope}", "/{", "/a b", "x"]),
    "rewrite_path": _entry({"pattern": _pick(["^/api/(.*)", "(?P<n>.)"], ["(", ""]),
                            "replacement": _pick(["/$1", "${n}", "$$"], ["${2}", "\\", "\\g<0>"])},
                           required=("pattern", "replacement")),
}
_FILTER = st.one_of(*[_noisy(_FILTER_ARGS.get(name, _ANY)).map(lambda args, name=name: Pairs([(name, args)]))
                      for name in sorted(FILTERS) + ["nope", '""']])
_TARGETS = {
    "template": _pick(["ok.html", "plain.html", "named.html"],
                      ["bad.html", "latin1.html", "missing.html", "sub", "../routes.yaml", "a\x00b", "\ud800",
                       "/etc/hostname", "", "x" * 300]),
    "backend": _pick(["http://127.0.0.1:9101", "https://a.example.com:8443"],
                     ["http://h/path", "http://h:99999", "ftp://h", "http://u@h", "http://[::1", "http://", "h"]),
    "redirect": _entry({"to": _pick(["/new/{sku}", "/new?x={sku}", "https://h/a", "/new"],
                                    ["//evil", "http://{sku}/", "/a b", "/{nope}", "x", "/{"]),
                        "status": _pick(["301", "302", "308"], ["200", "999", "99999", "!!int x"], quote=False)},
                       required=("to",)),
}
_BACKEND_OPTIONS = {
    "preserve_host": _pick(["true", "false", "yes"], ["!!bool '['", "!!bool maybe", "1"], quote=False),
    "timeout_ms": _pick(["1", "600000", "100"], ["0", "600001", "1" * 5000, "!!int '['"], quote=False),
    "connect_timeout_ms": _pick(["5"], ["-1", "!!int abc"], quote=False),
}


@st.composite
def _route(draw: st.DrawFn) -> Pairs:
    out = draw(_entry({"name": _pick(["home", "product", "api", "cart"], ["", "a b", "[1]"]),
                       "match": _match(), "filters": st.lists(_FILTER, max_size=3)}, required=("name", "match")))
    targets = draw(st.sampled_from([["template"]] * 4 + [["backend"]] * 2 + [["redirect"]] * 2
                                   + [[], ["template", "backend"]]))
    for target in targets:
        out.append((target, draw(_noisy(_TARGETS[target]))))
        if target == "backend" or draw(_rarely()):
            for option, value in _BACKEND_OPTIONS.items():
                if draw(st.booleans()):
                    out.append((option, draw(value)))
    return Pairs(draw(st.permutations(out)))


_SETTINGS = _entry({
    "templates": _pick(["templates", "."], ["nowhere", "a\x00b", "\ud800", "/", ""]),
    "fragment_timeout_ms": _pick(["1", "3000", "0x10"], ["0", "600001", "1" * 5000, "!!int abc"], quote=False),
    "forward_headers": st.lists(_pick(["cookie", "x-a"], ["Host", ""]), max_size=3),
    "allowed_origins": st.lists(_pick(["http://127.0.0.1:*", "https://*.example.com"], ["ftp://x", "*"]),
                                max_size=2),
    "max_fragment_bytes": _pick(["1", str(1 << 30)], ["0", str(1 << 31)], quote=False),
    "reload_interval_ms": _pick(["0", "1000"], ["-1"], quote=False),
    "manifest": _pick(["m.yaml"], ["bad.json", "nothing.yaml", "sub", "a\x00b", "\ud800", "templates"])
                | st.just("~"),
    "manifest_poll_s": _pick(["1", "10"], ["0", "86401"], quote=False),
    "version_override_header": _pick(["x-composer-versions"], [""]) | st.just("~"),
    "circuit_breaker": st.deferred(lambda: _BREAKER),
    "cache": _entry({"max_bytes": _pick(["0", "1000000"], ["-1", "!!int x"], quote=False)}),
    "page_timeout_ms": _pick(["1", "5000"], ["0", "600001"], quote=False),
    "max_fragments_per_template": _pick(["1", "100"], ["0", "10001"], quote=False),
    "max_connections_per_origin": _pick(["1", "100"], ["0"], quote=False),
    "server_timing": _pick(["true", "false", "off"], ["1", "!!bool maybe"], quote=False),
    "timing_marks": _pick(["true", "no"], ["yes please", "~"], quote=False),
})
_BREAKER = _entry({key: _pick(["0", "1", "5", "100"], ["-1", "101", "!!int x", "1" * 5000], quote=False)
                   for key in ("failures", "failure_percent", "min_requests", "window_s", "cooldown_ms")})
_MANIFEST_ENTRY = _entry({
    "owner": _pick(["team-a", "\ud83d\ude00"], ["", "\ud800"]),
    "versions": _pairs(_pick(["1", "2", "1.0.0"], ["~"]),
                       _pick(["http://127.0.0.1:9101/h", "http://h/{sku}"], ["ftp://x", "http://{sku}/", ""]),
                       min_size=1, max_size=3),
    "active": _pick(["1", "2"], ["3", "1.0"]),
    "canary": _entry({"version": _pick(["1", "2"], ["9"]),
                      "percent": _pick(["0", "50", "100"], ["101", "-1"], quote=False)},
                     required=("version", "percent")),
    "enabled": _pick(["true", "false", "no"], ["!!bool maybe", "!!bool '['", "1"], quote=False),
    "timeout_ms": _pick(["1", "500"], ["0", "600001", "1" * 5000], quote=False),
    "fallback": _pick(["http://127.0.0.1:9101/fb"], ["nope", "http://h/{x}"]),
    "circuit_breaker": _BREAKER,
}, required=("versions", "active"))
_FRAGMENTS = _pairs(_pick(["header", "footer"], ["", "\ud800", "é"]), _MANIFEST_ENTRY)
_CONFIG = _entry({
    "settings": _SETTINGS,
    "routes": st.one_of(*[st.lists(_route(), min_size=1, max_size=4)] * 9, st.just([])),
    "fragments": _FRAGMENTS,
}, required=("routes",))


def _block(value: object, indent: int) -> str:
    pad = "  " * indent
    if isinstance(value, Pairs):
        return "".join(f"\n{pad}{k}:{_block(v, indent + 1)}" for k, v in value) if value else " {}"
    if isinstance(value, list):
        return "".join(f"\n{pad}-{_block(v, indent + 1)}" for v in value) if value else " []"
    return f" {value}"


def _flow(value: object) -> str:
    if isinstance(value, Pairs):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return str(value)


def _yaml(value: object, flow: bool) -> str:
    if flow:
        return _flow(value) + "\n"
    text = _block(value, 0)
    return text.removeprefix("\n") + "\n" if isinstance(value, (Pairs, list)) and value else text.lstrip() + "\n"


@st.composite
def _mutated(draw: st.DrawFn, text: st.SearchStrategy[str]) -> str:
    """A text with a few random edits: inserted junk, deleted or duplicated slices."""
    out = draw(text)
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(out)))
        j = draw(st.integers(i, min(len(out), i + 20)))
        edit = draw(st.sampled_from(["insert", "delete", "duplicate"]))
        if edit == "insert":
            out = out[:i] + draw(st.sampled_from(_RAW_SCALARS) | st.text(max_size=5)) + out[i:]
        elif edit == "delete":
            out = out[:i] + out[j:]
        else:
            out = out[:j] + out[i:j] + out[j:]
    return out


_STRUCTURED_CONFIG = st.builds(_yaml, _CONFIG, st.booleans())
_CONFIG_TEXT = st.one_of(_STRUCTURED_CONFIG, _STRUCTURED_CONFIG, _mutated(_STRUCTURED_CONFIG), st.text(max_size=200))

_RECURSIVE_ALIAS = "routes:\n- name: a\n  match: &m {path: /, headers: *m}\n  template: ok.html\n"
_LAUGHS = ("x0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
           + "".join(f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9))
           + "routes:\n- name: a\n  match: {path: /, headers: {x: *a8}}\n  template: ok.html\n")


def _write_routes(workdir: Path, text: str) -> Path:
    file = workdir / "routes.yaml"
    file.write_bytes(text.encode("utf-8", "surrogatepass"))
    return file


def _labels(routes: Path, text: str) -> Callable[[str], int | None]:
    """Line counts of the files a config problem may name: routes.yaml, templates, manifests
    (one that cannot be read only on line 1)."""

    def lines(label: str) -> int | None:
        if label == str(routes):
            return _max_line_text(text)
        file = Path(label)
        if file.is_file():
            return _max_line_bytes(file.read_bytes())
        return 1 if label.startswith(str(routes.parent)) else None  # a manifest named but missing: line 1

    return lines


def _universal(text: str) -> str:
    """The text as `read_text` sees it (universal newlines)."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


@settings(PROPERTY, max_examples=_examples(200))
@given(text=_CONFIG_TEXT)
@example(text="settings: {fragment_timeout_ms: !!int abc}\nroutes: []\n")
@example(text="settings: {fragment_timeout_ms: !!int '['}\nroutes: []\n")
@example(text="settings: {fragment_timeout_ms: " + "1" * 5000 + "}\nroutes: []\n")
@example(text="routes:\n- name: a\n  match: {path: /}\n  backend: http://h\n  preserve_host: !!bool '['\n")
@example(text="routes: " + "[" * 3000 + "]" * 3000 + "\n")
@example(text=_RECURSIVE_ALIAS)
@example(text="fragments: &f {a: *f}\nroutes: []\n")
@example(text=_LAUGHS)
@example(text='routes:\n- name: a\n  match: {path: /}\n  template: "a\\0b"\n')
@example(text='routes:\n- name: a\n  match: {path: /}\n  template: "\\ud800"\n')
@example(text='settings: {templates: "\\0"}\nroutes:\n- name: a\n  match: {path: /}\n  template: x\n')
@example(text="routes: []\nx: \x00\n")
@example(text="routes: []\n\x85\u2028x: [\n")
@example(text='settings: {manifest: "\\0"}\nroutes: []\n')
@example(text="settings: {manifest: templates}\nroutes: []\n")
def test_any_routes_yaml_loads_or_fails_with_lines(workdir: Path, text: str) -> None:
    file = _write_routes(workdir, text)
    labels = _labels(file, _universal(text))
    config = _attempt(labels, load_config, file)
    assert config is None or (isinstance(config, Config) and not config.problems)
    if config is None:  # the same file, read to get on with what is usable (as `serve` does)
        config = _attempt(labels, read_config, file)
        assert config is None or config.problems
    if config is not None:
        if config.problems:
            _check_problems(ConfigError(list(config.problems)), labels)
        table = _attempt(labels, build_table, config)
        assert table is None or (isinstance(table, RouteTable) and not config.problems)
        if config.settings.manifest and not config.settings.manifest.startswith(("http:", "https:")):
            loaded = _attempt(labels, load, file)  # what `composer check` and `serve` run
            assert loaded is None or isinstance(loaded, RouteTable)


def _attempt(labels: Callable[[str], int | None], function: Callable[[T], R], arg: T) -> R | None:
    """`function(arg)` under the time limit; None when it raised a ConfigError (checked)."""
    try:
        with _time_limit():
            return function(arg)
    except ConfigError as exc:
        _check_problems(exc, labels)
        return None


def _json_value() -> st.SearchStrategy[object]:
    leaf = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
            | st.text(max_size=10) | st.sampled_from(_STRINGS))
    return st.recursive(leaf, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=5) | st.sampled_from(_KEYS), inner, max_size=3),
                        max_leaves=10)


_JSON_ENTRY = st.fixed_dictionaries({}, optional={
    "owner": st.sampled_from(["team", "\ud83d\ude00", "\ud800", ""]) | _json_value(),
    "versions": st.dictionaries(st.sampled_from(["1", "2"]), st.sampled_from(_URLS) | _json_value(), max_size=2)
    | _json_value(),
    "active": st.sampled_from(["1", "2", 1]),
    "canary": st.fixed_dictionaries({}, optional={"version": st.sampled_from(["1", "2"]),
                                                  "percent": st.integers(-5, 105)}) | _json_value(),
    "enabled": st.booleans() | _json_value(),
    "timeout_ms": st.integers(-5, 10**7) | _json_value(),
    "fallback": st.sampled_from(_URLS) | _json_value(),
    "extra": _json_value(),
})
_JSON_MANIFEST = st.fixed_dictionaries({}, optional={
    "fragments": st.dictionaries(st.sampled_from(["header", "footer", "\ud800", ""]) | st.text(max_size=5),
                                 _JSON_ENTRY, max_size=3) | _json_value(),
    "other": _json_value(),
}) | _json_value()
_MANIFEST_TEXT = (
    st.builds(json.dumps, _JSON_MANIFEST, indent=st.none() | st.sampled_from([2, "\t", "\t \t"]),
              ensure_ascii=st.booleans())
    | _mutated(st.builds(json.dumps, _JSON_MANIFEST, indent=st.sampled_from([None, 1, "\t"])))
    | st.builds(_yaml, _entry({"fragments": _FRAGMENTS}, required=("fragments",)), st.booleans())
    | _mutated(st.builds(_yaml, _entry({"fragments": _FRAGMENTS}, required=("fragments",)), st.booleans()))
    | st.text(max_size=200)
)


@settings(PROPERTY, max_examples=_examples(200))
@given(text=_MANIFEST_TEXT, origins=_ORIGINS)
@example(text="[" * 3000, origins=())
@example(text="fragments: &f {a: *f}", origins=())
@example(text="fragments: {a: &e {versions: {'1': http://h/}, active: '1', owner: *e}}", origins=())
@example(text='{"fragments":\t{"a": {"owner": "\\ud800", "versions": {"1": "http://h/"}, "active": "1"}}}',
         origins=())
@example(text='{"fragments": {"a": {"versions": {"1": "http://h/"}, "active": "1", "timeout_ms": !!int "["}}}',
         origins=())
@example(text="fragments: {}\r\n\x00", origins=())
def test_any_manifest_parses_or_fails_with_lines(text: str, origins: tuple[str, ...]) -> None:
    try:
        with _time_limit():
            manifest = parse_manifest(text, "m.json", origins, source="m.json")
    except ConfigError as exc:
        _check_problems(exc, {"m.json": _max_line_text(text)})
        return
    assert isinstance(manifest, Manifest)
    for name, entry in manifest.fragments.items():
        assert entry.name == name and entry.active in entry.versions
        (entry.name + entry.owner).encode()  # every text is encodable: they are metric labels
        assert 1 <= entry.line <= _max_line_text(text)


# ---------------------------------------------------------------------------------------
# 3. Link headers
# ---------------------------------------------------------------------------------------

_LINK_URLS = [
    "/a.css", "/x/y.js?v=1", "http://127.0.0.1:9101/a.css", "https://cdn.example.com/a.css", "HTTP://H/A",
    "//evil.example/a.css", "/\\evil.example/a.css", "/\t/evil.example/a.css", "\t//evil.example/a.css",
    " /a.css", "http:/\\evil.example/", "relative.css", "../up.css", "javascript:alert(1)", "data:text/css,a",
    "http://", "http:///x", "https://h:99999/", "http://[::1/", "http://[::1]/a.css", "http://u:p@h/a.css",
    "/é.css", "http://é.example/a.css", "/a b.css", '/a"b.css', "/a>b", "/a,b", "/a;b", "", "?q", "#f",
    "/" + "a" * 5000, "file:///etc/passwd", "\x00/a", "/a\r\n.css",
]
_LINK_PARAMS = [
    "; rel=stylesheet", '; rel="stylesheet"', "; rel=fragment-script", '; rel="preload stylesheet"',
    "; REL=STYLESHEET", '; foo="bar"', "; foo=bar", "; rel=", "; =x", ";", ";;", '; rel="', "; rel=\"a,b\"",
    ", ", ",", '"', "'", "<", ">", " ", "; title*=UTF-8''%e2%82%ac", "; rel=stylesheet" * 50,
]


@st.composite
def _link_line(draw: st.DrawFn) -> str:
    links = []
    for _ in range(draw(st.integers(1, 4))):
        url = draw(st.sampled_from(_LINK_URLS) | st.text(max_size=20))
        params = "".join(draw(st.lists(st.sampled_from(_LINK_PARAMS) | st.text(max_size=6), max_size=4)))
        links.append(draw(st.sampled_from(["<{}>{}", "{}{}", "<{}{}", " <{}> {}"])).format(url, params))
    return draw(st.sampled_from([", ", ",", " , ", ""])).join(links)


_LINK_VALUE = _link_line() | st.text(max_size=100) | st.text(alphabet="<>;,=\"' /ahrelstyc", max_size=300)


def _check_asset_url(asset: Asset) -> None:
    assert asset.kind in ("stylesheet", "script")
    url = asset.url
    parsed = URL(url)
    if parsed.scheme:
        assert parsed.scheme in ("http", "https") and parsed.raw_host, url
    else:
        assert url.startswith("/") and not url.startswith("//"), url
        # Browsers drop tabs and newlines and read `\` as `/` in URLs: neither may make it `//host`.
        assert not re.sub(r"[\t\n\r]", "", url).replace("\\", "/").startswith("//"), url


@settings(PROPERTY, max_examples=_examples(200))
@given(values=st.lists(_LINK_VALUE, min_size=1, max_size=4))
@example(values=["</\\evil.example/a.css>; rel=stylesheet"])
@example(values=["</" + "a" * 100_000 + ">; rel=stylesheet"])
@example(values=["<" * 20_000 + "; rel=stylesheet"])
@example(values=["</a.css>" + '; rel="' * 5000])
def test_any_link_header_gives_usable_assets(values: list[str]) -> None:
    headers: CIMultiDict[str] = CIMultiDict(("link", v) for v in values)
    with _time_limit():
        assets = parse_assets(headers)
    assert isinstance(assets, tuple)
    for asset in assets:
        assert isinstance(asset, Asset)
        _check_asset_url(asset)


_SAFE_PATH = st.text(alphabet="abcxyz0123456789-_", min_size=1, max_size=10).map(lambda s: f"/{s}.css")


@PROPERTY
@given(path=_SAFE_PATH, rel=st.sampled_from(["stylesheet", '"stylesheet"', "fragment-script"]),
       junk=st.lists(_LINK_VALUE, min_size=1, max_size=3), position=st.integers(0, 3))
@example(path="/ok.css", rel="stylesheet", junk=['<x>; rel=stylesheet; title="'], position=0)
def test_a_valid_link_line_survives_invalid_neighbours(path: str, rel: str, junk: list[str],
                                                       position: int) -> None:
    lines = [*junk]
    lines.insert(min(position, len(lines)), f"<{path}>; rel={rel}")
    with _time_limit():
        assets = parse_assets(CIMultiDict(("link", v) for v in lines))
    kind = "script" if rel == "fragment-script" else "stylesheet"
    assert Asset(kind, str(URL(path))) in assets, (lines, assets)


def test_the_time_limit_catches_a_hang() -> None:
    """The hang guard itself: a busy loop is interrupted, so a hanging example fails."""
    with pytest.raises(Hang), _time_limit(0.2):
        while True:
            pass


# ---------------------------------------------------------------- the access line

@settings(max_examples=300, deadline=None)
@given(created=st.floats(min_value=0, max_value=4e9), method=st.text(max_size=10), path=st.text(max_size=40),
       status=st.integers(min_value=100, max_value=599), hundredths=st.integers(min_value=0, max_value=10**12),
       route=st.text(max_size=20), rid=st.text(max_size=40), remote=st.none() | st.text(max_size=20),
       error=st.none() | st.text(max_size=20))
def test_the_access_line_written_out_is_the_formatters_line(created, method, path, status, hundredths, route, rid,
                                                            remote, error):
    """composer.access.line (the access line, written without the JSON encoder) gives, byte for
    byte, what JsonFormatter's generic `line` gives for the same fields: any text (quotes,
    control characters, non-ASCII, lone surrogates), a null remote, an error or none, any
    duration (written from its hundredths of a ms, not by float repr), and the same again when
    its quoted strings come from the cache."""
    from composer.access import line
    from composer.logs import JsonFormatter

    fields = {"method": method, "path": path, "status": status, "duration_ms": hundredths / 100, "route": route,
              "request_id": rid, "remote": remote}
    if error is not None:
        fields["error"] = error
    formatter = JsonFormatter()
    quoted: dict[str, str] = {}
    fast = line(formatter.stamp, created, "composer.access", method, path, status, hundredths, route, rid, remote, error,
                quoted)
    assert fast == formatter.line(created, "info", "composer.access", "access", fields)
    assert line(formatter.stamp, created, "composer.access", method, path, status, hundredths, route, rid, remote, error,
                quoted) == fast
    assert json.loads(fast)["path"] == path


# ---------------------------------------------------------------- the fragment pool's queue

class _ScanPool:
    """The pool's slots and queue as they were before waiters were parked by share: each wake
    scans the queue from its head for the first waiter that may have a slot. The reference
    the parked queue must agree with, grant for grant."""

    def __init__(self, limit: int, max_opening: int) -> None:
        self.limit, self.max_opening = limit, max_opening
        self.reserve, self.share = limit // 4, max(1, limit // 16)
        self.size = self.opening = 0
        self.held: dict[str, int] = {}
        self.waiters: list[tuple[int, str | None]] = []
        self.granted: set[int] = set()

    def admits(self, share: str | None, busy: int) -> bool:
        return busy < self.limit - self.reserve or share is None or self.held.get(share, 0) < self.share

    def grant(self, ticket: int, share: str | None) -> None:
        if share is not None:
            self.held[share] = self.held.get(share, 0) + 1
        self.size += 1
        self.opening += 1
        self.granted.add(ticket)

    def unhold(self, share: str | None) -> None:
        if share is not None:
            self.held[share] -= 1
            if not self.held[share]:
                del self.held[share]

    def wait(self, ticket: int, share: str | None) -> None:
        if self.size < self.limit and self.opening < self.max_opening and self.admits(share, self.size):
            self.grant(ticket, share)
        else:
            self.waiters.append((ticket, share))

    def wake(self) -> None:
        while self.size < self.limit and self.opening < self.max_opening:
            for i, (ticket, share) in enumerate(self.waiters):
                if self.admits(share, self.size):
                    del self.waiters[i]
                    self.grant(ticket, share)
                    break
            else:
                return


@settings(PROPERTY, max_examples=_examples(300))
@given(limit=st.sampled_from([4, 8, 16, 64]),
       ops=st.lists(st.tuples(st.sampled_from(["arrive", "arrive", "open", "finish", "cancel"]),
                              st.integers(0, 63)), max_size=400))
def test_the_pools_parked_queue_grants_what_a_scan_of_the_queue_would(limit: int, ops: list[tuple[str, int]]) -> None:
    """composer.client's pool parks a waiter whose share is full instead of scanning past it
    at every wake. Over any sequence of callers arriving (five shares, one of them none),
    connections opening, connections ending and callers giving up (waiting, or handed a slot
    not yet used), it hands out exactly the slots, to exactly the callers, in exactly the
    order that the plain scan of the queue would."""
    import asyncio

    from composer.client import MAX_OPENING, Client, _Pool, _Ticket

    loop = asyncio.new_event_loop()
    try:
        pool = _Pool(Client(limit_per_host=limit), loop, "http", "127.0.0.1", 80, "127.0.0.1")
        model = _ScanPool(limit, MAX_OPENING)
        shares = ["a", "b", "c", "d", None]
        tickets: list[_Ticket] = []
        opened: set[int] = set()
        finished: set[int] = set()
        given_up: set[int] = set()

        def granted() -> set[int]:
            return {i for i, t in enumerate(tickets) if t.fut.done() and not t.fut.cancelled()}

        for op, k in ops:
            if op == "arrive":
                share = shares[k % len(shares)]
                tickets.append(pool.wait(_Ticket(loop.create_future(), share, b"", 0, None)))
                model.wait(len(tickets) - 1, share)
            elif op == "open":  # a slot handed out becomes an open connection
                candidates = [i for i in sorted(granted() - given_up) if i not in opened]
                if candidates:
                    opened.add(candidates[k % len(candidates)])
                    pool.opened()
                    model.opening -= 1
                    model.wake()
            elif op == "finish":  # an open connection ends: its slot and share are freed
                candidates = [i for i in sorted(opened) if i not in finished]
                if candidates:
                    i = candidates[k % len(candidates)]
                    finished.add(i)
                    pool.unhold(tickets[i].share)
                    pool.free_slot()
                    model.unhold(tickets[i].share)
                    model.size -= 1
                    model.wake()
            else:  # a caller gives up: still waiting, or handed a slot it has not used yet
                candidates = [i for i in range(len(tickets))
                              if i not in given_up and i not in opened and not tickets[i].fut.cancelled()]
                if candidates:
                    i = candidates[k % len(candidates)]
                    given_up.add(i)
                    ticket = tickets[i]
                    ticket.fut.cancel()
                    pool.abandon(ticket.share, None, ticket, ticket.fut)
                    if i in model.granted:
                        model.opening -= 1
                        model.unhold(ticket.share)
                        model.size -= 1
                        model.wake()
                    else:
                        model.waiters.remove((i, ticket.share))
            assert granted() == model.granted, (op, k)
            assert (pool.size, pool.opening, pool.held) == (model.size, model.opening, model.held)
        waiting = [i for i, t in enumerate(tickets) if not t.fut.done()]
        assert waiting == [i for i, _ in model.waiters]
    finally:
        loop.close()

