"""The whole system (the Procfile under run-all's supervisor, as `make run-all` runs it) under
an open-loop load of orders: time from POST to OrderConfirmed, the highest rate it keeps up
with, CPU use per process and system-wide, and each process's memory at the end.

Open loop: order i is handed to a sender at start + i/rate whatever happened to the ones
before; a small pool of threads with one keep-alive connection each does the POSTs.
Confirmations are seen by following the partitions of `orders.events` (one XREAD) and matched
by order id, which costs the system nothing, unlike polling GET /orders/<id>.

Scale-out: the Procfile's consumers are replaced by `consumers` per service (each a
`saga consume SVC --name SVC-<i>` sharing the group's `partitions`), so one command measures
the curve for N = 1, 2, 4 ... on the same machine (`saga bench --consumers 1,2,4`). Each step
also reports the CPU time of every process of the system and of the servers per confirmed
order (`cpu_ms_per_confirmed`, the load generator not included).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psutil

from benchmarks import profiles
from benchmarks.sample import follow_streams, percentiles, reset
from contracts import DEFAULT_PARTITIONS, producer_streams
from devstack import issuer
from devstack.osutil import free_port, tail, wait_until
from sagactl.supervisor import parse_procfile, with_consumer_replicas

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("orders", "inventory", "billing")
OUTCOMES = ("OrderConfirmed", "OrderRejected", "OrderCancelled")
SPREAD = 10  # products and customers the orders rotate over
# every request's headers; the operator's bearer token is added when a _System starts
_JSON = {"Content-Type": "application/json"}
OTHER_LOAD = "other load (not this benchmark)"
LOAD_GENERATOR = "bench load generator"


@dataclass
class Sent:
    scheduled: float = 0.0
    sent: float = 0.0
    answered: float = 0.0
    order_id: str | None = None
    error: str | None = None


def measure(
    db_urls: dict[str, str],
    redis_url: str,
    *,
    rates: Sequence[float] = (50, 100, 200),
    step_seconds: float = 10.0,
    rise_by: float = 100,
    max_rate: float = 1_000,
    senders: int = 32,
    server_pids: dict[str, int] | None = None,
    consumers: int = 1,
    partitions: int = DEFAULT_PARTITIONS,
    idle_seconds: float = 60.0,
    profile_dir: Path | None = None,
    profile_processes: Sequence[str] = (),
) -> dict[str, Any]:
    """Every rate in `rates`, then rising by `rise_by` while the last step kept up; the system
    runs `consumers` consumer processes per service over `partitions` partitions."""
    reset(list(db_urls.values()), redis_url)
    workdir = Path(tempfile.mkdtemp(prefix="saga-bench-e2e-"))
    profile = None
    if profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)
        # start-up, idle, warm-up and every step, with a little to spare
        profile = profiles.Profile(profile_dir, tuple(profile_processes))
    system = _System(db_urls, redis_url, workdir, consumers, partitions, profile)
    outcomes: dict[str, tuple[str, float]] = {}
    stop = threading.Event()
    follower = threading.Thread(
        target=follow_streams,
        args=(
            redis_url,
            producer_streams("orders", partitions),
            _record_outcome(outcomes),
            stop,
        ),
        daemon=True,
    )
    follower.start()
    try:
        system.wait_ready()
        _seed(system.urls)
        orders_url = system.urls["orders"]
        idle = _measure_idle(system, server_pids or {}, idle_seconds) if idle_seconds else None
        # cold workers, pools and consumer groups are not what is being measured
        _run_step(orders_url, 10, 2.0, 4, outcomes, None)
        monitor = _Monitor(system.process.pid, server_pids or {})
        steps: list[dict[str, Any]] = []
        for rate in _rates(rates, rise_by, max_rate):
            if len(steps) >= len(rates) and not steps[-1]["kept_up"]:
                break
            steps.append(_run_step(orders_url, rate, step_seconds, senders, outcomes, monitor))
        memory = monitor.memory_mb()
    except BaseException as err:
        err.add_note(f"system log {system.log_path}:\n{tail(system.log_path, 30)}")
        raise
    finally:
        stop.set()
        system.stop()
        follower.join(timeout=5)
    shutil.rmtree(workdir, ignore_errors=True)
    kept_up = [step for step in steps if step["kept_up"]]
    best = max(kept_up, key=lambda step: step["rate"], default=None)
    return {
        "consumers": consumers,
        "partitions": partitions,
        "step_seconds": step_seconds,
        "senders": senders,
        "steps": steps,
        "highest_sustained_rate": best["rate"] if best else 0,
        # at the highest rate kept up: what an order costs the whole system when it keeps up
        "sustained_confirmed_per_s": best["confirmed_per_s"] if best else 0.0,
        "cpu_ms_per_confirmed": best.get("cpu_ms_per_confirmed") if best else None,
        "memory_mb_at_end": memory,
        "idle": idle,
    }


def _measure_idle(system: _System, server_pids: dict[str, int], seconds: float) -> dict:
    """CPU of the whole system (every process and the servers) with no traffic at all, after
    it became ready and before any order: the cost of heartbeats, polls and blocked reads."""
    time.sleep(2.0)  # the start-up's last work (groups, leases, first polls) settles
    monitor = _Monitor(system.process.pid, server_pids)
    monitor.begin()
    time.sleep(seconds)
    usage = monitor.end()
    per_process = {
        label: percent
        for label, percent in usage["cpu_percent"].items()
        if label not in (OTHER_LOAD, LOAD_GENERATOR)
    }
    return {
        "seconds": seconds,
        # % of one core, summed over the system's processes and the servers
        "cpu_percent_total": sum(per_process.values()),
        "cpu_percent": per_process,
        "other_load_percent": usage["cpu_percent"].get(OTHER_LOAD),
    }


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs of one bench (one per consumer count): the first one's figures at the top
    level (the targets read those), every run under `runs`, and the scale-out curve."""
    if len(runs) == 1:
        return {**runs[0], "runs": runs}
    return {
        **runs[0],
        "runs": runs,
        "highest_sustained_rate": max(run["highest_sustained_rate"] for run in runs),
    }


