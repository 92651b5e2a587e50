"""One background sampler per console process: every few seconds it takes the same reports as
`saga streams` and `saga outbox` (sagactl.inspect) and keeps, in memory, the last minutes of
events per second per stream and lag per group for the plots. Pages and the live overview read
its latest snapshot, so any number of open browsers cost one round of queries per interval.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import click
import psycopg
import redis

from sagactl.inspect.common import connect_db, open_redis, reusing
from sagactl.inspect.outbox import outbox_reports
from sagactl.inspect.partitions import EVENT_BASES, GROUPS, deployment_partitions
from sagactl.inspect.streams import count_after, streams_report
from service_runtime.config import ConfigError
from service_runtime.redis_client import RedisClient

log = logging.getLogger("saga.console")


def describe(err: BaseException) -> str:
    """One line for the page: what could not be read, never a URL with its password."""
    if isinstance(err, click.ClickException):
        return err.message
    if isinstance(err, ConfigError):
        return str(err)
    if isinstance(err, redis.RedisError):
        return f"Redis error: {type(err).__name__}: {err}"
    if isinstance(err, psycopg.Error):
        text = str(err).strip()
        return f"database error: {text.splitlines()[0] if text else type(err).__name__}"
    return f"{type(err).__name__}: {err}"


class Connections:
    """The console's Redis client, its database connections and the deployment's partition
    count, opened once and opened again after a failure (a connection per sample would cost
    a server process and a password exchange per service every interval, idle or not)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._client: RedisClient | None = None
        self._partitions: int | None = None
        self._databases: dict[str, psycopg.Connection] = {}

    @contextlib.contextmanager
    def db(self, service: str) -> Iterator[psycopg.Connection]:
        """The service's read-only connection, kept open between samples (the sampler's
        thread only); closed on any error, so the next sample opens a new one."""
        conn = self._databases.get(service)
        if conn is None or conn.closed:
            conn = self._databases[service] = connect_db(service)
        try:
            yield conn
        except BaseException:
            self._databases.pop(service, None)
            with contextlib.suppress(psycopg.Error):
                conn.close()
            raise

    def client(self) -> RedisClient:
        with self._lock:
            if self._client is None:
                self._client = open_redis()
            return self._client

    def partitions(self) -> int:
        with self._lock:
            if self._partitions is None:
                self._partitions = deployment_partitions()
            return self._partitions

    def reset(self) -> None:
        with self._lock:
            if self._client is not None:
                with contextlib.suppress(redis.RedisError):
                    self._client.close()
            self._client = None
            self._partitions = None
            databases, self._databases = self._databases, {}
        for conn in databases.values():
            with contextlib.suppress(psycopg.Error):
                conn.close()


class Monitor:
    """Samples every `interval` while someone looks at the console (a page or fragment was
    asked for within `watched_for`), else every `unwatched_interval`: an open overview stays
    live, an unwatched console costs next to nothing. The first request after a quiet spell
    wakes it at once."""

    def __init__(
        self,
        connections: Connections,
        interval: float = 2.0,
        window_seconds: float = 600.0,
        unwatched_interval: float = 30.0,
        watched_for: float = 60.0,
    ) -> None:
        self.connections = connections
        self.interval = interval
        self.unwatched_interval = unwatched_interval
        self.watched_for = watched_for
        self.samples: deque[dict[str, Any]] = deque(maxlen=int(window_seconds / interval) + 1)
        self.snapshot: dict[str, Any] | None = None
        self.error: str | None = None
        self.error_at: float | None = None
        self._last_ids: dict[str, str] = {}
        self._last_at: float | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by stop() and by a request after a quiet spell
        self._watched_at = float("-inf")  # time.monotonic() of the last request
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="console-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def watched(self) -> None:
        """A page, fragment or plot was asked for: sample at `interval` for a while."""
        quiet = not self._is_watched()
        self._watched_at = time.monotonic()
        if quiet:
            self._wake.set()

    def _is_watched(self) -> bool:
        return time.monotonic() - self._watched_at < self.watched_for

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self._wake.clear()
            self.sample()
            interval = self.interval if self._is_watched() else self.unwatched_interval
            self._wake.wait(max(interval - (time.monotonic() - started), 0.2))

    def sample(self) -> None:
        """Take one snapshot (and one point of the plots); a failure is kept for the page."""
        try:
            client = self.connections.client()
            partitions = self.connections.partitions()
            with reusing(self.connections.db):  # its connections, kept open between samples
                streams = streams_report(client, partitions)
                outbox = outbox_reports(client)
            now = time.time()
            rates = self._rates(client, streams, now)
        except Exception as err:  # shown on the page; the next round tries again
            message = describe(err)
            if message != self.error:
                log.warning("console: cannot read the system: %s", message)
            with self._lock:
                self.error, self.error_at = message, time.time()
            self.connections.reset()
            return
        point = {
            "t": now,
            "events_per_s": rates,
            "lag": {g: 0 for g in GROUPS},
            "pending": {g: 0 for g in GROUPS},
        }
        for summary in streams["groups"]:
            point["lag"][summary["group"]] += summary["lag"]
            point["pending"][summary["group"]] += summary["pending"]
        with self._lock:
            self.snapshot = {"at": now, "streams": streams, "outbox": outbox}
            self.error = self.error_at = None
            self.samples.append(point)

    def _rates(
        self, client: RedisClient, streams: dict[str, Any], now: float
    ) -> dict[str, float | None]:
        """Entries added per second to each event stream (all partitions) since the last
        sample: counted after the newest id seen then, so trimming does not distort it."""
        rates: dict[str, float | None] = {}
        elapsed = None if self._last_at is None else now - self._last_at
        for report in streams["streams"]:
            if report["stream"] not in EVENT_BASES:
                continue
            added = 0
            for part in report["partitions"]:
                newest, before = part["last_entry_id"], self._last_ids.get(part["stream"])
                if newest and before and newest != before:
                    added += count_after(client, part["stream"], before)[0]
                elif newest and before is None and elapsed is not None:
                    added += part["length"]  # a partition stream that appeared meanwhile
                if newest:
                    self._last_ids[part["stream"]] = newest
            rates[report["stream"]] = round(added / elapsed, 2) if elapsed else None
        self._last_at = now
        return rates

    def view(self) -> dict[str, Any]:
        """The latest snapshot, its age, and the last error (if the last round failed)."""
        with self._lock:
            snapshot, error, error_at = self.snapshot, self.error, self.error_at
        return {
            "snapshot": snapshot,
            "age_s": None if snapshot is None else time.time() - snapshot["at"],
            "error": error,
            "error_at": error_at,
        }

    def series(self) -> dict[str, Any]:
        """The plots' data as uPlot takes it: x (unix seconds) then one list per series."""
        with self._lock:
            points = list(self.samples)
        return {
            "interval_s": self.interval,
            "t": [p["t"] for p in points],
            "events_per_s": {b: [p["events_per_s"].get(b) for p in points] for b in EVENT_BASES},
            "lag": {g: [p["lag"][g] for p in points] for g in GROUPS},
            "pending": {g: [p["pending"][g] for p in points] for g in GROUPS},
        }
