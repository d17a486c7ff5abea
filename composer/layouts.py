"""Layouts (SPEC §6, Tailor's base templates): a route's template poured into a shared page.

The route's template is the *child*. Each of its top-level nodes goes to a slot of the layout:
an element with `slot="x"` to `<slot name="x">` (the attribute cut out of its start tag), the
content of `<script type="slot" name="x">…</script>` to slot x, anything else to the unnamed
slot (`<slot>`, `<slot name="default">`) or, when the layout has none, just before its
`</body>`. Text right after a node goes with that node (Tailor), so a slotted element keeps
its line break. In the layout, `<script type="slot" name="x"></script>` is a slot too: the
form that may stand in `<head>`. A slot the child fills nothing into renders its own content.

Assembly happens once, at load, on source text: the result is compiled like any template
(`compile_template`), so `<fragment>` tags may sit in either file, every byte of both files
except the slot tags and `slot` attributes passes through, and `Segment`s map each offset of
the assembled text back to the file and line it came from, for the compiler's messages.

Where nodes and slots start and end comes from the stdlib's `html.parser` tokenizer, which
reports positions (`getpos`) and knows raw text (`<script>`, `<style>`). It builds no tree, so
nesting is followed by tag names: void elements and `<x/>` open nothing, an end tag closes up to
its element. A child should close its top-level elements; a `slot` attribute that only looks
top-level because an element before it is never closed is reported, not guessed at.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser, attrfind_tolerant, tagfind_tolerant  # type: ignore[attr-defined]
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError
from .template import Segment, Template, compile_template, read_template

if TYPE_CHECKING:
    from .config import Settings
    from .manifest import Manifest

__all__ = ["Source", "assemble", "compile_layout"]

_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "keygen", "link", "meta",
                   "param", "source", "track", "wbr"})
_SCRIPT = re.compile(r"<script", re.IGNORECASE)  # in a slot script's raw text: a script meant inside it
_DEFAULT = ""  # the unnamed slot's key (`<slot>`, `<slot name="default">`, `slot=""`)


def _key(name: str | None) -> str:
    """A slot's key: its name; unnamed, empty and "default" are one, the unnamed slot."""
    return _DEFAULT if name is None or name == "default" else name


def compile_layout(layout: Path, child: Path, *, params: tuple[str, ...], settings: Settings, name: str,
                   manifest: Manifest | None = None) -> Template:
    """`child` in the slots of `layout`, compiled into one template; raise `ConfigError` with
    each problem at its own file and line."""
    source, segments = assemble(Source(str(layout), read_template(layout)),
                                Source(str(child), read_template(child)))
    return compile_template(child, params=params, settings=settings, name=name, manifest=manifest,
                            source=source, segments=segments)


@dataclass(frozen=True, slots=True)
class Source:
    """A file's text and its name in messages."""

    label: str
    text: str
    _lines: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_lines", (0, *(m.end() for m in re.finditer("\n", self.text))))

    def line(self, offset: int) -> int:
        return bisect.bisect_right(self._lines, offset)

    def offset(self, line: int, column: int) -> int:
        """`html.parser` positions (line from 1, column from 0) → an offset of `text`."""
        return self._lines[line - 1] + column

    def where(self, offset: int) -> str:
        return f"{self.label}:{self.line(offset)}"


# --- tokens --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    """One token of a file: [start, end) of its text; `tag_end` ends a start tag's own text."""

    kind: str  # start, end, text, other (comment, doctype, processing instruction)
    tag: str
    start: int
    end: int
    tag_end: int
    attrs: tuple[tuple[str, str | None], ...] = ()
    closed: bool = False  # `<x/>`

    def attr(self, name: str) -> str | None:
        return next((v or "" for k, v in self.attrs if k == name), None)

    @property
    def opens(self) -> bool:
        """Does this token open an element that a later end tag closes?"""
        return self.kind == "start" and not self.closed and self.tag not in _VOID

    @property
    def slot_script(self) -> bool:
        return self.kind == "start" and self.tag == "script" and \
            (self.attr("type") or "").strip().lower() == "slot"


