"""Fragment bodies as UTF-8, the page's charset.

A body whose Content-Type names no charset (or UTF-8) must be valid UTF-8; one that names
another charset is transcoded from it, with the WHATWG reading of the common labels
(ISO-8859-1 and ASCII mean windows-1252, Shift_JIS means its Windows form, ...): what a
browser would do with the fragment on its own. An unknown charset, or bytes that are not in
it, make the body unusable (`None`), and `not_text` says why.
"""

from __future__ import annotations

import codecs
from functools import lru_cache
from typing import Final

__all__ = ["charset_of", "not_text", "utf8"]

# Services repeat their Content-Type: its charset is remembered (values up to
# _CACHED_CHARS characters, _CACHED of them).
_CACHED_CHARS: Final = 256
_CACHED = 1024

# Labels as WHATWG's Encoding standard reads them where Python reads them differently or not
# at all, by the name Python's codec lookup gives (else the label, lower-cased).
_WINDOWS_1252: Final = "windows-1252"
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
_UTF8_LABELS: Final = frozenset({"utf-8", "utf8"})
# windows-1252 as WHATWG defines it: its five unassigned bytes are the C1 controls.
_WINDOWS_1252_TABLE: Final = "".join(bytes([b]).decode("cp1252", "ignore") or chr(b) for b in range(256))


def charset_of(content_type: str | None) -> str | None:
    """The `charset` parameter of a Content-Type, unquoted (as aiohttp's `charset` reads it):
    None when there is none, "" when it is there without a value."""
    if content_type is None or ";" not in content_type:
        return None
    if len(content_type) <= _CACHED_CHARS:
        return _cached_charset(content_type)
    return _parse_charset(content_type)


def utf8(body: bytes, charset: str | None) -> bytes | None:
    """`body` as UTF-8: checked if it is (or claims to be) UTF-8, else transcoded from `charset`.

    None when it cannot be: bytes that are not valid in the charset, or an unknown charset.
    """
    codec = "utf-8" if charset is None or charset.lower() in _UTF8_LABELS else _codec(charset)
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


def not_text(charset: str | None) -> str:
    """Why `utf8` refused a body declared in `charset` (a failure's detail)."""
    if charset is not None and _codec(charset) is None:
        return f"unknown charset {charset!r}"
    return f"body is not valid {charset or 'UTF-8 (no charset declared)'}"


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


_cached_charset: Final = lru_cache(maxsize=_CACHED)(_parse_charset)


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


def _codec(charset: str) -> str | None:
    """The Python codec for a Content-Type charset label, or None for an unknown one."""
    label = charset.strip().lower()
    name = _WEB_CODECS.get(label)
    if name is not None:
        return name
    try:
        found = codecs.lookup(label).name
        b"".decode(found)  # LookupError for bytes-to-bytes codecs (base64, zlib, ...)
    except LookupError:
        return None
    found = _WEB_CODECS.get(found, found)
    return None if found in _NOT_CHARSETS else found
