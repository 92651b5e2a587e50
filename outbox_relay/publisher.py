"""Publish unpublished outbox rows, then mark them published: one batch (`publish_batch`), or
a backlog with batches overlapped (`drain`: Redis adds one batch while PostgreSQL marks the
one before; docs/architecture.md, "Relay batches").

Each row goes to its order's partition stream (contracts.partition_of on the aggregate id,
which is the order id for every event), so one order's events keep their outbox order.

Each stream's entries of a batch are added by one script that first checks that Redis still
has what this relay recorded as published to it (positions.py): when Redis is behind, nothing
is added to that stream and the lost rows are un-marked in the same transaction, so they are
sent again, in id order, before anything newer. RELAY_DURABILITY (durability.py) decides
whether the batch counts as published once Redis answered.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future, wait
from contextlib import nullcontext
from dataclasses import dataclass

import psycopg
import redis

from contracts import STREAM_OF_PRODUCER, partition_of, partition_stream
from outbox_relay import positions
from outbox_relay.durability import ACK, Durability, NotDurable
from service_runtime import redis_client, tracing
from service_runtime.faults import no_faults
from service_runtime.metrics import (
    RELAY_BATCH_SIZE,
    RELAY_LATENCY,
    RELAY_NOT_DURABLE,
    RELAY_PUBLISHED,
    observe_many,
)

# Every unpublished row is a candidate, whatever its id: a row whose transaction commits
# after a higher id was published is simply found by the next scan (no high-water mark).
# No row locks: only the session holding the relay's advisory lock claims or marks rows, and
# nothing else changes an unpublished row (locking them cost a WAL record per row).
# Every column comes as the text the entry carries: occurred_at is created_at as Python's
# isoformat() writes it (the session's time zone, no fraction when it is zero), so psycopg
# parses no timestamp and Python formats none; the epoch is for RELAY_LATENCY. (Building the
# whole entry's JSON here, with json_build_array, cost PostgreSQL more than it saved Python.)
_CLAIM_BATCH = """
SELECT id, aggregate_id, traceparent, extract(epoch FROM created_at)::float8,
       event_id::text, event_type, event_version::text, aggregate_type,
       correlation_id::text, coalesce(causation_id::text, ''),
       replace(to_char(created_at, 'YYYY-MM-DD"T"HH24:MI:SS.USTZH:TZM'), '.000000', ''),
       payload::text
FROM outbox
WHERE published_at IS NULL
ORDER BY id
LIMIT %s
"""

# The batch's ids, streams and entry ids as three comma-separated texts (none contains a
# comma): psycopg dumps one string much faster than a 500-element array. The same statement
# records each stream's highest entry id (published_positions, as positions.record): one
# statement, one round trip, instead of two.
_RECORD_POSITIONS = positions.upsert_positions(
    "SELECT * FROM unnest(string_to_array(%s, ','), string_to_array(%s, ','))"
)
_MARK_CTES = f"""
WITH marked AS (
    UPDATE outbox o
    SET published_at = clock_timestamp(), published_stream = v.stream,
        published_entry_id = v.entry
    FROM unnest(string_to_array(%s, ',')::bigint[], string_to_array(%s, ','),
                string_to_array(%s, ',')) AS v(id, stream, entry)
    WHERE o.id = v.id
    RETURNING 1
), recorded AS ({_RECORD_POSITIONS} RETURNING 1)
"""
_MARK_PUBLISHED = (
    f"{_MARK_CTES}SELECT (SELECT count(*) FROM marked), (SELECT count(*) FROM recorded)"
)
# The mark of the batch before and the claim of the next one, in one statement (at light load,
# the mark goes with the next claim: `publish_marking_later`). Its snapshot is from before the
# UPDATE, so the rows being marked are left out by id. (A data-modifying WITH always runs.)
_MARK_AND_CLAIM_BATCH = _MARK_CTES + _CLAIM_BATCH.replace(
    "WHERE published_at IS NULL",
    "WHERE published_at IS NULL\n  AND id <> ALL(string_to_array(%s, ',')::bigint[])",
)

# KEYS[1]: the stream; ARGV[1]: the position recorded for it ('0-0': none), ARGV[2]: the
# entries as one JSON array of [field, value, ...] arrays (one argument instead of two dozen
# per entry: packing the arguments was the relay's largest cost). Returns {1, id...} when
# Redis's last-generated-id is not behind the recorded position, else {0, last-generated-id}
# and adds nothing. XINFO's reply is scanned by name: its layout differs between versions.
_CHECKED_XADD = """
local last = '0-0'
if redis.call('EXISTS', KEYS[1]) == 1 then
    local info = redis.call('XINFO', 'STREAM', KEYS[1])
    for i = 1, #info, 2 do
        if info[i] == 'last-generated-id' then last = info[i + 1] end
    end
