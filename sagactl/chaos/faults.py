"""The fault injector: at random intervals, SIGKILL or pause a process or crash a server, then
let the supervisor (or this thread, for the servers) bring it back."""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field

import psutil
import redis

from contracts import relay_status_key
from sagactl.chaos.servers import ChaosServers
from sagactl.supervisor import Supervisor
from service_runtime.config import SERVICES

log = logging.getLogger(__name__)

# kind -> weight: process kills are cheap and frequent, server crashes rarer
KINDS = {
    "web-master": 2,
    "web-worker": 2,
    "relay-active": 2,
    "relay-standby": 1,
    "consumer": 3,
    "consumer-stop": 1,
    "consumer-pause": 2,
    "rq-worker": 1,
    "cron": 1,
    "redis-kill": 1,
    "redis-restart": 1,
    "postgres-crash": 1,
    # Redis losing acknowledged data (issue 10); the single embedded Redis only
    "redis-data-loss": 1,
    "redis-failover": 1,
}
REDIS_LOSS_KINDS = ("redis-data-loss", "redis-failover")


@dataclass
class FaultLog:
    by_kind: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    events: list[dict] = field(default_factory=list)
    last_fault_at: float | None = None  # time.monotonic() of the last fault injected


class FaultInjector(threading.Thread):
    def __init__(
        self,
        supervisor: Supervisor,
        servers: ChaosServers,
        kinds: list[str],
        mean_interval: float,
        rng: random.Random,
        outage_seconds: tuple[float, float] = (0.5, 3.0),
        # a consumer-pause: longer than a lease and a heartbeat (6 s with the defaults), so
        # that the paused consumer's partitions move to the others meanwhile
        pause_seconds: tuple[float, float] = (6.5, 9.0),
        before_kill: Callable[[str], None] = lambda _name: None,
    ) -> None:
        super().__init__(name="fault-injector", daemon=True)
        self.supervisor = supervisor
        self.servers = servers
        self.kinds = kinds
        self.mean_interval = mean_interval
        self.rng = rng
        self.outage_seconds = outage_seconds
        self.pause_seconds = pause_seconds
        self.before_kill = before_kill  # last look at a process (its counters) before it dies
        self.log = FaultLog()
        self._halt = threading.Event()
        self._client: redis.Redis | None = None
        self._actions: dict[str, Callable[[], str | None]] = {
            "web-master": self._web_master,
            "web-worker": self._web_worker,
            "relay-active": lambda: self._relay(active=True),
            "relay-standby": lambda: self._relay(active=False),
            "consumer": self._consumer,
            "consumer-stop": self._consumer_stop,
            "consumer-pause": self._consumer_pause,
            "rq-worker": lambda: self._kill("worker"),
            "cron": lambda: self._kill("cron"),
            "redis-kill": lambda: self._outage(self.servers.kill_redis, self.servers.start_redis),
            "redis-restart": lambda: self._outage(
                self.servers.stop_redis, self.servers.start_redis
            ),
            "postgres-crash": lambda: self._outage(
                self.servers.crash_postgres, self.servers.start_postgres
            ),
            "redis-data-loss": self._redis_data_loss,
            "redis-failover": lambda: self.servers.fail_over_behind(
                self.rng.uniform(*self.outage_seconds)
            ),
        }

    def stop(self) -> None:
        """No new fault after this returns (one in progress, e.g. an outage, is completed)."""
        self._halt.set()
        if self.is_alive():
            self.join()

    def run(self) -> None:
        weights = [KINDS[kind] for kind in self.kinds]
        while not self._halt.wait(self.mean_interval * self.rng.uniform(0.5, 1.5)):
            kind = self.rng.choices(self.kinds, weights)[0]
            self.inject(kind)

    def inject(self, kind: str) -> None:
        started, started_wall = time.monotonic(), time.time()
        try:
            target = self._actions[kind]()
        except Exception as err:  # a fault that could not be staged is no reason to stop
            log.warning("fault %s not injected: %s", kind, err)
            target = None
        if target is None:
            self.log.skipped[kind] += 1
            return
        self.log.by_kind[kind] += 1
        self.log.last_fault_at = started
        self.log.events.append({"at": started_wall, "kind": kind, "target": target})
        log.info("fault %s: %s", kind, target)

    # -- the faults; each returns what it hit, or None when there was nothing to hit ----------

    def _kill(self, name: str, signum: signal.Signals = signal.SIGKILL) -> str | None:
        if name not in self.supervisor.names:
            return None
        self.before_kill(name)
        pid = self.supervisor.kill(name, signum=signum)
        return f"{name} pid {pid}" if pid else None

    def _service(self) -> str:
        return self.rng.choice(SERVICES)

    def _web_master(self) -> str | None:
        return self._kill(f"{self._service()}-web")

    def _web_worker(self) -> str | None:
        name = f"{self._service()}-web"
        master = self.supervisor.pid(name)
        if master is None:
            return None
        workers = psutil.Process(master).children()
        if not workers:
            return None
        worker = self.rng.choice(workers)
        with suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)
        return f"{name} worker pid {worker.pid}"

    def _relay(self, active: bool) -> str | None:
        """The relay holding the outbox lock (per its status hash in Redis), or the other one."""
        service = self._service()
        pair = [f"{service}-relay", f"{service}-relay-standby"]
        holder = self._redis().hget(relay_status_key(service), "holder") or ""
        holder_pid = int(holder.rsplit(":", 1)[-1]) if ":" in holder else None
        pids = {name: self.supervisor.pid(name) for name in pair}
        active_names = [name for name, pid in pids.items() if pid and pid == holder_pid]
        if not active_names:
            return None  # nobody known to be active right now (e.g. a takeover in progress)
        if active:
            return self._kill(active_names[0])
        return self._kill(next(name for name in pair if name != active_names[0]))

    def _consumer(self) -> str | None:
        """One running consumer process of a service; its partitions move to the others."""
        name = self._running_consumer()
        return self._kill(name) if name else None

    def _consumer_stop(self) -> str | None:
        """SIGTERM one consumer process (a deploy, a scale-in): it wakes its workers' blocked
        reads and hands its partitions back at once; restarted, it joins again and the others
        hand its share back to it."""
        name = self._running_consumer()
        return self._kill(name, signal.SIGTERM) if name else None

    def _consumer_pause(self) -> str | None:
        """SIGSTOP one consumer process past its leases, then SIGCONT: its workers go on from
        where they stopped (a wait, a read, a transaction) as after a frozen VM or a long GC
        pause, while others own its partitions (the fence stops them)."""
        name = self._running_consumer()
        pid = self.supervisor.pid(name) if name else None
        if pid is None:
            return None
        seconds = self.rng.uniform(*self.pause_seconds)
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        return f"{name} pid {pid} paused {seconds:.1f} s"

    def _running_consumer(self) -> str | None:
        service = self._service()
        names = [
            name
            for name in self.supervisor.names
            if is_consumer_process(name, service) and self.supervisor.pid(name) is not None
        ]
        return self.rng.choice(names) if names else None

    def _redis_data_loss(self) -> str:
        self.servers.lose_redis_data()
        return "killed, data directory emptied, restarted"

    def _outage(self, down: Callable[[], None], up: Callable[[], None]) -> str:
        down()
        seconds = self.rng.uniform(*self.outage_seconds)
        time.sleep(seconds)
        for attempt in range(1, 6):  # a server left down would stall the whole run
            try:
                up()
                break
            except Exception as err:
                log.error("server restart failed (attempt %s): %s", attempt, err)
                time.sleep(attempt)
        return f"down {seconds:.1f} s"

    def _redis(self) -> redis.Redis:
        if self._client is None:  # reconnects by itself after a Redis restart
            self._client = self.servers.redis_client(socket_connect_timeout=2, socket_timeout=5)
        return self._client


def is_consumer_process(name: str, service: str | None = None) -> bool:
    """`orders-consumer` (a Procfile's one consumer) or `orders-consumer-2` (one of several)."""
    services = SERVICES if service is None else (service,)
    return any(
        name == f"{s}-consumer"
        or (name.startswith(f"{s}-consumer-") and name[len(s) + 10 :].isdigit())
        for s in services
    )
