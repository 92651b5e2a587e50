"""Partition ownership for real: StreamConsumers (threads, each with its own pool) and `saga
consume` processes sharing one group's partitions through leases in PostgreSQL.

Bounds: a partition whose owner died is owned again within lease_ms + heartbeat_ms of the
owner's last renewal (docs/architecture.md). These tests use lease_ms=1000 and wait for the
takeover with a deadline of that bound plus a margin for a loaded machine; the time each
takeover took is printed (`pytest -s`) and recorded as a test property.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg_pool import PoolTimeout

from contracts import Envelope, encode_entry, partition_of, partition_stream
from inventory_service.reactions import HANDLERS as INVENTORY_HANDLERS
from service_runtime.consumer import ConsumerSettings
from service_runtime.consumer_group import StreamConsumer, pool_size
from service_runtime.db import create_pool
from service_runtime.ownership import Lease, PartitionLeases, assignment
from service_runtime.redis_client import connect as redis_connect
from tests.helpers import blocked_by_name, order_placed_envelope, wait_until

GROUP = "inventory"
PARTITIONS = 4
LEASE_MS = 1000
HEARTBEAT_MS = 100
# Scheduling margin on a shared 2-core machine: a heartbeat thread may start late.
MARGIN_S = 2.0
BOUND_S = (LEASE_MS + HEARTBEAT_MS) / 1000


def live_owners(db_url: str) -> dict[int, str]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT partition, owner FROM partition_leases"
            " WHERE consumer_group = %s AND expires_at > clock_timestamp()",
            (GROUP,),
        ).fetchall()
    return dict(rows)


def split_as_assigned(names: list[str]) -> dict[int, str]:
    return {p: name for name in names for p in assignment(names, PARTITIONS, name)}


def order_placed(partition: int) -> Envelope:
    while partition_of(order_id := str(uuid.uuid4()), PARTITIONS) != partition:
        pass
    return order_placed_envelope(order_id, sku="no-such-sku")  # -> StockReservationFailed


def publish_everywhere(redis_client, per_partition: int = 2) -> list[Envelope]:
    events = [order_placed(p) for p in range(PARTITIONS) for _ in range(per_partition)]
    for env in events:
        stream = partition_stream("orders.events", partition_of(env.aggregate_id, PARTITIONS))
        redis_client.xadd(stream, encode_entry(env))
    return events


def handled_once(db_url: str, events: list[Envelope]) -> bool:
    """Every event in the inbox exactly once, with exactly one reaction (outbox row)."""
    with psycopg.connect(db_url) as conn:
        inbox = conn.execute(
            "SELECT event_id::text, count(*) FROM inbox WHERE consumer_group = %s"
            " GROUP BY event_id",
            (GROUP,),
        ).fetchall()
        reactions = conn.execute(
            "SELECT aggregate_id, count(*) FROM outbox WHERE event_type = 'StockReservationFailed'"
            " GROUP BY aggregate_id"
        ).fetchall()
    wanted = {env.event_id for env in events}
    return dict(inbox) == dict.fromkeys(wanted, 1) and dict(reactions) == {
        env.aggregate_id: 1 for env in events
    }


def nothing_pending(redis_client) -> bool:
    return all(
        redis_client.xpending(partition_stream("orders.events", p), GROUP)["pending"] == 0
        for p in range(PARTITIONS)
    )


class CountingConnection:
    """A real connection that counts the statements sent through it."""

    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.statements = 0

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        self.statements += 1
        return self.conn.execute(*args, **kwargs)


def test_a_heartbeat_is_one_statement_that_renews_only_the_leases_still_held(db_url) -> None:
    """The beat, the renewal and the live members in one statement: a lease someone else took
    meanwhile (expired, acquired again with a higher epoch) is not renewed, so the caller
    stops its worker; the ones still held get a whole lease period more."""
    a, b = PartitionLeases(GROUP, "a", 60), PartitionLeases(GROUP, "b", 60)
    with psycopg.connect(db_url, autocommit=True) as raw:
        conn = CountingConnection(raw)
        kept, taken = a.acquire(raw, 0), a.acquire(raw, 1)
        assert kept is not None and taken is not None
        raw.execute(
            "UPDATE partition_leases SET expires_at = clock_timestamp() - interval '1 second'"
            " WHERE consumer_group = %s AND partition = %s",
            (GROUP, 1),
        )
        b.beat(raw, [])
        assert b.acquire(raw, 1) == Lease(1, taken.epoch + 1)
        a.beat(conn, [kept, taken])  # the first beat also forgets members gone for an hour
        raw.execute(
            "UPDATE partition_leases SET expires_at = clock_timestamp()"
            " + interval '1 second' WHERE consumer_group = %s AND partition = 0",
            (GROUP,),
        )
        conn.statements = 0

        beat = a.beat(conn, [kept, taken])

        assert conn.statements == 1
        assert beat.members == ["a", "b"]
        assert beat.renewed == [kept]
        left = raw.execute(
            "SELECT partition, owner, expires_at - clock_timestamp() > interval '50 seconds'"
            " FROM partition_leases WHERE consumer_group = %s ORDER BY partition",
            (GROUP,),
        ).fetchall()
        assert left == [(0, "a", True), (1, "b", True)]


# -- consumers in threads --------------------------------------------------------------------


@pytest.fixture
def consumers(db_url, clean_state, background) -> Iterator[Callable[..., Any]]:
    """Start a StreamConsumer (own pool, own Redis client named after it, own thread) under a
    name; returns (consumer, runner)."""
    pools, clients = [], []

    def start(
        name: str, lease_ms: int = LEASE_MS, block_ms: int = 100
    ) -> tuple[StreamConsumer, Any]:
        clients.append(redis_connect(clean_state.redis_url, name=name))
        settings = ConsumerSettings(
            group=GROUP,
            consumer=name,
            partitions=PARTITIONS,
            lease_ms=lease_ms,
            heartbeat_ms=HEARTBEAT_MS,
            block_ms=block_ms,
        )
        # wired as `saga consume` wires them: the workers' pool and the heartbeat's
        pool = create_pool(db_url, name=f"test-{name}", max_size=pool_size(settings))
        lease_pool = create_pool(db_url, name=f"test-{name}-leases", max_size=1)
        pools.extend([pool, lease_pool])
        consumer = StreamConsumer(
            clients[-1], pool, settings, INVENTORY_HANDLERS, lease_pool=lease_pool
        )
        return consumer, background.start(name, consumer.run)

    yield start
    stuck = background.stop_all()
    assert not stuck, f"consumers did not stop: {stuck}"
    for pool in pools:
        pool.close()
    for client in clients:
        client.close()


def blocked_reads(redis_client, name: str) -> int:
    """Connections named `name` waiting in a blocking command."""
    return blocked_by_name(redis_client).get(name, 0)


def test_the_heartbeat_renews_while_the_workers_hold_every_connection(db_url, clean_state) -> None:
    """CONSUMER_MAX_TRANSACTIONS=1: the workers' one connection is taken (a transaction
    waiting on a row, say), and the heartbeat still takes and renews leases on its own. On the
    workers' pool, the control, it cannot."""
    settings = ConsumerSettings(
        group=GROUP, consumer="inventory-busy", partitions=PARTITIONS, max_transactions=1
    )
    assert pool_size(settings) == 1
    workers_pool = create_pool(db_url, name="test-busy", max_size=1, timeout=1.0)
    lease_pool = create_pool(db_url, name="test-busy-leases", max_size=1, timeout=1.0)
    client = redis_connect(clean_state.redis_url, name="inventory-busy")
    try:
        with workers_pool.connection():  # every connection the workers have
            shared = StreamConsumer(client, workers_pool, settings, INVENTORY_HANDLERS)
            with pytest.raises(PoolTimeout):
                shared.rebalance_once()
            consumer = StreamConsumer(
                client, workers_pool, settings, INVENTORY_HANDLERS, lease_pool=lease_pool
            )
            consumer.rebalance_once()
            assert consumer.owned == list(range(PARTITIONS))
            expiry = _expiries(db_url)
            consumer.rebalance_once()
            assert consumer.owned == list(range(PARTITIONS))
            assert all(_expiries(db_url)[p] > expiry[p] for p in range(PARTITIONS))
            consumer.shutdown()
        assert live_owners(db_url) == {}
    finally:
        workers_pool.close()
        lease_pool.close()
        client.close()


