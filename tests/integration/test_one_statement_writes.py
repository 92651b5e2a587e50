"""The services' writes that are one statement each (a state change, its history or lines and
its outbox row, in data-modifying CTEs), against the real PostgreSQL: what they write, what
they return, and the paths the saga tests rarely take (an idempotency key claimed by a
concurrent request, a cancellation that overtakes the reservation, a refund)."""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

from billing_service import storage as billing_storage
from billing_service.reactions import HANDLERS as BILLING_HANDLERS
from contracts import Envelope
from inventory_service import storage as inventory_storage
from inventory_service.reactions import HANDLERS as INVENTORY_HANDLERS
from orders_service import commands
from orders_service import storage as orders_storage
from orders_service.reactions import HANDLERS as ORDERS_HANDLERS
from service_runtime import unit_of_work as unit_of_work_module
from service_runtime.db import connect, create_pool
from service_runtime.unit_of_work import unit_of_work
from tests.helpers import envelope, wait_until


@pytest.fixture
def pools(clean_state) -> Iterator[dict[str, Any]]:
    made = {s: create_pool(url, name=f"test-{s}") for s, url in clean_state.db_urls.items()}
    for pool in made.values():
        pool.wait(timeout=10)
    yield made
    for pool in made.values():
        pool.close()


@pytest.fixture
def dbs(clean_state) -> Iterator[dict[str, psycopg.Connection]]:
    conns = {s: connect(url) for s, url in clean_state.db_urls.items()}
    yield conns
    for conn in conns.values():
        conn.close()


def _orders_rows(db: psycopg.Connection) -> tuple[int, ...]:
    """Rows in orders, order_lines, order_history, outbox and idempotency_keys."""
    return db.execute(
        """SELECT (SELECT count(*) FROM orders), (SELECT count(*) FROM order_lines),
                  (SELECT count(*) FROM order_history), (SELECT count(*) FROM outbox),
                  (SELECT count(*) FROM idempotency_keys)"""
    ).fetchone()


def _handle(pool, handlers: dict, event: Envelope) -> list[str]:
    with unit_of_work(pool, cause=event) as uow:
        handlers[event.event_type](uow, event)
    return uow.emitted


def _outbox(db: psycopg.Connection, order_id: str) -> list[tuple[str, dict]]:
    return db.execute(
        "SELECT event_type, payload FROM outbox WHERE aggregate_id = %s ORDER BY id", (order_id,)
    ).fetchall()


# -- orders ----------------------------------------------------------------------------------


def test_place_order_writes_order_lines_history_and_event_in_one_go(pools, dbs):
    items = [{"sku": "b", "quantity": 2}, {"sku": "a", "quantity": 1}]
    placed = commands.place_order(pools["orders"], "alice", items, 60)
    assert not placed.replayed
    with pools["orders"].connection() as conn:
        stored = orders_storage.get_order(conn, placed.order_id)
    assert placed.order == stored  # as `get_order` would return it, lines in request order
    assert stored["status"] == "pending" and stored["items"] == items
    assert [h["status"] for h in stored["history"]] == ["pending"]
    event_type, payload = _outbox(dbs["orders"], placed.order_id)[0]
    assert event_type == "OrderPlaced"
    assert payload == {"order_id": placed.order_id, "customer_id": "alice", "items": items}
    correlation = (
        dbs["orders"]
        .execute(
            "SELECT correlation_id::text, causation_id FROM outbox WHERE aggregate_id = %s",
            (placed.order_id,),
        )
        .fetchone()
    )
    assert correlation == (placed.order_id, None)


def test_place_order_is_all_or_nothing(pools, dbs, monkeypatch):
    """Without BEGIN/COMMIT around it, the one statement is the transaction: when its last
    part fails (here the outbox row, whose event id is taken), nothing of it is left."""
    taken = str(uuid.uuid4())
    dbs["orders"].execute(
        """INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, event_version,
                               payload, correlation_id)
           VALUES (%s, 'order', 'x', 'OrderPlaced', 1, '{}', %s)""",
        (taken, taken),
    )
    monkeypatch.setattr(unit_of_work_module, "uuid", SimpleNamespace(uuid4=lambda: taken))
    items = [{"sku": "a", "quantity": 1}]
    with pytest.raises(psycopg.errors.UniqueViolation):
        commands.place_order(pools["orders"], "alice", items, 60, idempotency_key="k0")
    counts = _orders_rows(dbs["orders"])
    assert counts == (0, 0, 0, 1, 0)


