"""StreamConsumer against real Redis and PostgreSQL: inbox dedup, XACK after commit, restart,
claiming a dead consumer's entries, dead letters, and the handler's own outbox rows."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from contracts import ORDERS_EVENTS, Envelope, dead_letter_stream, encode_entry
from service_runtime.consumer import ConsumerSettings, StreamConsumer
from tests.helpers import order_placed_payload, wait_until

GROUP = "inventory"
STREAM = ORDERS_EVENTS


@pytest.fixture
def effects(db):
    """A scratch table the test handlers write to: one row per application of an event."""
    db.execute(
        "CREATE TABLE test_effects (id bigserial PRIMARY KEY, event_id uuid NOT NULL,"
        " note text NOT NULL DEFAULT '')"
    )
    yield
    db.execute("DROP TABLE test_effects")


def applied(db, event_id: str | None = None) -> int:
    if event_id is None:
        return db.execute("SELECT count(*) FROM test_effects").fetchone()[0]
    return db.execute(
        "SELECT count(*) FROM test_effects WHERE event_id = %s", (event_id,)
    ).fetchone()[0]


def inbox_rows(db) -> list[tuple]:
    return db.execute(
        "SELECT consumer_group, event_id::text, event_type, stream, entry_id FROM inbox"
        " ORDER BY processed_at"
    ).fetchall()


def envelope(event_type: str = "OrderPlaced") -> Envelope:
    payload = order_placed_payload()
    if event_type == "OrderCancelled":
        payload = {"order_id": payload["order_id"], "reason": "customer_request"}
    return Envelope(
        event_id=str(uuid.uuid4()),
        event_type=event_type,
        event_version=1,
        aggregate_type="order",
        aggregate_id=payload["order_id"],
        correlation_id=str(uuid.uuid4()),
        causation_id=None,
        occurred_at=datetime.now(UTC).isoformat(),
        producer="orders",
        payload=payload,
    )


def publish(redis_client, env: Envelope) -> str:
    return redis_client.xadd(STREAM, encode_entry(env))


def record(uow, env: Envelope) -> None:
    uow.execute("INSERT INTO test_effects (event_id) VALUES (%s)", (env.event_id,))


class Flaky:
    """Writes its effect, then fails while `failing` is set (the write must be rolled back)."""

    def __init__(self, failing: bool = True) -> None:
        self.failing = failing
        self.calls = 0

    def __call__(self, uow, env: Envelope) -> None:
        self.calls += 1
        record(uow, env)
        if self.failing:
            raise RuntimeError("flaky handler")


def pending(redis_client) -> list[dict]:
    return redis_client.xpending_range(STREAM, GROUP, "-", "+", 100)


@pytest.fixture
def make_consumer(redis_client, pool):
    def make(handlers, **overrides) -> StreamConsumer:
        values = dict(
            group=GROUP,
            consumer="c1",
            streams=(STREAM,),
            block_ms=100,
            retry_base_ms=0,
            max_deliveries=3,
            claim_idle_ms=30_000,
            maintenance_interval_s=0.05,
        )
        values.update(overrides)
        consumer = StreamConsumer(redis_client, pool, ConsumerSettings(**values), handlers)
        consumer.ensure_groups()
        return consumer

    return make


pytestmark = pytest.mark.usefixtures("effects")


# -- inbox -----------------------------------------------------------------------------------


def test_the_same_event_delivered_twice_applies_once(db, redis_client, make_consumer):
    consumer = make_consumer({"OrderPlaced": record})
    env = envelope()
    first = publish(redis_client, env)
    publish(redis_client, env)  # the relay's crash duplicate: same event, new entry

    assert consumer.read_new_once() == 2

    assert applied(db, env.event_id) == 1
    assert inbox_rows(db) == [(GROUP, env.event_id, "OrderPlaced", STREAM, first)]
    assert pending(redis_client) == []
    assert (consumer.stats.processed, consumer.stats.duplicates) == (1, 1)


def test_dedup_is_per_group(db, redis_client, make_consumer):
    env = envelope()
    publish(redis_client, env)
    make_consumer({"OrderPlaced": record}).read_new_once()
    make_consumer({"OrderPlaced": record}, group="billing").read_new_once()
    assert applied(db, env.event_id) == 2  # two services' reactions (sharing a test database)
    assert sorted(row[0] for row in inbox_rows(db)) == ["billing", GROUP]


# -- XACK only after commit ------------------------------------------------------------------


def test_a_failing_handler_leaves_the_entry_pending_and_nothing_written(
    db, redis_client, make_consumer
):
    handler = Flaky()
    consumer = make_consumer({"OrderPlaced": handler})
    env = envelope()
    entry_id = publish(redis_client, env)

    consumer.read_new_once()
    assert applied(db) == 0
    assert inbox_rows(db) == []
    [info] = pending(redis_client)
    assert (info["message_id"], info["consumer"], info["times_delivered"]) == (entry_id, "c1", 1)

    handler.failing = False
    assert consumer.retry_failed_once() == 1
    assert applied(db, env.event_id) == 1
    assert len(inbox_rows(db)) == 1
    assert pending(redis_client) == []
    assert consumer.retry_failed_once() == 0
    assert applied(db, env.event_id) == 1


def test_a_failed_commit_is_not_acknowledged(db, redis_client, make_consumer):
    """The handler returns normally but the COMMIT fails (a deferred constraint): no XACK."""
    db.execute(
        "ALTER TABLE test_effects ADD CONSTRAINT one_per_event UNIQUE (event_id)"
        " DEFERRABLE INITIALLY DEFERRED"
    )

    def twice(uow, env):
        record(uow, env)
        record(uow, env)  # violates the constraint, but only at commit time

    consumer = make_consumer({"OrderPlaced": twice})
    env = envelope()
    publish(redis_client, env)

    consumer.read_new_once()
    assert len(pending(redis_client)) == 1
    assert applied(db) == 0
    assert inbox_rows(db) == []

    consumer.handlers = {"OrderPlaced": record}  # "fixed and redeployed"
    assert consumer.retry_failed_once() == 1
    assert pending(redis_client) == []
    assert applied(db, env.event_id) == 1


def test_retry_waits_for_the_backoff(db, redis_client, make_consumer):
    handler = Flaky()
    consumer = make_consumer({"OrderPlaced": handler}, retry_base_ms=60_000)
    publish(redis_client, envelope())
    consumer.read_new_once()
    handler.failing = False
    assert consumer.retry_failed_once() == 0
    assert handler.calls == 1
    assert len(pending(redis_client)) == 1


# -- restart and dead consumers --------------------------------------------------------------


def test_own_pending_entries_are_processed_after_a_restart(db, redis_client, make_consumer):
    make_consumer({})  # groups exist
    events = [envelope() for _ in range(3)]
    for env in events:
        publish(redis_client, env)
    # "c1" receives the entries and dies before handling/acknowledging any of them
    redis_client.xreadgroup(GROUP, "c1", {STREAM: ">"}, count=10)
    assert len(pending(redis_client)) == 3

    restarted = make_consumer({"OrderPlaced": record}, consumer="c1", batch_size=2)
    assert restarted.read_new_once() == 0  # nothing new: they were delivered already
    assert restarted.read_own_pending_once() == 3
    assert [applied(db, env.event_id) for env in events] == [1, 1, 1]
    assert pending(redis_client) == []


def test_another_consumer_name_does_not_see_foreign_pending_entries(
    db, redis_client, make_consumer
):
    make_consumer({})
    publish(redis_client, envelope())
    redis_client.xreadgroup(GROUP, "c1", {STREAM: ">"}, count=10)
    other = make_consumer({"OrderPlaced": record}, consumer="c2")
    assert other.read_own_pending_once() == 0
    assert other.read_new_once() == 0
    assert applied(db) == 0


def test_a_dead_consumers_entries_are_claimed_after_the_idle_timeout(
    db, redis_client, make_consumer
):
    make_consumer({})
    env = envelope()
    entry_id = publish(redis_client, env)
    redis_client.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=10)

    patient = make_consumer({"OrderPlaced": record}, consumer="live", claim_idle_ms=600_000)
    assert patient.claim_abandoned_once() == 0  # not idle long enough yet
    assert pending(redis_client)[0]["consumer"] == "dead"

    live = make_consumer({"OrderPlaced": record}, consumer="live", claim_idle_ms=50)
    wait_until(live.claim_abandoned_once)
    assert applied(db, env.event_id) == 1
    assert inbox_rows(db)[0][4] == entry_id
    assert pending(redis_client) == []


def test_a_claimed_entry_that_keeps_failing_still_ends_in_dead_letters(
    db, redis_client, make_consumer
):
    make_consumer({})
    env = envelope()
    publish(redis_client, env)
    redis_client.xreadgroup(GROUP, "dead", {STREAM: ">"}, count=10)

    handler = Flaky()
    live = make_consumer(
        {"OrderPlaced": handler}, consumer="live", claim_idle_ms=50, max_deliveries=3
    )
    wait_until(live.claim_abandoned_once)

    def dead_lettered():
        live.retry_failed_once()
        return redis_client.xrange(dead_letter_stream(GROUP))

    [(_id, letter)] = wait_until(dead_lettered)
    assert letter["event_id"] == env.event_id
    assert int(letter["attempts"]) >= 3
    assert pending(redis_client) == []
    assert applied(db) == 0


# -- dead letters ----------------------------------------------------------------------------


def test_a_handler_that_always_fails_is_dead_lettered_while_later_entries_flow(
    db, redis_client, make_consumer
):
    poison = Flaky()
    consumer = make_consumer(
        {"OrderPlaced": poison, "OrderCancelled": record}, max_deliveries=3, retry_base_ms=10
    )
    bad = envelope("OrderPlaced")
    bad_id = publish(redis_client, bad)
    good = [envelope("OrderCancelled") for _ in range(2)]
    publish(redis_client, good[0])

    consumer.read_new_once()  # delivery 1 of the poison entry; the good one is done
    assert applied(db, good[0].event_id) == 1
    publish(redis_client, good[1])
    consumer.read_new_once()
    assert applied(db, good[1].event_id) == 1

    def dead_lettered():
        consumer.retry_failed_once()
        return redis_client.xrange(dead_letter_stream(GROUP))

    [(_id, letter)] = wait_until(dead_lettered)
    assert poison.calls == 3
    for name, value in encode_entry(bad).items():
        assert letter[name] == value
    assert letter["original_stream"] == STREAM
    assert letter["original_id"] == bad_id
    assert letter["group"] == GROUP
    assert letter["attempts"] == "3"
    assert letter["error"] == "RuntimeError: flaky handler"
    assert pending(redis_client) == []
    assert applied(db, bad.event_id) == 0
    assert bad.event_id not in [row[1] for row in inbox_rows(db)]
    assert consumer.stats.dead_lettered == 1


def test_a_contract_invalid_entry_is_dead_lettered_at_once(db, redis_client, make_consumer):
    consumer = make_consumer({"OrderPlaced": record})
    fields = encode_entry(envelope())
    fields["event_id"] = "not-a-uuid"
    entry_id = redis_client.xadd(STREAM, fields)
    consumer.read_new_once()
    [(_id, letter)] = redis_client.xrange(dead_letter_stream(GROUP))
    assert letter["original_id"] == entry_id
    assert letter["attempts"] == "1"
    assert letter["error"].startswith("contract: event_id is not a UUID")
    assert pending(redis_client) == []
    assert applied(db) == 0
    assert inbox_rows(db) == []


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


def test_the_handlers_outbox_rows_commit_with_the_inbox_row(db, redis_client, make_consumer):
    consumer = make_consumer({"OrderPlaced": reserve})
    env = envelope()
    publish(redis_client, env)
    publish(redis_client, env)

    consumer.read_new_once()

    assert outbox_rows(db) == [("StockReservationFailed", env.correlation_id, env.event_id)]
    assert [row[1] for row in inbox_rows(db)] == [env.event_id]
    assert applied(db, env.event_id) == 1


def test_a_failing_handlers_outbox_rows_roll_back_with_everything_else(
    db, redis_client, make_consumer
):
    failing = {"on": True}

    def reserve_then_fail(uow, env):
        reserve(uow, env)
        if failing["on"]:
            raise RuntimeError("after emitting")

    consumer = make_consumer({"OrderPlaced": reserve_then_fail})
    env = envelope()
    publish(redis_client, env)
    consumer.read_new_once()
    assert outbox_rows(db) == []
    assert inbox_rows(db) == []
    assert applied(db) == 0

    failing["on"] = False
    assert consumer.retry_failed_once() == 1
    assert outbox_rows(db) == [("StockReservationFailed", env.correlation_id, env.event_id)]
    assert len(inbox_rows(db)) == 1


# -- the loop --------------------------------------------------------------------------------


def test_run_processes_new_entries_with_a_poison_entry_pending_from_before_a_restart(
    db, redis_client, make_consumer, background
):
    """Regression: the start-up used to re-read its own pending entries until a pass handled
    none, which never happens while one of them keeps failing: the loop never got going."""
    poison = envelope("OrderPlaced")
    publish(redis_client, poison)
    make_consumer({})
    redis_client.xreadgroup(GROUP, "c1", {STREAM: ">"}, count=10)  # then "c1" died

    handler = Flaky()
    consumer = make_consumer(
        {"OrderPlaced": handler, "OrderCancelled": record},
        retry_base_ms=60_000,  # the poison entry is not retried during this test
    )
    try:
        background.start("consumer", consumer.run)
        good = envelope("OrderCancelled")
        publish(redis_client, good)
        wait_until(lambda: applied(db, good.event_id) == 1)
        assert handler.calls >= 1
        assert [info["message_id"] for info in pending(redis_client)] == [
            redis_client.xrange(STREAM)[0][0]
        ]
    finally:
        handler.failing = False  # lets a wedged start-up loop end, so the thread can stop


def test_run_consumes_until_stopped(db, redis_client, make_consumer, background):
    consumer = make_consumer({"OrderPlaced": record})
    runner = background.start("consumer", consumer.run)
    events = [envelope() for _ in range(5)]
    for env in events:
        publish(redis_client, env)
    wait_until(lambda: applied(db) == 5)
    assert pending(redis_client) == []

    runner.stop.set()
    wait_until(runner.finished.is_set)
    assert runner.error is None
