"""Retention and recovery (issue 9 item 14): windows that nest, trims that never drop what a
group has not delivered and acknowledged, pruning, re-publishing after Redis data loss."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from contracts import ORDERS_EVENTS, partition_of, partition_stream
from sagactl.recovery import republish
from service_runtime.consumer import ConsumerSettings
from service_runtime.metrics import RETENTION_TRIM_HELD
from service_runtime.retention import (
    Windows,
    nesting_errors,
    prune_delivery_failures,
    prune_inbox,
    prune_outbox,
    run_retention,
    trim_partition_stream,
)
from tests.helpers import EXPIRE_LEASES, stream_total
from tests.partition_steps import drain, own_partitions

STREAM = partition_stream(ORDERS_EVENTS, 0)  # read by inventory and billing
READERS = ("inventory", "billing")


def age_rows(url: str, table: str, column: str, hours: float) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            f"UPDATE {table} SET {column} = {column} - make_interval(secs => %s)", (hours * 3600,)
        )


# -- PostgreSQL ----------------------------------------------------------------------------------


def test_prune_outbox_keeps_unpublished_and_recent_rows(shop):
    old = shop.place("alice", [("apple", 1)])
    shop.publish("orders")
    age_rows(shop.db_urls["orders"], "outbox", "published_at", 48)
    shop.place("alice", [("apple", 1)])  # recent, published below
    shop.publish("orders")
    shop.place("alice", [("apple", 1)])  # never published
    with psycopg.connect(shop.db_urls["orders"], autocommit=True) as conn:
        assert prune_outbox(conn, older_than_hours=24) == 1
        left = conn.execute("SELECT aggregate_id, published_at IS NULL FROM outbox").fetchall()
    assert len(left) == 2
    assert old not in {row[0] for row in left}
    assert [row[1] for row in left].count(True) == 1


def test_prune_inbox_by_processing_time(shop):
    shop.place("alice", [("apple", 1)])
    shop.settle()
    url = shop.db_urls["inventory"]
    with psycopg.connect(url, autocommit=True) as conn:
        before = conn.execute("SELECT count(*) FROM inbox").fetchone()[0]
        assert prune_inbox(conn, older_than_hours=1) == 0
    age_rows(url, "inbox", "processed_at", 2)
    with psycopg.connect(url, autocommit=True) as conn:
        assert prune_inbox(conn, older_than_hours=1) == before > 0


def test_prune_delivery_failures_older_than_the_window(db):
    insert = (
        "INSERT INTO delivery_failures (consumer_group, stream, entry_id, attempts, last_error,"
        " updated_at) VALUES ('inventory', %s, %s, 5, 'boom', now() - make_interval(secs => %s))"
    )
    db.execute(insert, (STREAM, "1-0", 100 * 3600))
    db.execute(insert, (STREAM, "2-0", 10 * 3600))
    assert prune_delivery_failures(db, older_than_hours=96) == 1
    assert [r[0] for r in db.execute("SELECT entry_id FROM delivery_failures")] == ["2-0"]


# -- trimming --------------------------------------------------------------------------------------


def old_id(n: int, hours: float = 2) -> str:
    return f"{int((time.time() - hours * 3600) * 1000)}-{n}"


def test_trim_never_drops_an_entry_pending_or_undelivered_to_any_group(redis_client):
    client = redis_client
    ids = [client.xadd(STREAM, {"n": str(n)}, id=old_id(n)) for n in range(1, 6)]
    recent = client.xadd(STREAM, {"n": "recent"})
    for group in READERS:
        client.xgroup_create(STREAM, group, id="0")
    # inventory: read three, acknowledged only the first (two pending, old ones)
    client.xreadgroup("inventory", "inventory-1", {STREAM: ">"}, count=3)
    client.xack(STREAM, "inventory", ids[0])
    # billing: read and acknowledged one; the rest never delivered to it
    client.xreadgroup("billing", "billing-1", {STREAM: ">"}, count=1)
    client.xack(STREAM, "billing", ids[0])
    held_before = RETENTION_TRIM_HELD.labels(group="billing")._value.get()

    result = trim_partition_stream(client, STREAM, older_than_hours=1, groups=READERS)
    assert result.trimmed == 1  # only the entry both groups delivered and acknowledged
    assert sorted(result.held_by) == ["billing", "inventory"]
    assert [e[0] for e in client.xrange(STREAM)] == [*ids[1:], recent]
    assert RETENTION_TRIM_HELD.labels(group="billing")._value.get() == held_before + 1

    # billing catches up; inventory acknowledges its pending ones but has not read 4 and 5
    client.xreadgroup("billing", "billing-1", {STREAM: ">"})
    client.xack(STREAM, "billing", *ids[1:], recent)
    client.xack(STREAM, "inventory", ids[1], ids[2])
    result = trim_partition_stream(client, STREAM, older_than_hours=1, groups=READERS)
    assert (result.trimmed, result.held_by) == (2, ["inventory"])
    assert [e[0] for e in client.xrange(STREAM)] == [ids[3], ids[4], recent]

    # a pending entry, even a very old one, stays until it is acknowledged
    client.xreadgroup("inventory", "inventory-1", {STREAM: ">"}, count=1)
    result = trim_partition_stream(client, STREAM, older_than_hours=1, groups=READERS)
    assert (result.trimmed, result.held_by) == (0, ["inventory"])
    assert client.xpending(STREAM, "inventory")["min"] == ids[3]

    client.xreadgroup("inventory", "inventory-1", {STREAM: ">"})
    client.xack(STREAM, "inventory", ids[3], ids[4], recent)
    result = trim_partition_stream(client, STREAM, older_than_hours=1, groups=READERS)
    assert (result.trimmed, result.held_by) == (2, [])
    assert [e[0] for e in client.xrange(STREAM)] == [recent]  # younger than the horizon


def test_trim_waits_for_a_group_that_never_read_the_stream(redis_client):
    client = redis_client
    client.xadd(STREAM, {"n": "1"}, id=old_id(1))
    client.xgroup_create(STREAM, "inventory", id="$")  # inventory is past it; billing absent
    result = trim_partition_stream(client, STREAM, older_than_hours=1, groups=READERS)
    assert (result.trimmed, result.held_by) == (0, ["billing"])
    assert client.xlen(STREAM) == 1


def test_a_pending_entry_the_handler_keeps_failing_survives_retention_and_is_handled(
    shop, monkeypatch, cli_env
):
    """End to end with the real consumer: the retention job runs while OrderPlaced waits for
    a retry in inventory; the entry is not trimmed, and is processed, not acknowledged gone."""
    from inventory_service.reactions import HANDLERS

    broken = {"failing": True}

    def flaky(uow, event):
        if broken["failing"]:
            raise RuntimeError("not yet")
        HANDLERS["OrderPlaced"](uow, event)

    with shop.pools["inventory"].connection() as conn:
        conn.execute(EXPIRE_LEASES, ("inventory",))
    outcomes: Counter = Counter()
    settings = ConsumerSettings(group="inventory", consumer="inventory-2", max_deliveries=5)
    shop.consumers["inventory"] = workers = own_partitions(
        shop.redis,
        shop.pools["inventory"],
        settings,
        {**HANDLERS, "OrderPlaced": flaky},
        on_outcome=lambda _type, outcome, _seconds: outcomes.update([outcome]),
    )
    order_id = shop.place("alice", [("apple", 1)])
    shop.publish("orders")
    assert drain(workers) == 1 and outcomes["failed"] == 1
    assert shop.deliver("billing") == 1
    monkeypatch.setenv("STREAM_RETENTION_HOURS", "0")  # every entry is past the age horizon
    monkeypatch.setenv("OUTBOX_RETENTION_HOURS", "1")
    report = run_retention()
    stream = partition_stream(ORDERS_EVENTS, partition_of(order_id, shop.partitions))
    assert report["streams.held_back_by"] == {stream: ["inventory"]}
    assert shop.redis.xlen(stream) == 1

    broken["failing"] = False
    for worker in workers:
        worker.retry = None  # do not wait for the backoff
    assert drain(workers) == 1
    assert outcomes["processed"] == 1 and outcomes["gone"] == 0
    shop.settle()
    assert shop.order(order_id)["status"] == "confirmed"
    report = run_retention()  # everything delivered and acknowledged now: trimmed
    assert report["streams.trimmed"] >= 2 and report["streams.held_back_by"] == {}
    assert stream_total(shop.redis, ORDERS_EVENTS) == 0


@pytest.fixture
def cli_env(clean_state, monkeypatch, tmp_path):
    monkeypatch.setenv("SAGA_RUN_DIR", str(tmp_path))
    for key, value in clean_state.env.items():
        monkeypatch.setenv(key, value)
    for name in ("STREAM", "OUTBOX", "INBOX"):
        monkeypatch.delenv(f"{name}_RETENTION_HOURS", raising=False)
    return clean_state


def test_retention_keeps_outbox_rows_the_streams_may_still_need(shop, cli_env):
    """The outbox window covers the stream window: a row published 30 h ago (past the stream
    window) can still be re-published; at 50 h (past the outbox window) it is pruned."""
    shop.place("alice", [("apple", 1)])
    shop.settle()
    url = shop.db_urls["orders"]
    age_rows(url, "outbox", "published_at", 30)
    assert run_retention()["orders.outbox_pruned"] == 0
    age_rows(url, "outbox", "published_at", 20)
    assert run_retention()["orders.outbox_pruned"] == 2  # OrderPlaced, OrderConfirmed


# -- the windows nest ------------------------------------------------------------------------------


def test_default_windows_nest():
    assert nesting_errors(Windows(), ConsumerSettings(group="g", consumer="c")) == []


def test_windows_that_do_not_nest_name_the_variables():
    consumer = ConsumerSettings(group="g", consumer="c", max_deliveries=5, retry_max_ms=3_600_000)
    (outbox,) = nesting_errors(Windows(24, 26, 96), consumer)  # 24 h + 5 h pending > 26 h
    for name in ("OUTBOX_RETENTION_HOURS", "STREAM_RETENTION_HOURS", "CONSUMER_MAX_DELIVERIES"):
        assert name in outbox
    (inbox,) = nesting_errors(Windows(24, 48, 40), ConsumerSettings(group="g", consumer="c"))
    assert "INBOX_RETENTION_HOURS" in inbox and "OUTBOX_RETENTION_HOURS" in inbox


@pytest.mark.parametrize(
    ("command", "env"),
    [
        (["cron"], {"OUTBOX_RETENTION_HOURS": "12"}),
        (["relay", "orders"], {"INBOX_RETENTION_HOURS": "24"}),
        (["consume", "inventory"], {"CONSUMER_RETRY_MAX_MS": str(10 * 3_600_000)}),
    ],
)
def test_processes_refuse_to_start_when_the_windows_do_not_nest(command, env, tmp_path):
    """Issue 9 item 14: every relay, consumer and the cron check the windows first."""
    saga = Path(sys.executable).parent / "saga"
    # No servers: the check comes before any connection.
    clean = {k: v for k, v in os.environ.items() if not k.endswith(("_URL", "_HOURS"))}
    result = subprocess.run(
        [str(saga), *command],
        env={**clean, "SAGA_RUN_DIR": str(tmp_path), "METRICS_PORT_BASE": "0", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "retention windows do not nest" in result.stderr
    assert "OUTBOX_RETENTION_HOURS" in result.stderr
    assert next(iter(env)) in result.stderr or "CONSUMER_MAX_DELIVERIES" in result.stderr


# -- recovery --------------------------------------------------------------------------------------


def test_republish_after_redis_data_loss_goes_to_the_partitions_and_is_absorbed(shop):
    order_id = shop.place("alice", [("apple", 2)])
    shop.settle()
    assert shop.order(order_id)["status"] == "confirmed"
    shop.redis.flushdb()  # Redis restarted without persistence: streams, groups, fences gone
    # the consumers lose their partitions (fenced) and own them again under a new epoch
    for service in shop.consumers:
        with shop.pools[service].connection() as conn:
            conn.execute(EXPIRE_LEASES, (service,))
        shop.consumers[service] = shop.consumer(service, f"{service}-2")
    since = datetime.now(UTC) - timedelta(hours=1)
    assert sum(republish(shop.db_urls[s], since) for s in shop.db_urls) >= 4
    shop.settle()
    stream = partition_stream(ORDERS_EVENTS, partition_of(order_id, shop.partitions))
    assert shop.redis.xlen(stream) == 2  # OrderPlaced, OrderConfirmed again, in their partition
    assert stream_total(shop.redis, ORDERS_EVENTS) == 2
    duplicates = sum(c["duplicate"] for c in shop.outcomes.values())
    assert duplicates >= 4
    assert shop.available("apple") == 3
    assert shop.balance("alice") == 700
    assert shop.order(order_id)["status"] == "confirmed"


def test_retention_refuses_to_run_with_windows_that_do_not_nest(shop, cli_env, monkeypatch):
    from click.testing import CliRunner

    from sagactl.main import cli

    shop.place("alice", [("apple", 1)])
    shop.publish("orders")
    age_rows(shop.db_urls["orders"], "outbox", "published_at", 30)
    monkeypatch.setenv("OUTBOX_RETENTION_HOURS", "12")
    result = CliRunner().invoke(cli, ["retention"])
    assert result.exit_code == 1
    assert "OUTBOX_RETENTION_HOURS (12)" in result.output and "Traceback" not in result.output
    with psycopg.connect(shop.db_urls["orders"]) as conn:
        assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == 1  # nothing pruned
