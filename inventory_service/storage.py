"""Inventory SQL. Every function takes the connection of the caller's transaction."""

from __future__ import annotations

from collections.abc import Iterable

import psycopg
from psycopg.rows import dict_row

from contracts.limits import MAX_STOCK, LimitExceeded
from inventory_service.domain import StockLevel
from service_runtime.unit_of_work import OutboxRow

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


def lock_stock_unless_decided(
    conn: psycopg.Connection, order_id: str, skus: Iterable[str]
) -> dict[str, StockLevel] | None:
    """None when the order has a reservation row already (decided before, or cancelled before
    it got here); else the stock of `skus`, locked in sku order so concurrent reservations
    queue instead of deadlocking. One statement: the rows are only locked when there is no
    reservation. Callers hold the order's lock (service_runtime.locks), taken by an earlier
    statement, so this statement's snapshot has whatever a release of the order committed."""
    rows = conn.execute(
        """WITH decided AS (SELECT 1 FROM reservations WHERE order_id = %(order_id)s),
                stock AS (
                    SELECT sku, available, price_cents FROM products
                    WHERE sku = ANY(%(skus)s) AND NOT EXISTS (SELECT FROM decided)
                    ORDER BY sku FOR UPDATE
                )
           SELECT true, NULL, NULL, NULL FROM decided
           UNION ALL
           SELECT false, sku, available, price_cents FROM stock""",
        {"order_id": order_id, "skus": sorted(skus)},
    ).fetchall()
    if rows and rows[0][0]:
        return None
    return {sku: StockLevel(sku, available, price) for _, sku, available, price in rows}


def insert_reservation(
    conn: psycopg.Connection,
    order_id: str,
    customer_id: str | None,
    status: str,
    reason: str | None,
    total_cents: int,
    lines: list[dict],
    event: OutboxRow,
) -> bool:
    """The order's reservation row, its lines, the stock they take (rows the caller locked) and
    `event`, in one statement. False when the order already had a reservation row (decided
    before): then only the event is written."""
    return conn.execute(
        f"""WITH r AS (
                INSERT INTO reservations (order_id, customer_id, status, reason, total_cents,
                                          released_at)
                VALUES (%(order_id)s, %(customer_id)s, %(status)s, %(reason)s, %(total)s,
                        CASE WHEN %(status)s::text = 'released' THEN now() END)
                ON CONFLICT (order_id) DO NOTHING RETURNING order_id
            ),
            taken AS (
                UPDATE products p SET available = p.available - l.quantity, updated_at = now()
                FROM r, unnest(%(skus)s::text[], %(quantities)s::bigint[]) AS l (sku, quantity)
                WHERE p.sku = l.sku
            ),
            lines AS (
                INSERT INTO reservation_lines (order_id, sku, quantity, unit_price_cents)
                SELECT r.order_id, l.sku, l.quantity, l.price
                FROM r, unnest(%(skus)s::text[], %(quantities)s::bigint[], %(prices)s::bigint[])
                        AS l (sku, quantity, price)
            ),
            event AS ({event.insert_sql()})
            SELECT EXISTS (SELECT FROM r)""",
        {
            "order_id": order_id,
            "customer_id": customer_id,
            "status": status,
            "reason": reason,
            "total": total_cents,
            "skus": [line["sku"] for line in lines],
            "quantities": [line["quantity"] for line in lines],
            "prices": [line["unit_price_cents"] for line in lines],
            **event.params,
        },
    ).fetchone()[0]


def release(conn: psycopg.Connection, order_id: str, reason: str) -> list[dict] | None:
    """Return a held reservation's stock, in one statement: the lines released (empty if
    nothing was held). With no reservation row at all (the cancellation overtook the order),
    a 'released' one without lines is written instead, so a later OrderPlaced reserves
    nothing: None. Callers hold the order's lock (service_runtime.locks).

    Locks as before: the reservation row (the UPDATE), then the products in sku order
    (`locked`, which the stock UPDATE joins, so no product is updated before it is locked)."""
    row = conn.execute(
        """WITH found AS (SELECT 1 FROM reservations WHERE order_id = %(order_id)s),
                marker AS (
                    INSERT INTO reservations (order_id, customer_id, status, reason,
                                              total_cents, released_at)
                    SELECT %(order_id)s::uuid, NULL, 'released', %(reason)s::text, 0, now()
                    WHERE NOT EXISTS (SELECT FROM found)
                    ON CONFLICT (order_id) DO NOTHING
                ),
                released AS (
                    UPDATE reservations SET status = 'released', released_at = now()
                    WHERE order_id = %(order_id)s AND status = 'held' RETURNING order_id
                ),
                lines AS (
                    SELECT l.sku, l.quantity FROM reservation_lines l JOIN released USING (order_id)
                ),
                locked AS (
                    SELECT sku FROM products WHERE sku IN (SELECT sku FROM lines)
                    ORDER BY sku FOR UPDATE
                ),
                given_back AS (
                    UPDATE products p SET available = p.available + lines.quantity,
                                          updated_at = now()
                    FROM lines JOIN locked USING (sku) WHERE p.sku = lines.sku
                )
           SELECT EXISTS (SELECT FROM found),
                  coalesce(array_agg(sku ORDER BY sku), '{}'),
                  coalesce(array_agg(quantity ORDER BY sku), '{}')
           FROM lines""",
        {"order_id": order_id, "reason": reason},
    ).fetchone()
    found, skus, quantities = row
    if not found:
        return None
    return [
        {"sku": sku, "quantity": quantity} for sku, quantity in zip(skus, quantities, strict=True)
    ]


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
