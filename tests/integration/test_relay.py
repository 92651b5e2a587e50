"""The outbox relay: id order, flat fields, late commits, crash duplicates, one active relay,
NOTIFY wake-up. Real PostgreSQL and Redis throughout."""

from __future__ import annotations

import json
import time
import uuid

import pytest

from contracts import (
    ENVELOPE_FIELDS,
    INVENTORY_EVENTS,
    decode_entry,
    partition_of,
    partition_stream,
)
from outbox_relay.publisher import publish_batch
from outbox_relay.relay import Relay, RelaySettings
from service_runtime.locks import RELAY_LOCK_KEY
from service_runtime.unit_of_work import UnitOfWork
from tests.helpers import FreezableProxy, order_placed_payload, wait_until

PRODUCER = "inventory"
# One partition: every row in one stream, so id order is one order to check. Routing over
# several partitions has its own test below.
PARTITIONS = 1
STREAM = partition_stream(INVENTORY_EVENTS, 0)


class Crash(Exception):
    """Stands in for the process dying at a fault point."""


def stream_event_ids(redis_client) -> list[str]:
    return [fields["event_id"] for _id, fields in redis_client.xrange(STREAM)]


def outbox_ids(db, *, published: bool | None = None) -> list[str]:
    where = {
        None: "",
        True: " WHERE published_at IS NOT NULL",
        False: " WHERE published_at IS NULL",
    }[published]
    return [row[0] for row in db.execute(f"SELECT event_id::text FROM outbox{where} ORDER BY id")]


def publish(db, redis_client, batch_size: int = 100, fault=None) -> int:
    kwargs = {"fault": fault} if fault else {}
    return publish_batch(
        db,
        redis_client,
        producer=PRODUCER,
        partitions=PARTITIONS,
        batch_size=batch_size,
        **kwargs,
    )


def settings(**overrides) -> RelaySettings:
    values = dict(
        producer=PRODUCER,
        partitions=PARTITIONS,
        batch_size=100,
        poll_seconds=0.2,
        standby_retry_seconds=0.05,
    )
    values.update(overrides)
    return RelaySettings(**values)


# -- one batch -------------------------------------------------------------------------------


def test_publishes_in_id_order_with_flat_readable_fields(db, redis_client, emit):
    emitted = [emit() for _ in range(5)]

    assert publish(db, redis_client, batch_size=3) == 3
    assert publish(db, redis_client, batch_size=3) == 2
    assert publish(db, redis_client, batch_size=3) == 0

    entries = redis_client.xrange(STREAM)
    assert [fields["event_id"] for _id, fields in entries] == emitted
    rows = db.execute(
        "SELECT event_id::text, aggregate_id, correlation_id::text, payload FROM outbox ORDER BY id"
    ).fetchall()
    for (_entry_id, fields), (event_id, aggregate_id, correlation, payload) in zip(
        entries, rows, strict=True
    ):
        assert set(fields) == set(ENVELOPE_FIELDS)  # flat: no nested envelope blob
        assert fields["event_id"] == event_id
        assert fields["event_type"] == "OrderPlaced"
        assert fields["event_version"] == "1"
        assert fields["aggregate_type"] == "order"
        assert fields["aggregate_id"] == aggregate_id
        assert fields["correlation_id"] == correlation
        assert fields["causation_id"] == ""
        assert fields["producer"] == PRODUCER
        assert json.loads(fields["payload"]) == payload
        envelope = decode_entry(fields)  # and it is on contract for every consumer
        assert envelope.payload == payload
    assert outbox_ids(db, published=False) == []


def test_each_row_goes_to_its_orders_partition_in_id_order(db, redis_client, emit):
    emitted = [(emit(order_id), order_id) for order_id in [str(uuid.uuid4()) for _ in range(20)]]
    emitted += [(emit(order_id), order_id) for _e, order_id in emitted[:5]]  # second events
    assert publish_batch(db, redis_client, producer=PRODUCER, partitions=8, batch_size=100) == 25
    for partition in range(8):
        stream = partition_stream(INVENTORY_EVENTS, partition)
        expected = [e for e, order_id in emitted if partition_of(order_id, 8) == partition]
        assert [f["event_id"] for _id, f in redis_client.xrange(stream)] == expected


