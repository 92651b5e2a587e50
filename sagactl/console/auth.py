"""The console's operator login: an admin JWT in, a signed session out.

The operator pastes a bearer token (`saga token admin` on the embedded stack, the identity
provider's elsewhere). It is verified by the REST APIs' own Verifier (service_runtime/auth.py:
AUTH_PUBLIC_KEY_FILE or AUTH_JWKS_URL, AUTH_ISSUER, AUTH_AUDIENCE, signature and expiry) and
must carry the `admin` scope. The session then holds the subject, the scopes, when it ends (the
token's expiry, at most MAX_SESSION_SECONDS after the login) and a random id that a logout
revokes: never the token itself. Flask signs the session cookie with a key generated at the
console's first start into the run folder's secrets (`console-session`, mode 0600, like every
other secret of the stack), so a session survives a restart of the console but never its token.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from devstack.secrets import secret
from service_runtime.auth import ADMIN, InvalidToken, Verifier
from service_runtime.config import run_dir

SESSION_SECRET = "console-session"
MAX_SESSION_SECONDS = 12 * 3600  # a long-lived token still signs in for a working day at most
MAX_TOKEN_CHARS = 16 * 1024  # far above any JWT; nothing longer is worth verifying


@dataclass(frozen=True)
class Operator:
    """Who is logged in, and until when (unix seconds)."""

    subject: str
    scopes: tuple[str, ...]
    ends_at: float
    session_id: str


class LoginRefused(Exception):
    """A token that does not log in: the message for the login page and its HTTP status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def session_key() -> str:
    """The key that signs the session cookies (created on first use)."""
    return secret(run_dir(), SESSION_SECRET)


def log_in(token: str, verifier: Verifier, now: float | None = None) -> Operator:
    """The operator `token` names, or LoginRefused (401: not a valid token, 403: no admin)."""
    now = time.time() if now is None else now
    token = token.strip()
    if not token:
        raise LoginRefused("Paste an operator's token (`saga token admin`).", 401)
    if len(token) > MAX_TOKEN_CHARS:
        raise LoginRefused("That is far too long to be a token.", 401)
    try:
        caller = verifier.verify(token)
    except InvalidToken as err:
        raise LoginRefused(str(err), 401) from err
    if not caller.is_admin:
        raise LoginRefused(
            f"This token has no {ADMIN!r} scope: the console is for operators only.", 403
        )
    ends_at = min(caller.expires_at or now, now + MAX_SESSION_SECONDS)
    if ends_at <= now:  # the verifier's leeway for clock skew, but no session for it
        raise LoginRefused("The token has expired.", 401)
    return Operator(caller.subject, tuple(sorted(caller.scopes)), ends_at, secrets.token_hex(16))


def store(session: MutableMapping[str, Any], operator: Operator) -> None:
    """Start the operator's session: what the guard needs, nothing else."""
    session.clear()
    session.update(
        sub=operator.subject,
        scopes=list(operator.scopes),
        ends=int(operator.ends_at),
        sid=operator.session_id,
    )


def current(
    session: Mapping[str, Any], logouts: Logouts, now: float | None = None
) -> Operator | None:
    """The operator of a live session: signed by us (Flask checked), not past its end, not
    logged out, with the admin scope; else None."""
    now = time.time() if now is None else now
    try:
        operator = Operator(
            str(session["sub"]),
            tuple(session["scopes"]),
            float(session["ends"]),
            str(session["sid"]),
        )
    except (KeyError, TypeError, ValueError):
        return None
    if operator.ends_at <= now or ADMIN not in operator.scopes or logouts.ended(operator):
        return None
    return operator


class Logouts:
    """Sessions ended by a logout before their time (kept in memory until that time): the
    cookie is gone from the browser, and a copy of it no longer logs in either."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ended: dict[str, float] = {}

    def end(self, operator: Operator, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            self._ended = {sid: t for sid, t in self._ended.items() if t > now}
            self._ended[operator.session_id] = operator.ends_at

    def ended(self, operator: Operator) -> bool:
        with self._lock:
            return operator.session_id in self._ended