def test_idempotency_key_replay_and_conflict_write_nothing_more(pools, dbs):
    items = [{"sku": "a", "quantity": 1}]
    first = commands.place_order(pools["orders"], "alice", items, 60, idempotency_key="k1")
    again = commands.place_order(pools["orders"], "alice", items, 60, idempotency_key="k1")
    assert again == commands.Placed(first.order_id, replayed=True)
    with pytest.raises(commands.IdempotencyConflict):
        commands.place_order(
            pools["orders"], "alice", [{"sku": "a", "quantity": 2}], 60, idempotency_key="k1"
        )
    other = commands.place_order(pools["orders"], "bob", items, 60, idempotency_key="k1")
    assert not other.replayed and other.order_id != first.order_id
    counts = _orders_rows(dbs["orders"])
    assert counts == (2, 2, 2, 2, 2)


@pytest.mark.parametrize("holder_commits", [True, False])
def test_idempotency_key_held_by_a_concurrent_request_waits_for_it(pools, dbs, holder_commits):
    """The key's claim, in the same statement as the order, waits for a transaction holding
    the key: its order is replayed if it commits, else this request places its own."""
    items = [{"sku": "a", "quantity": 1}]
    fingerprint = commands.domain.request_fingerprint("alice", items)
    held_order = str(uuid.uuid4())
    results: list[Any] = []
    with pools["orders"].connection() as holder:  # autocommit: its own BEGIN and COMMIT
        holder.execute("BEGIN")
        holder.execute(
            """INSERT INTO idempotency_keys (customer_id, key, request_hash, order_id)
               VALUES ('alice', 'k', %s, %s)""",
            (fingerprint, held_order),
        )

        def place() -> None:
            try:
                results.append(
                    commands.place_order(pools["orders"], "alice", items, 60, idempotency_key="k")
                )
            except BaseException as err:
                results.append(err)

        thread = threading.Thread(target=place, daemon=True)
        thread.start()
        holder_pid = holder.info.backend_pid
        wait_until(
            lambda: (
                results
                or dbs["orders"]
                .execute("SELECT 1 FROM pg_locks WHERE NOT granted AND pid <> %s", (holder_pid,))
                .fetchone()
            ),
            timeout=20,
            message=lambda: repr(
                dbs["orders"]
                .execute(
                    "SELECT pid, state, wait_event_type, wait_event, left(query, 60) "
                    "FROM pg_stat_activity WHERE datname = current_database()"
                )
                .fetchall()
            ),
        )
        assert results == [], results  # it waits for the holder
        holder.execute("COMMIT" if holder_commits else "ROLLBACK")
    thread.join(timeout=20)
    assert not thread.is_alive()
    (placed,) = results
    if holder_commits:
        assert placed == commands.Placed(held_order, replayed=True)
        assert dbs["orders"].execute("SELECT count(*) FROM orders").fetchone()[0] == 0
    else:
        assert not placed.replayed and placed.order_id != held_order
        assert [t for t, _ in _outbox(dbs["orders"], placed.order_id)] == ["OrderPlaced"]


def test_orders_reactions_history_total_and_status(pools, dbs):
    placed = commands.place_order(pools["orders"], "alice", [{"sku": "a", "quantity": 1}], 60)
    order_id = placed.order_id
    reserved = {"order_id": order_id, "customer_id": "alice", "lines": [], "total_cents": 300}
    reserved["lines"] = [{"sku": "a", "quantity": 1, "unit_price_cents": 300}]
    assert (
        _handle(pools["orders"], ORDERS_HANDLERS, envelope("StockReserved", reserved, "inventory"))
        == []
    )
    # a second StockReserved (another total) leaves the first total: only an unset one is set
    reserved_again = dict(reserved, total_cents=999)
    again = envelope("StockReserved", reserved_again, "inventory")
    _handle(pools["orders"], ORDERS_HANDLERS, again)
    assert dbs["orders"].execute(
        "SELECT total_cents FROM orders WHERE order_id = %s", (order_id,)
    ).fetchone() == (300,)
    captured = {
        "order_id": order_id,
        "customer_id": "alice",
        "payment_id": str(uuid.uuid4()),
        "amount_cents": 300,
    }
    emitted = _handle(
        pools["orders"], ORDERS_HANDLERS, envelope("PaymentCaptured", captured, "billing")
    )
    assert emitted == ["OrderConfirmed"]
    with pools["orders"].connection() as conn:
        order = orders_storage.get_order(conn, order_id)
    assert (order["status"], order["total_cents"], order["reason"]) == ("confirmed", 300, None)
    assert [(h["status"], h["event"]) for h in order["history"]] == [
        ("pending", None),
        (None, "StockReserved"),
        (None, "StockReserved"),
        (None, "PaymentCaptured"),
        ("confirmed", None),
    ]
    assert order["updated_at"] >= order["created_at"]
    assert _outbox(dbs["orders"], order_id)[-1] == (
        "OrderConfirmed",
        {"order_id": order_id, "total_cents": 300},
    )
    # a refund is only shown; a late decline changes nothing of a confirmed order
    refunded = {"order_id": order_id, "payment_id": captured["payment_id"], "amount_cents": 300}
    declined = {"order_id": order_id, "customer_id": "alice", "reason": "insufficient_funds"}
    assert (
        _handle(pools["orders"], ORDERS_HANDLERS, envelope("PaymentRefunded", refunded, "billing"))
        == []
    )
    assert (
        _handle(pools["orders"], ORDERS_HANDLERS, envelope("PaymentDeclined", declined, "billing"))
        == []
    )
    with pools["orders"].connection() as conn:
        order = orders_storage.get_order(conn, order_id)
    assert order["status"] == "confirmed"
    assert [(h["event"], h["reason"]) for h in order["history"][-2:]] == [
        ("PaymentRefunded", None),
        ("PaymentDeclined", "insufficient_funds"),
    ]