def test_the_entry_built_by_the_claim_is_the_rows_fields_as_python_writes_them(
    db, redis_client, emit
):
    """The claim query returns each entry's fields as the text it carries: occurred_at is
    created_at as Python's isoformat() writes it in the session's time zone (no fraction when
    it is zero), text passes through unchanged (quotes, backslashes, control and non-ASCII
    characters), a stored traceparent goes along with tracing off."""
    first, second, third = emit(), emit(), emit()
    cause = str(uuid.uuid4())
    odd = 'quote " backslash \\ tab \t nl \n bell \u0007 ünïcødé 東京 🚀'  # a customer id
    db.execute(
        "UPDATE outbox SET created_at = %s, causation_id = %s, traceparent = %s,"
        " payload = jsonb_set(payload, '{customer_id}', to_jsonb(%s::text)) WHERE event_id = %s",
        (
            "2026-01-02 03:04:05+00",
            cause,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            odd,
            first,
        ),
    )
    db.execute(
        "UPDATE outbox SET created_at = %s WHERE event_id = %s",
        ("2026-07-08 09:10:11.000123+00", second),
    )
    db.execute("SET TIME ZONE 'Asia/Kathmandu'")  # +05:45: the session's zone, as psycopg's
    created = dict(db.execute("SELECT event_id::text, created_at FROM outbox").fetchall())

    assert publish(db, redis_client) == 3

    by_event = {fields["event_id"]: fields for _id, fields in redis_client.xrange(STREAM)}
    assert by_event[first]["occurred_at"] == "2026-01-02T08:49:05+05:45"
    assert by_event[second]["occurred_at"] == "2026-07-08T14:55:11.000123+05:45"
    for event_id, fields in by_event.items():
        assert fields["occurred_at"] == created[event_id].isoformat()
        decode_entry(fields)
    assert json.loads(by_event[first]["payload"])["customer_id"] == odd
    assert by_event[first]["causation_id"] == cause
    assert by_event[first]["traceparent"] == (
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    )
    assert set(by_event[first]) == {*ENVELOPE_FIELDS, "traceparent"}
    assert set(by_event[third]) == set(ENVELOPE_FIELDS)


def test_nothing_to_publish_touches_nothing(db, redis_client):
    assert publish(db, redis_client) == 0
    assert not redis_client.exists(STREAM)


def test_a_late_commit_with_a_lower_id_is_not_skipped(pool, db, redis_client, emit):
    def outbox_id(event_id: str) -> int:
        return db.execute("SELECT id FROM outbox WHERE event_id = %s", (event_id,)).fetchone()[0]

    payload = order_placed_payload()
    with pool.connection() as slow_conn, slow_conn.transaction():
        # takes the lower outbox id, but commits only after a higher id was published
        slow_id = UnitOfWork(slow_conn).emit(
            "OrderPlaced", aggregate_type="order", aggregate_id=payload["order_id"], payload=payload
        )
        fast_id = emit()
        assert publish(db, redis_client) == 1
        assert stream_event_ids(redis_client) == [fast_id]
    # committed now

    assert outbox_id(slow_id) < outbox_id(fast_id)
    assert publish(db, redis_client) == 1
    assert stream_event_ids(redis_client) == [fast_id, slow_id]
    assert outbox_ids(db, published=False) == []


def test_a_crash_between_xadd_and_marking_published_duplicates_never_loses(db, redis_client, emit):
    emitted = [emit() for _ in range(3)]

    def crash(point: str) -> None:
        if point == "after_xadd":
            raise Crash(point)

    with pytest.raises(Crash):
        publish(db, redis_client, fault=crash)
    assert stream_event_ids(redis_client) == emitted  # already out...
    assert outbox_ids(db, published=False) == emitted  # ...but not marked

    assert publish(db, redis_client) == 3
    assert stream_event_ids(redis_client) == emitted + emitted  # duplicates, none lost
    assert outbox_ids(db, published=False) == []


# -- the relay loop --------------------------------------------------------------------------


def test_relay_publishes_committed_rows(db_url, db, redis_client, emit, background):
    batches: list[int] = []
    relay = Relay(db_url, redis_client, settings(batch_size=2), on_batch=batches.append)
    background.start("relay", relay.run)
    emitted = [emit() for _ in range(5)]

    wait_until(lambda: len(stream_event_ids(redis_client)) >= 5)
    wait_until(lambda: outbox_ids(db, published=False) == [])
    assert stream_event_ids(redis_client) == emitted
    assert relay.published == 5 == sum(batches)
    assert max(batches) <= 2


