"""Shapes the inspection reports for the templates (layout only: the numbers come as they are
from sagactl.inspect)."""

from __future__ import annotations

import math
from typing import Any

from contracts import STREAM_OF_PRODUCER, SUBSCRIPTIONS
from sagactl.inspect.partitions import GROUPS
from service_runtime.config import SERVICES

# The flow drawing: service boxes (centre x, centre y) in a viewBox of 900 x 380
BOX_W, BOX_H = 220, 92
CENTRES = {"orders": (130, 70), "inventory": (770, 70), "billing": (450, 320)}
# where each arrow's label goes (producer, group) -> (x, y): beside the middle of its arrow,
# on the arrow's own side, so the two directions between two services never share a place
LABELS = {
    ("orders", "inventory"): (450, 114),
    ("inventory", "orders"): (450, 30),
    ("orders", "billing"): (210, 228),
    ("billing", "orders"): (335, 150),
    ("inventory", "billing"): (565, 150),
    ("billing", "inventory"): (690, 228),
}
PRODUCER_OF = {stream: producer for producer, stream in STREAM_OF_PRODUCER.items()}


def _edge_end(cx: float, cy: float, dx: float, dy: float) -> float:
    """How far along (dx, dy) from a box's centre its border is (as a fraction of the vector)."""
    limits = []
    if dx:
        limits.append((BOX_W / 2 + 6) / abs(dx))
    if dy:
        limits.append((BOX_H / 2 + 6) / abs(dy))
    return min(limits)


def stream_edges(streams: dict[str, Any]) -> list[dict[str, Any]]:
    """One arrow per (stream, reading group): producer -> group, with that group's lag,
    pending entries, oldest pending and dead letters from this stream (summed over the
    partitions, from streams_report)."""
    edges = []
    for group in GROUPS:
        for base in SUBSCRIPTIONS[group]:
            producer = PRODUCER_OF[base]
            stats = {"lag": 0, "pending": 0, "dead_letters": 0, "oldest_ms": None, "capped": False}
            report = next((s for s in streams["streams"] if s["stream"] == base), None)
            for part in report["partitions"] if report else []:
                for g in part["groups"]:
                    if g["group"] != group:
                        continue
                    stats["lag"] += g["lag"]
                    stats["pending"] += g["pending"]
                    stats["capped"] |= g["lag_capped"]
                    stats["dead_letters"] += g["dead_letters_from_stream"] or 0
                    if g["oldest_pending_idle_ms"] is not None:
                        stats["oldest_ms"] = max(
                            stats["oldest_ms"] or 0, g["oldest_pending_idle_ms"]
                        )
            edges.append({"stream": base, "producer": producer, "group": group, **stats})
    for edge in edges:
        edge.update(_geometry(edge["producer"], edge["group"]))
        edge["state"] = (
            "bad" if edge["dead_letters"] else "warn" if edge["lag"] or edge["pending"] else "ok"
        )
    return edges


def _geometry(source: str, target: str) -> dict[str, float]:
    (x1, y1), (x2, y2) = CENTRES[source], CENTRES[target]
    dx, dy = x2 - x1, y2 - y1
    length = math.hypot(dx, dy)
    # the two directions between a pair of services run side by side, 36 px apart
    nx, ny = -dy / length * 18, dx / length * 18
    start, end = _edge_end(x1, y1, dx, dy), 1 - _edge_end(x2, y2, -dx, -dy)
    lx, ly = LABELS[(source, target)]
    return {
        "x1": round(x1 + nx + dx * start, 1),
        "y1": round(y1 + ny + dy * start, 1),
        "x2": round(x1 + nx + dx * end, 1),
        "y2": round(y1 + ny + dy * end, 1),
        "lx": lx,
        "ly": ly,
    }


def boxes(snapshot: dict[str, Any]) -> list[dict[str, Any]]:
    """A service box: its relay and outbox backlog, and its consumers with partitions owned."""
    result = []
    for service in SERVICES:
        outbox = snapshot["outbox"][service]
        owners: dict[str, int] = {}
        for s in snapshot["streams"]["groups"]:
            if s["group"] == service and s["owner"] and s["lease_live"]:
                owners[s["owner"]] = owners.get(s["owner"], 0) + 1
        cx, cy = CENTRES[service]
        result.append(
            {
                "service": service,
                "x": cx - BOX_W / 2,
                "y": cy - BOX_H / 2,
                "cx": cx,
                "cy": cy,
                "w": BOX_W,
                "h": BOX_H,
                "outbox": outbox,
                "owners": owners,
                "unowned": snapshot["streams"]["partitions"] - sum(owners.values()),
            }
        )
    return result


def group_tables(snapshot: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return {g: [s for s in snapshot["streams"]["groups"] if s["group"] == g] for g in GROUPS}


def event_rows(trace: dict[str, Any]) -> list[dict[str, Any]]:
    """The trace's events with each delivery's end-to-end hop (commit -> processed)."""
    rows = []
    for event in trace["events"]:
        deliveries = []
        for d in event["deliveries"]:
            hop = None
            if (
                d["publish_to_processed_ms"] is not None
                and event["commit_to_publish_ms"] is not None
            ):
                hop = d["publish_to_processed_ms"] + event["commit_to_publish_ms"]
            deliveries.append({**d, "hop_ms": hop})
        rows.append({**event, "deliveries": deliveries})
    return rows