class _Tokenizer(HTMLParser):
    """Every token of a source, with the offset where it starts; each ends where the next starts."""

    def __init__(self, source: Source) -> None:
        super().__init__(convert_charrefs=True)
        self._source = source
        self._found: list[tuple[str, str, int, int, tuple[tuple[str, str | None], ...], bool]] = []

    def tokens(self) -> list[_Token]:
        self.feed(self._source.text)
        self.close()
        if not self._found:
            return []
        ends = [start for _, _, start, *_ in self._found[1:]] + [len(self._source.text)]
        return [_Token(kind, tag, start, end, min(start + length, end) if length else end, attrs, closed)
                for (kind, tag, start, length, attrs, closed), end in zip(self._found, ends, strict=True)]

    def _add(self, kind: str, tag: str = "", attrs: list[tuple[str, str | None]] | None = None,
             closed: bool = False) -> None:
        length = len(self.get_starttag_text() or "") if kind == "start" else 0
        self._found.append((kind, tag, self._source.offset(*self.getpos()), length, tuple(attrs or ()), closed))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._add("start", tag, attrs)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._add("start", tag, attrs, closed=True)

    def handle_endtag(self, tag: str) -> None:
        self._add("end", tag)

    def handle_data(self, data: str) -> None:
        self._add("text")

    def handle_comment(self, data: str) -> None:
        self._add("other")

    def handle_decl(self, decl: str) -> None:
        self._add("other")

    def handle_pi(self, data: str) -> None:
        self._add("other")

    def unknown_decl(self, data: str) -> None:
        self._add("other")


def _slot_attribute(source: Source, token: _Token) -> tuple[int, int] | None:
    """Where the first `slot` attribute of a start tag is, with the space before it: the bytes
    to cut. Found with the regexes `html.parser` itself reads attributes with."""
    tag = tagfind_tolerant.match(source.text, token.start + 1, token.tag_end)
    assert tag is not None  # `html.parser` made a start tag of it
    before = tag.end(1)  # where the previous token's text ends (its spaces are not its own)
    k = tag.end()
    while k < token.tag_end and (m := attrfind_tolerant.match(source.text, k, token.tag_end)) is not None:
        if m.end() == k:
            break
        end = m.end(2) if m.group(2) is not None else m.end(1)
        if m.group(1).lower() == "slot":
            return before, end
        before, k = end, m.end()
    return None


# --- the child: its top-level nodes, by slot -----------------------------------------------


@dataclass(frozen=True, slots=True)
class _Piece:
    """Child text [start, end) for `slot`, without [cut_start, cut_end) (its `slot` attribute,
    or a slot script's end tag)."""

    slot: str
    start: int
    end: int
    cut: tuple[int, int] | None = None

    def filled(self, text: str) -> bool:
        """Does it hold more than white space (which leaves a slot's own content in place)?"""
        kept = text[self.start:self.cut[0]] + text[self.cut[1]:self.end] if self.cut else text[self.start:self.end]
        return bool(kept.strip())


def _top_level(tokens: list[_Token]) -> Iterator[tuple[_Token, _Token | None]]:
    """Each top-level node (not text): its first token and the end tag closing it (None for a
    void element, a comment, a stray end tag, an element never closed)."""
    stack: list[str] = []
    opener: _Token | None = None
    for token in tokens:
        if token.kind == "text":
            continue
        if opener is None:
            if token.opens:
                opener, stack = token, [token.tag]
            else:
                yield token, None
        elif token.opens:
            stack.append(token.tag)
        elif token.kind == "end" and token.tag in stack:
            del stack[len(stack) - 1 - stack[::-1].index(token.tag):]
            if not stack:
                yield opener, token
                opener = None
    if opener is not None:
        yield opener, None


def _pieces(child: Source, problems: list[str]) -> list[_Piece]:
    """The child cut into top-level nodes, each with the text after it, in document order."""
    tokens = _tokens(child)
    nodes = list(_top_level(tokens))
    begin = 1 if child.text.startswith("\ufeff") else 0  # a byte order mark: the file's, not the page's
    lead = nodes[0][0].start if nodes else len(child.text)
    pieces = [_Piece(_DEFAULT, begin, lead)] if lead > begin else []  # text before the first node
    for i, (first, close) in enumerate(nodes):
        end = nodes[i + 1][0].start if i + 1 < len(nodes) else len(child.text)
        if first.slot_script and close is not None:
            if (inner := _SCRIPT.search(child.text, first.tag_end, close.start)) is not None:
                problems.append(f'{child.where(inner.start())}: a <script type="slot"> cannot hold a <script> (its '
                                '</script> would end the slot): give that script slot="..." instead')
            pieces.append(_Piece(_key(first.attr("name")), first.tag_end, end, (close.start, close.end)))
            continue
        cut = _slot_attribute(child, first) if first.kind == "start" and first.attr("slot") is not None else None
        if first.opens and close is None:
            _unclosed(child, first, tokens, problems)
        pieces.append(_Piece(_key(first.attr("slot")), first.start, end, cut))
    return pieces


def _unclosed(child: Source, first: _Token, tokens: list[_Token], problems: list[str]) -> None:
    """A top-level element never closed holds the rest of the child: harmless (it all goes to
    its slot, as in `<h2 slot="x">child</h1>`), unless some of that rest was meant for a slot."""
    if first.slot_script:
        problems.append(f'{child.where(first.start)}: <script type="slot"> is never closed')
        return
    for token in tokens:
        if token.start > first.start and (token.slot_script or token.attr("slot") is not None):
            problems.append(f"{child.where(token.start)}: this is not at the top level of the child template: "
                            f"the <{first.tag}> on line {child.line(first.start)} is never closed (close it)")
            return


