"""The unit of work: a state change and its outbox rows commit together or not at all."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from contracts import ContractError, Envelope
from service_runtime.db import connect
from service_runtime.unit_of_work import unit_of_work
from tests.helpers import order_placed_payload


class Boom(Exception):
    pass


def add_product(uow, sku: str = "SKU-1") -> None:
    uow.execute(
        "INSERT INTO products (sku, name, price_cents, available) VALUES (%s, %s, %s, %s)",
        (sku, "Widget", 250, 10),
    )


def counts(db) -> tuple[int, int]:
    products = db.execute("SELECT count(*) FROM products").fetchone()[0]
    outbox = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
    return products, outbox


def test_a_failing_body_leaves_neither_state_nor_outbox_row(pool, db):
    payload = order_placed_payload()
    with pytest.raises(Boom), unit_of_work(pool) as uow:
        add_product(uow)
        uow.emit(
            "OrderPlaced", aggregate_type="order", aggregate_id=payload["order_id"], payload=payload
        )
        raise Boom("after the writes, before the commit")

    assert counts(db) == (0, 0)


def test_a_committed_unit_leaves_both(pool, db):
    payload = order_placed_payload()
    order_id = payload["order_id"]
    with unit_of_work(pool) as uow:
        add_product(uow)
        event_id = uow.emit(
            "OrderPlaced", aggregate_type="order", aggregate_id=order_id, payload=payload
        )

    assert counts(db) == (1, 1)
    row = db.execute(
        "SELECT event_id::text, aggregate_type, aggregate_id, event_type, event_version, payload,"
        " correlation_id::text, causation_id, created_at, published_at FROM outbox"
    ).fetchone()
    assert row[:5] == (event_id, "order", order_id, "OrderPlaced", 1)
    assert row[5] == payload
    assert row[6] == order_id  # a saga's first event correlates by its own aggregate
    assert row[7] is None
    assert row[8] is not None
    assert row[9] is None  # for the relay to publish


def test_several_rows_in_one_unit_commit_in_order(pool, db):
    ids = []
    with unit_of_work(pool) as uow:
        for _ in range(3):
            payload = order_placed_payload()
            ids.append(
                uow.emit(
                    "OrderPlaced",
                    aggregate_type="order",
                    aggregate_id=payload["order_id"],
                    payload=payload,
                )
            )
    assert [r[0] for r in db.execute("SELECT event_id::text FROM outbox ORDER BY id")] == ids


def test_events_emitted_in_reaction_inherit_correlation_and_name_their_cause(pool, db):
    cause = Envelope(
        event_id=str(uuid.uuid4()),
        event_type="OrderPlaced",
        event_version=1,
        aggregate_type="order",
        aggregate_id=str(uuid.uuid4()),
        correlation_id=str(uuid.uuid4()),
        causation_id=None,
        occurred_at=datetime.now(UTC).isoformat(),
        producer="orders",
        payload={},
    )
    with unit_of_work(pool, cause=cause) as uow:
        uow.emit(
            "StockReservationFailed",
            aggregate_type="order",
            aggregate_id=cause.aggregate_id,
            payload={"order_id": cause.aggregate_id, "reason": "unknown_sku", "shortages": []},
        )
    correlation, causation = db.execute(
        "SELECT correlation_id::text, causation_id::text FROM outbox"
    ).fetchone()
    assert (correlation, causation) == (cause.correlation_id, cause.event_id)


def test_an_invalid_payload_is_refused_before_anything_is_written(pool, db):
    with pytest.raises(ContractError), unit_of_work(pool) as uow:
        add_product(uow)
        uow.emit(
            "OrderPlaced",
            aggregate_type="order",
            aggregate_id=str(uuid.uuid4()),
            payload={"order_id": "not-a-uuid", "customer_id": "alice", "items": []},
        )
    assert counts(db) == (0, 0)


def test_a_refused_emit_issues_no_statement(pool, db):
    """Catching the refusal and committing anyway works: no INSERT was attempted (a failed
    statement would have aborted the transaction and the commit would fail)."""
    with unit_of_work(pool) as uow:
        add_product(uow)
        with pytest.raises(ContractError, match="unknown event"):
            uow.emit(
                "OrderShipped", aggregate_type="order", aggregate_id=str(uuid.uuid4()), payload={}
            )
        with pytest.raises(ContractError, match="invalid OrderPlaced"):
            uow.emit(
                "OrderPlaced",
                aggregate_type="order",
                aggregate_id=str(uuid.uuid4()),
                payload={"order_id": str(uuid.uuid4())},
            )
        assert uow.emitted == []
    assert counts(db) == (1, 0)


def test_the_relay_is_notified_on_commit_only(pool, db_url, emit):
    with connect(db_url) as listener:
        listener.execute("LISTEN outbox")
        payload = order_placed_payload()
        with pytest.raises(Boom), unit_of_work(pool) as uow:
            uow.emit(
                "OrderPlaced",
                aggregate_type="order",
                aggregate_id=payload["order_id"],
                payload=payload,
            )
            raise Boom()
        assert list(listener.notifies(timeout=0)) == []

        emit()
        [note] = list(listener.notifies(timeout=5, stop_after=1))
        assert note.channel == "outbox"
