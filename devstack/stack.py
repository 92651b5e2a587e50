"""The whole dev stack: embedded servers up/down, or the user's own servers, and migrations."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from devstack import issuer
from devstack.postgres import EmbeddedPostgres
from devstack.provision import ensure_database, names, provision
from devstack.redis import RQ_USER, EmbeddedRedis
from devstack.secrets import secret, write_private
from service_runtime import config
from service_runtime.db import connect
from service_runtime.migrations import migrate
from service_runtime.partitions import check_partition_count

log = logging.getLogger(__name__)

DEFAULT_PG_PORT = 54329
DEFAULT_REDIS_PORT = 63790
EXTERNAL_KEYS = (*(f"{s.upper()}_DATABASE_URL" for s in config.SERVICES), "REDIS_URL")


def _servers(run_dir: Path | str | None) -> tuple[Path, EmbeddedPostgres, EmbeddedRedis]:
    directory = Path(run_dir) if run_dir is not None else config.run_dir()
    pg_port = int(os.environ.get("SAGA_PG_PORT") or DEFAULT_PG_PORT)
    redis_port = int(os.environ.get("SAGA_REDIS_PORT") or DEFAULT_REDIS_PORT)
    return directory, EmbeddedPostgres(directory, pg_port), EmbeddedRedis(directory, redis_port)


def http_ports() -> dict[str, str]:
    # os.environ only: a port left in an old stack.env must not override the default
    return {
        f"{s.upper()}_PORT": os.environ.get(f"{s.upper()}_PORT") or str(config.DEFAULT_PORTS[s])
        for s in config.SERVICES
    }


def _up(
    run_dir: Path | str | None, overrides: dict[str, str] | None = None
) -> tuple[dict[str, str], bool]:
    directory, postgres, redis = _servers(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    started: list[EmbeddedPostgres | EmbeddedRedis] = []
    try:
        if postgres.start():
            started.append(postgres)
        if redis.start():
            started.append(redis)
        passwords = {
            role: secret(directory, f"postgres-{role}")
            for role in (names(service)[0] for service in config.SERVICES)
        }
        urls = provision(postgres.admin_url, config.SERVICES, passwords=passwords)
    except BaseException:
        # half a stack (or a Ctrl-C while it comes up) must not leave servers behind
        for server in reversed(started):
            server.stop()
        raise
    env = {f"{s.upper()}_DATABASE_URL": urls[s] for s in config.SERVICES}
    env["REDIS_URL"] = redis.url  # the admin user: the `saga` CLI
    if "REDIS_URL" not in (overrides or {}):
        # each process its own Redis user (relays, consumers, rq); not with the user's Redis
        env.update(redis.role_urls())
    env.update(http_ports())
    env["SAGA_PG_PORT"] = str(postgres.port)
    env["SAGA_REDIS_PORT"] = str(redis.port)
    env.update(auth_keys(directory))
    env.update(overrides or {})
    _write_env(directory / "stack.env", env)
    return env, bool(started)


def up(run_dir: Path | str | None = None) -> dict[str, str]:
    """Start (or reuse) the embedded servers, provision, write `<run_dir>/stack.env`."""
    return _up(run_dir)[0]


def down(run_dir: Path | str | None = None) -> None:
    """Stop the embedded servers; their data stays in the run dir."""
    directory, postgres, redis = _servers(run_dir)
    if not directory.exists():
        return
    postgres.stop()
    redis.stop()
    # other terminals fall back to stack.env: once the servers are gone it would mislead them
    (directory / "stack.env").unlink(missing_ok=True)


def resolve() -> tuple[dict[str, str], bool]:
    """The env to run with, and whether embedded servers were started for it.

    The user's PostgreSQL when the three database URLs are set (their databases created if
    missing), the user's Redis (or Redis Cluster, with REDIS_CLUSTER=1) when REDIS_URL is set,
    embedded servers for the rest. rq cannot use a cluster: without RQ_REDIS_URL it gets the
    embedded Redis.
    """
    given = {key: os.environ.get(key, "") for key in EXTERNAL_KEYS}
    databases = {key: url for key, url in given.items() if key.endswith("_DATABASE_URL")}
    cluster = config.is_true(os.environ.get("REDIS_CLUSTER"))  # not an old stack.env's
    rq_redis_needed = cluster and not os.environ.get("RQ_REDIS_URL")
    for url in databases.values() if all(databases.values()) else ():
        ensure_database(url)
    if all(given.values()) and not rq_redis_needed:
        return {**given, **http_ports(), **_cluster_keys(), **auth_keys(config.run_dir())}, False
    if any(databases.values()) and not all(databases.values()):
        missing = ", ".join(key for key, value in databases.items() if not value)
        log.warning("using the embedded PostgreSQL: %s not set (all three are needed)", missing)
    overrides = {
        **(databases if all(databases.values()) else {}),
        **({"REDIS_URL": given["REDIS_URL"]} if given["REDIS_URL"] else {}),
        **_cluster_keys(),
    }
    env, started = _up(None, overrides)
    if rq_redis_needed:
        # the embedded Redis, which _up started; REDIS_URL is the user's cluster
        env["RQ_REDIS_URL"] = _servers(None)[2].user_url(RQ_USER)
        _write_env(config.stack_env_file(), env)
    return env, started


def auth_keys(directory: Path) -> dict[str, str]:
    """AUTH_PUBLIC_KEY_FILE of the development issuer (its key pair made at first start), unless
    the user named a key or an identity provider (AUTH_PUBLIC_KEY_FILE, AUTH_JWKS_URL)."""
    if os.environ.get("AUTH_PUBLIC_KEY_FILE") or os.environ.get("AUTH_JWKS_URL"):
        return {
            key: os.environ[key]
            for key in ("AUTH_PUBLIC_KEY_FILE", "AUTH_JWKS_URL", "AUTH_ISSUER", "AUTH_AUDIENCE")
            if os.environ.get(key)
        }
    directory.mkdir(parents=True, exist_ok=True)
    return {"AUTH_PUBLIC_KEY_FILE": str(issuer.ensure_key_pair(directory))}


def _cluster_keys() -> dict[str, str]:
    """REDIS_CLUSTER and RQ_REDIS_URL when set, so `saga` in another terminal sees them too."""
    return {key: os.environ[key] for key in ("REDIS_CLUSTER", "RQ_REDIS_URL") if key in os.environ}


def migrate_all(env: dict[str, str]) -> dict[str, list[str]]:
    """Apply every service's migrations, then check (or record, the first time) the deployment's
    partition count; returns the migrations applied now, per service. Raises ConfigError when
    STREAM_PARTITIONS differs from the one the databases were created with."""
    applied = {s: migrate(env[f"{s.upper()}_DATABASE_URL"], s) for s in config.SERVICES}
    partitions = config.stream_partitions()
    for service in config.SERVICES:
        with connect(env[f"{service.upper()}_DATABASE_URL"]) as conn:
            check_partition_count(conn, partitions, service)
    return applied


def _write_env(path: Path, env: dict[str, str]) -> None:
    # the URLs carry the passwords: mode 0600; replaced atomically, never seen half-written
    write_private(path, "".join(f"{key}={value}\n" for key, value in env.items()))
