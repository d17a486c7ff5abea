"""JSON log lines on stderr: one object per line, easy for log shippers and `jq`.

Structured fields travel in `extra={"fields": {...}}`; the access line is one such record
per request, written by `AccessLogger`.
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, RequestKey, StreamResponse

ROUTE = RequestKey("composer_route", str)
REQUEST_ID = RequestKey("composer_request_id", str)
ERROR = RequestKey("composer_error", str)  # why a request could not be parsed (its access line says)

__all__ = ["ERROR", "REQUEST_ID", "ROUTE", "AccessLogger", "JsonFormatter", "request_id_of", "setup_logging"]


def request_id_of(request: BaseRequest) -> str:
    """The request's id: the one given it on arrival, else the incoming `x-request-id` when it
    is sane (printable, ≤128 chars), else a new one."""
    given: str | None = request.get(REQUEST_ID)
    if given:
        return given
    rid = request.headers.get("x-request-id", "")
    if 0 < len(rid) <= 128 and rid.isascii() and rid.isprintable():
        return rid
    return f"{random.getrandbits(128):032x}"  # an id, not a secret: no urandom syscall per page


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: ts, level, logger, msg, then its fields."""

    _second: tuple[int, str] = (-1, "")  # the last whole second formatted: one strftime a second

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second[0]:
            self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        line = {
            "ts": f"{self._second[1]}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging(level: int = logging.INFO) -> None:
    """Send every `composer` and `aiohttp` record, and OpenTelemetry's warnings (a span export
    that fails), to stderr as JSON."""
    # No record needs where it was logged from, nor thread, process or task names: each costs
    # every line a stack walk or lookups (the logging HOWTO's "Optimization" switches).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name, at in (("composer", level), ("aiohttp", level), ("opentelemetry", max(level, logging.WARNING))):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(at)
        logger.propagate = False


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path, status, duration, route and request id."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        fields = {
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "duration_ms": round(time * 1000, 2),
            "route": request.get(ROUTE, ""),
            "request_id": request.get(REQUEST_ID, ""),
            "remote": request.remote,
        }
        if ERROR in request:
            fields["error"] = request[ERROR]
        self.logger.info("access", extra={"fields": fields})
