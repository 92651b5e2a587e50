"""PostgreSQL connections: one pool per process, autocommit with explicit transactions."""

from __future__ import annotations

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

# What "the database is unreachable" looks like to callers: answer 503 / back off, never crash.
DB_OUTAGE_ERRORS: tuple[type[BaseException], ...] = (psycopg.OperationalError, PoolTimeout)


def create_pool(
    database_url: str,
    *,
    name: str,
    max_size: int = 8,
    timeout: float = 5.0,
    check_on_checkout: bool = True,
) -> ConnectionPool:
    """Open lazily: a process starts (and answers 503) even while the database is down.

    Checking each connection on checkout costs a round trip, and saves a client request from
    failing on a connection the server dropped. A consumer, which simply retries the entry
    after a failure, can go without (`check_on_checkout=False`).
    """
    pool = ConnectionPool(
        database_url,
        min_size=1,
        max_size=max_size,
        name=name,
        timeout=timeout,
        open=False,
        kwargs={"autocommit": True},
        check=ConnectionPool.check_connection if check_on_checkout else None,
    )
    pool.open(wait=False)
    return pool


def connect(database_url: str, **kwargs: object) -> psycopg.Connection:
    return psycopg.connect(database_url, autocommit=True, connect_timeout=5, **kwargs)