def test_rejection_and_cancellation_write_status_history_andenvelope(pools, dbs):
    rejected = commands.place_order(pools["orders"], "alice", [{"sku": "a", "quantity": 1}], 60)
    failed = {"order_id": rejected.order_id, "reason": "unknown_sku", "shortages": []}
    failed["shortages"] = [{"sku": "a", "requested": 1, "available": 0}]
    emitted = _handle(
        pools["orders"], ORDERS_HANDLERS, envelope("StockReservationFailed", failed, "inventory")
    )
    assert emitted == ["OrderRejected"]
    cancelled = commands.place_order(pools["orders"], "alice", [{"sku": "a", "quantity": 1}], 60)
    assert commands.cancel_order(pools["orders"], cancelled.order_id) is True
    assert commands.cancel_order(pools["orders"], cancelled.order_id) is False
    with pytest.raises(commands.NotCancellable):
        commands.cancel_order(pools["orders"], rejected.order_id)
    assert commands.cancel_order(pools["orders"], str(uuid.uuid4())) is None
    with pools["orders"].connection() as conn:
        for order_id, status, reason, event in (
            (rejected.order_id, "rejected", "unknown_sku", "OrderRejected"),
            (cancelled.order_id, "cancelled", "customer_request", "OrderCancelled"),
        ):
            order = orders_storage.get_order(conn, order_id)
            assert (order["status"], order["reason"]) == (status, reason)
            assert (order["history"][-1]["status"], order["history"][-1]["reason"]) == (
                status,
                reason,
            )
            assert _outbox(dbs["orders"], order_id)[-1] == (
                event,
                {"order_id": order_id, "reason": reason},
            )


def test_an_event_for_an_unknown_order_writes_nothing(pools, dbs):
    unknown = str(uuid.uuid4())
    reserved = {
        "order_id": unknown,
        "customer_id": "alice",
        "lines": [{"sku": "a", "quantity": 1, "unit_price_cents": 1}],
        "total_cents": 1,
    }
    assert (
        _handle(pools["orders"], ORDERS_HANDLERS, envelope("StockReserved", reserved, "inventory"))
        == []
    )
    assert dbs["orders"].execute("SELECT count(*) FROM order_history").fetchone() == (0,)


# -- inventory -------------------------------------------------------------------------------


def _stock(pools, **available: int) -> None:
    with unit_of_work(pools["inventory"]) as uow:
        for sku, count in available.items():
            inventory_storage.upsert_product(uow.conn, sku, sku, 100 if sku == "a" else 250, count)


def _placed(order_id: str, items: list[dict]) -> Envelope:
    payload = {"order_id": order_id, "customer_id": "alice", "items": items}
    return envelope("OrderPlaced", payload, "orders")


def _available(db: psycopg.Connection) -> dict[str, int]:
    return dict(db.execute("SELECT sku, available FROM products").fetchall())


