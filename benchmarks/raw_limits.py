"""What Redis and PostgreSQL manage from Python with nothing of ours in the way: the yardsticks
the relay and consumer figures are divided by."""

from __future__ import annotations

import threading
import time
from typing import Any

from benchmarks.sample import chunks, outbox_row, reset, stream_fields
from service_runtime.db import connect
from service_runtime.redis_client import connect as redis_connect

STREAM = "bench.raw"


def measure(
    db_url: str,
    redis_url: str,
    *,
    xadd_single: int = 5_000,
    xadd_pipelined: int = 100_000,
    pipeline_batch: int = 500,
    pg_commits: int = 3_000,
    pg_threads: tuple[int, ...] = (1, 4),
) -> dict[str, Any]:
    reset([db_url], redis_url)
    return {
        "xadd_single": xadd_single,
        "xadd_single_per_s": _xadd_rate(redis_url, xadd_single, batch=1),
        "xadd_pipelined": xadd_pipelined,
        "pipeline_batch": pipeline_batch,
        "xadd_pipelined_per_s": _xadd_rate(redis_url, xadd_pipelined, batch=pipeline_batch),
        "pg_commits": pg_commits,
        "pg_commit_per_s": {str(n): _commit_rate(db_url, pg_commits, n) for n in pg_threads},
    }


def _xadd_rate(redis_url: str, count: int, batch: int) -> float:
    # the same client settings and entry shape as the relay's, built before the clock starts
    client = redis_connect(redis_url)
    entries = [stream_fields() for _ in range(min(count, 1_000))]
    try:
        started = time.perf_counter()
        done = 0
        for size in chunks(count, batch):
            if batch == 1:
                client.xadd(STREAM, entries[done % len(entries)])
            else:
                pipe = client.pipeline(transaction=False)
                for i in range(done, done + size):
                    pipe.xadd(STREAM, entries[i % len(entries)])
                pipe.execute()
            done += size
        rate = count / (time.perf_counter() - started)
        client.delete(STREAM)
        return rate
    finally:
        client.close()


def _commit_rate(db_url: str, total: int, threads: int) -> float:
    """Single-row INSERTs, each its own transaction, spread over `threads` connections."""
    with connect(db_url) as conn:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_commit (id bigserial PRIMARY KEY, payload jsonb)"
        )
    payload = outbox_row()[5]
    share = total // threads
    start = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def insert_rows() -> None:
        try:
            with connect(db_url) as conn:
                start.wait()
                for _ in range(share):
                    # autocommit: the INSERT returns once its commit has
                    conn.execute("INSERT INTO bench_commit (payload) VALUES (%s)", (payload,))
        except BaseException as err:  # reported by the main thread
            errors.append(err)
            start.abort()

    workers = [threading.Thread(target=insert_rows, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    start.wait()
    started = time.perf_counter()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise errors[0]
    with connect(db_url) as conn:
        conn.execute("DROP TABLE bench_commit")
    return share * threads / elapsed
