"""A small process supervisor for the chaos run: the Procfile's processes, each restartable.

honcho stops everything when one process dies; a soak needs the opposite: SIGKILL one process
and have it come back, like systemd or Kubernetes would. Every process runs in its own
session (process group), and when its main process dies the whole group is killed before the
restart, so orphans (gunicorn workers, an rq work-horse) never outlive their parent.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)

_LINE = re.compile(r"^([A-Za-z0-9_.-]+):\s*(.+)$")


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    command: str  # shell syntax, $VARS expanded by sh as honcho does


def parse_procfile(path: Path) -> list[ProcessSpec]:
    specs = []
    for line in path.read_text().splitlines():
        match = _LINE.match(line.strip())
        if match and not line.lstrip().startswith("#"):
            specs.append(ProcessSpec(match.group(1), match.group(2).strip()))
    return specs


def with_standby_relays(specs: list[ProcessSpec]) -> list[ProcessSpec]:
    """A second `saga relay SVC` next to each relay: it waits on the advisory lock."""
    extra = [
        ProcessSpec(f"{spec.name}-standby", spec.command)
        for spec in specs
        if spec.command.split()[:2] == ["saga", "relay"]
    ]
    return [*specs, *extra]


@dataclass
class _Process:
    spec: ProcessSpec
    popen: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    planned: bool = False  # the exit in progress was ours (a fault), not a crash
    restart_at: float | None = None
    quick_failures: int = 0
    starts: int = 0
    unplanned_exits: list[dict] = field(default_factory=list)


class Supervisor:
    PLANNED_RESTART_DELAY = 0.3
    MAX_BACKOFF = 5.0

    def __init__(self, specs: list[ProcessSpec], env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self._procs = {spec.name: _Process(spec) for spec in specs}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._logs: dict[str, IO[bytes]] = {}
        self._monitor = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    @property
    def names(self) -> list[str]:
        return list(self._procs)

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for name in self._procs:
            self._spawn(name)
        self._monitor.start()

    def pid(self, name: str) -> int | None:
        with self._lock:
            popen = self._procs[name].popen
            return popen.pid if popen and popen.poll() is None else None

    def kill(self, name: str, timeout: float = 10.0) -> int | None:
        """SIGKILL the main process of `name`; returns its pid once it is gone (None if it was
        not running). The watcher restarts it shortly after."""
        with self._lock:
            proc = self._procs[name]
            popen = proc.popen
            if popen is None or popen.poll() is not None:
                return None
            proc.planned = True
            with suppress(ProcessLookupError):
                os.kill(popen.pid, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            popen.wait(timeout)
        return popen.pid

    def unplanned_exits(self) -> dict[str, list[dict]]:
        with self._lock:
            return {n: list(p.unplanned_exits) for n, p in self._procs.items() if p.unplanned_exits}

    def starts(self) -> dict[str, int]:
        with self._lock:
            return {name: proc.starts for name, proc in self._procs.items()}

    def all_running(self) -> bool:
        return all(self.pid(name) is not None for name in self._procs)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every process group, then SIGKILL what is left after the timeout."""
        self._stop.set()
        if self._monitor.is_alive():
            self._monitor.join(5)
        with self._lock:
            popens = [p.popen for p in self._procs.values() if p.popen is not None]
        for popen in popens:
            _signal_group(popen.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for popen in popens:
            with suppress(subprocess.TimeoutExpired):
                popen.wait(max(deadline - time.monotonic(), 0.1))
        for popen in popens:
            _signal_group(popen.pid, signal.SIGKILL)  # stragglers and orphans alike
            with suppress(subprocess.TimeoutExpired):
                popen.wait(5)
        for handle in self._logs.values():
            handle.close()

    # -- internals ---------------------------------------------------------------------------

    def _spawn(self, name: str) -> None:
        proc = self._procs[name]
        if name not in self._logs:
            self._logs[name] = (self.log_dir / f"{name}.log").open("ab")
        handle = self._logs[name]
        handle.write(f"--- supervisor: starting {name} at {time.time():.3f}\n".encode())
        handle.flush()
        proc.popen = subprocess.Popen(
            ["/bin/sh", "-c", f"exec {proc.spec.command}"],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: killed as a whole, never by our Ctrl-C
        )
        proc.started_at = time.monotonic()
        proc.starts += 1
        proc.restart_at = None

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            with self._lock:
                for name, proc in self._procs.items():
                    self._check(name, proc)

    def _check(self, name: str, proc: _Process) -> None:
        popen = proc.popen
        now = time.monotonic()
        if popen is not None and proc.restart_at is None and popen.poll() is not None:
            _signal_group(popen.pid, signal.SIGKILL)
            if proc.planned:
                delay = self.PLANNED_RESTART_DELAY
            else:
                # a crash: back off while it keeps crashing right after start
                quick = now - proc.started_at < 10
                proc.quick_failures = proc.quick_failures + 1 if quick else 0
                delay = min(0.5 * 2**proc.quick_failures, self.MAX_BACKOFF)
                proc.unplanned_exits.append(
                    {
                        "at": time.time(),
                        "returncode": popen.returncode,
                        "after_s": now - proc.started_at,
                    }
                )
                log.warning("%s exited by itself (code %s)", name, popen.returncode)
            proc.planned = False
            proc.restart_at = now + delay
        if proc.restart_at is not None and now >= proc.restart_at:
            self._spawn(name)


def _signal_group(pgid: int, signum: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)
