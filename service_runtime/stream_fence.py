"""The Redis side of partition ownership: reads fenced on the owner's epoch.

The owner of a partition writes its lease epoch to the partition's fence key
(contracts.owner_fence_key, same hash tag as the partition's streams, so one slot on a
cluster). Every XREADGROUP of the partition runs in a Lua script that
first checks that key: once a new owner has set its epoch, a consumer that lost the partition
(paused, cut off, lease expired) can no longer take new entries into its pending list, so the
new owner's takeover of the pending entries is complete and one order's events stay in order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import redis

from contracts import owner_fence_key

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

# KEYS: fence, stream...; ARGV: epoch, group, consumer, count, id per stream, then per stream
# the number of entries to acknowledge and their ids (entries this owner finished: sent before
# the fence check, as a wait sends them, and so carried by the read instead of a round trip).
# Returns {reply of XREADGROUP or false, {last entry id of each stream}}: the tops of the
# streams when this read ran, for an XREAD BLOCK that wakes on anything newer without a second
# read (a read that was not full took everything up to them: no missed wake-up); none after a
# full read, which is followed by another read anyway.
_READ = """
local streams = #KEYS - 1
local at = 5 + streams
for i = 2, #KEYS do
    local n = tonumber(ARGV[at])
    for first = at + 1, at + n, 1000 do  -- unpack() is bounded by Lua's C stack
        redis.call('XACK', KEYS[i], ARGV[2], unpack(ARGV, first, math.min(first + 999, at + n)))
    end
    at = at + 1 + n
end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
    return redis.error_reply('FENCED by epoch ' .. tostring(redis.call('GET', KEYS[1])))
end
local args = {'XREADGROUP', 'GROUP', ARGV[2], ARGV[3], 'COUNT', ARGV[4], 'STREAMS'}
for i = 2, #KEYS do args[#args + 1] = KEYS[i] end
for i = 5, 4 + streams do args[#args + 1] = ARGV[i] end
local reply = redis.call(unpack(args))
local full = false
for _, item in ipairs(reply or {}) do  -- {stream, entries} (fakeredis: flat, no pairs)
    if type(item) == 'table' then
        local entries = type(item[1]) == 'string' and item[2] or item
        if #entries >= tonumber(ARGV[4]) then full = true end
    end
end
local last = {}
if not full then
    for i = 2, #KEYS do
        local top = redis.call('XREVRANGE', KEYS[i], '+', '-', 'COUNT', 1)
        last[#last + 1] = top[1] and top[1][1] or '0-0'
    end
end
return {reply, last}
"""


class Fenced(Exception):
    """Redis refused: the partition's fence carries another owner's epoch."""


class StreamFence:
    """Fenced stream operations on one client (scripts are loaded once per client)."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._set = client.register_script(_SET_FENCE)
        self._read = client.register_script(_READ)

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
    ) -> tuple[list[tuple[str, list[Entry]]], dict[str, str]]:
        """Send `acks` (XACK per stream, whatever the fence says: they are for entries this
        owner finished), then XREADGROUP over the partition's streams at the given cursors
        ('>' or an id). Returns (entries per stream, {stream: its last entry id when this read
        ran}). One round trip."""
        streams = list(cursors)
        acked: list[str] = []  # per stream read: how many, then the ids
        for stream in streams:
            ids = (acks or {}).get(stream, ())
            acked += (str(len(ids)), *ids)
        try:
            reply, last = self._read(
                keys=[owner_fence_key(group, partition), *streams],
                args=[epoch, group, consumer, count, *cursors.values(), *acked],
            )
        except redis.ResponseError as err:
            if str(err).startswith(FENCED):
                raise Fenced(str(err)) from err
            raise
        pairs = _stream_pairs(reply)
        return pairs, dict(zip(streams, last or [], strict=False))

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
        pipe.xread(dict(since), count=1, block=block_ms)
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
    if isinstance(raw, Mapping):
        return dict(raw)
    return dict(zip(raw[::2], raw[1::2], strict=True))
