"""UnitOfWork.lock_order: one statement per order and transaction, none for an order whose lock
the consumer's first statement took already (LOCK_ORDERS)."""

from __future__ import annotations

from typing import Any

from service_runtime.faults import configured_fault, no_faults
from service_runtime.unit_of_work import UnitOfWork


class RecordingConnection:
    """Records the statements sent; the lock statement returns nothing anyone reads."""

    def __init__(self) -> None:
        self.statements: list[tuple[str, Any]] = []

    def execute(self, query: str, params: Any = None) -> None:
        self.statements.append((query, params))


def test_an_order_locked_by_the_first_statement_costs_the_handler_no_statement() -> None:
    conn = RecordingConnection()
    uow = UnitOfWork(conn, orders_locked=frozenset({"order-a"}))  # type: ignore[arg-type]
    uow.lock_order("order-a")
    assert conn.statements == []
    uow.lock_order("order-b")
    uow.lock_order("order-b")  # held until the transaction ends: taken once
    assert conn.statements == [("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (1, "order-b"))]


def test_the_fault_hook_is_read_once_when_the_process_is_wired(monkeypatch) -> None:
    monkeypatch.delenv("SAGA_CRASH_AT", raising=False)
    assert configured_fault() is no_faults
    monkeypatch.setenv("SAGA_CRASH_AT", "after_commit")
    hook = configured_fault()
    hook("mid_handler")  # another point: nothing happens
    assert hook is not no_faults
