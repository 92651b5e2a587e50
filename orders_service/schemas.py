"""Orders API request and response schemas."""

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from orders_service.domain import STATUSES, duplicate_skus
from service_runtime.api_fields import count_field, key_field


class OrderItem(Schema):
    sku = key_field(required=True)
    quantity = count_field(minimum=1, required=True)


class OrderIn(Schema):
    customer_id = key_field(required=True)
    items = fields.List(fields.Nested(OrderItem), required=True, validate=validate.Length(1, 50))

    @validates_schema
    def no_repeated_sku(self, data: dict, **_kwargs) -> None:
        repeated = duplicate_skus(data.get("items", []))
        if repeated:
            raise ValidationError(
                f"Each sku may appear once; repeated: {', '.join(repeated)}.", "items"
            )


class IdempotencyHeader(Schema):
    idempotency_key = fields.String(
        data_key="Idempotency-Key",
        validate=validate.Length(1, 255),
        metadata={"description": "Same key + same body returns the same order."},
    )


class OrderQuery(Schema):
    customer_id = key_field()
    status = fields.String(validate=validate.OneOf(STATUSES))


class HistoryEntry(Schema):
    status = fields.String()
    event = fields.String()
    reason = fields.String()
    at = fields.DateTime()


class Order(Schema):
    order_id = fields.UUID()
    customer_id = fields.String()
    status = fields.String(metadata={"enum": list(STATUSES)})
    reason = fields.String(allow_none=True)
    total_cents = fields.Integer(allow_none=True)
    items = fields.List(fields.Nested(OrderItem))
    payment_deadline = fields.DateTime()
    created_at = fields.DateTime()
    updated_at = fields.DateTime()


class OrderDetail(Order):
    history = fields.Method("_history")

    def _history(self, order: dict) -> list[dict]:
        # Each entry names either a status or an event, never both; omit the empty one.
        return [
            {k: v for k, v in HistoryEntry().dump(entry).items() if v is not None}
            for entry in order["history"]
        ]
