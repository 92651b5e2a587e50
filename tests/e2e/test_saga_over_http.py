"""The saga end to end: real processes, driven over HTTP, checked through REST and the streams."""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
import requests

from contracts import DEFAULT_PARTITIONS, partition_of, partition_stream
from tests.helpers import wait_until

TERMINAL = {"confirmed", "rejected", "cancelled"}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def api(system):
    class Api:
        def __init__(self) -> None:
            self.urls = system.urls

        def put_product(self, sku: str, available: int, price_cents: int = 250) -> None:
            r = requests.put(
                f"{self.urls['inventory']}/products/{sku}",
                json={"name": sku, "price_cents": price_cents, "available": available},
            )
            assert r.status_code == 201, r.text

        def put_account(self, customer: str, balance_cents: int) -> None:
            r = requests.put(
                f"{self.urls['billing']}/accounts/{customer}", json={"balance_cents": balance_cents}
            )
            assert r.status_code == 201, r.text

        def place(self, customer: str, items: list[tuple[str, int]], key: str | None = None):
            headers = {"Idempotency-Key": key} if key else {}
            return requests.post(
                f"{self.urls['orders']}/orders",
                headers=headers,
                json={
                    "customer_id": customer,
                    "items": [{"sku": sku, "quantity": qty} for sku, qty in items],
                },
            )

        def order(self, order_id: str) -> dict:
            return requests.get(f"{self.urls['orders']}/orders/{order_id}").json()

        def final(self, order_id: str, status: str | None = None) -> dict:
            def settled():
                order = self.order(order_id)
                done = order["status"] in TERMINAL if status is None else order["status"] == status
                return order if done else None

            return wait_until(
                settled, timeout=30, message=lambda: f"{self.order(order_id)}\n{system.log_tail()}"
            )

        def available(self, sku: str) -> int:
            return requests.get(f"{self.urls['inventory']}/products/{sku}").json()["available"]

        def balance(self, customer: str) -> int:
            return requests.get(f"{self.urls['billing']}/accounts/{customer}").json()[
                "balance_cents"
            ]

        def payment(self, order_id: str) -> dict | None:
            r = requests.get(f"{self.urls['billing']}/payments/{order_id}")
            return r.json() if r.status_code == 200 else None

    return Api()


@pytest.fixture
def shop(api):
    sku, customer = unique("sku"), unique("cust")
    api.put_product(sku, available=10, price_cents=250)
    api.put_account(customer, balance_cents=10_000)
    return api, sku, customer


def events_of(system, stream: str, order_id: str) -> list[dict]:
    """The order's events on its partition of `stream` (e.g. "orders.events")."""
    partitioned = partition_stream(stream, partition_of(order_id, DEFAULT_PARTITIONS))
    return [
        fields
        for _id, fields in system.redis().xrange(partitioned)
        if fields["aggregate_id"] == order_id
    ]


def test_happy_path_confirms_and_every_hop_is_on_the_streams(system, shop):
    api, sku, customer = shop
    response = api.place(customer, [(sku, 2)])
    assert response.status_code == 201
    order_id = response.json()["order_id"]
    assert response.headers["Location"].endswith(f"/orders/{order_id}")
    order = api.final(order_id)
    assert (order["status"], order["total_cents"]) == ("confirmed", 500)
    assert api.available(sku) == 8
    assert api.balance(customer) == 9_500
    assert api.payment(order_id)["status"] == "captured"

    wait_until(
        lambda: (
            events_of(system, "orders.events", order_id)[-1:]
            and events_of(system, "orders.events", order_id)[-1]["event_type"] == "OrderConfirmed"
        )
    )
    placed = events_of(system, "orders.events", order_id)[0]
    assert placed["event_type"] == "OrderPlaced"
    assert placed["producer"] == "orders"
    assert placed["correlation_id"] == order_id
    assert json.loads(placed["payload"])["items"] == [{"sku": sku, "quantity": 2}]
    reserved = events_of(system, "inventory.events", order_id)[0]
    assert reserved["event_type"] == "StockReserved"
    assert reserved["causation_id"] == placed["event_id"]
    captured = events_of(system, "billing.events", order_id)[0]
    assert captured["event_type"] == "PaymentCaptured"
    assert captured["causation_id"] == reserved["event_id"]


