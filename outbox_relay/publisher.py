"""One relay step: publish a batch of unpublished outbox rows, then mark them published.

Each row goes to its order's partition stream (contracts.partition_of on the aggregate id,
which is the order id for every event), so one order's events keep their outbox order.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import psycopg
import redis

from contracts import STREAM_OF_PRODUCER, partition_of, partition_stream
from service_runtime import tracing
from service_runtime.faults import no_faults
from service_runtime.metrics import RELAY_BATCH_SIZE, RELAY_LATENCY, RELAY_PUBLISHED

# Every unpublished row is a candidate, whatever its id: a row whose transaction commits
# after a higher id was published is simply found by the next scan (no high-water mark).
_CLAIM_BATCH = """
SELECT id, event_id::text, event_type, event_version, aggregate_type, aggregate_id,
       correlation_id::text, coalesce(causation_id::text, ''), created_at, payload::text,
       traceparent
FROM outbox
WHERE published_at IS NULL
ORDER BY id
LIMIT %s
FOR UPDATE SKIP LOCKED
"""

_MARK_PUBLISHED = "UPDATE outbox SET published_at = clock_timestamp() WHERE id = ANY(%s)"

FaultPoint = Callable[[str], None]


def publish_batch(
    conn: psycopg.Connection,
    redis_client: redis.Redis,
    *,
    producer: str,
    partitions: int,
    batch_size: int,
    fault: FaultPoint = no_faults,
) -> int:
    """Publish up to batch_size rows in id order with one pipelined XADD round trip (per
    Redis node, on a cluster: redis-py's cluster pipeline groups the commands by node).

    A crash after XADD and before the UPDATE commits leaves the rows unpublished: they are
    published again (a duplicate the consumers' inbox absorbs), never lost.
    """
    with conn.transaction():
        rows = conn.execute(_CLAIM_BATCH, (batch_size,)).fetchall()
        if not rows:
            return 0
        base = STREAM_OF_PRODUCER[producer]
        pipe = redis_client.pipeline(transaction=False)
        spans: list = []  # PRODUCER spans, with tracing on (service_runtime/tracing.py)
        for (
            _id,
            event_id,
            event_type,
            version,
            agg_type,
            agg_id,
            correlation,
            causation,
            created_at,
            payload,
            traceparent,
        ) in rows:
            stream = partition_stream(base, partition_of(agg_id, partitions))
            pipe.xadd(
                stream,
                {
                    "event_id": event_id,
                    "event_type": event_type,
                    "event_version": version,
                    "aggregate_type": agg_type,
                    "aggregate_id": agg_id,
                    "correlation_id": correlation,
                    "causation_id": causation,
                    "occurred_at": created_at.isoformat(),
                    "producer": producer,
                    "payload": payload,
                    **tracing.publish_context(spans, stream, traceparent, event_type, agg_id),
                },
            )
        tracing.end_publish_spans(spans, pipe.execute())
        _observe(producer, rows)
        fault("after_xadd")
        conn.execute(_MARK_PUBLISHED, ([row[0] for row in rows],))
    return len(rows)


def _observe(producer: str, rows: list[tuple]) -> None:
    now = datetime.now(UTC)
    latency = RELAY_LATENCY.labels(producer)
    for row in rows:
        latency.observe((now - row[8]).total_seconds())  # created_at: as good as commit time
    RELAY_PUBLISHED.labels(producer).inc(len(rows))
    RELAY_BATCH_SIZE.labels(producer).observe(len(rows))
