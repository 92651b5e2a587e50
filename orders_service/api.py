"""Orders REST API (DESIGN.md §4)."""

from __future__ import annotations

from flask import current_app, url_for
from flask.views import MethodView
from flask_smorest import abort
from flask_smorest.pagination import PaginationParameters

from orders_service import commands, schemas, storage
from service_runtime.api_fields import check_path_uuid, page_window, uuid_path
from service_runtime.auth import ADMIN, CUSTOMER, customer_scope, principal, requires
from service_runtime.web import Blueprint, db_pool

blp = Blueprint("orders", __name__, description="Orders and their saga")


def _load(order_id: str) -> dict:
    """The order, if the caller may see it: another customer's order is a 404 like a missing
    one, so its existence is not revealed."""
    with db_pool().connection() as conn:
        order = storage.get_order(conn, order_id)
    if order is None or not principal().owns(order["customer_id"]):
        abort(404, message=f"No order {order_id}.")
    return order


@blp.route("/orders")
class Orders(MethodView):
    @blp.arguments(schemas.OrderIn)
    @blp.arguments(schemas.IdempotencyHeader, location="headers")
    @blp.response(201, schemas.OrderDetail)
    @blp.alt_response(422, description="Invalid body, or Idempotency-Key reused with another body")
    @requires(CUSTOMER, ADMIN)
    def post(self, body: dict, headers: dict):
        """Place an order; the saga runs asynchronously from here. A customer places orders for
        itself only: `customer_id` must be its own (the token's `sub`)."""
        if not principal().owns(body["customer_id"]):
            abort(
                403,
                message="A customer places orders for itself only: customer_id must be the "
                "token's subject.",
                errors={"json": {"customer_id": ["Must be your own customer id."]}},
            )
        try:
            placed = commands.place_order(
                db_pool(),
                body["customer_id"],
                body["items"],
                payment_timeout_s=current_app.config["PAYMENT_TIMEOUT_SECONDS"],
                idempotency_key=headers.get("idempotency_key"),
            )
        except commands.IdempotencyConflict:
            abort(
                422,
                message="Idempotency-Key already used with a different request body.",
                errors={"headers": {"Idempotency-Key": ["Used with a different body."]}},
            )
        location = url_for("orders.OrderById", order_id=placed.order_id)
        extra = {"Location": location}
        if placed.replayed:
            extra["Idempotent-Replayed"] = "true"
        return placed.order or _load(placed.order_id), 201, extra

    @blp.arguments(schemas.OrderQuery, location="query")
    @blp.response(200, schemas.Order(many=True))
    @blp.paginate()
    @requires(CUSTOMER, ADMIN)
    def get(self, query: dict, pagination_parameters: PaginationParameters):
        """List orders, newest first, by customer and/or status. A customer sees its own
        orders only (another customer_id lists nothing)."""
        customer_id = query.get("customer_id")
        own = customer_scope()
        if own is not None and customer_id not in (None, own):
            pagination_parameters.item_count = 0
            return []
        with db_pool().connection() as conn:
            orders, total = storage.list_orders(
                conn,
                own or customer_id,
                query.get("status"),
                *page_window(pagination_parameters),
            )
        pagination_parameters.item_count = total
        return orders


@blp.route("/orders/<order_id>", parameters=[uuid_path("order_id")])
class OrderById(MethodView):
    @blp.response(200, schemas.OrderDetail)
    @requires(CUSTOMER, ADMIN)
    def get(self, order_id: str):
        """An order with its items, total, reason and history."""
        return _load(check_path_uuid("order_id", order_id))


@blp.route("/orders/<order_id>/cancel", parameters=[uuid_path("order_id")])
class CancelOrder(MethodView):
    @blp.response(202, schemas.OrderDetail)
    @blp.alt_response(409, description="The order is rejected and cannot be cancelled")
    @requires(CUSTOMER, ADMIN)
    def post(self, order_id: str):
        """Cancel a pending or confirmed order; release and refund follow."""
        order_id = check_path_uuid("order_id", order_id)
        _load(order_id)  # 404 unless the caller may see it (its customer never changes)
        try:
            outcome = commands.cancel_order(db_pool(), order_id)
        except commands.NotCancellable as err:
            abort(409, message=str(err))
        if outcome is None:
            abort(404, message=f"No order {order_id}.")
        return _load(order_id)