def _rates(initial: Sequence[float], rise_by: float, max_rate: float) -> Iterator[float]:
    yield from initial
    rate = initial[-1] + rise_by
    while rise_by > 0 and rate <= max_rate:
        yield rate
        rate += rise_by


def _run_step(
    orders_url: str,
    rate: float,
    seconds: float,
    senders: int,
    outcomes: dict[str, tuple[str, float]],
    monitor: _Monitor | None,
) -> dict[str, Any]:
    count = max(int(rate * seconds), 1)
    bodies = [_order_body(i) for i in range(count)]
    sent = [Sent() for _ in range(count)]
    jobs: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    workers = [
        threading.Thread(target=_sender, args=(orders_url, jobs, bodies, sent), daemon=True)
        for _ in range(senders)
    ]
    for worker in workers:
        worker.start()
    if monitor:
        monitor.begin()
    started = time.perf_counter() + 0.01
    for i in range(count):
        sent[i].scheduled = started + i / rate
        delay = sent[i].scheduled - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        jobs.put(i)
    usage = monitor.end() if monitor else {}
    for _ in workers:
        jobs.put(None)
    for worker in workers:
        worker.join()
    _settle([s.order_id for s in sent if s.order_id], outcomes)
    summary = _summary(rate, seconds, sent, outcomes, usage)
    if monitor:
        # from the first POST until the last outcome settled: all the work of these orders
        by_process = monitor.cpu_seconds_by_process()
        cpu = sum(by_process.values())
        summary["cpu_seconds"] = round(cpu, 3)
        summary["cpu_ms_per_confirmed"] = (
            cpu * 1000 / summary["confirmed"] if summary["confirmed"] else None
        )
        # the same, process by process (Procfile names, the servers by kind)
        summary["cpu_ms_per_confirmed_by_process"] = {
            label: seconds * 1000 / summary["confirmed"] if summary["confirmed"] else None
            for label, seconds in by_process.items()
        }
    return summary


