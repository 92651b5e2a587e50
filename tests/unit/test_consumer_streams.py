"""Stream logic of StreamConsumer on fakeredis, with a tiny in-memory stand-in for the inbox.

fakeredis returns at once from XREADGROUP even with BLOCK, so these tests only call the
non-blocking steps (read_new_once without block_ms, read_own_pending_once, retry_failed_once,
claim_abandoned_once). The real inbox transaction is covered by tests/integration.
"""

from __future__ import annotations

import json
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime

import fakeredis
import psycopg
import pytest
import redis

from contracts import Envelope, dead_letter_stream, encode_entry, redrive_stream
from service_runtime.consumer import ConsumerSettings, StreamConsumer
from tests.helpers import wait_until

STREAM = "orders.events"
GROUP = "inventory"


# -- a tiny inbox: just enough of a psycopg pool for StreamConsumer.handle_entry ---------------


class _Cursor:
    def __init__(self, row):
        self._row = row

    def fetchone(self):
        return self._row


class _Conn:
    def __init__(self, pool: FakeInboxPool) -> None:
        self._pool = pool
        self._staged: set[tuple[str, str]] = set()

    @contextmanager
    def transaction(self):
        self._staged = set()
        yield  # an exception from the body propagates: the staged inbox rows are dropped
        self._pool.inbox |= self._staged
        self._pool.commits += 1

    def execute(self, query, params=None):
        assert "INSERT INTO inbox" in query, f"unexpected SQL in a unit test: {query}"
        key = (params[0], params[1])
        first = key not in self._pool.inbox and key not in self._staged
        self._staged.add(key)
        return _Cursor((1,) if first else None)


class FakeInboxPool:
    """Commits inbox keys on success, forgets them on rollback; can simulate a DB outage."""

    def __init__(self) -> None:
        self.inbox: set[tuple[str, str]] = set()
        self.commits = 0
        self.outage: BaseException | None = None
        self.connections = 0

    @contextmanager
    def connection(self):
        self.connections += 1
        if self.outage is not None:
            raise self.outage
        yield _Conn(self)


class UnusablePool:
    """For paths that must not touch the database at all."""

    @contextmanager
    def connection(self):
        raise AssertionError("the database must not be used here")
        yield


# -- building blocks ---------------------------------------------------------------------------


@pytest.fixture
def r():
    client = fakeredis.FakeRedis(decode_responses=True)
    yield client
    client.flushall()


def envelope(event_type: str = "OrderPlaced", event_id: str | None = None) -> Envelope:
    order_id = str(uuid.uuid4())
    payloads = {
        "OrderPlaced": {
            "order_id": order_id,
            "customer_id": "alice",
            "items": [{"sku": "SKU-1", "quantity": 1}],
        },
        "OrderCancelled": {"order_id": order_id, "reason": "customer_request"},
        "OrderConfirmed": {"order_id": order_id, "total_cents": 100},
    }
    return Envelope(
        event_id=event_id or str(uuid.uuid4()),
        event_type=event_type,
        event_version=1,
        aggregate_type="order",
        aggregate_id=order_id,
        correlation_id=order_id,
        causation_id=None,
        occurred_at=datetime.now(UTC).isoformat(),
        producer="orders",
        payload=payloads[event_type],
    )


def publish(r, env: Envelope, stream: str = STREAM) -> str:
    return r.xadd(stream, encode_entry(env))


def settings(**overrides) -> ConsumerSettings:
    values = dict(
        group=GROUP,
        consumer="c1",
        streams=(STREAM,),
        retry_base_ms=0,
        max_deliveries=3,
        claim_idle_ms=0,
    )
    values.update(overrides)
    return ConsumerSettings(**values)


class Recorder:
    """A handler that records what it saw and can be told to fail."""

    def __init__(self, fail: bool = False) -> None:
        self.seen: list[str] = []
        self.fail = fail

    def __call__(self, uow, env: Envelope) -> None:
        self.seen.append(env.event_id)
        if self.fail:
            raise RuntimeError("handler is broken")


def pending_count(r, stream: str = STREAM, group: str = GROUP) -> int:
    return r.xpending(stream, group)["pending"]


def dead_letters(r, group: str = GROUP) -> list[dict[str, str]]:
    return [fields for _id, fields in r.xrange(dead_letter_stream(group))]


# -- backoff -------------------------------------------------------------------------------------


