"""`saga trace ORDER_ID`: one order's saga as a timeline across the three services.

Every event of an order's saga carries the order id as its correlation id, so each service's
outbox gives the events it produced (committed_at, published_at) and each subscribing
group's inbox tells when that group processed them. The events are found in the order's
partition streams (`orders.events.{pN}`, N = partition_of(order id)) with their entry ids; an
event a group gave up on is found in that group's dead letters (its own database) and shown
as dead-lettered, with the dead letter's number. Outbox and inbox rows are pruned after
their retention window: an old order shows its current state but a shorter timeline.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from contracts import (
    STREAM_OF_PRODUCER,
    SUBSCRIPTIONS,
    partition_of,
    partition_stream,
)
from contracts.ids import canonical_uuid
from sagactl.inspect.common import (
    duration,
    friendly_errors,
    iso,
    json_option,
    millis_between,
    open_db,
    open_redis,
    print_json,
    short_time,
    table,
)
from sagactl.inspect.diagrams import order_sequence_diagram
from sagactl.inspect.partitions import deployment_partitions, scan_for_events
from service_runtime.config import SERVICES
from service_runtime.redis_client import RedisClient

_EVENTS = """
SELECT event_id::text, event_type, aggregate_id, causation_id::text, created_at, published_at
FROM outbox WHERE correlation_id = %s ORDER BY id
"""
_PROCESSED = """
SELECT event_id::text, processed_at, stream, entry_id
FROM inbox WHERE consumer_group = %s AND event_id = ANY(%s::uuid[])
"""
_FAILURES = """
SELECT event_id, max(attempts), (array_agg(last_error ORDER BY updated_at DESC))[1]
FROM delivery_failures WHERE consumer_group = %s AND event_id = ANY(%s) GROUP BY event_id
"""
# Stream entry ids are times: start looking this long before the first commit (clock skew
# between PostgreSQL and Redis, which stamps the ids).
_SCAN_MARGIN_MS = 60_000
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


def trace_order(
    order_id: str, client: RedisClient | None = None, partitions: int | None = None
) -> dict[str, Any]:
    """One order's saga (what `saga trace` prints and the console draws): its events from the
    outboxes, each with its partition stream entry and, per subscribing group, whether and when
    it was processed (or dead-lettered, or failing); and the order's state in each service."""
    partitions = deployment_partitions() if partitions is None else partitions
    partition = partition_of(order_id, partitions)
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
                        "stream": partition_stream(
                            STREAM_OF_PRODUCER[producer], partition_of(aggregate_id, partitions)
                        ),
                        "entry_id": None,
                        "aggregate_id": aggregate_id,
                        "causation_id": causation,
                        "committed_at": created,
                        "published_at": published,
                    }
                )
            row = conn.execute(_STATE[producer], (order_id,)).fetchone()
            state[producer] = _state(producer, row)
    processed: dict[tuple[str, str], Any] = {}
    failures: dict[tuple[str, str], tuple[int, str]] = {}
    ids = [e["event_id"] for e in events]
    for group in SUBSCRIPTIONS:
        with open_db(group) as conn:
            for event_id, at, _stream, _entry in conn.execute(_PROCESSED, (group, ids)):
                processed[(group, event_id)] = at
            for event_id, attempts, error in conn.execute(_FAILURES, (group, ids)):
                failures[(group, event_id)] = (attempts, error)
    client = open_redis() if client is None else client
    _find_entries(client, events)
    dead = _find_dead_letters(events, processed)
    events.sort(key=lambda e: e["committed_at"])
    for event in events:
        event["commit_to_publish_ms"] = _hop_ms(event["committed_at"], event["published_at"])
        event["deliveries"] = []
        for group in subscribers(event["producer"]):
            key = (group, event["event_id"])
            at = processed.get(key)
            handles = event["event_type"] in handled_types(group)
            attempts, error = failures.get(key, (None, None))
            event["deliveries"].append(
                {
                    "group": group,
                    "handles": handles,
                    "status": _status(handles, event, at, dead.get(key), attempts),
                    "processed_at": iso(at),
                    "publish_to_processed_ms": _hop_ms(event["published_at"], at),
                    "dead_letter": dead.get(key),
                    "failed_attempts": attempts,
                    "last_error": error if at is None else None,
                }
            )
        event["committed_at"] = iso(event["committed_at"])
        event["published_at"] = iso(event["published_at"])
    return {"order_id": order_id, "partition": partition, "events": events, "state": state}


def _status(
    handles: bool, event: dict[str, Any], at: Any, dead: dict[str, str] | None, attempts: Any
) -> str:
    """processed, dead_lettered, failing (retried), not_handled, pending, not_published."""
    if at is not None:
        return "processed"
    if dead is not None:
        return "dead_lettered"
    if not handles:
        return "not_handled"
    if attempts:
        return "failing"
    return "pending" if event["published_at"] else "not_published"


