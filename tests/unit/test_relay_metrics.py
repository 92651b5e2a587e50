"""The relay observes a batch's latencies in one go: the same histogram as one observe each."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

from service_runtime.metrics import observe_many

BUCKETS = (0.001, 0.005, 0.01, 0.1, 1.0)
VALUES = [0.0, 0.0005, 0.001, 0.0010001, 0.004, 0.005, 0.05, 0.1, 0.5, 1.0, 2.5, 100.0, -1.0]


def samples(histogram: Histogram, registry: CollectorRegistry) -> dict[tuple, float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if not sample.name.endswith("_created")
    }


def histogram() -> tuple[Histogram, CollectorRegistry]:
    registry = CollectorRegistry()
    return Histogram("h", "h", ["service"], buckets=BUCKETS, registry=registry), registry


def test_observe_many_equals_one_observe_per_value():
    one_by_one, one_registry = histogram()
    batched, batched_registry = histogram()
    for value in VALUES:
        one_by_one.labels("orders").observe(value)
    observe_many(batched.labels("orders"), VALUES[:5])
    observe_many(batched.labels("orders"), VALUES[5:])
    observe_many(batched.labels("orders"), [])

    assert samples(batched, batched_registry) == samples(one_by_one, one_registry)


def test_observe_many_falls_back_to_observe_on_anything_else():
    seen: list[float] = []

    class Recorder:
        def observe(self, value: float) -> None:
            seen.append(value)

    observe_many(Recorder(), [1.0, 2.0])
    assert seen == [1.0, 2.0]
