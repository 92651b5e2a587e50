"""The process supervisor of `saga run-all` and `saga chaos`: the Procfile's processes, each
restarted with backoff when it dies.

honcho stops everything when one process dies (it has no restart policy); a user expects the
opposite, like systemd or Kubernetes: the other processes keep serving and the dead one comes
back. Every process runs in its own session (process group), so a terminal's Ctrl-C reaches
only us, and when a main process dies its whole group is killed before the restart, so orphans
(gunicorn workers, an rq work-horse) never outlive their parent. Which processes run, and how
many, is data: the Procfile's entries (`orders-consumer-1`, `orders-consumer-2`, ...).
"""

from __future__ import annotations

import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol, TextIO

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


def with_consumer_replicas(specs: list[ProcessSpec], count: int) -> list[ProcessSpec]:
    """Each `saga consume SVC` entry as `count` consumers of SVC's group, SVC-consumer-1..N,
    with stable names (`--instance i`), so a restarted consumer re-reads its own pending
    entries and keeps its metrics port."""
    scaled = []
    for spec in specs:
        if spec.command.split()[:2] != ["saga", "consume"]:
            scaled.append(spec)
            continue
        scaled += [
            ProcessSpec(f"{spec.name}-{i}", f"{spec.command} --instance {i}")
            for i in range(1, count + 1)
        ]
    return scaled


def with_standby_relays(specs: list[ProcessSpec]) -> list[ProcessSpec]:
    """A second `saga relay SVC` next to each relay: it waits on the advisory lock."""
    extra = [
        ProcessSpec(f"{spec.name}-standby", spec.command)
        for spec in specs
        if spec.command.split()[:2] == ["saga", "relay"]
    ]
    return [*specs, *extra]


@dataclass(frozen=True)
class Backoff:
    """Restart delays: `initial`, doubled for each exit that follows its start by less than
    `stable_after` seconds (a crash loop), at most `maximum`; a planned kill restarts quickly."""

    initial: float = 1.0
    maximum: float = 30.0
    stable_after: float = 10.0
    planned: float = 0.3

    def delay(self, quick_failures: int) -> float:
        return min(self.initial * 2 ** max(quick_failures - 1, 0), self.maximum)


class Output(Protocol):
    """Where the processes' output and the supervisor's own lines go."""

    def attach(self, name: str) -> int | IO[bytes]:
        """The stdout/stderr to give a new process `name`."""
        ...

    def started(self, name: str) -> None:
        """Called after the process was spawned (the parent's end of a pipe can close)."""
        ...

    def announce(self, name: str, text: str) -> None: ...

    def close(self) -> None: ...


