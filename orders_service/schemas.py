"""Orders API request and response schemas."""

from marshmallow import Schema, ValidationError, fields, post_dump, validate, validates_schema

from contracts.limits import MAX_LINE_QUANTITY, MAX_ORDER_LINES
from orders_service.domain import STATUSES, duplicate_skus
from service_runtime.api_fields import Text, amount_field, key_field


class OrderItem(Schema):
    sku = key_field(required=True)
    quantity = amount_field(1, MAX_LINE_QUANTITY, required=True)


class OrderIn(Schema):
    customer_id = key_field(required=True)
    items = fields.List(
        fields.Nested(OrderItem),
        required=True,
        validate=validate.Length(1, MAX_ORDER_LINES),
        metadata={"description": "Each sku at most once (422 otherwise)."},
    )

    @validates_schema
    def no_repeated_sku(self, data: dict, **_kwargs) -> None:
        repeated = duplicate_skus(data.get("items", []))
        if repeated:
            raise ValidationError(
                f"Each sku may appear once; repeated: {', '.join(repeated)}.", "items"
            )


class IdempotencyHeader(Schema):
    idempotency_key = Text(
        data_key="Idempotency-Key",
        validate=validate.Length(1, 255),
        metadata={"description": "Same key + same body returns the same order."},
    )


class OrderQuery(Schema):
    customer_id = key_field()
    status = Text(validate=validate.OneOf(STATUSES))


class HistoryEntry(Schema):
    """A status the order took, or an event of its saga that reached orders: never both."""

    status = fields.String(metadata={"enum": list(STATUSES)})
    event = fields.String()
    reason = fields.String()
    at = fields.DateTime(required=True)

    @post_dump
    def omit_empty(self, entry: dict, **_kwargs) -> dict:
        return {key: value for key, value in entry.items() if value is not None}


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
    history = fields.List(fields.Nested(HistoryEntry))
