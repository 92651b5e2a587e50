"""OpenTelemetry through the outbox: one order's saga is one trace (issue 12).

The real apps, relays and partition workers (tests/saga_driver.py) trace into the SDK's
InMemorySpanExporter; the spans of one order must share one trace id, continue the caller's
`traceparent`, and link request -> publish -> process -> publish -> ... as parent and child.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from contracts import event_streams
from service_runtime import tracing

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
CALLER = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"

_EXPORTER = InMemorySpanExporter()
_PROVIDER: TracerProvider | None = None


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on for this test (the API takes one provider per process: made once)."""
    global _PROVIDER
    if _PROVIDER is None:
        _PROVIDER = TracerProvider(sampler=tracing.sampler())
        _PROVIDER.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    tracing.enable_for_tests(_PROVIDER)
    _EXPORTER.clear()
    try:
        yield _EXPORTER
    finally:
        tracing.disable_for_tests()
        _EXPORTER.clear()


def _hex(value: int, width: int) -> str:
    return f"{value:0{width}x}"


def _of_kind(found: list[ReadableSpan], kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in found if s.kind is kind]


def _by_event(found: list[ReadableSpan], kind: SpanKind) -> dict[tuple[str, str], ReadableSpan]:
    """(event type, group or producer stream) -> span."""
    out = {}
    for span in _of_kind(found, kind):
        key = (
            span.attributes.get("messaging.consumer.group.name")
            or span.attributes["messaging.destination.name"].split(".")[0]
        )
        out[(span.attributes["saga.event.type"], key)] = span
    return out


def _place(shop, headers: dict[str, str], quantity: int = 2) -> str:
    response = shop.orders.post(
        "/orders",
        json={"customer_id": "alice", "items": [{"sku": "apple", "quantity": quantity}]},
        headers=headers,
    )
    assert response.status_code == 201, response.json
    return response.json["order_id"]


def _entries(shop, order_id: str) -> list[dict[str, str]]:
    found = []
    for stream in event_streams(shop.partitions):
        for _id, fields in shop.redis.xrange(stream):
            fields = {
                (k.decode() if isinstance(k, bytes) else k): (
                    v.decode() if isinstance(v, bytes) else v
                )
                for k, v in fields.items()
            }
            if fields["aggregate_id"] == order_id:
                found.append(fields)
    return found


def test_one_orders_saga_is_one_trace_continuing_the_callers_traceparent(spans, shop) -> None:
    order_id = _place(shop, {"traceparent": CALLER})
    shop.settle()
    assert shop.order(order_id)["status"] == "confirmed"

    found = spans.get_finished_spans()
    ours = [s for s in found if _hex(s.context.trace_id, 32) == CALLER_TRACE]

    # the HTTP server span continues the caller's context
    (server,) = [s for s in _of_kind(ours, SpanKind.SERVER) if s.attributes.get("http.route")]
    assert _hex(server.parent.span_id, 16) == CALLER_SPAN and server.parent.is_remote

    produced = _by_event(ours, SpanKind.PRODUCER)
    consumed = _by_event(ours, SpanKind.CONSUMER)
    assert set(produced) == {
        ("OrderPlaced", "orders"),
        ("StockReserved", "inventory"),
        ("PaymentCaptured", "billing"),
        ("OrderConfirmed", "orders"),
    }
    assert set(consumed) == {
        ("OrderPlaced", "inventory"),
        ("StockReserved", "billing"),
        ("StockReserved", "orders"),
        ("PaymentCaptured", "orders"),
    }

    def parent_of(span: ReadableSpan) -> int:
        return span.parent.span_id

    # request -> publish OrderPlaced -> inventory -> publish StockReserved -> billing -> ...
    assert parent_of(produced[("OrderPlaced", "orders")]) == server.context.span_id
    chain = [
        (("OrderPlaced", "orders"), ("OrderPlaced", "inventory")),
        (("StockReserved", "inventory"), ("StockReserved", "billing")),
        (("StockReserved", "inventory"), ("StockReserved", "orders")),
        (("PaymentCaptured", "billing"), ("PaymentCaptured", "orders")),
    ]
    for producer_key, consumer_key in chain:
        assert parent_of(consumed[consumer_key]) == produced[producer_key].context.span_id
    assert (
        parent_of(produced[("StockReserved", "inventory")])
        == consumed[("OrderPlaced", "inventory")].context.span_id
    )
    assert (
        parent_of(produced[("PaymentCaptured", "billing")])
        == consumed[("StockReserved", "billing")].context.span_id
    )
    assert (
        parent_of(produced[("OrderConfirmed", "orders")])
        == consumed[("PaymentCaptured", "orders")].context.span_id
    )

    # messaging semantic conventions on the consumer spans
    process = consumed[("OrderPlaced", "inventory")]
    attributes = process.attributes
    assert attributes["messaging.system"] == "redis"
    assert attributes["messaging.operation"] == "process"
    assert attributes["messaging.consumer.group.name"] == "inventory"
    assert attributes["messaging.destination.name"].startswith("orders.events.{p")
    assert attributes["messaging.message.id"]
    assert attributes["saga.order_id"] == order_id
    assert process.name == "process orders.events"
    publish = produced[("OrderPlaced", "orders")]
    assert publish.attributes["messaging.message.id"] == attributes["messaging.message.id"]

    # psycopg's database spans, inside the trace; none without a parent anywhere
    database = [s for s in _of_kind(ours, SpanKind.CLIENT) if s.attributes.get("db.system")]
    assert any("outbox" in (s.attributes.get("db.statement") or "") for s in database), [
        s.name for s in database
    ]
    assert all(s.parent is not None for s in _of_kind(found, SpanKind.CLIENT))

    # every stream entry of the order carries the trace, readable with XRANGE
    entries = _entries(shop, order_id)
    assert {e["event_type"] for e in entries} == {
        "OrderPlaced",
        "StockReserved",
        "PaymentCaptured",
        "OrderConfirmed",
    }
    assert all(e["traceparent"].split("-")[1] == CALLER_TRACE for e in entries)


def test_compensations_join_the_orders_trace(spans, shop) -> None:
    shop.account("alice", balance_cents=10)  # too little: PaymentDeclined, then release
    order_id = _place(shop, {})
    shop.settle()
    assert shop.order(order_id)["status"] == "rejected"

    found = spans.get_finished_spans()
    (server,) = [
        s
        for s in _of_kind(found, SpanKind.SERVER)
        if s.attributes.get("http.route") == "/orders" and s.parent is None
    ]
    trace_id = server.context.trace_id
    ours = [s for s in found if s.context.trace_id == trace_id]
    consumed = _by_event(ours, SpanKind.CONSUMER)
    assert {
        ("PaymentDeclined", "orders"),
        ("PaymentDeclined", "inventory"),
        ("StockReleased", "orders"),
    } <= set(consumed)
    produced = _by_event(ours, SpanKind.PRODUCER)
    assert {("OrderRejected", "orders"), ("StockReleased", "inventory")} <= set(produced)
    assert {e["traceparent"].split("-")[1] for e in _entries(shop, order_id)} == {
        _hex(trace_id, 32)
    }


def test_tracing_off_stores_and_carries_no_traceparent(shop) -> None:
    assert not tracing.ENABLED
    order_id = _place(shop, {"traceparent": CALLER})
    shop.settle()
    assert shop.order(order_id)["status"] == "confirmed"
    assert all("traceparent" not in e for e in _entries(shop, order_id))
