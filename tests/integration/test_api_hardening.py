"""The REST APIs against bad input and races (issue 9): 4xx JSON with field errors, never 500,
and ledgers that stay equal to the state they describe. Real PostgreSQL, Flask test clients."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

import psycopg
import pytest
from marshmallow import fields

from billing_service import storage as billing_storage
from contracts.limits import MAX_BALANCE_CENTS, MAX_LINE_QUANTITY, MAX_PRICE_CENTS, MAX_STOCK
from inventory_service import storage as inventory_storage
from service_runtime.api_fields import Text
from tests.helpers import wait_until

ORDER_OVER_QUANTITY = {
    "customer_id": "c1",
    "items": [{"sku": "s", "quantity": MAX_LINE_QUANTITY + 1}],
}
PRODUCT_OVER_PRICE = {"name": "n", "price_cents": MAX_PRICE_CENTS + 1, "available": 1}
PRODUCT_OVER_STOCK = {"name": "n", "price_cents": 1, "available": MAX_STOCK + 1}

# -- 1. concurrent creation books the ledger once ------------------------------------------------


def _waiting_on_a_lock(db_url: str) -> bool:
    with psycopg.connect(db_url, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0] > 0


def _race_with_open_creation(
    db_url: str, create_in_open_tx: Callable[[psycopg.Connection], None], request: Callable
):
    """Run `request` (a real API call) while another transaction has created the same row but
    not committed yet; returns the API's response once that transaction committed."""
    result: dict = {}
    with psycopg.connect(db_url, autocommit=True) as other:
        with other.transaction():
            create_in_open_tx(other)
            thread = threading.Thread(target=lambda: result.update(response=request()))
            thread.start()
            wait_until(lambda: _waiting_on_a_lock(db_url), message="the request never blocked")
        thread.join(30)
    assert not thread.is_alive()
    return result["response"]


def test_concurrent_account_creation_books_the_balance_once(saga):
    url = saga.db_urls["billing"]
    response = _race_with_open_creation(
        url,
        lambda conn: billing_storage.set_account(conn, "carol", 100),
        lambda: saga.billing.put("/accounts/carol", json={"balance_cents": 101}),
    )
    assert response.status_code == 200, response.json  # the other request created it
    with psycopg.connect(url) as conn:
        booked = conn.execute(
            "SELECT sum(delta_cents) FROM account_adjustments WHERE customer_id = 'carol'"
        ).fetchone()[0]
    assert booked == saga.balance("carol") == 101


def test_concurrent_product_creation_books_the_stock_once(saga):
    url = saga.db_urls["inventory"]
    response = _race_with_open_creation(
        url,
        lambda conn: inventory_storage.upsert_product(conn, "kiwi", "Kiwi", 10, 100),
        lambda: saga.inventory.put(
            "/products/kiwi", json={"name": "Kiwi", "price_cents": 10, "available": 101}
        ),
    )
    assert response.status_code == 200, response.json
    with psycopg.connect(url) as conn:
        booked = conn.execute(
            "SELECT sum(delta) FROM stock_adjustments WHERE sku = 'kiwi'"
        ).fetchone()[0]
    assert booked == saga.available("kiwi") == 101


# -- 2. money and quantities are 64-bit, bounded at the API ---------------------------------------


def test_an_order_past_32_bits_of_cents_is_confirmed(saga):
    saga.product("gold", available=20_000, price_cents=150_000)
    saga.account("dave", balance_cents=3_000_000_000)
    order_id = saga.place("dave", [("gold", 20_000)])
    saga.settle()
    order = saga.order(order_id)
    assert (order["status"], order["total_cents"]) == ("confirmed", 3_000_000_000)
    assert saga.reservation(order_id)["total_cents"] == 3_000_000_000
    assert saga.balance("dave") == 0
    assert saga.redis.xlen("inventory.dead-letters") == 0


@pytest.mark.parametrize(
    ("service", "path", "body", "field"),
    [
        ("orders", "/orders", ORDER_OVER_QUANTITY, ("items", "0", "quantity")),
        ("inventory", "/products/p1", PRODUCT_OVER_PRICE, ("price_cents",)),
        ("inventory", "/products/p1", PRODUCT_OVER_STOCK, ("available",)),
        ("billing", "/accounts/a1", {"balance_cents": MAX_BALANCE_CENTS + 1}, ("balance_cents",)),
    ],
)
def test_amounts_past_their_bound_are_422_naming_the_field(saga, service, path, body, field):
    client = getattr(saga, service)
    response = (client.post if service == "orders" else client.put)(path, json=body)
    assert response.status_code == 422, response.json
    errors = response.json["errors"]["json"]
    for key in field:
        errors = errors[int(key) if isinstance(errors, list) else key]
    assert errors


