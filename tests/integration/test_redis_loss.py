"""Redis is a delivery channel, the outbox the source of truth (issue 10): durable publish modes,
the recorded published position, and loss detection and repair, on real PostgreSQL and Redis."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import pytest
import redis

from contracts import SUBSCRIPTIONS, partition_of, partition_stream
from outbox_relay import positions
from outbox_relay.durability import Durability, DurabilityError, NotDurable
from outbox_relay.publisher import publish_batch
from outbox_relay.relay import Relay
from service_runtime.redis_client import connect as redis_connect
from service_runtime.redis_client import flush
from tests.conftest import cluster_tests_enabled
from tests.helpers import replica_cannot_follow, wait_until
from tests.integration.test_relay import PARTITIONS, PRODUCER, settings

single_redis_only = pytest.mark.skipif(
    cluster_tests_enabled(), reason="one server: its replica, its version, its clients"
)


def publish(db, redis_client, recorded=None, **kwargs) -> int:
    return publish_batch(
        db,
        redis_client,
        producer=PRODUCER,
        partitions=PARTITIONS,
        batch_size=kwargs.pop("batch_size", 100),
        recorded=recorded,
        **kwargs,
    )


def stream_of(order_id: str) -> str:
    return partition_stream("inventory.events", partition_of(order_id, PARTITIONS))


def rows(db) -> list[tuple]:
    return db.execute(
        "SELECT event_id::text, published_at IS NOT NULL, published_stream, published_entry_id"
        " FROM outbox ORDER BY id"
    ).fetchall()


def in_redis(redis_client, stream: str) -> list[str]:
    return [fields["event_id"] for _id, fields in redis_client.xrange(stream)]


ORDER = "0b7a2c1e-0000-4000-8000-000000000001"  # every row of these tests in one partition stream


def order(i: int) -> str:
    return f"0b7a2c1e-0000-4000-8000-{i:012d}"


def test_marking_published_records_the_entry_id_and_the_streams_highest(db, redis_client, emit):
    events = [emit(ORDER) for _ in range(3)]
    assert publish(db, redis_client) == 3
    stream = stream_of(ORDER)
    entries = redis_client.xrange(stream)
    assert [f["event_id"] for _i, f in entries] == events
    assert rows(db) == [
        (e, True, stream, entry_id) for e, (entry_id, _f) in zip(events, entries, strict=True)
    ]
    assert positions.load(db) == {stream: entries[-1][0]}


def test_replicas_mode_without_enough_replicas_leaves_rows_unpublished_and_sends_them_again(
    db, redis_client, emit
):
    emit(ORDER)
    with pytest.raises(NotDurable, match="0 of 1 replicas"):
        publish(db, redis_client, durability=Durability.parse("replicas:1"), wait_timeout_ms=50)
    # sent, but not counted as published: nothing recorded, it goes again (a duplicate)
    assert [published for _e, published, _s, _i in rows(db)] == [False]
    assert positions.load(db) == {}
    assert publish(db, redis_client) == 1  # ack mode now
    assert len(in_redis(redis_client, stream_of(ORDER))) == 2  # duplicate, never a loss


@pytest.fixture
def replica(clean_state):
    from devstack.osutil import free_port
    from devstack.redis import EmbeddedReplica

    if reason := replica_cannot_follow(clean_state.redis_url):
        pytest.skip(reason)  # CI's second pass: the machine's Redis 7 as the primary
    url = urlparse(clean_state.redis_url)
    run_dir = Path(tempfile.mkdtemp(prefix="saga-replica-"))
    server = EmbeddedReplica(run_dir, free_port(), url.port, url.password or "", url.username)
    server.start()
    try:
        wait_until(server.in_sync, timeout=20, message="the replica did not sync")
        yield server
    finally:
        server.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


@single_redis_only
def test_replicas_mode_marks_published_once_a_replica_acknowledged(db, redis_client, emit, replica):
    emit(ORDER)
    emit(ORDER)
    mode = Durability.parse("replicas:1")
    assert publish(db, redis_client, durability=mode, wait_timeout_ms=5000) == 2
    assert all(published for _e, published, _s, _i in rows(db))
    mode.check_server(redis_client)  # enough replicas connected: no complaint


@single_redis_only
def test_fsync_mode_refuses_to_start_on_a_server_without_waitaof(redis_client):
    version = redis_client.info("server")["redis_version"]
    if tuple(int(x) for x in version.split(".")[:2]) >= (7, 2):
        pytest.skip(f"Redis {version} has WAITAOF")
    with pytest.raises(DurabilityError, match=rf"Redis {version}.*7\.2 or later"):
        Durability.parse("fsync").check_server(redis_client)
    with pytest.raises(DurabilityError, match="Redis"):
        Relay("postgresql://unused", redis_client, settings(durability="fsync"))


def test_a_malformed_durability_is_refused():
    with pytest.raises(ValueError, match="RELAY_DURABILITY"):
        settings(durability="replicas:zero")


# -- loss detection and repair ---------------------------------------------------------------


def test_after_flushall_the_check_republishes_exactly_what_redis_lost(db, redis_client, emit):
    events = [emit(ORDER) for _ in range(4)]
    recorded: dict[str, str] = {}
    assert publish(db, redis_client, recorded) == 4
    flush(redis_client)
    assert positions.check_and_repair(db, redis_client, PRODUCER, recorded) == 4
    assert [published for _e, published, _s, _i in rows(db)] == [False] * 4
    stream = stream_of(ORDER)
    # the groups reading the stream are back, at 0
    groups = {g["name"]: g["last-delivered-id"] for g in redis_client.xinfo_groups(stream)}
    assert groups == {g: "0-0" for g, bases in SUBSCRIPTIONS.items() if "inventory.events" in bases}
    assert publish(db, redis_client, recorded) == 4
    assert in_redis(redis_client, stream) == events
    assert positions.check_and_repair(db, redis_client, PRODUCER, recorded) == 0  # in step again
    (republished,) = db.execute("SELECT republished FROM published_positions").fetchone()
    assert republished == 4


def test_redis_restored_behind_loses_only_the_rows_after_its_last_entry(db, redis_client, emit):
    """An old AOF, or a failover to a lagging replica: Redis has a prefix of the stream."""
    events = [emit(ORDER) for _ in range(5)]
    recorded: dict[str, str] = {}
    publish(db, redis_client, recorded)
    stream = stream_of(ORDER)
    kept = redis_client.xrange(stream)[:2]
    redis_client.delete(stream)
    for entry_id, fields in kept:
        redis_client.xadd(stream, fields, id=entry_id)
    assert positions.check_and_repair(db, redis_client, PRODUCER, recorded) == 3
    assert [published for _e, published, _s, _i in rows(db)] == [True, True, False, False, False]
    publish(db, redis_client, recorded)
    assert in_redis(redis_client, stream) == events


def test_trimmed_or_deleted_entries_are_not_a_loss(db, redis_client, emit):
    for _ in range(3):
        emit(ORDER)
    recorded: dict[str, str] = {}
    publish(db, redis_client, recorded)
    stream = stream_of(ORDER)
    redis_client.xtrim(stream, maxlen=0)  # retention: last-generated-id stays
    assert positions.check_and_repair(db, redis_client, PRODUCER, recorded) == 0


def test_a_batch_after_a_loss_sends_the_lost_rows_first(db, redis_client, emit):
    """Redis emptied between two batches, before any check: the batch's own script sees it,
    adds nothing to that stream, and the lost rows go first, in outbox order."""
    old = [emit(ORDER) for _ in range(2)]
    recorded: dict[str, str] = {}
    publish(db, redis_client, recorded)
    flush(redis_client)
    new = emit(ORDER)
    assert publish(db, redis_client, recorded) == 0  # detected: nothing added, rows un-marked
    assert publish(db, redis_client, recorded) == 3
    assert in_redis(redis_client, stream_of(ORDER)) == [*old, new]


@single_redis_only
def test_a_repair_that_rolled_back_is_found_again(db, redis_client, emit, replica):
    """A failover to a lagging replica, seen while the new primary still refuses writes (it
    syncs): the repair cannot recreate the groups and rolls back. The relay's copy of the
    positions must not move either, or no later check sees the loss (found by chaos)."""
    from devstack.osutil import free_port

    stream = stream_of(ORDER)
    kept = [emit(ORDER) for _ in range(2)]
    recorded: dict[str, str] = {}
    publish(db, redis_client, recorded)
    behind = redis_connect(replica.url)
    wait_until(lambda: in_redis(behind, stream) == kept, message="the replica did not sync")
    # it stops following (a primary that is gone): it keeps what it has, read-only
    behind.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
    lost = [emit(ORDER) for _ in range(2)]
    publish(db, redis_client, recorded)
    was = dict(recorded)

    with pytest.raises(redis.ReadOnlyError):
        positions.check_and_repair(db, behind, PRODUCER, recorded)
    new = emit(ORDER)
    with pytest.raises(redis.ReadOnlyError):  # a batch's own check finds it too
        publish(db, behind, recorded)
    assert recorded == was
    assert [published for _e, published, _s, _i in rows(db)] == [True] * 4 + [False]

    replica.promote()
    assert positions.check_and_repair(db, behind, PRODUCER, recorded) == 2
    assert publish(db, behind, recorded) == 3
    assert in_redis(behind, stream) == [*kept, *lost, new]


def test_the_relay_repairs_a_flushall_by_itself(db_url, db, redis_client, emit, background):
    relay = Relay(db_url, redis_client, settings(check_seconds=0.2))
    background.start("relay", relay.run)
    events = [emit(order(i)) for i in range(20)]
    wait_until(lambda: not db.execute("SELECT 1 FROM outbox WHERE published_at IS NULL").fetchone())
    flush(redis_client)
    streams = {stream_of(order(i)) for i in range(20)}

    def everything_back() -> bool:
        found = {e for s in streams for e in in_redis(redis_client, s)}
        return found == set(events)

    wait_until(everything_back, timeout=20, message="the relay did not re-publish")
    assert relay.republished == 20


# -- the whole saga through a loss: no command typed -----------------------------------------


def _start_services(make_saga, clean_state, background, services):
    """Real relays and StreamConsumers (threads) of the given services, fast timings."""
    from service_runtime.redis_client import connect as redis_connect

    driver = make_saga(stocked=True)
    for service in services:
        if not service.endswith("-relay"):
            _start_services_on(driver, clean_state, background, [service])
            continue
        name = service.removesuffix("-relay")
        relay = Relay(
            clean_state.db_urls[name],
            redis_connect(clean_state.redis_url),
            settings(producer=name, partitions=driver.partitions, check_seconds=0.3),
        )
        background.start(service, relay.run)
    return driver


@single_redis_only
@pytest.mark.parametrize("loss", ["flushall", "restart-empty"])
def test_orders_in_flight_when_redis_loses_everything_end_as_they_would_have(
    make_saga, clean_state, background, loss, tmp_path
):
    """Orders placed while billing's consumer is down; Redis loses its data; billing comes
    back. Every order is confirmed, with no command: the relays find Redis behind and
    re-publish, the groups are recreated at 0, the inboxes absorb what was seen before."""
    from tests.saga_driver import SERVICES

    relays = [f"{s}-relay" for s in SERVICES]
    driver = _start_services(make_saga, clean_state, background, [*relays, "orders", "inventory"])
    for service in SERVICES:
        driver.release(service)
    driver.product("apple", available=100, price_cents=10)
    driver.account("alice", balance_cents=10_000)
    orders = [driver.place("alice", [("apple", 1)]) for _ in range(12)]

    def reserved() -> bool:
        return all(
            (driver.reservation(o) or {}).get("status") == "held" for o in orders
        ) and not _unpublished(driver)

    wait_until(reserved, timeout=30, message="stock was not reserved for every order")
    if loss == "flushall":
        flush(driver.redis)
    else:
        _restart_empty(driver.redis)
    # billing comes back: it never saw OrderPlaced nor StockReserved
    _start_services_on(driver, clean_state, background, ["billing"])

    def confirmed() -> list[str]:
        return [o for o in orders if driver.order(o)["status"] != "confirmed"]

    wait_until(lambda: not confirmed(), timeout=60, message=lambda: f"not confirmed: {confirmed()}")
    assert driver.balance("alice") == 10_000 - 12 * 10
    assert driver.available("apple") == 100 - 12
    with psycopg_connect(clean_state.db_urls["orders"]) as conn:
        (republished,) = conn.execute(
            "SELECT coalesce(sum(republished), 0) FROM published_positions"
        ).fetchone()
    assert republished >= 12  # every OrderPlaced went again


def _unpublished(driver) -> int:
    total = 0
    for service in ("orders", "inventory", "billing"):
        with driver.pools[service].connection() as conn:
            total += conn.execute(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL"
            ).fetchone()[0]
    return total


def _start_services_on(driver, clean_state, background, services) -> None:
    """StreamConsumers (threads) of the given services on `driver`'s pools, fast timings."""
    import importlib

    from service_runtime.consumer import ConsumerSettings
    from service_runtime.consumer_group import StreamConsumer
    from service_runtime.redis_client import connect as redis_connect

    for service in services:
        consumer = StreamConsumer(
            redis_connect(clean_state.redis_url),
            driver.pools[service],
            ConsumerSettings(
                group=service,
                consumer=f"{service}-live",
                partitions=driver.partitions,
                block_ms=200,
                heartbeat_ms=200,
                lease_ms=1000,
            ),
            importlib.import_module(f"{service}_service.reactions").HANDLERS,
        )
        background.start(service, consumer.run)


def _restart_empty(client) -> None:
    """Redis killed and started again with an empty data directory: as seen by its clients,
    the connections drop and every key is gone (DEBUG RELOAD of nothing is not available on
    every build, so: drop every client connection, then FLUSHALL)."""
    flush(client)
    client.client_kill_filter(_type="normal", skipme=True)


def psycopg_connect(url):
    import psycopg

    return psycopg.connect(url, autocommit=True)