def _tokens(source: Source) -> list[_Token]:
    return _Tokenizer(source).tokens()


# --- the layout: its slots -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Slot:
    """A slot element of the layout: [start, end) all of it, [inner_start, inner_end) its own content."""

    name: str
    start: int
    end: int
    inner_start: int
    inner_end: int


def _slots(layout: Source, problems: list[str]) -> tuple[list[_Slot], int | None]:
    """The layout's slots in document order, and where its `</body>` is (None: nowhere)."""
    slots: list[_Slot] = []
    open_: _Token | None = None
    body: int | None = None
    tokens = _tokens(layout)
    for i, token in enumerate(tokens):
        if token.kind == "end" and token.tag == "body" and open_ is None:
            body = token.start
        is_slot = token.kind == "start" and token.tag == "slot"
        if (is_slot or token.slot_script) and open_ is not None:
            problems.append(f"{layout.where(token.start)}: slots cannot be nested (this one is in the slot "
                            f"on line {layout.line(open_.start)})")
        elif is_slot and not token.closed:
            open_ = token
        elif is_slot or (token.slot_script and token.closed):
            slots.append(_Slot(_key(token.attr("name")), token.start, token.end, token.end, token.end))
        elif token.slot_script:
            close = next((t for t in tokens[i + 1:] if t.kind == "end" and t.tag == "script"), None)
            if close is None:
                problems.append(f'{layout.where(token.start)}: <script type="slot"> is never closed')
            else:
                slots.append(_Slot(_key(token.attr("name")), token.start, close.end, token.tag_end, close.start))
        elif token.kind == "end" and token.tag == "slot" and open_ is not None:
            slots.append(_Slot(_key(open_.attr("name")), open_.start, token.end, open_.tag_end, token.start))
            open_ = None
    if open_ is not None:
        problems.append(f"{layout.where(open_.start)}: <slot> is never closed (add </slot>)")
    _check_unique(layout, slots, problems)
    return slots, body


def _check_unique(layout: Source, slots: list[_Slot], problems: list[str]) -> None:
    """One slot per name: a second would show the child's content twice (its fragments too)."""
    first: dict[str, int] = {}
    for slot in slots:
        line = layout.line(slot.start)
        if slot.name in first:
            what = "unnamed slot" if slot.name == _DEFAULT else f"slot named {slot.name!r}"
            problems.append(f"{layout.label}:{line}: a second {what} (first on line {first[slot.name]}); "
                            "a layout has one slot per name")
        first.setdefault(slot.name, line)


# --- assembly ------------------------------------------------------------------------------


class _Text:
    """The assembled text and its segments, built by copying ranges of the two files."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.segments: list[Segment] = []
        self.size = 0

    def copy(self, source: Source, start: int, end: int) -> None:
        if end > start:
            self.segments.append(Segment(self.size, source.label, source.line(start)))
            self.parts.append(source.text[start:end])
            self.size += end - start

    def piece(self, source: Source, piece: _Piece) -> None:
        if piece.cut is None:
            self.copy(source, piece.start, piece.end)
        else:
            self.copy(source, piece.start, piece.cut[0])
            self.copy(source, piece.cut[1], piece.end)


def assemble(layout: Source, child: Source) -> tuple[str, tuple[Segment, ...]]:
    """The child in the layout's slots, as source text, and where each part of it comes from.

    Raises `ConfigError`: child content for a slot the layout lacks (at that content's line in
    the child), a second slot of one name, a slot never closed (in the layout).
    """
    problems: list[str] = []
    slots, body = _slots(layout, problems)
    pieces = _pieces(child, problems)
    names = {slot.name for slot in slots}
    known = ", ".join(sorted(n for n in names if n != _DEFAULT)) or "none"
    for piece in pieces:
        if piece.slot not in names and piece.slot != _DEFAULT:
            problems.append(f"{child.where(piece.start)}: the layout {layout.label} has no slot {piece.slot!r} "
                            f"(its named slots: {known})")
    if problems:
        raise ConfigError(problems)
    if _DEFAULT not in names:  # the rest goes just before `</body>`
        at = len(layout.text) if body is None else body
        slots = sorted([*slots, _Slot(_DEFAULT, at, at, at, at)], key=lambda s: s.start)
    out = _Text()
    pos = 0
    for slot in slots:
        out.copy(layout, pos, slot.start)
        fill = [p for p in pieces if p.slot == slot.name]
        for piece in fill:
            out.piece(child, piece)
        if not any(p.filled(child.text) for p in fill):
            out.copy(layout, slot.inner_start, slot.inner_end)
        pos = slot.end
    out.copy(layout, pos, len(layout.text))
    return "".join(out.parts), tuple(out.segments)
