"""The access line: one per request, and the request id it carries.

Its work is per request, so it is compiled with the request path (scripts/compile): the
server writes each request's line where it answers (`AccessLog`), and `logs.JsonHandler`
(which mypyc cannot build: it subclasses logging's) writes it out with others. The line is
made here directly: the generic JSON encoder takes 7 µs a line, a tenth of a fragment-less
page, and a test compares the two byte for byte. Compiled, an f-string with a
format spec (`{x:03d}`, `{x!r}`) costs four times its `%` or `str()` (mypyc calls `format`
for each), so strings here are joined or %-formatted.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import Final, Protocol, Required, TypedDict, cast

from aiohttp.web import BaseRequest, RequestKey

__all__ = ["REQUEST_ID", "Access", "AccessLog", "Pending", "Stamp", "line", "new_request_id"]

# The request's id, kept on it for the backend proxy, and by which `listener` knows the handler ran.
REQUEST_ID = RequestKey("composer_request_id", str)

_esc: Final = encode_basestring_ascii  # a str as a JSON string, as json's encoder writes it
_now: Final = time.time
_INFO: Final = logging.INFO
_random_bits: Final = random.getrandbits
_QUOTED: Final = 4096  # strings kept JSON-quoted (methods, routes, client addresses): past that, quoted each time
_MOST_WAITING: Final = 512  # lines held for one write at most
# A duration's hundredths of a ms as repr() writes the float (".0", ".01" … ".1", ".11" …), and a
# timestamp's milliseconds (".000Z" …): looked up, where formatting a float took ~3,500
# instructions of a line's ~18,000 (callgrind) and "%03d" ~1,500.
_HUNDREDTHS: Final = tuple(".0" if f == 0 else f".{f // 10}" if f % 10 == 0 else f".{f:02d}" for f in range(100))
_MILLIS: Final = tuple(f".{ms:03d}Z" for ms in range(1000))


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


def new_request_id(request: BaseRequest) -> str:
    """The incoming `x-request-id` when it is sane (printable, ≤128 chars), else a new id."""
    rid = request.headers.get("x-request-id", "")
    if 0 < len(rid) <= 128 and rid.isascii() and rid.isprintable():
        return rid
    # An id, not a secret: no urandom syscall per page. (The bytes' hex: half the cost of "%032x".)
    return _random_bits(128).to_bytes(16, "big").hex()


class AccessLog:
    """The page listener's access lines, written where composer answers: the handler knows the
    status, route, request id and time without storing them on the request for aiohttp's access
    logger to read back (its record, dict and calls cost a fragment-less page ~14 of its 60 µs,
    bench/PROFILE.md, nineteenth pass), and a request its client left has a line too (499).

    Where the record would only reach the JSON handler `logs.setup_logging` installs (of
    `handler_type`, formatted by `formatter_type`: passed in, as `logs` is above this module),
    the line is made here and handed to the handler's `Pending` lines; else it is an ordinary
    record, for whatever handlers a test or an embedding application set up."""

    def __init__(self, logger: logging.Logger, handler_type: type[logging.Handler],
                 formatter_type: type[logging.Formatter]) -> None:
        self.logger = logger
        self.name = logger.name
        self.handler_type = handler_type
        self.formatter_type = formatter_type
        self.quoted: dict[str, str] = {}  # see `line`

    def write(self, request: BaseRequest, path: str, status: int, elapsed: float, route: str, request_id: str,
              error: str | None = None) -> None:
        """The line of `request` (whose path is `path`, as it came: raw, not decoded), answered
        with `status` in `elapsed` seconds."""
        logger = self.logger
        if not logger.isEnabledFor(_INFO):
            return
        method, remote, hundredths = request.method, request.remote, int(elapsed * 100_000 + 0.5)
        handler = self._only_handler(logger)
        if handler is None:
            fields: Access = {"method": method, "path": path, "status": status, "duration_ms": hundredths / 100,
                              "route": route, "request_id": request_id, "remote": remote}
            if error is not None:
                fields["error"] = error
            logger.info("access", extra={"fields": fields})
            return
        formatter = cast(_Formatter, handler.formatter)
        cast(_Handler, handler).pending.add(line(formatter.stamp, _now(), self.name, method, path, status, hundredths,
                                                 route, request_id, remote, error, self.quoted))

    def _only_handler(self, logger: logging.Logger) -> logging.Handler | None:
        """The JSON handler that alone would see `logger`'s INFO records, through its parent, as
        `setup_logging` leaves the `composer` logger; None when anything else would (a test's
        handler, a filter, an embedding application's setup)."""
        parent = logger.parent
        if logger.handlers or logger.filters or not logger.propagate or parent is None or parent.filters \
                or parent.propagate or len(parent.handlers) != 1:
            return None
        handler = parent.handlers[0]
        if type(handler) is not self.handler_type or handler.filters or handler.level > _INFO \
                or type(handler.formatter) is not self.formatter_type:
            return None
        return handler


class Pending:
    """Lines waiting for the end of the event loop's turn, to go out in one write (by `flush`:
    `logs.JsonHandler`'s, which owns them). Here, compiled, not in the handler: one line is
    added per request."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self.lines: list[str] = []
        self.flush = flush

    def add(self, line: str) -> None:
        """Write `line` at the end of the running loop's turn (or with the next record's)."""
        lines = self.lines
        lines.append(line)  # (no lock: `flush` takes only the lines it saw, from the front)
        if len(lines) == 1:
            asyncio.get_running_loop().call_soon(self.flush)
        elif len(lines) >= _MOST_WAITING:  # (also bounds a wait whose loop closed before its turn ended)
            self.flush()


class _Handler(Protocol):
    pending: Pending


class _Formatter(Protocol):
    stamp: Stamp


class Stamp:
    """A line's `ts`, to the millisecond, in UTC: one strftime a second, not one a line."""

    def __init__(self) -> None:
        self.last = (-1, "")  # the last whole second formatted: one value, so threads agree

    def of(self, created: float) -> str:
        second = int(created)
        last = self.last
        if second != last[0]:
            last = self.last = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        millis = int((created - second) * 1000)
        return last[1] + _MILLIS[millis if millis < 1000 else 999]


def line(stamp: Stamp, created: float, name: str, method: str, path: str, status: int, hundredths: int,
         route: str, request_id: str, remote: str | None, error: str | None, quoted: dict[str, str]) -> str:
    """The JSON object `logs.JsonFormatter.line(created, "info", name, "access", fields)` makes of
    these fields (`duration_ms`: `hundredths / 100`; `error` only when not None). `quoted` keeps
    the strings of few values (name, method, route, client address) JSON-quoted, from one line
    to the next."""
    return "".join((
        '{"ts": "', stamp.of(created), '", "level": "info", "logger": ', _quote(quoted, name),
        ', "msg": "access", "method": ', _quote(quoted, method), ', "path": ', _esc(path), ', "status": ', str(status),
        ', "duration_ms": ', str(hundredths // 100), _HUNDREDTHS[hundredths % 100], ', "route": ', _quote(quoted, route),
        ', "request_id": ', _esc(request_id), ', "remote": ', "null" if remote is None else _quote(quoted, remote),
        "" if error is None else ', "error": ' + _esc(error), "}"))


def _quote(quoted: dict[str, str], text: str) -> str:
    found = quoted.get(text)
    if found is None:
        found = _esc(text)
        if len(quoted) < _QUOTED:
            quoted[text] = found
    return found
