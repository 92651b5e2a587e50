"""The relay's overlapped drain (outbox_relay/publisher.py `drain`): while Redis adds one batch,
PostgreSQL claims the next and marks the previous. What each failure between those steps
leaves behind, on real PostgreSQL and Redis: every row in Redis in id order (first copies),
marked only once Redis took it, nothing lost; duplicates allowed."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
import redis

from outbox_relay import positions
from outbox_relay.publisher import drain, publish_batch
from outbox_relay.relay import Relay
from service_runtime.db import connect
from service_runtime.redis_client import flush
from tests.helpers import wait_until
from tests.integration.test_relay import (
    PARTITIONS,
    PRODUCER,
    Crash,
    outbox_ids,
    settings,
    stream_event_ids,
)

BATCH = 2


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1) as pool:
        yield pool


def drain_all(conn, client, executor, recorded=None, fault=None, partitions=PARTITIONS) -> int:
    """drain() until no full batch is left; the rows published."""
    recorded = {} if recorded is None else recorded
    kwargs = {"fault": fault} if fault else {}
    total, more = 0, True
    while more:
        sent, more = drain(
            conn,
            client,
            executor,
            producer=PRODUCER,
            partitions=partitions,
            batch_size=BATCH,
            recorded=recorded,
            **kwargs,
        )
        total += sent
    return total


def publish_rest(db, client) -> None:
    while publish_batch(db, client, producer=PRODUCER, partitions=PARTITIONS, batch_size=100):
        pass


def first_copies(event_ids: list[str]) -> list[str]:
    return list(dict.fromkeys(event_ids))


def fault_on(point: str, call: int, action) -> object:
    """A FaultPoint running `action` at the `call`-th time `point` is reached."""
    seen = {"n": 0}

    def fault(name: str) -> None:
        if name == point:
            seen["n"] += 1
            if seen["n"] == call:
                action()

    return fault


def crash() -> None:
    raise Crash("after_xadd")


def test_a_drain_publishes_a_backlog_in_id_order_and_records_every_position(
    db_url, db, redis_client, emit, executor
):
    emitted = [emit() for _ in range(7)]
    recorded: dict[str, str] = {}
    with connect(db_url) as conn:
        assert drain_all(conn, redis_client, executor, recorded, partitions=8) == 7

    assert outbox_ids(db, published=False) == []
    marked = db.execute(
        "SELECT event_id::text, published_stream, published_entry_id FROM outbox ORDER BY id"
    ).fetchall()
    in_redis: dict[str, list[tuple[str, str]]] = {}
    for stream in {stream for _, stream, _ in marked}:
        for entry_id, fields in redis_client.xrange(stream):
            in_redis.setdefault(stream, []).append((fields["event_id"], entry_id))
    for stream, entries in in_redis.items():
        # each stream: its rows in id order, each once, at the entry id recorded for it
        assert entries == [(event, entry) for event, s, entry in marked if s == stream]
    assert sorted(e for entries in in_redis.values() for e, _ in entries) == sorted(emitted)
    assert positions.load(db) == recorded == {s: e[-1][1] for s, e in in_redis.items()}


def test_a_fault_after_a_batch_was_added_leaves_it_unmarked_and_sends_nothing_newer(
    db_url, db, redis_client, emit, executor
):
    emitted = [emit() for _ in range(6)]
    with connect(db_url) as conn, pytest.raises(Crash):
        # the second batch's reply is in when the fault strikes: the first is marked by then
        drain_all(conn, redis_client, executor, fault=fault_on("after_xadd", 2, crash))

    assert stream_event_ids(redis_client) == emitted[:4]  # the third batch was never sent
    assert outbox_ids(db, published=False) == emitted[2:]

    publish_rest(db, redis_client)
    assert stream_event_ids(redis_client) == emitted[:4] + emitted[2:]  # a duplicate batch
    assert outbox_ids(db, published=False) == []


class FailingSecondBatch:
    """The Redis client, except that the second batch sent through it fails as an outage would:
    its second connection checkout on a plain Redis (the relay sends a batch on one pooled
    connection), its second pipeline on a cluster."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self.sent = 0

    def __getattr__(self, name: str):
        return getattr(self._client, name)

    @property
    def __class__(self):  # isinstance() sees a cluster client as one (the relay asks)
        return type(self._client)

    def _next_batch(self) -> None:
        self.sent += 1
        if self.sent == 2:
            raise redis.ConnectionError("Redis went away")

    @property
    def connection_pool(self):
        failing = self

        class Pool:
            def __getattr__(self, name: str):
                return getattr(failing._client.connection_pool, name)

            def get_connection(self, *args, **kwargs):
                failing._next_batch()
                return failing._client.connection_pool.get_connection(*args, **kwargs)

        return Pool()

    def pipeline(self, **kwargs):
        pipe = self._client.pipeline(**kwargs)
        execute = pipe.execute

        def failing_execute(*args, **kwargs):
            self._next_batch()
            return execute(*args, **kwargs)

        pipe.execute = failing_execute
        return pipe


