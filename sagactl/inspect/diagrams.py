"""Mermaid text for one order's saga: a sequenceDiagram built from trace.trace_order's report.

Participants are the three services, in saga order. Every event a group reacts to is one arrow
from its producer to that group, labelled with the event type and its hop latency (committed by
the producer -> processed by the group: relay + stream + consumer). Compensations
(OrderCancelled, StockReleased, PaymentRefunded) are dashed arrows inside a shaded block; an
event a group gave up on ends in a cross and says so; one nobody reacts to is a note over its
producer. `saga trace --mermaid` and `saga console` draw the same text.
"""

from __future__ import annotations

import re
from typing import Any

from sagactl.inspect.common import duration
from service_runtime.config import SERVICES

COMPENSATIONS = frozenset({"OrderCancelled", "StockReleased", "PaymentRefunded"})
# Shading of a compensation block: a light red that keeps dark text readable
COMPENSATION_FILL = "rgba(254, 226, 226, 0.6)"
_UNSAFE = re.compile(r"[;#<>{}\n\r]")  # statement separators, entities, markup


def _text(value: Any) -> str:
    """A label Mermaid reads as plain text (no statement break, entity or tag)."""
    return _UNSAFE.sub(" ", str(value)).strip()


def _hop_ms(event: dict[str, Any], delivery: dict[str, Any]) -> float | None:
    publish, processed = event.get("commit_to_publish_ms"), delivery.get("publish_to_processed_ms")
    if publish is None or processed is None:
        return None
    return publish + processed


def _arrow(event: dict[str, Any], delivery: dict[str, Any]) -> str:
    """One arrow: solid for the saga going forward, dashed for a compensation, a cross for an
    event the group gave up on (or has not processed yet)."""
    compensation = event["event_type"] in COMPENSATIONS
    status = delivery["status"]
    label = _text(event["event_type"])
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
    return f"    {_text(event['producer'])} {arrow} {_text(delivery['group'])}: {label}"


def order_sequence_diagram(trace: dict[str, Any]) -> str:
    """Mermaid `sequenceDiagram` text of trace.trace_order(order_id)'s report."""
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
            note = f"{_text(event['event_type'])} (no service reacts)"
            if not event.get("published_at"):
                note = f"{_text(event['event_type'])} (not published yet)"
            lines.append(f"    Note over {_text(event['producer'])}: {note}")
        lines += [_arrow(event, delivery) for delivery in reacting]
    if in_compensation:
        lines.append("    end")
    if len(lines) == 1 + len(SERVICES):
        lines.append(f"    Note over {SERVICES[0]},{SERVICES[-1]}: no events in any outbox")
    return "\n".join(lines) + "\n"
