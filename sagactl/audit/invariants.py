"""The consistency invariants of DESIGN.md §3 as pure functions over plain rows.

Nothing here touches a database: `collect` reads the three services' tables into a `Snapshot`
and `check_all` judges it, so every rule is unit-testable with hand-made rows.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

TERMINAL = frozenset({"confirmed", "rejected", "cancelled"})
EXAMPLES = 5  # violations shown per invariant; the count is always complete


@dataclass(frozen=True)
class Order:
    order_id: str
    customer_id: str
    status: str
    total_cents: int | None
    payment_deadline: datetime


@dataclass(frozen=True)
class Reservation:
    order_id: str
    status: str  # held | released | failed
    lines: tuple[tuple[str, int], ...] = ()  # (sku, quantity)


@dataclass(frozen=True)
class Payment:
    order_id: str
    payment_id: str | None
    customer_id: str
    amount_cents: int
    status: str  # captured | refunded | declined


@dataclass(frozen=True)
class Refund:
    payment_id: str
    amount_cents: int


@dataclass
class Snapshot:
    """What the audit needs from the three databases, keyed the way the checks look it up."""

    now: datetime
    orders: list[Order] = field(default_factory=list)
    reservations: list[Reservation] = field(default_factory=list)
    available: dict[str, int] = field(default_factory=dict)  # sku -> products.available
    stock_adjusted: dict[str, int] = field(default_factory=dict)  # sku -> sum(delta)
    payments: list[Payment] = field(default_factory=list)
    refunds: list[Refund] = field(default_factory=list)
    balances: dict[str, int] = field(default_factory=dict)  # customer -> balance_cents
    money_adjusted: dict[str, int] = field(default_factory=dict)  # customer -> sum(delta)


@dataclass
class Result:
    number: int
    title: str
    violations: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)

    def add(self, example: dict[str, Any]) -> None:
        self.violations += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append(example)

    def as_dict(self) -> dict[str, Any]:
        return {
            "invariant": self.number,
            "title": self.title,
            "violations": self.violations,
            "examples": self.examples,
            "notes": self.notes,
        }


def _unrefunded_captures(snapshot: Snapshot) -> dict[str, list[Payment]]:
    """order_id -> its captured payments that have no refund row."""
    refunded = {refund.payment_id for refund in snapshot.refunds}
    found: dict[str, list[Payment]] = defaultdict(list)
    for payment in snapshot.payments:
        if payment.status == "captured" and payment.payment_id not in refunded:
            found[payment.order_id].append(payment)
    return found


def check_terminal(snapshot: Snapshot, grace: timedelta) -> Result:
    """1. Every order is terminal within its payment deadline + grace."""
    result = Result(1, "every order terminal within deadline + grace")
    in_flight = 0
    for order in snapshot.orders:
        if order.status in TERMINAL:
            continue
        overdue = snapshot.now - (order.payment_deadline + grace)
        if overdue > timedelta(0):
            result.add(
                {
                    "order_id": order.order_id,
                    "status": order.status,
                    "overdue_seconds": round(overdue.total_seconds(), 1),
                }
            )
        else:
            in_flight += 1
    result.notes = {"orders": len(snapshot.orders), "pending_in_time": in_flight}
    return result


def check_confirmed(snapshot: Snapshot) -> Result:
    """2. Confirmed: exactly one captured, unrefunded payment equal to the total; stock held."""
    result = Result(2, "confirmed: one captured unrefunded payment = total, reservation held")
    captures = _unrefunded_captures(snapshot)
    reservations = {r.order_id: r for r in snapshot.reservations}
    checked = 0
    for order in snapshot.orders:
        if order.status != "confirmed":
            continue
        checked += 1
        problems = []
        paid = captures.get(order.order_id, [])
        if len(paid) != 1:
            problems.append(f"{len(paid)} captured unrefunded payments")
        elif paid[0].amount_cents != order.total_cents:
            problems.append(f"payment {paid[0].amount_cents} != total {order.total_cents}")
        reservation = reservations.get(order.order_id)
        held = reservation.status if reservation else "missing"
        if held != "held":
            problems.append(f"reservation {held}")
        if problems:
            result.add({"order_id": order.order_id, "problems": problems})
    result.notes = {"confirmed_orders": checked}
    return result


def check_not_charged(snapshot: Snapshot) -> Result:
    """3. Rejected or cancelled: no captured-unrefunded payment, no stock held."""
    result = Result(3, "rejected/cancelled: net charge zero, no stock held")
    captures = _unrefunded_captures(snapshot)
    reservations = {r.order_id: r for r in snapshot.reservations}
    known = {order.order_id for order in snapshot.orders}
    checked = 0
    for order in snapshot.orders:
        if order.status not in ("rejected", "cancelled"):
            continue
        checked += 1
        problems = []
        paid = captures.get(order.order_id, [])
        if paid:
            problems.append(f"charged {sum(p.amount_cents for p in paid)} cents")
        reservation = reservations.get(order.order_id)
        if reservation and reservation.status == "held":
            problems.append("reservation held")
        if problems:
            result.add({"order_id": order.order_id, "status": order.status, "problems": problems})
    # money taken for an order the orders service never heard of is never given back
    for order_id, paid in captures.items():
        if order_id not in known:
            result.add(
                {
                    "order_id": order_id,
                    "status": "unknown to orders",
                    "problems": [f"charged {sum(p.amount_cents for p in paid)} cents"],
                }
            )
    result.notes = {"rejected_or_cancelled_orders": checked}
    return result


def check_stock(snapshot: Snapshot) -> Result:
    """4. Per sku: sum of stock adjustments = available + held; held only by confirmed orders.

    Orders still pending may hold stock while their saga runs: that is counted in the notes,
    not as a violation (invariant 1 catches one that stays pending too long).
    """
    result = Result(4, "per sku: adjustments = available + held by confirmed orders")
    status = {order.order_id: order.status for order in snapshot.orders}
    held: Counter[str] = Counter()
    held_in_flight = 0
    for reservation in snapshot.reservations:
        if reservation.status != "held":
            continue
        for sku, quantity in reservation.lines:
            held[sku] += quantity
        order_status = status.get(reservation.order_id, "unknown")
        if order_status == "pending":
            held_in_flight += 1
        elif order_status != "confirmed":
            result.add(
                {"order_id": reservation.order_id, "problem": f"held by a {order_status} order"}
            )
    skus = set(snapshot.available) | set(snapshot.stock_adjusted) | set(held)
    for sku in sorted(skus):
        adjusted = snapshot.stock_adjusted.get(sku, 0)
        available = snapshot.available.get(sku, 0)
        if adjusted != available + held[sku]:
            result.add(
                {
                    "sku": sku,
                    "adjustments": adjusted,
                    "available": available,
                    "held": held[sku],
                    "difference": adjusted - available - held[sku],
                }
            )
    result.notes = {"skus": len(skus), "reservations_held_by_pending_orders": held_in_flight}
    return result


def check_money(snapshot: Snapshot) -> Result:
    """5. Per account: sum of money adjustments = balance + captures - refunds."""
    result = Result(5, "per account: adjustments = balance + captures - refunds")
    captured: Counter[str] = Counter()
    owner: dict[str, str] = {}
    for payment in snapshot.payments:
        if payment.status in ("captured", "refunded"):
            captured[payment.customer_id] += payment.amount_cents
        if payment.payment_id:
            owner[payment.payment_id] = payment.customer_id
    refunded: Counter[str] = Counter()
    for refund in snapshot.refunds:
        refunded[owner.get(refund.payment_id, "?")] += refund.amount_cents
    accounts = set(snapshot.balances) | set(snapshot.money_adjusted) | set(captured)
    for customer in sorted(accounts | set(refunded)):
        adjusted = snapshot.money_adjusted.get(customer, 0)
        balance = snapshot.balances.get(customer, 0)
        expected = balance + captured[customer] - refunded[customer]
        if adjusted != expected:
            result.add(
                {
                    "customer_id": customer,
                    "adjustments": adjusted,
                    "balance": balance,
                    "captured": captured[customer],
                    "refunded": refunded[customer],
                    "difference": adjusted - expected,
                }
            )
    result.notes = {"accounts": len(accounts)}
    return result


def check_all(snapshot: Snapshot, grace: timedelta) -> list[Result]:
    return [
        check_terminal(snapshot, grace),
        check_confirmed(snapshot),
        check_not_charged(snapshot),
        check_stock(snapshot),
        check_money(snapshot),
    ]


def summary(snapshot: Snapshot) -> dict[str, Any]:
    """Counts that put the violations in context (orders by status, payments by status)."""
    return {
        "orders_by_status": dict(sorted(Counter(o.status for o in snapshot.orders).items())),
        "payments_by_status": dict(sorted(Counter(p.status for p in snapshot.payments).items())),
        "reservations_by_status": dict(
            sorted(Counter(r.status for r in snapshot.reservations).items())
        ),
    }
