"""`saga run-all` as a user runs it: its own embedded PostgreSQL and Redis (free ports, a fresh
run folder), every Procfile process under the supervisor. A SIGKILLed relay and consumer come
back and the saga still completes; Ctrl-C then leaves no process and no server behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from tests.e2e.conftest import (
    PROJECT_ROOT,
    SERVICES,
    _free_port_block,
    _ready,
    place_and_confirm,
)
from tests.helpers import wait_until


@dataclass
class RunAll:
    process: subprocess.Popen[bytes]
    run_dir: Path
    output_path: Path
    urls: dict[str, str]
    seen_pids: set[int] = field(default_factory=set)

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def output_without_probes(self) -> str:
        """The output without the access-log lines of our own readiness probes, which would
        fill any tail of it while a service is not ready."""
        return "\n".join(line for line in self.output().splitlines() if "GET /ready" not in line)

    def tree(self) -> list[psutil.Process]:
        """run-all and every process below it (the supervised ones run in their own sessions
        but stay its children), remembered so that the end can check they are all gone."""
        try:
            root = psutil.Process(self.process.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        self.seen_pids.update(p.pid for p in processes)
        return processes

    def server_pids(self) -> list[int]:
        pids = []
        for pidfile in (
            self.run_dir / "postgres" / "postmaster.pid",
            self.run_dir / "redis" / "redis.pid",
        ):
            if pidfile.exists():
                pids.append(int(pidfile.read_text().split()[0]))
        return pids

    def supervised(self, *command: str) -> int | None:
        """The pid of the running process whose command line ends with `command`."""
        for child in psutil.Process(self.process.pid).children():
            try:
                if tuple(child.cmdline()[-len(command) :]) == command:
                    return child.pid
            except psutil.NoSuchProcess:
                continue
        return None


def _alive(pids: set[int] | list[int]) -> list[str]:
    alive = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if process.status() != psutil.STATUS_ZOMBIE:
                alive.append(f"{pid} {process.cmdline()}")
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.fixture(scope="module")
def run_all() -> Iterator[RunAll]:
    with _running({}) as running:
        yield running


@contextmanager
def _running(extra_env: dict[str, str]) -> Iterator[RunAll]:
    """`saga run-all` with a fresh run folder and free ports, stopped (and checked) after."""
    from devstack.osutil import free_port

    scratch = Path(tempfile.mkdtemp(prefix="saga-runall-"))
    ports = {service: free_port() for service in SERVICES}
    env = {
        key: value
        for key, value in os.environ.items()
        if not (key.endswith("_DATABASE_URL") or key == "REDIS_URL")
    }
    env.update(
        SAGA_RUN_DIR=str(scratch / "run"),
        SAGA_PG_PORT=str(free_port()),
        SAGA_REDIS_PORT=str(free_port()),
        METRICS_PORT_BASE=str(_free_port_block(22)),
        CONSOLE_PORT=str(free_port()),  # never the default 8000 of someone's run-all
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **{f"{s.upper()}_PORT": str(port) for s, port in ports.items()},
    )
    env.update(extra_env)
    output_path = scratch / "run-all.out"
    with output_path.open("wb") as out:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "saga"), "run-all"],
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # like a terminal: the signals come from the test
        )
    running = RunAll(
        process,
        scratch / "run",
        output_path,
        {s: f"http://127.0.0.1:{port}" for s, port in ports.items()},
    )
    try:
        wait_until(
            lambda: all(_ready(url) for url in running.urls.values()) or process.poll() is not None,
            timeout=120,
            message=lambda: (
                f"run-all did not become ready:\n{running.output_without_probes()[-6000:]}"
            ),
        )
        assert process.poll() is None, running.output()[-4000:]
        running.tree()
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                for pid in running.seen_pids:
                    _kill(pid)
        for pid in running.server_pids():
            _kill(pid)


def _kill(pid: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)


def test_a_killed_relay_and_consumer_come_back_and_the_saga_completes(run_all: RunAll) -> None:
    relay = wait_until(lambda: run_all.supervised("relay", "orders"), timeout=30)
    # run-all starts CONSUMERS_PER_SERVICE (2) consumers per service: kill the first one
    consumer = wait_until(
        lambda: run_all.supervised("consume", "inventory", "--instance", "1"), timeout=30
    )
    run_all.tree()
    os.kill(relay, signal.SIGKILL)
    os.kill(consumer, signal.SIGKILL)

    wait_until(
        lambda: (
            "orders-relay exited with -9; restarting in" in run_all.output()
            and "inventory-consumer-1 exited with -9; restarting in" in run_all.output()
        ),
        timeout=30,
        message=lambda: run_all.output()[-4000:],
    )
    wait_until(lambda: run_all.supervised("relay", "orders") not in (None, relay), timeout=60)
    wait_until(
        lambda: (
            run_all.supervised("consume", "inventory", "--instance", "1") not in (None, consumer)
        ),
        timeout=60,
    )
    assert run_all.process.poll() is None
    assert all(_ready(url) for url in run_all.urls.values())
    # OrderPlaced needs the new orders relay, StockReserved the new inventory consumer
    place_and_confirm(run_all.urls)


def test_no_secret_in_the_output_or_on_any_command_line(run_all: RunAll) -> None:
    secrets = {
        path.name: path.read_text().strip() for path in (run_all.run_dir / "secrets").iterdir()
    }
    assert {"postgres-superuser", "redis", "postgres-orders_svc"} <= set(secrets)
    assert all(len(value) >= 20 for value in secrets.values())
    output = run_all.output()
    assert "redis://saga-admin:***@127.0.0.1:" in output  # the banner, masked
    assert "saga token customer" in output and "eyJ" not in output  # commands, never a token
    leaked = [name for name, value in secrets.items() if value in output]
    assert leaked == [], f"secrets in run-all's output: {leaked}"

    # the rq worker is up (its Redis URL used to be on its command line)
    worker = wait_until(lambda: run_all.supervised("worker"), timeout=30)
    assert wait_until(
        lambda: [c for c in psutil.Process(worker).children() if "rq" in " ".join(c.cmdline())],
        timeout=30,
    )
    on_command_lines = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        line = " ".join(process.info["cmdline"] or [])
        on_command_lines += [
            f"{name} in {process.info['pid']}" for name, value in secrets.items() if value in line
        ]
    assert on_command_lines == []


def test_ctrl_c_stops_every_process_and_the_embedded_servers(run_all: RunAll) -> None:
    run_all.tree()
    servers = run_all.server_pids()
    assert len(servers) == 2 and not set(servers) & run_all.seen_pids  # daemons, not children
    run_all.process.send_signal(signal.SIGINT)
    assert run_all.process.wait(timeout=60) == 0, run_all.output()[-4000:]
    assert wait_until(lambda: not _alive(run_all.seen_pids | set(servers)), timeout=30)
    assert "embedded PostgreSQL and Redis stopped" in run_all.output()


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[str]:
    from devstack.redis_cluster import EmbeddedRedisCluster

    scratch = Path(tempfile.mkdtemp(prefix="saga-cluster-"))
    cluster = EmbeddedRedisCluster(scratch)
    cluster.start()
    try:
        yield cluster.url
    finally:
        cluster.stop()


def test_the_saga_runs_on_a_redis_cluster_with_three_consumers_per_service(redis_cluster):
    """As the scale-out issue will be checked: REDIS_CLUSTER=1, REDIS_URL naming one node of a
    3-master cluster, 3 consumers per service, 8 partitions; rq on the embedded plain Redis."""
    from service_runtime.redis_client import connect, scan_keys

    env = {
        "REDIS_CLUSTER": "1",
        "REDIS_URL": redis_cluster,
        "CONSUMERS_PER_SERVICE": "3",
        "STREAM_PARTITIONS": "8",
    }
    with _running(env) as running:
        assert wait_until(
            lambda: running.supervised("consume", "billing", "--instance", "3"), timeout=30
        )
        place_and_confirm(running.urls)
        cluster = connect(redis_cluster, cluster=True)
        streams = scan_keys(cluster, "*.events.{p*}", type_="stream")
        bases = {stream.rpartition(".{")[0] for stream in streams}
        assert bases == {"orders.events", "inventory.events", "billing.events"}
        assert {len(streams)} <= {3, 24}  # some of the 8 partitions, each in all three streams
        # rq's keys are on the plain Redis, never on the cluster
        assert not scan_keys(cluster, "rq:*")
        env_file = (running.run_dir / "stack.env").read_text()
        assert "RQ_REDIS_URL=" in env_file and "REDIS_CLUSTER=1" in env_file
