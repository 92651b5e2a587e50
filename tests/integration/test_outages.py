"""Dependency outages against real servers that these tests stop and start themselves.

Redis down: orders are still accepted (the outbox buffers), relays and consumers back off and
resume without a restart, the backlog drains. PostgreSQL down: the API answers 503 JSON with
Retry-After and writes nothing; relays and consumers reconnect when it returns.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from redis.exceptions import OutOfMemoryError

from contracts import DEFAULT_PARTITIONS, ORDERS_EVENTS
from devstack.osutil import free_port
from devstack.postgres import EmbeddedPostgres
from devstack.provision import provision
from devstack.redis import EmbeddedRedis
from orders_service.app import create_app as orders_app
from outbox_relay.relay import Relay, RelaySettings
from service_runtime import redis_client
from service_runtime.consumer import ConsumerSettings
from service_runtime.consumer_group import StreamConsumer
from service_runtime.db import create_pool
from service_runtime.migrations import migrate
from tests.helpers import stream_total, wait_until
from tests.tokens import authorize

ORDER = {"customer_id": "alice", "items": [{"sku": "apple", "quantity": 1}]}


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    run_dir = Path(tempfile.mkdtemp(prefix="saga-outage-redis-"))
    server = EmbeddedRedis(run_dir, free_port())
    server.start()
    yield server
    server.stop()
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def own_postgres() -> Iterator[tuple[EmbeddedPostgres, dict[str, str]]]:
    run_dir = Path(tempfile.mkdtemp(prefix="saga-outage-pg-"))
    server = EmbeddedPostgres(run_dir, free_port())
    server.start()
    urls = provision(server.admin_url, ("orders", "inventory"), prefix="outage_")
    for service, url in urls.items():
        migrate(url, service)
    yield server, urls
    server.stop()
    shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def threads():
    """Run loops in threads; stop and join them at teardown."""
    stop = threading.Event()
    started: list[threading.Thread] = []

    def run(target) -> threading.Thread:
        thread = threading.Thread(target=target, args=(stop,), daemon=True)
        thread.start()
        started.append(thread)
        return thread

    yield run
    stop.set()
    for thread in started:
        thread.join(timeout=15)


def relay_for(url: str, client) -> Relay:
    return Relay(
        url,
        client,
        RelaySettings(
            producer="orders",
            partitions=DEFAULT_PARTITIONS,
            poll_seconds=0.2,
            standby_retry_seconds=0.2,
        ),
    )


def inventory_consumer(client, pool, block_ms: int = 100) -> tuple[StreamConsumer, Counter]:
    """inventory's consumer (all partitions: it is the only member) and its outcomes."""
    handlers = importlib.import_module("inventory_service.reactions").HANDLERS
    settings = ConsumerSettings(
        group="inventory", consumer="inventory-1", partitions=DEFAULT_PARTITIONS, block_ms=block_ms
    )
    outcomes: Counter = Counter()
    consumer = StreamConsumer(
        client,
        pool,
        settings,
        handlers,
        on_outcome=lambda _type, outcome, _seconds: outcomes.update([outcome]),
    )
    return consumer, outcomes


def test_redis_outage_buffers_in_the_outbox_and_everything_resumes(clean_state, own_redis, threads):
    orders_url, inventory_url = clean_state.db_urls["orders"], clean_state.db_urls["inventory"]
    client = redis_client.connect(own_redis.url)
    pools = [create_pool(orders_url, name="o"), create_pool(inventory_url, name="i")]
    api = authorize(orders_app(pools[0]).test_client())
    relay = relay_for(orders_url, client)
    consumer, outcomes = inventory_consumer(client, pools[1])
    relay_thread, consumer_thread = threads(relay.run), threads(consumer.run)
    try:
        assert api.post("/orders", json=ORDER).status_code == 201
        wait_until(lambda: outcomes["processed"] == 1)

        own_redis.stop()
        accepted = [api.post("/orders", json=ORDER) for _ in range(5)]
        assert [r.status_code for r in accepted] == [201] * 5  # the outbox buffers
        with psycopg.connect(orders_url) as conn:
            unpublished = "SELECT count(*) FROM outbox WHERE published_at IS NULL"
            assert conn.execute(unpublished).fetchone()[0] == 5

        own_redis.start()
        wait_until(lambda: outcomes["processed"] == 6, timeout=30)
        assert relay_thread.is_alive() and consumer_thread.is_alive()  # no restart needed
        assert stream_total(client, ORDERS_EVENTS) == 6
        with psycopg.connect(orders_url) as conn:
            assert conn.execute(unpublished).fetchone()[0] == 0
    finally:
        for pool in pools:
            pool.close()


