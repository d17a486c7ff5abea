"""The admin status page (`GET /` on the admin port, SPEC §8): readable at a glance.

Server-rendered HTML with its style inline, no script (it refreshes itself with a meta tag):
a row per fragment (owner, active, canary and its state, rollback version, failure ratio and
p99 over the last 5 minutes, client errors, circuit state) and a row per route (request rate
and status mix). Its figures are the ones /metrics exports: `Status` samples the same
families every 10 s (with `--workers`, the sum over the workers, as /metrics) and shows the
difference over the last 5 minutes; the manifest's side comes from `/manifest`'s view.
"""

from __future__ import annotations

import asyncio
import html
import time
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Metric

from .metrics import Metrics
from .routing import RouteTable

__all__ = ["Snapshot", "Status"]

WINDOW_S = 300.0
_SEVERITY = ("closed", "half_open", "open")
_INTERVAL_S = 10.0
_REFRESH_S = 10


def _counts() -> defaultdict[str, float]:
    return defaultdict(float)


@dataclass
class Snapshot:
    """Cumulative counts at one moment, summed over the labels the page does not show."""

    at: float
    attempts: defaultdict[str, float] = field(default_factory=_counts)  # fragment → fetches sent + circuit-open
    failures: defaultdict[str, float] = field(default_factory=_counts)
    client_errors: defaultdict[str, float] = field(default_factory=_counts)
    buckets: defaultdict[str, defaultdict[str, float]] = field(default_factory=lambda: defaultdict(_counts))
    requests: defaultdict[str, defaultdict[str, float]] = field(default_factory=lambda: defaultdict(_counts))

    @classmethod
    def of(cls, families: Iterable[Metric], at: float) -> Snapshot:
        snap = cls(at)
        for family in families:
            for sample in family.samples:
                snap._add(sample.name, sample.labels, sample.value)
        return snap

    def _add(self, name: str, labels: Mapping[str, str], value: float) -> None:
        fragment = labels.get("fragment", "")
        if name == "composer_fragment_request_duration_seconds_count":
            self.attempts[fragment] += value
        elif name == "composer_fragment_request_duration_seconds_bucket":
            self.buckets[fragment][labels["le"]] += value
        elif name == "composer_fragment_failures_total":
            self.failures[fragment] += value
            if labels.get("reason") == "circuit_open":  # never sent, but a failed attempt all the same
                self.attempts[fragment] += value
        elif name == "composer_client_errors_total":
            self.client_errors[fragment] += value
        elif name == "composer_requests_total":
            self.requests[labels.get("route", "")][labels.get("status", "")] += value


