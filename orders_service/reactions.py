"""Orders' reactions to inventory and billing events, each inside the consumer's transaction."""

from __future__ import annotations

import logging

from contracts import Envelope
from orders_service import domain, storage
from service_runtime.unit_of_work import UnitOfWork

log = logging.getLogger(__name__)


def _locked_order(
    uow: UnitOfWork, event: Envelope, total_if_unset: int | None = None
) -> dict | None:
    """The order, locked, with the event in its history (one statement)."""
    order = storage.lock_order_row(
        uow.conn,
        event.payload["order_id"],
        event=event.event_type,
        reason=event.payload.get("reason"),
        total_if_unset=total_if_unset,
    )
    if order is None:
        log.warning("%s for unknown order %s", event.event_type, event.payload["order_id"])
    return order


def on_stock_reserved(uow: UnitOfWork, event: Envelope) -> None:
    """The reserved total, unless the order has one already."""
    _locked_order(uow, event, total_if_unset=event.payload["total_cents"])


def on_payment_captured(uow: UnitOfWork, event: Envelope) -> None:
    """pending -> confirmed; a cancelled order stays cancelled (billing refunds it)."""
    order = _locked_order(uow, event)
    if order is None or not domain.can_move(order["status"], domain.CONFIRMED):
        return
    order_id = str(order["order_id"])
    total = event.payload["amount_cents"]
    confirmed = uow.outbox_row(
        "OrderConfirmed",
        aggregate_type="order",
        aggregate_id=order_id,
        payload={"order_id": order_id, "total_cents": total},
    )
    storage.set_status(uow.conn, order_id, domain.CONFIRMED, total_cents=total, event=confirmed)
    uow.written(confirmed)


def on_step_failed(uow: UnitOfWork, event: Envelope) -> None:
    """StockReservationFailed or PaymentDeclined: pending -> rejected."""
    order = _locked_order(uow, event)
    if order is None or not domain.can_move(order["status"], domain.REJECTED):
        return
    order_id = str(order["order_id"])
    reason = event.payload["reason"]
    rejected = uow.outbox_row(
        "OrderRejected",
        aggregate_type="order",
        aggregate_id=order_id,
        payload={"order_id": order_id, "reason": reason},
    )
    storage.set_status(uow.conn, order_id, domain.REJECTED, reason, event=rejected)
    uow.written(rejected)


def on_compensation(uow: UnitOfWork, event: Envelope) -> None:
    """StockReleased, PaymentRefunded: shown in the order's history as they arrive."""
    _locked_order(uow, event)


# The reactions lock the order's row (storage.lock_order_row), not the order's advisory lock.
LOCK_ORDERS = False

HANDLERS = {
    "StockReserved": on_stock_reserved,
    "StockReservationFailed": on_step_failed,
    "PaymentCaptured": on_payment_captured,
    "PaymentDeclined": on_step_failed,
    "StockReleased": on_compensation,
    "PaymentRefunded": on_compensation,
}
