"""The operator credential that a re-drive asks for.

Until the project has user authentication, it is one password generated at the console's first
start into the run folder's secrets (`.run/secrets/console-operator`, mode 0600, like every
other secret of the stack) and read there by the operator; it is never printed, logged or
shown. When operator logins exist, the same check becomes the login.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from devstack.secrets import secret
from service_runtime.config import run_dir

SECRET_NAME = "console-operator"


def password_file() -> Path:
    return run_dir() / "secrets" / SECRET_NAME


def operator_password() -> str:
    """The password (created on first use)."""
    return secret(run_dir(), SECRET_NAME)


def is_operator(given: str | None) -> bool:
    """Whether `given` is the operator password (compared in constant time)."""
    if not given:
        return False
    return hmac.compare_digest(given.encode(), operator_password().encode())
