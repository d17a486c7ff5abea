"""JSON log lines on stderr: one object per line, easy for log shippers and `jq`.

Structured fields travel in `extra={"fields": {...}}`; the access line is one such record
per request (`access.AccessLog`). Where that record would only reach the stderr handler
`setup_logging` installs, the line is written without a record (the logging machinery —
record, filters, handler lookups — cost a third of a fragment-less page), and with the loop
turn's other access lines in one write (`JsonHandler.pending`).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from .access import Pending, Stamp

_JSON = json.JSONEncoder(default=str)  # made once (json.dumps with `default` makes one per call)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: ts, level, logger, msg, then its fields."""

    def __init__(self) -> None:
        super().__init__()
        self.stamp = Stamp()

    def format(self, record: logging.LogRecord) -> str:
        exc = self.formatException(record.exc_info) if record.exc_info else None
        return self.line(record.created, record.levelname.lower(), record.name, record.getMessage(),
                         getattr(record, "fields", None), exc)

    def line(self, created: float, level: str, name: str, msg: str, fields: Mapping[str, Any] | None,
             exc: str | None = None) -> str:
        """The JSON object of one line: `format`'s."""
        line = {"ts": self.stamp.of(created), "level": level, "logger": name, "msg": msg}
        if fields:
            line.update(fields)
        if exc is not None:
            line["exc"] = exc
        return _JSON.encode(line)


class JsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """stderr, one JSON line per record. A line made without a record (added to `pending`: the
    access line) waits for the end of the event loop's turn and goes out with that turn's others
    in one write: a write per request cost a fragment-less page 10 of its 54 µs (bench/PROFILE.md,
    sixteenth pass). A record's line is written at once, after the lines waiting: order is kept."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.pending = Pending(self.flush)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except RecursionError:  # (as logging's own handlers do)
            raise
        except Exception:  # noqa: BLE001 - logging's contract: a record that will not format goes to handleError
            self.handleError(record)
            return
        self.pending.lines.append(line)  # (`handle` holds the lock)
        self.flush()

    def flush(self) -> None:
        """Write the lines waiting: at the end of the loop's turn, after a record, at exit."""
        self.acquire()
        try:
            waiting = self.pending.lines
            count = len(waiting)
            if count:
                text = "\n".join(waiting[:count]) + "\n"
                del waiting[:count]  # (a line appended meanwhile, by the loop's thread, stays)
                self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed or gone: the lines are lost, the requests are not
            pass
        finally:
            self.release()


def setup_logging(level: int = logging.INFO, stream: TextIO | None = None) -> JsonHandler:
    """Send every `composer` and `aiohttp` record, and OpenTelemetry's warnings (a span export
    that fails), to stderr (or `stream`) as JSON."""
    # No record needs where it was logged from, nor thread, process or task names: each costs
    # every line a stack walk or lookups (the logging HOWTO's "Optimization" switches).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = JsonHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter())
    for name, at in (("composer", level), ("aiohttp", level), ("opentelemetry", max(level, logging.WARNING))):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(at)
        logger.propagate = False
    return handler
