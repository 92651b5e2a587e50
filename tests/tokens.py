"""Bearer tokens for the tests: one development issuer key pair per test session.

`tests/conftest.py` calls `install()` once (autouse): the services built in-process and the
processes the tests start read AUTH_PUBLIC_KEY_FILE from the environment, as under run-all.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from devstack import issuer

_run_dir: Path | None = None


def install() -> Path:
    """Create the session's key pair (once) and point AUTH_PUBLIC_KEY_FILE at it."""
    global _run_dir
    if _run_dir is None:
        _run_dir = Path(tempfile.mkdtemp(prefix="saga-test-issuer-"))
        issuer.ensure_key_pair(_run_dir)
    public = issuer.public_key_file(_run_dir)
    os.environ["AUTH_PUBLIC_KEY_FILE"] = str(public)
    return public


def remove() -> None:
    global _run_dir
    if _run_dir is not None:
        shutil.rmtree(_run_dir, ignore_errors=True)
        _run_dir = None


def run_dir() -> Path:
    install()
    assert _run_dir is not None
    return _run_dir


def admin(ttl_seconds: float = 3600) -> str:
    return issuer.admin_token(run_dir(), ttl_seconds=ttl_seconds)


def customer(customer_id: str, ttl_seconds: float = 3600) -> str:
    return issuer.customer_token(run_dir(), customer_id, ttl_seconds=ttl_seconds)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def authorize(client, token: str | None = None):
    """A Flask test client that sends `token` (an operator's by default) on every request."""
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token or admin()}"
    return client
