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

import math
import os
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Metric,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

from .errors import Reason

__all__ = ["CACHE_RESULTS", "CONTENT_TYPE_LATEST", "Declared", "Family", "Metrics", "Series"]

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


class Series:
    """One label set of a `Family`: a counter's total, or a histogram's sum and observations
    per bucket. Written by the loop's thread alone; a collect in another thread (/metrics
    renders off the loop) reads it as it goes (compiled, each count is one step: no thread
    runs between its parts)."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.total = 0.0  # a counter's total, a histogram's sum: a C double, compiled (no float object per count)
        self.bounds = bounds
        self.buckets = [0] * len(bounds)

    def inc(self, amount: float = 1.0) -> None:
        self.total += amount

    def observe(self, value: float) -> None:
        self.total += value
        for i, bound in enumerate(self.bounds):  # as prometheus_client's observe: the first bucket it fits
            if value <= bound:
                self.buckets[i] += 1
                break


class _SharedSeries(Series):
    """With several workers: each count goes straight to prometheus_client's child, whose
    value lives in the shared files any worker's /metrics sums."""

    def __init__(self, child: Any) -> None:
        super().__init__(())
        self.child = child

    def inc(self, amount: float = 1.0) -> None:
        self.child.inc(amount)

    def observe(self, value: float) -> None:
        self.child.observe(value)


class Family:
    """A labelled counter or histogram kept as plain numbers, exported as any collector is.

    For the families counted on every page or fragment, and declared at 0 for every fragment
    on every route: prometheus_client's children take a lock and six Python calls per
    observation (a sixth of a fragment's instructions), and hold a lock and an object per
    value, about 18 KB per fragment and route (40 routes of 25 fragments: 18 MB before the
    first page). A series here is its labels' tuple and a `Series`. With several workers
    (`shared`) the values must live in prometheus_client's shared files: the family is then
    prometheus_client's own, behind the same methods.
    """

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...], registry: CollectorRegistry,
                 buckets: tuple[float, ...] | None = None, *, shared: bool = False) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.bounds: tuple[float, ...] = (*buckets, math.inf) if buckets is not None else ()
        self.histogram = buckets is not None
        self._series: dict[tuple[str, ...], Series] = {}
        self._shared: Any = None
        if not shared:
            registry.register(self)
        elif buckets is None:
            self._shared = Counter(name, documentation, labelnames, registry=registry)
        else:
            self._shared = Histogram(name, documentation, labelnames, buckets=buckets, registry=registry)

    def labels(self, *values: str) -> Series:
        """The series of `values`, made at 0 if new."""
        return self.declare(values)

    def declare(self, values: tuple[str, ...]) -> Series:
        """The series of `values`, made at 0 if new (`values` is kept: pass a tuple held anyway)."""
        series = self._series.get(values)
        if series is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: {len(self.labelnames)} label values expected, got {len(values)}")
            series = self._series[values] = Series(self.bounds) if self._shared is None \
                else _SharedSeries(self._shared.labels(*values))
        return series

    def remove(self, *values: str) -> None:
        self._series.pop(values, None)
        if self._shared is not None:
            self._shared.remove(*values)

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> list[Metric]:
        if self._shared is not None:
            return list(self._shared.collect())
        family = self._family()
        for labels, series in list(self._series.items()):  # (a list, not a view: pages add series meanwhile)
            if isinstance(family, HistogramMetricFamily):
                buckets, count = [], 0.0
                for bound, observed in zip(self.bounds, series.buckets[:]):
                    count += observed
                    buckets.append((floatToGoString(bound), count))
                family.add_metric(list(labels), buckets, series.total)
            else:
                family.add_metric(list(labels), series.total)
        return [family]

    def _family(self) -> CounterMetricFamily | HistogramMetricFamily:
        if self.histogram:
            return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)


# What every Python exporter has: RSS, CPU and fds (process_*), the interpreter (python_info),
# and what the cyclic collector runs and finds (python_gc_*: bench/soak.py holds composer to
# leaving no reference cycles, as server.tune_gc trusts).
_PROCESS = (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR)


