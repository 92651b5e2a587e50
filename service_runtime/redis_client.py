"""Redis connections for stream work: one Redis, or a Redis Cluster with REDIS_CLUSTER=1.

Callers stay cluster-neutral by using what is here instead of server-wide commands:
`flush`, `scan_keys`, and `REDIS_OUTAGE_ERRORS` for "back off and retry". A pipeline needs
nothing extra: redis-py's cluster pipeline (transaction=False) already groups the queued
commands by node, writes every node's batch before reading any reply, and returns the
replies in queue order. A MULTI pipeline (transaction=True) works on a cluster only when all
its keys share one slot (a common hash tag such as `{p3}`), else CrossSlotTransactionError.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeAlias

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    AskError,
    ClusterError,
    MovedError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.retry import Retry

from service_runtime.config import redis_cluster

RedisClient: TypeAlias = redis.Redis | redis.RedisCluster


class ClusterUnreachableError(redis.ConnectionError):
    """No node of the cluster answered (redis-py says so with a bare RedisClusterException,
    the class it also uses for programming errors, so it is re-raised as this)."""


# What "Redis is unreachable or not serving right now" looks like: back off and retry, never
# crash, and never count it as a failed delivery. On a cluster that also covers a failover or
# a reshard in flight:
# - ClusterError: CLUSTERDOWN (and its MasterDownError), or redis-py's "TTL exhausted" after
#   following MOVED/ASK redirections 16 times in a row (a topology change still settling);
# - SlotNotCoveredError: the slot's master is gone and nobody serves it yet;
# - TryAgainError: a multi-key command on a slot being migrated (redis-py retries it itself;
#   inside a MULTI it surfaces);
# - MovedError/AskError: they surface only from a MULTI pipeline whose retries ran out.
# Not an outage, because retrying never helps: CROSSSLOT (ClusterCrossSlotError),
# CrossSlotTransactionError and other RedisClusterExceptions (a bug in which keys we use).
REDIS_OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,  # includes BusyLoadingError and ClusterUnreachableError
    redis.TimeoutError,
    ClusterError,
    SlotNotCoveredError,
    TryAgainError,
    MovedError,
    AskError,
)

# The socket timeout must outlast the longest XREADGROUP BLOCK we issue: a read that times
# out is an outage to us, and on a cluster it also makes redis-py re-read the whole topology.
SOCKET_TIMEOUT_S = 15
SOCKET_CONNECT_TIMEOUT_S = 3
HEALTH_CHECK_INTERVAL_S = 30
# redis-py's cluster default is 10 attempts, each failed one re-reading the topology from
# every node; 3 lets an outage reach our own back-off (and its log line) within seconds.
CLUSTER_RETRIES = 3


def connect(url: str, *, cluster: bool | None = None, name: str | None = None) -> RedisClient:
    """A client for `url`: a RedisCluster when REDIS_CLUSTER=1 (or `cluster=True`), else a
    Redis. Same timeouts and decoded (str) replies either way. `name` is given to each of its
    connections (CLIENT SETNAME): CLIENT LIST shows who is who, and `wake_blocked_reads`
    finds the ones blocked in a read.

    A plain Redis connects lazily; a RedisCluster reads the topology here, so on a cluster
    this raises ClusterUnreachableError (an outage error) when no node answers.
    """
    common = {
        "decode_responses": True,
        "socket_connect_timeout": SOCKET_CONNECT_TIMEOUT_S,
        "socket_timeout": SOCKET_TIMEOUT_S,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        "client_name": name,
    }
    if not (redis_cluster() if cluster is None else cluster):
        return redis.Redis.from_url(url, **common)
    try:
        client = redis.RedisCluster.from_url(
            url,
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), CLUSTER_RETRIES),
            **common,
        )
    except RedisClusterException as err:
        raise _unreachable_or(err) from err
    _classify_topology_errors(client)
    return client


def _unreachable_or(err: RedisClusterException) -> Exception:
    """Outages: "cannot be connected" (raised from the last connection error) and "slots not
    covered"; anything else (a bad URL, a node without cluster mode) is not one."""
    if isinstance(err.__cause__, redis.ConnectionError | redis.TimeoutError) or (
        "not covered" in str(err)
    ):
        return ClusterUnreachableError(str(err))
    return err


