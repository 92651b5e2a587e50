"""PartitionWorker's stream logic on fakeredis, with a small in-memory stand-in for its SQL.

The stand-in (FakeInboxPool) keeps what the worker's transactions touch: the lease fence
(partition -> current epoch), the inbox and delivery_failures, staged per transaction and kept
only on commit. It can simulate an outage (every checkout raises) and a failing COMMIT.
fakeredis runs the fence's claim script (lupa); it never blocks, so only `step()` is called
here, never the blocking loop. The real transactions are covered by tests/integration.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import fakeredis
import psycopg
import pytest
import redis
from prometheus_client import REGISTRY
from psycopg import errors as pg_errors

from contracts import (
    Envelope,
    encode_entry,
    group_streams,
    owner_fence_key,
    partition_of,
    partition_stream,
    redrive_stream,
)
from service_runtime.consumer import ConsumerSettings, Item, PartitionWorker
from service_runtime.failures import FailureKind, classify
from service_runtime.ownership import Lease, LostOwnership, assignment
from service_runtime.stream_fence import Fenced, StreamFence
from tests.partition_steps import drain

GROUP = "inventory"
ORDERS = "orders.events"
BILLING = "billing.events"
PARTITIONS = 2


# -- the SQL stand-in -----------------------------------------------------------------------


class _Cursor:
    def __init__(self, row: tuple | None, rows: list[tuple] | None = None) -> None:
        self._row = row
        self._rows = rows or []

    def fetchone(self) -> tuple | None:
        return self._row

    def fetchall(self) -> list[tuple]:
        return self._rows


class _Conn:
    def __init__(self, pool: FakeInboxPool) -> None:
        self._pool = pool
        self._inbox: set[tuple[str, str]] = set()
        self._failures: dict[tuple[str, str, str], int] = {}
        self._dead: list[dict[str, Any]] = []

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self._inbox, self._failures = set(self._pool.inbox), dict(self._pool.failures)
        self._dead = list(self._pool.dead)
        yield  # an exception from the body propagates: everything staged is dropped
        if self._pool.fail_commit is not None:
            error = self._pool.fail_commit(self._inbox - self._pool.inbox)
            if error is not None:
                raise error
        self._pool.inbox, self._pool.failures = self._inbox, self._failures
        self._pool.dead = self._dead
        self._pool.commits += 1

    def execute(self, query: str, params: tuple = ()) -> _Cursor:
        if "INSERT INTO inbox" in query:  # the fence, then a batch's rows: (leases, new ids)
            _group, partition, epoch, group, event_ids = params[:5]
            if self._pool.leases.get(partition) != epoch:
                return _Cursor((0, []))
            new = []
            for event_id in event_ids.split(","):  # the batch's ids as one comma-separated text
                if (group, event_id) not in self._inbox:
                    self._inbox.add((group, event_id))
                    new.append(event_id)
            return _Cursor((1, new))
        if "FROM partition_leases" in query and "FOR SHARE" in query:
            _group, partition, epoch = params
            return _Cursor((1,) if self._pool.leases.get(partition) == epoch else None)
        if "INSERT INTO delivery_failures" in query:
            key = (params[0], params[1], params[2])
            self._failures[key] = self._failures.get(key, 0) + 1
            return _Cursor((self._failures[key],))
        if "DELETE FROM delivery_failures" in query:
            group, streams, entry_ids = params
            for stream, entry_id in zip(streams, entry_ids, strict=True):
                self._failures.pop((group, stream, entry_id), None)
            return _Cursor(None)
        if "INSERT INTO dead_letters" in query:
            self._dead.append(params["fields"].obj)  # the record: entry fields and the error
            return _Cursor(None)
        if "FROM dead_letters" in query:  # re-drive requests: tests/integration covers them
            return _Cursor(None, [])
        raise AssertionError(f"unexpected SQL in a unit test: {query}")


class FakeInboxPool:
    """Commits on success, forgets on rollback; simulates outages and failing commits."""

    def __init__(self) -> None:
        self.leases: dict[int, int] = {}  # partition -> the live lease's epoch
        self.inbox: set[tuple[str, str]] = set()
        self.failures: dict[tuple[str, str, str], int] = {}  # (group, stream, id) -> attempts
        self.dead: list[dict[str, Any]] = []  # dead letters committed (their records)
        self.commits = 0
        self.outage: BaseException | None = None
        self.fail_commit: Callable[[set[tuple[str, str]]], BaseException | None] | None = None

    @contextmanager
    def connection(self) -> Iterator[_Conn]:
        if self.outage is not None:
            raise self.outage
        yield _Conn(self)

    def event_ids(self) -> set[str]:
        return {event_id for _group, event_id in self.inbox}


class UnusablePool:
    """For paths that must not touch the database at all."""

    @contextmanager
    def connection(self) -> Iterator[None]:
        raise AssertionError("the database must not be used here")
        yield


# -- building blocks ------------------------------------------------------------------------


@pytest.fixture
def r() -> Iterator[fakeredis.FakeRedis]:
    client = fakeredis.FakeRedis(decode_responses=True)
    yield client
    client.flushall()


def order_in(partition: int, partitions: int = PARTITIONS) -> str:
    """A fresh order id that lands in `partition`."""
    while partition_of(order_id := str(uuid.uuid4()), partitions) != partition:
        pass
    return order_id


def envelope(event_type: str = "OrderPlaced", partition: int = 0, **extra: Any) -> Envelope:
    order_id = order_in(partition)
    payloads = {
        "OrderPlaced": {
            "order_id": order_id,
            "customer_id": "alice",
            "items": [{"sku": "SKU-1", "quantity": 1}],
        },
        "OrderCancelled": {"order_id": order_id, "reason": "customer_request"},
        "OrderConfirmed": {"order_id": order_id, "total_cents": 100},
        "PaymentDeclined": {
            "order_id": order_id,
            "customer_id": "alice",
            "reason": "insufficient_funds",
        },
    }
    producer = "billing" if event_type == "PaymentDeclined" else "orders"
    values: dict[str, Any] = dict(
        event_id=str(uuid.uuid4()),
        event_type=event_type,
        event_version=1,
        aggregate_type="order",
        aggregate_id=order_id,
        correlation_id=order_id,
        causation_id=None,
        occurred_at=datetime.now(UTC).isoformat(),
        producer=producer,
        payload=payloads[event_type],
    )
    values.update(extra)
    return Envelope(**values)


def stream_of(env: Envelope, base: str = ORDERS) -> str:
    return partition_stream(base, partition_of(env.aggregate_id, PARTITIONS))


def publish(r: redis.Redis, env: Envelope, base: str = ORDERS) -> str:
    return r.xadd(stream_of(env, base), encode_entry(env))


def settings(**overrides: Any) -> ConsumerSettings:
    values: dict[str, Any] = dict(
        group=GROUP,
        consumer="c1",
        partitions=PARTITIONS,
        retry_base_ms=0,
        max_deliveries=3,
    )
    values.update(overrides)
    return ConsumerSettings(**values)


def take(
    r: redis.Redis,
    pool: Any,
    handlers: dict[str, Any],
    partition: int = 0,
    epoch: int = 1,
    on_outcome: Any = None,
    **overrides: Any,
) -> PartitionWorker:
    """What StreamConsumer does on acquiring a lease: fence, groups, take over pending."""
    if isinstance(pool, FakeInboxPool):
        pool.leases[partition] = epoch
    fence_ops = StreamFence(r)
    assert fence_ops.claim(GROUP, partition, epoch)
    worker = PartitionWorker(
        r,
        fence_ops,
        pool,
        settings(**overrides),
        handlers,
        Lease(partition, epoch),
        on_outcome=on_outcome,
    )
    worker.ensure_groups()
    worker.take_over_pending()
    return worker


class Recorder:
    """A handler that records what it saw and fails for the event ids in `failing`."""

    def __init__(self, fail: bool = False) -> None:
        self.seen: list[str] = []
        self.fail = fail
        self.failing: set[str] = set()
        self.raise_once: dict[str, BaseException] = {}

    def __call__(self, uow: Any, env: Envelope) -> None:
        self.seen.append(env.event_id)
        if error := self.raise_once.pop(env.event_id, None):
            raise error
        if self.fail or env.event_id in self.failing:
            raise RuntimeError("handler is broken")


def pending(r: redis.Redis, stream: str) -> list[dict]:
    return r.xpending_range(stream, GROUP, "-", "+", 100)


def pending_ids(r: redis.Redis, stream: str) -> list[str]:
    return [info["message_id"] for info in pending(r, stream)]


def dead_letters(pool: FakeInboxPool) -> list[dict[str, str]]:
    """The dead letters the worker committed to its database (records: fields and error)."""
    return list(pool.dead)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def conflicts_metric() -> float:
    return sample("saga_consumer_conflicts_total", group=GROUP)


def outages_metric() -> float:
    return sample("saga_consumer_outages_total", group=GROUP)


# -- settings, names and the assignment -----------------------------------------------------


def test_backoff_doubles_from_the_base_and_is_capped() -> None:
    s = ConsumerSettings(group="g", consumer="c", retry_base_ms=500, retry_max_ms=10_000)
    assert [s.backoff_ms(n) for n in range(0, 8)] == [
        500,
        500,
        1000,
        2000,
        4000,
        8000,
        10_000,
        10_000,
    ]


def test_zero_base_means_retry_at_once() -> None:
    s = ConsumerSettings(group="g", consumer="c", retry_base_ms=0)
    assert {s.backoff_ms(n) for n in range(1, 10)} == {0}


def test_a_partition_is_read_over_its_subscribed_streams_and_the_redrive_stream() -> None:
    assert group_streams(GROUP, 3) == (
        "orders.events.{p3}",
        "billing.events.{p3}",
        redrive_stream(GROUP, 3),
    )
    assert redrive_stream(GROUP, 3) == "inventory.redrive.{p3}"
    # one hash tag: one Redis Cluster slot for the streams and the owner's fence
    assert {name.rpartition(".")[2] for name in group_streams(GROUP, 3)} == {"{p3}"}
    assert owner_fence_key(GROUP, 3).endswith("{p3}")


def test_every_partition_goes_to_exactly_one_live_member() -> None:
    members = ["c-b", "c-a", "c-c"]
    shares = {me: assignment(members, 8, me) for me in members}
    assert shares == {"c-a": {0, 3, 6}, "c-b": {1, 4, 7}, "c-c": {2, 5}}
    owned = [p for share in shares.values() for p in share]
    assert sorted(owned) == list(range(8))  # each one exactly once
    assert assignment(members, 8, "stranger") == set()
    assert assignment(["c-a"], 8, "c-a") == set(range(8))  # alone: everything
    # a member joining takes its share from the others, nothing else moves around needlessly
    assert assignment(["c-a", "c-b"], 4, "c-a") == {0, 2}
    assert assignment(["c-a", "c-b"], 4, "c-b") == {1, 3}


def test_conflicts_outages_and_errors_are_told_apart() -> None:
    assert classify(pg_errors.DeadlockDetected("deadlock")) is FailureKind.CONFLICT
    assert classify(pg_errors.SerializationFailure("serialization")) is FailureKind.CONFLICT
    assert classify(psycopg.OperationalError("connection refused")) is FailureKind.OUTAGE
    assert classify(pg_errors.AdminShutdown("shutting down")) is FailureKind.OUTAGE
    assert classify(redis.ConnectionError("gone")) is FailureKind.OUTAGE
    assert classify(redis.ResponseError("LOADING dataset")) is FailureKind.OUTAGE
    # a replica after a failover: redis-py's own class (code stripped), or inside a script
    assert classify(redis.exceptions.ReadOnlyError("You can't write")) is FailureKind.OUTAGE
    in_script = "Error running script (call to f_5f): @user_script:4: -READONLY You can't write"
    assert classify(redis.ResponseError(in_script)) is FailureKind.OUTAGE
    # a blocked read ended by a failover (Redis 7) or CLIENT UNBLOCK ... ERROR, alone or as a
    # command of a pipeline (redis-py prefixes the reply)
    unblocked = "UNBLOCKED force unblock from blocking operation, instance state changed"
    assert classify(redis.ResponseError(unblocked)) is FailureKind.OUTAGE
    piped = f"Command # 2 (XREADGROUP GROUP g c BLOCK 1000) of pipeline caused error: {unblocked}"
    assert classify(redis.ResponseError(piped)) is FailureKind.OUTAGE
    not_a_code = "Command # 2 (EVAL) of pipeline caused error: user value UNBLOCKED in the text"
    assert classify(redis.ResponseError(not_a_code)) is FailureKind.ERROR
    bug = "Error running script (call to f_5f): @user_script:1: attempt to compare nil"
    assert classify(redis.ResponseError(bug)) is FailureKind.ERROR
    assert classify(pg_errors.UniqueViolation("dup")) is FailureKind.ERROR
    assert classify(RuntimeError("bug")) is FailureKind.ERROR


# -- groups ---------------------------------------------------------------------------------


def test_group_creation_is_idempotent_and_starts_from_the_beginning(r) -> None:
    before = envelope()
    before_id = publish(r, before)  # published before the group existed
    handler = Recorder()
    worker = take(r, FakeInboxPool(), {"OrderPlaced": handler})
    worker.ensure_groups()  # BUSYGROUP is fine

    for stream in group_streams(GROUP, 0):
        assert [g["name"] for g in r.xinfo_groups(stream)] == [GROUP]
    assert worker.step() == 1
    assert handler.seen == [before.event_id]
    assert pending(r, stream_of(before)) == []
    assert r.xrange(stream_of(before))[0][0] == before_id


def test_group_creation_surfaces_other_errors(r) -> None:
    r.set(partition_stream(ORDERS, 0), "not a stream")
    worker = PartitionWorker(r, StreamFence(r), FakeInboxPool(), settings(), {}, Lease(0, 1))
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        worker.ensure_groups()


# -- entries that never reach a handler ------------------------------------------------------


def test_event_types_without_a_handler_are_acked_without_touching_the_database(r) -> None:
    outcomes: list[tuple[str, str]] = []
    pool = FakeInboxPool()
    worker = take(
        r,
        pool,
        {"OrderPlaced": Recorder()},
        on_outcome=lambda t, o, _s: outcomes.append((t, o)),
    )
    env = envelope("OrderConfirmed")
    publish(r, env)

    assert worker.step() == 1
    assert outcomes == [("OrderConfirmed", "ignored")]
    assert pending(r, stream_of(env)) == []
    assert dead_letters(pool) == [] and pool.commits == 0  # no transaction for them


def test_contract_invalid_entry_is_dead_lettered_at_once_and_acked(r) -> None:
    handler = Recorder()
    pool = FakeInboxPool()
    worker = take(r, pool, {"OrderPlaced": handler})
    env = envelope()
    broken = encode_entry(env)
    broken["payload"] = json.dumps({"order_id": "nope"})
    stream = stream_of(env)
    entry_id = r.xadd(stream, broken)

    assert worker.step() == 1

    assert handler.seen == []
    assert pending(r, stream) == []
    [letter] = dead_letters(pool)
    for name, value in broken.items():
        assert letter[name] == value  # the original fields travel with the dead letter
    assert letter["original_stream"] == stream
    assert letter["original_id"] == entry_id
    assert letter["group"] == GROUP
    assert letter["attempts"] == "1"
    assert letter["error"].startswith("contract: invalid OrderPlaced v1 payload")
    assert datetime.fromisoformat(letter["dead_lettered_at"])


def test_entry_with_missing_envelope_fields_is_dead_lettered_and_the_partition_flows_on(
    r,
) -> None:
    handler = Recorder()
    pool = FakeInboxPool()
    worker = take(r, pool, {"OrderPlaced": handler})
    garbage_id = r.xadd(partition_stream(ORDERS, 0), {"hello": "world"})
    good = envelope()
    publish(r, good)

    assert worker.step() == 2

    assert handler.seen == [good.event_id]
    assert pool.event_ids() == {good.event_id}
    assert pending(r, partition_stream(ORDERS, 0)) == []
    [letter] = dead_letters(pool)
    assert letter["hello"] == "world"
    assert letter["original_id"] == garbage_id
    assert "missing envelope fields" in letter["error"]


def test_an_event_type_on_a_stream_its_service_does_not_own_is_dead_lettered_at_once(r) -> None:
    """OrderPlaced is published by orders only; arriving on billing's stream it is refused."""
    handler = Recorder()
    pool = FakeInboxPool()
    worker = take(r, pool, {"OrderPlaced": handler})
    env = envelope()
    entry_id = publish(r, env, base=BILLING)

    assert worker.step() == 1
    assert handler.seen == []
    [letter] = dead_letters(pool)
    assert letter["original_id"] == entry_id
    assert letter["error"] == "contract: OrderPlaced is not published on billing.events"
    assert pending(r, stream_of(env, BILLING)) == []