def test_backoff_doubles_from_the_base_and_is_capped():
    s = ConsumerSettings(
        group="g", consumer="c", streams=("s",), retry_base_ms=500, retry_max_ms=10_000
    )
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


def test_zero_base_means_retry_at_once():
    s = ConsumerSettings(group="g", consumer="c", streams=("s",), retry_base_ms=0)
    assert {s.backoff_ms(n) for n in range(1, 10)} == {0}


def test_all_streams_include_the_groups_redrive_stream():
    assert settings().all_streams == (STREAM, redrive_stream(GROUP))


# -- groups ----------------------------------------------------------------------------------


def test_group_creation_is_idempotent_and_starts_from_the_beginning(r):
    before = publish(r, envelope())  # published before the group existed
    consumer = StreamConsumer(r, FakeInboxPool(), settings(), {"OrderPlaced": Recorder()})
    consumer.ensure_groups()
    consumer.ensure_groups()  # BUSYGROUP is fine

    for stream in consumer.settings.all_streams:
        groups = r.xinfo_groups(stream)
        assert [g["name"] for g in groups] == [GROUP]
    assert consumer.read_new_once() == 1
    assert consumer.handlers["OrderPlaced"].seen and r.xpending(STREAM, GROUP)["pending"] == 0
    assert r.xrange(STREAM)[0][0] == before


def test_group_creation_surfaces_other_errors(r):
    r.set(STREAM, "not a stream")
    consumer = StreamConsumer(r, FakeInboxPool(), settings(), {})
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        consumer.ensure_groups()


# -- entries that never reach a handler ------------------------------------------------------


def test_event_types_without_a_handler_are_acked_without_touching_the_database(r):
    consumer = StreamConsumer(r, UnusablePool(), settings(), {"OrderPlaced": Recorder()})
    consumer.ensure_groups()
    publish(r, envelope("OrderConfirmed"))

    assert consumer.read_new_once() == 1
    assert consumer.stats.ignored == 1
    assert pending_count(r) == 0
    assert dead_letters(r) == []


def test_contract_invalid_entry_is_dead_lettered_at_once_and_acked(r):
    handler = Recorder()
    consumer = StreamConsumer(r, UnusablePool(), settings(), {"OrderPlaced": handler})
    consumer.ensure_groups()
    broken = encode_entry(envelope())
    broken["payload"] = json.dumps({"order_id": "nope"})
    entry_id = r.xadd(STREAM, broken)

    assert consumer.read_new_once() == 1

    assert handler.seen == []
    assert pending_count(r) == 0
    assert consumer.stats.dead_lettered == 1
    [letter] = dead_letters(r)
    for name, value in broken.items():
        assert letter[name] == value  # the original fields travel with the dead letter
    assert letter["original_stream"] == STREAM
    assert letter["original_id"] == entry_id
    assert letter["group"] == GROUP
    assert letter["attempts"] == "1"
    assert letter["error"].startswith("contract: invalid OrderPlaced v1 payload")
    assert datetime.fromisoformat(letter["dead_lettered_at"])


def test_entry_with_missing_envelope_fields_is_dead_lettered_and_the_stream_flows_on(r):
    handler = Recorder()
    consumer = StreamConsumer(r, FakeInboxPool(), settings(), {"OrderPlaced": handler})
    consumer.ensure_groups()
    garbage_id = r.xadd(STREAM, {"hello": "world"})
    good = envelope()
    publish(r, good)

    assert consumer.read_new_once() == 2

    assert handler.seen == [good.event_id]
    assert pending_count(r) == 0
    [letter] = dead_letters(r)
    assert letter["hello"] == "world"
    assert letter["original_id"] == garbage_id
    assert "missing envelope fields" in letter["error"]


# -- the inbox path, against the in-memory stand-in ------------------------------------------


def test_processed_entries_are_acked_and_recorded_in_the_inbox(r):
    pool = FakeInboxPool()
    handler = Recorder()
    consumer = StreamConsumer(r, pool, settings(), {"OrderPlaced": handler})
    consumer.ensure_groups()
    events = [envelope() for _ in range(3)]
    for env in events:
        publish(r, env)

    assert consumer.read_new_once() == 3
    assert handler.seen == [env.event_id for env in events]
    assert pool.inbox == {(GROUP, env.event_id) for env in events}
    assert pending_count(r) == 0
    assert consumer.stats.processed == 3


