"""Every saga path and every race of DESIGN.md §3, staged hop by hop on real servers."""

from __future__ import annotations

import threading

import psycopg
import pytest
import redis as redis_lib

from contracts import partition_of
from orders_service.jobs import sweep_payment_deadlines


def history_events(order: dict) -> list[str]:
    return [entry.get("status") or entry.get("event") for entry in order["history"]]


# -- the paths -----------------------------------------------------------------------------


def test_happy_path_confirms_charges_and_holds_stock(shop):
    order_id = shop.place("alice", [("apple", 2)])
    shop.settle()
    order = shop.order(order_id)
    assert order["status"] == "confirmed"
    assert order["total_cents"] == 300
    assert history_events(order) == ["pending", "StockReserved", "PaymentCaptured", "confirmed"]
    assert shop.payment(order_id)["status"] == "captured"
    assert shop.payment(order_id)["amount_cents"] == 300
    assert shop.balance("alice") == 700
    assert shop.available("apple") == 3
    assert shop.reservation(order_id)["status"] == "held"


def test_unknown_sku_rejects_without_touching_money(shop):
    order_id = shop.place("alice", [("apple", 1), ("pear", 1)])
    shop.settle()
    order = shop.order(order_id)
    assert (order["status"], order["reason"]) == ("rejected", "unknown_sku")
    assert shop.available("apple") == 5
    assert shop.payment(order_id) is None
    assert shop.balance("alice") == 1000


def test_insufficient_stock_rejects(shop):
    order_id = shop.place("alice", [("apple", 6)])
    shop.settle()
    assert shop.order(order_id)["reason"] == "insufficient_stock"
    assert shop.reservation(order_id)["status"] == "failed"
    assert shop.available("apple") == 5


def test_insufficient_funds_rejects_and_releases_stock(shop):
    shop.account("bob", balance_cents=100)
    order_id = shop.place("bob", [("apple", 2)])
    shop.settle()
    order = shop.order(order_id)
    assert (order["status"], order["reason"]) == ("rejected", "insufficient_funds")
    assert "StockReleased" in history_events(order)
    assert shop.available("apple") == 5
    assert shop.reservation(order_id)["status"] == "released"
    assert shop.balance("bob") == 100


def test_unknown_account_rejects(shop):
    order_id = shop.place("nobody", [("apple", 1)])
    shop.settle()
    assert shop.order(order_id)["reason"] == "unknown_account"
    assert shop.available("apple") == 5


def test_cancel_after_confirmation_refunds_and_releases(shop):
    order_id = shop.place("alice", [("apple", 2)])
    shop.settle()
    assert shop.orders.post(f"/orders/{order_id}/cancel").status_code == 202
    shop.settle()
    order = shop.order(order_id)
    assert (order["status"], order["reason"]) == ("cancelled", "customer_request")
    assert {"StockReleased", "PaymentRefunded"} <= set(history_events(order))
    assert shop.payment(order_id)["status"] == "refunded"
    assert shop.balance("alice") == 1000
    assert shop.available("apple") == 5


def test_rejected_order_cannot_be_cancelled(shop):
    order_id = shop.place("alice", [("apple", 99)])
    shop.settle()
    response = shop.orders.post(f"/orders/{order_id}/cancel")
    assert response.status_code == 409
    assert response.json["message"]


# -- the races -----------------------------------------------------------------------------


def test_cancel_while_saga_in_flight(shop):
    order_id = shop.place("alice", [("apple", 2)])
    shop.publish("orders")
    shop.deliver("inventory")  # stock reserved, billing has not seen it yet
    assert shop.orders.post(f"/orders/{order_id}/cancel").status_code == 202
    shop.settle()
    assert shop.order(order_id)["status"] == "cancelled"
    assert shop.available("apple") == 5
    assert shop.balance("alice") == 1000
    payment = shop.payment(order_id)
    assert payment is None or payment["status"] == "refunded"


def test_cancellation_reaching_billing_before_stock_reserved_is_never_charged(shop):
    order_id = shop.place("alice", [("apple", 2)])
    shop.publish("orders")
    shop.deliver("inventory")  # StockReserved sits unpublished in inventory's outbox
    shop.orders.post(f"/orders/{order_id}/cancel")
    shop.publish("orders")
    shop.deliver("billing")  # OrderCancelled first...
    shop.publish("inventory")
    shop.deliver("billing")  # ...then the late StockReserved
    assert shop.payment(order_id) is None
    shop.settle()
    assert shop.payment(order_id) is None
    assert shop.balance("alice") == 1000
    assert shop.available("apple") == 5
    assert shop.order(order_id)["status"] == "cancelled"


def test_payment_captured_after_cancellation_keeps_order_cancelled_and_refunds(shop):
    order_id = shop.place("alice", [("apple", 2)])
    shop.publish("orders")
    shop.deliver("inventory")
    shop.publish("inventory")
    shop.deliver("billing")
    assert shop.payment(order_id)["status"] == "captured"  # orders has not heard yet
    shop.orders.post(f"/orders/{order_id}/cancel")
    shop.settle()
    order = shop.order(order_id)
    assert order["status"] == "cancelled"
    assert "confirmed" not in history_events(order)
    assert "PaymentCaptured" in history_events(order)
    assert shop.payment(order_id)["status"] == "refunded"
    assert shop.balance("alice") == 1000
    assert shop.available("apple") == 5


