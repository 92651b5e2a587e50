"""Connections to PostgreSQL carry TCP keepalives, so a vanished peer cannot keep a session
(and a relay's advisory lock) alive for hours."""

from __future__ import annotations

import os
import socket
import time

import psycopg

from service_runtime.db import KEEPALIVES, connect, create_pool


def _tcp_options(conn: psycopg.Connection) -> dict[str, int]:
    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    try:
        return {
            "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            "interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
            "count": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
            "user_timeout_ms": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
        }
    finally:
        sock.close()


EXPECTED = {
    "keepalive": 1,
    "idle": KEEPALIVES["keepalives_idle"],
    "interval": KEEPALIVES["keepalives_interval"],
    "count": KEEPALIVES["keepalives_count"],
    "user_timeout_ms": KEEPALIVES["tcp_user_timeout"],
}


def test_a_connection_has_tcp_keepalives(db_url: str) -> None:
    with connect(db_url) as conn:
        assert _tcp_options(conn) == EXPECTED


def test_a_pooled_connection_has_tcp_keepalives(db_url: str) -> None:
    pool = create_pool(db_url, name="keepalive-probe")
    try:
        with pool.connection(timeout=10) as conn:
            assert _tcp_options(conn) == EXPECTED
    finally:
        pool.close()


def test_a_pooled_connection_dropped_while_idle_is_replaced_not_handed_out(db_url, monkeypatch):
    """Only connections idle for CHECK_IDLE_SECONDS are checked on checkout (a round trip);
    one the server dropped meanwhile is replaced, so the caller never sees it."""
    from service_runtime import db

    monkeypatch.setattr(db, "CHECK_IDLE_SECONDS", 0.2)
    pool = create_pool(db_url, name="idle-check-probe", max_size=1)
    try:
        with pool.connection(timeout=10) as conn:
            first = conn.info.backend_pid
        with connect(db_url) as admin:
            assert admin.execute("SELECT pg_terminate_backend(%s)", (first,)).fetchone()[0]
            # pg_terminate_backend only signals: wait (bounded) until the session is gone
            deadline = time.monotonic() + 10
            while admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (first,)
            ).fetchone()[0]:
                assert time.monotonic() < deadline, "the backend did not go"
                time.sleep(0.05)
        time.sleep(0.3)  # idle past CHECK_IDLE_SECONDS: the next checkout checks it
        with pool.connection(timeout=10) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert conn.info.backend_pid != first
    finally:
        pool.close()
