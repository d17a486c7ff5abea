"""JSON log lines on stderr: one object per line, easy for log shippers and `jq`.

Structured fields travel in `extra={"fields": {...}}`; the access line is one such record
per request, written by `AccessLogger`. Where that record would only reach the stderr
handler `setup_logging` installs, the line is written without a record: the logging
machinery (record, filters, handler lookups) cost a third of a fragment-less page.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
from collections.abc import Mapping
from json.encoder import encode_basestring_ascii
from typing import Any, Required, TypedDict

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, RequestKey, StreamResponse

ROUTE = RequestKey("composer_route", str)
REQUEST_ID = RequestKey("composer_request_id", str)
ERROR = RequestKey("composer_error", str)  # why a request could not be parsed (its access line says)

__all__ = ["ERROR", "REQUEST_ID", "ROUTE", "AccessLogger", "JsonFormatter", "JsonHandler", "new_request_id",
           "request_id_of", "setup_logging"]

_JSON = json.JSONEncoder(default=str)  # made once (json.dumps with `default` makes one per call)
_esc = encode_basestring_ascii  # a str as a JSON string, as _JSON writes it
_now = time.time


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
    return f"{random.getrandbits(128):032x}"  # an id, not a secret: no urandom syscall per page


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: ts, level, logger, msg, then its fields."""

    _second: tuple[int, str] = (-1, "")  # the last whole second formatted: one strftime a second

    def format(self, record: logging.LogRecord) -> str:
        exc = self.formatException(record.exc_info) if record.exc_info else None
        return self.line(record.created, record.levelname.lower(), record.name, record.getMessage(),
                         getattr(record, "fields", None), exc)

    def line(self, created: float, level: str, name: str, msg: str, fields: Mapping[str, Any] | None,
             exc: str | None = None) -> str:
        """The JSON object of one line: `format`'s."""
        line = {"ts": self._stamp(created), "level": level, "logger": name, "msg": msg}
        if fields:
            line.update(fields)
        if exc is not None:
            line["exc"] = exc
        return _JSON.encode(line)

    def access(self, created: float, name: str, fields: Access) -> str:
        """`line(created, "info", name, "access", fields)` for an access line, written out here:
        the generic encoder takes 7 µs a line, a tenth of a fragment-less page."""
        remote = fields["remote"]
        error = fields.get("error")
        tail = "" if error is None else f', "error": {_esc(error)}'
        return (f'{{"ts": "{self._stamp(created)}", "level": "info", "logger": {_esc(name)}, "msg": "access", '
                f'"method": {_esc(fields["method"])}, "path": {_esc(fields["path"])}, "status": {fields["status"]:d}, '
                f'"duration_ms": {float(fields["duration_ms"])!r}, "route": {_esc(fields["route"])}, '
                f'"request_id": {_esc(fields["request_id"])}, "remote": {"null" if remote is None else _esc(remote)}'
                f'{tail}}}')

    def _stamp(self, created: float) -> str:
        second = int(created)
        if second != self._second[0]:
            self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        return f"{self._second[1]}.{int((created - second) * 1000):03d}Z"


class JsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr, one JSON line per record; `write` takes a line made without a record."""

    def write(self, line: str) -> None:
        self.acquire()
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed or gone: the line is lost, the request is not
            pass
        finally:
            self.release()


def setup_logging(level: int = logging.INFO) -> None:
    """Send every `composer` and `aiohttp` record, and OpenTelemetry's warnings (a span export
    that fails), to stderr as JSON."""
    # No record needs where it was logged from, nor thread, process or task names: each costs
    # every line a stack walk or lookups (the logging HOWTO's "Optimization" switches).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = JsonHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name, at in (("composer", level), ("aiohttp", level), ("opentelemetry", max(level, logging.WARNING))):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(at)
        logger.propagate = False


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path, status, duration, route and request id."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        fields: Access = {
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "duration_ms": round(time * 1000, 2),
            "route": request.get(ROUTE, ""),
            "request_id": request.get(REQUEST_ID, ""),
            "remote": request.remote,
        }
        # (a request's `get` or `in` of a key not set raises and catches a KeyError: only a
        # client error can have one)
        if response.status >= 400 and ERROR in request:
            fields["error"] = request[ERROR]
        logger = self.logger
        handler = _only_handler(logger)
        if handler is None:
            logger.info("access", extra={"fields": fields})
        elif logger.isEnabledFor(logging.INFO):
            formatter = handler.formatter
            assert isinstance(formatter, JsonFormatter)
            handler.write(formatter.access(_now(), logger.name, fields))


def _only_handler(logger: logging.Logger) -> JsonHandler | None:
    """The JsonHandler (with its JsonFormatter) that alone would see `logger`'s INFO records,
    through its parent, as `setup_logging` leaves the `composer` and `aiohttp` loggers; None
    when anything else would (a test's handler, a filter, an embedding application's setup)."""
    parent = logger.parent
    if logger.handlers or logger.filters or not logger.propagate or parent is None or parent.filters \
            or parent.propagate or len(parent.handlers) != 1:
        return None
    handler = parent.handlers[0]
    if type(handler) is not JsonHandler or handler.filters or handler.level > logging.INFO \
            or not isinstance(handler.formatter, JsonFormatter):
        return None
    return handler
