"""One owned partition of a consumer group: read, commit, acknowledge (DESIGN.md §6, §6a).

A PartitionWorker runs while its consumer holds the partition's lease (consumer_group.py).
It has one path: a fenced XREADGROUP over the partition's streams (first its own pending
entries, then new ones), then the entries' effects, outbox rows and inbox rows in one
transaction that starts with the lease fence, then XACK. A duplicate delivery finds its inbox
row and changes nothing; a crash between commit and XACK means a redelivery, absorbed the same
way. Nothing is acknowledged that this worker did not finish (committed, or dead-lettered).

Dead letters are rows of the service's own database (table dead_letters), written in a fenced
transaction before the XACK, so they survive Redis losing its data. A re-drive is requested in
that table (`saga dead-letters redrive`); the partition's owner picks the requests up between
reads and handles each in one fenced transaction that also records the outcome.

Order: the partition is the unit that waits. When an entry's handler fails, nothing after it in
the partition is handled until it succeeds or is dead-lettered (`Retry`, below).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import psycopg
import redis
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from contracts import (
    EVENT_TYPES,
    PRODUCER_OF_EVENT,
    STREAM_OF_PRODUCER,
    ContractError,
    Envelope,
    base_of,
    decode_entry,
    group_streams,
)
from contracts.streams import DEFAULT_PARTITIONS
from service_runtime import tracing
from service_runtime.failures import FailureKind, classify
from service_runtime.faults import no_faults
from service_runtime.locks import lock_orders_sql
from service_runtime.metrics import (
    CONSUMER_CONFLICTS,
    CONSUMER_EVENTS,
    CONSUMER_LATENCY,
    CONSUMER_OUTAGES,
    observe_many,
)
from service_runtime.ownership import FENCE_QUERY, Lease, LostOwnership, fence, lost
from service_runtime.redis_client import SOCKET_TIMEOUT_S, HeldConnection, is_cluster
from service_runtime.stream_fence import Fenced, StreamFence
from service_runtime.unit_of_work import UnitOfWork, count_emitted

log = logging.getLogger(__name__)

Handler = Callable[[UnitOfWork, Envelope], None]
OutcomeHook = Callable[[str, str, float], None]

# The lease fence and a batch's inbox rows in one statement (the transaction's first): the
# lease row FOR SHARE, then the rows, in batch order, only if the lease is ours. The event ids
# returned are new (one already in the inbox, or twice in the batch, comes back once at most).
# The rows' columns come as one comma-separated text each (a UUID, an event type, a stream
# name and an entry id never hold a comma): psycopg dumps one string much faster than a list.
_FENCED_INBOX = f"""
WITH lease AS ({FENCE_QUERY}),
inserted AS (
    INSERT INTO inbox (consumer_group, event_id, event_type, stream, entry_id)
    SELECT %s, v.* FROM unnest(string_to_array(%s, ',')::uuid[], string_to_array(%s, ','),
                               string_to_array(%s, ','), string_to_array(%s, ',')) AS v, lease
    ON CONFLICT DO NOTHING
    RETURNING event_id::text
)
SELECT (SELECT count(*) FROM lease), array(SELECT event_id FROM inserted)"""
# The same, then the order lock of each entry (locks.lock_orders_sql), for a service whose
# reactions take it (LOCK_ORDERS): one statement fewer per entry than the handler's own.
_FENCED_INBOX_LOCKING_ORDERS = (
    f"{_FENCED_INBOX},\n       (SELECT count(*) FROM ({lock_orders_sql('%s')}) AS locked)"
)
_COUNT_FAILURE = """
INSERT INTO delivery_failures (consumer_group, stream, entry_id, event_id, attempts, last_error)
VALUES (%s, %s, %s, %s, 1, %s)
ON CONFLICT (consumer_group, stream, entry_id) DO UPDATE
SET attempts = delivery_failures.attempts + 1, last_error = EXCLUDED.last_error,
    updated_at = clock_timestamp()
