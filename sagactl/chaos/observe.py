"""What the chaos run measures: backlog (is it quiet yet?), duplicates absorbed, dead letters,
and partition ownership (changes of owner, the longest time a partition had no live owner).

Streams are partitioned (contracts.streams): every figure here walks the P partition streams
of each base stream and the per-partition re-drive streams of each group; dead letters and
loss detection's re-publishing are read from each service's own database."""

from __future__ import annotations

import re
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
import redis

from contracts import (
    STREAM_OF_PRODUCER,
    SUBSCRIPTIONS,
    group_streams,
    producer_streams,
)
from service_runtime import asyncapi, retention
from service_runtime.config import SERVICES
from service_runtime.ownership import owners


def backlog(db_urls: Mapping[str, str], client: redis.Redis, partitions: int) -> dict[str, int]:
    """Everything still in motion; empty means quiet. Pending orders, unpublished outbox rows,
    partitions without a live owner (a killed consumer's, until its lease runs out and they
    are taken again), and per group and partition stream (re-drive streams included) the
    entries not yet delivered or not yet acknowledged."""
    found: dict[str, int] = {}
    with psycopg.connect(db_urls["orders"], connect_timeout=3) as conn:
        found["pending orders"] = conn.execute(
            "SELECT count(*) FROM orders WHERE status = 'pending'"
        ).fetchone()[0]
    for service in SERVICES:
        with psycopg.connect(db_urls[service], connect_timeout=3) as conn:
            found[f"{service} outbox unpublished"] = conn.execute(
                "SELECT count(*) FROM outbox WHERE published_at IS NULL"
            ).fetchone()[0]
            if service in SUBSCRIPTIONS:
                found[f"{service} partitions without a live owner"] = unowned_partitions(
                    conn, service, partitions
                )
    for group in SUBSCRIPTIONS:
        for stream in (s for p in range(partitions) for s in group_streams(group, p)):
            if not client.exists(stream):
                continue
            info = {g["name"]: g for g in client.xinfo_groups(stream)}.get(group)
            after = info["last-delivered-id"] if info else "0-0"
            found[f"{group} <- {stream} undelivered"] = len(
                client.xrange(stream, min=f"({after}", max="+", count=10_000)
            )
            found[f"{group} <- {stream} unacknowledged"] = info["pending"] if info else 0
    return {key: count for key, count in found.items() if count}


def wait_for_quiet(
    check: Callable[[], dict[str, int]], timeout: float, stable: int = 3, interval: float = 1.0
) -> tuple[float | None, dict[str, int]]:
    """Poll until `check` finds nothing `stable` times in a row; returns (time.monotonic() of
    the first of those checks, or None on timeout; the last backlog seen)."""
    deadline = time.monotonic() + timeout
    quiet_since: float | None = None
    streak = 0
    while True:
        checked_at = time.monotonic()
        try:
            last = check()
        except (psycopg.Error, redis.RedisError) as err:
            last = {f"unreachable: {type(err).__name__}": 1}
        if last:
            streak, quiet_since = 0, None
        else:
            quiet_since = quiet_since or checked_at
            streak += 1
            if streak >= stable:
                return quiet_since, last
        if time.monotonic() >= deadline:
            return None, last
        time.sleep(interval)


def handled_types() -> dict[str, frozenset[str]]:
    """group -> the event types its reactions handle (reactions.HANDLERS)."""
    return {group: asyncapi.handled_types(group) for group in SUBSCRIPTIONS}


def undelivered_events(db_urls: Mapping[str, str], examples: int = 5) -> dict[str, Any]:
    """Events in a producer's outbox that a group reacting to them never took: no inbox row
    and no dead letter in the group's database. Once the system is quiet, each one is a saga
    step lost on the way (a stream entry Redis lost that nobody published again); a saga that
    only ran late (an outage longer than the payment deadline) has none. Valid while the
    outbox and inbox rows are kept (retention: hours; a soak lasts minutes)."""
    handled = handled_types()
    received: dict[str, set[str]] = {}
    for group in SUBSCRIPTIONS:
        with psycopg.connect(db_urls[group], connect_timeout=3) as conn:
            received[group] = {
                row[0]
                for row in conn.execute(
                    "SELECT event_id::text FROM inbox WHERE consumer_group = %s"
                    " UNION SELECT event_id FROM dead_letters"
                    " WHERE consumer_group = %s AND event_id IS NOT NULL",
                    (group, group),
                )
            }
    missing: list[dict[str, str]] = []
    for producer, stream in STREAM_OF_PRODUCER.items():
        readers = retention.readers(stream)
        types = sorted(set().union(*(handled[g] for g in readers)))
        with psycopg.connect(db_urls[producer], connect_timeout=3) as conn:
            rows = conn.execute(
                "SELECT event_id::text, event_type, aggregate_id FROM outbox"
                " WHERE event_type = ANY(%s) ORDER BY id",
                (types,),
            ).fetchall()
        missing += [
            {"event_id": event_id, "event_type": event_type, "order_id": order_id,
             "stream": stream, "group": group}
            for event_id, event_type, order_id in rows
            for group in readers
            if event_type in handled[group] and event_id not in received[group]
        ]  # fmt: skip
    routes = Counter(f"{m['event_type']} -> {m['group']}" for m in missing)
    return {"count": len(missing), "by_route": dict(sorted(routes.items())),
            "examples": missing[:examples]}  # fmt: skip


