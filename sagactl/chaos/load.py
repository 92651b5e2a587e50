"""Load for the chaos run: clients that place and cancel orders the way careful real clients do.

A client that gets no answer, a timeout or a 5xx sends the very same request again with the
same Idempotency-Key until it gets an answer (or its patience runs out), so an order is never
placed twice and never silently dropped by the client.
"""

from __future__ import annotations

import heapq
import http.client
import json
import random
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


class GaveUp(Exception):
    """No definitive answer within the client's patience."""


# the bearer token every request carries (an operator's, from the run's development issuer:
# the load acts for every customer); set once the servers are up
AUTH_HEADERS: dict[str, str] = {}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def http_call(
    method: str, url: str, body: dict | None = None, headers: dict | None = None, timeout=10.0
) -> tuple[int, Any]:
    """(status, parsed JSON body or None); network failures raise NETWORK_ERRORS."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        url, data=data, method=method, headers={**AUTH_HEADERS, **(headers or {})}
    )
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, None


def call_with_retry(
    method: str,
    url: str,
    body: dict | None = None,
    headers: dict | None = None,
    patience: float = 120.0,
    on_retry: Callable[[str], None] = lambda _why: None,
) -> tuple[int, Any]:
    """Repeat the identical request on network errors and 5xx; any other answer is final."""
    deadline = time.monotonic() + patience
    delay = 0.1
    while True:
        try:
            status, payload = http_call(method, url, body, headers)
            if status < 500:
                return status, payload
            why = f"http_{status}"
        except NETWORK_ERRORS as err:
            why = "timeout" if "timed out" in str(err) else "connection"
        if time.monotonic() + delay > deadline:
            raise GaveUp(f"{method} {url}")
        on_retry(why)
        time.sleep(delay)
        delay = min(delay * 2, 2.0)


@dataclass(frozen=True)
class Catalogue:
    """The skus (with prices and stock) and customers (with balances) the load works on."""

    products: dict[str, tuple[int, int]]  # sku -> (price_cents, available)
    accounts: dict[str, int]  # customer -> balance_cents

    @classmethod
    def sized_for(cls, orders: int, rng: random.Random) -> Catalogue:
        """Stock and money for roughly two thirds of the demand: early orders confirm, later
        ones start to be rejected as skus and accounts run dry (cancellations give back)."""
        skus = max(4, orders // 40)
        customers = max(4, orders // 15)
        # an order has 2 lines of 2 units on average: 4 units, about 4 * 500 cents
        units_per_sku = 4 * orders / skus
        products = {
            f"sku-{n:03d}": (
                rng.randrange(100, 900, 10),
                int(units_per_sku * rng.uniform(0.4, 0.9)),
            )
            for n in range(skus)
        }
        money_per_customer = 2000 * orders / customers
        accounts = {
            f"customer-{n:03d}": int(money_per_customer * rng.uniform(0.4, 1.0))
            for n in range(customers)
        }
        return cls(products, accounts)

    def random_order(self, rng: random.Random) -> dict:
        """1-3 lines of 1-3 units; now and then an unknown sku or a customer with no account."""
        lines = rng.sample(sorted(self.products), k=min(rng.randint(1, 3), len(self.products)))
        if rng.random() < 0.01:
            lines[0] = "sku-unknown"
        customer = rng.choice(sorted(self.accounts))
        if rng.random() < 0.01:
            customer = "customer-without-account"
        return {
            "customer_id": customer,
            "items": [{"sku": sku, "quantity": rng.randint(1, 3)} for sku in lines],
        }


@dataclass
class LoadStats:
    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: Counter[str] = field(default_factory=Counter)
    acknowledged: list[str] = field(default_factory=list)  # order ids answered 201
    unexpected: list[str] = field(default_factory=list)  # answers a correct service never gives

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n


def seed(urls: dict[str, str], catalogue: Catalogue) -> None:
    for sku, (price, available) in catalogue.products.items():
        status, body = call_with_retry(
            "PUT",
            f"{urls['inventory']}/products/{sku}",
            {"name": sku, "price_cents": price, "available": available},
        )
        if status not in (200, 201):
            raise RuntimeError(f"PUT /products/{sku}: {status} {body}")
    for customer, balance in catalogue.accounts.items():
        status, body = call_with_retry(
            "PUT", f"{urls['billing']}/accounts/{customer}", {"balance_cents": balance}
        )
        if status not in (200, 201):
            raise RuntimeError(f"PUT /accounts/{customer}: {status} {body}")


class Client(threading.Thread):
    """Places `orders` orders at about one per `interval` seconds, cancels some a moment later."""

    def __init__(
        self,
        number: int,
        orders_url: str,
        catalogue: Catalogue,
        orders: int,
        interval: float,
        cancel_ratio: float,
        stats: LoadStats,
        seed_value: int,
        patience: float = 120.0,
    ) -> None:
        super().__init__(name=f"client-{number}", daemon=True)
        self.url = orders_url
        self.catalogue = catalogue
        self.orders = orders
        self.interval = interval
        self.cancel_ratio = cancel_ratio
        self.stats = stats
        self.rng = random.Random(seed_value)
        self.patience = patience
        self._cancels: list[tuple[float, str]] = []  # (due, order_id) heap

    def run(self) -> None:
        due = time.monotonic()
        for _ in range(self.orders):
            due += self.rng.expovariate(1 / self.interval) if self.interval > 0 else 0
            self._cancel_due(until=due)
            self._place()
        self._cancel_due(until=None)

    def _retry(self, why: str) -> None:
        self.stats.count(f"retry_after_{why}")

    def _place(self) -> None:
        body = self.catalogue.random_order(self.rng)
        key = str(uuid.uuid4())
        self.stats.count("place_attempted")
        try:
            status, reply = call_with_retry(
                "POST",
                f"{self.url}/orders",
                body,
                {"Idempotency-Key": key},
                self.patience,
                self._retry,
            )
        except GaveUp:
            self.stats.count("place_gave_up")
            return
        if status != 201:
            with self.stats.lock:
                self.stats.unexpected.append(f"POST /orders -> {status} {reply}")
            return
        with self.stats.lock:
            self.stats.acknowledged.append(reply["order_id"])
            self.stats.counts["placed"] += 1
        if self.rng.random() < self.cancel_ratio:
            # soon enough that some sagas are still in flight, late enough that some confirmed
            heapq.heappush(
                self._cancels, (time.monotonic() + self.rng.uniform(0, 3), reply["order_id"])
            )

    def _cancel_due(self, until: float | None) -> None:
        """Send the cancellations that fall due; sleep until `until` (None: until all are sent)."""
        while True:
            now = time.monotonic()
            if self._cancels and self._cancels[0][0] <= now:
                self._cancel(heapq.heappop(self._cancels)[1])
                continue
            if until is None and not self._cancels:
                return
            if until is not None and now >= until:
                return
            wake = min(t for t in (until, self._cancels[0][0] if self._cancels else None) if t)
            time.sleep(max(wake - now, 0))

    def _cancel(self, order_id: str) -> None:
        self.stats.count("cancel_requested")
        try:
            status, reply = call_with_retry(
                "POST",
                f"{self.url}/orders/{order_id}/cancel",
                None,
                None,
                self.patience,
                self._retry,
            )
        except GaveUp:
            self.stats.count("cancel_gave_up")
            return
        if status == 202:
            self.stats.count("cancel_accepted")
        elif status == 409:
            self.stats.count("cancel_refused")  # already rejected: nothing to cancel
        else:
            with self.stats.lock:
                self.stats.unexpected.append(f"POST /orders/{order_id}/cancel -> {status} {reply}")