def _summary(
    rate: float,
    seconds: float,
    sent: list[Sent],
    outcomes: dict[str, tuple[str, float]],
    usage: dict[str, Any],
) -> dict[str, Any]:
    last_scheduled = sent[-1].scheduled
    confirmed_at: list[tuple[Sent, float]] = []
    other = 0
    for s in sent:
        outcome = outcomes.get(s.order_id or "")
        if outcome and outcome[0] == "OrderConfirmed":
            confirmed_at.append((s, outcome[1]))
        elif outcome:
            other += 1
    # orders not yet confirmed when the schedule ended: a system that keeps up has only the
    # ones in flight, a second's worth at most; one that falls behind has a growing queue
    backlog = len(sent) - sum(1 for _s, at in confirmed_at if at <= last_scheduled)
    last_confirmed = max((at for _s, at in confirmed_at), default=last_scheduled)
    return {
        "rate": rate,
        "seconds": seconds,
        "orders": len(sent),
        "errors": sum(1 for s in sent if s.error),
        "first_error": next((s.error for s in sent if s.error), None),
        "confirmed": len(confirmed_at),
        "rejected_or_cancelled": other,
        "latency_ms": percentiles([(at - s.sent) * 1000 for s, at in confirmed_at]),
        "post_ms": percentiles([(s.answered - s.sent) * 1000 for s in sent if s.order_id]),
        "send_lag_ms": percentiles([(s.sent - s.scheduled) * 1000 for s in sent]),
        "backlog_at_end": backlog,
        "confirmed_per_s": len(confirmed_at) / max(last_confirmed - sent[0].scheduled, 1e-9),
        "kept_up": len(confirmed_at) == len(sent) and backlog <= max(rate, 1),
        **usage,
    }


def _sender(base_url: str, jobs: queue.SimpleQueue, bodies: list[bytes], sent: list[Sent]) -> None:
    url = urlsplit(base_url)
    conn: http.client.HTTPConnection | None = None
    while (i := jobs.get()) is not None:
        record = sent[i]
        record.sent = time.perf_counter()
        for attempt in (1, 2):
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
                conn.request("POST", "/orders", body=bodies[i], headers=_JSON)
                response = conn.getresponse()
                body = response.read()
                if response.status == 201:
                    record.order_id = json.loads(body)["order_id"]
                else:
                    record.error = f"HTTP {response.status}: {body[:200]!r}"
                break
            except (OSError, http.client.HTTPException) as err:
                if conn is not None:
                    conn.close()
                conn = None
                # a keep-alive connection the server closed just then: once more on a new one
                if attempt == 2 or not isinstance(err, ConnectionError):
                    record.error = repr(err)
                    break
        record.answered = time.perf_counter()
    if conn is not None:
        conn.close()


def _order_body(i: int) -> bytes:
    n = i % SPREAD
    return json.dumps(
        {"customer_id": f"bench-{n}", "items": [{"sku": f"BENCH-{n}", "quantity": 1}]}
    ).encode()


def _settle(order_ids: list[str], outcomes: dict[str, tuple[str, float]]) -> None:
    """Wait until every order has an outcome, or none arrived for 15 s (it has given up)."""
    waiting = len(order_ids)
    idle_since = time.monotonic()
    while True:
        left = sum(1 for order_id in order_ids if order_id not in outcomes)
        if left == 0 or time.monotonic() - idle_since > 15:
            return
        if left < waiting:
            waiting, idle_since = left, time.monotonic()
        time.sleep(0.1)


def _record_outcome(outcomes: dict[str, tuple[str, float]]) -> Callable:
    def record(fields: dict[str, str], seen: float) -> None:
        if fields["event_type"] in OUTCOMES:
            outcomes.setdefault(fields["aggregate_id"], (fields["event_type"], seen))

    return record


