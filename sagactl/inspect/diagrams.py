"""Mermaid sequence diagrams of the saga: as designed (the reaction tables in code) and as one
order actually went (`saga trace ORDER --mermaid`). Shared by the CLI and the web console.

Participants are the services; one arrow per event and reacting group. Compensations (events
that undo an earlier step) are drawn dashed and marked.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from contracts import EVENT_SCHEMAS, PRODUCER_OF_EVENT
from sagactl.inspect.common import duration
from service_runtime.config import SERVICES

# The cancellation and the events that undo an earlier step of the saga (DESIGN.md §3): release,
# refund. Drawn dashed, apart from the saga going forward.
COMPENSATIONS = frozenset({"OrderCancelled", "StockReleased", "PaymentRefunded"})


def reaction_table() -> dict[str, frozenset[str]]:
    """service -> the event types its reactions.HANDLERS reacts to."""
    return {
        service: frozenset(importlib.import_module(f"{service}_service.reactions").HANDLERS)
        for service in SERVICES
    }


def _header(title: str) -> list[str]:
    return [
        "---",
        f"title: {_text(title)}",
        "---",
        "sequenceDiagram",
        *(f"    participant {service}" for service in SERVICES),
    ]


def _text(value: str) -> str:
    """Message text Mermaid reads literally: no statement separators or entity escapes."""
    return value.replace(";", ",").replace("#", "no. ").replace("\n", " ")


def _arrow(event_type: str, *, failed: bool = False) -> str:
    if failed:
        return "-x"
    return "-->>" if event_type in COMPENSATIONS else "->>"


def _label(event_type: str, version: int | None = None, extra: str | None = None) -> str:
    text = event_type if version is None else f"{event_type} v{version}"
    if event_type in COMPENSATIONS:
        text += " (compensation)"
    if extra:
        text += f" {extra}"
    return _text(text)


def designed_saga(
    handlers: Mapping[str, Iterable[str]] | None = None,
    producers: Mapping[str, str] = PRODUCER_OF_EVENT,
) -> str:
    """Every event type and version to every service whose reaction table handles it,
    forward steps first, then the compensations (all paths of the saga, DESIGN.md §3)."""
    table = {s: frozenset(h) for s, h in (handlers or reaction_table()).items()}
    events = sorted(EVENT_SCHEMAS, key=lambda tv: _design_rank(tv[0], producers))
    lines = _header("Order saga, as designed (reactions.HANDLERS + PRODUCER_OF_EVENT)")
    lines.append("    autonumber")
    in_compensation = False
    for event_type, version in events:
        producer = producers[event_type]
        reacting = [s for s in SERVICES if event_type in table.get(s, ())]
        if event_type in COMPENSATIONS and not in_compensation:
            lines.append("    rect rgba(255, 200, 200, 0.3)")
            lines.append(f"    Note over {SERVICES[0]},{SERVICES[-1]}: compensations")
            in_compensation = True
        if not reacting:
            lines.append(
                f"    Note over {producer}: {_label(event_type, version, '(no reaction)')}"
            )
        for service in reacting:
            lines.append(
                f"    {producer}{_arrow(event_type)}{service}: {_label(event_type, version)}"
            )
    if in_compensation:
        lines.append("    end")
    return "\n".join(lines) + "\n"


_SAGA_ORDER = (
    "OrderPlaced",
    "StockReserved",
    "StockReservationFailed",
    "PaymentCaptured",
    "PaymentDeclined",
    "OrderConfirmed",
    "OrderRejected",
    "OrderCancelled",
)


def _design_rank(event_type: str, producers: Mapping[str, str]) -> tuple[int, int, str]:
    """Forward steps in saga order (events unknown to that order after them, by producer),
    compensations last."""
    known = _SAGA_ORDER.index(event_type) if event_type in _SAGA_ORDER else len(_SAGA_ORDER)
    return (
        event_type in COMPENSATIONS,
        known,
        f"{SERVICES.index(producers[event_type])}{event_type}",
    )


# Shading of a compensation block: a light red that keeps dark text readable
COMPENSATION_FILL = "rgba(254, 226, 226, 0.6)"
_UNSAFE = re.compile(r"[;#<>{}\n\r]")  # statement separators, entities, markup


def _plain(value: Any) -> str:
    """A label Mermaid reads as plain text (no statement break, entity or tag)."""
    return _UNSAFE.sub(" ", str(value)).strip()


def _hop_ms(event: Mapping[str, Any], delivery: Mapping[str, Any]) -> float | None:
    publish, processed = event.get("commit_to_publish_ms"), delivery.get("publish_to_processed_ms")
    if publish is None or processed is None:
        return None
    return publish + processed


def _delivery_arrow(event: Mapping[str, Any], delivery: Mapping[str, Any]) -> str:
    """One arrow: solid for the saga going forward, dashed for a compensation, a cross for an
    event the group gave up on (or has not processed yet)."""
    compensation = event["event_type"] in COMPENSATIONS
    status = delivery["status"]
    label = _plain(event["event_type"])
    if status == "processed":
        hop = duration(_hop_ms(event, delivery))
        arrow = "-->>" if compensation else "->>"
        label += f" ({hop})" if hop else ""
    elif status == "dead_lettered":
        arrow = "--x" if compensation else "-x"
        label += " DEAD-LETTERED"
    elif status == "failing":
        arrow = "--x" if compensation else "-x"
        label += f" failing (attempt {delivery.get('failed_attempts')})"
    else:  # pending, not_published
        arrow = "--)" if compensation else "-)"
        label += " (not processed yet)" if status == "pending" else " (not published yet)"
    return f"    {_plain(event['producer'])} {arrow} {_plain(delivery['group'])}: {label}"


def order_sequence_diagram(trace: Mapping[str, Any]) -> str:
    """One order's saga as it went (the report of `sagactl.inspect.trace.trace_order`), for
    `saga trace --mermaid` and the console: an arrow per event and reacting group with its hop
    latency (commit -> processed); compensations dashed in a shaded block; an event a group
    gave up on ends in a cross; one nobody reacts to is a note over its producer."""
    lines = ["sequenceDiagram"]
    lines += [f"    participant {service}" for service in SERVICES]
    in_compensation = False
    for event in trace.get("events", []):
        compensation = event["event_type"] in COMPENSATIONS
        if compensation != in_compensation:
            lines.append(f"    rect {COMPENSATION_FILL}" if compensation else "    end")
            in_compensation = compensation
        reacting = [d for d in event.get("deliveries", []) if d["status"] != "not_handled"]
        if not reacting:
            note = f"{_plain(event['event_type'])} (no service reacts)"
            if not event.get("published_at"):
                note = f"{_plain(event['event_type'])} (not published yet)"
            lines.append(f"    Note over {_plain(event['producer'])}: {note}")
        lines += [_delivery_arrow(event, delivery) for delivery in reacting]
    if in_compensation:
        lines.append("    end")
    if len(lines) == 1 + len(SERVICES):
        lines.append(f"    Note over {SERVICES[0]},{SERVICES[-1]}: no events in any outbox")
    return "\n".join(lines) + "\n"
