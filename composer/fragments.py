"""Fetching one fragment: one HTTP attempt, turned into a value.

`fetch()` never raises for anything the network or a fragment service can do: it returns
`Fetched` (a status below 500, its decoded body as UTF-8 and declared assets) or `Failed`
carrying a `Reason`. Its deadline covers connecting, the headers and the whole body (a
trickling body cannot stretch it), and the decoded body is capped so a compression bomb
costs nothing. The HTTP work is `client.Client`'s, a lean keep-alive HTTP/1.1 client on
llhttp; this module turns its answers and errors into values.

Reasons: no complete answer within the deadline is TIMEOUT; a refused, reset or closed
connection is CONNECTION, also when it ends the body early (fewer bytes than
Content-Length, an unfinished chunked body); a status of 500 or more, or an unasked-for
3xx, is STATUS (its body is not read); a body over the cap is TOO_LARGE (a Content-Length
over it, on an unencoded body, is decided on the header); what is not HTTP, a body that does
not decompress (or whose gzip or br stream ends early), or text that is not in its charset
is INVALID.

Pages are UTF-8, so bodies are too: a body whose Content-Type names no charset (or UTF-8)
must be valid UTF-8; one that names another charset is transcoded from it, with the
WHATWG reading of the common labels (ISO-8859-1 and ASCII mean windows-1252, Shift_JIS
means its Windows form, ...). An unknown charset, or bytes that are not in it: INVALID.
A 3xx body is never shown, so it is not checked.

Pooled keep-alive connections are not trusted blindly: a service that sends more than it
declared must not have those bytes taken as the answer to the next request on that
connection (the bug aiohttp has, aio-libs/aiohttp#13656). The client never reuses a
connection that received bytes past its response, or anything while idle.
"""

from __future__ import annotations

import asyncio
import codecs
import html
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Literal

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .client import (
    MAX_FIELD_SIZE,
    Client,
    ClientError,
    InvalidRequest,
    InvalidResponse,
    TooLarge,
)
from .errors import Reason

__all__ = ["Asset", "Failed", "Fetched", "fetch", "new_session", "parse_assets"]

_links = aiohttp.ClientResponse.__dict__["links"].wrapped  # aiohttp's Link header parser


@dataclass(frozen=True, slots=True)
class Asset:
    """A stylesheet or script a fragment declared in its `Link` header."""

    kind: Literal["stylesheet", "script"]
    url: str
    tag: bytes = field(init=False, repr=False, compare=False)  # its markup, made once per asset

    def __post_init__(self) -> None:
        escaped = html.escape(self.url).encode()
        markup = b'<link rel="stylesheet" href="%s">' if self.kind == "stylesheet" else b'<script src="%s" defer></script>'
        object.__setattr__(self, "tag", markup % escaped)


@dataclass(frozen=True, slots=True)
class Fetched:
    """A response with status < 500 (3xx only when redirects were asked for) and its body."""

    status: int
    body: bytes
    headers: CIMultiDictProxy[str]
    assets: tuple[Asset, ...]


@dataclass(frozen=True, slots=True)
class Failed:
    """Why a fetch did not produce content; `status` is set for reason STATUS."""

    reason: Reason
    detail: str
    status: int | None = None


class _Identity:
    """Stands in for a response URL so aiohttp's parser keeps Link targets as written."""

    @staticmethod
    def join(url: URL) -> URL:
        return url


def new_session(*, limit_per_host: int = 256, max_field_size: int = MAX_FIELD_SIZE) -> Client:
    """The one fragment client of a process: pooled keep-alive connections and a DNS cache.

    Cookies are never stored (a fragment's cookie must not reach another user), redirects
    are never followed, and timeouts are set per fetch as deadlines.
    """
    return Client(limit_per_host=limit_per_host, max_field_size=max_field_size)


def _not_content(status: int) -> bool:
    """A status whose body is never read: 5xx, and 3xx unless redirects were asked for."""
    return status >= 500 or 300 <= status < 400


def _not_content_but_redirects(status: int) -> bool:
    return status >= 500


