"""OpenTelemetry end to end: `saga run-all` with OTEL_EXPORTER_OTLP_ENDPOINT set (tests/e2e/
conftest.py) exports the spans of all three services to a real OTLP/HTTP receiver, and one
order's saga is one trace, continued from the caller's traceparent."""

from __future__ import annotations

import secrets
import uuid

import requests

from contracts import DEFAULT_PARTITIONS, event_streams
from tests.helpers import wait_until

SERVER, CLIENT, PRODUCER, CONSUMER = 2, 3, 4, 5  # opentelemetry.proto Span.SpanKind


def test_one_orders_saga_reaches_the_collector_as_one_trace(system, otlp) -> None:
    sku, customer = f"sku-{uuid.uuid4().hex[:8]}", f"cust-{uuid.uuid4().hex[:8]}"
    requests.put(
        f"{system.urls['inventory']}/products/{sku}",
        json={"name": sku, "price_cents": 100, "available": 5},
    ).raise_for_status()
    requests.put(
        f"{system.urls['billing']}/accounts/{customer}", json={"balance_cents": 1000}
    ).raise_for_status()
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    response = requests.post(
        f"{system.urls['orders']}/orders",
        json={"customer_id": customer, "items": [{"sku": sku, "quantity": 2}]},
        headers={"traceparent": f"00-{trace_id}-{parent}-01"},
    )
    assert response.status_code == 201, response.text
    order_id = response.json()["order_id"]
    wait_until(
        lambda: (
            requests.get(f"{system.urls['orders']}/orders/{order_id}").json()["status"]
            == "confirmed"
        ),
        timeout=30,
        message=lambda: system.log_tail(),
    )

    def complete() -> bool:
        spans = otlp.of_trace(trace_id)
        kinds = {(s.service, s.kind) for s in spans}
        return {
            ("orders", SERVER),
            ("orders", PRODUCER),  # the orders relay
            ("inventory", CONSUMER),
            ("inventory", PRODUCER),
            ("billing", CONSUMER),
            ("billing", PRODUCER),
            ("orders", CONSUMER),
        } <= kinds

    wait_until(complete, timeout=30, message=lambda: f"spans: {otlp.of_trace(trace_id)}")
    spans = otlp.of_trace(trace_id)
    assert {s.service for s in spans} == {"orders", "inventory", "billing"}
    (server,) = [s for s in spans if s.kind == SERVER and s.parent_span_id == parent]
    assert server.process == "web"
    by_id = {s.span_id: s for s in spans}
    for span in spans:
        if span.span_id != server.span_id:
            assert span.parent_span_id in by_id, span  # one tree under the request
    consumed = {
        (s.attributes["messaging.consumer.group.name"], s.attributes["saga.event.type"])
        for s in spans
        if s.kind == CONSUMER
    }
    assert {
        ("inventory", "OrderPlaced"),
        ("billing", "StockReserved"),
        ("orders", "PaymentCaptured"),
    } <= consumed
    assert any(s.kind == CLIENT and s.attributes.get("db.system") for s in spans)

    # the stream entries of the order carry the trace (what `redis-cli XRANGE` shows)
    client = system.redis()
    carried = {
        fields["traceparent"].split("-")[1]
        for stream in event_streams(DEFAULT_PARTITIONS)
        for _id, fields in client.xrange(stream)
        if fields.get("aggregate_id") == order_id
    }
    assert carried == {trace_id}
