"""Fetching one fragment: one HTTP attempt, turned into a value.

This is the only module that touches aiohttp's client exceptions. `fetch()` never raises
for anything the network or a fragment service can do: it returns `Fetched` (a status
below 500, its decoded body as UTF-8 and declared assets) or `Failed` carrying a `Reason`.
Its deadline covers connecting, the headers and the whole body (a trickling body cannot
stretch it), and the decoded body is capped so a compression bomb costs nothing.

Reasons: no complete answer within the deadline is TIMEOUT; a refused, reset or closed
connection is CONNECTION, also when it ends the body early (fewer bytes than
Content-Length, an unfinished chunked body); a status of 500 or more, or an unasked-for
3xx, is STATUS; a body over the cap is TOO_LARGE; what is not HTTP, a body that does not
decompress, or text that is not in its charset is INVALID.

Pages are UTF-8, so bodies are too: a body whose Content-Type names no charset (or UTF-8)
must be valid UTF-8; one that names another charset is transcoded from it, with the
WHATWG reading of the common labels (ISO-8859-1 and ASCII mean windows-1252, Shift_JIS
means its Windows form, ...). An unknown charset, or bytes that are not in it: INVALID.
A 3xx body is never shown, so it is not checked.

Pooled keep-alive connections are not trusted blindly: a service that sends more than it
declared could have those bytes queued by aiohttp as the answer to the next request on
that connection (aio-libs/aiohttp#13656); `new_session()`'s connector drops such a
connection instead of reusing it.
"""

from __future__ import annotations

import asyncio
import codecs
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal

import aiohttp
from aiohttp.http_exceptions import ContentLengthError, TransferEncodingError
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from .errors import Reason

__all__ = ["Asset", "Failed", "Fetched", "fetch", "new_session", "parse_assets"]

_links = aiohttp.ClientResponse.__dict__["links"].wrapped  # aiohttp's Link header parser


@dataclass(frozen=True, slots=True)
class Asset:
    """A stylesheet or script a fragment declared in its `Link` header."""

    kind: Literal["stylesheet", "script"]
    url: str


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


class _Connector(aiohttp.TCPConnector):
    """A TCPConnector that never reuses a pooled connection holding bytes nobody asked for.

    aiohttp keeps parsing what arrives on an idle keep-alive connection and queues it, so a
    service that sent more than its Content-Length (late, or as a whole extra response)
    would answer the next request on that connection — maybe another fragment's — with
    stale bytes (aio-libs/aiohttp#13656). `should_close` is true for such a connection
    (something queued or half-received); it is closed here and the next one tried.
    """

    async def _get(self, *args: object, **kwargs: object) -> aiohttp.connector.Connection | None:
        while (conn := await super()._get(*args, **kwargs)) is not None:
            protocol = conn.protocol
            if protocol is not None and not protocol.should_close:
                return conn
            conn.close()  # released with should_close: the transport is closed, not pooled
        return None


def new_session(*, limit_per_host: int = 256, max_field_size: int = 16384) -> aiohttp.ClientSession:
    """The one client session of a process: pooled keep-alive connections and a DNS cache.

    Cookies are never stored (a fragment's cookie must not reach another user), redirects
    are never followed, and timeouts are set per fetch as deadlines.
    """
    connector = _Connector(limit=0, limit_per_host=limit_per_host, ttl_dns_cache=300, keepalive_timeout=30)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(total=None),
        skip_auto_headers=("User-Agent",),
        auto_decompress=True,
        trust_env=False,
        max_field_size=max_field_size,
    )


async def fetch(session: aiohttp.ClientSession, url: URL, headers: CIMultiDict[str], *,
                timeout: float, max_bytes: int, allow_redirect: bool) -> Fetched | Failed:
    """One GET with a deadline over connect, headers and body; never raises for I/O trouble."""
    try:
        async with asyncio.timeout(timeout):
            async with session.get(url, headers=headers, allow_redirects=False) as resp:
                status = resp.status
                if status >= 500 or (300 <= status < 400 and not allow_redirect):
                    return Failed(Reason.STATUS, f"status {status}", status)
                length = resp.content_length
                if length is not None and length > max_bytes and "content-encoding" not in resp.headers:
                    return Failed(Reason.TOO_LARGE, f"content-length {length} > {max_bytes}")
                body = await _read_capped(resp.content, max_bytes)
                if body is None:
                    return Failed(Reason.TOO_LARGE, f"body larger than {max_bytes} bytes")
                if not 300 <= status < 400:  # a redirect's body is never shown
                    charset = resp.charset
                    text = _utf8(body, charset)
                    if text is None:
                        return Failed(Reason.INVALID, _not_text(charset))
                    if len(text) > max_bytes:  # transcoding grew it
                        return Failed(Reason.TOO_LARGE, f"body larger than {max_bytes} bytes as UTF-8")
                    body = text
                return Fetched(status, body, resp.headers, parse_assets(resp.headers))
    except TimeoutError:
        return Failed(Reason.TIMEOUT, f"no complete response within {timeout * 1000:.0f} ms")
    except aiohttp.ClientPayloadError as exc:
        # The connection ended before the body did (closed or reset short of Content-Length,
        # or mid-chunk): the connection failed. Anything else (a body that does not
        # decompress) is the body's fault.
        if isinstance(exc.__cause__, (ContentLengthError, TransferEncodingError)):
            return Failed(Reason.CONNECTION, f"body cut short: {exc}")
        return Failed(Reason.INVALID, f"bad body: {exc}")
    except aiohttp.ClientResponseError as exc:
        return Failed(Reason.INVALID, f"bad response: {exc.message}")
    except (aiohttp.ClientError, OSError) as exc:
        return Failed(Reason.CONNECTION, f"{type(exc).__name__}: {exc}")


async def _read_capped(content: aiohttp.StreamReader, max_bytes: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while chunk := await content.readany():
        size += len(chunk)
        if size > max_bytes:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


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
    itself. Only absolute http(s) and root-relative (`/x.css`) targets are kept.
    """
    lines = headers.getall("link", ())
    if not lines:
        return ()
    assets: list[Asset] = []
    for line in lines:
        try:
            links = _links(SimpleNamespace(headers=CIMultiDict(link=line), url=_Identity))
        except ValueError:
            continue
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