def republished_duplicates(client: redis.Redis, partitions: int) -> dict[str, int]:
    """Stream entries carrying an event_id already in the stream (a relay died between XADD
    and marking the rows published), and the deliveries of those copies to groups that handle
    the event type: each such delivery was absorbed by the group's inbox."""
    handled = handled_types()
    entries = deliveries = 0
    for producer, base in STREAM_OF_PRODUCER.items():
        # one order's events all go to one partition: so do the copies of one event
        copies: Counter[tuple[str, str]] = Counter()
        for stream in producer_streams(producer, partitions):
            for _entry_id, fields in _all_entries(client, stream):
                copies[(fields.get("event_id", ""), fields.get("event_type", ""))] += 1
        for (_event_id, event_type), n in copies.items():
            if n > 1:
                entries += n - 1
                readers = [g for g, s in SUBSCRIPTIONS.items() if base in s]
                deliveries += (n - 1) * sum(event_type in handled[g] for g in readers)
    return {"entries": entries, "absorbed_deliveries": deliveries}


class ConsumerCounters(threading.Thread):
    """Sums the consumers' counters over every process lifetime: outcomes
    (saga_consumer_events_total: processed, duplicate, failed, ...), conflicts retried
    (saga_consumer_conflicts_total) and partition ownership changes
    (saga_partition_ownership_changes_total: acquired, released, lost). Scraped every half
    second and once more right before a consumer is killed, so only what a crashing consumer
    counted in its last half second can be missed."""

    def __init__(self, ports: Mapping[str, int], pid: Callable[[str], int | None]) -> None:
        super().__init__(name="consumer-counters", daemon=True)
        self.ports = ports  # consumer process name -> its metrics port
        self.pid = pid  # process name -> current pid
        self._lock = threading.Lock()
        self._current: dict[str, tuple[int | None, Counter[str]]] = {}  # by process name
        self._banked: Counter[str] = Counter()  # counts of processes that are gone
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.5):
            for name in self.ports:
                self.scrape(name)

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join()
        for name in self.ports:
            self.scrape(name)

    def scrape(self, name: str) -> None:
        if name not in self.ports:
            return
        pid = self.pid(name)
        url = f"http://127.0.0.1:{self.ports[name]}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                text = response.read().decode()
        except (OSError, ValueError):
            return  # down or restarting: its last scrape stands
        counts = parse_consumer_metrics(text)
        with self._lock:
            old_pid, old = self._current.get(name, (None, Counter()))
            if old_pid != pid:
                self._banked.update(old)  # a new process: the old one's counts are final
            self._current[name] = (pid, counts)

    def _sum(self) -> Counter[str]:
        with self._lock:
            total = Counter(self._banked)
            for _pid, counts in self._current.values():
                total.update(counts)
        return total

    def totals(self) -> dict[str, int]:
        """Outcomes of handled entries: processed, duplicate, failed, ..."""
        return _section(self._sum(), "outcome")

    def conflicts(self) -> int:
        return self._sum().get("conflicts", 0)

    def ownership_changes(self) -> dict[str, int]:
        """acquired / released / lost, as the consumers counted them."""
        return _section(self._sum(), "ownership")


def _section(total: Counter[str], prefix: str) -> dict[str, int]:
    return {
        key.split(":", 1)[1]: n for key, n in sorted(total.items()) if key.startswith(prefix + ":")
    }


def parse_consumer_metrics(text: str) -> Counter[str]:
    """`outcome:<outcome>`, `conflicts` and `ownership:<change>` from a /metrics page."""
    counts: Counter[str] = Counter()
    for match in _CONSUMER_EVENTS.finditer(text):
        counts[f"outcome:{match.group(1)}"] += int(float(match.group(2)))
    for match in _CONFLICTS.finditer(text):
        counts["conflicts"] += int(float(match.group(1)))
    for match in _OWNERSHIP.finditer(text):
        counts[f"ownership:{match.group(1)}"] += int(float(match.group(2)))
    return counts


