"""One classification of failures for consumers, relays and the web tier."""

from __future__ import annotations

import psycopg
import pytest
import redis
from psycopg import errors as pg_errors
from psycopg_pool import PoolTimeout

from service_runtime.failures import FailureKind, classify


@pytest.mark.parametrize(
    "error",
    [
        psycopg.OperationalError("connection refused"),  # no SQLSTATE: the server is gone
        pg_errors.AdminShutdown(),
        pg_errors.CannotConnectNow(),
        pg_errors.TooManyConnections(),
        PoolTimeout("no connection within 5 s"),
        redis.ConnectionError("refused"),
        redis.TimeoutError("timed out"),
        redis.exceptions.BusyLoadingError("loading"),
        redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'"),
        redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
        redis.ResponseError("MISCONF Redis is configured to save RDB snapshots, but ..."),
        redis.exceptions.ClusterDownError("CLUSTERDOWN The cluster is down"),
        # Redis 6.2 wraps the reply of a redis.call that failed inside a script:
        redis.ResponseError(
            "Error running script (call to f_8a3c): @user_script:4: @user_script: 4: "
            "-OOM command not allowed when used memory > 'maxmemory'. "
        ),
    ],
)
def test_outages(error):
    assert classify(error) is FailureKind.OUTAGE


@pytest.mark.parametrize("error", [pg_errors.DeadlockDetected(), pg_errors.SerializationFailure()])
def test_deadlocks_and_serialization_failures_are_conflicts_not_outages(error):
    assert isinstance(error, psycopg.OperationalError)  # why "OperationalError = outage" was wrong
    assert classify(error) is FailureKind.CONFLICT


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("handler bug"),
        pg_errors.UniqueViolation(),
        pg_errors.NumericValueOutOfRange(),
        redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        redis.ResponseError("Error running script (call to f_8a3c): @user_script:4: WRONGTYPE x"),
        redis.ResponseError("ERR unknown command 'OOMPH'"),
    ],
)
def test_everything_else_is_the_works_own_error(error):
    assert classify(error) is FailureKind.ERROR