end
local lm, ls = string.match(last, '^(%d+)-(%d+)$')
local rm, rs = string.match(ARGV[1], '^(%d+)-(%d+)$')
lm, ls, rm, rs = tonumber(lm), tonumber(ls), tonumber(rm), tonumber(rs)
if lm < rm or (lm == rm and ls < rs) then
    return {0, last}
end
local entries = cjson.decode(ARGV[2])
local ids = {1}
for i = 1, #entries do
    ids[#ids + 1] = redis.call('XADD', KEYS[1], '*', unpack(entries[i]))
end
return ids
"""

FaultPoint = Callable[[str], None]

# The claim of a drain's next batch while the previous one is in Redis, unmarked: the same
# rows except those in flight (ids above the highest of them, or not among them: a row that
# commits late below it is still found).
_CLAIM_NEXT_BATCH = _CLAIM_BATCH.replace(
    "WHERE published_at IS NULL",
    "WHERE published_at IS NULL\n  AND (id > %s OR id <> ALL(string_to_array(%s, ',')::bigint[]))",
)


@dataclass
class _Batch:
    """Claimed rows and the entries built from them, by stream."""

    rows: list[tuple]
    by_stream: dict[str, list[tuple[int, list[str]]]]  # (row id, fields and values)
    spans: dict[str, list]  # PRODUCER spans per stream, with tracing on


def publish_batch(
    conn: psycopg.Connection,
    redis_client: redis.Redis,
    *,
    producer: str,
    partitions: int,
    batch_size: int,
    fault: FaultPoint = no_faults,
    recorded: dict[str, str] | None = None,
    durability: Durability = ACK,
    wait_timeout_ms: int = 1000,
    via: redis_client.HeldConnection | None = None,
) -> int:
    """Publish up to batch_size rows in id order with one pipelined round trip (per Redis
    node, on a cluster: redis-py's cluster pipeline groups the commands by node); on a plain
    Redis on `via`, the relay's own connection, when given.

    `recorded` is the relay's copy of published_positions (kept current here). A crash after
    XADD and before the UPDATE commits leaves the rows unpublished: they are published again
    (a duplicate the consumers' inbox absorbs), never lost. So does a batch that did not
    reach the durability asked for (NotDurable is raised before anything is marked).
    `conn` is an autocommit connection (service_runtime.db.connect), the session holding the
    relay's advisory lock.
    """
    recorded = {} if recorded is None else recorded
    # `conn` is in autocommit: the claim is one statement, and so is the mark unless a stream
    # was found behind (then the mark and the repair go in one transaction). No BEGIN and no
    # COMMIT of their own: two PostgreSQL round trips a batch instead of four. Anything that
    # fails between the claim and the mark leaves the rows unpublished: they go again.
    # Prepared statements (psycopg prepares a query from its fifth run): sending the claim and
    # the mark as one text query each had PostgreSQL parse and plan them every batch, which
    # cost it more CPU than the round trips did (docs/architecture.md, "Relay batches").
    rows = conn.execute(_CLAIM_BATCH, (batch_size,)).fetchall()
    if not rows:
        return 0
    batch, replies = _build_and_send(
        rows, producer, partitions, redis_client, recorded, durability, wait_timeout_ms, via
    )
    fault("after_xadd")
    return _mark_at_once(conn, redis_client, producer, batch, replies, recorded)


@dataclass(frozen=True)
class Unmarked:
    """A batch Redis took whose mark is still to be written: with the next claim
    (`publish_marking_later`), or alone (`mark_now`) when no batch follows soon."""

    rows: list[tuple]
    marks: tuple[str, ...]  # the mark's parameters (_MARK_CTES)
    positions: dict[str, str]  # each stream's highest entry id, recorded with the mark
    sent_at: float  # when Redis took it (RELAY_LATENCY)


def publish_marking_later(
    conn: psycopg.Connection,
    redis_client: redis.Redis,
    unmarked: Unmarked | None,
    *,
    producer: str,
    partitions: int,
    batch_size: int,
    fault: FaultPoint = no_faults,
    recorded: dict[str, str],
    durability: Durability = ACK,
    wait_timeout_ms: int = 1000,
    via: redis_client.HeldConnection | None = None,
    on_commit: Callable[[int], None] = lambda _n: None,
) -> tuple[Unmarked | None, bool]:
    """`publish_batch` for a relay woken again and again at light load: the mark of the batch
    before (`unmarked`) goes in the statement that claims this one, and this batch's mark is
    left for the next call (or `mark_now`): one PostgreSQL statement a batch instead of two.
    Returns (this batch if its mark is still to be written, whether the claim was full);
    `on_commit` gets the number of rows of each mark that committed.

    A full batch (a backlog, for drain()) or one that found a stream behind (a repair, in a
    transaction) is marked at once, as publish_batch does. A batch is marked before the next
    one is sent, so the next one's checked XADD compares with its positions, as ever. A crash
    or an error before the mark leaves its rows unpublished: sent again (duplicates the
    consumers' inbox absorbs), never lost, as between any XADD and its mark."""
    if unmarked is None:
        rows = conn.execute(_CLAIM_BATCH, (batch_size,)).fetchall()
    else:
        ids = unmarked.marks[0]
        rows = conn.execute(_MARK_AND_CLAIM_BATCH, (*unmarked.marks, ids, batch_size)).fetchall()
        on_commit(_marked(producer, unmarked, recorded))
    full = len(rows) == batch_size
    if not rows:
        return None, full
    batch, replies = _build_and_send(
        rows, producer, partitions, redis_client, recorded, durability, wait_timeout_ms, via
    )
    fault("after_xadd")
    if not full and all(reply[0] for reply in replies.values()):
        _ids, marks, highest, _lost = _marks_of(batch, replies)
        return Unmarked(rows, marks, highest, time.time()), full
    on_commit(_mark_at_once(conn, redis_client, producer, batch, replies, recorded))
    return None, full


def _mark_at_once(
    conn: psycopg.Connection,
    redis_client: redis.Redis,
    producer: str,
    batch: _Batch,
    replies: dict[str, list],
    recorded: dict[str, str],
) -> int:
    """Mark a batch now, on `conn` in autocommit: one statement, or a transaction with the
    repair when a stream was found behind; `recorded` and the metrics once it committed.
    The rows marked."""
    behind = not all(reply[0] for reply in replies.values())
    with conn.transaction() if behind else nullcontext():
        published, positions_now, _ = _mark(conn, redis_client, producer, batch, replies, recorded)
    recorded.update(positions_now)  # committed
    _observe(producer, [row[3] for row in published])
    return len(published)


def mark_now(
    conn: psycopg.Connection, producer: str, unmarked: Unmarked, recorded: dict[str, str]
) -> int:
    """Write the mark `publish_marking_later` left (no batch followed soon); rows marked."""
    conn.execute(_MARK_PUBLISHED, unmarked.marks)
    return _marked(producer, unmarked, recorded)


def _marked(producer: str, unmarked: Unmarked, recorded: dict[str, str]) -> int:
    """Once `unmarked`'s mark committed: its positions recorded, its metrics."""
    recorded.update(unmarked.positions)
    _observe(producer, [row[3] for row in unmarked.rows], unmarked.sent_at)
    return len(unmarked.rows)


def drain(
    conn: psycopg.Connection,
    redis_client: redis.Redis,
    executor: Executor,
    *,
    producer: str,
    partitions: int,
    batch_size: int,
    fault: FaultPoint = no_faults,
    recorded: dict[str, str],
    durability: Durability = ACK,
    wait_timeout_ms: int = 1000,
    seconds: float = 1.0,
    on_commit: Callable[[int], None] = lambda _n: None,
    via: redis_client.HeldConnection | None = None,
) -> tuple[int, bool]:
    """Publish a backlog with batches overlapped: while Redis adds batch N (sent by
    `executor`'s thread), PostgreSQL claims batch N+1 and, once N's reply came back, marks N
    while Redis adds N+1. Returns (rows published, whether to come back at once: `seconds`
    ran out on a full batch, or a stream was repaired). Nothing is in flight when it returns
    or raises.

    Everything PostgreSQL does is on `conn`, the session holding the relay's advisory lock:
    no other session can publish or mark for it. Each transaction claims the next batch and
    marks the previous one; a batch's XADDs are sent only after the previous batch's reply
    came back complete, so each stream gets its first copies in outbox id order. A batch is
    marked only after its reply (and the durability wait) came back, in a transaction that
    rolls back on any failure: its rows, and the next batch's, go again (duplicates, never a
    loss). A reply that finds a stream behind (positions.py) stops the overlap: the next
    batch is not sent, the repair commits with the mark, and the rows it un-marked go first.

    The claim takes no row locks: the advisory lock is what excludes another relay, as it
    always was. `recorded` is updated as marks commit; the checked XADD compares
    with what Redis accepted, committed or not (`sent`).
    """
    deadline = time.monotonic() + seconds
    sent = dict(recorded)  # each stream's highest entry id Redis accepted from this relay
    total = 0
    inflight: tuple[list[tuple], Future] | None = None  # claimed rows, (batch, replies)
    claim = True
    full = False
    while True:
        pending: tuple[list[tuple], Future] | None = None
        try:
            with conn.transaction():
                rows: list[tuple] = []
                if claim:
                    if inflight is None:
                        rows = conn.execute(_CLAIM_BATCH, (batch_size,)).fetchall()
                    else:
                        ids = [row[0] for row in inflight[0]]
                        params = (max(ids), ",".join(map(str, ids)), batch_size)
                        rows = conn.execute(_CLAIM_NEXT_BATCH, params).fetchall()
                clean = True
                if inflight is not None:
                    batch, replies = inflight[1].result()
                    fault("after_xadd")
                    clean = all(reply[0] for reply in replies.values())
                    if clean:
                        sent.update({stream: reply[-1] for stream, reply in replies.items()})
                if rows and clean:
                    # the thread builds the entries and sends them while PostgreSQL marks
                    send = (rows, producer, partitions, redis_client, dict(sent), durability,
                            wait_timeout_ms, via)  # fmt: skip
                    pending = (rows, executor.submit(_build_and_send, *send))
                if inflight is not None:
                    inflight = None  # its reply is in: nothing of it is in flight now
                    published, positions_now, lost = _mark(
                        conn, redis_client, producer, batch, replies, recorded
                    )
                else:
                    published, positions_now, lost = [], {}, {}
        except BaseException:
            for flight in (inflight, pending):
                if flight is not None:
                    wait([flight[1]])  # the thread is done with Redis before we go on
            raise
        recorded.update(positions_now)  # committed
        if published:
            _observe(producer, [row[3] for row in published])
            total += len(published)
            on_commit(len(published))
        if claim:
            full = len(rows) == batch_size  # the last claim found a full batch: likely more
        inflight = pending
        if inflight is None:
            # a stream was repaired (its rows go next), or the time ran out with a backlog:
            # the caller comes back at once
            return total, bool(lost) or full
        claim = full and time.monotonic() < deadline


def _build_and_send(
    rows: list[tuple],
    producer: str,
    partitions: int,
    client: redis.Redis,
    recorded: dict[str, str],
    durability: Durability,
    wait_timeout_ms: int,
    via: redis_client.HeldConnection | None = None,
) -> tuple[_Batch, dict[str, list]]:
    """One batch's entries and their pipeline (on drain()'s thread, when it overlaps)."""
    batch = _build(rows, producer, partitions)
    replies = _send(client, batch.by_stream, recorded, durability, wait_timeout_ms, producer, via)
    return batch, replies


def _build(rows: list[tuple], producer: str, partitions: int) -> _Batch:
    """Each row's stream entry, grouped by partition stream (in id order within each)."""
    base = STREAM_OF_PRODUCER[producer]
    names = [partition_stream(base, p) for p in range(partitions)]
    by_stream: dict[str, list[tuple[int, list[str]]]] = {}
    spans: dict[str, list] = {}
    tracing_on = tracing.ENABLED
    for (
        row_id,
        agg_id,
        traceparent,
        _created,
        event_id,
        event_type,
        version,
        agg_type,
        correlation,
        causation,
        occurred_at,
        payload,
    ) in rows:
        stream = names[partition_of(agg_id, partitions)]
        fields = [
            "event_id", event_id,
            "event_type", event_type,
            "event_version", version,
            "aggregate_type", agg_type,
            "aggregate_id", agg_id,
            "correlation_id", correlation,
            "causation_id", causation,
            "occurred_at", occurred_at,
            "producer", producer,
            "payload", payload,
        ]  # fmt: skip
        if tracing_on or traceparent:
            trace_fields = tracing.publish_context(
                spans.setdefault(stream, []), stream, traceparent, event_type, agg_id
            )
            for name, value in trace_fields.items():
                fields += (name, value)
        by_stream.setdefault(stream, []).append((row_id, fields))
    return _Batch(rows, by_stream, spans)


def _mark(
    conn: psycopg.Connection,
    redis_client: redis.Redis,
    producer: str,
    batch: _Batch,
    replies: dict[str, list],
    recorded: Mapping[str, str],
) -> tuple[list[tuple], dict[str, str], dict[str, str]]:
    """In the caller's transaction: mark the rows Redis took published and record each
    stream's highest entry id; repair the streams found behind. Returns (the rows marked,
    stream -> the position now recorded (for `recorded`, once committed), stream -> Redis's
    last id where it was behind)."""
    ids, marks, highest, lost = _marks_of(batch, replies)
    if ids:
        conn.execute(_MARK_PUBLISHED, marks)
    positions.repair(conn, redis_client, producer, lost, recorded)
    rows = batch.rows
    if lost:
        published = set(ids)
        rows = [row for row in rows if row[0] in published]
    return rows, highest | lost, lost


def _marks_of(
    batch: _Batch, replies: dict[str, list]
) -> tuple[list[int], tuple[str, ...], dict[str, str], dict[str, str]]:
    """(the ids Redis took, the parameters of their mark (_MARK_CTES), each stream's highest
    entry id, stream -> Redis's last id where it was behind). Ends the batch's PRODUCER spans."""
    ids: list[int] = []
    streams: list[str] = []
    entries: list[str] = []
    highest: dict[str, str] = {}
    lost: dict[str, str] = {}
    for stream, reply in replies.items():
        tracing.end_publish_spans(batch.spans.get(stream, []), reply[1:] if reply[0] else [])
        if reply[0] == 0:
            lost[stream] = reply[1]
            continue
        for (row_id, _fields), entry_id in zip(batch.by_stream[stream], reply[1:], strict=True):
            ids.append(row_id)
            streams.append(stream)
            entries.append(entry_id)
        highest[stream] = reply[-1]
    marks = (
        ",".join(map(str, ids)),
        ",".join(streams),
        ",".join(entries),
        ",".join(highest),
        ",".join(highest.values()),
    )
    return ids, marks, highest, lost


def _send(
    client: redis.Redis,
    by_stream: dict[str, list[tuple[int, list[str]]]],
    recorded: dict[str, str],
    durability: Durability,
    wait_timeout_ms: int,
    producer: str,
    via: redis_client.HeldConnection | None = None,
) -> dict[str, list]:
    """One round trip: a checked XADD script per stream, then the durability wait (on a
    cluster, redis-py's cluster pipeline, one round trip per node, and a WAIT per node)."""
    # EVAL as a plain command: a cluster pipeline routes it by its key (its eval() is disabled)
    commands = [
        ["EVAL", _CHECKED_XADD, 1, stream, recorded.get(stream, "0-0"), _entries_json(entries)]
        for stream, entries in by_stream.items()
    ]
    wait = durability.wait_command(wait_timeout_ms)
    cluster = redis_client.is_cluster(client)
    if cluster:
        pipe = client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        replies = pipe.execute()
    else:
        # the same connection as the writes, so WAIT counts them; without a Pipeline's
        # per-call cost (redis_client.send_together)
        commands += [wait] if wait else []
        replies = (
            via.send_together(commands) if via else redis_client.send_together(client, commands)
        )
    if wait:
        try:
            if cluster:
                _wait_on_nodes(client, list(by_stream), wait, durability)
            else:
                durability.check_reply(replies[-1])
        except NotDurable as err:
            RELAY_NOT_DURABLE.labels(producer).inc()
            raise NotDurable(f"{len(by_stream)} streams: {err}") from None
        except redis.ResponseError as err:
            RELAY_NOT_DURABLE.labels(producer).inc()
            raise NotDurable(str(err)) from err
    return dict(zip(by_stream, replies[: len(by_stream)], strict=True))


def _entries_json(entries: list[tuple[int, list[str]]]) -> str:
    return json.dumps([fields for _id, fields in entries], ensure_ascii=False)


def _wait_on_nodes(
    client: redis.RedisCluster, streams: list[str], wait: tuple, durability: Durability
) -> None:
    """On a cluster, WAIT on each node the batch wrote to. redis-py hands a single-threaded
    caller the connection it just released (each node's pool is LIFO), so the WAIT runs on the
    connection that carried that node's writes."""
    nodes = {
        client.get_node_from_key(stream).name: client.get_node_from_key(stream)
        for stream in streams
    }
    for name, node in nodes.items():
        durability.check_reply(client.execute_command(*wait, target_nodes=node), f" on {name}")


def _observe(producer: str, created: list[float], sent_at: float | None = None) -> None:
    """RELAY_LATENCY (each row's age when Redis took it, by default now: its created_at is as
    good as its commit time), RELAY_PUBLISHED and RELAY_BATCH_SIZE for one published batch."""
    at = time.time() if sent_at is None else sent_at
    observe_many(RELAY_LATENCY.labels(producer), [at - epoch for epoch in created])
    RELAY_PUBLISHED.labels(producer).inc(len(created))
    RELAY_BATCH_SIZE.labels(producer).observe(len(created))
