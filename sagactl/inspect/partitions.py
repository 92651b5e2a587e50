"""The partitioned layout as the inspection commands see it (DESIGN.md §6a), computed once here.

P comes from one place (service_runtime.partitions.partitions_in_use: STREAM_PARTITIONS, else
what the deployment recorded). A stream argument may name a base stream (`orders.events`: all
its partitions) or one partition stream (`orders.events.{p3}`). Owners come from each group's
partition_leases (service_runtime.ownership.owners). Entry ids are unique only within one
stream, so entries of several partitions are ordered with `id_key`, never as text.
"""

from __future__ import annotations

from typing import Any

import click
import redis

from contracts import (
    STREAM_OF_PRODUCER,
    SUBSCRIPTIONS,
    base_of,
    partition_index,
    partition_stream,
)
from sagactl.inspect.common import iso, open_db
from service_runtime.ownership import owners
from service_runtime.partitions import partitions_in_use

GROUPS = tuple(SUBSCRIPTIONS)
EVENT_BASES = tuple(STREAM_OF_PRODUCER.values())
Entry = tuple[str, dict[str, str]]


def deployment_partitions() -> int:
    """P of the deployment being inspected (the one helper every command uses)."""
    return partitions_in_use(open_db)


def id_key(entry_id: str) -> tuple[int, int]:
    """Sort key of a stream entry id: `1714557600000-12` -> (1714557600000, 12)."""
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)


def redrive_base(group: str) -> str:
    return f"{group}.redrive"


def all_bases() -> list[str]:
    """Every base stream: the events, then each group's re-drive stream (dead letters are rows
    of each group's database, not streams)."""
    per_group = [redrive_base(g) for g in GROUPS]
    return [*EVENT_BASES, *per_group]


def partition_streams(base: str, partitions: int) -> list[str]:
    return [partition_stream(base, p) for p in range(partitions)]


def resolve_stream(name: str, partitions: int) -> list[str]:
    """A base name -> its P partition streams; a partition stream -> itself. Unknown: error."""
    index = partition_index(name)
    if base_of(name) in all_bases() and (index is None or index < partitions):
        return [name] if index is not None else partition_streams(name, partitions)
    raise click.ClickException(
        f"no stream named {name!r} (streams: {', '.join(all_bases())}, each with partitions "
        f"{partition_stream('', 0)[1:]} to {partition_stream('', partitions - 1)[1:]})"
    )


def reads(group: str) -> tuple[str, ...]:
    """The base streams a group reads: its subscriptions, then its own re-drive stream."""
    return (*SUBSCRIPTIONS[group], redrive_base(group))


def check_group(group: str) -> None:
    if group not in SUBSCRIPTIONS:
        raise click.ClickException(f"unknown group {group!r} (groups: {', '.join(GROUPS)})")


# -- ownership ---------------------------------------------------------------------------------


def group_owners(group: str) -> dict[int, dict[str, Any]]:
    """Each partition's lease in the group's database: owner, epoch, live, times."""
    with open_db(group) as conn:
        rows = owners(conn, group)
    return {
        row["partition"]: {
            "owner": row["owner"],
            "epoch": row["epoch"],
            "live": row["live"],
            "acquired_at": iso(row["acquired_at"]),
            "expires_at": iso(row["expires_at"]),
        }
        for row in rows
    }


NO_OWNER: dict[str, Any] = {
    "owner": None,
    "epoch": None,
    "live": False,
    "acquired_at": None,
    "expires_at": None,
}


def lease_text(lease: dict[str, Any]) -> str:
    if lease["owner"] is None:
        return "none"
    return "live" if lease["live"] else "expired"


def owner_text(lease: dict[str, Any]) -> str:
    """The owner as a table shows it: an expired lease's holder in parentheses."""
    if lease["owner"] is None:
        return "-"
    return lease["owner"] if lease["live"] else f"({lease['owner']})"


def scan_for_events(
    client: redis.Redis, stream: str, event_ids: set[str], start: str = "-", limit: int = 100_000
) -> dict[str, str]:
    """event_id -> entry id, for the given events found in `stream` (scanning at most `limit`
    entries from `start`, stopping once all are found)."""
    found: dict[str, str] = {}
    scanned = 0
    while event_ids - set(found) and scanned < limit:
        page = client.xrange(stream, min=start, max="+", count=1000)
        for entry_id, fields in page:
            event_id = fields.get("event_id")
            if event_id in event_ids and event_id not in found:
                found[event_id] = entry_id
        scanned += len(page)
        if len(page) < 1000:
            break
        start = f"({page[-1][0]}"
    return found
