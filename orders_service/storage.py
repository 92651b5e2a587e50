"""Orders SQL. Every function takes the connection of the caller's transaction."""

from __future__ import annotations

from datetime import datetime

import psycopg
from psycopg.rows import dict_row

from service_runtime.unit_of_work import OutboxRow

_ORDER_COLUMNS = (
    "order_id, customer_id, status, reason, total_cents, payment_deadline, created_at, updated_at"
)


def insert_order(
    conn: psycopg.Connection,
    order_id: str,
    customer_id: str,
    items: list[dict],
    payment_deadline: datetime,
    event: OutboxRow,
    idempotency: tuple[str, str] | None = None,
) -> dict | None:
    """Insert a pending order, its lines, its first history row and `event` (OrderPlaced) in one
    statement; returns the order as `get_order` would, without reading it back.

    With `idempotency` (key, request hash), the customer's key is claimed first, in the same
    statement (ON CONFLICT DO NOTHING: it waits for a concurrent holder to commit), and nothing is
    written when another request holds it: None (read `idempotency_record`). Keys are per
    customer: another customer's same key is another key."""
    claim = ""
    source = ""
    params = {
        "order_id": order_id,
        "customer_id": customer_id,
        "deadline": payment_deadline,
        "skus": [item["sku"] for item in items],
        "quantities": [item["quantity"] for item in items],
        **event.params,
    }
    if idempotency is not None:
        claim = """claim AS (
            INSERT INTO idempotency_keys (customer_id, key, request_hash, order_id)
            VALUES (%(customer_id)s, %(key)s, %(request_hash)s, %(order_id)s)
            ON CONFLICT (customer_id, key) DO NOTHING RETURNING 1
        ),"""
        source = "FROM claim"
        params["key"], params["request_hash"] = idempotency
    row = (
        conn.cursor(row_factory=dict_row)
        .execute(
            f"""WITH {claim}
                o AS (
                    INSERT INTO orders (order_id, customer_id, status, payment_deadline)
                    SELECT %(order_id)s::uuid, %(customer_id)s::text, 'pending',
                           %(deadline)s::timestamptz {source}
                    RETURNING {_ORDER_COLUMNS}
                ),
                lines AS (
                    INSERT INTO order_lines (order_id, line_no, sku, quantity)
                    SELECT o.order_id, l.line_no, l.sku, l.quantity
                    FROM o, unnest(%(skus)s::text[], %(quantities)s::bigint[])
                            WITH ORDINALITY AS l (sku, quantity, line_no)
                ),
                history AS (
                    INSERT INTO order_history (order_id, status)
                    SELECT order_id, 'pending' FROM o RETURNING at
                ),
                event AS ({event.insert_sql("o")})
                SELECT o.*, history.at FROM o, history""",
            params,
        )
        .fetchone()
    )
    if row is None:
        return None
    at = row.pop("at")
    row["items"] = [{"sku": i["sku"], "quantity": i["quantity"]} for i in items]
    row["history"] = [{"status": "pending", "event": None, "reason": None, "at": at}]
    return row


def lock_order_row(
    conn: psycopg.Connection,
    order_id: str,
    *,
    event: str | None = None,
    reason: str | None = None,
    total_if_unset: int | None = None,
) -> dict | None:
    """The order, locked (FOR UPDATE) until the end of the transaction; None if no such order.

    With `event`, the same statement adds it to the order's history (when the order exists);
    with `total_if_unset` too, it sets the order's total if it has none yet. Both only ever
    touch the row after it is locked (they read the locked row `o`), and the order returned is
    as it was when locked."""
    if event is None:
        return (
            conn.cursor(row_factory=dict_row)
            .execute(
                f"SELECT {_ORDER_COLUMNS} FROM orders WHERE order_id = %s FOR UPDATE", (order_id,)
            )
            .fetchone()
        )
    set_total = ""
    if total_if_unset is not None:
        set_total = """, total AS (
            UPDATE orders SET total_cents = %(total)s, updated_at = now() FROM o
            WHERE orders.order_id = o.order_id AND o.total_cents IS NULL
        )"""
    return (
        conn.cursor(row_factory=dict_row)
        .execute(
            f"""WITH o AS (
                    SELECT {_ORDER_COLUMNS} FROM orders WHERE order_id = %(order_id)s FOR UPDATE
                ),
                history AS (
                    INSERT INTO order_history (order_id, event, reason)
                    SELECT order_id, %(event)s, %(reason)s FROM o
                ){set_total}
                SELECT * FROM o""",
            {"order_id": order_id, "event": event, "reason": reason, "total": total_if_unset},
        )
        .fetchone()
    )


def set_status(
    conn: psycopg.Connection,
    order_id: str,
    status: str,
    reason: str | None = None,
    *,
    total_cents: int | None = None,
    event: OutboxRow | None = None,
) -> None:
    """Move a locked order to `status` and add it to the history, with `total_cents` (when
    given) and `event` written by the same statement."""
    params = {"order_id": order_id, "status": status, "reason": reason, "total": total_cents}
    set_total = "" if total_cents is None else "total_cents = %(total)s,"
    write_event = ""
    if event is not None:
        write_event = f", event AS ({event.insert_sql()})"
        params.update(event.params)
    conn.execute(
        f"""WITH changed AS (
                UPDATE orders SET {set_total} status = %(status)s, reason = %(reason)s,
                                  updated_at = now()
                WHERE order_id = %(order_id)s RETURNING order_id
            ),
            history AS (
                INSERT INTO order_history (order_id, status, reason)
                SELECT order_id, %(status)s, %(reason)s FROM changed
            ){write_event}
            SELECT""",
        params,
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