_CONSUMER_EVENTS = re.compile(
    r'^saga_consumer_events_total\{[^}]*outcome="([a-z_]+)"[^}]*\}\s+(\S+)$', re.MULTILINE
)
_CONFLICTS = re.compile(r"^saga_consumer_conflicts_total\{[^}]*\}\s+(\S+)$", re.MULTILINE)
_OWNERSHIP = re.compile(
    r'^saga_partition_ownership_changes_total\{[^}]*change="([a-z_]+)"[^}]*\}\s+(\S+)$',
    re.MULTILINE,
)


def dead_letters(db_urls: Mapping[str, str]) -> dict[str, dict[str, int]]:
    """Per group: the total of dead letters not re-driven, and the count of each partition
    that has any (table dead_letters of the group's own database)."""
    found: dict[str, dict[str, int]] = {}
    for group in SUBSCRIPTIONS:
        with psycopg.connect(db_urls[group], connect_timeout=3) as conn:
            by_partition = dict(
                conn.execute(
                    "SELECT partition, count(*) FROM dead_letters WHERE consumer_group = %s"
                    " AND redriven_at IS NULL GROUP BY partition ORDER BY partition",
                    (group,),
                ).fetchall()
            )
        found[group] = {
            "total": sum(by_partition.values()),
            **{f"p{p}": n for p, n in by_partition.items() if n},
        }
    return found


def payment_timeouts(db_urls: Mapping[str, str]) -> int:
    """Orders cancelled by the deadline sweep (reason payment_timeout)."""
    with psycopg.connect(db_urls["orders"], connect_timeout=3) as conn:
        return conn.execute(
            "SELECT count(*) FROM orders WHERE status = 'cancelled' AND reason = 'payment_timeout'"
        ).fetchone()[0]


def loss_repairs(db_urls: Mapping[str, str]) -> dict[str, dict[str, int]]:
    """Per outbox: how often its relay found Redis behind the recorded published position,
    and how many rows it re-published for that (table published_positions)."""
    found: dict[str, dict[str, int]] = {}
    for service in SERVICES:
        with psycopg.connect(db_urls[service], connect_timeout=3) as conn:
            losses, rows = conn.execute(
                "SELECT coalesce(sum(losses), 0), coalesce(sum(republished), 0)"
                " FROM published_positions"
            ).fetchone()
        found[service] = {"streams_found_behind": int(losses), "rows_republished": int(rows)}
    return found


# -- partition ownership ----------------------------------------------------------------------


def lease_acquisitions(db_urls: Mapping[str, str]) -> dict[str, int]:
    """Per group: how many times a partition lease was acquired since the deployment was
    created (each acquisition increments the partition's epoch; the first one sets it to 1)."""
    found = {}
    for group in SUBSCRIPTIONS:
        with psycopg.connect(db_urls[group], connect_timeout=3) as conn:
            found[group] = sum(row["epoch"] for row in owners(conn, group))
    return found


@dataclass
class Gap:
    """A time a partition had no live owner (lease expired or handed back, not yet taken)."""

    group: str
    partition: int
    seconds: float
    ended: bool  # False: still without an owner at the last look
    at: str  # when it began (the database's clock)


@dataclass
class _Seen:
    epoch: int
    expires_at: datetime


