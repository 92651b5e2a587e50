"""Operator commands for recovery and housekeeping."""

from __future__ import annotations

import json
from datetime import datetime

import click

from service_runtime.config import SERVICES, ConfigError, database_url
from service_runtime.db import connect
from service_runtime.retention import run_retention


def republish(database_url_: str, since: datetime) -> int:
    """Mark published outbox rows committed since `since` as unpublished: the relay sends them
    again (after Redis lost its data), each to its order's partition stream as it routes every
    row; consumers' inboxes absorb what they had already seen."""
    with connect(database_url_) as conn:
        return conn.execute(
            "UPDATE outbox SET published_at = NULL "
            "WHERE published_at IS NOT NULL AND created_at >= %s",
            (since,),
        ).rowcount


@click.command("republish")
@click.argument("service", type=click.Choice([*SERVICES, "all"]))
@click.option(
    "--since",
    required=True,
    type=click.DateTime(
        formats=["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d"]
    ),
    help="Re-publish rows committed at or after this time (within the outbox retention).",
)
def republish_command(service: str, since: datetime) -> None:
    """Re-publish SERVICE's outbox from a time, e.g. after Redis lost its data."""
    if since.tzinfo is None:
        since = since.astimezone()  # a naive time is local time
    for name in SERVICES if service == "all" else (service,):
        count = republish(database_url(name), since)
        click.echo(f"{name}: {count} outbox rows will be published again")


@click.command("retention")
def retention_command() -> None:
    """Trim the streams (never below what a group has not acknowledged) and prune old outbox,
    inbox and delivery-failure rows now (the cron job does it hourly)."""
    try:
        report = run_retention()
    except ConfigError as err:
        raise click.ClickException(str(err)) from err
    click.echo(json.dumps(report, indent=2))


COMMANDS = [republish_command, retention_command]