def test_postgres_outage_gives_503_writes_nothing_and_recovers(own_postgres, own_redis, threads):
    server, urls = own_postgres
    client = redis_client.connect(own_redis.url)
    pools = [
        create_pool(urls["orders"], name="o", timeout=2),
        create_pool(urls["inventory"], name="i", timeout=2),
    ]
    api = authorize(orders_app(pools[0]).test_client())
    relay = relay_for(urls["orders"], client)
    consumer, outcomes = inventory_consumer(client, pools[1])
    relay_thread, consumer_thread = threads(relay.run), threads(consumer.run)
    try:
        assert api.post("/orders", json=ORDER).status_code == 201
        wait_until(lambda: outcomes["processed"] == 1)

        server.stop()
        down = api.post("/orders", json=ORDER)
        assert down.status_code == 503
        assert down.headers["Retry-After"]
        assert down.json["code"] == 503 and down.json["message"]
        assert api.get("/ready").status_code == 503
        assert api.get("/health").status_code == 200

        server.start()
        wait_until(lambda: api.get("/ready").status_code == 200, timeout=30)
        assert api.post("/orders", json=ORDER).status_code == 201
        wait_until(lambda: outcomes["processed"] == 2, timeout=30)
        assert relay_thread.is_alive() and consumer_thread.is_alive()
        with psycopg.connect(urls["orders"]) as conn:
            assert conn.execute("SELECT count(*) FROM orders").fetchone()[0] == 2  # not 3
    finally:
        for pool in pools:
            pool.close()


def test_redis_error_replies_are_outages_the_relay_and_consumer_survive(
    clean_state, own_redis, threads
):
    """OOM (and MISCONF, READONLY, LOADING: the same kind of reply) used to be a ResponseError
    nobody caught: the relay and the consumers exited. Now they back off and resume."""
    orders_url, inventory_url = clean_state.db_urls["orders"], clean_state.db_urls["inventory"]
    client = redis_client.connect(own_redis.url)
    pools = [create_pool(orders_url, name="o"), create_pool(inventory_url, name="i")]
    api = authorize(orders_app(pools[0]).test_client())
    relay = relay_for(orders_url, client)
    consumer, outcomes = inventory_consumer(client, pools[1])
    relay_thread, consumer_thread = threads(relay.run), threads(consumer.run)
    try:
        assert api.post("/orders", json=ORDER).status_code == 201
        wait_until(lambda: outcomes["processed"] == 1)

        # Every write is now refused with "OOM command not allowed when used memory > ...".
        client.config_set("maxmemory-policy", "noeviction")
        client.config_set("maxmemory", "1")
        with pytest.raises(OutOfMemoryError):  # a ResponseError: nothing caught it before
            client.xadd("probe.{p0}", {"a": "1"})
        accepted = [api.post("/orders", json=ORDER) for _ in range(3)]
        assert [r.status_code for r in accepted] == [201] * 3  # the outbox buffers
        unpublished = "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        with psycopg.connect(orders_url) as conn:
            # the relay keeps trying: the rows stay unpublished while Redis refuses them
            wait_until(lambda: conn.execute(unpublished).fetchone()[0] == 3)
        assert relay_thread.is_alive() and consumer_thread.is_alive()

        client.config_set("maxmemory", "0")

        def state() -> str:
            with psycopg.connect(orders_url) as conn:
                left = conn.execute(unpublished).fetchone()[0]
            return f"outcomes {dict(outcomes)}, unpublished {left}, in streams " + str(
                stream_total(client, ORDERS_EVENTS)
            )

        wait_until(lambda: outcomes["processed"] == 4, timeout=60, message=state)
        assert relay_thread.is_alive() and consumer_thread.is_alive()  # never restarted
        assert outcomes["failed"] == 0 and outcomes["dead_lettered"] == 0
    finally:
        for pool in pools:
            pool.close()


