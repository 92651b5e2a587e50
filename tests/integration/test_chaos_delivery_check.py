"""The chaos soak's check that no saga step was lost on the way (observe.undelivered_events):
an event a group reacts to that never reached it, on real servers, with the real relay and
consumers. The soak fails on it, not on orders the payment deadline ended during outages."""

from __future__ import annotations

import psycopg
from psycopg.types.json import Jsonb

from contracts import ORDERS_EVENTS, partition_of, partition_stream
from sagactl.chaos.observe import undelivered_events


def _drop_entries_of(shop, order_id: str) -> int:
    """Redis loses the order's entries (XDEL), after the relay marked them published: nobody
    sends them again."""
    stream = partition_stream(ORDERS_EVENTS, partition_of(order_id, shop.partitions))
    dropped = 0
    for entry_id, fields in shop.redis.xrange(stream):  # decoded: redis_client.connect
        if order_id in fields["payload"]:
            dropped += shop.redis.xdel(stream, entry_id)
    return dropped


def test_a_settled_saga_has_every_event_delivered(shop):
    shop.place("alice", [("apple", 1)])
    order_id = shop.place("alice", [("apple", 1)])
    shop.settle()
    assert shop.orders.post(f"/orders/{order_id}/cancel").status_code == 202
    shop.settle()

    found = undelivered_events(shop.db_urls)

    assert found == {"count": 0, "by_route": {}, "examples": []}


def test_an_entry_redis_lost_is_an_undelivered_event_until_it_is_dead_lettered(shop):
    delivered = shop.place("alice", [("apple", 1)])
    shop.settle()
    lost = shop.place("alice", [("apple", 1)])
    assert shop.publish("orders") == 1  # OrderPlaced: in the stream, marked published
    assert _drop_entries_of(shop, lost) == 1
    shop.settle()
    assert shop.order(lost)["status"] == "pending"  # the saga stalled
    assert shop.order(delivered)["status"] == "confirmed"

    found = undelivered_events(shop.db_urls)

    # billing reads orders.events too, but does not react to OrderPlaced
    assert found["count"] == 1
    assert found["by_route"] == {"OrderPlaced -> inventory": 1}
    [example] = found["examples"]
    assert (example["order_id"], example["group"]) == (lost, "inventory")
    assert example["stream"] == ORDERS_EVENTS

    # a dead letter is an event the group took (and set aside), not one it never saw
    with psycopg.connect(shop.db_urls["inventory"], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO dead_letters (consumer_group, partition, stream, entry_id, event_id,"
            " event_type, fields, error, attempts) VALUES ('inventory', 0, %s, '1-0', %s,"
            " 'OrderPlaced', %s, 'test', 5)",
            (ORDERS_EVENTS, example["event_id"], Jsonb({})),
        )
    assert undelivered_events(shop.db_urls)["count"] == 0
