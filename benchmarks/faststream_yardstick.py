"""FastStream's Redis Streams batch subscriber doing our consumer's work: the yardstick of
consumer_throughput (the target: one consumer >= 1.5x it, in the same run, on the same servers).

Optional: FastStream comes with the `bench` extra (`pip install -e .[bench]`, which `make bench`
does); without it the measurement is skipped and its figures are null.

Written the way FastStream's docs show (https://faststream.ag2.ai/latest/redis/streams/groups/,
.../redis/streams/ack/): one `StreamSub` with a group and a consumer name, `batch=True` and
`max_records` (XREADGROUP COUNT), the group created at id 0 (`last_id="0"`: the entries were
added before it), acknowledged by hand after the commit (`AckPolicy.MANUAL`, `msg.ack()`: one
XACK per batch). The work per entry is our consumer's: decode and validate with the contracts
(decode_entry, with the fastcheck path), the producer check, the batch's inbox rows in one
INSERT ... unnest (our statement) in one transaction on a psycopg AsyncConnectionPool, a no-op
handler. It skips what only ours does: the fenced read (fence, XPENDING and the group's
positions in a script after each XREADGROUP), the lease fence in each transaction, metrics per
event.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from benchmarks.sample import chunks, reset, stream_fields
from contracts import (
    ORDERS_EVENTS,
    PRODUCER_OF_EVENT,
    ContractError,
    Envelope,
    decode_entry,
    partition_stream,
)
from service_runtime.db import KEEPALIVES, connect
from service_runtime.redis_client import connect as redis_connect

GROUP = "inventory"  # the group our consumer's measurement reads as
STREAM = partition_stream(ORDERS_EVENTS, 0)  # a StreamSub reads one stream: all go to p0
SKIPPED = "skipped: pip install -e .[bench]"
# A batch's inbox rows in one statement, as our consumer writes them (columns as comma-separated
# texts; without its lease fence: FastStream has no partition ownership to check)
_INSERT_INBOX = """
INSERT INTO inbox (consumer_group, event_id, event_type, stream, entry_id)
SELECT %s, * FROM unnest(string_to_array(%s, ',')::uuid[], string_to_array(%s, ','),
                         string_to_array(%s, ','), string_to_array(%s, ','))
ON CONFLICT DO NOTHING
"""


def faststream_version() -> str | None:
    try:
        import faststream.redis  # noqa: F401  (its Redis support, not only the core)
    except ImportError:
        return None
    try:
        return version("faststream")
    except PackageNotFoundError:
        return "?"


def alongside(db_url: str, redis_url: str, *, entries: int, batch_size: int) -> dict[str, Any]:
    """The keys consumer_throughput carries for the yardstick; never raises: a missing or
    failing FastStream costs the bench this figure (null), nothing else."""
    if faststream_version() is None:
        return {"faststream_events_per_s": None, "faststream": {"skipped": SKIPPED}}
    try:
        result = measure(db_url, redis_url, entries=entries, batch_size=batch_size)
    except Exception as err:  # the yardstick's failure is not our consumer's
        traceback.print_exc()
        error = f"{type(err).__name__}: {err}"
        return {"faststream_events_per_s": None, "faststream": {"error": error}}
    return {"faststream_events_per_s": result["events_per_s"], "faststream": result}


def measure(
    db_url: str, redis_url: str, *, entries: int = 20_000, batch_size: int = 100
) -> dict[str, Any]:
    reset([db_url], redis_url)
    client = redis_connect(redis_url)
    try:
        for size in chunks(entries, 500):
            pipe = client.pipeline(transaction=False)
            for _ in range(size):
                pipe.xadd(STREAM, stream_fields())
            pipe.execute()
        seconds, cpu = asyncio.run(_consume(db_url, redis_url, entries, batch_size))
        pending = client.xpending(STREAM, GROUP)["pending"]
    finally:
        client.close()
    with connect(db_url) as conn:
        inbox = conn.execute("SELECT count(*) FROM inbox").fetchone()[0]
    return {
        "version": faststream_version(),
        "entries": entries,
        "batch_size": batch_size,
        "seconds": seconds,
        "events_per_s": entries / seconds,
        "cpu_us_per_event": cpu / entries * 1e6,  # this process's, as consumer_throughput's
        "inbox_rows": inbox,
        "left_pending": pending,
    }


def no_op(_envelope: Envelope) -> None:
    pass


def _validated(fields: dict[str, str]) -> Envelope:
    """What our consumer checks of each entry it handles (PartitionWorker.handle)."""
    envelope = decode_entry(fields)
    if PRODUCER_OF_EVENT.get(envelope.event_type) != "orders":
        raise ContractError(f"{envelope.event_type} is not published on {ORDERS_EVENTS}")
    return envelope


async def _consume(
    db_url: str, redis_url: str, entries: int, batch_size: int
) -> tuple[float, float]:
    """Seconds from the subscriber's first read to the last batch's XACK, and this process's
    CPU seconds meanwhile."""
    from faststream import AckPolicy
    from faststream.redis import RedisBroker, StreamSub
    from faststream.redis.annotations import RedisBatchStreamMessage
    from psycopg_pool import AsyncConnectionPool

    pool = AsyncConnectionPool(
        db_url, min_size=1, max_size=2, open=False, kwargs={"autocommit": True, **KEEPALIVES}
    )
    broker = RedisBroker(redis_url, logger=None)  # no log line per batch: ours writes none
    acked = 0
    done = asyncio.Event()

    @broker.subscriber(
        stream=StreamSub(
            STREAM,
            group=GROUP,
            consumer=f"{GROUP}-faststream",
            batch=True,
            max_records=batch_size,
            last_id="0",
        ),
        ack_policy=AckPolicy.MANUAL,
    )
    async def handle(body: list, msg: RedisBatchStreamMessage) -> None:
        nonlocal acked
        # FastStream hands a batch of plain entries over as a list of {field: value} (str)
        envelopes = [_validated(fields) for fields in body]
        async with pool.connection() as conn, conn.transaction():
            await conn.execute(
                _INSERT_INBOX,
                (
                    GROUP,
                    ",".join([e.event_id for e in envelopes]),
                    ",".join([e.event_type for e in envelopes]),
                    ",".join([STREAM] * len(envelopes)),
                    ",".join([entry_id.decode() for entry_id in msg.raw_message["message_ids"]]),
                ),
            )
            for envelope in envelopes:
                no_op(envelope)
        await msg.ack()
        acked += len(envelopes)
        if acked >= entries:
            done.set()

    await pool.open(wait=True, timeout=30)
    try:
        # Set-up outside the clock, as our consumer's is: start() connects, creates the
        # group and returns once the read loop runs, whose next command is the first read
        await broker.start()
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            await asyncio.wait_for(done.wait(), timeout=max(120.0, entries / 200))
        except TimeoutError:
            raise RuntimeError(f"FastStream handled {acked} of {entries} entries in time") from None
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    finally:
        await broker.stop()
        await pool.close()
    return seconds, cpu