async def fetch(session: Client, url: URL, headers: CIMultiDict[str], *,
                timeout: float, max_bytes: int, allow_redirect: bool, share: str | None = None) -> Fetched | Failed:
    """One GET with a deadline over connect, headers and body; never raises for I/O trouble.
    `share`: the fragment, whose fair share of its origin's connections this fetch uses."""
    try:
        async with asyncio.timeout(timeout):
            resp = await session.get(url, headers, max_bytes=max_bytes, share=share,
                                     skip_body=_not_content_but_redirects if allow_redirect else _not_content)
    except TimeoutError:
        return Failed(Reason.TIMEOUT, f"no complete response within {timeout * 1000:.0f} ms")
    except TooLarge as exc:
        if exc.declared is not None:
            return Failed(Reason.TOO_LARGE, f"content-length {exc.declared} > {max_bytes}")
        return Failed(Reason.TOO_LARGE, f"body larger than {max_bytes} bytes")
    except InvalidResponse as exc:
        return Failed(Reason.INVALID, f"bad response: {exc}")
    except InvalidRequest as exc:
        return Failed(Reason.INVALID, f"bad request: {exc}")
    except (ClientError, OSError) as exc:
        # Refused, reset, or closed before the response ended (short of Content-Length, or
        # mid-chunk): the connection failed.
        return Failed(Reason.CONNECTION, str(exc) if isinstance(exc, ClientError) else f"{type(exc).__name__}: {exc}")
    status = resp.status
    body = resp.body
    if body is None:  # 5xx, or an unasked-for 3xx: the body was not read
        return Failed(Reason.STATUS, f"status {status}", status)
    headers_ = resp.headers
    if not 300 <= status < 400:  # a redirect's body is never shown
        charset = _charset(headers_.get("content-type"))
        text = _utf8(body, charset)
        if text is None:
            return Failed(Reason.INVALID, _not_text(charset))
        if len(text) > max_bytes:  # transcoding grew it
            return Failed(Reason.TOO_LARGE, f"body larger than {max_bytes} bytes as UTF-8")
        body = text
    return Fetched(status, body, headers_, parse_assets(headers_))


_charsets: dict[str, str | None] = {}  # Content-Type → its charset: services repeat themselves


def _charset(content_type: str | None) -> str | None:
    """The `charset` parameter of a Content-Type, unquoted (as aiohttp's `charset` reads it):
    None when there is none, "" when it is there without a value."""
    if content_type is None or ";" not in content_type:
        return None
    try:
        return _charsets[content_type]
    except KeyError:
        pass
    found = _parse_charset(content_type)
    if len(content_type) <= 256:
        if len(_charsets) >= 1024:
            _charsets.clear()
        _charsets[content_type] = found
    return found


def _parse_charset(content_type: str) -> str | None:
    for param in _params(content_type):
        name, eq, value = param.partition("=")
        if name.strip().lower() == "charset":
            if not eq:
                return ""
            value = value.strip()
            if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
                value = _unquote(value[1:-1])
            if value:
                return value
    return None


def _unquote(quoted: str) -> str:
    out: list[str] = []
    escaped = False
    for ch in quoted:
        if escaped or ch != "\\":
            out.append(ch)
            escaped = False
        else:
            escaped = True
    return "".join(out)


def _params(content_type: str) -> list[str]:
    """The `;`-separated parameters after the media type; `;` inside quotes does not split."""
    if '"' not in content_type:
        return content_type.split(";")[1:]
    params: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for ch in content_type:
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ";" and not quoted:
            params.append("".join(current))
            current = []
            continue
        current.append(ch)
    params.append("".join(current))
    return params[1:]


# Charsets. Labels as WHATWG's Encoding standard reads them (what a browser would do with
# the fragment on its own) where Python reads them differently or not at all, by the name
# Python's codec lookup gives (else the label, lower-cased).
_WINDOWS_1252 = "windows-1252"
_WEB_CODECS = {
    "iso8859-1": _WINDOWS_1252, "ascii": _WINDOWS_1252, "cp1252": _WINDOWS_1252, "x-cp1252": _WINDOWS_1252,
    "iso8859-9": "cp1254", "iso8859-11": "cp874", "tis-620": "cp874", "windows-874": "cp874", "dos-874": "cp874",
    "shift_jis": "cp932", "x-sjis": "cp932", "windows-31j": "cp932",
    "gb2312": "gb18030", "gbk": "gb18030", "x-gbk": "gb18030",
    "big5": "big5hkscs", "euc_kr": "cp949",
    "x-mac-cyrillic": "mac-cyrillic", "iso-8859-8-i": "iso8859-8",
    "unicode-1-1-utf-8": "utf-8", "unicode11utf8": "utf-8", "unicode20utf8": "utf-8", "x-unicode20utf8": "utf-8",
}
# Python codecs that decode bytes but are no charset a browser knows (UTF-7 and the
# ISO-2022-KR family are refused by browsers on purpose).
_NOT_CHARSETS = frozenset({"utf-7", "unicode-escape", "raw-unicode-escape", "idna", "punycode", "undefined",
                           "charmap", "iso2022_kr", "hz"})
