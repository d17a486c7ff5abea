"""Compiling page templates into literal byte chunks and fragment nodes.

A template is compiled once, at load: the output is a tuple whose items are `bytes`
(copied verbatim from the file — never re-serialised), `Fragment` nodes, and at most one
`ASYNC_SLOT` marking where async fragments are streamed (just before `</body>`).

selectolax is the authority on what is markup: a `<fragment` inside a comment, a script
or an attribute value is text to an HTML parser, and must stay text here too; inside a
`<template>` it is markup (the element's content). Since the parser does not report source
offsets, candidate tags are found with regexes and marked with their offset before parsing;
only candidates the parser turns into elements count. A mark must not change how the text
around it parses, wherever it lands (see `_name_mark` and `_locate`).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final
from urllib.parse import quote

from selectolax.lexbor import LexborHTMLParser, LexborNode
from yarl import URL

from .breaker import DEFAULT_POLICY, BreakerPolicy, merged
from .errors import ConfigError
from .nodes import MAX_TIMEOUT_MS
from .tailor import Slot, definition, looks_false, preload, slot
from .urls import origin_of, url_problem

if TYPE_CHECKING:
    from .config import Settings
    from .manifest import Entry, Manifest

__all__ = ["ASYNC_SLOT", "Fragment", "Segment", "Template", "UrlTemplate", "compile_nested", "compile_template", "read_template"]


class _AsyncSlot:
    """Where async fragments are written: before `</body>`, else at the end of the page."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ASYNC_SLOT"


ASYNC_SLOT: Final = _AsyncSlot()

