"""Crash tests: real `saga relay` / `saga consume` processes die at injected points
(SAGA_CRASH_AT, see service_runtime/faults.py) and the restarted process makes it right:
a duplicate is possible, a loss or a double effect is not.
"""

from __future__ import annotations

import subprocess

import psycopg
import pytest

from contracts import partition_of, partition_stream
from service_runtime.faults import CRASH_EXIT_CODE
from tests.helpers import stream_total, wait_until
from tests.saga_driver import SagaDriver


def crashed(process: subprocess.Popen) -> None:
    assert process.wait(timeout=30) == CRASH_EXIT_CODE, process.stderr.read().decode()


def unpublished(shop: SagaDriver, service: str) -> int:
    with psycopg.connect(shop.db_urls[service]) as conn:
        return conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()[0]


def test_relay_killed_between_xadd_and_marking_published_duplicates_never_loses(shop, spawn):
    order_id = shop.place("alice", [("apple", 1)])
    stream = partition_stream("orders.events", partition_of(order_id, shop.partitions))
    crashed(spawn("relay", "orders", crash_at="after_xadd"))
    assert stream_total(shop.redis, "orders.events") == 1  # in its partition's stream...
    assert shop.redis.xlen(stream) == 1
    assert unpublished(shop, "orders") == 1  # ...and still unpublished in the outbox
    spawn("relay", "orders")
    wait_until(lambda: unpublished(shop, "orders") == 0)
    entries = shop.redis.xrange(stream)
    assert [fields["aggregate_id"] for _id, fields in entries] == [order_id, order_id]
    assert entries[0][1]["event_id"] == entries[1][1]["event_id"]  # a duplicate, not a new event
    shop.settle()  # consumers absorb it
    assert shop.available("apple") == 4
    assert shop.order(order_id)["status"] == "confirmed"


@pytest.mark.parametrize("crash_at", ["mid_handler", "after_commit"])
def test_consumer_killed_around_its_commit_applies_the_event_once(shop, spawn, crash_at):
    order_id = shop.place("alice", [("apple", 2)])
    stream = partition_stream("orders.events", partition_of(order_id, shop.partitions))
    shop.publish("orders")
    shop.release("inventory")  # the real process owns inventory's partitions from here
    crashed(spawn("consume", "inventory", "--name", "inventory-1", crash_at=crash_at))
    reserved = shop.reservation(order_id)
    if crash_at == "mid_handler":
        assert reserved is None  # rolled back with the process
    else:
        assert reserved["status"] == "held"  # committed, but never acknowledged
    assert shop.redis.xpending(stream, "inventory")["pending"] == 1

    # Same name: once the dead one's lease ran out, it owns the partition again and re-reads
    # its pending entry.
    spawn("consume", "inventory", "--name", "inventory-1")
    wait_until(lambda: shop.redis.xpending(stream, "inventory")["pending"] == 0)
    assert shop.available("apple") == 3  # reserved once
    assert shop.reservation(order_id)["status"] == "held"
    assert unpublished(shop, "inventory") == 1  # exactly one StockReserved
