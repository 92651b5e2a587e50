"""Stream consumer: consumer groups, idempotent inbox, retries with backoff, dead letters.

Each entry is handled in a local transaction that also writes the inbox row keyed by
(group, event_id); a duplicate delivery finds the row and changes nothing. XACK happens only
after that commit, so a crash in between means a redelivery, which the inbox absorbs.
The entries of one read share that transaction as long as none fails.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
import redis
from psycopg_pool import ConnectionPool

from contracts import (
    EVENT_TYPES,
    ContractError,
    Envelope,
    dead_letter_stream,
    decode_entry,
    redrive_stream,
)
from service_runtime.db import DB_OUTAGE_ERRORS
from service_runtime.faults import no_faults
from service_runtime.metrics import CONSUMER_EVENTS, CONSUMER_LATENCY
from service_runtime.redis_client import REDIS_OUTAGE_ERRORS
from service_runtime.unit_of_work import UnitOfWork, count_emitted

log = logging.getLogger(__name__)

Handler = Callable[[UnitOfWork, Envelope], None]
Entry = tuple[str, dict[str, str]]

_INSERT_INBOX = """
INSERT INTO inbox (consumer_group, event_id, event_type, stream, entry_id)
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT DO NOTHING
RETURNING 1
"""


@dataclass(frozen=True)
class ConsumerSettings:
    group: str
    consumer: str
    streams: tuple[str, ...]
    batch_size: int = 100
    block_ms: int = 1000
    claim_idle_ms: int = 30_000
    retry_base_ms: int = 500
    retry_max_ms: int = 60_000
    max_deliveries: int = 5
    maintenance_interval_s: float = 0.5

    @property
    def all_streams(self) -> tuple[str, ...]:
        """The subscribed streams plus this group's own re-drive stream."""
        return (*self.streams, redrive_stream(self.group))

    def backoff_ms(self, deliveries: int) -> int:
        return min(self.retry_base_ms * 2 ** max(deliveries - 1, 0), self.retry_max_ms)


@dataclass
class Stats:
    processed: int = 0
    duplicates: int = 0
    ignored: int = 0
    failed: int = 0
    dead_lettered: int = 0


