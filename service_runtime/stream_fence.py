"""The Redis side of partition ownership: reads fenced on the owner's epoch.

The owner of a partition writes its lease epoch to the partition's fence key
(contracts.owner_fence_key, same hash tag as the partition's streams, so one slot on a
cluster). Every XREADGROUP of the partition is sent with that key's GET after it and an
XPENDING of its streams after that, in one pipeline (`StreamFence.read`):
- a consumer that lost the partition (paused, cut off, lease expired) learns it from the read's
  own reply and handles none of what it read; it can take entries into its pending list once;
- the owner sees such entries (anyone else's pending entries of the partition) in the reply of
  its next read at the latest, before it handles anything newer than them: it claims them and
  reads its pending entries again from the start, in id order. So one order's events stay in
  order, and the takeover of the pending entries is complete (docs/architecture.md, Fencing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from contracts import owner_fence_key
from service_runtime.redis_client import queue_read, queue_read_group

Entry = tuple[str, dict[str, str] | None]  # (entry id, fields), fields None when trimmed

FENCED = "FENCED"

_SET_FENCE = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) >= current then
    redis.call('SET', KEYS[1], ARGV[1])
    return 1
end
return 0
"""


@dataclass(frozen=True)
class FencedRead:
    """What one fenced read took, and what the owner must know about the partition."""

    entries: list[tuple[str, list[Entry]]]  # per stream read, its entries
    # {stream: its last entry id just before the read}; empty after a full read
    tops: dict[str, str]
    # Another consumer has entries of the partition pending: a previous owner's (the owner
    # missed them, or Redis came back with an older data set) or a stale reader's. The owner
    # claims them and reads its pending entries again from the start, in id order.
    others_pending: bool


class Fenced(Exception):
    """Redis refused: the partition's fence carries another owner's epoch."""


class StreamFence:
    """Fenced stream operations on one client (scripts are loaded once per client)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._set = client.register_script(_SET_FENCE)

    def claim(self, group: str, partition: int, epoch: int) -> bool:
        """Set the fence to this epoch unless a newer owner already set a higher one."""
        return bool(self._set(keys=[owner_fence_key(group, partition)], args=[epoch]))

    def read(
        self,
        group: str,
        consumer: str,
        partition: int,
        epoch: int,
        cursors: Mapping[str, str],
        count: int,
        acks: Mapping[str, Sequence[str]] | None = None,
    ) -> FencedRead:
        """Send `acks` (XACK per stream, whatever the fence says: they are for entries this
        owner finished), then XREADGROUP over the partition's streams at the given cursors
        ('>' or an id). One round trip, one slot; Fenced if the fence is not at `epoch`.

        A pipeline, not a script (a script's reply goes through Lua: three times the Redis
        CPU of the plain read, ten times on Redis 6.2), in this order:
        - the streams' tops (XREVRANGE) before the read: a read that was not full took
          everything up to them, so a wait from them misses nothing;
        - the fence (GET) after the read: a reader that lost the partition may take entries
          into its pending list once, learns it from this reply, and handles none of them;
        - who else has entries pending (XPENDING) after the read: entries a stale reader took
          are always seen by the owner's next read at the latest, before it handles anything
          newer than them (see `FencedRead.others_pending`)."""
        streams = list(cursors)
        pipe = self.client.pipeline(transaction=False)
        _queue_acks(pipe, group, acks or {})
        for stream in streams:
            pipe.xrevrange(stream, count=1)
        queue_read_group(pipe, self.client, group, consumer, cursors, count=count)
        pipe.get(owner_fence_key(group, partition))
        for stream in streams:
            pipe.xpending(stream, group)
        replies = pipe.execute()[-(2 * len(streams) + 2) :]
        n = len(streams)
        tops, reply, current, summaries = replies[:n], replies[n], replies[n + 1], replies[n + 2 :]
        if current != str(epoch):
            raise Fenced(f"{FENCED} by epoch {current}")
        pairs = _stream_pairs(reply)
        full = any(len(entries) >= count for _, entries in pairs)
        others = any(
            holder["name"] != consumer
            for summary in summaries
            for holder in summary.get("consumers") or []
        )
        tops_before = {
            stream: top[0][0] if top else "0-0" for stream, top in zip(streams, tops, strict=True)
        }
        return FencedRead(pairs, {} if full else tops_before, others)

    def wait(
        self,
        group: str,
        partition: int,
        epoch: int,
        since: Mapping[str, str],
        block_ms: int,
        acks: Mapping[str, Sequence[str]] | None = None,
    ) -> bool:
        """Send `acks` (XACK per stream), then wait up to block_ms for an entry newer than
        `since` (XREAD BLOCK, taking nothing); whether one came. One round trip (one slot).
        The fence is checked first, so a worker that lost the partition learns it while idle
        too (Fenced); the acks still count: they are for entries this owner committed."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(owner_fence_key(group, partition))
        _queue_acks(pipe, group, acks or {})
        queue_read(pipe, self.client, since, count=1, block=block_ms)
        replies = pipe.execute()
        current, newer = replies[0], replies[-1]
        if current != str(epoch):
            raise Fenced(f"{FENCED} by epoch {current}")
        return bool(newer)

    def ack(self, group: str, acks: Mapping[str, Sequence[str]]) -> None:
        """XACK per stream, in one round trip (a partition's streams share one slot)."""
        if acks:
            pipe = self.client.pipeline(transaction=False)
            _queue_acks(pipe, group, acks)
            pipe.execute()


def _queue_acks(pipe: Any, group: str, acks: Mapping[str, Sequence[str]]) -> None:
    for stream, ids in acks.items():
        pipe.xack(stream, group, *ids)


def _stream_pairs(reply: object) -> list[tuple[str, list[Entry]]]:
    """XREADGROUP's reply as [(stream, [(id, fields or None)])]. Real Redis gives
    [[stream, entries], ...]; fakeredis's Lua gives the flat [stream, entries, stream, ...]."""
    if not reply:
        return []
    items = list(reply)  # type: ignore[call-overload]
    if isinstance(items[0], str):
        items = [items[i : i + 2] for i in range(0, len(items), 2)]
    return [(stream, [(eid, _fields(raw)) for eid, raw in entries]) for stream, entries in items]


def _fields(raw: Sequence[str] | Mapping[str, str] | None) -> dict[str, str] | None:
    if not raw:
        return None
    if type(raw) is list:  # Redis's reply: [field, value, ...] (checked first: the hot path)
        if len(raw) % 2:
            raise ValueError(f"an entry with an odd number of field items: {raw!r}")
        pairs = iter(raw)
        return dict(zip(pairs, pairs))  # noqa: B905 (even length checked above)
    if type(raw) is dict:  # redis-py's parsed reply (a pipeline's): a dict per entry already
        return raw
    if isinstance(raw, Mapping):
        return dict(raw)
    return dict(zip(raw[::2], raw[1::2], strict=True))
