"""The dev stack: least-privilege provisioning, persistence and repeatable up/down.

Independent of the services' migrations: only the servers and the provisioning are tested.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from redis.backoff import NoBackoff
from redis.retry import Retry

from devstack import stack
from devstack.osutil import free_port
from devstack.provision import SERVICES, drop, ensure_database, provision
from devstack.redis import EmbeddedRedis


@pytest.fixture(scope="module")
def prefix(pg_admin_url: str) -> Iterator[str]:
    prefix = f"test_{secrets.token_hex(3)}_"
    yield prefix
    drop(pg_admin_url, SERVICES, prefix=prefix)


@pytest.fixture(scope="module")
def urls(pg_admin_url: str, prefix: str) -> dict[str, str]:
    return provision(pg_admin_url, prefix=prefix)


def _with_database(url: str, database: str) -> str:
    return make_conninfo(url, dbname=database)


def test_a_role_cannot_open_another_services_database(urls: dict[str, str]) -> None:
    inventory_db = conninfo_to_dict(urls["inventory"])["dbname"]
    with pytest.raises(psycopg.OperationalError, match="permission denied"):
        psycopg.connect(_with_database(urls["orders"], str(inventory_db)))


def test_a_role_owns_its_own_database(urls: dict[str, str], prefix: str) -> None:
    with psycopg.connect(urls["orders"], autocommit=True) as conn:
        user, database = conn.execute("SELECT current_user, current_database()").fetchone()
        assert (user, database) == (f"{prefix}orders_svc", f"{prefix}orders")
        conn.execute("CREATE TABLE probe (id int PRIMARY KEY)")
        conn.execute("INSERT INTO probe VALUES (1)")
        assert conn.execute("SELECT count(*) FROM probe").fetchone() == (1,)
        conn.execute("DROP TABLE probe")


def test_provision_is_idempotent(pg_admin_url: str, urls: dict[str, str], prefix: str) -> None:
    assert provision(pg_admin_url, prefix=prefix) == urls
    with psycopg.connect(pg_admin_url) as conn:
        owners = dict(
            conn.execute(
                "SELECT datname, pg_get_userbyid(datdba) FROM pg_database WHERE datname LIKE %s",
                (f"{prefix}%",),
            ).fetchall()
        )
    assert owners == {f"{prefix}{s}": f"{prefix}{s}_svc" for s in SERVICES}


def test_ensure_database_creates_a_missing_one(pg_admin_url: str) -> None:
    name = f"test_{secrets.token_hex(3)}_given"
    url = _with_database(pg_admin_url, name)
    try:
        ensure_database(url)
        ensure_database(url)
        psycopg.connect(url).close()
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


def test_embedded_redis_keeps_its_data_across_restarts(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, free_port())
    try:
        assert server.start()
        assert not server.start()  # already running: reused
        redis.Redis.from_url(server.url).set("survives", "yes")
        assert server.stop()
        assert not server.stop()
        server.start()
        assert redis.Redis.from_url(server.url).get("survives") == b"yes"
    finally:
        server.stop()


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # mkdtemp rather than tmp_path: as root the postgres account must traverse the path,
    # and pytest keeps its own temp root private
    directory = Path(tempfile.mkdtemp(prefix="saga-stack-"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def test_stack_up_and_down_can_be_repeated(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGA_PG_PORT", str(free_port()))
    monkeypatch.setenv("SAGA_REDIS_PORT", str(free_port()))
    try:
        env = stack.up(run_dir)
        assert stack.up(run_dir) == env
        written = dict(line.split("=", 1) for line in (run_dir / "stack.env").read_text().split())
        assert written == env
        with psycopg.connect(env["BILLING_DATABASE_URL"]) as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("billing_svc",)
        assert redis.Redis.from_url(env["REDIS_URL"]).ping()
    finally:
        stack.down(run_dir)
        stack.down(run_dir)
    assert not (run_dir / "stack.env").exists()
    assert not (run_dir / "postgres" / "postmaster.pid").exists()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(env["REDIS_URL"], retry=Retry(NoBackoff(), 0)).ping()


def test_resolve_uses_the_given_servers(
    pg_admin_url: str, redis_server_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"test_{secrets.token_hex(3)}_ext"
    for service in SERVICES:
        monkeypatch.setenv(
            f"{service.upper()}_DATABASE_URL", _with_database(pg_admin_url, f"{name}_{service}")
        )
    monkeypatch.setenv("REDIS_URL", redis_server_url)
    try:
        env, started = stack.resolve()
        assert not started
        assert env["REDIS_URL"] == redis_server_url
        for service in SERVICES:
            psycopg.connect(env[f"{service.upper()}_DATABASE_URL"]).close()
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as conn:
            for service in SERVICES:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}_{service}"')