def test_relay_does_not_skip_a_late_commit(pool, db_url, redis_client, emit, background):
    relay = Relay(db_url, redis_client, settings())
    background.start("relay", relay.run)
    wait_until(relay.active.is_set)
    payload = order_placed_payload()
    with pool.connection() as slow_conn, slow_conn.transaction():
        slow_id = UnitOfWork(slow_conn).emit(
            "OrderPlaced", aggregate_type="order", aggregate_id=payload["order_id"], payload=payload
        )
        fast_id = emit()
        wait_until(lambda: fast_id in stream_event_ids(redis_client))
    # the lower id commits now, after the higher one is already in the stream
    wait_until(lambda: slow_id in stream_event_ids(redis_client))
    assert stream_event_ids(redis_client) == [fast_id, slow_id]


def test_relay_crash_after_xadd_is_followed_by_republishing(
    db_url, db, redis_client, emit, background
):
    emitted = [emit() for _ in range(3)]

    def crash(point: str) -> None:
        if point == "after_xadd":
            raise Crash(point)

    crashing = background.start(
        "crashing relay", Relay(db_url, redis_client, settings(), fault=crash).run
    )
    wait_until(crashing.finished.is_set)
    assert isinstance(crashing.error, Crash)
    assert stream_event_ids(redis_client) == emitted
    assert outbox_ids(db, published=False) == emitted

    successor = Relay(db_url, redis_client, settings())
    background.start("successor", successor.run)
    wait_until(lambda: outbox_ids(db, published=False) == [])
    assert stream_event_ids(redis_client) == emitted + emitted


def marking_later(db_url, redis_client, mark_within_ms: int) -> Relay:
    """A relay whose marks wait up to `mark_within_ms` for the next claim (no polls or
    takeovers in the way)."""
    return Relay(
        db_url,
        redis_client,
        settings(poll_seconds=30, mark_within_ms=mark_within_ms, takeover_after_seconds=0),
    )


def stop(runner, db) -> None:
    """Stop a relay runner and wait until it has ended (woken from its wait by a NOTIFY)."""
    runner.stop.set()
    db.execute("SELECT pg_notify('outbox', '')")
    wait_until(runner.finished.is_set)


def test_at_light_load_a_batch_is_marked_with_the_next_claim_or_alone_soon_after(
    db_url, db, redis_client, emit, background
):
    """RELAY_MARK_WITHIN_MS: a batch sent at light load is not marked at once; its mark goes in
    the statement that claims the next batch, or alone once the window has passed, or when the
    relay stops. Here the window (20 s) is longer than the test: each mark seen comes with a
    claim, or with the stop."""
    relay = marking_later(db_url, redis_client, 20_000)
    # committed before the relay starts: its NOTIFY went before the relay's LISTEN, so nothing
    # wakes the relay to mark it early (emitted after the start, its NOTIFY can reach a relay
    # that has already claimed it, and the mark goes at once with an empty claim: correct, but
    # not the case these tests are about)
    first = emit()
    runner = background.start("relay", relay.run)
    wait_until(lambda: stream_event_ids(redis_client) == [first])
    assert outbox_ids(db, published=False) == [first]  # sent, its mark waiting
    second = emit()
    wait_until(lambda: stream_event_ids(redis_client) == [first, second])
    wait_until(lambda: outbox_ids(db, published=False) == [second])  # first marked with the claim
    assert relay.published == 1
    stop(runner, db)
    assert runner.error is None
    assert outbox_ids(db, published=False) == []  # marked on the way out, not sent again
    assert relay.published == 2
    assert stream_event_ids(redis_client) == [first, second]

    soon = marking_later(db_url, redis_client, 100)
    background.start("relay with a short window", soon.run)
    third = emit()
    wait_until(lambda: outbox_ids(db, published=False) == [])  # alone, after 100 ms
    assert stream_event_ids(redis_client) == [first, second, third]