_UTF8_LABELS = frozenset({"utf-8", "utf8"})
# windows-1252 as WHATWG defines it: its five unassigned bytes are the C1 controls.
_WINDOWS_1252_TABLE = "".join(bytes([b]).decode("cp1252", "ignore") or chr(b) for b in range(256))


def _codec(charset: str) -> str | None:
    """The Python codec for a Content-Type charset label, or None for an unknown one."""
    label = charset.strip().lower()
    name = _WEB_CODECS.get(label)
    if name is not None:
        return name
    try:
        name = codecs.lookup(label).name
        b"".decode(name)  # LookupError for bytes-to-bytes codecs (base64, zlib, ...)
    except LookupError:
        return None
    name = _WEB_CODECS.get(name, name)
    return None if name in _NOT_CHARSETS else name


def _utf8(body: bytes, charset: str | None) -> bytes | None:
    """`body` as UTF-8: checked if it is (or claims to be) UTF-8, else transcoded from `charset`.

    None when it cannot be: bytes that are not valid in the charset, or an unknown charset.
    """
    if charset is None or charset.lower() in _UTF8_LABELS:
        codec = "utf-8"
    else:
        codec = _codec(charset)
        if codec is None:
            return None
    try:
        if codec == "utf-8":
            if not body.isascii():
                body.decode("utf-8")  # checked, not kept: the bytes are what the page gets
            return body
        if codec == _WINDOWS_1252:
            return codecs.charmap_decode(body, "strict", _WINDOWS_1252_TABLE)[0].encode("utf-8")
        return body.decode(codec).encode("utf-8")
    except (UnicodeError, LookupError):
        return None


def _not_text(charset: str | None) -> str:
    if charset is not None and _codec(charset) is None:
        return f"unknown charset {charset!r}"
    return f"body is not valid {charset or 'UTF-8 (no charset declared)'}"


def parse_assets(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> tuple[Asset, ...]:
    """Stylesheets and scripts from `Link` headers; malformed entries are skipped, not fatal.

    Each header line is parsed on its own by aiohttp's parser, so one bad line loses only
    itself. Only absolute http(s) and root-relative (`/x.css`) targets are kept. A service
    sends the same lines again and again, so what a line gives is remembered (lines up to
    `_LINE_CACHED` characters, `_LINES_CACHED` of them).
    """
    lines = headers.getall("link", ())
    if not lines:
        return ()
    if len(lines) == 1:
        return _line_assets(lines[0])
    return tuple(asset for line in lines for asset in _line_assets(line))


_LINE_CACHED = 2048
_LINES_CACHED = 4096
_by_line: dict[str, tuple[Asset, ...]] = {}


def _line_assets(line: str) -> tuple[Asset, ...]:
    assets = _by_line.get(line)
    if assets is None:
        assets = _parse_line(line)
        if len(line) <= _LINE_CACHED:
            if len(_by_line) >= _LINES_CACHED:
                _by_line.clear()
            _by_line[line] = assets
    return assets


def _parse_line(line: str) -> tuple[Asset, ...]:
    try:
        links = _links(SimpleNamespace(headers=CIMultiDict(link=line), url=_Identity))
    except ValueError:
        return ()
    assets: list[Asset] = []
    for link in links.values():
        url = link.get("url")
        rels = str(link.get("rel", "")).lower().split()
        if not isinstance(url, URL) or not _usable(url):
            continue
        if "stylesheet" in rels:
            assets.append(Asset("stylesheet", str(url)))
        elif "fragment-script" in rels:
            assets.append(Asset("script", str(url)))
    return tuple(assets)


def _usable(url: URL) -> bool:
    if url.scheme in ("http", "https"):
        return bool(url.raw_host)
    return not url.scheme and not url.raw_host and url.raw_path.startswith("/")
