"""Prometheus metrics, named and labelled as SPEC §4 says.

Each server owns a `Metrics` with its own registry, so two servers in one process (tests,
the demo) never mix counts. Label values are bounded by construction: `fragment` is a
declared id, `route` a route name, `reason` a `Reason`, `version` a manifest version ("" when
the fragment has none).

Every label set the config makes possible is declared at load (`declare`), at 0: an alert's
`rate(x[5m] offset 30m)` or `increase()` needs the series before its first event (SPEC §9).

With `--workers N`, prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by
the CLI before this module is imported) keeps each worker's values in a shared folder, and
any worker's /metrics answers with the sum. Gauges use the live modes: a dead worker's file
is removed by the arbiter (`mark_process_dead`, composer.workers), so a worker killed with -9
cannot keep declaring a version the others have rolled back. Counters and histograms keep a
dead worker's counts, so sums never go backwards.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Metric,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .errors import Reason

__all__ = ["CACHE_RESULTS", "CONTENT_TYPE_LATEST", "Declared", "Metrics", "Tally"]

# Fragment and page latencies sit between a few ms and the timeout budget (seconds).
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
# Web Vitals: Google's thresholds (INP 0.2 / 0.5 s, FCP 1.8 / 3 s, LCP 2.5 / 4 s, TTFB 0.8 / 1.8 s) are edges.
_VITAL_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.8, 2.5, 3.0, 4.0, 6.0, 10.0, 20.0)
_CLS_BUCKETS = (0.01, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0)  # good ≤ 0.1, poor > 0.25
# The `result` label of composer_fragment_cache_total: what composer.cache.FragmentCache.get answers.
CACHE_RESULTS = ("hit", "miss", "stale", "stale_if_error", "coalesced")
_REASONS = tuple(reason.value for reason in Reason)


@dataclass(frozen=True, slots=True)
class Declared:
    """One fragment tag on one route, as the config has it: the label values its fetches carry."""

    fragment: str  # the tag's id
    route: str
    owner: str = ""  # the manifest's; "" for a plain `src`
    versions: Mapping[str, str] = field(default_factory=dict)  # each version served → its origin


class Recent:
    """Failures and fallbacks per fragment over the last few minutes, for GET /manifest.

    Prometheus has the full history; this answers "is it failing right now?" at a glance,
    without a query. Counts are kept per minute and only the last `minutes` are summed.
    """

    def __init__(self, minutes: int = 5) -> None:
        self.minutes = minutes
        self._counts: dict[str, deque[list[int]]] = {}  # name → [minute, failures, fallbacks]

    def record(self, name: str, *, fallback: bool) -> None:
        minute = int(time.time() // 60)
        slots = self._counts.setdefault(name, deque(maxlen=self.minutes))
        if not slots or slots[-1][0] != minute:
            slots.append([minute, 0, 0])
        slots[-1][1] += 1
        slots[-1][2] += fallback

    def get(self, name: str) -> tuple[int, int]:
        """(failures, fallbacks) of `name` in the last `minutes` minutes."""
        since = int(time.time() // 60) - self.minutes
        slots = [s for s in self._counts.get(name, ()) if s[0] > since]
        return sum(s[1] for s in slots), sum(s[2] for s in slots)


class Tally:
    """One labelled counter or histogram that counts every page and fragment: kept here as
    plain numbers, handed to its prometheus_client child when the registry is collected.

    prometheus_client takes a lock and makes six Python calls per observation (a sixth of a
    fragment's instructions); this is a few C operations. Totals only grow, written by the
    loop's thread alone; `flush` passes on what grew since it last did, and alone writes what
    it passed. So a collect in another thread (/metrics renders off the loop) can neither lose
    nor double a count, compiled or not. With several workers (`direct`) each count goes
    straight to the child: its value lives in the shared files any worker's /metrics sums.
    """

    def __init__(self, child: Any, direct: bool) -> None:
        self.child = child
        # A histogram's bucket bounds, ending with +Inf, as the child keeps them; () for a counter.
        self.bounds: tuple[float, ...] = tuple(getattr(child, "_upper_bounds", ()))
        # `flush` adds to a histogram through its own attributes (prometheus_client has no call
        # for many observations at once): should a release rename them, count straight through.
        self.direct = direct or bool(self.bounds) and not (hasattr(child, "_sum") and hasattr(child, "_buckets"))
        self.count = 0  # a counter's total
        self.sum = 0.0  # a histogram's, and its observations per bucket
        self.buckets = [0] * len(self.bounds)
        self._passed = (0, 0.0, [0] * len(self.bounds))  # the totals at the last flush

    def inc(self) -> None:
        if self.direct:
            self.child.inc()
        else:
            self.count += 1

    def observe(self, value: float) -> None:
        if self.direct:
            self.child.observe(value)
            return
        self.sum += value
        for i, bound in enumerate(self.bounds):  # as prometheus_client's observe: the first bucket it fits
            if value <= bound:
                self.buckets[i] += 1
                break

    def flush(self) -> None:
        """Pass what grew since the last call to the child (callers take turns: `Metrics.flush`)."""
        count, total, buckets = self.count, self.sum, self.buckets[:]
        passed_count, passed_total, passed_buckets = self._passed
        if count == passed_count and buckets == passed_buckets:
            return
        self._passed = (count, total, buckets)
        if count > passed_count:
            self.child.inc(count - passed_count)
        if buckets != passed_buckets:  # (tests/test_tally.py compares the result with observe's)
            self.child._sum.inc(total - passed_total)
            for value, now, before in zip(self.child._buckets, buckets, passed_buckets):
                if now > before:
                    value.inc(now - before)


class _HandOver:
    """Registered first in a `Metrics` registry: collecting the registry hands the tallies to
    their children before any family is read (registries collect in registration order)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        self.metrics.flush()
        return []


class Metrics:
    """The metric families of one composer process."""

    def __init__(self) -> None:
        # No `*_created` series: with several workers (the multiprocess collector) there are
        # none, so one process now exports what --workers does; and they were 30 % of the
        # samples for bench/routes.yaml, and of the render time (79 → 55 ms).
        disable_created_metrics()
        self.recent = Recent()
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._tallies: dict[tuple[Any, tuple[str, ...]], Tally] = {}
        self._direct = "PROMETHEUS_MULTIPROC_DIR" in os.environ
        self._flushing = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        r.register(_HandOver(self))
        self.fragment_duration = Histogram(
            "composer_fragment_request_duration_seconds",
            "Time from starting a fragment request to its complete body (or failure).",
            ("fragment", "route", "version"), buckets=_BUCKETS, registry=r)
        self.fragment_failures = Counter(
            "composer_fragment_failures_total",
            "Fragment requests that produced no usable content, by reason.",
            ("fragment", "route", "version", "reason"), registry=r)
        self.fragment_fallbacks = Counter(
            "composer_fragment_fallbacks_total",
            "Times a fragment's fallback (fallback-src or inline markup) was shown instead.",
            ("fragment", "route"), registry=r)
        self.requests = Counter(
            "composer_requests_total", "Requests answered, by route, method and status.",
            ("route", "method", "status"), registry=r)
        self.request_duration = Histogram(
            "composer_request_duration_seconds",
            "Time from receiving a request to the last byte of its response.",
            ("route",), buckets=_BUCKETS, registry=r)
        self.fragment_info = Gauge(
            "composer_fragment_info", "Declared fragments (value 1), with version and owner.",
            ("fragment", "version", "owner"), registry=r, multiprocess_mode="livemax")
        self.fragment_timeout = Gauge(
            "composer_fragment_timeout_seconds",
            "Each fragment's configured timeout on each route: the latency alert's budget is 80 % of it.",
            ("fragment", "route"), registry=r, multiprocess_mode="livemax")
        self.circuit_state = Gauge(
            "composer_fragment_circuit_state",
            "Circuit breaker of each fragment: 0 closed, 1 half-open, 2 open (its worst origin).",
            ("fragment",), registry=r, multiprocess_mode="livemax")
        self.canary_aborted = Gauge(
            "composer_canary_aborted",
            "1 when canary analysis aborted this canary version (every user gets the active), else 0.",
            ("fragment", "version"), registry=r, multiprocess_mode="livemax")
        self.fragment_cache = Counter(
            "composer_fragment_cache_total",
            "Fragment lookups by cache result: hit, miss (fetched), stale (served while refreshing), "
            "stale_if_error (served because the fetch failed), coalesced (shared another page's fetch).",
            ("fragment", "result"), registry=r)
        self.config_reloads = Counter(
            "composer_config_reloads_total", "Attempts to load a changed config, by result (ok, error).",
            ("result",), registry=r)
        for result in ("ok", "error"):
            self.config_reloads.labels(result)  # present at 0, so alerts on increase() work from the start
        self._client_families(r)

    def _client_families(self, r: CollectorRegistry) -> None:
        """Client signals (SPEC §7): label values from the route table only, never from a beacon."""
        self.client_errors = Counter(
            "composer_client_errors_total",
            "Errors in the browser by fragment and version: error (uncaught exception), rejection "
            "(unhandled promise rejection), asset (a stylesheet, script or image that did not load).",
            ("route", "fragment", "version", "kind"), registry=r)
        self.client_vital = Histogram(
            "composer_client_vital_seconds",
            "Web Vitals from the browser (LCP, INP, FCP, TTFB); LCP and INP name the fragment holding "
            "their element (page: none).", ("route", "name", "fragment"), buckets=_VITAL_BUCKETS, registry=r)
        self.client_cls = Histogram(
            "composer_client_cls", "Cumulative Layout Shift from the browser, by the fragment of its largest shift.",
            ("route", "fragment"), buckets=_CLS_BUCKETS, registry=r)
        self.client_dropped = Counter(
            "composer_client_signals_dropped_total",
            "Beacons refused (too_large, invalid, rate) and beacon entries dropped (unknown).",
            ("reason",), registry=r)
        for reason in ("too_large", "invalid", "rate", "unknown"):
            self.client_dropped.labels(reason)
        self._declared: dict[Any, set[tuple[str, ...]]] = {}  # family → label sets `declare` put there
        self._origins: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {}  # (fragment, origin) → owner, versions

    def declare(self, uses: Iterable[Declared], client: Iterable[tuple[str, ...]] = ()) -> None:
        """Put every label set of the fragment families that `uses` make possible at 0, and
        take out those a previous declaration made that are no longer possible.

        Per tag and route: its fallbacks, and per version served, its duration and a failure
        counter per reason; per fragment id, a counter per cache result; and the `client`
        error label sets (SPEC §7). Versions are those
        served (active and canary): a version fetched only through the QA override header
        gets its series with its first fetch. Removing (one process only) keeps a long-lived
        process from accumulating every version it ever served; with several workers a
        series cannot leave a worker's file, and a dropped version's counters stay as they are.
        """
        wanted: dict[Any, set[tuple[str, ...]]] = {
            self.fragment_failures: set(), self.fragment_duration: set(),
            self.fragment_fallbacks: set(), self.fragment_cache: set(), self.client_errors: set(client)}
        origins: dict[tuple[str, str], tuple[str, list[str]]] = {}
        for use in uses:
            wanted[self.fragment_fallbacks].add((use.fragment, use.route))
            wanted[self.fragment_cache].update((use.fragment, result) for result in CACHE_RESULTS)
            for version, origin in use.versions.items():
                wanted[self.fragment_duration].add((use.fragment, use.route, version))
                wanted[self.fragment_failures].update((use.fragment, use.route, version, r) for r in _REASONS)
                served = origins.setdefault((use.fragment, origin), (use.owner, []))[1]
                if version not in served:
                    served.append(version)
        removable = "PROMETHEUS_MULTIPROC_DIR" not in os.environ
        for family, label_sets in wanted.items():
            gone = self._declared.get(family, set()) - label_sets if removable else set()
            for labels in gone:
                family.remove(*labels)
                self._children.pop((family, labels), None)  # else `child` would count into the removed series
                self._tallies.pop((family, labels), None)
            for labels in label_sets:
                family.labels(*labels)
        self._declared = wanted
        # An origin no longer configured keeps what it last served: its circuit may still change.
        self._origins.update({key: (owner, tuple(versions)) for key, (owner, versions) in origins.items()})

    def served_at(self, fragment: str, origin: str) -> tuple[str, str]:
        """(owner, version) of what `fragment` is served from `origin`, as last declared: the
        label values of its metrics, for a log line about that origin. Versions sharing the
        origin are joined by ","; ("", "") for what was never declared (a nested fragment)."""
        owner, versions = self._origins.get((fragment, origin), ("", ()))
        return owner, ",".join(versions)

    def child(self, family: Any, *values: str) -> Any:
        """`family.labels(*values)`, remembered: prometheus_client re-validates and re-converts
        the values on every `labels()` call, several µs each, per fragment per page."""
        key = (family, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = family.labels(*values)
        return found

    def tally(self, family: Any, *values: str) -> Tally:
        """A `Tally` of `family.labels(*values)`, for the families every page or fragment
        counts: read them through the registry (`families`, `render`), which hands the
        counts over first. `child` is for the rarer events read back family by family."""
        key = (family, values)
        found = self._tallies.get(key)
        if found is None:
            found = self._tallies[key] = Tally(self.child(family, *values), self._direct)
        return found

    def flush(self) -> None:
        """Hand every tally's counts to its child (`_HandOver` calls this), one caller at a time."""
        with self._flushing:
            for tally in list(self._tallies.values()):
                tally.flush()

    def families(self) -> Iterable[Metric]:
        """The metric families /metrics exports; with several workers, summed over them."""
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return registry.collect()
        return self.registry.collect()

    def render(self) -> bytes:
        """The exposition text; with several workers, the sum over all of them."""
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
