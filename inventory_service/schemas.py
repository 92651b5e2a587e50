"""Inventory API request and response schemas."""

from marshmallow import Schema, fields, validate

from contracts.limits import MAX_PRICE_CENTS, MAX_STOCK
from service_runtime.api_fields import amount_field, key_field, text_field


class ProductIn(Schema):
    name = text_field(required=True, validate=validate.Length(min=1, max=200))
    price_cents = amount_field(0, MAX_PRICE_CENTS, required=True)
    available = amount_field(
        0,
        MAX_STOCK,
        required=True,
        metadata={"description": f"Stock on hand (this + held) is at most {MAX_STOCK}."},
    )


class Product(Schema):
    sku = fields.String()
    name = fields.String()
    price_cents = fields.Integer()
    available = fields.Integer()
    created_at = fields.DateTime()
    updated_at = fields.DateTime()


class RestockIn(Schema):
    quantity = amount_field(
        1,
        MAX_STOCK,
        required=True,
        metadata={"description": f"Stock on hand (available + held) stays at most {MAX_STOCK}."},
    )


class ReservationLine(Schema):
    sku = key_field()
    quantity = fields.Integer()
    unit_price_cents = fields.Integer()


class Reservation(Schema):
    order_id = fields.UUID()
    customer_id = fields.String(allow_none=True)
    status = fields.String(metadata={"enum": ["held", "released", "failed"]})
    reason = fields.String(allow_none=True)
    total_cents = fields.Integer()
    lines = fields.List(fields.Nested(ReservationLine))
    created_at = fields.DateTime()
    released_at = fields.DateTime(allow_none=True)
