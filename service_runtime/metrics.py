"""Prometheus metrics of every process, defined once.

Web processes run under gunicorn with several workers, so they use prometheus_client's
multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by `saga web`); relays and consumers are
single processes with their own small HTTP endpoint.
"""

from __future__ import annotations

import logging
import os
from bisect import bisect_left
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client import multiprocess as _multiprocess

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

HTTP_REQUESTS = Counter(
    "saga_http_requests_total",
    "HTTP requests by route and status",
    ["service", "method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "saga_http_request_seconds",
    "HTTP request latency",
    ["service", "method", "route"],
    buckets=_LATENCY_BUCKETS,
)
HTTP_CONFLICTS_RETRIED = Counter(
    "saga_http_conflicts_retried_total",
    "Requests run again after a deadlock or serialization failure",
    ["service"],
)
OUTBOX_WRITTEN = Counter(
    "saga_outbox_events_written_total",
    "Events committed to the outbox",
    ["service", "event_type"],
)
RELAY_PUBLISHED = Counter("saga_relay_published_total", "Outbox rows published", ["service"])
RELAY_BATCH_SIZE = Histogram(
    "saga_relay_batch_size",
    "Rows per published batch",
    ["service"],
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
)
RELAY_LATENCY = Histogram(
    "saga_relay_commit_to_publish_seconds",
    "From outbox commit to XADD",
    ["service"],
    buckets=_LATENCY_BUCKETS,
)
RELAY_LOSSES = Counter(
    "saga_relay_redis_losses_total",
    "Partition streams found behind their recorded published position (Redis lost data)",
    ["service"],
)
RELAY_REPUBLISHED = Counter(
    "saga_relay_republished_total",
    "Outbox rows un-marked by loss detection, to be published again",
    ["service"],
)
RELAY_NOT_DURABLE = Counter(
    "saga_relay_not_durable_total",
    "Batches not marked published: WAIT/WAITAOF did not reach RELAY_DURABILITY",
    ["service"],
)
RELAY_BACKLOG = Gauge("saga_relay_unpublished_rows", "Unpublished outbox rows", ["service"])
CONSUMER_EVENTS = Counter(
    "saga_consumer_events_total",
    "Entries handled by outcome (processed, duplicate, ignored, failed, dead_lettered, gone)",
    ["group", "event_type", "outcome"],
)
CONSUMER_LATENCY = Histogram(
    "saga_consumer_handler_seconds",
    "Time to handle one entry",
    ["group", "event_type"],
    buckets=_LATENCY_BUCKETS,
)
CONSUMER_CONFLICTS = Counter(
    "saga_consumer_conflicts_total",
    "Transactions aborted by a deadlock or serialization failure and retried at once",
    ["group"],
)
CONSUMER_OUTAGES = Counter(
    "saga_consumer_outages_total",
    "Times a consumer backed off because PostgreSQL or Redis was unavailable",
    ["group"],
)
PARTITION_CHANGES = Counter(
    "saga_partition_ownership_changes_total",
    "Partition leases acquired, released (rebalance, shutdown) or lost (expired, fenced)",
    ["group", "change"],
)
PARTITIONS_OWNED = Gauge(
    "saga_partitions_owned", "Partitions this consumer owns", ["group", "consumer"]
)
RETENTION_PRUNED = Counter(
    "saga_retention_removed_total",
    "Rows pruned (outbox, inbox, delivery_failures) and stream entries trimmed by retention",
    ["what"],
)
RETENTION_TRIM_HELD = Counter(
    "saga_retention_trim_held_back_total",
    "Trims of a stream held back by a group with old pending or undelivered entries there",
    ["group"],
)
JOBS_RUN = Counter("saga_jobs_total", "rq jobs finished, by job", ["job"])


def exposition() -> tuple[bytes, str]:
    """The /metrics body of a web worker: all gunicorn workers' values when multiprocess."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def serve(port: int | None) -> None:
    """Expose a worker process's metrics; a busy port is logged, not fatal."""
    if not port:
        return
    try:
        start_http_server(port, addr="127.0.0.1")
        log.info("metrics on http://127.0.0.1:%s/metrics", port)
    except OSError as err:
        log.warning("metrics endpoint not started on port %s: %s", port, err)


def serve_multiprocess(port: int | None, directory: str) -> None:
    """Expose what other processes (the rq worker running the jobs) write to `directory`."""
    if not port:
        return
    registry = CollectorRegistry()
    _multiprocess.MultiProcessCollector(registry, path=directory)
    try:
        start_http_server(port, addr="127.0.0.1", registry=registry)
    except OSError as err:
        log.warning("metrics endpoint not started on port %s: %s", port, err)


def mark_worker_dead(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _multiprocess.mark_process_dead(pid)


def observe_many(histogram: Any, values: list[float]) -> None:
    """`histogram.observe(v)` for every v, with one increment per bucket and one of the sum
    instead of two per value (prometheus_client's Histogram child keeps its buckets' upper
    bounds and values in these attributes; any other object gets one observe per value)."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for value in values:
            histogram.observe(value)
        return
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect_left(bounds, value)] += 1  # the first bound >= value, as observe()
    for bucket, count in zip(buckets, counts, strict=True):
        if count:
            bucket.inc(count)
    total.inc(sum(values))
