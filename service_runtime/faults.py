"""Injectable crash points, for crash tests and chaos runs (never timing luck).

`SAGA_CRASH_AT=<point>` makes a process die on the spot, like SIGKILL, when it reaches that
point: relay `after_xadd`; consumer `mid_handler` (before commit) and `after_commit`
(before XACK). Unset, the check costs one dict lookup.
"""

from __future__ import annotations

import os

CRASH_EXIT_CODE = 137  # what a SIGKILLed process reports


def no_faults(_point: str) -> None:
    pass


def crash_at_configured_point(point: str) -> None:
    if os.environ.get("SAGA_CRASH_AT") == point:
        os._exit(CRASH_EXIT_CODE)  # no cleanup, no flush: a crash, not an exit