RETURNING attempts
"""
_FORGET_FAILURES = """
DELETE FROM delivery_failures
WHERE consumer_group = %s AND (stream, entry_id) IN (SELECT * FROM unnest(%s::text[], %s::text[]))
"""
_INSERT_DEAD_LETTER = """
INSERT INTO dead_letters (consumer_group, partition, stream, entry_id, event_id, event_type,
                          fields, error, attempts)
VALUES (%(group)s, %(partition)s, %(stream)s, %(entry_id)s, %(event_id)s, %(event_type)s,
        %(fields)s, %(error)s, %(attempts)s)
ON CONFLICT (consumer_group, stream, entry_id) DO NOTHING
"""
_PARTITIONS_TO_REDRIVE = """
SELECT DISTINCT partition FROM dead_letters
WHERE consumer_group = %s AND redrive_requested_at IS NOT NULL
"""
_REDRIVE_REQUESTS = """
SELECT id, stream, entry_id, fields FROM dead_letters
WHERE consumer_group = %s AND partition = %s AND redrive_requested_at IS NOT NULL
ORDER BY id LIMIT 50
"""
_REDRIVEN = """
UPDATE dead_letters SET redrive_requested_at = NULL, redriven_at = clock_timestamp(),
       redrive_outcome = %s, redrives = redrives + 1
WHERE id = %s
"""
_REDRIVE_FAILED = """
UPDATE dead_letters SET redrive_requested_at = NULL, redrive_outcome = %s, error = %s,
       attempts = attempts + 1, redrives = redrives + 1
