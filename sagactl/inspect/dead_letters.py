"""`saga dead-letters list|show|redrive`: entries a group gave up on, and sending them back.

Dead letters are rows of the failing service's own database (table dead_letters): they survive
Redis losing its data. A dead letter is named by its number in that table (with the group when
two groups have the same number).

A re-drive is a request recorded in that table (redrive_requested_at); the owner of the dead
letter's partition picks it up within about a second, handles the entry in one fenced
transaction that also records the outcome (redriven_at, redrive_outcome), and nothing is
written to Redis by this command. So a re-drive is never lost with Redis, never done twice,
and never a dual write (DESIGN.md §5): the request and its execution are each one commit.
"""

from __future__ import annotations

import json
from typing import Any

import click

from contracts import partition_index
from sagactl.inspect.common import (
    friendly_errors,
    iso,
    json_option,
    open_db,
    parse_payload,
    print_json,
    short_time,
    table,
)
from sagactl.inspect.partitions import GROUPS, deployment_partitions

group_choice = click.Choice(GROUPS)
partition_option = click.option(
    "--partition", "-p", type=click.IntRange(min=0), help="Only this partition."
)

_COLUMNS = """
id, partition, stream, entry_id, event_id, event_type, fields, error, attempts,
dead_lettered_at, redrive_requested_at, redriven_at, redrive_outcome, redrives
"""


def state(letter: dict[str, Any]) -> str:
    if letter["redrive_requested_at"]:
        return "redrive requested"
    if letter["redriven_at"]:
        return "re-driven"
    return "dead"


def summary(group: str, row: dict[str, Any]) -> dict[str, Any]:
    fields = row["fields"] or {}
    letter = {
        "group": group,
        "id": row["id"],
        "partition": row["partition"],
        "stream": row["stream"],
        "entry_id": row["entry_id"],
        "original_stream": fields.get("original_stream", row["stream"]),
        "original_id": fields.get("original_id", row["entry_id"]),
        "event_type": row["event_type"],
        "event_id": row["event_id"],
        "correlation_id": fields.get("correlation_id"),
        "attempts": row["attempts"],
        "error": row["error"],
        "dead_lettered_at": iso(row["dead_lettered_at"]),
        "redrive_requested_at": iso(row["redrive_requested_at"]),
        "redriven_at": iso(row["redriven_at"]),
        "redrive_outcome": row["redrive_outcome"],
        "redrives": row["redrives"],
    }
    letter["state"] = state(letter)
    return letter


def fetch(
    group: str,
    *,
    where: str = "TRUE",
    params: tuple = (),
    limit: int | None = None,
) -> list[dict[str, Any]]:
    with open_db(group) as conn:
        cur = conn.execute(
            f"SELECT {_COLUMNS} FROM dead_letters WHERE consumer_group = %s AND ({where})"
            f" ORDER BY id{'' if limit is None else ' LIMIT %s'}",
            (group, *params, *(() if limit is None else (limit,))),
        )
        names = [c.name for c in cur.description]
        return [summary(group, dict(zip(names, row, strict=True))) for row in cur.fetchall()]


def counts(group: str, partition: int | None = None) -> dict[str, int]:
    """Dead letters of a group not re-driven (successfully) yet, and all of them."""
    with open_db(group) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE redriven_at IS NULL), count(*) FROM dead_letters"
            " WHERE consumer_group = %s AND (%s::int IS NULL OR partition = %s)",
            (group, partition, partition),
        ).fetchone()
    return {"open": row[0], "all": row[1]}


def open_by_partition(group: str) -> dict[int, int]:
    """partition -> dead letters not re-driven, for `saga streams`."""
    with open_db(group) as conn:
        rows = conn.execute(
            "SELECT partition, count(*) FROM dead_letters"
            " WHERE consumer_group = %s AND redriven_at IS NULL GROUP BY partition",
            (group,),
        ).fetchall()
    return dict(rows)


def open_by_stream(group: str) -> dict[str, int]:
    """original stream -> dead letters not re-driven, for `saga streams`."""
    result: dict[str, int] = {}
    for letter in fetch(group, where="redriven_at IS NULL"):
        stream = letter["original_stream"]
        result[stream] = result.get(stream, 0) + 1
    return result


