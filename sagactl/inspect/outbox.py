"""`saga outbox`: per service, what waits to be published and which relay is publishing it.

LAST PUBLISH is the newest published_at of the outbox itself, the time the relay marked the
row published, on the database's clock (and its age on the same clock). The relay's status
hash only says who is active and since when: the relay writes it at most once a second, so a
time taken from it would lag behind the truth.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click
import psycopg

from contracts import relay_status_key
from sagactl.inspect.common import (
    duration,
    friendly_errors,
    iso,
    json_option,
    millis_between,
    open_db,
    open_redis,
    print_json,
    short_time,
    table,
)
from service_runtime.config import SERVICES
from service_runtime.locks import RELAY_LOCK_KEY
from service_runtime.redis_client import RedisClient

# pg_try_advisory_lock(bigint) shows in pg_locks as classid = high 32 bits, objid = low 32
# bits, objsubid = 1; locks are per database, so only this database's row counts.
_OUTBOX_STATE = """
SELECT
    (SELECT count(*) FROM outbox WHERE published_at IS NULL),
    (SELECT min(created_at) FROM outbox WHERE published_at IS NULL),
    (SELECT max(published_at) FROM outbox WHERE published_at IS NOT NULL),
    clock_timestamp(),
    EXISTS (
        SELECT 1 FROM pg_locks
        WHERE locktype = 'advisory' AND granted AND classid = 0 AND objid = %s AND objsubid = 1
          AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
    )
"""


def outbox_report(conn: psycopg.Connection, relay: dict[str, str]) -> dict[str, Any]:
    unpublished, oldest, last_published, now, locked = conn.execute(
        _OUTBOX_STATE, (RELAY_LOCK_KEY,)
    ).fetchone()
    return {
        "unpublished": unpublished,
        "oldest_unpublished_at": iso(oldest),
        "oldest_unpublished_age_ms": millis_between(oldest, now),
        # pruned rows take their times with them: None once the whole window is pruned
        "last_published_at": iso(last_published),
        "last_published_age_ms": millis_between(last_published, now),
        "relay": {
            # the hash outlives a dead relay; the lock says whether one is active now
            "lock_held": locked,
            "holder": relay.get("holder"),
            "active_since": iso(_hash_time(relay.get("active_since"))),
            "published": int(relay["published"]) if relay.get("published") else None,
        },
    }


def _hash_time(text: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(text) if text else None
    except ValueError:
        return None  # someone else's value in our hash: show nothing rather than fail


def outbox_reports(client: RedisClient) -> dict[str, dict[str, Any]]:
    """outbox_report of every service, by service (what `saga outbox` and the console show)."""
    reports = {}
    for service in SERVICES:
        with open_db(service) as conn:
            reports[service] = outbox_report(conn, client.hgetall(relay_status_key(service)))
    return reports


@click.command()
@json_option
@friendly_errors
def outbox(as_json: bool) -> None:
    """Unpublished outbox rows and the active relays.

    Per service: unpublished rows, the oldest one's age, whether a relay holds the outbox's
    lock, which one, and when it last published.
    """
    reports = outbox_reports(open_redis())
    if as_json:
        print_json({"outbox": reports})
        return
    rows = []
    for service, r in reports.items():
        relay = r["relay"]
        holder = relay["holder"] if relay["lock_held"] else f"none (last: {relay['holder']})"
        last = r["last_published_at"]
        age = duration(r["last_published_age_ms"])
        rows.append(
            [
                service,
                r["unpublished"],
                duration(r["oldest_unpublished_age_ms"]),
                "yes" if relay["lock_held"] else "no",
                holder if relay["holder"] else ("?" if relay["lock_held"] else "none"),
                short_time(relay["active_since"]),
                f"{short_time(last)} ({age} ago)" if age else short_time(last),
                relay["published"],
            ]
        )
    headers = [
        "SERVICE",
        "UNPUBLISHED",
        "OLDEST",
        "LOCK",
        "ACTIVE RELAY",
        "ACTIVE SINCE",
        "LAST PUBLISH",
        "PUBLISHED",
    ]
    click.echo(table(headers, rows))


COMMANDS: list[click.Command] = [outbox]
