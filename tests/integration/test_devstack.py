"""The dev stack: least-privilege provisioning, persistence and repeatable up/down.

Independent of the services' migrations: only the servers and the provisioning are tested.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import redis
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from redis.backoff import NoBackoff
from redis.retry import Retry

from devstack import stack
from devstack.osutil import free_port
from devstack.postgres import EmbeddedPostgres
from devstack.provision import SERVICES, drop, ensure_database, names, provision
from devstack.redis import EmbeddedRedis


@pytest.fixture(scope="module")
def prefix(pg_admin_url: str) -> Iterator[str]:
    prefix = f"test_{secrets.token_hex(3)}_"
    yield prefix
    drop(pg_admin_url, SERVICES, prefix=prefix)


@pytest.fixture(scope="module")
def passwords(prefix: str) -> dict[str, str]:
    return {names(service, prefix)[0]: secrets.token_urlsafe(16) for service in SERVICES}


@pytest.fixture(scope="module")
def urls(pg_admin_url: str, prefix: str, passwords: dict[str, str]) -> dict[str, str]:
    return provision(pg_admin_url, prefix=prefix, passwords=passwords)


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username or ''}@{parts.hostname}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _with_database(url: str, database: str) -> str:
    return make_conninfo(url, dbname=database)


def test_a_role_cannot_open_another_services_database(urls: dict[str, str]) -> None:
    inventory_db = conninfo_to_dict(urls["inventory"])["dbname"]
    # refused by pg_hba.conf on the embedded cluster, by the CONNECT grant on any server
    with pytest.raises(psycopg.OperationalError, match=r"permission denied|no pg_hba\.conf entry"):
        psycopg.connect(_with_database(urls["orders"], str(inventory_db)))


def test_a_role_owns_its_own_database(urls: dict[str, str], prefix: str) -> None:
    with psycopg.connect(urls["orders"], autocommit=True) as conn:
        user, database = conn.execute("SELECT current_user, current_database()").fetchone()
        assert (user, database) == (f"{prefix}orders_svc", f"{prefix}orders")
        conn.execute("CREATE TABLE probe (id int PRIMARY KEY)")
        conn.execute("INSERT INTO probe VALUES (1)")
        assert conn.execute("SELECT count(*) FROM probe").fetchone() == (1,)
        conn.execute("DROP TABLE probe")


def test_provision_is_idempotent(
    pg_admin_url: str, urls: dict[str, str], prefix: str, passwords: dict[str, str]
) -> None:
    assert provision(pg_admin_url, prefix=prefix, passwords=passwords) == urls
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

        # the secrets were generated into the run folder, readable by their owner only
        files = [run_dir / "stack.env", *(run_dir / "secrets").iterdir()]
        assert {path.name for path in files} >= {
            "stack.env",
            "postgres-superuser",
            "redis",
            *(f"postgres-{s}_svc" for s in SERVICES),
        }
        assert {oct(path.stat().st_mode & 0o777) for path in files} == {"0o600"}
        assert oct((run_dir / "secrets").stat().st_mode & 0o777) == "0o700"
        redis_conf = run_dir / "redis" / "redis.conf"
        assert oct(redis_conf.stat().st_mode & 0o777) == "0o600"

        # nothing answers without its password over TCP: superuser, service role, Redis
        admin_url = EmbeddedPostgres(run_dir, int(env["SAGA_PG_PORT"])).admin_url
        for url in (admin_url, env["BILLING_DATABASE_URL"]):
            with pytest.raises(psycopg.OperationalError, match="password"):
                psycopg.connect(_without_password(url), connect_timeout=5).close()
            with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
                psycopg.connect(url, password="wrong", connect_timeout=5).close()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(_without_password(env["REDIS_URL"])).ping()

        # pg_hba.conf: scram-sha-256 on every line, the superuser and each role to its database
        hba = (run_dir / "postgres" / "pg_hba.conf").read_text().splitlines()
        rules = [line.split() for line in hba if line.strip() and not line.startswith("#")]
        assert {rule[-1] for rule in rules} == {"scram-sha-256"}
        assert {rule[2] for rule in rules} == {
            "postgres",
            *(rf"/^(\w+_)?{s}_svc$" for s in SERVICES),
        }
        role_url = env["BILLING_DATABASE_URL"]
        with pytest.raises(psycopg.OperationalError, match=r"no pg_hba\.conf entry"):
            psycopg.connect(role_url, dbname="postgres", connect_timeout=5).close()
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
