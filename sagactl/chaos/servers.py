"""The chaos run's own embedded PostgreSQL and Redis, with the crashes the soak inflicts."""

from __future__ import annotations

import os
import shutil
import signal
import time
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

    # -- Redis losing data (issue 10): single embedded Redis only ----------------------------

    def lose_redis_data(self) -> None:
        """`redis-data-loss`: SIGKILL Redis, empty its data directory (AOF and RDB gone), start
        it again on the same port: every stream, group, fence key and rq job is gone."""
        self._single_redis_only("redis-data-loss")
        self.kill_redis()
        _empty_data_dir(self.redis.data_dir)
        self.redis.start()

    def fail_over_behind(self, lag_seconds: float) -> str:
        """`redis-failover`, for the single embedded Redis (clients keep its address):

        1. a replica is started beside the primary (`--replicaof`) and synced;
        2. the replica is promoted (REPLICAOF NO ONE): its data stops at that moment, while
           the primary goes on taking writes for `lag_seconds` (the replica lags behind);
        3. the primary is killed (SIGKILL) and restarted with an empty data directory, as a
           replica of the promoted one, which hands it its (lagging) data set in a full sync;
           then it becomes primary again (REPLICAOF NO ONE) and the helper is stopped.

        So, at the primary's address, the clients find what a failover to a replica that was
        `lag_seconds` behind leaves them: the writes of the last `lag_seconds` are gone, and
        while the data is copied, writes are refused (READONLY: an outage to every process)."""
        self._single_redis_only("redis-failover")
        from devstack.redis import ADMIN_USER, EmbeddedReplica

        replica = EmbeddedReplica(
            self.run_dir / "replica", free_port(), self.redis.port, self.redis.password, ADMIN_USER
        )
        replica.start()
        try:
            if not wait_until(replica.in_sync, timeout=30, interval=0.1):
                raise RuntimeError("the replica did not sync")
            replica.promote()
            time.sleep(lag_seconds)
            self.kill_redis()
            _empty_data_dir(self.redis.data_dir)
            self.redis.start()
            with self.redis_client(socket_timeout=10) as primary:
                primary.config_set("masteruser", ADMIN_USER)  # no default user (ACLs)
                primary.config_set("masterauth", self.redis.password)
                primary.execute_command("REPLICAOF", "127.0.0.1", str(replica.port))
                synced = wait_until(lambda: _synced(primary), timeout=60, interval=0.1)
                primary.execute_command("REPLICAOF", "NO", "ONE")
                if not synced:
                    raise RuntimeError("the restarted primary did not sync from the replica")
        finally:
            with suppress(Exception):
                replica.stop()
            shutil.rmtree(self.run_dir / "replica", ignore_errors=True)
        return f"replica promoted {lag_seconds:.1f} s behind"

    def _single_redis_only(self, kind: str) -> None:
        if self.cluster is not None:
            raise click.ClickException(
                f"{kind} is staged on the single embedded Redis only, not with --redis-cluster"
            )

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


def _empty_data_dir(data_dir: Path) -> None:
    """Remove the AOF (file or Redis 7's directory) and RDB, keep the config file."""
    for path in data_dir.iterdir():
        if path.name.startswith(("appendonly", "dump", "temp-")):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _synced(client: redis.Redis) -> bool:
    try:
        info = client.info("replication")
        loading = client.info("persistence").get("loading", 0)
    except redis.RedisError:
        return False
    return info.get("master_link_status") == "up" and not loading


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
