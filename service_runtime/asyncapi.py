"""AsyncAPI 3.0 documents of the events, generated from `contracts/` and the reaction tables.

Nothing here is written by hand per event: the channels are the streams of
`contracts.STREAM_OF_PRODUCER` (with their partitioning), the messages are
`contracts.EVENT_SCHEMAS` (payload schemas converted by apispec's marshmallow plugin; the
envelope fields of `contracts.envelope` as headers), the send operations come from
`PRODUCER_OF_EVENT` and the receive operations from `SUBSCRIPTIONS` and each service's
`reactions.HANDLERS`.

`document()` is the whole system's (`saga asyncapi`); `document(service)` is one service's part,
served at `/asyncapi.json`: the channels it sends to or receives from, its operations, and the
messages and schemas they use.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin

from contracts import (
    DEFAULT_PARTITIONS,
    ENVELOPE_FIELDS,
    EVENT_SCHEMAS,
    OPTIONAL_ENVELOPE_FIELDS,
    PRODUCER_OF_EVENT,
    STREAM_OF_PRODUCER,
    SUBSCRIPTIONS,
)
from service_runtime.config import SERVICES

ASYNCAPI_VERSION = "3.0.0"
DOC_VERSION = "1.0.0"

PARTITION_RULE = (
    "partition_of(order_id, P) = CRC-32 (IEEE, as zlib) of the order id as lower-case UTF-8 "
    "text, modulo P"
)

_HEADER_SCHEMAS: dict[str, dict[str, Any]] = {
    "event_id": {"type": "string", "format": "uuid", "description": "Unique id of the event."},
    "event_type": {"type": "string", "description": "The event's type (the message name)."},
    "event_version": {
        "type": "string",
        "pattern": "^[0-9]+$",
        "description": "Version of the event type's payload schema (decimal text).",
    },
    "aggregate_type": {"type": "string", "description": "Always `order` in this system."},
    "aggregate_id": {
        "type": "string",
        "description": "The order id: the partitioning key of every stream.",
    },
    "correlation_id": {
        "type": "string",
        "format": "uuid",
        "description": "Shared by every event of one order's saga.",
    },
    "causation_id": {
        "type": "string",
        "description": "The event_id of the event whose handling emitted this one; empty "
        "when a request or a job did.",
    },
    "occurred_at": {
        "type": "string",
        "format": "date-time",
        "description": "When the producing transaction wrote the event (ISO-8601).",
    },
    "producer": {"type": "string", "description": "The producing service."},
    "traceparent": {
        "type": "string",
        "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
        "description": "W3C trace context of the work that published the event "
        "(OpenTelemetry); absent when tracing was off.",
    },
}


def message_key(event_type: str, version: int) -> str:
    return f"{event_type}.v{version}"


def handled_types(service: str) -> frozenset[str]:
    return frozenset(importlib.import_module(f"{service}_service.reactions").HANDLERS)


@cache
def _payload_schemas() -> dict[str, dict[str, Any]]:
    """JSON Schemas of every payload (and the nested schemas they refer to), by apispec."""
    spec = APISpec("events", DOC_VERSION, "3.0.3", plugins=[MarshmallowPlugin()])
    for (event_type, version), schema in EVENT_SCHEMAS.items():
        spec.components.schema(f"{event_type}V{version}", schema=type(schema))
    return spec.to_dict()["components"]["schemas"]


def _headers() -> dict[str, Any]:
    names = (*ENVELOPE_FIELDS, *OPTIONAL_ENVELOPE_FIELDS)
    return {
        "type": "object",
        "description": "The envelope: flat string fields of the stream entry beside `payload` "
        "(`redis-cli XRANGE` shows them all).",
        "required": [name for name in ENVELOPE_FIELDS if name != "payload"],
        "properties": {name: _HEADER_SCHEMAS[name] for name in names if name != "payload"},
    }


def _channel(stream: str, partitions: int) -> dict[str, Any]:
    producer = next(p for p, s in STREAM_OF_PRODUCER.items() if s == stream)
    events = sorted(
        (event_type, version)
        for event_type, version in EVENT_SCHEMAS
        if PRODUCER_OF_EVENT[event_type] == producer
    )
    return {
        "address": f"{stream}.{{partition}}",
        "title": stream,
        "summary": f"Events published by {producer}, in {partitions} partition streams.",
        "description": (
            f"A Redis stream per partition: `{stream}.{{p0}}` ... "
            f"`{stream}.{{p{partitions - 1}}}` (P = STREAM_PARTITIONS, {partitions} here; "
            "fixed for a deployment). An event goes to partition "
            f"`{PARTITION_RULE}`, so one order's events are in the same partition index "
            "of every stream, in order. `{pN}` is a Redis Cluster hash tag: a partition's "
            "streams share one slot. The payload is the entry's `payload` field (JSON text); "
            "the other fields are the headers."
        ),
        "parameters": {
            "partition": {
                "description": "The hash tag `{pN}`, N = partition_of(order_id, P) in 0..P-1.",
                "examples": ["{p0}", f"{{p{partitions - 1}}}"],
                "location": "$message.payload#/order_id",
            }
        },
        "messages": {
            message_key(t, v): {"$ref": f"#/components/messages/{message_key(t, v)}"}
            for t, v in events
        },
        "x-partitioning": {
            "partitions": partitions,
            "key": "order_id (the envelope's aggregate_id)",
            "rule": PARTITION_RULE,
            "stream": f"{stream}.{{p<N>}}",
        },
    }


def _message(event_type: str, version: int) -> dict[str, Any]:
    producer = PRODUCER_OF_EVENT[event_type]
    return {
        "name": event_type,
        "title": f"{event_type} v{version}",
        "summary": f"Published by {producer} on {STREAM_OF_PRODUCER[producer]}.",
        "contentType": "application/json",
        "headers": _headers(),
        "payload": {"$ref": f"#/components/schemas/{event_type}V{version}"},
        "x-event-version": version,
    }


def _operations(service: str) -> dict[str, Any]:
    ops: dict[str, Any] = {}
    stream = STREAM_OF_PRODUCER[service]
    sent = sorted((t, v) for t, v in EVENT_SCHEMAS if PRODUCER_OF_EVENT[t] == service)
    ops[f"{service}.send"] = {
        "action": "send",
        "channel": {"$ref": f"#/channels/{stream}"},
        "title": f"{service} publishes",
        "summary": f"{service}'s outbox relay publishes its committed outbox rows (XADD).",
        "messages": [
            {"$ref": f"#/channels/{stream}/messages/{message_key(t, v)}"} for t, v in sent
        ],
        "x-service": service,
    }
    handled = handled_types(service)
    for subscribed in SUBSCRIPTIONS[service]:
        received = sorted(
            (t, v)
            for t, v in EVENT_SCHEMAS
            if t in handled and STREAM_OF_PRODUCER[PRODUCER_OF_EVENT[t]] == subscribed
        )
        ops[f"{service}.receive.{subscribed}"] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{subscribed}"},
            "title": f"{service} reacts to {subscribed}",
            "summary": f"Consumer group `{service}` reads every partition of {subscribed}; "
            "the events it does not handle are acknowledged without effect.",
            "messages": [
                {"$ref": f"#/channels/{subscribed}/messages/{message_key(t, v)}"}
                for t, v in received
            ],
            "bindings": {
                "redis": {
                    "x-consumer-group": service,
                    "x-read": "XREADGROUP GROUP "
                    f"{service} <consumer> STREAMS {subscribed}.{{pN}} ... (one owner per "
                    "partition, a lease with fencing); XACK after the effects commit",
                    "x-group-start-id": "0",
                }
            },
            "x-service": service,
        }
    return ops


def document(service: str | None = None, partitions: int = DEFAULT_PARTITIONS) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of the system, or of one service's part."""
    services = [service] if service else list(SERVICES)
    operations: dict[str, Any] = {}
    for name in services:
        operations.update(_operations(name))
    streams = [s for s in STREAM_OF_PRODUCER.values() if _used(s, operations)]
    channels = {stream: _channel(stream, partitions) for stream in streams}
    keys = sorted(
        {ref["$ref"].rsplit("/", 1)[1] for op in operations.values() for ref in op["messages"]}
        | {key for ch in channels.values() for key in ch["messages"]}
    )
    messages = {}
    for key in keys:
        event_type, _, version = key.rpartition(".v")
        messages[key] = _message(event_type, int(version))
    all_schemas = _payload_schemas()
    wanted = _referenced({k: m["payload"] for k, m in messages.items()}, all_schemas)
    title = f"{service} service events" if service else "Order saga events"
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": title,
            "version": DOC_VERSION,
            "description": (
                "Choreographed order saga over Redis Streams, fed by transactional outboxes. "
                "Generated from `contracts/` (schemas, streams, producers, subscriptions) and "
                "the services' reaction tables. Delivery is at least once; every consumer "
                "deduplicates by event_id (inbox)."
            ),
        },
        "defaultContentType": "application/json",
        "servers": {
            "redis": {
                "host": "localhost:6379",
                "protocol": "redis",
                "description": "The deployment's REDIS_URL (a single Redis or any node of a "
                "Redis Cluster with REDIS_CLUSTER=1).",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages,
            "schemas": {name: all_schemas[name] for name in sorted(wanted)},
        },
    }


def _used(stream: str, operations: dict[str, Any]) -> bool:
    return any(op["channel"]["$ref"] == f"#/channels/{stream}" for op in operations.values())


def _referenced(roots: dict[str, Any], schemas: dict[str, Any]) -> set[str]:
    """Names of the component schemas reachable from `roots`."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/components/schemas/"):
                name = ref.rsplit("/", 1)[1]
                if name not in found:
                    found.add(name)
                    walk(schemas[name])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(roots)
    return found