def test_reservation_release_and_a_second_release(pools, dbs):
    _stock(pools, a=10, b=10)
    order_id = str(uuid.uuid4())
    items = [{"sku": "b", "quantity": 2}, {"sku": "a", "quantity": 1}, {"sku": "b", "quantity": 1}]
    assert _handle(pools["inventory"], INVENTORY_HANDLERS, _placed(order_id, items)) == [
        "StockReserved"
    ]
    assert _available(dbs["inventory"]) == {"a": 9, "b": 7}
    with pools["inventory"].connection() as conn:
        reservation = inventory_storage.get_reservation(conn, order_id)
    assert (reservation["status"], reservation["total_cents"]) == ("held", 850)
    assert reservation["lines"] == [
        {"sku": "a", "quantity": 1, "unit_price_cents": 100},
        {"sku": "b", "quantity": 3, "unit_price_cents": 250},
    ]
    assert _outbox(dbs["inventory"], order_id)[0][1]["lines"] == reservation["lines"]
    # the same OrderPlaced again: decided, nothing locked or written
    assert _handle(pools["inventory"], INVENTORY_HANDLERS, _placed(order_id, items)) == []

    cancelled = envelope(
        "OrderCancelled", {"order_id": order_id, "reason": "customer_request"}, "orders"
    )
    assert _handle(pools["inventory"], INVENTORY_HANDLERS, cancelled) == ["StockReleased"]
    assert _available(dbs["inventory"]) == {"a": 10, "b": 10}
    assert _outbox(dbs["inventory"], order_id)[-1] == (
        "StockReleased",
        {"order_id": order_id, "lines": [{"sku": "a", "quantity": 1}, {"sku": "b", "quantity": 3}]},
    )
    declined = envelope(
        "PaymentDeclined",
        {"order_id": order_id, "customer_id": "alice", "reason": "insufficient_funds"},
        "billing",
    )
    assert _handle(pools["inventory"], INVENTORY_HANDLERS, declined) == []
    assert _available(dbs["inventory"]) == {"a": 10, "b": 10}
    with pools["inventory"].connection() as conn:
        reservation = inventory_storage.get_reservation(conn, order_id)
    assert reservation["status"] == "released" and reservation["released_at"] is not None


def test_a_cancellation_that_overtakes_the_order_reserves_nothing(pools, dbs):
    _stock(pools, a=10)
    order_id = str(uuid.uuid4())
    cancelled = envelope(
        "OrderCancelled", {"order_id": order_id, "reason": "customer_request"}, "orders"
    )
    assert _handle(pools["inventory"], INVENTORY_HANDLERS, cancelled) == []
    row = (
        dbs["inventory"]
        .execute(
            """SELECT customer_id, status, reason, total_cents, released_at IS NOT NULL
           FROM reservations WHERE order_id = %s""",
            (order_id,),
        )
        .fetchone()
    )
    assert row == (None, "released", "OrderCancelled", 0, True)
    # again (a duplicate under another event id): still one row, nothing sent
    assert _handle(pools["inventory"], INVENTORY_HANDLERS, dataclasses.replace(cancelled)) == []
    assert (
        _handle(
            pools["inventory"], INVENTORY_HANDLERS, _placed(order_id, [{"sku": "a", "quantity": 1}])
        )
        == []
    )
    assert _available(dbs["inventory"]) == {"a": 10}
    assert _outbox(dbs["inventory"], order_id) == []
    assert dbs["inventory"].execute("SELECT count(*) FROM reservation_lines").fetchone() == (0,)


@pytest.mark.parametrize(
    ("items", "reason", "shortages"),
    [
        ([{"sku": "a", "quantity": 11}], "insufficient_stock", [("a", 11, 10)]),
        (
            [{"sku": "a", "quantity": 1}, {"sku": "zz", "quantity": 2}],
            "unknown_sku",
            [("zz", 2, 0)],
        ),
    ],
)
def test_a_failed_reservation_takes_no_stock(pools, dbs, items, reason, shortages):
    _stock(pools, a=10)
    order_id = str(uuid.uuid4())
    placed = _placed(order_id, items)
    assert _handle(pools["inventory"], INVENTORY_HANDLERS, placed) == ["StockReservationFailed"]
    assert _available(dbs["inventory"]) == {"a": 10}
    row = (
        dbs["inventory"]
        .execute(
            "SELECT status, reason, total_cents FROM reservations WHERE order_id = %s", (order_id,)
        )
        .fetchone()
    )
    assert row == ("failed", reason, 0)
    ((_, payload),) = _outbox(dbs["inventory"], order_id)
    assert payload["reason"] == reason
    assert [(s["sku"], s["requested"], s["available"]) for s in payload["shortages"]] == shortages
    # a release of a failed reservation gives nothing back and says nothing
    cancelled = envelope(
        "OrderCancelled", {"order_id": order_id, "reason": "customer_request"}, "orders"
    )
    assert _handle(pools["inventory"], INVENTORY_HANDLERS, cancelled) == []
    assert _available(dbs["inventory"]) == {"a": 10}


