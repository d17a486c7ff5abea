"""`Tally`: the per-page and per-fragment counts, kept as plain numbers and handed to
prometheus_client when the registry is collected, must read exactly as prometheus_client's
own `inc` and `observe` would have made them: at every collect, from any thread, and
with several workers (where each count goes straight to the shared files).
"""

from __future__ import annotations

import threading

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from composer.metrics import _BUCKETS, Metrics, Tally

DURATIONS = st.lists(st.floats(min_value=-1.0, max_value=100.0) | st.sampled_from(_BUCKETS), max_size=40)


def series(registry: CollectorRegistry, name: str, route: str) -> dict[str, float]:
    """`name`'s samples for `route`, by sample name and bucket bound."""
    return {f"{s.name}{s.labels.get('le', '')}": s.value for family in registry.collect() for s in family.samples
            if family.name == name and s.labels.get("route") == route}


@given(DURATIONS, DURATIONS)
def test_a_tallied_histogram_reads_as_prometheus_clients_observe(first: list[float], second: list[float]) -> None:
    metrics = Metrics()
    reference = Histogram("reference", "", ("route",), buckets=_BUCKETS, registry=CollectorRegistry()).labels("r")
    tally = metrics.tally(metrics.request_duration, "r")
    name = "composer_request_duration_seconds"
    for batch in (first, second):  # a collect between the two: each hands over only what is new
        for value in batch:
            tally.observe(value)
            reference.observe(value)
        seen = series(metrics.registry, name, "r")
        expected = {f"{name}{s.name}{s.labels.get('le', '')}": s.value for s in reference._samples()}
        assert seen.keys() == expected.keys()
        for key, value in expected.items():
            assert abs(seen[key] - value) <= 1e-9 * max(1.0, abs(value)), key


def test_a_tallied_counter_is_handed_over_once_per_increment() -> None:
    metrics = Metrics()
    tally = metrics.tally(metrics.requests, "home", "GET", "200")

    def value() -> float | None:
        return metrics.registry.get_sample_value(
            "composer_requests_total", {"route": "home", "method": "GET", "status": "200"})

    assert value() == 0
    for n in (1, 5, 5, 12):
        while tally.count < n:
            tally.inc()
        assert value() == n  # collected again without new counts: nothing added twice
    assert metrics.tally(metrics.requests, "home", "GET", "200") is tally


def test_collects_in_other_threads_lose_and_double_nothing() -> None:
    """/metrics renders off the loop's thread while pages count: every count arrives once."""
    metrics = Metrics()
    counter = metrics.tally(metrics.requests, "home", "GET", "200")
    histogram = metrics.tally(metrics.request_duration, "home")
    done = threading.Event()

    def scrape() -> None:
        while not done.is_set():
            metrics.render()

    scrapers = [threading.Thread(target=scrape) for _ in range(2)]
    for thread in scrapers:
        thread.start()
    try:
        for i in range(20_000):
            counter.inc()
            histogram.observe((i % 7) / 1000)
    finally:
        done.set()
        for thread in scrapers:
            thread.join()
    text = metrics.render().decode()
    assert 'composer_requests_total{method="GET",route="home",status="200"} 20000.0' in text
    assert 'composer_request_duration_seconds_count{route="home"} 20000.0' in text
    assert 'composer_request_duration_seconds_bucket{le="0.001",route="home"} 5715.0' in text  # i % 7 in (0, 1)


def test_with_several_workers_each_count_goes_straight_to_the_shared_files(tmp_path, monkeypatch) -> None:
    from prometheus_client import values

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    monkeypatch.setattr(values, "ValueClass", values.get_value_class())
    metrics = Metrics()
    metrics.tally(metrics.requests, "home", "GET", "200").inc()
    metrics.tally(metrics.request_duration, "home").observe(0.003)
    other = Metrics()  # another worker's view: the sum over the folder, with no hand-over of its own
    text = other.render().decode()
    assert 'composer_requests_total{method="GET",route="home",status="200"} 1.0' in text
    assert 'composer_request_duration_seconds_bucket{le="0.005",route="home"} 1.0' in text


def test_a_histogram_without_the_attributes_flush_uses_is_counted_straight_through() -> None:
    """Should a prometheus_client release rename a histogram's `_sum` or `_buckets`, counts
    still arrive, through its public `observe`, instead of failing at the next scrape."""
    metrics = Metrics()
    child = metrics.request_duration.labels("home")

    class Renamed:
        _upper_bounds = child._upper_bounds

        def observe(self, value: float) -> None:
            child.observe(value)

    tally = Tally(Renamed(), direct=False)
    assert tally.direct
    tally.observe(0.003)
    assert metrics.registry.get_sample_value("composer_request_duration_seconds_count", {"route": "home"}) == 1
