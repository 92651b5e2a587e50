"""`saga dead-letters list|show|redrive`: entries a group gave up on, and sending them back.

A re-drive goes to the failing group's own `<group>.redrive` stream, never to the original
stream: the other groups reading that stream handled the event already and must not see it
again.
"""

from __future__ import annotations

import json
import re
from typing import Any

import click
import redis

from contracts import ENVELOPE_FIELDS, SUBSCRIPTIONS, dead_letter_stream, redrive_stream
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

GROUPS = tuple(SUBSCRIPTIONS)
REDRIVE_BATCH = 200
WATCH_RETRIES = 20
_ENTRY_ID = re.compile(r"^\d+-\d+$")


def _entry_ids(_ctx: click.Context, _param: click.Parameter, values: Any) -> Any:
    """Reject a malformed id up front rather than as a Redis protocol error."""
    for value in [values] if isinstance(values, str) else values:
        if value is not None and not _ENTRY_ID.match(value):
            raise click.BadParameter(f"{value!r} is not a stream entry id (like 1714557600000-0)")
    return values


group_choice = click.Choice(GROUPS)


def summary(group: str, entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
    return {
        "group": group,
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


@click.group("dead-letters")
def dead_letters() -> None:
    """List, show and re-drive the entries a group gave up on."""


@dead_letters.command("list")
@click.argument("group", required=False, type=group_choice, metavar="[GROUP]")
@click.option("--count", "-n", default=100, show_default=True, type=click.IntRange(min=1))
@json_option
@friendly_errors
def list_command(group: str | None, count: int, as_json: bool) -> None:
    """Dead letters of GROUP (default: every group), oldest first."""
    client = open_redis()
    groups = (group,) if group else GROUPS
    totals = {g: client.xlen(dead_letter_stream(g)) for g in groups}
    letters = [
        summary(g, entry_id, fields)
        for g in groups
        for entry_id, fields in client.xrange(dead_letter_stream(g), count=count)
    ]
    if as_json:
        print_json({"totals": totals, "dead_letters": letters})
        return
    if not letters:
        click.echo(f"no dead letters ({', '.join(groups)})")
        return
    rows = [
        [
            d["group"],
            d["id"],
            short_time(d["dead_lettered_at"]),
            d["original_stream"],
            d["event_type"],
            d["attempts"],
            _one_line(d["error"], 60),
        ]
        for d in letters
    ]
    headers = ["GROUP", "ENTRY", "DEAD-LETTERED AT", "FROM", "TYPE", "ATTEMPTS", "ERROR"]
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


@dead_letters.command("show")
@click.argument("entry_id", callback=_entry_ids)
@click.option("--group", type=group_choice, help="Look only in this group's dead letters.")
@json_option
@friendly_errors
def show_command(entry_id: str, group: str | None, as_json: bool) -> None:
    """Show one dead letter in full: error, attempts, origin and the event itself."""
    client = open_redis()
    for g in (group,) if group else GROUPS:
        found = client.xrange(dead_letter_stream(g), min=entry_id, max=entry_id, count=1)
        if found:
            fields = found[0][1]
            break
    else:
        where = dead_letter_stream(group) if group else "any group's dead letters"
        raise click.ClickException(f"no dead letter {entry_id} in {where}")
    payload = parse_payload(fields.get("payload"))
    if as_json:
        print_json({**summary(g, entry_id, fields), "fields": fields, "payload": payload})
        return
    width = max(len(k) for k in fields)
    click.echo(f"dead letter {entry_id} of group {g} ({dead_letter_stream(g)})")
    for key, value in fields.items():
        if key != "payload":
            click.echo(f"  {key.ljust(width)}  {value}".rstrip())
    text = json.dumps(payload, indent=2) if not isinstance(payload, str) else payload
    click.echo(f"  {'payload'.ljust(width)}  " + text.replace("\n", "\n  " + " " * (width + 2)))


def redrive(client: redis.Redis, group: str, ids: list[str] | None) -> list[dict[str, Any]]:
    """Move dead letters (the given ids, or all present now) to the group's re-drive stream.

    Per batch, XADD of the original envelope and XDEL of the dead letter run in one MULTI,
    under WATCH: an entry is never both re-driven and kept, nor re-driven twice.
    """
    source, target = dead_letter_stream(group), redrive_stream(group)
    if ids is not None:  # given by hand: all of them in one transaction, or none
        return _redrive_batch(client, source, target, list(dict.fromkeys(ids)), None)
    # Only what is there now: a re-driven entry that fails again comes back with a new id
    # and must not be picked up by this same run.
    newest = client.xrevrange(source, max="+", min="-", count=1)
    if not newest:
        return []
    moved: list[dict[str, Any]] = []
    while batch := _redrive_batch(client, source, target, None, newest[0][0]):
        moved += batch
    return moved


def _redrive_batch(
    client: redis.Redis, source: str, target: str, ids: list[str] | None, up_to: str | None
) -> list[dict[str, Any]]:
    with client.pipeline(transaction=True) as pipe:
        for _ in range(WATCH_RETRIES):
            try:
                pipe.watch(source)
                if ids is None:
                    entries = pipe.xrange(source, min="-", max=up_to, count=REDRIVE_BATCH)
                else:
                    entries = [e for i in ids for e in pipe.xrange(source, i, i, count=1)]
                    missing = sorted(set(ids) - {e[0] for e in entries})
                    if missing:
                        raise click.ClickException(
                            f"no dead letter {', '.join(missing)} in {source} (nothing re-driven)"
                        )
                if not entries:
                    return []
                pipe.multi()
                for entry_id, fields in entries:
                    pipe.xadd(target, {k: fields[k] for k in ENVELOPE_FIELDS if k in fields})
                    pipe.xdel(source, entry_id)
                replies = pipe.execute()
            except redis.WatchError:
                continue  # a dead letter arrived meanwhile: read again and retry
            return [
                {
                    "id": entry_id,
                    "redrive_id": new_id,
                    "event_type": fields.get("event_type"),
                    "event_id": fields.get("event_id"),
                }
                for (entry_id, fields), new_id in zip(entries, replies[::2], strict=True)
            ]
    raise click.ClickException(f"{source} kept changing; nothing more re-driven, try again")


@dead_letters.command("redrive")
@click.argument("entry_ids", nargs=-1, callback=_entry_ids)
@click.option("--all", "redrive_all", is_flag=True, help="Every dead letter of the group.")
@click.option("--group", required=True, type=group_choice, help="The group that failed.")
@json_option
@friendly_errors
def redrive_command(
    entry_ids: tuple[str, ...], redrive_all: bool, group: str, as_json: bool
) -> None:
    """Send dead letters back to the failing group.

    Each goes to the group's own re-drive stream (never to the original stream, which other
    groups read) and is removed from the dead letters, both in one transaction.
    """
    if bool(entry_ids) == redrive_all:
        raise click.UsageError("give entry ids or --all (not both)")
    client = open_redis()
    moved = redrive(client, group, None if redrive_all else list(entry_ids))
    if as_json:
        print_json({"group": group, "stream": redrive_stream(group), "redriven": moved})
        return
    if not moved:
        click.echo(f"no dead letters for {group}")
        return
    click.echo(
        table(
            ["DEAD LETTER", "TYPE", "EVENT", f"NOW IN {redrive_stream(group)}"],
            [[m["id"], m["event_type"], m["event_id"], m["redrive_id"]] for m in moved],
        )
    )
    click.echo(f"{len(moved)} re-driven to {group}")


COMMANDS: list[click.Command] = [dead_letters]
