"""JSON log lines on stderr: one object per line, easy for log shippers and `jq`.

Structured fields travel in `extra={"fields": {...}}`; the access line is one such record
per request, written by `AccessLogger`.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, RequestKey, StreamResponse

ROUTE = RequestKey("composer_route", str)
REQUEST_ID = RequestKey("composer_request_id", str)
ERROR = RequestKey("composer_error", str)  # why a request could not be parsed (its access line says)

__all__ = ["ERROR", "REQUEST_ID", "ROUTE", "AccessLogger", "JsonFormatter", "setup_logging"]


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: ts, level, logger, msg, then its fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
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
