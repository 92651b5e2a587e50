"""Connections to PostgreSQL carry TCP keepalives, so a vanished peer cannot keep a session
(and a relay's advisory lock) alive for hours."""

from __future__ import annotations

import os
import socket

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
