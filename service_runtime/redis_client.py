"""Redis connections for stream work."""

from __future__ import annotations

import redis

# What "Redis is unreachable" looks like: back off and retry, never crash.
REDIS_OUTAGE_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    redis.BusyLoadingError,
)


def connect(url: str) -> redis.Redis:
    # The socket timeout must outlast the longest XREADGROUP BLOCK we issue.
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        socket_connect_timeout=3,
        socket_timeout=15,
        health_check_interval=30,
    )
