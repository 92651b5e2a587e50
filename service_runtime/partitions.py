"""The deployment's partition count: chosen once (STREAM_PARTITIONS), recorded in each service's
database, and checked by every process that routes or reads partitions."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import psycopg

from service_runtime.config import ConfigError

_RECORD = """
INSERT INTO deployment_settings (name, value) VALUES ('stream_partitions', %s)
ON CONFLICT (name) DO NOTHING
"""
_READ = "SELECT value FROM deployment_settings WHERE name = 'stream_partitions'"


def check_partition_count(conn: psycopg.Connection, partitions: int, service: str) -> None:
    """Record P on first use; refuse another P afterwards (events would change partition and
    one order's saga would be split over two owners)."""
    with conn.transaction():
        conn.execute(_RECORD, (str(partitions),))
        recorded = int(conn.execute(_READ).fetchone()[0])
    if recorded != partitions:
        raise ConfigError(
            f"STREAM_PARTITIONS={partitions}, but the {service} database belongs to a deployment "
            f"created with STREAM_PARTITIONS={recorded}. Start every process with "
            f"STREAM_PARTITIONS={recorded}; changing the count needs a drained system and a "
            f"new deployment (see docs/architecture.md, 'Partitions')."
        )


def recorded_partitions(conn: psycopg.Connection) -> int | None:
    """The P this database's deployment recorded, or None (never recorded, or not migrated)."""
    try:
        row = conn.execute(_READ).fetchone()
    except psycopg.errors.UndefinedTable:
        return None
    return int(row[0]) if row else None


def _connect(service: str) -> AbstractContextManager[psycopg.Connection]:
    from service_runtime.config import database_url

    return psycopg.connect(database_url(service), autocommit=True, connect_timeout=5)


def partitions_in_use(
    open_db: Callable[[str], AbstractContextManager[psycopg.Connection]] = _connect,
) -> int:
    """P for tools that read the deployment from outside (the CLI, retention): STREAM_PARTITIONS
    (environment or the dev stack's stack.env) when set, else what the services' databases
    recorded when their processes first started, else the default. `open_db(service)` opens
    a service's database (the CLI passes its own, for its error messages)."""
    from contracts.streams import DEFAULT_PARTITIONS
    from service_runtime.config import SERVICES, setting, stream_partitions

    if setting("STREAM_PARTITIONS"):
        return stream_partitions()
    for service in SERVICES:
        if not setting(f"{service.upper()}_DATABASE_URL"):
            continue
        with open_db(service) as conn:
            recorded = recorded_partitions(conn)
        if recorded is not None:
            return recorded
    return DEFAULT_PARTITIONS
