"""Idempotent SQL migrations: shared messaging tables first, then the service's own."""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterable

import psycopg

from service_runtime.locks import MIGRATIONS_LOCK_KEY

_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    name text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


def migration_files(service: str) -> list[tuple[str, str]]:
    """(name, sql) pairs in the order they must be applied."""
    found: list[tuple[str, str]] = []
    for package in ("service_runtime", f"{service}_service"):
        folder = importlib.resources.files(package) / "migrations"
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.name.endswith(".sql"):
                found.append((f"{package}/{entry.name}", entry.read_text()))
    return found


def apply(conn: psycopg.Connection, migrations: Iterable[tuple[str, str]]) -> list[str]:
    """Apply the migrations not yet recorded; returns the names applied now."""
    applied_now: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATIONS_LOCK_KEY,))
        conn.execute(_LEDGER)
        done = {row[0] for row in conn.execute("SELECT name FROM schema_migrations")}
        for name, sql in migrations:
            if name in done:
                continue
            conn.execute(sql)
            conn.execute("INSERT INTO schema_migrations (name) VALUES (%s)", (name,))
            applied_now.append(name)
    return applied_now


def migrate(database_url: str, service: str) -> list[str]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return apply(conn, migration_files(service))