# -- the inbox path --------------------------------------------------------------------------


def test_processed_entries_are_acked_and_recorded_in_the_inbox(r) -> None:
    pool = FakeInboxPool()
    handler = Recorder()
    worker = take(r, pool, {"OrderPlaced": handler})
    events = [envelope() for _ in range(3)]
    for env in events:
        publish(r, env)

    assert worker.step() == 3
    assert handler.seen == [env.event_id for env in events]
    assert pool.inbox == {(GROUP, env.event_id) for env in events}
    assert pool.commits == 1  # one read, one transaction
    assert pending(r, partition_stream(ORDERS, 0)) == []


def test_a_duplicate_delivery_is_acked_without_running_the_handler_again(r) -> None:
    outcomes: list[str] = []
    handler = Recorder()
    worker = take(
        r,
        FakeInboxPool(),
        {"OrderPlaced": handler},
        on_outcome=lambda _t, o, _s: outcomes.append(o),
    )
    env = envelope()
    publish(r, env)
    publish(r, env)  # the relay's crash-between-XADD-and-UPDATE duplicate

    worker.step()

    assert handler.seen == [env.event_id]
    assert outcomes == ["processed", "duplicate"]
    assert pending(r, stream_of(env)) == []


def test_redriven_entries_are_consumed_from_the_groups_redrive_stream(r) -> None:
    pool = FakeInboxPool()
    handler = Recorder()
    worker = take(r, pool, {"OrderPlaced": handler})
    env = envelope()
    fields = {**encode_entry(env), "original_stream": stream_of(env), "original_id": "1-0"}
    r.xadd(redrive_stream(GROUP, 0), fields)

    assert worker.step() == 1
    assert handler.seen == [env.event_id]
    assert pool.event_ids() == {env.event_id}
    assert pending(r, redrive_stream(GROUP, 0)) == []