def test_reads_unblocked_with_an_error_are_an_outage_the_consumer_survives(
    clean_state, own_redis, threads, caplog
):
    """A blocked read can end with an "UNBLOCKED" error reply: Redis 7 sends it to every
    blocked client when a failover demotes the server to a replica ("instance state changed"),
    and so does CLIENT UNBLOCK ... ERROR, used here on the consumer's blocked reads. The
    workers back off like for any outage and go on, instead of stopping with an error."""
    orders_url, inventory_url = clean_state.db_urls["orders"], clean_state.db_urls["inventory"]
    client = redis_client.connect(own_redis.url)
    pools = [create_pool(orders_url, name="o"), create_pool(inventory_url, name="i")]
    api = authorize(orders_app(pools[0]).test_client())
    relay = relay_for(orders_url, client)
    consumer, outcomes = inventory_consumer(client, pools[1], block_ms=5_000)
    threads(relay.run), threads(consumer.run)
    try:
        assert api.post("/orders", json=ORDER).status_code == 201
        wait_until(lambda: outcomes["processed"] == 1)

        def blocked_reads() -> list[str]:
            return [c["id"] for c in client.client_list() if c["cmd"] == "xreadgroup"]

        wait_until(lambda: len(blocked_reads()) == DEFAULT_PARTITIONS)
        with caplog.at_level(logging.WARNING):
            for client_id in blocked_reads():
                client.client_unblock(client_id, error=True)
            wait_until(lambda: "waiting for redis: UNBLOCKED" in caplog.text)
            assert api.post("/orders", json=ORDER).status_code == 201
            wait_until(lambda: outcomes["processed"] == 2, timeout=30)
        assert "worker stopped by an error" not in caplog.text
    finally:
        for pool in pools:
            pool.close()


def test_a_relay_and_a_consumer_started_while_postgres_is_down_wait_for_it(
    own_postgres, own_redis, tmp_path
):
    """Their start-up check of STREAM_PARTITIONS needs the database: during an outage they
    wait for it (and say so) instead of exiting to be restarted over and over."""
    server, urls = own_postgres
    server.stop()
    env = {
        **os.environ,
        "SAGA_RUN_DIR": str(tmp_path),  # not the dev stack's settings
        "INVENTORY_DATABASE_URL": urls["inventory"],
        "REDIS_URL": own_redis.url,
        "METRICS_PORT_BASE": "0",
    }
    saga = str(Path(sys.executable).parent / "saga")
    logs = {role: tmp_path / f"{role}.log" for role in ("relay", "consume")}
    processes = {
        role: subprocess.Popen(
            [saga, role, "inventory"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        for role, log in ((role, logs[role].open("wb")) for role in logs)
    }
    try:
        for log in logs.values():
            wait_until(
                lambda log=log: "waiting for the database" in log.read_text(),
                timeout=30,
                message=lambda log=log: log.read_text(),
            )
        # still waiting, none exited (a second attempt failed too, a while later)
        wait_until(lambda: all(log.read_text().count("waiting for") >= 2 for log in logs.values()))
        assert all(process.poll() is None for process in processes.values())

        server.start()
        wait_until(lambda: "relay inventory: active" in logs["relay"].read_text(), timeout=30)
        wait_until(lambda: "owns partition" in logs["consume"].read_text(), timeout=30)
        assert all(process.poll() is None for process in processes.values())
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            process.wait(timeout=30)
