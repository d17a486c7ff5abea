"""Canary analysis (SPEC §8): each canary version against its fragment's active version.

Sticky buckets put the canary (the experiment) and the active version (the control) on the
same pages at the same time, so their failure ratios compare directly. Two halves:

    the hot path   `Analysis.count` per fetch of a canaried fragment: a few list operations
                   on a small ring of time slots per (fragment, version); no lock, no I/O
    the verdict    `Analysis.run`, a task about once a second: reads verdicts other workers
                   wrote, judges each canary over the last `window_s`, and on an abort writes
                   `state_dir/<fragment>@<version>.json` (created exclusively: one worker wins,
                   logs and counts it) so every worker, reload and restart honours it

A canary is aborted when, with at least `min_requests` fetches in the window, its failure
ratio exceeds both twice the active's and the active's plus one percentage point. An abort
holds until the manifest names another canary version for that fragment; then its state file
is removed. Circuit-open outcomes count as failures; cache hits are no fetches.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from aiohttp.web import BaseRequest

from .config import DEFAULT_ANALYSIS

if TYPE_CHECKING:
    from .metrics import Metrics
    from .routing import RouteTable

__all__ = ["BUCKET_COOKIE", "BUCKET_SET_COOKIE", "STATE_DIR_ENV", "Analysis", "state_dir_of", "user_bucket"]

BUCKET_COOKIE = "composer_bucket"  # the user's canary bucket, 0–99 (SPEC §5)
# A year: the bucket is the only canary state, so it must outlive the browser session.
BUCKET_SET_COOKIE = BUCKET_COOKIE + "={}; Max-Age=31536000; Path=/; HttpOnly; SameSite=Lax"


def user_bucket(request: BaseRequest) -> tuple[int, bool]:
    """The user's canary bucket from the `composer_bucket` cookie, and False; or, when it is
    absent or not 0–99, a new random one and True (the page must set it)."""
    value = request.cookies.get(BUCKET_COOKIE, "") if "cookie" in request.headers else ""
    # ASCII only: str.isdigit() also accepts "²" (int() raises: a 500 the cookie would cause
    # on every page) and "٣" (not a bucket composer ever sets).
    if value.isascii() and value.isdigit() and len(value) <= 2:
        return int(value), False
    return random.randrange(100), True

log = logging.getLogger("composer.canary")

STATE_DIR_ENV = "COMPOSER_STATE_DIR"  # overrides settings.state_dir (the Kubernetes Deployment sets it)
_DEFAULT_FOLDER = ".composer-state"
_MARGIN = 0.01  # the canary must also be worse than the active by one percentage point
_TICK_S = 1.0
_monotonic = time.monotonic


class _Ring:
    """Page views, fetches (requests) and failed fetches of one (fragment, version), in time
    slots of `step` seconds: each slot a list [slot number, views, requests, failures],
    reused when its number comes round again (no allocation per count)."""

    __slots__ = ("size", "slots", "step")

    def __init__(self, window_s: int) -> None:
        self.step = 1 if window_s <= 120 else math.ceil(window_s / 120)
        self.size = math.ceil(window_s / self.step)
        self.slots = [[-1, 0, 0, 0] for _ in range(self.size)]

    def add(self, fetched: bool, failed: bool) -> None:
        number = int(_monotonic()) // self.step
        slot = self.slots[number % self.size]
        if slot[0] != number:
            slot[:] = (number, 0, 0, 0)
        slot[1] += 1
        if fetched:
            slot[2] += 1
            slot[3] += failed

    def totals(self) -> tuple[int, int, int]:
        """(requests, failures, views) over the window: the current slot and those before it."""
        since = int(_monotonic()) // self.step - self.size
        requests = failures = views = 0
        for number, v, r, f in self.slots:
            if number > since:
                views += v
                requests += r
                failures += f
        return requests, failures, views


@dataclass(frozen=True, slots=True)
class _Canary:
    """A canary the manifest declares: what is compared with what."""

    fragment: str
    version: str
    active: str
    owner: str


def state_dir_of(table: RouteTable) -> Path:
    """$COMPOSER_STATE_DIR, else settings.state_dir (relative: to routes.yaml's folder), else
    `.composer-state` beside the manifest file (a URL or inline manifest: beside routes.yaml)."""
    base = table.path.parent
    configured = os.environ.get(STATE_DIR_ENV) or table.settings.state_dir
    if configured:
        return base / configured
    manifest = table.manifest
    if manifest is not None and not manifest.source.startswith(("http://", "https://")):
        source = Path(manifest.source)
        with contextlib.suppress(OSError):
            if source.is_file() and source.resolve() != table.path.resolve():
                return source.parent / _DEFAULT_FOLDER
    return base / _DEFAULT_FOLDER


def _file_name(fragment: str, version: str) -> str:
    return f"{quote(fragment, safe='')}@{quote(version, safe='')}.json"


class Analysis:
    """One server's canary analysis: the counters the pipeline feeds and the verdicts."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self.policy = DEFAULT_ANALYSIS
        self.state_dir: Path | None = None
        self.aborted: dict[str, str] = {}  # fragment → its aborted canary version (read per page)
        self.verdicts: dict[tuple[str, str], dict[str, Any]] = {}  # (fragment, version) → the abort record
        self._canaries: dict[str, _Canary] = {}
        self._rings: dict[str, dict[str, _Ring]] = {}
        self._declared: set[tuple[str, str]] = set()
        self._unwritable = False
        self._sample = 0.0  # settings.client_signals_sample when client signals are on, else 0
        self._history: deque[tuple[float, dict[tuple[str, str], float]]] = deque()  # client error totals

    # ------------------------------------------------------------ the hot path

    def count(self, fragment: str, version: str, fetched: bool, failed: bool) -> None:
        """One page showing `fragment` at `version` (a canaried fragment's canary or active):
        `fetched` unless the cache answered; `failed` if that fetch failed."""
        versions = self._rings.get(fragment)
        if versions is not None:
            ring = versions.get(version)
            if ring is not None:
                ring.add(fetched, failed)

    # ------------------------------------------------------------ configuration

    def apply(self, table: RouteTable) -> None:
        """Take up a (re)loaded table: its policy, state folder and declared canaries."""
        policy = table.settings.canary_analysis
        self.state_dir = state_dir_of(table)
        self._sample = table.settings.client_signals_sample if table.settings.client_signals else 0.0
        canaries: dict[str, _Canary] = {}
        for entry in table.manifest.fragments.values() if table.manifest and policy.enabled else ():
            if entry.canary is not None:
                canaries[entry.name] = _Canary(entry.name, entry.canary.version, entry.active, entry.owner)
        rings: dict[str, dict[str, _Ring]] = {}
        for name, canary in canaries.items():
            old = self._rings.get(name, {}) if policy.window_s == self.policy.window_s else {}
            rings[name] = {v: old.get(v) or _Ring(policy.window_s) for v in (canary.version, canary.active)}
        self.policy, self._canaries, self._rings = policy, canaries, rings
        for name, version in list(self.aborted.items()):
            declared = canaries.get(name)
            if not policy.enabled:
                self._forget(name, version, remove=False)
            elif declared is not None and declared.version != version:  # another canary: a fresh start
                self._forget(name, version, remove=True)
        self._poll()
        self._gauges()

    def _forget(self, fragment: str, version: str, *, remove: bool) -> None:
        self.aborted.pop(fragment, None)
        self.verdicts.pop((fragment, version), None)
        if remove and self.state_dir is not None:
            with contextlib.suppress(OSError):
                (self.state_dir / _file_name(fragment, version)).unlink(missing_ok=True)
                log.info("canary state cleared", extra={"fields": {
                    "fragment": fragment, "version": version, "reason": "the manifest names another canary"}})

    def _gauges(self) -> None:
        """composer_canary_aborted: 0 or 1 for each declared canary; others leave (or go to 0)."""
        if self.metrics is None:
            return
        gauge = self.metrics.canary_aborted
        declared = {(c.fragment, c.version) for c in self._canaries.values()}
        for labels in self._declared - declared:
            if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
                gauge.labels(*labels).set(0)
            else:
                gauge.remove(*labels)
        for fragment, version in declared:
            gauge.labels(fragment, version).set(1 if self.aborted.get(fragment) == version else 0)
        self._declared = declared

    # ------------------------------------------------------------ the verdict

    async def run(self) -> None:
        """Judge and poll about once a second until cancelled."""
        while True:
            await asyncio.sleep(_TICK_S)
            try:
                self.tick()
            except Exception:  # never let one bad tick end the analysis
                log.exception("canary analysis failed")

    def tick(self) -> None:
        """Take up verdicts other workers recorded, then judge every running canary."""
        if not self.policy.enabled:
            return
        changed = self._poll()
        errors = self._client_errors()
        for canary in self._canaries.values():
            if self.aborted.get(canary.fragment) != canary.version:
                changed |= self._judge(canary, errors)
        if changed:
            self._gauges()

    def _judge(self, canary: _Canary, errors: dict[tuple[str, str], float]) -> bool:
        """Abort `canary` if the window shows it clearly worse than its active version."""
        versions = self._rings.get(canary.fragment, {})
        if canary.version not in versions or canary.active not in versions:
            return False
        requests, failures, views = versions[canary.version].totals()
        if requests < self.policy.min_requests:
            return False  # too few fetches to say anything
        active_requests, active_failures, active_views = versions[canary.active].totals()
        canary_errors = errors.get((canary.fragment, canary.version), 0.0)
        active_errors = errors.get((canary.fragment, canary.active), 0.0)
        ratio = failures / requests + self._per_view(canary_errors, views)
        active_ratio = (active_failures / active_requests if active_requests else 0.0) \
            + self._per_view(active_errors, active_views)
        if not (ratio > 2 * active_ratio and ratio > active_ratio + _MARGIN):
            return False
        reason = (f"failure ratio {ratio:.1%} over the last {self.policy.window_s} s ({failures} of {requests} "
                  f"fetches failed, {canary_errors:.0f} client errors) > 2 × and > 1 point above "
                  f"the active {canary.active}'s {active_ratio:.1%}")
        record = {"fragment": canary.fragment, "version": canary.version, "owner": canary.owner,
                  "active_version": canary.active, "failure_ratio": round(ratio, 4),
                  "active_failure_ratio": round(active_ratio, 4), "requests": requests,
                  "failures": failures, "active_requests": active_requests, "active_failures": active_failures,
                  "window_s": self.policy.window_s, "reason": reason, "at": time.time()}
        if self._sample:
            record.update(client_errors=canary_errors, page_views=views, active_client_errors=active_errors,
                          active_page_views=active_views)
        self.aborted[canary.fragment] = canary.version
        self.verdicts[canary.fragment, canary.version] = record
        if self._record(record):  # the first worker to write it logs it: one line per abort
            log.error("canary aborted", extra={"fields": {k: v for k, v in record.items() if k != "at"}})
        return True

    def _per_view(self, errors: float, views: int) -> float:
        """Client errors per page view that reported (views × settings.client_signals_sample)."""
        return errors / (views * self._sample) if errors and views and self._sample else 0.0

    def _client_errors(self) -> dict[tuple[str, str], float]:
        """composer_client_errors_total per (fragment, version) over about the last window
        (this process's counts, as its fetch counts are); {} when client signals are off."""
        if not self._sample or self.metrics is None:
            self._history.clear()
            return {}
        now = time.monotonic()
        totals: dict[tuple[str, str], float] = {}
        for family in self.metrics.client_errors.collect():
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = (sample.labels["fragment"], sample.labels["version"])
                    totals[key] = totals.get(key, 0.0) + sample.value
        history = self._history
        history.append((now, totals))
        while len(history) > 1 and history[1][0] <= now - self.policy.window_s:
            history.popleft()
        base = history[0][1] if len(history) > 1 else {}
        return {key: value - base.get(key, 0.0) for key, value in totals.items() if value > base.get(key, 0.0)}

    def _record(self, record: dict[str, Any]) -> bool:
        """Write the verdict's file atomically and exclusively; False if it already exists.
        An unwritable folder keeps the abort in this process only (logged once)."""
        assert self.state_dir is not None
        final = self.state_dir / _file_name(record["fragment"], record["version"])
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as out:
                json.dump(record, out)
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(tmp, final)  # fails if another worker got there first
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links: still atomic, exclusive no more
                if final.exists():
                    return False
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
        except OSError as exc:
            if not self._unwritable:
                self._unwritable = True
                log.error("canary state not written: the abort holds in this process only", extra={"fields": {
                    "state_dir": str(self.state_dir), "error": str(exc)}})
        return True

    def _poll(self) -> bool:
        """Verdicts in the state folder for canaries the manifest still names; True if any is new.
        A verdict for a canary the manifest has replaced with another version is removed."""
        if self.state_dir is None or not self.policy.enabled:
            return False
        try:
            names = [e.name for e in os.scandir(self.state_dir) if e.name.endswith(".json")]
        except OSError:
            return False
        new = False
        for name in names:
            fragment, _, version = name.removesuffix(".json").partition("@")
            canary = self._canaries.get(unquote(fragment))
            if canary is None:
                continue
            if unquote(version) != canary.version:  # the manifest names another canary: a fresh start
                with contextlib.suppress(OSError):
                    (self.state_dir / name).unlink(missing_ok=True)
                continue
            if self.aborted.get(canary.fragment) == canary.version:
                continue
            try:
                record = json.loads((self.state_dir / name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                record = {}
            self.aborted[canary.fragment] = canary.version
            self.verdicts[canary.fragment, canary.version] = record if isinstance(record, dict) else {}
            new = True
        return new

    # ------------------------------------------------------------ what /manifest shows

    def view(self, fragment: str, version: str) -> dict[str, object]:
        """`state` (running, aborted, or off) and, for an abort, `reason` and its figures."""
        if not self.policy.enabled:
            return {"state": "off"}
        if self.aborted.get(fragment) != version:
            return {"state": "running"}
        record = self.verdicts.get((fragment, version), {})
        return {"state": "aborted", "reason": record.get("reason", "recorded in the state folder"),
                **{k: record[k] for k in ("failure_ratio", "active_failure_ratio", "requests") if k in record}}
