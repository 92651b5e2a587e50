"""PartitionWorker against real Redis and PostgreSQL: inbox dedup, XACK after commit, restart,
a new owner taking over, fencing of an owner that lost its lease, dead letters, conflicts
(a real deadlock between two partitions' batches), outages, and inventory's per-order lock.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import redis
from prometheus_client import REGISTRY

from contracts import (
    ORDERS_EVENTS,
    Envelope,
    encode_entry,
    partition_of,
    partition_stream,
)
from inventory_service import storage as inventory_storage
from inventory_service.reactions import HANDLERS as INVENTORY_HANDLERS
from service_runtime.consumer import ConsumerSettings, PartitionWorker
from service_runtime.ownership import LostOwnership, PartitionLeases
from service_runtime.stream_fence import Fenced, StreamFence
from service_runtime.unit_of_work import unit_of_work
from tests.helpers import order_placed_envelope, order_placed_payload, wait_until
from tests.partition_steps import drain, own_partitions

GROUP = "inventory"
PARTITIONS = 2


@pytest.fixture
def effects(db) -> Iterator[None]:
    """A scratch table the test handlers write to: one row per application of an event."""
    db.execute(
        "CREATE TABLE test_effects (id bigserial PRIMARY KEY, event_id uuid NOT NULL,"
        " note text NOT NULL DEFAULT '')"
    )
    yield
    db.execute("DROP TABLE test_effects")


pytestmark = pytest.mark.usefixtures("effects")


def applied(db, event_id: str | None = None) -> int:
    if event_id is None:
        return db.execute("SELECT count(*) FROM test_effects").fetchone()[0]
    return db.execute(
        "SELECT count(*) FROM test_effects WHERE event_id = %s", (event_id,)
    ).fetchone()[0]


def applied_order(db) -> list[str]:
    return [row[0] for row in db.execute("SELECT event_id::text FROM test_effects ORDER BY id")]


def inbox_rows(db) -> list[tuple]:
    return db.execute(
        "SELECT consumer_group, event_id::text, event_type, stream, entry_id FROM inbox"
        " ORDER BY processed_at"
    ).fetchall()


def failures(db) -> dict[str, int]:
    return dict(db.execute("SELECT entry_id, attempts FROM delivery_failures").fetchall())


def order_in(partition: int, partitions: int = PARTITIONS) -> str:
    while partition_of(order_id := str(uuid.uuid4()), partitions) != partition:
        pass
    return order_id


def envelope(event_type: str = "OrderPlaced", partition: int = 0, sku: str = "SKU-1") -> Envelope:
    order_id = order_in(partition)
    payload: dict[str, Any] = order_placed_payload(order_id)
    payload["items"] = [{"sku": sku, "quantity": 1}]
    if event_type == "OrderCancelled":
        payload = {"order_id": order_id, "reason": "customer_request"}
    return Envelope(
        event_id=str(uuid.uuid4()),
        event_type=event_type,
        event_version=1,
        aggregate_type="order",
        aggregate_id=order_id,
        correlation_id=str(uuid.uuid4()),
        causation_id=None,
        occurred_at=datetime.now(UTC).isoformat(),
        producer="orders",
        payload=payload,
    )


def stream_of(env: Envelope, partitions: int = PARTITIONS) -> str:
    return partition_stream(ORDERS_EVENTS, partition_of(env.aggregate_id, partitions))


def publish(redis_client, env: Envelope) -> str:
    return redis_client.xadd(stream_of(env), encode_entry(env))


def record(uow, env: Envelope) -> None:
    uow.execute("INSERT INTO test_effects (event_id) VALUES (%s)", (env.event_id,))


class Flaky:
    """Writes its effect, then fails while `failing` is set (the write must be rolled back)."""

    def __init__(self, failing: bool = True) -> None:
        self.failing = failing
        self.calls: list[str] = []

    def __call__(self, uow, env: Envelope) -> None:
        self.calls.append(env.event_id)
        record(uow, env)
        if self.failing:
            raise RuntimeError("flaky handler")


def pending(redis_client, partition: int = 0) -> list[dict]:
    stream = partition_stream(ORDERS_EVENTS, partition)
    return redis_client.xpending_range(stream, GROUP, "-", "+", 100)


def pending_ids(redis_client, partition: int = 0) -> list[str]:
    return [info["message_id"] for info in pending(redis_client, partition)]


def dead_letters(db, partition: int = 0) -> list[dict[str, str]]:
    """The group's dead letters of a partition, from its own database (their records)."""
    return [
        row[0]
        for row in db.execute(
            "SELECT fields FROM dead_letters WHERE consumer_group = %s AND partition = %s"
            " ORDER BY id",
            (GROUP, partition),
        )
    ]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def make_worker(redis_client, pool) -> Callable[..., PartitionWorker]:
    """A worker owning one partition through a real lease (own_partitions), like
    StreamConsumer does on acquiring it."""

    def make(
        handlers: dict[str, Any],
        partition: int = 0,
        lease_seconds: float = 3600,
        worker_pool: Any = None,
        lock_orders: bool = False,
        **overrides: Any,
    ) -> PartitionWorker:
        values: dict[str, Any] = dict(
            group=GROUP,
            consumer="c1",
            partitions=PARTITIONS,
            block_ms=100,
            retry_base_ms=0,
            max_deliveries=3,
        )
        values.update(overrides)
        # a previous owner of the partition in this test is gone: its lease has run out
        with pool.connection() as conn:
            conn.execute(
                "UPDATE partition_leases SET expires_at = clock_timestamp()"
                " WHERE consumer_group = %s AND partition = %s",
                (values["group"], partition),
            )
        [worker] = own_partitions(
            redis_client,
            worker_pool or pool,
            ConsumerSettings(**values),
            handlers,
            [partition],
            lease_seconds=lease_seconds,
            lock_orders=lock_orders,
        )
        return worker

    return make


