"""What one wake-up costs a consumer: entries arriving one at a time, as at light load.

At a light load every entry wakes a partition worker on its own: a read, then (for a type its
group handles) a transaction, then back to the blocking read. The end-to-end CPU per order is
mostly these fixed costs (eight deliveries per order over the three groups, four of them of
types the group ignores), which consumer_throughput, reading a backlog 100 at a time, does not
show.

Eight partition workers run as a consumer process runs them (consumer_throughput's set-up: a
thread each, the process's pool size, real leases and fences) while another process adds one
entry at a time at `rate` per second, spread over the partitions: first entries of a type the
group ignores (OrderConfirmed: read and acknowledged, no transaction), then entries it handles
(OrderPlaced: no-op handler, real inbox). Reported per entry: this process's CPU (the workers,
idle wake-ups included) and Redis's (INFO cpu, the producer's XADDs included).
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from typing import Any

import redis

from benchmarks.consumer_throughput import GROUP, open_pool, own_every_partition, worker_threads
from benchmarks.sample import reset, stream_fields
from contracts import DEFAULT_PARTITIONS, ORDERS_EVENTS, partition_of, partition_stream
from service_runtime.config import from_env
from service_runtime.consumer import ConsumerSettings
from service_runtime.redis_client import connect as redis_connect

# (what the entries are, their event type): inventory ignores the first, handles the second
PHASES = (("ignored", "OrderConfirmed"), ("handled", "OrderPlaced"))


def measure(
    db_url: str,
    redis_url: str,
    *,
    rate: float = 100.0,
    seconds: float = 10.0,
    partitions: int = DEFAULT_PARTITIONS,
) -> dict[str, Any]:
    reset([db_url], redis_url)
    client = redis_connect(redis_url)
    settled = 0
    counting = threading.Lock()

    def on_outcome(_event_type: str, _outcome: str, _seconds: float) -> None:
        nonlocal settled
        with counting:
            settled += 1

    settings = from_env(
        ConsumerSettings,
        "CONSUMER_",
        group=GROUP,
        consumer=f"{GROUP}-wakeups",
        partitions=partitions,
    )
    pool = open_pool(db_url, settings, name="bench-wakeups")
    stop = threading.Event()
    threads: list[threading.Thread] = []
    results: dict[str, Any] = {"rate": rate, "seconds": seconds, "partitions": partitions}
    try:
        workers = own_every_partition(client, pool, settings, on_outcome)
        threads = worker_threads(workers, stop, "wakeups")
        for thread in threads:
            thread.start()
        context = multiprocessing.get_context("spawn")
        for name, event_type in PHASES:
            count = int(rate * seconds)
            with counting:
                target = settled + count
            cpu, redis_cpu = time.process_time(), _redis_cpu(client)
            producer = context.Process(
                target=_produce, args=(redis_url, event_type, rate, count, partitions)
            )
            producer.start()
            producer.join()
            deadline = time.monotonic() + 60
            while settled < target:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: {target - settled} entries not settled in time")
                time.sleep(0.05)
            results[name] = {
                "event_type": event_type,
                "entries": count,
                "consumer_cpu_us_per_entry": (time.process_time() - cpu) / count * 1e6,
                "redis_cpu_us_per_entry": (_redis_cpu(client) - redis_cpu) / count * 1e6,
            }
    finally:
        stop.set()
        for thread in threads:  # a blocked read returns within block_ms
            thread.join()
        pool.close()
        client.close()
    return results


def _redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _produce(redis_url: str, event_type: str, rate: float, count: int, partitions: int) -> None:
    """Open loop, in its own process (its CPU is not the consumer's): entry i at i/rate."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    entries = []
    for _ in range(count):
        fields = stream_fields()
        fields["event_type"] = event_type
        stream = partition_stream(ORDERS_EVENTS, partition_of(fields["aggregate_id"], partitions))
        entries.append((stream, fields))
    started = time.perf_counter()
    for i, (stream, fields) in enumerate(entries):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        client.xadd(stream, fields)
    client.close()
