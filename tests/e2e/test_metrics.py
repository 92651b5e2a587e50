"""Every process exposes Prometheus metrics, and the counters match the work done."""

from __future__ import annotations

import uuid

import requests
from prometheus_client.parser import text_string_to_metric_families

from sagactl.processes import consumer_metrics_offset
from service_runtime.config import DEFAULT_CONSUMERS_PER_SERVICE
from tests.helpers import wait_until

SERVICES = ("orders", "inventory", "billing")


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    samples = {}
    for family in text_string_to_metric_families(requests.get(url, timeout=5).text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: dict, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and wanted <= lbls)


def test_counters_follow_the_work(system):
    urls = system.urls
    sku, customer = f"m-{uuid.uuid4().hex[:8]}", f"m-{uuid.uuid4().hex[:8]}"
    requests.put(
        f"{urls['inventory']}/products/{sku}",
        json={"name": sku, "price_cents": 100, "available": 100},
    )
    requests.put(f"{urls['billing']}/accounts/{customer}", json={"balance_cents": 100_000})

    def web(service):
        return scrape(f"{urls[service]}/metrics")

    def worker(offset):
        return scrape(f"http://127.0.0.1:{system.metrics_base + offset}/metrics")

    def consumers(of, name, **labels):
        """Summed over the consumer processes of service `of` (run-all starts several)."""
        return sum(
            total(worker(consumer_metrics_offset(of, i)), name, **labels)
            for i in range(1, DEFAULT_CONSUMERS_PER_SERVICE + 1)
        )

    placed_before = total(
        web("orders"), "saga_http_requests_total", method="POST", route="/orders", status="201"
    )
    written_before = total(
        web("orders"), "saga_outbox_events_written_total", event_type="OrderPlaced"
    )
    relay_before = total(worker(1), "saga_relay_published_total", service="orders")
    processed_before = consumers(
        "inventory",
        "saga_consumer_events_total",
        group="inventory",
        event_type="OrderPlaced",
        outcome="processed",
    )

    order_ids = []
    for _ in range(5):
        response = requests.post(
            f"{urls['orders']}/orders",
            json={"customer_id": customer, "items": [{"sku": sku, "quantity": 1}]},
        )
        order_ids.append(response.json()["order_id"])
    for order_id in order_ids:
        wait_until(
            lambda o=order_id: (
                requests.get(f"{urls['orders']}/orders/{o}").json()["status"] == "confirmed"
            ),
            timeout=30,
        )

    # Two gunicorn workers answer; multiprocess mode sums them, whichever one is scraped.
    assert (
        total(
            web("orders"), "saga_http_requests_total", method="POST", route="/orders", status="201"
        )
        - placed_before
        == 5
    )
    assert (
        total(web("orders"), "saga_outbox_events_written_total", event_type="OrderPlaced")
        - written_before
        == 5
    )
    assert total(web("orders"), "saga_http_request_seconds_count", route="/orders") >= 5
    wait_until(
        lambda: (
            total(worker(1), "saga_relay_published_total", service="orders") - relay_before >= 10
        )
    )  # OrderPlaced + OrderConfirmed per order
    assert total(worker(1), "saga_relay_commit_to_publish_seconds_count", service="orders") > 0
    wait_until(
        lambda: (
            consumers(
                "inventory",
                "saga_consumer_events_total",
                group="inventory",
                event_type="OrderPlaced",
                outcome="processed",
            )
            - processed_before
            == 5
        )
    )
    assert (
        consumers(
            "orders",
            "saga_consumer_events_total",
            group="orders",
            event_type="PaymentCaptured",
            outcome="processed",
        )
        >= 5
    )
    assert (
        consumers(
            "orders",
            "saga_outbox_events_written_total",
            service="orders",
            event_type="OrderConfirmed",
        )
        >= 5
    )
    assert consumers("orders", "saga_consumer_handler_seconds_count", group="orders") > 0
    for offset in (1, 2, 3):
        assert (
            "saga_relay_unpublished_rows",
            frozenset({("service", SERVICES[offset - 1])}),
        ) in worker(offset)
