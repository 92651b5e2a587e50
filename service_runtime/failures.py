"""What kind of failure an exception is, decided once for every loop and request.

- an outage: a server is unreachable or refusing work for a while (connection lost, pool
  exhausted, Redis loading, out of memory, read-only replica after a failover). Back off and
  try again; it costs no delivery attempt and is never the handler's fault.
- a conflict: PostgreSQL aborted the transaction to break a deadlock (40P01) or a
  serialization failure (40001). Retry at once, alone; it says nothing about the input.
- anything else is the work's own error: counted as a failed attempt.

psycopg makes DeadlockDetected and SerializationFailure subclasses of OperationalError, so
"OperationalError means outage" is wrong; the SQLSTATE decides.
"""

from __future__ import annotations

import enum

import psycopg
import redis
from psycopg import errors as pg_errors
from psycopg_pool import PoolTimeout

from service_runtime.redis_client import REDIS_OUTAGE_ERRORS


class FailureKind(enum.Enum):
    OUTAGE = "outage"
    CONFLICT = "conflict"
    ERROR = "error"


CONFLICT_ERRORS: tuple[type[BaseException], ...] = (
    pg_errors.DeadlockDetected,
    pg_errors.SerializationFailure,
)

# Redis error replies that mean "this server can't take the command right now" (issue: an
# OOM or READONLY reply used to kill the relay and the consumers). READONLY comes from a
# replica after a failover, LOADING from a restart, MISCONF from a failing disk.
_REDIS_OUTAGE_REPLIES = (
    "OOM",
    "MISCONF",
    "READONLY",
    "LOADING",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "MASTERDOWN",
    "NOREPLICAS",
)
# redis-py turns some of those replies into classes and strips the code from the message
# ("You can't write against a read only replica."): READONLY, OOM, MASTERDOWN.
_REDIS_OUTAGE_CLASSES = (
    redis.exceptions.ReadOnlyError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.MasterDownError,
)


def classify(err: BaseException) -> FailureKind:
    if isinstance(err, CONFLICT_ERRORS):
        return FailureKind.CONFLICT
    if isinstance(err, PoolTimeout):
        return FailureKind.OUTAGE
    if isinstance(err, psycopg.OperationalError):
        # Connection-level trouble has no SQLSTATE or class 08 (connection exception),
        # 57P0x (shutdown, cannot connect now), 53xxx (insufficient resources).
        state = getattr(err, "sqlstate", None)
        if state is None or state.startswith(("08", "57P", "53")):
            return FailureKind.OUTAGE
        return FailureKind.ERROR
    if isinstance(err, REDIS_OUTAGE_ERRORS):
        return FailureKind.OUTAGE
    if isinstance(err, _REDIS_OUTAGE_CLASSES):
        return FailureKind.OUTAGE
    if isinstance(err, redis.ResponseError) and str(err).startswith(_REDIS_OUTAGE_REPLIES):
        return FailureKind.OUTAGE
    if isinstance(err, redis.ResponseError) and _in_script(str(err)):
        return FailureKind.OUTAGE
    return FailureKind.ERROR


def _in_script(message: str) -> bool:
    """Redis 6.2 wraps the reply of a command refused inside a Lua script: "Error running
    script (call to f_...): @user_script:4: @user_script: 4: -READONLY You can't write..."."""
    return "user_script" in message and any(f"-{code}" in message for code in _REDIS_OUTAGE_REPLIES)


def is_outage(err: BaseException) -> bool:
    return classify(err) is FailureKind.OUTAGE


def is_conflict(err: BaseException) -> bool:
    return classify(err) is FailureKind.CONFLICT