@pytest.mark.parametrize(
    "case", ["unknown_sku", "insufficient_stock", "insufficient_funds", "unknown_account"]
)
def test_each_rejection(system, api, case):
    sku, customer = unique("sku"), unique("cust")
    api.put_product(sku, available=1, price_cents=1_000)
    api.put_account(customer, balance_cents=500 if case == "insufficient_funds" else 5_000)
    items = {"unknown_sku": [(unique("ghost"), 1)], "insufficient_stock": [(sku, 2)]}.get(
        case, [(sku, 1)]
    )
    order_id = api.place(unique("nobody") if case == "unknown_account" else customer, items).json()[
        "order_id"
    ]
    order = api.final(order_id)
    assert (order["status"], order["reason"]) == ("rejected", case)
    wait_until(lambda: api.available(sku) == 1)  # a declined payment's stock comes back
    if case != "unknown_account":
        assert api.balance(customer) == (500 if case == "insufficient_funds" else 5_000)


def test_cancel_after_confirmation_refunds_and_releases(shop):
    api, sku, customer = shop
    order_id = api.place(customer, [(sku, 3)]).json()["order_id"]
    api.final(order_id, "confirmed")
    response = requests.post(f"{api.urls['orders']}/orders/{order_id}/cancel")
    assert response.status_code == 202
    assert response.json()["status"] == "cancelled"
    wait_until(
        lambda: (
            {"StockReleased", "PaymentRefunded"}
            <= {h.get("event") for h in api.order(order_id)["history"]}
        ),
        timeout=30,
    )
    assert api.available(sku) == 10
    assert api.balance(customer) == 10_000
    assert api.payment(order_id)["status"] == "refunded"


def test_cancel_in_flight_ends_with_nothing_held_or_charged(shop):
    api, sku, customer = shop
    order_id = api.place(customer, [(sku, 1)]).json()["order_id"]
    assert requests.post(f"{api.urls['orders']}/orders/{order_id}/cancel").status_code == 202
    assert api.final(order_id)["status"] == "cancelled"
    wait_until(lambda: api.available(sku) == 10 and api.balance(customer) == 10_000, timeout=30)


def test_rejected_order_cannot_be_cancelled(shop):
    api, sku, customer = shop
    order_id = api.place(customer, [(sku, 999)]).json()["order_id"]
    api.final(order_id, "rejected")
    response = requests.post(f"{api.urls['orders']}/orders/{order_id}/cancel")
    assert response.status_code == 409
    assert response.json()["code"] == 409


def test_idempotency_key_replays_and_conflicts(shop):
    api, sku, customer = shop
    key = unique("key")
    first = api.place(customer, [(sku, 1)], key=key)
    again = api.place(customer, [(sku, 1)], key=key)
    assert first.status_code == again.status_code == 201
    assert again.json()["order_id"] == first.json()["order_id"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    other = api.place(customer, [(sku, 2)], key=key)
    assert other.status_code == 422
    assert "Idempotency-Key" in other.json()["errors"]["headers"]
    api.final(first.json()["order_id"], "confirmed")
    assert api.available(sku) == 9  # one order, not two


def test_two_buyers_for_the_last_unit(api):
    sku, alice, bob = unique("last"), unique("alice"), unique("bob")
    api.put_product(sku, available=1)
    api.put_account(alice, 10_000)
    api.put_account(bob, 10_000)
    with ThreadPoolExecutor(2) as pool:
        responses = list(pool.map(lambda c: api.place(c, [(sku, 1)]), [alice, bob]))
    statuses = sorted(api.final(r.json()["order_id"])["status"] for r in responses)
    assert statuses == ["confirmed", "rejected"]
    assert api.available(sku) == 0


def test_payment_deadline_is_swept_by_the_rq_worker(system, api):
    # An order whose OrderPlaced never reaches anyone stays pending until its deadline.
    order_id = str(uuid.uuid4())
    with psycopg.connect(system.db_urls["orders"], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO orders (order_id, customer_id, status, payment_deadline) "
            "VALUES (%s, 'late-payer', 'pending', now() - interval '1 second')",
            (order_id,),
        )
        conn.execute("INSERT INTO order_lines VALUES (%s, 1, 'x', 1)", (order_id,))
    order = api.final(order_id)
    assert (order["status"], order["reason"]) == ("cancelled", "payment_timeout")
    wait_until(
        lambda: any(
            e["event_type"] == "OrderCancelled"
            for e in events_of(system, "orders.events", order_id)
        )
    )
    # The sweeps ran in the rq worker (a SimpleWorker); `saga worker` serves their metrics.
    worker_metrics = requests.get(f"http://127.0.0.1:{system.metrics_base + 21}/metrics").text
    assert 'saga_jobs_total{job="sweep_payment_deadlines"}' in worker_metrics


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"customer_id": "c", "items": []},
        {"customer_id": "c", "items": [{"sku": "a", "quantity": 0}]},
        {"customer_id": "c", "items": [{"sku": "a", "quantity": "1"}]},
        {"customer_id": "c", "items": [{"sku": "a", "quantity": 1}] * 2},
        {"customer_id": "c", "items": [{"sku": f"s{i}", "quantity": 1} for i in range(51)]},
        {"customer_id": "", "items": [{"sku": "a", "quantity": 1}]},
        {"customer_id": "c", "items": [{"sku": "a", "quantity": 1}], "extra": True},
    ],
)
def test_bad_order_bodies_get_field_errors_and_write_nothing(system, api, body):
    before = requests.get(f"{api.urls['orders']}/orders").headers.get("X-Pagination")
    response = requests.post(f"{api.urls['orders']}/orders", json=body)
    assert response.status_code == 422
    payload = response.json()
    assert payload["code"] == 422 and payload["message"] and payload["errors"]["json"]
    assert requests.get(f"{api.urls['orders']}/orders").headers.get("X-Pagination") == before