def test_outcomes_are_reported(r) -> None:
    seen: list[tuple[str, str]] = []
    worker = take(
        r,
        FakeInboxPool(),
        {"OrderPlaced": Recorder()},
        on_outcome=lambda event_type, outcome, _seconds: seen.append((event_type, outcome)),
    )
    env = envelope()
    publish(r, env)
    publish(r, env)
    publish(r, envelope("OrderConfirmed"))
    r.xadd(partition_stream(ORDERS, 0), {"event_type": "OrderPlaced"})
    worker.step()
    # Ignored types are settled before the rest of a read, so compare without order.
    assert sorted(seen) == sorted(
        [
            ("OrderPlaced", "processed"),
            ("OrderPlaced", "duplicate"),
            ("OrderConfirmed", "ignored"),
            ("OrderPlaced", "dead_lettered"),
        ]
    )


# -- failures, retries, order ----------------------------------------------------------------


def test_a_failing_handler_leaves_the_entry_pending_and_the_inbox_untouched(r) -> None:
    pool = FakeInboxPool()
    handler = Recorder(fail=True)
    outcomes: list[str] = []
    worker = take(
        r, pool, {"OrderPlaced": handler}, on_outcome=lambda _t, o, _s: outcomes.append(o)
    )
    env = envelope()
    entry_id = publish(r, env)
    stream = stream_of(env)

    worker.step()
    assert pending_ids(r, stream) == [entry_id]
    assert pool.inbox == set()
    assert pool.failures == {(GROUP, stream, entry_id): 1}
    assert outcomes == ["failed"]

    handler.fail = False
    assert worker.step() == 1  # the retry is due at once (retry_base_ms=0)
    assert pending(r, stream) == []
    assert pool.inbox == {(GROUP, env.event_id)}
    assert pool.failures == {}  # forgotten with the commit that finished it
    assert handler.seen == [env.event_id, env.event_id]
    assert worker.retry is None


