"""Injectable crash points, for crash tests and chaos runs (never timing luck).

`SAGA_CRASH_AT=<point>` makes a process die on the spot, like SIGKILL, when it reaches that
point: relay `after_xadd`; consumer `mid_handler` (before commit) and `after_commit`
(before XACK). The point is read once, when a process wires its parts (`configured_fault`):
unset, the hot paths call `no_faults`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

CRASH_EXIT_CODE = 137  # what a SIGKILLed process reports


def no_faults(_point: str) -> None:
    pass


def configured_fault() -> Callable[[str], None]:
    """The fault hook of this process: `no_faults`, or a crash at SAGA_CRASH_AT's point."""
    crash_at = os.environ.get("SAGA_CRASH_AT")
    if not crash_at:
        return no_faults

    def crash_at_configured_point(point: str) -> None:
        if point == crash_at:
            os._exit(CRASH_EXIT_CODE)  # no cleanup, no flush: a crash, not an exit

    return crash_at_configured_point
