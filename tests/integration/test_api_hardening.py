"""The REST APIs against bad input and races (issue 9): 4xx JSON with field errors, never 500,
and ledgers that stay equal to the state they describe. Real PostgreSQL, Flask test clients."""

from __future__ import annotations

import threading
from collections.abc import Callable

import psycopg

from billing_service import storage as billing_storage
from inventory_service import storage as inventory_storage
from tests.helpers import wait_until

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