def test_retry_respects_the_backoff(r) -> None:
    handler = Recorder(fail=True)
    worker = take(r, FakeInboxPool(), {"OrderPlaced": handler}, retry_base_ms=60_000)
    env = envelope()
    publish(r, env)
    worker.step()
    handler.fail = False

    assert worker.step() == 0  # a minute has not passed
    assert handler.seen == [env.event_id]
    assert pending(r, stream_of(env))[0]["times_delivered"] == 1


def test_a_failing_entry_blocks_the_later_entries_of_its_partition_only(r) -> None:
    pool = FakeInboxPool()
    handler = Recorder()
    p0 = take(r, pool, {"OrderPlaced": handler}, partition=0, retry_base_ms=60_000)
    p1 = take(r, pool, {"OrderPlaced": handler}, partition=1, retry_base_ms=60_000)
    first, later = envelope(partition=0), envelope(partition=0)
    handler.failing.add(first.event_id)
    first_id = publish(r, first)
    p0.step()
    assert p0.retry is not None

    publish(r, later)  # same partition, behind the failing entry
    other = envelope(partition=1)
    publish(r, other)
    assert p0.step() == 0
    assert p1.step() == 1  # the other partition keeps flowing

    assert pool.event_ids() == {other.event_id}
    assert later.event_id not in handler.seen
    assert pending_ids(r, stream_of(first)) == [first_id]  # the later one is not even read


def test_after_max_deliveries_the_entry_is_dead_lettered_and_later_entries_follow_in_order(
    r,
) -> None:
    pool = FakeInboxPool()
    handler = Recorder()
    worker = take(r, pool, {"OrderPlaced": handler, "OrderCancelled": handler}, max_deliveries=3)
    bad = envelope("OrderPlaced")
    handler.failing.add(bad.event_id)
    bad_id = publish(r, bad)
    later = [envelope("OrderCancelled") for _ in range(2)]
    worker.step()  # delivery 1
    publish(r, later[0])
    worker.step()  # delivery 2 (the later entry waits behind it)
    assert dead_letters(pool) == []
    assert pool.event_ids() == set()
    publish(r, later[1])
    worker.step()  # delivery 3: the last one
    assert pool.event_ids() == set()
    while worker.step():  # then the later entries, in order
        pass

    assert handler.seen == [bad.event_id] * 3 + [env.event_id for env in later]
    assert pending(r, stream_of(bad)) == []
    [letter] = dead_letters(pool)
    assert letter["original_id"] == bad_id
    assert letter["event_id"] == bad.event_id
    assert letter["attempts"] == "3"
    assert letter["error"] == "RuntimeError: handler is broken"
    assert pool.event_ids() == {env.event_id for env in later}


