"""Billing SQL. Every function takes the connection of the caller's transaction."""

from __future__ import annotations

import uuid

import psycopg
from psycopg.rows import dict_row

from contracts.limits import MAX_BALANCE_CENTS, LimitExceeded
from service_runtime.unit_of_work import OutboxRow

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


def lock_balance_unless_decided(
    conn: psycopg.Connection, order_id: str, customer_id: str
) -> tuple[bool, int | None]:
    """(decided, balance): decided when the order has a payment already or is known cancelled;
    else the customer's balance (None: no such account), its row locked. One statement: the
    row is only locked when undecided. Callers hold the order's lock (service_runtime.locks),
    taken by an earlier statement, so this statement's snapshot has whatever a cancellation
    of the order committed."""
    return conn.execute(
        """WITH decided AS (
                SELECT EXISTS (SELECT FROM payments WHERE order_id = %(order_id)s)
                    OR EXISTS (SELECT FROM cancelled_orders WHERE order_id = %(order_id)s) AS yes
            ),
            balance AS (
                SELECT balance_cents FROM accounts
                WHERE customer_id = %(customer_id)s AND NOT (SELECT yes FROM decided)
                FOR UPDATE
            )
           SELECT yes, (SELECT balance_cents FROM balance) FROM decided""",
        {"order_id": order_id, "customer_id": customer_id},
    ).fetchone()


def remember_cancellation(conn: psycopg.Connection, order_id: str, reason: str) -> dict | None:
    """Record that the order is cancelled (once); returns its payment, if any, in the same
    statement."""
    return (
        conn.cursor(row_factory=dict_row)
        .execute(
            f"""WITH cancelled AS (
                    INSERT INTO cancelled_orders (order_id, reason)
                    VALUES (%(order_id)s, %(reason)s) ON CONFLICT DO NOTHING
                )
                SELECT {_PAYMENT_COLUMNS} FROM payments WHERE order_id = %(order_id)s""",
            {"order_id": order_id, "reason": reason},
        )
        .fetchone()
    )


def capture(
    conn: psycopg.Connection,
    order_id: str,
    payment_id: str,
    customer_id: str,
    amount: int,
    event: OutboxRow,
) -> None:
    """Charge the account (its row locked by the caller), record the payment and write `event`
    (PaymentCaptured), in one statement."""
    conn.execute(
        f"""WITH charged AS (
                UPDATE accounts SET balance_cents = balance_cents - %(amount)s, updated_at = now()
                WHERE customer_id = %(customer_id)s
            ),
            payment AS (
                INSERT INTO payments (order_id, payment_id, customer_id, amount_cents, status)
                VALUES (%(order_id)s, %(payment_id)s, %(customer_id)s, %(amount)s, 'captured')
            ),
            event AS ({event.insert_sql()})
            SELECT""",
        {
            "order_id": order_id,
            "payment_id": payment_id,
            "customer_id": customer_id,
            "amount": amount,
            **event.params,
        },
    )


def record_decline(
    conn: psycopg.Connection,
    order_id: str,
    customer_id: str,
    amount: int,
    reason: str,
    event: OutboxRow,
) -> None:
    """The declined payment and `event` (PaymentDeclined), in one statement."""
    conn.execute(
        f"""WITH payment AS (
                INSERT INTO payments (order_id, customer_id, amount_cents, status, reason)
                VALUES (%(order_id)s, %(customer_id)s, %(amount)s, 'declined', %(reason)s)
            ),
            event AS ({event.insert_sql()})
            SELECT""",
        {
            "order_id": order_id,
            "customer_id": customer_id,
            "amount": amount,
            "reason": reason,
            **event.params,
        },
    )


def refund(conn: psycopg.Connection, payment: dict, event: OutboxRow) -> None:
    """Mark the payment refunded, give the money back, record the refund and write `event`
    (PaymentRefunded), in one statement. Locks as before: the payment row, then the account's
    (its UPDATE waits for `refunded`)."""
    conn.execute(
        f"""WITH refunded AS (
                UPDATE payments SET status = 'refunded', refunded_at = now()
                WHERE order_id = %(order_id)s RETURNING 1
            ),
            given_back AS (
                UPDATE accounts
                SET balance_cents = balance_cents + %(amount)s, updated_at = now()
                WHERE customer_id = %(customer_id)s AND EXISTS (SELECT FROM refunded)
            ),
            recorded AS (
                INSERT INTO refunds (refund_id, payment_id, amount_cents)
                VALUES (%(refund_id)s, %(payment_id)s, %(amount)s)
            ),
            event AS ({event.insert_sql()})
            SELECT""",
        {
            "order_id": payment["order_id"],
            "customer_id": payment["customer_id"],
            "payment_id": payment["payment_id"],
            "amount": payment["amount_cents"],
            "refund_id": str(uuid.uuid4()),
            **event.params,
        },
    )
