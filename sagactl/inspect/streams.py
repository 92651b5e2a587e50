"""`saga streams`, `saga tail` and `saga pending`: what is in Redis and who is behind."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import click
import redis

from contracts import (
    ENVELOPE_FIELDS,
    STREAM_OF_PRODUCER,
    SUBSCRIPTIONS,
    dead_letter_stream,
    redrive_stream,
)
from sagactl.inspect.common import (
    duration,
    entry_time,
    friendly_errors,
    json_option,
    open_redis,
    parse_payload,
    print_json,
    short_time,
    table,
)
from service_runtime.redis_client import scan_keys

EVENT_STREAMS = tuple(STREAM_OF_PRODUCER.values())
GROUPS = tuple(SUBSCRIPTIONS)
# Counting lag by hand (Redis < 7) walks the undelivered entries; stop somewhere sane.
LAG_COUNT_LIMIT = 10_000
# `tail --type` walks back until it has COUNT matches; bounded for a type that never comes.
TAIL_SCAN_LIMIT = 100_000
Entry = tuple[str, dict[str, str]]


def known_streams() -> tuple[str, ...]:
    """Every stream the system may write: events, and each group's dead letters and re-drives."""
    per_group = [name for g in GROUPS for name in (dead_letter_stream(g), redrive_stream(g))]
    return (*EVENT_STREAMS, *per_group)


def existing_streams(client: redis.Redis) -> list[str]:
    """The event streams (always) plus the dead-letter and re-drive streams that exist."""
    found = {
        key
        for pattern in ("*.dead-letters", "*.redrive")
        for key in scan_keys(client, pattern, type_="stream")  # every master of a cluster
    }
    return [*EVENT_STREAMS, *sorted(found)]


def as_pairs(reply: Any) -> list[tuple[str, list[Entry]]]:
    """XREAD's reply: a list of [stream, entries] (RESP2) or a dict (RESP3); None when empty."""
    if not reply:
        return []
    return list(reply.items()) if isinstance(reply, dict) else [(s, e) for s, e in reply]


# -- saga streams ------------------------------------------------------------------------------

# A group's dead letters come from all the streams it reads; counting them per stream means
# reading the dead-letter stream, so only up to this many (a long one keeps its total only).
DEAD_LETTER_SCAN_LIMIT = 10_000


def dead_letter_origins(client: redis.Redis, group: str) -> Counter[str] | None:
    """How many of group's dead letters came from each stream; None when too many to read."""
    source = dead_letter_stream(group)
    if client.xlen(source) > DEAD_LETTER_SCAN_LIMIT:
        return None
    origins: Counter[str] = Counter()
    start = "-"
    while page := client.xrange(source, min=start, max="+", count=1000):
        origins.update(fields.get("original_stream", "?") for _id, fields in page)
        start = f"({page[-1][0]}"
    return origins


def stream_report(
    client: redis.Redis, stream: str, origins: dict[str, Counter[str] | None]
) -> dict[str, Any]:
    if client.type(stream) != "stream":
        return {
            "stream": stream,
            "exists": False,
            "length": 0,
            "first_entry_id": None,
            "first_entry_at": None,
            "last_entry_id": None,
            "last_entry_at": None,
            "groups": [],
        }
    info = client.xinfo_stream(stream)
    first = (info.get("first-entry") or [None])[0]
    last = (info.get("last-entry") or [None])[0]
    return {
        "stream": stream,
        "exists": True,
        "length": info["length"],
        "first_entry_id": first,
        "first_entry_at": entry_time(first),
        "last_entry_id": last,
        "last_entry_at": entry_time(last),
        "groups": [group_report(client, stream, g, origins) for g in client.xinfo_groups(stream)],
    }


def group_report(
    client: redis.Redis, stream: str, info: dict[str, Any], origins: dict[str, Counter[str] | None]
) -> dict[str, Any]:
    group = info["name"]
    from_here = origins.get(group)
    lag, lag_source, capped = info.get("lag"), "redis", False
    if lag is None:  # Redis 6.2, or Redis 7 when it cannot tell (deleted entries)
        lag, capped = count_after(client, stream, info["last-delivered-id"])
        lag_source = "counted"
    oldest_id = oldest_idle = None
    if info["pending"]:
        oldest_id = client.xpending(stream, group)["min"]
        oldest = client.xpending_range(stream, group, min=oldest_id, max=oldest_id, count=1)
        oldest_idle = oldest[0]["time_since_delivered"] if oldest else None
    return {
        "group": group,
        "consumers": info["consumers"],
        "pending": info["pending"],
        "last_delivered_id": info["last-delivered-id"],
        "lag": lag,
        "lag_source": lag_source,
        "lag_capped": capped,
        "oldest_pending_id": oldest_id,
        "oldest_pending_idle_ms": oldest_idle,
        "dead_letters": client.xlen(dead_letter_stream(group)),
        "dead_letters_from_stream": None if from_here is None else from_here[stream],
    }


