"""The audit's invariant checks on hand-made rows: clean data passes, each kind of damage shows."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from sagactl.audit.invariants import (
    Order,
    Payment,
    Refund,
    Reservation,
    Snapshot,
    check_all,
    check_confirmed,
    check_money,
    check_not_charged,
    check_stock,
    check_terminal,
)

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
GRACE = timedelta(seconds=10)


def order(oid: str, status: str, total: int | None = None, deadline_in: float = -60) -> Order:
    return Order(oid, "alice", status, total, NOW + timedelta(seconds=deadline_in))


@pytest.fixture
def clean() -> Snapshot:
    """Three orders that ran their course: confirmed, rejected (declined), cancelled+refunded.

    Stock: 10 apples set, 2 held by the confirmed order. Money: 1000 set, 300 captured
    for the confirmed order, 500 captured and refunded for the cancelled one.
    """
    return Snapshot(
        now=NOW,
        orders=[
            order("o1", "confirmed", 300),
            order("o2", "rejected"),
            order("o3", "cancelled", 500),
        ],
        reservations=[
            Reservation("o1", "held", (("apple", 2),)),
            Reservation("o2", "released", (("apple", 1),)),
            Reservation("o3", "released", (("apple", 3),)),
        ],
        available={"apple": 8},
        stock_adjusted={"apple": 10},
        payments=[
            Payment("o1", "p1", "alice", 300, "captured"),
            Payment("o2", None, "alice", 9999, "declined"),
            Payment("o3", "p3", "alice", 500, "refunded"),
        ],
        refunds=[Refund("p3", 500)],
        balances={"alice": 700},
        money_adjusted={"alice": 1000},
    )


def violations(results) -> dict[int, int]:
    return {r.number: r.violations for r in results if r.violations}


def test_clean_data_passes(clean):
    results = check_all(clean, GRACE)
    assert violations(results) == {}
    assert [r.number for r in results] == [1, 2, 3, 4, 5]


def test_empty_system_passes():
    assert violations(check_all(Snapshot(now=NOW), GRACE)) == {}


def test_pending_order_is_judged_only_after_deadline_plus_grace(clean):
    clean.orders.append(order("o4", "pending", deadline_in=-5))  # within the grace
    result = check_terminal(clean, GRACE)
    assert result.violations == 0
    assert result.notes["pending_in_time"] == 1

    clean.orders.append(order("o5", "pending", deadline_in=-11))
    result = check_terminal(clean, GRACE)
    assert result.violations == 1
    assert result.examples[0]["order_id"] == "o5"
    assert result.examples[0]["overdue_seconds"] == 1.0


def test_confirmed_without_payment_or_with_wrong_amount(clean):
    clean.payments[0] = replace(clean.payments[0], amount_cents=299)
    result = check_confirmed(clean)
    assert result.violations == 1
    assert "payment 299 != total 300" in result.examples[0]["problems"]

    clean.payments.pop(0)
    assert check_confirmed(clean).examples[0]["problems"] == ["0 captured unrefunded payments"]


def test_confirmed_but_refunded_or_released(clean):
    clean.refunds.append(Refund("p1", 300))
    clean.reservations[0] = replace(clean.reservations[0], status="released")
    result = check_confirmed(clean)
    assert result.examples[0]["problems"] == [
        "0 captured unrefunded payments",
        "reservation released",
    ]


def test_cancelled_but_still_charged_and_holding_stock(clean):
    clean.payments[2] = replace(clean.payments[2], status="captured")
    clean.refunds.clear()
    clean.reservations[2] = replace(clean.reservations[2], status="held")
    result = check_not_charged(clean)
    assert result.violations == 1
    assert result.examples[0]["problems"] == ["charged 500 cents", "reservation held"]


def test_capture_for_an_order_nobody_knows(clean):
    clean.payments.append(Payment("ghost", "p9", "alice", 100, "captured"))
    result = check_not_charged(clean)
    assert result.violations == 1
    assert result.examples[0]["order_id"] == "ghost"


def test_stock_that_does_not_add_up(clean):
    clean.available["apple"] = 9  # one apple appeared from nowhere
    result = check_stock(clean)
    assert result.violations == 1
    assert result.examples[0] == {
        "sku": "apple",
        "adjustments": 10,
        "available": 9,
        "held": 2,
        "difference": -1,
    }


def test_stock_held_by_a_rejected_order_is_a_violation_but_pending_is_in_flight(clean):
    clean.orders.append(order("o4", "pending", deadline_in=30))
    clean.reservations.append(Reservation("o4", "held", (("apple", 1),)))
    clean.available["apple"] = 7
    result = check_stock(clean)
    assert result.violations == 0
    assert result.notes["reservations_held_by_pending_orders"] == 1

    clean.orders[-1] = replace(clean.orders[-1], status="rejected")
    result = check_stock(clean)
    assert result.violations == 1
    assert result.examples[0]["problem"] == "held by a rejected order"


def test_money_that_does_not_add_up(clean):
    clean.balances["alice"] += 1
    result = check_money(clean)
    assert result.violations == 1
    assert result.examples[0]["difference"] == -1


def test_double_refund_breaks_the_money_invariant(clean):
    clean.balances["alice"] += 500  # refunded twice
    assert check_money(clean).violations == 1


def test_examples_are_capped_but_the_count_is_complete(clean):
    for n in range(20):
        clean.orders.append(order(f"late{n}", "pending", deadline_in=-100))
    result = check_terminal(clean, GRACE)
    assert result.violations == 20
    assert len(result.examples) == 5