def _check_partition(partition: int | None) -> None:
    if partition is not None:
        partitions = deployment_partitions()
        if partition >= partitions:
            raise click.ClickException(
                f"no partition {partition} (partitions 0 to {partitions - 1})"
            )


def list_dead_letters(
    group: str | None = None,
    partition: int | None = None,
    count: int = 100,
    show_all: bool = False,
) -> dict[str, Any]:
    """The dead letters of GROUP (default: every group), oldest first, up to `count` per group,
    with each group's total: for `saga dead-letters list` and the console."""
    groups = (group,) if group else GROUPS
    where, params = ("TRUE", ()) if show_all else ("redriven_at IS NULL", ())
    if partition is not None:
        where, params = f"{where} AND partition = %s", (*params, partition)
    totals: dict[str, int] = {}
    letters: list[dict[str, Any]] = []
    for g in groups:
        totals[g] = counts(g, partition)["all" if show_all else "open"]
        letters += fetch(g, where=where, params=params, limit=count)
    return {"totals": totals, "dead_letters": letters}


def get_dead_letter(letter_id: int, group: str | None = None) -> dict[str, Any]:
    """One dead letter in full (its entry's fields and payload too): `show` and the console."""
    letter = _find(letter_id, group)
    with open_db(letter["group"]) as conn:
        (fields,) = conn.execute(
            "SELECT fields FROM dead_letters WHERE id = %s", (letter_id,)
        ).fetchone()
    return {
        **letter,
        "fields": fields or {},
        "payload": parse_payload((fields or {}).get("payload")),
    }


@click.group("dead-letters")
def dead_letters() -> None:
    """List, show and re-drive the entries a group gave up on (kept in its own database)."""


@dead_letters.command("list")
@click.argument("group", required=False, type=group_choice, metavar="[GROUP]")
@partition_option
@click.option("--count", "-n", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--all", "show_all", is_flag=True, help="Also those re-driven successfully.")
@json_option
@friendly_errors
def list_command(
    group: str | None, partition: int | None, count: int, show_all: bool, as_json: bool
) -> None:
    """Dead letters of GROUP (default: every group), oldest first."""
    _check_partition(partition)
    groups = (group,) if group else GROUPS
    report = list_dead_letters(group, partition, count, show_all)
    totals, letters = report["totals"], report["dead_letters"]
    if as_json:
        print_json({"partitions": deployment_partitions(), **report})
        return
    if not letters:
        click.echo(f"no dead letters ({', '.join(groups)})")
        return
    rows = [
        [
            d["group"],
            d["id"],
            d["partition"],
            short_time(d["dead_lettered_at"]),
            d["stream"],
            d["entry_id"],
            d["event_type"],
            d["attempts"],
            d["state"],
            _one_line(d["error"], 50),
        ]
        for d in letters
    ]
    headers = ["GROUP", "ID", "PARTITION", "DEAD-LETTERED AT", "FROM", "ENTRY", "TYPE"]
    click.echo(table([*headers, "ATTEMPTS", "STATE", "ERROR"], rows))
    for g, total in totals.items():
        shown = sum(1 for d in letters if d["group"] == g)
        if total > shown:
            click.echo(f"({g}: {total} dead letters, first {shown} shown)")


def _one_line(text: str | None, width: int) -> str | None:
    if text is None:
        return None
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 3] + "..."


def _find(letter_id: int, group: str | None) -> dict[str, Any]:
    groups = (group,) if group else GROUPS
    found = [d for g in groups for d in fetch(g, where="id = %s", params=(letter_id,))]
    where = f"{group}'s dead letters" if group else "any group's dead letters"
    if not found:
        raise click.ClickException(f"no dead letter {letter_id} in {where}")
    if len(found) > 1:
        raise click.ClickException(
            f"{letter_id} is a dead letter of {', '.join(d['group'] for d in found)}: "
            "say which with --group"
        )
    return found[0]