WHERE id = %s
"""
_PRODUCER_OF_STREAM = {stream: producer for producer, stream in STREAM_OF_PRODUCER.items()}
_PENDING = "0"  # XREADGROUP cursor: this consumer's own pending entries, from the start
_NEW = ">"


@dataclass(frozen=True)
class ConsumerSettings:
    """Read from CONSUMER_<FIELD> (e.g. CONSUMER_LEASE_MS); see docs/architecture.md."""

    group: str
    consumer: str
    partitions: int = DEFAULT_PARTITIONS
    batch_size: int = 100
    # An idle partition costs one round trip per block; a stop or a re-drive wakes the read
    # (consumer_group.py), so the block only bounds what cannot be woken: a stale reader. At
    # most lease_ms - heartbeat_ms, a paused process's blocked read ends before its lease does.
    block_ms: int = 4000
    lease_ms: int = 5000
    heartbeat_ms: int = 1000
    retry_base_ms: int = 500
    retry_max_ms: int = 60_000
    max_deliveries: int = 5
    conflict_retries: int = 5
    outage_max_backoff_ms: int = 5000
    # The workers' transactions this process runs at once (its workers' PostgreSQL pool; the
    # heartbeat has a connection of its own). Fewer contend less for hot rows; more overlap
    # commits (docs/architecture.md, "Transactions at once"). 5: what the workers had before
    # the heartbeat got its own connection.
    max_transactions: int = 5

    def __post_init__(self) -> None:
        # the consumer's name is its Redis connections' name too (CLIENT SETNAME refuses these)
        if not self.consumer or not all("!" <= char <= "~" for char in self.consumer):
            raise ValueError(
                f"a consumer name is printable ASCII without spaces, not {self.consumer!r}"
            )
        # a read blocks this long: XREADGROUP BLOCK 0 would wait forever (a stop or a moved
        # partition never noticed), and one past the socket timeout would read as an outage
        if not 1 <= self.block_ms < SOCKET_TIMEOUT_S * 1000:
            raise ValueError(
                f"CONSUMER_BLOCK_MS must be from 1 to {SOCKET_TIMEOUT_S * 1000 - 1}"
                f" (milliseconds), not {self.block_ms}"
            )
        if self.max_transactions < 1:
            raise ValueError(
                f"CONSUMER_MAX_TRANSACTIONS must be 1 or more, not {self.max_transactions}"
            )

    def backoff_ms(self, attempts: int) -> int:
        return min(self.retry_base_ms * 2 ** max(attempts - 1, 0), self.retry_max_ms)


@dataclass(slots=True)  # not frozen: a frozen dataclass costs 7x as much to build, per entry
class Item:
    """One entry read from the partition, with what it turned out to be (never changed)."""

    stream: str
    entry_id: str
    fields: dict[str, str]
    envelope: Envelope | None = None  # decoded when this group handles its type
    redelivered: bool = False  # read from a pending list: it may have failed before (any owner)


@dataclass(frozen=True)
class Retry:
    """The entry whose handler failed: the partition waits for it until `due`."""

    stream: str
    entry_id: str
    attempts: int
    due: float  # time.monotonic()


class _Failed(Exception):
    """A transaction of a batch failed; `index` is the entry whose handler raised, if known."""

    def __init__(self, index: int | None, error: BaseException) -> None:
        super().__init__(str(error))
        self.index = index
        self.error = error


class PartitionWorker:
    """Handles one partition of one group while `lease` is this consumer's."""

    def __init__(
        self,
        redis_client: redis.Redis,
        fence_ops: StreamFence,
        pool: ConnectionPool,
        settings: ConsumerSettings,
        handlers: Mapping[str, Handler],
        lease: Lease,
        *,
        on_outcome: OutcomeHook | None = None,
        fault: Callable[[str], None] = no_faults,
        lock_orders: bool = False,
    ) -> None:
        self.redis = redis_client
        self.fence = fence_ops
        # the transaction's first statement takes each entry's order lock (LOCK_ORDERS)
        self.lock_orders = lock_orders
        self.pool = pool
        self.settings = settings
        self.handlers = handlers
        self.lease = lease
        self.streams = group_streams(settings.group, lease.partition)
        self.cursors = dict.fromkeys(self.streams, _PENDING)
        self.retry: Retry | None = None
        self._on_outcome = on_outcome or (lambda _type, _outcome, _seconds: None)
        self.fault = fault
        self._not_ours = EVENT_TYPES - set(handlers)
        # set by the consumer's heartbeat when this partition has re-drive requests
        self.redrive_wanted = threading.Event()
        # entries finished (committed, dead-lettered, gone) whose XACK is still to be sent: with
        # the next read's round trip, or at the end of a step not followed by one at once
        self._owed_acks: dict[str, list[str]] = {}
        self._metrics: dict[tuple[str, str], tuple[Any, Any]] = {}  # (type, outcome) -> children
        # this worker's reads keep one connection (a plain Redis; a cluster pipeline routes
        # each read to its node): given back when run() ends
        self._reads = None if is_cluster(redis_client) else HeldConnection(redis_client)

    @property
    def partition(self) -> int:
        return self.lease.partition

    # -- start: groups, and the previous owners' pending entries -------------------------------

    def ensure_groups(self) -> None:
        for stream in self.streams:
            try:
                # From "0": events published before this group first existed are not lost.
                self.redis.xgroup_create(stream, self.settings.group, id="0", mkstream=True)
            except redis.ResponseError as err:
                if "BUSYGROUP" not in str(err):
                    raise

    def take_over_pending(self) -> int:
        """Claim every entry of this partition still pending with another consumer (a previous
        owner). Called after the fence carries our epoch: another consumer's read can take entries
        once more at most (it then sees the fence), and our next read sees them and calls this
        again. The claimed entries are then read, in id order, with our own pending ones."""
        me, group, claimed = self.settings.consumer, self.settings.group, 0
        for stream in self.streams:
            summary = self.redis.xpending(stream, group)
            for holder in summary.get("consumers") or []:
                if holder["name"] == me:
                    continue
                while ids := [
                    info["message_id"]
                    for info in self.redis.xpending_range(
                        stream, group, min="-", max="+", count=500, consumername=holder["name"]
                    )
                ]:
                    self.redis.xclaim(
                        stream, group, me, min_idle_time=0, message_ids=ids, justid=True
                    )
                    claimed += len(ids)
        if claimed:
            self.cursors = dict.fromkeys(self.streams, _PENDING)  # read them, in id order
            log.info(
                "%s partition %s: took over %d pending entries", group, self.partition, claimed
            )
        return claimed

    # -- the loop ------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Until stopped or the partition is lost. Outages back off; nothing else stops it."""
        try:
            self._run(stop)
        finally:
            try:  # entries finished before the stop or the loss: acknowledged if Redis answers
                self.flush_acks()
            except redis.RedisError as err:
                log.warning(
                    "%s partition %s: acks not sent: %s", self.settings.group, self.partition, err
                )
            if self._reads is not None:
                self._reads.release()

    def _run(self, stop: threading.Event) -> None:
        delay = 0.1
        started = False
        while not stop.is_set():
            try:
                if not started:
                    self.ensure_groups()
                    self.take_over_pending()
                    started = True
                if self.retry and (wait := self.retry.due - time.monotonic()) > 0:
                    stop.wait(min(wait, 0.5))  # the partition waits for its failed entry
                    continue
                self.step(block_ms=self.settings.block_ms)
                delay = 0.1
            except (LostOwnership, Fenced) as err:
                log.warning("%s partition %s lost: %s", self.settings.group, self.partition, err)
                return
            except redis.ResponseError as err:
                if "NOGROUP" not in str(err) and classify(err) is not FailureKind.OUTAGE:
                    raise
                # Redis lost the stream or group (restart without data), or is refusing work.
                log.warning("consumer %s waiting for redis: %s", self.settings.group, err)
                started = False
                delay = self._back_off(stop, delay)
            except Exception as err:
                if classify(err) is not FailureKind.OUTAGE:
                    raise
                log.warning("consumer %s waiting for dependencies: %s", self.settings.group, err)
                if isinstance(err, redis.RedisError):
                    # Redis may come back with other data (restarted empty, an old AOF, a
                    # failover to a lagging replica: entries pending with a previous owner
                    # again): check the groups and take over the pending entries again.
                    started = False
                delay = self._back_off(stop, delay)

    def _back_off(self, stop: threading.Event, delay: float) -> float:
        """An outage costs no delivery attempt: re-read our pending entries afterwards."""
        CONSUMER_OUTAGES.labels(self.settings.group).inc()
        self.cursors = dict.fromkeys(self.streams, _PENDING)
        stop.wait(delay)
        return min(delay * 2, self.settings.outage_max_backoff_ms / 1000)

    def step(self, block_ms: int | None = None) -> int:
        """One fenced read and its handling; the number of entries read. With `block_ms`, a
        read of new entries waits up to that long for one (XREADGROUP BLOCK): an idle partition
        costs one round trip per block_ms, and a new entry one round trip before its handling.
        Without it, the read returns at once (fakeredis does not block: DESIGN.md §6a)."""
        if self.retry and self.retry.due > time.monotonic():
            return 0  # the partition waits for its failed entry
        s = self.settings
        reading_pending = any(cursor != _NEW for cursor in self.cursors.values())
        read = self.fence.read(
            s.group,
            s.consumer,
            self.partition,
            self.lease.epoch,
            self.cursors,
            s.batch_size,
            self._owed_acks,
            # not with re-drive requests waiting: they are handled after this read
            block_ms=None if reading_pending or self.redrive_wanted.is_set() else block_ms,
            via=self._reads,
        )
        self._owed_acks = {}
        pairs = read.entries
        if read.others_pending:
            # Entries of this partition are pending with someone else, maybe older than what
            # this read took: claim them and read ours again from the start, in id order.
            log.warning(
                "%s partition %s: entries pending with another consumer", s.group, self.partition
            )
            claimed = self.take_over_pending()
            self.cursors = dict.fromkeys(self.streams, _PENDING)
            return claimed + sum(len(entries) for _, entries in pairs)
        items: list[Item] = []
        gone: list[tuple[str, str]] = []
        for stream, entries in pairs:
            redelivered = self.cursors[stream] != _NEW
            if redelivered:  # paging through our pending entries
                self.cursors[stream] = entries[-1][0] if entries else _NEW
            for entry_id, fields in entries:
                if fields is None:
                    gone.append((stream, entry_id))
                else:
                    items.append(Item(stream, entry_id, fields, redelivered=redelivered))
        if not items and not gone and reading_pending:
            return self.step(block_ms)  # our pending entries are done: on to new ones
        if gone:
            self._ack_gone(gone)
        if items:
            try:
                self.handle(items)
            except BaseException:
                # Not finished (outage, lost lease, bug): the next step re-reads our pending
                # entries from the start, whoever calls it (run() or a test's drain()).
                self.cursors = dict.fromkeys(self.streams, _PENDING)
                raise
        redriven = 0
        if self.redrive_wanted.is_set():  # after the read: it never delays one
            self.redrive_wanted.clear()
            redriven = self.redrive_requested()
        # The acks owed go with the next read when one follows at once: in the run loop (which
        # blocks), or after a full read (a backlog); not while a failed entry waits for its retry.
        full = any(len(entries) >= s.batch_size for _, entries in pairs)
        if self.retry or not (full or block_ms):
            self.flush_acks()
        return len(items) + len(gone) + redriven

    # -- handling --------------------------------------------------------------------------------

    def handle(self, items: list[Item]) -> None:
        """Settle the items in order; stop at one whose handler failed and must be retried."""
        ignored: list[Item] = []
        work: list[Item] = []
        for item in items:
            event_type = item.fields.get("event_type", "?")
            if event_type in self._not_ours:
                # Most of what a group reads is for others: acknowledged without the cost of
                # validating a payload nobody here will use.
                ignored.append(item)
                continue
            try:
                envelope = decode_entry(item.fields)
                self._check_producer(item, envelope)
            except ContractError as err:
                self._dead_letter(item, f"contract: {err}", attempts=1)
                continue
            work.append(Item(item.stream, item.entry_id, item.fields, envelope, item.redelivered))
        if ignored:
            self._count_batch([(item.fields["event_type"], "ignored") for item in ignored], 0.0)
            self._ack(ignored)
        finished = self._commit_in_order(work)
        if finished < len(work):
            # Blocked on work[finished]: what was read after it is re-read, in order, later.
            self.cursors = dict.fromkeys(self.streams, _PENDING)

    def _check_producer(self, item: Item, envelope: Envelope) -> None:
        """An event only comes from its owner's stream (a re-driven one: from its original)."""
        stream = item.fields.get("original_stream", item.stream)
        if PRODUCER_OF_EVENT.get(envelope.event_type) != _producer_of(stream):
            raise ContractError(f"{envelope.event_type} is not published on {base_of(stream)}")

    def _commit_in_order(self, items: list[Item]) -> int:
        """Commit the items in order in as few transactions as possible; the number finished
        (committed, or dead-lettered) from the front. Stops at an entry that will be retried.

        Normally one transaction holds them all. A conflict (deadlock, serialization) is
        retried at once, one entry per transaction. A handler's error first commits the
        entries before it, then counts a failed attempt for that entry alone.
        """
        finished, size, conflicts = 0, len(items), 0
        solo_until = 0  # entries before this index go one per transaction (after a conflict)
        while finished < len(items):
            batch = items[finished : finished + size]
            try:
                self._transaction(batch)
            except _Failed as failed:
                kind = classify(failed.error)
                if kind is FailureKind.OUTAGE or isinstance(failed.error, LostOwnership):
                    raise failed.error from None
                if kind is FailureKind.CONFLICT and conflicts < self.settings.conflict_retries:
                    conflicts += 1
                    CONSUMER_CONFLICTS.labels(self.settings.group).inc()
                    log.info("conflict, retrying alone: %s", failed.error)
                    size, solo_until = 1, max(solo_until, finished + len(batch))
                    continue
                if failed.index is None and len(batch) > 1:
                    # the commit failed: find the culprit one entry at a time
                    size, solo_until = 1, max(solo_until, finished + len(batch))
                    continue
                if failed.index:
                    size = failed.index  # the entries before the culprit did nothing wrong
                    continue
                if not self._failed_attempt(batch[0], failed.error):
                    return finished
                finished += 1  # dead-lettered
                size, conflicts = self._next_size(items, finished, solo_until), 0
                continue
            finished += len(batch)
            size, conflicts = self._next_size(items, finished, solo_until), 0
        return finished

    @staticmethod
    def _next_size(items: list[Item], finished: int, solo_until: int) -> int:
        return 1 if finished < solo_until else len(items) - finished

    def _transaction(self, batch: list[Item]) -> None:
        """The batch's inbox rows and effects in one fenced transaction, then XACK."""
        started = time.perf_counter()
        outcomes: list[str] = []
        emitted: list[str] = []
        try:
            with self.pool.connection() as conn, conn.transaction():
                new, locked = self._fenced_inbox(conn, batch)
                for index, item in enumerate(batch):
                    if item.envelope is None or item.envelope.event_id not in new:
                        outcomes.append("duplicate")
                        continue
                    new.discard(item.envelope.event_id)  # a second copy in the batch: duplicate
                    try:
                        emitted += self._apply(conn, item, locked)
                    except Exception as err:
                        raise _Failed(index, err) from err
                    outcomes.append("processed")
                # Failures counted before (by this owner or a previous one) end here.
                if again := [item for item in batch if item.redelivered or self._is_retry(item)]:
                    conn.execute(
                        _FORGET_FAILURES,
                        (
                            self.settings.group,
                            [item.stream for item in again],
                            [item.entry_id for item in again],
                        ),
                    )
        except _Failed:
            raise
        except Exception as err:  # the fence, the pool, or the commit itself
            raise _Failed(None, err) from err
        if self.retry and any(self._is_retry(item) for item in batch):
            self.retry = None
        count_emitted(self.settings.group, emitted)
        settled = list(zip(outcomes, batch, strict=True))
        self._count_batch(
            [(item.envelope.event_type, outcome) for outcome, item in settled],  # type: ignore[union-attr]
            time.perf_counter() - started,
        )
        if log.isEnabledFor(logging.DEBUG):  # spare building the context on the hot path
            for outcome, item in settled:
                self._log_settled(outcome, item)
        self.fault("after_commit")
        self._ack(batch)

    def _fenced_inbox(
        self, conn: psycopg.Connection, batch: list[Item]
    ) -> tuple[set[str], frozenset[str]]:
        """First in the transaction: the lease fence (LostOwnership if the partition is no
        longer ours), the batch's inbox rows and, with `lock_orders`, the orders' locks; the
        event ids not seen before, and the orders locked."""
        envelopes = [item.envelope for item in batch]
        assert all(envelopes)
        group, lease = self.settings.group, self.lease
        params = [
            group,
            lease.partition,
            lease.epoch,
            group,
            ",".join([e.event_id for e in envelopes]),  # type: ignore[union-attr]
            ",".join([e.event_type for e in envelopes]),  # type: ignore[union-attr]
            ",".join([item.stream for item in batch]),
            ",".join([item.entry_id for item in batch]),
        ]
        locked: list[str] = []
        if self.lock_orders:
            # an id with a comma (none passes the contracts) is left to the handler's lock
            ids = (e.payload.get("order_id") for e in envelopes)  # type: ignore[union-attr]
            locked = [i for i in ids if isinstance(i, str) and "," not in i]
        if locked:
            params.append(",".join(locked))
        leases, new, *_ = conn.execute(
            _FENCED_INBOX_LOCKING_ORDERS if locked else _FENCED_INBOX, params
        ).fetchone()
        if not leases:
            raise lost(group, lease)
        return set(new), frozenset(locked)

    def _apply(
        self, conn: psycopg.Connection, item: Item, orders_locked: frozenset[str] = frozenset()
    ) -> list[str]:
        """Inside the transaction, for an entry whose inbox row is new: its handler; the
        event types it emitted."""
        envelope = item.envelope
        assert envelope is not None
        handler = self.handlers[envelope.event_type]
        # A CONSUMER span (tracing on), child of the entry's traceparent: what the handler
        # emits carries its context (service_runtime/tracing.py).
        with tracing.consume_span(item.stream, self.settings.group, item.entry_id, item.fields):
            uow = UnitOfWork(conn, cause=envelope, orders_locked=orders_locked)
            handler(uow, envelope)
            self.fault("mid_handler")
        return uow.emitted

    def _is_retry(self, item: Item) -> bool:
        return self.retry is not None and (item.stream, item.entry_id) == (
            self.retry.stream,
            self.retry.entry_id,
        )

    def _failed_attempt(self, item: Item, error: BaseException) -> bool:
        """Count a failed delivery (across owners, in the database); True if that was the
        last allowed one and the entry is now a dead letter, False if it waits for a retry."""
        assert item.envelope is not None
        started = time.perf_counter()
        message = f"{type(error).__name__}: {error}"[:2000]
        with self.pool.connection() as conn, conn.transaction():
            fence(conn, self.settings.group, self.lease)
            attempts = conn.execute(
                _COUNT_FAILURE,
                (self.settings.group, item.stream, item.entry_id, item.envelope.event_id, message),
            ).fetchone()[0]
        log.error(
            "handler failed for %s %s (attempt %d of %d)",
            item.envelope.event_type,
            item.envelope.event_id,
            attempts,
            self.settings.max_deliveries,
            exc_info=error,
            extra=_log_context(item.envelope, item.stream),
        )
        if attempts >= self.settings.max_deliveries:
            self._dead_letter(item, message, attempts)
            if self._is_retry(item):
                self.retry = None
            return True
        self._count("failed", item.envelope.event_type, started)
        due = time.monotonic() + self.settings.backoff_ms(attempts) / 1000
        self.retry = Retry(item.stream, item.entry_id, attempts, due)
        return False

    def _dead_letter(self, item: Item, error: str, attempts: int) -> None:
        """Record the entry as a dead letter in the service's database (fenced), then XACK."""
        group = self.settings.group
        record = {
            **item.fields,
            "original_stream": item.fields.get("original_stream", item.stream),
            "original_id": item.fields.get("original_id", item.entry_id),
            "group": group,
            "error": error[:2000],
            "attempts": str(attempts),
            "dead_lettered_at": datetime.now(UTC).isoformat(),
        }
        with self.pool.connection() as conn, conn.transaction():
            fence(conn, group, self.lease)
            conn.execute(
                _INSERT_DEAD_LETTER,
                {
                    "group": group,
                    "partition": self.partition,
                    "stream": item.stream,
                    "entry_id": item.entry_id,
                    "event_id": item.fields.get("event_id"),
                    "event_type": item.fields.get("event_type"),
                    "fields": Jsonb(record),
                    "error": error[:2000],
                    "attempts": attempts,
                },
            )
        self._ack([item])
        self._count("dead_lettered", item.fields.get("event_type", "?"), time.perf_counter())
        log.error("dead-lettered %s from %s: %s", item.entry_id, item.stream, error)

    # -- re-drives: requested in the dead_letters table, carried out by the owner ---------------

    def redrive_requested(self) -> int:
        """Handle the re-drive requests of this partition, each in one fenced transaction that
        records its outcome; the number handled. A handler error is recorded on the dead
        letter (which stays one); an outage or a lost lease leaves the request for later."""
        with self.pool.connection() as conn:
            requests = conn.execute(
                _REDRIVE_REQUESTS, (self.settings.group, self.partition)
            ).fetchall()
        for letter_id, stream, entry_id, record in requests:
            self._redrive(letter_id, Item(stream, entry_id, _envelope_fields(record)))
        return len(requests)

    def _redrive(self, letter_id: int, item: Item) -> None:
        started = time.perf_counter()
        try:
            envelope = decode_entry(item.fields)
            item = Item(item.stream, item.entry_id, item.fields, envelope)
            self._check_producer(item, envelope)
            with self.pool.connection() as conn, conn.transaction():
                # the same fence and inbox rule as any delivery: applied before, not again
                fresh, locked = self._fenced_inbox(conn, [item])
                emitted = self._apply(conn, item, locked) if fresh else []
                outcome = "processed" if fresh else "duplicate"
                conn.execute(_REDRIVEN, (f"re-driven: {outcome}", letter_id))
        except Exception as err:
            kind = classify(err)
            if isinstance(err, LostOwnership) or kind is FailureKind.OUTAGE:
                raise
            if kind is FailureKind.CONFLICT:
                return  # still requested: the next look tries again
            message = f"{type(err).__name__}: {err}"[:2000]
            with self.pool.connection() as conn, conn.transaction():
                fence(conn, self.settings.group, self.lease)
                conn.execute(_REDRIVE_FAILED, (f"re-drive failed: {message}", message, letter_id))
            log.error("re-drive of dead letter %s failed: %s", letter_id, message)
            self._count("failed", item.fields.get("event_type", "?"), started)
            return
        count_emitted(self.settings.group, emitted)
        self._settled(outcome, item, started)

    def _ack(self, items: list[Item]) -> None:
        """Owe these entries an XACK (only ever called once they are finished)."""
        for item in items:
            self._owed_acks.setdefault(item.stream, []).append(item.entry_id)

    def flush_acks(self) -> None:
        """Send the XACKs owed. One slot (the partition's hash tag): one round trip, on a
        cluster too. A crash before this redelivers the entries: the inbox absorbs them."""
        self.fence.ack(self.settings.group, self._owed_acks)
        self._owed_acks = {}

    def _ack_gone(self, gone: list[tuple[str, str]]) -> None:
        """Pending entries whose data was trimmed away: nothing left to handle. Never silent."""
        for stream, entry_id in gone:
            log.error(
                "pending entry %s of %s no longer exists; acknowledged unhandled", entry_id, stream
            )
            self._count("gone", "?", time.perf_counter())
        self._ack([Item(stream, entry_id, {}) for stream, entry_id in gone])

    def _settled(self, outcome: str, item: Item, started: float) -> None:
        assert item.envelope is not None
        self._count(outcome, item.envelope.event_type, started)
        if log.isEnabledFor(logging.DEBUG):
            self._log_settled(outcome, item)

    def _log_settled(self, outcome: str, item: Item) -> None:
        assert item.envelope is not None
        envelope = item.envelope
        log.debug("%s %s", outcome, envelope.event_type, extra=_log_context(envelope, item.stream))

    def _count(self, outcome: str, event_type: str, started: float) -> None:
        self._count_batch([(event_type, outcome)], time.perf_counter() - started)

    def _count_batch(self, settled: list[tuple[str, str]], seconds: float) -> None:
        """The metrics of entries settled together, each taking `seconds` (their transaction's
        time): one increment per (event type, outcome) instead of two per entry."""
        for (event_type, outcome), n in Counter(settled).items():
            metrics = self._metrics.get((event_type, outcome))
            if metrics is None:  # labels() looks the child up under a lock: once per pair
                group = self.settings.group
                metrics = self._metrics[(event_type, outcome)] = (
                    CONSUMER_EVENTS.labels(group, event_type, outcome),
                    CONSUMER_LATENCY.labels(group, event_type),
                )
            metrics[0].inc(n)
            observe_many(metrics[1], [seconds] * n)
        for event_type, outcome in settled:
            self._on_outcome(event_type, outcome, seconds)


@lru_cache(maxsize=1024)
def _producer_of(stream: str) -> str | None:
    """Whose events a (partition) stream carries; None for any other stream."""
    return _PRODUCER_OF_STREAM.get(base_of(stream))


def partitions_to_redrive(conn: psycopg.Connection, group: str) -> set[int]:
    """The group's partitions with re-drive requests: one query per consumer and heartbeat,
    not one per partition and second."""
    return {row[0] for row in conn.execute(_PARTITIONS_TO_REDRIVE, (group,))}


def _envelope_fields(record: Mapping[str, str]) -> dict[str, str]:
    """A dead letter's record without what the dead-lettering added (kept: where it came from,
    so the producer check looks at the original stream)."""
    added = {"group", "error", "attempts", "dead_lettered_at"}
    return {k: v for k, v in record.items() if k not in added}


def _log_context(envelope: Envelope, stream: str) -> dict[str, str]:
    """The fields the JSON log formatter lifts into every line about this event."""
    return {
        "event_id": envelope.event_id,
        "event_type": envelope.event_type,
        "correlation_id": envelope.correlation_id,
        "order_id": envelope.aggregate_id,
        "stream": stream,
    }
