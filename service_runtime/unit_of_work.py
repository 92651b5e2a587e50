"""Unit of work: one local transaction holding a state change and the outbox rows describing it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from contracts import Envelope, validate_payload
from contracts.ids import canonical_uuid
from service_runtime import locks, tracing
from service_runtime.metrics import OUTBOX_WRITTEN

_OUTBOX_COLUMNS = (
    "event_id, aggregate_type, aggregate_id, event_type, event_version, payload, correlation_id, "
    "causation_id, traceparent"
)
# Named parameters `ob_*`, so that a service's own statement can carry the row in a WITH clause
# (`OutboxRow`: one round trip for a state change and its event); typed, since in a SELECT list
# PostgreSQL would take an untyped parameter for text.
_OUTBOX_VALUES = (
    "%(ob_event_id)s::uuid, %(ob_aggregate_type)s::text, %(ob_aggregate_id)s::text, "
    "%(ob_event_type)s::text, %(ob_event_version)s::integer, %(ob_payload)s::jsonb, "
    "%(ob_correlation_id)s::uuid, %(ob_causation_id)s::uuid, %(ob_traceparent)s::text"
)


@dataclass(frozen=True)
class OutboxRow:
    """A validated outbox row not written yet: `UnitOfWork.outbox_row` makes it, a storage
    statement writes it with `insert_sql()` and `params`, and `UnitOfWork.written` counts it
    once that statement has run."""

    event_id: str
    event_type: str
    params: dict[str, Any]

    @staticmethod
    def insert_sql(source: str | None = None) -> str:
        """The INSERT, for a WITH clause; with `source` (a CTE's name), one row per row of it:
        the event is written only when that CTE returned a row."""
        if source is None:
            return f"INSERT INTO outbox ({_OUTBOX_COLUMNS}) VALUES ({_OUTBOX_VALUES})"
        return f"INSERT INTO outbox ({_OUTBOX_COLUMNS}) SELECT {_OUTBOX_VALUES} FROM {source}"


class UnitOfWork:
    """A transaction-bound connection plus `emit`, which writes a validated outbox row.

    Events emitted while handling an incoming event inherit its correlation id and
    name it as their cause, so a whole saga can be traced from one id. With tracing on, each
    row also stores the W3C traceparent of the current span (service_runtime/tracing.py).
    """

    def __init__(
        self,
        conn: psycopg.Connection,
        cause: Envelope | None = None,
        orders_locked: frozenset[str] = frozenset(),
    ) -> None:
        self.conn = conn
        self.cause = cause
        self.emitted: list[str] = []
        # orders whose lock this transaction holds already (the consumer's first statement
        # takes them for a service that asks: LOCK_ORDERS in its reactions)
        self._orders_locked = set(orders_locked)

    def lock_order(self, order_id: str) -> None:
        """Serialise this transaction with the service's others for one order
        (locks.lock_order); no statement when the transaction holds that lock already."""
        if order_id not in self._orders_locked:
            locks.lock_order(self.conn, order_id)
            self._orders_locked.add(order_id)

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
        row = self.outbox_row(
            event_type,
            aggregate_type=aggregate_type,
            aggregate_id=aggregate_id,
            payload=payload,
            correlation_id=correlation_id,
            version=version,
        )
        self.conn.execute(row.insert_sql(), row.params)
        self.written(row)
        return row.event_id

    def outbox_row(
        self,
        event_type: str,
        *,
        aggregate_type: str,
        aggregate_id: str,
        payload: dict[str, Any],
        correlation_id: str | None = None,
        version: int = 1,
    ) -> OutboxRow:
        """What `emit` writes, validated, for a storage statement to write along with the state
        change it describes (`OutboxRow.insert_sql`); call `written` after that statement."""
        validate_payload(event_type, version, payload)
        if correlation_id is None:
            # A saga's events share one id: the cause's, or the order id that starts it.
            correlation_id = self.cause.correlation_id if self.cause else _uuid_or_new(aggregate_id)
        event_id = str(uuid.uuid4())
        params = {
            "ob_event_id": event_id,
            "ob_aggregate_type": aggregate_type,
            "ob_aggregate_id": aggregate_id,
            "ob_event_type": event_type,
            "ob_event_version": version,
            "ob_payload": Jsonb(payload),
            "ob_correlation_id": correlation_id,
            "ob_causation_id": self.cause.event_id if self.cause else None,
            # None (and no cost) when tracing is off
            "ob_traceparent": tracing.current_traceparent(),
        }
        return OutboxRow(event_id, event_type, params)

    def written(self, row: OutboxRow) -> None:
        """The statement carrying `row` wrote it (counted in the metric after the commit)."""
        self.emitted.append(row.event_type)


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