def test_every_event_delivered_twice_is_applied_once(shop):
    order_id = shop.place("alice", [("apple", 2)])
    shop.settle()
    # Re-publish every outbox row, as a relay crash between XADD and marking would.
    for service in ("orders", "inventory", "billing"):
        with psycopg.connect(shop.db_urls[service], autocommit=True) as conn:
            conn.execute("UPDATE outbox SET published_at = NULL")
    shop.settle()
    assert shop.order(order_id)["status"] == "confirmed"
    assert shop.balance("alice") == 700
    assert shop.available("apple") == 3
    duplicates = sum(outcomes["duplicate"] for outcomes in shop.outcomes.values())
    assert duplicates >= 4  # inventory x1, billing x1, orders x2 (StockReserved, PaymentCaptured)


def test_two_buyers_for_the_last_unit_never_oversell(shop):
    shop.product("last", available=1, price_cents=100)
    shop.account("bob", balance_cents=1000)
    buyers = [shop.place("alice", [("last", 1)])]
    first_partition = partition_of(buyers[0], shop.partitions)
    while partition_of(buyers[-1], shop.partitions) == first_partition:
        buyers.append(shop.place("bob", [("last", 1)]))  # until one lands in another partition
    shop.publish("orders")
    # Two inventory consumers of the same group: one owns the first buyer's partition, the
    # other every other partition. They handle the OrderPlaced at the same time.
    rest = set(range(shop.partitions)) - {first_partition}
    one, two = shop.split("inventory", 2, batch_size=1, plan=[{first_partition}, rest])
    barrier = threading.Barrier(2)

    def take(workers):
        barrier.wait()
        for worker in workers:
            worker.step()

    threads = [threading.Thread(target=take, args=(c,)) for c in (one, two)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    shop.settle()
    statuses = sorted(shop.order(o)["status"] for o in buyers)
    assert statuses == ["confirmed"] + ["rejected"] * (len(buyers) - 1)
    assert shop.available("last") == 0


def test_many_concurrent_orders_reserve_exactly_the_stock(shop):
    shop.product("scarce", available=5, price_cents=10)
    customers = [f"c{i}" for i in range(12)]
    for customer in customers:
        shop.account(customer, balance_cents=1000)
    order_ids = [shop.place(c, [("scarce", 1)]) for c in customers]
    shop.publish("orders")
    consumers = shop.split("inventory", 3, batch_size=2)
    threads = [
        threading.Thread(target=lambda c=c: [w.step() for _ in range(6) for w in c])
        for c in consumers
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    shop.settle()
    statuses = [shop.order(o)["status"] for o in order_ids]
    assert statuses.count("confirmed") == 5
    assert statuses.count("rejected") == 7
    assert shop.available("scarce") == 0


# -- the payment deadline ------------------------------------------------------------------


@pytest.fixture
def impatient(make_saga):
    """Orders whose payment deadline has already passed when they are placed."""
    return make_saga(stocked=True, payment_timeout_s=0)


def test_deadline_sweeper_cancels_overdue_pending_orders(impatient):
    order_id = impatient.place("alice", [("apple", 1)])
    assert sweep_payment_deadlines(url=impatient.db_urls["orders"]) == 1
    assert sweep_payment_deadlines(url=impatient.db_urls["orders"]) == 0
    impatient.settle()
    order = impatient.order(order_id)
    assert (order["status"], order["reason"]) == ("cancelled", "payment_timeout")
    assert impatient.available("apple") == 5
    assert impatient.payment(order_id) is None
    assert impatient.balance("alice") == 1000


def test_sweeper_first_then_payment_lands_refunds(impatient):
    order_id = impatient.place("alice", [("apple", 1)])
    impatient.publish("orders")
    impatient.deliver("inventory")
    impatient.publish("inventory")
    impatient.deliver("billing")  # captured; orders does not know yet
    sweep_payment_deadlines(url=impatient.db_urls["orders"])
    impatient.settle()
    assert impatient.order(order_id)["status"] == "cancelled"
    assert impatient.payment(order_id)["status"] == "refunded"
    assert impatient.balance("alice") == 1000
    assert impatient.available("apple") == 5


def test_payment_first_then_sweeper_leaves_confirmed(impatient):
    order_id = impatient.place("alice", [("apple", 1)])
    impatient.settle()
    assert sweep_payment_deadlines(url=impatient.db_urls["orders"]) == 0
    assert impatient.order(order_id)["status"] == "confirmed"


def test_sweeper_skips_an_order_a_payment_is_being_applied_to(impatient):
    order_id = impatient.place("alice", [("apple", 1)])
    with psycopg.connect(impatient.db_urls["orders"]) as busy:
        busy.execute("SELECT 1 FROM orders WHERE order_id = %s FOR UPDATE", (order_id,))
        assert sweep_payment_deadlines(url=impatient.db_urls["orders"]) == 0
    assert sweep_payment_deadlines(url=impatient.db_urls["orders"]) == 1


def test_sweeper_runs_as_an_rq_job(impatient, rq_redis_url, monkeypatch):
    from rq import Queue, SimpleWorker

    monkeypatch.setenv("ORDERS_DATABASE_URL", impatient.db_urls["orders"])
    order_id = impatient.place("alice", [("apple", 1)])
    connection = redis_lib.Redis.from_url(rq_redis_url)  # rq's own plain Redis
    queue = Queue("saga", connection=connection)
    job = queue.enqueue(sweep_payment_deadlines)
    SimpleWorker([queue], connection=connection).work(burst=True)
    assert job.return_value() == 1
    assert impatient.order(order_id)["status"] == "cancelled"