class Metrics:
    """The metric families of one composer process."""

    def __init__(self) -> None:
        # No `*_created` series: with several workers (the multiprocess collector) there are
        # none, so one process now exports what --workers does; and they were 30 % of the
        # samples for bench/routes.yaml, and of the render time (79 → 55 ms).
        disable_created_metrics()
        self.recent = Recent()
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}  # of prometheus_client's families
        self._shared = "PROMETHEUS_MULTIPROC_DIR" in os.environ  # --workers: values in shared files
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        if not self._shared:  # process-wide: with several workers, not part of the sum
            for collector in _PROCESS:
                r.register(collector)
        self.fragment_duration = self._family(
            "composer_fragment_request_duration_seconds",
            "Time from starting a fragment request to its complete body (or failure).",
            ("fragment", "route", "version"), _BUCKETS)
        self.fragment_failures = self._family(
            "composer_fragment_failures_total",
            "Fragment requests that produced no usable content, by reason.",
            ("fragment", "route", "version", "reason"))
        self.fragment_fallbacks = self._family(
            "composer_fragment_fallbacks_total",
            "Times a fragment's fallback (fallback-src or inline markup) was shown instead.",
            ("fragment", "route"))
        self.requests = self._family(
            "composer_requests_total", "Requests answered, by route, method and status.",
            ("route", "method", "status"))
        self.request_duration = self._family(
            "composer_request_duration_seconds",
            "Time from receiving a request to the last byte of its response.",
            ("route",), _BUCKETS)
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
        self.fragment_cache = self._family(
            "composer_fragment_cache_total",
            "Fragment lookups by cache result: hit, miss (fetched), stale (served while refreshing), "
            "stale_if_error (served because the fetch failed), coalesced (shared another page's fetch).",
            ("fragment", "result"))
        self.config_reloads = Counter(
            "composer_config_reloads_total", "Attempts to load a changed config, by result (ok, error).",
            ("result",), registry=r)
        for result in ("ok", "error"):
            self.config_reloads.labels(result)  # present at 0, so alerts on increase() work from the start
        self._client_families(r)

    def _family(self, name: str, documentation: str, labelnames: tuple[str, ...],
                buckets: tuple[float, ...] | None = None) -> Family:
        return Family(name, documentation, labelnames, self.registry, buckets, shared=self._shared)

    def _client_families(self, r: CollectorRegistry) -> None:
        """Client signals (SPEC §7): label values from the route table only, never from a beacon."""
        self.client_errors = self._family(
            "composer_client_errors_total",
            "Errors in the browser by fragment and version: error (uncaught exception), rejection "
            "(unhandled promise rejection), asset (a stylesheet, script or image that did not load).",
            ("route", "fragment", "version", "kind"))
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
        self._declared: dict[Family, set[tuple[str, ...]]] = {}  # family → label sets `declare` put there
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
        wanted: dict[Family, set[tuple[str, ...]]] = {
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
        removable = not self._shared
        for family, label_sets in wanted.items():
            gone = self._declared.get(family, set()) - label_sets if removable else set()
            for labels in gone:
                family.remove(*labels)
            for labels in label_sets:
                family.declare(labels)  # the tuple `_declared` holds anyway: one per series, not two
        self._declared = wanted
        # An origin no longer configured keeps what it last served: its circuit may still change.
        self._origins.update({key: (owner, tuple(versions)) for key, (owner, versions) in origins.items()})

    def served_at(self, fragment: str, origin: str) -> tuple[str, str]:
        """(owner, version) of what `fragment` is served from `origin`, as last declared: the
        label values of its metrics, for a log line about that origin. Versions sharing the
        origin are joined by ","; ("", "") for what was never declared (a nested fragment)."""
        owner, versions = self._origins.get((fragment, origin), ("", ()))
        return owner, ",".join(versions)

    def series(self, family: Family, *values: str) -> Series:
        """`family.labels(*values)`: the counts of every page and fragment."""
        return family.declare(values)

    def child(self, family: Any, *values: str) -> Any:
        """`family.labels(*values)`, remembered: prometheus_client re-validates and re-converts
        the values on every `labels()` call, several µs each, per fragment per page."""
        key = (family, values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = family.labels(*values)
        return found

    def families(self) -> Iterable[Metric]:
        """The metric families /metrics exports; with several workers, summed over them."""
        if self._shared:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return registry.collect()
        return self.registry.collect()

    def render(self) -> bytes:
        """The exposition text; with several workers, the sum over all of them."""
        if self._shared:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
