"""The Redis side of partition ownership: reads fenced on the owner's epoch.

The owner of a partition writes its lease epoch to the partition's fence key
(contracts.owner_fence_key, same hash tag as the partition's streams, so one slot on a
cluster). Every XREADGROUP of the partition is followed, in the same pipeline, by a script that
reads that key and the streams' XPENDING (`StreamFence.read`):
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
from service_runtime import redis_client

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

# What a read's owner must know about the partition, sent right after its XREADGROUP (one
# small reply through Lua, instead of several commands through the client per read).
# KEYS: the fence, then the partition's streams; ARGV: group, consumer. Returns {the fence's
# epoch ('' if none), 1 if any other consumer has entries of these streams pending else 0}.
_AFTER_READ = """
local others = 0
for i = 2, #KEYS do
    for _, holder in ipairs(redis.call('XPENDING', KEYS[i], ARGV[1])[4] or {}) do
        if holder[1] ~= ARGV[2] then others = 1 end
    end
end
return {redis.call('GET', KEYS[1]) or '', others}
"""


@dataclass(frozen=True)
class FencedRead:
    """What one fenced read took, and what the owner must know about the partition."""

    entries: list[tuple[str, list[Entry]]]  # per stream read, its entries
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
        block_ms: int | None = None,
        via: redis_client.HeldConnection | None = None,
    ) -> FencedRead:
        """Send `acks` (XACK per stream, whatever the fence says: they are for entries this
        owner finished), then XREADGROUP over the partition's streams at the given cursors
        ('>' or an id), waiting up to `block_ms` for a new entry when given (only with '>'
        cursors: Redis ignores BLOCK for pending entries). One round trip, one slot; Fenced if
        the fence is not at `epoch`, checked once the read returns. On a plain Redis, `via`
        is the reader's own connection (else one from the pool, for this read).

        Commands sent together (`redis_client.send_together` on a plain Redis, the cluster
        pipeline on a cluster), not one script (a script's reply goes through Lua: an
        XREADGROUP inside one cost three times the Redis CPU of the plain read, ten times on
        Redis 6.2):
        - XREADGROUP;
        - after it (Redis runs it once the blocked read returns), a small script
          (`_AFTER_READ`): the fence, and who else has entries pending (XPENDING). A reader
          that lost the partition may take entries into its pending list once (a blocked one:
          during the rest of its block), learns it from this reply, and handles none of them.
          Entries a stale reader took are seen by the owner's next read at the latest, before
          it handles anything newer than them (see `FencedRead.others_pending`)."""
        streams = list(cursors)
        after_read = [
            "EVAL", _AFTER_READ, 1 + len(streams), owner_fence_key(group, partition),
            *streams, group, consumer,
        ]  # fmt: skip
        if redis_client.is_cluster(self.client):
            pipe = self.client.pipeline(transaction=False)
            _queue_acks(pipe, group, acks or {})
            redis_client.read_group(
                self.client, group, consumer, cursors, count=count, block=block_ms, on=pipe
            )
            pipe.execute_command(*after_read)
            reply, (current, others) = pipe.execute()[-2:]
            entries = _stream_pairs(reply)
        else:  # the same commands, without a Pipeline's per-call cost (send_together)
            commands = [["XACK", stream, group, *ids] for stream, ids in (acks or {}).items()]
            read = redis_client.read_group_command(
                group, consumer, cursors, count=count, block=block_ms
            )
            sent = [*commands, read, after_read]
            replies = (
                via.send_together(sent) if via else redis_client.send_together(self.client, sent)
            )
            raw, (current, others) = replies[-2:]
            entries = redis_client.xreadgroup_entries(raw)
        if current != str(epoch):
            raise Fenced(f"{FENCED} by epoch {current or None}")
        return FencedRead(entries, bool(others))

    def ack(self, group: str, acks: Mapping[str, Sequence[str]]) -> None:
        """XACK per stream, in one round trip (a partition's streams share one slot)."""
        if acks:
            pipe = self.client.pipeline(transaction=False)
            _queue_acks(pipe, group, acks)
            pipe.execute()


def _queue_acks(pipe: Any, group: str, acks: Mapping[str, Sequence[str]]) -> None:
    for stream, ids in acks.items():
        pipe.xack(stream, group, *ids)


def _stream_pairs(reply: list | None) -> list[tuple[str, list[Entry]]]:
    """XREADGROUP's reply, as redis-py parses it ([[stream, [(id, {field: value})]]], an
    empty dict for an entry trimmed away), as [(stream, [(id, fields or None)])]."""
    return [
        (stream, [(eid, raw or None) for eid, raw in entries]) for stream, entries in reply or []
    ]
