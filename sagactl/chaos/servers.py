"""The chaos run's own embedded PostgreSQL and Redis, with the crashes the soak inflicts."""

from __future__ import annotations

import os
import signal
import warnings
from contextlib import suppress
from pathlib import Path
from typing import Any

import click
import psycopg
import redis

from devstack import issuer
from devstack.osutil import free_port, wait_until
from devstack.postgres import EmbeddedPostgres
from devstack.provision import provision
from devstack.redis import EmbeddedRedis
from sagactl.chaos import load
from sagactl.chaos.load import bearer
from service_runtime.config import SERVICES
from service_runtime.migrations import migrate

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # see devstack.postgres: pgserver warns on import
    from pgserver._commands import pg_ctl


class ChaosServers:
    """Fresh servers on free ports under `run_dir`; Redis keeps its AOF (appendonly yes), so a
    kill or restart of Redis loses nothing that was acknowledged.

    With `redis_cluster`, the streams live on a local 3-master Redis Cluster (its nodes keep an
    AOF too) and the plain Redis serves rq only (RQ_REDIS_URL); the Redis faults then hit one
    cluster node at a time, in turn."""

    def __init__(self, run_dir: Path, redis_cluster: bool = False) -> None:
        self.run_dir = run_dir
        self.postgres = EmbeddedPostgres(run_dir, free_port())
        self.redis = EmbeddedRedis(run_dir, free_port())
        self.cluster: Any = None  # devstack.redis_cluster.EmbeddedRedisCluster
        self._next_node = 0
        if redis_cluster:
            try:
                from devstack.redis_cluster import EmbeddedRedisCluster
            except ImportError as err:
                raise click.ClickException("Redis Cluster support not installed") from err
            self.cluster = EmbeddedRedisCluster(run_dir / "redis-cluster", appendonly=True)

    @property
    def streams_url(self) -> str:
        """The Redis holding the streams: a cluster node, or the one Redis."""
        return self.cluster.url if self.cluster is not None else self.redis.url

    def redis_client(self, **options: Any) -> redis.Redis:
        """A client of the streams' Redis (a cluster client on the cluster)."""
        if self.cluster is None:
            return redis.Redis.from_url(self.redis.url, decode_responses=True, **options)
        try:
            from service_runtime.redis_client import connect
        except ImportError as err:
            raise click.ClickException("Redis Cluster support not installed") from err
        return connect(self.cluster.url, cluster=True)

    def start(self) -> dict[str, str]:
        """Start them, create and migrate the three databases; returns the env to run with."""
        self.postgres.start()
        self.redis.start()
        env: dict[str, str] = {}
        if self.cluster is not None:
            self.cluster.start()
            env.update(REDIS_CLUSTER="1", RQ_REDIS_URL=self.redis.url)
        urls = provision(self.postgres.admin_url, SERVICES)
        for service, url in urls.items():
            migrate(url, service)
        env.update({f"{s.upper()}_DATABASE_URL": urls[s] for s in SERVICES})
        env["REDIS_URL"] = self.streams_url
        # the services verify with the development issuer's public key; the load signs with it
        env["AUTH_PUBLIC_KEY_FILE"] = str(issuer.ensure_key_pair(self.run_dir))
        load.AUTH_HEADERS.update(bearer(issuer.admin_token(self.run_dir, "chaos-load", 86400)))
        return env

    def crash_postgres(self) -> None:
        """`pg_ctl stop -m immediate`: no checkpoint, clients cut off, WAL replay on start."""
        pg_ctl(
            ["-w", "-t", "60", "-m", "immediate", "stop"],
            pgdata=self.postgres.data_dir,
            user=self.postgres._user,  # the pgserver account when running as root
            timeout=90,
        )

    def start_postgres(self) -> None:
        self.postgres.start()
        wait_until(self._postgres_answers, timeout=60, interval=0.2)

    def kill_redis(self) -> None:
        """SIGKILL redis-server (one cluster node): whatever reached its AOF survives."""
        pid_file = self._cluster_node_dir() / "redis.pid" if self.cluster else self.redis.pid_file
        pid = int(pid_file.read_text().strip())
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not _alive(pid), timeout=15)

    def stop_redis(self) -> None:
        """A clean SHUTDOWN (the AOF is flushed; nothing is lost)."""
        if self.cluster is None:
            self.redis.stop()
            return
        port = self.cluster.ports[self._next_node % len(self.cluster.ports)]
        with suppress(redis.ConnectionError), redis.Redis(port=port) as node:
            node.shutdown()  # the reply never comes: the node is gone
        wait_until(lambda: not _answers(port), timeout=15)

    def start_redis(self) -> None:
        if self.cluster is None:
            self.redis.start()
            return
        self._next_node += 1  # the next fault hits the next node
        self.cluster.start()  # starts the node that is down, waits for cluster_state:ok

    def _cluster_node_dir(self) -> Path:
        return self.cluster.node_dir(self.cluster.ports[self._next_node % len(self.cluster.ports)])

    def stop(self) -> None:
        if self.cluster is not None:
            with suppress(Exception):
                self.cluster.stop()
        with suppress(Exception):
            self.redis.stop()
        with suppress(Exception):
            self.postgres.stop()

    def _postgres_answers(self) -> bool:
        try:
            psycopg.connect(self.postgres.admin_url, connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False


def _answers(port: int) -> bool:
    try:
        with redis.Redis(port=port, socket_connect_timeout=1) as node:
            return bool(node.ping())
    except redis.RedisError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (killed, not yet reaped by init) no longer serves anything
    with suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return True
