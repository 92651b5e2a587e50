"""Session fixtures: real PostgreSQL and Redis, started only when a test asks for them.

With SAGA_TEST_PG_ADMIN_URL / SAGA_TEST_REDIS_URL set, those servers are used (CI runs the
integration suite a second time against the machine's own servers); otherwise embedded ones
are started by devstack on free ports in fresh temporary directories.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVICES = ("orders", "inventory", "billing")


@dataclass(frozen=True)
class CleanState:
    """Emptied databases and Redis for one test."""

    db_urls: dict[str, str]  # service -> URL, connecting as that service's own role
    redis_url: str

    @property
    def env(self) -> dict[str, str]:
        """The variables the services and `saga` commands read."""
        env = {f"{s.upper()}_DATABASE_URL": url for s, url in self.db_urls.items()}
        env["REDIS_URL"] = self.redis_url
        return env


@contextmanager
def _embedded(server_class: type, prefix: str) -> Iterator:
    """A started embedded server on a free port in a fresh temporary directory (a short path
    under /tmp: PostgreSQL's unix socket lives in there too), stopped and removed after."""
    from devstack.osutil import free_port

    run_dir = Path(tempfile.mkdtemp(prefix=prefix))
    server = server_class(run_dir, free_port())
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """A superuser URL: the given server, or an embedded PostgreSQL for this session."""
    if given := os.environ.get("SAGA_TEST_PG_ADMIN_URL"):
        yield given
        return
    from devstack.postgres import EmbeddedPostgres

    with _embedded(EmbeddedPostgres, "saga-pg-") as server:
        yield server.admin_url


@pytest.fixture(scope="session")
def redis_server_url() -> Iterator[str]:
    """A Redis URL: the given server, or an embedded Redis for this session."""
    if given := os.environ.get("SAGA_TEST_REDIS_URL"):
        yield given
        return
    from devstack.redis import EmbeddedRedis

    with _embedded(EmbeddedRedis, "saga-redis-") as server:
        yield server.url


@pytest.fixture(scope="session")
def service_db_urls(pg_admin_url: str) -> Iterator[dict[str, str]]:
    """One migrated database per service, under a random prefix so runs never collide."""
    from devstack.provision import drop, provision
    from service_runtime.migrations import migrate

    prefix = f"test_{secrets.token_hex(3)}_"
    try:
        urls = provision(pg_admin_url, SERVICES, prefix=prefix)
        for service, url in urls.items():
            migrate(url, service)
        yield urls
    finally:
        drop(pg_admin_url, SERVICES, prefix=prefix)


@pytest.fixture
def clean_state(service_db_urls: dict[str, str], redis_server_url: str) -> CleanState:
    """Empty every table (the migration ledger aside) and the Redis database."""
    import psycopg
    import redis

    for url in service_db_urls.values():
        with psycopg.connect(url, autocommit=True) as conn:
            tables = conn.execute(
                "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables"
                " WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
                " AND tablename <> 'schema_migrations'"
            ).fetchall()
            if tables:
                names = ", ".join(row[0] for row in tables)
                conn.execute(f"TRUNCATE {names} RESTART IDENTITY CASCADE")
    with redis.Redis.from_url(redis_server_url) as client:
        client.flushdb()
    return CleanState(db_urls=dict(service_db_urls), redis_url=redis_server_url)