def test_restock_past_the_stock_bound_is_422_and_a_later_release_fits(saga):
    saga.product("bolt", available=MAX_STOCK - 10, price_cents=1)
    saga.account("erin", balance_cents=100)
    order_id = saga.place("erin", [("bolt", 5)])
    saga.settle()
    assert saga.order(order_id)["status"] == "confirmed"
    # available MAX-15, held 5: 10 more fit on hand, 11 do not
    over = saga.inventory.post("/products/bolt/restock", json={"quantity": 11})
    assert over.status_code == 422, over.json
    assert over.json["errors"]["json"]["quantity"]
    assert saga.inventory.post("/products/bolt/restock", json={"quantity": 10}).status_code == 200
    assert saga.available("bolt") == MAX_STOCK - 5
    too_much = saga.inventory.put(
        "/products/bolt", json={"name": "bolt", "price_cents": 1, "available": MAX_STOCK}
    )
    assert too_much.status_code == 422 and too_much.json["errors"]["json"]["available"]
    assert saga.orders.post(f"/orders/{order_id}/cancel").status_code == 202
    saga.settle()
    assert saga.reservation(order_id)["status"] == "released"
    assert saga.available("bolt") == MAX_STOCK
    assert saga.redis.xlen("inventory.dead-letters") == 0


def test_deposit_past_the_money_bound_is_422(saga):
    saga.account("fay", balance_cents=MAX_BALANCE_CENTS - 5)
    over = saga.billing.post("/accounts/fay/deposits", json={"amount_cents": 6})
    assert over.status_code == 422 and over.json["errors"]["json"]["amount_cents"]
    assert saga.billing.post("/accounts/fay/deposits", json={"amount_cents": 5}).status_code == 200
    assert saga.balance("fay") == MAX_BALANCE_CENTS


def test_captured_money_counts_towards_the_bound(saga):
    saga.product("pen", available=10, price_cents=100)
    saga.account("gus", balance_cents=1_000)
    order_id = saga.place("gus", [("pen", 3)])
    saga.settle()
    assert saga.payment(order_id)["status"] == "captured"  # 300 captured, balance 700
    over = saga.billing.put("/accounts/gus", json={"balance_cents": MAX_BALANCE_CENTS - 299})
    assert over.status_code == 422 and over.json["errors"]["json"]["balance_cents"]
    fits = saga.billing.put("/accounts/gus", json={"balance_cents": MAX_BALANCE_CENTS - 300})
    assert fits.status_code == 200
    assert saga.orders.post(f"/orders/{order_id}/cancel").status_code == 202
    saga.settle()
    assert saga.balance("gus") == MAX_BALANCE_CENTS  # the refund fits


# -- 3, 4, 8, 9: bad input is 4xx JSON naming what is wrong, never 500 --------------------------

WRITES = [  # (service, method, path, a valid body)
    ("orders", "post", "/orders", {"customer_id": "c1", "items": [{"sku": "s1", "quantity": 1}]}),
    ("inventory", "put", "/products/p1", {"name": "P", "price_cents": 1, "available": 1}),
    ("inventory", "post", "/products/p1/restock", {"quantity": 1}),
    ("billing", "put", "/accounts/a1", {"balance_cents": 1}),
    ("billing", "post", "/accounts/a1/deposits", {"amount_cents": 1}),
]


def _send(saga, service: str, method: str, path: str, **kwargs):
    return getattr(getattr(saga, service), method)(path, **kwargs)


def _is_error_json(response, status: int) -> None:
    assert response.status_code == status, (response.status_code, response.get_data()[:300])
    assert response.is_json
    assert {"code", "status", "message"} <= set(response.json)
    assert response.json["code"] == status


@pytest.mark.parametrize(("service", "method", "path", "_body"), WRITES)
def test_json_nested_a_thousand_deep_is_a_400(saga, service, method, path, _body):
    deep = "[" * 1000 + "]" * 1000
    response = _send(saga, service, method, path, data=deep, content_type="application/json")
    _is_error_json(response, 400)
    assert "nested" in response.json["message"]


@pytest.mark.parametrize("bad", ["nul\u0000here", "lone \ud800 surrogate"])
def test_a_string_postgresql_cannot_store_is_a_422_naming_the_field(saga, bad):
    body = json.dumps({"name": bad, "price_cents": 1, "available": 1}).encode()  # \\u escapes
    response = saga.inventory.put("/products/p1", data=body, content_type="application/json")
    _is_error_json(response, 422)
    assert response.json["errors"]["json"]["name"]
    assert saga.inventory.get("/products/p1").status_code == 404


def test_every_request_string_field_refuses_what_postgresql_cannot_store():
    """The same mistake elsewhere: every string a request schema reads is a Text field."""
    from billing_service import schemas as billing
    from inventory_service import schemas as inventory
    from orders_service import schemas as orders

    request_schemas = [
        orders.OrderIn,
        orders.OrderItem,
        orders.IdempotencyHeader,
        orders.OrderQuery,
        inventory.ProductIn,
        inventory.RestockIn,
        billing.AccountIn,
        billing.DepositIn,
    ]
    for schema in request_schemas:
        for name, field in schema().fields.items():
            if isinstance(field, fields.String):
                assert isinstance(field, Text), f"{schema.__name__}.{name}"


def test_a_405_says_which_methods_are_allowed(saga):
    response = saga.inventory.delete("/products/p1")
    _is_error_json(response, 405)
    assert set(response.headers["Allow"].replace(" ", "").split(",")) >= {"GET", "PUT"}


@pytest.mark.parametrize(("service", "method", "path", "body"), WRITES)
@pytest.mark.parametrize("content_type", [None, "text/plain"])
def test_a_json_body_without_its_content_type_is_a_415(
    saga, service, method, path, body, content_type
):
    response = _send(saga, service, method, path, data=json.dumps(body), content_type=content_type)
    _is_error_json(response, 415)
    assert str(content_type or "none") in response.json["message"]
    assert "application/json" in response.json["message"]
