"""How fast the real Relay empties a backlog of committed outbox rows into its partition
streams (orders.events.{p0} ... {pP-1}: the relay routes each row by its order id)."""

from __future__ import annotations

import threading
import time

from benchmarks.sample import fill_outbox, reset, wake_relay
from contracts import DEFAULT_PARTITIONS, producer_streams
from outbox_relay.relay import Relay, RelaySettings
from service_runtime.db import connect
from service_runtime.redis_client import connect as redis_connect


def measure(
    db_url: str,
    redis_url: str,
    *,
    rows: int = 100_000,
    batch_size: int = 500,
    partitions: int = DEFAULT_PARTITIONS,
    durability: str = "ack",
) -> dict[str, float]:
    reset([db_url], redis_url)
    with connect(db_url) as conn:
        started = time.perf_counter()
        fill_outbox(conn, rows)
        fill_seconds = time.perf_counter() - started

    client = redis_connect(redis_url)
    published = 0
    finished_at = 0.0
    done = threading.Event()

    def on_batch(sent: int) -> None:  # runs on the relay thread after each batch commits
        nonlocal published, finished_at
        published += sent
        if published >= rows:
            finished_at = time.perf_counter()
            done.set()

    relay = Relay(
        db_url,
        client,
        RelaySettings(
            producer="orders", partitions=partitions, batch_size=batch_size, durability=durability
        ),
        on_batch=on_batch,
    )
    stop = threading.Event()
    thread = threading.Thread(target=relay.run, args=(stop,), name="bench-relay", daemon=True)
    started = time.perf_counter()
    thread.start()
    # a relay already running on these databases would keep ours standing by for ever
    drained = relay.active.wait(timeout=15) and done.wait(timeout=max(120.0, rows / 500))
    stop.set()
    wake_relay(db_url)
    thread.join(timeout=30)
    try:
        if not drained:
            raise RuntimeError(
                f"relay published {published} of {rows} rows before timing out"
                + ("" if relay.published else " (is another relay active on this outbox?)")
            )
        in_stream = sum(client.xlen(s) for s in producer_streams("orders", partitions))
    finally:
        client.close()
    seconds = finished_at - started
    return {
        "rows": rows,
        "batch_size": batch_size,
        "partitions": partitions,
        "durability": durability,
        "fill_rows_per_s": rows / fill_seconds,
        "seconds": seconds,
        "events_per_s": rows / seconds,
        "stream_length": in_stream,
    }
