"""Recent orders, read from the orders database (read-only): the console's order list and an
order's own rows (lines, history). An order's saga across the services is trace.trace_order."""

from __future__ import annotations

from typing import Any

from contracts.ids import canonical_uuid
from sagactl.inspect.common import iso, open_db

STATUSES = ("pending", "confirmed", "rejected", "cancelled")
_COLUMNS = "order_id::text, customer_id, status, reason, total_cents, created_at, updated_at"


def _order(row: tuple) -> dict[str, Any]:
    order_id, customer_id, status, reason, total_cents, created_at, updated_at = row
    return {
        "order_id": order_id,
        "customer_id": customer_id,
        "status": status,
        "reason": reason,
        "total_cents": total_cents,
        "created_at": iso(created_at),
        "updated_at": iso(updated_at),
    }


def recent_orders(
    search: str | None = None,
    customer_id: str | None = None,
    status: str | None = None,
    limit: int = 50,
) -> dict[str, Any]:
    """The newest orders, optionally only those whose id starts with `search` (a whole id or
    its first characters), of one customer, or in one status."""
    where, params = [], []
    search = (search or "").strip().lower()
    if search:
        where.append("order_id::text LIKE %s")
        params.append(search.replace("\\", "").replace("%", "").replace("_", "") + "%")
    if customer_id:
        where.append("customer_id = %s")
        params.append(customer_id.strip())
    if status:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r} (statuses: {', '.join(STATUSES)})")
        where.append("status = %s")
        params.append(status)
    sql = f"SELECT {_COLUMNS} FROM orders"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY created_at DESC, order_id LIMIT %s"
    with open_db("orders") as conn:
        rows = conn.execute(sql, (*params, limit)).fetchall()
        total = conn.execute("SELECT count(*) FROM orders").fetchone()[0]
    return {"orders": [_order(row) for row in rows], "total_orders": total, "limit": limit}


def order_record(order_id: str) -> dict[str, Any] | None:
    """The order as the orders service stores it: its row, its lines and its history."""
    try:
        order_id = canonical_uuid(order_id)
    except ValueError:
        return None
    with open_db("orders") as conn:
        row = conn.execute(f"SELECT {_COLUMNS} FROM orders WHERE order_id = %s", (order_id,))
        found = row.fetchone()
        if found is None:
            return None
        lines = conn.execute(
            "SELECT sku, quantity FROM order_lines WHERE order_id = %s ORDER BY line_no",
            (order_id,),
        ).fetchall()
        history = conn.execute(
            "SELECT status, event, reason, at FROM order_history WHERE order_id = %s ORDER BY id",
            (order_id,),
        ).fetchall()
    return {
        **_order(found),
        "items": [{"sku": sku, "quantity": quantity} for sku, quantity in lines],
        "history": [
            {"status": status, "event": event, "reason": reason, "at": iso(at)}
            for status, event, reason, at in history
        ],
    }
