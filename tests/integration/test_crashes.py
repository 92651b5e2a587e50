"""Crash tests: real `saga relay` / `saga consume` processes die at injected points
(SAGA_CRASH_AT, see service_runtime/faults.py) and the restarted process makes it right:
a duplicate is possible, a loss or a double effect is not.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from contracts import ORDERS_EVENTS, partition_of, partition_stream
from service_runtime.faults import CRASH_EXIT_CODE
from tests.helpers import EXPIRE_LEASES, wait_until
from tests.saga_driver import SagaDriver

SAGA = str(Path(sys.executable).parent / "saga")


@pytest.fixture
def spawn(clean_state):
    """Start `saga ...` with the test servers' settings; kill leftovers at teardown."""
    started: list[subprocess.Popen] = []

    def run(*args: str, crash_at: str | None = None) -> subprocess.Popen:
        env = {
            **os.environ,
            **clean_state.env,
            "METRICS_PORT_BASE": "0",
            "CONSUMER_BLOCK_MS": "100",
            "RELAY_POLL_SECONDS": "0.2",
        }
        env.pop("SAGA_CRASH_AT", None)
        if crash_at:
            env["SAGA_CRASH_AT"] = crash_at
        process = subprocess.Popen(
            [SAGA, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        started.append(process)
        return process

    yield run
    for process in started:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=15)


def crashed(process: subprocess.Popen) -> None:
    assert process.wait(timeout=30) == CRASH_EXIT_CODE, process.stderr.read().decode()


def unpublished(shop: SagaDriver, service: str) -> int:
    with psycopg.connect(shop.db_urls[service]) as conn:
        return conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()[0]


def orders_stream(shop: SagaDriver, order_id: str) -> str:
    return partition_stream(ORDERS_EVENTS, partition_of(order_id, shop.partitions))


def hand_back_leases(shop: SagaDriver, group: str) -> None:
    """The driver's consumer of `group` lets its leases run out, as a stopped consumer's do:
    a spawned consumer then takes the partitions (under a new epoch)."""
    with shop.pools[group].connection() as conn:
        conn.execute(EXPIRE_LEASES, (group,))


def test_relay_killed_between_xadd_and_marking_published_duplicates_never_loses(shop, spawn):
    order_id = shop.place("alice", [("apple", 1)])
    stream = orders_stream(shop, order_id)
    crashed(spawn("relay", "orders", crash_at="after_xadd"))
    assert shop.redis.xlen(stream) == 1  # in the stream...
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
    shop.publish("orders")
    stream = orders_stream(shop, order_id)
    hand_back_leases(shop, "inventory")
    crashed(spawn("consume", "inventory", "--name", "inventory-1", crash_at=crash_at))
    reserved = shop.reservation(order_id)
    if crash_at == "mid_handler":
        assert reserved is None  # rolled back with the process
    else:
        assert reserved["status"] == "held"  # committed, but never acknowledged
    assert shop.redis.xpending(stream, "inventory")["pending"] == 1

    # same name: once the dead process's leases run out, it owns them again (a new epoch)
    # and re-reads its pending entries
    spawn("consume", "inventory", "--name", "inventory-1")
    wait_until(lambda: shop.redis.xpending(stream, "inventory")["pending"] == 0, timeout=60)
    assert shop.available("apple") == 3  # reserved once
    assert shop.reservation(order_id)["status"] == "held"
    assert unpublished(shop, "inventory") == 1  # exactly one StockReserved