def test_redis_failing_for_the_next_batch_leaves_it_and_later_ones_unpublished(
    db_url, db, redis_client, emit, executor
):
    emitted = [emit() for _ in range(6)]
    failing = FailingSecondBatch(redis_client)
    with connect(db_url) as conn, pytest.raises(redis.ConnectionError):
        drain_all(conn, failing, executor)

    assert stream_event_ids(redis_client) == emitted[:2]
    assert outbox_ids(db, published=False) == emitted[2:]  # the first batch was marked

    publish_rest(db, redis_client)
    assert stream_event_ids(redis_client) == emitted  # nothing sent twice, nothing skipped
    assert outbox_ids(db, published=False) == []


def test_the_lock_holders_session_ending_mid_drain_rolls_back_and_a_successor_resends(
    db_url, db, redis_client, emit, executor, background
):
    emitted = [emit() for _ in range(8)]

    with connect(db_url) as conn:
        assert conn.execute("SELECT pg_try_advisory_lock(7310002)").fetchone()[0]
        pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]

        def end_session() -> None:
            # after batch 1's reply and before its mark: batch 2 is sent while it fails
            with connect(db_url) as other:
                other.execute("SELECT pg_terminate_backend(%s)", (pid,))
                wait_until(
                    lambda: (
                        not other.execute(
                            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
                        ).fetchone()[0]
                    )
                )

        with pytest.raises(psycopg.OperationalError):
            drain_all(conn, redis_client, executor, fault=fault_on("after_xadd", 1, end_session))

    # nothing marked (the session's transaction went with it), nothing sent after batch 2
    assert outbox_ids(db, published=False) == emitted
    assert stream_event_ids(redis_client) == emitted[:4]

    successor = Relay(db_url, redis_client, settings(batch_size=BATCH))
    background.start("successor", successor.run)
    wait_until(lambda: outbox_ids(db, published=False) == [])
    sent = stream_event_ids(redis_client)
    assert first_copies(sent) == emitted
    assert sorted(sent) == sorted(emitted + emitted[:4])


def test_redis_losing_its_data_mid_drain_stops_the_overlap_and_resends_in_order(
    db_url, db, redis_client, emit, executor
):
    emitted = [emit() for _ in range(6)]
    recorded: dict[str, str] = {}
    with connect(db_url) as conn:
        # batch 1 is in Redis (and about to be marked) when Redis loses everything: batch 2's
        # script finds the stream behind and adds nothing; batch 3 is not sent
        drain_all(
            conn,
            redis_client,
            executor,
            recorded,
            fault=fault_on("after_xadd", 1, lambda: flush(redis_client)),
        )

    assert stream_event_ids(redis_client) == emitted  # re-sent from the lost rows on, in order
    assert outbox_ids(db, published=False) == []
    assert db.execute("SELECT losses FROM published_positions").fetchone()[0] == 1


def test_a_relay_crashing_mid_drain_is_followed_by_republishing_in_order(
    db_url, db, redis_client, emit, background
):
    emitted = [emit() for _ in range(9)]
    crashing = background.start(
        "crashing relay",
        Relay(
            db_url,
            redis_client,
            settings(batch_size=BATCH),
            fault=fault_on("after_xadd", 3, crash),
        ).run,
    )
    wait_until(crashing.finished.is_set)
    assert isinstance(crashing.error, Crash)
    # batch 1 alone, then the drain: batch 2 marked, batch 3 added but not marked
    assert stream_event_ids(redis_client) == emitted[:6]
    assert outbox_ids(db, published=False) == emitted[4:]

    successor = Relay(db_url, redis_client, settings(batch_size=BATCH))
    background.start("successor", successor.run)
    wait_until(lambda: outbox_ids(db, published=False) == [])
    sent = stream_event_ids(redis_client)
    assert first_copies(sent) == emitted
    assert sent == emitted[:6] + emitted[4:]


def test_a_partial_batch_ends_the_drain(db_url, redis_client, emit, executor):
    emitted = [emit() for _ in range(5)]
    with connect(db_url) as conn:
        sent, more = drain(
            conn,
            redis_client,
            executor,
            producer=PRODUCER,
            partitions=PARTITIONS,
            batch_size=BATCH,
            recorded={},
        )
    assert (sent, more) == (5, False)
    assert stream_event_ids(redis_client) == emitted