def test_a_batch_whose_mark_was_lost_with_the_session_is_sent_again_never_lost(
    db_url, db, redis_client, emit, background
):
    """The relay's session ends between a batch's XADD and its (deferred) mark: the rows were
    never marked, so the next session sends them again, duplicates after the first copies."""
    relay = marking_later(db_url, redis_client, 20_000)
    first = emit()  # before the start, as above
    runner = background.start("relay", relay.run)
    wait_until(lambda: stream_event_ids(redis_client) == [first])
    assert outbox_ids(db, published=False) == [first]  # sent, its mark waiting
    [holder] = lock_holders(db)
    db.execute("SELECT pg_terminate_backend(%s)", (holder,))
    second = emit()
    # the next session sends first again (never marked), then second
    wait_until(lambda: stream_event_ids(redis_client) == [first, first, second], timeout=30)
    stop(runner, db)
    assert outbox_ids(db, published=False) == []
    assert stream_event_ids(redis_client) == [first, first, second]


def test_a_mark_window_longer_than_the_poll_is_refused():
    with pytest.raises(ValueError, match="RELAY_MARK_WITHIN_MS"):
        settings(poll_seconds=0.2, mark_within_ms=500)


# -- one active relay per outbox -------------------------------------------------------------


def lock_holders(db) -> list[int]:
    """Backend pids holding the relay's advisory lock in this database."""
    return [
        row[0]
        for row in db.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            " AND classid = 0 AND objid = %s AND objsubid = 1",
            (RELAY_LOCK_KEY,),
        )
    ]


def start_pair(db_url, redis_client, background, **overrides):
    relays = [Relay(db_url, redis_client, settings(**overrides)) for _ in range(2)]
    runners = [background.start(f"relay-{n}", relay.run) for n, relay in enumerate(relays)]
    wait_until(lambda: any(relay.active.is_set() for relay in relays))
    return relays, runners


def test_only_one_of_two_relays_is_active(db_url, db, redis_client, emit, background):
    relays, _runners = start_pair(db_url, redis_client, background)
    emitted = [emit() for _ in range(3)]
    wait_until(lambda: outbox_ids(db, published=False) == [])

    assert [relay.active.is_set() for relay in relays].count(True) == 1
    assert len(lock_holders(db)) == 1
    active, standby = sorted(relays, key=lambda relay: not relay.active.is_set())
    assert active.published == 3
    assert standby.published == 0
    assert stream_event_ids(redis_client) == emitted


def test_the_standby_takes_over_when_the_active_relay_stops(
    db_url, db, redis_client, emit, background
):
    relays, runners = start_pair(db_url, redis_client, background)
    first = emit()
    wait_until(lambda: outbox_ids(db, published=False) == [])
    index = next(n for n, relay in enumerate(relays) if relay.active.is_set())
    active, standby = relays[index], relays[1 - index]

    runners[index].stop.set()
    wait_until(runners[index].finished.is_set)
    assert runners[index].error is None
    assert not active.active.is_set()
    wait_until(standby.active.is_set)

    second = emit()
    wait_until(lambda: outbox_ids(db, published=False) == [])
    assert standby.published == 1
    assert stream_event_ids(redis_client) == [first, second]


def test_the_standby_takes_over_when_the_active_relays_session_is_killed(
    db_url, db, admin_db, redis_client, emit, background
):
    # A long poll: the active relay sleeps on LISTEN, so only the kill can end its session soon.
    relays, runners = start_pair(
        db_url, redis_client, background, poll_seconds=30, takeover_after_seconds=0
    )
    first = emit()
    wait_until(lambda: outbox_ids(db, published=False) == [])
    index = next(n for n, relay in enumerate(relays) if relay.active.is_set())
    active, standby = relays[index], relays[1 - index]
    [holder] = lock_holders(db)

    # The process "dies": its session is cut off from the server side, and it will not come
    # back (stop set right after: the relay backs off 0.2 s before it connects again). In this
    # order because a relay told to stop ends its session by itself within a second (its wait
    # for a NOTIFY is in 1-s slices): stopped first, it could be gone before the terminate.
    assert admin_db.execute("SELECT pg_terminate_backend(%s)", (holder,)).fetchone()[0]
    runners[index].stop.set()

    wait_until(standby.active.is_set)
    wait_until(runners[index].finished.is_set)
    assert runners[index].error is None  # a lost session is an outage, not a crash
    assert not active.active.is_set()
    assert lock_holders(db) != [holder]

    second = emit()
    wait_until(lambda: outbox_ids(db, published=False) == [])
    assert standby.published == 1
    assert stream_event_ids(redis_client) == [first, second]


