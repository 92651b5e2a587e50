"""Event contracts: the envelope, one schema per event type and version, stream and group names.

Pure: no I/O. Producers validate before writing an outbox row, consumers before handling.
"""

from contracts.envelope import ENVELOPE_FIELDS, ContractError, Envelope, decode_entry, encode_entry
from contracts.events import EVENT_SCHEMAS, EVENT_TYPES, validate_payload
from contracts.streams import (
    BILLING_EVENTS,
    INVENTORY_EVENTS,
    ORDERS_EVENTS,
    STREAM_OF_PRODUCER,
    SUBSCRIPTIONS,
    dead_letter_stream,
    redrive_stream,
    relay_status_key,
)

__all__ = [
    "BILLING_EVENTS",
    "ENVELOPE_FIELDS",
    "EVENT_SCHEMAS",
    "EVENT_TYPES",
    "INVENTORY_EVENTS",
    "ORDERS_EVENTS",
    "STREAM_OF_PRODUCER",
    "SUBSCRIPTIONS",
    "ContractError",
    "Envelope",
    "dead_letter_stream",
    "decode_entry",
    "encode_entry",
    "redrive_stream",
    "relay_status_key",
    "validate_payload",
]
