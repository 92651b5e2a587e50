"""PostgreSQL connections: one pool per process, autocommit with explicit transactions."""

from __future__ import annotations

import time
import weakref

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
    min_size: int = 1,
    timeout: float = 5.0,
    check_on_checkout: bool = True,
) -> ConnectionPool:
    """Open lazily: a process starts (and answers 503) even while the database is down.

    Checking a connection on checkout costs a round trip, and saves a client request from
    failing on a connection the server dropped: only connections not taken out for
    CHECK_IDLE_SECONDS or more are checked (under load, a connection comes back and goes out
    again within milliseconds). A consumer, which simply retries the entry after a failure,
    can go without (`check_on_checkout=False`).

    No `reset` callback: with one, psycopg_pool hands every returned connection to its worker
    thread (a queue and a thread wake-up per transaction) instead of taking it back at once.
    """
    pool = ConnectionPool(
        database_url,
        min_size=min_size,
        max_size=max_size,
        name=name,
        timeout=timeout,
        open=False,
        kwargs={"autocommit": True, **KEEPALIVES},
        check=_check_if_idle if check_on_checkout else None,
    )
    pool.open(wait=False)
    return pool


CHECK_IDLE_SECONDS = 1.0
_taken_at: weakref.WeakKeyDictionary[psycopg.Connection, float] = weakref.WeakKeyDictionary()


def _check_if_idle(conn: psycopg.Connection) -> None:
    """The pool's check (an empty query), for a connection not taken out for long enough to
    have been dropped by the server (a restart, an idle timeout) without anyone noticing. Its
    idle time counts from when it was last taken out, not given back: a little longer than
    it was idle, so a connection is checked a little early, never late."""
    now = time.monotonic()
    taken_before = _taken_at.get(conn, float("-inf"))
    _taken_at[conn] = now
    if now - taken_before >= CHECK_IDLE_SECONDS:
        ConnectionPool.check_connection(conn)


def connect(database_url: str, **kwargs: object) -> psycopg.Connection:
    return psycopg.connect(
        database_url, autocommit=True, connect_timeout=5, **{**KEEPALIVES, **kwargs}
    )
