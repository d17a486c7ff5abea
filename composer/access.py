"""The access line: one per request, and the request id it carries.

Its work is per request, so it is compiled with the request path (scripts/compile); `logs`,
whose classes subclass logging's and aiohttp's (which mypyc cannot build), calls in here.
The line is written out directly: the generic JSON encoder takes 7 µs a line, a tenth of a
fragment-less page, and a test compares the two byte for byte. Compiled, an f-string with a
format spec (`{x:03d}`, `{x!r}`) costs four times its `%` or `str()` (mypyc calls `format`
for each), so strings here are joined or %-formatted.
"""

from __future__ import annotations

import random
import time
from json.encoder import encode_basestring_ascii
from typing import Required, TypedDict

from aiohttp.web import BaseRequest, RequestKey, StreamResponse

__all__ = ["ERROR", "REQUEST_ID", "ROUTE", "Access", "Stamp", "fields", "line", "new_request_id", "request_id_of"]

ROUTE = RequestKey("composer_route", str)
REQUEST_ID = RequestKey("composer_request_id", str)
ERROR = RequestKey("composer_error", str)  # why a request could not be parsed (its access line says)

_esc = encode_basestring_ascii  # a str as a JSON string, as json's encoder writes it


class Access(TypedDict, total=False):
    """An access line's fields (`error` only for a request that could not be parsed)."""

    method: Required[str]
    path: Required[str]
    status: Required[int]
    duration_ms: Required[float]
    route: Required[str]
    request_id: Required[str]
    remote: Required[str | None]
    error: str


def request_id_of(request: BaseRequest) -> str:
    """The request's id: the one given it on arrival, else `new_request_id`'s."""
    given: str | None = request.get(REQUEST_ID)
    return given if given else new_request_id(request)


def new_request_id(request: BaseRequest) -> str:
    """The incoming `x-request-id` when it is sane (printable, ≤128 chars), else a new id."""
    rid = request.headers.get("x-request-id", "")
    if 0 < len(rid) <= 128 and rid.isascii() and rid.isprintable():
        return rid
    # An id, not a secret: no urandom syscall per page.
    return "%032x" % random.getrandbits(128)  # noqa: UP031 (compiled, % is faster than a format spec)


def fields(request: BaseRequest, response: StreamResponse, elapsed: float) -> Access:
    """The access line of `request`, answered with `response` in `elapsed` seconds."""
    found: Access = {
        "method": request.method,
        "path": request.path,
        "status": response.status,
        "duration_ms": round(elapsed * 1000, 2),
        "route": request.get(ROUTE, ""),
        "request_id": request.get(REQUEST_ID, ""),
        "remote": request.remote,
    }
    # (a request's `get` or `in` of a key not set raises and catches a KeyError: only a
    # client error can have one)
    if response.status >= 400 and ERROR in request:
        found["error"] = request[ERROR]
    return found


class Stamp:
    """A line's `ts`, to the millisecond, in UTC: one strftime a second, not one a line."""

    def __init__(self) -> None:
        self.last = (-1, "")  # the last whole second formatted: one value, so threads agree

    def of(self, created: float) -> str:
        second = int(created)
        last = self.last
        if second != last[0]:
            last = self.last = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        return "%s.%03dZ" % (last[1], int((created - second) * 1000))  # noqa: UP031 (as above)


def line(stamp: Stamp, created: float, name: str, access: Access) -> str:
    """The JSON object `logs.JsonFormatter.line(created, "info", name, "access", access)` makes."""
    remote = access["remote"]
    error = access.get("error")
    return "".join((
        '{"ts": "', stamp.of(created), '", "level": "info", "logger": ', _esc(name), ', "msg": "access", "method": ',
        _esc(access["method"]), ', "path": ', _esc(access["path"]), ', "status": ', str(access["status"]),
        ', "duration_ms": ', repr(float(access["duration_ms"])), ', "route": ', _esc(access["route"]),
        ', "request_id": ', _esc(access["request_id"]), ', "remote": ', "null" if remote is None else _esc(remote),
        "" if error is None else ', "error": ' + _esc(error), "}"))