@pytest.mark.parametrize(
    "method,service,path,body,status",
    [
        ("get", "orders", "/orders/not-a-uuid", None, 422),
        ("get", "orders", f"/orders/{uuid.uuid4()}", None, 404),
        ("delete", "orders", "/orders", None, 405),
        ("get", "orders", "/orders?status=lost", None, 422),
        ("put", "inventory", "/products/x", {"name": "x", "price_cents": -1, "available": 1}, 422),
        ("post", "inventory", "/products/none/restock", {"quantity": 1}, 404),
        ("put", "billing", "/accounts/a", {"balance_cents": "lots"}, 422),
        ("post", "billing", "/accounts/a/deposits", {"amount_cents": 0}, 422),
        ("get", "billing", f"/payments/{uuid.uuid4()}", None, 404),
    ],
)
def test_errors_are_json(api, method, service, path, body, status):
    response = getattr(requests, method)(f"{api.urls[service]}{path}", json=body)
    assert response.status_code == status
    assert response.json()["code"] == status and response.json()["message"]


def test_oversized_body_is_413(api):
    response = requests.post(
        f"{api.urls['orders']}/orders",
        data="x" * 300_000,
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert response.json()["code"] == 413


def test_health_ready_openapi_and_swagger(api):
    for url in api.urls.values():
        assert requests.get(f"{url}/health").json()["status"] == "ok"
        assert requests.get(f"{url}/ready").json()["status"] == "ready"
        spec = requests.get(f"{url}/openapi.json").json()
        assert spec["openapi"].startswith("3.")
        page = requests.get(f"{url}/swagger-ui").text
        assert "/swagger-ui-assets/swagger-ui-bundle.js" in page  # served locally, no CDN
        asset = requests.get(f"{url}/swagger-ui-assets/swagger-ui-bundle.js")
        assert asset.status_code == 200 and "SwaggerUIBundle" in asset.text


def test_listing_filters_and_paginates(shop):
    api, sku, customer = shop
    ids = [api.place(customer, [(sku, 1)]).json()["order_id"] for _ in range(3)]
    for order_id in ids:
        api.final(order_id)
    page = requests.get(
        f"{api.urls['orders']}/orders", params={"customer_id": customer, "page_size": 2, "page": 1}
    )
    assert page.status_code == 200
    assert len(page.json()) == 2
    assert json.loads(page.headers["X-Pagination"])["total"] == 3
    confirmed = requests.get(
        f"{api.urls['orders']}/orders", params={"customer_id": customer, "status": "confirmed"}
    ).json()
    assert {o["order_id"] for o in confirmed} == set(ids)


def test_consumer_groups_exist_and_drain(system, shop):
    api, sku, customer = shop
    api.final(api.place(customer, [(sku, 1)]).json()["order_id"], "confirmed")
    client = system.redis()
    expected = {
        "orders.events": {"inventory", "billing"},
        "inventory.events": {"orders", "billing"},
        "billing.events": {"orders", "inventory"},
    }
    for base, groups in expected.items():
        for partition in range(DEFAULT_PARTITIONS):
            stream = partition_stream(base, partition)
            wait_until(lambda s=stream: all(g["pending"] == 0 for g in client.xinfo_groups(s)))
            assert {g["name"] for g in client.xinfo_groups(stream)} == groups


@pytest.mark.parametrize("service,path", [("orders", "/orders"), ("inventory", "/products")])
def test_a_page_far_past_the_end_is_empty_not_an_error(api, service, path):
    response = requests.get(f"{api.urls[service]}{path}", params={"page": 10**19})
    assert response.status_code == 200
    assert response.json() == []