def test_batch_falls_back_to_commit_the_entries_before_a_failing_one(r) -> None:
    pool = FakeInboxPool()
    handler = Recorder()
    worker = take(r, pool, {"OrderPlaced": handler}, retry_base_ms=60_000)
    events = [envelope() for _ in range(3)]
    handler.failing.add(events[1].event_id)
    ids = [publish(r, env) for env in events]

    worker.step()

    assert pool.event_ids() == {events[0].event_id}  # committed without the culprit
    assert pending_ids(r, stream_of(events[0])) == ids[1:]  # the culprit and what follows
    assert pool.failures == {(GROUP, stream_of(events[0]), ids[1]): 1}
    assert events[2].event_id not in handler.seen  # waits behind the culprit


def test_a_failing_commit_is_retried_one_entry_at_a_time_to_find_the_culprit(r) -> None:
    """The handlers return, the COMMIT fails (say, a deferred constraint): nothing acked
    on a guess; the entries are committed one by one and only the culprit is counted."""
    pool = FakeInboxPool()
    handler = Recorder()
    worker = take(r, pool, {"OrderPlaced": handler}, retry_base_ms=60_000)
    events = [envelope() for _ in range(4)]
    culprit = (GROUP, events[2].event_id)

    def refuse(staged: set[tuple[str, str]]) -> BaseException | None:
        return psycopg.errors.CheckViolation("deferred check") if culprit in staged else None

    pool.fail_commit = refuse
    ids = [publish(r, env) for env in events]

    worker.step()

    assert pool.event_ids() == {events[0].event_id, events[1].event_id}
    assert pending_ids(r, stream_of(events[0])) == ids[2:]
    assert pool.failures == {(GROUP, stream_of(events[0]), ids[2]): 1}


def test_a_poison_entry_pending_at_restart_is_read_once_and_blocks_the_rest(r) -> None:
    """Regression: start-up re-reading its own pending entries until a pass handled none never
    ended while one of them kept failing."""
    poison, good = envelope(), envelope()
    stream = stream_of(poison)
    poison_id = publish(r, poison)
    publish(r, good)
    take(r, FakeInboxPool(), {})  # groups exist
    r.xreadgroup(GROUP, "c1", {stream: ">"}, count=10)  # then c1 "crashed"

    handler = Recorder()
    handler.failing.add(poison.event_id)
    restarted = take(r, FakeInboxPool(), {"OrderPlaced": handler}, retry_base_ms=60_000)
    assert restarted.step() == 2  # one read of both; the poison entry blocks the good one
    assert handler.seen == [poison.event_id]
    assert restarted.step() == 0
    assert pending_ids(r, stream)[0] == poison_id


# -- conflicts (issue 8, defect 3) ----------------------------------------------------------


@pytest.mark.parametrize(
    "conflict",
    [pg_errors.DeadlockDetected("deadlock detected"), pg_errors.SerializationFailure("could not")],
    ids=["40P01", "40001"],
)
def test_a_conflict_is_retried_at_once_alone_and_is_neither_an_outage_nor_an_attempt(
    r, caplog, conflict
) -> None:
    pool = FakeInboxPool()
    handler = Recorder()
    outcomes: list[str] = []
    worker = take(
        r,
        pool,
        {"OrderPlaced": handler},
        max_deliveries=1,  # one counted failure would dead-letter it
        retry_base_ms=60_000,  # a counted failure would make the partition wait a minute
        on_outcome=lambda _t, o, _s: outcomes.append(o),
    )
    events = [envelope() for _ in range(4)]
    handler.raise_once[events[1].event_id] = conflict
    for env in events:
        publish(r, env)
    conflicts, outages = conflicts_metric(), outages_metric()

    with caplog.at_level(logging.INFO):
        assert worker.step() == 4

    assert conflicts_metric() == conflicts + 1
    assert outages_metric() == outages
    assert pool.event_ids() == {env.event_id for env in events}
    assert pool.failures == {}
    assert dead_letters(pool) == []
    assert outcomes == ["processed"] * 4
    assert pending(r, stream_of(events[0])) == []
    # the aborted transaction held the whole read: its entries are retried one per transaction
    a, b, c, d = (env.event_id for env in events)
    assert handler.seen == [a, b, a, b, c, d]
    assert pool.commits == 4
    assert "waiting for dependencies" not in caplog.text
    assert "conflict, retrying alone" in caplog.text


def test_separate_conflicts_in_one_read_never_add_up_to_a_failed_attempt(r) -> None:
    pool = FakeInboxPool()
    handler = Recorder()
    worker = take(r, pool, {"OrderPlaced": handler}, conflict_retries=1, max_deliveries=1)
    events = [envelope() for _ in range(3)]
    for env in events:
        handler.raise_once[env.event_id] = pg_errors.DeadlockDetected("deadlock detected")
        publish(r, env)

    assert worker.step() == 3
    assert pool.event_ids() == {env.event_id for env in events}
    assert pool.failures == {}
    assert dead_letters(pool) == []


