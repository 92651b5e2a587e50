"""Billing API request and response schemas."""

from marshmallow import Schema, fields

from contracts.limits import MAX_BALANCE_CENTS
from service_runtime.api_fields import amount_field

_ON_HAND = (
    f"Money on hand (balance + captured, unrefunded payments) is at most {MAX_BALANCE_CENTS}."
)


class AccountIn(Schema):
    balance_cents = amount_field(
        0, MAX_BALANCE_CENTS, required=True, metadata={"description": _ON_HAND}
    )


class Account(Schema):
    customer_id = fields.String()
    balance_cents = fields.Integer()
    created_at = fields.DateTime()
    updated_at = fields.DateTime()


class DepositIn(Schema):
    amount_cents = amount_field(
        1, MAX_BALANCE_CENTS, required=True, metadata={"description": _ON_HAND}
    )


class Payment(Schema):
    order_id = fields.UUID()
    payment_id = fields.UUID(allow_none=True)
    customer_id = fields.String()
    amount_cents = fields.Integer()
    status = fields.String(metadata={"enum": ["captured", "refunded", "declined"]})
    reason = fields.String(allow_none=True)
    created_at = fields.DateTime()
    refunded_at = fields.DateTime(allow_none=True)