class LogFiles:
    """One log file per process in `log_dir` (the chaos run)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._files: dict[str, IO[bytes]] = {}

    def attach(self, name: str) -> IO[bytes]:
        if name not in self._files:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._files[name] = (self.log_dir / f"{name}.log").open("ab")
        handle = self._files[name]
        handle.write(f"--- supervisor: starting {name} at {time.time():.3f}\n".encode())
        handle.flush()
        return handle

    def started(self, name: str) -> None:
        pass

    def announce(self, name: str, text: str) -> None:
        log.warning("%s", text)
        handle = self._files[name]
        handle.write(f"--- supervisor at {time.time():.3f}: {text}\n".encode())
        handle.flush()

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()


class Console:
    """Every line on one stream, prefixed with the time and the process name, as honcho does
    (`make run-all`)."""

    SUPERVISOR = "supervisor"

    def __init__(self, names: list[str], stream: TextIO = sys.stdout) -> None:
        self.stream = stream
        self.width = max(len(name) for name in [*names, self.SUPERVISOR])
        self._lock = threading.Lock()
        self._write_ends: dict[str, int] = {}
        self._readers: list[threading.Thread] = []

    def attach(self, name: str) -> int:
        read_end, write_end = os.pipe()
        self._write_ends[name] = write_end
        reader = threading.Thread(
            target=self._copy, args=(name, read_end), name=f"output-{name}", daemon=True
        )
        reader.start()
        self._readers.append(reader)
        return write_end

    def started(self, name: str) -> None:
        # only the child (and its children) keep the write end: EOF when they are all gone
        os.close(self._write_ends.pop(name))

    def announce(self, name: str, text: str) -> None:
        self._print(self.SUPERVISOR, text)

    def close(self) -> None:
        for reader in self._readers:
            reader.join(timeout=2)

    def _copy(self, name: str, read_end: int) -> None:
        with os.fdopen(read_end, "rb") as pipe:
            for raw in pipe:
                self._print(name, raw.decode(errors="replace").rstrip("\n"))

    def _print(self, name: str, line: str) -> None:
        # our terminal may be gone (OSError): keep supervising all the same
        with self._lock, suppress(OSError, ValueError):
            self.stream.write(f"{time.strftime('%H:%M:%S')} {name:<{self.width}} | {line}\n")
            self.stream.flush()


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
    def __init__(
        self,
        specs: list[ProcessSpec],
        env: Mapping[str, str],
        output: Output,
        backoff: Backoff = Backoff(),
        cwd: Path | None = None,
    ) -> None:
        self.env = dict(env)
        self.output = output
        self.backoff = backoff
        self.cwd = cwd
        self._procs = {spec.name: _Process(spec) for spec in specs}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._exits = ExitWaiter()
        self._monitor = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    @property
    def names(self) -> list[str]:
        return list(self._procs)

    def start(self) -> None:
        with self._lock:
            for name in self._procs:
                self._spawn(name)
        self._monitor.start()

    def pid(self, name: str) -> int | None:
        with self._lock:
            popen = self._procs[name].popen
            return popen.pid if popen and popen.poll() is None else None

    def kill(
        self, name: str, timeout: float = 10.0, signum: signal.Signals = signal.SIGKILL
    ) -> int | None:
        """SIGKILL (or `signum`) the main process of `name` as a planned fault; returns its pid
        once it is gone (None if it was not running). The watcher restarts it shortly after."""
        with self._lock:
            proc = self._procs[name]
            popen = proc.popen
            if popen is None or popen.poll() is not None:
                return None
            proc.planned = True
            with suppress(ProcessLookupError):
                os.kill(popen.pid, signum)
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
        self._exits.wake()
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
        self._exits.close()
        self.output.close()

    # -- internals ---------------------------------------------------------------------------

    def _spawn(self, name: str) -> None:
        proc = self._procs[name]
        sink = self.output.attach(name)
        try:
            proc.popen = subprocess.Popen(
                ["/bin/sh", "-c", f"exec {proc.spec.command}"],
                # its Procfile name, as honcho's HONCHO_PROCESS_NAME (the benchmark groups
                # its CPU figures by it)
                env={**self.env, "SAGA_PROCESS_NAME": name},
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: killed as a whole, never by our Ctrl-C
            )
        finally:
            self.output.started(name)
        proc.started_at = time.monotonic()
        proc.starts += 1
        proc.restart_at = None

    def _watch(self) -> None:
        """Sleep until a process exits or a restart is due (no polling: an idle system costs
        the supervisor nothing), then restart what must be."""
        while not self._stop.is_set():
            with self._lock:
                for name, proc in self._procs.items():
                    if self._stop.is_set():
                        return  # stopping: a process ending now must not come back
                    self._check(name, proc)
                running = [p.popen for p in self._procs.values() if p.restart_at is None]
                due = [p.restart_at for p in self._procs.values() if p.restart_at is not None]
            timeout = max(min(due) - time.monotonic(), 0.0) if due else None
            self._exits.wait([popen for popen in running if popen is not None], timeout)

    def _check(self, name: str, proc: _Process) -> None:
        popen = proc.popen
        now = time.monotonic()
        if popen is not None and proc.restart_at is None and popen.poll() is not None:
            _signal_group(popen.pid, signal.SIGKILL)
            if proc.planned:
                delay = self.backoff.planned
            else:
                # a crash: back off while it keeps crashing right after start
                quick = now - proc.started_at < self.backoff.stable_after
                proc.quick_failures = proc.quick_failures + 1 if quick else 1
                delay = self.backoff.delay(proc.quick_failures)
                proc.unplanned_exits.append(
                    {
                        "at": time.time(),
                        "returncode": popen.returncode,
                        "after_s": now - proc.started_at,
                    }
                )
                self.output.announce(
                    name, f"{name} exited with {popen.returncode}; restarting in {delay:.1f} s"
                )
            proc.planned = False
            proc.restart_at = now + delay
        if proc.restart_at is not None and now >= proc.restart_at:
            self._spawn(name)


class ExitWaiter:
    """Waits until one of some child processes exits, a timeout passes, or `wake` is called:
    a pidfd per process (Linux 5.3+), polled with a pipe that `wake` writes to. Where pidfds
    are not available it looks every POLL_SECONDS instead."""

    POLL_SECONDS = 0.1

    def __init__(self) -> None:
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._pidfds: dict[int, int] = {}  # pid -> its pidfd, while the process is watched

    def wait(self, processes: list[subprocess.Popen[bytes]], timeout: float | None) -> None:
        fds = [self._pidfd(popen.pid) for popen in processes]
        if None in fds:
            timeout = self.POLL_SECONDS if timeout is None else min(timeout, self.POLL_SECONDS)
        poller = select.poll()
        poller.register(self._wake_read, select.POLLIN)
        for fd in fds:
            if fd is not None:
                poller.register(fd, select.POLLIN)
        ready = poller.poll(None if timeout is None else timeout * 1000)
        if any(fd == self._wake_read for fd, _event in ready):
            with suppress(BlockingIOError):
                os.read(self._wake_read, 64)
        self._forget(keep={popen.pid for popen in processes})

    def wake(self) -> None:
        with suppress(BlockingIOError, OSError):
            os.write(self._wake_write, b"x")

    def close(self) -> None:
        self._forget(keep=set())
        for fd in (self._wake_read, self._wake_write):
            with suppress(OSError):
                os.close(fd)

    def _pidfd(self, pid: int) -> int | None:
        if pid not in self._pidfds:
            try:
                self._pidfds[pid] = os.pidfd_open(pid)
            except (AttributeError, OSError):  # no pidfds here, or the process is gone
                return None
        return self._pidfds[pid]

    def _forget(self, keep: set[int]) -> None:
        for pid in [pid for pid in self._pidfds if pid not in keep]:
            with suppress(OSError):
                os.close(self._pidfds.pop(pid))


def _signal_group(pgid: int, signum: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)
