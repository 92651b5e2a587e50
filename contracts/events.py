"""Marshmallow schemas for every event payload, keyed by (event_type, version)."""

from __future__ import annotations

import contextlib
from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate

from contracts.errors import ContractError
from contracts.fastcheck import Check, Unsupported, compile_schema
from contracts.limits import (
    MAX_LINE_QUANTITY,
    MAX_ORDER_LINES,
    MAX_ORDER_TOTAL_CENTS,
    MAX_PRICE_CENTS,
    MAX_STOCK,
)

# The API bounds (contracts/limits.py) hold in the events too: every amount fits a bigint.
_quantity = validate.Range(min=1, max=MAX_LINE_QUANTITY)
_price = validate.Range(min=0, max=MAX_PRICE_CENTS)
_stock = validate.Range(min=0, max=MAX_STOCK)
_lines = validate.Length(1, MAX_ORDER_LINES)


class _Strict(Schema):
    class Meta:
        unknown = RAISE


class _Sku(fields.String):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(required=True, validate=validate.Length(min=1, max=64), **kwargs)


class ItemV1(_Strict):
    sku = _Sku()
    quantity = fields.Integer(required=True, strict=True, validate=_quantity)


class PricedLineV1(_Strict):
    sku = _Sku()
    quantity = fields.Integer(required=True, strict=True, validate=_quantity)
    unit_price_cents = fields.Integer(required=True, strict=True, validate=_price)


class ShortageV1(_Strict):
    sku = _Sku()
    requested = fields.Integer(required=True, strict=True, validate=_quantity)
    available = fields.Integer(required=True, strict=True, validate=_stock)


def _order_id() -> fields.UUID:
    return fields.UUID(required=True)


def _customer_id() -> fields.String:
    return fields.String(required=True, validate=validate.Length(min=1, max=64))


def _cents() -> fields.Integer:
    return fields.Integer(
        required=True, strict=True, validate=validate.Range(min=0, max=MAX_ORDER_TOTAL_CENTS)
    )


class OrderPlacedV1(_Strict):
    order_id = _order_id()
    customer_id = _customer_id()
    items = fields.List(fields.Nested(ItemV1), required=True, validate=_lines)


class OrderConfirmedV1(_Strict):
    order_id = _order_id()
    total_cents = _cents()


class OrderRejectedV1(_Strict):
    order_id = _order_id()
    reason = fields.String(required=True, validate=validate.Length(min=1))


class OrderCancelledV1(_Strict):
    order_id = _order_id()
    reason = fields.String(
        required=True, validate=validate.OneOf(["customer_request", "payment_timeout"])
    )


class StockReservedV1(_Strict):
    order_id = _order_id()
    customer_id = _customer_id()
    lines = fields.List(fields.Nested(PricedLineV1), required=True, validate=_lines)
    total_cents = _cents()


class StockReservationFailedV1(_Strict):
    order_id = _order_id()
    reason = fields.String(
        required=True, validate=validate.OneOf(["insufficient_stock", "unknown_sku"])
    )
    shortages = fields.List(fields.Nested(ShortageV1), required=True)


class StockReleasedV1(_Strict):
    order_id = _order_id()
    lines = fields.List(fields.Nested(ItemV1), required=True)


class PaymentCapturedV1(_Strict):
    order_id = _order_id()
    customer_id = _customer_id()
    payment_id = fields.UUID(required=True)
    amount_cents = _cents()


class PaymentDeclinedV1(_Strict):
    order_id = _order_id()
    customer_id = _customer_id()
    reason = fields.String(
        required=True, validate=validate.OneOf(["insufficient_funds", "unknown_account"])
    )


class PaymentRefundedV1(_Strict):
    order_id = _order_id()
    payment_id = fields.UUID(required=True)
    amount_cents = _cents()


EVENT_SCHEMAS: dict[tuple[str, int], Schema] = {
    ("OrderPlaced", 1): OrderPlacedV1(),
    ("OrderConfirmed", 1): OrderConfirmedV1(),
    ("OrderRejected", 1): OrderRejectedV1(),
    ("OrderCancelled", 1): OrderCancelledV1(),
    ("StockReserved", 1): StockReservedV1(),
    ("StockReservationFailed", 1): StockReservationFailedV1(),
    ("StockReleased", 1): StockReleasedV1(),
    ("PaymentCaptured", 1): PaymentCapturedV1(),
    ("PaymentDeclined", 1): PaymentDeclinedV1(),
    ("PaymentRefunded", 1): PaymentRefundedV1(),
}

EVENT_TYPES = frozenset(event_type for event_type, _version in EVENT_SCHEMAS)


def _fast_checks() -> dict[tuple[str, int], Check]:
    """Each schema's fast acceptance check (contracts/fastcheck.py), where it compiles."""
    checks = {}
    for key, schema in EVENT_SCHEMAS.items():
        with contextlib.suppress(Unsupported):  # else marshmallow alone
            checks[key] = compile_schema(schema)
    return checks


_FAST_CHECKS = _fast_checks()


def validate_payload(event_type: str, version: int, payload: dict[str, Any]) -> dict[str, Any]:
    """Check a payload against its schema; returns it unchanged (JSON-ready) when valid."""
    fast = _FAST_CHECKS.get((event_type, version))
    if fast is not None and fast(payload):
        return payload  # certainly valid: what marshmallow would say, without its cost
    schema = EVENT_SCHEMAS.get((event_type, version))
    if schema is None:
        raise ContractError(f"unknown event {event_type} v{version}")
    try:
        schema.load(payload)
    except ValidationError as err:
        raise ContractError(f"invalid {event_type} v{version} payload: {err.messages}") from err
    return payload