def test_a_killed_relay_that_comes_back_becomes_the_standby(
    db_url, db, admin_db, redis_client, emit, background
):
    relays, runners = start_pair(db_url, redis_client, background)
    [holder] = lock_holders(db)
    admin_db.execute("SELECT pg_terminate_backend(%s)", (holder,))

    # whichever wins the race, there is again exactly one active relay and rows flow
    wait_until(lambda: lock_holders(db) not in ([], [holder]))
    emitted = [emit() for _ in range(2)]
    wait_until(lambda: outbox_ids(db, published=False) == [])
    assert [relay.active.is_set() for relay in relays].count(True) == 1
    assert sum(relay.published for relay in relays) == 2
    assert stream_event_ids(redis_client) == emitted
    assert all(runner.error is None and not runner.finished.is_set() for runner in runners)


# -- a relay cut off without its session ending (DESIGN.md §5; docs/architecture.md) -------------


def test_a_standby_takes_over_from_a_relay_behind_a_frozen_proxy(
    db_url, db, redis_client, emit, background
):
    bound = 3.0
    with FreezableProxy.in_front_of(db_url) as proxy:
        cut_off = Relay(proxy.url_for(db_url), redis_client, settings(takeover_after_seconds=bound))
        background.start("relay-behind-proxy", cut_off.run)
        wait_until(cut_off.active.is_set)
        standby = Relay(db_url, redis_client, settings(takeover_after_seconds=bound))
        background.start("standby", standby.run)
        first = emit()
        wait_until(lambda: stream_event_ids(redis_client) == [first])
        # marked too (RELAY_MARK_WITHIN_MS after it was sent): a row sent and not yet marked
        # when the relay freezes is sent again by the standby, a duplicate
        wait_until(lambda: outbox_ids(db, published=False) == [])
        [holder] = lock_holders(db)

        # Both TCP connections stay open and acknowledged, nothing passes: the server keeps
        # the frozen relay's session, and its lock, until someone ends it.
        proxy.freeze()
        second = emit()
        wait_until(
            lambda: standby.active.is_set() and second in stream_event_ids(redis_client),
            timeout=bound + 30,  # a generous bound against hanging; the rule is `bound`
            message=lambda: f"no takeover; lock holders {lock_holders(db)} (was {holder})",
        )
        assert lock_holders(db) != [holder]
        assert stream_event_ids(redis_client) == [first, second]

        # Traffic flows again: the old relay learns its session is gone and stands by.
        proxy.thaw()
        wait_until(lambda: not cut_off.active.is_set(), timeout=30)
        third = emit()
        wait_until(lambda: outbox_ids(db, published=False) == [])
        assert stream_event_ids(redis_client) == [first, second, third]
        assert standby.active.is_set() and not cut_off.active.is_set()


def test_a_standby_leaves_a_healthy_idle_active_relay_alone(
    db_url, db, redis_client, emit, background
):
    bound = 2.0
    relays, _runners = start_pair(db_url, redis_client, background, takeover_after_seconds=bound)
    [holder] = lock_holders(db)
    # Nothing to publish: the active relay only polls (every 0.2 s). Over several bounds the
    # standby, retrying every 0.05 s, must find its backend active enough every time.
    time.sleep(4 * bound)
    assert lock_holders(db) == [holder]
    assert [relay.active.is_set() for relay in relays].count(True) == 1
    emitted = emit()
    wait_until(lambda: stream_event_ids(redis_client) == [emitted])


def test_a_takeover_bound_within_the_poll_interval_is_refused():
    with pytest.raises(ValueError, match="RELAY_TAKEOVER_AFTER_SECONDS"):
        settings(poll_seconds=5, takeover_after_seconds=10)


# -- NOTIFY ----------------------------------------------------------------------------------


def test_notify_wakes_the_relay_long_before_the_poll(db_url, redis_client, emit, background):
    relay = Relay(db_url, redis_client, settings(poll_seconds=30, takeover_after_seconds=0))
    background.start("relay", relay.run)
    wait_until(relay.active.is_set)
    first = emit()
    wait_until(lambda: stream_event_ids(redis_client) == [first], timeout=5)

    # The relay has published and gone back to sleep for up to 30 s; only NOTIFY wakes it.
    second = emit()
    wait_until(lambda: stream_event_ids(redis_client) == [first, second], timeout=5)
    third = emit()
    wait_until(lambda: stream_event_ids(redis_client) == [first, second, third], timeout=5)
