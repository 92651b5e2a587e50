"""Own partitions without threads, to drive PartitionWorkers one step at a time in tests."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import redis
from psycopg_pool import ConnectionPool

from service_runtime.consumer import ConsumerSettings, Handler, PartitionWorker
from service_runtime.ownership import PartitionLeases
from service_runtime.stream_fence import StreamFence


def own_partitions(
    redis_client: redis.Redis,
    pool: ConnectionPool,
    settings: ConsumerSettings,
    handlers: Mapping[str, Handler],
    partitions: Iterable[int] | None = None,
    lease_seconds: float = 3600,
    **worker_options: object,
) -> list[PartitionWorker]:
    """Acquire the leases (all partitions by default) and return started workers, as
    StreamConsumer would, but without its threads. Raises if a partition is owned already."""
    leases = PartitionLeases(settings.group, settings.consumer, lease_seconds)
    fence_ops = StreamFence(redis_client)
    workers = []
    with pool.connection() as conn:
        for partition in range(settings.partitions) if partitions is None else partitions:
            lease = leases.acquire(conn, partition)
            assert lease is not None, f"partition {partition} is owned by someone else"
            assert fence_ops.claim(settings.group, partition, lease.epoch)
            worker = PartitionWorker(
                redis_client, fence_ops, pool, settings, handlers, lease, **worker_options
            )
            worker.ensure_groups()
            worker.take_over_pending()
            workers.append(worker)
    return workers


def drain(workers: Iterable[PartitionWorker]) -> int:
    """Step every worker until none reads anything more; the number of entries read."""
    workers = list(workers)
    total = 0
    while moved := sum(worker.step() for worker in workers):
        total += moved
    return total