# -- billing ---------------------------------------------------------------------------------


def _reserved(order_id: str, customer: str, total: int) -> Envelope:
    payload = {
        "order_id": order_id,
        "customer_id": customer,
        "lines": [{"sku": "a", "quantity": 1, "unit_price_cents": total}],
        "total_cents": total,
    }
    return envelope("StockReserved", payload, "inventory")


def _balance(db: psycopg.Connection, customer: str) -> int:
    return db.execute(
        "SELECT balance_cents FROM accounts WHERE customer_id = %s", (customer,)
    ).fetchone()[0]


def test_capture_refund_and_a_duplicate(pools, dbs):
    with unit_of_work(pools["billing"]) as uow:
        billing_storage.set_account(uow.conn, "alice", 1000)
    order_id = str(uuid.uuid4())
    assert _handle(pools["billing"], BILLING_HANDLERS, _reserved(order_id, "alice", 300)) == [
        "PaymentCaptured"
    ]
    assert _balance(dbs["billing"], "alice") == 700
    with pools["billing"].connection() as conn:
        payment = billing_storage.get_payment(conn, order_id)
    assert (payment["status"], payment["amount_cents"]) == ("captured", 300)
    assert _outbox(dbs["billing"], order_id)[0] == (
        "PaymentCaptured",
        {
            "order_id": order_id,
            "customer_id": "alice",
            "payment_id": str(payment["payment_id"]),
            "amount_cents": 300,
        },
    )
    # the same StockReserved again: decided, nothing charged or sent
    assert _handle(pools["billing"], BILLING_HANDLERS, _reserved(order_id, "alice", 300)) == []
    assert _balance(dbs["billing"], "alice") == 700

    cancelled = envelope(
        "OrderCancelled", {"order_id": order_id, "reason": "customer_request"}, "orders"
    )
    assert _handle(pools["billing"], BILLING_HANDLERS, cancelled) == ["PaymentRefunded"]
    assert _handle(pools["billing"], BILLING_HANDLERS, dataclasses.replace(cancelled)) == []
    assert _balance(dbs["billing"], "alice") == 1000
    refunds = dbs["billing"].execute("SELECT payment_id, amount_cents FROM refunds").fetchall()
    assert refunds == [(payment["payment_id"], 300)]
    assert _outbox(dbs["billing"], order_id)[-1] == (
        "PaymentRefunded",
        {"order_id": order_id, "payment_id": str(payment["payment_id"]), "amount_cents": 300},
    )
    with pools["billing"].connection() as conn:
        assert billing_storage.get_payment(conn, order_id)["status"] == "refunded"


def test_a_cancellation_first_means_never_charged(pools, dbs):
    with unit_of_work(pools["billing"]) as uow:
        billing_storage.set_account(uow.conn, "alice", 1000)
    order_id = str(uuid.uuid4())
    cancelled = envelope(
        "OrderCancelled", {"order_id": order_id, "reason": "payment_timeout"}, "orders"
    )
    assert _handle(pools["billing"], BILLING_HANDLERS, cancelled) == []
    assert dbs["billing"].execute(
        "SELECT reason FROM cancelled_orders WHERE order_id = %s", (order_id,)
    ).fetchone() == ("payment_timeout",)
    assert _handle(pools["billing"], BILLING_HANDLERS, _reserved(order_id, "alice", 300)) == []
    assert _balance(dbs["billing"], "alice") == 1000
    assert _outbox(dbs["billing"], order_id) == []
    assert dbs["billing"].execute("SELECT count(*) FROM payments").fetchone() == (0,)


@pytest.mark.parametrize(
    ("customer", "reason"), [("alice", "insufficient_funds"), ("nobody", "unknown_account")]
)
def test_a_decline_records_the_payment_and_says_why(pools, dbs, customer, reason):
    with unit_of_work(pools["billing"]) as uow:
        billing_storage.set_account(uow.conn, "alice", 100)
    order_id = str(uuid.uuid4())
    assert _handle(pools["billing"], BILLING_HANDLERS, _reserved(order_id, customer, 300)) == [
        "PaymentDeclined"
    ]
    assert _balance(dbs["billing"], "alice") == 100
    row = (
        dbs["billing"]
        .execute(
            "SELECT status, reason, amount_cents, payment_id FROM payments WHERE order_id = %s",
            (order_id,),
        )
        .fetchone()
    )
    assert row == ("declined", reason, 300, None)
    assert _outbox(dbs["billing"], order_id) == [
        (
            "PaymentDeclined",
            {"order_id": order_id, "customer_id": customer, "reason": reason},
        )
    ]
