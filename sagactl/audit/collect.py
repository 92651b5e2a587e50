"""Read the three services' databases into an audit `Snapshot`.

Each database is read in one REPEATABLE READ READ ONLY transaction, so every service is seen
at one consistent moment; the three moments differ slightly, which is why the audit is
meant for a quiet system.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import psycopg

from sagactl.audit.invariants import Order, Payment, Refund, Reservation, Snapshot


def _read(url: str) -> psycopg.Connection:
    conn = psycopg.connect(url, connect_timeout=10)
    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
    return conn


def collect(db_urls: Mapping[str, str]) -> Snapshot:
    """db_urls: service -> database URL (each service's own role is enough)."""
    with _read(db_urls["orders"]) as conn:
        # the database's clock judges the deadlines it stored, not this machine's
        now = conn.execute("SELECT now()").fetchone()[0]
        orders = [
            Order(str(oid), customer, status, total, deadline)
            for oid, customer, status, total, deadline in conn.execute(
                "SELECT order_id, customer_id, status, total_cents, payment_deadline FROM orders"
            )
        ]
    snapshot = Snapshot(now=now, orders=orders)

    with _read(db_urls["inventory"]) as conn:
        lines: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for oid, sku, quantity in conn.execute(
            "SELECT order_id, sku, quantity FROM reservation_lines ORDER BY order_id, sku"
        ):
            lines[str(oid)].append((sku, quantity))
        snapshot.reservations = [
            Reservation(str(oid), status, tuple(lines.get(str(oid), ())))
            for oid, status in conn.execute("SELECT order_id, status FROM reservations")
        ]
        snapshot.available = dict(conn.execute("SELECT sku, available FROM products").fetchall())
        snapshot.stock_adjusted = {
            sku: int(total)
            for sku, total in conn.execute(
                "SELECT sku, sum(delta) FROM stock_adjustments GROUP BY sku"
            )
        }

    with _read(db_urls["billing"]) as conn:
        snapshot.payments = [
            Payment(str(oid), str(pid) if pid else None, customer, amount, status)
            for oid, pid, customer, amount, status in conn.execute(
                "SELECT order_id, payment_id, customer_id, amount_cents, status FROM payments"
            )
        ]
        snapshot.refunds = [
            Refund(str(pid), amount)
            for pid, amount in conn.execute("SELECT payment_id, amount_cents FROM refunds")
        ]
        snapshot.balances = dict(
            conn.execute("SELECT customer_id, balance_cents FROM accounts").fetchall()
        )
        snapshot.money_adjusted = {
            customer: int(total)
            for customer, total in conn.execute(
                "SELECT customer_id, sum(delta_cents) FROM account_adjustments GROUP BY customer_id"
            )
        }
    return snapshot
