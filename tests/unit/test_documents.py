"""The generated event documents: AsyncAPI 3.0 (validated against the official JSON Schema of
`@asyncapi/specs`) and the Mermaid diagrams (parsed by the real Mermaid parser in node)."""

from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path

import jsonschema
import pytest
from click.testing import CliRunner

from contracts import ENVELOPE_FIELDS, EVENT_SCHEMAS, PRODUCER_OF_EVENT, SUBSCRIPTIONS
from sagactl.inspect.diagrams import designed_saga, order_sequence_diagram, reaction_table
from sagactl.main import cli
from service_runtime import asyncapi
from tests.node_tools import asyncapi_schema, mermaid_parse


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = asyncapi_schema("3.0.0")
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def _errors(validator: jsonschema.Draft7Validator, doc: dict) -> list[str]:
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("service", [None, "orders", "inventory", "billing"])
def test_asyncapi_documents_validate_against_the_official_schema(validator, service) -> None:
    doc = asyncapi.document(service, partitions=8)
    assert doc["asyncapi"] == "3.0.0"
    assert _errors(validator, doc) == []


def test_the_validator_does_reject_a_broken_document(validator) -> None:
    doc = copy.deepcopy(asyncapi.document())
    doc["operations"]["orders.send"]["action"] = "publish"  # AsyncAPI 2 wording
    doc["channels"]["orders.events"]["parameters"]["partition"]["location"] = "payload.order_id"
    errors = _errors(validator, doc)
    assert any("publish" in e for e in errors) and any("location" in e for e in errors), errors


def test_every_event_type_and_version_is_a_message_with_envelope_headers() -> None:
    doc = asyncapi.document(partitions=8)
    messages = doc["components"]["messages"]
    assert set(messages) == {f"{t}.v{v}" for t, v in EVENT_SCHEMAS}
    for (event_type, version), _schema in EVENT_SCHEMAS.items():
        message = messages[f"{event_type}.v{version}"]
        assert message["name"] == event_type
        headers = message["headers"]["properties"]
        assert set(headers) == {*ENVELOPE_FIELDS, "traceparent"} - {"payload"}
        assert "traceparent" not in message["headers"]["required"]
        name = message["payload"]["$ref"].rsplit("/", 1)[1]
        assert name in doc["components"]["schemas"]
    # one channel per stream, partitioned
    assert set(doc["channels"]) == {"orders.events", "inventory.events", "billing.events"}
    channel = doc["channels"]["inventory.events"]
    assert channel["address"] == "inventory.events.{partition}"
    assert channel["x-partitioning"]["partitions"] == 8
    assert "CRC-32" in channel["x-partitioning"]["rule"]


def test_operations_follow_producers_subscriptions_and_handlers() -> None:
    handlers = reaction_table()
    for service in SUBSCRIPTIONS:
        doc = asyncapi.document(service)
        send = doc["operations"][f"{service}.send"]
        sent = {ref["$ref"].rsplit("/", 1)[1] for ref in send["messages"]}
        assert sent == {f"{t}.v{v}" for t, v in EVENT_SCHEMAS if PRODUCER_OF_EVENT[t] == service}
        received = {
            ref["$ref"].rsplit("/", 1)[1].split(".v")[0]
            for op in doc["operations"].values()
            if op["action"] == "receive"
            for ref in op["messages"]
        }
        assert received == handlers[service]
        for op in doc["operations"].values():
            if op["action"] == "receive":
                assert op["bindings"]["redis"]["x-consumer-group"] == service


def test_payload_schemas_accept_a_real_event_and_reject_a_bad_one() -> None:
    doc = asyncapi.document()
    schema = {
        "$ref": "#/components/schemas/StockReservedV1",
        "components": doc["components"],
    }
    good = {
        "order_id": str(uuid.uuid4()),
        "customer_id": "alice",
        "lines": [{"sku": "apple", "quantity": 2, "unit_price_cents": 150}],
        "total_cents": 300,
    }
    jsonschema.validate(good, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**good, "lines": [{"sku": "apple", "quantity": 0}]}, schema)


