"""The envelope every event travels in, and its flat encoding as Redis stream fields."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from contracts.errors import ContractError
from contracts.events import validate_payload
from contracts.ids import canonical_uuid

ENVELOPE_FIELDS = (
    "event_id",
    "event_type",
    "event_version",
    "aggregate_type",
    "aggregate_id",
    "correlation_id",
    "causation_id",
    "occurred_at",
    "producer",
    "payload",
)
# Optional fields: absent from entries published without them (older relays, tracing off).
# traceparent: the W3C trace context of the work that published the event (DESIGN.md §5).
OPTIONAL_ENVELOPE_FIELDS = ("traceparent",)


@dataclass(frozen=True)
class Envelope:
    event_id: str
    event_type: str
    event_version: int
    aggregate_type: str
    aggregate_id: str
    correlation_id: str
    causation_id: str | None
    occurred_at: str
    producer: str
    payload: dict[str, Any]
    traceparent: str | None = None


def encode_entry(envelope: Envelope) -> dict[str, str]:
    """Flat string fields, readable with `redis-cli XRANGE`."""
    return {
        "event_id": envelope.event_id,
        "event_type": envelope.event_type,
        "event_version": str(envelope.event_version),
        "aggregate_type": envelope.aggregate_type,
        "aggregate_id": envelope.aggregate_id,
        "correlation_id": envelope.correlation_id,
        "causation_id": envelope.causation_id or "",
        "occurred_at": envelope.occurred_at,
        "producer": envelope.producer,
        "payload": json.dumps(envelope.payload, separators=(",", ":"), sort_keys=True),
        **({"traceparent": envelope.traceparent} if envelope.traceparent else {}),
    }


def _uuid(value: str, name: str) -> str:
    try:
        return canonical_uuid(value)
    except (ValueError, AttributeError, TypeError) as err:
        raise ContractError(f"{name} is not a UUID: {value!r}") from err


def decode_entry(fields: dict[str, str]) -> Envelope:
    """Parse and validate stream fields into an Envelope (payload checked against its schema)."""
    missing = [name for name in ENVELOPE_FIELDS if name not in fields]
    if missing:
        raise ContractError(f"missing envelope fields: {', '.join(missing)}")
    try:
        version = int(fields["event_version"])
    except ValueError as err:
        raise ContractError(
            f"event_version is not an integer: {fields['event_version']!r}"
        ) from err
    try:
        datetime.fromisoformat(fields["occurred_at"])
    except ValueError as err:
        raise ContractError(f"occurred_at is not ISO-8601: {fields['occurred_at']!r}") from err
    try:
        payload = json.loads(fields["payload"])
    except json.JSONDecodeError as err:
        raise ContractError(f"payload is not JSON: {err}") from err
    if not isinstance(payload, dict):
        raise ContractError("payload is not a JSON object")
    validate_payload(fields["event_type"], version, payload)
    causation = fields["causation_id"]
    return Envelope(
        event_id=_uuid(fields["event_id"], "event_id"),
        event_type=fields["event_type"],
        event_version=version,
        aggregate_type=fields["aggregate_type"],
        aggregate_id=fields["aggregate_id"],
        correlation_id=_uuid(fields["correlation_id"], "correlation_id"),
        causation_id=_uuid(causation, "causation_id") if causation else None,
        occurred_at=fields["occurred_at"],
        producer=fields["producer"],
        payload=payload,
        traceparent=fields.get("traceparent") or None,
    )