def _expiries(db_url: str) -> dict[int, Any]:
    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT partition, expires_at FROM partition_leases WHERE consumer_group = %s",
            (GROUP,),
        ).fetchall()
    return dict(rows)


def test_two_consumers_share_the_partitions_each_owned_by_exactly_one(
    db_url, redis_client, consumers
) -> None:
    a, _ = consumers("inventory-a")
    b, _ = consumers("inventory-b")
    wanted = split_as_assigned(["inventory-a", "inventory-b"])

    wait_until(
        lambda: live_owners(db_url) == wanted and a.owned == [0, 2] and b.owned == [1, 3],
        timeout=15,
        message=lambda: f"owners {live_owners(db_url)}, a {a.owned}, b {b.owned}",
    )
    assert not set(a.owned) & set(b.owned)

    events = publish_everywhere(redis_client)
    wait_until(lambda: handled_once(db_url, events), timeout=30)
    wait_until(lambda: nothing_pending(redis_client))


def test_a_consumer_that_stops_renewing_loses_its_partitions_to_the_other_within_the_bound(
    db_url, redis_client, consumers, record_property
) -> None:
    """The owner's heartbeat stops (paused, cut off) and it hands nothing back; its workers
    keep running until the fence stops them."""
    a, runner_a = consumers("inventory-a")
    b, _ = consumers("inventory-b")
    wait_until(lambda: live_owners(db_url) == split_as_assigned(["inventory-a", "inventory-b"]))
    a_workers = list(a.running.values())

    a.shutdown = lambda: None  # type: ignore[method-assign]  # no hand-back: just silence
    runner_a.stop.set()
    wait_until(runner_a.finished.is_set)
    silenced = time.monotonic()
    wait_until(
        lambda: live_owners(db_url) == dict.fromkeys(range(PARTITIONS), "inventory-b"),
        timeout=BOUND_S + MARGIN_S,
        message=lambda: f"owners {live_owners(db_url)}",
    )
    owned_again = time.monotonic()
    took = owned_again - a._renewed_at  # the bound counts from the owner's last renewal
    record_property("takeover_after_last_renewal_s", round(took, 3))
    record_property("takeover_after_silence_s", round(owned_again - silenced, 3))
    print(
        f"\ntakeover after a silent owner: {took:.3f} s after its last renewal,"
        f" {owned_again - silenced:.3f} s after it fell silent (bound {BOUND_S} s)"
    )
    # its workers start right after the leases are taken (the table says so first)
    wait_until(lambda: b.owned == list(range(PARTITIONS)), timeout=10)

    # the silenced owner's workers are fenced off and end by themselves
    wait_until(
        lambda: not any(running.thread.is_alive() for running in a_workers),
        timeout=15,
    )
    events = publish_everywhere(redis_client)
    wait_until(lambda: handled_once(db_url, events), timeout=30)
    wait_until(lambda: nothing_pending(redis_client))


