"""Upper bounds on money and quantities: one place, checked by the APIs and the event contracts.

Every column that holds money or a quantity is `bigint` (signed 64-bit). The bounds make sure
that nothing an API accepts can overflow later, anywhere in the saga:

- an order has at most MAX_ORDER_LINES lines of at most MAX_LINE_QUANTITY units, each priced at
  most MAX_PRICE_CENTS, so an order total is at most MAX_ORDER_TOTAL_CENTS;
- a product's stock on hand (available + held by reservations) is at most MAX_STOCK: a PUT or a
  restock past it is refused (422); a reservation or a release only moves stock between the two;
- an account's money on hand (balance + captured, unrefunded payments) is at most
  MAX_BALANCE_CENTS: a PUT or a deposit past it is refused (422); a capture or a refund only
  moves money between the two.
"""

from __future__ import annotations

BIGINT_MAX = 2**63 - 1

MAX_ORDER_LINES = 50
MAX_LINE_QUANTITY = 1_000_000  # units of one sku in one order
MAX_PRICE_CENTS = 10_000_000_000  # 100 million a unit
MAX_STOCK = 1_000_000_000_000  # units of one sku on hand
MAX_BALANCE_CENTS = 10**17  # money of one account on hand
MAX_ORDER_TOTAL_CENTS = MAX_ORDER_LINES * MAX_LINE_QUANTITY * MAX_PRICE_CENTS  # 5 * 10**17

# Sums the services compute stay inside bigint (a refund lands on a full account, say).
assert MAX_BALANCE_CENTS + MAX_ORDER_TOTAL_CENTS <= BIGINT_MAX
assert MAX_STOCK + MAX_LINE_QUANTITY <= BIGINT_MAX


def describe() -> str:
    """The bounds in prose, for the OpenAPI documents."""
    return (
        "Money is in integer cents and quantities in integer units, 64-bit everywhere. Bounds "
        f"(422 with the field past them): at most {MAX_ORDER_LINES} lines per order, "
        f"{MAX_LINE_QUANTITY:,} units per line, {MAX_PRICE_CENTS:,} cents per unit price; "
        f"stock on hand per sku (available + held) at most {MAX_STOCK:,}; money on hand per "
        f"account (balance + captured, unrefunded payments) at most {MAX_BALANCE_CENTS:,} cents. "
        "Errors are JSON {code, status, message, errors?}: 400 unreadable JSON, 413 body over "
        "256 KiB (the connection is then closed), 415 a body that is not application/json, "
        "422 invalid input (also any text PostgreSQL cannot store: U+0000, lone surrogates)."
    )


class LimitExceeded(Exception):
    """A write would take a stored amount past its bound; the API answers 422 naming `field`."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message
