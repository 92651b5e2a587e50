"""Orders application factory (gunicorn: "orders_service.app:create_app()")."""

from __future__ import annotations

from flask import Flask
from psycopg_pool import ConnectionPool

from orders_service.api import blp
from service_runtime.config import payment_timeout_seconds
from service_runtime.web import create_service_app


def create_app(pool: ConnectionPool | None = None, config: dict | None = None) -> Flask:
    settings = {"PAYMENT_TIMEOUT_SECONDS": payment_timeout_seconds()}
    settings.update(config or {})
    return create_service_app("orders", "Orders service", [blp], pool=pool, config=settings)