def test_a_duplicate_delivery_is_acked_without_running_the_handler_again(r):
    pool = FakeInboxPool()
    handler = Recorder()
    consumer = StreamConsumer(r, pool, settings(), {"OrderPlaced": handler})
    consumer.ensure_groups()
    env = envelope()
    publish(r, env)
    publish(r, env)  # the relay's crash-between-XADD-and-UPDATE duplicate

    consumer.read_new_once()

    assert handler.seen == [env.event_id]
    assert consumer.stats.processed == 1
    assert consumer.stats.duplicates == 1
    assert pending_count(r) == 0


def test_a_failing_handler_leaves_the_entry_pending_and_the_inbox_untouched(r):
    pool = FakeInboxPool()
    handler = Recorder(fail=True)
    consumer = StreamConsumer(r, pool, settings(), {"OrderPlaced": handler})
    consumer.ensure_groups()
    env = envelope()
    publish(r, env)

    consumer.read_new_once()
    assert pending_count(r) == 1
    assert pool.inbox == set()
    assert consumer.stats.failed == 1

    handler.fail = False
    # fakeredis wants at least a millisecond of idleness even when the backoff is zero
    wait_until(consumer.retry_failed_once, timeout=5)
    assert pending_count(r) == 0
    assert pool.inbox == {(GROUP, env.event_id)}
    assert handler.seen == [env.event_id, env.event_id]
    assert consumer.stats.processed == 1


def test_retry_respects_the_backoff(r):
    consumer = StreamConsumer(
        r, FakeInboxPool(), settings(retry_base_ms=60_000), {"OrderPlaced": Recorder(fail=True)}
    )
    consumer.ensure_groups()
    publish(r, envelope())
    consumer.read_new_once()

    assert consumer.retry_failed_once() == 0  # a minute has not passed
    assert r.xpending_range(STREAM, GROUP, "-", "+", 10)[0]["times_delivered"] == 1


def test_after_max_deliveries_the_entry_is_dead_lettered_and_later_entries_flow(r):
    pool = FakeInboxPool()
    poison = Recorder(fail=True)
    good = Recorder()
    consumer = StreamConsumer(
        r, pool, settings(max_deliveries=3), {"OrderPlaced": poison, "OrderCancelled": good}
    )
    consumer.ensure_groups()
    bad_env = envelope("OrderPlaced")
    bad_id = publish(r, bad_env)
    consumer.read_new_once()  # delivery 1
    wait_until(consumer.retry_failed_once, timeout=5)  # delivery 2
    assert dead_letters(r) == []
    later = envelope("OrderCancelled")
    publish(r, later)
    consumer.read_new_once()
    wait_until(consumer.retry_failed_once, timeout=5)  # delivery 3: the last one

    assert len(poison.seen) == 3
    assert good.seen == [later.event_id]
    assert pending_count(r) == 0
    [letter] = dead_letters(r)
    assert letter["original_id"] == bad_id
    assert letter["event_id"] == bad_env.event_id
    assert letter["attempts"] == "3"
    assert letter["error"] == "RuntimeError: handler is broken"
    assert consumer.stats.dead_lettered == 1
    assert (GROUP, bad_env.event_id) not in pool.inbox


def test_a_database_outage_is_not_the_handlers_fault(r):
    pool = FakeInboxPool()
    pool.outage = psycopg.OperationalError("connection refused")
    handler = Recorder()
    consumer = StreamConsumer(r, pool, settings(max_deliveries=1), {"OrderPlaced": handler})
    consumer.ensure_groups()
    env = envelope()
    publish(r, env)

    with pytest.raises(psycopg.OperationalError):
        consumer.read_new_once()
    # not dead-lettered even though max_deliveries is 1, and still pending for a later try
    assert dead_letters(r) == []
    assert pending_count(r) == 1

    pool.outage = None
    assert consumer.read_own_pending_once() == 1
    assert handler.seen == [env.event_id]
    assert pending_count(r) == 0


def test_own_pending_entries_are_read_again_after_a_restart(r):
    env = envelope()
    publish(r, env)
    first = StreamConsumer(r, FakeInboxPool(), settings(), {"OrderPlaced": Recorder()})
    first.ensure_groups()
    r.xreadgroup(GROUP, "c1", {STREAM: ">"}, count=10)  # delivered, then "crashed" before ack

    handler = Recorder()
    restarted = StreamConsumer(r, FakeInboxPool(), settings(), {"OrderPlaced": handler})
    assert restarted.read_new_once() == 0  # nothing new
    assert restarted.read_own_pending_once() == 1
    assert handler.seen == [env.event_id]
    assert pending_count(r) == 0


