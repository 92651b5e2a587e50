"""RELAY_DURABILITY: when an outbox row counts as published (DESIGN.md §5, issue 10).

- `ack`: Redis answered the XADD (it may still lose it: the AOF is written once a second and
  replicas are fed asynchronously).
- `replicas:N`: after each pipelined batch, `WAIT N timeout` on the same connection; the rows
  are marked published only when N replicas acknowledged every write of the batch, otherwise
  the batch's transaction rolls back and the rows are sent again (a duplicate, never a loss).
  On a cluster the WAIT goes to every node the batch touched.
- `fsync`: `WAITAOF 1 0 timeout` (the local AOF fsynced) where the server supports it, Redis
  7.2 or later with `appendonly yes`; the relay refuses to start anywhere else and says why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import redis

log = logging.getLogger(__name__)

WAITAOF_SINCE = (7, 2)


class DurabilityError(RuntimeError):
    """The mode cannot be honoured by this Redis (a start-up error, with the reason)."""


class NotDurable(Exception):
    """A batch did not reach the required durability: its rows stay unpublished."""


@dataclass(frozen=True)
class Durability:
    mode: str  # "ack", "replicas" or "fsync"
    replicas: int = 0

    @classmethod
    def parse(cls, text: str) -> Durability:
        value = (text or "ack").strip().lower()
        if value in ("ack", "fsync"):
            return cls(value)
        name, _, count = value.partition(":")
        if name == "replicas" and count.isdigit() and int(count) >= 1:
            return cls("replicas", int(count))
        raise ValueError(f"RELAY_DURABILITY={text!r}: expected ack, replicas:N (N >= 1) or fsync")

    def __str__(self) -> str:
        return f"replicas:{self.replicas}" if self.mode == "replicas" else self.mode

    def wait_command(self, timeout_ms: int) -> tuple[object, ...] | None:
        """The command that follows a batch on the same connection, or None for `ack`."""
        if self.mode == "replicas":
            return ("WAIT", self.replicas, timeout_ms)
        if self.mode == "fsync":
            return ("WAITAOF", 1, 0, timeout_ms)
        return None

    def check_reply(self, reply: object, where: str = "") -> None:
        """Raise NotDurable unless the WAIT/WAITAOF reply meets the mode."""
        if isinstance(reply, Exception):
            raise NotDurable(f"{self}{where}: {reply}")
        if self.mode == "replicas" and int(reply) < self.replicas:  # type: ignore[call-overload]
            raise NotDurable(f"{self}{where}: {reply} of {self.replicas} replicas acknowledged")
        if self.mode == "fsync" and int(reply[0]) < 1:  # type: ignore[index]
            raise NotDurable(f"{self}{where}: the AOF was not fsynced in time")

    def check_server(self, client: redis.Redis | redis.RedisCluster) -> None:
        """At start-up: refuse a mode the server cannot honour (fsync before Redis 7.2 or
        without appendonly); warn when fewer replicas are connected than replicas:N needs."""
        if self.mode == "ack":
            return
        for node, info in _server_infos(client):
            if self.mode == "fsync":
                version = str(info.get("redis_version", "0"))
                if _version(version) < WAITAOF_SINCE:
                    raise DurabilityError(
                        f"RELAY_DURABILITY=fsync needs WAITAOF, which Redis {version} at {node}"
                        " does not have (Redis 7.2 or later); use RELAY_DURABILITY=ack or"
                        " replicas:N with this server"
                    )
                if str(info.get("aof_enabled", "0")) != "1":
                    raise DurabilityError(f"RELAY_DURABILITY=fsync needs appendonly yes on {node}")
            elif int(info.get("connected_slaves", 0)) < self.replicas:
                log.warning(
                    "RELAY_DURABILITY=%s but %s has %s connected replicas: nothing will be"
                    " marked published until enough replicas are connected",
                    self,
                    node,
                    info.get("connected_slaves", 0),
                )


def _version(text: str) -> tuple[int, int]:
    parts = [*text.split("."), "0", "0"][:2]
    return int(parts[0]), int(parts[1])


def _server_infos(client: redis.Redis | redis.RedisCluster) -> list[tuple[str, dict]]:
    """(node, INFO server+replication) of every primary."""
    if isinstance(client, redis.RedisCluster):
        infos = []
        for node in client.get_primaries():
            info = client.info(target_nodes=node)
            infos.append((node.name, info))
        return infos
    kwargs = client.connection_pool.connection_kwargs
    return [(f"{kwargs.get('host')}:{kwargs.get('port')}", client.info())]


ACK = Durability("ack")
