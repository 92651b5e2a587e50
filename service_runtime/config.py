"""Configuration from the environment, the one place every process reads it.

When a variable is not set, the values written by the embedded dev stack
(`.run/stack.env`, see devstack) are used, so `saga ...` commands run in another
terminal see the same servers as `make run-all`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

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


def redis_url(role: str | None = None) -> str:
    """REDIS_URL, or for a `role` ("orders_relay", "billing_consumer") its own
    `<ROLE>_REDIS_URL` when set: the embedded stack gives each process its own Redis user
    (DESIGN.md §9). A REDIS_URL given in the environment is used with the roles' URLs given
    beside it only, never with the embedded stack's (other servers, other credentials)."""
    if role:
        key = f"{role.upper()}_REDIS_URL"
        if "REDIS_URL" in os.environ:
            own = os.environ.get(key)
        else:
            own = read_env_file(stack_env_file()).get(key)
        if own:
            return own
    url = setting("REDIS_URL")
    if not url:
        raise ConfigError("REDIS_URL is not set and no embedded stack is running")
    return url


def redis_cluster() -> bool:
    """REDIS_CLUSTER=1 (or true/yes/on): REDIS_URL names any node of a Redis Cluster."""
    return is_true(setting("REDIS_CLUSTER"))


def is_true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def rq_redis_url() -> str:
    """The plain Redis for rq (worker, cron, jobs): RQ_REDIS_URL, else REDIS_URL.

    rq does not support Redis Cluster (its queues are many keys touched by one MULTI and by
    Lua), so with REDIS_CLUSTER=1 rq needs a Redis of its own and falling back would be wrong.
    """
    url = setting("RQ_REDIS_URL")
    if "REDIS_URL" in os.environ and "RQ_REDIS_URL" not in os.environ:
        url = None  # the given Redis, not the embedded stack's rq user
    if url:
        return url
    if redis_cluster():
        raise ConfigError(
            "REDIS_CLUSTER=1 but RQ_REDIS_URL is not set: rq does not support Redis Cluster,"
            " set RQ_REDIS_URL to a plain (non-cluster) Redis for rq"
        )
    return redis_url()


def http_port(service: str) -> int:
    return int(setting(f"{service.upper()}_PORT") or DEFAULT_PORTS[service])


DEFAULT_CONSOLE_PORT = 8000


def console_port() -> int:
    """CONSOLE_PORT: where `saga console` listens on 127.0.0.1 (8000)."""
    return _whole_number("CONSOLE_PORT", DEFAULT_CONSOLE_PORT, 1, 65535)


def stream_partitions() -> int:
    """STREAM_PARTITIONS: the partition count of the whole deployment (DESIGN.md §6a)."""
    from contracts.streams import DEFAULT_PARTITIONS, MAX_PARTITIONS

    return _whole_number("STREAM_PARTITIONS", DEFAULT_PARTITIONS, 1, MAX_PARTITIONS)


DEFAULT_CONSUMERS_PER_SERVICE = 2
# Each consumer of a service has its own metrics port (sagactl/processes.py): 9 per service.
MAX_CONSUMERS_PER_SERVICE = 9


def consumers_per_service() -> int:
    """CONSUMERS_PER_SERVICE: consumer processes per group under `make run-all`."""
    return _whole_number(
        "CONSUMERS_PER_SERVICE", DEFAULT_CONSUMERS_PER_SERVICE, 1, MAX_CONSUMERS_PER_SERVICE
    )


def _whole_number(name: str, default: int, low: int, high: int) -> int:
    """A whole-number setting within [low, high], else a ConfigError naming it and the range."""
    raw = (setting(name) or str(default)).strip()
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise ConfigError(f"{name} must be a whole number from {low} to {high}, not {raw!r}")
    return int(raw)


DEFAULT_PAYMENT_TIMEOUT_SECONDS = 30


def payment_timeout_seconds() -> int:
    return int(setting("PAYMENT_TIMEOUT_SECONDS") or DEFAULT_PAYMENT_TIMEOUT_SECONDS)


def payment_sweep_seconds() -> int:
    """How often the deadline sweeper runs (PAYMENT_SWEEP_SECONDS, default 5): an overdue
    order is cancelled at most this late. Each run is an rq job in a forked process: once a
    second was most of the idle system's cost."""
    return _whole_number("PAYMENT_SWEEP_SECONDS", 5, 1, 3600)


def from_env(cls: type[T], prefix: str, **given: Any) -> T:
    """A dataclass of knobs; each field not given comes from the variable PREFIX + FIELD
    (e.g. CONSUMER_BATCH_SIZE for ConsumerSettings.batch_size), else its default.

    The defaults live once, on the dataclass; this only reads overrides."""
    values = dict(given)
    for field in dataclasses.fields(cls):
        if field.name in values:
            continue
        raw = setting(f"{prefix}{field.name.upper()}")
        if raw not in (None, ""):
            values[field.name] = type(field.default)(raw)
    return cls(**values)
