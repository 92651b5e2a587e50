"""Bearer JWTs for every service's REST API (DESIGN.md §9), in one place.

Tokens are verified with a public key only (asymmetric: a service never holds a signing key):
`AUTH_PUBLIC_KEY_FILE` (a PEM public key, e.g. the embedded stack's development issuer) or
`AUTH_JWKS_URL` (an identity provider's JWKS, e.g. Keycloak's `.../protocol/openid-connect/certs`,
keys picked by the token's `kid` and cached by PyJWT's PyJWKClient). Signature, issuer
(`AUTH_ISSUER`), audience (`AUTH_AUDIENCE`) and expiry are verified, and `exp`, `iss`, `aud`
and `sub` must be present.

Callers: a customer (scope `customer`, `sub` = the customer id) or an operator (scope `admin`).
Scopes come from the standard `scope` claim (space-separated, RFC 8693) or a `scp` list.

`install(app)` adds one before-request hook: every endpoint but the public ones (health,
readiness, the API documents, Swagger UI and its assets, /metrics) needs a valid token (else
401 with `WWW-Authenticate: Bearer ...`, RFC 6750 §3), and a scope the view declared with
`@requires(...)` (else 403, `error="insufficient_scope"`). A view that declares nothing is for
operators only: a new endpoint is closed until someone opens it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flask_smorest
import jwt
from flask import Flask, current_app, g, request
from flask_smorest import abort
from jwt.algorithms import get_default_algorithms

from service_runtime.config import setting

CUSTOMER = "customer"
ADMIN = "admin"
SCHEME_NAME = "bearerAuth"
DEFAULT_ISSUER = "saga-dev-issuer"
DEFAULT_AUDIENCE = "saga"
REALM = "saga"
LEEWAY_SECONDS = 30  # clock skew between the issuer and the services
VERIFIED_CACHE_SIZE = 4096  # tokens remembered as verified, per process

# endpoints anyone may call: liveness, readiness, the API documents and Swagger UI, metrics
# (aggregates per route template, no customer data; scraped by Prometheus without a token)
PUBLIC_ENDPOINTS = frozenset(
    {
        "health.Health",
        "health.Ready",
        "api-docs.openapi_json",
        "api-docs.openapi_swagger_ui",
        "_swagger_asset",
        "metrics",
        "static",
    }
)
PUBLIC_PATHS = frozenset({"/asyncapi.json"})

_ASYMMETRIC = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")


class AuthConfigError(RuntimeError):
    pass


@dataclass(frozen=True)
class Principal:
    """Who called: the token's subject and scopes, and when the token expires (unix seconds;
    the console ends its login session then)."""

    subject: str
    scopes: frozenset[str]
    expires_at: float | None = None

    @property
    def is_admin(self) -> bool:
        return ADMIN in self.scopes

    def owns(self, customer_id: str | None) -> bool:
        """An operator reaches every customer's resources; a customer only its own."""
        return self.is_admin or (customer_id is not None and customer_id == self.subject)


class InvalidToken(Exception):
    """Missing, malformed, expired, wrongly signed, wrong issuer or audience."""


