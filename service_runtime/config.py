"""Configuration from the environment, the one place every process reads it.

When a variable is not set, the values written by the embedded dev stack
(`.run/stack.env`, see devstack) are used, so `saga ...` commands run in another
terminal see the same servers as `make run-all`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SERVICES = ("orders", "inventory", "billing")
DEFAULT_PORTS = {"orders": 8001, "inventory": 8002, "billing": 8003}
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def run_dir() -> Path:
    return Path(os.environ.get("SAGA_RUN_DIR", PROJECT_ROOT / ".run"))


def stack_env_file() -> Path:
    return run_dir() / "stack.env"


def read_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if not path.exists():
        return values
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def setting(name: str, default: str | None = None) -> str | None:
    """An environment variable, else the embedded stack's value, else the default."""
    if name in os.environ:
        return os.environ[name]
    return read_env_file(stack_env_file()).get(name, default)


class ConfigError(RuntimeError):
    pass


def database_url(service: str) -> str:
    key = f"{service.upper()}_DATABASE_URL"
    url = setting(key)
    if not url:
        raise ConfigError(f"{key} is not set and no embedded stack is running (try `make run-all`)")
    return url


def redis_url() -> str:
    url = setting("REDIS_URL")
    if not url:
        raise ConfigError("REDIS_URL is not set and no embedded stack is running")
    return url


def http_port(service: str) -> int:
    return int(setting(f"{service.upper()}_PORT") or DEFAULT_PORTS[service])


@dataclass(frozen=True)
class Tunables:
    """Knobs of the messaging plumbing; defaults suit a laptop, tests shrink them."""

    relay_batch_size: int = 500
    relay_poll_seconds: float = 1.0
    relay_standby_retry_seconds: float = 1.0
    consumer_batch_size: int = 100
    consumer_block_ms: int = 1000
    consumer_claim_idle_ms: int = 30_000
    consumer_retry_base_ms: int = 500
    consumer_max_deliveries: int = 5
    payment_timeout_seconds: int = 30

    @classmethod
    def from_env(cls) -> Tunables:
        def num(name: str, default: float, kind: type = int):
            raw = setting(name)
            return kind(raw) if raw not in (None, "") else default

        d = cls()
        return cls(
            relay_batch_size=num("RELAY_BATCH_SIZE", d.relay_batch_size),
            relay_poll_seconds=num("RELAY_POLL_SECONDS", d.relay_poll_seconds, float),
            relay_standby_retry_seconds=num(
                "RELAY_STANDBY_RETRY_SECONDS", d.relay_standby_retry_seconds, float
            ),
            consumer_batch_size=num("CONSUMER_BATCH_SIZE", d.consumer_batch_size),
            consumer_block_ms=num("CONSUMER_BLOCK_MS", d.consumer_block_ms),
            consumer_claim_idle_ms=num("CONSUMER_CLAIM_IDLE_MS", d.consumer_claim_idle_ms),
            consumer_retry_base_ms=num("CONSUMER_RETRY_BASE_MS", d.consumer_retry_base_ms),
            consumer_max_deliveries=num("CONSUMER_MAX_DELIVERIES", d.consumer_max_deliveries),
            payment_timeout_seconds=num("PAYMENT_TIMEOUT_SECONDS", d.payment_timeout_seconds),
        )
