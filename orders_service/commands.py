"""What a client can ask of orders: place and cancel. Each is one unit of work."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from psycopg_pool import ConnectionPool

from orders_service import domain, storage
from service_runtime.unit_of_work import UnitOfWork, count_emitted, unit_of_work


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different request body."""


class NotCancellable(Exception):
    def __init__(self, status: str) -> None:
        super().__init__(f"An order that is {status} cannot be cancelled.")
        self.status = status


@dataclass(frozen=True)
class Placed:
    order_id: str
    replayed: bool
    order: dict | None = None  # the new order as stored; None for a replay (read it)


def place_order(
    pool: ConnectionPool,
    customer_id: str,
    items: list[dict],
    payment_timeout_s: int,
    idempotency_key: str | None = None,
) -> Placed:
    order_id = str(uuid.uuid4())
    fingerprint = domain.request_fingerprint(customer_id, items)
    # One statement writes it all (storage.insert_order): on the pool's connection, which is
    # in autocommit, that statement is a transaction of its own, with no BEGIN and COMMIT
    # round trips (psycopg_pool would commit an open transaction on leaving the block).
    with pool.connection() as conn:
        event = UnitOfWork(conn).outbox_row(
            "OrderPlaced",
            aggregate_type="order",
            aggregate_id=order_id,
            payload={
                "order_id": order_id,
                "customer_id": customer_id,
                "items": [{"sku": i["sku"], "quantity": i["quantity"]} for i in items],
            },
        )
        deadline = datetime.now(UTC) + timedelta(seconds=payment_timeout_s)
        # the key's claim (if any), the order, its lines, history and event
        order = storage.insert_order(
            conn,
            order_id,
            customer_id,
            items,
            deadline,
            event,
            idempotency=(idempotency_key, fingerprint) if idempotency_key else None,
        )
        if order is None:  # the key was claimed before (and committed): a replay, or another body
            known_hash, known_order = storage.idempotency_record(conn, customer_id, idempotency_key)
            if known_hash != fingerprint:
                raise IdempotencyConflict(idempotency_key)
            return Placed(known_order, replayed=True)
    count_emitted("orders", [event.event_type])
    return Placed(order_id, replayed=False, order=order)


def cancel_order(pool: ConnectionPool, order_id: str) -> bool | None:
    """None if no such order; True if cancelled now, False if it already was."""
    with unit_of_work(pool, service="orders") as uow:
        order = storage.lock_order_row(uow.conn, order_id)
        if order is None:
            return None
        if order["status"] == domain.CANCELLED:
            return False
        if not domain.can_move(order["status"], domain.CANCELLED):
            raise NotCancellable(order["status"])
        cancel(uow, order_id, "customer_request")
    return True


def cancel(uow: UnitOfWork, order_id: str, reason: str) -> None:
    """Record the decision; release and refund follow as other services react to the event."""
    event = uow.outbox_row(
        "OrderCancelled",
        aggregate_type="order",
        aggregate_id=order_id,
        payload={"order_id": order_id, "reason": reason},
    )
    storage.set_status(uow.conn, order_id, domain.CANCELLED, reason, event=event)
    uow.written(event)
