"""`saga streams`, `saga tail` and `saga pending`: what is in Redis and who is behind."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import click
import redis

from contracts import (
    ENVELOPE_FIELDS,
    base_of,
    group_streams,
    partition_index,
)
from sagactl.inspect import dead_letters
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
from sagactl.inspect.partitions import (
    GROUPS,
    NO_OWNER,
    all_bases,
    check_group,
    deployment_partitions,
    group_owners,
    id_key,
    lease_text,
    owner_text,
    partition_streams,
    reads,
    resolve_stream,
)
from service_runtime.redis_client import RedisClient, by_slot, read

# Counting lag by hand (Redis < 7) walks the undelivered entries; stop somewhere sane.
LAG_COUNT_LIMIT = 10_000
# `tail --type` walks back until it has COUNT matches; bounded for a type that never comes.
TAIL_SCAN_LIMIT = 100_000
# `tail --follow` over streams in several slots of a cluster: the pause between rounds of reads
FOLLOW_POLL_MS = 200
Entry = tuple[str, dict[str, str]]


def as_pairs(reply: Any) -> list[tuple[str, list[Entry]]]:
    """XREAD's reply: a list of [stream, entries] (RESP2) or a dict (RESP3); None when empty."""
    if not reply:
        return []
    return list(reply.items()) if isinstance(reply, dict) else [(s, e) for s, e in reply]


# -- saga streams ------------------------------------------------------------------------------


def dead_letter_origins(group: str) -> Counter[str]:
    """How many of group's dead letters (not re-driven) came from each partition stream (rows
    of the group's own database)."""
    return Counter(dead_letters.open_by_stream(group))


def stream_report(
    client: redis.Redis, stream: str, origins: dict[str, Counter[str] | None]
) -> dict[str, Any]:
    """One partition stream: length, first and last entry, and each group reading it."""
    report: dict[str, Any] = {
        "stream": stream,
        "partition": partition_index(stream),
        "exists": False,
        "length": 0,
        "first_entry_id": None,
        "first_entry_at": None,
        "last_entry_id": None,
        "last_entry_at": None,
        "groups": [],
    }
    if client.type(stream) != "stream":
        return report
    info = client.xinfo_stream(stream)
    first = (info.get("first-entry") or [None])[0]
    last = (info.get("last-entry") or [None])[0]
    report.update(
        exists=True,
        length=info["length"],
        first_entry_id=first,
        first_entry_at=entry_time(first),
        last_entry_id=last,
        last_entry_at=entry_time(last),
        groups=[group_report(client, stream, g, origins) for g in client.xinfo_groups(stream)],
    )
    return report


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
    # the entries XINFO counted may be acknowledged before XPENDING runs (a live consumer):
    # then there is no oldest one, and XPENDING's range needs an id
    if info["pending"] and (oldest_id := client.xpending(stream, group)["min"]):
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


