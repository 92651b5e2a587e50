"""Billing API request and response schemas."""

from marshmallow import Schema, fields

from service_runtime.api_fields import cents_field, count_field


class AccountIn(Schema):
    balance_cents = cents_field(required=True)


class Account(Schema):
    customer_id = fields.String()
    balance_cents = fields.Integer()
    created_at = fields.DateTime()
    updated_at = fields.DateTime()


class DepositIn(Schema):
    amount_cents = count_field(minimum=1, required=True)


class Payment(Schema):
    order_id = fields.UUID()
    payment_id = fields.UUID(allow_none=True)
    customer_id = fields.String()
    amount_cents = fields.Integer()
    status = fields.String(metadata={"enum": ["captured", "refunded", "declined"]})
    reason = fields.String(allow_none=True)
    created_at = fields.DateTime()
    refunded_at = fields.DateTime(allow_none=True)
