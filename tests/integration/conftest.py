"""Fixtures for the messaging-plumbing integration tests (outbox, relay, consumer).

Everything runs against the real PostgreSQL and Redis of tests/conftest.py; the inventory
database stands in for "a service database" (it has the outbox and inbox tables).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from service_runtime.db import connect, create_pool
from service_runtime.redis_client import connect as redis_connect
from service_runtime.unit_of_work import unit_of_work
from tests.helpers import order_placed_payload
from tests.saga_driver import SagaDriver

SERVICE = "inventory"


@pytest.fixture
def db_url(clean_state) -> str:
    return clean_state.db_urls[SERVICE]


@pytest.fixture
def pool(db_url):
    pool = create_pool(db_url, name="test-inventory")
    pool.wait(timeout=10)
    yield pool
    pool.close()


@pytest.fixture
def db(db_url) -> Iterator[psycopg.Connection]:
    """An autocommit connection for looking at (and arranging) the database directly."""
    with connect(db_url) as conn:
        yield conn


@pytest.fixture
def redis_client(clean_state):
    client = redis_connect(clean_state.redis_url)
    yield client
    client.close()


@pytest.fixture
def admin_db(pg_admin_url) -> Iterator[psycopg.Connection]:
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def emit(pool) -> Callable[..., str]:
    """Commit one OrderPlaced outbox row in its own unit of work; returns its event id."""

    def emit_one(order_id: str | None = None) -> str:
        payload = order_placed_payload(order_id)
        with unit_of_work(pool) as uow:
            return uow.emit(
                "OrderPlaced",
                aggregate_type="order",
                aggregate_id=payload["order_id"],
                payload=payload,
            )

    return emit_one


# -- background threads (relays, consumer loops) ------------------------------------------------


@dataclass
class Runner:
    name: str
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event)


class Background:
    """Runs `target(stop_event)` on daemon threads; records how each one ended."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self.runners: list[Runner] = []

    def start(self, name: str, target: Callable[[threading.Event], None]) -> Runner:
        runner = Runner(name)

        def main() -> None:
            try:
                target(runner.stop)
            except BaseException as err:  # recorded for the test to inspect
                runner.error = err
            finally:
                runner.finished.set()

        runner.thread = threading.Thread(target=main, name=name, daemon=True)
        self.runners.append(runner)
        runner.thread.start()
        return runner

    def stop_all(self, timeout: float = 15.0) -> list[str]:
        for runner in self.runners:
            runner.stop.set()
        self._wake()  # relays sleeping on LISTEN until their poll interval: wake them now
        stuck = []
        for runner in self.runners:
            assert runner.thread is not None
            runner.thread.join(timeout)
            if runner.thread.is_alive():
                stuck.append(runner.name)
        return stuck


@pytest.fixture
def background(db_url) -> Iterator[Background]:
    def wake() -> None:
        with connect(db_url) as conn:
            conn.execute("SELECT pg_notify('outbox', '')")

    bg = Background(wake)
    yield bg
    stuck = bg.stop_all()
    assert not stuck, f"background threads did not stop: {stuck}"


@pytest.fixture
def make_saga(clean_state) -> Iterator[Callable[..., SagaDriver]]:
    """Build SagaDrivers on the clean test servers; `stocked` adds apples (150 each) and
    alice (1000 cents), the shop most saga tests start from."""
    drivers: list[SagaDriver] = []

    def make(*, stocked: bool = False, payment_timeout_s: int = 30) -> SagaDriver:
        driver = SagaDriver(
            clean_state.db_urls,
            redis_connect(clean_state.redis_url),  # a cluster client on a cluster
            payment_timeout_s=payment_timeout_s,
        )
        drivers.append(driver)
        if stocked:
            driver.product("apple", available=5, price_cents=150)
            driver.account("alice", balance_cents=1000)
        return driver

    yield make
    for driver in drivers:
        driver.close()


@pytest.fixture
def saga(make_saga) -> SagaDriver:
    return make_saga()


@pytest.fixture
def shop(make_saga) -> SagaDriver:
    return make_saga(stocked=True)


# -- real `saga` processes ----------------------------------------------------------------------

SAGA = str(Path(sys.executable).parent / "saga")


@pytest.fixture
def spawn(clean_state) -> Iterator[Callable[..., subprocess.Popen]]:
    """Start `saga ARGS...` on the test servers, with short timings (a crashed consumer's
    partitions free up within 1 s) and `SAGA_CRASH_AT=crash_at` if given; settings given as
    keywords override. Whatever still runs is stopped at teardown."""
    started: list[subprocess.Popen] = []

    def run(*args: str, crash_at: str | None = None, **settings: str) -> subprocess.Popen:
        env = {
            **os.environ,
            **clean_state.env,
            "METRICS_PORT_BASE": "0",
            "CONSUMER_BLOCK_MS": "100",
            "CONSUMER_LEASE_MS": "1000",
            "CONSUMER_HEARTBEAT_MS": "200",
            "RELAY_POLL_SECONDS": "0.2",
            **settings,
        }
        env.pop("SAGA_CRASH_AT", None)
        if crash_at:
            env["SAGA_CRASH_AT"] = crash_at
        process = subprocess.Popen(
            [SAGA, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        started.append(process)
        return process

    yield run
    for process in started:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=15)