def _find_entries(client: Any, events: list[dict[str, Any]]) -> None:
    """Each published event's entry id in its partition stream."""
    by_stream: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        if event["published_at"]:
            by_stream.setdefault(event["stream"], []).append(event)
    for stream, found_in in by_stream.items():
        first = min(e["committed_at"] for e in found_in)
        start = f"{max(int(first.timestamp() * 1000) - _SCAN_MARGIN_MS, 0)}-0"
        entries = scan_for_events(client, stream, {e["event_id"] for e in found_in}, start)
        for event in found_in:
            event["entry_id"] = entries.get(event["event_id"])


def _find_dead_letters(
    events: list[dict[str, Any]], processed: dict[tuple[str, str], Any]
) -> dict[tuple[str, str], dict[str, Any]]:
    """(group, event_id) -> {id, stream, entry_id} of its dead letter (in the group's own
    database), for events not processed."""
    wanted: dict[str, list[str]] = {}
    for event in events:
        for group in subscribers(event["producer"]):
            if (group, event["event_id"]) not in processed:
                wanted.setdefault(group, []).append(event["event_id"])
    dead: dict[tuple[str, str], dict[str, Any]] = {}
    for group, event_ids in wanted.items():
        with open_db(group) as conn:
            for letter_id, event_id, stream, entry_id in conn.execute(
                "SELECT id, event_id, stream, entry_id FROM dead_letters"
                " WHERE consumer_group = %s AND event_id = ANY(%s) AND redriven_at IS NULL"
                " ORDER BY id",
                (group, event_ids),
            ):
                dead[(group, event_id)] = {"id": letter_id, "stream": stream, "entry_id": entry_id}
    return dead


def _state(service: str, row: tuple | None) -> dict[str, Any] | None:
    if row is None:
        return None
    status, reason, cents, extra = row
    if service == "billing":
        return {"status": status, "reason": reason, "amount_cents": cents, "payment_id": extra}
    return {"status": status, "reason": reason, "total_cents": cents, "customer_id": extra}


def _delivery_text(delivery: dict[str, Any]) -> tuple[str, str | None]:
    status = delivery["status"]
    if status == "processed":
        return short_time(delivery["processed_at"]) or "", duration(
            delivery["publish_to_processed_ms"]
        )
    if status == "dead_lettered":
        return f"dead-lettered {delivery['dead_letter']['id']}", None
    if status == "failing":
        return f"failing, retried (attempt {delivery['failed_attempts']})", None
    return {
        "not_handled": "(not handled)",
        "pending": "not yet",
        "not_published": "not published yet",
    }[status], None


@click.command()
@click.argument("order_id")
@json_option
@click.option(
    "--mermaid",
    "as_mermaid",
    is_flag=True,
    help="Print the saga as a Mermaid sequenceDiagram (one arrow per event, hop latencies).",
)
@friendly_errors
def trace(order_id: str, as_json: bool, as_mermaid: bool) -> None:
    """One order's saga as a timeline, and its state now.

    Every event of ORDER_ID's saga: when committed, published, and processed by each
    subscribing group; then the order's state in each service's database.
    """
    try:
        order_id = canonical_uuid(order_id)
    except ValueError as err:
        raise click.ClickException(f"{order_id!r} is not an order id (a UUID)") from err
    report = trace_order(order_id)
    if not report["events"] and not any(report["state"].values()):
        raise click.ClickException(f"no order {order_id} and no event of its saga")
    if as_json:
        print_json(report)
        return
    if as_mermaid:
        click.echo(order_sequence_diagram(report), nl=False)
        return
    rows = []
    for n, event in enumerate(report["events"], 1):
        for i, delivery in enumerate(event["deliveries"] or [{}]):
            first = i == 0
            when, hop = _delivery_text(delivery) if delivery else ("", None)
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
    click.echo(f"order {order_id} (partition {report['partition']})")
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
    dead = [
        f"{d['group']}: {event['event_type']} dead-lettered as {d['dead_letter']['id']} in "
        f"{d['dead_letter']['stream']} ({d['last_error'] or 'see saga dead-letters show'})"
        for event in report["events"]
        for d in event["deliveries"]
        if d["status"] == "dead_lettered"
    ]
    for line in dead:
        click.echo(line)
    if dead:
        click.echo()
    for service, s in report["state"].items():
        if s is None:
            state_rows.append([service, "(none)", None, None])
        else:
            cents = s.get("total_cents", s.get("amount_cents"))
            state_rows.append([service, s["status"], s["reason"], cents])
    click.echo(table(["SERVICE", "STATUS", "REASON", "CENTS"], state_rows))


COMMANDS: list[click.Command] = [trace]
