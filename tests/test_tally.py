"""`Family`: the families counted on every page and fragment, and declared at 0 for every
fragment on every route, kept as plain numbers. They must read exactly as prometheus_client's
own counters and histograms would: in the exposition, from any thread, and with several
workers (where prometheus_client's own classes keep the counts in the shared files). And a
declared series must cost a small part of what a prometheus_client child does.
"""

from __future__ import annotations

import threading
import tracemalloc

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from composer.metrics import _BUCKETS, Declared, Family, Metrics

DURATIONS = st.lists(st.floats(min_value=-1.0, max_value=100.0) | st.sampled_from(_BUCKETS), max_size=40)


def exposition(family: object) -> list[str]:
    """The exposition lines of the one family in a registry of its own, sorted; without the
    `_created` series composer switches off (`Metrics`), which a test run alone still has."""
    registry = CollectorRegistry()
    registry.register(family)  # type: ignore[arg-type]
    return sorted(line for line in generate_latest(registry).decode().splitlines()
                  if not line.startswith("#") and "_created" not in line)


@given(DURATIONS, DURATIONS)
def test_a_histogram_reads_as_prometheus_clients(first: list[float], second: list[float]) -> None:
    ours = Family("composer_request_duration_seconds", "d", ("route",), CollectorRegistry(), _BUCKETS)
    theirs = Histogram("composer_request_duration_seconds", "d", ("route",), buckets=_BUCKETS,
                       registry=CollectorRegistry())
    for batch in (first, second):  # read between the two: reading changes nothing
        for value in batch:
            ours.labels("r").observe(value)
            theirs.labels("r").observe(value)
        mine, expected = exposition(ours), exposition(theirs)
        assert [line.rsplit(" ", 1)[0] for line in mine] == [line.rsplit(" ", 1)[0] for line in expected]
        for line, reference in zip(mine, expected):
            value, wanted = float(line.rsplit(" ", 1)[1]), float(reference.rsplit(" ", 1)[1])
            assert abs(value - wanted) <= 1e-9 * max(1.0, abs(wanted)), line


def test_a_counter_reads_as_prometheus_clients() -> None:
    labels = ("fragment", "route", "version", "reason")
    ours = Family("composer_fragment_failures_total", "f", labels, CollectorRegistry())
    theirs = Counter("composer_fragment_failures_total", "f", labels, registry=CollectorRegistry())
    for family in (ours, theirs):
        family.labels("header", "home", "", "timeout")  # declared: at 0
        family.labels("footer", "home", "1.2.0", "status").inc()
        family.labels("footer", "home", "1.2.0", "status").inc(4)
    assert exposition(ours) == exposition(theirs)
    metrics = Metrics()
    assert [f.name for f in metrics.fragment_failures.collect()] == ["composer_fragment_failures"]


def test_a_series_is_removed_and_wrong_label_counts_are_refused() -> None:
    family = Family("composer_fragment_fallbacks_total", "f", ("fragment", "route"), CollectorRegistry())
    family.labels("a", "home").inc()
    family.remove("a", "home")
    family.remove("never", "declared")
    assert exposition(family) == []
    try:
        family.labels("a")
    except ValueError as exc:
        assert "2 label values expected, got 1" in str(exc)
    else:  # pragma: no cover - the assertion above is the test
        raise AssertionError("one label value for two names was accepted")


def test_collects_in_other_threads_lose_nothing() -> None:
    """/metrics renders off the loop's thread while pages count and new series appear: no
    render fails, and every count is there."""
    metrics = Metrics()
    counter = metrics.series(metrics.requests, "home", "GET", "200")
    histogram = metrics.series(metrics.request_duration, "home")
    done = threading.Event()
    failed: list[BaseException] = []

    def scrape() -> None:
        while not done.is_set():
            try:
                metrics.render()
            except BaseException as exc:  # noqa: BLE001 - reported below
                failed.append(exc)
                return

    scrapers = [threading.Thread(target=scrape) for _ in range(2)]
    for thread in scrapers:
        thread.start()
    try:
        for i in range(20_000):
            counter.inc()
            histogram.observe((i % 7) / 1000)
            if i % 10 == 0:  # a series more while the scrapers read the family
                metrics.series(metrics.fragment_cache, f"f{i}", "miss").inc()
    finally:
        done.set()
        for thread in scrapers:
            thread.join()
    assert not failed
    text = metrics.render().decode()
    assert 'composer_requests_total{method="GET",route="home",status="200"} 20000.0' in text
    assert 'composer_request_duration_seconds_count{route="home"} 20000.0' in text
    assert 'composer_request_duration_seconds_bucket{le="0.001",route="home"} 5715.0' in text  # i % 7 in (0, 1)
    assert text.count("composer_fragment_cache_total{") == 2000


def test_with_several_workers_each_count_goes_straight_to_the_shared_files(tmp_path, monkeypatch) -> None:
    from prometheus_client import values

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.get_value_class())
    metrics = Metrics()
    metrics.series(metrics.requests, "home", "GET", "200").inc()
    metrics.series(metrics.request_duration, "home").observe(0.003)
    other = Metrics()  # another worker's view: the sum over the folder
    text = other.render().decode()
    assert 'composer_requests_total{method="GET",route="home",status="200"} 1.0' in text
    assert 'composer_request_duration_seconds_bucket{le="0.005",route="home"} 1.0' in text


def test_a_declared_fragment_costs_a_fraction_of_a_prometheus_client_child() -> None:
    """Every fragment on every route is declared at 0 (SPEC §9): its failures per reason, its
    duration, its fallbacks. 40 routes of 25 fragments took 18 MB with prometheus_client's
    children; the same declarations must take under a third of that."""
    uses = [Declared(f"f{i}", f"r{j}", "team", {"": "http://127.0.0.1:1"}) for i in range(25) for j in range(40)]

    def declared_bytes(metrics: Metrics) -> int:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            metrics.declare(uses)
            return tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()

    ours = declared_bytes(Metrics())
    theirs = Metrics()  # the same families, as prometheus_client's (what --workers uses)
    registry = CollectorRegistry()
    for name in ("fragment_failures", "fragment_duration", "fragment_fallbacks", "fragment_cache", "client_errors"):
        family = getattr(theirs, name)
        setattr(theirs, name, Family(family.name, "", family.labelnames, registry,
                                     _BUCKETS if family.histogram else None, shared=True))
    assert ours * 3 < declared_bytes(theirs), (ours, "bytes for 1,000 declared fragment uses")
