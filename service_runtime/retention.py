"""Retention (DESIGN.md §5): trim streams, prune outbox, inbox and delivery failures (rq cron).

The windows nest, and every process refuses to start when they do not (`require_nested_windows`):

    INBOX_RETENTION_HOURS >= OUTBOX_RETENTION_HOURS
                          >= STREAM_RETENTION_HOURS + the longest an entry may stay pending

- A stream entry may be needed (redelivered, or claimed by a new owner) while it is in a stream
  or pending: up to the stream window plus the longest a failing entry waits before it is
  dead-lettered (`pending_bound_hours`: CONSUMER_MAX_DELIVERIES x CONSUMER_RETRY_MAX_MS).
- The outbox must still hold the row for that long, so that "re-publish from the outbox"
  (`saga republish --since`, the relays' own check after Redis lost data) has what it promises.
- The inbox must remember an event for as long as it can be delivered again, i.e. as long as
  the outbox can re-publish it.

Defaults: streams 24 h, outbox 48 h, inbox 96 h. Outages cost a pending entry no delivery
attempt, so an entry can wait longer than the bound while a dependency is down; that is why a
stream is never trimmed below what every group reading it has delivered and acknowledged,
whatever its age (`trim_partition_stream`), and the age window is only the upper bound.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import psycopg
import redis

from contracts import STREAM_OF_PRODUCER, SUBSCRIPTIONS, base_of, partition_stream, redrive_stream
from service_runtime.config import SERVICES, ConfigError, database_url, from_env, redis_url
from service_runtime.consumer import ConsumerSettings
from service_runtime.db import connect
from service_runtime.metrics import JOBS_RUN, RETENTION_PRUNED, RETENTION_TRIM_HELD
from service_runtime.partitions import partitions_in_use
from service_runtime.redis_client import connect as redis_connect

log = logging.getLogger(__name__)

_PRUNE_BATCH = 5_000


@dataclass(frozen=True)
class Windows:
    """Read from STREAM_RETENTION_HOURS, OUTBOX_RETENTION_HOURS, INBOX_RETENTION_HOURS."""

    stream_retention_hours: float = 24.0
    outbox_retention_hours: float = 48.0
    inbox_retention_hours: float = 96.0


def pending_bound_hours(consumer: ConsumerSettings) -> float:
    """The longest a failing entry stays pending before it is dead-lettered: at most
    max_deliveries waits of at most retry_max_ms each (outages excepted, see above)."""
    return consumer.max_deliveries * consumer.retry_max_ms / 3_600_000


def nesting_errors(windows: Windows, consumer: ConsumerSettings) -> list[str]:
    """What is wrong with the windows, naming the variables; empty when they nest."""
    errors = []
    pending = pending_bound_hours(consumer)
    if windows.inbox_retention_hours < windows.outbox_retention_hours:
        errors.append(
            f"INBOX_RETENTION_HOURS ({windows.inbox_retention_hours:g}) must be at least "
            f"OUTBOX_RETENTION_HOURS ({windows.outbox_retention_hours:g}): an event re-published "
            "from the outbox would no longer be recognised as a duplicate"
        )
    needed = windows.stream_retention_hours + pending
    if windows.outbox_retention_hours < needed:
        errors.append(
            f"OUTBOX_RETENTION_HOURS ({windows.outbox_retention_hours:g}) must be at least "
            f"STREAM_RETENTION_HOURS ({windows.stream_retention_hours:g}) + the longest an entry "
            f"may stay pending, CONSUMER_MAX_DELIVERIES x CONSUMER_RETRY_MAX_MS "
            f"({consumer.max_deliveries} x {consumer.retry_max_ms} ms = {pending:.4g} h), "
            f"i.e. {needed:.4g}: the outbox could no longer re-publish what a stream still needs"
        )
    return errors


def require_nested_windows() -> None:
    """At start-up of every relay, consumer and cron: refuse to run unless the windows nest."""
    windows = from_env(Windows, "")
    consumer = from_env(ConsumerSettings, "CONSUMER_", group="-", consumer="-")
    if errors := nesting_errors(windows, consumer):
        raise ConfigError(
            "retention windows do not nest (DESIGN.md §5; INBOX_RETENTION_HOURS >= "
            "OUTBOX_RETENTION_HOURS >= STREAM_RETENTION_HOURS + pending bound):\n  - "
            + "\n  - ".join(errors)
        )


# -- PostgreSQL ------------------------------------------------------------------------------


def prune_outbox(conn: psycopg.Connection, older_than_hours: float) -> int:
    """Delete published rows older than the window, in small batches to keep locks short."""
    return _delete_in_batches(
        conn,
        """DELETE FROM outbox WHERE id IN (
               SELECT id FROM outbox WHERE published_at < now() - make_interval(secs => %s)
               LIMIT %s)""",
        older_than_hours * 3600,
    )


def prune_inbox(conn: psycopg.Connection, older_than_hours: float) -> int:
    return _delete_in_batches(
        conn,
        """DELETE FROM inbox WHERE (consumer_group, event_id) IN (
               SELECT consumer_group, event_id FROM inbox
               WHERE processed_at < now() - make_interval(secs => %s) LIMIT %s)""",
        older_than_hours * 3600,
    )


def prune_delivery_failures(conn: psycopg.Connection, older_than_hours: float) -> int:
    """Failure counts of entries last failed longer ago than the inbox window: their entries
    were dead-lettered or handled long since (a count is kept while the entry is retried)."""
    return _delete_in_batches(
        conn,
        """DELETE FROM delivery_failures WHERE (consumer_group, stream, entry_id) IN (
               SELECT consumer_group, stream, entry_id FROM delivery_failures
               WHERE updated_at < now() - make_interval(secs => %s) LIMIT %s)""",
        older_than_hours * 3600,
    )


def _delete_in_batches(conn: psycopg.Connection, query: str, seconds: float) -> int:
    deleted = 0
    while True:
        with conn.transaction():
            count = conn.execute(query, (seconds, _PRUNE_BATCH)).rowcount
        deleted += count
        if count < _PRUNE_BATCH:
            return deleted


# -- Redis -----------------------------------------------------------------------------------


def readers(stream: str) -> tuple[str, ...]:
    """The groups that must have read a stream before it is trimmed (by its base name)."""
    base = base_of(stream)
    if base.endswith(".redrive"):
        return (base.removesuffix(".redrive"),)
    return tuple(group for group, bases in SUBSCRIPTIONS.items() if base in bases)


@dataclass(frozen=True)
class TrimResult:
    stream: str
    trimmed: int
    min_id: str | None  # the MINID used; None when nothing could be trimmed
    held_by: list[str]  # groups whose undelivered or pending entries are older than the horizon


def trim_partition_stream(
    client: redis.Redis, stream: str, older_than_hours: float, groups: tuple[str, ...] = ()
) -> TrimResult:
    """Trim a stream below the age horizon, but never an entry some group has not delivered
    and acknowledged: the MINID is the lowest of the horizon and, per group, its oldest pending
    entry (else its last-delivered id). A group of `groups` that does not exist on the stream
    yet will read it from the start: then nothing is trimmed.

    Groups that hold the trim back are returned and logged: their entries are kept, however
    old, until they are handled or dead-lettered.
    """
    horizon = (int((time.time() - older_than_hours * 3600) * 1000), 0)
    try:
        infos = client.xinfo_groups(stream)
    except redis.ResponseError:
        return TrimResult(stream, 0, None, [])  # no such stream yet
    missing = sorted(set(groups) - {info["name"] for info in infos})
    if missing:
        log.warning("retention: not trimming %s: group(s) %s never read it", stream, missing)
        for group in missing:
            RETENTION_TRIM_HELD.labels(group=group).inc()
        return TrimResult(stream, 0, None, missing)
    floor = horizon
    held_by = []
    for info in infos:
        # Everything up to last-delivered was delivered; of that, only the pending entries
        # are not acknowledged yet.
        last = _parse(info["last-delivered-id"])
        keep_from = (last[0], last[1] + 1)
        if info["pending"]:
            keep_from = min(keep_from, _parse(client.xpending(stream, info["name"])["min"]))
        if keep_from < horizon and (
            info["pending"]
            or client.xrange(stream, min=_text(keep_from), max=_text(horizon), count=1)
        ):
            held_by.append(info["name"])
            RETENTION_TRIM_HELD.labels(group=info["name"]).inc()
        floor = min(floor, keep_from)
    if held_by:
        log.warning(
            "retention: %s keeps entries older than %g h for group(s) %s, pending or not yet "
            "delivered; trimmed only below %s",
            stream,
            older_than_hours,
            ", ".join(held_by),
            _text(floor),
        )
    trimmed = client.xtrim(stream, minid=_text(floor), approximate=False)
    if trimmed:
        RETENTION_PRUNED.labels(what="stream_entries").inc(trimmed)
        log.info("retention: trimmed %d entries of %s below %s", trimmed, stream, _text(floor))
    return TrimResult(stream, trimmed, _text(floor), held_by)


def _parse(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)


def _text(entry_id: tuple[int, int]) -> str:
    return f"{entry_id[0]}-{entry_id[1]}"


def trimmed_streams(partitions: int) -> list[tuple[str, tuple[str, ...]]]:
    """Every stream retention trims, with the groups that read it. Dead-letter streams are
    never trimmed: a dead letter stays until someone re-drives it."""
    streams = [
        partition_stream(base, p) for base in STREAM_OF_PRODUCER.values() for p in range(partitions)
    ]
    streams += [redrive_stream(g, p) for g in SUBSCRIPTIONS for p in range(partitions)]
    return [(s, readers(s)) for s in streams]


def run_retention() -> dict[str, Any]:
    """rq job: trim the streams first (the outbox, pruned after, covers a longer window), then
    prune every service's outbox, inbox and delivery failures. Refuses (ConfigError) to run
    with windows that do not nest."""
    require_nested_windows()
    windows = from_env(Windows, "")
    report: dict[str, Any] = {}
    client = redis_connect(redis_url())
    trimmed = 0
    held: dict[str, list[str]] = {}
    for stream, groups in trimmed_streams(partitions_in_use()):
        result = trim_partition_stream(client, stream, windows.stream_retention_hours, groups)
        trimmed += result.trimmed
        if result.held_by:
            held[stream] = result.held_by
    report["streams.trimmed"] = trimmed
    report["streams.held_back_by"] = held
    for service in SERVICES:
        with connect(database_url(service)) as conn:
            for what, prune, hours in (
                ("outbox", prune_outbox, windows.outbox_retention_hours),
                ("inbox", prune_inbox, windows.inbox_retention_hours),
                ("delivery_failures", prune_delivery_failures, windows.inbox_retention_hours),
            ):
                count = prune(conn, hours)
                RETENTION_PRUNED.labels(what=what).inc(count)
                report[f"{service}.{what}_pruned"] = count
    log.info("retention: %s", report)
    JOBS_RUN.labels("run_retention").inc()
    return report
