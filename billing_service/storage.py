"""Billing SQL. Every function takes the connection of the caller's transaction."""

from __future__ import annotations

import uuid

import psycopg
from psycopg.rows import dict_row

from contracts.limits import MAX_BALANCE_CENTS, LimitExceeded

_ACCOUNT_COLUMNS = "customer_id, balance_cents, created_at, updated_at"
_PAYMENT_COLUMNS = (
    "order_id, payment_id, customer_id, amount_cents, status, reason, created_at, refunded_at"
)


def set_account(conn: psycopg.Connection, customer_id: str, balance: int) -> tuple[dict, bool]:
    """Create an account or set its balance; the delta is booked for the audit.

    Insert first: `SELECT … FOR UPDATE` locks nothing while the row does not exist, so two
    concurrent creations would both book their full balance. The conflicting INSERT waits for
    the other transaction instead, and the loser then updates under the row lock.
    """
    cur = conn.cursor(row_factory=dict_row)
    created = cur.execute(
        f"""INSERT INTO accounts (customer_id, balance_cents) VALUES (%s, %s)
            ON CONFLICT (customer_id) DO NOTHING RETURNING {_ACCOUNT_COLUMNS}""",
        (customer_id, balance),
    ).fetchone()
    if created:
        _adjust_balance(conn, customer_id, balance, "set")
        return created, True
    before = lock_balance(conn, customer_id)
    _check_on_hand(conn, customer_id, balance, "balance_cents")
    account = cur.execute(
        f"""UPDATE accounts SET balance_cents = %s, updated_at = now()
            WHERE customer_id = %s RETURNING {_ACCOUNT_COLUMNS}""",
        (balance, customer_id),
    ).fetchone()
    if balance != before:
        _adjust_balance(conn, customer_id, balance - before, "set")
    return account, False


def _adjust_balance(conn: psycopg.Connection, customer_id: str, delta: int, kind: str) -> None:
    conn.execute(
        "INSERT INTO account_adjustments (customer_id, delta_cents, kind) VALUES (%s, %s, %s)",
        (customer_id, delta, kind),
    )


def deposit(conn: psycopg.Connection, customer_id: str, amount: int) -> dict | None:
    """Add money; None if no such account. LimitExceeded past MAX_BALANCE_CENTS on hand."""
    balance = lock_balance(conn, customer_id)
    if balance is None:
        return None
    _check_on_hand(conn, customer_id, balance + amount, "amount_cents")
    account = (
        conn.cursor(row_factory=dict_row)
        .execute(
            f"""UPDATE accounts SET balance_cents = balance_cents + %s, updated_at = now()
                WHERE customer_id = %s RETURNING {_ACCOUNT_COLUMNS}""",
            (amount, customer_id),
        )
        .fetchone()
    )
    _adjust_balance(conn, customer_id, amount, "deposit")
    return account


def _check_on_hand(conn: psycopg.Connection, customer_id: str, balance: int, field: str) -> None:
    """Bound money on hand (balance + captured, unrefunded), under the account's row lock:
    captures and refunds only move money between the two, so a refund can never overflow."""
    captured = conn.execute(
        """SELECT coalesce(sum(amount_cents), 0) FROM payments
           WHERE customer_id = %s AND status = 'captured'""",
        (customer_id,),
    ).fetchone()[0]
    if balance + captured > MAX_BALANCE_CENTS:
        raise LimitExceeded(
            field,
            f"Money on hand would be {balance + captured} cents (balance {balance} + captured "
            f"{captured}); at most {MAX_BALANCE_CENTS}.",
        )


def get_account(conn: psycopg.Connection, customer_id: str) -> dict | None:
    return (
        conn.cursor(row_factory=dict_row)
        .execute(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE customer_id = %s", (customer_id,))
        .fetchone()
    )


def lock_balance(conn: psycopg.Connection, customer_id: str) -> int | None:
    row = conn.execute(
        "SELECT balance_cents FROM accounts WHERE customer_id = %s FOR UPDATE", (customer_id,)
    ).fetchone()
    return row[0] if row else None


def get_payment(conn: psycopg.Connection, order_id: str) -> dict | None:
    return (
        conn.cursor(row_factory=dict_row)
        .execute(f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE order_id = %s", (order_id,))
        .fetchone()
    )


def is_cancelled(conn: psycopg.Connection, order_id: str) -> bool:
    row = conn.execute("SELECT 1 FROM cancelled_orders WHERE order_id = %s", (order_id,))
    return row.fetchone() is not None


def remember_cancellation(conn: psycopg.Connection, order_id: str, reason: str) -> None:
    conn.execute(
        "INSERT INTO cancelled_orders (order_id, reason) VALUES (%s, %s) ON CONFLICT DO NOTHING",
        (order_id, reason),
    )


def capture(conn: psycopg.Connection, order_id: str, customer_id: str, amount: int) -> str:
    payment_id = str(uuid.uuid4())
    conn.execute(
        "UPDATE accounts SET balance_cents = balance_cents - %s, updated_at = now() "
        "WHERE customer_id = %s",
        (amount, customer_id),
    )
    conn.execute(
        """INSERT INTO payments (order_id, payment_id, customer_id, amount_cents, status)
           VALUES (%s, %s, %s, %s, 'captured')""",
        (order_id, payment_id, customer_id, amount),
    )
    return payment_id


def record_decline(
    conn: psycopg.Connection, order_id: str, customer_id: str, amount: int, reason: str
) -> None:
    conn.execute(
        """INSERT INTO payments (order_id, customer_id, amount_cents, status, reason)
           VALUES (%s, %s, %s, 'declined', %s)""",
        (order_id, customer_id, amount, reason),
    )


def refund(conn: psycopg.Connection, payment: dict) -> None:
    conn.execute(
        "UPDATE payments SET status = 'refunded', refunded_at = now() WHERE order_id = %s",
        (payment["order_id"],),
    )
    conn.execute(
        "UPDATE accounts SET balance_cents = balance_cents + %s, updated_at = now() "
        "WHERE customer_id = %s",
        (payment["amount_cents"], payment["customer_id"]),
    )
    conn.execute(
        "INSERT INTO refunds (refund_id, payment_id, amount_cents) VALUES (%s, %s, %s)",
        (str(uuid.uuid4()), payment["payment_id"], payment["amount_cents"]),
    )
