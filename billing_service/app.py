"""Billing application factory (gunicorn: "billing_service.app:create_app()")."""

from __future__ import annotations

from flask import Flask
from psycopg_pool import ConnectionPool

from billing_service.api import blp
from service_runtime.web import create_service_app


def create_app(pool: ConnectionPool | None = None, config: dict | None = None) -> Flask:
    return create_service_app("billing", "Billing service", [blp], pool=pool, config=config)
