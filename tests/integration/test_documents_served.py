"""The event documents as users reach them: each service's /asyncapi.json, and
`saga trace ORDER --mermaid` on a real saga (parsed by the real Mermaid parser)."""

from __future__ import annotations

import jsonschema
import pytest
from click.testing import CliRunner

from contracts import EVENT_SCHEMAS, PRODUCER_OF_EVENT
from sagactl.main import cli
from tests.node_tools import asyncapi_schema, mermaid_parse


@pytest.fixture
def cli_env(clean_state, monkeypatch, tmp_path):
    monkeypatch.setenv("SAGA_RUN_DIR", str(tmp_path))
    for key, value in clean_state.env.items():
        monkeypatch.setenv(key, value)
    return clean_state


def test_each_service_serves_its_asyncapi_part(shop) -> None:
    validator = jsonschema.Draft7Validator(asyncapi_schema("3.0.0"))
    seen: set[str] = set()
    for service, client in (
        ("orders", shop.orders),
        ("inventory", shop.inventory),
        ("billing", shop.billing),
    ):
        response = client.get("/asyncapi.json")
        assert response.status_code == 200
        doc = response.json
        assert [e.message for e in validator.iter_errors(doc)] == []
        sent = doc["operations"][f"{service}.send"]["messages"]
        assert {ref["$ref"].rsplit("/", 1)[1] for ref in sent} == {
            f"{t}.v{v}" for t, v in EVENT_SCHEMAS if PRODUCER_OF_EVENT[t] == service
        }
        seen |= set(doc["components"]["messages"])
    assert seen == {f"{t}.v{v}" for t, v in EVENT_SCHEMAS}


def test_trace_mermaid_renders_an_orders_saga(shop, cli_env) -> None:
    order_id = shop.place("alice", [("apple", 2)])
    shop.settle()
    result = CliRunner().invoke(cli, ["trace", order_id, "--mermaid"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert text.startswith("sequenceDiagram\n")
    for arrow in (
        "orders ->> inventory: OrderPlaced (",
        "inventory ->> billing: StockReserved (",
        "billing ->> orders: PaymentCaptured (",
    ):
        assert arrow in text, text
    assert "ms" in text
    (parsed,) = mermaid_parse([text])
    assert parsed == {"ok": True, "type": "sequence"}, (parsed, text)