def take_over(
    redis_client, pool, worker_pool: Any, handlers: dict[str, Any], partition: int, **overrides: Any
) -> PartitionWorker:
    """A second consumer acquiring the partition once the first one's lease has expired."""
    settings = ConsumerSettings(
        group=GROUP, consumer="new", partitions=PARTITIONS, retry_base_ms=0, **overrides
    )
    leases = PartitionLeases(GROUP, "new", 3600)
    with pool.connection() as conn:
        lease = wait_until(lambda: leases.acquire(conn, partition), timeout=15)
    fence_ops = StreamFence(redis_client)
    assert fence_ops.claim(GROUP, partition, lease.epoch)
    worker = PartitionWorker(redis_client, fence_ops, worker_pool, settings, handlers, lease)
    worker.ensure_groups()
    worker.take_over_pending()
    return worker


# -- inbox ---------------------------------------------------------------------------------


def test_the_same_event_delivered_twice_applies_once(db, redis_client, make_worker) -> None:
    outcomes: list[str] = []
    worker = make_worker({"OrderPlaced": record})
    worker._on_outcome = lambda _t, outcome, _s: outcomes.append(outcome)
    env = envelope()
    first = publish(redis_client, env)
    publish(redis_client, env)  # the relay's crash duplicate: same event, new entry

    assert worker.step() == 2

    assert applied(db, env.event_id) == 1
    assert inbox_rows(db) == [(GROUP, env.event_id, "OrderPlaced", stream_of(env), first)]
    assert pending(redis_client) == []
    assert outcomes == ["processed", "duplicate"]


def test_dedup_is_per_group(db, redis_client, make_worker) -> None:
    env = envelope()
    publish(redis_client, env)
    make_worker({"OrderPlaced": record}).step()
    make_worker({"OrderPlaced": record}, group="billing").step()
    assert applied(db, env.event_id) == 2  # two services' reactions (sharing a test database)
    assert sorted(row[0] for row in inbox_rows(db)) == ["billing", GROUP]


# -- XACK only after commit ------------------------------------------------------------------


def test_a_failing_handler_leaves_the_entry_pending_and_nothing_written(
    db, redis_client, make_worker
) -> None:
    handler = Flaky()
    worker = make_worker({"OrderPlaced": handler})
    env = envelope()
    entry_id = publish(redis_client, env)

    worker.step()
    assert applied(db) == 0
    assert inbox_rows(db) == []
    assert failures(db) == {entry_id: 1}
    [info] = pending(redis_client)
    assert (info["message_id"], info["consumer"], info["times_delivered"]) == (entry_id, "c1", 1)

    handler.failing = False
    assert worker.step() == 1
    assert applied(db, env.event_id) == 1
    assert len(inbox_rows(db)) == 1
    assert failures(db) == {}  # forgotten in the transaction that finished it
    assert pending(redis_client) == []
    assert worker.step() == 0
    assert applied(db, env.event_id) == 1