def test_a_joining_consumer_gets_its_share_within_the_bound(
    db_url, redis_client, consumers, record_property
) -> None:
    a, _ = consumers("inventory-a")
    wait_until(lambda: live_owners(db_url) == dict.fromkeys(range(PARTITIONS), "inventory-a"))
    before = publish_everywhere(redis_client)

    joined = time.monotonic()
    b, _ = consumers("inventory-b")
    wanted = split_as_assigned(["inventory-a", "inventory-b"])
    wait_until(
        lambda: live_owners(db_url) == wanted and b.owned == [1, 3] and a.owned == [0, 2],
        timeout=BOUND_S + MARGIN_S,
        message=lambda: f"owners {live_owners(db_url)}",
    )
    took = time.monotonic() - joined
    record_property("rebalance_after_join_s", round(took, 3))
    print(f"\nrebalance after a join: {took:.3f} s (bound {BOUND_S} s)")

    after = publish_everywhere(redis_client)
    wait_until(lambda: handled_once(db_url, before + after), timeout=30)
    wait_until(lambda: nothing_pending(redis_client))


def test_a_consumer_that_stops_hands_its_partitions_back_at_once(
    db_url, redis_client, consumers
) -> None:
    """A clean stop releases its leases: the other takes them at its next heartbeat, without
    waiting for them to expire (lease_ms is set far beyond the test's deadline here)."""
    _a, runner_a = consumers("inventory-a", lease_ms=60_000)
    b, _ = consumers("inventory-b", lease_ms=60_000)
    wait_until(lambda: live_owners(db_url) == split_as_assigned(["inventory-a", "inventory-b"]))
    runner_a.stop.set()
    wait_until(runner_a.finished.is_set)
    wait_until(
        lambda: live_owners(db_url) == dict.fromkeys(range(PARTITIONS), "inventory-b"),
        timeout=BOUND_S + MARGIN_S,
    )
    wait_until(lambda: b.owned == list(range(PARTITIONS)))
    with psycopg.connect(db_url) as conn:
        members = conn.execute(
            "SELECT consumer FROM consumer_members WHERE consumer_group = %s", (GROUP,)
        ).fetchall()
    assert members == [("inventory-b",)]  # a left the group