class Status:
    """Samples the metrics every 10 s for the page's 5-minute figures, and renders the page."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._snapshots: deque[Snapshot] = deque(maxlen=int(WINDOW_S / _INTERVAL_S) + 2)

    async def sample(self) -> Snapshot:
        """Collect in a worker thread: a collection of every series takes tens of ms (21 ms for
        bench/routes.yaml's 4,500 samples), which on the loop would hold every page that long."""
        snap = await asyncio.to_thread(lambda: Snapshot.of(self.metrics.families(), time.monotonic()))
        self._snapshots.append(snap)  # here, on the loop: `page` reads the deque there
        return snap

    async def run(self) -> None:
        """Sample every 10 s after the first, which `ComposerServer.start` takes before it listens."""
        while True:
            await asyncio.sleep(_INTERVAL_S)
            await self.sample()

    async def page(self, table: RouteTable, manifest: Mapping[str, Any]) -> bytes:
        now = await self.sample()
        since = next((s for s in self._snapshots if now.at - s.at <= WINDOW_S), now)
        minutes = max(now.at - since.at, 1.0) / 60
        fragments = _fragment_rows(table, manifest, now, since)
        routes = _route_rows(table, now, since, minutes)
        return _PAGE.format(refresh=_REFRESH_S, source=html.escape(str(manifest.get("source") or "routes.yaml")),
                            window=f"{max(now.at - since.at, 0) / 60:.1f}", fragments=fragments,
                            routes=routes).encode()


def _delta(now: Mapping[str, float], since: Mapping[str, float], key: str) -> float:
    return max(now.get(key, 0.0) - since.get(key, 0.0), 0.0)


def _p99(now: Mapping[str, float], since: Mapping[str, float]) -> float | None:
    """The 99th percentile from histogram bucket deltas (as Prometheus' histogram_quantile)."""
    edges = sorted(((float(le), max(now[le] - since.get(le, 0.0), 0.0)) for le in now), key=lambda e: e[0])
    total = edges[-1][1] if edges else 0.0
    if total <= 0:
        return None
    rank, lower, below = 0.99 * total, 0.0, 0.0
    for upper, count in edges:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = upper, count
    return lower


def _fragment_rows(table: RouteTable, manifest: Mapping[str, Any], now: Snapshot, since: Snapshot) -> str:
    rows = []
    views: Mapping[str, Any] = manifest.get("fragments") or {}
    seen: dict[str, tuple[str | None, str]] = {}
    for _, template in table.templates():
        for fragment in template.fragments:
            seen.setdefault(fragment.id, (fragment.name, fragment.owner))
    circuits: dict[str, str] = {}  # fragment → its worst circuit over its origins
    for circuit in manifest.get("circuits") or ():
        worst = circuits.get(circuit["fragment"], "closed")
        circuits[circuit["fragment"]] = max(worst, circuit["state"], key=_SEVERITY.index)
    for fragment_id, (name, owner) in sorted(seen.items()):
        view = views.get(name or "", {})
        attempts = _delta(now.attempts, since.attempts, fragment_id)
        failures = _delta(now.failures, since.failures, fragment_id)
        ratio = failures / attempts if attempts else 0.0
        p99 = _p99(now.buckets.get(fragment_id, {}), since.buckets.get(fragment_id, {}))
        canary = view.get("canary") or {}
        canary_text = f"{canary.get('version')} at {canary.get('percent')} %" if canary else "–"
        state = canary.get("state", "running") if canary else ""
        circuit = view.get("circuit") or circuits.get(fragment_id, "closed")
        cells = [fragment_id, owner or "–", view.get("active", "–") or "–", canary_text, state,
                 view.get("rollback") or "–", f"{ratio:.1%}", "–" if p99 is None else f"{p99 * 1000:.0f} ms",
                 f"{_delta(now.client_errors, since.client_errors, fragment_id):.0f}", circuit]
        bad = ratio > 0.05 or circuit != "closed" or state == "aborted"
        rows.append(_row(cells, bad))
    return "".join(rows) or '<tr><td colspan="10">no fragments</td></tr>'


def _route_rows(table: RouteTable, now: Snapshot, since: Snapshot, minutes: float) -> str:
    rows = []
    for route in table.routes:
        statuses: Mapping[str, float] = now.requests.get(route.name, {})
        counts = {status: _delta(statuses, since.requests.get(route.name, {}), status) for status in statuses}
        total = sum(counts.values())
        mix = ", ".join(f"{status}: {count / total:.0%}" for status, count in sorted(counts.items()) if count) \
            if total else "–"
        errors = sum(c for s, c in counts.items() if s.startswith("5"))
        kind = "template" if route.template or route.pages is not None else "backend" if route.backend else "redirect"
        rows.append(_row([route.name, kind, f"{total / minutes:.1f}/min", mix], bool(total) and errors / total > 0.01))
    return "".join(rows)


def _row(cells: list[str], bad: bool) -> str:
    tds = "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
    return f'<tr class="bad">{tds}</tr>' if bad else f"<tr>{tds}</tr>"


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{refresh}">
<title>composer status</title><link rel="icon" href="data:,">
<style>
body{{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}}
h1{{font-size:1.3em}} h2{{font-size:1.1em;margin-top:1.5em}}
table{{border-collapse:collapse;width:100%}} th,td{{padding:.3em .6em;border-bottom:1px solid #ddd;text-align:left}}
th{{background:#f4f4f4}} tr.bad td{{background:#fde8e8}} .note{{color:#666}}
</style></head><body>
<h1>composer status</h1>
<p class="note">Manifest: {source}. Figures over the last {window} minutes (at most 5), as /metrics counts them;
this page refreshes every {refresh} s.</p>
<h2>Fragments</h2>
<table><tr><th>fragment</th><th>owner</th><th>active</th><th>canary</th><th>canary state</th><th>rollback</th>
<th>failure ratio</th><th>p99</th><th>client errors</th><th>circuit</th></tr>
{fragments}</table>
<h2>Routes</h2>
<table><tr><th>route</th><th>kind</th><th>requests</th><th>status mix</th></tr>
{routes}</table>
</body></html>
"""
