"""The assets a fragment declares in its `Link` headers (SPEC §3, as in Tailor).

`Link: <https://cdn/x.css>; rel="stylesheet", <https://cdn/x.js>; rel="fragment-script"` gives
a stylesheet and a script. Only absolute http(s) and root-relative (`/x.css`) targets are kept;
a malformed header line is never fatal and never spoils another line.

The parser reads an entry the way aiohttp 3.14's `ClientResponse.links` does, with its three
expressions: entries split at a comma followed by `<`, the target runs to the entry's last
`>`, and a parameter that is not `name=value` (or `name="value"`) is skipped. composer used
that parser until it was reachable only through a private attribute. No well-kept public
parser reads malformed lines the same way: `requests.utils.parse_header_links` (requests is
not a dependency) stops at the first parameter without exactly one `=`, so `</a.css>;
crossorigin; rel=stylesheet` and `title="a=b"` lose their stylesheet; httplink (last release
2020) and ietfparse (2022) reject a whole line for one bad entry; weblinking (new in 2026)
resyncs at every comma, which changes which neighbour a garbage entry spoils. Reading entries
the same way keeps the assets a page shows unchanged.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Final, Literal

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

__all__ = ["Asset", "assets_of", "parse_assets", "preload"]

# A service sends the same lines again and again: what a line gives is remembered (lines up
# to _LINE_CACHED characters, _LINES_CACHED of them).
_LINE_CACHED: Final = 2048
_LINES_CACHED = 4096
_ENTRIES = re.compile(r",(?=\s*<)")
_TARGET = re.compile(r"\s*<(.*)>(.*)")
# Parameters never hold a line break (the `.` of _TARGET stops at one).
_PARAM = re.compile(r"^([^\s=]+)\s*=\s*(?:(['\"])(.*?)\2|(\S*))$")
# The markup of each kind (SPEC §3), with the URL HTML-escaped into it.
_STYLESHEET = b'<link rel="stylesheet" href="%s">'
_SCRIPT = b'<script src="%s" defer></script>'
# With client signals (SPEC §7): a script on another origin reports its errors' details only
# when fetched with CORS (its server must answer Access-Control-Allow-Origin).
_CORS_SCRIPT = b'<script src="%s" defer crossorigin></script>'
_AS = {"stylesheet": "style", "script": "script"}  # a preload's `as`


@dataclass(frozen=True, slots=True)
class Asset:
    """A stylesheet or script a fragment declared in its `Link` header."""

    kind: Literal["stylesheet", "script"]
    url: str
    tag: bytes = field(init=False, repr=False, compare=False)  # its markup, made once per asset
    cors_tag: bytes = field(init=False, repr=False, compare=False)  # the same, a script with `crossorigin`

    def __post_init__(self) -> None:
        escaped = html.escape(self.url).encode()
        script = self.kind == "script"
        object.__setattr__(self, "tag", (_SCRIPT if script else _STYLESHEET) % escaped)
        object.__setattr__(self, "cors_tag", (_CORS_SCRIPT if script else _STYLESHEET) % escaped)


def preload(assets: tuple[Asset, ...], cors: bool, first: str = "") -> str:
    """A page's `Link` header: its primary's assets as preloads, after `first` (under compat:
    tailor the AMD loader's entry). With `cors` its scripts load with CORS (`crossorigin`, as
    client signals write them), and a preload must say so too, or the browser fetches them twice."""
    entries = [first] if first else []
    entries += [f'<{a.url}>; rel="preload"; as="{_AS[a.kind]}"' + ("; crossorigin" if cors and a.kind == "script" else "")
                for a in assets]
    return ", ".join(entries)


def parse_assets(headers: CIMultiDictProxy[str] | CIMultiDict[str], name: str = "link") -> tuple[Asset, ...]:
    """Stylesheets and scripts from `Link` headers (or `name`, with Link's syntax), in order;
    malformed entries are skipped.

    Each header line is parsed on its own, so one bad line loses only itself.
    """
    return assets_of(headers.getall(name, ()))


def assets_of(lines: list[str] | tuple[()]) -> tuple[Asset, ...]:
    """The assets of `Link` header lines (`parse_assets`'s), for a fetch that has the lines."""
    if not lines:
        return ()
    if len(lines) == 1:
        line = lines[0]
        return _cached_line(line) if len(line) <= _LINE_CACHED else _parse_line(line)
    return tuple(asset for line in lines
                 for asset in (_cached_line(line) if len(line) <= _LINE_CACHED else _parse_line(line)))


def _parse_line(line: str) -> tuple[Asset, ...]:
    """The assets of one header line; none when a target is not a URL at all."""
    found: list[tuple[URL, str]] = []
    for entry in _ENTRIES.split(line):
        match = _TARGET.match(entry)
        if match is None:
            continue
        target, params = match.groups()
        try:
            url = URL(target)
        except ValueError:  # as aiohttp's parser did: the whole line is refused
            return ()
        found.append((url, _rel(params)))
    assets: list[Asset] = []
    for url, rel in found:
        if not _usable(url):
            continue
        rels = rel.lower().split()
        if "stylesheet" in rels:
            assets.append(Asset("stylesheet", str(url)))
        elif "fragment-script" in rels:
            assets.append(Asset("script", str(url)))
    return tuple(assets)


_cached_line: Final = lru_cache(maxsize=_LINES_CACHED)(_parse_line)


def _rel(params: str) -> str:
    """The first well-formed `rel` parameter's value ("" when there is none)."""
    for param in params.split(";")[1:]:
        match = _PARAM.match(param.strip())
        if match is not None and match[1] == "rel":
            quoted = match[3]
            return match[4] if quoted is None else quoted
    return ""


def _usable(url: URL) -> bool:
    """Absolute http(s) with a host, or root-relative: what a page may load (SPEC §3)."""
    if url.scheme in ("http", "https"):
        return bool(url.raw_host)
    return not url.scheme and not url.raw_host and url.raw_path.startswith("/")
