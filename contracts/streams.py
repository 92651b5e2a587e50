"""Stream and consumer-group names, and the partitioning of every stream (DESIGN.md §6a).

Each producer writes P partition streams. An event goes to partition `partition_of(order id)`,
the same index in every producer's streams, so one order's whole saga lives in one partition.
The streams of one partition share the Redis Cluster hash tag `{pN}`, so a consumer reads every
stream of a partition it owns with one XREADGROUP, on a cluster too. Names, for P = 8:

    orders.events.{p0} ... orders.events.{p7}        (and inventory.events, billing.events)
    inventory.redrive.{p3}                            re-driven dead letters of group inventory
"""

from __future__ import annotations

import zlib

ORDERS_EVENTS = "orders.events"
INVENTORY_EVENTS = "inventory.events"
BILLING_EVENTS = "billing.events"

STREAM_OF_PRODUCER = {
    "orders": ORDERS_EVENTS,
    "inventory": INVENTORY_EVENTS,
    "billing": BILLING_EVENTS,
}

# group (= service name) -> the event streams it reads (the base names; see partition_stream)
SUBSCRIPTIONS = {
    "orders": (INVENTORY_EVENTS, BILLING_EVENTS),
    "inventory": (ORDERS_EVENTS, BILLING_EVENTS),
    "billing": (ORDERS_EVENTS, INVENTORY_EVENTS),
}

DEFAULT_PARTITIONS = 8
MAX_PARTITIONS = 1024


def partition_of(order_id: str, partitions: int) -> int:
    """The partition of an order: CRC-32 (IEEE, as zlib, Java's CRC32, Go's crc32.ChecksumIEEE)
    of the id's UTF-8 text, modulo P. Stable across processes and languages, unlike hash()."""
    return zlib.crc32(order_id.strip().lower().encode()) % partitions


def partition_stream(base: str, partition: int) -> str:
    """`orders.events` + 3 -> `orders.events.{p3}`: the hash tag puts a partition in one slot."""
    return f"{base}.{{p{partition}}}"


def base_of(stream: str) -> str:
    """`orders.events.{p3}` -> `orders.events` (a name without a partition is returned as is)."""
    head, sep, tail = stream.rpartition(".{p")
    return head if sep and tail.endswith("}") else stream


def partition_index(stream: str) -> int | None:
    """`orders.events.{p3}` -> 3; None for a name without a partition."""
    _head, sep, tail = stream.rpartition(".{p")
    if sep and tail.endswith("}") and tail[:-1].isdigit():
        return int(tail[:-1])
    return None


def producer_streams(producer: str, partitions: int) -> list[str]:
    """Every partition stream a producer writes, in partition order."""
    return [partition_stream(STREAM_OF_PRODUCER[producer], p) for p in range(partitions)]


def event_streams(partitions: int) -> list[str]:
    """Every event stream of the deployment."""
    return [s for producer in STREAM_OF_PRODUCER for s in producer_streams(producer, partitions)]


def redrive_stream(group: str, partition: int) -> str:
    """Re-driven dead letters go here, read by the owner of the partition in the failing group."""
    return partition_stream(f"{group}.redrive", partition)


def group_streams(group: str, partition: int) -> tuple[str, ...]:
    """What the owner of one partition of a group reads, with one XREADGROUP: the subscribed
    event streams of that partition, then the group's re-drive stream of that partition."""
    return (
        *(partition_stream(base, partition) for base in SUBSCRIPTIONS[group]),
        redrive_stream(group, partition),
    )


def relay_status_key(producer: str) -> str:
    """A Redis hash the active relay keeps current: holder, active_since, published (a count;
    the time of the last publish is the outbox's own published_at)."""
    return f"saga:relay:{producer}"


# Which producer may publish each event type (DESIGN.md §3): an event of a type arriving on
# another producer's stream is dead-lettered, never handled.
PRODUCER_OF_EVENT = {
    "OrderPlaced": "orders",
    "OrderConfirmed": "orders",
    "OrderRejected": "orders",
    "OrderCancelled": "orders",
    "StockReserved": "inventory",
    "StockReservationFailed": "inventory",
    "StockReleased": "inventory",
    "PaymentCaptured": "billing",
    "PaymentDeclined": "billing",
    "PaymentRefunded": "billing",
}


def owner_fence_key(group: str, partition: int) -> str:
    """The Redis side of a partition lease: the epoch of the current owner. Reads and dead
    letters of the partition are fenced on it (same hash tag, so one slot with the streams)."""
    return partition_stream(f"saga:owner:{group}", partition)
