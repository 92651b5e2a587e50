"""The console's pure parts: the Mermaid sequence diagram of a trace, the flow drawing's numbers,
and the Flask app's guards (loopback Host only, the re-drive's password and confirmation),
with the inspection functions replaced so no server is needed."""

from __future__ import annotations

from typing import Any

import pytest

from sagactl.console import app as console_app
from sagactl.console import views
from sagactl.inspect.diagrams import order_sequence_diagram


def _event(event_type: str, producer: str, *deliveries: tuple[str, str, float | None]):
    return {
        "event_type": event_type,
        "producer": producer,
        "commit_to_publish_ms": 10.0,
        "published_at": "2026-01-01T00:00:00.000Z",
        "deliveries": [
            {
                "group": group,
                "status": status,
                "publish_to_processed_ms": ms,
                "failed_attempts": 3 if status == "failing" else None,
                "dead_letter": {"id": "1-0"} if status == "dead_lettered" else None,
            }
            for group, status, ms in deliveries
        ],
    }


TRACE = {
    "order_id": "o",
    "partition": 1,
    "events": [
        _event(
            "OrderPlaced",
            "orders",
            ("inventory", "processed", 13.0),
            ("billing", "not_handled", None),
        ),
        _event(
            "StockReserved",
            "inventory",
            ("orders", "processed", 2.5),
            ("billing", "processed", 1500.0),
        ),
        _event("OrderConfirmed", "orders", ("inventory", "not_handled", None)),
        _event(
            "OrderCancelled",
            "orders",
            ("inventory", "dead_lettered", None),
            ("billing", "processed", 4.0),
        ),
        _event("PaymentRefunded", "billing", ("orders", "failing", None)),
    ],
    "state": {},
}


def test_the_sequence_diagram_has_the_services_one_arrow_per_reaction_and_compensations_apart():
    text = order_sequence_diagram(TRACE)
    lines = [line.strip() for line in text.splitlines()]
    assert lines[:4] == [
        "sequenceDiagram",
        "participant orders",
        "participant inventory",
        "participant billing",
    ]
    assert "orders ->> inventory: OrderPlaced (23 ms)" in lines  # commit -> processed
    assert "inventory ->> billing: StockReserved (1.5 s)" in lines
    assert "Note over orders: OrderConfirmed (no service reacts)" in lines
    assert not any("orders ->> billing: OrderPlaced" in line for line in lines)  # not handled
    # compensations: dashed, in one shaded block; a dead letter ends in a cross
    start = lines.index(next(line for line in lines if line.startswith("rect ")))
    assert lines[start + 1] == "orders --x inventory: OrderCancelled DEAD-LETTERED"
    assert lines[start + 2] == "orders -->> billing: OrderCancelled (14 ms)"
    assert lines[start + 3] == "billing --x orders: PaymentRefunded failing (attempt 3)"
    assert lines[start + 4] == "end"


def test_labels_cannot_break_the_diagram():
    trace = {"events": [_event("Bad;Type#x", "orders", ("inventory", "processed", 1.0))]}
    assert "orders ->> inventory: Bad Type x (11 ms)" in order_sequence_diagram(trace)
    assert "no events in any outbox" in order_sequence_diagram({"events": []})


def _streams(lag: int, pending: int, dead: int) -> dict[str, Any]:
    def part(stream: str, group: str) -> dict[str, Any]:
        return {
            "stream": stream,
            "groups": [
                {
                    "group": group,
                    "lag": lag,
                    "pending": pending,
                    "lag_capped": False,
                    "dead_letters_from_stream": dead,
                    "oldest_pending_idle_ms": 5.0 if pending else None,
                }
            ],
        }

    return {
        "streams": [
            {
                "stream": "orders.events",
                "partitions": [part("orders.events.{p0}", "inventory")] * 2,
            },
            {"stream": "inventory.events", "partitions": []},
            {"stream": "billing.events", "partitions": []},
        ]
    }


def test_each_arrow_of_the_flow_sums_its_group_over_the_partitions():
    edges = {(e["stream"], e["group"]): e for e in views.stream_edges(_streams(3, 1, 2))}
    assert len(edges) == 6
    edge = edges[("orders.events", "inventory")]
    assert (edge["producer"], edge["lag"], edge["pending"], edge["dead_letters"]) == (
        "orders",
        6,
        2,
        4,
    )
    assert edge["state"] == "bad" and edges[("orders.events", "billing")]["state"] == "ok"


@pytest.fixture
def client(monkeypatch, tmp_path):
    monkeypatch.setenv("SAGA_RUN_DIR", str(tmp_path))
    letter = {
        "group": "inventory",
        "partition": 2,
        "stream": "orders.events.{p2}",
        "entry_id": "5-0",
        "id": 7,
        "fields": {"event_type": "OrderPlaced"},
        "payload": {},
        "event_type": "OrderPlaced",
        "error": "boom",
        "state": "dead",
        "redrive_outcome": None,
        "correlation_id": None,
    }
    redriven: list[Any] = []

    class FakeConnections:
        def client(self):
            return object()

        def partitions(self):
            return 8

    monkeypatch.setattr(console_app, "get_dead_letter", lambda *a, **k: letter)

    def request_redrive(group, ids):
        redriven.append((group, ids))
        return [
            {
                "id": 7,
                "partition": 2,
                "stream": "orders.events.{p2}",
                "entry_id": "5-0",
                "event_type": "OrderPlaced",
                "event_id": "e",
            }
        ]

    monkeypatch.setattr(console_app, "request_redrive", request_redrive)
    app = console_app.create_app(port=8000, connections=FakeConnections())
    app.testing = True
    test_client = app.test_client()
    test_client.redriven = redriven
    return test_client


def test_only_loopback_host_names_are_answered(client):
    assert (
        client.get("/dead-letters/inventory/7", base_url="http://127.0.0.1:8000").status_code == 200
    )
    assert (
        client.get("/dead-letters/inventory/7", base_url="http://localhost:8000").status_code == 200
    )
    assert client.get("/", base_url="http://attacker.example:8000").status_code == 421


def test_a_redrive_needs_the_operator_password_and_the_confirmation(client, tmp_path):
    from sagactl.console.auth import operator_password, password_file

    url = "/dead-letters/inventory/7/redrive"
    base = "http://127.0.0.1:8000"
    wrong = client.post(url, base_url=base, data={"password": "guess", "confirm": "7"})
    assert wrong.status_code == 403 and client.redriven == []
    password = operator_password()
    assert password_file().stat().st_mode & 0o777 == 0o600
    unconfirmed = client.post(url, base_url=base, data={"password": password})
    assert unconfirmed.status_code == 400 and client.redriven == []
    done = client.post(url, base_url=base, data={"password": password, "confirm": "7"})
    assert done.status_code == 200 and client.redriven == [("inventory", [7])]
    body = done.get_data(as_text=True)
    assert "Re-drive requested" in body and "partition 2" in body and password not in body
    assert "default-src 'self'" in done.headers["Content-Security-Policy"]
