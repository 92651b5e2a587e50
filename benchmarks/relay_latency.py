"""Commit-to-stream time through the real Relay while outbox rows commit at a fixed rate.

The relay runs in its own process, as it does in production, so the paced producer and the
stream reader (threads here, both stamping with this process's clock) do not share its GIL.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Callable
from typing import Any

from benchmarks.sample import (
    OUTBOX_COLUMNS,
    follow_streams,
    outbox_row,
    percentiles,
    reset,
    wake_relay,
)
from contracts import DEFAULT_PARTITIONS, producer_streams
from service_runtime.db import connect
from service_runtime.redis_client import connect as redis_connect

_INSERT = f"INSERT INTO outbox ({OUTBOX_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)"


def measure(
    db_url: str,
    redis_url: str,
    *,
    rate: float = 1_000,
    seconds: float = 10.0,
    batch_size: int = 500,
    partitions: int = DEFAULT_PARTITIONS,
    durability: str = "ack",
) -> dict[str, Any]:
    reset([db_url], redis_url)
    context = multiprocessing.get_context("spawn")
    stop_relay = context.Event()
    relay = context.Process(
        target=_run_relay,
        args=(db_url, redis_url, batch_size, partitions, stop_relay, durability),
        daemon=True,
    )
    arrivals: dict[str, float] = {}
    stop_reader = threading.Event()
    reader = threading.Thread(
        target=follow_streams,
        args=(
            redis_url,
            producer_streams("orders", partitions),
            _stamp_arrival(arrivals),
            stop_reader,
        ),
        daemon=True,
    )
    relay.start()
    reader.start()
    try:
        with connect(db_url) as conn:
            _warm_up(conn, arrivals)
            commits = _produce(conn, rate, int(rate * seconds))
        deadline = time.monotonic() + 30
        while len(arrivals) < len(commits) + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop_relay.set()
        wake_relay(db_url)
        stop_reader.set()
        relay.join(timeout=30)
        if relay.is_alive():
            relay.terminate()
        reader.join(timeout=5)
    latencies = [
        (arrivals[event_id] - committed) * 1000
        for event_id, committed in commits.items()
        if event_id in arrivals
    ]
    committed_at = sorted(commits.values())
    return {
        "rate": rate,
        "seconds": seconds,
        "partitions": partitions,
        "durability": durability,
        "rows": len(commits),
        "achieved_rate": len(commits) / (committed_at[-1] - committed_at[0])
        if len(committed_at) > 1
        else 0.0,
        "missing": len(commits) - len(latencies),
        "latency_ms": percentiles(latencies),
    }


def _produce(conn: Any, rate: float, count: int) -> dict[str, float]:
    """Open loop: row i commits at start + i/rate whatever the ones before did (a late row is
    sent at once, never skipped); returns event_id -> when its commit returned."""
    rows = [outbox_row() for _ in range(count)]
    commits: dict[str, float] = {}
    started = time.perf_counter()
    for i, row in enumerate(rows):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        conn.execute(_INSERT, row, prepare=True)  # autocommit: one row, one transaction
        commits[row[0]] = time.perf_counter()
    return commits


def _warm_up(conn: Any, arrivals: dict[str, float]) -> None:
    """One row all the way through: the relay is active and the reader is reading."""
    row = outbox_row()
    conn.execute(_INSERT, row)
    deadline = time.monotonic() + 60
    while row[0] not in arrivals:
        if time.monotonic() > deadline:
            raise RuntimeError(
                "the warm-up row never reached the stream (another relay active on this outbox?)"
            )
        time.sleep(0.01)


def _run_relay(
    db_url: str, redis_url: str, batch_size: int, partitions: int, stop: Any, durability: str
) -> None:
    from outbox_relay.relay import Relay, RelaySettings

    settings = RelaySettings(
        producer="orders", partitions=partitions, batch_size=batch_size, durability=durability
    )
    # a multiprocessing Event has the is_set/wait the relay loop uses
    Relay(db_url, redis_connect(redis_url), settings).run(stop)


def _stamp_arrival(arrivals: dict[str, float]) -> Callable[[dict[str, str], float], None]:
    def stamp(fields: dict[str, str], seen: float) -> None:
        arrivals[fields["event_id"]] = seen

    return stamp