def test_a_failed_commit_is_not_acknowledged_and_its_culprit_is_found_alone(
    db, redis_client, make_worker
) -> None:
    """The handlers return normally but the COMMIT fails (a deferred constraint): no XACK;
    the entries before the culprit commit, the culprit is counted, the rest waits."""
    db.execute(
        "ALTER TABLE test_effects ADD CONSTRAINT one_per_event UNIQUE (event_id)"
        " DEFERRABLE INITIALLY DEFERRED"
    )
    events = [envelope() for _ in range(3)]
    culprit = events[1].event_id

    def twice_for_the_culprit(uow, env: Envelope) -> None:
        record(uow, env)
        if env.event_id == culprit:
            record(uow, env)  # violates the constraint, but only at commit time

    worker = make_worker({"OrderPlaced": twice_for_the_culprit}, retry_base_ms=60_000)
    ids = [publish(redis_client, env) for env in events]

    worker.step()
    assert applied_order(db) == [events[0].event_id]
    assert pending_ids(redis_client) == ids[1:]
    assert failures(db) == {ids[1]: 1}

    worker.handlers = {"OrderPlaced": record}  # "fixed and redeployed"
    worker.retry = None  # (instead of waiting a minute for the backoff)
    while worker.step():
        pass
    assert pending(redis_client) == []
    assert applied_order(db) == [env.event_id for env in events]


# -- the handler's own events ----------------------------------------------------------------


def reserve(uow, env: Envelope) -> None:
    record(uow, env)
    uow.emit(
        "StockReservationFailed",
        aggregate_type="order",
        aggregate_id=env.aggregate_id,
        payload={"order_id": env.aggregate_id, "reason": "unknown_sku", "shortages": []},
    )


def outbox_rows(db) -> list[tuple]:
    return db.execute(
        "SELECT event_type, correlation_id::text, causation_id::text FROM outbox"
    ).fetchall()


def test_the_handlers_outbox_rows_commit_with_the_inbox_row(db, redis_client, make_worker) -> None:
    worker = make_worker({"OrderPlaced": reserve})
    env = envelope()
    publish(redis_client, env)
    publish(redis_client, env)

    worker.step()

    assert outbox_rows(db) == [("StockReservationFailed", env.correlation_id, env.event_id)]
    assert [row[1] for row in inbox_rows(db)] == [env.event_id]
    assert applied(db, env.event_id) == 1


def test_a_failing_handlers_outbox_rows_roll_back_with_everything_else(
    db, redis_client, make_worker
) -> None:
    failing = {"on": True}

    def reserve_then_fail(uow, env: Envelope) -> None:
        reserve(uow, env)
        if failing["on"]:
            raise RuntimeError("after emitting")

    worker = make_worker({"OrderPlaced": reserve_then_fail})
    env = envelope()
    publish(redis_client, env)
    worker.step()
    assert outbox_rows(db) == []
    assert inbox_rows(db) == []
    assert applied(db) == 0

    failing["on"] = False
    assert worker.step() == 1
    assert outbox_rows(db) == [("StockReservationFailed", env.correlation_id, env.event_id)]
    assert len(inbox_rows(db)) == 1


# -- dead letters ----------------------------------------------------------------------------


def test_a_handler_that_always_fails_is_dead_lettered_then_the_partition_flows_on(
    db, redis_client, make_worker
) -> None:
    poison = Flaky()
    worker = make_worker({"OrderPlaced": poison, "OrderCancelled": record}, max_deliveries=3)
    bad = envelope("OrderPlaced")
    bad_id = publish(redis_client, bad)
    good = [envelope("OrderCancelled") for _ in range(2)]
    for env in good:
        publish(redis_client, env)

    drain([worker])

    assert poison.calls == [bad.event_id] * 3
    [letter] = dead_letters(db)
    for name, value in encode_entry(bad).items():
        assert letter[name] == value
    assert letter["original_stream"] == stream_of(bad)
    assert letter["original_id"] == bad_id
    assert letter["group"] == GROUP
    assert letter["attempts"] == "3"
    assert letter["error"] == "RuntimeError: flaky handler"
    assert pending(redis_client) == []
    assert applied_order(db) == [env.event_id for env in good]  # after the poison, in order
    assert bad.event_id not in [row[1] for row in inbox_rows(db)]


