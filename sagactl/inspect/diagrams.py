"""Mermaid sequence diagrams of the saga: as designed (the reaction tables in code) and as one
order actually went (`saga trace ORDER --mermaid`). Shared by the CLI and the web console.

Participants are the services; one arrow per event and reacting group. Compensations (events
that undo an earlier step) are drawn dashed and marked.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import Any

from contracts import EVENT_SCHEMAS, PRODUCER_OF_EVENT
from service_runtime.config import SERVICES

# Events that undo an earlier step of the saga (DESIGN.md §3): release, refund.
COMPENSATIONS = frozenset({"StockReleased", "PaymentRefunded"})


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


def _ms(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def order_saga(report: Mapping[str, Any]) -> str:
    """One order's saga (the report of `sagactl.inspect.trace.trace_order`): an arrow per
    event and reacting group, labelled with its hop latency (commit -> processed)."""
    lines = _header(f"Order {report['order_id']} (partition {report['partition']})")
    for event in report["events"]:
        producer, event_type = event["producer"], event["event_type"]
        drawn = False
        for delivery in event["deliveries"]:
            if not delivery["handles"]:
                continue
            drawn = True
            group, status = delivery["group"], delivery["status"]
            if status == "processed":
                hop = _sum(event["commit_to_publish_ms"], delivery["publish_to_processed_ms"])
                extra = _ms(hop)
            elif status == "dead_lettered":
                extra = "dead-lettered"
            elif status == "failing":
                extra = f"failing (attempt {delivery['failed_attempts']})"
            else:
                extra = status.replace("_", " ")
            arrow = _arrow(event_type, failed=status in ("dead_lettered", "failing"))
            lines.append(f"    {producer}{arrow}{group}: {_label(event_type, None, extra)}")
        if not drawn:
            published = event["commit_to_publish_ms"]
            extra = f"published in {_ms(published)}" if published is not None else "not published"
            lines.append(f"    Note over {producer}: {_label(event_type, None, extra)}")
    states = [
        f"{service} {state['status']}"
        for service, state in report.get("state", {}).items()
        if state is not None
    ]
    if states:
        lines.append(f"    Note over {SERVICES[0]},{SERVICES[-1]}: {_text(', '.join(states))}")
    return "\n".join(lines) + "\n"


def _sum(*values: float | None) -> float | None:
    if any(v is None for v in values):
        return None
    return sum(v for v in values if v is not None)
