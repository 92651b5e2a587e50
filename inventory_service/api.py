"""Inventory REST API (DESIGN.md §4)."""

from __future__ import annotations

from flask.views import MethodView
from flask_smorest import abort
from flask_smorest.pagination import PaginationParameters

from inventory_service import schemas, storage
from service_runtime.api_fields import (
    check_path_key,
    check_path_uuid,
    key_path,
    page_window,
    uuid_path,
)
from service_runtime.auth import ADMIN, CUSTOMER, requires
from service_runtime.web import Blueprint, db_pool

blp = Blueprint("inventory", __name__, description="Products, stock and reservations")


@blp.route("/products")
class Products(MethodView):
    @blp.response(200, schemas.Product(many=True))
    @blp.paginate()
    @requires(CUSTOMER, ADMIN)
    def get(self, pagination_parameters: PaginationParameters):
        """List products by sku (the catalogue: customers read it to order)."""
        with db_pool().connection() as conn:
            rows, total = storage.list_products(conn, *page_window(pagination_parameters))
        pagination_parameters.item_count = total
        return rows


@blp.route("/products/<sku>", parameters=[key_path("sku")])
class ProductBySku(MethodView):
    @blp.arguments(schemas.ProductIn)
    @blp.response(200, schemas.Product)
    @blp.alt_response(201, schema=schemas.Product, description="Created")
    @requires(ADMIN)
    def put(self, body: dict, sku: str):
        """Create or replace a product."""
        check_path_key("sku", sku)
        with db_pool().connection() as conn, conn.transaction():
            product, created = storage.upsert_product(
                conn, sku, body["name"], body["price_cents"], body["available"]
            )
        return product, 201 if created else 200

    @blp.response(200, schemas.Product)
    @requires(CUSTOMER, ADMIN)
    def get(self, sku: str):
        """One product."""
        check_path_key("sku", sku)
        with db_pool().connection() as conn:
            product = storage.get_product(conn, sku)
        if product is None:
            abort(404, message=f"No product with sku {sku!r}.")
        return product


@blp.route("/products/<sku>/restock", parameters=[key_path("sku")])
class Restock(MethodView):
    @blp.arguments(schemas.RestockIn)
    @blp.response(200, schemas.Product)
    @requires(ADMIN)
    def post(self, body: dict, sku: str):
        """Add stock to a product."""
        check_path_key("sku", sku)
        with db_pool().connection() as conn, conn.transaction():
            product = storage.restock(conn, sku, body["quantity"])
        if product is None:
            abort(404, message=f"No product with sku {sku!r}.")
        return product


@blp.route("/reservations/<order_id>", parameters=[uuid_path("order_id")])
class ReservationByOrder(MethodView):
    @blp.response(200, schemas.Reservation)
    @requires(ADMIN)
    def get(self, order_id: str):
        """What inventory holds (or held) for an order."""
        order_id = check_path_uuid("order_id", order_id)
        with db_pool().connection() as conn:
            reservation = storage.get_reservation(conn, order_id)
        if reservation is None:
            abort(404, message=f"No reservation for order {order_id}.")
        return reservation
