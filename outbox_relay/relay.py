"""The relay loop: hold the outbox's advisory lock, publish batches, sleep until NOTIFY or poll.
After a full batch it drains the backlog with batches overlapped (publisher.drain), on a
second thread for Redis, a second at a time.

Only the holder of the lock publishes; a standby keeps trying to take it and becomes active
the moment the active relay's session ends (crash, kill, lost connection).

A session can also outlive its relay without ending: a relay cut off behind a proxy that is
alive but frozen (or a network fault before TCP keepalives notice it) keeps its backend, and
the lock, on the server. The active relay queries at least every `poll_seconds`, so its
backend's `state_change` moves; a standby that sees the lock holder's backend without activity
for longer than `takeover_after_seconds` terminates it (pg_terminate_backend: same role) and
takes the lock. A standby is so locked out for at most about takeover_after_seconds +
standby_retry_seconds. See docs/architecture.md, "Relay failover".

Redis losing data (docs/architecture.md, "Redis data loss"): the active relay compares what
Redis has with the published positions it recorded on becoming active, after every Redis
outage (a reconnect), and every `check_seconds`; every batch's XADD script checks its streams
too. Rows Redis no longer has are un-marked and published again by the normal path.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
import redis

from contracts import DEFAULT_PARTITIONS, relay_status_key
from outbox_relay import positions
from outbox_relay.durability import Durability, NotDurable
from outbox_relay.publisher import (
    FaultPoint,
    Unmarked,
    drain,
    mark_now,
    publish_batch,
    publish_marking_later,
)
from service_runtime.db import DB_OUTAGE_ERRORS, connect
from service_runtime.failures import is_outage
from service_runtime.faults import no_faults
from service_runtime.locks import RELAY_LOCK_KEY
from service_runtime.metrics import RELAY_BACKLOG
from service_runtime.redis_client import HeldConnection, is_cluster

log = logging.getLogger(__name__)

# The relay's own session (docs/architecture.md, "Relay batches"):
# - it plans its statements by index only. psycopg prepares a statement after a few runs, and
#   PostgreSQL keeps a prepared statement's generic plan until the table's statistics change:
#   made while the outbox was small (a new database, before autovacuum has analyzed it), it
#   seq-scans the outbox for every mark, and bitmap-scans the unpublished index for every
#   claim, which never sets the index's dead-entry hints. Measured on a new database at 100
#   orders/s: 280-390 us a mark, growing with the table, against 50-120 us by index.
# - its marks commit without waiting for the WAL flush: a mark lost with a PostgreSQL crash
#   leaves its rows unpublished, and they are sent again (duplicates, which the consumers'
#   inboxes absorb, never a loss). A repair, whose un-marking must not be lost, waits for the
#   flush (positions.repair).
SESSION_OPTIONS = "-c enable_seqscan=off -c enable_bitmapscan=off -c synchronous_commit=off"


def connect_session(database_url: str) -> psycopg.Connection:
    """The relay's own session: the holder of its lock (SESSION_OPTIONS)."""
    return connect(database_url, options=SESSION_OPTIONS)


# pg_try_advisory_lock(bigint) shows in pg_locks as classid = high 32 bits, objid = low 32
_LOCK_CLASSID, _LOCK_OBJID = RELAY_LOCK_KEY >> 32, RELAY_LOCK_KEY & 0xFFFFFFFF

# The holder's backend and how long it has been without a state change, terminated in the same
# statement when that is past the bound (a holder that was just active again is left alone).
_TERMINATE_STALE_HOLDER = """
SELECT a.pid, extract(epoch FROM now() - coalesce(a.state_change, a.backend_start))::float8,
       pg_terminate_backend(a.pid)
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.database = a.datid
  AND a.datname = current_database() AND l.classid = %s AND l.objid = %s AND l.objsubid = 1
  AND a.pid <> pg_backend_pid()
  AND now() - coalesce(a.state_change, a.backend_start) > make_interval(secs => %s)
"""


