"""The console's Flask application: server-rendered pages over sagactl.inspect.

Loopback only: `saga console` binds 127.0.0.1, and requests naming another host (a DNS
rebinding page in the operator's browser) are refused, as are POSTs a browser says come from
another site. Every page needs an operator's login (login.py: an admin JWT verified like the
REST APIs' bearer tokens, then a signed session cookie that never holds the token). Nothing
here writes to a service's database; the one action, a dead letter's re-drive, needs that
session and an explicit confirmation in the same request, and is logged with the operator.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import click
from flask import Flask, abort, g, jsonify, render_template, request, send_file

from contracts.ids import canonical_uuid
from sagactl.console import assets, login, views
from sagactl.console.monitor import Connections, Monitor, describe
from sagactl.inspect.common import duration, short_time
from sagactl.inspect.dead_letters import get_dead_letter, list_dead_letters, request_redrive
from sagactl.inspect.diagrams import COMPENSATIONS, order_sequence_diagram
from sagactl.inspect.orders import STATUSES, order_record, recent_orders
from sagactl.inspect.partitions import GROUPS
from sagactl.inspect.trace import trace_order
from service_runtime.auth import Verifier
from service_runtime.config import SERVICES

log = logging.getLogger("saga.console")

TERMINAL = ("confirmed", "rejected", "cancelled")
# Content-Security-Policy: only our own scripts; Mermaid styles its SVG inline
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'; "
    "base-uri 'none'"
)


def create_app(
    port: int | None = None,
    monitor: Monitor | None = None,
    connections: Connections | None = None,
    verifier: Verifier | None = None,
) -> Flask:
    """The console; `port` is the one it is served on (checked against the Host header),
    `verifier` checks login tokens (default: the APIs' settings, AUTH_PUBLIC_KEY_FILE or
    AUTH_JWKS_URL)."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024  # a token or a confirmation, nothing more
    connections = connections or Connections()
    monitor = monitor or Monitor(connections)
    app.extensions["saga_monitor"] = monitor
    allowed_hosts = {"127.0.0.1", "localhost", "[::1]"}
    if port is not None:
        allowed_hosts |= {f"{h}:{port}" for h in ("127.0.0.1", "localhost", "[::1]")}

    app.jinja_env.filters.update(
        duration=duration,
        short_time=short_time,
        cents=lambda c: "-" if c is None else f"{c / 100:,.2f}",
        clock=lambda t: time.strftime("%H:%M UTC", time.gmtime(t)),
        pretty=lambda v: v if isinstance(v, str) else json.dumps(v, indent=2, sort_keys=True),
    )
    app.jinja_env.globals.update(
        SERVICES=SERVICES, GROUPS=GROUPS, STATUSES=STATUSES, COMPENSATIONS=COMPENSATIONS
    )

    @app.before_request
    def loopback_only() -> None:
        if request.host not in allowed_hosts:
            abort(421, "this console answers on the loopback interface only")

    @app.before_request
    def same_origin_forms() -> None:
        # the SameSite=Strict cookie already stays home; this also refuses a cross-site POST
        # to /login. Sec-Fetch-Site first: under Referrer-Policy no-referrer a browser sends
        # "Origin: null" even for our own forms. Clients that send neither (curl) pass.
        if request.method in ("GET", "HEAD", "OPTIONS"):
            return
        site = request.headers.get("Sec-Fetch-Site")
        origin = request.headers.get("Origin")
        if site is not None:
            if site != "same-origin":
                abort(403, "this console refuses forms sent from another site")
        elif origin not in (None, "null", f"{request.scheme}://{request.host}"):
            abort(403, "this console refuses forms sent from another site")

    login.install(app, verifier)

    @app.before_request
    def keep_sampling() -> None:
        # an operator looking at the console keeps its sampler at the live interval
        if g.get("operator") is not None and request.endpoint not in login.PUBLIC_ENDPOINTS:
            monitor.watched()

    @app.after_request
    def headers(response: Any) -> Any:
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Frame-Options"] = "DENY"
        if response.mimetype == "text/html" or request.path.startswith(("/api/", "/fragments/")):
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.context_processor
    def common() -> dict[str, Any]:
        return {
            "missing_assets": assets.missing(),
            "nav": request.endpoint,
            "operator": g.get("operator"),
        }

    def unavailable(err: BaseException, status: int = 503) -> tuple[str, int]:
        return render_template("error.html", message=describe(err), status=status), status

    # -- overview ----------------------------------------------------------------------------

    def overview_context() -> dict[str, Any]:
        view = monitor.view()
        snapshot = view["snapshot"]
        context: dict[str, Any] = {**view, "updated": time.strftime("%H:%M:%S")}
        if snapshot:
            context.update(
                edges=views.stream_edges(snapshot["streams"]),
                boxes=views.boxes(snapshot),
                group_tables=views.group_tables(snapshot),
                streams=snapshot["streams"],
                outbox=snapshot["outbox"],
            )
        return context

    @app.get("/")
    def overview() -> str:
        return render_template("overview.html", **overview_context())

    @app.get("/fragments/overview")
    def overview_fragment() -> str:
        return render_template("_overview.html", **overview_context())

    @app.get("/api/samples")
    def samples() -> Any:
        return jsonify(monitor.series())

    # -- orders ------------------------------------------------------------------------------

    @app.get("/orders")
    def orders() -> Any:
        search = request.args.get("q", "").strip()
        customer = request.args.get("customer", "").strip()
        status = request.args.get("status", "").strip()
        if status and status not in STATUSES:
            status = ""
        try:
            found = recent_orders(search, customer, status or None)
        except Exception as err:
            return unavailable(err)
        return render_template(
            "orders.html", found=found, q=search, customer=customer, status=status
        )

    def order_context(order_id: str) -> dict[str, Any]:
        try:
            order_id = canonical_uuid(order_id)
        except ValueError:
            abort(404, f"{order_id!r} is not an order id")
        record = order_record(order_id)
        trace = trace_order(order_id, connections.client(), connections.partitions())
        if record is None and not trace["events"] and not any(trace["state"].values()):
            abort(404, f"no order {order_id} and no event of its saga")
        settled = bool(record and record["status"] in TERMINAL) and all(
            d["status"] in ("processed", "not_handled", "dead_lettered")
            for e in trace["events"]
            for d in e["deliveries"]
        )
        return {
            "order_id": order_id,
            "order": record,
            "trace": trace,
            "rows": views.event_rows(trace),
            "diagram": order_sequence_diagram(trace),
            "settled": settled,
        }

    @app.get("/orders/<order_id>")
    def order(order_id: str) -> Any:
        try:
            return render_template("order.html", **order_context(order_id))
        except click.ClickException as err:
            return unavailable(err)

    @app.get("/fragments/orders/<order_id>")
    def order_fragment(order_id: str) -> Any:
        try:
            return render_template("_order.html", **order_context(order_id))
        except click.ClickException as err:
            return unavailable(err)

    # -- dead letters -----------------------------------------------------------------------

    @app.get("/dead-letters")
    def dead_letters() -> Any:
        group = request.args.get("group") or None
        if group not in (None, *GROUPS):
            group = None
        try:
            report = list_dead_letters(group)
        except Exception as err:
            return unavailable(err)
        return render_template("dead_letters.html", report=report, group=group)

    def letter_or_404(group: str, letter_id: int) -> dict[str, Any]:
        if group not in GROUPS:
            abort(404, f"no group {group}")
        try:
            return get_dead_letter(letter_id, group)
        except click.ClickException as err:
            abort(404, err.message)

    @app.get("/dead-letters/<group>/<int:letter_id>")
    def dead_letter(group: str, letter_id: int) -> Any:
        letter = letter_or_404(group, letter_id)
        return render_template("dead_letter.html", letter=letter)

    @app.post("/dead-letters/<group>/<int:letter_id>/redrive")
    def redrive_dead_letter(group: str, letter_id: int) -> Any:
        # the guard let only a logged-in operator this far; the confirmation is this request's
        letter = letter_or_404(group, letter_id)
        if request.form.get("confirm") != str(letter_id):
            problem = "Tick the confirmation to re-drive: nothing was re-driven."
            return render_template("dead_letter.html", letter=letter, problem=problem), 400
        operator = g.operator.subject
        try:
            requested = request_redrive(group, [letter_id])
        except click.ClickException as err:
            log.warning(
                "console: %s could not re-drive %s's dead letter %s: %s",
                operator,
                group,
                letter_id,
                err.message,
                extra={"operator": operator},
            )
            return render_template(
                "redriven.html", letter=letter, requested=[], failure=err.message
            ), 409
        # dead_letters has no column for who asked: the console's log line records it
        log.info(
            "console: %s requested the re-drive of %s's dead letter %s",
            operator,
            group,
            letter_id,
            extra={"operator": operator},
        )
        return render_template("redriven.html", letter=letter, requested=requested, failure=None)

    # -- assets ------------------------------------------------------------------------------

    @app.get("/assets/<name>")
    def asset(name: str) -> Any:
        path = assets.asset_path(name)
        if path is None or not path.is_file():
            abort(404, f"asset {name} is not installed (make console-assets)")
        return send_file(path, max_age=3600)

    @app.errorhandler(403)
    @app.errorhandler(404)
    @app.errorhandler(421)
    def not_found(err: Any) -> tuple[str, int]:
        return render_template("error.html", message=err.description, status=err.code), err.code

    return app
