"""`saga trace ORDER_ID`: one order's saga as a timeline across the three services.

Every event of an order's saga carries the order id as its correlation id, so each service's
outbox gives the events it produced (committed_at, published_at) and each subscribing
group's inbox tells when that group processed them. Outbox and inbox rows are pruned after
their retention window: an old order shows its current state but a shorter timeline.
"""

from __future__ import annotations

import importlib
import uuid
from typing import Any

import click

from contracts import STREAM_OF_PRODUCER, SUBSCRIPTIONS
from sagactl.inspect.common import (
    duration,
    friendly_errors,
    iso,
    json_option,
    millis_between,
    open_db,
    print_json,
    short_time,
    table,
)
from service_runtime.config import SERVICES

_EVENTS = """
SELECT event_id::text, event_type, aggregate_id, causation_id::text, created_at, published_at
FROM outbox WHERE correlation_id = %s ORDER BY id
"""
_PROCESSED = """
SELECT event_id::text, processed_at, stream, entry_id
FROM inbox WHERE consumer_group = %s AND event_id = ANY(%s::uuid[])
"""
_STATE = {
    "orders": "SELECT status, reason, total_cents, customer_id FROM orders WHERE order_id = %s",
    "inventory": "SELECT status, reason, total_cents, customer_id FROM reservations"
    " WHERE order_id = %s",
    "billing": "SELECT status, reason, amount_cents, payment_id::text FROM payments"
    " WHERE order_id = %s",
}


def handled_types(group: str) -> frozenset[str]:
    """Event types the group reacts to; the others are acknowledged without an inbox row."""
    return frozenset(importlib.import_module(f"{group}_service.reactions").HANDLERS)


def subscribers(producer: str) -> list[str]:
    return [g for g in SUBSCRIPTIONS if STREAM_OF_PRODUCER[producer] in SUBSCRIPTIONS[g]]


def _hop_ms(start: Any, end: Any) -> float | None:
    # published_at is stamped just after the XADD, so a fast consumer can commit a fraction
    # of a millisecond "before" it: that reads as no wait at all, not as time travel.
    ms = millis_between(start, end)
    return None if ms is None else max(ms, 0.0)


def trace_order(order_id: str) -> dict[str, Any]:
    events: list[dict[str, Any]] = []
    state: dict[str, Any] = {}
    for producer in SERVICES:
        with open_db(producer) as conn:
            for event_id, event_type, aggregate_id, causation, created, published in conn.execute(
                _EVENTS, (order_id,)
            ):
                events.append(
                    {
                        "event_id": event_id,
                        "event_type": event_type,
                        "producer": producer,
                        "stream": STREAM_OF_PRODUCER[producer],
                        "aggregate_id": aggregate_id,
                        "causation_id": causation,
                        "committed_at": created,
                        "published_at": published,
                    }
                )
            row = conn.execute(_STATE[producer], (order_id,)).fetchone()
            state[producer] = _state(producer, row)
    processed: dict[tuple[str, str], Any] = {}
    ids = [e["event_id"] for e in events]
    for group in SUBSCRIPTIONS:
        with open_db(group) as conn:
            for event_id, at, _stream, _entry in conn.execute(_PROCESSED, (group, ids)):
                processed[(group, event_id)] = at
    events.sort(key=lambda e: e["committed_at"])
    for event in events:
        event["commit_to_publish_ms"] = _hop_ms(event["committed_at"], event["published_at"])
        event["deliveries"] = []
        for group in subscribers(event["producer"]):
            at = processed.get((group, event["event_id"]))
            event["deliveries"].append(
                {
                    "group": group,
                    "handles": event["event_type"] in handled_types(group),
                    "processed_at": iso(at),
                    "publish_to_processed_ms": _hop_ms(event["published_at"], at),
                }
            )
        event["committed_at"] = iso(event["committed_at"])
        event["published_at"] = iso(event["published_at"])
    return {"order_id": order_id, "events": events, "state": state}


def _state(service: str, row: tuple | None) -> dict[str, Any] | None:
    if row is None:
        return None
    status, reason, cents, extra = row
    if service == "billing":
        return {"status": status, "reason": reason, "amount_cents": cents, "payment_id": extra}
    return {"status": status, "reason": reason, "total_cents": cents, "customer_id": extra}


def _delivery_text(event: dict[str, Any], delivery: dict[str, Any]) -> tuple[str, str | None]:
    if delivery["processed_at"]:
        return short_time(delivery["processed_at"]) or "", duration(
            delivery["publish_to_processed_ms"]
        )
    if not delivery["handles"]:
        return "(not handled)", None
    return ("not yet" if event["published_at"] else "not published yet"), None


@click.command()
@click.argument("order_id")
@json_option
@friendly_errors
def trace(order_id: str, as_json: bool) -> None:
    """One order's saga as a timeline, and its state now.

    Every event of ORDER_ID's saga: when committed, published, and processed by each
    subscribing group; then the order's state in each service's database.
    """
    try:
        order_id = str(uuid.UUID(order_id))
    except ValueError as err:
        raise click.ClickException(f"{order_id!r} is not an order id (a UUID)") from err
    report = trace_order(order_id)
    if not report["events"] and not any(report["state"].values()):
        raise click.ClickException(f"no order {order_id} and no event of its saga")
    if as_json:
        print_json(report)
        return
    rows = []
    for n, event in enumerate(report["events"], 1):
        for i, delivery in enumerate(event["deliveries"] or [{}]):
            first = i == 0
            when, hop = _delivery_text(event, delivery) if delivery else ("", None)
            rows.append(
                [
                    n if first else "",
                    short_time(event["committed_at"]) if first else "",
                    event["producer"] if first else "",
                    event["event_type"] if first else "",
                    (duration(event["commit_to_publish_ms"]) or "not yet") if first else "",
                    delivery.get("group"),
                    when,
                    hop,
                ]
            )
    click.echo(f"order {order_id}")
    headers = [
        "#",
        "COMMITTED AT",
        "PRODUCER",
        "EVENT",
        "COMMIT->PUBLISH",
        "GROUP",
        "PROCESSED AT",
        "PUBLISH->PROCESSED",
    ]
    click.echo(table(headers, rows) if rows else "no events in any outbox (pruned?)")
    click.echo()
    state_rows = []
    for service, s in report["state"].items():
        if s is None:
            state_rows.append([service, "(none)", None, None])
        else:
            cents = s.get("total_cents", s.get("amount_cents"))
            state_rows.append([service, s["status"], s["reason"], cents])
    click.echo(table(["SERVICE", "STATUS", "REASON", "CENTS"], state_rows))


COMMANDS: list[click.Command] = [trace]