class Verifier:
    """Verifies bearer tokens with a public key or a JWKS endpoint."""

    def __init__(
        self,
        *,
        public_key_pem: bytes | None = None,
        jwks_url: str | None = None,
        issuer: str = DEFAULT_ISSUER,
        audience: str = DEFAULT_AUDIENCE,
    ) -> None:
        if (public_key_pem is None) == (jwks_url is None):
            raise AuthConfigError("give exactly one of AUTH_PUBLIC_KEY_FILE and AUTH_JWKS_URL")
        self.issuer = issuer
        self.audience = audience
        self._jwks = jwt.PyJWKClient(jwks_url, cache_keys=True, lifespan=300) if jwks_url else None
        self._key: Any = None
        self._algorithms: list[str] = []
        self._verified: dict[str, Principal] = {}  # token -> principal, only verified ones
        if public_key_pem is not None:
            self._key, self._algorithms = _public_key(public_key_pem)

    @classmethod
    def from_settings(cls) -> Verifier:
        """From AUTH_PUBLIC_KEY_FILE or AUTH_JWKS_URL, AUTH_ISSUER and AUTH_AUDIENCE."""
        key_file = setting("AUTH_PUBLIC_KEY_FILE")
        jwks_url = setting("AUTH_JWKS_URL")
        if not key_file and not jwks_url:
            raise AuthConfigError(
                "AUTH_PUBLIC_KEY_FILE or AUTH_JWKS_URL must be set: the API verifies bearer "
                "tokens (`make run-all` sets AUTH_PUBLIC_KEY_FILE to its development issuer's key)"
            )
        return cls(
            public_key_pem=Path(key_file).read_bytes() if key_file else None,
            jwks_url=None if key_file else jwks_url,
            issuer=setting("AUTH_ISSUER") or DEFAULT_ISSUER,
            audience=setting("AUTH_AUDIENCE") or DEFAULT_AUDIENCE,
        )

    def verify(self, token: str) -> Principal:
        """The token's principal. A token verified before is answered from memory until it
        expires: a client sends the same token with every request, and the signature check
        is the largest part of authenticating one."""
        known = self._verified.get(token)
        if known is not None and time.time() < (known.expires_at or 0) + LEEWAY_SECONDS:
            return known
        principal = self._verify(token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.clear()  # bounded: many distinct tokens only cost re-verification
        self._verified[token] = principal
        return principal

    def _verify(self, token: str) -> Principal:
        try:
            if self._jwks is not None:
                signing = self._jwks.get_signing_key_from_jwt(token)
                key, algorithms = signing.key, [signing.algorithm_name]
                if algorithms[0] not in _ASYMMETRIC:
                    raise InvalidToken("The token's key is not an asymmetric signing key.")
            else:
                key, algorithms = self._key, self._algorithms
            claims = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError as err:
            raise InvalidToken("The token has expired.") from err
        except jwt.InvalidSignatureError as err:
            raise InvalidToken("The token's signature does not verify.") from err
        except jwt.InvalidAudienceError as err:
            raise InvalidToken("The token is not meant for this audience.") from err
        except jwt.InvalidIssuerError as err:
            raise InvalidToken("The token is from another issuer.") from err
        except jwt.MissingRequiredClaimError as err:
            raise InvalidToken(f"The token has no {err.claim!r} claim.") from err
        except (jwt.PyJWTError, ValueError) as err:  # malformed, unknown kid, bad algorithm
            raise InvalidToken("The token is malformed or cannot be verified.") from err
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise InvalidToken("The token's subject is not a string.")
        return Principal(subject, _scopes(claims), expires_at=float(claims["exp"]))


def _public_key(pem: bytes) -> tuple[Any, list[str]]:
    """The key and the algorithms it can verify, fixed by the configuration, never taken from
    the token's own header (RFC 8725 §2.1)."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(pem)
    except ValueError as err:
        raise AuthConfigError("AUTH_PUBLIC_KEY_FILE holds no PEM public key") from err
    if isinstance(key, rsa.RSAPublicKey):
        return key, ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
    if isinstance(key, ec.EllipticCurvePublicKey):
        by_curve = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        return key, [by_curve[key.curve.name]]
    if isinstance(key, ed25519.Ed25519PublicKey) and "EdDSA" in get_default_algorithms():
        return key, ["EdDSA"]
    raise AuthConfigError(f"unsupported public key type {type(key).__name__}")


def _scopes(claims: dict[str, Any]) -> frozenset[str]:
    raw = claims.get("scope", claims.get("scp", ""))
    if isinstance(raw, str):
        return frozenset(raw.split())
    if isinstance(raw, list):
        return frozenset(str(item) for item in raw)
    return frozenset()


# -- the Flask side ------------------------------------------------------------------------------


def requires(*scopes: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare the scopes that may call a view (any one of them suffices) and document the
    bearer requirement on the operation."""
    allowed = tuple(scopes) or (ADMIN,)
    note = " or ".join(f"`{scope}`" for scope in allowed)
    document = flask_smorest.Blueprint.doc(
        security=[{SCHEME_NAME: []}],
        responses={
            "401": {"description": "No token, or a malformed, expired or wrongly signed one"},
            "403": {"description": f"The token has none of the scopes {note}"},
        },
    )

    def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
        wrapped = document(view)
        wrapped._required_scopes = allowed  # type: ignore[attr-defined]
        doc = wrapped._apidoc["manual_doc"]  # type: ignore[attr-defined]
        doc["description"] = ((view.__doc__ or "").strip() + f"\n\nScope: {note}.").strip()
        return wrapped

    return decorator


def principal() -> Principal:
    """The caller of the current request (set by the hook before any view runs)."""
    return g.principal


def customer_scope() -> str | None:
    """The customer the caller is confined to: its `sub` for a customer, None for an operator."""
    caller = principal()
    return None if caller.is_admin else caller.subject


def install(app: Flask, verifier: Verifier | None = None) -> None:
    """Authenticate every non-public request; declare the bearer scheme in the OpenAPI document
    (Swagger UI's "Authorize" button uses it)."""
    app.extensions["auth_verifier"] = verifier or Verifier.from_settings()
    api = app.extensions["flask-smorest"]["apis"][""]["ext_obj"]
    api.spec.components.security_scheme(
        SCHEME_NAME,
        {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": "A JWT with scope `customer` (sub = the customer id) or `admin`. "
            "On the embedded stack: `saga token customer alice`, `saga token admin`.",
        },
    )
    app.before_request(_authenticate)


def _authenticate() -> None:
    endpoint = request.endpoint
    if endpoint is None or endpoint in PUBLIC_ENDPOINTS or request.path in PUBLIC_PATHS:
        return  # unknown URLs answer 404/405 as before; public ones need nothing
    if request.method == "OPTIONS":
        return
    scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer":
        # RFC 6750 §3.1: no credentials for this scheme -> a challenge without an error code
        _unauthorized("A bearer token is required (Authorization: Bearer <token>).", None)
    if not token.strip():
        _unauthorized("The bearer token is empty.", "invalid_token")
    verifier: Verifier = current_app.extensions["auth_verifier"]
    try:
        caller = verifier.verify(token.strip())
    except InvalidToken as err:
        _unauthorized(str(err), "invalid_token")
    g.principal = caller
    allowed = _declared_scopes(endpoint)
    if not caller.scopes & set(allowed):
        wanted = " ".join(allowed)
        abort(
            403,
            message=f"This needs a token with scope {' or '.join(allowed)}.",
            headers={
                "WWW-Authenticate": f'Bearer realm="{REALM}", error="insufficient_scope", '
                f'error_description="The token lacks the scope this needs", scope="{wanted}"'
            },
        )


def _unauthorized(message: str, error: str | None) -> None:
    challenge = f'Bearer realm="{REALM}"'
    if error:
        description = message.rstrip(".").replace('"', "'")
        challenge += f', error="{error}", error_description="{description}"'
    abort(401, message=message, headers={"WWW-Authenticate": challenge})


@functools.cache
def _scopes_of(view: Callable[..., Any], method: str) -> tuple[str, ...]:
    handler = getattr(getattr(view, "view_class", None), method, None) or view
    return getattr(handler, "_required_scopes", (ADMIN,))


def _declared_scopes(endpoint: str) -> tuple[str, ...]:
    view = current_app.view_functions[endpoint]
    method = request.method.lower()
    return _scopes_of(view, "get" if method == "head" else method)
