"""Who may call what (issue 13, DESIGN.md §9): bearer JWTs verified with the issuer's public key;
a customer reaches only its own orders, account and payments (others' answer 404), an operator
everything; 401 with a Bearer challenge, 403 without the scope."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import jwt
import psycopg
import pytest

from devstack import issuer
from service_runtime.auth import ADMIN, CUSTOMER, DEFAULT_AUDIENCE
from tests import tokens
from tests.tokens import bearer


def _as(token: str) -> dict[str, str]:
    return bearer(token)


@pytest.fixture
def placed(shop):
    """alice's confirmed order (apples 2), and bob with an account of his own."""
    shop.account("bob", balance_cents=500)
    order_id = shop.place("alice", [("apple", 2)])
    shop.settle()
    assert shop.order(order_id)["status"] == "confirmed"
    return shop, order_id


def _foreign_issuer_token(subject: str, scope: str) -> str:
    with tempfile.TemporaryDirectory() as other:
        issuer.ensure_key_pair(other)
        return issuer.sign(issuer.private_key_file(other).read_bytes(), subject, (scope,))


# -- 401 ---------------------------------------------------------------------------------------


def test_no_token_is_401_with_a_bearer_challenge(placed):
    shop, order_id = placed
    anonymous = shop.orders.application.test_client()
    response = anonymous.get(f"/orders/{order_id}")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="saga"'
    assert response.json["code"] == 401 and response.json["message"]
    # a scheme other than Bearer is no bearer credential either
    basic = anonymous.get("/orders", headers={"Authorization": "Basic YWxpY2U6eA=="})
    assert basic.status_code == 401
    assert basic.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "token, why",
    [
        (lambda: tokens.customer("alice", ttl_seconds=-120), "expired"),
        (lambda: _foreign_issuer_token("alice", CUSTOMER), "signature"),
        (lambda: "not.a.jwt", "malformed"),
        (
            lambda: issuer.sign(
                issuer.private_key_file(tokens.run_dir()).read_bytes(),
                "alice",
                (CUSTOMER,),
                issuer="someone-else",
            ),
            "issuer",
        ),
        (
            lambda: issuer.sign(
                issuer.private_key_file(tokens.run_dir()).read_bytes(),
                "alice",
                (CUSTOMER,),
                audience="another-api",
            ),
            "audience",
        ),
        (
            # a symmetric token "signed" with the public key: the algorithm is never the token's
            lambda: jwt.encode(
                {
                    "sub": "alice",
                    "scope": "admin",
                    "iss": issuer.DEFAULT_ISSUER,
                    "aud": DEFAULT_AUDIENCE,
                    "exp": int(time.time()) + 60,
                },
                "x" * 32,
                algorithm="HS256",
            ),
            "malformed",
        ),
    ],
    ids=["expired", "other-key", "malformed", "other-issuer", "other-audience", "hs256"],
)
def test_invalid_tokens_are_401_with_invalid_token(placed, token, why):
    shop, order_id = placed
    response = shop.orders.get(f"/orders/{order_id}", headers=_as(token()))
    assert response.status_code == 401, response.json
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith('Bearer realm="saga", error="invalid_token"')
    assert why in (challenge + response.json["message"]).lower() or why == "malformed"


# -- 403 ---------------------------------------------------------------------------------------


def test_a_customer_token_on_operator_endpoints_is_403(placed):
    shop, order_id = placed
    alice = _as(tokens.customer("alice"))
    refused = [
        shop.inventory.put(
            "/products/pear", json={"name": "p", "price_cents": 1, "available": 1}, headers=alice
        ),
        shop.inventory.post("/products/apple/restock", json={"quantity": 1}, headers=alice),
        shop.inventory.get(f"/reservations/{order_id}", headers=alice),
        shop.billing.put("/accounts/alice", json={"balance_cents": 10**6}, headers=alice),
        shop.billing.post("/accounts/alice/deposits", json={"amount_cents": 1}, headers=alice),
    ]
    for response in refused:
        assert response.status_code == 403, response.json
        assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
        assert 'scope="admin"' in response.headers["WWW-Authenticate"]
    assert shop.balance("alice") == 700  # nothing was written
    # a token without any scope reaches nothing but the public endpoints
    nobody = _as(issuer.sign(issuer.private_key_file(tokens.run_dir()).read_bytes(), "x", ()))
    assert shop.orders.get("/orders", headers=nobody).status_code == 403


# -- a customer's own resources, and nobody else's ---------------------------------------------


def test_a_customer_sees_its_own_order_account_and_payment(placed):
    shop, order_id = placed
    alice = _as(tokens.customer("alice"))
    assert shop.orders.get(f"/orders/{order_id}", headers=alice).json["status"] == "confirmed"
    assert shop.billing.get("/accounts/alice", headers=alice).json["balance_cents"] == 700
    assert shop.billing.get(f"/payments/{order_id}", headers=alice).json["status"] == "captured"
    listed = shop.orders.get("/orders", headers=alice)
    assert [o["order_id"] for o in listed.json] == [order_id]
    # the catalogue is readable by customers
    assert shop.inventory.get("/products/apple", headers=alice).status_code == 200
    assert shop.inventory.get("/products", headers=alice).status_code == 200