def test_an_entry_that_conflicts_on_every_try_ends_up_counted_as_failing(r) -> None:
    """Bounded: after conflict_retries immediate retries in a row it is an ordinary failure."""
    pool = FakeInboxPool()
    handler = Recorder()
    worker = take(r, pool, {"OrderPlaced": handler}, conflict_retries=2, retry_base_ms=60_000)
    env = envelope()
    entry_id = publish(r, env)
    conflicts = conflicts_metric()

    class AlwaysConflicts:
        def __call__(self, uow: Any, event: Envelope) -> None:
            handler.seen.append(event.event_id)
            raise pg_errors.SerializationFailure("could not serialize access")

    worker.handlers = {"OrderPlaced": AlwaysConflicts()}
    worker.step()

    assert len(handler.seen) == 3  # the try and two immediate retries
    assert conflicts_metric() == conflicts + 2
    assert pool.failures == {(GROUP, stream_of(env), entry_id): 1}
    assert pending_ids(r, stream_of(env)) == [entry_id]


# -- outages --------------------------------------------------------------------------------


def test_a_database_outage_costs_no_attempt_and_the_entry_is_read_again(r) -> None:
    """Regression: step() left its cursors past the entries it could not finish, so a caller
    stepping again (rather than run()) never re-read them."""
    pool = FakeInboxPool()
    pool.outage = psycopg.OperationalError("connection refused")  # no SQLSTATE: unreachable
    handler = Recorder()
    worker = take(r, pool, {"OrderPlaced": handler}, max_deliveries=1)
    env = envelope()
    entry_id = publish(r, env)

    with pytest.raises(psycopg.OperationalError):
        worker.step()
    # not dead-lettered although max_deliveries is 1, nothing counted, still pending
    assert dead_letters(pool) == []
    assert pool.failures == {}
    assert worker.retry is None
    assert pending_ids(r, stream_of(env)) == [entry_id]

    pool.outage = None
    assert worker.step() == 1
    assert handler.seen == [env.event_id]
    assert pending(r, stream_of(env)) == []


@dataclass
class _Outage:
    """A pool that is down for the first `down` checkouts."""

    pool: FakeInboxPool
    down: int
    checkouts: int = 0

    @contextmanager
    def connection(self) -> Iterator[_Conn]:
        self.checkouts += 1
        if self.checkouts <= self.down:
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        with self.pool.connection() as conn:
            yield conn


def test_the_loop_backs_off_through_an_outage_and_then_handles_the_entry(r, caplog) -> None:
    import threading

    inner = FakeInboxPool()
    pool = _Outage(inner, down=3)
    handler = Recorder()
    worker = take(r, inner, {"OrderPlaced": handler}, max_deliveries=1, outage_max_backoff_ms=20)
    worker.pool = pool  # type: ignore[assignment]
    env = envelope()
    publish(r, env)
    outages = outages_metric()
    stop = threading.Event()

    def run() -> None:
        worker.run(stop)

    thread = threading.Thread(target=run, daemon=True)
    with caplog.at_level(logging.WARNING):
        thread.start()
        try:
            from tests.helpers import wait_until

            wait_until(lambda: inner.event_ids() == {env.event_id}, timeout=30)
        finally:
            stop.set()
            thread.join(timeout=10)
    assert not thread.is_alive()
    assert outages_metric() == outages + 3
    assert "waiting for dependencies" in caplog.text
    assert inner.failures == {}
    assert dead_letters(inner) == []
    assert handler.seen == [env.event_id]


# -- restarts and takeovers ------------------------------------------------------------------


def test_own_pending_entries_are_read_again_after_a_restart_page_by_page(r) -> None:
    events = [envelope() for _ in range(5)]
    for env in events:
        publish(r, env)
    stream = stream_of(events[0])
    take(r, FakeInboxPool(), {})
    r.xreadgroup(GROUP, "c1", {stream: ">"}, count=10)  # delivered, then "crashed" before ack

    handler = Recorder()
    pool = FakeInboxPool()
    restarted = take(r, pool, {"OrderPlaced": handler}, batch_size=2, epoch=2)
    assert restarted.step() == 2
    assert restarted.step() == 2
    assert restarted.step() == 1
    assert handler.seen == [env.event_id for env in events]
    assert pending(r, stream) == []
    assert restarted.step() == 0


def test_a_new_owner_takes_over_the_previous_owners_pending_entries_in_id_order(r) -> None:
    events = [envelope() for _ in range(4)]
    ids = [publish(r, env) for env in events]
    stream = stream_of(events[0])
    take(r, FakeInboxPool(), {}, consumer="old")
    r.xreadgroup(GROUP, "old", {stream: ">"}, count=2)  # "old" took two and died
    r.xreadgroup(GROUP, "other", {stream: ">"}, count=1)  # an even older owner took one

    handler = Recorder()
    new = take(r, FakeInboxPool(), {"OrderPlaced": handler}, consumer="new", epoch=2)
    assert {info["consumer"] for info in pending(r, stream)} == {"new"}
    assert pending_ids(r, stream) == ids[:3]

    while new.step():
        pass
    assert handler.seen == [env.event_id for env in events]  # id order, then the new one
    assert pending(r, stream) == []


def test_a_trimmed_pending_entry_is_acked_logged_and_counted_as_gone(r, caplog) -> None:
    events = [envelope() for _ in range(2)]
    ids = [publish(r, env) for env in events]
    stream = stream_of(events[0])
    take(r, FakeInboxPool(), {})
    r.xreadgroup(GROUP, "c1", {stream: ">"}, count=10)
    r.xdel(stream, ids[0])  # trimmed while pending
    outcomes: list[tuple[str, str]] = []
    gone = sample("saga_consumer_events_total", group=GROUP, event_type="?", outcome="gone")

    handler = Recorder()
    with caplog.at_level(logging.ERROR):
        restarted = take(
            r,
            FakeInboxPool(),
            {"OrderPlaced": handler},
            epoch=2,
            on_outcome=lambda t, o, _s: outcomes.append((t, o)),
        )
        assert restarted.step() == 2

    assert pending(r, stream) == []
    assert handler.seen == [events[1].event_id]
    assert outcomes == [("?", "gone"), ("OrderPlaced", "processed")]
    assert f"pending entry {ids[0]} of {stream} no longer exists" in caplog.text
    assert sample("saga_consumer_events_total", group=GROUP, event_type="?", outcome="gone") == (
        gone + 1
    )


