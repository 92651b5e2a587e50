"""Bearer tokens over the real gunicorn processes (issue 13): no token, an expired one, another
customer's, and a customer's own order end to end."""

from __future__ import annotations

import requests

from tests import tokens
from tests.helpers import wait_until


def _as(token: str) -> dict[str, str]:
    return tokens.bearer(token)


def test_tokens_over_http(system):
    urls = system.urls
    admin = _as(tokens.admin())
    assert requests.put(
        f"{urls['inventory']}/products/auth-apple",
        json={"name": "Apple", "price_cents": 100, "available": 10},
        headers=admin,
    ).status_code in (200, 201)
    assert requests.put(
        f"{urls['billing']}/accounts/auth-carol", json={"balance_cents": 1000}, headers=admin
    ).status_code in (200, 201)
    carol = _as(tokens.customer("auth-carol"))
    placed = requests.post(
        f"{urls['orders']}/orders",
        json={"customer_id": "auth-carol", "items": [{"sku": "auth-apple", "quantity": 1}]},
        headers=carol,
    )
    assert placed.status_code == 201, placed.text
    order_id = placed.json()["order_id"]
    wait_until(
        lambda: (
            requests.get(f"{urls['orders']}/orders/{order_id}", headers=carol).json()["status"]
            == "confirmed"
        ),
        timeout=30,
    )
    for service, path in (
        ("orders", f"/orders/{order_id}"),
        ("billing", f"/payments/{order_id}"),
        ("billing", "/accounts/auth-carol"),
    ):
        url = f"{urls[service]}{path}"
        assert requests.get(url, headers=carol).status_code == 200
        assert requests.get(url, headers=_as(tokens.customer("auth-dave"))).status_code == 404
        expired = requests.get(url, headers=_as(tokens.customer("auth-carol", ttl_seconds=-120)))
        assert expired.status_code == 401
        assert 'error="invalid_token"' in expired.headers["WWW-Authenticate"]
        anonymous = requests.get(url, headers={"Authorization": ""})
        assert anonymous.status_code == 401
        assert anonymous.headers["WWW-Authenticate"] == 'Bearer realm="saga"'
    assert (
        requests.post(
            f"{urls['billing']}/accounts/auth-carol/deposits",
            json={"amount_cents": 5},
            headers=carol,
        ).status_code
        == 403
    )