def test_saga_asyncapi_prints_the_whole_system() -> None:
    result = CliRunner().invoke(cli, ["asyncapi"], env={"STREAM_PARTITIONS": "4"})
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["channels"]["orders.events"]["x-partitioning"]["partitions"] == 4
    assert len(doc["components"]["messages"]) == len(EVENT_SCHEMAS)


# -- Mermaid -------------------------------------------------------------------------------------

_REPORT = {
    "order_id": "6f1c1b5e-0000-4000-8000-000000000001",
    "partition": 3,
    "events": [
        {
            "event_type": "OrderPlaced",
            "producer": "orders",
            "commit_to_publish_ms": 1.5,
            "deliveries": [
                {
                    "group": "inventory",
                    "handles": True,
                    "status": "processed",
                    "publish_to_processed_ms": 4.25,
                    "failed_attempts": None,
                },
                {
                    "group": "billing",
                    "handles": False,
                    "status": "not_handled",
                    "publish_to_processed_ms": None,
                    "failed_attempts": None,
                },
            ],
        },
        {
            "event_type": "PaymentDeclined",
            "producer": "billing",
            "commit_to_publish_ms": 2.0,
            "deliveries": [
                {
                    "group": "orders",
                    "handles": True,
                    "status": "processed",
                    "publish_to_processed_ms": 30.0,
                    "failed_attempts": None,
                },
                {
                    "group": "inventory",
                    "handles": True,
                    "status": "dead_lettered",
                    "publish_to_processed_ms": None,
                    "failed_attempts": 5,
                },
            ],
        },
        {
            "event_type": "StockReleased",
            "producer": "inventory",
            "commit_to_publish_ms": None,
            "deliveries": [
                {
                    "group": "orders",
                    "handles": True,
                    "status": "not_published",
                    "publish_to_processed_ms": None,
                    "failed_attempts": None,
                },
            ],
        },
        {
            "event_type": "OrderRejected",
            "producer": "orders",
            "commit_to_publish_ms": 3.0,
            "published_at": "2026-11-26T10:00:00.003+00:00",
            "deliveries": [],
        },
    ],
    "state": {"orders": {"status": "rejected"}, "inventory": None, "billing": None},
}


def test_diagrams_render_with_the_real_mermaid_parser() -> None:
    designed = designed_saga()
    traced = order_sequence_diagram(_REPORT)
    results = mermaid_parse([designed, traced, "sequenceDiagram\n    orders->>: broken\n"])
    assert results[0] == {"ok": True, "type": "sequence"}, results[0]
    assert results[1] == {"ok": True, "type": "sequence"}, results[1]
    assert not results[2]["ok"]  # the parser does catch a syntax error


def test_designed_saga_has_every_reaction_and_marks_compensations() -> None:
    text = designed_saga()
    for service, handled in reaction_table().items():
        for event_type in handled:
            producer = PRODUCER_OF_EVENT[event_type]
            assert any(
                line.strip().startswith(f"{producer}") and f"{service}: {event_type} v1" in line
                for line in text.splitlines()
            ), (service, event_type)
    assert "inventory-->>orders: StockReleased v1 (compensation)" in text
    assert "billing-->>orders: PaymentRefunded v1 (compensation)" in text


def test_order_saga_has_an_arrow_per_reaction_with_its_hop_latency() -> None:
    text = order_sequence_diagram(_REPORT)
    assert "orders ->> inventory: OrderPlaced (5.8 ms)" in text  # 1.5 + 4.25
    assert "billing ->> orders: PaymentDeclined (32 ms)" in text
    assert "billing -x inventory: PaymentDeclined DEAD-LETTERED" in text
    # a compensation: dashed, in a shaded block
    assert "rect rgba(254, 226, 226, 0.6)\n    inventory --) orders: StockReleased" in text
    assert "Note over orders: OrderRejected (no service reacts)" in text
    assert "billing: OrderPlaced" not in text  # not handled there: no arrow


def test_saga_diagram_prints_the_designed_saga() -> None:
    result = CliRunner().invoke(cli, ["diagram"])
    assert result.exit_code == 0, result.output
    assert result.output == designed_saga()


def test_the_readme_shows_the_current_designed_saga() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert f"```mermaid\n{designed_saga()}```" in readme
