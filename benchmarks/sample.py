"""Valid events for the benchmarks (OrderPlaced v1), as outbox rows and as stream entries,
plus the few helpers every measurement shares."""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime

import psycopg
import redis

from contracts import Envelope, encode_entry
from service_runtime.db import connect
from service_runtime.redis_client import connect as redis_connect

OUTBOX_COLUMNS = (
    "event_id, aggregate_type, aggregate_id, event_type, event_version, payload, correlation_id"
)


def order_placed() -> dict:
    return {
        "order_id": str(uuid.uuid4()),
        "customer_id": "bench-customer",
        "items": [{"sku": "BENCH-1", "quantity": 1}, {"sku": "BENCH-2", "quantity": 2}],
    }


def outbox_row() -> tuple[str, str, str, str, int, str, str]:
    """One row in OUTBOX_COLUMNS order, payload as JSON text (for COPY and INSERT alike)."""
    payload = order_placed()
    return (
        str(uuid.uuid4()),
        "order",
        payload["order_id"],
        "OrderPlaced",
        1,
        json.dumps(payload),
        payload["order_id"],
    )


def stream_fields() -> dict[str, str]:
    """The flat fields the relay would publish for one OrderPlaced."""
    payload = order_placed()
    return encode_entry(
        Envelope(
            event_id=str(uuid.uuid4()),
            event_type="OrderPlaced",
            event_version=1,
            aggregate_type="order",
            aggregate_id=payload["order_id"],
            correlation_id=payload["order_id"],
            causation_id=None,
            occurred_at=datetime.now(UTC).isoformat(),
            producer="orders",
            payload=payload,
        )
    )


def fill_outbox(conn: psycopg.Connection, rows: int) -> None:
    """Commit `rows` unpublished outbox rows in one COPY (one statement: one NOTIFY)."""
    with conn.cursor().copy(f"COPY outbox ({OUTBOX_COLUMNS}) FROM STDIN") as copy:
        for _ in range(rows):
            copy.write_row(outbox_row())
    conn.execute("ANALYZE outbox")  # the relay's scan should see the table as it now is


def reset(db_urls: Sequence[str], redis_url: str) -> None:
    """Empty the outbox and inbox of each database and the Redis database: every measurement
    starts from nothing left over by the one before. Partition leases and consumer members go
    too, with the Redis fences they pair with: the next consumers start from epoch 1; and the
    published positions, with the streams they record (else the next relay takes the flush
    for a loss of Redis data)."""
    for url in db_urls:
        with connect(url) as conn:
            conn.execute(
                "TRUNCATE outbox, inbox, partition_leases, consumer_members, delivery_failures,"
                " published_positions RESTART IDENTITY"
            )
    with redis.Redis.from_url(redis_url) as client:
        client.flushdb()


def wake_relay(db_url: str) -> None:
    """A relay waiting for NOTIFY until its poll interval: make it look at its stop flag now."""
    with connect(db_url) as conn:
        conn.execute("SELECT pg_notify('outbox', '')")


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """Nearest-rank p50/p95/p99 and max (all 0.0 for no values)."""
    ordered = sorted(values)
    if not ordered:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0}

    def rank(p: float) -> float:
        return ordered[max(math.ceil(p / 100 * len(ordered)) - 1, 0)]

    return {"p50": rank(50), "p95": rank(95), "p99": rank(99), "max": ordered[-1]}


def chunks(count: int, size: int) -> Iterator[int]:
    """Sizes of the batches that make up `count` items."""
    for start in range(0, count, size):
        yield min(size, count - start)


def follow_streams(
    redis_url: str,
    streams: Sequence[str],
    on_entry: Callable[[dict[str, str], float], None],
    stop: threading.Event,
) -> None:
    """Read `streams` (e.g. every partition of a producer) from their start until stopped,
    with one XREAD; each entry with the time its batch arrived (time.perf_counter), for
    measuring how long an event took to get there. One Redis, not a cluster: the partitions
    of one producer are in different slots."""
    client = redis_connect(redis_url)
    last = dict.fromkeys(streams, "0-0")
    while not stop.is_set():
        reply = client.xread(last, count=1_000, block=100)
        seen = time.perf_counter()
        for stream, entries in reply or ():
            for entry_id, fields in entries:
                last[stream] = entry_id
                on_entry(fields, seen)
