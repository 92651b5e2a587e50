"""What every service's Flask app shares: flask-smorest setup, JSON errors, health and readiness.

Each service's app factory calls `create_service_app` with its own blueprints; nothing here
knows about orders, stock or money.
"""

from __future__ import annotations

import functools
import io
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import flask_smorest
import swagger_ui_bundle
from flask import Flask, Response, current_app, g, jsonify, request, send_from_directory
from flask.views import MethodView
from flask_smorest import Api, abort
from flask_smorest.utils import resolve_schema_instance
from marshmallow import Schema, fields
from psycopg_pool import ConnectionPool
from webargs import core
from webargs.flaskparser import FlaskParser, is_json_request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from contracts import limits
from contracts.limits import LimitExceeded
from service_runtime import asyncapi, auth, tracing
from service_runtime.config import database_url, stream_partitions
from service_runtime.connection import close_after_response
from service_runtime.db import DB_OUTAGE_ERRORS, create_pool
from service_runtime.failures import CONFLICT_ERRORS, is_conflict
from service_runtime.metrics import HTTP_CONFLICTS_RETRIED, HTTP_LATENCY, HTTP_REQUESTS, exposition

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 2
MAX_BODY_BYTES = 256 * 1024


class _JsonBodyParser(FlaskParser):
    """webargs' parser, with the answers DESIGN.md §4 wants for bodies it cannot read."""

    def _raw_load_json(self, req: Any) -> Any:
        if not is_json_request(req):
            # webargs would call such a body "missing" and report every field as absent.
            if req.get_data(cache=True):
                content_type = req.mimetype or "none"
                abort(
                    415,
                    message=f"Content-Type {content_type!r} is not supported: send the body as "
                    "application/json.",
                    errors={"headers": {"Content-Type": ["Must be application/json."]}},
                )
            return core.missing
        try:
            return core.parse_json(req.get_data(cache=True))
        except RecursionError:
            # The json module recurses once per level: ~1,000 levels exhaust the stack.
            abort(
                400,
                message="Invalid JSON body: nested too deeply.",
                errors={"json": ["Nested too deeply."]},
            )


class Blueprint(flask_smorest.Blueprint):
    """flask-smorest's Blueprint reading bodies with `_JsonBodyParser`; every service uses it."""

    ARGUMENTS_PARSER = _JsonBodyParser()

    def arguments(self, schema: type[Schema] | Schema, *args: Any, **kwargs: Any) -> Callable:
        """flask-smorest's, with one schema instance for all requests: given a class, webargs
        builds a new instance per request, deep-copying its fields (a tenth of a POST's CPU)."""
        return super().arguments(resolve_schema_instance(schema), *args, **kwargs)


def create_service_app(
    name: str,
    title: str,
    blueprints: Iterable[Blueprint],
    *,
    pool: ConnectionPool | None = None,
    config: dict | None = None,
) -> Flask:
    tracing.configure_tracing(name, "web")  # from OTEL_*; off (and free) without them
    app = Flask(name)
    app.config.update(
        API_TITLE=title,
        API_VERSION="v1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="/swagger-ui",
        # Served from the swagger-ui-bundle wheel: the page works on a machine offline.
        OPENAPI_SWAGGER_UI_URL="/swagger-ui-assets/",
        API_SPEC_OPTIONS={"info": {"description": limits.describe()}},
        MAX_CONTENT_LENGTH=MAX_BODY_BYTES,
        SERVICE_NAME=name,
    )
    app.config.update(config or {})
    app.extensions["db_pool"] = pool or create_pool(database_url(name), name=f"{name}-api")

    api = Api(app)
    api.register_blueprint(_health_blueprint())
    for blueprint in blueprints:
        api.register_blueprint(blueprint)
    _register_error_handlers(app, api)
    _retry_views_on_conflict(app)
    _register_body_limit(app)
    _register_metrics(app, name)
    app.add_url_rule("/swagger-ui-assets/<path:filename>", view_func=_swagger_asset)
    app.add_url_rule("/asyncapi.json", view_func=_asyncapi_document)  # a public API document
    tracing.instrument_app(app)
    # bearer JWTs on every endpoint but the public ones (service_runtime/auth.py); a test or
    # an embedding app may hand its own verifier in as config AUTH_VERIFIER
    auth.install(app, app.config.get("AUTH_VERIFIER"))
    return app


CONFLICT_RETRIES = 3


def _retry_views_on_conflict(app: Flask) -> None:
    """Run a request again when PostgreSQL aborted its transaction to break a deadlock or a
    serialization failure: nothing of it was committed, and a second run usually succeeds.
    Every view writes in one transaction (or is idempotent), so running it again is safe."""
    for endpoint, view in list(app.view_functions.items()):
        app.view_functions[endpoint] = _with_conflict_retries(view)