def _seed(urls: dict[str, str]) -> None:
    """Stock and money enough that every order is confirmed."""
    for n in range(SPREAD):
        product = {"name": f"Bench {n}", "price_cents": 100, "available": 1_000_000_000}
        _put(urls["inventory"], f"/products/BENCH-{n}", product)
        _put(urls["billing"], f"/accounts/bench-{n}", {"balance_cents": 2_000_000_000})


def _put(base_url: str, path: str, body: dict[str, Any]) -> None:
    url = urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.request("PUT", path, body=json.dumps(body), headers=_JSON)
        response = conn.getresponse()
        if response.status not in (200, 201):
            raise RuntimeError(f"PUT {path}: HTTP {response.status} {response.read()[:200]!r}")
    finally:
        conn.close()


class _System:
    """The Procfile under run-all's supervisor (sagactl/supervise.py) with its own ports, run
    dir and log; its consumers replaced by `consumers` per service."""

    def __init__(
        self,
        db_urls: dict[str, str],
        redis_url: str,
        workdir: Path,
        consumers: int = 1,
        partitions: int = DEFAULT_PARTITIONS,
        profile: profiles.Profile | None = None,
    ) -> None:
        ports = {service: free_port() for service in SERVICES}
        self.urls = {s: f"http://127.0.0.1:{port}" for s, port in ports.items()}
        self.log_path = workdir / "system.log"
        bin_dir = Path(sys.executable).parent
        env = {
            **os.environ,
            **{f"{s.upper()}_DATABASE_URL": url for s, url in db_urls.items()},
            **{f"{s.upper()}_PORT": str(port) for s, port in ports.items()},
            "REDIS_URL": redis_url,
            "SAGA_RUN_DIR": str(workdir / "run"),
            # the development issuer of this run: services verify, the senders sign
            "AUTH_PUBLIC_KEY_FILE": str(issuer.ensure_key_pair(workdir / "run")),
            # an order still queued behind an overload must not be cancelled for its deadline
            "PAYMENT_TIMEOUT_SECONDS": "3600",
            "METRICS_PORT_BASE": "0",  # no endpoints to collide with; the metrics still count
            "STREAM_PARTITIONS": str(partitions),
            "CONSUMERS_PER_SERVICE": str(consumers),
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",  # as run-all: log lines reach the console as written
        }
        _JSON["Authorization"] = f"Bearer {issuer.admin_token(workdir / 'run', 'bench', 86400)}"
        self.profiling = profile is not None
        procfile = workdir / "Procfile"
        procfile.write_text(procfile_with_consumers(PROJECT_ROOT / "Procfile", consumers, profile))
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sagactl.supervise", str(procfile)],
                cwd=PROJECT_ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self) -> None:
        def ready() -> bool:
            return self.process.poll() is not None or all(
                _status(url, "/ready") == 200 for url in self.urls.values()
            )

        if not wait_until(ready, timeout=120, interval=0.25) or self.process.poll() is not None:
            raise RuntimeError("the system did not become ready")

    def stop(self) -> None:
        if self.profiling and self.process.poll() is None:
            profiles.finish(self.process.pid)
        # the supervisor stops its processes (each in a session of its own) on SIGTERM
        descendants = _process_tree(self.process.pid)[1:]
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for proc in descendants:  # whatever it could not stop
            with contextlib.suppress(psutil.Error):
                proc.kill()


def procfile_with_consumers(
    procfile: Path, consumers: int, profile: profiles.Profile | None = None
) -> str:
    """The Procfile's text with `consumers` consumers per service, as run-all runs them;
    with `profile`, the profiled ones under py-spy."""
    specs = with_consumer_replicas(parse_procfile(procfile), consumers)
    return "".join(
        f"{spec.name}: {profile.command(spec.name, spec.command) if profile else spec.command}\n"
        for spec in specs
    )


