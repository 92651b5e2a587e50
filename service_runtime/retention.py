"""Retention: prune what was delivered long ago, trim streams by age (rq cron jobs).

Windows must nest: the inbox has to remember an event for at least as long as the event can
be delivered again, i.e. longer than the outbox window (re-publish after Redis data loss) and
the stream window (redelivery of pending entries).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import psycopg
import redis

from contracts import STREAM_OF_PRODUCER
from service_runtime.config import SERVICES, database_url, from_env, redis_url
from service_runtime.db import connect
from service_runtime.metrics import JOBS_RUN
from service_runtime.redis_client import connect as redis_connect

log = logging.getLogger(__name__)

_PRUNE_BATCH = 5_000


@dataclass(frozen=True)
class Windows:
    """Read from OUTBOX_RETENTION_HOURS, INBOX_RETENTION_HOURS, STREAM_RETENTION_HOURS."""

    outbox_retention_hours: float = 24.0
    inbox_retention_hours: float = 72.0
    stream_retention_hours: float = 24.0


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


def _delete_in_batches(conn: psycopg.Connection, query: str, seconds: float) -> int:
    deleted = 0
    while True:
        with conn.transaction():
            count = conn.execute(query, (seconds, _PRUNE_BATCH)).rowcount
        deleted += count
        if count < _PRUNE_BATCH:
            return deleted


def trim_stream(client: redis.Redis, stream: str, older_than_hours: float) -> tuple[int, list[str]]:
    """XTRIM MINID by age; returns (entries trimmed, groups that had not read up to the horizon).

    A group behind the horizon loses entries it never saw: that is reported loudly (and the
    outbox can re-publish them within its window), never skipped silently.
    """
    horizon_ms = int((time.time() - older_than_hours * 3600) * 1000)
    horizon = f"{horizon_ms}-0"
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:
        return 0, []  # no such stream yet
    behind = [
        g["name"]
        for g in groups
        if _entry_ms(g["last-delivered-id"]) < horizon_ms
        and client.xrange(stream, min=_after(g["last-delivered-id"]), max=horizon, count=1)
    ]
    for group in behind:
        log.error("consumer group %s on %s is behind the trim horizon %s", group, stream, horizon)
    trimmed = client.xtrim(stream, minid=horizon, approximate=False)
    return trimmed, behind


def _entry_ms(entry_id: str) -> int:
    return int(entry_id.split("-")[0])


def _after(entry_id: str) -> str:
    return f"({entry_id}"


def run_retention() -> dict[str, int | list[str]]:
    """rq job: prune every service's outbox and inbox, trim the event streams."""
    windows = from_env(Windows, "")
    report: dict[str, int | list[str]] = {}
    for service in SERVICES:
        with connect(database_url(service)) as conn:
            report[f"{service}.outbox_pruned"] = prune_outbox(conn, windows.outbox_retention_hours)
            report[f"{service}.inbox_pruned"] = prune_inbox(conn, windows.inbox_retention_hours)
    client = redis_connect(redis_url())
    for stream in STREAM_OF_PRODUCER.values():
        trimmed, behind = trim_stream(client, stream, windows.stream_retention_hours)
        report[f"{stream}.trimmed"] = trimmed
        report[f"{stream}.groups_behind"] = behind
    log.info("retention: %s", report)
    JOBS_RUN.labels("run_retention").inc()
    return report
