"""Inventory SQL. Every function takes the connection of the caller's transaction."""

from __future__ import annotations

from collections.abc import Iterable

import psycopg
from psycopg.rows import dict_row

from contracts.limits import MAX_STOCK, LimitExceeded
from inventory_service.domain import StockLevel

_PRODUCT_COLUMNS = "sku, name, price_cents, available, created_at, updated_at"


def upsert_product(
    conn: psycopg.Connection, sku: str, name: str, price_cents: int, available: int
) -> tuple[dict, bool]:
    """Create or replace; the stock delta is recorded for the audit. Returns (product, created).

    Insert first: `SELECT … FOR UPDATE` locks nothing while the row does not exist, so two
    concurrent creations would both see "no row" and both book the full stock as a delta.
    The conflicting INSERT waits for the other transaction instead; the loser then updates.
    """
    cur = conn.cursor(row_factory=dict_row)
    created = cur.execute(
        f"""INSERT INTO products (sku, name, price_cents, available) VALUES (%s, %s, %s, %s)
            ON CONFLICT (sku) DO NOTHING RETURNING {_PRODUCT_COLUMNS}""",
        (sku, name, price_cents, available),
    ).fetchone()
    if created:
        _adjust_stock(conn, sku, available, "set")
        return created, True
    before = cur.execute(
        "SELECT available FROM products WHERE sku = %s FOR UPDATE", (sku,)
    ).fetchone()
    _check_on_hand(conn, sku, available, "available")
    product = cur.execute(
        f"""UPDATE products SET name = %s, price_cents = %s, available = %s, updated_at = now()
            WHERE sku = %s RETURNING {_PRODUCT_COLUMNS}""",
        (name, price_cents, available, sku),
    ).fetchone()
    if available != before["available"]:
        _adjust_stock(conn, sku, available - before["available"], "set")
    return product, False


def _adjust_stock(conn: psycopg.Connection, sku: str, delta: int, kind: str) -> None:
    conn.execute(
        "INSERT INTO stock_adjustments (sku, delta, kind) VALUES (%s, %s, %s)", (sku, delta, kind)
    )


def restock(conn: psycopg.Connection, sku: str, quantity: int) -> dict | None:
    """Add stock; None if no such sku. LimitExceeded past MAX_STOCK on hand."""
    cur = conn.cursor(row_factory=dict_row)
    locked = cur.execute(
        "SELECT available FROM products WHERE sku = %s FOR UPDATE", (sku,)
    ).fetchone()
    if locked is None:
        return None
    _check_on_hand(conn, sku, locked["available"] + quantity, "quantity")
    product = cur.execute(
        f"""UPDATE products SET available = available + %s, updated_at = now()
            WHERE sku = %s RETURNING {_PRODUCT_COLUMNS}""",
        (quantity, sku),
    ).fetchone()
    _adjust_stock(conn, sku, quantity, "restock")
    return product


def _check_on_hand(conn: psycopg.Connection, sku: str, available: int, field: str) -> None:
    """Bound stock on hand (available + held), under the product's row lock: reservations and
    releases only move stock between the two, so a later release can never overflow."""
    held = conn.execute(
        """SELECT coalesce(sum(l.quantity), 0) FROM reservation_lines l
           JOIN reservations r USING (order_id) WHERE l.sku = %s AND r.status = 'held'""",
        (sku,),
    ).fetchone()[0]
    if available + held > MAX_STOCK:
        raise LimitExceeded(
            field,
            f"Stock on hand would be {available + held} (available {available} + held {held}); "
            f"at most {MAX_STOCK}.",
        )


def get_product(conn: psycopg.Connection, sku: str) -> dict | None:
    return (
        conn.cursor(row_factory=dict_row)
        .execute(f"SELECT {_PRODUCT_COLUMNS} FROM products WHERE sku = %s", (sku,))
        .fetchone()
    )


