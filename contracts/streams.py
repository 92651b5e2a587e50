"""Stream and consumer-group names. A consumer group is named after the reacting service."""

ORDERS_EVENTS = "orders.events"
INVENTORY_EVENTS = "inventory.events"
BILLING_EVENTS = "billing.events"

STREAM_OF_PRODUCER = {
    "orders": ORDERS_EVENTS,
    "inventory": INVENTORY_EVENTS,
    "billing": BILLING_EVENTS,
}

# group (= service name) -> the streams it reads
SUBSCRIPTIONS = {
    "orders": (INVENTORY_EVENTS, BILLING_EVENTS),
    "inventory": (ORDERS_EVENTS, BILLING_EVENTS),
    "billing": (ORDERS_EVENTS, INVENTORY_EVENTS),
}


def dead_letter_stream(group: str) -> str:
    return f"{group}.dead-letters"


def redrive_stream(group: str) -> str:
    """Re-driven dead letters go here, read by the failing group only."""
    return f"{group}.redrive"


def relay_status_key(producer: str) -> str:
    """A Redis hash the active relay keeps current: holder, active_since, last_publish_at."""
    return f"saga:relay:{producer}"
