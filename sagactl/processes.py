"""The long-running processes of the Procfile: relays, consumers and the rq cron scheduler.

This is the composition root for workers: it reads config and wires the pieces together.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click
import redis

from outbox_relay.durability import DurabilityError
from outbox_relay.relay import Relay, RelaySettings
from service_runtime import redis_client
from service_runtime.config import (
    MAX_CONSUMERS_PER_SERVICE,
    SERVICES,
    ConfigError,
    database_url,
    from_env,
    http_port,
    payment_sweep_seconds,
    redis_url,
    rq_redis_url,
    run_dir,
    stream_partitions,
)
from service_runtime.consumer import ConsumerSettings
from service_runtime.consumer_group import StreamConsumer, pool_size
from service_runtime.db import DB_OUTAGE_ERRORS, connect, create_pool
from service_runtime.failures import is_outage
from service_runtime.faults import configured_fault
from service_runtime.logs import setup_logging
from service_runtime.metrics import serve as serve_metrics
from service_runtime.metrics import serve_multiprocess as serve_multiprocess_metrics
from service_runtime.partitions import check_partition_count
from service_runtime.retention import require_nested_windows
from service_runtime.tracing import configure_tracing

log = logging.getLogger(__name__)

RQ_QUEUE = "saga"

service_argument = click.argument("service", type=click.Choice(SERVICES))


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop


# Worker metrics ports, as offsets from METRICS_PORT_BASE: relays + index of the service,
# consumers + 10 x (index of the service) + instance (see consumer_metrics_offset).
RELAY_METRICS_OFFSET = 1
WORKER_METRICS_OFFSET = 21
CONSUMER_METRICS_OFFSET = 30


def consumer_metrics_offset(service: str, instance: int) -> int:
    """orders' consumers at base+31..39, inventory's at +41..49, billing's at +51..59."""
    return CONSUMER_METRICS_OFFSET + 10 * SERVICES.index(service) + instance


def _metrics_port(offset: int) -> int | None:
    """Worker metrics ports: METRICS_PORT_BASE (9100) + offset; METRICS_PORT_BASE=0 disables."""
    base = int(os.environ.get("METRICS_PORT_BASE", "9100"))
    return base + offset if base else None


