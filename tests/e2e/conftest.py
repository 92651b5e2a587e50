"""The whole system as real processes: `saga run-all` on the test servers, as `make run-all`
runs it (every Procfile process under its supervisor).

Databases are provisioned for this package alone and Redis gets its own logical database,
so the integration tests (which truncate and flush) never share state with running processes.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
import requests

from tests.helpers import wait_until
from tests.otlp_receiver import OtlpReceiver

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("orders", "inventory", "billing")


@dataclass(frozen=True)
class RunningSystem:
    urls: dict[str, str]  # service -> base URL
    metrics_base: int  # relays at base+1.., the rq worker at base+21, consumers at base+31..
    db_urls: dict[str, str]
    redis_url: str
    log_path: Path
    console_url: str = ""  # `saga console` of this run-all (a Procfile process)
    run_dir: Path | None = None  # SAGA_RUN_DIR: the console's session key is in there

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, decode_responses=True)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _next_redis_db(url: str) -> str:
    parts = urlsplit(url)
    db = int(parts.path.strip("/") or 0)
    return urlunsplit(parts._replace(path=f"/{db + 1}"))


def _free_port_block(size: int) -> int:
    """A base port with the next `size` ports all free (the worker metrics endpoints)."""
    import random
    import socket

    for _ in range(100):
        base = random.randrange(20_000, 60_000)
        try:
            for port in range(base, base + size):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free block of ports for the metrics endpoints")


def _ready(url: str) -> bool:
    try:
        return requests.get(f"{url}/ready", timeout=1).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture(scope="package", autouse=True)
def operator_token_on_every_request() -> Iterator[None]:
    """Every `requests` call of these tests carries an operator's bearer token unless it sets
    its own Authorization header (tests about who may call what do, see test_auth_over_http)."""
    from tests import tokens

    original = requests.sessions.default_headers
    token = tokens.admin(ttl_seconds=4 * 3600)

    def with_token():
        headers = original()
        headers["Authorization"] = f"Bearer {token}"
        return headers

    requests.sessions.default_headers = with_token
    yield
    requests.sessions.default_headers = original


@pytest.fixture(scope="package")
def otlp() -> Iterator[OtlpReceiver]:
    """A real OTLP/HTTP receiver: every process of the system exports its spans here."""
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="package")
def system(pg_admin_url: str, redis_server_url: str, otlp: OtlpReceiver) -> Iterator[RunningSystem]:
    from devstack.osutil import free_port
    from devstack.provision import drop, provision
    from service_runtime.migrations import migrate

    prefix = f"e2e_{secrets.token_hex(3)}_"
    db_urls = provision(pg_admin_url, SERVICES, prefix=prefix)
    for service, url in db_urls.items():
        migrate(url, service)
    redis_url = _next_redis_db(redis_server_url)
    redis.Redis.from_url(redis_url).flushdb()
    ports = {service: free_port() for service in SERVICES}
    scratch = Path(tempfile.mkdtemp(prefix="saga-e2e-"))  # run dir and process logs
    metrics_base = _free_port_block(22)
    console_port = free_port()
    env = {
        **os.environ,
        **{f"{s.upper()}_DATABASE_URL": url for s, url in db_urls.items()},
        **{f"{s.upper()}_PORT": str(port) for s, port in ports.items()},
        "REDIS_URL": redis_url,
        "METRICS_PORT_BASE": str(metrics_base),
        "CONSOLE_PORT": str(console_port),
        "SAGA_RUN_DIR": str(scratch / "run"),
        # tracing on, as a user turns it on (README): spans of every process to the receiver
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log_path = scratch / "processes.log"
    saga = Path(sys.executable).parent / "saga"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [str(saga), "run-all"],  # all four server URLs set: no embedded servers
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = RunningSystem(
        urls={s: f"http://127.0.0.1:{p}" for s, p in ports.items()},
        metrics_base=metrics_base,
        db_urls=db_urls,
        redis_url=redis_url,
        log_path=log_path,
        console_url=f"http://127.0.0.1:{console_port}",
        run_dir=scratch / "run",
    )
    try:
        wait_until(
            lambda: all(_ready(url) for url in running.urls.values()) or process.poll() is not None,
            timeout=60,
            message=lambda: f"services did not become ready:\n{running.log_tail()}",
        )
        assert process.poll() is None, running.log_tail()
        yield running
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        drop(pg_admin_url, SERVICES, prefix=prefix)
        shutil.rmtree(scratch, ignore_errors=True)


def place_and_confirm(urls: dict[str, str]) -> tuple[str, str]:
    """A fresh product and customer, an order of 2, and its wait for `confirmed` over the real
    APIs; returns (order id, customer id)."""
    sku, customer = f"sku-{uuid.uuid4().hex[:8]}", f"c-{uuid.uuid4().hex[:8]}"
    r = requests.put(
        f"{urls['inventory']}/products/{sku}",
        json={"name": sku, "price_cents": 250, "available": 10},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    r = requests.put(
        f"{urls['billing']}/accounts/{customer}", json={"balance_cents": 5000}, timeout=10
    )
    assert r.status_code == 201, r.text
    r = requests.post(
        f"{urls['orders']}/orders",
        json={"customer_id": customer, "items": [{"sku": sku, "quantity": 2}]},
        timeout=10,
    )
    assert r.status_code == 201, r.text
    order_id = r.json()["order_id"]

    def status() -> str | None:
        found = requests.get(f"{urls['orders']}/orders/{order_id}", timeout=10).json()["status"]
        return found if found != "pending" else None

    assert wait_until(status, timeout=60) == "confirmed"
    return order_id, customer