def test_a_contract_invalid_entry_is_dead_lettered_at_once(db, redis_client, make_worker) -> None:
    worker = make_worker({"OrderPlaced": record})
    env = envelope()
    fields = encode_entry(env)
    fields["event_id"] = "not-a-uuid"
    entry_id = redis_client.xadd(stream_of(env), fields)
    worker.step()
    [letter] = dead_letters(db)
    assert letter["original_id"] == entry_id
    assert letter["attempts"] == "1"
    assert letter["error"].startswith("contract: event_id is not a UUID")
    assert pending(redis_client) == []
    assert applied(db) == 0
    assert inbox_rows(db) == []
    assert failures(db) == {}


# -- restarts, takeovers and fencing ---------------------------------------------------------


def test_own_pending_entries_are_processed_after_a_restart(db, redis_client, make_worker) -> None:
    make_worker({})  # groups exist
    events = [envelope() for _ in range(3)]
    for env in events:
        publish(redis_client, env)
    # "c1" receives the entries and dies before handling/acknowledging any of them
    redis_client.xreadgroup(GROUP, "c1", {stream_of(events[0]): ">"}, count=10)
    assert len(pending(redis_client)) == 3

    restarted = make_worker({"OrderPlaced": record}, consumer="c1", batch_size=2)
    assert drain([restarted]) == 3
    assert applied_order(db) == [env.event_id for env in events]
    assert pending(redis_client) == []


def test_a_paused_owner_whose_lease_was_taken_cannot_commit_or_read_and_the_new_owner_finishes(
    db, redis_client, pool, make_worker
) -> None:
    handler = Flaky()
    old = make_worker({"OrderPlaced": handler}, consumer="old", lease_seconds=0.5)
    events = [envelope() for _ in range(3)]
    ids = [publish(redis_client, env) for env in events]
    old.step()  # reads all three; the first fails and blocks the others
    assert pending_ids(redis_client) == ids
    assert failures(db) == {ids[0]: 1}

    # "old" pauses; its lease runs out and another consumer acquires the partition in the
    # database, but has not yet set its epoch on the Redis fence
    leases = PartitionLeases(GROUP, "new", 3600)
    lease = wait_until(lambda: leases.acquire(db, 0), timeout=15)
    assert lease.epoch == old.lease.epoch + 1
    handler.failing = False
    with pytest.raises(LostOwnership):
        old.step()  # its retry is due: the read passes, the transaction's fence does not
    assert applied(db) == 0 and inbox_rows(db) == []
    assert failures(db) == {ids[0]: 1}
    assert pending_ids(redis_client) == ids  # nothing acknowledged
    assert {info["consumer"] for info in pending(redis_client)} == {"old"}

    fence_ops = StreamFence(redis_client)
    assert fence_ops.claim(GROUP, 0, lease.epoch)
    with pytest.raises(Fenced):
        old.step()

    new = PartitionWorker(
        redis_client,
        fence_ops,
        pool,
        ConsumerSettings(group=GROUP, consumer="new", partitions=PARTITIONS, retry_base_ms=0),
        {"OrderPlaced": record},
        lease,
    )
    new.ensure_groups()
    assert new.take_over_pending() == 3
    later = envelope()
    publish(redis_client, later)
    drain([new])
    assert applied_order(db) == [env.event_id for env in [*events, later]]  # id order
    assert pending(redis_client) == []
    assert failures(db) == {}


def test_entries_a_paused_owner_read_after_the_takeover_are_applied_in_order_by_the_new_owner(
    db, redis_client, pool, make_worker
) -> None:
    """The old owner's read runs after the new owner has taken the partition over (it was
    paused just before sending it): the read takes entries into its pending list and tells it
    that it is fenced, so it handles none. The new owner claims them at its next read and
    applies every event once, in stream order."""
    old = make_worker({"OrderPlaced": record}, consumer="old", lease_seconds=0.5)
    assert old.step() == 0  # caught up: its next read takes new entries
    new = take_over(redis_client, pool, pool, {"OrderPlaced": record}, 0)
    assert new.step() == 0
    events = [envelope() for _ in range(4)]
    ids = [publish(redis_client, env) for env in events[:2]]
    with pytest.raises(Fenced):
        old.step()  # the stale read
    assert pending_ids(redis_client) == ids
    assert {info["consumer"] for info in pending(redis_client)} == {"old"}
    ids += [publish(redis_client, env) for env in events[2:]]
    drain([new])
    assert applied_order(db) == [env.event_id for env in events]
    assert len(inbox_rows(db)) == 4
    assert pending(redis_client) == []


