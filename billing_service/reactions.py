"""Billing's reactions to other services' events, each inside the consumer's transaction."""

from __future__ import annotations

import uuid

from billing_service import storage
from billing_service.domain import decline_reason
from contracts import Envelope
from service_runtime.unit_of_work import OutboxRow, UnitOfWork


def on_stock_reserved(uow: UnitOfWork, event: Envelope) -> None:
    """Capture the order's total, unless the order is already known cancelled."""
    order_id = event.payload["order_id"]
    customer_id = event.payload["customer_id"]
    amount = event.payload["total_cents"]
    uow.lock_order(order_id)  # capture vs. cancellation
    decided, balance = storage.lock_balance_unless_decided(uow.conn, order_id, customer_id)
    if decided:
        return  # decided already, or cancelled first: never charge
    reason = decline_reason(balance, amount)
    if reason:
        declined = _event(
            uow,
            "PaymentDeclined",
            order_id,
            {"order_id": order_id, "customer_id": customer_id, "reason": reason},
        )
        storage.record_decline(uow.conn, order_id, customer_id, amount, reason, declined)
        uow.written(declined)
        return
    payment_id = str(uuid.uuid4())
    captured = _event(
        uow,
        "PaymentCaptured",
        order_id,
        {
            "order_id": order_id,
            "customer_id": customer_id,
            "payment_id": payment_id,
            "amount_cents": amount,
        },
    )
    storage.capture(uow.conn, order_id, payment_id, customer_id, amount, captured)
    uow.written(captured)


def on_order_cancelled(uow: UnitOfWork, event: Envelope) -> None:
    """Refund a capture; with nothing captured yet, remember so a late StockReserved is ignored."""
    order_id = event.payload["order_id"]
    uow.lock_order(order_id)  # capture vs. cancellation
    payment = storage.remember_cancellation(uow.conn, order_id, event.payload["reason"])
    if payment and payment["status"] == "captured":
        refunded = _event(
            uow,
            "PaymentRefunded",
            order_id,
            {
                "order_id": order_id,
                "payment_id": str(payment["payment_id"]),
                "amount_cents": payment["amount_cents"],
            },
        )
        storage.refund(uow.conn, payment, refunded)
        uow.written(refunded)


def _event(uow: UnitOfWork, event_type: str, order_id: str, payload: dict) -> OutboxRow:
    return uow.outbox_row(
        event_type, aggregate_type="payment", aggregate_id=order_id, payload=payload
    )


# Each handler starts with the order's lock: the consumer takes it in its transaction's first
# statement (UnitOfWork.lock_order then sends none).
LOCK_ORDERS = True

HANDLERS = {
    "StockReserved": on_stock_reserved,
    "OrderCancelled": on_order_cancelled,
}
