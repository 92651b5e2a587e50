"""Billing rules, pure: may this charge be captured."""

from __future__ import annotations


def decline_reason(balance_cents: int | None, amount_cents: int) -> str | None:
    """None when the charge can be captured, else the PaymentDeclined reason."""
    if balance_cents is None:
        return "unknown_account"
    if balance_cents < amount_cents:
        return "insufficient_funds"
    return None
