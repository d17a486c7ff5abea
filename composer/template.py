"""Compiling page templates into literal byte chunks and fragment nodes.

A template is compiled once, at load: the output is a tuple whose items are `bytes`
(copied verbatim from the file — never re-serialised), `Fragment` nodes, and at most one
`ASYNC_SLOT` marking where async fragments are streamed (just before `</body>`).

selectolax is the authority on what is markup: a `<fragment` inside a comment, a script
or an attribute value is text to an HTML parser, and must stay text here too. Since the
parser does not report source offsets, candidate tags are found with a regex and tagged
with their offset before parsing; only candidates the parser turns into elements count.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import quote

from selectolax.lexbor import LexborHTMLParser
from yarl import URL

from .breaker import DEFAULT_POLICY, BreakerPolicy, merged
from .errors import ConfigError
from .nodes import MAX_TIMEOUT_MS
from .urls import url_problem

if TYPE_CHECKING:
    from .config import Settings
    from .manifest import Manifest

__all__ = ["ASYNC_SLOT", "Fragment", "Template", "UrlTemplate", "compile_template"]


class _AsyncSlot:
    """Where async fragments are written: before `</body>`, else at the end of the page."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ASYNC_SLOT"


ASYNC_SLOT: Final = _AsyncSlot()

_OPEN = re.compile(r"<(fragment|script)(?=[\s/>])", re.IGNORECASE)
_TAG_REST = re.compile(r"""(?:[^>"']|"[^"]*"|'[^']*')*>""")
_CLOSE_FRAGMENT = re.compile(r"</fragment\s*>", re.IGNORECASE)
_CLOSE_SCRIPT = re.compile(r"</script[\s/>]", re.IGNORECASE)
_CLOSE_BODY = re.compile(r"</body[\s/>]", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_AT = "data-composer-at"
_MARK = "composer-mark"

_BOOLEAN = ("primary", "async", "public")
_KNOWN = ("src", "name", "id", "fallback-src", "timeout", *_BOOLEAN)


@dataclass(frozen=True, slots=True)
class UrlTemplate:
    """A fragment URL with `{param}` holes; literal parts alternate with param names.

    Values are quoted with `safe=""`, so a param can never add `/`, `?`, `#`, `@` or CR/LF,
    and `.`/`..` become `%2E`/`%2E%2E`: the origin and path structure are fixed at load.
    """

    parts: tuple[str, ...]
    static: URL | None
    origin: str = ""  # scheme://host:port, fixed at load (a circuit breaker's key)

    @classmethod
    def parse(cls, raw: str) -> UrlTemplate:
        """`raw` must have passed `urls.url_problem` (params only in the path or query)."""
        pieces = _PLACEHOLDER.split(raw)
        if len(pieces) == 1:
            url = URL(raw)
            return cls(parts=(raw,), static=url, origin=origin_of(url))
        return cls(parts=tuple(pieces), static=None, origin=origin_of(URL(_PLACEHOLDER.sub("p", raw))))

    @property
    def params(self) -> tuple[str, ...]:
        return self.parts[1::2]

    def render(self, params: dict[str, str]) -> URL:
        if self.static is not None:
            return self.static
        out = []
        for i, part in enumerate(self.parts):
            if i % 2:
                value = params.get(part, "")
                out.append(_quote_param(value))
            else:
                out.append(part)
        return URL("".join(out), encoded=True)

    def keeps_origin(self, url: URL) -> bool:
        """Does a rendered `url` still go where the load-time check allowed? (Defence in depth:
        quoting already keeps a param out of the origin.)"""
        return self.static is not None or origin_of(url) == self.origin


def origin_of(url: URL) -> str:
    return f"{url.scheme}://{url.raw_host}:{url.port}"


def _quote_param(value: str) -> str:
    if value in (".", ".."):
        return "%2E" * len(value)
    return quote(value, safe="")


@dataclass(frozen=True, slots=True)
class Fragment:
    """A `<fragment>` (or `<script type="fragment">`) as the page needs it at request time.

    A fragment named in the manifest carries its versions: `src` is the active one, and the
    page picks the canary (by the user's bucket) or a QA override per request.
    """

    id: str
    index: int
    line: int
    src: UrlTemplate
    fallback_src: UrlTemplate | None
    timeout: float
    primary: bool
    is_async: bool
    public: bool
    fallback_html: bytes
    name: str | None = None  # the manifest entry, when it comes from the manifest
    owner: str = ""
    version: str = ""  # of `src`
    canary: str | None = None  # the canary version, served to buckets below `canary_percent`
    canary_percent: int = 0
    versions: Mapping[str, UrlTemplate] = field(default_factory=dict)
    enabled: bool = True
    breaker: BreakerPolicy = DEFAULT_POLICY


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled template: `chunks` is the page in order; `fragments` in document order."""

    name: str
    chunks: tuple[bytes | Fragment | _AsyncSlot, ...]
    fragments: tuple[Fragment, ...]
    primary: Fragment | None
    async_fragments: tuple[Fragment, ...]
    versioned: bool = False  # has manifest fragments: the page needs the user's canary bucket


class _Problems:
    def __init__(self, label: str, source: str) -> None:
        self.label = label
        self.source = source
        self.items: list[str] = []

    def line(self, offset: int) -> int:
        return self.source.count("\n", 0, offset) + 1

    def add(self, offset: int, message: str) -> None:
        self.items.append(f"{self.label}:{self.line(offset)}: {message}")


@dataclass(slots=True)
class _Found:
    """A fragment element located in the source: [start, open_end) is its tag, [.., end) all of it."""

    start: int
    open_end: int
    close_start: int
    end: int
    attrs: dict[str, str | None]


def compile_template(file: Path, *, params: tuple[str, ...], settings: Settings,
                     name: str, manifest: Manifest | None = None) -> Template:
    """Read and compile `file`; raise `ConfigError` with `file:line: message` problems."""
    label = str(file)
    try:
        source = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{label}:1: not valid UTF-8 ({exc.reason} at byte {exc.start})"]) from None
    except OSError as exc:
        raise ConfigError([f"{label}:1: cannot read: {exc.strerror}"]) from None
    problems = _Problems(label, source)
    found, body_close = _locate(source, problems)
    limit = settings.max_fragments_per_template
    if len(found) > limit:
        problems.add(found[limit].start, f"more than {limit} fragments in one template "
                                         f"(settings.max_fragments_per_template); this is fragment {limit + 1}")
        raise ConfigError(problems.items)
    fragments: list[Fragment] = []
    for index, item in enumerate(found):
        fragment = _fragment(item, index, source, problems, params=params, settings=settings,
                             template=name, manifest=manifest)
        if fragment is not None:
            fragments.append(fragment)
    ids: dict[str, int] = {}
    primaries = [f for f in fragments if f.primary]
    for f in fragments:
        if f.id in ids:
            problems.add(found[f.index].start, f"duplicate fragment id {f.id!r} (first on line {ids[f.id]})")
        ids.setdefault(f.id, f.line)
    if len(primaries) > 1:
        problems.add(found[primaries[1].index].start,
                     f"a template has at most one primary fragment (first on line {primaries[0].line})")
    if problems.items:
        raise ConfigError(problems.items)

    chunks: list[bytes | Fragment | _AsyncSlot] = []
    pos = 0

    def literal(upto: int) -> None:
        nonlocal pos
        if body_close is not None and pos <= body_close < upto:
            literal(body_close)
            chunks.append(ASYNC_SLOT)
        if upto > pos:
            chunks.append(source[pos:upto].encode("utf-8"))
        pos = max(pos, upto)

    for item, fragment in zip(found, fragments, strict=True):
        literal(item.start)
        chunks.append(fragment)
        pos = item.end
    literal(len(source))
    if ASYNC_SLOT not in chunks:
        chunks.append(ASYNC_SLOT)
    return Template(
        name=name,
        chunks=tuple(_merge(chunks)),
        fragments=tuple(fragments),
        primary=primaries[0] if primaries else None,
        async_fragments=tuple(f for f in fragments if f.is_async),
        versioned=any(f.name is not None for f in fragments),
    )


def _merge(chunks: list[bytes | Fragment | _AsyncSlot]) -> list[bytes | Fragment | _AsyncSlot]:
    out: list[bytes | Fragment | _AsyncSlot] = []
    for chunk in chunks:
        if isinstance(chunk, bytes) and out and isinstance(out[-1], bytes):
            out[-1] += chunk
        else:
            out.append(chunk)
    return out


def _locate(source: str, problems: _Problems) -> tuple[list[_Found], int | None]:
    """Find fragment elements and the real `</body>` by asking selectolax about candidates."""
    for reserved in (_AT, _MARK):  # markup of our own making would be taken for the markers
        if (used := re.search(reserved, source, re.IGNORECASE | re.ASCII)) is not None:
            problems.add(used.start(), f"{reserved!r} is reserved for composer's own use in templates")
            return [], None
    opens: dict[int, re.Match[str]] = {}
    inserts: list[tuple[int, str]] = []
    unfinished: list[int] = []  # `<fragment` with no `>` outside quotes after it
    for m in _OPEN.finditer(source):
        rest = _TAG_REST.match(source, m.end())
        if rest is None:
            if m.group(1).lower() == "fragment":
                # Markup or text? A mark before it becomes an element only where a tag can start.
                unfinished.append(m.start())
                inserts.append((m.start(), f"<{_MARK} {_AT}={m.start()}></{_MARK}>"))
                inserts.append((m.end(), f' {_AT}="{m.start()}"'))
            continue
        opens[m.start()] = rest
        inserts.append((m.end(), f' {_AT}="{m.start()}"'))  # quoted: `<fragment/>` must not read as "0/"
        if m.group(1).lower() == "fragment" and _self_closing(source, rest.end()):
            # `<fragment/>` is not self-closing to an HTML parser; make it so for this parse.
            inserts.append((rest.end() - 2, "></fragment"))
    for regex in (_CLOSE_FRAGMENT, _CLOSE_BODY):
        for m in regex.finditer(source):
            inserts.append((m.start(), f"<{_MARK} {_AT}={m.start()}></{_MARK}>"))
    marked = _apply(source, inserts)
    tree = LexborHTMLParser(marked)

    found: list[_Found] = []
    _unfinished(tree, unfinished, problems)
    for element in tree.css(f"fragment[{_AT}], script[{_AT}]"):
        start = int(element.attributes[_AT] or 0)
        if start not in opens:  # an unfinished tag, reported above
            continue
        attrs = {k: v for k, v in element.attributes.items() if k != _AT}
        rest = opens[start]
        open_end = rest.end()
        if element.tag == "script":
            if (attrs.get("type") or "").strip().lower() != "fragment":
                continue
            close = _CLOSE_SCRIPT.search(source, open_end)
            gt = source.find(">", close.start()) if close is not None else -1
            if close is None or gt < 0:  # `</script` cut off by the end of the file closes nothing
                problems.add(start, '<script type="fragment"> is never closed')
                continue
            found.append(_Found(start, open_end, close.start(), gt + 1, attrs))
            continue
        if _self_closing(source, open_end):
            found.append(_Found(start, open_end, open_end, open_end, attrs))
            continue
        closes = [int(m.attributes[_AT] or 0) for m in element.css(_MARK)
                  if source.startswith("</f", int(m.attributes[_AT] or 0))
                  or source.startswith("</F", int(m.attributes[_AT] or 0))]
        if not closes:
            problems.add(start, "<fragment> is never closed (add </fragment>)")
            continue
        close = _CLOSE_FRAGMENT.match(source, max(closes))
        assert close is not None
        found.append(_Found(start, open_end, close.start(), close.end(), attrs))
        if any(inner.attributes[_AT] != element.attributes[_AT] for inner in element.css(f"fragment[{_AT}]")):
            problems.add(start, "fragments cannot be nested")
    found.sort(key=lambda f: f.start)
    for before, after in itertools.pairwise(found):
        if after.start < before.end:
            problems.add(after.start, "fragments cannot be nested")
    body_marks = [int(m.attributes[_AT] or 0) for m in tree.css(_MARK)
                  if source[int(m.attributes[_AT] or 0) + 2] in "bB"]
    outside = [b for b in body_marks if not any(f.start <= b < f.end for f in found)]
    return found, (max(outside) if outside else None)


def _unfinished(tree: LexborHTMLParser, starts: list[int], problems: _Problems) -> None:
    """Report each `<fragment` tag in markup that does not end, as in a half-written file
    (`<fragment id="b" src="http://1` at its end): served, it would reach browsers as text.
    In a comment, a script or an attribute value it is text, and fine."""
    if not starts:
        return
    elements = {int(e.attributes[_AT] or 0) for e in tree.css(f"fragment[{_AT}]")}
    marks = {int(m.attributes[_AT] or 0) for m in tree.css(_MARK)}
    for start in starts:
        if start in elements:  # HTML ends it at a `>` that a quote hides from the scanner
            problems.add(start, "cannot tell where this <fragment> tag ends: a quote in it is never closed")
        elif start in marks:
            problems.add(start, "unterminated <fragment tag: no `>` ends it before the end of the file "
                                "(a half-written template?)")


def _self_closing(source: str, tag_end: int) -> bool:
    """`<fragment src="x"/>` or `<fragment src=x />`; in `src=x/>` the slash is the value's."""
    return source[tag_end - 2] == "/" and source[tag_end - 3] in " \t\n\r\f\"'"


def _apply(source: str, inserts: list[tuple[int, str]]) -> str:
    out: list[str] = []
    pos = 0
    for offset, text in sorted(inserts, key=lambda i: i[0]):
        out.append(source[pos:offset])
        out.append(text)
        pos = offset
    out.append(source[pos:])
    return "".join(out)


def _fragment(item: _Found, index: int, source: str, problems: _Problems, *, params: tuple[str, ...],
              settings: Settings, template: str, manifest: Manifest | None) -> Fragment | None:
    attrs = item.attrs
    ok = True
    for key, value in attrs.items():
        if key == "type" or key.startswith("data-"):
            continue
        if key not in _KNOWN:
            problems.add(item.start, f"unknown attribute {key!r} on <fragment> (known: {', '.join(_KNOWN)})")
            ok = False
        elif key in _BOOLEAN and value not in (None, "", key):
            problems.add(item.start, f"{key!r} is a boolean attribute and takes no value, not {value!r}")
            ok = False
    src_raw, name = attrs.get("src"), attrs.get("name")
    entry = manifest.fragments.get(name) if manifest is not None and name else None
    if not src_raw and not name:
        problems.add(item.start, "<fragment> needs a `src` (or a `name` from the manifest)")
        return None
    if entry is not None and src_raw:
        problems.add(item.start, f"fragment {name!r} comes from the manifest; drop `src` (or use another name)")
        return None
    if entry is None and not src_raw:
        where = "no manifest is configured" if manifest is None else f"known: {', '.join(manifest.fragments) or 'none'}"
        problems.add(item.start, f"fragment name {name!r} is not in the manifest ({where}); give it a `src`")
        return None
    versions: dict[str, UrlTemplate] = {}
    if entry is not None:
        for version, url in entry.versions.items():
            parsed = _url(item.start, f"manifest version {version!r} of {name!r}", url, problems, params, settings)
            if parsed is None:
                return None
            versions[version] = parsed
        src: UrlTemplate | None = versions[entry.active]
    else:
        src = _url(item.start, "src", src_raw or "", problems, params, settings)
    fallback_raw = attrs.get("fallback-src")
    if fallback_raw is None and entry is not None:
        fallback_raw = entry.fallback
    fallback_src = None
    if fallback_raw is not None:
        fallback_src = _url(item.start, "fallback-src", fallback_raw or "", problems, params, settings)
        ok = ok and fallback_src is not None
    timeout_ms = entry.timeout_ms if entry is not None and entry.timeout_ms else settings.fragment_timeout_ms
    raw_timeout = attrs.get("timeout")
    if raw_timeout is not None:
        if re.fullmatch(r"0*[0-9]{1,9}", raw_timeout.strip()) and 0 < int(raw_timeout) <= MAX_TIMEOUT_MS:
            timeout_ms = int(raw_timeout)
        else:
            problems.add(item.start, f"timeout must be a whole number of milliseconds between 1 and "
                                     f"{MAX_TIMEOUT_MS}, not {raw_timeout!r}")
            ok = False
    if src is None or not ok:
        return None
    return Fragment(
        id=attrs.get("id") or name or f"{template}#{index + 1}",
        index=index,
        line=problems.line(item.start),
        src=src,
        fallback_src=fallback_src,
        timeout=timeout_ms / 1000,
        primary="primary" in attrs,
        is_async="async" in attrs,
        public="public" in attrs,
        fallback_html=source[item.open_end:item.close_start].encode("utf-8"),
        **({} if entry is None else {
            "name": entry.name, "owner": entry.owner, "version": entry.active, "versions": versions,
            "canary": entry.canary.version if entry.canary else None,
            "canary_percent": entry.canary.percent if entry.canary else 0, "enabled": entry.enabled}),
        breaker=merged(settings.circuit_breaker, dict(entry.circuit_breaker or {}) if entry else None),
    )


def _url(offset: int, attr: str, raw: str, problems: _Problems, params: tuple[str, ...],
         settings: Settings) -> UrlTemplate | None:
    """Check a URL attribute at load: http(s), known params only in path/query, allowed origin."""
    problem = url_problem(raw.strip(), settings.allowed_origins)
    if problem is not None:
        problems.add(offset, f"{attr} {problem}")
        return None
    template = UrlTemplate.parse(raw.strip())
    unknown = [p for p in template.params if p not in params]
    if unknown:
        known = ", ".join(f"{{{p}}}" for p in params) or "none"
        problems.add(offset, f"{attr} uses unknown {{{unknown[0]}}} (the route's params: {known})")
        return None
    return template