def count_after(client: redis.Redis, stream: str, after_id: str) -> tuple[int, bool]:
    """Entries with an id greater than after_id, counted up to LAG_COUNT_LIMIT."""
    counted, start = 0, f"({after_id}"
    while counted < LAG_COUNT_LIMIT:
        page_size = min(1000, LAG_COUNT_LIMIT - counted)
        page = client.xrange(stream, min=start, max="+", count=page_size)
        counted += len(page)
        if len(page) < page_size:
            return counted, False
        start = f"({page[-1][0]}"
    return counted, True


@click.command()
@json_option
@friendly_errors
def streams(as_json: bool) -> None:
    """Streams, their consumer groups, lag and dead letters.

    Per stream: length, first and last entry time. Per group: consumers, pending entries,
    lag (entries not delivered yet), the oldest pending entry's idle time, dead letters.
    """
    client = open_redis()
    origins = {group: dead_letter_origins(client, group) for group in GROUPS}
    reports = [stream_report(client, name, origins) for name in existing_streams(client)]
    if as_json:
        print_json({"streams": reports})
        return
    click.echo(
        table(
            ["STREAM", "LENGTH", "FIRST ENTRY", "LAST ENTRY"],
            [
                [
                    r["stream"] + ("" if r["exists"] else " (absent)"),
                    r["length"],
                    short_time(r["first_entry_at"]),
                    short_time(r["last_entry_at"]),
                ]
                for r in reports
            ],
        )
    )
    rows = [
        [
            r["stream"],
            g["group"],
            g["consumers"],
            g["pending"],
            f">={g['lag']}" if g["lag_capped"] else g["lag"],
            duration(g["oldest_pending_idle_ms"]),
            _dead_letters_cell(g),
        ]
        for r in reports
        for g in r["groups"]
    ]
    headers = ["STREAM", "GROUP", "CONSUMERS", "PENDING", "LAG", "OLDEST PENDING", "DEAD LETTERS"]
    click.echo()
    click.echo(table(headers, rows) if rows else "no consumer groups yet")


def _dead_letters_cell(group: dict[str, Any]) -> str:
    if group["dead_letters_from_stream"] is None:
        return f"{group['dead_letters']} (all streams)"
    return str(group["dead_letters_from_stream"])


# -- saga tail ---------------------------------------------------------------------------------


