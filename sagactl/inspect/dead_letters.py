"""`saga dead-letters list|show|redrive`: entries a group gave up on, and sending them back.

The functions here (list_dead_letters, get_dead_letter, redrive) are the one way the CLI and
`saga console` read and re-drive dead letters: where dead letters are kept is decided here.

Dead letters live in one stream per group and partition (`inventory.dead-letters.{p3}`). A
re-drive goes to the failing group's own re-drive stream of the entry's partition
(`inventory.redrive.{p3}`), never to the original stream: the other groups reading that stream
handled the event already and must not see it again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import click
import redis

from contracts import ENVELOPE_FIELDS, dead_letter_stream, partition_index
from sagactl.inspect.common import (
    entry_time,
    friendly_errors,
    iso_text,
    json_option,
    open_redis,
    parse_payload,
    print_json,
    short_time,
    table,
)
from sagactl.inspect.partitions import (
    GROUPS,
    deployment_partitions,
    find_entries,
    id_key,
    redrive_target,
)
from service_runtime.redis_client import RedisClient, by_slot

REDRIVE_BATCH = 200
WATCH_RETRIES = 20
_ENTRY_ID = re.compile(r"^\d+-\d+$")
# A re-driven entry carries these besides the envelope: the consumer checks the producer
# against the original stream, and a second failure keeps pointing at the original entry.
REDRIVE_FIELDS = (*ENVELOPE_FIELDS, "original_stream", "original_id")


def _entry_ids(_ctx: click.Context, _param: click.Parameter, values: Any) -> Any:
    """Reject a malformed id up front rather than as a Redis protocol error."""
    for value in [values] if isinstance(values, str) else values:
        if value is not None and not _ENTRY_ID.match(value):
            raise click.BadParameter(f"{value!r} is not a stream entry id (like 1714557600000-0)")
    return values


group_choice = click.Choice(GROUPS)
partition_option = click.option(
    "--partition",
    "-p",
    type=click.IntRange(min=0),
    help="Only this partition (entry ids are unique per partition stream only).",
)


def summary(group: str, stream: str, entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
    return {
        "group": group,
        "partition": partition_index(stream),
        "stream": stream,
        "id": entry_id,
        "dead_lettered_at": iso_text(fields.get("dead_lettered_at")) or entry_time(entry_id),
        "original_stream": fields.get("original_stream"),
        "original_id": fields.get("original_id"),
        "event_type": fields.get("event_type"),
        "event_id": fields.get("event_id"),
        "correlation_id": fields.get("correlation_id"),
        "attempts": int(fields["attempts"]) if fields.get("attempts", "").isdigit() else None,
        "error": fields.get("error"),
    }


def _sources(group: str, partitions: int, partition: int | None) -> list[str]:
    if partition is not None and partition >= partitions:
        raise click.ClickException(f"no partition {partition} (partitions 0 to {partitions - 1})")
    chosen = range(partitions) if partition is None else (partition,)
    return [dead_letter_stream(group, p) for p in chosen]


def list_dead_letters(
    client: redis.Redis,
    partitions: int,
    group: str | None = None,
    partition: int | None = None,
    count: int = 100,
) -> dict[str, Any]:
    """Dead letters of GROUP (default: every group) over all partitions (or one), oldest
    first, at most `count` per group; `totals` counts them all per group."""
    groups = (group,) if group else GROUPS
    totals: dict[str, int] = {}
    letters: list[dict[str, Any]] = []
    for g in groups:
        sources = _sources(g, partitions, partition)
        found = [
            summary(g, source, entry_id, fields)
            for source in sources
            for entry_id, fields in client.xrange(source, count=count)
        ]
        # counted after reading: never fewer than were listed when one arrives meanwhile
        totals[g] = max(sum(client.xlen(source) for source in sources), len(found))
        found.sort(key=lambda d: (id_key(d["id"]), d["partition"]))
        letters += found[:count]
    return {"partitions": partitions, "totals": totals, "dead_letters": letters}


def get_dead_letter(
    client: redis.Redis,
    partitions: int,
    entry_id: str,
    group: str | None = None,
    partition: int | None = None,
) -> dict[str, Any]:
    """One dead letter in full: its summary, every field it carries and the decoded payload.
    Unknown (or ambiguous without group and partition): click.ClickException."""
    groups = (group,) if group else GROUPS
    sources = [s for g in groups for s in _sources(g, partitions, partition)]
    where = f"{group}'s dead letters" if group else "any group's dead letters"
    source, fields = _one_match(find_entries(client, sources, entry_id), entry_id, where)
    g = next(g for g in groups if source in _sources(g, partitions, None))
    payload = parse_payload(fields.get("payload"))
    return {**summary(g, source, entry_id, fields), "fields": fields, "payload": payload}


@click.group("dead-letters")
def dead_letters() -> None:
    """List, show and re-drive the entries a group gave up on (all partitions)."""


@dead_letters.command("list")
@click.argument("group", required=False, type=group_choice, metavar="[GROUP]")
@partition_option
@click.option("--count", "-n", default=100, show_default=True, type=click.IntRange(min=1))
@json_option
@friendly_errors
def list_command(group: str | None, partition: int | None, count: int, as_json: bool) -> None:
    """Dead letters of GROUP (default: every group) over all partitions, oldest first."""
    report = list_dead_letters(open_redis(), deployment_partitions(), group, partition, count)
    groups = (group,) if group else GROUPS
    totals, letters = report["totals"], report["dead_letters"]
    if as_json:
        print_json(report)
        return
    if not letters:
        click.echo(f"no dead letters ({', '.join(groups)})")
        return
    rows = [
        [
            d["group"],
            d["partition"],
            d["id"],
            short_time(d["dead_lettered_at"]),
            d["original_stream"],
            d["event_type"],
            d["attempts"],
            _one_line(d["error"], 60),
        ]
        for d in letters
    ]
    headers = [
        "GROUP",
        "PARTITION",
        "ENTRY",
        "DEAD-LETTERED AT",
        "FROM",
        "TYPE",
        "ATTEMPTS",
        "ERROR",
    ]
    click.echo(table(headers, rows))
    for g, total in totals.items():
        shown = sum(1 for d in letters if d["group"] == g)
        if total > shown:
            click.echo(f"({g}: {total} dead letters, first {shown} shown)")


def _one_line(text: str | None, width: int) -> str | None:
    if text is None:
        return None
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _one_match(
    matches: list[tuple[str, dict[str, str]]], entry_id: str, where: str
) -> tuple[str, dict[str, str]]:
    if not matches:
        raise click.ClickException(f"no dead letter {entry_id} in {where}")
    if len(matches) > 1:
        raise click.ClickException(
            f"{entry_id} is in {', '.join(s for s, _ in matches)}: "
            "say which with --group and --partition"
        )
    return matches[0]


@dead_letters.command("show")
@click.argument("entry_id", callback=_entry_ids)
@click.option("--group", type=group_choice, help="Look only in this group's dead letters.")
@partition_option
@json_option
@friendly_errors
def show_command(entry_id: str, group: str | None, partition: int | None, as_json: bool) -> None:
    """Show one dead letter in full: error, attempts, origin and the event itself."""
    letter = get_dead_letter(open_redis(), deployment_partitions(), entry_id, group, partition)
    if as_json:
        print_json(letter)
        return
    g, source, fields, payload = (letter[k] for k in ("group", "stream", "fields", "payload"))
    width = max(len(k) for k in fields)
    click.echo(f"dead letter {entry_id} of group {g} ({source})")
    for key, value in fields.items():
        if key != "payload":
            click.echo(f"  {key.ljust(width)}  {value}".rstrip())
    text = json.dumps(payload, indent=2) if not isinstance(payload, str) else payload
    click.echo(f"  {'payload'.ljust(width)}  " + text.replace("\n", "\n  " + " " * (width + 2)))


Picked = list[tuple[str, str, dict[str, str]]]  # (dead-letter stream, entry id, fields)


def redrive(
    client: RedisClient,
    group: str,
    partitions: int,
    ids: list[str] | None,
    partition: int | None = None,
) -> list[dict[str, Any]]:
    """Move dead letters (the given ids, or all present now) to the group's re-drive stream of
    each entry's partition (redrive_target).

    One transaction per dead-letter stream (a partition: one hash tag, so one slot on a
    cluster too): under WATCH, a MULTI with the XADD of each original envelope and the XDEL
    of its dead letter, so an entry is never both re-driven and kept, nor re-driven twice.
    Ids given by hand are all looked up first: when one is missing or ambiguous, nothing moves.
    """
    sources = _sources(group, partitions, partition)
    if ids is not None:
        where = sources[0] if len(sources) == 1 else f"{group}'s dead letters"
        by_source: dict[str, list[str]] = {}
        for entry_id in dict.fromkeys(ids):
            source, _fields = _one_match(find_entries(client, sources, entry_id), entry_id, where)
            by_source.setdefault(source, []).append(entry_id)
        moved: list[dict[str, Any]] = []
        for source, wanted in by_source.items():

            def by_id(
                pipe: redis.client.Pipeline, source: str = source, wanted: list[str] = wanted
            ) -> Picked:
                picked = []
                for entry_id in wanted:
                    found = pipe.xrange(source, min=entry_id, max=entry_id, count=1)
                    if not found:  # re-driven by someone else since the look-up
                        raise click.ClickException(f"no dead letter {entry_id} in {source} now")
                    picked.append((source, entry_id, found[0][1]))
                return picked

            try:
                moved += _redrive_batch(client, group, partitions, source, by_id)
            except click.ClickException as err:
                if moved:
                    err.message += f" (re-driven already: {', '.join(m['id'] for m in moved)})"
                raise
        return moved
    moved = []
    for source in sources:
        # Only what is there now: a re-driven entry that fails again comes back with a new id
        # and must not be picked up by this same run.
        newest = client.xrevrange(source, max="+", min="-", count=1)
        if not newest:
            continue

        def page(
            pipe: redis.client.Pipeline, source: str = source, up_to: str = newest[0][0]
        ) -> Picked:
            entries = pipe.xrange(source, min="-", max=up_to, count=REDRIVE_BATCH)
            return [(source, entry_id, fields) for entry_id, fields in entries]

        while batch := _redrive_batch(client, group, partitions, source, page):
            moved += batch
    return moved


def _redrive_batch(
    client: RedisClient,
    group: str,
    partitions: int,
    source: str,
    pick: Callable[[redis.client.Pipeline], Picked],
) -> list[dict[str, Any]]:
    """Re-drive what `pick` finds in `source` (one dead-letter stream) in one transaction."""
    with client.pipeline(transaction=True) as pipe:
        for _ in range(WATCH_RETRIES):
            try:
                pipe.watch(source)
                entries = pick(pipe)
                if not entries:
                    return []
                targets = [
                    redrive_target(group, f, source, partitions) for _s, _i, f in entries
                ]
                if len(by_slot(client, [source, *targets])) > 1:
                    raise click.ClickException(
                        f"{source} holds dead letters of other partitions "
                        f"({', '.join(sorted(set(targets)))}): a Redis Cluster cannot move "
                        "them in one transaction; nothing more re-driven"
                    )
                pipe.multi()
                for (_s, entry_id, fields), target in zip(entries, targets, strict=True):
                    record = {k: fields[k] for k in REDRIVE_FIELDS if k in fields}
                    record.setdefault("original_stream", source)
                    record.setdefault("original_id", entry_id)
                    pipe.xadd(target, record)
                    pipe.xdel(source, entry_id)
                replies = pipe.execute()
            except redis.WatchError:
                continue  # a dead letter arrived meanwhile: read again and retry
            return [
                {
                    "id": entry_id,
                    "partition": partition_index(target),
                    "from": source,
                    "stream": target,
                    "redrive_id": new_id,
                    "event_type": fields.get("event_type"),
                    "event_id": fields.get("event_id"),
                }
                for (_s, entry_id, fields), target, new_id in zip(
                    entries, targets, replies[::2], strict=True
                )
            ]
    raise click.ClickException(f"{source} kept changing; nothing more re-driven, try again")


@dead_letters.command("redrive")
@click.argument("entry_ids", nargs=-1, callback=_entry_ids)
@click.option("--all", "redrive_all", is_flag=True, help="Every dead letter of the group.")
@click.option("--group", required=True, type=group_choice, help="The group that failed.")
@partition_option
@json_option
@friendly_errors
def redrive_command(
    entry_ids: tuple[str, ...],
    redrive_all: bool,
    group: str,
    partition: int | None,
    as_json: bool,
) -> None:
    """Send dead letters back to the failing group.

    Each goes to the group's own re-drive stream of the entry's partition (never to the
    original stream, which other groups read) and is removed from the dead letters, both in
    one transaction.
    """
    if bool(entry_ids) == redrive_all:
        raise click.UsageError("give entry ids or --all (not both)")
    client = open_redis()
    partitions = deployment_partitions()
    moved = redrive(client, group, partitions, None if redrive_all else list(entry_ids), partition)
    if as_json:
        print_json({"group": group, "redriven": moved})
        return
    if not moved:
        click.echo(f"no dead letters for {group}")
        return
    click.echo(
        table(
            ["DEAD LETTER", "TYPE", "EVENT", "NOW IN", "AS"],
            [
                [m["id"], m["event_type"], m["event_id"], m["stream"], m["redrive_id"]]
                for m in moved
            ],
        )
    )
    click.echo(f"{len(moved)} re-driven to {group}")


COMMANDS: list[click.Command] = [dead_letters]
