"""The published position, and loss detection and repair (docs/architecture.md, "Redis data loss").

Marking a row published records the partition stream and the entry id its XADD returned, and
per stream the highest entry id published (table published_positions). Entry ids of one stream
only grow, and Redis keeps a stream's last-generated-id even when entries are trimmed or
deleted, so:

    Redis has lost entries of stream S  <=>  last-generated-id(S) < recorded(S)

where a missing stream counts as last-generated-id 0-0. Then exactly the rows of S whose
recorded entry id is greater than Redis's last-generated-id are no longer in Redis (and they
are everything published to S after the last entry Redis kept): they are un-marked
(published_at = NULL), so the normal publish path sends them again in id order, and the
recorded position goes back to Redis's last-generated-id.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import psycopg
import redis

from contracts import SUBSCRIPTIONS, base_of
from service_runtime.metrics import RELAY_LOSSES, RELAY_REPUBLISHED

log = logging.getLogger(__name__)

NO_STREAM = "0-0"

_LOAD = "SELECT stream, last_entry_id FROM published_positions"


def upsert_positions(source: str) -> str:
    """The upsert of published_positions from `source`, a query of (stream, last entry id)
    rows: alone (`record`) or in the relay's mark statement (publisher.py)."""
    return f"""
INSERT INTO published_positions (stream, last_entry_id)
{source}
ON CONFLICT (stream) DO UPDATE
SET last_entry_id = EXCLUDED.last_entry_id, updated_at = clock_timestamp()
"""


_RECORD = upsert_positions("SELECT * FROM unnest(%s::text[], %s::text[])")
# Rows of one stream whose entry id is in (redis_last, recorded]: Redis no longer has them.
_UNMARK = """
UPDATE outbox SET published_at = NULL, published_stream = NULL, published_entry_id = NULL
WHERE published_at IS NOT NULL AND published_stream = %(stream)s
  AND (split_part(published_entry_id, '-', 1)::bigint,
       split_part(published_entry_id, '-', 2)::bigint) > (%(ms)s, %(seq)s)
"""


_COUNT_LOSS = """
UPDATE published_positions
SET losses = losses + 1, republished = republished + %s, last_loss_at = clock_timestamp()
WHERE stream = %s
"""


def id_key(entry_id: str) -> tuple[int, int]:
    """`1714557600000-3` -> (1714557600000, 3): entry ids compare as numbers, not text."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def is_behind(redis_last: str | None, recorded: str | None) -> bool:
    """The detection rule: Redis's last-generated-id (None: no stream) below what we recorded."""
    if not recorded:
        return False
    return id_key(redis_last or NO_STREAM) < id_key(recorded)


def republished_total(conn: psycopg.Connection) -> int:
    """Rows this outbox's relays un-marked after finding Redis behind, over all time."""
    return conn.execute("SELECT coalesce(sum(republished), 0) FROM published_positions").fetchone()[
        0
    ]


def load(conn: psycopg.Connection) -> dict[str, str]:
    return dict(conn.execute(_LOAD).fetchall())


def record(conn: psycopg.Connection, highest: Mapping[str, str]) -> None:
    if highest:
        conn.execute(_RECORD, (list(highest), list(highest.values())))


def redis_last_ids(client: redis.Redis, streams: Iterable[str]) -> dict[str, str | None]:
    """Each stream's last-generated-id (XINFO STREAM), None where the stream does not exist.
    One pipelined round trip (per node on a cluster)."""
    streams = list(streams)
    if not streams:
        return {}
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.xinfo_stream(stream)
    replies = pipe.execute(raise_on_error=False)
    last: dict[str, str | None] = {}
    for stream, reply in zip(streams, replies, strict=True):
        if isinstance(reply, redis.ResponseError) and "no such key" in str(reply).lower():
            last[stream] = None
        elif isinstance(reply, Exception):
            raise reply
        else:
            last[stream] = reply["last-generated-id"]
    return last


def behind(recorded: Mapping[str, str], redis_last: Mapping[str, str | None]) -> dict[str, str]:
    """stream -> Redis's last-generated-id, for every stream where Redis is behind."""
    return {
        stream: redis_last.get(stream) or NO_STREAM
        for stream, position in recorded.items()
        if stream in redis_last and is_behind(redis_last[stream], position)
    }


def repair(
    conn: psycopg.Connection,
    client: redis.Redis,
    producer: str,
    lost: Mapping[str, str],
    recorded: Mapping[str, str],
) -> int:
    """Inside the caller's transaction: un-mark the rows Redis no longer has, set the recorded
    position of each stream back to Redis's, recreate vanished groups. Returns the row count;
    logs one error line and counts the loss in metrics.

    `recorded` (the relay's copy) is only read: the caller applies `lost` to it once the
    transaction has committed. Lowered before, a transaction that then rolled back (a group
    recreated on a Redis still read-only while it syncs from its new primary) left the copy
    at Redis's position and the rows marked: no later check saw the loss."""
    if not lost:
        return 0
    # the relay's session commits its marks without waiting for the WAL flush: an un-marking
    # lost with a PostgreSQL crash would leave rows marked that Redis no longer has
    conn.execute("SET LOCAL synchronous_commit = on")
    counts: dict[str, int] = {}
    for stream, redis_last in lost.items():
        ms, seq = id_key(redis_last)
        counts[stream] = conn.execute(_UNMARK, {"stream": stream, "ms": ms, "seq": seq}).rowcount
    record(conn, lost)
    for stream, count in counts.items():
        conn.execute(_COUNT_LOSS, (count, stream))
    was = {stream: recorded.get(stream) for stream in lost}
    recreate_groups(client, lost)
    total = sum(counts.values())
    log.error(
        "relay %s: Redis lost data: %d streams behind the published position, %d rows to"
        " publish again (%s)",
        producer,
        len(lost),
        total,
        ", ".join(
            f"{s}: redis at {lost[s]}, published up to {was[s]}, {counts[s]} rows"
            for s in sorted(lost)
        ),
    )
    RELAY_LOSSES.labels(producer).inc(len(lost))
    RELAY_REPUBLISHED.labels(producer).inc(total)
    return total


def recreate_groups(client: redis.Redis, streams: Iterable[str]) -> None:
    """Create, at id 0, every subscribed group missing on these streams: the re-published rows
    (and anything else still in the stream) are then delivered; the inboxes absorb repeats.
    A group that still exists is left where it is (BUSYGROUP)."""
    for stream in streams:
        for group, bases in SUBSCRIPTIONS.items():
            if base_of(stream) not in bases:
                continue
            try:
                client.xgroup_create(stream, group, id="0", mkstream=True)
            except redis.ResponseError as err:
                if "BUSYGROUP" not in str(err):
                    raise


def check_and_repair(
    conn: psycopg.Connection, client: redis.Redis, producer: str, recorded: dict[str, str]
) -> int:
    """Compare every recorded stream with Redis and repair those behind (one transaction);
    `recorded` follows once it committed."""
    if not recorded:
        return 0
    lost = behind(recorded, redis_last_ids(client, recorded))
    if not lost:
        return 0
    with conn.transaction():
        count = repair(conn, client, producer, lost, recorded)
    recorded.update(lost)
    return count
