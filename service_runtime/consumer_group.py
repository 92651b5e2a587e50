"""A consumer process in its service's group: membership, partition leases, one worker each.

Every `heartbeat_ms` this consumer: says it is alive (consumer_members), renews the leases it
holds, tells the workers of partitions with re-drive requests, hands back the partitions that
the current assignment gives to someone else, and takes the ones it gives to it when free.
Each owned partition runs a PartitionWorker in its own thread (blocking reads of one
partition's streams: one slot, on a cluster too). A worker told to stop, or to re-drive, is
woken from its blocked read (CLIENT UNBLOCK of the connections named after this consumer), so
reads can block long while idle. Timings and bounds: docs/architecture.md,
"Partition ownership".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import redis
from psycopg_pool import ConnectionPool

from service_runtime.consumer import (
    ConsumerSettings,
    Handler,
    OutcomeHook,
    PartitionWorker,
    partitions_to_redrive,
)
from service_runtime.failures import FailureKind, classify
from service_runtime.faults import no_faults
from service_runtime.metrics import PARTITION_CHANGES, PARTITIONS_OWNED
from service_runtime.ownership import Lease, PartitionLeases, assignment
from service_runtime.redis_client import client_name, wake_blocked_reads
from service_runtime.stream_fence import StreamFence

log = logging.getLogger(__name__)

# While stopping workers, how often their blocked reads are woken again: a worker that was
# about to send its read when the last wake went out blocks anyway.
WAKE_AGAIN_S = 0.1


def pool_size(settings: ConsumerSettings) -> int:
    """Connections for a consumer process's workers: one per transaction running at once, no
    more than there are partitions to run them."""
    return min(settings.max_transactions, settings.partitions)


@dataclass
class _Running:
    worker: PartitionWorker
    thread: threading.Thread
    stop: threading.Event = field(default_factory=threading.Event)


class StreamConsumer:
    """One consumer process of a group: owns some partitions, runs a worker for each."""

    def __init__(
        self,
        redis_client: redis.Redis,
        pool: ConnectionPool,
        settings: ConsumerSettings,
        handlers: Mapping[str, Handler],
        on_outcome: OutcomeHook | None = None,
        fault: Callable[[str], None] = no_faults,
        lock_orders: bool = False,
        lease_pool: ConnectionPool | None = None,
    ) -> None:
        self.redis = redis_client
        self.pool = pool
        # The heartbeat's connection: on the workers' pool it would queue behind their
        # transactions, and a lease could run out while they wait on each other's rows.
        self.lease_pool = lease_pool or pool
        self.settings = settings
        self.handlers = handlers
        self.on_outcome = on_outcome
        self.fault = fault
        self.lock_orders = lock_orders  # the handlers' LOCK_ORDERS (consumer.PartitionWorker)
        self.fence = StreamFence(redis_client)
        self.leases = PartitionLeases(settings.group, settings.consumer, settings.lease_ms / 1000)
        self.running: dict[int, _Running] = {}
        self._renewed_at = time.monotonic()
        # the workers' blocked reads can be woken only on connections named for this consumer
        self._can_wake = client_name(redis_client) == settings.consumer
        if not self._can_wake:
            log.warning(
                "consumer %s: its Redis connections are not named after it: a stop waits for"
                " blocked reads to end (up to CONSUMER_BLOCK_MS)",
                settings.consumer,
            )

    @property
    def owned(self) -> list[int]:
        return sorted(self.running)

    def run(self, stop: threading.Event) -> None:
        interval = self.settings.heartbeat_ms / 1000
        try:
            while not stop.is_set():
                try:
                    self.rebalance_once()
                except Exception as err:
                    if classify(err) is not FailureKind.OUTAGE:
                        raise
                    log.warning(
                        "consumer %s: cannot reach the lease table: %s", self.settings.consumer, err
                    )
                    self._drop_all_if_expired()
                stop.wait(interval)
        finally:
            self.shutdown()

    def rebalance_once(self) -> None:
        """One heartbeat: renew, hand back, take. Safe to call from a test, step by step."""
        with self.lease_pool.connection() as conn:
            beat = self.leases.beat(conn, self._leases())
            target = assignment(beat.members, self.settings.partitions, self.settings.consumer)
            held = {lease.partition: lease for lease in beat.renewed}
            self._renewed_at = time.monotonic()
            redrive = partitions_to_redrive(conn, self.settings.group) if held else set()
        told = [
            p for p in redrive & set(held) if not self.running[p].worker.redrive_wanted.is_set()
        ]
        for partition in told:
            self.running[partition].worker.redrive_wanted.set()
        if told:
            self._wake_blocked_reads()
        self._stop_all([p for p in self.running if p not in held], "lost")
        crashed = [p for p in held if not self.running[p].thread.is_alive()]  # a bug: restart
        handed_back = self._stop_all([*crashed, *(set(held) - target - set(crashed))], "released")
        for lease in handed_back:
            del held[lease.partition]
        if handed_back or target - set(held):  # the usual heartbeat has neither: no checkout
            with self.lease_pool.connection() as conn:
                for lease in handed_back:
                    self.leases.release(conn, lease)
                for partition in sorted(target - set(held)):
                    lease = self.leases.acquire(conn, partition)
                    if lease is not None and not self._start(lease):
                        self.leases.release(conn, lease)  # no worker: do not sit on the lease
        PARTITIONS_OWNED.labels(self.settings.group, self.settings.consumer).set(len(self.running))

    def shutdown(self) -> None:
        """Stop every worker and hand their partitions back at once, then leave the group."""
        leases = self._stop_all(list(self.running), "released")
        try:
            with self.lease_pool.connection() as conn:
                for lease in leases:
                    self.leases.release(conn, lease)
                self.leases.leave(conn)
        except Exception as err:  # the leases simply expire
            log.warning("consumer %s: leases not handed back: %s", self.settings.consumer, err)

    def _leases(self) -> list[Lease]:
        return [running.worker.lease for running in self.running.values()]

    def _start(self, lease: Lease) -> bool:
        """Fence the partition in Redis with this lease's epoch and start its worker; False
        when a higher epoch is already there (a lease table reset under a live deployment)."""
        if not self.fence.claim(self.settings.group, lease.partition, lease.epoch):
            log.warning("partition %s: a newer owner already fenced it", lease.partition)
            return False
        worker = PartitionWorker(
            self.redis,
            self.fence,
            self.pool,
            self.settings,
            self.handlers,
            lease,
            on_outcome=self.on_outcome,
            fault=self.fault,
            lock_orders=self.lock_orders,
        )
        running = _Running(worker, threading.Thread())
        running.thread = threading.Thread(
            target=self._run_worker,
            args=(worker, running.stop),
            name=f"{self.settings.group}-p{lease.partition}",
            daemon=True,
        )
        self.running[lease.partition] = running
        running.thread.start()
        PARTITION_CHANGES.labels(self.settings.group, "acquired").inc()
        log.info(
            "%s owns partition %d (epoch %d)", self.settings.consumer, lease.partition, lease.epoch
        )
        return True

    def _run_worker(self, worker: PartitionWorker, stop: threading.Event) -> None:
        try:
            worker.run(stop)
        except Exception:
            log.exception("partition %s worker stopped by an error", worker.partition)

    def _stop_all(self, partitions: list[int], change: str) -> list[Lease]:
        """Stop these partitions' workers together; their leases, for the caller to hand back.

        A worker finishes its current batch (commit, XACK) first; a blocked read is woken
        (every worker's: the others read again at once). One that hangs past half a lease is
        left behind: the fence keeps it from committing or reading anything once the
        partition has moved."""
        stopping = [self.running.pop(partition) for partition in partitions]
        for running in stopping:
            running.stop.set()
        deadline = time.monotonic() + self.settings.lease_ms / 1000 / 2
        waking = self._can_wake
        while alive := [r for r in stopping if r.thread.is_alive()]:
            if (left := deadline - time.monotonic()) <= 0:
                log.warning(
                    "%s: partitions %s left behind, their workers still busy",
                    self.settings.consumer,
                    [r.worker.partition for r in alive],
                )
                break
            waking = waking and self._wake_blocked_reads()
            alive[0].thread.join(timeout=min(WAKE_AGAIN_S, left))
        for running in stopping:
            PARTITION_CHANGES.labels(self.settings.group, change).inc()
            log.info("%s %s partition %d", self.settings.consumer, change, running.worker.partition)
        return [running.worker.lease for running in stopping]

    def _wake_blocked_reads(self) -> bool:
        """Cut short every blocked read of this consumer's workers (they see an empty read and
        look at their stop and re-drive flags); False when that could not be done. Without
        it, a blocked read simply ends after CONSUMER_BLOCK_MS."""
        if not self._can_wake:
            return False
        try:
            wake_blocked_reads(self.redis)
            return True
        except redis.RedisError as err:  # an outage, or an ACL user without CLIENT LIST/UNBLOCK
            log.warning(
                "consumer %s: blocked reads not woken, they end within CONSUMER_BLOCK_MS: %s",
                self.settings.consumer,
                err,
            )
            return False

    def _drop_all_if_expired(self) -> None:
        """Unable to renew for a whole lease period: the partitions are surely someone else's."""
        if time.monotonic() - self._renewed_at >= self.settings.lease_ms / 1000:
            self._stop_all(list(self.running), "lost")