def _status(base_url: str, path: str) -> int:
    url = urlsplit(base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        conn.close()


class _Monitor:
    """CPU and memory of every process of the system, the servers and this load generator,
    grouped by Procfile name (the supervisor puts SAGA_PROCESS_NAME in each one's environment)."""

    def __init__(self, supervisor_pid: int, server_pids: dict[str, int]) -> None:
        self.supervisor_pid = supervisor_pid
        self.server_pids = server_pids
        self._cpu_at_start: dict[int, float] = {}
        self._started = 0.0

    def _processes(self) -> list[tuple[str, psutil.Process]]:
        found: list[tuple[str, psutil.Process]] = [(LOAD_GENERATOR, psutil.Process())]
        roots = [("supervisor", self.supervisor_pid), *self.server_pids.items()]
        for label, pid in roots:
            found.extend((_label(proc, label), proc) for proc in _process_tree(pid))
        return found

    def _cpu(self) -> dict[int, tuple[str, float]]:
        seconds: dict[int, tuple[str, float]] = {}
        for label, proc in self._processes():
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue  # it ended in between
            # with what its children used and it reaped: forks that come and go between two
            # looks (rq's work-horse per job, PostgreSQL's backend per new connection)
            used = times.user + times.system + times.children_user + times.children_system
            seconds[proc.pid] = (label, used)
        return seconds

    def begin(self) -> None:
        self._cpu_at_start = {pid: cpu for pid, (_label, cpu) in self._cpu().items()}
        self._started = time.perf_counter()
        psutil.cpu_percent(interval=None)  # the next call reports the time since this one

    def system_cpu_seconds(self) -> float:
        """CPU seconds of the system's processes and the servers since `begin` (a process
        started since then counts from zero; one that ended since then counts through its
        parent, which reaped it, with its whole life: short-lived ones, as the forks are)."""
        return sum(self.cpu_seconds_by_process().values())

    def cpu_seconds_by_process(self) -> dict[str, float]:
        """`system_cpu_seconds` per Procfile name (and server), the load generator left out."""
        per_label: dict[str, float] = defaultdict(float)
        for pid, (label, cpu) in self._cpu().items():
            if label != LOAD_GENERATOR:
                per_label[label] += cpu - self._cpu_at_start.get(pid, 0.0)
        return dict(sorted(per_label.items()))

    def end(self) -> dict[str, Any]:
        wall = time.perf_counter() - self._started
        system = psutil.cpu_percent(interval=None)
        per_label: dict[str, float] = defaultdict(float)
        for pid, (label, cpu) in self._cpu().items():
            per_label[label] += cpu - self._cpu_at_start.get(pid, 0.0)
        cpu = {label: 100 * s / wall for label, s in sorted(per_label.items())}
        # the machine's other load in the same units: a shared machine skews every figure
        cpu[OTHER_LOAD] = max(system * (psutil.cpu_count() or 1) - sum(cpu.values()), 0.0)
        return {"system_cpu_percent": system, "cpu_percent": cpu}  # in % of one core, as top

    def memory_mb(self) -> dict[str, dict[str, float]]:
        """RSS and PSS summed per group. RSS counts pages shared between forked workers (and
        PostgreSQL's shared buffers) once per process; PSS splits them among the sharers."""
        memory: dict[str, dict[str, float]] = defaultdict(lambda: {"rss": 0.0, "pss": 0.0})
        for label, proc in self._processes():
            try:
                info = proc.memory_full_info()
            except psutil.Error:
                continue
            memory[label]["rss"] += info.rss / 2**20
            memory[label]["pss"] += getattr(info, "pss", 0) / 2**20  # Linux only
        return dict(sorted(memory.items()))


def _label(proc: psutil.Process, default: str) -> str:
    try:
        return proc.environ().get("SAGA_PROCESS_NAME") or default
    except psutil.Error:
        return default


def _process_tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants ([] once it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