def test_another_customers_resources_answer_404(placed):
    shop, order_id = placed
    bob = _as(tokens.customer("bob"))
    assert shop.orders.get(f"/orders/{order_id}", headers=bob).status_code == 404
    assert shop.billing.get(f"/payments/{order_id}", headers=bob).status_code == 404
    assert shop.billing.get("/accounts/alice", headers=bob).status_code == 404
    # indistinguishable from an order that does not exist
    missing = shop.orders.get("/orders/00000000-0000-4000-8000-000000000000", headers=bob)
    foreign = shop.orders.get(f"/orders/{order_id}", headers=bob)
    assert missing.status_code == foreign.status_code == 404
    assert missing.json.keys() == foreign.json.keys()
    # listings: only bob's own orders, whatever customer_id he asks for
    assert shop.orders.get("/orders", headers=bob).json == []
    assert shop.orders.get("/orders?customer_id=alice", headers=bob).json == []
    assert shop.billing.get("/accounts/bob", headers=bob).json["balance_cents"] == 500


def test_a_customer_cannot_cancel_another_customers_order(placed):
    shop, order_id = placed
    response = shop.orders.post(f"/orders/{order_id}/cancel", headers=_as(tokens.customer("bob")))
    assert response.status_code == 404
    shop.settle()
    assert shop.order(order_id)["status"] == "confirmed"
    assert shop.balance("alice") == 700
    # alice can
    own = shop.orders.post(f"/orders/{order_id}/cancel", headers=_as(tokens.customer("alice")))
    assert own.status_code == 202


def test_a_customer_cannot_order_or_pay_with_another_customers_account(placed):
    shop, _order_id = placed
    body = {"customer_id": "alice", "items": [{"sku": "apple", "quantity": 1}]}
    response = shop.orders.post("/orders", json=body, headers=_as(tokens.customer("bob")))
    assert response.status_code == 403
    assert "customer_id" in response.json["errors"]["json"]
    shop.settle()
    assert shop.balance("alice") == 700  # nothing charged to alice
    assert len(shop.orders.get("/orders?customer_id=alice").json) == 1


def test_idempotency_keys_are_scoped_to_the_customer(shop):
    shop.account("bob", balance_cents=1000)
    key = {"Idempotency-Key": "same-key"}

    def place(customer: str) -> dict:
        response = shop.orders.post(
            "/orders",
            json={"customer_id": customer, "items": [{"sku": "apple", "quantity": 1}]},
            headers={**key, **_as(tokens.customer(customer))},
        )
        assert response.status_code == 201, response.json
        return response

    alices, bobs = place("alice"), place("bob")
    assert alices.json["order_id"] != bobs.json["order_id"]
    assert "Idempotent-Replayed" not in bobs.headers
    again = place("alice")
    assert again.json["order_id"] == alices.json["order_id"]
    assert again.headers["Idempotent-Replayed"] == "true"


# -- public endpoints and the OpenAPI document --------------------------------------------------


def test_public_endpoints_need_no_token(saga):
    anonymous = saga.orders.application.test_client()
    for path in ("/health", "/ready", "/openapi.json", "/swagger-ui", "/metrics"):
        assert anonymous.get(path).status_code == 200, path
    assert anonymous.get("/swagger-ui-assets/swagger-ui.css").status_code == 200


@pytest.mark.parametrize("service", ["orders", "inventory", "billing"])
def test_the_openapi_document_declares_the_bearer_scheme_per_operation(saga, service):
    spec = getattr(saga, service).get("/openapi.json").json
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT",
        "description": spec["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if method not in {"get", "put", "post", "delete", "patch"}:
                continue
            public = path in ("/health", "/ready")
            assert ("security" in operation) != public, (method, path)
            if not public:
                assert operation["security"] == [{"bearerAuth": []}]
                assert {"401", "403"} <= operation["responses"].keys()
                assert "Scope:" in operation["description"]


def test_the_key_pair_files_and_their_modes(tmp_path: Path):
    public = issuer.ensure_key_pair(tmp_path)
    assert (public.stat().st_mode & 0o777) == 0o644
    assert (issuer.private_key_file(tmp_path).stat().st_mode & 0o777) == 0o600
    assert (issuer.key_dir(tmp_path).stat().st_mode & 0o777) == 0o700
    assert b"PRIVATE" not in public.read_bytes()
    token = issuer.admin_token(tmp_path)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["scope"] == ADMIN and claims["exp"] > time.time()


# -- events only from their owner's stream -------------------------------------------------------


def test_a_forged_payment_in_the_wrong_stream_is_dead_lettered_and_changes_nothing(shop):
    """A PaymentCaptured (billing's) written to inventory.events, as a process holding another
    service's Redis access could: the orders consumer dead-letters it, the order stays pending."""
    from contracts import partition_of, partition_stream

    order_id = shop.place("alice", [("apple", 2)])
    shop.publish("orders")
    shop.deliver("inventory")
    shop.publish("inventory")
    shop.deliver("billing")
    shop.publish("billing")
    partition = partition_of(order_id, shop.partitions)
    billing_stream = partition_stream("billing.events", partition)
    [(real_id, fields)] = [
        (i, f) for i, f in shop.redis.xrange(billing_stream) if f["event_type"] == "PaymentCaptured"
    ]
    shop.redis.xdel(billing_stream, real_id)  # only the forgery reaches orders
    forged_stream = partition_stream("inventory.events", partition)
    shop.redis.xadd(forged_stream, {**fields, "producer": "inventory"})
    shop.deliver("orders")
    assert shop.order(order_id)["status"] == "pending"
    with psycopg.connect(shop.db_urls["orders"]) as conn:
        [(error, event_type)] = conn.execute(
            "SELECT error, event_type FROM dead_letters WHERE consumer_group = 'orders'"
        ).fetchall()
    assert event_type == "PaymentCaptured"
    assert "PaymentCaptured is not published on inventory.events" in error
