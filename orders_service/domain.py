"""Order rules, pure: the status machine and what identifies a request."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping

PENDING, CONFIRMED, REJECTED, CANCELLED = "pending", "confirmed", "rejected", "cancelled"
STATUSES = (PENDING, CONFIRMED, REJECTED, CANCELLED)

_ALLOWED = {
    PENDING: {CONFIRMED, REJECTED, CANCELLED},
    CONFIRMED: {CANCELLED},
    REJECTED: set(),
    CANCELLED: set(),
}


def can_move(current: str, target: str) -> bool:
    return target in _ALLOWED[current]


def duplicate_skus(items: Iterable[Mapping]) -> list[str]:
    seen: set[str] = set()
    duplicates: list[str] = []
    for item in items:
        if item["sku"] in seen and item["sku"] not in duplicates:
            duplicates.append(item["sku"])
        seen.add(item["sku"])
    return duplicates


def request_fingerprint(customer_id: str, items: Iterable[Mapping]) -> str:
    """Same customer and same lines (in the same order) -> same fingerprint."""
    canonical = json.dumps(
        {"customer_id": customer_id, "items": [[i["sku"], i["quantity"]] for i in items]},
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
