"""Inventory API request and response schemas."""

from marshmallow import Schema, fields, validate

from service_runtime.api_fields import cents_field, count_field, key_field


class ProductIn(Schema):
    name = fields.String(required=True, validate=validate.Length(min=1, max=200))
    price_cents = cents_field(required=True)
    available = count_field(required=True)


class Product(Schema):
    sku = fields.String()
    name = fields.String()
    price_cents = fields.Integer()
    available = fields.Integer()
    created_at = fields.DateTime()
    updated_at = fields.DateTime()


class RestockIn(Schema):
    quantity = count_field(minimum=1, required=True)


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