@dead_letters.command("show")
@click.argument("letter_id", type=click.IntRange(min=1), metavar="ID")
@click.option("--group", type=group_choice, help="Look only in this group's dead letters.")
@json_option
@friendly_errors
def show_command(letter_id: int, group: str | None, as_json: bool) -> None:
    """Show one dead letter in full: error, attempts, origin, re-drives and the event."""
    letter = get_dead_letter(letter_id, group)
    fields, payload = letter["fields"], letter["payload"]
    if as_json:
        print_json(letter)
        return
    click.echo(
        f"dead letter {letter_id} of group {letter['group']} (partition {letter['partition']},"
        f" {letter['stream']} {letter['entry_id']}): {letter['state']}"
    )
    facts = {
        k: letter[k]
        for k in ("dead_lettered_at", "attempts", "error", "redrives", "redrive_outcome")
    }
    facts.update({k: v for k, v in fields.items() if k != "payload" and k not in facts})
    width = max(len(k) for k in [*facts, "payload"])
    for key, value in facts.items():
        click.echo(f"  {key.ljust(width)}  {'' if value is None else value}".rstrip())
    text = json.dumps(payload, indent=2) if not isinstance(payload, str) else payload
    click.echo(f"  {'payload'.ljust(width)}  " + text.replace("\n", "\n  " + " " * (width + 2)))


def request_redrive(
    group: str, ids: list[int] | None, partition: int | None = None
) -> list[dict[str, Any]]:
    """Record re-drive requests (the given dead letters, or all not re-driven yet) in one
    transaction; the partitions' owners carry them out. Returns what was requested."""
    where = "redriven_at IS NULL AND redrive_requested_at IS NULL"
    params: tuple = (group,)
    if ids is not None:
        where += " AND id = ANY(%s)"
        params += (ids,)
    if partition is not None:
        where += " AND partition = %s"
        params += (partition,)
    with open_db(group, writes=True) as conn, conn.transaction():
        if ids is not None:
            known = {
                row[0]: row[1:]
                for row in conn.execute(
                    "SELECT id, redriven_at, redrive_requested_at FROM dead_letters"
                    " WHERE consumer_group = %s AND id = ANY(%s) FOR UPDATE",
                    (group, ids),
                )
            }
            for letter_id in ids:
                if letter_id not in known:
                    raise click.ClickException(f"no dead letter {letter_id} in {group}'s")
                if known[letter_id][0] is not None:
                    raise click.ClickException(f"dead letter {letter_id} was re-driven already")
        rows = conn.execute(
            "UPDATE dead_letters SET redrive_requested_at = clock_timestamp()"
            f" WHERE consumer_group = %s AND {where}"
            " RETURNING id, partition, stream, entry_id, event_type, event_id",
            params,
        ).fetchall()
    return [
        {
            "id": r[0],
            "partition": r[1] if r[1] is not None else partition_index(r[2]),
            "stream": r[2],
            "entry_id": r[3],
            "event_type": r[4],
            "event_id": r[5],
        }
        for r in sorted(rows)
    ]


@dead_letters.command("redrive")
@click.argument("letter_ids", nargs=-1, type=click.IntRange(min=1), metavar="[ID]...")
@click.option("--all", "redrive_all", is_flag=True, help="Every dead letter of the group.")
@click.option("--group", required=True, type=group_choice, help="The group that failed.")
@partition_option
@json_option
@friendly_errors
def redrive_command(
    letter_ids: tuple[int, ...],
    redrive_all: bool,
    group: str,
    partition: int | None,
    as_json: bool,
) -> None:
    """Send dead letters back to the failing group (only: the other groups handled them).

    The re-drive is recorded in the group's database; the owner of each dead letter's
    partition handles it within about a second and records the outcome (`saga dead-letters
    list --all` shows it). A re-drive that fails again leaves the dead letter in place with
    the new error.
    """
    if bool(letter_ids) == redrive_all:
        raise click.UsageError("give dead letter ids or --all (not both)")
    _check_partition(partition)
    requested = request_redrive(group, None if redrive_all else list(letter_ids), partition)
    if as_json:
        print_json({"group": group, "redrive_requested": requested})
        return
    if not requested:
        click.echo(f"no dead letters to re-drive for {group}")
        return
    click.echo(
        table(
            ["DEAD LETTER", "PARTITION", "TYPE", "EVENT"],
            [[m["id"], m["partition"], m["event_type"], m["event_id"]] for m in requested],
        )
    )
    click.echo(
        f"{len(requested)} re-drive requests recorded for {group}; each partition's owner"
        " handles them within about a second"
    )


COMMANDS: list[click.Command] = [dead_letters]
