"""Inventory's reactions to other services' events, each inside the consumer's transaction."""

from __future__ import annotations

from contracts import Envelope
from inventory_service import storage
from inventory_service.domain import merge_items, plan_reservation
from service_runtime.locks import lock_order
from service_runtime.unit_of_work import UnitOfWork


def on_order_placed(uow: UnitOfWork, event: Envelope) -> None:
    """Reserve every line or none."""
    order_id = event.payload["order_id"]
    customer_id = event.payload["customer_id"]
    lock_order(uow.conn, order_id)  # vs. a release of the same order, also before any row exists
    if storage.find_reservation(uow.conn, order_id):
        return  # decided already (or cancelled before we got here)
    wanted = merge_items(event.payload["items"])
    plan = plan_reservation(wanted, storage.lock_stock(uow.conn, wanted))
    if plan.ok:
        storage.insert_reservation(
            uow.conn, order_id, customer_id, "held", None, plan.total_cents, plan.lines
        )
        _emit(
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
    else:
        storage.insert_reservation(uow.conn, order_id, customer_id, "failed", plan.reason, 0, [])
        _emit(
            uow,
            "StockReservationFailed",
            order_id,
            {
                "order_id": order_id,
                "reason": plan.reason,
                "shortages": plan.shortages,
            },
        )


def release(uow: UnitOfWork, event: Envelope) -> None:
    """Give back whatever this order still holds (PaymentDeclined, OrderCancelled)."""
    order_id = event.payload["order_id"]
    lock_order(uow.conn, order_id)  # vs. the reservation of the same order
    if storage.find_reservation(uow.conn, order_id) is None:
        # The cancellation overtook the order: remember it so OrderPlaced reserves nothing.
        storage.insert_reservation(uow.conn, order_id, None, "released", event.event_type, 0, [])
        return
    lines = storage.release_reservation(uow.conn, order_id)
    if lines:
        _emit(
            uow,
            "StockReleased",
            order_id,
            {
                "order_id": order_id,
                "lines": [{"sku": ln["sku"], "quantity": ln["quantity"]} for ln in lines],
            },
        )


def _emit(uow: UnitOfWork, event_type: str, order_id: str, payload: dict) -> None:
    uow.emit(event_type, aggregate_type="reservation", aggregate_id=order_id, payload=payload)


HANDLERS = {
    "OrderPlaced": on_order_placed,
    "OrderCancelled": release,
    "PaymentDeclined": release,
}