def readable(entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """An entry as a reader wants it; never fails, since invalid entries are worth seeing too."""
    return {
        "id": entry_id,
        "time": entry_time(entry_id),
        "event_type": fields.get("event_type"),
        "event_id": fields.get("event_id"),
        "aggregate_id": fields.get("aggregate_id"),
        "correlation_id": fields.get("correlation_id"),
        "producer": fields.get("producer"),
        "payload": parse_payload(fields.get("payload")),
        # dead letters carry their story (error, attempts, original_stream, ...) besides
        "extra": {k: v for k, v in fields.items() if k not in ENVELOPE_FIELDS},
    }


def tail_line(event: dict[str, Any]) -> str:
    payload = event["payload"]
    text = json.dumps(payload, separators=(",", ":")) if not isinstance(payload, str) else payload
    extra = "".join(f"  {k}={v}" for k, v in event["extra"].items())
    return (
        f"{short_time(event['time'])}  {event['event_type'] or '?':<22}  "
        f"aggregate={event['aggregate_id']}  correlation={event['correlation_id']}  {text}{extra}"
    )


def check_stream(client: redis.Redis, stream: str) -> None:
    kind = client.type(stream)
    if kind == "none" and stream in known_streams():
        return  # a known stream nobody has written yet: simply empty
    if kind != "stream":
        known = ", ".join(existing_streams(client))
        raise click.ClickException(f"no stream named {stream!r} (streams: {known})")


def last_entries(
    client: redis.Redis, stream: str, top_id: str, count: int, event_type: str | None
) -> list[Entry]:
    """The last `count` entries up to top_id (of one type if asked), oldest first."""
    found: list[Entry] = []
    start, scanned = top_id, 0
    while len(found) < count and scanned < TAIL_SCAN_LIMIT:
        page = client.xrevrange(stream, max=start, min="-", count=500)
        scanned += len(page)
        found += [e for e in page if event_type in (None, e[1].get("event_type"))]
        if len(page) < 500:
            break
        start = f"({page[-1][0]}"
    return list(reversed(found[:count]))


def follow_entries(
    client: redis.Redis, stream: str, after_id: str, block_ms: int = 1000
) -> Iterator[Entry]:
    """New entries after after_id as they arrive (XREAD BLOCK); runs until interrupted."""
    while True:
        for _stream, entries in as_pairs(
            client.xread({stream: after_id}, count=100, block=block_ms)
        ):
            for entry in entries:
                after_id = entry[0]
                yield entry


@click.command()
@click.argument("stream")
@click.option("--follow", "-f", is_flag=True, help="Keep printing new entries until Ctrl-C.")
@click.option("--type", "event_type", help="Only events of this type.")
@click.option(
    "--count", "-n", default=10, show_default=True, type=click.IntRange(min=0), help="How many."
)
@json_option
@friendly_errors
def tail(stream: str, follow: bool, event_type: str | None, count: int, as_json: bool) -> None:
    """The last events of STREAM, decoded.

    With --follow, new events are printed as they arrive until Ctrl-C; with --json too,
    as one JSON object per line.
    """
    client = open_redis()
    check_stream(client, stream)
    newest = client.xrevrange(stream, max="+", min="-", count=1)
    top_id = newest[0][0] if newest else "0-0"
    events = [readable(*e) for e in last_entries(client, stream, top_id, count, event_type)]
    if as_json and not follow:
        print_json({"stream": stream, "entries": events})
        return
    for event in events:
        click.echo(json.dumps(event) if as_json else tail_line(event))
    if not follow:
        if not events:
            click.echo(f"{stream}: no entries" + (f" of type {event_type}" if event_type else ""))
        return
    try:
        for entry in follow_entries(client, stream, top_id):
            if event_type in (None, entry[1].get("event_type")):
                event = readable(*entry)
                click.echo(json.dumps(event) if as_json else tail_line(event))
    except KeyboardInterrupt:
        pass  # Ctrl-C is how --follow ends: not an error


# -- saga pending ------------------------------------------------------------------------------


def group_streams(group: str, stream: str | None) -> tuple[str, ...]:
    if group not in SUBSCRIPTIONS:
        raise click.ClickException(f"unknown group {group!r} (groups: {', '.join(GROUPS)})")
    reads = (*SUBSCRIPTIONS[group], redrive_stream(group))
    if stream is None:
        return reads
    if stream not in reads:
        raise click.ClickException(
            f"group {group} does not read {stream!r} (it reads {', '.join(reads)})"
        )
    return (stream,)


def pending_entries(client: redis.Redis, group: str, stream: str, count: int) -> dict[str, Any]:
    try:
        total = client.xpending(stream, group)["pending"]
        rows = client.xpending_range(stream, group, min="-", max="+", count=count)
    except redis.ResponseError as err:
        if "NOGROUP" not in str(err):
            raise
        return {"stream": stream, "total": 0, "entries": []}
    pipe = client.pipeline(transaction=False)
    for row in rows:
        pipe.xrange(stream, min=row["message_id"], max=row["message_id"], count=1)
    bodies = pipe.execute() if rows else []
    entries = []
    for row, body in zip(rows, bodies, strict=True):
        fields = body[0][1] if body else {}  # trimmed away while pending: no body left
        entries.append(
            {
                "id": row["message_id"],
                "time": entry_time(row["message_id"]),
                "event_type": fields.get("event_type"),
                "event_id": fields.get("event_id"),
                "correlation_id": fields.get("correlation_id"),
                "consumer": row["consumer"],
                "idle_ms": row["time_since_delivered"],
                "deliveries": row["times_delivered"],
            }
        )
    return {"stream": stream, "total": total, "entries": entries}


@click.command()
@click.argument("group")
@click.argument("stream", required=False)
@click.option("--count", "-n", default=100, show_default=True, type=click.IntRange(min=1))
@json_option
@friendly_errors
def pending(group: str, stream: str | None, count: int, as_json: bool) -> None:
    """Entries GROUP was given but has not acknowledged.

    For each: its consumer, idle time and delivery count, on all of GROUP's streams or on
    STREAM only.
    """
    names = group_streams(group, stream)
    client = open_redis()
    reports = [pending_entries(client, group, name, count) for name in names]
    if as_json:
        print_json({"group": group, "streams": reports})
        return
    rows = [
        [
            r["stream"],
            e["id"],
            e["event_type"],
            e["consumer"],
            duration(e["idle_ms"]),
            e["deliveries"],
            e["correlation_id"],
        ]
        for r in reports
        for e in r["entries"]
    ]
    if not rows:
        click.echo(f"group {group}: nothing pending on {', '.join(names)}")
        return
    headers = ["STREAM", "ENTRY", "TYPE", "CONSUMER", "IDLE", "DELIVERIES", "CORRELATION"]
    click.echo(table(headers, rows))
    for r in reports:
        if r["total"] > len(r["entries"]):
            click.echo(f"({r['stream']}: {r['total']} pending, first {len(r['entries'])} shown)")


COMMANDS: list[click.Command] = [streams, tail, pending]
