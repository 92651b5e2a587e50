"""The PostgreSQL and Redis a benchmark run measures against.

- Default: an embedded PostgreSQL and Redis started for this run on free ports in a temporary
  directory (never the dev stack's `.run/` data), removed afterwards.
- ORDERS_DATABASE_URL, INVENTORY_DATABASE_URL, BILLING_DATABASE_URL and REDIS_URL all set:
  those servers. With SAGA_BENCH_PG_ADMIN_URL (a superuser URL of that PostgreSQL) scratch
  databases `bench_<hex>_<service>` are created there and dropped afterwards; without it the
  given databases themselves are used (migrated, and their outbox and inbox truncated before
  each measurement). The Redis database of REDIS_URL is flushed before each measurement
  either way: point it at a scratch database number.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from devstack.provision import SERVICES, drop, ensure_database, provision
from service_runtime.migrations import migrate

GIVEN_KEYS = (*(f"{s.upper()}_DATABASE_URL" for s in SERVICES), "REDIS_URL")


@dataclass(frozen=True)
class Servers:
    db_urls: dict[str, str]  # service -> URL as that service's role
    redis_url: str
    mode: str  # how they were obtained, for the report
    pids: dict[str, int] = field(default_factory=dict)  # server label -> pid, when local


@contextmanager
def bench_servers() -> Iterator[Servers]:
    # os.environ only: config.setting would fall back to the dev stack's stack.env
    given = {key: os.environ.get(key, "") for key in GIVEN_KEYS}
    if all(given.values()):
        yield from _given(given)
    elif any(given.values()):
        missing = ", ".join(key for key, value in given.items() if not value)
        raise RuntimeError(f"set all of {', '.join(GIVEN_KEYS)} or none ({missing} missing)")
    else:
        yield from _embedded()


def _given(given: dict[str, str]) -> Iterator[Servers]:
    admin_url = os.environ.get("SAGA_BENCH_PG_ADMIN_URL")
    if admin_url:
        prefix = f"bench_{secrets.token_hex(3)}_"
        try:
            urls = _provisioned(admin_url, prefix)
            yield Servers(
                urls, given["REDIS_URL"], f"scratch databases {prefix}* on the given server"
            )
        finally:
            drop(admin_url, SERVICES, prefix=prefix)
        return
    urls = {s: given[f"{s.upper()}_DATABASE_URL"] for s in SERVICES}
    for service, url in urls.items():
        ensure_database(url)
        migrate(url, service)
    yield Servers(urls, given["REDIS_URL"], "given databases, outbox/inbox truncated")


def _embedded() -> Iterator[Servers]:
    from devstack.osutil import free_port
    from devstack.postgres import EmbeddedPostgres
    from devstack.redis import EmbeddedRedis

    # short path under /tmp: PostgreSQL's unix socket lives in there too
    run_dir = Path(tempfile.mkdtemp(prefix="saga-bench-"))
    postgres = EmbeddedPostgres(run_dir, free_port())
    redis_server = EmbeddedRedis(run_dir, free_port())
    try:
        postgres.start()
        redis_server.start()
        pids = {
            "postgres": int((postgres.data_dir / "postmaster.pid").read_text().split()[0]),
            "redis": int(redis_server.pid_file.read_text().strip()),
        }
        urls = _provisioned(postgres.admin_url, "bench_")
        yield Servers(urls, redis_server.url, f"embedded servers in {run_dir}", pids)
    finally:
        redis_server.stop()
        postgres.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def _provisioned(admin_url: str, prefix: str) -> dict[str, str]:
    urls = provision(admin_url, SERVICES, prefix=prefix)
    for service, url in urls.items():
        migrate(url, service)
    return urls
