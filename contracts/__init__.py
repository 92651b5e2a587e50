"""Event contracts: the envelope, one schema per event type and version, stream and group names.

Pure: no I/O. Producers validate before writing an outbox row, consumers before handling.
"""

from contracts.envelope import (
    ENVELOPE_FIELDS,
    OPTIONAL_ENVELOPE_FIELDS,
    ContractError,
    Envelope,
    decode_entry,
    encode_entry,
)
from contracts.events import EVENT_SCHEMAS, EVENT_TYPES, validate_payload
from contracts.streams import (
    BILLING_EVENTS,
    DEFAULT_PARTITIONS,
    INVENTORY_EVENTS,
    ORDERS_EVENTS,
    PRODUCER_OF_EVENT,
    STREAM_OF_PRODUCER,
    SUBSCRIPTIONS,
    base_of,
    event_streams,
    group_streams,
    owner_fence_key,
    partition_index,
    partition_of,
    partition_stream,
    producer_streams,
    redrive_stream,
    relay_status_key,
)

__all__ = [
    "BILLING_EVENTS",
    "DEFAULT_PARTITIONS",
    "ENVELOPE_FIELDS",
    "EVENT_SCHEMAS",
    "EVENT_TYPES",
    "INVENTORY_EVENTS",
    "OPTIONAL_ENVELOPE_FIELDS",
    "ORDERS_EVENTS",
    "PRODUCER_OF_EVENT",
    "STREAM_OF_PRODUCER",
    "SUBSCRIPTIONS",
    "ContractError",
    "Envelope",
    "base_of",
    "decode_entry",
    "encode_entry",
    "event_streams",
    "group_streams",
    "owner_fence_key",
    "partition_index",
    "partition_of",
    "partition_stream",
    "producer_streams",
    "redrive_stream",
    "relay_status_key",
    "validate_payload",
]
