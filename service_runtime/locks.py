"""Every PostgreSQL advisory lock the system takes, in one registry.

Whole-database locks use the one-bigint form with a fixed key. Per-entity locks use the
two-int4 form (namespace, hashtext(id)): PostgreSQL keeps the two forms apart, so an entity's
hash can never collide with a whole-database key, and namespaces never collide with each other.
A hash collision inside a namespace only serialises two unrelated ids, never wrongly.
"""

from __future__ import annotations

import enum

import psycopg

MIGRATIONS_LOCK_KEY = 7_310_001  # concurrent migrators of one database (transaction lock)
RELAY_LOCK_KEY = 7_310_002  # the active relay of this database's outbox (session lock)


class Namespace(enum.IntEnum):
    ORDER = 1  # everything a service does for one order (its reactions; see lock_order)


def lock_entity(conn: psycopg.Connection, namespace: Namespace, entity_id: str) -> None:
    """A transaction-scoped lock on one id, held until commit or rollback. Unlike
    SELECT ... FOR UPDATE it also locks an id that has no row yet."""
    conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (int(namespace), entity_id))


def lock_order(conn: psycopg.Connection, order_id: str) -> None:
    """Serialise everything this service's transactions do for one order."""
    lock_entity(conn, Namespace.ORDER, order_id)


def lock_orders_sql(ids_param: str) -> str:
    """A SELECT that takes the order lock of each id of `ids_param` (a comma-separated text
    parameter), in that order: the same locks as `lock_order`, for a statement that takes them
    along with its own work (the consumer's first statement: service_runtime/consumer.py)."""
    return (
        f"SELECT pg_advisory_xact_lock({int(Namespace.ORDER)}, hashtext(o.id))"
        f" FROM unnest(string_to_array({ids_param}, ',')) WITH ORDINALITY AS o (id, n)"
        " ORDER BY o.n"
    )
