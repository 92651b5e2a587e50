"""The embedded stack's development token issuer (`saga token`).

At first start an EC P-256 key pair is generated under `<run_dir>/auth/`: `issuer-key.pem`
(the signing key, mode 0600, read only by `saga token` and the load generators) and
`issuer-public.pem` (what the services verify with, as AUTH_PUBLIC_KEY_FILE). The services
never see the signing key. A real deployment uses its identity provider instead
(AUTH_JWKS_URL) and has no such folder.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from service_runtime.auth import ADMIN, CUSTOMER, DEFAULT_AUDIENCE, DEFAULT_ISSUER

ALGORITHM = "ES256"
KEY_ID = "saga-dev-1"
DEFAULT_TTL_SECONDS = 3600


def key_dir(run_dir: Path | str) -> Path:
    return Path(run_dir) / "auth"


def public_key_file(run_dir: Path | str) -> Path:
    return key_dir(run_dir) / "issuer-public.pem"


def private_key_file(run_dir: Path | str) -> Path:
    return key_dir(run_dir) / "issuer-key.pem"


def ensure_key_pair(run_dir: Path | str) -> Path:
    """Generate the key pair unless it exists; returns the public key's file."""
    directory = key_dir(run_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    private, public = private_key_file(run_dir), public_key_file(run_dir)
    if private.exists() and public.exists():
        return public
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # the public key first: a concurrent start that sees the private key sees its public one
    _write_new(public, public_pem, 0o644)
    _write_new(private, private_pem, 0o600)
    return public


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(temporary, mode)
    os.replace(temporary, path)


def sign(
    private_key_pem: bytes,
    subject: str,
    scopes: tuple[str, ...],
    *,
    ttl_seconds: float = DEFAULT_TTL_SECONDS,
    issuer: str = DEFAULT_ISSUER,
    audience: str = DEFAULT_AUDIENCE,
    now: float | None = None,
) -> str:
    """A signed JWT for `subject` with `scopes` (space-separated in the `scope` claim)."""
    issued = int(time.time() if now is None else now)
    claims = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "scope": " ".join(scopes),
        "iat": issued,
        "exp": issued + int(ttl_seconds),
        "jti": str(uuid.uuid4()),
    }
    return jwt.encode(claims, private_key_pem, algorithm=ALGORITHM, headers={"kid": KEY_ID})


def customer_token(run_dir: Path | str, customer_id: str, ttl_seconds: float = DEFAULT_TTL_SECONDS):
    return sign(_private_pem(run_dir), customer_id, (CUSTOMER,), ttl_seconds=ttl_seconds)


def admin_token(
    run_dir: Path | str, subject: str = "operator", ttl_seconds: float = DEFAULT_TTL_SECONDS
) -> str:
    return sign(_private_pem(run_dir), subject, (ADMIN,), ttl_seconds=ttl_seconds)


def _private_pem(run_dir: Path | str) -> bytes:
    path = private_key_file(run_dir)
    if not path.exists():
        raise FileNotFoundError(
            f"no development issuer key at {path}: start the embedded stack first "
            "(`make run-all` or `saga stack up`)"
        )
    return path.read_bytes()
