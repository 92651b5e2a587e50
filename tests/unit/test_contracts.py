"""Event contracts: every schema accepts a valid payload and refuses a broken one; the envelope
round-trips through its flat stream encoding; anything off-contract raises ContractError."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from contracts import (
    ENVELOPE_FIELDS,
    EVENT_SCHEMAS,
    STREAM_OF_PRODUCER,
    SUBSCRIPTIONS,
    ContractError,
    Envelope,
    base_of,
    decode_entry,
    encode_entry,
    group_streams,
    owner_fence_key,
    partition_index,
    partition_of,
    producer_streams,
    redrive_stream,
    validate_payload,
)

ORDER_ID = str(uuid.uuid4())
PAYMENT_ID = str(uuid.uuid4())

VALID = {
    "OrderPlaced": {
        "order_id": ORDER_ID,
        "customer_id": "alice",
        "items": [{"sku": "SKU-1", "quantity": 2}, {"sku": "SKU-2", "quantity": 1}],
    },
    "OrderConfirmed": {"order_id": ORDER_ID, "total_cents": 1250},
    "OrderRejected": {"order_id": ORDER_ID, "reason": "insufficient_stock"},
    "OrderCancelled": {"order_id": ORDER_ID, "reason": "payment_timeout"},
    "StockReserved": {
        "order_id": ORDER_ID,
        "customer_id": "alice",
        "lines": [{"sku": "SKU-1", "quantity": 2, "unit_price_cents": 500}],
        "total_cents": 1000,
    },
    "StockReservationFailed": {
        "order_id": ORDER_ID,
        "reason": "insufficient_stock",
        "shortages": [{"sku": "SKU-1", "requested": 5, "available": 0}],
    },
    "StockReleased": {"order_id": ORDER_ID, "lines": [{"sku": "SKU-1", "quantity": 2}]},
    "PaymentCaptured": {
        "order_id": ORDER_ID,
        "customer_id": "alice",
        "payment_id": PAYMENT_ID,
        "amount_cents": 1000,
    },
    "PaymentDeclined": {
        "order_id": ORDER_ID,
        "customer_id": "alice",
        "reason": "insufficient_funds",
    },
    "PaymentRefunded": {"order_id": ORDER_ID, "payment_id": PAYMENT_ID, "amount_cents": 1000},
}

# One broken example per event, each breaking a different rule where the schema has one.
BROKEN = {
    "OrderPlaced": {"order_id": ORDER_ID, "customer_id": "alice", "items": []},
    "OrderConfirmed": {"order_id": ORDER_ID, "total_cents": -1},
    "OrderRejected": {"order_id": ORDER_ID, "reason": ""},
    "OrderCancelled": {"order_id": ORDER_ID, "reason": "changed_my_mind"},
    "StockReserved": {
        "order_id": ORDER_ID,
        "customer_id": "alice",
        "lines": [{"sku": "SKU-1", "quantity": 0, "unit_price_cents": 500}],
        "total_cents": 0,
    },
    "StockReservationFailed": {
        "order_id": ORDER_ID,
        "reason": "out_of_luck",
        "shortages": [],
    },
    "StockReleased": {"order_id": "not-a-uuid", "lines": []},
    "PaymentCaptured": {
        "order_id": ORDER_ID,
        "customer_id": "alice",
        "payment_id": PAYMENT_ID,
        "amount_cents": "1000",  # strict integers: a numeric string is not cents
    },
    "PaymentDeclined": {"order_id": ORDER_ID, "reason": "insufficient_funds"},  # no customer
    "PaymentRefunded": {
        "order_id": ORDER_ID,
        "payment_id": PAYMENT_ID,
        "amount_cents": 1000,
        "currency": "EUR",  # unknown fields are refused
    },
}

EVENT_TYPES = sorted(VALID)


def test_every_registered_event_has_examples():
    assert {event for event, _version in EVENT_SCHEMAS} == set(VALID) == set(BROKEN)
    assert len(EVENT_SCHEMAS) == 10


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_valid_payload_passes(event_type):
    payload = VALID[event_type]
    assert validate_payload(event_type, 1, payload) is payload


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_broken_payload_fails(event_type):
    with pytest.raises(ContractError, match=event_type):
        validate_payload(event_type, 1, BROKEN[event_type])


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_missing_required_field_fails(event_type):
    payload = dict(VALID[event_type])
    del payload["order_id"]
    with pytest.raises(ContractError):
        validate_payload(event_type, 1, payload)


@pytest.mark.parametrize(
    "item",
    [
        {"sku": "", "quantity": 1},
        {"sku": "x" * 65, "quantity": 1},
        {"sku": "SKU-1", "quantity": 1.5},
        {"sku": "SKU-1", "quantity": True},
        {"sku": "SKU-1"},
    ],
)
def test_order_lines_are_checked_one_by_one(item):
    payload = {**VALID["OrderPlaced"], "items": [{"sku": "ok", "quantity": 1}, item]}
    with pytest.raises(ContractError):
        validate_payload("OrderPlaced", 1, payload)


def test_unknown_event_or_version_is_refused():
    with pytest.raises(ContractError, match="unknown event"):
        validate_payload("OrderShipped", 1, {"order_id": ORDER_ID})
    with pytest.raises(ContractError, match="unknown event"):
        validate_payload("OrderPlaced", 2, VALID["OrderPlaced"])


# -- envelope ---------------------------------------------------------------------------------


def make_envelope(event_type: str = "OrderPlaced", **changes) -> Envelope:
    envelope = Envelope(
        event_id=str(uuid.uuid4()),
        event_type=event_type,
        event_version=1,
        aggregate_type="order",
        aggregate_id=ORDER_ID,
        correlation_id=str(uuid.uuid4()),
        causation_id=str(uuid.uuid4()),
        occurred_at=datetime.now(UTC).isoformat(),
        producer="orders",
        payload=VALID[event_type],
    )
    return replace(envelope, **changes)


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_envelope_round_trip(event_type):
    envelope = make_envelope(event_type)
    fields = encode_entry(envelope)
    assert decode_entry(fields) == envelope


def test_encoded_fields_are_flat_readable_strings():
    envelope = make_envelope()
    fields = encode_entry(envelope)
    assert tuple(fields) == ENVELOPE_FIELDS
    assert all(isinstance(value, str) for value in fields.values())
    assert fields["event_version"] == "1"
    assert json.loads(fields["payload"]) == envelope.payload


def test_round_trip_without_causation():
    envelope = make_envelope(causation_id=None)
    fields = encode_entry(envelope)
    assert fields["causation_id"] == ""
    assert decode_entry(fields).causation_id is None


def test_decode_accepts_what_the_relay_writes():
    """The relay writes Postgres' text forms: event_version may arrive as an int-like string,
    occurred_at with a UTC offset, payload as jsonb text (with spaces)."""
    fields = encode_entry(make_envelope())
    fields["occurred_at"] = "2024-05-01 12:00:00.123456+00:00"
    fields["payload"] = json.dumps(VALID["OrderPlaced"])  # default separators
    decoded = decode_entry(fields)
    assert decoded.payload == VALID["OrderPlaced"]


def test_decode_normalises_uuid_spelling():
    event_id = uuid.uuid4()
    fields = encode_entry(make_envelope())
    fields["event_id"] = str(event_id).upper()
    assert decode_entry(fields).event_id == str(event_id)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"event_type": "OrderShipped"}, "unknown event"),
        ({"event_version": "2"}, "unknown event"),
        ({"event_version": "one"}, "event_version"),
        ({"payload": "{not json"}, "not JSON"),
        ({"payload": "[1, 2]"}, "not a JSON object"),
        ({"payload": json.dumps(BROKEN["OrderPlaced"])}, "invalid OrderPlaced"),
        ({"event_id": "42"}, "event_id is not a UUID"),
        ({"correlation_id": "not-a-uuid"}, "correlation_id is not a UUID"),
        ({"causation_id": "nope"}, "causation_id is not a UUID"),
        ({"occurred_at": "yesterday"}, "occurred_at"),
    ],
    ids=lambda value: str(value)[:40],
)
def test_decode_refuses_off_contract_entries(change, match):
    fields = {**encode_entry(make_envelope()), **change}
    with pytest.raises(ContractError, match=match):
        decode_entry(fields)


@pytest.mark.parametrize("missing", ENVELOPE_FIELDS)
def test_decode_refuses_missing_fields(missing):
    fields = encode_entry(make_envelope())
    del fields[missing]
    with pytest.raises(ContractError, match=f"missing envelope fields: {missing}"):
        decode_entry(fields)


def test_decode_of_an_empty_entry_names_every_missing_field():
    with pytest.raises(ContractError) as caught:
        decode_entry({})
    for name in ENVELOPE_FIELDS:
        assert name in str(caught.value)


def test_contract_error_is_a_value_error():
    assert issubclass(ContractError, ValueError)


# -- stream names -----------------------------------------------------------------------------


def test_every_group_reads_the_other_services_streams_only():
    for group, streams in SUBSCRIPTIONS.items():
        assert STREAM_OF_PRODUCER[group] not in streams
        assert set(streams) <= set(STREAM_OF_PRODUCER.values())


def test_redrive_streams_are_per_group_and_partition():
    assert redrive_stream("inventory", 3) == "inventory.redrive.{p3}"
    assert redrive_stream("orders", 1) != redrive_stream("billing", 1)


def test_partition_of_is_crc32_of_the_order_id_and_stable():
    # The same in any process or language: CRC-32/IEEE of the lower-case UTF-8 text.
    assert partition_of("3F2504E0-4F89-11D3-9A0C-0305E82C3301", 16) == partition_of(
        "3f2504e0-4f89-11d3-9a0c-0305e82c3301", 16
    )
    # 0xCBF43926 is CRC-32/IEEE's published check value for "123456789".
    assert partition_of("123456789", 1000) == 0xCBF43926 % 1000
    ids = [str(uuid.UUID(int=i * 7919)) for i in range(4000)]
    counts = [sum(partition_of(i, 8) == p for i in ids) for p in range(8)]
    assert min(counts) > 400  # spread: every partition gets its share


def test_one_partitions_streams_share_a_cluster_hash_tag():
    streams = group_streams("inventory", 5)
    assert streams == ("orders.events.{p5}", "billing.events.{p5}", "inventory.redrive.{p5}")
    tags = {s[s.index("{") + 1 : s.index("}")] for s in (*streams, owner_fence_key("inventory", 5))}
    assert tags == {"p5"}
    assert base_of("orders.events.{p5}") == "orders.events"
    assert partition_index("orders.events.{p5}") == 5
    assert partition_index("orders.events") is None
    assert producer_streams("billing", 2) == ["billing.events.{p0}", "billing.events.{p1}"]


def test_amounts_past_32_bits_and_up_to_the_bounds_are_in_contract():
    from contracts.limits import MAX_LINE_QUANTITY, MAX_ORDER_TOTAL_CENTS, MAX_PRICE_CENTS

    line = {"sku": "SKU-1", "quantity": MAX_LINE_QUANTITY, "unit_price_cents": MAX_PRICE_CENTS}
    reserved = {
        "order_id": ORDER_ID,
        "customer_id": "alice",
        "lines": [line] * 50,
        "total_cents": MAX_ORDER_TOTAL_CENTS,
    }
    assert validate_payload("StockReserved", 1, reserved) is reserved
    captured = {**VALID["PaymentCaptured"], "amount_cents": 3_000_000_000}
    assert validate_payload("PaymentCaptured", 1, captured) is captured


@pytest.mark.parametrize(
    ("event_type", "change"),
    [
        ("OrderPlaced", {"items": [{"sku": "S", "quantity": 1_000_001}]}),
        ("OrderConfirmed", {"total_cents": 5 * 10**17 + 1}),
        ("PaymentRefunded", {"amount_cents": 2**63}),
    ],
)
def test_amounts_past_the_bounds_are_off_contract(event_type, change):
    with pytest.raises(ContractError):
        validate_payload(event_type, 1, {**VALID[event_type], **change})


def test_the_readme_documents_the_bounds_in_force():
    from pathlib import Path

    from contracts import limits

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for bound in (
        limits.MAX_LINE_QUANTITY,
        limits.MAX_PRICE_CENTS,
        limits.MAX_STOCK,
        limits.MAX_BALANCE_CENTS,
    ):
        assert f"{bound:,}" in readme
