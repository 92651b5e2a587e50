"""The deployment's partition count: chosen once (STREAM_PARTITIONS), recorded in each service's
database, and checked by every process that routes or reads partitions."""

from __future__ import annotations

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