class StreamConsumer:
    def __init__(
        self,
        redis_client: redis.Redis,
        pool: ConnectionPool,
        settings: ConsumerSettings,
        handlers: Mapping[str, Handler],
        on_outcome: Callable[[str, str, float], None] | None = None,
        fault: Callable[[str], None] = no_faults,
    ) -> None:
        self.redis = redis_client
        self.pool = pool
        self.settings = settings
        self.handlers = handlers
        self.stats = Stats()
        self._on_outcome = on_outcome or (lambda _type, _outcome, _seconds: None)
        self.fault = fault
        self._not_ours = EVENT_TYPES - set(handlers)

    # -- setup -------------------------------------------------------------------------

    def ensure_groups(self) -> None:
        for stream in self.settings.all_streams:
            try:
                # From "0": events published before this group first existed are not lost.
                self.redis.xgroup_create(stream, self.settings.group, id="0", mkstream=True)
            except redis.ResponseError as err:
                if "BUSYGROUP" not in str(err):
                    raise

    # -- one step each; none of them blocks unless asked to ------------------------------

    def read_own_pending_once(self) -> int:
        """Re-read entries delivered to this consumer name but never acknowledged (restart).

        One pass over this consumer's pending entries, page by page: an entry that fails again
        stays pending for retry_failed_once (backoff, dead letter), and is not re-read here.
        """
        s = self.settings
        handled = 0
        cursors = {stream: "0" for stream in s.all_streams}
        while cursors:
            reply = self.redis.xreadgroup(s.group, s.consumer, cursors, count=s.batch_size)
            cursors = {}
            for stream, entries in _as_pairs(reply):
                if not entries:
                    continue
                cursors[stream] = entries[-1][0]  # the next page starts after this entry
                live = [entry for entry in entries if entry[1]]
                handled += self._handle_entries(stream, live, attempt=None)
        return handled

    def read_new_once(self, block_ms: int | None = None) -> int:
        return self._read({stream: ">" for stream in self.settings.all_streams}, block_ms)

    def retry_failed_once(self) -> int:
        """Retry this consumer's failed entries whose backoff has elapsed."""
        handled = 0
        s = self.settings
        for stream in s.all_streams:
            pending = self.redis.xpending_range(
                stream,
                s.group,
                min="-",
                max="+",
                count=s.batch_size,
                consumername=s.consumer,
                idle=s.retry_base_ms,
            )
            for info in pending:
                deliveries = info["times_delivered"]
                if info["time_since_delivered"] < s.backoff_ms(deliveries):
                    continue
                claimed = self.redis.xclaim(
                    stream,
                    s.group,
                    s.consumer,
                    min_idle_time=s.backoff_ms(deliveries),
                    message_ids=[info["message_id"]],
                )
                handled += self._handle_claimed(
                    stream, [info["message_id"]], claimed, deliveries + 1
                )
        return handled

    def claim_abandoned_once(self) -> int:
        """Take over entries left pending by consumers that died (XAUTOCLAIM after an idle time)."""
        handled = 0
        s = self.settings
        for stream in s.all_streams:
            reply = self.redis.xautoclaim(
                stream,
                s.group,
                s.consumer,
                min_idle_time=s.claim_idle_ms,
                start_id="0-0",
                count=s.batch_size,
            )
            claimed = [entry for entry in reply[1] if entry and entry[1] is not None]
            handled += self._handle_entries(stream, claimed, attempt=None)
        return handled

    # -- the loop ------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        delay = 0.1
        started = False
        last_maintenance = 0.0
        while not stop.is_set():
            try:
                if not started:
                    self.ensure_groups()
                    self.read_own_pending_once()
                    started = True
                self.read_new_once(block_ms=self.settings.block_ms)
                if time.monotonic() - last_maintenance >= self.settings.maintenance_interval_s:
                    self.retry_failed_once()
                    self.claim_abandoned_once()
                    last_maintenance = time.monotonic()
                delay = 0.1
            except (*REDIS_OUTAGE_ERRORS, *DB_OUTAGE_ERRORS) as err:
                log.warning("consumer %s waiting for dependencies: %s", self.settings.group, err)
                stop.wait(delay)
                delay = min(delay * 2, 5.0)
            except redis.ResponseError as err:
                if "NOGROUP" not in str(err):
                    raise
                # The stream or group vanished (Redis lost its data): recreate and go on.
                log.warning("consumer group missing, recreating: %s", err)
                started = False

    # -- internals -----------------------------------------------------------------------

    def _read(self, streams: dict[str, str], block_ms: int | None) -> int:
        reply = self.redis.xreadgroup(
            self.settings.group,
            self.settings.consumer,
            streams,
            count=self.settings.batch_size,
            block=block_ms,
        )
        handled = 0
        for stream, entries in _as_pairs(reply):
            live = [entry for entry in entries if entry[1]]
            handled += self._handle_entries(
                stream, live, attempt=1 if streams[stream] == ">" else None
            )
        return handled

    def _handle_claimed(
        self, stream: str, ids: list[str], claimed: list[Entry], attempt: int
    ) -> int:
        present = {entry_id for entry_id, fields in claimed if fields}
        gone = [entry_id for entry_id in ids if entry_id not in present]
        if gone:  # trimmed away while pending: nothing left to deliver
            self.redis.xack(stream, self.settings.group, *gone)
        return self._handle_entries(stream, [e for e in claimed if e[1]], attempt)

    def _handle_entries(self, stream: str, entries: Iterable[Entry], attempt: int | None) -> int:
        entries = list(entries)
        # Events of a known type this group has no handler for are most of what it reads:
        # acknowledge them without the cost of validating a payload nobody here will use.
        # An unknown type still goes through validation, and so to the dead letters.
        ours: list[Entry] = []
        ignored: list[str] = []
        for entry_id, fields in entries:
            if fields.get("event_type") in self._not_ours:
                ignored.append(entry_id)
                self._count("ignored", fields["event_type"], time.perf_counter())
            else:
                ours.append((entry_id, fields))
        done = self._handle_together(stream, ours, attempt)
        if done is None:
            done = self._handle_each(stream, ours, attempt)
        done = ignored + done
        if done:
            self.fault("after_commit")
            self.redis.xack(stream, self.settings.group, *done)
        return len(entries)

    def _handle_each(
        self, stream: str, entries: list[Entry], attempt: int | None, skip: str = ""
    ) -> list[str]:
        """One transaction per entry; the ids that may be acknowledged."""
        return [
            entry_id
            for entry_id, fields in entries
            if entry_id != skip and self.handle_entry(stream, entry_id, fields, attempt)
        ]

    def _handle_together(
        self, stream: str, entries: list[Entry], attempt: int | None
    ) -> list[str] | None:
        """Handle a read's entries in one transaction; the ids that may be acknowledged.

        A transaction per event costs a pool checkout, BEGIN and a COMMIT each: sharing
        them more than doubles what one consumer keeps up with under load. Each event's
        effects, outbox rows and inbox row still commit together, and XACK still follows the
        commit. None, having done nothing, for a single entry or one off contract. When a
        handler fails, all is rolled back, that entry's failure is recorded as for one entry
        (retry or dead letter; its handler is not run again) and the others are handled one
        transaction each.
        """
        if len(entries) < 2:
            return None
        started = time.perf_counter()
        try:
            envelopes = [decode_entry(fields) for _entry_id, fields in entries]
        except ContractError:
            return None
        settled: list[tuple[str, Envelope]] = []
        emitted: list[str] = []
        current = 0  # the entry being applied: the culprit if something raises
        try:
            with self.pool.connection() as conn, conn.transaction():
                for current, (entry_id, _fields) in enumerate(entries):
                    outcome, new_events = self._apply(conn, stream, entry_id, envelopes[current])
                    settled.append((outcome, envelopes[current]))
                    emitted += new_events
        except DB_OUTAGE_ERRORS:
            raise  # as for one entry: the run loop backs off, the entries stay pending
        except Exception as err:
            if len(settled) == len(entries):  # the commit failed: no culprit to single out
                return self._handle_each(stream, entries, attempt)
            entry_id, fields = entries[current]
            self._handler_failed(
                stream, entry_id, fields, envelopes[current], attempt, err, started
            )
            return self._handle_each(stream, entries, attempt, skip=entry_id)
        count_emitted(self.settings.group, emitted)
        for outcome, envelope in settled:
            self._settled(outcome, envelope, stream, started)
        return [entry_id for entry_id, _fields in entries]

    def handle_entry(
        self, stream: str, entry_id: str, fields: dict[str, str], attempt: int | None
    ) -> bool:
        """Handle one entry; True when it may be acknowledged."""
        started = time.perf_counter()
        event_type = fields.get("event_type", "?")
        try:
            envelope = decode_entry(fields)
        except ContractError as err:
            self._dead_letter(stream, entry_id, fields, f"contract: {err}", attempt or 1)
            self._count("dead_lettered", event_type, started)
            return False  # acknowledged atomically with the dead letter
        try:
            with self.pool.connection() as conn, conn.transaction():
                outcome, emitted = self._apply(conn, stream, entry_id, envelope)
        except DB_OUTAGE_ERRORS:
            raise  # not the handler's fault: the run loop backs off; the entry stays pending
        except Exception as err:
            self._handler_failed(stream, entry_id, fields, envelope, attempt, err, started)
            return False  # stays pending: retried after a backoff by retry_failed_once
        count_emitted(self.settings.group, emitted)
        self._settled(outcome, envelope, stream, started)
        return True

    def _apply(
        self, conn: psycopg.Connection, stream: str, entry_id: str, envelope: Envelope
    ) -> tuple[str, list[str]]:
        """Inside the caller's transaction: the inbox row, then the handler unless the event
        was seen before. Returns the outcome and the event types the handler emitted."""
        handler = self.handlers.get(envelope.event_type)
        if handler is None:
            return "ignored", []
        inbox = (self.settings.group, envelope.event_id, envelope.event_type, stream, entry_id)
        if not conn.execute(_INSERT_INBOX, inbox).fetchone():
            return "duplicate", []
        uow = UnitOfWork(conn, cause=envelope)
        handler(uow, envelope)
        self.fault("mid_handler")
        return "processed", uow.emitted

    def _settled(self, outcome: str, envelope: Envelope, stream: str, started: float) -> None:
        """After the commit: count the outcome, and log it at DEBUG."""
        self._count(outcome, envelope.event_type, started)
        if log.isEnabledFor(logging.DEBUG):  # spare building the context on the hot path
            log.debug("%s %s", outcome, envelope.event_type, extra=_log_context(envelope, stream))

    def _handler_failed(
        self,
        stream: str,
        entry_id: str,
        fields: dict[str, str],
        envelope: Envelope,
        attempt: int | None,
        err: Exception,
        started: float,
    ) -> None:
        """Log and count a handler's failure; after the last delivery, dead-letter the entry."""
        log.exception(
            "handler failed for %s %s (attempt %s)",
            envelope.event_type,
            envelope.event_id,
            attempt,
            extra=_log_context(envelope, stream),
        )
        if attempt is not None and attempt >= self.settings.max_deliveries:
            self._dead_letter(stream, entry_id, fields, f"{type(err).__name__}: {err}", attempt)
            self._count("dead_lettered", envelope.event_type, started)
        else:
            self._count("failed", envelope.event_type, started)

    def _dead_letter(
        self, stream: str, entry_id: str, fields: dict[str, str], error: str, attempts: int
    ) -> None:
        record = {
            **fields,
            "original_stream": stream,
            "original_id": entry_id,
            "group": self.settings.group,
            "error": error[:2000],
            "attempts": str(attempts),
            "dead_lettered_at": datetime.now(UTC).isoformat(),
        }
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(dead_letter_stream(self.settings.group), record)
        pipe.xack(stream, self.settings.group, entry_id)
        pipe.execute()
        log.error("dead-lettered %s from %s: %s", entry_id, stream, error)

    def _count(self, outcome: str, event_type: str, started: float) -> None:
        attr = "duplicates" if outcome == "duplicate" else outcome
        setattr(self.stats, attr, getattr(self.stats, attr) + 1)
        seconds = time.perf_counter() - started
        CONSUMER_EVENTS.labels(self.settings.group, event_type, outcome).inc()
        CONSUMER_LATENCY.labels(self.settings.group, event_type).observe(seconds)
        self._on_outcome(event_type, outcome, seconds)


def _as_pairs(reply: object) -> list[tuple[str, list[Entry]]]:
    """XREADGROUP's RESP2 reply: a list of [stream, entries], or None when nothing came."""
    return [(stream, entries) for stream, entries in reply] if reply else []


def _log_context(envelope: Envelope, stream: str) -> dict[str, str]:
    """The fields the JSON log formatter lifts into every line about this event."""
    return {
        "event_id": envelope.event_id,
        "event_type": envelope.event_type,
        "correlation_id": envelope.correlation_id,
        "order_id": envelope.aggregate_id,
        "stream": stream,
    }