# A block far longer than the tests' deadlines: a worker that waited it out instead of being
# woken (CLIENT UNBLOCK) would miss them. Below the redis-py socket timeout (15 s).
LONG_BLOCK_MS = 14_000


def test_a_joining_consumer_gets_its_share_without_waiting_out_the_blocked_reads(
    db_url, redis_client, consumers
) -> None:
    """Handing back a partition wakes its worker's blocked read: the hand-back takes
    heartbeats, not CONSUMER_BLOCK_MS (the lease is long here, so that the leases are handed
    back, never taken over after expiring)."""
    a, _ = consumers("inventory-a", lease_ms=60_000, block_ms=LONG_BLOCK_MS)
    wait_until(lambda: live_owners(db_url) == dict.fromkeys(range(PARTITIONS), "inventory-a"))
    wait_until(lambda: blocked_reads(redis_client, "inventory-a") == PARTITIONS)

    b, _ = consumers("inventory-b", lease_ms=60_000, block_ms=LONG_BLOCK_MS)
    wait_until(
        lambda: (
            live_owners(db_url) == split_as_assigned(["inventory-a", "inventory-b"])
            and b.owned == [1, 3]
            and a.owned == [0, 2]
        ),
        timeout=BOUND_S + MARGIN_S,
        message=lambda: f"owners {live_owners(db_url)}",
    )
    events = publish_everywhere(redis_client)
    wait_until(lambda: handled_once(db_url, events), timeout=BOUND_S + MARGIN_S)


