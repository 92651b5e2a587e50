"""One consumer, with the real inbox, over partition streams that are already full.

The consumer owns every partition of its group (leases and Redis fences, as StreamConsumer
takes them) and runs a PartitionWorker per partition, each on its own thread, as a consumer
process does (`PartitionWorker.run`: one partition's wait on Redis or PostgreSQL is another's
time to decode). The handler does nothing, so what is measured is what every reaction pays
for: the fenced read, decode and validate, one transaction holding the lease fence and the
inbox rows, XACK.
"""

from __future__ import annotations

import threading
import time

import redis
from psycopg_pool import ConnectionPool

from benchmarks.sample import chunks, reset, stream_fields
from contracts import DEFAULT_PARTITIONS, ORDERS_EVENTS, Envelope, partition_of, partition_stream
from service_runtime.config import from_env
from service_runtime.consumer import ConsumerSettings, OutcomeHook, PartitionWorker
from service_runtime.consumer_group import pool_size
from service_runtime.db import connect, create_pool
from service_runtime.ownership import PartitionLeases
from service_runtime.redis_client import connect as redis_connect
from service_runtime.stream_fence import StreamFence
from service_runtime.unit_of_work import UnitOfWork

RedisClient = redis.Redis

GROUP = "inventory"  # a group that reads orders.events, where OrderPlaced comes from
LEASE_SECONDS = 3600  # nobody else competes: no heartbeat needed while measuring


def no_op(_uow: UnitOfWork, _envelope: Envelope) -> None:
    pass


def measure(
    db_url: str,
    redis_url: str,
    *,
    entries: int = 20_000,
    batch_size: int = 100,
    partitions: int = DEFAULT_PARTITIONS,
) -> dict[str, float]:
    reset([db_url], redis_url)
    client = redis_connect(redis_url)
    for size in chunks(entries, 500):
        pipe = client.pipeline(transaction=False)
        for _ in range(size):
            fields = stream_fields()
            partition = partition_of(fields["aggregate_id"], partitions)
            pipe.xadd(partition_stream(ORDERS_EVENTS, partition), fields)
        pipe.execute()

    handled = 0
    counting = threading.Lock()  # the workers' threads all count here
    all_handled = threading.Event()

    def on_outcome(_event_type: str, outcome: str, _seconds: float) -> None:
        nonlocal handled
        if outcome == "processed":
            with counting:
                handled += 1
                if handled >= entries:
                    all_handled.set()

    # CONSUMER_* from the environment, as `saga consume` reads them (CONSUMER_MAX_TRANSACTIONS)
    settings = from_env(
        ConsumerSettings,
        "CONSUMER_",
        group=GROUP,
        consumer=f"{GROUP}-bench",
        partitions=partitions,
        batch_size=batch_size,
    )
    pool = open_pool(db_url, settings, name="bench-consumer")
    try:
        # outside the clock: once per ownership change
        workers = own_every_partition(client, pool, settings, on_outcome)
        stop = threading.Event()
        threads = worker_threads(workers, stop, "bench")
        started, cpu_started = time.perf_counter(), time.process_time()
        for thread in threads:
            thread.start()
        finished = all_handled.wait(timeout=max(120.0, entries / 200))
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        stop.set()
        for thread in threads:  # a caught-up worker's wait ends within block_ms
            thread.join()
        if not finished:
            raise RuntimeError(f"consumer handled {handled} of {entries} entries in time")
        pending = sum(
            client.xpending(stream, GROUP)["pending"]
            for worker in workers
            for stream in worker.streams
        )
    finally:
        pool.close()
        client.close()
    with connect(db_url) as conn:
        inbox = conn.execute("SELECT count(*) FROM inbox").fetchone()[0]
    return {
        "entries": entries,
        "batch_size": batch_size,
        "partitions": partitions,
        "seconds": seconds,
        "events_per_s": entries / seconds,
        # this process's CPU (not the servers'): steadier than events/s on a busy machine
        "cpu_us_per_event": cpu / entries * 1e6,
        "inbox_rows": inbox,
        "left_pending": pending,
    }


def open_pool(db_url: str, settings: ConsumerSettings, *, name: str) -> ConnectionPool:
    """A consumer process's workers' pool (`pool_size`), every connection open before the
    clock starts, as in a consumer that has been running (and as the yardstick's one connection
    is): growing the pool one connection at a time inside a run of well under a second was part
    of what it measured."""
    size = pool_size(settings)
    pool = create_pool(db_url, name=name, min_size=size, max_size=size, check_on_checkout=False)
    pool.wait(timeout=30)
    return pool


def worker_threads(
    workers: list[PartitionWorker], stop: threading.Event, prefix: str
) -> list[threading.Thread]:
    """A thread per partition worker, running it until `stop`, as a consumer process runs
    them (not started)."""
    return [
        threading.Thread(target=worker.run, args=(stop,), name=f"{prefix}-p{worker.partition}")
        for worker in workers
    ]


def own_every_partition(
    client: RedisClient,
    pool: ConnectionPool,
    settings: ConsumerSettings,
    on_outcome: OutcomeHook,
) -> list[PartitionWorker]:
    """A worker per partition of the group, each holding a real lease and the Redis fence (as
    StreamConsumer takes them), the previous owners' entries taken over; not started."""
    leases = PartitionLeases(settings.group, settings.consumer, LEASE_SECONDS)
    fence = StreamFence(client)
    workers: list[PartitionWorker] = []
    with pool.connection() as conn:
        for partition in range(settings.partitions):
            lease = leases.acquire(conn, partition)
            if lease is None or not fence.claim(settings.group, partition, lease.epoch):
                raise RuntimeError(f"partition {partition} of {settings.group} is owned already")
            worker = PartitionWorker(
                client, fence, pool, settings, {"OrderPlaced": no_op}, lease, on_outcome=on_outcome
            )
            worker.ensure_groups()
            worker.take_over_pending()
            workers.append(worker)
    return workers
