"""Inventory rules, pure: can an order be reserved, and at what price."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StockLevel:
    sku: str
    available: int
    price_cents: int


@dataclass(frozen=True)
class ReservationPlan:
    """Either every line reserved (ok) or none, with the reason and the shortages."""

    ok: bool
    lines: list[dict] = field(default_factory=list)
    total_cents: int = 0
    reason: str | None = None
    shortages: list[dict] = field(default_factory=list)


def merge_items(items: Iterable[Mapping]) -> dict[str, int]:
    """Quantities per sku, in sku order (the lock order that keeps reservations deadlock-free)."""
    merged: dict[str, int] = {}
    for item in items:
        merged[item["sku"]] = merged.get(item["sku"], 0) + int(item["quantity"])
    return dict(sorted(merged.items()))


def plan_reservation(wanted: Mapping[str, int], stock: Mapping[str, StockLevel]) -> ReservationPlan:
    unknown = [sku for sku in wanted if sku not in stock]
    if unknown:
        return ReservationPlan(
            ok=False,
            reason="unknown_sku",
            shortages=[{"sku": s, "requested": wanted[s], "available": 0} for s in unknown],
        )
    short = [
        {"sku": sku, "requested": qty, "available": stock[sku].available}
        for sku, qty in wanted.items()
        if stock[sku].available < qty
    ]
    if short:
        return ReservationPlan(ok=False, reason="insufficient_stock", shortages=short)
    lines = [
        {"sku": sku, "quantity": qty, "unit_price_cents": stock[sku].price_cents}
        for sku, qty in wanted.items()
    ]
    total = sum(line["quantity"] * line["unit_price_cents"] for line in lines)
    return ReservationPlan(ok=True, lines=lines, total_cents=total)
