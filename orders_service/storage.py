"""Orders SQL. Every function takes the connection of the caller's transaction."""

from __future__ import annotations

from datetime import datetime

import psycopg
from psycopg.rows import dict_row

_ORDER_COLUMNS = (
    "order_id, customer_id, status, reason, total_cents, payment_deadline, created_at, updated_at"
)


def insert_order(
    conn: psycopg.Connection,
    order_id: str,
    customer_id: str,
    items: list[dict],
    payment_deadline: datetime,
) -> dict:
    """Insert a pending order; returns it as `get_order` would, without reading it back."""
    order = (
        conn.cursor(row_factory=dict_row)
        .execute(
            f"""INSERT INTO orders (order_id, customer_id, status, payment_deadline)
                VALUES (%s, %s, 'pending', %s) RETURNING {_ORDER_COLUMNS}""",
            (order_id, customer_id, payment_deadline),
        )
        .fetchone()
    )
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO order_lines (order_id, line_no, sku, quantity) VALUES (%s, %s, %s, %s)",
            [(order_id, n, item["sku"], item["quantity"]) for n, item in enumerate(items, 1)],
        )
    at = add_history(conn, order_id, status="pending")
    order["items"] = [{"sku": i["sku"], "quantity": i["quantity"]} for i in items]
    order["history"] = [{"status": "pending", "event": None, "reason": None, "at": at}]
    return order


def add_history(
    conn: psycopg.Connection,
    order_id: str,
    *,
    status: str | None = None,
    event: str | None = None,
    reason: str | None = None,
) -> datetime:
    return conn.execute(
        """INSERT INTO order_history (order_id, status, event, reason) VALUES (%s, %s, %s, %s)
           RETURNING at""",
        (order_id, status, event, reason),
    ).fetchone()[0]


def lock_order_row(conn: psycopg.Connection, order_id: str) -> dict | None:
    return (
        conn.cursor(row_factory=dict_row)
        .execute(f"SELECT {_ORDER_COLUMNS} FROM orders WHERE order_id = %s FOR UPDATE", (order_id,))
        .fetchone()
    )


def set_status(
    conn: psycopg.Connection, order_id: str, status: str, reason: str | None = None
) -> None:
    conn.execute(
        "UPDATE orders SET status = %s, reason = %s, updated_at = now() WHERE order_id = %s",
        (status, reason, order_id),
    )
    add_history(conn, order_id, status=status, reason=reason)


def set_total(conn: psycopg.Connection, order_id: str, total_cents: int) -> None:
    conn.execute(
        "UPDATE orders SET total_cents = %s, updated_at = now() WHERE order_id = %s",
        (total_cents, order_id),
    )


def get_order(conn: psycopg.Connection, order_id: str) -> dict | None:
    cur = conn.cursor(row_factory=dict_row)
    order = cur.execute(
        f"SELECT {_ORDER_COLUMNS} FROM orders WHERE order_id = %s", (order_id,)
    ).fetchone()
    if order is None:
        return None
    order["items"] = _lines(conn, [order_id])[str(order_id)]
    order["history"] = cur.execute(
        """SELECT status, event, reason, at FROM order_history WHERE order_id = %s ORDER BY id""",
        (order_id,),
    ).fetchall()
    return order


def list_orders(
    conn: psycopg.Connection, customer_id: str | None, status: str | None, limit: int, offset: int
) -> tuple[list[dict], int]:
    where = (
        "WHERE (%(customer)s::text IS NULL OR customer_id = %(customer)s) "
        "AND (%(status)s::text IS NULL OR status = %(status)s)"
    )
    params = {"customer": customer_id, "status": status, "limit": limit, "offset": offset}
    cur = conn.cursor(row_factory=dict_row)
    orders = cur.execute(
        f"""SELECT {_ORDER_COLUMNS} FROM orders {where}
            ORDER BY created_at DESC, order_id LIMIT %(limit)s OFFSET %(offset)s""",
        params,
    ).fetchall()
    total = conn.execute(f"SELECT count(*) FROM orders {where}", params).fetchone()[0]
    lines = _lines(conn, [o["order_id"] for o in orders])
    for order in orders:
        order["items"] = lines[str(order["order_id"])]
    return orders, total


def _lines(conn: psycopg.Connection, order_ids: list) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {str(order_id): [] for order_id in order_ids}
    rows = conn.execute(
        """SELECT order_id, sku, quantity FROM order_lines WHERE order_id = ANY(%s)
           ORDER BY order_id, line_no""",
        (order_ids,),
    ).fetchall()
    for order_id, sku, quantity in rows:
        found[str(order_id)].append({"sku": sku, "quantity": quantity})
    return found


def claim_idempotency_key(
    conn: psycopg.Connection, customer_id: str, key: str, request_hash: str, order_id: str
) -> bool:
    """True if this request owns the customer's key; waits for a concurrent holder to commit
    first. Keys are per customer: another customer's same key is another key."""
    return (
        conn.execute(
            """INSERT INTO idempotency_keys (customer_id, key, request_hash, order_id)
           VALUES (%s, %s, %s, %s) ON CONFLICT (customer_id, key) DO NOTHING RETURNING 1""",
            (customer_id, key, request_hash, order_id),
        ).fetchone()
        is not None
    )


def idempotency_record(conn: psycopg.Connection, customer_id: str, key: str) -> tuple[str, str]:
    request_hash, order_id = conn.execute(
        "SELECT request_hash, order_id FROM idempotency_keys WHERE customer_id = %s AND key = %s",
        (customer_id, key),
    ).fetchone()
    return request_hash, str(order_id)


def lock_overdue(conn: psycopg.Connection, limit: int) -> list[str]:
    """Pending orders past their payment deadline, skipping any a reaction is busy with."""
    rows = conn.execute(
        """SELECT order_id FROM orders WHERE status = 'pending' AND payment_deadline < now()
           ORDER BY payment_deadline LIMIT %s FOR UPDATE SKIP LOCKED""",
        (limit,),
    ).fetchall()
    return [str(row[0]) for row in rows]
