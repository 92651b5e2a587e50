"""Billing REST API (DESIGN.md §4)."""

from __future__ import annotations

from flask.views import MethodView
from flask_smorest import abort

from billing_service import schemas, storage
from service_runtime.api_fields import check_path_key, check_path_uuid, key_path, uuid_path
from service_runtime.auth import ADMIN, CUSTOMER, principal, requires
from service_runtime.web import Blueprint, db_pool

blp = Blueprint("billing", __name__, description="Accounts and payments")


@blp.route("/accounts/<customer_id>", parameters=[key_path("customer_id")])
class AccountById(MethodView):
    @blp.arguments(schemas.AccountIn)
    @blp.response(200, schemas.Account)
    @blp.alt_response(201, schema=schemas.Account, description="Created")
    @requires(ADMIN)
    def put(self, body: dict, customer_id: str):
        """Create an account or set its balance."""
        check_path_key("customer_id", customer_id)
        with db_pool().connection() as conn, conn.transaction():
            account, created = storage.set_account(conn, customer_id, body["balance_cents"])
        return account, 201 if created else 200

    @blp.response(200, schemas.Account)
    @requires(CUSTOMER, ADMIN)
    def get(self, customer_id: str):
        """One account and its balance (a customer reads its own only)."""
        check_path_key("customer_id", customer_id)
        account = None
        if principal().owns(customer_id):
            with db_pool().connection() as conn:
                account = storage.get_account(conn, customer_id)
        if account is None:
            abort(404, message=f"No account for customer {customer_id!r}.")
        return account


@blp.route("/accounts/<customer_id>/deposits", parameters=[key_path("customer_id")])
class Deposits(MethodView):
    @blp.arguments(schemas.DepositIn)
    @blp.response(200, schemas.Account)
    @requires(ADMIN)
    def post(self, body: dict, customer_id: str):
        """Add money to an account."""
        check_path_key("customer_id", customer_id)
        with db_pool().connection() as conn, conn.transaction():
            account = storage.deposit(conn, customer_id, body["amount_cents"])
        if account is None:
            abort(404, message=f"No account for customer {customer_id!r}.")
        return account


@blp.route("/payments/<order_id>", parameters=[uuid_path("order_id")])
class PaymentByOrder(MethodView):
    @blp.response(200, schemas.Payment)
    @requires(CUSTOMER, ADMIN)
    def get(self, order_id: str):
        """Billing's decision for an order: captured, refunded or declined (a customer reads
        the payments of its own orders only)."""
        order_id = check_path_uuid("order_id", order_id)
        with db_pool().connection() as conn:
            payment = storage.get_payment(conn, order_id)
        if payment is None or not principal().owns(payment["customer_id"]):
            abort(404, message=f"No payment for order {order_id}.")
        return payment