def list_products(conn: psycopg.Connection, limit: int, offset: int) -> tuple[list[dict], int]:
    cur = conn.cursor(row_factory=dict_row)
    rows = cur.execute(
        f"SELECT {_PRODUCT_COLUMNS} FROM products ORDER BY sku LIMIT %s OFFSET %s", (limit, offset)
    ).fetchall()
    total = conn.execute("SELECT count(*) FROM products").fetchone()[0]
    return rows, total


def lock_stock(conn: psycopg.Connection, skus: Iterable[str]) -> dict[str, StockLevel]:
    """Lock the rows in sku order so concurrent reservations queue instead of deadlocking."""
    rows = conn.execute(
        """SELECT sku, available, price_cents FROM products WHERE sku = ANY(%s)
           ORDER BY sku FOR UPDATE""",
        (sorted(skus),),
    ).fetchall()
    return {sku: StockLevel(sku, available, price) for sku, available, price in rows}


def find_reservation(conn: psycopg.Connection, order_id: str) -> dict | None:
    """The order's reservation row. Callers hold the order's lock (service_runtime.locks), which
    also covers the moment before the row exists, when FOR UPDATE would lock nothing."""
    return (
        conn.cursor(row_factory=dict_row)
        .execute("SELECT * FROM reservations WHERE order_id = %s", (order_id,))
        .fetchone()
    )


def insert_reservation(
    conn: psycopg.Connection,
    order_id: str,
    customer_id: str | None,
    status: str,
    reason: str | None,
    total_cents: int,
    lines: list[dict],
) -> bool:
    """False when the order already has a reservation row (decided before)."""
    inserted = conn.execute(
        """INSERT INTO reservations (order_id, customer_id, status, reason, total_cents,
                                     released_at)
           VALUES (%s, %s, %s, %s, %s, CASE WHEN %s = 'released' THEN now() END)
           ON CONFLICT (order_id) DO NOTHING RETURNING 1""",
        (order_id, customer_id, status, reason, total_cents, status),
    ).fetchone()
    if not inserted:
        return False
    for line in lines:
        conn.execute(
            """UPDATE products SET available = available - %s, updated_at = now()
               WHERE sku = %s""",
            (line["quantity"], line["sku"]),
        )
    if lines:
        with conn.cursor() as cur:
            cur.executemany(
                """INSERT INTO reservation_lines (order_id, sku, quantity, unit_price_cents)
                   VALUES (%s, %s, %s, %s)""",
                [(order_id, ln["sku"], ln["quantity"], ln["unit_price_cents"]) for ln in lines],
            )
    return True


def reservation_lines(conn: psycopg.Connection, order_id: str) -> list[dict]:
    return (
        conn.cursor(row_factory=dict_row)
        .execute(
            """SELECT sku, quantity, unit_price_cents FROM reservation_lines
               WHERE order_id = %s ORDER BY sku""",
            (order_id,),
        )
        .fetchall()
    )


def release_reservation(conn: psycopg.Connection, order_id: str) -> list[dict]:
    """Return a held reservation's stock; the lines released (empty if nothing was held)."""
    held = conn.execute(
        """UPDATE reservations SET status = 'released', released_at = now()
           WHERE order_id = %s AND status = 'held' RETURNING 1""",
        (order_id,),
    ).fetchone()
    if not held:
        return []
    lines = reservation_lines(conn, order_id)
    for line in sorted(lines, key=lambda ln: ln["sku"]):
        conn.execute(
            "UPDATE products SET available = available + %s, updated_at = now() WHERE sku = %s",
            (line["quantity"], line["sku"]),
        )
    return lines


def get_reservation(conn: psycopg.Connection, order_id: str) -> dict | None:
    row = (
        conn.cursor(row_factory=dict_row)
        .execute(
            """SELECT order_id, customer_id, status, reason, total_cents, created_at, released_at
               FROM reservations WHERE order_id = %s""",
            (order_id,),
        )
        .fetchone()
    )
    if row:
        row["lines"] = reservation_lines(conn, order_id)
    return row
