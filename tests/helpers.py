"""Small helpers shared by the test suites (a module, not fixtures: import what you need)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str | Callable[[], str] | None = None,
) -> T:
    """Poll `predicate` until it returns something truthy; return that value.

    For things that happen eventually (a background thread, a relay takeover). The timeout is
    a generous bound against hanging, not a performance assertion. On timeout, raises
    AssertionError with `message` (a string, or a callable producing one from current state).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            name = getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(text or f"condition {name} not met within {timeout} s")
        time.sleep(interval)


def order_placed_payload(order_id: str | None = None, customer_id: str = "alice") -> dict[str, Any]:
    """A valid OrderPlaced v1 payload (a fresh order id unless one is given)."""
    return {
        "order_id": order_id or str(uuid.uuid4()),
        "customer_id": customer_id,
        "items": [{"sku": "SKU-1", "quantity": 1}],
    }


def stream_total(client: Any, base: str, partitions: int = 8) -> int:
    """Entries in all partition streams of `base` (e.g. "orders.events")."""
    from contracts import partition_stream

    return sum(client.xlen(partition_stream(base, p)) for p in range(partitions))


# A consumer's leases as they are when it stopped renewing them: the next owner takes each
# partition under a new epoch (unlike deleting the rows, which would start epochs again at 1).
EXPIRE_LEASES = (
    "UPDATE partition_leases SET expires_at = clock_timestamp() - interval '1 second'"
    " WHERE consumer_group = %s"
)
