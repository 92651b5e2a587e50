"""Session fixtures: real PostgreSQL and Redis, started only when a test asks for them.

With SAGA_TEST_PG_ADMIN_URL / SAGA_TEST_REDIS_URL set, those servers are used (CI runs the
integration suite a second time against the machine's own servers); otherwise embedded ones
are started by devstack on free ports in fresh temporary directories.

Redis Cluster: `redis_cluster_url` is a local 3-master cluster of real redis-server processes
(or the cluster named by SAGA_TEST_REDIS_CLUSTER_URL). With SAGA_TEST_REDIS_CLUSTER=1 the
suite runs on it: `redis_server_url` is the cluster's URL, REDIS_CLUSTER=1 is set for the code
under test (and in `CleanState.env` for the processes it starts), rq gets a plain Redis of its
own (`CleanState.rq_redis_url`, as RQ_REDIS_URL), and `clean_state` empties every master.
`redis_backend` runs a test once per backend (contract tests).
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
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from service_runtime.redis_client import RedisClient

SERVICES = ("orders", "inventory", "billing")


@dataclass(frozen=True)
class CleanState:
    """Emptied databases and Redis for one test."""

    db_urls: dict[str, str]  # service -> URL, connecting as that service's own role
    redis_url: str
    redis_cluster: bool = False  # redis_url names a node of a Redis Cluster
    rq_redis_url: str = ""  # a plain Redis for rq; redis_url when that is not a cluster

    @property
    def env(self) -> dict[str, str]:
        """The variables the services and `saga` commands read."""
        env = {f"{s.upper()}_DATABASE_URL": url for s, url in self.db_urls.items()}
        env["REDIS_URL"] = self.redis_url
        env["REDIS_CLUSTER"] = "1" if self.redis_cluster else "0"
        env["RQ_REDIS_URL"] = self.rq_redis_url or self.redis_url
        return env


def cluster_tests_enabled() -> bool:
    """SAGA_TEST_REDIS_CLUSTER=1: the suite's Redis is a Redis Cluster."""
    return os.environ.get("SAGA_TEST_REDIS_CLUSTER", "") in ("1", "true", "yes")


def flush_redis(url: str, *, cluster: bool) -> None:
    """Empty the Redis at `url`, every master of a cluster."""
    from service_runtime.redis_client import connect, flush

    client = connect(url, cluster=cluster)
    try:
        flush(client)
    finally:
        client.close()


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


@pytest.fixture(scope="session", autouse=True)
def auth_issuer() -> Iterator[Path]:
    """A development issuer key pair for the session; AUTH_PUBLIC_KEY_FILE names its public
    key for the services built in-process and the processes tests start (tests/tokens.py)."""
    from tests import tokens

    previous = os.environ.get("AUTH_PUBLIC_KEY_FILE")
    yield tokens.install()
    tokens.remove()
    if previous is None:
        os.environ.pop("AUTH_PUBLIC_KEY_FILE", None)
    else:
        os.environ["AUTH_PUBLIC_KEY_FILE"] = previous


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
def single_redis_url() -> Iterator[str]:
    """A plain (non-cluster) Redis URL: the given server, or an embedded Redis for this
    session."""
    if given := os.environ.get("SAGA_TEST_REDIS_URL"):
        yield given
        return
    from devstack.redis import EmbeddedRedis

    with _embedded(EmbeddedRedis, "saga-redis-") as server:
        yield server.url


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A node of a Redis Cluster: the given one, or a local 3-master cluster of real
    redis-server processes for this session, removed after it."""
    if given := os.environ.get("SAGA_TEST_REDIS_CLUSTER_URL"):
        yield given
        return
    from devstack.redis_cluster import EmbeddedRedisCluster

    run_dir = Path(tempfile.mkdtemp(prefix="saga-cluster-"))
    cluster = EmbeddedRedisCluster(run_dir, masters=3)
    try:
        cluster.start()  # bounded: raises with each node's state when it does not form
        yield cluster.url
    finally:
        cluster.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The suite's Redis URL: a plain Redis, or with SAGA_TEST_REDIS_CLUSTER=1 a node of the
    test cluster, with REDIS_CLUSTER=1 set for the code under test for the whole session."""
    if not cluster_tests_enabled():
        yield request.getfixturevalue("single_redis_url")
        return
    url = request.getfixturevalue("redis_cluster_url")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REDIS_CLUSTER", "1")
        yield url


@pytest.fixture(scope="session")
def rq_redis_url(request: pytest.FixtureRequest, redis_server_url: str) -> str:
    """The plain Redis rq uses: the suite's Redis, or beside a cluster a separate one (rq does
    not support Redis Cluster)."""
    if cluster_tests_enabled():
        return request.getfixturevalue("single_redis_url")
    return redis_server_url


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
def clean_state(
    service_db_urls: dict[str, str], redis_server_url: str, rq_redis_url: str
) -> CleanState:
    """Empty every table (the migration ledger aside) and the Redis database (every master
    of a cluster, and rq's own Redis beside it)."""
    import psycopg

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
    cluster = cluster_tests_enabled()
    flush_redis(redis_server_url, cluster=cluster)
    if rq_redis_url != redis_server_url:
        flush_redis(rq_redis_url, cluster=False)
    return CleanState(
        db_urls=dict(service_db_urls),
        redis_url=redis_server_url,
        redis_cluster=cluster,
        rq_redis_url=rq_redis_url,
    )


@pytest.fixture(params=["single", "cluster"])
def redis_backend(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[RedisClient]:
    """A client from `service_runtime.redis_client.connect` on an emptied plain Redis, then on
    an emptied Redis Cluster, with REDIS_CLUSTER set to match: a test using it is a contract
    both backends must meet."""
    from service_runtime.redis_client import connect, flush

    cluster = request.param == "cluster"
    url = request.getfixturevalue("redis_cluster_url" if cluster else "single_redis_url")
    monkeypatch.setenv("REDIS_CLUSTER", "1" if cluster else "0")
    client = connect(url)
    flush(client)
    yield client
    client.close()