def _classify_topology_errors(client: redis.RedisCluster) -> None:
    """Make the cluster client's topology refresh raise ClusterUnreachableError when no node
    answers. redis-py refreshes the topology inside its error handling (after a
    ConnectionError, a CLUSTERDOWN, too many MOVED), so an outage of the whole cluster would
    reach the caller as a bare RedisClusterException; pipelines share this nodes manager."""
    manager = client.nodes_manager
    refresh = manager.initialize

    def initialize(*args: object, **kwargs: object) -> None:
        try:
            refresh(*args, **kwargs)
        except ClusterUnreachableError:
            raise
        except RedisClusterException as err:
            raise _unreachable_or(err) from err

    manager.initialize = initialize  # type: ignore[method-assign]


def is_cluster(client: RedisClient) -> bool:
    return isinstance(client, redis.RedisCluster)


def client_name(client: RedisClient) -> str | None:
    """The name `connect` gave the client's connections, if any."""
    kwargs = (
        client.nodes_manager.connection_kwargs
        if isinstance(client, redis.RedisCluster)
        else client.connection_pool.connection_kwargs
    )
    return kwargs.get("client_name")


def masters(client: RedisClient) -> list[redis.Redis]:
    """A plain client per master: the client itself, or one per master of a cluster (for
    per-server commands such as CLIENT LIST)."""
    if isinstance(client, redis.RedisCluster):
        return [client.get_redis_connection(node) for node in client.get_primaries()]
    return [client]


def wake_blocked_reads(client: RedisClient) -> int:
    """End, as if their time was up, the blocking commands (XREADGROUP BLOCK) waiting on the
    connections of `client`'s name, on every master of a cluster; how many were waiting.
    A process stopping its readers wakes them with this instead of waiting out their block,
    so the block can be long (an idle reader then costs one round trip per block).
    Needs CLIENT LIST and CLIENT UNBLOCK (granted to the consumers' ACL users)."""
    name = client_name(client)
    if name is None:
        raise ValueError("the client has no name: connect(url, name=...)")
    woken = 0
    for node in masters(client):
        for info in node.client_list(_type="normal"):
            # 'b': waiting in a blocking command
            if info.get("name") == name and "b" in info.get("flags", ""):
                woken += bool(node.client_unblock(int(info["id"])))
    return woken


