"""Unit of work: one local transaction holding a state change and the outbox rows describing it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from contracts import Envelope, validate_payload
from contracts.ids import canonical_uuid
from service_runtime import tracing
from service_runtime.metrics import OUTBOX_WRITTEN

_INSERT_OUTBOX = """
INSERT INTO outbox (event_id, aggregate_type, aggregate_id, event_type, event_version,
                    payload, correlation_id, causation_id, traceparent)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)
"""


class UnitOfWork:
    """A transaction-bound connection plus `emit`, which writes a validated outbox row.

    Events emitted while handling an incoming event inherit its correlation id and
    name it as their cause, so a whole saga can be traced from one id. With tracing on, each
    row also stores the W3C traceparent of the current span (service_runtime/tracing.py).
    """

    def __init__(self, conn: psycopg.Connection, cause: Envelope | None = None) -> None:
        self.conn = conn
        self.cause = cause
        self.emitted: list[str] = []

    def execute(self, query: Any, params: Any = None) -> psycopg.Cursor:
        return self.conn.execute(query, params)

    def emit(
        self,
        event_type: str,
        *,
        aggregate_type: str,
        aggregate_id: str,
        payload: dict[str, Any],
        correlation_id: str | None = None,
        version: int = 1,
    ) -> str:
        validate_payload(event_type, version, payload)
        if correlation_id is None:
            # A saga's events share one id: the cause's, or the order id that starts it.
            correlation_id = self.cause.correlation_id if self.cause else _uuid_or_new(aggregate_id)
        event_id = str(uuid.uuid4())
        self.conn.execute(
            _INSERT_OUTBOX,
            (
                event_id,
                aggregate_type,
                aggregate_id,
                event_type,
                version,
                Jsonb(payload),
                correlation_id,
                self.cause.event_id if self.cause else None,
                tracing.current_traceparent(),  # None (and no cost) when tracing is off
            ),
        )
        self.emitted.append(event_type)
        return event_id


@contextmanager
def unit_of_work(
    pool: ConnectionPool, cause: Envelope | None = None, *, service: str | None = None
) -> Iterator[UnitOfWork]:
    """Commit on normal exit, roll back (state and outbox rows together) on any exception.

    With `service` given, the committed events are counted in the outbox metric.
    """
    with pool.connection() as conn:
        with conn.transaction():
            uow = UnitOfWork(conn, cause)
            yield uow
        if service:
            count_emitted(service, uow.emitted)


def count_emitted(service: str, event_types: list[str]) -> None:
    """Call after the commit: only committed events count."""
    for event_type in event_types:
        OUTBOX_WRITTEN.labels(service, event_type).inc()


def _uuid_or_new(value: str) -> str:
    try:
        return canonical_uuid(value)
    except ValueError:
        return str(uuid.uuid4())
