"""The process supervisor of `saga run-all` and `saga chaos`, on real (small) processes."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading

import psutil

from sagactl.supervisor import Backoff, Console, ExitWaiter, ProcessSpec, Supervisor
from tests.helpers import wait_until


def _supervisor(specs: list[ProcessSpec], out: io.StringIO, backoff: Backoff) -> Supervisor:
    return Supervisor(specs, dict(os.environ), Console([s.name for s in specs], out), backoff)


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_a_killed_process_is_restarted_and_the_others_keep_running() -> None:
    out = io.StringIO()
    specs = [ProcessSpec("sleeper-1", "sleep 60"), ProcessSpec("sleeper-2", "sleep 60")]
    supervisor = _supervisor(specs, out, Backoff(initial=0.2))
    supervisor.start()
    try:
        first = wait_until(lambda: supervisor.pid("sleeper-1"))
        other = wait_until(lambda: supervisor.pid("sleeper-2"))
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: supervisor.pid("sleeper-1") not in (None, first))
        assert "sleeper-1 exited with -9; restarting in 0.2 s" in out.getvalue()
        assert supervisor.pid("sleeper-2") == other
    finally:
        supervisor.stop()


def test_a_crash_loop_backs_off_and_output_is_prefixed() -> None:
    out = io.StringIO()
    supervisor = _supervisor(
        [ProcessSpec("crasher", "sh -c 'echo hello; exit 3'")],
        out,
        Backoff(initial=0.1, maximum=0.4),
    )
    supervisor.start()
    try:
        wait_until(lambda: out.getvalue().count("crasher exited with 3") >= 4, timeout=20)
    finally:
        supervisor.stop()
    delays = [
        line.rsplit("restarting in ", 1)[1]
        for line in out.getvalue().splitlines()
        if "crasher exited with 3" in line
    ]
    assert delays[:4] == ["0.1 s", "0.2 s", "0.4 s", "0.4 s"]
    assert " crasher    | hello\n" in out.getvalue()


def test_stop_ends_every_process_group_orphans_included() -> None:
    out = io.StringIO()
    # the shell forks a child and a grandchild: neither may outlive the supervisor
    specs = [
        ProcessSpec("family", "sh -c 'sleep 60 & sleep 60'"),
        ProcessSpec("single", "sleep 60"),
    ]
    supervisor = _supervisor(specs, out, Backoff())
    supervisor.start()
    main = wait_until(lambda: supervisor.pid("family"))
    wait_until(lambda: len(psutil.Process(main).children(recursive=True)) >= 2)
    pids = [
        main,
        *(child.pid for child in psutil.Process(main).children(recursive=True)),
        wait_until(lambda: supervisor.pid("single")),
    ]
    supervisor.stop()
    assert _alive(pids) == []
    assert "exited" not in out.getvalue()  # a stop is not reported as a crash


def test_a_procfile_runs_under_the_supervisor_until_sigterm_stops_every_process(tmp_path) -> None:
    """`python -m sagactl.supervise PROCFILE`, as the benchmark runs its system: each process
    knows its Procfile name, its output is prefixed, and SIGTERM stops them all."""
    procfile = tmp_path / "Procfile"
    procfile.write_text(
        "# the two processes\n"
        "first: sh -c 'echo named $SAGA_PROCESS_NAME; exec sleep 60'\n"
        "second: sh -c 'echo named $SAGA_PROCESS_NAME; exec sleep 60'\n"
    )
    log = tmp_path / "out.log"
    with log.open("w") as out:
        runner = subprocess.Popen(
            [sys.executable, "-m", "sagactl.supervise", str(procfile)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        sleepers = wait_until(
            lambda: (
                [p for p in psutil.Process(runner.pid).children() if p.name() == "sleep"]
                if len(psutil.Process(runner.pid).children()) == 2
                else None
            )
        )
        assert sorted(p.environ()["SAGA_PROCESS_NAME"] for p in sleepers) == ["first", "second"]
        wait_until(lambda: log.read_text().count("| named ") == 2)
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=30) == 0
    finally:
        if runner.poll() is None:
            runner.kill()
    assert _alive([p.pid for p in sleepers]) == []
    lines = log.read_text().splitlines()
    assert any(line.split()[1:] == ["first", "|", "named", "first"] for line in lines), lines
    assert any(line.split()[1:] == ["second", "|", "named", "second"] for line in lines), lines


def test_supervise_names_a_missing_procfile(tmp_path) -> None:
    missing = tmp_path / "nope"
    result = subprocess.run(
        [sys.executable, "-m", "sagactl.supervise", str(missing)], capture_output=True, text=True
    )
    assert result.returncode == 2 and f"{missing}: no such file" in result.stderr
    empty = tmp_path / "Procfile"
    empty.write_text("# nothing\n")
    result = subprocess.run(
        [sys.executable, "-m", "sagactl.supervise", str(empty)], capture_output=True, text=True
    )
    assert result.returncode == 2 and f"{empty}: no processes" in result.stderr


def _waiting(waiter: ExitWaiter, processes: list, timeout: float | None) -> threading.Thread:
    thread = threading.Thread(target=waiter.wait, args=(processes, timeout), daemon=True)
    thread.start()
    return thread


def test_the_watcher_sleeps_until_a_process_exits_or_it_is_woken() -> None:
    """No polling: the supervisor's thread waits on the processes' pidfds, so an idle system
    costs it no wake-ups; an exit, or a stop (`wake`), ends the wait at once."""
    waiter = ExitWaiter()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        assert waiter._pidfd(sleeper.pid) is not None  # Linux: no fallback to polling
        waiting = _waiting(waiter, [sleeper], None)
        waiting.join(0.5)
        assert waiting.is_alive()  # nothing happened: still asleep
        sleeper.kill()
        waiting.join(10)
        assert not waiting.is_alive()  # woken by the exit
        assert sleeper.wait(5) == -signal.SIGKILL

        other = subprocess.Popen(["sleep", "60"])
        try:
            waiting = _waiting(waiter, [other], None)
            waiter.wake()
            waiting.join(10)
            assert not waiting.is_alive() and other.poll() is None  # woken by wake()
        finally:
            other.kill()
            other.wait()
    finally:
        waiter.close()
