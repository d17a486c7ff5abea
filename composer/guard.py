"""Refusing requests no route should see.

aiohttp's parser already rejects malformed request lines and oversized lines or headers
(limits set in `server`). What it lets through but an edge proxy must not: paths that
climb out of their prefix once a backend decodes or normalises them (`/../`, `%2e%2e`,
`..%2f`, `..\\`), control characters such as NUL hidden behind percent-encoding, and Host
headers that are not a host. Each gets a 400 before routing, so a backend never receives
a request that means something other than what composer matched. A `Transfer-Encoding`
other than `chunked` (`gzip, chunked`, which aiohttp would decode as plain chunked and lose
the gzip) gets 501: composer does not implement it, and must not pretend to.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from aiohttp import web

__all__ = ["request_problem"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# RFC 3986 reg-name or IPv4 (unreserved, sub-delims, pct-encoded), or an IPv6 literal; then a port.
_HOST = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=%]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{0,5})?")
_DOT_SEGMENTS = frozenset({".", ".."})


def request_problem(request: web.BaseRequest, path: str) -> tuple[int, str] | None:
    """Why `request` (whose raw path is `path`) must be refused, and with which status; or None."""
    if "transfer-encoding" in request.headers:
        codings = [c.strip().lower() for v in request.headers.getall("transfer-encoding") for c in v.split(",")]
        if codings != ["chunked"]:
            return 501, "only the chunked transfer coding is supported"
    problem = _problem(request, path)
    return None if problem is None else (400, problem)


def _problem(request: web.BaseRequest, path: str) -> str | None:
    if request.version < (1, 0):
        # aiohttp's C parser takes `GET /x\r\n` (no version) as HTTP/0.9 and still reads the
        # lines after it as headers; its pure-Python parser and strict peers refuse it.
        return "HTTP/0.9 is not supported"
    if not path.startswith("/"):
        return "the request target must be a path"
    decoded = unquote(path) if "%" in path else path
    if decoded is not path and _CONTROL.search(decoded):
        return "control characters in the path"
    if "." in decoded or "\\" in decoded:
        # `..;x` counts too: servlet containers drop a segment's `;params` before normalising.
        segments = {s.partition(";")[0] for s in decoded.replace("\\", "/").split("/")}
        if not _DOT_SEGMENTS.isdisjoint(segments):
            return "'.' or '..' segments in the path"
    host = request.headers.getall("host", ())
    if len(host) > 1:
        return "more than one Host header"
    if host:
        if not _HOST.fullmatch(host[0]):
            return "invalid Host header"
    elif request.version >= (1, 1):
        return "missing Host header"
    return None
