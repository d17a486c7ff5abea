"""Errors and failure reasons shared by config loading, fetching, logs and metrics.

    Exception
     └── ConfigError          routes.yaml or a template is invalid; carries every problem
                              as a `file:line: message` string, so one run shows them all.

A fragment failure is not an exception: fetching returns a value carrying a `Reason`, the
same enum used as the `reason` metric label and the `error_type` log field.
"""

from __future__ import annotations

import enum

__all__ = ["ConfigError", "Reason"]


class ConfigError(Exception):
    """Raised when configuration cannot be loaded; `problems` lists every `file:line: message`."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class Reason(enum.StrEnum):
    """Why a fragment fetch failed (the `reason` label of composer_fragment_failures_total)."""

    TIMEOUT = "timeout"
    CONNECTION = "connection"
    STATUS = "status"
    TOO_LARGE = "too_large"
    INVALID = "invalid"