def blocked_clients(redis_client, stream: str) -> int:
    """Clients blocked (XREADGROUP BLOCK) on the Redis serving `stream`: on a cluster, its
    slot's node."""
    if isinstance(redis_client, redis.RedisCluster):
        node = redis_client.get_node_from_key(stream)
        return redis_client.info("clients", target_nodes=node)["blocked_clients"]
    return redis_client.info("clients")["blocked_clients"]


def test_a_read_blocked_when_the_partition_moved_is_fenced_and_the_new_owner_catches_up_in_order(
    db, redis_client, pool, make_worker, caplog
) -> None:
    """The old owner is blocked in its read (XREADGROUP BLOCK) when its lease expires and the
    new owner takes over and blocks too. Redis serves the longest-blocked client first: the old
    owner takes the next entry, learns from the same reply that it is fenced, and handles
    nothing. The new owner's next read (at the latest when its block ends) finds that entry
    pending with the old owner, claims it, and applies every event once, in stream order."""
    events = [envelope() for _ in range(4)]
    stream = stream_of(events[0])
    old = make_worker({"OrderPlaced": record}, consumer="old", lease_seconds=0.5)
    assert old.step() == 0
    outcome: list[BaseException | int] = []

    def blocked_read() -> None:
        try:
            outcome.append(old.step(block_ms=30_000))
        except Fenced as err:
            outcome.append(err)

    before = blocked_clients(redis_client, stream)
    stale = threading.Thread(target=blocked_read)
    stale.start()
    stop = threading.Event()
    running = threading.Thread()
    try:
        wait_until(lambda: blocked_clients(redis_client, stream) == before + 1)
        new = take_over(redis_client, pool, pool, {"OrderPlaced": record}, 0, block_ms=200)
        running = threading.Thread(target=new.run, args=(stop,))
        running.start()
        wait_until(lambda: blocked_clients(redis_client, stream) == before + 2)
        with caplog.at_level(logging.WARNING):
            publish(redis_client, events[0])
            stale.join(timeout=15)
            assert not stale.is_alive() and isinstance(outcome[0], Fenced)
            for env in events[1:]:
                publish(redis_client, env)
            wait_until(lambda: applied(db) == 4, timeout=15)
        assert "entries pending with another consumer" in caplog.text
        assert applied_order(db) == [env.event_id for env in events]
        wait_until(lambda: pending(redis_client) == [])
    finally:
        if stale.is_alive():  # failed before it was served: an entry ends its block
            publish(redis_client, envelope())
            stale.join(timeout=15)
        stop.set()
        if running.is_alive():
            running.join(timeout=15)


def test_attempts_are_counted_across_owners_and_the_new_owner_dead_letters_at_the_maximum(
    db, redis_client, pool, make_worker
) -> None:
    handler = Flaky()
    old = make_worker({"OrderPlaced": handler}, consumer="old", lease_seconds=0.5, max_deliveries=3)
    env = envelope()
    entry_id = publish(redis_client, env)
    old.step()
    old.step()
    assert failures(db) == {entry_id: 2}

    new = take_over(redis_client, pool, pool, {"OrderPlaced": handler}, 0, max_deliveries=3)
    assert pending(redis_client)[0]["consumer"] == "new"
    new.step()  # the third attempt overall: the last one
    [letter] = dead_letters(db)
    assert (letter["original_id"], letter["attempts"]) == (entry_id, "3")
    assert pending(redis_client) == []
    assert applied(db) == 0
    with pytest.raises(Fenced):
        old.step()


def test_a_trimmed_pending_entry_is_acked_logged_and_counted_as_gone(
    db, redis_client, make_worker, caplog
) -> None:
    make_worker({})
    events = [envelope() for _ in range(2)]
    ids = [publish(redis_client, env) for env in events]
    stream = stream_of(events[0])
    redis_client.xreadgroup(GROUP, "c1", {stream: ">"}, count=10)
    redis_client.xdel(stream, ids[0])  # trimmed while pending
    gone = sample("saga_consumer_events_total", group=GROUP, event_type="?", outcome="gone")

    restarted = make_worker({"OrderPlaced": record})
    with caplog.at_level(logging.ERROR):
        assert drain([restarted]) == 2

    assert pending(redis_client) == []
    assert applied_order(db) == [events[1].event_id]
    assert f"pending entry {ids[0]} of {stream} no longer exists" in caplog.text
    assert (
        sample("saga_consumer_events_total", group=GROUP, event_type="?", outcome="gone")
        == gone + 1
    )


# -- ordering across partitions --------------------------------------------------------------


