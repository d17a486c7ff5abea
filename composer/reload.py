"""Hot reload: notice a changed routes.yaml or template, compile it aside, swap it in.

Polling file stamps (mtime, size, inode) once a second costs a few `stat` calls and works
everywhere, including Kubernetes ConfigMap volumes, whose updates inotify misses. Loading
and compiling run in a worker thread, off the event loop; the result is handed over whole,
so a request sees either the old table or the new one, and a page in flight finishes with
the route it started with. A config that does not load is logged problem by problem and
counted, and the running one stays; it is retried only once one of the files it was read
from changes again.

A file is read whole or not at all (SPEC §9): one written in place is half-written for a
while, and a poll landing then would serve its prefix. So a file whose stamp changed is
loaded only once it has stopped changing for one full `reload_interval_ms`: its mtime is
that old, or this process first saw its stamp that long ago (which covers a future mtime).
A file still changing, or changed while being read, waits for a later poll, silently: a
half-written file is neither served nor reported. Polling cannot tell a writer that pauses
longer than that from one that is done; tools should still write aside and rename, as
editors and ConfigMaps do.

SIGHUP is the operator's explicit "load it now": it loads at once, settled or not.

A URL manifest is fetched in the event loop, with composer's own client, and its body handed
to `load` (`aload`); a routes.yaml reload reuses the body last fetched.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from .client import Client
from .config import file_stamp
from .errors import ConfigError, Stamp
from .manifest import ManifestBody, fetch_manifest, fetch_once, is_url
from .metrics import Metrics
from .routing import ManifestNeeded, RouteTable, load

__all__ = ["Reloader", "aload", "changed"]

log = logging.getLogger("composer.reload")


async def aload(path: str | os.PathLike[str], manifest: str | None = None, *,
                fetched: ManifestBody | None = None) -> RouteTable:
    """`load` from a running event loop: the files are read and compiled in a worker thread,
    off the loop, and a URL manifest they name is fetched here, in the loop, with composer's
    client (never with a loop of the worker's own). Raises ConfigError like `load`.

    A routes.yaml naming another URL while its manifest was fetched raises `ManifestNeeded`
    (the file is still changing: a later poll loads it).
    """
    try:
        return await asyncio.to_thread(load, path, manifest, fetched=fetched, fetch=False)
    except ManifestNeeded as need:
        try:
            fetched = await fetch_once(need.url)
        except ConfigError as exc:
            raise ConfigError([*need.problems, *exc.problems], need.sources) from None
    return await asyncio.to_thread(load, path, manifest, fetched=fetched, fetch=False)


def changed(sources: tuple[tuple[Path, Stamp], ...]) -> bool:
    """Has any of these files changed (or appeared, or gone) since it was stamped?"""
    return any(file_stamp(path) != stamp for path, stamp in sources)


_TIMER_SLACK = 0.005  # s: a poll timer may fire a hair early (uvloop counts in whole ms)


class _Settling:
    """When each changed file's current stamp was first seen, to tell a file that has stopped
    changing from one still being written."""

    def __init__(self) -> None:
        self._first_seen: dict[Path, tuple[Stamp, float]] = {}

    def settled(self, path: Path, stamp: Stamp, window: float) -> bool:
        """Has `path` stayed at `stamp` for at least `window` seconds?

        Yes when its mtime (the time of the last write) is that old, which lets a new process
        load a file edited long ago at once; else when this reloader first saw `stamp` that
        long ago, which holds even for an mtime in the future (clock skew, a copied mtime).
        """
        now = time.monotonic()
        seen = self._first_seen.get(path)
        if seen is None or seen[0] != stamp:
            seen = self._first_seen[path] = (stamp, now)
        if stamp is not None and time.time_ns() - stamp[0] >= (window - _TIMER_SLACK) * 1e9:
            return True
        return now - seen[1] >= window - _TIMER_SLACK

    def forget(self) -> None:
        self._first_seen.clear()


class Reloader:
    """Watches the files the current table came from; `apply` receives each good new table.

    Each reload loads what the current table was loaded from: its routes.yaml and the
    `manifest` given to `load` (--manifest / COMPOSER_MANIFEST), kept across reloads.
    """

    def __init__(self, current: Callable[[], RouteTable], apply: Callable[[RouteTable], None],
                 metrics: Metrics) -> None:
        self._current = current
        self._apply = apply
        self._metrics = metrics
        self._failed: tuple[tuple[Path, Stamp], ...] | None = None
        self._wake = asyncio.Event()
        self._refused_text: str | None = None
        self._refetch = False
        self._lock = asyncio.Lock()  # the file watcher and the manifest poller never overlap
        self._settling = _Settling()

    def trigger(self) -> None:
        """Load now (SIGHUP), even if no file looks changed, fetching a URL manifest afresh.

        An explicit "load it now" from the operator: files are read at once, without waiting
        for a changed one to settle (the operator says the edit is done).
        """
        self._failed = None
        self._refetch = True
        self._wake.set()

    async def run(self) -> None:
        """Check the files every `reload_interval_ms` (0: only when triggered), until cancelled."""
        while True:
            interval = self._current().settings.reload_interval_ms / 1000
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

    async def poll_manifest(self) -> None:
        """Poll a URL manifest (ETag-aware); a new body is validated and applied like a file edit."""
        refused_by: RouteTable | None = None  # the table that was running when _refused_text was refused
        client = Client()  # its keep-alive connection is reused from one poll to the next
        try:
            while True:
                await asyncio.sleep(self._current().settings.manifest_poll_s)
                current = self._current()
                manifest = current.manifest
                if manifest is None or not is_url(manifest.source):
                    continue
                try:
                    fetched = await fetch_manifest(client, manifest.source, manifest.etag)
                except ConfigError as exc:
                    self._refused(exc, "manifest fetch failed; still serving the previous manifest")
                    continue
                if fetched.text is None or fetched.text == manifest.text:
                    continue
                # A body is refused with the whole config (a broken routes.yaml refuses it too):
                # not again until the body changes or another config is swapped in.
                if fetched.text == self._refused_text and refused_by is current:
                    continue
                if await self.check(remote=fetched) is False:
                    self._refused_text, refused_by = fetched.text, self._current()
                else:
                    self._refused_text, refused_by = None, None
        finally:
            await client.close()

    def _refused(self, exc: ConfigError, message: str) -> None:
        """Count a refused config and log each of its problems."""
        self._metrics.config_reloads.labels("error").inc()
        for problem in exc.problems:
            log.error(message, extra={"fields": {"problem": problem}})

    async def check(self, *, force: bool = False, remote: ManifestBody | None = None) -> bool | None:
        """Reload if something changed: True applied, False refused, None nothing to do (yet).

        A changed file is read only once it has settled (see the module docstring). `force`
        is "load now" (SIGHUP): at once, even if no file looks changed. `remote` is a newly
        fetched URL manifest body, loaded even if no file changed (files that did must have
        settled); without it the current body is reused.
        """
        async with self._lock:
            return await self._check(force=force, remote=remote)

    def _settled(self, sources: tuple[tuple[Path, Stamp], ...], *, read: bool) -> bool:
        """Has every file of `sources` that changed stopped changing for a poll interval?

        Before a load, `sources` are the watched files and a file counts as changed when its
        stamp differs from theirs. After one (`read`), they are the stamps taken just before
        each file was read: a file that differs from the running config must have settled, and
        one whose stamp moved since was changing while it was read.
        """
        current = self._current()
        window = current.settings.reload_interval_ms / 1000
        running = dict(current.sources)
        ok = True
        for path, stamp in sources:  # no early exit: every changed file's sighting is recorded
            now = file_stamp(path)
            if read and now != stamp:  # changed while it was being read
                self._settling.settled(path, now, window)
                ok = False
                continue
            unchanged = (path in running and running[path] == now) if read else now == stamp
            if not unchanged and not self._settling.settled(path, now, window):
                ok = False
        return ok

    async def _check(self, *, force: bool, remote: ManifestBody | None) -> bool | None:
        """`check` under the lock."""
        current = self._current()
        watched = self._failed if self._failed is not None else current.sources
        if not force and remote is None and not changed(watched):
            return None
        if not force and not self._settled(watched, read=False):
            return None
        refetch, self._refetch = self._refetch, False
        if remote is None and not refetch and current.manifest is not None:
            remote = current.manifest.body()  # a routes.yaml edit does not refetch the manifest
        try:
            table = await aload(current.path, current.manifest_option, fetched=remote)
        except ManifestNeeded:  # routes.yaml named another manifest URL while one was fetched
            self._refetch = self._refetch or refetch
            return None
        except ConfigError as exc:
            if not force and not self._settled(exc.sources, read=True):
                self._refetch = self._refetch or refetch
                return None  # a file it names (a new template) is still being written
            self._failed = exc.sources or ((current.path, file_stamp(current.path)),)
            self._refused(exc, "config reload failed; still serving the previous config")
            return False
        except Exception:  # a bug must not end the watcher, or reloads would silently stop
            log.exception("config reload failed")
            self._metrics.config_reloads.labels("error").inc()
            self._failed = tuple((path, file_stamp(path)) for path, _ in watched)
            return False
        if not force and not self._settled(table.sources, read=True):
            self._refetch = self._refetch or refetch
            return None  # a file it names (a new template) is still being written
        self._failed = None
        self._settling.forget()
        self._apply(table)
        self._metrics.config_reloads.labels("ok").inc()
        for warning in table.warnings:
            log.warning("config warning", extra={"fields": {"problem": warning}})
        log.info("config reloaded", extra={"fields": {"routes": len(table.routes), "file": table.label}})
        return True