def test_abandoned_entries_are_claimed_by_another_consumer(r):
    env = envelope()
    publish(r, env)
    StreamConsumer(r, FakeInboxPool(), settings(), {}).ensure_groups()
    r.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=10)

    handler = Recorder()
    live = StreamConsumer(r, FakeInboxPool(), settings(consumer="live"), {"OrderPlaced": handler})
    wait_until(live.claim_abandoned_once, timeout=5)
    assert handler.seen == [env.event_id]
    assert pending_count(r) == 0


def test_abandoned_entries_wait_for_the_idle_timeout(r):
    publish(r, envelope())
    StreamConsumer(r, FakeInboxPool(), settings(), {}).ensure_groups()
    r.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=10)

    handler = Recorder()
    live = StreamConsumer(
        r,
        FakeInboxPool(),
        settings(consumer="live", claim_idle_ms=600_000),
        {"OrderPlaced": handler},
    )
    assert live.claim_abandoned_once() == 0
    assert handler.seen == []
    [info] = r.xpending_range(STREAM, GROUP, "-", "+", 10)
    assert info["consumer"] == "dead"


def test_outcomes_are_reported(r):
    seen: list[tuple[str, str]] = []
    consumer = StreamConsumer(
        r,
        FakeInboxPool(),
        settings(),
        {"OrderPlaced": Recorder()},
        on_outcome=lambda event_type, outcome, seconds: seen.append((event_type, outcome)),
    )
    consumer.ensure_groups()
    env = envelope()
    publish(r, env)
    publish(r, env)
    publish(r, envelope("OrderConfirmed"))
    r.xadd(STREAM, {"event_type": "OrderPlaced"})
    consumer.read_new_once()
    # Ignored types are settled before the rest of a read, so compare without order.
    assert sorted(seen) == sorted(
        [
            ("OrderPlaced", "processed"),
            ("OrderPlaced", "duplicate"),
            ("OrderConfirmed", "ignored"),
            ("OrderPlaced", "dead_lettered"),
        ]
    )


def test_redriven_entries_are_consumed_from_the_groups_redrive_stream(r):
    handler = Recorder()
    consumer = StreamConsumer(r, FakeInboxPool(), settings(), {"OrderPlaced": handler})
    consumer.ensure_groups()
    env = envelope()
    publish(r, env, stream=redrive_stream(GROUP))

    assert consumer.read_new_once() == 1
    assert handler.seen == [env.event_id]
    assert pending_count(r, stream=redrive_stream(GROUP)) == 0


def test_restart_reads_every_own_pending_entry_page_by_page(r):
    events = [envelope() for _ in range(5)]
    for env in events:
        publish(r, env)
    StreamConsumer(r, FakeInboxPool(), settings(), {}).ensure_groups()
    r.xreadgroup(GROUP, "c1", {STREAM: ">"}, count=10)

    handler = Recorder()
    restarted = StreamConsumer(r, FakeInboxPool(), settings(batch_size=2), {"OrderPlaced": handler})
    assert restarted.read_own_pending_once() == 5
    assert handler.seen == [env.event_id for env in events]
    assert pending_count(r) == 0


def test_a_poison_entry_pending_at_restart_is_read_once_not_forever(r):
    """Regression: run() used to loop `while read_own_pending_once()`, which never ends while
    an own pending entry keeps failing (the pass counts attempts, not successes)."""
    poison_env, good_env = envelope(), envelope()
    publish(r, poison_env)
    publish(r, good_env)
    StreamConsumer(r, FakeInboxPool(), settings(), {}).ensure_groups()
    r.xreadgroup(GROUP, "c1", {STREAM: ">"}, count=10)

    class FailsFor:
        def __init__(self, event_id):
            self.event_id = event_id
            self.seen: list[str] = []

        def __call__(self, uow, env):
            self.seen.append(env.event_id)
            if env.event_id == self.event_id:
                raise RuntimeError("poison")

    handler = FailsFor(poison_env.event_id)
    restarted = StreamConsumer(r, FakeInboxPool(), settings(), {"OrderPlaced": handler})
    assert restarted.read_own_pending_once() == 2
    assert handler.seen == [poison_env.event_id, good_env.event_id]
    [info] = r.xpending_range(STREAM, GROUP, "-", "+", 10)
    assert info["message_id"] == r.xrange(STREAM)[0][0]  # only the poison entry stays pending