def test_a_failing_entry_blocks_its_partition_while_the_other_partition_flows(
    db, redis_client, make_worker
) -> None:
    handler = Flaky(failing=False)
    p0 = make_worker({"OrderPlaced": handler}, partition=0, retry_base_ms=60_000)
    p1 = make_worker({"OrderPlaced": handler}, partition=1, retry_base_ms=60_000)
    blocked = envelope(partition=0)
    behind = envelope(partition=0)
    others = [envelope(partition=1) for _ in range(3)]

    def fail_blocked(uow, env: Envelope) -> None:
        if env.event_id == blocked.event_id:
            raise RuntimeError("not yet")
        record(uow, env)

    p0.handlers = {"OrderPlaced": fail_blocked}
    publish(redis_client, blocked)
    publish(redis_client, behind)
    for env in others:
        publish(redis_client, env)

    drain([p0, p1])

    assert applied_order(db) == [env.event_id for env in others]
    assert applied(db, behind.event_id) == 0
    assert len(pending(redis_client, 0)) == 2
    assert pending(redis_client, 1) == []


# -- conflicts (issue 8, defect 3) ----------------------------------------------------------


@pytest.fixture
def counters(db) -> Iterator[None]:
    db.execute("CREATE TABLE test_counters (key text PRIMARY KEY, n integer NOT NULL)")
    db.execute("INSERT INTO test_counters VALUES ('x', 0), ('y', 0)")
    yield
    db.execute("DROP TABLE test_counters")


@pytest.mark.usefixtures("counters")
def test_a_real_deadlock_between_two_partitions_batches_resolves_as_a_conflict(
    db, redis_client, make_worker, db_url, caplog
) -> None:
    """Partition 0's batch locks x then y, partition 1's locks y then x: PostgreSQL aborts
    one (40P01). The victim retries its entries at once, one per transaction, counts a
    conflict, logs no outage and counts no failed attempt; every effect lands exactly once."""
    from service_runtime.db import create_pool

    rendezvous = threading.Barrier(2, timeout=30)
    first_of_batch: set[str] = set()

    def touch(uow, env: Envelope) -> None:
        sku = env.payload["items"][0]["sku"]
        uow.execute("UPDATE test_counters SET n = n + 1 WHERE key = %s", (sku,))
        if env.event_id in first_of_batch:
            first_of_batch.discard(env.event_id)
            rendezvous.wait()  # both batches hold their first lock: now cross

    pools = [create_pool(db_url, name=f"deadlock-{i}", max_size=2) for i in range(2)]
    try:
        workers = [
            make_worker(
                {"OrderPlaced": touch},
                partition=p,
                consumer=f"c{p}",
                worker_pool=pools[p],
                max_deliveries=1,  # a counted failure would dead-letter at once
                retry_base_ms=60_000,
            )
            for p in (0, 1)
        ]
        batches = [
            [envelope(partition=0, sku="x"), envelope(partition=0, sku="y")],
            [envelope(partition=1, sku="y"), envelope(partition=1, sku="x")],
        ]
        first_of_batch.update(batch[0].event_id for batch in batches)
        for batch in batches:
            for env in batch:
                publish(redis_client, env)
        conflicts = sample("saga_consumer_conflicts_total", group=GROUP)
        outages = sample("saga_consumer_outages_total", group=GROUP)
        errors: list[BaseException] = []

        def run(worker: PartitionWorker) -> None:
            try:
                worker.step()
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=run, args=(w,), daemon=True) for w in workers]
        with caplog.at_level(logging.INFO):
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
        assert not any(thread.is_alive() for thread in threads)
        assert errors == []
    finally:
        for p in pools:
            p.close()

    assert sample("saga_consumer_conflicts_total", group=GROUP) == conflicts + 1
    assert sample("saga_consumer_outages_total", group=GROUP) == outages
    assert dict(db.execute("SELECT key, n FROM test_counters").fetchall()) == {"x": 2, "y": 2}
    assert len(inbox_rows(db)) == 4
    assert failures(db) == {}
    assert dead_letters(db, 0) == [] and dead_letters(db, 1) == []
    assert pending(redis_client, 0) == [] and pending(redis_client, 1) == []
    assert "deadlock detected" in caplog.text
    assert "waiting for dependencies" not in caplog.text


# -- outages -------------------------------------------------------------------------------


