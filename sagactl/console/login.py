"""/login, /logout, and the guard in front of everything else.

Every page, fragment and JSON endpoint needs a live operator session (auth.py); only /login,
the console's own static files and the vendored browser libraries do not. Without one, a page
is redirected (303) to /login?next=<itself>; an htmx fragment or /api/ request gets a 401 with
`HX-Redirect` (htmx then loads the login page instead of swapping a form into a fragment;
console.js does the same for the plots' data). `next` is followed only when it is a path on
this console, never to another site.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from flask import (
    Flask,
    current_app,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)

from sagactl.console import auth
from service_runtime.auth import AuthConfigError, Verifier

log = logging.getLogger("saga.console")

PUBLIC_ENDPOINTS = frozenset({"login", "log_in", "static", "asset"})
LOGIN_PATHS = ("/login", "/logout")


def local_path(target: str | None) -> str:
    """`target` when it is a path on this console (what `next` may name), else "/"."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/"
    # browsers read "\" as "/" and drop tabs and newlines: "/\evil.example" is another site
    if "\\" in target or any(ord(c) < 0x20 or ord(c) == 0x7F for c in target):
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or parts.path in LOGIN_PATHS:
        return "/"
    return target


def install(app: Flask, verifier: Verifier | None = None) -> None:
    """Sessions signed with the run folder's key, the login routes and the guard.
    `verifier` defaults to the APIs' configuration (Verifier.from_settings, at first login)."""
    app.secret_key = auth.session_key()
    app.config.update(
        SESSION_COOKIE_NAME="saga_console_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",  # no cross-site request carries it, not even a link
        SESSION_COOKIE_SECURE=False,  # plain http on the loopback interface
        # Flask also refuses a cookie signed longer ago than this, whatever it says inside
        PERMANENT_SESSION_LIFETIME=timedelta(seconds=auth.MAX_SESSION_SECONDS),
    )
    if verifier is not None:
        app.extensions["console_verifier"] = verifier
    logouts = auth.Logouts()

    @app.before_request
    def require_operator() -> Any:
        g.operator = auth.current(session, logouts)
        if g.operator is not None or request.endpoint in PUBLIC_ENDPOINTS:
            return None
        ended = bool(session)  # a session that expired or was logged out elsewhere
        if ended:
            session.clear()
        return _to_login(ended)

    @app.get("/login")
    def login() -> Any:
        target = local_path(request.args.get("next"))
        if g.operator is not None:
            return redirect(target, 303)
        notice = "Your session has ended: log in again." if request.args.get("ended") else None
        return render_template("login.html", next=target, notice=notice)

    @app.post("/login")
    def log_in() -> Any:
        target = local_path(request.form.get("next"))
        try:
            verifier = _verifier()
        except (AuthConfigError, OSError) as err:
            log.error("console: cannot verify logins: %s", err)
            problem = f"The console cannot verify tokens: {err}"
            return render_template("login.html", next=target, problem=problem), 503
        try:
            operator = auth.log_in(request.form.get("token", ""), verifier)
        except auth.LoginRefused as err:
            log.warning("console: login refused: %s", err.message)
            return render_template("login.html", next=target, problem=err.message), err.status
        auth.store(session, operator)
        ends = datetime.fromtimestamp(operator.ends_at, UTC).isoformat(timespec="seconds")
        log.info(
            "console: %s logged in (session ends %s)",
            operator.subject,
            ends,
            extra={"operator": operator.subject},
        )
        return redirect(target, 303)

    @app.post("/logout")
    def logout() -> Any:
        logouts.end(g.operator)
        session.clear()
        log.info(
            "console: %s logged out", g.operator.subject, extra={"operator": g.operator.subject}
        )
        return redirect(url_for("login"), 303)


def _verifier() -> Verifier:
    """The APIs' verifier, made once (reading the key file) and kept."""
    verifier = current_app.extensions.get("console_verifier")
    if verifier is None:
        verifier = current_app.extensions["console_verifier"] = Verifier.from_settings()
    return verifier


def _to_login(ended: bool) -> Any:
    extra = {"ended": 1} if ended else {}
    if request.headers.get("HX-Request") or request.path.startswith("/api/"):
        # a fragment or the plots' data: the page they belong to comes back after the login
        page = urlsplit(request.headers.get("HX-Current-URL", ""))
        here = local_path(page.path + (f"?{page.query}" if page.query else ""))
        target = url_for("login", next=here, **extra)
        response = jsonify(error="login required", login=target)
        response.status_code = 401
        response.headers["HX-Redirect"] = target
        return response
    if request.method in ("GET", "HEAD"):
        here = request.full_path.rstrip("?") if request.query_string else request.path
        return redirect(url_for("login", next=local_path(here), **extra), 303)
    return redirect(url_for("login", **extra), 303)  # a form sent without a session
