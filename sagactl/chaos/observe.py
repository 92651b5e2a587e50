"""What the chaos run measures: backlog (is it quiet yet?), duplicates absorbed, dead letters."""

from __future__ import annotations

import importlib
import re
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Mapping

import psycopg
import redis

from contracts import STREAM_OF_PRODUCER, SUBSCRIPTIONS, dead_letter_stream, redrive_stream
from service_runtime.config import SERVICES


def backlog(db_urls: Mapping[str, str], client: redis.Redis) -> dict[str, int]:
    """Everything still in motion; empty means quiet. Pending orders, unpublished outbox rows,
    and per group and stream the entries not yet delivered or not yet acknowledged."""
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
    for group, streams in SUBSCRIPTIONS.items():
        for stream in (*streams, redrive_stream(group)):
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


def republished_duplicates(client: redis.Redis) -> dict[str, int]:
    """Stream entries carrying an event_id already in the stream (a relay died between XADD
    and marking the rows published), and the deliveries of those copies to groups that handle
    the event type: each such delivery was absorbed by the group's inbox."""
    handled = {
        group: set(importlib.import_module(f"{group}_service.reactions").HANDLERS)
        for group in SUBSCRIPTIONS
    }
    entries = deliveries = 0
    for stream in STREAM_OF_PRODUCER.values():
        copies: Counter[tuple[str, str]] = Counter()
        for _entry_id, fields in _all_entries(client, stream):
            copies[(fields.get("event_id", ""), fields.get("event_type", ""))] += 1
        for (_event_id, event_type), n in copies.items():
            if n > 1:
                entries += n - 1
                readers = [g for g, s in SUBSCRIPTIONS.items() if stream in s]
                deliveries += (n - 1) * sum(event_type in handled[g] for g in readers)
    return {"entries": entries, "absorbed_deliveries": deliveries}


class ConsumerCounters(threading.Thread):
    """Sums the consumers' outcome counters (saga_consumer_events_total: processed, duplicate,
    failed, ...) over every process lifetime: scraped every half second and once more right
    before a consumer is killed, so only what a crashing consumer counted in its last half
    second can be missed."""

    def __init__(self, ports: Mapping[str, int], pid: Callable[[str], int | None]) -> None:
        super().__init__(name="consumer-counters", daemon=True)
        self.ports = ports  # service -> its consumer's metrics port
        self.pid = pid  # process name -> current pid
        self._lock = threading.Lock()
        self._current: dict[str, tuple[int | None, Counter[str]]] = {}  # by process name
        self._banked: Counter[str] = Counter()  # counts of processes that are gone
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.5):
            for service in self.ports:
                self.scrape(f"{service}-consumer")

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join()
        for service in self.ports:
            self.scrape(f"{service}-consumer")

    def scrape(self, name: str) -> None:
        service = name.removesuffix("-consumer")
        pid = self.pid(name)
        url = f"http://127.0.0.1:{self.ports[service]}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                text = response.read().decode()
        except (OSError, ValueError):
            return  # down or restarting: its last scrape stands
        counts: Counter[str] = Counter()
        for match in _CONSUMER_EVENTS.finditer(text):
            counts[match.group(1)] += int(float(match.group(2)))
        with self._lock:
            old_pid, old = self._current.get(name, (None, Counter()))
            if old_pid != pid:
                self._banked.update(old)  # a new process: the old one's counts are final
            self._current[name] = (pid, counts)

    def totals(self) -> dict[str, int]:
        with self._lock:
            total = Counter(self._banked)
            for _pid, counts in self._current.values():
                total.update(counts)
        return dict(sorted(total.items()))


_CONSUMER_EVENTS = re.compile(
    r'^saga_consumer_events_total\{[^}]*outcome="([a-z_]+)"[^}]*\}\s+(\S+)$', re.MULTILINE
)


def dead_letters(client: redis.Redis) -> dict[str, int]:
    return {group: client.xlen(dead_letter_stream(group)) for group in SUBSCRIPTIONS}


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


def _all_entries(client: redis.Redis, stream: str, page: int = 1000):
    start = "-"
    while True:
        batch = client.xrange(stream, min=start, max="+", count=page)
        yield from batch
        if len(batch) < page:
            return
        start = f"({batch[-1][0]}"
