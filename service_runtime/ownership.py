"""Partition ownership: leases in the service's own PostgreSQL (table partition_leases).

Every consumer of a group heartbeats in consumer_members. The live members, sorted by name,
share the partitions round-robin (`assignment`): each takes the partitions assigned to it
when their lease is free or expired, and hands back the ones assigned to someone else.
All times are the database's clock, so the consumers' clocks never matter.

Fencing: acquiring a lease increments its epoch. Every transaction of an owner starts with
`fence`, which reads its (partition, epoch) lease unexpired FOR SHARE: a takeover's UPDATE
waits for that transaction to end, and after a takeover the old owner's check finds nothing
and its transaction rolls back. Redis reads are fenced too (stream_fence.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import psycopg


class LostOwnership(Exception):
    """This consumer no longer owns the partition: stop, commit and acknowledge nothing more."""


@dataclass(frozen=True)
class Lease:
    partition: int
    epoch: int


@dataclass(frozen=True)
class Beat:
    """What one heartbeat learned: the live members (this one included), and the leases it
    renewed (held for another lease period; the others are lost)."""

    members: list[str]
    renewed: list[Lease]


def assignment(members: Sequence[str], partitions: int, me: str) -> set[int]:
    """The partitions `me` should own: partition p goes to the (p mod n)-th live member."""
    ordered = sorted(set(members))
    if me not in ordered:
        return set()
    index, count = ordered.index(me), len(ordered)
    return {p for p in range(partitions) if p % count == index}


# One statement per heartbeat: this consumer's beat, the renewal of the leases it holds (those
# still its own and unexpired come back), and the live members as they were just before the
# beat (the statement does not see its own upsert: the caller adds itself).
_BEAT = """
WITH beat AS (
    INSERT INTO consumer_members (consumer_group, consumer, heartbeat_at)
    VALUES (%(group)s, %(me)s, clock_timestamp())
    ON CONFLICT (consumer_group, consumer) DO UPDATE SET heartbeat_at = clock_timestamp()
),
renewed AS (
    UPDATE partition_leases SET expires_at = clock_timestamp() + make_interval(secs => %(ttl)s)
    WHERE consumer_group = %(group)s AND owner = %(me)s AND expires_at > clock_timestamp()
      AND (partition, epoch) IN (SELECT * FROM unnest(%(partitions)s::int[],
                                                      %(epochs)s::bigint[]))
    RETURNING partition, epoch
)
SELECT array(SELECT consumer FROM consumer_members
             WHERE consumer_group = %(group)s
               AND heartbeat_at > clock_timestamp() - make_interval(secs => %(ttl)s)),
       array(SELECT partition FROM renewed ORDER BY partition),
       array(SELECT epoch FROM renewed ORDER BY partition)
"""
FORGET_DEAD_EVERY_S = 60.0
_FORGET_DEAD_MEMBERS = """
DELETE FROM consumer_members
WHERE consumer_group = %(group)s AND heartbeat_at < clock_timestamp() - interval '1 hour'
"""
# Take a partition that nobody holds, or whose lease expired. A lease held by a transaction's
# fence (FOR SHARE) makes this wait until that transaction ends: no overlap, ever.
_ACQUIRE = """
INSERT INTO partition_leases AS l (consumer_group, partition, owner, epoch, expires_at)
VALUES (%(group)s, %(partition)s, %(me)s, 1,
        clock_timestamp() + make_interval(secs => %(ttl)s))
ON CONFLICT (consumer_group, partition) DO UPDATE
SET owner = EXCLUDED.owner, epoch = l.epoch + 1, acquired_at = clock_timestamp(),
    expires_at = EXCLUDED.expires_at
WHERE l.expires_at <= clock_timestamp()
RETURNING epoch
"""
_RELEASE = """
UPDATE partition_leases SET expires_at = clock_timestamp()
WHERE consumer_group = %(group)s AND partition = %(partition)s AND epoch = %(epoch)s
"""
_LEAVE = "DELETE FROM consumer_members WHERE consumer_group = %(group)s AND consumer = %(me)s"
# Parameters: group, partition, epoch. Also the first part of the consumer's combined fence
# and inbox statement (consumer.py): one round trip fewer per transaction.
FENCE_QUERY = """
SELECT 1 FROM partition_leases
WHERE consumer_group = %s AND partition = %s AND epoch = %s AND expires_at > clock_timestamp()
FOR SHARE
"""
_OWNERS = """
SELECT partition, owner, epoch, expires_at > clock_timestamp() AS live,
       acquired_at, expires_at
FROM partition_leases WHERE consumer_group = %s ORDER BY partition
"""


class PartitionLeases:
    """The lease SQL of one consumer, on a connection of its own (autocommit)."""

    def __init__(self, group: str, me: str, lease_seconds: float) -> None:
        self.group = group
        self.me = me
        self.ttl = lease_seconds
        self._forget_dead_at = 0.0  # time.monotonic() of the next clean-up of dead members

    def _args(self, **extra: object) -> dict[str, object]:
        return {"group": self.group, "me": self.me, "ttl": self.ttl, **extra}

    def beat(self, conn: psycopg.Connection, held: Iterable[Lease]) -> Beat:
        """Say this consumer is alive and extend the leases `held` that are still its own."""
        held = list(held)
        members, partitions, epochs = conn.execute(
            _BEAT,
            self._args(
                partitions=[lease.partition for lease in held],
                epochs=[lease.epoch for lease in held],
            ),
        ).fetchone()
        if time.monotonic() >= self._forget_dead_at:  # rows of members gone for an hour
            conn.execute(_FORGET_DEAD_MEMBERS, self._args())
            self._forget_dead_at = time.monotonic() + FORGET_DEAD_EVERY_S
        return Beat(
            members=sorted(set(members) | {self.me}),
            renewed=[Lease(p, e) for p, e in zip(partitions, epochs, strict=True)],
        )

    def acquire(self, conn: psycopg.Connection, partition: int) -> Lease | None:
        row = conn.execute(_ACQUIRE, self._args(partition=partition)).fetchone()
        return Lease(partition, row[0]) if row else None

    def release(self, conn: psycopg.Connection, lease: Lease) -> None:
        """Hand a partition back at once (rebalance or shutdown), not after the lease runs out."""
        conn.execute(_RELEASE, self._args(partition=lease.partition, epoch=lease.epoch))

    def leave(self, conn: psycopg.Connection) -> None:
        conn.execute(_LEAVE, self._args())


def fence(conn: psycopg.Connection, group: str, lease: Lease) -> None:
    """First statement of an owner's transaction: raises LostOwnership if the lease is gone."""
    if conn.execute(FENCE_QUERY, (group, lease.partition, lease.epoch)).fetchone() is None:
        raise lost(group, lease)


def lost(group: str, lease: Lease) -> LostOwnership:
    return LostOwnership(f"{group} partition {lease.partition} epoch {lease.epoch}")


def owners(conn: psycopg.Connection, group: str) -> list[dict]:
    """For the CLI: each partition's owner, epoch and whether its lease is live."""
    cur = conn.execute(_OWNERS, (group,))
    names = [column.name for column in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
