"""The chaos run's own embedded PostgreSQL and Redis, with the crashes the soak inflicts."""

from __future__ import annotations

import os
import signal
import warnings
from contextlib import suppress
from pathlib import Path

import psycopg

from devstack.osutil import free_port, wait_until
from devstack.postgres import EmbeddedPostgres
from devstack.provision import provision
from devstack.redis import EmbeddedRedis
from service_runtime.config import SERVICES
from service_runtime.migrations import migrate

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # see devstack.postgres: pgserver warns on import
    from pgserver._commands import pg_ctl


class ChaosServers:
    """Fresh servers on free ports under `run_dir`; Redis keeps its AOF (appendonly yes), so a
    kill or restart of Redis loses nothing that was acknowledged."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.postgres = EmbeddedPostgres(run_dir, free_port())
        self.redis = EmbeddedRedis(run_dir, free_port())

    def start(self) -> dict[str, str]:
        """Start both, create and migrate the three databases; returns the env to run with."""
        self.postgres.start()
        self.redis.start()
        urls = provision(self.postgres.admin_url, SERVICES)
        for service, url in urls.items():
            migrate(url, service)
        env = {f"{s.upper()}_DATABASE_URL": urls[s] for s in SERVICES}
        env["REDIS_URL"] = self.redis.url
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
        """SIGKILL redis-server: whatever reached its AOF survives the restart."""
        pid = int(self.redis.pid_file.read_text().strip())
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not _alive(pid), timeout=15)

    def stop_redis(self) -> None:
        """A clean SHUTDOWN (the AOF is flushed; nothing is lost)."""
        self.redis.stop()

    def start_redis(self) -> None:
        self.redis.start()

    def stop(self) -> None:
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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (killed, not yet reaped by init) no longer serves anything
    with suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return True
