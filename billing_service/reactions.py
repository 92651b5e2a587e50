"""Billing's reactions to other services' events, each inside the consumer's transaction."""

from __future__ import annotations

from billing_service import storage
from billing_service.domain import decline_reason
from contracts import Envelope
from service_runtime.locks import lock_order
from service_runtime.unit_of_work import UnitOfWork


def on_stock_reserved(uow: UnitOfWork, event: Envelope) -> None:
    """Capture the order's total, unless the order is already known cancelled."""
    order_id = event.payload["order_id"]
    customer_id = event.payload["customer_id"]
    amount = event.payload["total_cents"]
    lock_order(uow.conn, order_id)  # capture vs. cancellation
    if storage.get_payment(uow.conn, order_id) or storage.is_cancelled(uow.conn, order_id):
        return  # decided already, or cancelled first: never charge
    reason = decline_reason(storage.lock_balance(uow.conn, customer_id), amount)
    if reason:
        storage.record_decline(uow.conn, order_id, customer_id, amount, reason)
        _emit(
            uow,
            "PaymentDeclined",
            order_id,
            {"order_id": order_id, "customer_id": customer_id, "reason": reason},
        )
        return
    payment_id = storage.capture(uow.conn, order_id, customer_id, amount)
    _emit(
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


def on_order_cancelled(uow: UnitOfWork, event: Envelope) -> None:
    """Refund a capture; with nothing captured yet, remember so a late StockReserved is ignored."""
    order_id = event.payload["order_id"]
    lock_order(uow.conn, order_id)  # capture vs. cancellation
    storage.remember_cancellation(uow.conn, order_id, event.payload["reason"])
    payment = storage.get_payment(uow.conn, order_id)
    if payment and payment["status"] == "captured":
        storage.refund(uow.conn, payment)
        _emit(
            uow,
            "PaymentRefunded",
            order_id,
            {
                "order_id": order_id,
                "payment_id": str(payment["payment_id"]),
                "amount_cents": payment["amount_cents"],
            },
        )


def _emit(uow: UnitOfWork, event_type: str, order_id: str, payload: dict) -> None:
    uow.emit(event_type, aggregate_type="payment", aggregate_id=order_id, payload=payload)


HANDLERS = {
    "StockReserved": on_stock_reserved,
    "OrderCancelled": on_order_cancelled,
}