def base_report(base: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    """A base stream: totals over its partitions, and each partition's report."""
    present = [p for p in parts if p["exists"]]
    firsts = [(p["first_entry_id"], p["first_entry_at"]) for p in present if p["first_entry_id"]]
    lasts = [(p["last_entry_id"], p["last_entry_at"]) for p in present if p["last_entry_id"]]
    first = min(firsts, key=lambda pair: id_key(pair[0]), default=(None, None))
    last = max(lasts, key=lambda pair: id_key(pair[0]), default=(None, None))
    return {
        "stream": base,
        "length": sum(p["length"] for p in parts),
        "partitions_present": len(present),
        "first_entry_at": first[1],
        "last_entry_at": last[1],
        "partitions": parts,
    }


def partition_summary(
    group: str,
    partition: int,
    lease: dict[str, Any],
    by_stream: dict[str, dict[str, Any]],
    dead_letters: int,
) -> dict[str, Any]:
    """One group x partition: its owner, and pending/lag summed over the streams it reads
    there (its subscriptions and its re-drive stream of that partition)."""
    reports = [
        g
        for stream in group_streams(group, partition)
        for g in by_stream.get(stream, {}).get("groups", [])
        if g["group"] == group
    ]
    idles = [
        g["oldest_pending_idle_ms"] for g in reports if g["oldest_pending_idle_ms"] is not None
    ]
    return {
        "group": group,
        "partition": partition,
        "owner": lease["owner"],
        "epoch": lease["epoch"],
        "lease_live": lease["live"],
        "lease_expires_at": lease["expires_at"],
        "pending": sum(g["pending"] for g in reports),
        "lag": sum(g["lag"] for g in reports),
        "lag_capped": any(g["lag_capped"] for g in reports),
        "oldest_pending_idle_ms": max(idles, default=None),
        "dead_letters": dead_letters,
        "streams": list(group_streams(group, partition)),
    }


def streams_report(client: redis.Redis, partitions: int) -> dict[str, Any]:
    """Everything `saga streams` shows, for JSON and for the tables."""
    origins = {group: dead_letter_origins(group) for group in GROUPS}
    by_stream: dict[str, dict[str, Any]] = {}
    bases = []
    for base in all_bases():
        parts = [stream_report(client, s, origins) for s in partition_streams(base, partitions)]
        by_stream.update((p["stream"], p) for p in parts)
        bases.append(base_report(base, parts))
    groups = []
    for group in GROUPS:
        leases = group_owners(group)
        dead_by_partition = dead_letters.open_by_partition(group)
        for p in range(partitions):
            dead = dead_by_partition.get(p, 0)
            groups.append(partition_summary(group, p, leases.get(p, NO_OWNER), by_stream, dead))
    return {"partitions": partitions, "streams": bases, "groups": groups}


@click.command()
@click.option(
    "--by-partition", is_flag=True, help="One row per partition stream, not per base stream."
)
@json_option
@friendly_errors
def streams(by_partition: bool, as_json: bool) -> None:
    """Streams, their partitions, who owns each partition, lag and dead letters.

    Per stream: length over all partitions, first and last entry time. Per group and
    partition: the owning consumer (lease epoch, live or expired), pending entries, lag
    (entries not delivered yet), the oldest pending entry's idle time, dead letters.
    """
    client = open_redis()
    report = streams_report(client, deployment_partitions())
    if as_json:
        print_json(report)
        return
    if by_partition:
        rows = [
            [
                p["stream"] + ("" if p["exists"] else " (absent)"),
                p["length"],
                short_time(p["first_entry_at"]),
                short_time(p["last_entry_at"]),
            ]
            for r in report["streams"]
            for p in r["partitions"]
        ]
    else:
        rows = [
            [
                r["stream"],
                r["length"],
                f"{r['partitions_present']}/{report['partitions']}",
                short_time(r["first_entry_at"]),
                short_time(r["last_entry_at"]),
            ]
            for r in report["streams"]
        ]
    headers = ["STREAM", "LENGTH", "FIRST ENTRY", "LAST ENTRY"]
    if not by_partition:
        headers.insert(2, "PARTITIONS")
    click.echo(table(headers, rows))
    click.echo()
    click.echo(partitions_table(report["groups"]))


def partitions_table(summaries: list[dict[str, Any]]) -> str:
    """One row per group x partition (owner first: the question is usually "who has it")."""
    rows = [
        [
            s["group"],
            s["partition"],
            owner_text({"owner": s["owner"], "live": s["lease_live"]}),
            s["epoch"],
            lease_text({"owner": s["owner"], "live": s["lease_live"]}),
            s["pending"],
            f">={s['lag']}" if s["lag_capped"] else s["lag"],
            duration(s["oldest_pending_idle_ms"]),
            s["dead_letters"],
        ]
        for s in summaries
    ]
    headers = [
        "GROUP",
        "PARTITION",
        "OWNER",
        "EPOCH",
        "LEASE",
        "PENDING",
        "LAG",
        "OLDEST PENDING",
        "DEAD LETTERS",
    ]
    return table(headers, rows)


# -- saga tail ---------------------------------------------------------------------------------


def readable(entry_id: str, fields: dict[str, str], stream: str | None = None) -> dict[str, Any]:
    """An entry as a reader wants it; never fails, since invalid entries are worth seeing too."""
    return {
        "stream": stream,
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
    where = f"p{partition_index(event['stream'])}  " if event.get("stream") else ""
    return (
        f"{short_time(event['time'])}  {where}{event['event_type'] or '?':<22}  "
        f"aggregate={event['aggregate_id']}  correlation={event['correlation_id']}  {text}{extra}"
    )


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


def newest_ids(client: redis.Redis, streams: list[str]) -> dict[str, str]:
    """Each stream's newest entry id ("0-0" when empty): where --follow starts."""
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.xrevrange(stream, max="+", min="-", count=1)
    return {
        stream: newest[0][0] if newest else "0-0"
        for stream, newest in zip(streams, pipe.execute(), strict=True)
    }


def follow_entries(
    client: RedisClient, after: dict[str, str], block_ms: int = 1000
) -> Iterator[tuple[str, Entry]]:
    """(stream, entry) for new entries after each stream's id; runs until interrupted.

    Streams that may be read together (redis_client.by_slot: all of them on one Redis, each
    partition's on a cluster) are read with one XREAD. One such group: XREAD BLOCK. Several:
    each read without blocking in turn, then a pause of at most FOLLOW_POLL_MS when none had
    anything new, so no partition waits behind another's BLOCK.
    """
    after = dict(after)
    groups = by_slot(client, after)
    block = block_ms if len(groups) == 1 else None
    while True:
        got = False
        for group in groups:
            reply = read(client, {s: after[s] for s in group}, count=100, block=block)
            for stream, entries in as_pairs(reply):
                for entry in entries:
                    got = True
                    after[stream] = entry[0]
                    yield stream, entry
        if not got and block is None:
            time.sleep(min(block_ms, FOLLOW_POLL_MS) / 1000)


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

    STREAM is a base stream (orders.events: all its partitions, merged in time order) or one
    partition stream (orders.events.{p3}). With --follow, new events are printed as they
    arrive until Ctrl-C; with --json too, as one JSON object per line.
    """
    client = open_redis()
    names = resolve_stream(stream, deployment_partitions())
    tops = newest_ids(client, names)
    merged = (
        sorted(
            (
                (name, entry)
                for name in names
                for entry in last_entries(client, name, tops[name], count, event_type)
            ),
            key=lambda pair: id_key(pair[1][0]),
        )[-count:]
        if count
        else []
    )
    events = [readable(*entry, stream=name) for name, entry in merged]
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
        for name, entry in follow_entries(client, tops):
            if event_type in (None, entry[1].get("event_type")):
                event = readable(*entry, stream=name)
                click.echo(json.dumps(event) if as_json else tail_line(event))
    except KeyboardInterrupt:
        pass  # Ctrl-C is how --follow ends: not an error


# -- saga pending ------------------------------------------------------------------------------


def pending_streams(group: str, stream: str | None, partitions: int) -> list[str]:
    """The partition streams of GROUP to look at: all it reads, or those of STREAM."""
    check_group(group)
    if stream is None:
        return [s for base in reads(group) for s in partition_streams(base, partitions)]
    if base_of(stream) not in reads(group):
        raise click.ClickException(
            f"group {group} does not read {stream!r} (it reads {', '.join(reads(group))})"
        )
    return resolve_stream(stream, partitions)


def pending_entries(client: redis.Redis, group: str, stream: str, count: int) -> dict[str, Any]:
    report: dict[str, Any] = {
        "stream": stream,
        "partition": partition_index(stream),
        "total": 0,
        "entries": [],
    }
    try:
        total = client.xpending(stream, group)["pending"]
        rows = client.xpending_range(stream, group, min="-", max="+", count=count) if total else []
    except redis.ResponseError as err:
        if "NOGROUP" not in str(err):
            raise
        return report
    pipe = client.pipeline(transaction=False)
    for row in rows:
        pipe.xrange(stream, min=row["message_id"], max=row["message_id"], count=1)
    bodies = pipe.execute() if rows else []
    for row, body in zip(rows, bodies, strict=True):
        fields = body[0][1] if body else {}  # trimmed away while pending: no body left
        report["entries"].append(
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
    report["total"] = total
    return report


def pending_report(
    client: redis.Redis,
    group: str,
    stream: str | None = None,
    partition: int | None = None,
    count: int = 100,
    partitions: int | None = None,
) -> dict[str, Any]:
    """Who owns each partition of GROUP and what it was given but has not acknowledged (on all
    its streams, or STREAM's), flagged when held by a consumer that is not the owner."""
    partitions = deployment_partitions() if partitions is None else partitions
    if partition is not None and partition >= partitions:
        raise click.ClickException(f"no partition {partition} (partitions 0 to {partitions - 1})")
    names = [
        s
        for s in pending_streams(group, stream, partitions)
        if partition is None or partition_index(s) == partition
    ]
    leases = group_owners(group)
    reports = [pending_entries(client, group, name, count) for name in names]
    shown = sorted({r["partition"] for r in reports})
    owners = [
        {
            "partition": p,
            **leases.get(p, NO_OWNER),
            "pending": sum(r["total"] for r in reports if r["partition"] == p),
        }
        for p in shown
    ]
    for r in reports:
        lease = leases.get(r["partition"], NO_OWNER)
        for e in r["entries"]:
            e["held_by_owner"] = bool(lease["live"]) and e["consumer"] == lease["owner"]
    return {"group": group, "partitions": partitions, "owners": owners, "streams": reports}


@click.command()
@click.argument("group")
@click.argument("stream", required=False)
@click.option("--partition", "-p", type=click.IntRange(min=0), help="Only this partition.")
@click.option("--count", "-n", default=100, show_default=True, type=click.IntRange(min=1))
@json_option
@friendly_errors
def pending(
    group: str, stream: str | None, partition: int | None, count: int, as_json: bool
) -> None:
    """Who owns each partition of GROUP, and the entries it was given but has not acknowledged.

    First one row per partition: its owner (lease epoch, live or expired) and how many entries
    are pending there. Then each pending entry: its consumer (flagged when that consumer is
    not the partition's owner, e.g. a dead previous owner), idle time and delivery count, on
    all of GROUP's streams or on STREAM only (a base stream or one partition stream).
    """
    report = pending_report(open_redis(), group, stream, partition, count)
    owners, reports = report["owners"], report["streams"]
    if as_json:
        print_json(report)
        return
    click.echo(
        table(
            ["PARTITION", "OWNER", "EPOCH", "LEASE", "EXPIRES", "PENDING"],
            [
                [
                    o["partition"],
                    owner_text(o),
                    o["epoch"],
                    lease_text(o),
                    short_time(o["expires_at"]),
                    o["pending"],
                ]
                for o in owners
            ],
        )
    )
    click.echo()
    rows = [
        [
            r["stream"],
            e["id"],
            e["event_type"],
            e["consumer"] + ("" if e["held_by_owner"] else " (not owner)"),
            duration(e["idle_ms"]),
            e["deliveries"],
            e["correlation_id"],
        ]
        for r in reports
        for e in r["entries"]
    ]
    if not rows:
        where = stream or ", ".join(reads(group))
        click.echo(f"group {group}: nothing pending on {where}")
        return
    headers = ["STREAM", "ENTRY", "TYPE", "CONSUMER", "IDLE", "DELIVERIES", "CORRELATION"]
    click.echo(table(headers, rows))
    for r in reports:
        if r["total"] > len(r["entries"]):
            click.echo(f"({r['stream']}: {r['total']} pending, first {len(r['entries'])} shown)")


COMMANDS: list[click.Command] = [streams, tail, pending]
