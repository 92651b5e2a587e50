"""The embedded Redis's users (issue 13, DESIGN.md §9): no default user, each relay writes only
its own streams, each consumer reads and acknowledges only its subscriptions and its own keys
(the fence's claim script included: Redis 6.2 checks the commands and keys a script calls), rq
only rq's keys, and the admin everything."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from rq import Queue, SimpleWorker

from contracts import partition_stream
from devstack.osutil import free_port
from devstack.redis import (
    ADMIN_USER,
    RQ_USER,
    EmbeddedRedis,
    consumer_user,
    relay_user,
)
from service_runtime.redis_client import connect, wake_blocked_reads
from service_runtime.stream_fence import StreamFence
from tests.helpers import wait_until


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedRedis]:
    run_dir = Path(tempfile.mkdtemp(prefix="saga-acl-"))
    embedded = EmbeddedRedis(run_dir, free_port())
    embedded.start()
    try:
        yield embedded
    finally:
        embedded.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def _client(server: EmbeddedRedis, user: str) -> redis.Redis:
    return redis.Redis.from_url(server.user_url(user), decode_responses=True)


def test_no_password_is_noauth_and_the_default_user_is_off(server):
    anonymous = redis.Redis(host="127.0.0.1", port=server.port)
    with pytest.raises(redis.AuthenticationError):
        anonymous.ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=server.port, password=server.password).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(
            host="127.0.0.1", port=server.port, username=relay_user("orders"), password="wrong"
        ).ping()


def test_files_are_private(server):
    for path in (server.data_dir / "users.acl", server.data_dir / "redis.conf"):
        assert oct(path.stat().st_mode & 0o777) == "0o600"
    acl = (server.data_dir / "users.acl").read_text()
    assert server.password not in acl  # SHA-256 hashes only
    assert "user default off" in acl


def test_a_relay_writes_only_its_own_streams(server):
    inventory = _client(server, relay_user("inventory"))
    assert inventory.xadd(partition_stream("inventory.events", 0), {"a": "b"})
    inventory.hset("saga:relay:inventory", "holder", "x")
    for stream in ("billing.events.{p0}", "orders.events.{p0}", "inventory.dead-letters.{p0}"):
        with pytest.raises(redis.exceptions.NoPermissionError):
            inventory.xadd(stream, {"event_type": "PaymentCaptured"})
    for forbidden in (
        lambda: inventory.config_get("dir"),
        lambda: inventory.flushall(),
        lambda: inventory.keys("*"),
        lambda: inventory.scan(0),
        lambda: inventory.xrange("billing.events.{p0}"),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            forbidden()


def test_a_consumer_reads_its_subscriptions_through_the_fenced_read(server):
    admin = _client(server, ADMIN_USER)
    admin.xadd("orders.events.{p2}", {"event_type": "OrderPlaced"})
    consumer = _client(server, consumer_user("inventory"))
    for stream in ("orders.events.{p2}", "billing.events.{p2}", "inventory.redrive.{p2}"):
        consumer.xgroup_create(stream, "inventory", id="0", mkstream=True)
    fence = StreamFence(consumer)
    assert fence.claim("inventory", 2, 1)
    cursors = {
        s: ">" for s in ("orders.events.{p2}", "billing.events.{p2}", "inventory.redrive.{p2}")
    }
    read = fence.read("inventory", "inventory-1", 2, 1, cursors, 10)
    [(stream, [(entry_id, _fields)])] = read.entries
    assert stream == "orders.events.{p2}"
    consumer.xack(stream, "inventory", entry_id)
    assert admin.xpending(stream, "inventory")["pending"] == 0
    # a consumer writes no stream at all (dead letters are in its service's database): not
    # the ones it reads, not another service's; another group's fence is out of reach too
    for target in (stream, "billing.events.{p2}", "inventory.redrive.{p2}"):
        with pytest.raises(redis.exceptions.NoPermissionError):
            consumer.xadd(target, {"a": "b"})
    with pytest.raises(redis.ResponseError):
        StreamFence(consumer).claim("billing", 2, 99)
    with pytest.raises(redis.exceptions.NoPermissionError):
        consumer.config_get("dir")


def test_a_consumer_wakes_its_own_blocked_read(server):
    """Stopping its workers, a consumer wakes their blocked reads (CLIENT LIST, CLIENT UNBLOCK
    on the connections named after it): its ACL user may do that."""
    admin = _client(server, ADMIN_USER)
    admin.xgroup_create("orders.events.{p4}", "inventory", id="0", mkstream=True)
    reader = connect(server.user_url(consumer_user("inventory")), cluster=False, name="inventory-1")
    replies = []
    thread = threading.Thread(
        target=lambda: replies.append(
            reader.xreadgroup("inventory", "inventory-1", {"orders.events.{p4}": ">"}, block=14_000)
        )
    )
    thread.start()
    wait_until(lambda: int(admin.info("clients")["blocked_clients"]) == 1)
    assert wake_blocked_reads(reader) == 1
    thread.join(timeout=10)
    assert replies == [[]]  # woken as if its block was up
    reader.close()


def _job() -> int:
    return 42


def test_rq_works_with_its_own_user_and_reaches_nothing_else(server):
    connection = redis.Redis.from_url(server.user_url(RQ_USER))
    queue = Queue("acl-test", connection=connection)
    job = queue.enqueue(_job)
    SimpleWorker([queue], connection=connection).work(burst=True)
    job.refresh()
    assert job.return_value() == 42
    with pytest.raises(redis.exceptions.NoPermissionError):
        connection.xadd("orders.events.{p0}", {"a": "b"})
    with pytest.raises(redis.exceptions.NoPermissionError):
        connection.flushall()


def test_saga_redis_cli_runs_as_the_admin_without_the_password_on_its_command_line(server):
    env = {**os.environ, "REDIS_URL": server.url, "SAGA_RUN_DIR": str(server.run_dir)}
    saga = Path(sys.executable).parent / "saga"
    out = subprocess.run(
        [str(saga), "redis-cli", "ACL", "WHOAMI"], env=env, capture_output=True, text=True
    )
    assert out.stdout.strip() == ADMIN_USER, out.stderr
    assert server.password not in out.stdout + out.stderr
