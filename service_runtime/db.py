"""PostgreSQL connections: one pool per process, autocommit with explicit transactions."""

from __future__ import annotations

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

# What "the database is unreachable" looks like to callers: answer 503 / back off, never crash.
DB_OUTAGE_ERRORS: tuple[type[BaseException], ...] = (psycopg.OperationalError, PoolTimeout)

# libpq TCP keepalives on every connection: without them a session whose peer vanished (a cable,
# a firewall dropping state) looks alive for hours (the kernel default is 2 h of idle before the
# first probe), and a relay's advisory lock with it. Idle 10 s, then a probe every 5 s, dead
# after 3 lost probes: a silent peer is noticed within about 25 s; tcp_user_timeout bounds the
# wait for unacknowledged data the same way. Ignored on unix sockets. Keepalives cannot see a
# proxy that is alive but frozen: the relay's takeover rule (outbox_relay/relay.py) covers that.
KEEPALIVES: dict[str, int] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 25_000,  # milliseconds
}


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
        kwargs={"autocommit": True, **KEEPALIVES},
        check=ConnectionPool.check_connection if check_on_checkout else None,
    )
    pool.open(wait=False)
    return pool


def connect(database_url: str, **kwargs: object) -> psycopg.Connection:
    return psycopg.connect(
        database_url, autocommit=True, connect_timeout=5, **{**KEEPALIVES, **kwargs}
    )
