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
import re

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
# replica after a failover, LOADING from a restart, MISCONF from a failing disk; UNBLOCKED
# ends a blocked read when a failover demotes the server (Redis 7) or CLIENT UNBLOCK ... ERROR.
_REDIS_OUTAGE_REPLIES = (
    "OOM",
    "MISCONF",
    "READONLY",
    "LOADING",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "MASTERDOWN",
    "NOREPLICAS",
    "UNBLOCKED",
)


# The reply code at the start of the message, after redis-py's "Command # N (...) of pipeline
# caused error: " for a command of a pipeline, or (Redis < 7) inside the "Error running
# script" wrapper of a failed redis.call, as "-OOM ..." after the script's line number.
_OUTAGE_REPLY = re.compile(
    r"(?:^|: -|of pipeline caused error: )(?:" + "|".join(_REDIS_OUTAGE_REPLIES) + r")\b"
)

# The replies redis-py maps to their own classes (stripping the code from the message).
_REDIS_OUTAGE_REPLY_TYPES: tuple[type[BaseException], ...] = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.BusyLoadingError,
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
    if isinstance(err, (*REDIS_OUTAGE_ERRORS, *_REDIS_OUTAGE_REPLY_TYPES)):
        return FailureKind.OUTAGE
    if isinstance(err, redis.ResponseError) and _OUTAGE_REPLY.search(str(err)):
        return FailureKind.OUTAGE
    return FailureKind.ERROR


def is_outage(err: BaseException) -> bool:
    return classify(err) is FailureKind.OUTAGE


def is_conflict(err: BaseException) -> bool:
    return classify(err) is FailureKind.CONFLICT