class SwitchablePool:
    """The real pool, or, while `down` is set, a connection error without SQLSTATE."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.down = threading.Event()
        self.refused = 0

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        if self.down.is_set():
            self.refused += 1
            raise psycopg.OperationalError("connection to server failed: Connection refused")
        with self.pool.connection() as conn:
            yield conn


def test_a_database_outage_costs_no_attempt_and_the_loop_resumes(
    db, redis_client, pool, make_worker, background, caplog
) -> None:
    switch = SwitchablePool(pool)
    worker = make_worker(
        {"OrderPlaced": record}, worker_pool=switch, max_deliveries=1, outage_max_backoff_ms=100
    )
    env = envelope()
    switch.down.set()
    entry_id = publish(redis_client, env)
    outages = sample("saga_consumer_outages_total", group=GROUP)

    with caplog.at_level(logging.WARNING):
        background.start("worker", worker.run)
        wait_until(lambda: switch.refused >= 3)
        # down: not dead-lettered although max_deliveries is 1, nothing counted, still pending
        assert dead_letters(db) == []
        assert failures(db) == {}
        assert pending_ids(redis_client) == [entry_id]
        switch.down.clear()
        wait_until(lambda: applied(db, env.event_id) == 1, timeout=30)
    assert sample("saga_consumer_outages_total", group=GROUP) >= outages + 3
    assert "waiting for dependencies" in caplog.text
    wait_until(lambda: pending(redis_client) == [])
    assert failures(db) == {} and dead_letters(db) == []


def test_run_consumes_until_stopped(db, redis_client, make_worker, background) -> None:
    worker = make_worker({"OrderPlaced": record})
    runner = background.start("worker", worker.run)
    events = [envelope() for _ in range(5)]
    for env in events:
        publish(redis_client, env)
    wait_until(lambda: applied(db) == 5)
    assert applied_order(db) == [env.event_id for env in events]
    wait_until(lambda: pending(redis_client) == [])

    runner.stop.set()
    wait_until(runner.finished.is_set)
    assert runner.error is None


def test_a_caught_up_worker_reads_again_what_a_lagging_redis_must_deliver_again(
    db, redis_client, make_worker, background
) -> None:
    """A failover to a replica that lagged: the group's last-delivered-id goes back below
    entries of the stream, with nothing newer coming. A caught-up worker's next read of new
    entries (`>`, when its block ends) starts from the group's last-delivered-id, so it reads
    them again; the inbox absorbs them."""
    worker = make_worker({"OrderPlaced": record})
    runner = background.start("worker", worker.run)
    events = [envelope() for _ in range(3)]
    ids = [publish(redis_client, env) for env in events]
    wait_until(lambda: applied(db) == 3 and pending(redis_client) == [])
    stream = stream_of(events[0])
    duplicates = sample("saga_consumer_events_total", group=GROUP, event_type="OrderPlaced",
                        outcome="duplicate")  # fmt: skip

    # what the replica had: the group's last-delivered-id at the first entry
    redis_client.xgroup_setid(stream, GROUP, ids[0])

    def delivered_again() -> bool:
        [group] = [g for g in redis_client.xinfo_groups(stream) if g["name"] == GROUP]
        return group["last-delivered-id"] == ids[-1] and pending(redis_client) == []

    wait_until(delivered_again, timeout=10, message="the undelivered entries were not read")
    assert applied(db) == 3  # the inbox absorbed them
    assert (
        sample(
            "saga_consumer_events_total", group=GROUP, event_type="OrderPlaced", outcome="duplicate"
        )
        == duplicates + 2
    )
    runner.stop.set()
    wait_until(runner.finished.is_set)
    assert runner.error is None


# -- inventory's per-order lock (issue 8, defect 1) -----------------------------------------


@pytest.mark.parametrize("lock_orders", [True, False])
def test_the_consumer_takes_each_entrys_order_lock_with_its_first_statement(
    db, redis_client, make_worker, lock_orders
) -> None:
    """LOCK_ORDERS (inventory's and billing's reactions): the transaction's first statement
    takes the order lock of each entry of the batch, the same lock as locks.lock_order, so
    another transaction cannot take it before the handler runs; the handler's own
    uow.lock_order then sends nothing. Without it the handler takes the lock itself."""
    seen: list[tuple[bool, bool]] = []

    def handler(uow, env: Envelope) -> None:
        order_id = env.payload["order_id"]
        # db, another session (autocommit): it can take the lock only while nobody holds it
        free = db.execute(
            "SELECT pg_try_advisory_xact_lock(1, hashtext(%s))", (order_id,)
        ).fetchone()[0]
        uow.lock_order(order_id)
        after = db.execute(
            "SELECT pg_try_advisory_xact_lock(1, hashtext(%s))", (order_id,)
        ).fetchone()[0]
        seen.append((free, after))
        record(uow, env)

    worker = make_worker({"OrderPlaced": handler}, lock_orders=lock_orders)
    envs = [envelope(), envelope()]
    for env in envs:
        publish(redis_client, env)
    assert drain([worker]) == 2
    assert seen == [(not lock_orders, False), (not lock_orders, False)]
    assert applied(db) == 2


def test_order_placed_and_cancelled_handled_at_once_never_leave_stock_held(
    db, pool, monkeypatch
) -> None:
    """Two transactions of inventory handle OrderPlaced and OrderCancelled of one order at the
    same time. Each one, having found no reservation row, waits until the other one has found
    none too, or is waiting for a lock: without a lock on the order (the old FOR UPDATE on a
    row that does not exist yet) both go ahead and one of them decides on stale knowledge."""
    with unit_of_work(pool) as uow:
        inventory_storage.upsert_product(uow.conn, "apple", "apple", 100, 10)
    orders = []
    for round_ in range(3):
        order_id = str(uuid.uuid4())
        placed = order_placed_envelope(order_id, sku="apple", quantity=2)
        cancelled = dataclasses.replace(
            placed,
            event_id=str(uuid.uuid4()),
            event_type="OrderCancelled",
            payload={"order_id": order_id, "reason": "customer_request"},
        )
        pair = (placed, cancelled) if round_ % 2 else (cancelled, placed)
        _handle_at_once(db, pool, monkeypatch, pair)
        orders.append(order_id)

    for order_id in orders:
        status = db.execute(
            "SELECT status FROM reservations WHERE order_id = %s", (order_id,)
        ).fetchone()[0]
        assert status != "held", f"stock held for cancelled order {order_id}"
        emitted = [
            row[0]
            for row in db.execute(
                "SELECT event_type FROM outbox WHERE aggregate_id = %s ORDER BY id", (order_id,)
            )
        ]
        # a reservation announced is also released; nothing announced for nothing reserved
        assert emitted in ([], ["StockReserved", "StockReleased"]), emitted
    assert db.execute("SELECT available FROM products WHERE sku = 'apple'").fetchone()[0] == 10


def _handle_at_once(db, pool, monkeypatch, events: tuple[Envelope, Envelope]) -> None:
    """Handle both events in two inventory transactions at the same time; each, having found
    no reservation (OrderPlaced: the stock locked; a release: its marker written), waits until
    the other has found none too or is waiting for a lock."""
    real_lock_stock = inventory_storage.lock_stock_unless_decided
    real_release = inventory_storage.release
    pids: dict[str, int] = {}
    found_none: set[str] = set()

    def other_is_past_the_check_or_waiting(me: str) -> bool:
        other = next((name for name in pids if name != me), None)
        if other is None:
            return False
        if other in found_none:
            return True
        waiting = db.execute(
            "SELECT 1 FROM pg_locks WHERE pid = %s AND NOT granted", (pids[other],)
        ).fetchone()
        return waiting is not None

    def then_wait(found_nothing: bool) -> None:
        me = threading.current_thread().name
        if found_nothing:
            found_none.add(me)
            wait_until(lambda: other_is_past_the_check_or_waiting(me), timeout=20)

    def lock_stock_then_wait(conn: psycopg.Connection, order: str, skus) -> dict | None:
        stock = real_lock_stock(conn, order, skus)
        then_wait(stock is not None)
        return stock

    def release_then_wait(conn: psycopg.Connection, order: str, reason: str) -> list | None:
        lines = real_release(conn, order, reason)
        then_wait(lines is None)
        return lines

    monkeypatch.setattr(inventory_storage, "lock_stock_unless_decided", lock_stock_then_wait)
    monkeypatch.setattr(inventory_storage, "release", release_then_wait)
    start = threading.Barrier(2, timeout=20)
    errors: list[BaseException] = []

    def handle(env: Envelope) -> None:
        try:
            start.wait()
            with unit_of_work(pool, cause=env) as uow:
                pids[threading.current_thread().name] = uow.conn.info.backend_pid
                INVENTORY_HANDLERS[env.event_type](uow, env)
        except BaseException as err:
            errors.append(err)

    threads = [
        threading.Thread(target=handle, args=(env,), name=env.event_type, daemon=True)
        for env in events
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    monkeypatch.setattr(inventory_storage, "lock_stock_unless_decided", real_lock_stock)
    monkeypatch.setattr(inventory_storage, "release", real_release)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
