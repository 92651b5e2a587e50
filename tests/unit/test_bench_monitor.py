"""The end-to-end bench's CPU monitor counts what the system's processes used, also in forks
that are born and reaped between two of its looks (rq's work-horse per job, PostgreSQL's
backend per new connection): their time reaches the parent's children times."""

from __future__ import annotations

import os
import subprocess
import sys

from benchmarks.end_to_end import _Monitor

# Waits for a line on stdin, forks a child that burns a fixed amount of work, reaps it, prints
# the child's CPU seconds (from wait4's rusage), then waits for stdin to close.
_PARENT = r"""
import os, sys
sys.stdin.readline()
pid = os.fork()
if pid == 0:
    total = 0
    for i in range(3_000_000):
        total += i * i
    os._exit(0)
_, _, usage = os.wait4(pid, 0)
print(usage.ru_utime + usage.ru_stime, flush=True)
sys.stdin.read()
"""


def test_cpu_of_a_fork_born_and_reaped_between_two_looks_is_counted():
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        monitor = _Monitor(supervisor_pid=parent.pid, server_pids={})
        monitor.begin()
        parent.stdin.write("go\n")
        parent.stdin.flush()
        child_cpu = float(parent.stdout.readline())  # the child is gone: reaped by its parent
        counted = monitor.cpu_seconds_by_process()["supervisor"]
    finally:
        parent.stdin.close()
        parent.wait(timeout=10)
    assert child_cpu > 0.05  # the child really worked
    # /proc counts in clock ticks, user and system time each rounded down; rusage in µs
    assert counted >= child_cpu - 2 / os.sysconf("SC_CLK_TCK")
