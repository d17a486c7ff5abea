"""Errors and failure reasons shared by config loading, fetching, logs and metrics.

    Exception
     └── ConfigError          routes.yaml or a template is invalid; carries every problem
                              as a `file:line: message` string, so one run shows them all.

A fragment failure is not an exception: fetching returns a value carrying a `Reason`, the
same enum used as the `reason` metric label and the `error_type` log field.
"""

from __future__ import annotations

import enum
from http import HTTPStatus
from pathlib import Path

# What identifies a version of a file: (mtime in ns, size, inode); None when it is missing.
# The inode catches Kubernetes ConfigMap updates, which swap a symlink to a new file.
Stamp = tuple[int, int, int] | None

__all__ = ["ConfigError", "Reason", "Stamp", "error_page"]


class ConfigError(Exception):
    """Raised when configuration cannot be loaded; `problems` lists every `file:line: message`."""

    def __init__(self, problems: list[str], sources: tuple[tuple[Path, Stamp], ...] = ()) -> None:
        self.problems = list(problems)
        self.sources = sources  # the files read before giving up, so a reload knows what to watch
        super().__init__("\n".join(self.problems))


class Reason(enum.StrEnum):
    """Why a fragment fetch failed (the `reason` label of composer_fragment_failures_total)."""

    TIMEOUT = "timeout"
    CONNECTION = "connection"
    STATUS = "status"
    TOO_LARGE = "too_large"
    CIRCUIT_OPEN = "circuit_open"
    INVALID = "invalid"
    # Nested fragments (SPEC §6), refused before any fetch: a nested URL outside
    # settings.allowed_origins; too deep or a cycle; over settings.max_fragments_per_page.
    ORIGIN = "origin"
    NESTING = "nesting"
    LIMIT = "limit"


def error_page(status: int, detail: str = "") -> bytes:
    """The small HTML body of every page composer answers itself (400, 404, 405, 500, 502, 504).

    `detail` must be plain text without markup; it is a fixed message, never user input.
    """
    title = f"{status} {HTTPStatus(status).phrase}"
    extra = f"<p>{detail}</p>" if detail else ""
    return (f"<!DOCTYPE html><html><head><title>{title}</title></head>"
            f"<body><h1>{title}</h1>{extra}</body></html>").encode()
