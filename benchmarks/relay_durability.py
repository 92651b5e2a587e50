"""The relay's drain and commit->stream latency for each RELAY_DURABILITY mode, in one run
(same servers, same sizes): ack, replicas:1 (a replica started beside the embedded Redis with
the same redis-server binary, `--replicaof`), fsync (WAITAOF: Redis 7.2 or later; on an older
server the row says why it cannot run, the relay's own start-up error)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from benchmarks import relay_drain, relay_latency
from outbox_relay.durability import Durability, DurabilityError
from service_runtime.redis_client import connect as redis_connect

MODES = ("ack", "replicas:1", "fsync")


@contextmanager
def replica_of(redis_url: str) -> Iterator[Any]:
    """A replica of the Redis at `redis_url` (on this machine), synced; removed after."""
    from devstack.osutil import free_port, wait_until
    from devstack.redis import EmbeddedReplica

    url = urlparse(redis_url)
    run_dir = Path(tempfile.mkdtemp(prefix="saga-bench-replica-"))
    server = EmbeddedReplica(
        run_dir, free_port(), url.port or 6379, url.password or "", url.username
    )
    server.start()
    try:
        if not wait_until(server.in_sync, timeout=30):
            raise RuntimeError("the replica did not sync")
        yield server
    finally:
        server.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def measure(
    db_url: str,
    redis_url: str,
    *,
    rows: int,
    rate: float,
    seconds: float,
    batch_size: int,
    partitions: int,
    modes: tuple[str, ...] = MODES,
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for mode in modes:
        client = redis_connect(redis_url)
        try:
            Durability.parse(mode).check_server(client)
        except DurabilityError as err:
            results[mode] = {"unsupported": str(err)}
            continue
        finally:
            client.close()

        def run(mode: str = mode) -> dict[str, Any]:
            return {
                "drain": relay_drain.measure(
                    db_url,
                    redis_url,
                    rows=rows,
                    batch_size=batch_size,
                    partitions=partitions,
                    durability=mode,
                ),
                "latency": relay_latency.measure(
                    db_url,
                    redis_url,
                    rate=rate,
                    seconds=seconds,
                    batch_size=batch_size,
                    partitions=partitions,
                    durability=mode,
                ),
            }

        if mode.startswith("replicas:"):
            with replica_of(redis_url):
                results[mode] = run()
        else:
            results[mode] = run()
    return results