# -- fencing (issue 8, defect 2: nothing acknowledged that this consumer did not finish) -----


def test_a_worker_whose_lease_was_taken_can_neither_commit_nor_read(r) -> None:
    pool = FakeInboxPool()
    handler = Recorder()
    old = take(r, pool, {"OrderPlaced": handler}, consumer="old", epoch=1)
    env = envelope()
    entry_id = publish(r, env)
    stream = stream_of(env)
    # "old" read the entry, then paused before its transaction
    read = old.fence.read(GROUP, "old", 0, 1, dict.fromkeys(old.streams, ">"), 10)
    [(read_stream, [(read_id, fields)])] = read.entries
    assert (read_stream, read_id) == (stream, entry_id)

    pool.leases[0] = 2  # the database lease went to a new owner (epoch 2)
    with pytest.raises(LostOwnership):
        old.handle([Item(stream, entry_id, fields or {})])
    assert pool.inbox == set() and pool.failures == {}
    assert pending_ids(r, stream) == [entry_id]  # not acknowledged
    assert handler.seen == []  # the fence is the transaction's first statement

    assert StreamFence(r).claim(GROUP, 0, 2)  # the new owner's Redis fence
    with pytest.raises(Fenced):
        old.step()
    assert not StreamFence(r).claim(GROUP, 0, 1)  # an older epoch never comes back
    with pytest.raises(LostOwnership):  # a dead letter is a fenced transaction too
        old._dead_letter(Item(stream, entry_id, fields or {}), "x", attempts=9)
    assert dead_letters(pool) == []
    assert pending_ids(r, stream) == [entry_id]


def test_an_entry_taken_over_whose_new_attempt_fails_stays_pending_never_silently_acked(
    r,
) -> None:
    """The old code acknowledged an id that XCLAIM did not return, "assuming it was trimmed",
    even when another consumer had just claimed it and then failed: the event vanished."""
    pool = FakeInboxPool()
    handler = Recorder(fail=True)
    old = take(r, pool, {"OrderPlaced": handler}, consumer="old", epoch=1, retry_base_ms=0)
    env = envelope()
    entry_id = publish(r, env)
    stream = stream_of(env)
    old.step()  # attempt 1 fails with "old"
    assert pool.failures == {(GROUP, stream, entry_id): 1}

    new = take(r, pool, {"OrderPlaced": handler}, consumer="new", epoch=2, retry_base_ms=0)
    new.step()  # attempt 2 fails with "new"
    # the old owner tries its due retry: refused, and it acknowledges nothing
    with pytest.raises(Fenced):
        old.step()
    with pytest.raises(LostOwnership):
        old.handle([Item(stream, entry_id, encode_entry(env))])
    [info] = pending(r, stream)
    assert (info["message_id"], info["consumer"]) == (entry_id, "new")
    assert pool.inbox == set()
    assert pool.failures == {(GROUP, stream, entry_id): 2}  # counted across owners

    new.step()  # attempt 3 of 3, by the new owner: a dead letter, and only then acked
    [letter] = dead_letters(pool)
    assert (letter["original_id"], letter["attempts"]) == (entry_id, "3")
    assert pending(r, stream) == []


def test_entries_pending_with_a_previous_owner_again_are_claimed_by_the_owners_next_read(r):
    """Redis came back with an older data set (a failover to a lagging replica): an entry is
    pending with the previous owner again, and redis-py reconnected without an error. The
    owner's next read sees it in its reply, claims it, and handles it."""
    pool = FakeInboxPool()
    handler = Recorder()
    worker = take(r, pool, {"OrderPlaced": handler}, consumer="new", epoch=2)
    env = envelope()
    entry_id = publish(r, env)
    r.xreadgroup(GROUP, "old", {stream_of(env): ">"})  # as the restored data set has it
    assert worker.step() == 1  # nothing new for the group, but the entry is claimed
    assert [info["consumer"] for info in pending(r, stream_of(env))] == ["new"]
    assert handler.seen == []
    assert worker.step() == 1  # read from our pending entries, from the start
    assert handler.seen == [env.event_id] and pending(r, stream_of(env)) == []
    assert entry_id


def test_what_a_stale_reader_took_after_the_takeover_is_handled_in_id_order(r) -> None:
    """The old owner's read can run after the new owner's takeover (it had paused just before
    sending it): it takes entries into its own pending list, learns from the same reply that it
    is fenced, and handles none. The new owner handles them before anything newer, once each."""
    pool = FakeInboxPool()
    handler = Recorder()
    old = take(r, pool, {"OrderPlaced": handler}, consumer="old", epoch=1)
    assert old.step() == 0  # caught up: its next read takes new entries ('>')
    events = [envelope() for _ in range(6)]  # one partition: one stream, in this order
    ids = [publish(r, env) for env in events[:3]]
    new = take(r, pool, {"OrderPlaced": handler}, consumer="new", epoch=2)
    with pytest.raises(Fenced):
        old.step()  # the stale read: it took the three entries, and handled none
    assert {info["consumer"] for info in pending(r, stream_of(events[0]))} == {"old"}
    assert handler.seen == []
    ids += [publish(r, env) for env in events[3:]]
    drain([new])
    assert handler.seen == [env.event_id for env in events]  # the order's events, in order
    assert pending(r, stream_of(events[0])) == [] and len(ids) == 6


