"""Hot reload: notice a changed routes.yaml or template, compile it aside, swap it in.

Polling file stamps (mtime, size, inode) once a second costs a few `stat` calls and works
everywhere, including Kubernetes ConfigMap volumes, whose updates inotify misses. SIGHUP
checks at once. Loading and compiling run in a worker thread, off the event loop; the
result is handed over whole, so a request sees either the old table or the new one, and a
page in flight finishes with the route it started with. A config that does not load is
logged problem by problem and counted, and the running one stays; it is retried only
once one of the files it was read from changes again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from .config import Config, file_stamp, read_config
from .errors import ConfigError, Stamp
from .metrics import Metrics
from .routing import RouteTable, build_table

__all__ = ["Reloader", "changed", "load"]

log = logging.getLogger("composer.reload")


def load(path: str | Path) -> tuple[Config, RouteTable]:
    """Load and compile a routes file; raises ConfigError listing every problem of every file."""
    config = read_config(path)
    return config, build_table(config)


def changed(sources: tuple[tuple[Path, Stamp], ...]) -> bool:
    return any(file_stamp(path) != stamp for path, stamp in sources)


class Reloader:
    """Watches the files the current table came from; `apply` receives each good new config."""

    def __init__(self, path: str | Path, current: Callable[[], RouteTable],
                 apply: Callable[[Config, RouteTable], None], metrics: Metrics) -> None:
        self.path = path
        self._current = current
        self._apply = apply
        self._metrics = metrics
        self._failed: tuple[tuple[Path, Stamp], ...] | None = None
        self._wake = asyncio.Event()

    def trigger(self) -> None:
        """Check now (SIGHUP), even if no file looks changed."""
        self._failed = None
        self._wake.set()

    async def run(self) -> None:
        while True:
            settings = self._current().settings
            interval = settings.reload_interval_ms / 1000 if settings is not None else 1.0
            try:
                async with asyncio.timeout(interval or None):
                    await self._wake.wait()
            except TimeoutError:
                pass
            # Read the event, not how the wait ended: a trigger landing as the timeout fires
            # ends the wait with TimeoutError, and must still force the check.
            forced = self._wake.is_set()
            self._wake.clear()
            await self.check(force=forced)

    async def check(self, *, force: bool = False) -> bool | None:
        """Reload if something changed: True applied, False refused, None nothing to do."""
        watched = self._failed if self._failed is not None else self._current().sources
        if not force and not changed(watched):
            return None
        try:
            config, table = await asyncio.to_thread(load, self.path)
        except ConfigError as exc:
            self._failed = exc.sources or ((Path(self.path), file_stamp(Path(self.path))),)
            self._metrics.config_reloads.labels("error").inc()
            for problem in exc.problems:
                log.error("config reload failed; still serving the previous config",
                          extra={"fields": {"problem": problem}})
            return False
        except Exception:  # a bug must not end the watcher, or reloads would silently stop
            log.exception("config reload failed")
            self._metrics.config_reloads.labels("error").inc()
            self._failed = tuple((path, file_stamp(path)) for path, _ in watched)
            return False
        self._failed = None
        self._apply(config, table)
        self._metrics.config_reloads.labels("ok").inc()
        for warning in table.warnings:
            log.warning("config warning", extra={"fields": {"problem": warning}})
        log.info("config reloaded", extra={"fields": {"routes": len(table.routes), "file": config.label}})
        return True