@click.command()
@service_argument
def web(service: str) -> None:
    """Serve SERVICE's REST API with gunicorn on its port (metrics at /metrics)."""
    port = http_port(service)
    metrics_dir = run_dir() / "metrics" / f"{service}-{port}"
    # Multiprocess metrics files of a previous run would be summed into this one's.
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ.update(SAGA_SERVICE=service, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    os.execv(
        gunicorn,
        [
            gunicorn,
            "--config",
            "python:service_runtime.gunicorn_conf",
            "--bind",
            f"127.0.0.1:{port}",
            f"{service}_service.app:create_app()",
        ],
    )


@click.command()
@service_argument
def relay(service: str) -> None:
    """Publish SERVICE's outbox to its stream (standby while another relay is active)."""
    setup_logging(service, "relay")
    configure_tracing(service, "relay")
    _refuse_to_start_unless(require_nested_windows)
    try:
        settings = from_env(
            RelaySettings, "RELAY_", producer=service, partitions=_checked_partitions(service)
        )
        relay_ = Relay(
            database_url(service),
            redis_client.connect(redis_url(f"{service}_relay")),
            settings,
            fault=configured_fault(),
        )
    except (ValueError, DurabilityError) as err:  # RELAY_DURABILITY it cannot honour
        raise click.ClickException(str(err)) from err
    serve_metrics(_metrics_port(RELAY_METRICS_OFFSET + SERVICES.index(service)))
    relay_.run(_stop_on_signals())


@click.command()
@service_argument
@click.option(
    "--name",
    help="Consumer name in the group, unique among its live consumers. "
    "Default: SERVICE-INSTANCE with --instance, else SERVICE-HOST-PID.",
)
@click.option(
    "--instance",
    type=click.IntRange(1, MAX_CONSUMERS_PER_SERVICE),
    help="This consumer's number among its service's consumers (make run-all numbers them "
    "1..CONSUMERS_PER_SERVICE): its default name and its metrics port.",
)
def consume(service: str, name: str | None, instance: int | None) -> None:
    """React to the events SERVICE subscribes to, on the partitions this consumer owns."""
    setup_logging(service, "consumer")
    configure_tracing(service, "consumer")
    _refuse_to_start_unless(require_nested_windows)
    reactions = importlib.import_module(f"{service}_service.reactions")
    partitions = _checked_partitions(service)
    try:
        settings = from_env(
            ConsumerSettings,
            "CONSUMER_",
            group=service,
            consumer=name
            or os.environ.get("CONSUMER_NAME")
            or (
                f"{service}-{instance}"
                if instance
                else f"{service}-{socket.gethostname()}-{os.getpid()}"
            ),
            partitions=partitions,
        )
    except ValueError as err:  # a CONSUMER_* setting that is not a number, or out of range
        raise click.ClickException(str(err)) from err
    serve_metrics(_metrics_port(consumer_metrics_offset(service, instance or 1)))
    pool = create_pool(
        database_url(service),
        name=f"{service}-consumer",
        max_size=pool_size(settings),
        check_on_checkout=False,
    )
    lease_pool = create_pool(
        database_url(service), name=f"{service}-leases", max_size=1, check_on_checkout=False
    )
    consumer = StreamConsumer(
        redis_client.connect(redis_url(f"{service}_consumer"), name=settings.consumer),
        pool,
        settings,
        reactions.HANDLERS,
        fault=configured_fault(),
        lock_orders=reactions.LOCK_ORDERS,
        lease_pool=lease_pool,
    )
    try:
        consumer.run(_stop_on_signals())
    finally:
        pool.close()
        lease_pool.close()


T = TypeVar("T")


def _refuse_to_start_unless(check: Callable[[], T]) -> T:
    """Run a start-up check (or read a setting); a ConfigError ends the process (exit 1) with
    its message."""
    try:
        return check()
    except ConfigError as err:
        raise click.ClickException(str(err)) from err


def _checked_partitions(service: str) -> int:
    """STREAM_PARTITIONS, refused (exit with the reason) if the deployment has another. A
    database that cannot be reached yet is waited for, as the running process would: a relay or
    consumer (re)started during an outage must not exit and be restarted over and over."""
    partitions = stream_partitions()
    delay = 0.2
    while True:
        try:
            with connect(database_url(service)) as conn:
                check_partition_count(conn, partitions, service)
            return partitions
        except ConfigError as err:
            raise click.ClickException(str(err)) from err
        except DB_OUTAGE_ERRORS as err:
            log.warning("%s: waiting for the database to check STREAM_PARTITIONS: %s", service, err)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


@click.command()
def cron() -> None:
    """Enqueue the periodic rq jobs (`saga worker` runs them)."""
    from rq.cron import CronScheduler
    from rq.exceptions import StopRequested

    from orders_service.jobs import sweep_payment_deadlines
    from service_runtime.retention import run_retention

    setup_logging("saga", "cron")
    _refuse_to_start_unless(require_nested_windows)
    sweep = _refuse_to_start_unless(payment_sweep_seconds)
    # An enqueue every few seconds would drown the log at INFO; failures still show.
    logging.getLogger("rq.cron").setLevel(logging.WARNING)
    # rq stores pickled bytes: it needs a client that does not decode responses. And a plain
    # Redis: rq does not support Redis Cluster (RQ_REDIS_URL, DESIGN.md §6a).
    scheduler = CronScheduler(
        connection=redis.Redis.from_url(rq_redis_url()), name=f"saga-cron:{socket.gethostname()}"
    )
    scheduler.register(sweep_payment_deadlines, RQ_QUEUE, interval=sweep, job_timeout=60)
    scheduler.register(run_retention, RQ_QUEUE, interval=3600, job_timeout=1800)
    # rq's scheduler loop raises when Redis goes away; rather than dying (and being restarted
    # with backoff by the supervisor), wait for Redis to come back
    delay = 0.5
    while True:
        try:
            scheduler.start()  # returns on SIGTERM/SIGINT (rq's own handlers)
            return
        except redis.RedisError as err:  # READONLY after a failover too (failures.py)
            if not is_outage(err):
                raise
            logging.getLogger("saga.cron").warning("cron waiting for Redis: %s", err)
        try:
            time.sleep(delay)
        except StopRequested:  # rq's SIGTERM handler, still installed, fired while we waited
            return
        delay = min(delay * 2, 2.0)


@click.command()
def worker() -> None:
    """Run the rq worker, restarted whenever it quits on its own.

    rq's worker quits on an unexpected Redis error (an outage while it watches a job); this
    waits for Redis and starts it again, sooner than the supervisor's backoff would.
    """
    setup_logging("saga", "worker")
    log = logging.getLogger("saga.worker")
    stop = _stop_on_signals()  # the supervisor signals the whole process group: rq too
    # No --with-scheduler: nothing here schedules jobs (enqueue_in/at, retry intervals), and
    # `saga cron` enqueues the periodic ones itself; rq's scheduler is one more process polling
    # Redis every second.
    # SimpleWorker: the jobs run in the worker itself. rq's default forks a work-horse for
    # each, which imported the job's module again (~170 ms) and did rq's bookkeeping there;
    # with the payment sweep every few seconds that was 4-5% of a core on an idle system, far
    # more than the sweep's query (README, Performance).
    command = [
        str(Path(sys.executable).parent / "rq"),
        "worker",
        "--worker-class",
        "rq.worker.SimpleWorker",
        "-c",
        "service_runtime.rq_settings",
        RQ_QUEUE,
    ]
    # The jobs run in the rq process, a child of this one: it writes their metrics to files,
    # served here.
    metrics_dir = run_dir() / "metrics" / "worker"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    serve_multiprocess_metrics(_metrics_port(WORKER_METRICS_OFFSET), str(metrics_dir))
    # the URL (and its password) through the environment: rq reads RQ_REDIS_URL for --url,
    # and a command line is visible to every user of the machine (ps)
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "RQ_REDIS_URL": rq_redis_url(),
    }
    client = redis_client.connect(rq_redis_url(), cluster=False)  # the Redis rq waits for
    while not stop.is_set():
        code = subprocess.run(command, env=env, preexec_fn=_die_with_parent).returncode
        if stop.is_set():
            return
        log.warning("rq worker exited with %s; restarting it once Redis answers", code)
        delay = 0.5
        while not stop.wait(delay):
            try:
                client.ping()
                break
            except redis_client.REDIS_OUTAGE_ERRORS:
                delay = min(delay * 2, 5.0)


def _die_with_parent() -> None:
    """In the child: get SIGTERM if `saga worker` itself is killed, never linger as an orphan."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


COMMANDS = [web, relay, consume, cron, worker]