def test_the_owners_read_that_took_newer_entries_than_a_stale_readers_handles_none_of_them(
    r,
) -> None:
    """The stale read runs between the owner's takeover and its next read, and newer entries
    arrive meanwhile: the owner's read takes them, sees the stale reader's pending entries in
    the same reply, and handles nothing before it has claimed them."""
    pool = FakeInboxPool()
    handler = Recorder()
    old = take(r, pool, {"OrderPlaced": handler}, consumer="old", epoch=1)
    assert old.step() == 0
    new = take(r, pool, {"OrderPlaced": handler}, consumer="new", epoch=2)
    assert new.step() == 0  # caught up
    first, second = envelope(), envelope()
    publish(r, first)
    with pytest.raises(Fenced):
        old.step()
    publish(r, second)
    # read "second", saw "first" pending with "old" and claimed it: handled neither yet
    assert new.step() == 2
    assert handler.seen == []
    assert {info["consumer"] for info in pending(r, stream_of(first))} == {"new"}
    drain([new])
    assert handler.seen == [first.event_id, second.event_id]


# -- reads of new entries block (XREADGROUP BLOCK) and carry the acks owed ---------------------


class CountingFence(StreamFence):
    """The real fenced read, with the block each read asked for recorded (fakeredis returns
    at once from a blocking XREADGROUP with COUNT: DESIGN.md §6a)."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client)
        self.blocks: list[int | None] = []

    def read(self, *args: Any, block_ms: int | None = None, **kwargs: Any) -> Any:
        self.blocks.append(block_ms)
        return super().read(*args, block_ms=block_ms, **kwargs)


def test_a_read_of_new_entries_blocks_and_carries_the_acks_owed(r):
    recorder = Recorder()
    worker = take(r, FakeInboxPool(), {"OrderPlaced": recorder})
    worker.fence = fence = CountingFence(r)
    first = envelope()
    publish(r, first)
    assert worker.step(block_ms=10) == 1
    # the pending entries first (Redis ignores BLOCK for them), then new ones, blocking
    assert fence.blocks == [None, 10]
    assert len(pending(r, stream_of(first))) == 1  # committed; its XACK rides with the next read
    assert worker.step(block_ms=10) == 0  # nothing new: the read blocked, then returned empty
    assert fence.blocks[-1] == 10
    assert pending(r, stream_of(first)) == []

    second = envelope()
    publish(r, second)
    assert worker.step(block_ms=10) == 1
    assert recorder.seen == [first.event_id, second.event_id]

    # idle, it still learns that the partition moved: from the reply of its blocked read
    assert StreamFence(r).claim(GROUP, 0, 2)
    with pytest.raises(Fenced):
        worker.step(block_ms=10)


def test_without_a_block_the_acks_owed_are_sent_at_the_end_of_the_step(r):
    worker = take(r, FakeInboxPool(), {"OrderPlaced": Recorder()})
    env = envelope()
    publish(r, env)
    assert worker.step() == 1  # a test's drain: no read is sure to follow
    assert pending(r, stream_of(env)) == []


def test_a_full_batch_reads_again_and_a_redrive_request_does_not_wait(r):
    recorder = Recorder()
    worker = take(r, FakeInboxPool(), {"OrderPlaced": recorder}, batch_size=2)
    worker.fence = fence = CountingFence(r)
    envs = [envelope() for _ in range(3)]
    ids = [publish(r, env) for env in envs]
    assert worker.step(block_ms=10) == 2  # a full batch: its acks go with the next read
    assert pending_ids(r, stream_of(envs[0])) == ids[:2]
    assert worker.step(block_ms=10) == 1
    assert pending_ids(r, stream_of(envs[0])) == ids[2:]
    worker.redrive_wanted.set()  # the heartbeat saw a request: read (and re-drive) now
    assert worker.step(block_ms=10) == 0
    assert fence.blocks[-1] is None and not worker.redrive_wanted.is_set()


def test_a_stopped_worker_sends_the_acks_it_owes(r):
    worker = take(r, FakeInboxPool(), {"OrderPlaced": Recorder()})
    env = envelope()
    publish(r, env)
    stop = threading.Event()
    worker.step(block_ms=10)  # handled; the XACK is owed to the next read
    stop.set()
    worker.run(stop)  # stops at once, owing nothing afterwards
    assert pending(r, stream_of(env)) == []


# -- acknowledgements riding along ------------------------------------------------------------


def test_a_full_reads_acks_ride_in_the_next_fenced_read(r) -> None:
    """A full read means more is waiting: its entries' XACKs go at the head of the next read's
    pipeline instead of a round trip of their own; the step that drains the partition sends the
    rest."""
    pool = FakeInboxPool()
    worker = take(r, pool, {"OrderPlaced": Recorder()}, batch_size=2)
    envs = [envelope() for _ in range(3)]
    ids = [publish(r, env) for env in envs]
    stream = stream_of(envs[0])

    assert worker.step() == 2  # full: committed, XACK owed
    assert len(pool.inbox) == 2
    assert pending_ids(r, stream) == ids[:2]
    assert worker.step() == 1  # the read acknowledged the first two, then took the third
    assert pending_ids(r, stream) == []  # drained: this step sent its own XACK


def test_acks_carried_by_a_read_count_even_when_the_read_is_fenced(r) -> None:
    """The read acknowledges whatever the fence says: the entries were finished by the owner
    that sends the XACKs, whoever owns the partition now."""
    env = envelope()
    entry_id = publish(r, env)
    stream = stream_of(env)
    fence = StreamFence(r)
    r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    assert fence.claim(GROUP, 0, 1)
    read = fence.read(GROUP, "c1", 0, 1, {stream: ">"}, 10)
    assert [entry for _stream, entries in read.entries for entry, _fields in entries] == [entry_id]

    assert fence.claim(GROUP, 0, 2)  # a new owner
    with pytest.raises(Fenced):
        fence.read(GROUP, "c1", 0, 1, {stream: ">"}, 10, {stream: [entry_id]})
    assert pending_ids(r, stream) == []
