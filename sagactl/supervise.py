"""`python -m sagactl.supervise PROCFILE`: a Procfile's processes under the supervisor of
`saga run-all` (sagactl/supervisor.py), with this process's environment, until SIGTERM or
SIGINT stops them all.

The benchmark runs its system this way, so that it measures the process manager users run
(it ran honcho before, which copies each line through a multiprocessing queue: 0.61-0.66 ms
of CPU per order against 0.15-0.16 for this supervisor, README "Performance")."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from sagactl.supervisor import Console, Supervisor, parse_procfile


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m sagactl.supervise PROCFILE", file=sys.stderr)
        return 2
    if not Path(args[0]).is_file():
        print(f"{args[0]}: no such file", file=sys.stderr)
        return 2
    specs = parse_procfile(Path(args[0]))
    if not specs:
        print(f"{args[0]}: no processes (lines of the form `name: command`)", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    supervisor = Supervisor(
        specs, dict(os.environ), Console([spec.name for spec in specs]), cwd=Path.cwd()
    )
    supervisor.start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        supervisor.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