def send_together(client: redis.Redis, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """`commands` in one round trip on one pooled connection of a plain Redis: their replies as
    the server sent them (no response callbacks: an XREADGROUP is `xreadgroup_entries`'s to
    read). Every reply is read before the first error reply is raised, so the connection stays
    in step; a connection error or timeout (nothing retried) drops the connection.

    What redis-py's Pipeline does too, without its per-call machinery (command stack,
    response callbacks, retry and observability wrappers): a fenced read of one entry cost
    162-218 µs of client CPU through a Pipeline, 141-158 this way. A cluster needs the cluster
    pipeline (slots, MOVED): this refuses one. A caller that sends often from one thread
    keeps a connection instead (`HeldConnection`)."""
    held = HeldConnection(client)
    try:
        return held.send_together(commands)
    finally:
        held.release()


class HeldConnection:
    """One connection of a plain Redis's pool, kept by a single owner (a partition worker, for
    its reads) instead of taken from the pool and given back for every round trip: redis-py
    8's pool does bookkeeping both ways (a PID check, events, connection-count metrics, a poll
    of the socket), about 30 µs of client CPU a round trip here. For one thread at a time;
    `release` gives the connection back. A connection error drops the socket, and the next
    `send_together` connects again (as the pool would: same settings, same name)."""

    def __init__(self, client: redis.Redis) -> None:
        if isinstance(client, redis.RedisCluster):
            raise TypeError("send_together is for a plain Redis; on a cluster use a pipeline")
        self._pool = client.connection_pool
        self._conn: Any = None

    def send_together(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """As the module's `send_together`, on the held connection."""
        if self._conn is None:
            self._conn = self._pool.get_connection()
        conn = self._conn
        try:
            conn.send_packed_command(conn.pack_commands(commands))
            replies: list[Any] = []
            error: redis.ResponseError | None = None
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except redis.ResponseError as err:
                    error = error or err
                    replies.append(err)
        except BaseException:
            conn.disconnect()  # a reply may be half read: never reuse this socket as it is
            raise
        if error is not None:
            raise error
        return replies

    def release(self) -> None:
        """Give the connection back to the pool (a later `send_together` takes one again)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool.release(conn)


def read_group_command(
    group: str,
    consumer: str,
    streams: Mapping[str, str],
    *,
    count: int | None = None,
    block: int | None = None,
) -> list[Any]:
    """The XREADGROUP command itself, for `send_together`."""
    return ["XREADGROUP", "GROUP", group, consumer, *_read_options(streams, count, block)]


def xreadgroup_entries(reply: Any) -> list[tuple[str, list[tuple[str, dict[str, str] | None]]]]:
    """An XREADGROUP reply as the server sent it (RESP2: [[stream, entries]]; RESP3: {stream:
    entries}; nil when nothing came), as [(stream, [(entry id, fields or None)])]: fields None
    for an entry trimmed away while pending."""
    if not reply:
        return []
    pairs = reply.items() if isinstance(reply, dict) else reply
    return [
        (
            stream,
            [
                (eid, dict(zip(raw[::2], raw[1::2], strict=True)) if raw else None)
                for eid, raw in entries
            ],
        )
        for stream, entries in pairs
    ]


def read_group(
    client: RedisClient,
    group: str,
    consumer: str,
    streams: Mapping[str, str],
    *,
    count: int | None = None,
    block: int | None = None,
    on: Any = None,
) -> Any:
    """XREADGROUP over `streams` (name -> id), the same reply as `client.xreadgroup`; with
    `on` (a pipeline of `client`), queued there instead.

    On a cluster all the streams must share one slot (one hash tag, `{p3}`). redis-py asks a
    server (COMMAND GETKEYS, twice) to find the keys of XREADGROUP before every call, in a
    pipeline too, since its keys are "movable"; this routes it by the slot computed here
    instead, so a read is one round trip as on a plain Redis. A MOVED reply is still followed
    by redis-py.
    """
    target = client if on is None else on
    if not isinstance(client, redis.RedisCluster):
        return target.xreadgroup(group, consumer, dict(streams), count=count, block=block)
    command = read_group_command(group, consumer, streams, count=count, block=block)
    return target.execute_command(*command, target_nodes=_node_of(client, streams))


def read(
    client: RedisClient,
    streams: Mapping[str, str],
    *,
    count: int | None = None,
    block: int | None = None,
) -> Any:
    """XREAD over `streams` (name -> id), the same reply as `client.xread`; on a cluster the
    streams must share one slot (see `by_slot`), routed as `read_group` routes its reads."""
    if not isinstance(client, redis.RedisCluster):
        return client.xread(dict(streams), count=count, block=block)
    pieces = _read_options(streams, count, block)
    return client.execute_command("XREAD", *pieces, target_nodes=_node_of(client, streams))


def _read_options(streams: Mapping[str, str], count: int | None, block: int | None) -> list[Any]:
    pieces: list[Any] = []
    if count is not None:
        pieces += ["COUNT", count]
    if block is not None:
        pieces += ["BLOCK", block]
    return [*pieces, "STREAMS", *streams.keys(), *streams.values()]


def _node_of(client: redis.RedisCluster, keys: Iterable[str]) -> Any:
    """The master serving the one slot of `keys` (an error naming them if they span several)."""
    keys = list(keys)
    slots = {client.keyslot(key) for key in keys}
    if len(slots) != 1:
        raise RedisClusterException(f"{sorted(keys)}: the keys must share one hash tag")
    return client.nodes_manager.get_node_from_slot(slots.pop())


def by_slot(client: RedisClient, keys: Iterable[str]) -> list[list[str]]:
    """`keys` in groups a multi-key command (or a MULTI) may use together, each in the given
    order: all of them on a plain Redis, one group per slot on a cluster (the streams of one
    partition, sharing the hash tag `{p3}`, are one group)."""
    groups: dict[int, list[str]] = {}
    for key in keys:
        slot = client.keyslot(key) if isinstance(client, redis.RedisCluster) else 0
        groups.setdefault(slot, []).append(key)
    return list(groups.values())


def flush(client: RedisClient) -> None:
    """Empty the database, on every master of a cluster too (redis-py routes FLUSHDB to all
    primaries; a plain per-node client would empty one node only)."""
    client.flushdb()


def scan_keys(client: RedisClient, pattern: str, *, type_: str | None = None) -> list[str]:
    """Every key matching `pattern` (optionally of one type, e.g. "stream"), sorted, from
    every master of a cluster (SCAN walks one node's keyspace; redis-py's cluster scan_iter
    does visit each master, the sort makes the order the same on both backends)."""
    keys: Iterator[str] = client.scan_iter(match=pattern, count=1000, _type=type_)
    return sorted(set(keys))