def test_a_stopping_consumer_wakes_its_blocked_reads(db_url, redis_client, consumers) -> None:
    _a, runner_a = consumers("inventory-a", lease_ms=60_000, block_ms=LONG_BLOCK_MS)
    b, _ = consumers("inventory-b", lease_ms=60_000, block_ms=LONG_BLOCK_MS)
    wait_until(lambda: live_owners(db_url) == split_as_assigned(["inventory-a", "inventory-b"]))
    wait_until(lambda: blocked_reads(redis_client, "inventory-a") == PARTITIONS // 2)
    runner_a.stop.set()
    wait_until(runner_a.finished.is_set, timeout=BOUND_S + MARGIN_S)
    assert blocked_reads(redis_client, "inventory-a") == 0
    wait_until(lambda: b.owned == list(range(PARTITIONS)), timeout=BOUND_S + MARGIN_S)


def test_a_redrive_request_reaches_a_worker_blocked_in_a_long_read(
    db_url, redis_client, consumers
) -> None:
    """The heartbeat that finds a re-drive request wakes the partition's blocked read: the
    request is handled within heartbeats, not after CONSUMER_BLOCK_MS."""
    _a, _ = consumers("inventory-a", lease_ms=60_000, block_ms=LONG_BLOCK_MS)
    broken = {**encode_entry(order_placed(2)), "payload": "{}"}  # breaks OrderPlaced's contract
    redis_client.xadd(partition_stream("orders.events", 2), broken)

    def dead_letters() -> list[tuple[int, int]]:
        with psycopg.connect(db_url) as conn:
            return conn.execute(
                "SELECT partition, redrives FROM dead_letters WHERE consumer_group = %s", (GROUP,)
            ).fetchall()

    wait_until(lambda: dead_letters() == [(2, 0)])
    wait_until(lambda: blocked_reads(redis_client, "inventory-a") == PARTITIONS)
    with psycopg.connect(db_url) as conn:
        conn.execute("UPDATE dead_letters SET redrive_requested_at = clock_timestamp()")
    # re-driven, and dead again (its payload is still broken): one re-drive recorded
    wait_until(lambda: dead_letters() == [(2, 1)], timeout=BOUND_S + MARGIN_S)


# -- real processes --------------------------------------------------------------------------


def test_two_consumer_processes_split_the_partitions_and_the_survivor_of_a_sigkill_owns_all(
    clean_state, redis_client, spawn, record_property
) -> None:
    db_url = clean_state.db_urls[GROUP]
    timings = {"STREAM_PARTITIONS": str(PARTITIONS), "CONSUMER_LEASE_MS": str(LEASE_MS)}
    first = spawn("consume", "inventory", "--name", "inventory-a", **timings)
    spawn("consume", "inventory", "--name", "inventory-b", **timings)
    wanted = split_as_assigned(["inventory-a", "inventory-b"])
    wait_until(
        lambda: live_owners(db_url) == wanted,
        timeout=60,  # two interpreters starting on a shared machine
        message=lambda: f"owners {live_owners(db_url)}",
    )
    before = publish_everywhere(redis_client, per_partition=3)
    wait_until(lambda: handled_once(db_url, before), timeout=30)

    during = publish_everywhere(redis_client, per_partition=3)  # some may be pending at the kill
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=15)
    killed = time.monotonic()
    heartbeat_s = 0.2
    wait_until(
        lambda: live_owners(db_url) == dict.fromkeys(range(PARTITIONS), "inventory-b"),
        timeout=LEASE_MS / 1000 + heartbeat_s + MARGIN_S,
        message=lambda: f"owners {live_owners(db_url)}",
    )
    took = time.monotonic() - killed
    record_property("takeover_after_sigkill_s", round(took, 3))
    print(f"\ntakeover after SIGKILL: {took:.3f} s (bound {LEASE_MS / 1000 + heartbeat_s} s)")

    after = publish_everywhere(redis_client, per_partition=3)
    wait_until(lambda: handled_once(db_url, before + during + after), timeout=60)
    wait_until(lambda: nothing_pending(redis_client), timeout=30)


def test_a_process_with_another_partition_count_refuses_to_start(clean_state, spawn) -> None:
    with psycopg.connect(clean_state.db_urls[GROUP], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO deployment_settings (name, value) VALUES ('stream_partitions', %s)",
            (str(PARTITIONS),),
        )
    process = spawn("consume", "inventory", "--name", "inventory-x", STREAM_PARTITIONS="6")
    assert process.wait(timeout=60) != 0
    stderr = process.stderr.read().decode()
    assert "STREAM_PARTITIONS=6" in stderr
    assert f"STREAM_PARTITIONS={PARTITIONS}" in stderr
