"""One StreamConsumer, with the real inbox, over a stream that is already full.

The handler does nothing, so what is measured is the plumbing every reaction pays for: read,
decode and validate, one transaction holding the inbox row, XACK.
"""

from __future__ import annotations

import threading
import time

from benchmarks.sample import chunks, reset, stream_fields
from contracts import Envelope
from service_runtime.consumer import ConsumerSettings, StreamConsumer
from service_runtime.db import connect, create_pool
from service_runtime.redis_client import connect as redis_connect
from service_runtime.unit_of_work import UnitOfWork

STREAM = "bench.consumer"
GROUP = "bench"


def no_op(_uow: UnitOfWork, _envelope: Envelope) -> None:
    pass


def measure(
    db_url: str, redis_url: str, *, entries: int = 20_000, batch_size: int = 100
) -> dict[str, float]:
    reset([db_url], redis_url)
    client = redis_connect(redis_url)
    for size in chunks(entries, 500):
        pipe = client.pipeline(transaction=False)
        for _ in range(size):
            pipe.xadd(STREAM, stream_fields())
        pipe.execute()

    handled = 0
    finished_at = 0.0
    done = threading.Event()

    def on_outcome(_event_type: str, outcome: str, _seconds: float) -> None:
        nonlocal handled, finished_at
        if outcome == "processed":
            handled += 1
            if handled == entries:
                finished_at = time.perf_counter()
                done.set()

    pool = create_pool(db_url, name="bench-consumer", max_size=2, check_on_checkout=False)
    pool.wait(timeout=30)
    settings = ConsumerSettings(
        group=GROUP, consumer=f"{GROUP}-1", streams=(STREAM,), batch_size=batch_size
    )
    consumer = StreamConsumer(client, pool, settings, {"OrderPlaced": no_op}, on_outcome)
    consumer.ensure_groups()  # outside the clock: once per process lifetime
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), name="bench-consumer")
    started = time.perf_counter()
    thread.start()
    try:
        if not done.wait(timeout=max(120.0, entries / 200)):
            raise RuntimeError(f"consumer handled {handled} of {entries} entries before timing out")
    finally:
        stop.set()
        thread.join(timeout=30)
        pool.close()
    pending = client.xpending(STREAM, GROUP)["pending"]
    client.close()
    with connect(db_url) as conn:
        inbox = conn.execute("SELECT count(*) FROM inbox").fetchone()[0]
    seconds = finished_at - started
    return {
        "entries": entries,
        "batch_size": batch_size,
        "seconds": seconds,
        "events_per_s": entries / seconds,
        "inbox_rows": inbox,
        "left_pending": pending,
    }
