"""Inventory's reactions to other services' events, each inside the consumer's transaction."""

from __future__ import annotations

from contracts import Envelope
from inventory_service import storage
from inventory_service.domain import merge_items, plan_reservation
from service_runtime.unit_of_work import OutboxRow, UnitOfWork


def on_order_placed(uow: UnitOfWork, event: Envelope) -> None:
    """Reserve every line or none."""
    order_id = event.payload["order_id"]
    customer_id = event.payload["customer_id"]
    uow.lock_order(order_id)  # vs. a release of the same order, also before any row exists
    wanted = merge_items(event.payload["items"])
    stock = storage.lock_stock_unless_decided(uow.conn, order_id, wanted)
    if stock is None:
        return  # decided already (or cancelled before we got here)
    plan = plan_reservation(wanted, stock)
    if plan.ok:
        reserved = _event(
            uow,
            "StockReserved",
            order_id,
            {
                "order_id": order_id,
                "customer_id": customer_id,
                "lines": plan.lines,
                "total_cents": plan.total_cents,
            },
        )
        storage.insert_reservation(
            uow.conn, order_id, customer_id, "held", None, plan.total_cents, plan.lines, reserved
        )
        uow.written(reserved)
    else:
        failed = _event(
            uow,
            "StockReservationFailed",
            order_id,
            {
                "order_id": order_id,
                "reason": plan.reason,
                "shortages": plan.shortages,
            },
        )
        storage.insert_reservation(
            uow.conn, order_id, customer_id, "failed", plan.reason, 0, [], failed
        )
        uow.written(failed)


def release(uow: UnitOfWork, event: Envelope) -> None:
    """Give back whatever this order still holds (PaymentDeclined, OrderCancelled). When the
    cancellation overtook the order, remember it so OrderPlaced reserves nothing."""
    order_id = event.payload["order_id"]
    uow.lock_order(order_id)  # vs. the reservation of the same order
    lines = storage.release(uow.conn, order_id, event.event_type)
    if lines:
        uow.emit(
            "StockReleased",
            aggregate_type="reservation",
            aggregate_id=order_id,
            payload={"order_id": order_id, "lines": lines},
        )


def _event(uow: UnitOfWork, event_type: str, order_id: str, payload: dict) -> OutboxRow:
    return uow.outbox_row(
        event_type, aggregate_type="reservation", aggregate_id=order_id, payload=payload
    )


# Each handler starts with the order's lock: the consumer takes it in its transaction's first
# statement (UnitOfWork.lock_order then sends none).
LOCK_ORDERS = True

HANDLERS = {
    "OrderPlaced": on_order_placed,
    "OrderCancelled": release,
    "PaymentDeclined": release,
}