class OwnershipSampler(threading.Thread):
    """Samples partition_leases of every group every `interval` seconds, on the database's
    clock. A partition whose lease expired (expires_at <= now) has no owner; its gap runs from
    expires_at until a new epoch is acquired. A gap shorter than one interval that ends with a
    hand-over between two samples is measured as acquired_at - the last expires_at seen (a
    lower bound: a release moves expires_at earlier). Unreachable databases (a crash) are
    skipped: the sample after them still sees the gap."""

    def __init__(self, db_urls: Mapping[str, str], partitions: int, interval: float = 0.2) -> None:
        super().__init__(name="ownership-sampler", daemon=True)
        self.db_urls = db_urls
        self.partitions = partitions
        self.interval = interval
        self.samples = 0
        self.failed_samples = 0
        self.gaps: list[Gap] = []
        self._seen: dict[tuple[str, int], _Seen] = {}
        self._open: dict[tuple[str, int], Gap] = {}
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample_once()

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join()

    def sample_once(self) -> None:
        for group in SUBSCRIPTIONS:
            try:
                with psycopg.connect(self.db_urls[group], connect_timeout=2) as conn:
                    rows = owners(conn, group)
                    now = conn.execute("SELECT clock_timestamp()").fetchone()[0]
            except psycopg.Error:
                self.failed_samples += 1
                continue
            with self._lock:
                self.observe(group, rows, now)
        self.samples += 1

    def observe(self, group: str, rows: list[dict], now: datetime) -> None:
        """One sample of one group's leases (rows as ownership.owners returns them)."""
        by_partition = {row["partition"]: row for row in rows}
        for partition in range(self.partitions):
            key = (group, partition)
            row = by_partition.get(partition)
            if row is None:
                continue  # never owned yet: nothing to measure from
            seen = self._seen.get(key)
            gap = self._open.get(key)
            live = row["expires_at"] > now
            if not live:
                if gap is None:  # it began when the lease ran out or was handed back
                    began = row["expires_at"].isoformat()
                    gap = self._open[key] = Gap(group, partition, 0.0, False, began)
                    self.gaps.append(gap)
                gap.seconds = max(gap.seconds, (now - row["expires_at"]).total_seconds())
            elif gap is not None:  # owned again: the gap ends at the new acquisition
                ended_at = row["acquired_at"] if seen and row["epoch"] != seen.epoch else now
                gap.seconds = max(
                    gap.seconds,
                    (ended_at - datetime.fromisoformat(gap.at)).total_seconds(),
                )
                gap.ended = True
                del self._open[key]
            elif seen is not None and row["epoch"] != seen.epoch:
                # a hand-over between two samples
                seconds = (row["acquired_at"] - seen.expires_at).total_seconds()
                if seconds > 0:
                    self.gaps.append(
                        Gap(group, partition, seconds, True, seen.expires_at.isoformat())
                    )
            self._seen[key] = _Seen(row["epoch"], row["expires_at"])

    def summary(self, top: int = 5) -> dict:
        with self._lock:
            gaps = sorted(self.gaps, key=lambda g: g.seconds, reverse=True)
        longest = gaps[0] if gaps else None
        return {
            "longest_no_owner_s": round(longest.seconds, 2) if longest else 0.0,
            "longest_no_owner": longest.__dict__ if longest else None,
            "gaps": len(gaps),
            "unended_gaps": sum(1 for g in gaps if not g.ended),
            "top_gaps": [{**g.__dict__, "seconds": round(g.seconds, 2)} for g in gaps[:top]],
            "samples": self.samples,
            "failed_samples": self.failed_samples,
            "sample_interval_s": self.interval,
        }


def wait_for_owners(db_urls: Mapping[str, str], partitions: int, timeout: float) -> bool:
    """Every partition of every group has a live owner (the consumers have shared them out)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if all(_all_owned(db_urls[group], group, partitions) for group in SUBSCRIPTIONS):
                return True
        except psycopg.Error:
            pass
        time.sleep(0.25)
    return False


def _all_owned(db_url: str, group: str, partitions: int) -> bool:
    with psycopg.connect(db_url, connect_timeout=3) as conn:
        return not unowned_partitions(conn, group, partitions)


def unowned_partitions(conn: psycopg.Connection, group: str, partitions: int) -> int:
    """How many of the group's partitions have no live owner right now."""
    live = {row["partition"] for row in owners(conn, group) if row["live"]}
    return len(set(range(partitions)) - live)


def order_records(db_urls: Mapping[str, str], acknowledged: list[str]) -> dict[str, int]:
    """Client-side durability and idempotency: every order answered 201 is stored, and every
    stored order came from exactly one Idempotency-Key (no retry created a second order)."""
    with psycopg.connect(db_urls["orders"], connect_timeout=10) as conn:
        stored = {str(row[0]) for row in conn.execute("SELECT order_id FROM orders")}
        keyed = conn.execute(
            "SELECT count(DISTINCT order_id), count(*) FROM idempotency_keys"
        ).fetchone()
    return {
        "stored": len(stored),
        "acknowledged_but_missing": len(set(acknowledged) - stored),
        "stored_without_key": len(stored) - keyed[0],
        "keys_sharing_an_order": keyed[1] - keyed[0],
    }


def _all_entries(
    client: redis.Redis, stream: str, page: int = 1000
) -> Iterator[tuple[str, dict[str, str]]]:
    start = "-"
    while True:
        batch = client.xrange(stream, min=start, max="+", count=page)
        yield from batch
        if len(batch) < page:
            return
        start = f"({batch[-1][0]}"