@dataclass(frozen=True)
class RelaySettings:
    producer: str
    partitions: int = DEFAULT_PARTITIONS
    batch_size: int = 500
    # A NOTIFY wakes the relay for every commit; the poll is the fallback, and the activity
    # a standby looks for (takeover_after_seconds is at least 3 polls). At 1 s the idle polls
    # were about a fifth of the relays' idle CPU (README, Performance).
    poll_seconds: float = 5.0
    standby_retry_seconds: float = 1.0
    # RELAY_TAKEOVER_AFTER_SECONDS: a lock holder idle this long is taken for dead (0: never)
    takeover_after_seconds: float = 15.0
    # RELAY_DURABILITY: ack | replicas:N | fsync (outbox_relay/durability.py)
    durability: str = "ack"
    # RELAY_WAIT_TIMEOUT_MS: how long WAIT / WAITAOF may wait for a batch
    wait_timeout_ms: int = 1000
    # RELAY_CHECK_SECONDS: how often every recorded stream is compared with Redis
    check_seconds: float = 5.0
    # RELAY_MARK_WITHIN_MS: at light load, how long a batch's mark may wait for the next
    # batch's claim to go with (one statement instead of two); 0: mark each batch at once
    mark_within_ms: int = 50

    @property
    def durability_mode(self) -> Durability:
        return Durability.parse(self.durability)

    def __post_init__(self) -> None:
        self.durability_mode  # noqa: B018 - refuse a malformed RELAY_DURABILITY at once
        if not 0 <= self.mark_within_ms <= 1000 * self.poll_seconds:
            raise ValueError(
                f"RELAY_MARK_WITHIN_MS ({self.mark_within_ms}) must be from 0 to"
                f" RELAY_POLL_SECONDS ({self.poll_seconds}) in ms"
            )
        # an active relay is idle up to poll_seconds between queries (plus a batch and some
        # scheduling noise): a bound that close to it would terminate healthy relays
        if self.takeover_after_seconds and self.takeover_after_seconds < 3 * self.poll_seconds:
            raise ValueError(
                f"RELAY_TAKEOVER_AFTER_SECONDS ({self.takeover_after_seconds}) must be 0 or at"
                f" least 3 x RELAY_POLL_SECONDS ({self.poll_seconds})"
            )