def _with_conflict_retries(view: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(view)
    def retrying(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(1, CONFLICT_RETRIES + 1):
            try:
                return view(*args, **kwargs)
            except CONFLICT_ERRORS as err:
                if attempt == CONFLICT_RETRIES:
                    raise
                HTTP_CONFLICTS_RETRIED.labels(current_app.config["SERVICE_NAME"]).inc()
                log.info("request conflicted (%s), running it again", err.sqlstate)
        raise AssertionError("unreachable")

    return retrying


def _swagger_asset(filename: str) -> Response:
    return send_from_directory(swagger_ui_bundle.swagger_ui_path, filename)


def _asyncapi_document() -> Response:
    """The AsyncAPI 3.0 document of the events this service sends and receives."""
    doc = current_app.extensions.get("asyncapi")
    if doc is None:
        doc = asyncapi.document(current_app.config["SERVICE_NAME"], stream_partitions())
        current_app.extensions["asyncapi"] = doc
    return jsonify(doc)


def db_pool() -> ConnectionPool:
    """The current app's connection pool (set up by the app factory)."""
    return current_app.extensions["db_pool"]


class _Status(Schema):
    status = fields.String()
    service = fields.String()


def _health_blueprint() -> Blueprint:
    blp = Blueprint("health", __name__, description="Liveness and readiness")

    @blp.route("/health")
    class Health(MethodView):
        @blp.response(200, _Status)
        def get(self) -> dict:
            """Liveness: the process answers."""
            return {"status": "ok", "service": current_app.config["SERVICE_NAME"]}

    @blp.route("/ready")
    class Ready(MethodView):
        @blp.response(200, _Status)
        @blp.alt_response(503, description="The service's database is unreachable")
        def get(self) -> dict:
            """Readiness: the service's database answers."""
            with db_pool().connection() as conn:
                conn.execute("SELECT 1")
            return {"status": "ready", "service": current_app.config["SERVICE_NAME"]}

    return blp


def _register_metrics(app: Flask, service: str) -> None:
    @app.before_request
    def start_timer() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def record(response: Response) -> Response:
        # The route template, not the path: ids must not explode the label set.
        route = request.url_rule.rule if request.url_rule else "unmatched"
        HTTP_REQUESTS.labels(service, request.method, route, str(response.status_code)).inc()
        if "started" in g:
            HTTP_LATENCY.labels(service, request.method, route).observe(
                time.perf_counter() - g.started
            )
        return response

    @app.get("/metrics")
    def metrics() -> Response:
        body, content_type = exposition()
        return Response(body, content_type=content_type)


def _register_body_limit(app: Flask) -> None:
    @app.before_request
    def bounded_streamed_body() -> None:
        """A chunked body has no Content-Length for werkzeug to check up front, and werkzeug
        silently truncates it at MAX_CONTENT_LENGTH (a 400 "Invalid JSON body." follows).
        Read it here, one byte past the limit: over it is a 413, like a sized body."""
        environ = request.environ
        if request.content_length is not None or not _chunked():
            return
        limit = app.config["MAX_CONTENT_LENGTH"]
        body = environ["wsgi.input"].read(limit + 1)
        if len(body) > limit:
            raise RequestEntityTooLarge()
        environ["wsgi.input"] = io.BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))

    @app.after_request
    def close_if_body_unread(response: Response) -> Response:
        # A body the app did not read (a 413 above all) is left on the socket: the server can
        # only close the connection, so it must say so instead of announcing keep-alive.
        if response.status_code >= 400 and _body_left_unread():
            close_after_response()
        return response


def _chunked() -> bool:
    # gunicorn answers 400 to any other transfer coding, and sets wsgi.input_terminated.
    return "chunked" in request.headers.get("Transfer-Encoding", "").lower()


def _body_left_unread() -> bool:
    has_body = bool(request.content_length) or _chunked()
    return has_body and getattr(request, "_cached_data", None) is None


def _register_error_handlers(app: Flask, api: Api) -> None:
    def http_error(error: HTTPException):
        body, status, headers = api.handle_http_exception(error)
        # DESIGN.md §4: every error carries a message.
        body.setdefault("message", error.description)
        out = jsonify(body)
        out.status_code = status
        # The exception's own headers too: Allow on a 405 (RFC 9110), Retry-After, ...
        for name, value in error.get_headers():
            if name.lower() != "content-type":
                out.headers[name] = value
        out.headers.update(headers)
        return out

    def conflicted(error: Exception):
        log.warning("request still conflicting after %d runs: %s", CONFLICT_RETRIES, error)
        out = jsonify(
            code=409,
            status="Conflict",
            message="The request kept conflicting with concurrent requests for the same data "
            "and was not applied; nothing was written. Retry it.",
        )
        out.status_code = 409
        out.headers["Retry-After"] = "1"
        return out

    def limit_exceeded(error: LimitExceeded):
        out = jsonify(
            code=422,
            status="Unprocessable Entity",
            message=error.message,
            errors={"json": {error.field: [error.message]}},
        )
        out.status_code = 422
        return out

    def database_down(error: Exception):
        if is_conflict(error):  # psycopg makes deadlocks OperationalErrors; they are not outages
            return conflicted(error)
        log.warning("database unavailable: %s", error)
        out = jsonify(
            code=503,
            status="Service Unavailable",
            message="The service's database is unavailable; nothing was written. Retry later.",
        )
        out.status_code = 503
        out.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return out

    def unexpected(error: Exception):
        log.exception("unhandled error")
        out = jsonify(code=500, status="Internal Server Error", message="Unexpected error.")
        out.status_code = 500
        return out

    app.register_error_handler(HTTPException, http_error)
    for error_type in CONFLICT_ERRORS:
        app.register_error_handler(error_type, conflicted)
    app.register_error_handler(LimitExceeded, limit_exceeded)
    for error_type in DB_OUTAGE_ERRORS:
        app.register_error_handler(error_type, database_down)
    app.register_error_handler(Exception, unexpected)
