"""`saga audit` on real databases: a settled saga passes, one corrupted row is reported."""

from __future__ import annotations

import json

import psycopg
import pytest
from click.testing import CliRunner

from sagactl.main import cli


@pytest.fixture
def saga(saga, clean_state, monkeypatch):
    """The saga driver, with the environment `saga audit` reads pointing at its servers."""
    for key, value in clean_state.env.items():
        monkeypatch.setenv(key, value)
    return saga


def audit(*args: str) -> tuple[int, dict]:
    result = CliRunner().invoke(cli, ["audit", "--json", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, json.loads(result.output)


def by_number(report: dict) -> dict[int, dict]:
    return {item["invariant"]: item for item in report["invariants"]}


@pytest.fixture
def settled(saga):
    """Confirmed, rejected (stock and money), cancelled after capture, and one in flight."""
    saga.product("apple", available=5, price_cents=150)
    saga.product("pear", available=1, price_cents=400)
    saga.account("alice", balance_cents=1000)
    saga.account("bob", balance_cents=100)
    saga.place("alice", [("apple", 2)])  # confirmed
    saga.place("alice", [("pear", 2)])  # not enough stock
    saga.place("bob", [("apple", 1)])  # not enough money
    cancelled = saga.place("alice", [("pear", 1)])
    saga.settle()
    assert saga.orders.post(f"/orders/{cancelled}/cancel").status_code == 202
    saga.settle()
    saga.place("alice", [("apple", 1)])  # still pending: its events were never delivered
    return saga


def test_a_settled_system_has_no_violations(settled):
    code, report = audit()
    assert code == 0, report
    assert report["violations"] == 0
    assert report["summary"]["orders_by_status"] == {
        "cancelled": 1,
        "confirmed": 1,
        "pending": 1,
        "rejected": 2,
    }
    invariants = by_number(report)
    assert sorted(invariants) == [1, 2, 3, 4, 5]
    assert invariants[1]["notes"]["pending_in_time"] == 1


def test_a_corrupted_balance_is_reported_by_invariant_5(settled):
    with psycopg.connect(settled.db_urls["billing"], autocommit=True) as conn:
        conn.execute(
            "UPDATE accounts SET balance_cents = balance_cents + 1 WHERE customer_id = 'bob'"
        )
    code, report = audit()
    assert code == 1
    assert report["violations"] == 1
    money = by_number(report)[5]
    assert money["violations"] == 1
    assert money["examples"][0]["customer_id"] == "bob"
    assert money["examples"][0]["difference"] == -1


def test_an_order_stuck_past_its_deadline_is_reported_by_invariant_1(settled):
    with psycopg.connect(settled.db_urls["orders"], autocommit=True) as conn:
        conn.execute(
            "UPDATE orders SET payment_deadline = now() - interval '1 minute'"
            " WHERE status = 'pending'"
        )
    code, report = audit("--grace-seconds", "30")
    assert code == 1
    assert by_number(report)[1]["violations"] == 1
    # with a grace longer than the delay it is still in time
    code, _ = audit("--grace-seconds", "120")
    assert code == 0


def test_text_output_names_each_invariant(settled):
    result = CliRunner().invoke(cli, ["audit"])
    assert result.exit_code == 0, result.output
    assert "all invariants hold" in result.output
    for number in range(1, 6):
        assert f"  {number}. " in result.output
