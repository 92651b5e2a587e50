"""Drives the three services in one process, step by step, against real PostgreSQL and Redis.

The relays and consumers are the real ones, called one step at a time, so a test can hold
back one hop (say, inventory's outbox) and let another run first: that is how the races of
DESIGN.md §3 are staged deterministically.
"""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Iterable

import psycopg
import redis

from billing_service.app import create_app as billing_app
from contracts import DEFAULT_PARTITIONS
from inventory_service.app import create_app as inventory_app
from orders_service.app import create_app as orders_app
from outbox_relay.publisher import publish_batch
from service_runtime.consumer import ConsumerSettings, PartitionWorker
from service_runtime.db import create_pool
from service_runtime.ownership import assignment
from tests.helpers import EXPIRE_LEASES
from tests.partition_steps import drain, own_partitions
from tests.tokens import authorize

SERVICES = ("orders", "inventory", "billing")


class SagaDriver:
    def __init__(
        self, db_urls: dict[str, str], redis_client: redis.Redis, payment_timeout_s: int = 30
    ) -> None:
        self.partitions = DEFAULT_PARTITIONS  # as the spawned `saga` processes use
        self.db_urls = db_urls
        self.redis = redis_client
        self.pools = {s: create_pool(db_urls[s], name=f"test-{s}", max_size=6) for s in SERVICES}
        config = {"TESTING": True, "PAYMENT_TIMEOUT_SECONDS": payment_timeout_s}
        # an operator's token on every request: the saga tests act for every customer
        self.orders = authorize(orders_app(self.pools["orders"], config).test_client())
        self.inventory = authorize(inventory_app(self.pools["inventory"], config).test_client())
        self.billing = authorize(billing_app(self.pools["billing"], config).test_client())
        self.outcomes = {s: Counter() for s in SERVICES}  # per service: outcome -> entries
        self.consumers = {s: self.consumer(s, f"{s}-1") for s in SERVICES}

    def consumer(
        self,
        service: str,
        name: str,
        batch_size: int = 100,
        partitions: Iterable[int] | None = None,
    ) -> list[PartitionWorker]:
        """The workers of one consumer of SERVICE's group owning `partitions` (all)."""
        handlers = importlib.import_module(f"{service}_service.reactions").HANDLERS
        settings = ConsumerSettings(
            group=service, consumer=name, partitions=self.partitions, batch_size=batch_size
        )

        def count(_event_type: str, outcome: str, _seconds: float) -> None:
            self.outcomes[service][outcome] += 1

        return own_partitions(
            self.redis, self.pools[service], settings, handlers, partitions, on_outcome=count
        )

    def release(self, service: str) -> None:
        """Hand SERVICE's partitions back (for a real `saga consume` process to take them);
        deliver() then does nothing for SERVICE."""
        with self.pools[service].connection() as conn:
            conn.execute(EXPIRE_LEASES, (service,))
        self.consumers[service] = []

    def split(
        self,
        service: str,
        count: int,
        batch_size: int = 100,
        plan: list[set[int]] | None = None,
    ) -> list[list[PartitionWorker]]:
        """Replace SERVICE's one consumer by `count` consumers sharing the partitions as live
        members do (service_runtime.ownership.assignment), or as `plan` says (one set of
        partitions per consumer); returns each one's workers."""
        with self.pools[service].connection() as conn:
            conn.execute(EXPIRE_LEASES, (service,))  # new owners, new epochs
        names = [f"{service}-{i}" for i in range(count)]
        if plan is None:
            plan = [assignment(names, self.partitions, name) for name in names]
        consumers = [
            self.consumer(service, name, batch_size, partitions)
            for name, partitions in zip(names, plan, strict=True)
        ]
        self.consumers[service] = [worker for workers in consumers for worker in workers]
        return consumers

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()

    # -- single hops -----------------------------------------------------------------------

    def publish(self, service: str) -> int:
        """Run service's relay until its outbox is empty."""
        total = 0
        with psycopg.connect(self.db_urls[service], autocommit=True) as conn:
            while sent := publish_batch(
                conn,
                self.redis,
                producer=service,
                partitions=self.partitions,
                batch_size=100,
            ):
                total += sent
        return total

    def deliver(self, service: str) -> int:
        """Let service's consumer handle everything new on its streams."""
        return drain(self.consumers[service])

    def settle(self, max_rounds: int = 20) -> None:
        """Publish and deliver everywhere until nothing moves."""
        for _ in range(max_rounds):
            moved = sum(self.publish(s) for s in SERVICES) + sum(self.deliver(s) for s in SERVICES)
            if not moved:
                return
        raise AssertionError("the saga did not settle")

    # -- REST shortcuts --------------------------------------------------------------------

    def product(self, sku: str, available: int, price_cents: int = 100) -> None:
        response = self.inventory.put(
            f"/products/{sku}",
            json={"name": sku, "price_cents": price_cents, "available": available},
        )
        assert response.status_code in (200, 201), response.json

    def account(self, customer_id: str, balance_cents: int) -> None:
        response = self.billing.put(
            f"/accounts/{customer_id}", json={"balance_cents": balance_cents}
        )
        assert response.status_code in (200, 201), response.json

    def place(self, customer_id: str, items: list[tuple[str, int]]) -> str:
        response = self.orders.post(
            "/orders",
            json={
                "customer_id": customer_id,
                "items": [{"sku": sku, "quantity": qty} for sku, qty in items],
            },
        )
        assert response.status_code == 201, response.json
        return response.json["order_id"]

    def order(self, order_id: str) -> dict:
        return self.orders.get(f"/orders/{order_id}").json

    def available(self, sku: str) -> int:
        return self.inventory.get(f"/products/{sku}").json["available"]

    def balance(self, customer_id: str) -> int:
        return self.billing.get(f"/accounts/{customer_id}").json["balance_cents"]

    def payment(self, order_id: str) -> dict | None:
        response = self.billing.get(f"/payments/{order_id}")
        return response.json if response.status_code == 200 else None

    def reservation(self, order_id: str) -> dict | None:
        response = self.inventory.get(f"/reservations/{order_id}")
        return response.json if response.status_code == 200 else None