class Relay:
    def __init__(
        self,
        database_url: str,
        redis_client: redis.Redis,
        settings: RelaySettings,
        fault: FaultPoint = no_faults,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.database_url = database_url
        self.redis = redis_client
        self.settings = settings
        self.fault = fault
        self.on_batch = on_batch or (lambda _n: None)
        self.active = threading.Event()  # set while this relay holds the lock
        self.published = 0
        self.republished = 0  # rows un-marked by loss detection (published again since)
        self.recorded: dict[str, str] = {}  # published_positions, while active
        self.durability = settings.durability_mode
        self.durability.check_server(redis_client)  # DurabilityError: refuse to start
        self._sender: ThreadPoolExecutor | None = None  # drain()'s XADD thread, when needed
        # the batches' connection to a plain Redis, used by one thread at a time (this one, or
        # drain()'s, which is done with it before drain returns)
        self._sends = None if is_cluster(redis_client) else HeldConnection(redis_client)
        # the last batch, sent, its mark not written yet (RELAY_MARK_WITHIN_MS)
        self._unmarked: Unmarked | None = None

    def run(self, stop: threading.Event) -> None:
        delay = 0.2
        try:
            while not stop.is_set():
                try:
                    with connect_session(self.database_url) as conn:
                        if self._acquire(conn, stop):
                            delay = 0.2
                            self._publish_while_active(conn, stop)
                except DB_OUTAGE_ERRORS as err:
                    log.warning("relay %s: database unavailable: %s", self.settings.producer, err)
                finally:
                    self.active.clear()
                stop.wait(delay)
                delay = min(delay * 2, 5.0)
        finally:
            if self._sender is not None:  # idle: drain() returns with nothing in flight
                self._sender.shutdown()
                self._sender = None
            if self._sends is not None:
                self._sends.release()

    def _acquire(self, conn: psycopg.Connection, stop: threading.Event) -> bool:
        while not stop.is_set():
            if conn.execute("SELECT pg_try_advisory_lock(%s)", (RELAY_LOCK_KEY,)).fetchone()[0]:
                log.info("relay %s: active", self.settings.producer)
                self.active.set()
                self._report_status(active_since=_now(), published=0)
                return True
            if self._terminate_stale_holder(conn):
                continue  # its lock goes with its session: try again at once
            stop.wait(self.settings.standby_retry_seconds)
        return False

    def _terminate_stale_holder(self, conn: psycopg.Connection) -> bool:
        """End the lock holder's session when its backend has been idle past the bound."""
        after = self.settings.takeover_after_seconds
        if not after:
            return False
        try:
            params = (_LOCK_CLASSID, _LOCK_OBJID, after)
            row = conn.execute(_TERMINATE_STALE_HOLDER, params).fetchone()
        except psycopg.errors.InsufficientPrivilege as err:  # a holder of another role
            log.warning("relay %s: cannot end a stale lock holder: %s", self.settings.producer, err)
            return False
        if row is None:
            return False
        pid, idle, terminated = row
        log.warning(
            "relay %s: the active relay's session (backend %s) shows no activity for %.1f s"
            " (bound %.1f s): %s it to take over",
            self.settings.producer,
            pid,
            idle,
            after,
            "terminated" if terminated else "could not terminate",
        )
        if terminated:
            # pg_terminate_backend only signals: wait (bounded) for the session to go
            wait_gone = "SELECT count(*) FROM pg_stat_activity WHERE pid = %s"
            deadline = time.monotonic() + 5.0
            while conn.execute(wait_gone, (pid,)).fetchone()[0] and time.monotonic() < deadline:
                time.sleep(0.05)
        return bool(terminated)

    def _check_redis(self, conn: psycopg.Connection) -> None:
        """Compare every recorded stream with Redis; un-mark what Redis lost."""
        self.republished += positions.check_and_repair(
            conn, self.redis, self.settings.producer, self.recorded
        )

    def _publish_while_active(self, conn: psycopg.Connection, stop: threading.Event) -> None:
        conn.execute("LISTEN outbox")
        self.recorded = positions.load(conn)
        self._unmarked = None  # a batch left unmarked by a session that ended goes again
        redis_delay = 0.1
        woken = True  # as if notified: look at once
        backlog_checked = status_reported = 0.0
        checked_at: float | None = None  # None: check before publishing (start, reconnect)
        reported = self.published
        backlog = False  # the last batch was full
        while not stop.is_set():
            try:
                if (
                    checked_at is None
                    or time.monotonic() - checked_at >= self.settings.check_seconds
                ):
                    self._check_redis(conn)
                    checked_at = time.monotonic()
                # woken by a NOTIFY, or the poll found rows: claim (a transaction); an idle
                # poll is one query instead
                if backlog:
                    # the last batch was full: overlap batches (PostgreSQL marks one while
                    # Redis adds the next) for up to a second, then come back for the checks
                    _, backlog = drain(
                        conn,
                        self.redis,
                        self._executor(),
                        **self._batch_args(),
                        seconds=1.0,
                        on_commit=self._count,
                    )
                elif self.settings.mark_within_ms and (woken or self._unmarked is not None):
                    # one batch alone, its mark left for the next claim: at light load, the
                    # fewest round trips and no thread hop
                    unmarked, self._unmarked = self._unmarked, None  # marked, or goes again
                    self._unmarked, backlog = publish_marking_later(
                        conn, self.redis, unmarked, **self._batch_args(), on_commit=self._count
                    )
                elif woken or has_unpublished(conn):
                    # one batch alone, marked at once (RELAY_MARK_WITHIN_MS=0)
                    sent = publish_batch(conn, self.redis, **self._batch_args())
                    self._count(sent)
                    backlog = sent == self.settings.batch_size
            except NotDurable as err:
                # Rolled back: the rows stay unpublished and go again (duplicates, no loss).
                log.warning(
                    "relay %s: batch not durable, sending again: %s", self.settings.producer, err
                )
                backlog = False  # one batch alone first when it works again
                stop.wait(redis_delay)
                redis_delay = min(redis_delay * 2, 5.0)
                continue
            except redis.RedisError as err:
                if not is_outage(err):  # OOM, READONLY, LOADING... are outages too
                    raise
                # Keep the lock; the outbox buffers until Redis is back.
                log.warning("relay %s: redis unavailable: %s", self.settings.producer, err)
                checked_at = None  # a reconnect: Redis may have come back without its data
                backlog = False  # one batch alone first when it works again
                stop.wait(redis_delay)
                redis_delay = min(redis_delay * 2, 5.0)
                continue
            redis_delay = 0.1
            if time.monotonic() - status_reported >= 1.0 and self.published > reported:
                # At most once a second: at low rates a write per batch doubles the round trips.
                # Only a count: when a row was published is its published_at (`saga outbox`).
                self._report_status(published=self.published)
                status_reported, reported = time.monotonic(), self.published
            if not backlog:
                # the claim took every unpublished row there was: no backlog, no query
                RELAY_BACKLOG.labels(self.settings.producer).set(0)
            elif time.monotonic() - backlog_checked >= 1.0:
                RELAY_BACKLOG.labels(self.settings.producer).set(unpublished_count(conn))
                backlog_checked = time.monotonic()
            woken = True
            if self._unmarked is not None:
                # the mark waits for the next batch's claim to go with, but not long
                if self._wait_for_work(conn, stop, self.settings.mark_within_ms / 1000):
                    continue
                self._mark_now(conn)
            if not backlog:
                woken = self._wait_for_work(conn, stop, self.settings.poll_seconds)
        if self._unmarked is not None:  # stopping: what Redis took is marked, not sent again
            self._mark_now(conn)

    def _mark_now(self, conn: psycopg.Connection) -> None:
        unmarked, self._unmarked = self._unmarked, None
        if unmarked is not None:
            self._count(mark_now(conn, self.settings.producer, unmarked, self.recorded))

    def _count(self, sent: int) -> None:
        """Rows whose mark committed."""
        if sent:
            self.published += sent
            self.on_batch(sent)

    def _batch_args(self) -> dict[str, Any]:
        return {
            "producer": self.settings.producer,
            "partitions": self.settings.partitions,
            "batch_size": self.settings.batch_size,
            "fault": self.fault,
            "recorded": self.recorded,
            "durability": self.durability,
            "wait_timeout_ms": self.settings.wait_timeout_ms,
            "via": self._sends,
        }

    def _executor(self) -> ThreadPoolExecutor:
        """The thread that sends a drain's batches to Redis (started at the first backlog)."""
        if self._sender is None:
            self._sender = ThreadPoolExecutor(1, thread_name_prefix="relay-xadd")
        return self._sender

    def _report_status(self, **fields: object) -> None:
        """For `saga outbox`: who is active, since when, how much it published (best effort)."""
        try:
            self.redis.hset(
                relay_status_key(self.settings.producer),
                mapping={"holder": f"{socket.gethostname()}:{os.getpid()}", **fields},
            )
        except redis.RedisError as err:
            log.debug("relay status not written: %s", err)

    def _wait_for_work(
        self, conn: psycopg.Connection, stop: threading.Event, seconds: float
    ) -> bool:
        """Sleep until a producer's NOTIFY (True), or `seconds` passed (False: after
        poll_seconds, poll in case one was missed)."""
        deadline = time.monotonic() + seconds
        while True:
            # Drain what is buffered (first: what arrived during the last batch); any
            # notification means rows may have committed since our scan: scan again now.
            if sum(1 for _ in conn.notifies(timeout=0)):
                return True
            if stop.is_set() or (remaining := deadline - time.monotonic()) <= 0:
                return False
            # Sleep on the connection's socket (libpq's way: a NOTIFY makes it readable), in
            # slices of a second at most, so a stop request is honoured within one. Not
            # notifies(timeout=...): psycopg's wait wakes every 100 ms to look for signals,
            # which was most of an idle relay's CPU.
            select.select([conn], [], [], min(remaining, 1.0))


def _now() -> str:
    return datetime.now(UTC).isoformat()


def has_unpublished(conn: psycopg.Connection) -> bool:
    """Whether any row waits (the partial index of unpublished rows: one probe)."""
    return conn.execute(
        "SELECT EXISTS (SELECT 1 FROM outbox WHERE published_at IS NULL)"
    ).fetchone()[0]


def unpublished_count(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()[0]