_OPEN = re.compile(r"<(fragment|script)(?=[\s/>])", re.IGNORECASE)  # `\s`: also `<fragment\xa0`, see `spaced`
_TAG_REST = re.compile(r"""(?:[^>"']|"[^"]*"|'[^']*')*>""")
_CLOSE_FRAGMENT = re.compile(r"</fragment[\t\n\f\r ]*>", re.IGNORECASE | re.ASCII)
_CLOSE_SCRIPT = re.compile(r"</script[\t\n\f\r />]", re.IGNORECASE | re.ASCII)
_CLOSE_BODY = re.compile(r"</body[\t\n\f\r />]", re.IGNORECASE | re.ASCII)
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_AT = "data-composer-at"  # `data-composer-at-<offset>`: the mark attribute's name carries the offset
_AT_NAME = re.compile(r"data-composer-at-(\d+)")
_AT_TEXT = re.compile(r" data-composer-at-\d+(?=>)|data-composer-at-\d+(?:=\d+ |/)")  # each `_name_mark`
_MARK = "composer-mark"
_TAG_NAME_END = "\t\n\f\r />"  # what ends a tag name to HTML (`\s` also has NBSP and more)

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
    text: str = ""  # str(static) (a cache key), made once: yarl makes it anew at each str()

    @classmethod
    def parse(cls, raw: str) -> UrlTemplate:
        """`raw` must have passed `urls.url_problem` (params only in the path or query)."""
        pieces = _PLACEHOLDER.split(raw)
        if len(pieces) == 1:
            url = URL(raw)
            return cls(parts=(raw,), static=url, origin=origin_of(url), text=str(url))
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
    # settings.compat: tailor — the tag's raw attributes, and its part of Tailor's client protocol
    attributes: tuple[tuple[str, str | None], ...] = ()
    pipe: Slot | None = None


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled template: `chunks` is the page in order; `fragments` in document order."""

    name: str
    chunks: tuple[bytes | Fragment | _AsyncSlot, ...]
    fragments: tuple[Fragment, ...]
    primary: Fragment | None
    async_fragments: tuple[Fragment, ...]
    versioned: bool = False  # has manifest fragments: the page needs the user's canary bucket
    client_signals: bool = False  # SPEC §7: the collector is in its head; pages mark fragments, list data
    warnings: tuple[str, ...] = ()  # `file:line: warning: …`, printed by `composer check`
    # settings.compat: tailor — the AMD loader's entry of the page's `Link` header ("" without a fragment)
    preload: str = ""


@dataclass(frozen=True, slots=True)
class Segment:
    """From offset `start` on, a compiled source is a verbatim copy of file `label` from its
    line `line`: a page assembled from several files (a layout and its child, composer.layouts)
    still reports each problem at the file and line it comes from."""

    start: int
    label: str
    line: int


class _Problems:
    def __init__(self, label: str, source: str, segments: tuple[Segment, ...] = ()) -> None:
        self.label = label
        self.source = source
        self.segments = segments
        self.items: list[str] = []
        self.warnings: list[str] = []
        self.first_tag: int | None = None  # found by `_locate`: the first `<script>` or `<fragment>` element

    def place(self, offset: int) -> tuple[str, int]:
        """The file and line `offset` of the source comes from."""
        i = bisect.bisect_right(self.segments, offset, key=lambda s: s.start) - 1
        if i < 0:
            return self.label, self.source.count("\n", 0, offset) + 1
        segment = self.segments[i]
        return segment.label, segment.line + self.source.count("\n", segment.start, offset)

    def line(self, offset: int) -> int:
        return self.place(offset)[1]

    def add(self, offset: int, message: str) -> None:
        label, line = self.place(offset)
        self.items.append(f"{label}:{line}: {message}")

    def warn(self, offset: int, message: str) -> None:
        label, line = self.place(offset)
        self.warnings.append(f"{label}:{line}: warning: {message}")


@dataclass(slots=True)
class _Found:
    """A fragment element located in the source: [start, open_end) is its tag, [.., end) all of it."""

    start: int
    open_end: int
    close_start: int
    end: int
    attrs: dict[str, str | None]


def read_template(file: Path) -> str:
    """The text of a template file; `ConfigError` (`file:1: …`) if it is unreadable or not UTF-8."""
    label = str(file)
    try:
        return file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{label}:1: not valid UTF-8 ({exc.reason} at byte {exc.start})"]) from None
    except OSError as exc:
        raise ConfigError([f"{label}:1: cannot read: {exc.strerror}"]) from None


def compile_template(file: Path, *, params: tuple[str, ...], settings: Settings,
                     name: str, manifest: Manifest | None = None,
                     source: str | None = None, segments: tuple[Segment, ...] = ()) -> Template:
    """Read and compile `file`; raise `ConfigError` with `file:line: message` problems.

    `source` is compiled instead of the file's text when given: a page assembled from several
    files (composer.layouts), whose `segments` say which file and line each part comes from.
    """
    if source is None:
        source = read_template(file)
    problems = _Problems(str(file), source, segments)
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
    compat = settings.compat == "tailor"
    _check_page(fragments, found, problems, compat=compat)
    if problems.items:
        raise ConfigError(problems.items)
    pipe = None
    if compat:
        fragments, pipe = _tailor(fragments, found, problems, settings)
    return Template(
        name=name,
        chunks=tuple(_chunks(source, found, fragments, body_close, pipe)),
        fragments=tuple(fragments),
        primary=next((f for f in fragments if f.primary), None),  # under compat, Tailor's first one
        async_fragments=tuple(f for f in fragments if f.is_async),
        versioned=any(f.name is not None for f in fragments),
        warnings=tuple(problems.warnings),
        preload=preload(settings.tailor) if compat and fragments else "",
    )


def _tailor(fragments: list[Fragment], found: list[_Found], problems: _Problems,
            settings: Settings) -> tuple[list[Fragment], tuple[int, bytes] | None]:
    """settings.compat: tailor: each fragment's `Slot` (from its raw attributes, as Tailor's
    `pipeAttributes` sees them), a later primary demoted (the first decides the page, as in
    Tailor), and where the pipe definition goes: before the first `<script>` or `<fragment>`
    element, none without one (Tailor's rules)."""
    first = next((f for f in fragments if f.primary), None)
    out = [dataclasses.replace(f, primary=f is first, attributes=tuple(found[f.index].attrs.items()),
                               pipe=slot(found[f.index].attrs, f.index, f.is_async, settings.tailor))
           for f in fragments]
    at = problems.first_tag
    return out, None if at is None else (at, definition(settings.tailor))


def _check_page(fragments: list[Fragment], found: list[_Found], problems: _Problems, *,
                compat: bool = False) -> list[Fragment]:
    """Ids name one fragment each, and one fragment at most sets the page's status: the primaries
    (under compat: tailor the first, as in Tailor, and a warning)."""
    ids: dict[str, int] = {}
    primaries = [f for f in fragments if f.primary]
    for f in fragments:
        if f.id in ids:
            problems.add(found[f.index].start, f"duplicate fragment id {f.id!r} (first on line {ids[f.id]})")
        ids.setdefault(f.id, f.line)
    if len(primaries) > 1:
        (problems.warn if compat else problems.add)(
            found[primaries[1].index].start, f"a template has at most one primary fragment (first on line "
                                             f"{primaries[0].line}" + (", which decides the page)" if compat else ")"))
    return primaries


def _chunks(source: str, found: list[_Found], fragments: list[Fragment], body_close: int | None,
            pipe: tuple[int, bytes] | None = None) -> list[bytes | Fragment | _AsyncSlot]:
    """The page in order: the source's own bytes between fragments, and the async slot (and
    Tailor's pipe definition, inserted at its offset, under compat)."""
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

    if pipe is not None:  # before the first <script> or <fragment>: no fragment comes before it
        literal(pipe[0])
        chunks.append(pipe[1])
    for item, fragment in zip(found, fragments, strict=True):
        literal(item.start)
        # Under compat: tailor an async fragment leaves Tailor's placeholder call, its own bytes.
        chunks.append(fragment.pipe.placeholder if fragment.pipe is not None and fragment.is_async else fragment)
        pos = item.end
    literal(len(source))
    if ASYNC_SLOT not in chunks:
        chunks.append(ASYNC_SLOT)
    return _merge(chunks)


def _merge(chunks: list[bytes | Fragment | _AsyncSlot]) -> list[bytes | Fragment | _AsyncSlot]:
    out: list[bytes | Fragment | _AsyncSlot] = []
    for chunk in chunks:
        if isinstance(chunk, bytes) and out and isinstance(out[-1], bytes):
            out[-1] += chunk
        else:
            out.append(chunk)
    return out


def compile_nested(source: str, *, parent: str, params: tuple[str, ...],
                   settings: Settings) -> tuple[Template, tuple[int, ...]]:
    """Compile the body of a nested fragment (SPEC §6), as `compile_template` compiles a file:
    composer.nesting calls it once per distinct body and caches the result.

    What differs, and why: an id defaults to `<parent>/<n>` (n from 1, in document order);
    `primary` is dropped (the page's status is decided before any nested body arrives; the
    lines it stood on are returned, to be logged), and `async` too (composer.nesting says
    why); URLs are checked against `allowed_origins` per request, a refusal being one
    fragment's fallback, not the whole body's failure. Under compat: tailor each fragment
    keeps its raw attributes and gets a `Slot`, renumbered per page as it is placed. Raises
    `ConfigError` with problems labelled `<parent> nested body:LINE`.
    """
    problems = _Problems(f"{parent} nested body", source)
    found, _ = _locate(source, problems)
    limit = settings.max_fragments_per_template
    if len(found) > limit:
        problems.add(found[limit].start, f"more than {limit} fragments (settings.max_fragments_per_template)")
        raise ConfigError(problems.items)
    anywhere = dataclasses.replace(settings, allowed_origins=())
    fragments: list[Fragment] = []
    for index, item in enumerate(found):
        fragment = _fragment(item, index, source, problems, params=params, settings=anywhere,
                             template=parent, manifest=None)
        if fragment is not None:
            named = item.attrs.get("id") or item.attrs.get("name")
            fragments.append(dataclasses.replace(fragment, id=fragment.id if named else f"{parent}/{index + 1}",
                                                 primary=False, is_async=False))
            if settings.compat == "tailor":  # its `Slot` is numbered per page when it is placed (composer.nesting)
                fragments[-1] = dataclasses.replace(fragments[-1], attributes=tuple(item.attrs.items()),
                                                    pipe=slot(item.attrs, 0, False, settings.tailor))
    _check_page(fragments, found, problems)  # ids: one fragment each
    if problems.items:
        raise ConfigError(problems.items)
    chunks = [chunk for chunk in _chunks(source, found, fragments, None) if chunk is not ASYNC_SLOT]
    ignored = tuple(f.line for f in fragments if "primary" in found[f.index].attrs)
    return Template(name=problems.label, chunks=tuple(_merge(chunks)), fragments=tuple(fragments),
                    primary=None, async_fragments=()), ignored


# --- finding fragment elements and the real `</body>` ----------------------------------------


@dataclass(slots=True)
class _Candidates:
    """What the regexes find (source offsets), before the parser says which of it is markup."""

    tags: dict[int, re.Match[str] | None] = field(default_factory=dict)  # `<fragment`/`<script` → rest
    names: list[tuple[int, str]] = field(default_factory=list)  # the name mark of each tag
    closes: list[int] = field(default_factory=list)  # `</fragment>`
    bodies: list[int] = field(default_factory=list)  # `</body`
    unfinished: list[int] = field(default_factory=list)  # `<fragment` with no `>` outside quotes after it
    spaced: list[int] = field(default_factory=list)  # `<fragment` then a space HTML does not know (NBSP)

    @property
    def ends(self) -> list[int]:
        """Candidates whose being markup shows only as a mark element placed right before them."""
        return self.closes + self.bodies + self.unfinished + self.spaced


def _locate(source: str, problems: _Problems) -> tuple[list[_Found], int | None]:
    """Find fragment elements and the real `</body>` by asking selectolax about candidates.

    Two parses. A tag candidate carries its offset in an attribute name, which no context
    minds (`_name_mark`). A closing tag has no node of its own, so an element `<composer-mark>`
    is put before it; but a `>` would end a tag, a bogus comment or an unquoted value early.
    So the first parse puts an inert character there instead, which the parser shows only
    in text nodes: the mark element goes where that character was text (it is then an
    element exactly where the closing tag is markup, and text in script or RCDATA).
    """
    for reserved in (_AT, _MARK):  # markup of our own making would be taken for the marks
        if (used := re.search(reserved, source, re.IGNORECASE | re.ASCII)) is not None:
            problems.add(used.start(), f"{reserved!r} is reserved for composer's own use in templates")
            return [], None
    candidates = _candidates(source)
    in_text, probed = _probe(source, candidates)
    inserts = list(candidates.names)
    for start, rest in candidates.tags.items():  # `<fragment/>` is not self-closing to HTML: make it so
        if rest is not None and start in probed and source[start + 1] in "fF" and _self_closing(source, rest.end()):
            inserts.append((rest.end() - 2, "></fragment"))
    inserts += [(end, f"<{_MARK} {_AT}-{end}></{_MARK}>") for end in candidates.ends if end in in_text]
    tree = LexborHTMLParser(_apply(source, inserts))
    roots = _roots(tree)
    elements = _elements(roots)
    problems.first_tag = min(elements, default=None)
    _unfinished(candidates, elements, {o for r in roots for o in _offsets(r.css(_MARK))}, problems)
    found = [item for start, element in sorted(elements.items())
             if (item := _found(source, start, candidates.tags.get(start), element, problems)) is not None]
    for before, after in itertools.pairwise(found):
        if after.start < before.end:
            problems.add(after.start, "fragments cannot be nested")
    bodies = set(candidates.bodies)  # `</body>` in a template's content is not the document's
    outside = [b for b in _offsets(tree.css(_MARK)) if b in bodies and not any(f.start <= b < f.end for f in found)]
    return found, (max(outside) if outside else None)


def _candidates(source: str) -> _Candidates:
    found = _Candidates()
    for m in _OPEN.finditer(source):
        if source[m.end()] not in _TAG_NAME_END:  # `<fragment\xa0`: a longer tag name to HTML
            if m.group(1).lower() == "fragment":
                found.spaced.append(m.start())
            continue
        rest = _TAG_REST.match(source, m.end())
        found.tags[m.start()] = rest
        found.names.append(_name_mark(source, m.start(), m.end()))
        if rest is None and m.group(1).lower() == "fragment":
            found.unfinished.append(m.start())
    found.closes = [m.start() for m in _CLOSE_FRAGMENT.finditer(source)]
    found.bodies = [m.start() for m in _CLOSE_BODY.finditer(source)]
    return found


def _name_mark(source: str, start: int, name_end: int) -> tuple[int, str]:
    """Where and what to insert so the tag at `start` carries its offset, leaving the parser
    in the state the original text would: `<fragment` may be a tag, or sit in an attribute
    value (quoted or not), a tag or attribute name, a comment or raw text. No quote, `<`, `>`
    or `--` is inserted, and a space only where the original already ends a token."""
    after = source[name_end]
    if after == "/":  # after `/`, a bare name then `/` again: self-closing state, or one unquoted value
        return name_end + 1, f"{_AT}-{start}/"
    if after == ">":
        return name_end, f" {_AT}-{start}"
    return name_end + 1, f"{_AT}-{start}={start} "  # after the space: 'before attribute name' in both


def _probe(source: str, candidates: _Candidates) -> tuple[set[int], set[int]]:
    """First parse: which end candidates sit where the parser makes text (not in a tag,
    comment or doctype), and which tag candidates are elements."""
    probe = next(c for c in map(chr, range(0xF0000, 0x10FFFE)) if c not in source)  # private use
    tree = LexborHTMLParser(_apply(source, [*candidates.names, *((o, f"{probe}{o}") for o in candidates.ends)]))
    roots = _roots(tree)
    text = "".join(root.text() for root in roots)
    in_text = {int(n) for n in re.findall(re.escape(probe) + r"(\d+)", text)}
    return in_text, set(_elements(roots))


def _roots(tree: LexborHTMLParser) -> list[LexborNode]:
    """The document and the content of every `<template>` at any depth: the parser keeps a
    template's content out of the document tree, but it is markup."""
    roots = [] if tree.root is None else [tree.root]
    i = 0
    while i < len(roots):
        roots.extend(roots[i].template_fragments())
        i += 1
    return roots


def _offsets(nodes: list[LexborNode]) -> list[int]:
    return [o for node in nodes if (o := _offset(node)) is not None]


def _offset(node: LexborNode) -> int | None:
    """The source offset a mark gave `node`: the smallest, as a tag also holds the marks of
    candidates in its unquoted attribute values (`<a title=<fragment>`)."""
    offsets = [int(m[1]) for key in node.attributes if (m := _AT_NAME.fullmatch(key))]
    return min(offsets) if offsets else None


def _elements(roots: list[LexborNode]) -> dict[int, LexborNode]:
    """Candidate `<fragment>` and `<script>` elements by offset."""
    elements: dict[int, LexborNode] = {}
    for root in roots:
        for element in root.css("fragment, script"):
            if (offset := _offset(element)) is not None:
                elements.setdefault(offset, element)
    return elements


def _found(source: str, start: int, rest: re.Match[str] | None, element: LexborNode,
           problems: _Problems) -> _Found | None:
    """Where the element at `start` ends in the source, or None (not a fragment, or a problem)."""
    if rest is None:  # a tag the scanner sees no end of, reported by `_unfinished`
        return None
    attrs = {k: v if v is None or _AT not in v else _AT_TEXT.sub("", v)  # `id="<fragment >"` holds a mark
             for k, v in element.attributes.items() if not k.startswith(_AT)}
    open_end = rest.end()
    if element.tag == "script":
        if not _fragment_script(element):
            return None
        close = _CLOSE_SCRIPT.search(source, open_end)
        gt = source.find(">", close.start()) if close is not None else -1
        if close is None or gt < 0:  # `</script` cut off by the end of the file closes nothing
            problems.add(start, '<script type="fragment"> is never closed')
            return None
        return _Found(start, open_end, close.start(), gt + 1, attrs)
    if _self_closing(source, open_end):
        return _Found(start, open_end, open_end, open_end, attrs)
    # marks before `</fragment>`, not `</body` nor `<fragment`
    closes = [o for o in _offsets(element.css(_MARK)) if source.startswith("</", o) and source[o + 2] in "fF"]
    if not closes:
        problems.add(start, "<fragment> is never closed (add </fragment>)")
        return None
    close = _CLOSE_FRAGMENT.match(source, max(closes))
    assert close is not None
    if any(o != start for o in _offsets(element.css("fragment"))):
        problems.add(start, "fragments cannot be nested")
    return _Found(start, open_end, close.start(), close.end(), attrs)


def _unfinished(candidates: _Candidates, elements: dict[int, LexborNode], marks: set[int],
                problems: _Problems) -> None:
    """Report each `<fragment` tag in markup that does not end, as in a half-written file
    (`<fragment id="b" src="http://1` at its end): served, it would reach browsers as text.
    In a comment, a script or an attribute value it is text, and fine. Likewise a tag name
    run on by a space HTML does not know, which would silently be no fragment."""
    unended = {start for start, rest in candidates.tags.items() if rest is None}
    for start in sorted(unended | set(candidates.spaced)):
        element = elements.get(start)
        if element is not None and (element.tag != "script" or _fragment_script(element)):
            # HTML ends it at a `>` that a quote hides from the scanner
            tag = '<script type="fragment">' if element.tag == "script" else "<fragment>"
            problems.add(start, f"cannot tell where this {tag} tag ends: a quote in it is never closed")
        elif element is None and start in marks and start in unended:
            problems.add(start, "unterminated <fragment tag: no `>` ends it before the end of the file "
                                "(a half-written template?)")
        elif element is None and start in marks:
            problems.add(start, f"`<fragment` is followed by U+{ord(problems.source[start + 9]):04X}, which HTML "
                                "does not take for a space: this is no fragment tag (write a plain space)")


def _fragment_script(element: LexborNode) -> bool:
    return (element.attributes.get("type") or "").strip().lower() == "fragment"


def _self_closing(source: str, tag_end: int) -> bool:
    """`<fragment src="x"/>` or `<fragment src=x />`; in `src=x/>` the slash is the value's."""
    return source[tag_end - 2] == "/" and source[tag_end - 3] in " \t\n\r\f\"'"


def _apply(source: str, inserts: list[tuple[int, str]]) -> str:
    """`source` with each text inserted at its offset (at one offset, in list order)."""
    out: list[str] = []
    pos = 0
    for offset, text in sorted(inserts, key=lambda i: i[0]):
        out.append(source[pos:offset])
        out.append(text)
        pos = offset
    out.append(source[pos:])
    return "".join(out)


# --- attributes → Fragment ----------------------------------------------------------------


def _fragment(item: _Found, index: int, source: str, problems: _Problems, *, params: tuple[str, ...],
              settings: Settings, template: str, manifest: Manifest | None) -> Fragment | None:
    """The `Fragment` a found tag describes, or None once its problems are added."""
    attrs = item.attrs
    ok = _attributes_known(item, problems, compat=settings.compat == "tailor")
    name = attrs.get("name")
    entry = manifest.fragments.get(name) if manifest is not None and name else None
    if not _one_source(item, entry, manifest, problems):
        return None

    def url(attr: str, raw: str) -> UrlTemplate | None:
        return _url(item.start, attr, raw, problems, params, settings)

    versions: dict[str, UrlTemplate] = {}
    for version, raw in (entry.versions.items() if entry is not None else ()):
        if (parsed := url(f"manifest version {version!r} of {name!r}", raw)) is None:
            return None
        versions[version] = parsed
    src = versions[entry.active] if entry is not None else url("src", attrs.get("src") or "")
    fallback_raw = attrs.get("fallback-src")
    if fallback_raw is None and entry is not None:
        fallback_raw = entry.fallback
    fallback_src = None if fallback_raw is None else url("fallback-src", fallback_raw)
    timeout_ms = _timeout_ms(item, entry, settings, problems)
    if src is None or not ok or timeout_ms is None or (fallback_raw is not None and fallback_src is None):
        return None
    fragment = Fragment(
        id=attrs.get("id") or name or f"{template}#{index + 1}", index=index, line=problems.line(item.start),
        src=src, fallback_src=fallback_src, timeout=timeout_ms / 1000,
        primary="primary" in attrs, is_async="async" in attrs, public="public" in attrs,
        fallback_html=source[item.open_end:item.close_start].encode("utf-8"),
        breaker=merged(settings.circuit_breaker, dict(entry.circuit_breaker or {}) if entry else None),
    )
    if entry is None:
        return fragment
    return dataclasses.replace(
        fragment, name=entry.name, owner=entry.owner, version=entry.active, versions=versions,
        canary=entry.canary.version if entry.canary else None,
        canary_percent=entry.canary.percent if entry.canary else 0, enabled=entry.enabled)


def _attributes_known(item: _Found, problems: _Problems, *, compat: bool = False) -> bool:
    """A misspelt attribute (`tiemout`) or `async="false"` would silently mean something else.
    Under compat: tailor, as Tailor reads them: any attribute (its hooks may read it), and a
    boolean one set by its presence, whatever its value (`primary="false"` warns)."""
    ok = True
    for key, value in item.attrs.items():
        if key == "type" or key.startswith("data-"):
            continue
        if compat:
            if key in _BOOLEAN and looks_false(value):
                problems.warn(item.start, f'{key}="{value}" sets {key!r} all the same (Tailor reads it by its '
                                          "presence); remove the attribute to unset it")
            continue
        if key not in _KNOWN:
            problems.add(item.start, f"unknown attribute {key!r} on <fragment> (known: {', '.join(_KNOWN)})")
            ok = False
        elif key in _BOOLEAN and value not in (None, "", key):
            problems.add(item.start, f"{key!r} is a boolean attribute and takes no value, not {value!r}")
            ok = False
    return ok


def _one_source(item: _Found, entry: Entry | None, manifest: Manifest | None, problems: _Problems) -> bool:
    """A fragment has a `src` or a `name` from the manifest, not both (which one would win?)."""
    src, name = item.attrs.get("src"), item.attrs.get("name")
    if not src and not name:
        problems.add(item.start, "<fragment> needs a `src` (or a `name` from the manifest)")
    elif entry is not None and src:
        problems.add(item.start, f"fragment {name!r} comes from the manifest; drop `src` (or use another name)")
    elif entry is None and not src:
        where = "no manifest is configured" if manifest is None else f"known: {', '.join(manifest.fragments) or 'none'}"
        problems.add(item.start, f"fragment name {name!r} is not in the manifest ({where}); give it a `src`")
    else:
        return True
    return False


def _timeout_ms(item: _Found, entry: Entry | None, settings: Settings, problems: _Problems) -> int | None:
    """The `timeout` attribute, else the manifest's, else the setting; None if it is not valid."""
    raw = item.attrs.get("timeout")
    if raw is None:
        return entry.timeout_ms if entry is not None and entry.timeout_ms else settings.fragment_timeout_ms
    if re.fullmatch(r"0*[0-9]{1,9}", raw.strip()) and 0 < int(raw) <= MAX_TIMEOUT_MS:
        return int(raw)
    problems.add(item.start, f"timeout must be a whole number of milliseconds between 1 and "
                             f"{MAX_TIMEOUT_MS}, not {raw!r}")
    return None


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
