"""Retention and recovery: pruning windows, trimming by age, re-publishing after data loss."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import psycopg

from sagactl.recovery import republish
from service_runtime.retention import prune_inbox, prune_outbox, trim_stream


def age_rows(url: str, table: str, column: str, hours: float) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            f"UPDATE {table} SET {column} = {column} - make_interval(secs => %s)", (hours * 3600,)
        )


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


def test_trim_by_age_reports_a_group_behind_the_horizon(shop):
    client = shop.redis
    client.xadd("scratch", {"n": "1"}, id=f"{int((time.time() - 7200) * 1000)}-0")
    client.xadd("scratch", {"n": "2"})
    client.xgroup_create("scratch", "slow", id="0")
    client.xgroup_create("scratch", "fast", id="$")
    trimmed, behind = trim_stream(client, "scratch", older_than_hours=1)
    assert trimmed == 1
    assert behind == ["slow"]
    assert client.xlen("scratch") == 1


def test_republish_after_redis_data_loss_is_absorbed(shop):
    order_id = shop.place("alice", [("apple", 2)])
    shop.settle()
    assert shop.order(order_id)["status"] == "confirmed"
    shop.redis.flushdb()  # Redis restarted without persistence: streams and groups gone
    for consumer in shop.consumers.values():
        consumer.ensure_groups()
    since = datetime.now(UTC) - timedelta(hours=1)
    assert sum(republish(shop.db_urls[s], since) for s in shop.db_urls) >= 4
    shop.settle()
    assert shop.redis.xlen("orders.events") == 2  # OrderPlaced, OrderConfirmed again
    duplicates = sum(c.stats.duplicates for c in shop.consumers.values())
    assert duplicates >= 4
    assert shop.available("apple") == 3
    assert shop.balance("alice") == 700
    assert shop.order(order_id)["status"] == "confirmed"
